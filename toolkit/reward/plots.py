"""The reliability diagram (before/after calibration), a PNG a user opens. The training curve is
toolkit.training.runlog.plot_curves."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from toolkit.reward.metrics import N_BINS, pair_metrics, reliability, symmetric


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
