"""Scores from a reward model or rule scorers: one float per response (rlhf/objective.py turns them into
per-token rewards)."""

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


def make_reward_fn(spec: str, prompts: Sequence[TokenizedPrompt] = (), file: str | None = None,
                   uncertainty_penalty: float = 0.0) -> RewardFn:
    """`rules:NAMES` -> rule scorers; a directory -> its reward model (train-reward's, or any
    `*ForSequenceClassification` with num_labels 1: toolkit/reward/store.py). With `uncertainty_penalty` λ, an
    ensemble reward model scores mean − λ·variance of its members, in calibrated units (Coste et al. 2023, UWO):
    the policy gains less where the members disagree, which is where a proxy reward is easiest to exploit.

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
    if uncertainty_penalty and model.ensemble_size < 2:
        raise UserError(f"--reward-uncertainty-penalty needs an ensemble reward model; {spec} is a single model "
                        "(train one with `llamakit train-reward --ensemble K`)")

    def score(prompts: Sequence[str], responses: Sequence[str], finish_reasons: Sequence[str]) -> list[float]:
        if not uncertainty_penalty:
            return list(model.score(list(prompts), list(responses)))
        means, spreads = model.score_with_spread(list(prompts), list(responses))
        return [m - uncertainty_penalty * s * s for m, s in zip(means, spreads, strict=True)]

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

