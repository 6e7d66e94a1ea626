"""benchmarks/rlhf_effect.py --tiny: every stage through the real CLI on a tiny random LLaMA and the fixtures.

One run for the module (constraints, preferences, train-reward, DPO, two PPO runs from DPO's policy, three
eval-policy runs), then checks on its JSON line, on the files it kept, and on a second run over the same --out
(all stages done, so it only recomputes the results).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from support.cli import ROOT, one_json_line, run_tiny_benchmark

SCRIPT = ROOT / "benchmarks" / "rlhf_effect.py"
STAGES = {"constraints_train", "constraints_heldout", "preferences", "train_reward", "dpo", "eval_dpo", "ppo_rm",
          "ppo_rules", "eval_rm", "eval_rules"}
TRAINED = ("dpo", "ppo_rm", "ppo_rules")



@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("rlhf-effect") / "run"
    return out, one_json_line(run_tiny_benchmark(SCRIPT, out, "--candidate-pairs"))


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def test_json_line_keys_and_types(tiny_run):
    _, result = tiny_run
    for key in ("base_gold", *(f"{run}_gold" for run in TRAINED), "rm_heldout_accuracy"):
        assert isinstance(result[key], float) and 0.0 <= result[key] <= 1.0, key
    for run in TRAINED:
        assert isinstance(result[f"{run}_kl"], float), run
    assert set(result["seconds_per_stage"]) == STAGES
    assert all(isinstance(s, float) and s > 0 for s in result["seconds_per_stage"].values())
    assert result["per_family"], "no constraint family in the held-out evaluation"
    for family, row in result["per_family"].items():
        assert set(row) == {"n", "base", *TRAINED}, family
        assert isinstance(row["n"], int) and row["n"] > 0
        assert all(isinstance(row[k], float) for k in ("base", *TRAINED))
    assert result["heldout_in_training"] == 0
    assert result["pairs"] >= 4
    assert result["kl_budget"] is None and result["ppo_steps_kept"] == {"ppo_rm": result["steps"],
                                                                        "ppo_rules": result["steps"]}
    for run in TRAINED:  # every held-out prompt paired with its base answer
        assert result["gold_change"][run]["n"] == result["heldout_prompts"], run


def test_gold_curve_per_ppo_step(tiny_run):
    out, result = tiny_run
    assert Path(result["figure"]).is_file() and Path(result["figure"]).stat().st_size > 1000
    for run in ("ppo_rm", "ppo_rules"):
        curve = result["curves"][run]
        assert curve["step"] == list(range(1, result["steps"] + 1))
        assert all(0.0 <= g <= 1.0 for g in curve["gold"])  # every step's rollouts were logged and checked
    # against the checker, PPO's own score is the gold: the offline recomputation must agree
    rules = result["curves"]["ppo_rules"]
    assert rules["gold"] == pytest.approx(rules["score"], abs=1e-3)


def test_heldout_prompts_never_reach_training(tiny_run):
    out, _ = tiny_run
    held = {r["base_prompt"] for r in rows(out / "heldout-prompts.jsonl")}
    train = {r["base_prompt"] for r in rows(out / "train-prompts.jsonl")}
    assert held and train and not held & train
    texts = [r["prompt"] for r in rows(out / "pairs.jsonl")]
    for run in ("ppo-rm", "ppo-rules"):
        texts += [r["prompt"] for r in rows(out / run / "samples.jsonl")]
    assert texts
    assert not [t for t in texts if any(h in t for h in held)]
    # and the evaluation did run on the held-out prompts
    evaluated = {r["prompt"] for r in rows(out / "eval-rm" / "answers.jsonl")}
    assert evaluated == {r["prompt"] for r in rows(out / "heldout-prompts.jsonl")}


def test_ppo_starts_from_dpo_and_the_base_answers_once(tiny_run):
    out, result = tiny_run
    assert result["start"] == "dpo"
    for run in ("ppo-rm", "ppo-rules"):
        config = json.loads((out / run / "run.json").read_text())["config"]
        assert config["policy"] == str(out / "dpo" / "policy"), run
    base_answers = {(r["prompt"], r["answer"]) for r in rows(out / "eval-dpo" / "answers.jsonl")
                    if r["policy"] == "baseline"}
    assert base_answers
    for run in ("rm", "rules"):
        summary = json.loads((out / f"eval-{run}" / "summary.json").read_text())
        assert summary["baseline_answers"] == str(out / "eval-dpo"), run
        assert {(r["prompt"], r["answer"]) for r in rows(out / f"eval-{run}" / "answers.jsonl")
                if r["policy"] == "baseline"} == base_answers, run


def test_candidate_pairs_reach_the_reward_model_only(tiny_run):
    """--candidate-pairs: the proxy RM trains and calibrates on more pairs than the file holds (every two of a
    prompt's candidates the checker scores apart); DPO reads the file's pairs as they are."""
    out, result = tiny_run
    assert result["candidate_pairs"] is True
    n_rows = len(rows(out / "pairs.jsonl"))
    rm = json.loads((out / "train-reward.json").read_text())
    assert rm["train"]["pairs"] + rm["heldout"]["raw"]["n"] > n_rows  # held-out n counts its ties
    assert json.loads((out / "logs" / "dpo.out").read_text())["pairs"] == n_rows


def test_rerun_skips_finished_stages(tiny_run):
    out, first = tiny_run
    proc = run_tiny_benchmark(SCRIPT, out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("skipped") == len(STAGES)
    again = json.loads(proc.stdout)
    for key in ("base_gold", "ppo_rm_gold", "ppo_rules_gold", "ppo_rm_kl", "ppo_rules_kl", "seconds_per_stage"):
        assert again[key] == first[key], key


def test_gold_change_pairs_policy_and_base_answers_of_the_same_prompt(tmp_path):
    sys.path.insert(0, str(SCRIPT.parent))
    from rlhf_effect import gold_change

    answers = tmp_path / "answers.jsonl"
    scores = [(1.0, 0.5), (0.5, 0.5), (1.0, 0.0), (0.0, 0.5)]  # (policy, base) per prompt
    answers.write_text("".join(
        json.dumps({"prompt_id": f"p{i}", "sample": 0, "policy": side, "scores": {"scorer": value}}) + "\n"
        for i, pair in enumerate(scores) for side, value in zip(("policy", "baseline"), pair, strict=True)))
    change = gold_change(answers)
    diffs = [100 * (p - b) for p, b in scores]  # 50, 0, 100, -50: mean 25, sd 64.55
    half = 1.96 * (sum((d - 25) ** 2 for d in diffs) / 3 / 4) ** 0.5
    assert change["n"] == 4 and change["points"] == 25.0
    assert change["ci95"] == [round(25 - half, 1), round(25 + half, 1)]
    assert change["ci95"][0] < 0 < change["ci95"][1]  # 4 prompts: the interval spans zero


def test_start_base_runs_ppo_from_the_base_on_plain_pairs(tmp_path):
    out = tmp_path / "run"
    result = one_json_line(run_tiny_benchmark(SCRIPT, out, "--start", "base"))
    assert set(result["seconds_per_stage"]) == STAGES - {"dpo", "eval_dpo"}
    assert "dpo_gold" not in result and result["start"] == "base"
    assert not result["revise"] and not result["contrast"] and result["ppo_epochs"] == 2
    tiny = str(out / "tiny-llama")
    assert json.loads((out / "ppo-rules" / "run.json").read_text())["config"]["policy"] == tiny


def test_kl_target_evaluates_the_policies_pulled_back_towards_the_base(tiny_run, tmp_path):
    """--kl-target: each PPO policy goes through `interpolate` (measured on train prompts) and the held-out
    evaluations read the interpolated models. Over a copy of the finished run only those stages and the
    evaluations run again (the base's answers too: the copy's base model is another path)."""
    import shutil

    done, _ = tiny_run
    out = tmp_path / "run"
    shutil.copytree(done, out)
    for stage in ("eval_dpo", "eval_rm", "eval_rules"):
        (out / f".done-{stage}").unlink()
    result = one_json_line(run_tiny_benchmark(SCRIPT, out, "--kl-target", "0.5"))
    assert set(result["seconds_per_stage"]) == STAGES | {"interpolate_rm", "interpolate_rules"}
    assert result["kl_target"] == 0.5
    for run in ("rm", "rules"):
        pulled = result["interpolated"][f"ppo_{run}"]
        assert pulled["measurements"][0]["weight"] == 1.0 and 0 < pulled["weight"] <= 1.0
        assert pulled["within_kl_target"] == (pulled["measurements"][-1]["kl"] <= 0.5)
        summary = json.loads((out / f"eval-{run}" / "summary.json").read_text())
        assert summary["policy"]["path"] == str(out / f"ppo-{run}" / "interpolated"), run
        assert json.loads((out / f"ppo-{run}" / "interpolated" / "llamakit-manifest.json").read_text())[
            "weight"] == pulled["weight"]
