"""Tiny random LLaMA models with the real SmolLM2 tokenizer: the same code paths as the real thing, in
milliseconds (tests, and the benchmarks' --tiny runs)."""

from __future__ import annotations

import os
from pathlib import Path

from toolkit.models import load_tokenizer


def tiny_llama_config(vocab_size: int, hidden: int = 64, layers: int = 2, heads: int = 4,
                      max_positions: int = 512, **overrides):
    """A few-100k-parameter LLaMA config."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=hidden * 2,
                       num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                       max_position_embeddings=max_positions, tie_word_embeddings=True, **overrides)


def save_tiny_llama(out: str | os.PathLike, tokenizer_from: str = "smollm2-135m", seed: int = 0,
                    **config) -> Path:
    """Write a random tiny LLaMA with a real tokenizer to `out` (a normal HF directory)."""
    import torch
    from transformers import LlamaForCausalLM
    from transformers.utils import logging

    logging.disable_progress_bar()
    logging.set_verbosity_error()
    tokenizer = load_tokenizer(tokenizer_from)
    torch.manual_seed(seed)
    cfg = tiny_llama_config(len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                            **config)
    model = LlamaForCausalLM(cfg)
    out = Path(out)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out
