"""Cross-fitting: a calibration fitted on every training pair without spending any of them.

    split the pairs into K folds by prompt; for each fold k, train on the other folds and score fold k;
    fit the calibrator on all N out-of-fold reward differences; train the final model on all N pairs.

A 10% held-out split calibrates on ~115 HH pairs, where the prior on log T keeps T near 1 whatever the model
does; out-of-fold scores give the calibrator all ~1150 (sklearn's CalibratedClassifierCV with ensemble=False
does the same). The fold models are trained as the final one is, on (K−1)/K of the pairs, so their
out-of-fold differences stand in for the final model's on pairs it has not seen.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

# (train item ids, test item ids) -> one reward difference r_c − r_r per test item, in the order given
FitAndScore = Callable[[list[int], list[int]], Sequence[float]]


def prompt_folds(prompts: Sequence[str], k: int, seed: int) -> list[list[int]]:
    """Item ids in `k` folds of near-equal size; items with the same prompt share a fold, so no fold model
    trains on another answer to a prompt it is then scored on."""
    groups: dict[str, list[int]] = {}
    for i, prompt in enumerate(prompts):
        groups.setdefault(prompt, []).append(i)
    keys = list(groups)
    random.Random(seed).shuffle(keys)
    folds: list[list[int]] = [[] for _ in range(k)]
    for key in sorted(keys, key=lambda key: -len(groups[key])):  # largest groups first: sizes stay even
        min(folds, key=len).extend(groups[key])
    return [sorted(fold) for fold in folds]


def out_of_fold(n_items: int, folds: list[list[int]], fit_and_score: FitAndScore) -> list[float]:
    """Each item's reward difference from the one fold model that did not train on it."""
    diffs: list[float | None] = [None] * n_items
    for test_ids in folds:
        held = set(test_ids)
        scores = list(fit_and_score([i for i in range(n_items) if i not in held], list(test_ids)))
        if len(scores) != len(test_ids):
            raise ValueError(f"a fold model scored {len(scores)} of {len(test_ids)} pairs")
        for i, d in zip(test_ids, scores, strict=True):
            diffs[i] = float(d)
    missing = [i for i, d in enumerate(diffs) if d is None]
    if missing:
        raise ValueError(f"items {missing[:5]} are in no fold")
    return [float(d) for d in diffs]  # type: ignore[arg-type]
