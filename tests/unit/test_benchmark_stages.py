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


def _constraints(out, name: str) -> list:
    return ["generate-data", "constraints", "--prompts", FIXTURES / "alpaca-24.json", "--out", out / f"{name}.jsonl",
            "--seed", 0]


def _events(err: str) -> list[str]:
    """The stage log's lines as 'NAME started' / 'NAME ended', in order."""
    return [line.split("] ", 1)[1].split(":")[0] + (" started" if ": llamakit" in line else " ended")
            for line in err.splitlines() if "] " in line]


def test_run_graph_starts_a_stage_once_what_it_comes_after_is_done(tmp_path, capsys):
    Stages(tmp_path, threads=1).run_graph([
        ("after_a", _constraints(tmp_path, "after_a"), None, ("a",)),  # first in priority, but not ready before a
        ("a", _constraints(tmp_path, "a"), None, ()),
        ("c", _constraints(tmp_path, "c"), None, ()),
    ], slots=2)
    events = _events(capsys.readouterr().err)
    assert events[:2] == ["a started", "c started"]  # two slots, and after_a waits though listed first
    assert events.index("a ended") < events.index("after_a started")
    assert {p.name for p in tmp_path.glob(".done-*")} == {".done-a", ".done-after_a", ".done-c"}


def test_run_graph_never_starts_a_stage_after_one_that_failed(tmp_path, capsys):
    broken = ["dpo", "--data", tmp_path / "missing.jsonl", "--policy", tmp_path, "--out", tmp_path / "d"]
    with pytest.raises(SystemExit) as failed:
        Stages(tmp_path, threads=1).run_graph([
            ("broken", broken, None, ()),
            ("after_broken", _constraints(tmp_path, "after_broken"), None, ("broken",)),
            ("beside", _constraints(tmp_path, "beside"), None, ()),
        ], slots=2)
    assert str(failed.value).startswith("stage broken failed (exit 2)")
    events = _events(capsys.readouterr().err)
    assert "after_broken started" not in events and not (tmp_path / "after_broken.jsonl").exists()
    assert (tmp_path / ".done-beside").is_file()  # the stage running beside it finished, and is kept


def test_run_graph_refuses_a_stage_after_one_it_does_not_know(tmp_path):
    with pytest.raises(ValueError, match="comes after"):
        Stages(tmp_path, threads=1).run_graph([("b", ["generate-data", "constraints"], None, ("a",))], slots=2)
