"""What a trainer does to a loaded model before training: dropout off, LoRA adapters on."""

from __future__ import annotations

import torch
from torch import nn

from toolkit.errors import UserError

DROPOUT_CONFIG_KEYS = ("attention_dropout", "hidden_dropout", "dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop")


def base_dtype(*, bf16: bool, lora: bool) -> torch.dtype | None:
    """The dtype to load a policy in: under --bf16 a LoRA run's frozen base is bfloat16 (half the memory; peft
    keeps the adapters in fp32), as TRL and peft load it; fully trained weights stay fp32 master weights under
    bf16 autocast. None: the loader's default (fp32)."""
    return torch.bfloat16 if bf16 and lora else None


def causal_lm(lm: nn.Module) -> nn.Module:
    """The transformers *ForCausalLM inside a peft model (LoRA layers stay injected and active)."""
    return lm.get_base_model() if hasattr(lm, "get_base_model") else lm


def disable_dropout(model: nn.Module) -> None:
    """Dropout off everywhere: PPO's ratio must compare the same function before and after an update, and a
    reward must not depend on the forward it came from (TRL and OpenRLHF do the same). Covers nn.Dropout
    modules, attention that reads a float `attention_dropout` (LLaMA's), and the config a saved model keeps."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0
    config = getattr(model, "config", None)
    for name in DROPOUT_CONFIG_KEYS:
        if isinstance(getattr(config, name, None), float):
            setattr(config, name, 0.0)


def add_lora(model: nn.Module, r: int, alpha: int | None = None, target: str = "all-linear",
             task_type: str | None = None, base: str | None = None) -> nn.Module:
    """`model` wrapped by peft with LoRA adapters of rank `r` (α = 2r unless given) on `target`: all-linear
    or a comma list of module names. `task_type` "CAUSAL_LM" for a causal LM; None for a bare backbone.

    `base`, the model the run loaded (alias, directory or adapter directory), becomes the adapter's
    base_model_name_or_path as an absolute local directory: peft would record the path as typed (relative to
    the directory the run started in) or, for an adapter the run merged, the adapter's own base, so a
    checkpoint's adapter would load from nowhere else, or on the wrong weights."""
    from peft import LoraConfig, get_peft_model

    from toolkit.models import resolve

    targets: str | list[str] = "all-linear" if target == "all-linear" else [t.strip() for t in target.split(",")]
    config = LoraConfig(r=r, lora_alpha=2 * r if alpha is None else alpha, lora_dropout=0.0,
                        target_modules=targets, bias="none", task_type=task_type)
    try:
        model = get_peft_model(model, config)
    except ValueError as err:
        raise UserError(f"--lora-target {target}: {err}") from None
    if base is not None:
        model.peft_config["default"].base_model_name_or_path = str(resolve(base).resolve())
    return model


def make_trainable(model: nn.Module, *, lora: bool, lora_r: int, lora_alpha: int, lora_target: str,
                   gradient_checkpointing: bool, base: str) -> nn.Module:
    """A loaded causal LM ready for a supervised-style trainer (sft, dpo): dropout off, the LoRA adapter when
    asked (on `base`, the model loaded: see add_lora), gradient checkpointing when asked, train mode."""
    disable_dropout(model)
    if lora:
        model = add_lora(model, lora_r, lora_alpha, lora_target, task_type="CAUSAL_LM", base=base)
    if gradient_checkpointing:
        causal_lm(model).gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return model
