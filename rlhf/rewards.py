"""Scores from a reward model or rule scorers, and the per-token PPO reward built from them.

    r_t = −β · (log π(a_t|s_t) − log π_ref(a_t|s_t))            every real response token (k1 KL)
    r_T += score − missing_eos_penalty · [no EOS in the response]  the last real token T only
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from rlhf.rollout import TokenizedPrompt
from toolkit.errors import UserError

# (prompts, responses, finish_reasons) -> one float per response, higher is better. A function that also
# declares a `contexts` parameter gets each prompt's row too (rules:constraints reads its constraints).
RewardFn = Callable[..., Sequence[float]]


def make_reward_fn(spec: str, prompts: Sequence[TokenizedPrompt] = (), file: str | None = None) -> RewardFn:
    """`rules:NAMES` -> rule scorers; a directory -> the reward model trained by `train-reward`.

    Rules that read the prompt's row check every row of `prompts` now (read from `file`): a row they
    cannot score stops the run before the model loads."""
    if spec.startswith("rules"):
        from toolkit.scorers import parse_rules

        scorer = parse_rules(spec)
        for p in prompts:
            scorer.check_context(p.context, file=file, line=p.row)
        return scorer.score
    if not Path(spec).expanduser().is_dir():
        raise UserError(f"--reward '{spec}' is neither rules:NAMES nor a reward-model directory")
    try:
        from toolkit.reward import load_reward_model
    except ImportError as err:
        raise UserError(f"reward models cannot be loaded in this install ({err}); use --reward rules:...") from None
    model = load_reward_model(spec)

    def score(prompts: Sequence[str], responses: Sequence[str], finish_reasons: Sequence[str]) -> list[float]:
        return list(model.score(list(prompts), list(responses)))

    return score


def wants_contexts(reward_fn: RewardFn) -> bool:
    """Does the function take the prompts' rows (a `contexts` parameter or **kwargs)?"""
    try:
        params = inspect.signature(reward_fn).parameters.values()
    except (TypeError, ValueError):  # a builtin or C callable: plain three arguments
        return False
    return any(p.name == "contexts" or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def score_rollout(reward_fn: RewardFn, prompts: Sequence[str], responses: Sequence[str],
                  finish_reasons: Sequence[str], device: torch.device | str = "cpu",
                  contexts: Sequence[Mapping[str, Any]] | None = None) -> torch.Tensor:
    if contexts is not None and wants_contexts(reward_fn):
        raw = reward_fn(prompts, responses, finish_reasons, contexts=contexts)
    else:  # reward functions written before contexts existed take three arguments
        raw = reward_fn(prompts, responses, finish_reasons)
    scores = [float(s) for s in raw]
    if len(scores) != len(responses):
        raise UserError(f"the reward returned {len(scores)} scores for {len(responses)} responses")
    scores_t = torch.tensor(scores, dtype=torch.float32, device=device)
    bad = (~torch.isfinite(scores_t)).nonzero().flatten().tolist()
    if bad:
        raise UserError(f"the reward returned a non-finite score ({scores[bad[0]]}) for response {bad[0]}: "
                        f"{responses[bad[0]][:80]!r}")
    return scores_t


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Column of each row's last real token (masks are right-padded, at least one real token)."""
    return mask.sum(1).long() - 1


def per_token_rewards(scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
                      mask: torch.Tensor, contain_eos: torch.Tensor, kl_coef: float,
                      missing_eos_penalty: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return (rewards [B, R], kl [B, R], scores after the no-EOS penalty [B])."""
    from rlhf.kl import kl_k1

    maskf = mask.to(logprobs.dtype)
    kl = kl_k1(logprobs, ref_logprobs) * maskf
    scores = scores - missing_eos_penalty * (~contain_eos).to(scores.dtype)
    rewards = -kl_coef * kl
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    rewards[rows, last_token_index(mask)] += scores
    return rewards, kl, scores
