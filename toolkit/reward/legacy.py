"""Reward-model directories of format 1, scored as they were trained: the backbone saved as its bare base model
(config.json says BertModel, LlamaModel ...) and a Linear head in reward_head.safetensors, read at the raw hidden
state of the first real token (encoders, [CLS]) or of the last one (causal LMs). `train-reward` now writes format 2,
a standard sequence classifier (toolkit/reward/store.py)."""

from __future__ import annotations

import hashlib
import inspect
from pathlib import Path
from typing import Any

import torch
from torch import nn

from toolkit.errors import UserError
from toolkit.prefix_cache import position_ids_from_mask
from toolkit.reward.model import last_token_index, quiet_transformers

HEAD_FILE = "reward_head.safetensors"


class LegacyRewardNet(nn.Module):
    """r(x) = w · h_T(x) + b, T the first or last position whose attention mask is 1 (either padding side)."""

    def __init__(self, backbone: nn.Module, read_at: str):
        super().__init__()
        if read_at not in ("last", "first"):
            raise UserError(f"read_at must be 'last' or 'first', got {read_at!r}")
        self.backbone, self.read_at = backbone, read_at
        self.head = nn.Linear(backbone.config.hidden_size, 1)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask,
                            position_ids=position_ids_from_mask(attention_mask))
        hidden = out.last_hidden_state
        at = attention_mask.long().argmax(-1) if self.read_at == "first" else last_token_index(attention_mask)
        picked = hidden[torch.arange(hidden.shape[0], device=hidden.device), at]
        return self.head(picked.to(self.head.weight.dtype)).squeeze(-1).float()


def load(directory: Path, read_at: str) -> LegacyRewardNet:
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModel

    from toolkit.models import check_weights, load_errors, one_line

    use_safetensors = check_weights(directory)
    quiet_transformers()
    try:
        config = AutoConfig.from_pretrained(directory, trust_remote_code=False)
        kwargs: dict[str, Any] = {}
        model_class = AutoModel._model_mapping.get(type(config), None)  # noqa: SLF001 - to read its __init__ only
        if model_class is not None and "add_pooling_layer" in inspect.signature(model_class.__init__).parameters:
            kwargs["add_pooling_layer"] = False  # format 1 read the raw [CLS] state, never the pooler
        backbone = AutoModel.from_pretrained(directory, dtype=torch.float32, trust_remote_code=False,
                                             use_safetensors=use_safetensors, **kwargs)
        net = LegacyRewardNet(backbone, read_at)
        net.head.load_state_dict(load_file(str(directory / HEAD_FILE)))
    except (*load_errors(), RuntimeError) as err:  # RuntimeError: a head of the wrong shape
        raise UserError(f"cannot load the reward model in '{directory}': {one_line(err)}") from None
    return net


def fingerprint(directory: Path) -> str:
    """The weights a calibration was fitted on, as format 1 identified them: the head's bytes (tiny; it differs
    for every training run) and the sizes of the backbone weight files."""
    digest = hashlib.sha256((directory / HEAD_FILE).read_bytes())
    for weights in sorted(directory.glob("*.safetensors")):
        if weights.name != HEAD_FILE:
            digest.update(f"{weights.name}:{weights.stat().st_size}".encode())
    return digest.hexdigest()[:16]
