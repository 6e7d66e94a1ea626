"""`eval-reward` and `calibrate`: metrics of a reward model on any pair file, and refitting T."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from toolkit.errors import UserError
from toolkit.reward.constants import TEMPERATURE_PRIOR_SD


def _pairs(data: str, fmt: str):
    from toolkit.reward.data import load_preferences, pairs_from_scored

    loaded = load_preferences(data, fmt)
    pairs = loaded.pairs or pairs_from_scored(loaded.scored)
    if not pairs:
        raise UserError("no pairs (scored rows need a prompt with two answers of different scores)", file=data)
    return pairs


def _diffs(directory: str | os.PathLike, pairs, batch_size: int, device: str, check_calibration: bool):
    """(rewards of chosen_0, rejected_0, chosen_1 …, the calibration or None, texts cut, an ensemble's member
    rewards per text or None)."""
    from toolkit.console import progress
    from toolkit.reward import calibrate as cal
    from toolkit.reward.ensemble import EnsembleNet
    from toolkit.reward.model import TextEncoder, score_texts
    from toolkit.reward.store import fingerprint, load_trained, read_calibration, reward_dir_kind

    # Before the weights are loaded: a dir that is no reward model, or a missing or foreign calibration.json,
    # fails in a second.
    reward_dir_kind(directory)
    existing = None
    if check_calibration:
        existing = read_calibration(directory)
    elif (Path(directory) / cal.CALIBRATION_FILE).is_file():
        try:
            existing = cal.read(directory, fingerprint(directory))
        except UserError:
            pass  # refitted now; only its training statistics would have been kept
    net, tokenizer, settings = load_trained(directory, device)
    encoder = TextEncoder(tokenizer, settings.max_length, settings.append_eos)
    texts = [t for p in pairs for t in (p.chosen_text, p.rejected_text)]
    _, n_cut = encoder.encode(texts)
    members = isinstance(net, EnsembleNet)
    with progress(transient=True) as bar:
        rewards = score_texts(net, encoder, texts, batch_size, device, progress=bar, members=members)
    if members:  # one pass for both: the ensemble's reward is the mean of its members'
        return [sum(r) / len(r) for r in rewards], existing, n_cut, rewards
    return rewards, existing, n_cut, None


def evaluate(directory: str | os.PathLike, data: str, *, fmt: str = "auto", batch_size: int = 32,
             device: str = "cpu", plot: str | None = None, coverage_plot: str | None = None) -> dict[str, Any]:
    """Calibrated metrics at the top level, raw ones under "raw" (keys: accuracy, ece, brier, nll, auc, n, ties);
    "by_confidence" and "selective" say how far the calibrated verdicts can be trusted as confidence varies."""
    from toolkit.reward.metrics import (
        accuracy_by_confidence,
        confidence,
        ece_noise,
        pair_correct,
        pair_metrics,
        raw_probabilities,
        selective_accuracy,
    )

    pairs = _pairs(data, fmt)
    rewards, calibration, n_cut, member_rewards = _diffs(directory, pairs, batch_size, device, check_calibration=True)
    diffs = [c - r for c, r in zip(rewards[0::2], rewards[1::2], strict=True)]
    p_raw, p_cal = raw_probabilities(diffs), calibration.probabilities(diffs)
    result: dict[str, Any] = {**pair_metrics(p_cal), "raw": pair_metrics(p_raw), "method": calibration.method,
                              "temperature": calibration.temperature, "texts_cut": n_cut, "data": data,
                              "model": str(directory), "ece_noise": ece_noise(p_cal)}
    correct, uncertainty = pair_correct(p_cal), -confidence(p_cal)
    result["by_confidence"] = accuracy_by_confidence(p_cal)
    result["selective"] = {"by": "confidence", "accuracy_at_coverage": {
        f"{c:.1f}": selective_accuracy(correct, uncertainty, c) for c in (0.5, 0.8, 1.0)}}
    curves = {"confidence": (correct, uncertainty)}
    if member_rewards is not None:
        result["ensemble"], disagreement = _ensemble_report(member_rewards, correct, calibration.temperature)
        curves["ensemble relative disagreement"] = (correct, disagreement)
    if plot:
        from toolkit.reward.plots import reliability_diagram

        Path(plot).parent.mkdir(parents=True, exist_ok=True)
        reliability_diagram({"raw": p_raw, calibration.method: p_cal}, plot,
                            title=f"{Path(data).name} (n={len(diffs)})")
        result["plot"] = plot
    if coverage_plot:
        from toolkit.reward.plots import coverage_plot as plot_coverage

        Path(coverage_plot).parent.mkdir(parents=True, exist_ok=True)
        plot_coverage(curves, coverage_plot,
                      title=f"{Path(data).name} (n={len(diffs)})")
        result["coverage_plot"] = coverage_plot
    return result


def recalibrate(directory: str | os.PathLike, data: str, *, method: str = "temperature", fmt: str = "auto",
                batch_size: int = 32, device: str = "cpu", plot: str | None = None,
                prior_sd: float | None = None):
    """Refit the calibration on the user's held-out pairs and rewrite calibration.json (and reliability.png)."""
    import statistics

    from toolkit.reward import calibrate as cal
    from toolkit.reward.metrics import raw_probabilities
    from toolkit.reward.store import fingerprint

    pairs = _pairs(data, fmt)
    rewards, existing, _, _ = _diffs(directory, pairs, batch_size, device, check_calibration=False)
    if existing is not None:
        mean, std = existing.reward_mean, existing.reward_std
    else:
        # No trustworthy training statistics: centre on the rewards of these pairs' answers instead.
        mean, std = statistics.fmean(rewards), (statistics.stdev(rewards) if len(rewards) > 1 else 1.0) or 1.0
    diffs = [c - r for c, r in zip(rewards[0::2], rewards[1::2], strict=True)]
    calibration = cal.fit(diffs, method, reward_mean=mean, reward_std=std, data=data,
                          fingerprint=fingerprint(directory),
                          prior_sd=TEMPERATURE_PRIOR_SD if prior_sd is None else prior_sd)
    cal.write(calibration, directory)
    from toolkit.reward.plots import reliability_diagram

    reliability_diagram({"raw": raw_probabilities(diffs), method: calibration.probabilities(diffs)},
                        plot or Path(directory) / "reliability.png", title=f"{Path(data).name} (n={len(diffs)})")
    return calibration, existing is not None


def _ensemble_report(member_rewards: list[list[float]], correct, temperature: float):
    """An ensemble's members on these pairs (each one's accuracy, how much they disagree) and its selective
    accuracy when the pairs its members doubt most (std / |mean| of their verdicts) are set aside; and that
    per-pair relative disagreement."""
    import numpy as np

    from toolkit.reward.ensemble import pair_disagreement, relative_disagreement
    from toolkit.reward.metrics import pair_correct, raw_probabilities, selective_accuracy

    chosen, rejected = np.asarray(member_rewards[0::2]), np.asarray(member_rewards[1::2])
    relative = relative_disagreement(chosen, rejected)
    diffs = chosen - rejected
    member_accuracy = [float(pair_correct(raw_probabilities(diffs[:, m])).mean()) for m in range(diffs.shape[1])]
    return {"members": diffs.shape[1], "member_accuracies": member_accuracy,
            "mean_disagreement": float((pair_disagreement(chosen, rejected) / temperature).mean()),
            "selective": {"by": "relative disagreement (std / |mean| of the members' r_c − r_r)",
                          "accuracy_at_coverage": {f"{c:.1f}": selective_accuracy(correct, relative, c)
                                                   for c in (0.5, 0.8, 1.0)}}}, relative
