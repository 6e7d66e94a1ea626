"""Cross-fitting (toolkit/reward/crossfit.py) on a simulated reward model whose miscalibration is known."""

from __future__ import annotations

import math

import numpy as np
import pytest

from toolkit.reward import calibrate as cal
from toolkit.reward.constants import TEMPERATURE_PRIOR_SD
from toolkit.reward.crossfit import out_of_fold, prompt_folds

TRUE_T = 3.0  # the simulated model's differences are 3× too large: over-confident


def simulated_pairs(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(true log-odds z, orientation s) per pair: the labelled winner is the better answer with probability σ(z),
    as human labels are; a model with reward differences T·s·z is miscalibrated by exactly T."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, 1.2, n)
    s = np.where(rng.random(n) < 1 / (1 + np.exp(-z)), 1.0, -1.0)
    return z, s


def test_folds_cover_every_item_once_and_keep_a_prompt_together():
    prompts = [f"p{i % 37}" for i in range(200)]  # 37 prompts, several pairs each
    folds = prompt_folds(prompts, 5, seed=0)
    assert sorted(i for fold in folds for i in fold) == list(range(200))
    for fold in folds:
        assert {prompts[i] for i in fold}.isdisjoint({prompts[i] for f in folds if f is not fold for i in f})
    sizes = [len(f) for f in folds]
    assert max(sizes) - min(sizes) <= 6  # the largest prompt group holds 6 items
    assert prompt_folds(prompts, 5, seed=0) == folds and prompt_folds(prompts, 5, seed=1) != folds


def test_each_item_is_scored_by_the_model_that_did_not_train_on_it():
    folds = prompt_folds([str(i) for i in range(30)], 3, seed=0)
    seen = {}

    def fit_and_score(train_ids, test_ids):
        assert set(train_ids).isdisjoint(test_ids) and len(train_ids) + len(test_ids) == 30
        for i in test_ids:
            seen[i] = frozenset(train_ids)
        return [float(i) for i in test_ids]

    assert out_of_fold(30, folds, fit_and_score) == [float(i) for i in range(30)]
    assert all(i not in seen[i] for i in range(30))


def test_cross_fitting_recovers_the_temperature_a_small_split_cannot():
    n = 1155  # the HH dev file's size
    z, s = simulated_pairs(n)
    folds = prompt_folds([str(i) for i in range(n)], 5, seed=0)

    def fit_and_score(train_ids, test_ids):  # every fold model is over-confident the same way
        return (TRUE_T * s * z)[test_ids]

    crossfit_t = cal.fit_temperature(out_of_fold(n, folds, fit_and_score), prior_sd=TEMPERATURE_PRIOR_SD)
    assert crossfit_t == pytest.approx(TRUE_T, rel=0.12)
    # The default 10% split: the same model, ~115 pairs, and the prior holds T nearer 1.
    held = np.random.default_rng(1).choice(n, size=round(0.1 * n), replace=False)
    split_t = cal.fit_temperature((TRUE_T * s * z)[held], prior_sd=TEMPERATURE_PRIOR_SD)
    assert abs(math.log(crossfit_t / TRUE_T)) < abs(math.log(split_t / TRUE_T))


def test_a_fold_model_that_scores_the_wrong_number_of_pairs_is_an_error():
    with pytest.raises(ValueError, match="scored 1 of"):
        out_of_fold(4, [[0, 1], [2, 3]], lambda train, test: [0.0])
