"""When to trust a reward model's verdict: accuracy by confidence, selective accuracy, the coverage curve."""

from __future__ import annotations

import numpy as np
import pytest

from toolkit.reward.metrics import (
    accuracy_by_confidence,
    confidence,
    coverage_curve,
    pair_correct,
    pair_metrics,
    selective_accuracy,
)
from toolkit.reward.plots import coverage_plot


def test_pair_correct_credits_ties_half():
    assert pair_correct([0.9, 0.5, 0.2, 0.51, 0.0]).tolist() == [1.0, 0.5, 0.0, 1.0, 0.0]
    assert confidence([0.9, 0.5, 0.2]).tolist() == pytest.approx([0.9, 0.5, 0.8])


def test_accuracy_by_confidence_by_hand():
    # confidence 0.9 0.6 0.55 0.8 0.5 0.7; credit 1 0 1 0 ½ 1
    groups = accuracy_by_confidence([0.9, 0.4, 0.55, 0.2, 0.5, 0.7], groups=3)
    assert [g["group"] for g in groups] == [0, 1, 2]
    assert [g["n"] for g in groups] == [2, 2, 2]
    assert [g["confidence_min"] for g in groups] == pytest.approx([0.5, 0.6, 0.8])
    assert [g["confidence_max"] for g in groups] == pytest.approx([0.55, 0.7, 0.9])
    assert [g["mean_confidence"] for g in groups] == pytest.approx([0.525, 0.65, 0.85])
    assert [g["accuracy"] for g in groups] == pytest.approx([0.75, 0.5, 0.5])


def test_accuracy_by_confidence_group_sizes():
    p = np.linspace(0.05, 0.95, 7)
    assert [g["n"] for g in accuracy_by_confidence(p, groups=3)] == [3, 2, 2]  # np.array_split's sizes
    assert [g["n"] for g in accuracy_by_confidence(np.linspace(0.05, 0.95, 20))] == [2] * 10  # deciles
    # Fewer pairs than groups: one group per pair, never an empty one.
    few = accuracy_by_confidence([0.7, 0.1, 0.5])
    assert [g["n"] for g in few] == [1, 1, 1]
    assert [g["mean_confidence"] for g in few] == pytest.approx([0.5, 0.7, 0.9])
    assert [g["accuracy"] for g in few] == [0.5, 1.0, 0.0]
    assert accuracy_by_confidence([]) == []


def test_selective_accuracy_keeps_the_least_uncertain_pairs():
    correct, uncertainty = [1, 0, 1, 0], [0.1, 0.9, 0.2, 0.3]
    assert selective_accuracy(correct, uncertainty, 0.25) == 1.0
    assert selective_accuracy(correct, uncertainty, 0.5) == 1.0
    assert selective_accuracy(correct, uncertainty, 0.6) == pytest.approx(2 / 3)  # ceil(2.4) = 3 pairs
    assert selective_accuracy(correct, uncertainty, 0.75) == pytest.approx(2 / 3)
    assert selective_accuracy(correct, uncertainty, 1.0) == 0.5
    # Ties in uncertainty keep input order: pair 0 (wrong) comes before pair 1 (right).
    assert selective_accuracy([0, 1, 1], [0.5, 0.5, 0.1], 2 / 3) == 0.5
    # 0.55 · 100 is 55.00000000000001 in floating point: still 55 pairs, not 56.
    assert selective_accuracy([1] * 55 + [0] * 45, np.arange(100), 0.55) == 1.0
    for bad in (0.0, -0.1, 1.01):
        with pytest.raises(ValueError, match="coverage"):
            selective_accuracy(correct, uncertainty, bad)


def test_full_coverage_is_plain_accuracy():
    p = np.random.default_rng(0).random(37)
    p[:3] = 0.5
    assert selective_accuracy(pair_correct(p), -confidence(p), 1.0) == pair_metrics(p)["accuracy"]


def test_coverage_curve():
    curve = coverage_curve([1, 1, 0, 0], [0, 1, 2, 3], points=4)
    assert [c for c, _ in curve] == [0.25, 0.5, 0.75, 1.0]
    assert [a for _, a in curve] == pytest.approx([1.0, 1.0, 2 / 3, 0.5])
    # An uncertainty that ranks every right verdict before every wrong one: the curve never rises.
    correct = np.random.default_rng(1).choice([0.0, 0.5, 1.0], size=50)
    curve = coverage_curve(correct, -correct)
    assert [c for c, _ in curve] == pytest.approx([k / 20 for k in range(1, 21)])
    accuracies = [a for _, a in curve]
    assert all(a >= b for a, b in zip(accuracies, accuracies[1:], strict=False))
    assert accuracies[0] == 1.0 and accuracies[-1] == pytest.approx(correct.mean())


def test_coverage_plot_writes_a_png(tmp_path):
    p = np.random.default_rng(2).random(30)
    path = tmp_path / "coverage.png"
    coverage_plot({"confidence": (pair_correct(p), -confidence(p))}, path, title="tiny")
    assert path.read_bytes()[:4] == b"\x89PNG"
