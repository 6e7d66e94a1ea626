"""PEFT adapters made the way TRL's SFTTrainer with a `peft_config` leaves them (plain peft: LoraConfig,
get_peft_model, save_pretrained), and base + adapter logits computed by plain peft, unmerged, to check against."""

from __future__ import annotations

import os
from pathlib import Path


def save_tiny_adapter(base: str | os.PathLike, out: str | os.PathLike, seed: int = 0, r: int = 4) -> Path:
    """A LoRA adapter on q_proj/v_proj of the model in `base`, with random A and B (a fresh adapter's B is zero,
    which would leave the model unchanged and prove nothing), saved as adapter_config.json +
    adapter_model.safetensors; no tokenizer, as peft writes it."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    torch.manual_seed(seed)
    config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
                        init_lora_weights=False, task_type="CAUSAL_LM")
    get_peft_model(model, config).save_pretrained(out)
    return Path(out)


def peft_logits(base: str | os.PathLike, adapter: str | os.PathLike, input_ids: list[int]):
    """Last-layer logits [tokens, vocabulary] of base + adapter as plain peft computes them (adapter not merged)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter)
    with torch.no_grad():
        return model.eval()(torch.tensor([input_ids])).logits[0]


def logits_of(model, input_ids: list[int]):
    import torch

    with torch.no_grad():
        return model.eval()(torch.tensor([input_ids])).logits[0]
