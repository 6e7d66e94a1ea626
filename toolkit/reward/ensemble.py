"""A reward-model ensemble: K members trained alike from different seeds; the reward is their mean, the spread
between them says how far to trust it (Lakshminarayanan et al. 2017; Coste et al. 2023 for RLHF).

Bradley–Terry rewards are defined up to a constant, and each member picks its own: member m's rewards are
shifted by `offsets[m]` (its mean on the training texts minus member 0's) before they are averaged, so the
ensemble's reward lives on member 0's scale and the spread measures disagreement, not arbitrary constants.

On disk (toolkit/reward/store.py): member 0 is the directory's own sequence classifier (plain transformers
loads it), members 1 … K−1 are complete reward-model directories under `members/1` …, and reward_config.json
lists the offsets.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

MEMBERS_DIR = "members"


class EnsembleNet(nn.Module):
    """Reward-model members (toolkit.reward.model.RewardNet) read as one: forward gives the mean of the shifted
    member rewards, `member_rewards` each of them."""

    def __init__(self, members: Sequence[nn.Module], offsets: Sequence[float]):
        super().__init__()
        if len(members) != len(offsets) or len(members) < 2:
            raise ValueError(f"an ensemble needs ≥ 2 members and one offset each ({len(members)}, {len(offsets)})")
        self.members = nn.ModuleList(members)
        self.register_buffer("offsets", torch.tensor(list(offsets), dtype=torch.float32), persistent=False)

    @property
    def read_at(self) -> str:
        return self.members[0].read_at

    def member_rewards(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(batch, K): each member's reward, shifted onto member 0's scale."""
        return torch.stack([m(input_ids, attention_mask) for m in self.members], dim=-1) - self.offsets

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.member_rewards(input_ids, attention_mask).mean(-1)


def offsets_from_means(means: Sequence[float]) -> list[float]:
    """Each member's shift onto member 0's scale, from their mean rewards on the same training texts."""
    return [float(m - means[0]) for m in means]


def mean_and_spread(member_rewards: np.ndarray | Sequence[Sequence[float]]) -> tuple[np.ndarray, np.ndarray]:
    """Per row of (n, K) shifted member rewards: the ensemble reward and the members' standard deviation
    (population form, as Coste et al.'s intra-ensemble variance)."""
    r = np.asarray(member_rewards, dtype=np.float64)
    return r.mean(axis=-1), r.std(axis=-1)


def pair_disagreement(chosen: np.ndarray, rejected: np.ndarray) -> np.ndarray:
    """Per pair, the standard deviation over members of r_c − r_r: how much the members disagree on the verdict
    (the offsets cancel in a difference)."""
    return (np.asarray(chosen, dtype=np.float64) - np.asarray(rejected, dtype=np.float64)).std(axis=-1)


def relative_disagreement(chosen: np.ndarray, rejected: np.ndarray) -> np.ndarray:
    """Per pair, the members' disagreement over the size of their mean verdict, std / |mean| of r_c − r_r: which
    pairs to set aside first. The plain std grows with the verdict's size (on HH, r = 0.61 between them), so
    ranking by it sets aside the pairs the ensemble is surest of; ranked by this ratio, the members' doubt."""
    diffs = np.asarray(chosen, dtype=np.float64) - np.asarray(rejected, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(diffs.mean(axis=-1) == 0, np.inf, diffs.std(axis=-1) / np.abs(diffs.mean(axis=-1)))
