"""The reliability diagram (before/after calibration) and the coverage curve, PNGs a user opens. The training
curve is toolkit.training.runlog.plot_curves."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from toolkit.reward.metrics import N_BINS, coverage_curve, pair_metrics, reliability, symmetric


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and in CI
    import matplotlib.pyplot as plt

    return plt


def reliability_diagram(curves: dict[str, Sequence[float]], path: str | os.PathLike, title: str = "") -> None:
    """One line per {label: pair probabilities}: observed frequency against confidence, 15 bins."""
    plt = _pyplot()
    fig, (ax, hist) = plt.subplots(2, 1, figsize=(5.5, 6.5), height_ratios=[3, 1], sharex=True)
    ax.plot([0, 1], [0, 1], color="0.6", linestyle="--", linewidth=1, label="perfect")
    for (label, p), marker in zip(curves.items(), "os^v", strict=False):
        labels, prob = symmetric(p)
        points = reliability(labels, prob)
        m = pair_metrics(p)
        ax.plot([b["confidence"] for b in points], [b["frequency"] for b in points], marker=marker,
                label=f"{label}: ECE {m['ece']:.3f}, Brier {m['brier']:.3f}")
        hist.hist(prob, bins=np.linspace(0, 1, N_BINS + 1), histtype="step", label=label)
    ax.set_ylabel("observed frequency")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_title(title or "Reliability (each pair read both ways)")
    ax.legend(loc="upper left", fontsize=8)
    hist.set_xlabel("predicted probability")
    hist.set_ylabel("count")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def coverage_plot(curves: dict[str, tuple[Sequence[float], Sequence[float]]], path: str | os.PathLike,
                  title: str = "") -> None:
    """Selective accuracy against coverage, one line per {label: (correct, uncertainty)}: how accurate the
    verdicts are when only the least uncertain fraction of pairs is kept. Dashed: accuracy on all pairs."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    overall: dict[float, str] = {}  # accuracy on all pairs -> colour of the first curve with it
    for (label, (correct, uncertainty)), marker in zip(curves.items(), "os^v", strict=False):
        points = coverage_curve(correct, uncertainty)
        (line,) = ax.plot([c for c, _ in points], [a for _, a in points], marker=marker, markersize=3, label=label)
        overall.setdefault(float(np.mean(correct)), line.get_color())
    for accuracy, colour in overall.items():
        # Curves scored on the same verdicts share one line; grey when there is only one.
        ax.axhline(accuracy, linestyle="--", linewidth=1, color=colour if len(overall) > 1 else "0.5",
                   label=f"all pairs: {accuracy:.3f}")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("coverage (fraction of pairs kept, least uncertain first)")
    ax.set_ylabel("accuracy on the pairs kept")
    ax.set_title(title or "Selective accuracy")
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
