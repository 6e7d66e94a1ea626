"""`llamakit dpo` as a user runs it, on the tiny LLaMA and Anthropic HH pairs: outputs, kill -9 then --resume,
bad rows, an earlier run in --out, and two DDP processes under torchrun."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from support.cli import ROOT, cli, free_port, hh_slice, kill_when, run_cli

pytestmark = pytest.mark.timeout(300)

TINY = ["--max-length", "48", "--max-prompt-length", "24", "--batch-size", "2", "--learning-rate", "1e-3"]
METRICS = ["loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
           "logps/rejected", "nll_loss", "lr", "grad_norm"]


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]  # every line parses: nothing torn


def test_trains_and_writes_metrics_curves_eval_and_a_loadable_policy(tiny_llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "dpo"
    code, stdout, stderr = cli("dpo", "--data", hh_slice(tmp_path / "train.jsonl", 0, 12), "--eval-data",
                               hh_slice(tmp_path / "eval.jsonl", 12, 16), "--policy", tiny_llama_dir, "--out", out,
                               "--max-steps", "3", *TINY, "--json")
    assert code == 0, stderr
    summary = json.loads(stdout)
    assert summary["steps"] == 3 and summary["pairs"] == 12 and summary["truncated_prompts"] > 0
    assert "pair(s) had their prompt cut" in stderr
    rows = _rows(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3] and all(k in r for r in rows for k in METRICS)
    assert rows[0]["loss"] == pytest.approx(math.log(2), rel=1e-5)  # the policy starts as its reference
    assert rows[-1]["loss"] != rows[0]["loss"]
    assert (out / "curves.png").stat().st_size > 0
    run = json.loads((out / "run.json").read_text())
    assert set(run["eval"]) == {f"eval/{k}" for k in METRICS[:8]} and run["eval"] == summary["eval"]
    manifest = json.loads((out / "policy" / "llamakit-manifest.json").read_text())
    assert manifest["kind"] == "dpo-policy" and manifest["steps"] == 3
    assert AutoModelForCausalLM.from_pretrained(out / "policy").num_parameters() > 0

    again = cli("dpo", "--data", tmp_path / "train.jsonl", "--policy", tiny_llama_dir, "--out", out)
    assert again[0] == 2 and "already holds a run" in again[2] and "--resume" in again[2]


def test_kill_9_then_resume_gives_the_metrics_of_an_uninterrupted_run(tiny_llama_dir, tmp_path):
    data = hh_slice(tmp_path / "train.jsonl", 0, 12)
    common = ["dpo", "--data", data, "--policy", tiny_llama_dir, "--max-steps", "5", *TINY]
    straight = tmp_path / "straight"
    assert cli(*common, "--out", straight)[0] == 0
    # the interrupted run precomputes its reference: the checkpoint must carry those log-probs to the resume
    out = tmp_path / "killed"
    argv = list(map(str, [*common, "--out", out, "--save-every", "2", "--keep-checkpoints", "1", "--precompute-ref",
                          "--resume", "--json"]))
    kill_when(argv, lambda: (out / "checkpoints" / "step-000002" / "manifest.json").is_file())
    assert not (out / "policy").exists()
    assert (out / "checkpoints" / "step-000002" / "reference.safetensors").is_file()
    before = _rows(out / "metrics.jsonl") if (out / "metrics.jsonl").read_text().strip() else []
    again = run_cli(*argv, timeout=240)
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["steps"] == 5
    after, expected = _rows(out / "metrics.jsonl"), _rows(straight / "metrics.jsonl")
    assert [r["step"] for r in after] == [1, 2, 3, 4, 5]  # each step once
    assert after[:2] == [r for r in before if r["step"] <= 2]  # rows up to the checkpoint kept as written
    for got, want in zip(after, expected, strict=True):
        for key in METRICS:
            if got["step"] == 1 and key == "rewards/accuracies":
                continue  # the policy is the reference: the margins it counts are rounding noise, either sign
            # abs: β times a few ulps of a summed log-prob (~-240 here); only the resumed run precomputes its reference
            assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-5), (got["step"], key)
    assert (out / "policy" / "config.json").is_file()


def test_a_broken_row_is_a_one_line_error_naming_file_and_line(tiny_llama_dir, tmp_path):
    data = hh_slice(tmp_path / "bad.jsonl", 0, 3)
    lines = data.read_text().splitlines()
    lines[1] = json.dumps({"chosen": json.loads(lines[1])["chosen"]})  # no "rejected"
    data.write_text("\n".join(lines) + "\n")
    proc = run_cli("dpo", "--data", data, "--policy", tiny_llama_dir, "--out", tmp_path / "out", timeout=120)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    error = proc.stderr.strip().splitlines()
    assert len(error) == 1 and str(data) in error[0] and "2" in error[0] and "rejected" in error[0], proc.stderr
    assert error[0].endswith("(--skip-bad-rows sets such rows aside and trains on the rest)")


def test_skip_bad_rows_trains_on_the_rest_and_names_each_row_set_aside(tiny_llama_dir, tmp_path):
    data = hh_slice(tmp_path / "bad.jsonl", 0, 6)
    lines = data.read_text().splitlines()
    lines[1] = json.dumps({"chosen": json.loads(lines[1])["chosen"]})  # no "rejected"
    lines[-1] = lines[-1][: len(lines[-1]) // 2]  # the last line cut, as by a killed writer
    data.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    code, stdout, stderr = cli("dpo", "--data", data, "--policy", tiny_llama_dir, "--out", out, "--max-steps", "1",
                               *TINY, "--skip-bad-rows", "--json")
    assert code == 0, stderr
    assert json.loads(stdout)["pairs"] == 4
    assert f"2 bad row(s) set aside: {data}:6: invalid JSON" in stderr and f"{data}:2: field 'rejected'" in stderr
    assert [bad.split(": ")[0] for bad in json.loads((out / "run.json").read_text())["data"]["bad_rows"]] == \
        [f"{data}:6", f"{data}:2"]


def test_two_ddp_processes_with_torchrun(tiny_llama_dir, tmp_path):
    out = tmp_path / "ddp"
    torchrun = Path(sys.executable).with_name("torchrun")
    proc = subprocess.run([str(torchrun), "--nproc_per_node", "2", "--master_port", str(free_port()), "-m", "toolkit",
                           "dpo", "--data", str(hh_slice(tmp_path / "train.jsonl", 0, 8)), "--policy",
                           str(tiny_llama_dir), "--out", str(out), "--lora", "--lora-r", "4", "--max-steps", "2",
                           "--precompute-ref", *TINY], capture_output=True, text=True, timeout=240, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = _rows(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]  # one writer: rank 0
    assert rows[0]["loss"] == pytest.approx(math.log(2), rel=1e-5)
    run = json.loads((out / "run.json").read_text())
    assert run["world_size"] == 2 and run["shared_prefix_batches"] == 2  # prompts once: DDP sees the split forward
    assert (out / "policy" / "model.safetensors").is_file()
