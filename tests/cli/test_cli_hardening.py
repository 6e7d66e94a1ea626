"""Issue 14, defects 8 (errors name the real cause), 9 (credentials never printed or stored), 11 (config paths
relative to the config file, `report` on one stage's output) and 12 (SIGINT/SIGTERM: one line, what is kept,
how to resume; no lock file left). The real CLI: `main` in this process, or a subprocess where a signal must
reach a process of its own; a loopback API from tests/support/fault_server.py; tiny random LLaMA runs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path

import click
import pytest
from support.cli import FIXTURES, LLAMAKIT, ROOT, cli, free_port
from support.fault_server import running_fault_server

from toolkit.cli import cli as llamakit_group
from toolkit.config import load_config
from toolkit.console import redact, redact_url
from toolkit.errors import EXIT_ROWS_FAILED, UserError
from toolkit.io import RowWriter


@pytest.fixture(scope="module")
def fault_server():
    with running_fault_server(latency=0.1) as server:
        yield server


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]  # every line parses: nothing torn


def write_prompts(path: Path, n: int, text: str = "hardening question") -> Path:
    path.write_text("".join(json.dumps({"prompt": f"{text} {i}"}) + "\n" for i in range(n)))
    return path


def answers(prompts: Path, out: Path, url: str, *extra: str) -> list[str]:
    return [str(a) for a in ("generate-data", "conversations", "--prompts", prompts, "--out", out, "--teacher",
                             "openai:fault", "--base-url", url, "--turns", "1", "--json", *extra)]


def locks(directory: Path) -> list[Path]:
    return list(directory.rglob("*.lock"))


# ---------------------------------------------------------------- 12: SIGINT / SIGTERM


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_stops_generate_data_with_one_line_and_the_same_command_resumes(capsys, tmp_path, fault_server, sig):
    prompts = write_prompts(tmp_path / "prompts.jsonl", 12, f"signal {sig.name}")
    out = tmp_path / "answers.jsonl"
    argv = answers(prompts, out, fault_server.url, "--concurrency", "2")
    proc = subprocess.Popen([*LLAMAKIT, *argv], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not (out.is_file() and out.read_bytes().count(b"\n") >= 1):
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.monotonic() < deadline, "no row was written"
        time.sleep(0.02)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)

    assert proc.returncode == 128 + sig  # 143 / 130, not death by the signal (-15) or "aborted"
    line = err.strip().splitlines()[-1]
    kept = rows(out)
    assert line == (f"interrupted by {sig.name}: the {len(kept)} rows finished so far are kept in {out}; "
                    "run the same command again to resume (finished rows are skipped)")
    assert "Traceback" not in err and "Task was destroyed" not in err and "never awaited" not in err
    assert 1 <= len(kept) < 12
    assert not locks(tmp_path)  # released and removed by the `finally:` blocks the signal let run

    code, _, err = cli(*argv)  # the same command again finishes the rest
    assert code == 0, err
    done = rows(out)
    assert done[:len(kept)] == kept and len({r["id"] for r in done}) == len(done) == 12
    requests = fault_server.stats()["requests"]
    assert all(requests[r["messages"][0]["content"]] == 1 for r in kept)  # finished rows were not asked again
    assert not locks(tmp_path)  # a clean run leaves no OUT.lock beside its files


def signal_when(ready: Callable[[], bool], sig: int, limit: float = 120) -> threading.Thread:
    """Send `sig` to this process once `ready()` holds (from a thread: the handler runs in the main thread)."""

    def wait() -> None:
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            if ready():
                os.kill(os.getpid(), sig)
                return
            time.sleep(0.01)

    thread = threading.Thread(target=wait, daemon=True)
    thread.start()
    return thread


def test_sigint_stops_sft_keeps_its_checkpoint_then_resume_and_report(capsys, tmp_path, tiny_llama_dir):
    """The synchronous path: the signal raises in the training loop, `finally:` closes metrics.jsonl (its
    lock removed) and no temp dir is left; --resume goes on; `report` reads the sft directory. (SIGINT: sent
    to this very process, SIGTERM would end the test run itself wherever no handler catches it.)"""
    out = tmp_path / "sft"
    argv = ["sft", "--data", FIXTURES / "alpaca-24.json", "--model", tiny_llama_dir, "--out", out, "--batch-size",
            "2", "--max-length", "64", "--save-every", "1", "--keep-checkpoints", "1"]
    first = out / "checkpoints" / "step-000001" / "manifest.json"
    waiter = signal_when(first.is_file, signal.SIGINT)
    code, _, err = cli(*argv, "--max-steps", "2000")  # far more steps than it gets to run
    waiter.join()
    assert code == 130, err
    (checkpoint,) = (out / "checkpoints").iterdir()
    assert err.strip().splitlines()[-1] == (f"interrupted by SIGINT: the last checkpoint is kept: {checkpoint}; "
                                            "run the same command with --resume to continue from the last checkpoint")
    assert not locks(out) and not list(out.rglob(".*.tmp-*")) and not (out / "model").exists()

    step = int(checkpoint.name.split("-")[1])
    code, _, err = cli(*argv, "--max-steps", step + 1, "--resume")
    assert code == 0, err
    assert [r["step"] for r in rows(out / "metrics.jsonl")] == list(range(1, step + 2))
    assert (out / "model").is_dir() and not locks(out)

    code, _, err = cli("report", out)  # was "nothing to report"
    assert code == 0, err
    html = (out / "report.html").read_text()
    assert "<h2>SFT" in html and "data:image/png;base64," in html  # the loss curve, embedded


# ---------------------------------------------------------------- 12: lock files


def test_lock_file_is_removed_on_close_and_writers_still_exclude_each_other(tmp_path):
    path = tmp_path / "rows.jsonl"
    lock = tmp_path / "rows.jsonl.lock"
    with RowWriter(path) as writer:
        writer.write({"n": 1})
        assert lock.is_file()
        with pytest.raises(UserError, match="another llamakit process is writing this file"):
            RowWriter(path)
    assert not lock.exists()
    writer = RowWriter(path)
    writer.close()
    writer.close()  # twice is harmless: the descriptor is not closed a second time
    assert not lock.exists() and rows(path) == [{"n": 1}]


HOLDERS = textwrap.dedent("""
    import os, sys, time
    from toolkit.errors import UserError
    from toolkit.io import RowWriter
    path, marker, until = sys.argv[1], sys.argv[2], float(sys.argv[3])
    held = 0
    while time.time() < until:
        try:
            writer = RowWriter(path)
        except UserError:
            continue
        try:
            os.close(os.open(marker, os.O_CREAT | os.O_EXCL))  # exists already: another process holds it too
        except FileExistsError:
            print("BOTH HELD THE LOCK")
            sys.exit(1)
        held += 1
        os.unlink(marker)
        writer.close()
    print(held)
""")


def test_removing_the_lock_file_never_lets_two_processes_hold_it(tmp_path):
    """Four processes take and drop the lock as fast as they can for 2 s; a marker made with O_EXCL while
    holding it shows that no two ever held it at once, though the lock file is deleted on every release.
    (Without the check that the path still names the file locked, this fails within a second.)"""
    path, marker = tmp_path / "rows.jsonl", tmp_path / "holder"
    until = str(time.time() + 2)
    procs = [subprocess.Popen([sys.executable, "-c", HOLDERS, str(path), str(marker), until], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(4)]
    results = [p.communicate(timeout=60) for p in procs]
    for proc, (stdout, stderr) in zip(procs, results, strict=True):
        assert proc.returncode == 0, stdout + stderr
    assert sum(int(stdout) for stdout, _ in results) > 100
    assert not locks(tmp_path)


# ---------------------------------------------------------------- 8: errors that name the real cause


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc")
def test_an_unwritable_output_is_not_reported_as_locked(capsys, tmp_path, fault_server):
    with pytest.raises(UserError, match="cannot write here: cannot create files in '/proc'"):
        RowWriter("/proc/llamakit-hardening.jsonl")
    prompts = write_prompts(tmp_path / "prompts.jsonl", 1)
    code, _, err = cli(*answers(prompts, Path("/proc/llamakit-hardening.jsonl"), fault_server.url))
    assert code == 2
    assert err.strip() == "error: /proc/llamakit-hardening.jsonl: cannot write here: cannot create files in '/proc'"


@pytest.mark.parametrize("transport", ["aiohttp", "httpx"])
def test_a_refused_connection_is_named_not_reported_as_a_timeout(capsys, tmp_path, monkeypatch, transport):
    monkeypatch.setenv("LLAMAKIT_HTTP", transport)
    url = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    out = tmp_path / "answers.jsonl"
    code, _, err = cli(*answers(write_prompts(tmp_path / "p.jsonl", 1), out, url, "--max-retries", "0"))
    assert code == EXIT_ROWS_FAILED, err
    (failed,) = rows(tmp_path / "answers.failed.jsonl")
    assert failed["error"].startswith(f"Unreachable: connection refused by {url}: nothing listens there")
    assert "Timeout" not in failed["error"]
    code, _, err = cli("ask", "hi", "--teacher", "openai:fault", "--base-url", url)
    assert code == 2
    assert err.strip() == (f"error: openai:fault failed: connection refused by {url}: nothing listens there "
                           "(is the server running?)")


# ---------------------------------------------------------------- 9: credentials


def test_redact_url_hides_userinfo_and_secret_query_values():
    assert redact_url("http://user:PASS@host:8000/v1?api_key=K&model=x&token=T") == \
        "http://***@host:8000/v1?api_key=***&model=x&token=***"
    assert redact_url("https://TOKEN@api.example/v1") == "https://***@api.example/v1"
    assert redact_url("http://h/v1?key=K&x-api-key=K&monkey=ok") == "http://h/v1?key=***&x-api-key=***&monkey=ok"
    assert redact_url("http://127.0.0.1:8000/v1") == "http://127.0.0.1:8000/v1"  # nothing secret: unchanged
    assert redact("failed at http://a:SECRET@h/v1. Retry (http://b:S2@h/x).") == \
        "failed at http://***@h/v1. Retry (http://***@h/x)."


def test_credentials_in_a_base_url_are_never_printed_or_stored(capsys, tmp_path):
    url = f"http://alice:PASS-7f3a@127.0.0.1:{free_port()}/v1?api_key=KEY-7f3a"
    for transport in ("aiohttp", "httpx"):
        os.environ["LLAMAKIT_HTTP"] = transport
        try:
            code, out, err = cli("ask", "hi", "--teacher", "openai:fault", "--base-url", url)
        finally:
            del os.environ["LLAMAKIT_HTTP"]
        assert code == 2 and "openai:fault" in err
        assert "PASS-7f3a" not in out + err and "KEY-7f3a" not in out + err
    code, out, err = cli(*answers(write_prompts(tmp_path / "p.jsonl", 1), tmp_path / "a.jsonl", url,
                                          "--max-retries", "0"))
    assert code == EXIT_ROWS_FAILED
    assert "PASS-7f3a" not in out + err and "KEY-7f3a" not in out + err
    assert not [p for p in tmp_path.iterdir() if b"7f3a" in p.read_bytes()]


# ---------------------------------------------------------------- 11: config paths, report


def test_an_init_pipeline_stage_runs_from_the_parent_directory(capsys, tmp_path, monkeypatch, fault_server):
    monkeypatch.chdir(tmp_path)
    code, _, err = cli("init", "pipe")
    assert code == 0, err
    code, _, err = cli("generate-data", "instructions", "--config", "pipe/01-instructions.yaml", "--teacher",
                        "openai:fault", "--base-url", fault_server.url, "--num-instructions", "2",
                        "--max-requests", "2", "--max-retries", "0")
    assert code in (0, EXIT_ROWS_FAILED), err  # was: "seed_tasks.jsonl: no such file"
    assert (tmp_path / "pipe" / "runs" / "my-pipeline" / "data" / "instructions.jsonl").is_file()
    assert not (tmp_path / "runs").exists()  # outputs sit beside the config, where the next stage reads them


def test_config_paths_resolve_against_the_config_dir_but_names_stay_names(tmp_path):
    (tmp_path / "conf" / "models" / "base").mkdir(parents=True)
    config = tmp_path / "conf" / "c.yaml"

    def load(command: click.Command, text: str) -> dict:
        config.write_text(text)
        return load_config(str(config), command, click.Context(command))

    conf = tmp_path / "conf"
    assert load(llamakit_group.commands["sft"], "data: d.jsonl\nout: runs/sft\nmodel: smollm2-135m\n") == {
        "data": str(conf / "d.jsonl"), "out": str(conf / "runs/sft"), "model": "smollm2-135m"}
    assert load(llamakit_group.commands["rlhf"], f"policy: models/base\nreward: rules:length\ncritic: value-head\n"
                                      f"prompts: {tmp_path}/p.jsonl\n") == {
        "policy": str(conf / "models/base"), "reward": "rules:length", "critic": "value-head",
        "prompts": f"{tmp_path}/p.jsonl"}  # an absolute path stays as it is
    assert load(llamakit_group.commands["ask"], "teacher: hf:smollm2-135m\nsystem: models\n") == {
        "teacher": "hf:smollm2-135m", "system": "models"}  # text that happens to name a file stays text
    report_png = load(llamakit_group.commands["report"], "screenshot: shot.png\n")
    assert report_png == {"png": str(conf / "shot.png")}  # any click.Path option


def test_report_of_an_rlhf_a_train_reward_output_and_a_data_file(capsys, tmp_path, tiny_llama_dir, fault_server):
    ppo = tmp_path / "ppo"
    code, _, err = cli("rlhf", "--policy", tiny_llama_dir, "--reward", "rules:length", "--prompts",
                        FIXTURES / "prompts-alpaca-32.jsonl", "--out", ppo, "--steps", "1", "--batch-size", "2",
                        "--num-minibatches", "1", "--ppo-epochs", "1", "--max-new-tokens", "4", "--sample-every", "1")
    assert code == 0, err
    rm = tmp_path / "rm"
    code, _, err = cli("train-reward", "--data", FIXTURES / "hh-harmless-6.jsonl", "--model", tiny_llama_dir,
                        "--out", rm, "--max-steps", "1", "--batch-size", "2", "--eval-split", "0.34",
                        "--max-length", "64")
    assert code == 0, err
    data = tmp_path / "answers.jsonl"
    code, _, err = cli(*answers(write_prompts(tmp_path / "p.jsonl", 3, "report"), data, fault_server.url))
    assert code == 0, err

    for target, html, heading in ((ppo, ppo / "report.html", "PPO"), (rm, rm / "report.html", "Reward model"),
                                  (data, tmp_path / "answers.report.html", "Data")):
        code, _, err = cli("report", target)
        assert code == 0, err  # an rlhf dir was "nothing to report"; a file was refused
        page = html.read_text()
        assert f"<h2>{heading}" in page and "data:image/png;base64," in page, target
    assert "Answers sampled at step 1" in (ppo / "report.md").read_text()
    assert (tmp_path / "answers.report.md").read_text().startswith("# llamakit data report: answers.jsonl")
