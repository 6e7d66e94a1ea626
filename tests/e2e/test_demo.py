"""`llamakit demo --fast` end to end (every stage through the real CLI), its report, `init` and `report` errors.

The demo runs once for the module on tiny random models (a LLaMA made to answer the judge with digits as actor,
teacher and judge; a BERT with MiniLM's tokenizer as reward backbone): the same stages and files as on
the real models, in a fraction of the time. The real models run in the benchmarks and `make demo`.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

import click
import pytest
from support.cli import run_cli

from toolkit.cli import cli
from toolkit.config import load_config
from toolkit.demo import CONSTRAINT_MAX_CHARS
from toolkit.io import read_existing

STAGES = ("instructions", "conversations", "preferences", "sft", "train-reward", "rlhf", "compare", "constraints",
          "rlhf-constraints", "eval-policy")
# Setting up the module's demo run counts against the first test's timeout; on 2 busy cores it can take minutes.
DEMO_TIMEOUT = pytest.mark.timeout(1200)


@dataclass(frozen=True)
class DemoModels:
    actor: Path  # actor, teacher and judge
    reward: Path  # the reward model's backbone


@pytest.fixture(scope="module")
def demo_models(tmp_path_factory) -> DemoModels:
    from support.tiny_models import save_tiny_bert, save_tiny_judge_llama

    root = tmp_path_factory.mktemp("demo-models")
    return DemoModels(save_tiny_judge_llama(root / "judge-llama"), save_tiny_bert(root / "bert"))


def run_demo(run: Path, models: DemoModels) -> subprocess.CompletedProcess:
    # One torch thread: models this small gain nothing from a second one, and on a busy 2-core machine OpenMP
    # threads spinning against other processes made the demo 2.4x slower (186 s, not 79).
    return run_cli("demo", "--fast", "--model", models.actor, "--reward-model", models.reward, "--out", run,
                   timeout=900, env={"OMP_NUM_THREADS": "1"})


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory, demo_models) -> Path:
    run = tmp_path_factory.mktemp("demo") / "run"
    first = run_demo(run, demo_models)
    assert first.returncode == 0, first.stderr[-3000:]
    return run


@DEMO_TIMEOUT
def test_demo_fast_runs_every_stage(demo_run):
    for stage in STAGES:
        assert (demo_run / "stages" / f"{stage}.json").is_file(), stage
    assert (demo_run / "ppo" / "policy" / "model.safetensors").is_file()
    assert (demo_run / "reward" / "calibration.json").is_file()


@DEMO_TIMEOUT
def test_preferences_scored_by_the_teacher_as_judge_and_by_the_rules(demo_run):
    pairs = read_existing(demo_run / "data" / "preferences.jsonl")
    assert pairs
    for pair in pairs:  # scored by the teacher as judge (through its logprobs) and by the rules
        for candidate in pair["meta"]["candidates"]:
            assert 0 <= candidate["judge"]["rating"] <= 5 and candidate["judge"]["rating_mass"] > 0
            assert 0 <= candidate["rules_score"] <= 1


@DEMO_TIMEOUT
def test_constraints_slice_keeps_heldout_instructions_out_of_training(demo_run):
    held = {r["base_prompt"] for r in read_existing(demo_run / "data" / "constraint-heldout.jsonl")}
    trained = {r["base_prompt"] for r in read_existing(demo_run / "data" / "constraint-train.jsonl")}
    assert held and trained and not held & trained
    assert max(len(p) for p in held | trained) <= CONSTRAINT_MAX_CHARS  # no page-long seed-task inputs
    pool = {r["prompt"] for r in read_existing(demo_run / "data" / "prompts.jsonl")}
    assert not held & pool
    rollouts = {r["prompt"] for r in read_existing(demo_run / "grpo-constraints" / "samples.jsonl")}
    train_prompts = {r["prompt"] for r in read_existing(demo_run / "data" / "constraint-train.jsonl")}
    assert rollouts and rollouts <= train_prompts
    trained = json.loads((demo_run / "stages" / "rlhf-constraints.json").read_text())["result"]
    assert (trained["algo"], trained["guide"]) == ("grpo", "revise")
    summary = json.loads((demo_run / "eval" / "summary.json").read_text())
    assert summary["prompts"] == len(held) and summary["kl"] is not None
    assert 0 <= summary["baseline"]["scorer"] <= 1 and 0 <= summary["policy"]["scorer"] <= 1


@DEMO_TIMEOUT
def test_report_opens_with_before_and_after_and_holds_its_plots(demo_run):
    html = (demo_run / "report.html").read_text()
    for heading in ("Headline", "Stages", "Data", "Reward model", "PPO", "Before and after", "Settings"):
        assert f"<h2>{heading}" in html, heading
    assert html.index("<h2>Headline") < html.index("<h2>Stages")  # the report opens with before → after
    assert "constraints met" in html and "KL(after" in html
    assert "GRPO (with revised answers) steps on the checker" in html
    assert html.count("data:image/png;base64,") >= 4  # self-contained: the plots are inside
    assert (demo_run / "report.md").read_text().startswith("# llamakit run report")
    pairs = read_existing(demo_run / "data" / "preferences.jsonl")
    both_rank = [p for p in pairs if p["meta"]["chosen"]["rules_score"] != p["meta"]["rejected"]["rules_score"]]
    assert ("judge agrees with rules" in html) == bool(both_rank)


@DEMO_TIMEOUT
def test_demo_again_resumes_from_the_finished_stages(demo_run, demo_models, tmp_path):
    again = run_demo(demo_run, demo_models)
    assert again.returncode == 0, again.stderr[-2000:]
    assert again.stderr.count("cached") == len(STAGES) - 1  # compare is cached silently

    from toolkit.report import screenshot

    png = screenshot(demo_run / "report.html", tmp_path / "report.png")
    assert png.stat().st_size > 50_000  # a rendered page with tables and plots, not a blank one


@DEMO_TIMEOUT
def test_a_failing_stage_is_one_line_with_its_reason_and_the_finished_stages_stay(demo_run, demo_models, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(demo_run, run)
    (run / "stages" / "eval-policy.json").unlink()
    (run / "grpo-constraints" / "policy" / "config.json").unlink()  # the stage's input is no longer a model
    failed = run_demo(run, demo_models)
    assert failed.returncode == 2
    last = failed.stderr.strip().splitlines()[-1]
    assert last.startswith("error: stage 'eval-policy' failed: POLICY") and "is not a model" in last, last
    assert "; command: llamakit eval-policy " in last
    assert len(list((run / "stages").glob("*.json"))) == len(STAGES) - 1  # the finished stages are kept
    assert not (run / "stages" / "eval-policy.json").exists()


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
