"""benchmarks/stages.py: the CLI stages of a benchmark, each in a process forked from a server that imported the
libraries once: a stage's output, exit code, time and peak memory are its own, and a finished stage is skipped."""

from __future__ import annotations

import json
import sys

import pytest
from support.cli import FIXTURES, ROOT

sys.path.insert(0, str(ROOT))
from benchmarks.stages import Stages  # noqa: E402


def test_stages_run_together_report_their_own_output_and_a_failure_names_the_stage(tmp_path):
    stages = Stages(tmp_path, threads=1)
    prompts = tmp_path / "prompts.jsonl"
    summary = tmp_path / "summary.json"
    with pytest.raises(SystemExit) as failed:
        stages.run_together([
            ("constraints", ["generate-data", "constraints", "--prompts", FIXTURES / "alpaca-24.json", "--out",
                             prompts, "--seed", 0, "--json"], summary),
            ("dpo", ["dpo", "--data", tmp_path / "missing.jsonl", "--policy", tmp_path, "--out", tmp_path / "d"],
             None),
        ])
    assert str(failed.value) == (f"stage dpo failed (exit 2): llamakit dpo --data {tmp_path / 'missing.jsonl'} "
                                 f"--policy {tmp_path} --out {tmp_path / 'd'}")
    assert "is not a model directory" in (tmp_path / "logs" / "dpo.err").read_text()  # its own stderr
    assert not (tmp_path / ".done-dpo").exists() and "dpo" not in json.loads((tmp_path / "timings.json").read_text())
    # the stage that succeeded beside it: done, its --json line kept, its own time and memory (the libraries
    # imported by the fork server count, as they would in a fresh process)
    assert (tmp_path / ".done-constraints").is_file()
    assert json.loads(summary.read_text())["rows"] == len(prompts.read_text().splitlines()) > 0
    assert json.loads((tmp_path / "timings.json").read_text())["constraints"] > 0
    assert json.loads((tmp_path / "peak-rss-mb.json").read_text())["constraints"] > 200
    # a rerun skips it
    prompts.unlink()
    Stages(tmp_path, threads=1).run("constraints", ["generate-data", "constraints"])
    assert not prompts.exists()
