"""End to end through the real CLI: train-reward on an HH slice (MiniLM), then eval-reward and calibrate."""

from __future__ import annotations

import json

import pytest
from conftest import FIXTURES, run_cli

HH = FIXTURES / "hh-harmless-200.jsonl"
KEYS = {"accuracy", "ece", "brier", "nll", "auc", "n", "ties"}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("reward") / "rm"
    proc = run_cli("train-reward", "--data", HH, "--out", out, "--max-steps", "3", "--batch-size", "8",
                   "--max-length", "64", "--eval-split", "0.2", "--epochs", "1", "--threads", "2", "--json",
                   check=True, timeout=300)
    return out, json.loads(proc.stdout)


def test_train_reward_writes_a_complete_directory(trained):
    out, metrics = trained
    for name in ("config.json", "model.safetensors", "reward_head.safetensors", "reward_config.json",
                 "tokenizer.json", "calibration.json", "metrics.json", "reliability.png", "loss.png", "README.md"):
        assert (out / name).is_file(), name
    assert not list(out.parent.glob(".rm.tmp-*"))  # the temp dir was renamed into place
    calibration = json.loads((out / "calibration.json").read_text())
    assert calibration["method"] == "temperature" and calibration["temperature"] > 0
    assert calibration["n_pairs"] == 40 and calibration["reward_std"] > 0
    assert set(calibration["metrics"]["raw"]) == KEYS == set(calibration["metrics"]["calibrated"])
    assert metrics["train"]["pairs"] == 160 and metrics["train"]["optimizer_steps"] == 3
    assert metrics["train"]["texts_cut"] > 0  # 64 tokens cut most HH dialogues, from the left
    assert (out / "reliability.png").read_bytes()[:4] == b"\x89PNG"
    card = (out / "README.md").read_text()
    assert "| raw |" in card and "reliability.png" in card


def test_eval_reward_json_and_plot(trained, tmp_path):
    out, _ = trained
    small = tmp_path / "pairs.jsonl"
    small.write_text("".join(HH.read_text(encoding="utf-8").splitlines(keepends=True)[:30]))
    plot = tmp_path / "rel.png"
    proc = run_cli("eval-reward", out, "--data", small, "--json", "--plot", plot, "--threads", "2", check=True)
    result = json.loads(proc.stdout)
    assert KEYS <= set(result) and KEYS <= set(result["raw"])
    assert result["n"] == 30 and 0 <= result["accuracy"] <= 1 and 0 <= result["ece"] <= 1
    assert result["accuracy"] == result["raw"]["accuracy"]  # a temperature never flips a pair
    assert plot.read_bytes()[:4] == b"\x89PNG"


def test_calibrate_rewrites_calibration_json(trained, tmp_path):
    out, _ = trained
    before = json.loads((out / "calibration.json").read_text())
    small = tmp_path / "held.jsonl"
    small.write_text("".join(HH.read_text(encoding="utf-8").splitlines(keepends=True)[100:160]))
    run_cli("calibrate", out, "--data", small, "--method", "isotonic", "--threads", "2", check=True)
    after = json.loads((out / "calibration.json").read_text())
    assert after["method"] == "isotonic" and after["n_pairs"] == 60 and after["data"] == str(small)
    assert after["reward_mean"] == before["reward_mean"]  # training statistics are kept
    assert after["metrics"]["calibrated"]["nll"] <= after["metrics"]["raw"]["nll"] + 1e-9


def test_eval_reward_without_calibration_is_one_line(trained, tmp_path):
    import shutil

    out, _ = trained
    copy = tmp_path / "uncalibrated"
    shutil.copytree(out, copy)
    (copy / "calibration.json").unlink()
    proc = run_cli("eval-reward", copy, "--data", HH)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1
    assert "no calibration.json" in proc.stderr and "llamakit calibrate" in proc.stderr
