"""`llamakit data stats FILE`: rows, kinds, turns, lengths, score and margin histograms (table + PNG)."""

from __future__ import annotations

import os
import statistics
from collections import Counter
from pathlib import Path
from typing import Any

from toolkit.generate.formats import read_llamakit
from toolkit.generate.runner import output_files
from toolkit.io import read_existing
from toolkit.rows import dialogue_text, row_kind


def _words(text: str) -> int:
    return len(text.split())


def _describe(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    ordered = sorted(values)
    return {"mean": round(statistics.fmean(ordered), 2), "median": round(statistics.median(ordered), 2),
            "p95": round(ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))], 2),
            "min": round(ordered[0], 2), "max": round(ordered[-1], 2)}


def _judge_and_rules(meta: Any) -> tuple[bool, bool] | None:
    """(judge prefers chosen, rules prefer chosen) for a pair scored by both, None if either one tied."""
    if not isinstance(meta, dict):
        return None
    chosen, rejected = meta.get("chosen") or {}, meta.get("rejected") or {}
    try:
        judge = chosen["judge"]["rating"] - rejected["judge"]["rating"]
        rules = chosen["rules_score"] - rejected["rules_score"]
    except (KeyError, TypeError):
        return None
    return (judge > 0, rules > 0) if judge and rules else None


def compute(path: str | os.PathLike) -> dict[str, Any]:
    """Numbers about a data file of any supported format; series kept under '_series' for the plot."""
    rows = read_llamakit(path)
    kinds = Counter(row_kind(r) for r in rows)
    turns, prompt_words, answer_words, scores, margins = [], [], [], [], []
    chosen_longer = 0
    agree = judged = 0  # rows whose judge and rules both ranked chosen vs rejected (ties left out)
    for r in rows:
        what = row_kind(r)
        if what == "conversation":
            turns.append(sum(1 for m in r["messages"] if m["role"] == "assistant"))
            prompt_words += [_words(m["content"]) for m in r["messages"] if m["role"] == "user"]
            answer_words += [_words(m["content"]) for m in r["messages"] if m["role"] == "assistant"]
        elif what == "preference":
            prompt_words.append(_words(dialogue_text(r["prompt"])))
            answer_words += [_words(r["chosen"]), _words(r["rejected"])]
            chosen_longer += _words(r["chosen"]) > _words(r["rejected"])
            verdicts = _judge_and_rules(r.get("meta"))
            if verdicts is not None:
                judged += 1
                agree += verdicts[0] == verdicts[1]
            for key in ("score_chosen", "score_rejected"):
                if isinstance(r.get(key), (int, float)):
                    scores.append(float(r[key]))
            if isinstance(r.get("margin"), (int, float)):
                margins.append(float(r["margin"]))
            elif isinstance(r.get("score_chosen"), (int, float)) and isinstance(r.get("score_rejected"), (int, float)):
                margins.append(float(r["score_chosen"]) - float(r["score_rejected"]))
        elif what == "score":
            prompt_words.append(_words(dialogue_text(r["prompt"])))
            answer_words.append(_words(r["response"]))
            scores.append(float(r["score"]))
        else:
            prompt_words.append(_words(dialogue_text(r["prompt"])))
    stats: dict[str, Any] = {"file": str(path), "rows": len(rows),
                             "kinds": ", ".join(f"{k} {v}" for k, v in kinds.most_common()),
                             "unique ids": len({r["id"] for r in rows if "id" in r})}
    for name, values in (("turns", turns), ("prompt words", prompt_words), ("answer words", answer_words),
                         ("scores", scores), ("margins", margins)):
        for stat, value in _describe([float(v) for v in values]).items():
            stats[f"{name} {stat}"] = value
    if kinds.get("preference"):
        stats["chosen longer than rejected"] = f"{chosen_longer / kinds['preference']:.1%}"
    if judged:
        stats["judge agrees with rules"] = f"{agree / judged:.1%} of {judged} pairs"
    if scores and all(float(s).is_integer() for s in scores):
        stats["score counts"] = ", ".join(f"{int(k)}: {v}" for k, v in sorted(Counter(scores).items()))
    files = output_files(path) if str(path).endswith(".jsonl") else None
    if files is not None:
        for label, side in (("failed rows (sidecar)", files.failed), ("dropped rows (sidecar)", files.dropped)):
            if side.is_file():
                stats[label] = len(read_existing(side))
    stats["_series"] = {"turns": turns, "prompt words": prompt_words, "answer words": answer_words,
                        "scores": scores, "margins": margins}
    return stats


def plot(stats: dict[str, Any], png: str | os.PathLike) -> Path:
    """One PNG with a histogram per non-empty series."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = {k: v for k, v in stats["_series"].items() if v}
    png = Path(png)
    png.parent.mkdir(parents=True, exist_ok=True)
    n = max(1, len(series))
    fig, axes = plt.subplots(1, n, figsize=(3.6 * n, 3.0), squeeze=False)
    for ax, (name, values) in zip(axes[0], series.items(), strict=False):
        ax.hist(values, bins=min(30, max(5, len(set(values)))), color="#4C72B0", edgecolor="white")
        ax.set_title(name)
        ax.set_ylabel("rows")
    if not series:
        axes[0][0].text(0.5, 0.5, "no numeric data", ha="center", va="center")
        axes[0][0].set_axis_off()
    fig.suptitle(f"{Path(stats['file']).name}: {stats['rows']} rows")
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png
