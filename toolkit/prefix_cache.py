"""A shared start computed once: rows that begin with the same tokens (a preference pair's prompt, a GRPO group's
prompt) run that prefix through the model once, and their own suffixes on copies of its KV cache.

A causal token sees only what precedes it, so the prefix's keys and values are the same under every suffix;
gradients flow through the cache. Used by `train-reward` (pairs), `dpo` (pairs) and `rlhf --algo grpo|rloo`
(groups of K answers); `toolkit.generation.generate` copies a prefilled cache the same way at sampling time.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from toolkit.training.model import causal_lm


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """0, 1, 2 ... over real tokens only, so a left-padded row sees the same positions as a right-padded one."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def cache_kwarg(model: nn.Module) -> str:
    """Name of the KV-cache argument: transformers >= 5.24 calls it `cache`, older ones `past_key_values`."""
    forward = type(causal_lm(model)).forward
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"


def shared_prefix_forward(model: nn.Module, prefix_ids: torch.Tensor, prefix_mask: torch.Tensor,
                          suffix_ids: torch.Tensor, suffix_mask: torch.Tensor, repeats: int,
                          prefix_model: nn.Module | None = None, prefix_kwargs: dict[str, Any] | None = None,
                          suffix_kwargs: dict[str, Any] | None = None) -> tuple[Any, Any]:
    """(prefix output, suffix output): `prefix_model` (default `model`) on the left-padded prefixes, then `model`
    on the suffixes, `repeats` consecutive suffix rows per prefix row, each attending to its prefix through the
    copied cache, at the positions that follow its prefix's real tokens. Under DDP pass the unwrapped module as
    `prefix_model` and the wrapped one as `model`: DDP then sees one forward."""
    from transformers import DynamicCache

    prefix_model = model if prefix_model is None else prefix_model
    cache = DynamicCache()
    on_cache = {cache_kwarg(prefix_model): cache}  # the wrapped `model` takes the same argument
    prefix = prefix_model(input_ids=prefix_ids, attention_mask=prefix_mask, use_cache=True,
                          position_ids=position_ids_from_mask(prefix_mask), **on_cache, **(prefix_kwargs or {}))
    cache.batch_repeat_interleave(repeats)
    full_mask = torch.cat([prefix_mask.repeat_interleave(repeats, dim=0), suffix_mask], dim=1)
    suffix = model(input_ids=suffix_ids, attention_mask=full_mask, use_cache=True,
                   position_ids=position_ids_from_mask(full_mask)[:, prefix_mask.shape[1]:],
                   **on_cache, **(suffix_kwargs or {}))
    return prefix, suffix
