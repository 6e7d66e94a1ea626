"""`llamakit demo --fast` end to end (every stage through the real CLI), its report, `init` and `report` errors."""

from __future__ import annotations

import json

import click
import pytest
from conftest import run_cli

from toolkit.cli import cli
from toolkit.config import load_config
from toolkit.demo import CONSTRAINT_MAX_CHARS

STAGES = ("instructions", "conversations", "preferences", "sft", "train-reward", "rlhf", "compare", "constraints",
          "rlhf-constraints", "eval-policy")


@pytest.mark.slow
@pytest.mark.timeout(2400)  # the whole pipeline; under load on 2 cores it can pass pytest's default
def test_demo_fast_end_to_end_then_resumes(tmp_path):
    run = tmp_path / "demo"
    first = run_cli("demo", "--fast", "--out", run, timeout=1500)
    assert first.returncode == 0, first.stderr[-3000:]
    for stage in STAGES:
        assert (run / "stages" / f"{stage}.json").is_file(), stage
    assert (run / "ppo" / "policy" / "model.safetensors").is_file()
    assert (run / "reward" / "calibration.json").is_file()
    from toolkit.io import read_existing

    pairs = read_existing(run / "data" / "preferences.jsonl")
    assert pairs
    for pair in pairs:  # scored by the teacher as judge (through its logprobs) and by the rules
        for candidate in pair["meta"]["candidates"]:
            assert 0 <= candidate["judge"]["rating"] <= 5 and candidate["judge"]["rating_mass"] > 0
            assert 0 <= candidate["rules_score"] <= 1
    # the constraints slice: held-out instructions reach no training stage
    held = {r["base_prompt"] for r in read_existing(run / "data" / "constraint-heldout.jsonl")}
    trained = {r["base_prompt"] for r in read_existing(run / "data" / "constraint-train.jsonl")}
    assert held and trained and not held & trained
    assert max(len(p) for p in held | trained) <= CONSTRAINT_MAX_CHARS  # no page-long seed-task inputs
    pool = {r["prompt"] for r in read_existing(run / "data" / "prompts.jsonl")}
    assert not held & pool
    rollouts = {r["prompt"] for r in read_existing(run / "ppo-constraints" / "samples.jsonl")}
    assert rollouts and rollouts <= {r["prompt"] for r in read_existing(run / "data" / "constraint-train.jsonl")}
    summary = json.loads((run / "eval" / "summary.json").read_text())
    assert summary["prompts"] == len(held) and summary["kl"] is not None
    assert 0 <= summary["baseline"]["scorer"] <= 1 and 0 <= summary["policy"]["scorer"] <= 1

    html = (run / "report.html").read_text()
    for heading in ("Headline", "Stages", "Data", "Reward model", "PPO", "Before and after", "Settings"):
        assert f"<h2>{heading}" in html, heading
    assert html.index("<h2>Headline") < html.index("<h2>Stages")  # the report opens with before → after
    assert "constraints met" in html and "KL(after" in html
    assert html.count("data:image/png;base64,") >= 4  # self-contained: the plots are inside
    assert (run / "report.md").read_text().startswith("# llamakit run report")
    both_rank = [p for p in pairs if p["meta"]["chosen"]["rules_score"] != p["meta"]["rejected"]["rules_score"]]
    assert ("judge agrees with rules" in html) == bool(both_rank)

    again = run_cli("demo", "--fast", "--out", run, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert again.stderr.count("cached") == len(STAGES) - 1  # compare is cached silently

    from toolkit.report import screenshot

    png = screenshot(run / "report.html", tmp_path / "report.png")
    assert png.stat().st_size > 50_000  # a rendered page with tables and plots, not a blank one


def test_init_writes_configs_that_load_against_their_commands(tmp_path):
    result = run_cli("init", tmp_path / "pipe")
    assert result.returncode == 0, result.stderr
    files = sorted((tmp_path / "pipe").glob("*.yaml"))
    assert len(files) == 7 and (tmp_path / "pipe" / "seed_tasks.jsonl").is_file()
    commands = {"serve": cli.commands["serve"], "sft": cli.commands["sft"], "rlhf": cli.commands["rlhf"],
                "train-reward": cli.commands["train-reward"]}
    generate = cli.commands["generate-data"]
    for f in files:
        name = f.stem.split("-", 1)[1]
        command = commands.get(name) or generate.commands[name]
        assert load_config(str(f), command, click.Context(command)), f.name
    refused = run_cli("init", tmp_path / "pipe")
    assert refused.returncode == 2 and "--force" in refused.stderr


def test_report_of_an_empty_dir_is_a_one_line_error(tmp_path):
    result = run_cli("report", tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error:") and len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.stderr


def test_stage_headlines_read_each_commands_json():
    from toolkit.demo import _headline

    reward = {"heldout": {"calibrated": {"accuracy": 0.625, "ece": 0.041}, "raw": {"accuracy": 0.625}}}
    assert _headline("train-reward", reward) == "held-out accuracy 0.625, ECE 0.041"
    assert _headline("rlhf", {"steps": 2, "final": {"objective/scores": -0.75}}) == "steps 2, score -0.75"
    assert _headline("preferences", {"rows_done": 4, "rows_failed": 1}) == "pairs 4, failed 1"
    assert _headline("compare", {"prompts": 4}) == ""
