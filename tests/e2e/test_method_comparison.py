"""benchmarks/method_comparison.py --tiny: base, best-of-4, PPO, DPO, GRPO, RLOO and GRPO after DPO through the real
CLI on a tiny random LLaMA and the fixtures; then checks on its JSON line and on the files it kept."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from support.cli import ROOT, one_json_line, run_tiny_benchmark

SCRIPT = ROOT / "benchmarks" / "method_comparison.py"
TRAINED = ("ppo_rm", "dpo", "grpo", "rloo", "dpo_grpo", "dpo_ppo", "dpo_ppo_rm")
METHODS = ("base", "best_of_4", *TRAINED)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("methods") / "run"
    return out, one_json_line(run_tiny_benchmark(SCRIPT, out, "--contrast", "--ppo-steps", "1", "--guide", "revise"))


def test_guide_reaches_the_critic_free_runs_only(tiny_run):
    out, result = tiny_run
    assert result["guide"] == "revise"
    guides = {m: json.loads((out / m / "run.json").read_text())["config"]["guide"] for m in TRAINED if m != "dpo"}
    assert guides == {"ppo_rm": "none", "grpo": "revise", "rloo": "revise", "dpo_grpo": "revise", "dpo_ppo": "none",
                      "dpo_ppo_rm": "none"}


def test_one_entry_per_method_with_the_five_figures(tiny_run):
    _, result = tiny_run
    for method in METHODS:
        entry = result[method]
        assert set(entry) == {"gold", "kl", "mean_length", "seconds", "peak_rss_mb"}, method
        assert 0.0 <= entry["gold"] <= 1.0 and entry["mean_length"] > 0, method
    assert result["base"]["kl"] == 0.0
    assert result["best_of_4"]["kl"] == pytest.approx(0.6363, abs=1e-4)  # log 4 − 3/4
    for method in TRAINED:  # each trained in its own process: its own time and peak memory
        assert result[method]["seconds"] > 0 and result[method]["peak_rss_mb"] > 100, method
        assert isinstance(result[method]["kl"], float), method


def test_every_method_paired_with_the_base_on_every_heldout_prompt(tiny_run):
    _, result = tiny_run
    assert result["heldout_in_training"] == 0
    for method in ("best_of_4", *TRAINED):
        change = result["gold_change"][method]
        assert change["n"] == result["heldout_prompts"], method
        low, high = change["ci95"]
        assert low <= change["points"] <= high
        assert change["points"] == pytest.approx(100 * (result[method]["gold"] - result["base"]["gold"]), abs=0.1)


def test_each_method_wrote_its_policy_and_answers(tiny_run):
    out, result = tiny_run
    for method in TRAINED:
        assert (out / method / "policy" / "config.json").is_file(), method
        answers = [json.loads(line) for line in (out / f"eval-{method}" / "answers.jsonl").read_text().splitlines()]
        assert {row["policy"] for row in answers} == {"policy", "baseline"}
    best = [json.loads(line) for line in (out / "eval-best_of_4" / "answers.jsonl").read_text().splitlines()]
    assert all(len(row["best_of"]["rewards"]) == 4 for row in best)
    assert Path(result["figure"]).stat().st_size > 10_000
    assert set(result["per_family"]["lowercase"]) == {"n", *METHODS}


def test_the_pipeline_arms_start_from_dpos_policy(tiny_run):
    out, _ = tiny_run
    config = {m: json.loads((out / m / "run.json").read_text())["config"] for m in TRAINED if m != "dpo"}
    for pipeline, alone in (("dpo_grpo", "grpo"), ("dpo_ppo", "ppo_rm"), ("dpo_ppo_rm", "ppo_rm")):
        assert Path(config[pipeline]["policy"]) == out / "dpo" / "policy", pipeline
        assert config[alone]["policy"] != config[pipeline]["policy"]
        assert config[pipeline]["algo"] == config[alone]["algo"]
    assert config["dpo_ppo"]["reward"] == "rules:constraints"
    steps = {m: json.loads((out / m / "run.json").read_text())["steps_done"] for m in config}
    assert steps == {"ppo_rm": 1, "dpo_ppo": 1, "dpo_ppo_rm": 1, "grpo": 2, "rloo": 2, "dpo_grpo": 2}  # --ppo-steps
    assert config["dpo_ppo_rm"]["reward"] == config["ppo_rm"]["reward"] == str(out / "rm")


def test_contrast_pairs_join_the_revised_ones(tiny_run):
    out, result = tiny_run
    assert result["revise"] and result["contrast"]
    pairs = [json.loads(line) for line in (out / "pairs.jsonl").read_text().splitlines()]
    extra = [p for p in pairs if p["id"].endswith("-contrast")]
    assert extra and len(extra) < len(pairs) == result["pairs"]
    own = {p["id"]: p for p in pairs}
    for p in extra:  # the pair's chosen answer against itself in a format its prompt did not ask for
        assert p["chosen"] == own[p["id"].removesuffix("-contrast")]["chosen"] != p["rejected"]
        assert p["margin"] == 0.0 and p["meta"]["contrast"] in {"quotes", "lowercase", "json", "title", "postscript"}


def test_gold_against_kl_reads_the_same_changes_from_the_eval_dirs(tiny_run, tmp_path):
    out, result = tiny_run
    figure = tmp_path / "gold-vs-kl.png"
    runs = [f"{m}={out / f'eval-{m}'}" for m in ("dpo", "grpo", "dpo_grpo")]
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gold_vs_kl.py"), "--plot", str(figure),
                           "--kl-budget", "0.5", "--goal", "20", "--chain", "dpo,dpo_grpo", *runs],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    frontier = one_json_line(proc)
    assert frontier["base_gold"] == pytest.approx(result["base"]["gold"], abs=1e-4)
    for method in ("dpo", "grpo", "dpo_grpo"):
        run = frontier["runs"][method]
        assert run["change"] == result["gold_change"][method]["points"], method
        assert run["ci95"] == result["gold_change"][method]["ci95"], method
        assert run["kl"] == pytest.approx(result[method]["kl"], abs=1e-3), method
    assert frontier["inside_budget"] == sorted((m for m in frontier["runs"] if frontier["runs"][m]["kl"] < 0.5),
                                               key=lambda m: -frontier["runs"][m]["change"])
    assert figure.stat().st_size > 10_000


@pytest.mark.parametrize("runs, message", [(["dpo"], "expected LABEL=EVAL_DIR"),
                                           (["dpo=/nonexistent/eval"], "summary.json: not found"),
                                           (["dpo=EVAL", "--chain", "dpo,ppo"], "'ppo', which is not a run")])
def test_gold_against_kl_refuses_what_it_cannot_pair(tiny_run, tmp_path, runs, message):
    out, _ = tiny_run
    runs = [r.replace("EVAL", str(out / "eval-dpo")) for r in runs]
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gold_vs_kl.py"), "--plot",
                           str(tmp_path / "f.png"), *runs], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode != 0 and message in proc.stderr
    assert not (tmp_path / "f.png").exists()


def test_gold_against_kl_pairs_runs_by_the_prompts_they_answered(tiny_run, tmp_path):
    """Same prompts under another path pair; one prompt fewer does not, whatever the path says."""
    out, _ = tiny_run
    moved, cut = tmp_path / "moved", tmp_path / "cut"
    shutil.copytree(out / "eval-dpo", moved)
    shutil.copytree(out / "eval-dpo", cut)
    rows = [json.loads(line) for line in (cut / "answers.jsonl").read_text().splitlines()]
    (cut / "answers.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows
                                               if r["prompt_id"] != rows[0]["prompt_id"]))

    def gold_vs_kl(*runs: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gold_vs_kl.py"), "--plot",
                               str(tmp_path / "f.png"), *runs], capture_output=True, text=True, timeout=120, cwd=ROOT)

    paired = one_json_line(gold_vs_kl(f"dpo={out / 'eval-dpo'}", f"moved={moved}"))
    assert paired["runs"]["moved"] == paired["runs"]["dpo"]
    proc = gold_vs_kl(f"dpo={out / 'eval-dpo'}", f"cut={cut}")
    assert proc.returncode != 0 and "the runs differ in prompts" in proc.stderr


def test_gold_against_kl_takes_one_policy_s_evaluations_on_two_prompt_files_as_one_run(tiny_run, tmp_path):
    """eval-dpo split by prompt into two evaluations: together they are the whole, figures weighted by answers."""
    out, _ = tiny_run
    whole = out / "eval-dpo"
    rows = [json.loads(line) for line in (whole / "answers.jsonl").read_text().splitlines()]
    ids = sorted({r["prompt_id"] for r in rows})
    summary = json.loads((whole / "summary.json").read_text())
    halves = []
    for name, part, gold in (("a", ids[:1], 0.25), ("b", ids[1:], 0.75)):
        half = tmp_path / name
        half.mkdir()
        (half / "answers.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows if r["prompt_id"] in part))
        answers = sum(r["policy"] == "policy" and r["prompt_id"] in part for r in rows)
        (half / "summary.json").write_text(json.dumps(
            {**summary, "policy": {**summary["policy"], "answers": answers, "scorer": gold}}))
        halves.append((half, answers))

    def gold_vs_kl(*runs: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gold_vs_kl.py"), "--plot",
                               str(tmp_path / "f.png"), *runs], capture_output=True, text=True, timeout=120, cwd=ROOT)

    result = one_json_line(gold_vs_kl(f"dpo={whole}", f"both={halves[0][0]}+{halves[1][0]}"))["runs"]
    for key in ("change", "ci95", "n", "kl", "words", "eos_rate"):
        assert result["both"][key] == result["dpo"][key], key
    (a, n_a), (b, n_b) = halves
    assert result["both"]["gold"] == pytest.approx((0.25 * n_a + 0.75 * n_b) / (n_a + n_b), abs=1e-4)
    proc = gold_vs_kl(f"dpo={whole}", f"half={b}")
    assert proc.returncode != 0 and "the runs differ in prompts" in proc.stderr
    other = json.loads((b / "summary.json").read_text())
    (b / "summary.json").write_text(json.dumps({**other, "policy": {**other["policy"], "model": "another"}}))
    proc = gold_vs_kl(f"both={a}+{b}")
    assert proc.returncode != 0 and "evaluations differ in model" in proc.stderr


def test_methods_trains_the_named_ones_and_the_dpo_a_pipeline_starts_from(tmp_path):
    out = tmp_path / "run"
    result = one_json_line(run_tiny_benchmark(SCRIPT, out, "--methods", "dpo_grpo", "--rl-steps", "1",
                                              "--guide", "revise"))
    assert result["methods"] == ["base", "dpo", "dpo_grpo"]
    assert [m for m in METHODS if m in result] == ["base", "dpo", "dpo_grpo"]
    assert set(result["gold_change"]) == {"dpo", "dpo_grpo"}
    assert set(result["per_family"]["lowercase"]) == {"n", "dpo", "dpo_grpo"} | {"base"}
    assert not (out / "rm").exists()  # no method named reads the proxy RM: it is not trained
    assert json.loads((out / "eval-dpo_grpo" / "summary.json").read_text())["reward_model"] is None
    run = json.loads((out / "dpo_grpo" / "run.json").read_text())
    assert run["steps_done"] == 1 and Path(run["config"]["policy"]) == out / "dpo" / "policy"
    assert not any((out / m).exists() for m in ("grpo", "rloo", "ppo_rm", "eval-best_of_4"))


@pytest.mark.parametrize("methods, message", [("dpo,ppo", "unknown ppo"), ("best_of_4", "at least one trained")])
def test_methods_refuses_what_it_cannot_run(tmp_path, methods, message):
    proc = run_tiny_benchmark(SCRIPT, tmp_path / "run", "--methods", methods)
    assert proc.returncode == 2 and message in proc.stderr
    assert not (tmp_path / "run").exists()
