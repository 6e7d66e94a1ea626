"""The PPO, GRPO and RLOO objectives for causal LMs, on [batch, response_tokens] tensors, in the order the
loop uses them.

    rewards    r_t = −β · k1_t on every real token;  r_T += score − missing_eos_penalty · [no EOS]
    GAE        δ_t = r_t + γ V_{t+1} − V_t,  A_t = δ_t + γ λ A_{t+1},  returns_t = A_t + V_t   (PPO)
    whitening  (x − mean) / std over the real tokens                                          (PPO)
    groups     K answers per prompt, one advantage per answer on all its tokens        (GRPO, RLOO)
               R_i = score_i − β · Σ_t k1_t with the KL in the reward, score_i with it in the loss
               grpo: A_i = (R_i − mean_group R) / (std_group R + 1e-4), std with Bessel's correction
               rloo: A_i = R_i − mean of the other K − 1 answers' R
    policy     L_pg = mean max(−A · ratio, −A · clip(ratio, 1 − ε, 1 + ε)),  ratio = π / π_old
    value      L_vf = ½ mean max((V − returns)², (clip(V, V_old ± ε_v) − returns)²)            (PPO)
    loss       PPO: L_pg + vf_coef · L_vf − ent_coef · H;  GRPO / RLOO: L_pg + β · mean k3 − ent_coef · H
               (the k3 term only with the KL in the loss)
    KL         k1 = log π − log π_ref (the penalty, TRL's);  k3 = (ρ − 1) − log ρ,  ρ = π_ref / π
    β          fixed, or adapted towards a KL target (Ziegler et al. 2019)

The group formulas are TRL's: GRPOTrainer (`rewards.view(-1, K).std(dim=1)`, + 1e-4) and RLOOTrainer
(sequence reward minus β times the summed k1, then the leave-one-out baseline).

`mask` is 1 on real response tokens (up to and including EOS) and 0 on the padding after them; every
mean is over real tokens only. Functions that take several same-shaped tensors take them by keyword.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    mask = mask.to(values.dtype)
    if dim is None:
        return (values * mask).sum() / mask.sum().clamp(min=1)
    return (values * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    mean = masked_mean(values, mask)
    centered = (values - mean) ** 2
    variance = masked_mean(centered, mask)
    if unbiased:
        n = mask.sum()
        if n > 1:
            variance = variance * n / (n - 1)
    return variance


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(x - mean) / std over the real tokens; padding comes back as 0. shift_mean=False keeps the mean."""
    mean, var = masked_mean(values, mask), masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask.to(values.dtype)


def kl_k1(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token k1 estimate of KL(π‖π_ref) on sampled tokens: log π(a|s) − log π_ref(a|s)."""
    return logprobs - ref_logprobs


def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of the same KL: (ρ − 1) − log ρ with ρ = π_ref/π; never negative, lower
    variance than k1 (Schulman, "Approximating KL divergence")."""
    log_ratio = ref_logprobs - logprobs
    return torch.expm1(log_ratio) - log_ratio


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Column of each row's last real token (masks are right-padded, at least one real token)."""
    return mask.sum(1).long() - 1


def per_token_rewards(*, scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
                      mask: torch.Tensor, contain_eos: torch.Tensor, kl_coef: float,
                      missing_eos_penalty: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return (rewards [B, R], k1 KL [B, R], scores after the no-EOS penalty [B])."""
    kl = token_kl(logprobs, ref_logprobs, mask)
    scores = penalise_missing_eos(scores, contain_eos, missing_eos_penalty)
    rewards = -kl_coef * kl
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    rewards[rows, last_token_index(mask)] += scores
    return rewards, kl, scores


def token_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """k1 KL(π‖π_ref) on each answer token, 0 on padding ([B, R])."""
    return kl_k1(logprobs, ref_logprobs) * mask.to(logprobs.dtype)


def penalise_missing_eos(scores: torch.Tensor, contain_eos: torch.Tensor, penalty: float) -> torch.Tensor:
    """The scores minus `penalty` for each answer cut off before EOS."""
    return scores - penalty * (~contain_eos).to(scores.dtype)


def gae(*, rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016) over response tokens: (advantages, returns).

    Values and rewards past the last real token are zeroed first, so the bootstrap after the last
    token is 0 (the episode ends there) and padding gets advantage 0.
    """
    mask = mask.to(values.dtype)
    rewards, values = rewards * mask, values * mask
    T = rewards.shape[1]
    lastgaelam = torch.zeros_like(rewards[:, 0])
    advantages_reversed = []
    for t in reversed(range(T)):
        nextvalues = values[:, t + 1] if t < T - 1 else torch.zeros_like(values[:, 0])
        delta = rewards[:, t] + gamma * nextvalues - values[:, t]
        lastgaelam = delta + gamma * lam * lastgaelam
        advantages_reversed.append(lastgaelam)
    advantages = torch.stack(advantages_reversed[::-1], dim=1) * mask
    returns = (advantages + values) * mask
    return advantages, returns


def group_advantages(*, scores: torch.Tensor, group_size: int, method: str) -> torch.Tensor:
    """One advantage per answer [N] from its group's rewards; groups are consecutive rows of `scores` [N].

    method "grpo": (r − group mean) / (group std + 1e-4); "rloo": r − mean of the group's other answers."""
    grouped = scores.view(-1, group_size)
    if method == "grpo":
        mean, std = grouped.mean(1, keepdim=True), grouped.std(1, keepdim=True)
        return ((grouped - mean) / (std + 1e-4)).flatten()
    if method == "rloo":
        baseline = (grouped.sum(1, keepdim=True) - grouped) / (group_size - 1)
        return (grouped - baseline).flatten()
    raise ValueError(f"unknown group advantage method {method!r}")


def policy_loss(*, new_logprobs: torch.Tensor, logprobs: torch.Tensor, advantages: torch.Tensor,
                mask: torch.Tensor, cliprange: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The clipped ratio loss L_pg and its statistics (approxkl, clipfrac, pg_loss, ratio, ratio_dev)."""
    logprobs_diff = new_logprobs - logprobs
    ratio = torch.exp(logprobs_diff)
    pg_losses = -advantages * ratio
    pg_losses2 = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    pg_loss = masked_mean(torch.max(pg_losses, pg_losses2), mask)
    with torch.no_grad():
        maskb = mask.bool()
        stats = {
            "approxkl": 0.5 * masked_mean(logprobs_diff ** 2, mask),
            "clipfrac": masked_mean((pg_losses2 > pg_losses).float(), mask),
            "pg_loss": pg_loss.detach(),
            "ratio": masked_mean(ratio, mask),
            "ratio_dev": (ratio - 1).abs()[maskb].max() if maskb.any() else torch.zeros(()),
        }
    return pg_loss, stats


def ppo_loss(*, new_logprobs: torch.Tensor, entropy: torch.Tensor, new_values: torch.Tensor, mask: torch.Tensor,
             logprobs: torch.Tensor, values: torch.Tensor, advantages: torch.Tensor, returns: torch.Tensor,
             cliprange: float, cliprange_value: float, vf_coef: float,
             ent_coef: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """L_pg + vf_coef · L_vf − ent_coef · H on one micro-batch, and its statistics.

    `new_logprobs` / `entropy` / `new_values` come from the policy being updated (`entropy` differentiable when
    ent_coef is on); `logprobs` / `values` from the rollout."""
    pg_loss, stats = policy_loss(new_logprobs=new_logprobs, logprobs=logprobs, advantages=advantages, mask=mask,
                                 cliprange=cliprange)

    vpredclipped = values + torch.clamp(new_values - values, -cliprange_value, cliprange_value)
    vf_losses1 = (new_values - returns) ** 2
    vf_losses2 = (vpredclipped - returns) ** 2
    vf_loss = 0.5 * masked_mean(torch.max(vf_losses1, vf_losses2), mask)

    mean_entropy = masked_mean(entropy, mask)
    loss = pg_loss + vf_coef * vf_loss - ent_coef * mean_entropy
    with torch.no_grad():
        stats.update({"vf_loss": vf_loss.detach(), "vf_clipfrac": masked_mean((vf_losses2 > vf_losses1).float(), mask),
                      "entropy": mean_entropy.detach()})
    return loss, stats


def group_loss(*, new_logprobs: torch.Tensor, entropy: torch.Tensor, mask: torch.Tensor, logprobs: torch.Tensor,
               ref_logprobs: torch.Tensor, advantages: torch.Tensor, cliprange: float, kl_coef: float,
               ent_coef: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GRPO / RLOO: L_pg + kl_coef · mean k3(π_new, π_ref) − ent_coef · H on one micro-batch (kl_coef 0 when the
    KL is in the reward), and the same statistics as `ppo_loss` (the value ones 0)."""
    pg_loss, stats = policy_loss(new_logprobs=new_logprobs, logprobs=logprobs, advantages=advantages, mask=mask,
                                 cliprange=cliprange)
    loss = pg_loss
    if kl_coef:
        loss = loss + kl_coef * masked_mean(kl_k3(new_logprobs, ref_logprobs), mask)
    mean_entropy = masked_mean(entropy, mask)
    loss = loss - ent_coef * mean_entropy
    zero = torch.zeros((), device=pg_loss.device)
    stats.update({"vf_loss": zero, "vf_clipfrac": zero, "entropy": mean_entropy.detach()})
    return loss, stats


@dataclass
class FixedKLController:
    value: float

    def update(self, current_kl: float, n_steps: int) -> None:
        """β stays where it is."""

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


@dataclass
class AdaptiveKLController:
    """β ← β · (1 + clip(KL/target − 1, ±0.2) · n_steps / horizon)."""

    value: float
    target: float
    horizon: int

    def update(self, current_kl: float, n_steps: int) -> None:
        proportional_error = min(max(current_kl / self.target - 1, -0.2), 0.2)
        self.value *= 1 + proportional_error * n_steps / self.horizon

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


def make_kl_controller(kl_coef: float, adaptive: bool, target: float,
                       horizon: int) -> FixedKLController | AdaptiveKLController:
    if adaptive:
        return AdaptiveKLController(kl_coef, target, horizon)
    return FixedKLController(kl_coef)
