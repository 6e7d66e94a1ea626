"""The reward model as the PPO loop sees it: text in, one float per (prompt, response) out."""

from __future__ import annotations

import os
from pathlib import Path

from toolkit.errors import UserError


class RewardModel:
    """A calibrated reward model (train-reward's, or any sequence classifier with one label: toolkit/reward/store.py).
    It tokenizes text itself (its tokenizer may differ from the policy's)."""

    def __init__(self, path: str | os.PathLike, device: str = "cpu"):
        from toolkit.reward.model import TextEncoder
        from toolkit.reward.store import load_trained, read_calibration

        self.path = Path(path)
        self.device = device
        # Checked first, from config and JSON alone: a directory that is no reward model fails in a second, and
        # rewards from a mismatched calibration would be silently off.
        self.calibration = read_calibration(self.path)
        self.net, self.tokenizer, self.settings = load_trained(self.path, device)
        self.encoder = TextEncoder(self.tokenizer, self.settings.max_length, self.settings.append_eos)

    @property
    def ensemble_size(self) -> int:
        """Members of a reward ensemble (train-reward --ensemble K); 1 for a single model."""
        return max(1, len(self.settings.ensemble_offsets))

    @property
    def temperature(self) -> float:
        return self.calibration.temperature

    @property
    def reward_mean(self) -> float:
        return self.calibration.reward_mean

    @property
    def reward_std(self) -> float:
        return self.calibration.reward_std

    def texts(self, prompts: list[str], responses: list[str]) -> list[str]:
        from toolkit.rows import hh_join

        if len(prompts) != len(responses):
            raise UserError(f"{len(prompts)} prompts but {len(responses)} responses")
        return [hh_join(p, r) for p, r in zip(prompts, responses, strict=True)]

    def raw_scores(self, prompts: list[str], responses: list[str], batch_size: int = 16) -> list[float]:
        """r(prompt, response) as the head outputs it (uncentred, uncalibrated)."""
        from toolkit.reward.model import score_texts

        return score_texts(self.net, self.encoder, self.texts(prompts, responses), batch_size, self.device)

    def score(self, prompts: list[str], responses: list[str], batch_size: int = 16) -> list[float]:
        """(r − mean) / T: centred on the training data's rewards, in calibrated log-odds units, so that
        σ(score_a − score_b) is the calibrated probability that response a is preferred to response b."""
        return self.calibration.normalize(self.raw_scores(prompts, responses, batch_size)).tolist()

    def score_with_spread(self, prompts: list[str], responses: list[str],
                          batch_size: int = 16) -> tuple[list[float], list[float]]:
        """(score, spread) per response, both in calibrated units: `score` as above, `spread` the standard deviation
        of an ensemble's members around it (how far to trust the score; 0 for a single model)."""
        if self.ensemble_size == 1:
            return self.score(prompts, responses, batch_size), [0.0] * len(responses)
        from toolkit.reward.ensemble import mean_and_spread
        from toolkit.reward.model import score_texts

        per_member = score_texts(self.net, self.encoder, self.texts(prompts, responses), batch_size, self.device,
                                 members=True)
        mean, spread = mean_and_spread(per_member)
        return self.calibration.normalize(mean).tolist(), (spread / self.calibration.temperature).tolist()

    def preference_probabilities(self, prompts: list[str], chosen: list[str], rejected: list[str],
                                 batch_size: int = 16) -> list[float]:
        """Calibrated P(chosen ≻ rejected) per pair (temperature or isotonic, as fitted)."""
        r_c = self.raw_scores(prompts, chosen, batch_size)
        r_r = self.raw_scores(prompts, rejected, batch_size)
        return self.calibration.probabilities([c - r for c, r in zip(r_c, r_r, strict=True)]).tolist()


def load_reward_model(path: str, device: str = "cpu") -> RewardModel:
    """Load a directory written by `llamakit train-reward` (weights + calibration.json), or any
    `*ForSequenceClassification` directory with num_labels 1 (uncalibrated: rewards used raw, with a warning)."""
    return RewardModel(path, device)
