"""Which method makes the model better? base, best-of-4, PPO, DPO, GRPO and RLOO on the same measured task.

The task and its data are those of benchmarks/rlhf_effect.py (shared stages, same code): Alpaca instructions
split by instruction, IFEval-style constraints checked by code (the gold), pairs from the policy's own answers
labelled by the checker, and a proxy reward model trained on those pairs only. Then, every stage through the
real CLI:

  ppo_rm      `rlhf --reward rm/ --lora`                      PPO against the proxy RM (a critic)
  dpo         `dpo --data pairs.jsonl --lora`                 the same pairs as the RM, no RM, no sampling
  grpo        `rlhf --algo grpo --reward rules:constraints`   critic-free, K answers per prompt, the checker
  rloo        `rlhf --algo rloo --reward rules:constraints`   leave-one-out baseline, the checker
  best_of_4   `eval-policy BASE --best-of 4 --reward rm/`     no training: the best of 4 base samples by the RM
  dpo_grpo    `rlhf --algo grpo --policy dpo/policy ...`      GRPO's run, started from DPO's policy (a pipeline)
  dpo_ppo     `rlhf --reward rules:constraints --policy dpo/policy ...`   PPO on the checker after DPO (a pipeline)
  dpo_ppo_rm  `rlhf --reward rm/ --policy dpo/policy ...`     PPO via the proxy RM after DPO (a pipeline)

and `eval-policy` of each trained policy against the base on the held-out prompts (which no training step
sees). Prints ONE JSON line {"base": {...}, "best_of_4": {...}, "ppo_rm": {...}, "dpo": {...}, "grpo": {...},
"rloo": {...}, ...}, each {"gold", "kl", "mean_length", "seconds", "peak_rss_mb"}: held-out gold (mean share of
a prompt's constraints met, one answer per prompt), KL(policy ‖ base) in nats per answer (eval-policy's
sampled estimate; best-of-N: the bound log N − (N−1)/N), mean answer length in words, and the training stage's
wall time and peak resident memory (its own process, benchmarks/stages.py). `gold_change` gives each method's paired
change over the base on the same prompts with its 95% interval.

    .venv/bin/python benchmarks/method_comparison.py --out /tmp/methods --plot docs/method-comparison.png
    .venv/bin/python benchmarks/method_comparison.py --quick --parallel --out /tmp/methods-quick
    .venv/bin/python benchmarks/method_comparison.py --no-revise --dpo-rpo-alpha 0 --out /tmp/methods-natural
        # pairs best against worst of the policy's own answers, plain DPO (the default is the recipe: --revise, RPO)
    .venv/bin/python benchmarks/method_comparison.py --contrast --dpo-steps 150 --out /tmp/methods-contrast
        # contrast pairs too: DPO's gold at less KL (docs/method-comparison.md, "Contrast pairs")
    .venv/bin/python benchmarks/method_comparison.py --guide revise --out /tmp/methods-guided
        # GRPO and RLOO with each group's best answer edited to meet its constraints (`rlhf --guide revise`)
    .venv/bin/python benchmarks/method_comparison.py --methods dpo_grpo --guide revise --contrast --heldout 400 \
        --dpo-steps 85 --dpo-learning-rate 2.6e-4 --rl-steps 24 --out /tmp/dpo-guided-grpo
        # one pipeline only (and the DPO it starts from): DPO, then GRPO with revised answers; no proxy RM
    .venv/bin/python benchmarks/method_comparison.py --tiny --out DIR        # tiny random LLaMA: tests only
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.paired import paired_points  # noqa: E402
from benchmarks.rlhf_effect import (  # noqa: E402 - after the path set-up, as a script
    MODES as EFFECT_MODES,
)
from benchmarks.rlhf_effect import (  # noqa: E402
    Data,
    _loadavg,
    _r,
    common_arguments,
    dpo_command,
    leaked,
    prepare,
    read_jsonl,
    sizes,
)
from benchmarks.stages import Stages, log  # noqa: E402

# The pipelines start from DPO's policy, so they train after the first wave: dpo_grpo (docs/method-comparison.md
# #dpo-then-grpo) with GRPO's budget, dpo_ppo and dpo_ppo_rm (#rl-on-top-of-c1) with PPO's; their time and memory
# are those of their RL stage alone, and their KL term holds them to DPO's policy (eval-policy's KL is to the base).
FIRST_WAVE = ("ppo_rm", "dpo", "grpo", "rloo")
PIPELINES = ("dpo_grpo", "dpo_ppo", "dpo_ppo_rm")
TRAINED = (*FIRST_WAVE, *PIPELINES)
METHODS = ("base", "best_of_4", *TRAINED)
NEEDS_RM = ("best_of_4", "ppo_rm", "dpo_ppo_rm")
COLORS = dict(zip(METHODS, ("grey", "tab:purple", "tab:orange", "tab:blue", "tab:green", "tab:olive", "tab:cyan",
                            "tab:red", "tab:pink"), strict=True))
BEST_OF = 4

# Training budgets per mode, on top of the data sizes. full: the recipe of docs/method-comparison.md (R6, G6, P1)
# on a 2-core CPU: DPO 100 steps of 4 pairs (R6: 8.7 min alone), GRPO 12 steps x 8 prompts x 4 answers (G6: 7.2 min
# alone); PPO and RLOO get the rollouts GRPO gets (steps x prompts x K = PPO's steps x batch). dpo_steps 0: epochs.
TRAINING: dict[str, dict[str, Any]] = {
    "tiny": {"ppo_steps": 2, "ppo_batch": 4, "rl_steps": 2, "rl_prompts": 2, "group_size": 2, "dpo_epochs": 1.0,
             "dpo_steps": 0, "dpo_batch": 2},
    "quick": {"ppo_steps": 6, "ppo_batch": 8, "rl_steps": 6, "rl_prompts": 2, "group_size": 4, "dpo_epochs": 2.0,
              "dpo_steps": 0, "dpo_batch": 4},
    "full": {"ppo_steps": 12, "ppo_batch": 32, "rl_steps": 12, "rl_prompts": 8, "group_size": 4, "dpo_epochs": 1.0,
             "dpo_steps": 100, "dpo_batch": 4},
}
# rlhf_effect's data sizes, with the split of the hand runs in docs/method-comparison.md for full: 200 held-out
# prompts (a 10-point change is ~3 standard errors there) and 480 train prompts (~440 pairs; DPO reads 400)
MODES = {**EFFECT_MODES, "full": {**EFFECT_MODES["full"], "train": 480, "heldout": 200}}


def training_jobs(args: argparse.Namespace, size: dict[str, Any], budget: dict[str, Any], data: Data,
                  out: Path, methods: tuple[str, ...]) -> list[tuple[str, list[Any], None]]:
    """One CLI command per trained method of `methods`, all LoRA at the same rank on the same base and train
    prompts."""
    lora = ["--lora", "--lora-r", args.lora_r, "--lora-alpha", 2 * args.lora_r]
    rl = ["--prompts", data.train_prompts, "--max-new-tokens", size["new_tokens"],
          "--temperature", args.temperature, *lora, "--learning-rate", args.learning_rate,
          "--ppo-epochs", args.ppo_epochs, "--kl-coef", args.kl_coef,
          "--missing-eos-penalty", args.missing_eos_penalty, "--sample-every", 1,
          "--max-prompt-tokens", 384, "--seed", args.seed, "--overwrite", "--json"]
    critic_free = ["--reward", "rules:constraints", "--steps", budget["rl_steps"], "--batch-size",
                   budget["rl_prompts"], "--group-size", budget["group_size"],
                   "--samples-per-step", budget["rl_prompts"] * budget["group_size"], "--guide", args.guide]
    base, after_dpo = ["--policy", data.policy], ["--policy", out / "dpo" / "policy"]

    def critic_free_run(algo: str, name: str, policy: list[Any]) -> tuple[str, list[Any], None]:
        return name, ["rlhf", "--algo", algo, "--out", out / name, *critic_free, *policy, *rl], None

    def ppo_run(name: str, reward: Any, policy: list[Any]) -> tuple[str, list[Any], None]:
        return name, ["rlhf", "--reward", reward, "--out", out / name, "--steps", budget["ppo_steps"], "--batch-size",
                      budget["ppo_batch"], "--samples-per-step", budget["ppo_batch"], *policy, *rl], None

    jobs = [
        ppo_run("ppo_rm", data.rm_dir, base),
        ("dpo", dpo_command(data, out, lora_r=args.lora_r, learning_rate=args.dpo_learning_rate, beta=args.dpo_beta,
                            rpo_alpha=args.dpo_rpo_alpha, epochs=budget["dpo_epochs"], max_steps=budget["dpo_steps"],
                            batch_size=budget["dpo_batch"], seed=args.seed), None),
        critic_free_run("grpo", "grpo", base),
        critic_free_run("rloo", "rloo", base),
        critic_free_run("grpo", "dpo_grpo", after_dpo),
        ppo_run("dpo_ppo", "rules:constraints", after_dpo),
        ppo_run("dpo_ppo_rm", data.rm_dir, after_dpo),
    ]
    return [job for job in jobs if job[0] in methods]


def eval_jobs(args: argparse.Namespace, size: dict[str, Any], data: Data, out: Path,
              methods: tuple[str, ...]) -> list[tuple[str, list, Path]]:
    """Each trained policy of `methods` against the base on the held-out prompts; best-of-4 of the base alone
    (--best-of applies to both sides of an eval-policy run, so the base's single samples come from the other
    runs). The proxy RM scores every answer where it was trained."""
    reward = ["--reward", data.rm_dir] if any(m in NEEDS_RM for m in methods) else []
    common = ["--prompts", data.held_prompts, "--scorer", "rules:constraints", *reward,
              "--temperature", args.temperature, "--max-new-tokens", size["eval_tokens"], "--batch-size", 32,
              "--seed", args.seed, "--overwrite", "--json", *(["--bf16"] if args.bf16 else [])]
    jobs = [(f"eval_{m}", ["eval-policy", out / m / "policy", "--baseline", data.policy, "--out",
                           out / f"eval-{m}", *common], out / f"eval-{m}.json") for m in TRAINED if m in methods]
    if "best_of_4" in methods:
        jobs.append(("eval_best_of_4", ["eval-policy", data.policy, "--best-of", BEST_OF, "--out",
                                        out / "eval-best_of_4", *common], out / "eval-best_of_4.json"))
    return jobs


def answers_by_prompt(path: Path, side: str) -> dict[str, float]:
    return {f"{row['prompt_id']}/{row['sample']}": row["scores"]["scorer"]
            for row in read_jsonl(path) if row["policy"] == side}


def paired_change(policy: dict[str, float], base: dict[str, float]) -> dict[str, Any]:
    """POLICY − BASE gold over the prompts both answered: mean of the paired differences and its normal 95%
    interval, in points (× 100)."""
    return paired_points([100 * (policy[k] - base[k]) for k in policy if k in base])


def summarize(out: Path, stages: Stages, methods: tuple[str, ...]
              ) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Per method of `methods` (base first) {gold, kl, mean_length, seconds, peak_rss_mb}; the paired gold
    changes; per family."""
    trained = [m for m in TRAINED if m in methods]
    compared = [m for m in METHODS if m in methods and m != "base"]
    evals = {m: json.loads((out / f"eval-{m}.json").read_text()) for m in compared}
    first = evals[trained[0]]
    base_answers = answers_by_prompt(out / f"eval-{trained[0]}" / "answers.jsonl", "baseline")
    results: dict[str, Any] = {"base": {"gold": _r(first["baseline"]["scorer"]), "kl": 0.0,
                                         "mean_length": _r(first["baseline"]["words"], 1), "seconds": None,
                                         "peak_rss_mb": None}}
    change: dict[str, Any] = {}
    for m in compared:
        ev = evals[m]
        kl = ev["best_of_kl_bound"] if m == "best_of_4" else ev["kl"]
        results[m] = {"gold": _r(ev["policy"]["scorer"]), "kl": _r(kl), "mean_length": _r(ev["policy"]["words"], 1),
                      "seconds": stages.seconds.get(m), "peak_rss_mb": stages.peak_rss_mb.get(m)}
        change[m] = paired_change(answers_by_prompt(out / f"eval-{m}" / "answers.jsonl", "policy"), base_answers)
    # every eval-policy run answered the base with the same per-prompt seeds: their base golds must agree
    base_golds = {m: evals[m]["baseline"]["scorer"] for m in trained}
    if max(base_golds.values()) - min(base_golds.values()) > 1e-9:
        log(f"note: the base's held-out gold differs between eval runs: {base_golds}")
    families = sorted(first["baseline"]["per_family"])
    per_family = {f: {"n": first["baseline"]["family_answers"].get(f, 0),
                      "base": _r(first["baseline"]["per_family"].get(f)),
                      **{m: _r(evals[m]["policy"]["per_family"].get(f)) for m in compared}}
                  for f in families}
    return results, change, per_family


def plot(path: Path, methods: dict[str, Any], change: dict[str, Any], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4))
    names = list(methods)
    golds = [methods[m]["gold"] for m in names]
    errors = [[0.0] * len(names), [0.0] * len(names)]
    for i, m in enumerate(names):
        ci = (change.get(m) or {}).get("ci95")
        if ci:  # the paired interval of the change, drawn around the method's own gold
            errors[0][i] = max(0.0, golds[i] - (methods["base"]["gold"] + ci[0] / 100))
            errors[1][i] = max(0.0, methods["base"]["gold"] + ci[1] / 100 - golds[i])
    left.bar(names, golds, yerr=errors, capsize=4, color=[COLORS[m] for m in names])
    left.tick_params(axis="x", labelrotation=20)
    left.axhline(methods["base"]["gold"], color="grey", ls=":")
    left.set_ylim(0, 1)
    left.set_ylabel("held-out gold: share of constraints met")
    left.set_title("gold per method (bars: 95% interval of the paired change)")
    for m in names:
        right.scatter(methods[m]["kl"], methods[m]["gold"], s=40, color=COLORS[m])
        right.annotate(m, (methods[m]["kl"], methods[m]["gold"]), fontsize=8, xytext=(4, 4),
                       textcoords="offset points")
    right.set_xlabel("KL(policy ‖ base), nats per answer")
    right.set_ylabel("held-out gold")
    right.set_title("gold against KL")
    for ax in (left, right):
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def chosen_methods(parser: argparse.ArgumentParser, names: str) -> tuple[str, ...]:
    """--methods as a tuple in METHODS' order, the base and (for a pipeline) dpo added; refused in one line when a
    name is unknown or nothing is trained."""
    chosen = {name.strip() for name in names.split(",") if name.strip()}
    unknown = sorted(chosen - set(METHODS))
    if unknown:
        parser.error(f"--methods: unknown {', '.join(unknown)} (choose from {', '.join(METHODS[1:])})")
    if not chosen & set(TRAINED):
        parser.error(f"--methods: name at least one trained method ({', '.join(TRAINED)})")
    chosen |= {"base", *(["dpo"] if chosen & set(PIPELINES) else [])}
    return tuple(m for m in METHODS if m in chosen)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="a smoke run: 32 + 32 prompts, 6 steps per RL run")
    mode.add_argument("--tiny", action="store_true", help="tiny random LLaMA and the test fixtures (tests)")
    common_arguments(parser)
    # defaults: the recipe of docs/method-comparison.md (revised pairs, R6's DPO, G4/G6's GRPO)
    parser.set_defaults(revise=True)
    parser.add_argument("--kl-coef", type=float, default=0.04, help="β of PPO, GRPO and RLOO")
    parser.add_argument("--learning-rate", type=float, default=2e-4, help="PPO / GRPO / RLOO learning rate (LoRA)")
    parser.add_argument("--ppo-epochs", type=int, default=1, help="epochs per rollout batch (PPO, GRPO, RLOO)")
    parser.add_argument("--dpo-learning-rate", type=float, default=1.5e-4, help="DPO learning rate (LoRA)")
    parser.add_argument("--dpo-beta", type=float, default=1.0, help="DPO β")
    parser.add_argument("--dpo-rpo-alpha", type=float, default=1.0, help="DPO's --rpo-alpha: the chosen answer's "
                        "NLL in the loss, which revised pairs need (docs/method-comparison.md#revised-pairs)")
    parser.add_argument("--dpo-steps", type=int, default=None, help="DPO optimizer steps (mode's default; full: "
                        "100, R6; with --contrast, 150 reads as large a share of the ~1.5x pairs)")
    parser.add_argument("--ppo-steps", type=int, default=None, help="steps of the PPO arms (mode's default; full: "
                        "12; the best run inside 5 nats after C1 was 8 with --ppo-epochs 4)")
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--guide", choices=("none", "revise"), default="none", help="GRPO and RLOO (grpo, rloo, "
                        "dpo_grpo): `rlhf --guide revise` puts each group's best answer, edited by code to meet its "
                        "constraints, in place of the group's worst (docs/method-comparison.md: GRPO from the base "
                        "+13.8 points with it, +7.7 without, at 7.9 and 3.0 nats)")
    parser.add_argument("--rl-steps", type=int, default=None, help="steps of the critic-free arms (grpo, rloo, "
                        "dpo_grpo; mode's default; full: 12)")
    parser.add_argument("--methods", default=",".join(METHODS[1:]), help="the methods to train and evaluate, "
                        "comma-separated (default: all; the base always; a pipeline brings dpo; the proxy RM is "
                        "trained only for best_of_4, ppo_rm and dpo_ppo_rm)")
    parser.add_argument("--plot", default="", help="also copy the figure here (e.g. docs/method-comparison.png)")
    args = parser.parse_args()
    methods = chosen_methods(parser, args.methods)

    args.parallel = args.parallel or args.tiny
    name, size = sizes(args, MODES, ("train", "heldout", "candidates"))
    overrides = {"dpo_steps": args.dpo_steps, "ppo_steps": args.ppo_steps, "rl_steps": args.rl_steps}
    budget = {**TRAINING[name], **{key: value for key, value in overrides.items() if value is not None}}
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="method-comparison-"))
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    stages = Stages(out, args.threads)
    data = prepare(args, size, out, stages, train_reward=any(m in NEEDS_RM for m in methods))
    training = training_jobs(args, size, budget, data, out, methods)
    first_wave = [job for job in training if job[0] in FIRST_WAVE]
    evaluations = eval_jobs(args, size, data, out, methods)
    for jobs in (first_wave, [job for job in training if job not in first_wave], evaluations):
        if args.parallel:  # two at a time, one torch thread each
            for i in range(0, len(jobs), 2):
                stages.run_together(jobs[i:i + 2])
        else:
            for job in jobs:
                stages.run(*job)

    leaks = leaked(data.held_prompts, data.train_prompts,
                   [data.pairs, *(out / m / "samples.jsonl" for m in TRAINED if m in methods and m != "dpo")])
    if leaks:
        raise SystemExit(f"{leaks} training inputs are held-out instructions or not from the train split")
    results, change, per_family = summarize(out, stages, methods)
    figure = out / "method-comparison.png"
    plot(figure, results, change, f"llamakit methods ({name}): {Path(data.policy).name}, "
         f"{len(read_jsonl(data.held_prompts))} held-out prompts, LoRA r {args.lora_r}"
         + (f", GRPO/RLOO --guide {args.guide}" if args.guide != "none" else ""))
    if args.plot:
        Path(args.plot).write_bytes(figure.read_bytes())
    result = {**results, "gold_change": change, "per_family": per_family,
              "seconds_per_stage": stages.seconds, "peak_rss_mb_per_stage": stages.peak_rss_mb,
              "pairs": len(read_jsonl(data.pairs)), "train_prompts": len(read_jsonl(data.train_prompts)),
              "heldout_prompts": len(read_jsonl(data.held_prompts)), "heldout_in_training": leaks,
              "mode": name, "policy": args.policy if not args.tiny else "tiny-llama", "methods": list(methods),
              "budget": budget,
              "revise": args.revise, "contrast": args.contrast,
              "max_new_tokens": size["new_tokens"], "temperature": args.temperature, "kl_coef": args.kl_coef,
              "learning_rate": args.learning_rate, "dpo_learning_rate": args.dpo_learning_rate,
              "dpo_beta": args.dpo_beta, "dpo_rpo_alpha": args.dpo_rpo_alpha, "lora_r": args.lora_r,
              "ppo_epochs": args.ppo_epochs, "missing_eos_penalty": args.missing_eos_penalty, "guide": args.guide,
              "parallel": args.parallel, "stage_seconds_sum": round(sum(stages.seconds.values()), 1),
              "seconds_this_run": round(time.perf_counter() - started, 1), "load_avg": _loadavg(),
              "figure": str(figure), "out": str(out)}
    (out / "result.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
