"""The reward model: any Hugging Face backbone + a linear head read at the last real token.

    r(x) = w · h_T(x) + b,   T = the last position whose attention mask is 1

T comes from the attention mask, never from `pad_token_id`: LLaMA tokenizers pad with EOS, and the
EOS we append is the token to read. Left and right padding give the same T (and the same position
ids), so a batch can be padded either way.

A trained reward model directory holds the backbone (`config.json`, `*.safetensors`, tokenizer), the
head (`reward_head.safetensors`), `reward_config.json` (how texts were encoded), and `calibration.json`.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from toolkit.errors import UserError

HEAD_FILE = "reward_head.safetensors"
SETTINGS_FILE = "reward_config.json"
FORMAT_VERSION = 1


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Column of each row's last real token, for left or right padding (the largest masked-in position)."""
    positions = torch.arange(attention_mask.shape[-1], device=attention_mask.device)
    return (positions * attention_mask.long()).argmax(-1)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """0, 1, 2 ... over real tokens only, so a left-padded row sees the same positions as a right-padded one."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


class RewardNet(nn.Module):
    def __init__(self, backbone: nn.Module, hidden_size: int):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(hidden_size, 1)
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask,
                            position_ids=position_ids_from_mask(attention_mask))
        hidden = out.last_hidden_state
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        last = hidden[rows, last_token_index(attention_mask)]
        return self.head(last.to(self.head.weight.dtype)).squeeze(-1).float()


@dataclass
class RewardSettings:
    """How texts become token ids; saved as reward_config.json so scoring matches training exactly."""

    backbone: str
    max_length: int = 256
    append_eos: bool = False
    text_format: str = "hh"  # data.join: "\n\nHuman: {prompt}\n\nAssistant: {response}"
    truncation: str = "left"  # keep the end of the dialogue, where the answer is
    objective: str = "bradley-terry"
    lora: bool = False
    format_version: int = FORMAT_VERSION
    extra: dict[str, Any] = field(default_factory=dict)


class TextEncoder:
    """Texts -> token ids with the backbone's special tokens, cut from the left to `max_length`."""

    def __init__(self, tokenizer, max_length: int, append_eos: bool):
        self.tokenizer, self.max_length, self.append_eos = tokenizer, max_length, append_eos
        special = set(tokenizer.all_special_ids)
        probe = tokenizer("a", add_special_tokens=True).input_ids
        body = tokenizer("a", add_special_tokens=False).input_ids
        self.n_lead = next((i for i, t in enumerate(probe) if t not in special), 0)
        self.n_tail = len(probe) - self.n_lead - len(body)
        if max_length < self.n_lead + self.n_tail + 1 + append_eos:
            raise UserError(f"--max-length {max_length} leaves no room for text")

    def encode(self, texts: list[str]) -> tuple[list[list[int]], int]:
        """Token ids of each text, and how many texts were cut to fit."""
        ids = self.tokenizer(texts, add_special_tokens=True).input_ids
        eos = [self.tokenizer.eos_token_id] if self.append_eos else []
        out, cut = [], 0
        for seq in ids:
            seq = seq + eos
            if len(seq) > self.max_length:
                lead, tail = seq[:self.n_lead], seq[len(seq) - self.n_tail - len(eos):]
                keep = self.max_length - len(lead) - len(tail)
                body = seq[self.n_lead:len(seq) - len(tail)]
                seq = lead + body[len(body) - keep:] + tail
                cut += 1
            out.append(seq)
        return out, cut


def wants_eos(tokenizer) -> bool:
    """Causal tokenizers end a text with an ordinary token: append EOS so the read-out token is the same
    for every text. Encoders already end with one ([SEP], </s>)."""
    probe = tokenizer("a", add_special_tokens=True).input_ids
    return bool(probe) and probe[-1] not in set(tokenizer.all_special_ids) and tokenizer.eos_token_id is not None


def pad(seqs: list[list[int]], pad_id: int, side: str = "right") -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if side == "right":
            ids[i, :len(s)] = torch.tensor(s)
            mask[i, :len(s)] = 1
        else:
            ids[i, width - len(s):] = torch.tensor(s)
            mask[i, width - len(s):] = 1
    return ids, mask


def _quiet() -> None:
    from transformers.utils import logging

    logging.disable_progress_bar()
    logging.set_verbosity_error()


def _load_backbone(path: Path, dtype: torch.dtype, gradient_checkpointing: bool = False) -> nn.Module:
    from transformers import AutoConfig, AutoModel

    from toolkit.models import check_weights, load_errors, one_line

    use_safetensors = check_weights(path)
    _quiet()
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=False)
        kwargs: dict[str, Any] = {}
        model_class = AutoModel._model_mapping.get(type(config), None)  # noqa: SLF001 - to read its __init__ only
        if model_class is not None and "add_pooling_layer" in inspect.signature(model_class.__init__).parameters:
            # The pooler reads [CLS]; unused here, and an unused parameter breaks DDP.
            kwargs["add_pooling_layer"] = False
        backbone = AutoModel.from_pretrained(path, dtype=dtype, trust_remote_code=False,
                                             use_safetensors=use_safetensors,
                                             **kwargs)
    except load_errors() as err:  # a truncated safetensors file too
        raise UserError(f"cannot load a backbone from '{path}': {one_line(err)}") from None
    if hasattr(backbone.config, "use_cache"):
        backbone.config.use_cache = False
    if gradient_checkpointing:
        backbone.gradient_checkpointing_enable()
    return backbone


def disable_dropout(model: nn.Module) -> None:
    """Dropout off: a reward must not depend on the forward it came from (TRL and OpenRLHF do the same)."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0


def new_reward_model(backbone_name: str, *, lora: bool = False, lora_r: int = 16,
                     gradient_checkpointing: bool = False) -> tuple[RewardNet, Any, Path]:
    """A fresh reward model on a backbone (alias or local dir), its tokenizer, and the resolved path."""
    from toolkit.models import check_weights, load_tokenizer, resolve

    path = resolve(backbone_name)
    check_weights(path)  # before the tokenizer: a pickled-only dir fails fast
    tokenizer = load_tokenizer(path)
    backbone = _load_backbone(path, torch.float32, gradient_checkpointing)
    disable_dropout(backbone)
    if lora:
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=lora_r, lora_alpha=2 * lora_r, lora_dropout=0.0, target_modules="all-linear")
        backbone = get_peft_model(backbone, config)
    hidden = backbone.config.hidden_size
    return RewardNet(backbone, hidden), tokenizer, path


def save_reward_model(model: RewardNet, tokenizer, settings: RewardSettings, out: Path) -> None:
    """Write weights (LoRA merged in), tokenizer and reward_config.json into `out`."""
    from safetensors.torch import save_file

    backbone = model.backbone
    if hasattr(backbone, "merge_and_unload"):
        backbone = backbone.merge_and_unload()
    backbone.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    save_file({k: v.detach().float().contiguous().cpu() for k, v in model.head.state_dict().items()},
              str(out / HEAD_FILE))
    (out / SETTINGS_FILE).write_text(json.dumps(asdict(settings), indent=2) + "\n", encoding="utf-8")


def fingerprint(directory: str | os.PathLike) -> str:
    """Identifies the weights a calibration was fitted on: the head's bytes (tiny; it differs for every
    training run) and the sizes of the backbone weight files."""
    directory = Path(directory)
    digest = hashlib.sha256((directory / HEAD_FILE).read_bytes())
    for weights in sorted(directory.glob("*.safetensors")):
        if weights.name != HEAD_FILE:
            digest.update(f"{weights.name}:{weights.stat().st_size}".encode())
    return digest.hexdigest()[:16]


def load_trained(directory: str | os.PathLike, device: str = "cpu") -> tuple[RewardNet, Any, RewardSettings]:
    """A reward model written by `train-reward`, in eval mode."""
    from safetensors.torch import load_file

    from toolkit.models import load_tokenizer

    directory = Path(directory)
    if not directory.is_dir():
        raise UserError("no such reward-model directory", file=str(directory))
    settings_file = directory / SETTINGS_FILE
    if not settings_file.is_file() or not (directory / HEAD_FILE).is_file():
        raise UserError(f"not a reward model made by `llamakit train-reward` (no {SETTINGS_FILE} / {HEAD_FILE})",
                        file=str(directory))
    try:
        raw = json.loads(settings_file.read_text(encoding="utf-8"))
        settings = RewardSettings(**raw)
    except (ValueError, TypeError) as err:
        raise UserError(f"unreadable reward settings: {err}", file=str(settings_file)) from None
    if settings.format_version > FORMAT_VERSION:
        raise UserError(f"written by a newer llamakit (format {settings.format_version})", file=str(settings_file))
    tokenizer = load_tokenizer(directory)
    backbone = _load_backbone(directory, torch.float32)
    model = RewardNet(backbone, backbone.config.hidden_size)
    model.head.load_state_dict(load_file(str(directory / HEAD_FILE)))
    return model.to(device).eval(), tokenizer, settings


@torch.inference_mode()
def score_texts(model: RewardNet, encoder: TextEncoder, texts: list[str], batch_size: int = 16,
                device: str | torch.device = "cpu", progress=None) -> list[float]:
    """Raw rewards of `texts`, batched by length (little padding), in the input order."""
    if not texts:
        return []
    ids, _ = encoder.encode(texts)
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    rewards = [0.0] * len(ids)
    pad_id = encoder.tokenizer.pad_token_id
    was_training = model.training
    model.eval()
    task = progress.add_task("scoring", total=len(ids), status="") if progress is not None else None
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        input_ids, mask = pad([ids[i] for i in chunk], pad_id)
        values = model(input_ids.to(device), mask.to(device)).tolist()
        for i, value in zip(chunk, values, strict=True):
            rewards[i] = value
        if task is not None:
            progress.advance(task, len(chunk))
    if task is not None:
        progress.remove_task(task)
    model.train(was_training)
    return rewards
