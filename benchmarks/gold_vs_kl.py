"""Gold against KL: where eval-policy runs on the same held-out prompts sit, and whether they are inside a KL budget.

Each run is an `eval-policy POLICY --baseline BASE --scorer rules:constraints --out DIR` directory; every run must
have answered the same prompts with the same base (its per-prompt seeds), so that their base golds agree and the
paired changes are comparable. `LABEL=DIR+DIR` takes one policy's evaluations on several prompt files (a held-out
set grown after the first evaluations) as one run over all their prompts. For each run: held-out gold, the paired
change over the base with its 95% interval (benchmarks/paired.py), the sampled KL(policy ‖ base) and its standard
error, words and EOS rate. `--chain` joins runs by a line, in order: the stages of a pipeline, or the checkpoints of
one RL run (the over-optimisation path in gold–KL space). Prints ONE JSON line {"base_gold", "runs": {LABEL:
{...}}, "inside_budget": [...], "figure"} and writes the PNG.

    .venv/bin/python benchmarks/gold_vs_kl.py --plot docs/gold-vs-kl.png --kl-budget 5 --goal 15 --goal 20 \\
        dpo=/tmp/methods/eval-dpo grpo=/tmp/methods/eval-grpo dpo_grpo=/tmp/methods/eval-dpo_grpo \\
        --chain dpo,dpo_grpo
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.rlhf_effect import _r, paired_gold_change, read_jsonl  # noqa: E402 - after the path set-up, as a script


def read_run(directories: list[Path]) -> dict[str, Any]:
    """One policy's eval-policy output, or several on different prompt files taken as one held-out set: the
    summaries' figures weighted by their answers, and the paired gold change over all answers."""
    summaries, answers = [], []
    for directory in directories:
        summary_file, answers_file = directory / "summary.json", directory / "answers.jsonl"
        for needed in (summary_file, answers_file):
            if not needed.is_file():
                raise SystemExit(f"error: {needed}: not found (an `eval-policy --baseline ... --out DIR` directory?)")
        summary = json.loads(summary_file.read_text())
        if summary.get("baseline") is None or summary["policy"].get("scorer") is None:
            raise SystemExit(f"error: {summary_file}: needs a --baseline and a --scorer run")
        summaries.append(summary)
        answers += read_jsonl(answers_file)
    names = " + ".join(str(d) for d in directories)
    for key, values in (("model", [s["policy"]["model"] for s in summaries]),
                        ("seed", [s.get("seed") for s in summaries])):
        if len(set(values)) > 1:
            raise SystemExit(f"error: {names}: one run's evaluations differ in {key}: {values}")
    change = paired_gold_change(answers)
    if change["points"] is None:
        raise SystemExit(f"error: {names}: fewer than 2 prompts answered by both sides")
    weights = [s["policy"]["answers"] for s in summaries]
    total = sum(weights)

    def mean(values: list[float | None]) -> float | None:
        return None if None in values else sum(w * v for w, v in zip(weights, values, strict=True)) / total

    sems = [s.get("kl_sem") for s in summaries]
    kl_sem = None if None in sems else sum((w * e) ** 2 for w, e in zip(weights, sems, strict=True)) ** 0.5 / total
    return {"gold": _r(mean([s["policy"]["scorer"] for s in summaries])),
            "base_gold": _r(mean([s["baseline"]["scorer"] for s in summaries])),
            "change": change["points"], "ci95": change["ci95"], "n": change["n"],
            "kl": _r(mean([s["kl"] for s in summaries]), 3), "kl_sem": _r(kl_sem, 3),
            "words": _r(mean([s["policy"]["words"] for s in summaries]), 1),
            "eos_rate": _r(mean([s["policy"]["eos_rate"] for s in summaries]), 3),
            "prompts": _prompts_digest(answers), "seed": summaries[0].get("seed")}


def _prompts_digest(answers: list[dict[str, Any]]) -> str:
    """Which prompts (and samples) were answered, by content: the same file under another path is the same set."""
    keys = sorted({f"{row['prompt_id']}/{row['sample']}" for row in answers})
    return hashlib.sha256("\n".join(keys).encode()).hexdigest()[:12]


def parse_run(text: str) -> tuple[str, list[Path]]:
    label, sep, directories = text.partition("=")
    if not sep or not label or not all(directories.split("+")):
        raise argparse.ArgumentTypeError(f"{text!r}: expected LABEL=EVAL_DIR or LABEL=EVAL_DIR+EVAL_DIR+...")
    return label, [Path(d) for d in directories.split("+")]


def plot(path: Path, runs: dict[str, dict[str, Any]], chains: list[list[str]], kl_budget: float | None,
         goals: list[float], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for chain in chains:  # base → first stage → ...: the path a pipeline or one run's checkpoints took
        kls = [0.0] + [runs[label]["kl"] for label in chain]
        changes = [0.0] + [runs[label]["change"] for label in chain]
        ax.plot(kls, changes, color="grey", alpha=0.5, lw=1, zorder=1)
    for label, run in runs.items():
        low, high = run["ci95"]
        ax.errorbar(run["kl"], run["change"], yerr=[[run["change"] - low], [high - run["change"]]],
                    fmt="o", capsize=3, zorder=2)
        ax.annotate(label, (run["kl"], run["change"]), fontsize=8, xytext=(5, 3), textcoords="offset points")
    ax.scatter([0], [0], color="black", zorder=3)
    ax.annotate("base", (0, 0), fontsize=8, xytext=(5, -10), textcoords="offset points")
    if kl_budget is not None:
        ax.axvline(kl_budget, color="tab:red", ls="--", lw=1, label=f"KL budget {kl_budget:g} nats")
    for goal in goals:
        ax.axhline(goal, color="tab:green", ls=":", lw=1, label=f"goal +{goal:g} points")
    ax.axhline(0, color="black", lw=0.5)
    ax.set_xlabel("KL(policy ‖ base), nats per answer (sampled, on the policy's own answers)")
    ax.set_ylabel("held-out gold change over the base, points (95% interval)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    if kl_budget is not None or goals:
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=parse_run, metavar="LABEL=EVAL_DIR[+EVAL_DIR...]",
                        help="an eval-policy --out directory (with --baseline and --scorer), under a short label; "
                        "DIR+DIR: one policy's evaluations on several prompt files, taken as one held-out set")
    parser.add_argument("--chain", action="append", default=[], metavar="LABEL,LABEL,...",
                        help="join these runs by a line from the base, in order (repeatable)")
    parser.add_argument("--kl-budget", type=float, default=None, help="draw this KL (nats) and list the runs inside it")
    parser.add_argument("--goal", type=float, action="append", default=[], help="a gold change goal in points "
                        "(repeatable)")
    parser.add_argument("--title", default="held-out gold change against KL from the base")
    parser.add_argument("--plot", type=Path, required=True, help="PNG to write")
    args = parser.parse_args()

    runs = dict(args.runs)
    if len(runs) < len(args.runs):
        parser.error("each label once")
    chains = [[label for label in chain.split(",") if label] for chain in args.chain]
    for label in (label for chain in chains for label in chain):
        if label not in runs:
            parser.error(f"--chain names {label!r}, which is not a run")
    results = {label: read_run(directories) for label, directories in runs.items()}
    # a paired change only compares with another measured on the same prompts, with the same base answers
    for key in ("base_gold", "prompts", "seed", "n"):
        values = {label: r[key] for label, r in results.items()}
        if len(set(values.values())) > 1:
            raise SystemExit(f"error: the runs differ in {key}: {values} (same prompts, base and seed needed)")
    base_gold = next(iter(results.values()))["base_gold"]
    for r in results.values():
        for key in ("base_gold", "prompts", "seed"):
            del r[key]
    plot(args.plot, results, chains, args.kl_budget, args.goal, args.title)
    inside = sorted((label for label, r in results.items() if args.kl_budget is None or r["kl"] < args.kl_budget),
                    key=lambda label: -results[label]["change"])
    print(json.dumps({"base_gold": base_gold, "runs": results, "kl_budget": args.kl_budget,
                      "inside_budget": inside, "figure": str(args.plot)}))


if __name__ == "__main__":
    main()
