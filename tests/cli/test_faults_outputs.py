"""Outputs that cannot be written, a folder of the user's as an output, two processes writing one output: every
command ends with one error line naming the path, no traceback, and changes nothing; a second writer is refused
and rows never interleave.

The unwritable sweep runs `toolkit.cli.main` in this process (seconds); the two-writer runs are two real
`python -m toolkit` processes started at once, against the loopback fault server or on the tiny model.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from support.cli import FIXTURES, LLAMAKIT, ROOT, cli
from support.fault_server import running_fault_server

pytestmark = pytest.mark.timeout(300)

NOWHERE = "http://127.0.0.1:9/v1"  # nothing listens: an unwritable output must stop the run before any request


@pytest.fixture(scope="module")
def fault_server():
    with running_fault_server(latency=0.05) as server:
        yield server


def write_prompts(path: Path, prompts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    return path


def conversations(prompts: Path, out: Path, url: str, *extra: str) -> list[str]:
    return ["generate-data", "conversations", "--prompts", str(prompts), "--out", str(out), "--teacher",
            "openai:fault", "--base-url", url, "--turns", "1", "--json", *extra]


# each command with OUT: the path that cannot be created (a file for the row writers, a directory otherwise)
COMMANDS = {
    "generate-data": lambda out, tmp, _tiny: conversations(write_prompts(tmp / "prompts.jsonl", ["unwritable 1"]),
                                                           Path(f"{out}.jsonl"), NOWHERE),
    "sft": lambda out, _tmp, tiny: ["sft", "--data", FIXTURES / "alpaca-24.json", "--model", tiny, "--out", out,
                                    "--max-steps", "1", "--batch-size", "2", "--max-length", "64"],
    "rlhf": lambda out, _tmp, tiny: ["rlhf", "--policy", tiny, "--prompts", FIXTURES / "prompts-alpaca-32.jsonl",
                                     "--out", out, "--steps", "1", "--batch-size", "2", "--num-minibatches", "1",
                                     "--max-new-tokens", "4"],
    "train-reward": lambda out, _tmp, tiny: ["train-reward", "--data", FIXTURES / "hh-harmless-6.jsonl", "--out",
                                             out, "--model", tiny, "--max-steps", "1", "--max-length", "32",
                                             "--eval-split", "0.5"],
    "data convert": lambda out, _tmp, _tiny: ["data", "convert", FIXTURES / "hh-harmless-6.jsonl", f"{out}.jsonl",
                                              "--to", "llamakit"],
}


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc")
@pytest.mark.parametrize("place", ["under a regular file", "under /proc"])
@pytest.mark.parametrize("command", list(COMMANDS))
def test_an_output_that_cannot_be_created_is_one_line_naming_it(command, place, capsys, tmp_path, tiny_llama_dir):
    if place == "under a regular file":
        blocker = tmp_path / "a-file"
        blocker.write_text("a regular file, so nothing can be created under it (even by root)\n")
        out = blocker / "out"
    else:
        out = Path("/proc/llamakit-no-such-dir/out")
    code, _, err = cli(*COMMANDS[command](out, tmp_path, tiny_llama_dir))
    assert code != 0 and "Traceback" not in err, err
    last = err.strip().splitlines()[-1]  # sft and rlhf may warn about the data first
    assert last.startswith("error: ") and str(out.parent) in last, err


# each directory-writing command with OUT (test_output_safety.py checks the message; here: every command names OUT)
DIR_COMMANDS = {
    "train-reward": lambda out, tiny: ["train-reward", "--data", FIXTURES / "hh-harmless-6.jsonl", "--model", tiny,
                                       "--max-steps", "1", "--max-length", "32", "--eval-split", "0.5", "--out", out],
    "sft": lambda out, tiny: ["sft", "--data", FIXTURES / "alpaca-24.json", "--model", tiny, "--max-steps", "1",
                              "--out", out],
    "rlhf": lambda out, tiny: ["rlhf", "--policy", tiny, "--prompts", FIXTURES / "prompts-alpaca-32.jsonl",
                               "--steps", "1", "--out", out],
    "data convert --to hf": lambda out, _tiny: ["data", "convert", FIXTURES / "hh-harmless-6.jsonl", out, "--to",
                                                "hf"],
}


@pytest.mark.parametrize("extra", [(), ("--overwrite",)], ids=["plain", "overwrite"])
@pytest.mark.parametrize("command", list(DIR_COMMANDS))
def test_a_folder_of_the_users_as_out_is_refused_naming_it(command, extra, capsys, tmp_path, tiny_llama_dir):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("notes\n")
    code, _, err = cli(*DIR_COMMANDS[command](precious, tiny_llama_dir), *extra)
    assert code == 2, err
    last = err.strip().splitlines()[-1]
    assert "Traceback" not in err and last.startswith("error: ") and str(precious) in last, err
    assert sorted(p.name for p in precious.iterdir()) == ["notes.txt"]
    assert (precious / "notes.txt").read_text() == "notes\n"


def both(argv: list, second_when: Callable[[], bool] = lambda: True) -> tuple[list[int], list[str]]:
    """`llamakit ARGV` twice, the second once `second_when()` holds (or the first has ended): the sorted exit
    codes, and the last stderr line of each that failed."""
    def start() -> subprocess.Popen:
        return subprocess.Popen([*LLAMAKIT, *map(str, argv)], cwd=ROOT, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)

    first = start()
    deadline = time.monotonic() + 120
    while not second_when() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    procs = [first, start()]
    results = []
    for proc in procs:
        _, err = proc.communicate(timeout=240)
        results.append((proc.returncode, err))
    refusals = [err.strip().splitlines()[-1] for code, err in results if code != 0]
    return sorted(code for code, _ in results), refusals


def test_two_generate_data_processes_on_one_output(tmp_path, fault_server):
    n = 30
    prompts = write_prompts(tmp_path / "prompts.jsonl", [f"two writers {i}" for i in range(n)])
    out = tmp_path / "answers.jsonl"
    codes, refusals = both(conversations(prompts, out, fault_server.url, "--concurrency", "2"))
    rows = [json.loads(line) for line in out.read_text().splitlines()]  # every line parses: nothing torn
    assert len(rows) == len({r["id"] for r in rows}) == n
    # either the second was refused, or it started after the first had finished and found nothing to do
    assert codes == [0, 0] or (codes == [0, 2] and "another llamakit process is writing" in refusals[0]), \
        (codes, refusals)


def test_a_second_sft_onto_a_running_ones_output_is_refused(tmp_path, tiny_llama_dir):
    """The second starts once the first has logged a step. (Two started at the same instant on a fresh --out can
    both run: the README's "not covered yet".)"""
    out = tmp_path / "sft"
    metrics = out / "metrics.jsonl"
    codes, refusals = both(["sft", "--data", FIXTURES / "alpaca-24.json", "--model", tiny_llama_dir, "--out", out,
                            "--max-steps", "6", "--batch-size", "2", "--max-length", "64"],
                           second_when=lambda: metrics.is_file() and metrics.stat().st_size > 0)
    assert codes == [0, 2], refusals
    assert refusals[0].startswith("error: ") and str(out) in refusals[0], refusals
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 7))
