"""benchmarks/gpu_check.py runs on this CPU-only machine: it says there is no GPU in one line, and its PPO path
runs end to end on a tiny LLaMA (--cpu-smoke), so the GPU check cannot rot while no GPU is at hand."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from support.cli import ROOT

SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


def run(*args: str, tmp_path) -> subprocess.CompletedProcess:
    # no GPU even where there is one: the real check takes minutes and the tests never depend on a GPU
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run([sys.executable, str(SCRIPT), *args, "--out", str(tmp_path / "work")], capture_output=True,
                          text=True, timeout=600, cwd=ROOT, env=env)


def test_without_a_gpu_one_line_and_exit_0(tmp_path):
    proc = run(tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr
    [line] = proc.stdout.strip().splitlines()
    assert json.loads(line) == {"gpu": None, "skipped": "no CUDA device here: run this on a machine with a GPU"}


def test_cpu_smoke_runs_ppo_grpo_and_dpo_and_the_plan_estimates(tmp_path):
    saved = tmp_path / "line.json"
    proc = run("--cpu-smoke", "--json-out", str(saved), tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert json.loads(saved.read_text()) == result
    tiny = result["tiny"]
    assert set(tiny) == {"ppo", "grpo", "dpo"}
    for method, measured in tiny.items():
        assert measured["steps"] == 1 and measured["seconds_per_step"] > 0, method
        assert measured["plan_estimate_gib"] > 0 and measured["peak_gpu_gib"] is None, method
        assert (tmp_path / "work" / f"{method}-tiny" / "policy" / "config.json").is_file(), method
    assert tiny["ppo"]["rollout_tokens_per_s"] > 0 and tiny["grpo"]["rollout_tokens_per_s"] > 0
    assert tiny["dpo"]["loss_last"] > 0
    assert "skipped" in result["zero3_1b"]
