"""Off-policy guidance for grpo / rloo (`--guide revise`): in each group, the best answer edited by code to meet
more of its prompt's constraints (toolkit/revise.py) takes the place of the group's worst answer.

Why: a group's advantage is zero where its K answers score alike, and the formats the base almost never writes
(lowercase, an end phrase, quotes, JSON) give GRPO from the base no group with a difference to learn from
(docs/method-comparison.md: eight runs, +4 to +8 points). DPO on revised pairs learns them; here the revision
joins the group it came from, so RL sees the format met beside the policy's own tries, as LUFFY mixes
off-policy traces into GRPO groups (Yan et al. 2025, "Learning to Reason under Off-Policy Guidance").

The revised answer is scored by the run's own reward and kept only where it scores higher than the answer it was
made from. Its log π_old is the policy's log-prob of it at rollout time (the update's first ratio is 1, as for
every row), so the clipped loss moves it as far as any sampled answer. It is not the policy's sample: the KL,
entropy and score statistics of the step (and `--kl-budget`) read the sampled rows only.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from rlhf.rewards import RewardFn, score_rollout
from rlhf.rollout import Rollout, TokenizedPrompt
from toolkit.errors import UserError


def end_token(lm, tokenizer) -> int:
    """The token a revised answer ends with: the tokenizer's EOS where generation stops on it, else one it stops on."""
    from toolkit.generation import eos_token_ids

    eos = eos_token_ids(lm, tokenizer)
    if not eos:
        raise UserError("--guide revise: the policy has no EOS token to end a revised answer with")
    return tokenizer.eos_token_id if tokenizer.eos_token_id in eos else min(eos)


def revise_groups(prompts: Sequence[TokenizedPrompt], rollout: Rollout, scores: torch.Tensor, group_size: int,
                  reward_fn: RewardFn, tokenizer, eos_id: int, max_new_tokens: int
                  ) -> tuple[Rollout, torch.Tensor, torch.Tensor]:
    """(rollout, scores, guided [B] bool): per group of `group_size` consecutive rows, the best answer (a finished
    one among equals) revised to meet its row's `constraints`; where the reward scores the revision higher and it
    fits `max_new_tokens`, it replaces the lowest-scoring answer (the last among equals)."""
    from toolkit.generation import pad_token_id
    from toolkit.revise import improve

    replaced: dict[int, tuple[list[int], str]] = {}
    candidates: list[tuple[int, int, str, list[int]]] = []  # (worst row, best row, text, tokens)
    for start in range(0, len(prompts), group_size):
        rows = range(start, start + group_size)
        p = prompts[start]
        constraints = p.context.get("constraints")
        if not constraints:
            continue
        best = max(rows, key=lambda i: (float(scores[i]), rollout.finish_reasons[i] != "length"))
        edited = improve(rollout.responses_text[best], constraints, p.context.get("base_prompt") or p.text,
                         cut=rollout.finish_reasons[best] == "length")
        if edited is None:
            continue
        tokens = tokenizer(edited, add_special_tokens=False).input_ids + [eos_id]
        if len(tokens) > max_new_tokens:
            continue
        worst = min((i for i in reversed(rows) if i != best), key=lambda i: float(scores[i]))
        candidates.append((worst, best, edited, tokens))
    if not candidates:
        return rollout, scores, torch.zeros(len(prompts), dtype=torch.bool, device=scores.device)
    new_scores = score_rollout(reward_fn, [prompts[b].text for _, b, _, _ in candidates],
                               [text for _, _, text, _ in candidates], ["stop"] * len(candidates), scores.device,
                               [prompts[b].context for _, b, _, _ in candidates])
    scores = scores.clone()
    for (worst, best, text, tokens), score in zip(candidates, new_scores.tolist(), strict=True):
        if score > float(scores[best]):
            replaced[worst] = (tokens, text)
            scores[worst] = score
    guided = torch.zeros(len(prompts), dtype=torch.bool, device=scores.device)
    guided[list(replaced)] = True
    return replace_responses(rollout, replaced, pad_token_id(tokenizer)), scores, guided


def replace_responses(rollout: Rollout, new: dict[int, tuple[list[int], str]], pad_id: int) -> Rollout:
    """The rollout with row i's response replaced by `new[i]` = (tokens ending in EOS, text), a finished answer,
    laid out as `rollout.sample` lays every row (the response columns widened where a new one is longer). Its
    sampler log-probs are unknown: 0, as on padding."""
    if not new:
        return rollout
    width = max(rollout.responses.shape[1], max(len(tokens) for tokens, _ in new.values()))
    grow = width - rollout.responses.shape[1]
    responses = F.pad(rollout.responses, (0, grow), value=pad_id)
    response_mask = F.pad(rollout.response_mask, (0, grow), value=0)
    sample_logprobs = F.pad(rollout.sample_logprobs, (0, grow), value=0.0)
    contain_eos = rollout.contain_eos.clone()
    texts, finish_reasons = list(rollout.responses_text), list(rollout.finish_reasons)
    for i, (tokens, text) in new.items():
        responses[i] = pad_id
        responses[i, :len(tokens)] = torch.tensor(tokens, dtype=torch.long, device=responses.device)
        response_mask[i] = 0
        response_mask[i, :len(tokens)] = 1
        sample_logprobs[i] = 0.0
        contain_eos[i] = True
        texts[i], finish_reasons[i] = text, "stop"
    ctx = rollout.context_length
    return Rollout(query_responses=torch.cat([rollout.query_responses[:, :ctx], responses], 1),
                   attention_mask=torch.cat([rollout.attention_mask[:, :ctx], response_mask], 1),
                   context_length=ctx, responses=responses, response_mask=response_mask, contain_eos=contain_eos,
                   sample_logprobs=sample_logprobs, responses_text=texts, finish_reasons=finish_reasons)
