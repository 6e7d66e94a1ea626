"""The reward model: a transformers `*ForSequenceClassification` model with one label; r(x) is its logit.

The model's own head decides where the reward is read, so a directory llamakit writes gives the same rewards in
plain transformers (and TRL):
- an encoder (BERT, MiniLM): its classifier on the pooled first token, [CLS]; texts are right-padded, as encoder
  tokenizers pad them;
- a causal LM (LLaMA, Qwen ...): the `score` projection at the last token that is not `pad_token_id`.

llamakit appends EOS to a causal model's texts (the read-out token is then the same for every text), and
LLaMA-family tokenizers often pad with EOS: transformers would then read the token before it. So a new causal
reward model gets a pad token of its own (the tokenizer's unk, else an added `<|pad|>`), and left or right
padding give the same reward. Training's shared-prefix forward reads that same position from the attention mask.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from toolkit.errors import UserError
from toolkit.prefix_cache import shared_prefix_forward
from toolkit.training.model import add_lora, disable_dropout

PAD_TOKEN = "<|pad|>"
LABEL = "reward"  # id2label of the one output


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Column of each row's last real token, for left or right padding (the largest masked-in position)."""
    positions = torch.arange(attention_mask.shape[-1], device=attention_mask.device)
    return (positions * attention_mask.long()).argmax(-1)


def default_read_at(config) -> str:
    """Where a backbone's reward is read: a causal LM's last real token is the only one that has seen the
    whole text; a bidirectional encoder's first token ([CLS]) is what it was pre-trained to summarise with
    (on HH with MiniLM, reading its last token, [SEP], cost ~4 points of accuracy: 58.2% vs 61.6-62.1%)."""
    return "last" if is_causal(config) else "first"


class RewardNet(nn.Module):
    """A `*ForSequenceClassification` model (num_labels 1) as a reward: one float per text."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    @property
    def read_at(self) -> str:
        """Where the model's head reads ("last" or "first"), recorded in reward_config.json for the reader."""
        return default_read_at(self.model.config)

    @property
    def shares_prefix(self) -> bool:
        """Can a pair's shared dialogue run once? A causal LM whose head is a `score` projection of one token."""
        return is_causal(self.model.config) and isinstance(getattr(self.model, "score", None), nn.Linear)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                suffix_ids: torch.Tensor | None = None, suffix_mask: torch.Tensor | None = None) -> torch.Tensor:
        """One reward per row of right-padded `input_ids`: the model's own forward, so exactly what transformers
        gives. Or, given suffixes (shares_prefix only), `input_ids` are shared prefixes (left-padded) and each
        is continued by two suffixes (rows 2i and 2i + 1 of `suffix_ids`, right-padded): one reward per
        suffix. A keyword form of one `forward`, not a second method, so that DDP's forward hooks see both."""
        if suffix_ids is not None:
            return self._shared_prefix_forward(input_ids, attention_mask, suffix_ids, suffix_mask)
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits.squeeze(-1).float()

    def _shared_prefix_forward(self, prefix_ids: torch.Tensor, prefix_mask: torch.Tensor,
                               suffix_ids: torch.Tensor, suffix_mask: torch.Tensor) -> torch.Tensor:
        # The pair's prompt runs once, both answers on its cache (toolkit.prefix_cache). The head reads the last
        # real token, found from the mask: the one transformers finds as the last non-pad token.
        _, out = shared_prefix_forward(self.model.base_model, prefix_ids, prefix_mask, suffix_ids, suffix_mask, 2)
        hidden = out.last_hidden_state
        picked = hidden[torch.arange(hidden.shape[0], device=hidden.device), last_token_index(suffix_mask)]
        head = self.model.score
        return head(picked.to(head.weight.dtype)).squeeze(-1).float()


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


def quiet_transformers() -> None:
    from transformers.utils import logging

    logging.disable_progress_bar()
    logging.set_verbosity_error()


def load_sequence_classifier(path: Path, gradient_checkpointing: bool = False) -> nn.Module:
    """`AutoModelForSequenceClassification` with one label from `path` (safetensors only), float32: a backbone
    dir gets a fresh head, a reward-model dir its own."""
    from transformers import AutoModelForSequenceClassification

    from toolkit.models import check_weights, load_errors, one_line

    use_safetensors = check_weights(path)
    quiet_transformers()
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=1, dtype=torch.float32, trust_remote_code=False, use_safetensors=use_safetensors)
    except load_errors() as err:  # a truncated safetensors file, a model type with no classifier class
        raise UserError(f"cannot load a sequence classifier from '{path}': {one_line(err)}") from None
    if hasattr(model.config, "use_cache"):
        model.config.use_cache = False
    if gradient_checkpointing:
        model.gradient_checkpointing_enable()
    return model


def own_pad_token(model: nn.Module, tokenizer) -> None:
    """Give a causal reward model a pad token other than EOS (see the module docstring): the tokenizer's own
    if it is not EOS, else unk, else an added `<|pad|>` (the embedding grows by a row when it has no room)."""
    eos = tokenizer.eos_token_id
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id != eos:
        return
    if tokenizer.unk_token_id is not None and tokenizer.unk_token_id != eos:
        tokenizer.pad_token = tokenizer.unk_token
        return
    tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    if tokenizer.pad_token_id >= model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(tokenizer.pad_token_id + 1, mean_resizing=False)


def new_reward_model(backbone_name: str, *, lora: bool = False, lora_r: int = 16, lora_alpha: int | None = None,
                     gradient_checkpointing: bool = False) -> tuple[RewardNet, Any, Path]:
    """A fresh reward model on a backbone (alias or local dir), its tokenizer, and the resolved path."""
    from toolkit.models import check_weights, load_tokenizer, resolve

    path = resolve(backbone_name)
    check_weights(path)  # before the tokenizer: a pickled-only dir fails fast
    tokenizer = load_tokenizer(path)
    model = load_sequence_classifier(path, gradient_checkpointing)
    if is_causal(model.config):
        own_pad_token(model, tokenizer)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.id2label, model.config.label2id = {0: LABEL}, {LABEL: 0}
    disable_dropout(model)
    if lora:  # on the transformer only: the head is trained whole
        setattr(model, model.base_model_prefix, add_lora(model.base_model, lora_r, lora_alpha))  # α = 2r unless given
    return RewardNet(model), tokenizer, path


@torch.inference_mode()
def score_texts(model: nn.Module, encoder: TextEncoder, texts: list[str], batch_size: int = 16,
                device: str | torch.device = "cpu", progress=None, members: bool = False) -> list:
    """Raw rewards of `texts`, batched by length (little padding) and right-padded, in the input order; with
    `members`, an ensemble's (toolkit/reward/ensemble.py) list of member rewards per text instead."""
    if not texts:
        return []
    forward = model.member_rewards if members else model
    ids, _ = encoder.encode(texts)
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    rewards: list = [0.0] * len(ids)
    pad_id = encoder.tokenizer.pad_token_id
    was_training = model.training
    model.eval()
    task = progress.add_task("scoring", total=len(ids), status="") if progress is not None else None
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        input_ids, mask = pad([ids[i] for i in chunk], pad_id)
        values = forward(input_ids.to(device), mask.to(device)).tolist()
        for i, value in zip(chunk, values, strict=True):
            rewards[i] = value
        if task is not None:
            progress.advance(task, len(chunk))
    if task is not None:
        progress.remove_task(task)
    model.train(was_training)
    return rewards
