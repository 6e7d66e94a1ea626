"""Calibration: make P(chosen ≻ rejected) mean what it says, on pairs the model never trained on.

    temperature   p = σ((r_c − r_r) / T),  T = argmin_T  mean −log σ(d_i / T) + (log T)² / (2 s² n)
                  (a MAP fit: log T ~ N(0, s²) a priori, s = --temperature-prior-sd; inf gives plain ML)
    isotonic      p = a monotone step function of d, fitted symmetrically so that p(−d) = 1 − p(d)

calibration.json beside the weights also keeps the mean and std of raw rewards on training data, so the
PPO loop gets centred rewards in calibrated units: score = (r − mean) / T, and σ(score_a − score_b) is the
calibrated probability that answer a beats answer b.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from toolkit.errors import UserError
from toolkit.reward.constants import METHODS, TEMPERATURE_PRIOR_SD
from toolkit.reward.metrics import pair_metrics, raw_probabilities, sigmoid

CALIBRATION_FILE = "calibration.json"
# Isotonic steps reach 0 and 1 on small held-out sets; a bounded p keeps NLL finite.
ISOTONIC_CLIP = 1e-3


def nll_at_temperature(diffs: np.ndarray, temperature: float) -> float:
    """mean −log σ(d / T) = mean softplus(−d / T)."""
    return float(np.mean(np.logaddexp(0.0, -np.asarray(diffs, dtype=np.float64) / temperature)))


def temperature_objective(diffs: np.ndarray, log_t: float, prior_sd: float = math.inf) -> float:
    """Mean NLL of σ(d / T) plus the prior's share per pair, −log N(log T; 0, s²) / n (constants dropped)."""
    return nll_at_temperature(diffs, math.exp(log_t)) + log_t * log_t / (2 * prior_sd * prior_sd * len(diffs))


def fit_temperature(diffs: list[float] | np.ndarray, prior_sd: float = math.inf) -> float:
    """T minimizing temperature_objective over log T ∈ [−9, 9] (prior_sd = inf: plain maximum likelihood).
    A grid in steps of 0.05 brackets the minimum (the prior can make the objective bend twice), then a
    golden-section search refines it (plain numpy: importing scipy.optimize would cost more than the fit)."""
    d = np.asarray(diffs, dtype=np.float64)
    if len(d) == 0 or not np.any(d):
        return 1.0
    grid = np.linspace(-9.0, 9.0, 361)
    best = grid[int(np.argmin([temperature_objective(d, g, prior_sd) for g in grid]))]
    lo, hi = best - 0.05, best + 0.05
    ratio = (math.sqrt(5) - 1) / 2
    a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    fa, fb = temperature_objective(d, a, prior_sd), temperature_objective(d, b, prior_sd)
    while hi - lo > 1e-10:
        if fa <= fb:
            hi, b, fb = b, a, fa
            a = hi - ratio * (hi - lo)
            fa = temperature_objective(d, a, prior_sd)
        else:
            lo, a, fa = a, b, fb
            b = lo + ratio * (hi - lo)
            fb = temperature_objective(d, b, prior_sd)
    return float(math.exp((lo + hi) / 2))


def fit_isotonic(diffs: list[float] | np.ndarray) -> tuple[list[float], list[float]]:
    """Knots (x, y) of a monotone map d -> p, fitted on (d, 1) and (−d, 0) and made symmetric."""
    from sklearn.isotonic import IsotonicRegression

    d = np.asarray(diffs, dtype=np.float64)
    iso = IsotonicRegression(increasing=True, out_of_bounds="clip", y_min=0.0, y_max=1.0)
    iso.fit(np.concatenate([d, -d]), np.concatenate([np.ones_like(d), np.zeros_like(d)]))
    x = np.unique(np.concatenate([iso.X_thresholds_, -iso.X_thresholds_]))
    y = 0.5 * (iso.predict(x) + 1.0 - iso.predict(-x))
    return x.tolist(), np.clip(y, ISOTONIC_CLIP, 1 - ISOTONIC_CLIP).tolist()


@dataclass
class Calibration:
    method: str
    temperature: float
    reward_mean: float
    reward_std: float
    n_pairs: int
    data: str
    fingerprint: str
    metrics: dict[str, Any] = field(default_factory=dict)
    isotonic: dict[str, list[float]] | None = None
    prior_sd: float | None = None  # of log T; None in files written before the prior existed (plain ML)
    temperature_ml: float | None = None  # the plain maximum-likelihood T on the same pairs, to compare

    def probabilities(self, diffs: list[float] | np.ndarray) -> np.ndarray:
        """Calibrated P(chosen ≻ rejected) for reward differences r_c − r_r."""
        d = np.asarray(diffs, dtype=np.float64)
        if self.method == "isotonic" and self.isotonic:
            return np.interp(d, self.isotonic["x"], self.isotonic["y"])
        return sigmoid(d / self.temperature)

    def normalize(self, rewards: list[float] | np.ndarray) -> np.ndarray:
        return (np.asarray(rewards, dtype=np.float64) - self.reward_mean) / self.temperature


def fit(diffs: list[float], method: str, *, reward_mean: float, reward_std: float, data: str,
        fingerprint: str, prior_sd: float = TEMPERATURE_PRIOR_SD) -> Calibration:
    """Fit a calibration on held-out reward differences and measure before/after on the same pairs."""
    if method not in METHODS:
        raise UserError(f"unknown calibration method '{method}' (one of {', '.join(METHODS)})")
    if not prior_sd > 0:
        raise UserError("--temperature-prior-sd must be > 0 (inf: no prior, plain maximum likelihood)")
    d = np.asarray(diffs, dtype=np.float64)
    calibration = Calibration(method=method, temperature=fit_temperature(d, prior_sd), reward_mean=reward_mean,
                              reward_std=reward_std, n_pairs=len(d), data=data, fingerprint=fingerprint,
                              prior_sd=prior_sd, temperature_ml=fit_temperature(d))
    if method == "isotonic":
        x, y = fit_isotonic(d)
        calibration.isotonic = {"x": x, "y": y}
    calibration.metrics = {"raw": pair_metrics(raw_probabilities(d)),
                           "calibrated": pair_metrics(calibration.probabilities(d))}
    return calibration


def identity(fingerprint: str) -> Calibration:
    """No calibration: score = r and P(a ≻ b) = σ(r_a − r_b), for a reward model nobody has calibrated yet."""
    return Calibration(method="temperature", temperature=1.0, reward_mean=0.0, reward_std=1.0, n_pairs=0, data="",
                       fingerprint=fingerprint)


def write(calibration: Calibration, directory: str | os.PathLike) -> Path:
    from toolkit.io import write_json

    path = Path(directory) / CALIBRATION_FILE
    write_json(path, json_safe(asdict(calibration)))
    return path


def json_safe(value: Any) -> Any:
    """NaN is not JSON: an undefined metric (e.g. AUC on one pair) is written as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_safe(v) for v in value]
    return value


def read(directory: str | os.PathLike, expected_fingerprint: str | None = None) -> Calibration:
    """calibration.json of a reward dir; a missing, broken or foreign one is a one-line error."""
    path = Path(directory) / CALIBRATION_FILE
    hint = f"run `llamakit calibrate {directory} --data HELD_OUT_PAIRS.jsonl`"
    if not path.is_file():
        raise UserError(f"no {CALIBRATION_FILE}: this reward model is not calibrated; {hint}", file=str(directory))
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise UserError(f"unreadable: {err}; {hint}", file=str(path)) from None
    if not isinstance(raw, dict):
        raise UserError(f"expected a JSON object; {hint}", file=str(path))
    for key, kinds in (("method", str), ("temperature", (int, float)), ("reward_mean", (int, float)),
                       ("reward_std", (int, float)), ("fingerprint", str)):
        if not isinstance(raw.get(key), kinds) or isinstance(raw.get(key), bool):
            raise UserError(f"missing or not a {kinds if isinstance(kinds, type) else 'number'}; {hint}",
                            file=str(path), field=key)
    if raw["method"] not in METHODS:
        raise UserError(f"unknown method '{raw['method']}'; {hint}", file=str(path), field="method")
    if not raw["temperature"] > 0:
        raise UserError("must be > 0", file=str(path), field="temperature")
    if raw["method"] == "isotonic" and not (isinstance(raw.get("isotonic"), dict)
                                            and raw["isotonic"].get("x") and raw["isotonic"].get("y")):
        raise UserError(f"isotonic knots missing; {hint}", file=str(path), field="isotonic")
    if expected_fingerprint is not None and raw["fingerprint"] != expected_fingerprint:
        raise UserError(f"fitted on other weights (fingerprint {raw['fingerprint']}, these weights are "
                        f"{expected_fingerprint}); {hint}", file=str(path), field="fingerprint")
    return Calibration(method=raw["method"], temperature=float(raw["temperature"]),
                       reward_mean=float(raw["reward_mean"]), reward_std=float(raw["reward_std"]),
                       n_pairs=int(raw.get("n_pairs") or 0), data=str(raw.get("data") or ""),
                       fingerprint=raw["fingerprint"], metrics=raw.get("metrics") or {},
                       isotonic=raw.get("isotonic"), prior_sd=_number_or_none(raw.get("prior_sd")),
                       temperature_ml=_number_or_none(raw.get("temperature_ml")))


def _number_or_none(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None
