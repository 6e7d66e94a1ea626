"""Tiny random models with the real tokenizers (LLaMA with SmolLM2's, BERT with MiniLM's): the same code paths
as the real thing, in milliseconds (tests, and the benchmarks' --tiny runs)."""

from __future__ import annotations

import os
from pathlib import Path

from toolkit.models import load_tokenizer, resolve

# The digits the demo's judge rubric asks for ("from 0 to 5"); the judge reads them from its first token.
JUDGE_DIGITS = "012345"


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
    tokenizer = load_tokenizer(tokenizer_from)
    return _save(_random_llama(tokenizer, seed, **config), tokenizer, out)


def save_tiny_judge_llama(out: str | os.PathLike, boost: float = 1.2, tokenizer_from: str = "smollm2-135m",
                          seed: int = 0, **config) -> Path:
    """A tiny random LLaMA whose first token is likely a digit, so it can play the demo's teacher and judge.

    With a plain random model no digit is among the judge's top first tokens, every rating is "Unparsable",
    the preferences stage keeps no pair and every later stage of `llamakit demo` fails. Here dimension 0 of
    every token embedding is 1.0, `boost` for the digits, and no layer writes to it (row 0 of o_proj and
    down_proj is zero), so the final hidden state keeps dimension 0 whatever the prompt and, through the tied
    output embedding, lifts the digits' logits. The other dimensions stay random: answers still vary.
    """
    import torch

    tokenizer = load_tokenizer(tokenizer_from)
    model = _random_llama(tokenizer, seed, **config)
    digits = [tokenizer.convert_tokens_to_ids(d) for d in JUDGE_DIGITS]
    with torch.no_grad():
        embed = model.model.embed_tokens.weight
        embed[:, 0] = 1.0
        embed[digits, 0] = boost
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[0, :] = 0
            layer.mlp.down_proj.weight[0, :] = 0
    return _save(model, tokenizer, out)


def save_tiny_bert(out: str | os.PathLike, seed: int = 0) -> Path:
    """A tiny random BERT with MiniLM's real tokenizer: a reward backbone for `llamakit demo --reward-model` and
    `train-reward --model` at a fraction of the embedded 22M-parameter MiniLM's training and scoring time."""
    import torch
    from transformers import BertConfig, BertModel

    _quiet()
    tokenizer = load_tokenizer(resolve("minilm-l6"))
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, pad_token_id=tokenizer.pad_token_id)
    return _save(BertModel(config, add_pooling_layer=False), tokenizer, out)


def _random_llama(tokenizer, seed: int, **config):
    import torch
    from transformers import LlamaForCausalLM

    _quiet()
    torch.manual_seed(seed)
    cfg = tiny_llama_config(len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                            **config)
    return LlamaForCausalLM(cfg)


def _save(model, tokenizer, out: str | os.PathLike) -> Path:
    out = Path(out)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def _quiet() -> None:
    from transformers.utils import logging

    logging.disable_progress_bar()
    logging.set_verbosity_error()
