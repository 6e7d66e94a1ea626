"""kill -9, then the same command again, for the training commands on tiny models (generate-data's own
kill -9 test is in test_generate_faults.py): outputs complete, no duplicate or torn rows, training goes on
from the last checkpoint, and no directory looks complete before it is."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from support.cli import FIXTURES, kill_when, run_cli

from toolkit.io import atomic_dir

pytestmark = pytest.mark.timeout(300)


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]  # every line parses: nothing torn


def assert_resumed(out: Path, steps: int, before: list[dict], checkpoint: int) -> None:
    after = rows(out / "metrics.jsonl")
    assert [r["step"] for r in after] == list(range(1, steps + 1))  # each step once
    # rows up to the checkpoint were kept as written, not recomputed (their timings would differ)
    assert after[:checkpoint] == [r for r in before if r["step"] <= checkpoint]
    assert not list(out.rglob(".*.tmp-*"))  # no temp dir left by the kill


def test_sft_kill_9_then_resume(tiny_llama_dir, tmp_path):
    out = tmp_path / "sft"
    argv = ["sft", "--data", FIXTURES / "alpaca-24.json", "--model", tiny_llama_dir, "--out", out, "--max-steps",
            "6", "--batch-size", "2", "--max-length", "64", "--save-every", "2", "--keep-checkpoints", "1",
            "--resume", "--json"]
    argv = list(map(str, argv))
    kill_when(argv, lambda: (out / "checkpoints" / "step-000002" / "manifest.json").is_file())
    assert not (out / "model").exists()
    before = rows(out / "metrics.jsonl") if (out / "metrics.jsonl").read_text().strip() else []
    again = run_cli(*argv, timeout=240)
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["steps"] == 6
    assert_resumed(out, 6, before, 2)
    assert (out / "model" / "llamakit-manifest.json").is_file()


def test_rlhf_kill_9_then_resume(tiny_llama_dir, tmp_path):
    out = tmp_path / "ppo"
    argv = ["rlhf", "--policy", tiny_llama_dir, "--prompts", FIXTURES / "prompts-alpaca-32.jsonl", "--out", out,
            "--reward", "rules:length", "--steps", "4", "--batch-size", "4", "--num-minibatches", "2",
            "--ppo-epochs", "1", "--max-new-tokens", "8", "--save-every", "1", "--sample-every", "1", "--resume",
            "--json"]
    argv = list(map(str, argv))
    kill_when(argv, lambda: (out / "checkpoints" / "step-000002" / "manifest.json").is_file())
    assert not (out / "policy").exists()
    before = rows(out / "metrics.jsonl")
    again = run_cli(*argv, timeout=240)
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout.strip().splitlines()[-1])["steps"] == 4
    assert_resumed(out, 4, before, 2)
    assert sorted({r["step"] for r in rows(out / "samples.jsonl")}) == [1, 2, 3, 4]
    assert (out / "policy" / "config.json").is_file()


def test_train_reward_kill_9_leaves_no_complete_looking_dir(tiny_llama_dir, tmp_path):
    out = tmp_path / "rm"
    argv = list(map(str, ["train-reward", "--data", FIXTURES / "hh-harmless-200.jsonl", "--out", out, "--model",
                          tiny_llama_dir, "--max-length", "32", "--batch-size", "4", "--max-steps", "4",
                          "--eval-split", "0.1", "--threads", "1", "--json"]))
    # the kill lands while the model is being written: the temp dir exists, the output does not
    kill_when(argv, lambda: any(tmp_path.glob(".rm.tmp-*/model.safetensors")))
    assert not out.exists()
    assert list(tmp_path.glob(".rm.tmp-*"))
    again = run_cli(*argv, timeout=240)
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["train"]["optimizer_steps"] == 4
    assert (out / "calibration.json").is_file() and (out / "README.md").is_file()
    assert not list(tmp_path.glob(".rm.tmp-*"))  # the killed run's temp dir was cleaned up


def test_atomic_dir_keeps_a_live_writers_temp_dir(tmp_path):
    other = subprocess.Popen(["sleep", "30"])
    try:
        from toolkit.io import _HOST

        live = tmp_path / f".out.tmp-{_HOST}-{other.pid}-0000abcd"
        live.mkdir()
        with atomic_dir(tmp_path / "out", "model") as tmp:
            (tmp / "done").write_text("1")
        assert live.is_dir() and (tmp_path / "out" / "done").is_file()
    finally:
        other.kill()
        other.wait()
