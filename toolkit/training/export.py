"""What a trainer leaves for users at the end of a run: the LoRA adapter alone (`--save-adapter`), and the model
with the adapter merged in, its manifest and its model card. Both go through `atomic_dir`: a directory is
complete or absent."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from toolkit.io import atomic_dir, write_json

CARD = "README.md"  # where the Hub and huggingface_hub.ModelCard.load look


def save_adapter(model: nn.Module, tokenizer: Any, target: Path, kind: str) -> Path:
    """The peft adapter of `model` alone (adapter_config.json + adapter_model.safetensors) and the tokenizer. Its
    base_model_name_or_path is the absolute directory `add_lora(..., base=...)` recorded, so peft's
    AutoPeftModelForCausalLM, PeftModel.from_pretrained and llamakit all find the base again from any directory."""
    with atomic_dir(target, kind, overwrite=True) as tmp:  # inside this run's own --out
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return target


def save_model(model: nn.Module, tokenizer: Any, target: Path, manifest: dict[str, Any], card: str) -> Path:
    """A plain Hugging Face directory (a LoRA adapter merged into the weights, so `serve` and transformers load
    it as any model) with the llamakit manifest (`manifest["kind"]`) and the model card."""
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    with atomic_dir(target, manifest["kind"], overwrite=True) as tmp:  # inside this run's own --out
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        write_json(tmp / "llamakit-manifest.json", manifest)
        (tmp / CARD).write_text(card, encoding="utf-8")
    return target
