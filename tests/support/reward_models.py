"""Sequence classifiers written by plain transformers, as TRL, OpenRLHF or the Hub hand a reward model over:
random tiny ones with real tokenizers (MiniLM's for BERT, SmolLM2's for LLaMA)."""

from __future__ import annotations

import os
from pathlib import Path

from support.tiny_models import tiny_llama_config
from toolkit.models import load_tokenizer, resolve


def save_foreign_reward_model(out: str | os.PathLike, kind: str = "llama", num_labels: int = 1,
                              seed: int = 3) -> Path:
    """`AutoModelForSequenceClassification.from_config(...)` + its tokenizer, saved with save_pretrained."""
    import torch
    from transformers import AutoModelForSequenceClassification, BertConfig

    tokenizer = load_tokenizer(resolve("minilm-l6") if kind == "bert" else "smollm2-135m")
    if kind == "bert":
        config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=64, pad_token_id=tokenizer.pad_token_id, num_labels=num_labels)
    else:
        config = tiny_llama_config(len(tokenizer), pad_token_id=tokenizer.pad_token_id, num_labels=num_labels)
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_config(config)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return Path(out)
