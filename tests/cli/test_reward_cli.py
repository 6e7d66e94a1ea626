"""End to end through the CLI: train-reward on an HH slice (MiniLM), then eval-reward and calibrate.

The commands run in this process through `toolkit.cli.main` (the same entry point, error handling and exit
codes as the `llamakit` script): a subprocess per command would re-import torch and transformers each time
and cost most of this file's run time. One test keeps a real subprocess for the one-line error contract.
"""

from __future__ import annotations

import json
import shutil

import pytest
from support.cli import FIXTURES, cli, hh_slice, run_cli

HH = FIXTURES / "hh-harmless-200.jsonl"
KEYS = {"accuracy", "ece", "brier", "nll", "auc", "n", "ties"}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny batches: one thread is as fast, and steady on a shared machine
    out = tmp_path_factory.mktemp("reward") / "rm"
    data = hh_slice(out.parent / "hh-60.jsonl", 0, 60)
    rc, stdout, stderr = cli("train-reward", "--data", data, "--out", out, "--max-steps", "2", "--batch-size", "4",
                             "--max-length", "48", "--eval-split", "0.25", "--json")
    assert rc == 0, stderr
    yield out, json.loads(stdout)
    torch.set_num_threads(threads)


def test_a_second_train_reward_onto_the_same_out_refuses_without_overwrite(trained):
    """Issue 14: a second run onto runs/rm replaced the first model without a word."""
    out, _ = trained
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    data = hh_slice(out.parent / "hh-20.jsonl", 60, 80)
    rc, _, err = cli("train-reward", "--data", data, "--out", out, "--max-steps", "1")
    assert rc == 2 and "pass --overwrite to replace it" in err, err
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


def test_train_reward_writes_a_complete_directory(trained):
    out, metrics = trained
    for name in ("config.json", "model.safetensors", "reward_config.json", "tokenizer.json", "calibration.json",
                 "metrics.json", "reliability.png", "loss.png", "README.md"):
        assert (out / name).is_file(), name
    # A standard transformers reward model (issue 18): the head is the classifier's own weights.
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["BertForSequenceClassification"] and config["id2label"] == {"0": "reward"}
    assert not (out / "reward_head.safetensors").exists()
    assert not list(out.parent.glob(".rm.tmp-*"))  # the temp dir was renamed into place
    calibration = json.loads((out / "calibration.json").read_text())
    assert calibration["method"] == "temperature" and calibration["temperature"] > 0
    assert calibration["n_pairs"] == 15 and calibration["reward_std"] > 0
    # MiniLM is an encoder: its reward is read at [CLS], and the dir says so for whoever scores with it.
    assert json.loads((out / "reward_config.json").read_text())["read_at"] == "first"
    assert set(calibration["metrics"]["raw"]) == KEYS == set(calibration["metrics"]["calibrated"])
    assert metrics["train"]["pairs"] == 45 and metrics["train"]["optimizer_steps"] == 2
    # Rows longer than --max-length: training goes on, with a warning, and the texts keep their end.
    assert metrics["train"]["texts_cut"] > 0
    assert any("cut from the left" in w for w in metrics["warnings"])
    assert any("only 15 held-out pairs" in w for w in metrics["warnings"])
    assert (out / "reliability.png").read_bytes()[:4] == b"\x89PNG"
    card = (out / "README.md").read_text()
    assert "| raw |" in card and "reliability.png" in card
    assert f'`BertForSequenceClassification` giving the same raw reward r: `AutoModelForSequenceClassification.' \
           f'from_pretrained("{out}")' in card


def test_eval_reward_json_and_plot(trained, tmp_path):
    out, _ = trained
    small = hh_slice(tmp_path / "pairs.jsonl", 150, 170)
    plot = tmp_path / "rel.png"
    rc, stdout, stderr = cli("eval-reward", out, "--data", small, "--json", "--plot", plot)
    assert rc == 0, stderr
    assert len(stdout.strip().splitlines()) == 1  # ONE JSON object on stdout
    result = json.loads(stdout)
    assert KEYS <= set(result) and KEYS <= set(result["raw"])
    assert result["n"] == 20 and 0 <= result["accuracy"] <= 1 and 0 <= result["ece"] <= 1
    assert result["accuracy"] == result["raw"]["accuracy"]  # a temperature never flips a pair
    assert 0 <= result["ece_noise"]["median"] <= result["ece_noise"]["p90"] <= 1
    assert plot.read_bytes()[:4] == b"\x89PNG"


def test_eval_reward_format_flag(trained, tmp_path):
    out, _ = trained
    small = hh_slice(tmp_path / "pairs.jsonl", 150, 155)
    rc, stdout, _ = cli("eval-reward", out, "--data", small, "--format", "hh", "--json")
    assert rc == 0 and json.loads(stdout)["n"] == 5
    # Forcing a format the rows are not in is a one-line error naming file, line and field.
    rc, _, stderr = cli("eval-reward", out, "--data", small, "--format", "preference")
    assert rc == 2 and len(stderr.strip().splitlines()) == 1
    assert "pairs.jsonl:1: field 'prompt': missing" in stderr


def test_calibrate_rewrites_calibration_json(trained, tmp_path):
    out, _ = trained
    copy = tmp_path / "rm"
    shutil.copytree(out, copy)
    before = json.loads((copy / "calibration.json").read_text())
    small = hh_slice(tmp_path / "held.jsonl", 100, 125)
    rc, stdout, stderr = cli("calibrate", copy, "--data", small, "--calibration", "isotonic", "--json")
    assert rc == 0, stderr
    after = json.loads((copy / "calibration.json").read_text())
    assert json.loads(stdout)["method"] == after["method"] == "isotonic"
    assert after["n_pairs"] == 25 and after["data"] == str(small)
    assert after["reward_mean"] == before["reward_mean"]  # training statistics are kept
    assert after["metrics"]["calibrated"]["nll"] <= after["metrics"]["raw"]["nll"] + 1e-9
    assert not list(copy.glob(".calibration.json.tmp"))  # written through a temp file and renamed
    # The refitted calibration is the one scoring now uses.
    rc, stdout, _ = cli("eval-reward", copy, "--data", small, "--json")
    assert rc == 0 and json.loads(stdout)["method"] == "isotonic"


def test_mismatched_calibration_is_one_line(trained, tmp_path):
    out, _ = trained
    copy = tmp_path / "other"
    shutil.copytree(out, copy)
    calibration = json.loads((copy / "calibration.json").read_text())
    (copy / "calibration.json").write_text(json.dumps({**calibration, "fingerprint": "0123456789abcdef"}))
    rc, _, stderr = cli("eval-reward", copy, "--data", HH)
    assert rc == 2 and len(stderr.strip().splitlines()) == 1
    assert "calibration.json: field 'fingerprint': fitted on other weights" in stderr
    # `calibrate` is the way out: it refits on the pairs given and the model is usable again.
    small = hh_slice(tmp_path / "held.jsonl", 100, 120)
    rc, _, stderr = cli("calibrate", copy, "--data", small)
    assert rc == 0 and "reward mean/std taken from these pairs" in " ".join(stderr.split())
    assert cli("eval-reward", copy, "--data", small, "--json")[0] == 0


def test_eval_reward_without_calibration_is_one_line(trained, tmp_path):
    out, _ = trained
    copy = tmp_path / "uncalibrated"
    shutil.copytree(out, copy)
    (copy / "calibration.json").unlink()
    proc = run_cli("eval-reward", copy, "--data", HH)  # a real process: exit code and stderr as a user sees them
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1
    assert "no calibration.json" in proc.stderr and "llamakit calibrate" in proc.stderr


def test_eval_reward_accuracy_by_confidence_and_coverage_plot(trained, tmp_path):
    """Issue 20: when to trust a verdict. Accuracy per confidence decile and on the most confident pairs."""
    out, _ = trained
    small = hh_slice(tmp_path / "pairs.jsonl", 150, 175)
    png = tmp_path / "plots" / "coverage.png"
    rc, stdout, stderr = cli("eval-reward", out, "--data", small, "--json", "--coverage-plot", png)
    assert rc == 0, stderr
    result = json.loads(stdout)
    groups = result["by_confidence"]
    assert len(groups) == 10 and sum(g["n"] for g in groups) == result["n"] == 25
    assert all(0.5 <= g["confidence_min"] <= g["mean_confidence"] <= g["confidence_max"] <= 1 for g in groups)
    assert [g["confidence_max"] for g in groups] == sorted(g["confidence_max"] for g in groups)
    selective = result["selective"]
    assert selective["by"] == "confidence" and set(selective["accuracy_at_coverage"]) == {"0.5", "0.8", "1.0"}
    assert selective["accuracy_at_coverage"]["1.0"] == result["accuracy"]
    assert result["coverage_plot"] == str(png) and png.read_bytes()[:4] == b"\x89PNG"
    # The tables a user reads carry the same numbers.
    rc, _, stderr = cli("eval-reward", out, "--data", small)
    kept = selective["accuracy_at_coverage"]
    assert rc == 0 and f"{kept['0.5']:.4f} / {kept['0.8']:.4f}" in stderr  # the 50% / 80% row
    assert "accuracy by confidence decile" in stderr
    top = groups[-1]
    assert f"n {top['n']}, accuracy {top['accuracy']:.4f}" in stderr


def test_skip_bad_rows_trains_on_the_rest_and_names_each_row_set_aside(tmp_path):
    data = hh_slice(tmp_path / "hh.jsonl", 0, 12)
    lines = data.read_text().splitlines()
    lines[3] = json.dumps({"chosen": json.loads(lines[3])["chosen"]})  # no "rejected"
    data.write_text("\n".join(lines) + "\n")
    common = ["--data", data, "--max-steps", "1", "--batch-size", "4", "--max-length", "48", "--eval-split", "0.25"]
    code, _, err = cli("train-reward", *common, "--out", tmp_path / "refused")
    assert code == 2 and f"{data}:4: field 'rejected': missing (--skip-bad-rows sets such rows aside" in err
    code, _, err = cli("train-reward", *common, "--out", tmp_path / "rm", "--skip-bad-rows")
    assert code == 0, err
    assert f"1 bad row(s) set aside: {data}:4: field 'rejected': missing" in err
    metrics = json.loads((tmp_path / "rm" / "metrics.json").read_text())
    assert any("bad row(s) set aside" in w for w in metrics["warnings"])
