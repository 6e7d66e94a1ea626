"""Two processes started by the CPU preset (templates/accelerate/ddp-cpu.yaml): both train, and the run's
summary (the --json object on stdout, the table on stderr) is printed once, by rank 0."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from support.cli import FIXTURES, ROOT, free_port


def test_cpu_preset_starts_two_ranks_and_only_rank_0_prints(tiny_llama_dir, tmp_path):
    import torch

    out = tmp_path / "sft"
    accelerate = Path(sys.executable).with_name("accelerate")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    env.pop("RANK", None)
    proc = subprocess.run([str(accelerate), "launch", "--config_file", "templates/accelerate/ddp-cpu.yaml",
                           "--main_process_port", str(free_port()), "-m", "toolkit", "sft",
                           "--data", FIXTURES / "alpaca-24.json", "--model", tiny_llama_dir, "--out", out,
                           "--max-steps", "2", "--batch-size", "2", "--max-length", "64", "--json"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stdout  # one summary, not one per rank
    summary = json.loads(lines[0])
    assert summary["steps"] == 2 and summary["model"] == str(out / "model")
    assert proc.stderr.count("loss (last)") == 1  # the summary table, once
    rng = torch.load(out / "checkpoints" / "step-000002" / "rng.pt", weights_only=True)
    assert len(rng) == 2  # a state per rank: two processes trained together
