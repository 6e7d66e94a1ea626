"""Token log-probs through the LM head applied apart from its model, a chunk of positions at a time; a frozen head
keeps no [tokens, vocabulary] logits for backward.

With LoRA the head (the output embeddings) does not train, so the gradient of log π(y) with respect to the hidden
state h that fed it is (W_y − E_π[W]) / T. `FrozenHeadLogprobs` forms it in forward with the [N, V] × [V, H]
product that backward would otherwise make from logits it kept: forward keeps one [N, H] tensor and no logits, and
backward is a product with it. With a 49k vocabulary the logits and their gradient were a step's largest tensors.
Used by `rlhf` (every answer's log-probs in the update), `dpo` (the answers' log-probs of a pair batch) and `sft`
(the assistant tokens' loss), the last two through `hidden_states_out` and `labelled_logprobs`: the model returns
its hidden states and only the labelled positions meet the head.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from toolkit.training.model import causal_lm

IGNORE = -100  # a label that scores nothing (prompt, padding)


def logprobs_of(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log π(token) under `logits` ([..., V] -> [...]): the token's logit minus its row's logsumexp (no
    log-softmax of the whole vocabulary is formed)."""
    return logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def plain_linear(head: nn.Module) -> bool:
    """Whether `head` is a bias-free nn.Linear whose weight is whole outside its own call (a ZeRO-3 partitioned
    weight, with a ds_id, is not), so that it may be applied to hidden states apart from its model's forward."""
    return type(head) is nn.Linear and head.bias is None and getattr(head.weight, "ds_id", None) is None


def frozen_plain_linear(head: nn.Module) -> bool:
    """Whether `FrozenHeadLogprobs` may stand in for `head`: a plain linear head whose weight does not train."""
    return plain_linear(head) and not head.weight.requires_grad


class FrozenHeadLogprobs(torch.autograd.Function):
    """log π(tokens) and entropy (no gradient) at hidden states [..., H] through a frozen, bias-free head W at
    temperature T; differentiable with respect to the hidden states only (see the module's docstring)."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, tokens: torch.Tensor,
                temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
        logits = nn.functional.linear(hidden, weight).float().div_(temperature)
        logprobs = logprobs_of(logits, tokens)  # the sampler-side formula, bit for bit (ratio = 1 at the start)
        logp = torch.log_softmax(logits, dim=-1)
        del logits
        probs = logp.exp()
        entropy = -(probs * logp).sum(-1)
        expected_row = probs.to(weight.dtype) @ weight
        ctx.save_for_backward((weight[tokens] - expected_row).float().div_(temperature))
        ctx.hidden_dtype = hidden.dtype
        ctx.mark_non_differentiable(entropy)
        return logprobs, entropy

    @staticmethod
    def backward(ctx, grad_logprobs: torch.Tensor, _grad_entropy: torch.Tensor | None):
        (direction,) = ctx.saved_tensors
        return (grad_logprobs.unsqueeze(-1) * direction).to(ctx.hidden_dtype), None, None, None


def head_logprobs(head: nn.Linear, hidden: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0,
                  chunk: int = 256) -> torch.Tensor:
    """log π(tokens) at N positions, hidden [N, H] and tokens [N], through a `plain_linear` head, `chunk`
    positions at a time, so that the softmax temporaries are [chunk, V] whatever N is. With autograd on, a frozen
    head's gradient comes from `FrozenHeadLogprobs` (no logits kept); a head that trains keeps each chunk's logits
    for backward. Every path forms the log-probs with the same operations on the same chunks, so a reference pass
    and a policy pass over the same positions agree bit for bit where their hidden states do."""

    def one_chunk(h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and h.requires_grad and not head.weight.requires_grad:
            return FrozenHeadLogprobs.apply(h, head.weight, t, temperature)[0]
        return logprobs_of(head(h).float().div_(temperature), t)

    pieces = [one_chunk(h, t) for h, t in zip(hidden.split(chunk), tokens.split(chunk), strict=True)]
    return torch.cat(pieces) if pieces else hidden.new_zeros(0, dtype=torch.float32)


@contextlib.contextmanager
def hidden_states_out(model: nn.Module) -> Iterator[nn.Linear | None]:
    """Within: if the causal LM's head is `plain_linear`, the model returns its last hidden states as `.logits`
    (the head set aside for an identity, so the call still goes through the model's own, DDP- or DeepSpeed-wrapped
    forward) and the head is yielded, to be applied apart; else None is yielded and nothing changes. `model`: the
    unwrapped model (peft or not)."""
    lm = causal_lm(model)
    head = lm.get_output_embeddings()
    if not plain_linear(head):
        yield None
        return
    lm.set_output_embeddings(nn.Identity())
    try:
        yield head
    finally:
        lm.set_output_embeddings(head)


def labelled_logprobs(outputs: torch.Tensor, labels: torch.Tensor, head: nn.Linear | None = None) -> torch.Tensor:
    """[B, T − 1] log-probs of labels[:, 1:], each predicted by the output one position before it, 0 where the
    label is IGNORE. `outputs`: [B, T, V] logits, or with `head` the [B, T, H] hidden states that feed it: then
    only the labelled positions meet the head (`head_logprobs`)."""
    targets = labels[:, 1:]
    if head is None:
        return -nn.functional.cross_entropy(outputs[:, :-1].flatten(0, 1).float(), targets.flatten(),
                                            ignore_index=IGNORE, reduction="none").view_as(targets)
    scored = targets != IGNORE
    return torch.zeros(targets.shape, device=outputs.device).masked_scatter(
        scored, head_logprobs(head, outputs[:, :-1][scored], targets[scored]))
