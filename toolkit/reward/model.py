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
from toolkit.training.model import add_lora, disable_dropout

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


def default_read_at(config) -> str:
    """Where a backbone's reward is read: a causal LM's last real token is the only one that has seen the
    whole text; a bidirectional encoder's first token ([CLS]) is what it was pre-trained to summarise with
    (on HH with MiniLM, reading its last token, [SEP], cost ~4 points of accuracy: 58.2% vs 61.6-62.1%)."""
    return "last" if is_causal(config) else "first"


class RewardNet(nn.Module):
    def __init__(self, backbone: nn.Module, hidden_size: int, read_at: str = "last"):
        super().__init__()
        if read_at not in ("last", "first"):
            raise ValueError(f"read_at must be 'last' or 'first', got {read_at!r}")
        self.backbone = backbone
        self.read_at = read_at
        self.head = nn.Linear(hidden_size, 1)
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                suffix_ids: torch.Tensor | None = None, suffix_mask: torch.Tensor | None = None) -> torch.Tensor:
        """One reward per row of `input_ids`; or, given suffixes (a causal backbone only), `input_ids` are
        shared prefixes (left-padded) and each is continued by two suffixes (rows 2i and 2i + 1 of
        `suffix_ids`, right-padded): one reward per suffix. A keyword form of one `forward`, not a second
        method, so that DDP's forward hooks see both."""
        if suffix_ids is not None:
            return self._shared_prefix_forward(input_ids, attention_mask, suffix_ids, suffix_mask)
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask,
                            position_ids=position_ids_from_mask(attention_mask))
        return self._read(out.last_hidden_state, attention_mask)

    def _read(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        if self.read_at == "first":  # an encoder's [CLS]: the first real token, whichever side is padded
            picked = hidden[rows, attention_mask.long().argmax(-1)]
        else:
            picked = hidden[rows, last_token_index(attention_mask)]
        return self.head(picked.to(self.head.weight.dtype)).squeeze(-1).float()

    def _shared_prefix_forward(self, prefix_ids: torch.Tensor, prefix_mask: torch.Tensor,
                               suffix_ids: torch.Tensor, suffix_mask: torch.Tensor) -> torch.Tensor:
        # A causal token sees only what precedes it, so the prefix's keys and values are the same under either
        # answer: compute them once and run both answers on that cache (gradients flow through it).
        out = self.backbone(input_ids=prefix_ids, attention_mask=prefix_mask,
                            position_ids=position_ids_from_mask(prefix_mask), use_cache=True)
        cache = out.past_key_values
        cache.batch_repeat_interleave(2)
        full_mask = torch.cat([prefix_mask.repeat_interleave(2, dim=0), suffix_mask], dim=1)
        positions = position_ids_from_mask(full_mask)[:, prefix_ids.shape[1]:]
        out = self.backbone(input_ids=suffix_ids, attention_mask=full_mask, position_ids=positions,
                            past_key_values=cache, use_cache=True)
        return self._read(out.last_hidden_state, suffix_mask)


def is_causal(config) -> bool:
    """A decoder-only LM (LLaMA, Qwen, SmolLM ...), where a shared prefix can be computed once. BERT-like
    encoders also have a causal-LM head class, so "has a masked-LM class" rules those out."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    kind = getattr(config, "model_type", "")
    return (kind in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and kind not in MODEL_FOR_MASKED_LM_MAPPING_NAMES
            and not getattr(config, "is_encoder_decoder", False))


def shared_prefix_batch(chosen: list[list[int]], rejected: list[list[int]], pad_id: int,
                        min_saving: float | None = 0.1
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """(prefix ids, prefix mask, suffix ids, suffix mask) for RewardNet's shared-prefix forward, from each
    pair's token ids: the prefix is the pair's common start (each answer keeps ≥ 1 token of its own), the
    suffixes are chosen_i, rejected_i interleaved. A pair that shares no token (e.g. its answers alone were
    longer than max_length) gets an all-padding prefix row, which attends to nothing. None when no pair
    shares a token, or when the prefix saves less than `min_saving` of the token positions: padding the
    prefixes and the suffixes each to their own longest eats the saving when lengths vary a lot (None: share
    anyway)."""
    cuts = [common_prefix_length(c, r) for c, r in zip(chosen, rejected, strict=True)]
    if max(cuts) < 1:
        return None
    prefix_ids, prefix_mask = pad([c[:k] for c, k in zip(chosen, cuts, strict=True)], pad_id, "left")
    suffixes = [s for c, r, k in zip(chosen, rejected, cuts, strict=True) for s in (c[k:], r[k:])]
    suffix_ids, suffix_mask = pad(suffixes, pad_id, "right")
    plain = 2 * len(chosen) * max(len(s) for s in chosen + rejected)
    if min_saving is not None and prefix_mask.numel() + suffix_mask.numel() > (1 - min_saving) * plain:
        return None
    return prefix_ids, prefix_mask, suffix_ids, suffix_mask


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
    read_at: str = "last"  # the token the reward is read at: "last" (causal LMs) or "first" (encoders, [CLS])
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
        out = [self._fit(seq) for seq in ids]
        return [seq for seq, _ in out], sum(cut for _, cut in out)

    def _fit(self, seq: list[int]) -> tuple[list[int], bool]:
        """seq (+ EOS) cut from the left to max_length, keeping the leading and trailing special tokens."""
        eos = [self.tokenizer.eos_token_id] if self.append_eos else []
        seq = seq + eos
        if len(seq) <= self.max_length:
            return seq, False
        lead, tail = seq[:self.n_lead], seq[len(seq) - self.n_tail - len(eos):]
        keep = self.max_length - len(lead) - len(tail)
        body = seq[self.n_lead:len(seq) - len(tail)]
        return lead + body[len(body) - keep:] + tail, True

    def encode_pairs(self, chosen: list[str], rejected: list[str]) -> tuple[list[list[int]], int]:
        """Token ids of chosen_0, rejected_0, chosen_1 ... cut so that each pair keeps a common start.

        For the shared-prefix forward: a long pair loses the SAME number of tokens from the start of its
        shared dialogue (as many as its longer text needs), where cutting each text on its own would start
        the two at different points of the dialogue and leave nothing to share. A pair whose answers alone
        are too long is cut text by text, as `encode` does."""
        eos = [self.tokenizer.eos_token_id] if self.append_eos else []
        ids_c = self.tokenizer(chosen, add_special_tokens=True).input_ids
        ids_r = self.tokenizer(rejected, add_special_tokens=True).input_ids
        out, cut = [], 0
        for c, r in zip(ids_c, ids_r, strict=True):
            full_c, full_r = c + eos, r + eos
            over = max(len(full_c), len(full_r)) - self.max_length
            if over <= 0:
                out += [full_c, full_r]
            elif common_prefix_length(full_c, full_r) - self.n_lead - 1 >= over:
                # Keep ≥ 1 shared token after the leading special ones; drop `over` tokens just after those.
                start = self.n_lead
                out += [full_c[:start] + full_c[start + over:], full_r[:start] + full_r[start + over:]]
                cut += (len(full_c) > self.max_length) + (len(full_r) > self.max_length)
            else:
                for seq in (c, r):
                    seq, was_cut = self._fit(seq)
                    out.append(seq)
                    cut += was_cut
        return out, cut


def common_prefix_length(a: list[int], b: list[int]) -> int:
    """Tokens at the start of a and b that are the same, leaving each at least one token of its own."""
    limit = min(len(a), len(b)) - 1
    k = 0
    while k < limit and a[k] == b[k]:
        k += 1
    return k


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


def new_reward_model(backbone_name: str, *, lora: bool = False, lora_r: int = 16, lora_alpha: int | None = None,
                     gradient_checkpointing: bool = False) -> tuple[RewardNet, Any, Path]:
    """A fresh reward model on a backbone (alias or local dir), its tokenizer, and the resolved path."""
    from toolkit.models import check_weights, load_tokenizer, resolve

    path = resolve(backbone_name)
    check_weights(path)  # before the tokenizer: a pickled-only dir fails fast
    tokenizer = load_tokenizer(path)
    backbone = _load_backbone(path, torch.float32, gradient_checkpointing)
    disable_dropout(backbone)
    if lora:
        backbone = add_lora(backbone, lora_r, lora_alpha)  # α = 2r unless given
    hidden = backbone.config.hidden_size
    return RewardNet(backbone, hidden, default_read_at(backbone.config)), tokenizer, path


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
    model = RewardNet(backbone, backbone.config.hidden_size, settings.read_at)
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
