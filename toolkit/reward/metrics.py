"""How good and how honest a reward model is on preference pairs.

A pair gives p = P(chosen ≻ rejected). Each pair is read as two binary predictions, (p, 1) and
(1 − p, 0), so that a model is judged on its confidence in whichever side it picks; with this
symmetric reading Brier, NLL and ECE equal those of the usual one-sided form, and AUC is defined.

    accuracy  mean[p > 1/2] + ½ · mean[p = 1/2]            (ties count half)
    ECE       Σ_b (n_b / N) · |mean(y_b) − mean(p_b)|      15 equal-width bins on [0, 1]
    Brier     mean (1 − p)²
    NLL       mean −log p
    AUC       ROC AUC of the 2N symmetric predictions

When to trust a verdict: accuracy per confidence group, and selective accuracy, the accuracy on the
fraction (coverage) of pairs whose uncertainty is lowest.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

N_BINS = 15
EPS = 1e-12


def symmetric(p: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """(labels, probabilities) of the 2N binary predictions a list of pair probabilities stands for."""
    p = np.asarray(p, dtype=np.float64)
    return np.concatenate([np.ones_like(p), np.zeros_like(p)]), np.concatenate([p, 1.0 - p])


def bin_ids(prob: np.ndarray, n_bins: int = N_BINS) -> np.ndarray:
    # Same edges and edge rule as sklearn.calibration.calibration_curve(strategy="uniform").
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    return np.searchsorted(edges[1:-1], prob)


def ece(labels: np.ndarray, prob: np.ndarray, n_bins: int = N_BINS) -> float:
    ids = bin_ids(prob, n_bins)
    total = 0.0
    for b in range(n_bins):
        inside = ids == b
        if inside.any():
            total += inside.sum() / len(prob) * abs(labels[inside].mean() - prob[inside].mean())
    return float(total)


def reliability(labels: np.ndarray, prob: np.ndarray, n_bins: int = N_BINS) -> list[dict[str, float]]:
    """Per non-empty bin: mean confidence, observed frequency, count (the points of a reliability diagram)."""
    ids = bin_ids(prob, n_bins)
    out = []
    for b in range(n_bins):
        inside = ids == b
        if inside.any():
            out.append({"bin": b, "confidence": float(prob[inside].mean()), "frequency": float(labels[inside].mean()),
                        "count": int(inside.sum())})
    return out


def average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks, ties sharing their mean rank (scipy.stats.rankdata's default, without importing
    scipy.stats: that import alone costs seconds per CLI call)."""
    x = np.asarray(x)
    order = np.argsort(x, kind="mergesort")
    sorted_x = x[order]
    # Start of each run of equal values, and each run's mean of the 1-based positions it spans.
    starts = np.flatnonzero(np.r_[True, sorted_x[1:] != sorted_x[:-1]])
    ends = np.r_[starts[1:], len(x)]
    run_rank = (starts + 1 + ends) / 2.0
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.repeat(run_rank, ends - starts)
    return ranks


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC by the rank-sum (Mann–Whitney) formula, ties counted half."""
    ranks = average_ranks(scores)
    pos = labels == 1
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def pair_metrics(p: Sequence[float]) -> dict[str, float | int]:
    """accuracy, ece, brier, nll, auc, n, ties for pair probabilities p = P(chosen ≻ rejected)."""
    p = np.asarray(p, dtype=np.float64)
    n = len(p)
    if n == 0:
        return {"accuracy": float("nan"), "ece": float("nan"), "brier": float("nan"), "nll": float("nan"),
                "auc": float("nan"), "n": 0, "ties": 0}
    ties = int((p == 0.5).sum())
    labels, prob = symmetric(p)
    clipped = np.clip(p, EPS, 1.0)
    return {
        "accuracy": float(((p > 0.5).sum() + 0.5 * ties) / n),
        "ece": ece(labels, prob),
        "brier": float(np.mean((1.0 - p) ** 2)),
        "nll": float(np.mean(-np.log(clipped))),
        "auc": auc(labels, prob),
        "n": n,
        "ties": ties,
    }


def ece_noise(p: Sequence[float], draws: int = 2000, seed: int = 0) -> dict[str, float]:
    """The ECE a perfectly calibrated model with these confidences would show on this many pairs.

    ECE is biased upwards on a finite set: even when P(chosen ≻ rejected) = p exactly, the observed
    frequency in each bin scatters around its confidence. Outcomes are drawn from p itself (chosen wins
    with probability p), so the result is the scale below which an ECE is indistinguishable from noise.
    """
    p = np.asarray(p, dtype=np.float64)
    if len(p) == 0:
        return {"median": float("nan"), "p90": float("nan")}
    rng = np.random.default_rng(seed)
    chosen_wins = rng.random((draws, len(p))) < p
    # Whoever wins, the 2N symmetric predictions are p and 1 − p: only their labels change from draw to draw,
    # so the bins are found once and each draw's ECE is Σ_b |Σ labels_b − Σ prob_b| / 2N.
    _, prob = symmetric(p)
    in_bin = np.eye(N_BINS)[bin_ids(prob)]  # (2N, bins) one-hot
    labels = np.concatenate([chosen_wins, ~chosen_wins], axis=1).astype(np.float64)
    values = np.abs(labels @ in_bin - prob @ in_bin).sum(axis=1) / len(prob)
    return {"median": float(np.median(values)), "p90": float(np.quantile(values, 0.9))}


def sigmoid(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return np.where(x >= 0, 1.0 / (1.0 + np.exp(-np.abs(x))), np.exp(-np.abs(x)) / (1.0 + np.exp(-np.abs(x))))


def raw_probabilities(diffs: Sequence[float]) -> np.ndarray:
    """P(chosen ≻ rejected) = σ(r_c − r_r), the model's own, uncalibrated reading."""
    return sigmoid(np.asarray(diffs, dtype=np.float64))


def pair_correct(p: Sequence[float]) -> np.ndarray:
    """Each pair's accuracy credit: 1 when p > 1/2, ½ for a tie, 0 below (their mean is `accuracy`)."""
    p = np.asarray(p, dtype=np.float64)
    return np.where(p > 0.5, 1.0, np.where(p == 0.5, 0.5, 0.0))


def confidence(p: Sequence[float]) -> np.ndarray:
    """max(p, 1 − p): the probability a model gives to whichever side it picks."""
    p = np.asarray(p, dtype=np.float64)
    return np.maximum(p, 1.0 - p)


def accuracy_by_confidence(p: Sequence[float], groups: int = 10) -> list[dict[str, float | int]]:
    """Pairs sorted by confidence and cut into `groups` groups of (near) equal count, least confident first.

    Equal counts rather than equal-width bins: calibrated confidences bunch up, and an accuracy is only worth
    reading when its group has pairs in it."""
    p = np.asarray(p, dtype=np.float64)
    if len(p) == 0:
        return []
    conf, correct = confidence(p), pair_correct(p)
    order = np.argsort(conf, kind="stable")
    out: list[dict[str, float | int]] = []
    for i, idx in enumerate(np.array_split(order, min(groups, len(p)))):
        out.append({"group": i, "n": len(idx), "confidence_min": float(conf[idx].min()),
                    "confidence_max": float(conf[idx].max()), "mean_confidence": float(conf[idx].mean()),
                    "accuracy": float(correct[idx].mean())})
    return out


def selective_accuracy(correct: Sequence[float], uncertainty: Sequence[float], coverage: float) -> float:
    """Mean `correct` over the ceil(coverage · n) pairs of lowest `uncertainty` (ties keep input order).

    `uncertainty` is anything where lower means "trust this verdict more": −confidence for one model,
    the spread of an ensemble's reward differences for several."""
    if not 0.0 < coverage <= 1.0:
        raise ValueError(f"coverage must be in (0, 1], got {coverage}")
    correct = np.asarray(correct, dtype=np.float64)
    # Rounded first: 0.55 · 100 is 55.00000000000001 in floating point, and must keep 55 pairs, not 56.
    keep = max(1, math.ceil(round(coverage * len(correct), 9)))
    order = np.argsort(np.asarray(uncertainty, dtype=np.float64), kind="stable")
    return float(correct[order[:keep]].mean())


def coverage_curve(correct: Sequence[float], uncertainty: Sequence[float],
                   points: int = 20) -> list[tuple[float, float]]:
    """(coverage, selective accuracy) at coverage 1/points, 2/points, ..., 1."""
    return [(k / points, selective_accuracy(correct, uncertainty, k / points)) for k in range(1, points + 1)]


def fmt(metrics: dict[str, float | int]) -> str:
    return "  ".join(f"{k} {v:.4f}" if isinstance(v, float) and not math.isnan(v) else f"{k} {v}"
                     for k, v in metrics.items())
