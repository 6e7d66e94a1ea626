"""Does the pipeline make a model better? Verifiable instruction following, before and after RLHF.

On Alpaca instructions split by instruction into train and held-out (held-out never reaches any training
step), every stage runs through the real CLI (`llamakit ...` in a process of its own, benchmarks/stages.py):

  1. constraints   `generate-data constraints` on both splits (IFEval-style, checked by code: the gold)
  2. preferences   `generate-data preferences` on train: K answers per prompt from the policy itself,
                   labelled by `rules:constraints` (the checker labels pairs; nothing else sees it)
  3. reward        `train-reward` on those pairs (the proxy RM sees pairs only, never the checker)
  4. dpo           `dpo --lora` on the same pairs (`--start dpo`, the default): the start PPO builds on
  5. ppo_rm        `rlhf --lora` against the proxy RM;  ppo_rules: the same against `rules:constraints`
  6. eval_*        `eval-policy` of each trained policy against the base on the held-out prompts

`--start dpo` is the recipe docs/method-comparison.md found (pairs with `--revise --contrast`, DPO, then PPO with
4 epochs a batch and β to DPO's policy); `--start base` is PPO from the base, the issue's literal protocol, which
moved the held-out gold by less than a point (docs/rlhf-effect.md).

Every PPO step logs all its rollouts (samples.jsonl), so the gold score of each step is computed here
offline with the checker (toolkit.constraints) and drawn against the proxy RM score (the
over-optimisation picture of Gao et al. 2022: the proxy keeps rising, does the gold?).

Prints ONE JSON line: {"base_gold", "ppo_rm_gold", "ppo_rules_gold", "ppo_rm_kl", "ppo_rules_kl",
"rm_heldout_accuracy", "seconds_per_stage", "per_family", ...}, with `--start dpo` also "dpo_gold" and
"dpo_kl". Gold = mean share of a held-out prompt's constraints satisfied; kl = eval-policy's sampled
KL(policy ‖ base) in nats per answer on held-out prompts; rm_heldout_accuracy = how often the proxy RM
orders two held-out answers (base / dpo / ppo_rm / ppo_rules answers to one prompt) as the checker does,
over pairs whose gold differs.
Progress goes to stderr. `--out DIR` keeps the work; a stage whose output is complete is skipped, so a
killed run continues where it stopped (the seconds of stages done earlier are kept in DIR/timings.json).

    .venv/bin/python benchmarks/rlhf_effect.py --quick --parallel --out /tmp/rlhf-effect-quick   # smoke run
    .venv/bin/python benchmarks/rlhf_effect.py --parallel --out /tmp/rlhf-effect --plot docs/rlhf-effect.png
    .venv/bin/python benchmarks/rlhf_effect.py --start base --parallel --out /tmp/rlhf-effect-base   # PPO from the base
    .venv/bin/python benchmarks/rlhf_effect.py --tiny --out DIR        # tiny random LLaMA: tests only
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.paired import paired_points  # noqa: E402 - after the path set-up, as a script
from benchmarks.stages import Stages, log  # noqa: E402

SHARED_ALPACA = ROOT.parent / "shared" / "data" / "alpaca-5000.json"
FIXTURE_ALPACA = ROOT / "tests" / "fixtures" / "alpaca-24.json"

# Sizes per mode. full: >= 400 held-out prompts, so that a 10-point change is well outside the noise
# (a share's standard error is <= 0.5/sqrt(400) = 2.5 points). Generation is the main cost everywhere.
MODES: dict[str, dict[str, Any]] = {
    # tiny: a random model's 3-token answers are all lowercase about a third of the time, so K=4 of them
    # disagree on `lowercase` for most prompts (longer answers, or other kinds, give all-tied candidates)
    "tiny": {"train": 12, "heldout": 6, "candidates": 4, "pref_tokens": 3, "steps": 2, "batch_size": 4,
             "new_tokens": 3, "eval_tokens": 3, "kinds": "lowercase", "per_prompt": "1", "kl_prompts": 6},
    "quick": {"train": 32, "heldout": 32, "candidates": 4, "pref_tokens": 48, "steps": 6, "batch_size": 8,
              "new_tokens": 48, "eval_tokens": 48, "kinds": "", "per_prompt": "1..3", "kl_prompts": 32},
    # full: sized for the hour on a 2-core CPU without AVX-512 (SmolLM2 samples ~25-60 tokens/s there). From the
    # base (`--start base`): 160 train prompts, 16 PPO steps x 16 rollouts, 2 epochs; 85 min on 2026-12-02
    # (docs/rlhf-effect.md), and PPO moved the policy too little to show an effect. After DPO: see AFTER_DPO.
    "full": {"train": 160, "heldout": 400, "candidates": 4, "pref_tokens": 48, "steps": 16, "batch_size": 16,
             "new_tokens": 48, "eval_tokens": 48, "kinds": "", "per_prompt": "1..3", "kl_prompts": 64},
}
# `--start dpo` (full): 480 train prompts (~640 pairs with --revise --contrast), DPO 85 steps of 4 pairs at lr
# 2.6e-4 (docs/method-comparison.md "DPO within 10 minutes": +9.6 at 2.56 nats, the 10-minute recipe that leaves
# the most KL for PPO), then PPO 8 steps x 32 rollouts, 4 epochs x 2 minibatches, β 0.04 to DPO's policy (the best
# run inside 5 nats found: +17.2 at 4.93 on 400 after C1). quick / tiny: one epoch over their pairs.
AFTER_DPO: dict[str, dict[str, Any]] = {
    "tiny": {"dpo_steps": 0, "dpo_batch": 2},
    "quick": {"dpo_steps": 0, "dpo_batch": 4},
    "full": {"train": 480, "steps": 8, "batch_size": 32, "dpo_steps": 85, "dpo_batch": 4},
}
# PPO's defaults per start: from the base, the 2026-12-02 run's; after DPO, the recipe above
PPO_DEFAULTS = {"base": {"ppo_epochs": 2, "kl_coef": 0.1}, "dpo": {"ppo_epochs": 4, "kl_coef": 0.04}}


# ------------------------------------------------------------------------------------------ data


def instruction_key(text: str) -> str:
    """Rows with the same instruction (case and spacing aside) land in the same split."""
    return " ".join(text.lower().split())


def split_rows(rows: list[dict[str, Any]], n_train: int, n_heldout: int, seed: int,
               max_chars: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Split Alpaca rows by instruction: a seeded draw of distinct instructions, held-out first.

    Rows with an `input` are left out (shorter prompts, cheaper generation) and so are instructions over
    `max_chars`; duplicates of an instruction are dropped, so no instruction is on both sides."""
    seen: dict[str, dict[str, Any]] = {}
    for row in rows:
        key = instruction_key(row.get("instruction", ""))
        if key and not row.get("input") and len(key) <= max_chars and key not in seen:
            seen[key] = {"instruction": row["instruction"].strip(), "input": "", "output": row.get("output", "")}
    keys = sorted(seen)
    random.Random(seed).shuffle(keys)
    if len(keys) < n_train + n_heldout:
        n_heldout = min(n_heldout, len(keys) // 3)
        n_train = len(keys) - n_heldout
        log(f"only {len(keys)} distinct instructions: {n_train} train, {n_heldout} held-out")
    heldout = [seen[k] for k in keys[:n_heldout]]
    train = [seen[k] for k in keys[n_heldout:n_heldout + n_train]]
    return train, heldout


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def leaked(heldout_file: Path, train_file: Path, training_inputs: list[Path]) -> int:
    """Training inputs that are not train-split prompts, or whose instruction is held out: must be 0.

    Train prompt rows are checked by instruction; pairs and PPO rollouts by their prompt text, which must be
    one of the train rows' prompts (exact match: a substring test would flag a short held-out instruction
    that happens to sit inside a longer train one)."""
    held = {instruction_key(r["base_prompt"]) for r in read_jsonl(heldout_file)}
    train = {r["prompt"]: instruction_key(r["base_prompt"]) for r in read_jsonl(train_file)}
    bad = sum(key in held for key in train.values())
    for path in training_inputs:
        bad += sum(train.get(row["prompt"], next(iter(held), "")) in held for row in read_jsonl(path))
    return bad


# ------------------------------------------------------------------------------------------ analysis


def gold_by_step(samples: Path, constraints_by_prompt: dict[str, list[dict[str, Any]]]) -> dict[int, float]:
    """Mean checker score of each PPO step's logged rollouts (matched to their constraints by prompt text)."""
    from toolkit.constraints import fraction

    per_step: dict[int, list[float]] = {}
    for row in read_jsonl(samples):
        rules = constraints_by_prompt.get(row["prompt"])
        if rules is None:
            raise SystemExit(f"{samples}: a sample's prompt is not in the train prompts: {row['prompt'][:80]!r}")
        per_step.setdefault(int(row["step"]), []).append(fraction(row["response"], rules))
    return {step: sum(v) / len(v) for step, v in sorted(per_step.items())}


def curves(run: Path, constraints_by_prompt: dict[str, list[dict[str, Any]]]) -> dict[str, list[float]]:
    metrics = read_jsonl(run / "metrics.jsonl")
    gold = gold_by_step(run / "samples.jsonl", constraints_by_prompt)
    return {"step": [int(m["step"]) for m in metrics],
            "score": [round(m["objective/raw_scores"], 4) for m in metrics],
            "kl": [round(m["objective/kl"], 4) for m in metrics],
            "gold": [round(gold.get(int(m["step"]), float("nan")), 4) for m in metrics]}


def rm_agreement(answer_files: list[Path]) -> tuple[float | None, int]:
    """Share of held-out answer pairs (same prompt, different gold) that the proxy RM orders as the checker."""
    by_prompt: dict[str, dict[str, tuple[float, float]]] = {}
    for path in answer_files:
        for row in read_jsonl(path):
            name = row["model"] if row["policy"] == "policy" else "base"
            key = f"{row['prompt_id']}/{row['sample']}"
            by_prompt.setdefault(key, {})[name] = (row["scores"]["scorer"], row["scores"]["reward"])
    agree = total = 0
    for answers in by_prompt.values():
        items = list(answers.values())
        for i in range(len(items)):
            for j in range(i + 1, len(items)):
                (gold_a, rm_a), (gold_b, rm_b) = items[i], items[j]
                if gold_a != gold_b:
                    total += 1
                    agree += (gold_a > gold_b) == (rm_a > rm_b)
    return (round(agree / total, 4) if total else None), total


def gold_change(answers: Path) -> dict[str, Any]:
    """POLICY − BASE gold on the same held-out prompts (same seed per prompt): the mean of the paired
    differences and its normal 95% interval, in points (× 100)."""
    return paired_gold_change(read_jsonl(answers))


def paired_gold_change(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """`gold_change` on answer rows already read."""
    sides: dict[str, dict[str, float]] = {}
    for row in rows:
        sides.setdefault(f"{row['prompt_id']}/{row['sample']}", {})[row["policy"]] = row["scores"]["scorer"]
    return paired_points([100 * (s["policy"] - s["baseline"]) for s in sides.values() if len(s) == 2])


def per_family(base: dict[str, Any], policies: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per constraint family: its held-out count and the share met by the base and by each named policy."""
    families = sorted(set(base["per_family"]).union(*(p["per_family"] for p in policies.values())))
    return {f: {"n": base["family_answers"].get(f, 0), "base": _r(base["per_family"].get(f)),
                **{name: _r(p["per_family"].get(f)) for name, p in policies.items()}}
            for f in families}


def _r(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(value, digits)


def moving_average(values: list[float], window: int) -> list[float]:
    return [sum(values[max(0, i - window + 1):i + 1]) / len(values[max(0, i - window + 1):i + 1])
            for i in range(len(values))]


def plot(path: Path, rm_curve: dict[str, list[float]], rules_curve: dict[str, list[float]], base_gold: float,
         title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 3.8))
    twin = axes[0].twinx()
    twin.plot(rm_curve["step"], rm_curve["score"], marker="s", ms=3, color="tab:orange", label="proxy RM score")
    twin.set_ylabel("proxy RM score (calibrated)")
    for ax, curve, title_, label in ((axes[0], rm_curve, "PPO against the proxy RM", "gold (checker)"),
                                     (axes[1], rules_curve, "PPO against the checker", "gold (= reward)")):
        ax.plot(curve["step"], curve["gold"], marker="o", ms=3, color="tab:green", alpha=0.6, label=label)
        if len(curve["step"]) >= 10:  # a step's gold is the mean of batch-size rollouts: noisy
            ax.plot(curve["step"], moving_average(curve["gold"], 5), color="darkgreen", lw=2,
                    label="gold, 5-step mean")
        ax.axhline(base_gold, color="grey", ls=":", label="base, held-out gold")
        ax.set_xlabel("PPO step")
        ax.set_title(title_)
    axes[0].set_ylabel("gold: share of constraints met")
    lines = axes[0].get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
    axes[0].legend(lines, [h.get_label() for h in lines], fontsize=8, loc="best")
    axes[1].legend(fontsize=8)
    ax = axes[2]
    ax.plot(rm_curve["step"], rm_curve["kl"], label="PPO on proxy RM")
    ax.plot(rules_curve["step"], rules_curve["kl"], label="PPO on checker")
    ax.set_xlabel("PPO step")
    ax.set_title("KL(π‖π_ref) per response (rollouts)")
    ax.legend(fontsize=8)
    for a in axes:
        a.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(w_pad=3)
    fig.savefig(path, dpi=90)
    plt.close(fig)


# ------------------------------------------------------------------------------------------ main


def common_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of the data stages, shared with benchmarks/method_comparison.py."""
    parser.add_argument("--out", default=None, help="keep the work here; rerun to continue (default: a temp dir)")
    parser.add_argument("--data", default=None, help="Alpaca JSON (default ../shared/data/alpaca-5000.json)")
    parser.add_argument("--policy", default="smollm2-135m", help="base policy (alias or HF dir)")
    parser.add_argument("--reward-model", default="minilm-l6", help="backbone of the proxy RM")
    parser.add_argument("--train", type=int, default=None, help="train prompts (mode's default)")
    parser.add_argument("--heldout", type=int, default=None, help="held-out prompts (mode's default)")
    parser.add_argument("--candidates", type=int, default=None, help="K answers per train prompt")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="answer budget (every stage)")
    parser.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (all stages)")
    parser.add_argument("--bf16", action="store_true", help="eval-policy generates in bfloat16")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads of a stage that runs alone "
                        "(OMP_NUM_THREADS; 0 = torch's default). On a busy shared 2-core box use 1: SmolLM2 sampled "
                        "28.6 tokens/s at batch 16 with 1 thread and 5.2 with 2 (OpenMP threads spinning against "
                        "other processes); stages run together (--parallel) always get 1 each")
    parser.add_argument("--revise", action=argparse.BooleanOptionalAction, default=False,
                        help="pairs through `generate-data preferences --revise`: the chosen answer is the "
                        "policy's best one edited by code to meet its constraints")
    parser.add_argument("--contrast", action=argparse.BooleanOptionalAction, default=False,
                        help="pairs through `generate-data preferences --contrast` too: after each pair, its chosen "
                        "answer against itself in a format its prompt did not ask for")
    parser.add_argument("--candidate-pairs", action=argparse.BooleanOptionalAction, default=False,
                        help="the proxy RM trains on every two of a prompt's K answers that the checker scores apart "
                        "too (`train-reward --candidate-pairs`), not only on the pairs")
    parser.add_argument("--rm-epochs", type=int, default=1, help="epochs of the proxy RM (`train-reward --epochs`): "
                        "with --candidate-pairs, 3 agreed with the checker on 72.7%% of held-out answer pairs "
                        "against 70.1%% for 1 (docs/rlhf-effect.md)")
    parser.add_argument("--rm-batch-size", type=int, default=4, help="pairs per micro-batch of the proxy RM "
                        "(`train-reward --batch-size`): 8 trained 1.4x faster than 4 over candidate pairs")
    parser.add_argument("--missing-eos-penalty", type=float, default=0.0, help="0: the checker already fails a "
                        "cut answer where it matters (end phrase, P.S., JSON, quotes); a penalty taught the quick "
                        "run's policies to stop early, which costs the at-least-N-words and bullet constraints")
    parser.add_argument("--parallel", action="store_true", help="run the training runs (and the evaluations) "
                        "two at a time, one torch thread each (rlhf_effect.py: each as soon as the stages it reads are "
                        "done; default with --tiny, where start-up dominates)")


@dataclass
class Data:
    """What the shared stages leave: prompts with constraints, checker-labelled pairs, the proxy RM."""
    policy: str
    train_prompts: Path
    held_prompts: Path
    pairs: Path
    rm_dir: Path
    rm_backbone: str


def prepare(args: argparse.Namespace, size: dict[str, Any], out: Path, stages: Stages,
            train_reward: bool = True) -> Data:
    """Split, constraints, pairs from the policy's own answers (labelled by the checker), and the proxy RM
    unless the caller runs `reward_stage` itself (beside another stage)."""
    policy, rm_backbone = args.policy, args.reward_model
    data = Path(args.data) if args.data else (FIXTURE_ALPACA if args.tiny or not SHARED_ALPACA.is_file()
                                              else SHARED_ALPACA)
    if args.tiny:
        from tests.support.tiny_models import save_tiny_llama

        tiny = out / "tiny-llama"
        if not (tiny / "config.json").is_file():
            save_tiny_llama(tiny, seed=0)
        policy = rm_backbone = str(tiny)

    # ---- split by instruction (held-out first; never in any training input) --------------------------
    train_src, held_src = out / "train-instructions.json", out / "heldout-instructions.json"
    if not (train_src.is_file() and held_src.is_file()):
        train, heldout = split_rows(json.loads(data.read_text(encoding="utf-8")), size["train"], size["heldout"],
                                    args.seed, max_chars=200)
        train_src.write_text(json.dumps(train, indent=1), encoding="utf-8")
        held_src.write_text(json.dumps(heldout, indent=1), encoding="utf-8")
    train_prompts, held_prompts = out / "train-prompts.jsonl", out / "heldout-prompts.jsonl"
    kinds = ["--per-prompt", size["per_prompt"], *(["--kinds", size["kinds"]] if size["kinds"] else [])]
    stages.run("constraints_train", ["generate-data", "constraints", "--prompts", train_src, "--out", train_prompts,
                                     "--seed", args.seed, "--overwrite", *kinds])
    stages.run("constraints_heldout", ["generate-data", "constraints", "--prompts", held_src, "--out", held_prompts,
                                       "--seed", args.seed + 1, "--overwrite", *kinds])

    # ---- pairs from the policy's own answers, labelled by the checker ----------------------------------
    pairs = out / "pairs.jsonl"
    stages.run("preferences", ["generate-data", "preferences", "--prompts", train_prompts, "--out", pairs,
                               "--teacher", f"hf:{policy}", "--num-candidates", size["candidates"],
                               "--scorer", "rules:constraints", "--max-tokens", size["pref_tokens"],
                               "--temperature", args.temperature, "--concurrency", 32, "--seed", args.seed,
                               # a request waits for its turn in the batch: on 2 busy cores the default 60 s
                               # timed out 157 of 285 requests of a quick run (each retried from scratch)
                               "--timeout", 3600, *(["--revise"] if args.revise else []),
                               *(["--contrast"] if args.contrast else []), "--json"],
               stdout_json=out / "preferences.json")
    n_pairs = len(read_jsonl(pairs))
    if n_pairs < 4:
        raise SystemExit(f"only {n_pairs} pairs in {pairs}: too few for train-reward (more prompts or candidates)")

    data = Data(policy, train_prompts, held_prompts, pairs, out / "rm", rm_backbone)
    if train_reward:
        stages.run(*reward_stage(args, data, out))
    return data


def reward_stage(args: argparse.Namespace, data: Data, out: Path) -> tuple[str, list[Any], Path]:
    """The proxy reward model's stage: `train-reward` on the pairs only (never the checker)."""
    return ("train_reward", ["train-reward", "--data", data.pairs, "--out", data.rm_dir, "--model", data.rm_backbone,
                             "--eval-split", 0.2, "--epochs", args.rm_epochs, "--batch-size", args.rm_batch_size,
                             "--seed", args.seed, "--overwrite",
                             "--json", *(["--candidate-pairs"] if args.candidate_pairs else [])],
            out / "train-reward.json")


def dpo_command(data: Data, out: Path, *, lora_r: int, learning_rate: float, beta: float, rpo_alpha: float,
                epochs: float, max_steps: int, batch_size: int, seed: int) -> list[Any]:
    """`llamakit dpo` on the pairs from the base policy, LoRA, reference log-probs precomputed: OUT/dpo."""
    return ["dpo", "--data", data.pairs, "--policy", data.policy, "--out", out / "dpo", "--lora", "--lora-r", lora_r,
            "--lora-alpha", 2 * lora_r, "--learning-rate", learning_rate, "--beta", beta, "--rpo-alpha", rpo_alpha,
            "--epochs", epochs, "--max-steps", max_steps, "--batch-size", batch_size, "--max-length", 512,
            "--precompute-ref", "--seed", seed, "--overwrite", "--json"]


def sizes(args: argparse.Namespace, modes: dict[str, dict[str, Any]], overrides: tuple[str, ...]) -> tuple[str, dict]:
    """The mode's sizes, with the flags given on the command line in their place."""
    name = "tiny" if args.tiny else "quick" if args.quick else "full"
    size = dict(modes[name])
    for key in overrides:
        if getattr(args, key) is not None:
            size[key] = getattr(args, key)
    if args.max_new_tokens is not None:
        size["pref_tokens"] = size["new_tokens"] = size["eval_tokens"] = args.max_new_tokens
    return name, size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="a smoke run: 32 + 32 prompts, 6 PPO steps "
                      "(8:00 alone on the 2-core box, 2026-12-06; the issue's goal is 10 min)")
    mode.add_argument("--tiny", action="store_true", help="tiny random LLaMA and the test fixtures (tests)")
    common_arguments(parser)
    parser.add_argument("--start", choices=("dpo", "base"), default="dpo", help="where PPO starts: DPO's policy "
                        "on the pairs (the recipe; pairs with --revise --contrast unless --no-revise / --no-contrast) "
                        "or the base (plain pairs)")
    parser.add_argument("--steps", type=int, default=None, help="PPO steps per run (mode's default)")
    parser.add_argument("--batch-size", type=int, default=None, help="PPO rollouts per step (mode's default)")
    parser.add_argument("--kl-coef", type=float, default=None, help="PPO β (start's default: 0.04 after DPO, "
                        "0.1 from the base)")
    parser.add_argument("--learning-rate", type=float, default=2e-4, help="PPO learning rate (LoRA)")
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--ppo-epochs", type=int, default=None, help="PPO epochs per rollout batch (start's "
                        "default: 4 after DPO, 2 from the base)")
    parser.add_argument("--kl-budget", type=float, default=None, help="each PPO run ends at its first rollout batch "
                        "more than this many nats from its start, on the last policy inside (`rlhf --kl-budget`); "
                        "unset: every step runs")
    parser.add_argument("--kl-target", type=float, default=None, help="pull each PPO policy back towards the base "
                        "in weight space until its KL from the base, measured on train prompts, is at most this many "
                        "nats (`llamakit interpolate --kl-target`); the evaluations then read the pulled-back "
                        "policies. Unset: off")
    parser.add_argument("--dpo-steps", type=int, default=None, help="DPO optimizer steps (mode's default; 0: one "
                        "epoch)")
    parser.add_argument("--dpo-learning-rate", type=float, default=2.6e-4, help="DPO learning rate (LoRA)")
    parser.add_argument("--plot", default="", help="also copy the figure here (e.g. docs/rlhf-effect.png)")
    parser.set_defaults(revise=None, contrast=None)
    args = parser.parse_args()

    after_dpo = args.start == "dpo"
    for flag in ("revise", "contrast"):
        if getattr(args, flag) is None:
            setattr(args, flag, after_dpo)
    for key, value in PPO_DEFAULTS[args.start].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.parallel = args.parallel or args.tiny
    modes = {mode: {**MODES[mode], **(AFTER_DPO[mode] if after_dpo else {})} for mode in MODES}
    name, size = sizes(args, modes, ("train", "heldout", "candidates", "steps", "batch_size", "dpo_steps"))
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="rlhf-effect-"))
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    stages = Stages(out, args.threads)
    data = prepare(args, size, out, stages, train_reward=not (after_dpo and args.parallel))
    policy, train_prompts, held_prompts, pairs, rm_dir = (data.policy, data.train_prompts, data.held_prompts,
                                                          data.pairs, data.rm_dir)
    n_pairs = len(read_jsonl(pairs))
    evaluation = ["--prompts", held_prompts, "--baseline", policy, "--scorer", "rules:constraints", "--reward",
                  rm_dir, "--temperature", args.temperature, "--max-new-tokens", size["eval_tokens"],
                  "--batch-size", 32, "--seed", args.seed, "--overwrite", "--json", *(["--bf16"] if args.bf16 else [])]

    # ---- the stages after the pairs, as a graph: each runs once what it reads is done -------------------
    # With --parallel two at a time, in this order of priority (measured on seed 2: DPO 717 s, RM 954 s, the PPO
    # runs 1219-1390 s, eval_dpo ~430 s): PPO on the checker starts as soon as DPO ends, PPO on the RM as soon as
    # the RM is trained too, and DPO's evaluation (which answers the base for the others) fills the first free slot.
    jobs: list[tuple[str, list[Any], Path | None, tuple[str, ...]]] = []
    start, dpo_done = policy, ()
    if after_dpo:
        start, dpo_done = str(out / "dpo" / "policy"), ("dpo",)
        jobs.append(("dpo", dpo_command(data, out, lora_r=args.lora_r, learning_rate=args.dpo_learning_rate,
                                        beta=1.0, rpo_alpha=1.0, epochs=1, max_steps=size["dpo_steps"],
                                        batch_size=size["dpo_batch"], seed=args.seed), None, ()))
    if after_dpo and args.parallel:  # the proxy RM trains beside DPO (both read only the pairs)
        jobs.append((*reward_stage(args, data, out), ()))

    # ---- PPO: against the checker itself, and against the proxy RM -------------------------------------
    ppo = ["--policy", start, "--prompts", train_prompts, "--steps", size["steps"], "--batch-size",
           size["batch_size"], "--max-new-tokens", size["new_tokens"], "--temperature", args.temperature, "--lora",
           "--lora-r", args.lora_r, "--lora-alpha", 2 * args.lora_r, "--learning-rate", args.learning_rate,
           "--ppo-epochs", args.ppo_epochs,
           "--kl-coef", args.kl_coef, "--missing-eos-penalty", args.missing_eos_penalty, "--sample-every", 1,
           "--samples-per-step", size["batch_size"], "--max-prompt-tokens", 384, "--seed", args.seed,
           *(["--kl-budget", args.kl_budget] if args.kl_budget is not None else []), "--overwrite", "--json"]
    jobs += [("ppo_rules", ["rlhf", "--reward", "rules:constraints", "--out", out / "ppo-rules", *ppo], None,
              dpo_done),
             ("ppo_rm", ["rlhf", "--reward", rm_dir, "--out", out / "ppo-rm", *ppo], None,
              (*dpo_done, "train_reward"))]

    # ---- DPO's policy on the held-out prompts; it answers the base once, and the PPO evaluations read those
    # answers (--baseline-answers) -------------------------------------------------------------------------
    base_answered: tuple[str, ...] = ()
    if after_dpo:
        jobs.append(("eval_dpo", ["eval-policy", start, "--out", out / "eval-dpo", *evaluation],
                     out / "eval-dpo.json", ("dpo", "train_reward")))
        evaluation += ["--baseline-answers", out / "eval-dpo"]
        base_answered = ("eval_dpo",)

    # ---- optional: each PPO policy pulled back towards the base to a KL target (WiSE-FT) ---------------
    evaluated = {run: (out / f"ppo-{run}" / "policy", f"ppo_{run}") for run in ("rm", "rules")}
    if args.kl_target is not None:
        for run in evaluated:
            jobs.append((f"interpolate_{run}", [
                "interpolate", "--policy", evaluated[run][0], "--base", policy, "--kl-target", args.kl_target,
                "--prompts", train_prompts, "--limit", size["kl_prompts"], "--temperature", args.temperature,
                "--max-new-tokens", size["eval_tokens"], "--batch-size", 32, "--seed", args.seed,
                "--out", out / f"ppo-{run}" / "interpolated", "--overwrite", "--json"],
                out / f"interpolate-{run}.json", (f"ppo_{run}",)))
            evaluated[run] = (out / f"ppo-{run}" / "interpolated", f"interpolate_{run}")

    # ---- held-out: each trained policy against the base ------------------------------------------------
    jobs += [(f"eval_{run}", ["eval-policy", path, "--out", out / f"eval-{run}", *evaluation],
              out / f"eval-{run}.json", (made_by, *base_answered)) for run, (path, made_by) in evaluated.items()]
    stages.run_graph(jobs, slots=2 if args.parallel else 1)

    # ---- results ---------------------------------------------------------------------------------------
    ev_rm = json.loads((out / "eval-rm.json").read_text())
    ev_rules = json.loads((out / "eval-rules.json").read_text())
    trained = {"ppo_rm": ev_rm, "ppo_rules": ev_rules}
    if after_dpo:
        trained = {"dpo": json.loads((out / "eval-dpo.json").read_text()), **trained}
    answer_files = {run: out / f"eval-{run.removeprefix('ppo_')}" / "answers.jsonl" for run in trained}
    rm_metrics = json.loads((out / "train-reward.json").read_text())
    constraints_by_prompt = {r["prompt"]: r["constraints"] for r in read_jsonl(train_prompts)}
    rm_curve = curves(out / "ppo-rm", constraints_by_prompt)
    rules_curve = curves(out / "ppo-rules", constraints_by_prompt)
    accuracy, n_rm_pairs = rm_agreement(list(answer_files.values()))
    leaks = leaked(held_prompts, train_prompts, [pairs, out / "ppo-rm" / "samples.jsonl",
                                                 out / "ppo-rules" / "samples.jsonl"])
    if leaks:
        raise SystemExit(f"{leaks} training inputs are held-out instructions or not from the train split")
    base_gold = ev_rm["baseline"]["scorer"]
    figure = out / "rlhf-effect.png"
    plot(figure, rm_curve, rules_curve, base_gold,
         f"llamakit rlhf-effect ({name}): {Path(policy).name}{', after DPO' if after_dpo else ''}, "
         f"{size['steps']} PPO steps x {size['batch_size']}, "
         f"β {args.kl_coef}, lr {args.learning_rate}, LoRA r {args.lora_r}"
         + (f", --kl-budget {args.kl_budget:g}" if args.kl_budget is not None else "")
         + (f", pulled back to {args.kl_target:g} nats" if args.kl_target is not None else ""))
    if args.plot:
        Path(args.plot).write_bytes(figure.read_bytes())
    result = {
        "base_gold": _r(base_gold), **{f"{run}_gold": _r(ev["policy"]["scorer"]) for run, ev in trained.items()},
        **{f"{run}_kl": _r(ev["kl"]) for run, ev in trained.items()},
        "gold_change": {run: gold_change(answers) for run, answers in answer_files.items()},
        "rm_heldout_accuracy": accuracy, "rm_heldout_pairs": n_rm_pairs,
        "rm_calibration_accuracy": _r(rm_metrics["heldout"]["calibrated"]["accuracy"]),
        "rm_calibration_pairs": rm_metrics["heldout"]["calibrated"]["n"],
        "seconds_per_stage": stages.seconds,
        "per_family": per_family(ev_rm["baseline"], {run: ev["policy"] for run, ev in trained.items()}),
        "base_gold_rules_eval": _r(ev_rules["baseline"]["scorer"]),
        "win_rate_rm": _r(ev_rm["win_rate"].get("scorer", {}).get("rate")),
        "win_rate_rules": _r(ev_rules["win_rate"].get("scorer", {}).get("rate")),
        **{key: {"base": _r(ev_rm["baseline"][field], digits),
                 **{run: _r(ev["policy"][field], digits) for run, ev in trained.items()}}
           for key, field, digits in (("proxy_rm_score", "reward", 4), ("words", "words", 1),
                                      ("eos_rate", "eos_rate", 4))},
        "curves": {"ppo_rm": rm_curve, "ppo_rules": rules_curve},
        "ppo_steps_kept": {run: ppo_steps_kept(out / f"ppo-{run.removeprefix('ppo_')}")
                           for run in ("ppo_rm", "ppo_rules")},
        "interpolated": {f"ppo_{run}": json.loads((out / f"interpolate-{run}.json").read_text())
                         for run in ("rm", "rules")} if args.kl_target is not None else None,
        "kl_target": args.kl_target,
        "pairs": n_pairs, "train_prompts": len(read_jsonl(train_prompts)),
        "heldout_prompts": len(read_jsonl(held_prompts)), "heldout_in_training": leaks,
        "mode": name, "policy": args.policy if not args.tiny else "tiny-llama", "steps": size["steps"],
        "batch_size": size["batch_size"], "candidates": size["candidates"], "start": args.start,
        "dpo_steps": size["dpo_steps"] if after_dpo else None, "revise": args.revise,
        "contrast": args.contrast, "candidate_pairs": args.candidate_pairs, "rm_epochs": args.rm_epochs,
        "rm_batch_size": args.rm_batch_size,
        "kl_budget": args.kl_budget, "max_new_tokens": size["new_tokens"],
        "temperature": args.temperature, "kl_coef": args.kl_coef, "learning_rate": args.learning_rate,
        "lora_r": args.lora_r, "ppo_epochs": args.ppo_epochs, "missing_eos_penalty": args.missing_eos_penalty,
        # every stage's own wall time added up, over resumed runs too: stages run side by side count each
        "stage_seconds_sum": round(sum(stages.seconds.values()), 1),
        "seconds_this_run": round(time.perf_counter() - started, 1), "load_avg": _loadavg(), "figure": str(figure),
        "out": str(out),
    }
    (out / "result.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result))


def ppo_steps_kept(run_dir: Path) -> int:
    """The updates in the policy a PPO run saved: fewer than its steps where --kl-budget ended it."""
    return json.loads((run_dir / "run.json").read_text())["steps_done"]


def _loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


if __name__ == "__main__":
    main()
