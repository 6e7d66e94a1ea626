"""A reward-model directory: what `train-reward` writes, and what eval-reward, calibrate and `rlhf --reward` load.

Format 2 (now) is a standard transformers directory: a `*ForSequenceClassification` with num_labels 1 (the head in
the model's own weights; `pad_token_id` and `id2label` in config.json) and its tokenizer, so
`AutoModelForSequenceClassification.from_pretrained(dir)` gives llamakit's raw rewards. llamakit's extras sit beside
it: reward_config.json (how texts are encoded), calibration.json, metrics, plots, the card.

Also loaded: format 1 (toolkit/reward/legacy.py), and any sequence classifier with one label that llamakit did not
train (TRL, OpenRLHF, the Hub): its settings are inferred from its config, and its rewards are used raw until
`llamakit calibrate` fits a calibration.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from toolkit.errors import UserError
from toolkit.reward import legacy
from toolkit.reward.calibrate import CALIBRATION_FILE, Calibration, identity
from toolkit.reward.calibrate import read as read_calibration_file
from toolkit.reward.ensemble import MEMBERS_DIR, EnsembleNet
from toolkit.reward.model import RewardNet, default_read_at, load_sequence_classifier, wants_eos

SETTINGS_FILE = "reward_config.json"
FORMAT_VERSION = 2  # 1: the bare backbone + reward_head.safetensors; 2: a sequence classifier
FOREIGN_MAX_LENGTH = 1024  # tokens per text for a model without reward_config.json (fewer if its context is)


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
    read_at: str = "last"  # where the head reads: "last" (causal LMs) or "first" (encoders, [CLS])
    format_version: int = FORMAT_VERSION
    ensemble_offsets: list[float] = field(default_factory=list)  # one per member of an ensemble (ensemble.py)
    extra: dict[str, Any] = field(default_factory=dict)


def reward_dir_kind(directory: str | os.PathLike) -> str:
    """"llamakit" (format 2), "legacy" (format 1) or "foreign" (a sequence classifier without reward_config.json),
    from config.json alone; anything else is a one-line error."""
    directory = Path(directory)
    if not directory.is_dir():
        raise UserError("no such reward-model directory", file=str(directory))
    if (directory / legacy.HEAD_FILE).is_file():
        if not (directory / SETTINGS_FILE).is_file():
            raise UserError(f"{legacy.HEAD_FILE} without {SETTINGS_FILE}: not a complete reward model",
                            file=str(directory))
        return "legacy"
    config = _config(directory)
    classes = list(getattr(config, "architectures", None) or [])
    if not any(name.endswith("ForSequenceClassification") for name in classes):
        raise UserError(f"not a reward model: config.json says {', '.join(classes) or 'no architectures'}, not a "
                        "*ForSequenceClassification with num_labels 1 (train one with `llamakit train-reward`)",
                        file=str(directory))
    if config.num_labels != 1:
        raise UserError(f"not a reward model: a {classes[0]} with num_labels {config.num_labels} "
                        "(a reward model has 1)", file=str(directory))
    return "llamakit" if (directory / SETTINGS_FILE).is_file() else "foreign"


def _config(directory: Path):
    from transformers import AutoConfig

    from toolkit.models import load_errors, one_line

    if not (directory / "config.json").is_file():
        raise UserError("not a reward model: no config.json", file=str(directory))
    try:
        return AutoConfig.from_pretrained(directory, trust_remote_code=False)
    except load_errors() as err:
        raise UserError(f"cannot read config.json: {one_line(err)}", file=str(directory)) from None


def save_reward_model(model: RewardNet, tokenizer, settings: RewardSettings, out: Path) -> None:
    """Write the sequence classifier (LoRA merged in), its tokenizer and reward_config.json into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    classifier = model.model
    if hasattr(classifier.base_model, "merge_and_unload"):
        setattr(classifier, classifier.base_model_prefix, classifier.base_model.merge_and_unload())
    classifier.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    (out / SETTINGS_FILE).write_text(json.dumps(asdict(settings), indent=2) + "\n", encoding="utf-8")


def fingerprint(directory: str | os.PathLike) -> str:
    """Identifies the weights a calibration was fitted on: the bytes of the head (the tensors outside the base
    model: tiny, and different for every training run) and the names and sizes of the weight files."""
    directory = Path(directory)
    if (directory / legacy.HEAD_FILE).is_file():
        return legacy.fingerprint(directory)
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING

    config = _config(directory)
    try:
        base = MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING[type(config)].base_model_prefix + "."
    except KeyError:
        raise UserError(f"transformers has no sequence classifier for model_type '{config.model_type}'",
                        file=str(directory)) from None
    digest = hashlib.sha256()
    # An ensemble's members count too: a calibration is fitted on their mean. A member that is gone is said as
    # such, not as "other weights" with a hint to recalibrate that cannot help.
    if (directory / SETTINGS_FILE).is_file():
        for index in range(1, len(_read_settings(directory).ensemble_offsets)):
            _member_path(directory, index)
    members = sorted(directory.glob(f"{MEMBERS_DIR}/*/*.safetensors"), key=lambda p: (int(p.parent.name), p.name))
    for weights in sorted(directory.glob("*.safetensors")) + members:
        digest.update(f"{weights.relative_to(directory).as_posix()}:{weights.stat().st_size}".encode())
        try:
            for tensor in _tensors_outside(weights, base):
                digest.update(tensor)
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise UserError(f"unreadable safetensors file: {err}", file=str(weights)) from None
    return digest.hexdigest()[:16]


def _tensors_outside(weights: Path, prefix: str) -> Iterator[bytes]:
    """Name + raw bytes of each tensor of a safetensors file whose name does not start with `prefix`, read
    through the file's JSON header (8-byte length, then {name: {data_offsets: [start, end]}})."""
    with weights.open("rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
        for name in sorted(header):
            if name == "__metadata__" or name.startswith(prefix):
                continue
            start, end = header[name]["data_offsets"]
            f.seek(8 + size + start)
            yield name.encode() + f.read(end - start)


def load_trained(directory: str | os.PathLike, device: str = "cpu") -> tuple[nn.Module, Any, RewardSettings]:
    """A reward model (any kind reward_dir_kind accepts), its tokenizer and settings, in eval mode."""
    from toolkit.models import load_tokenizer

    directory = Path(directory)
    kind = reward_dir_kind(directory)
    settings = None if kind == "foreign" else _read_settings(directory)
    tokenizer = load_tokenizer(directory)
    if kind == "legacy":
        net: nn.Module = legacy.load(directory, settings.read_at)
    else:
        model = load_sequence_classifier(directory)
        _agree_on_pad(model, tokenizer)
        net = RewardNet(model)
        settings = settings or _inferred_settings(directory, model.config, tokenizer)
        if settings.ensemble_offsets:
            net = EnsembleNet([net] + [_member(directory, m) for m in range(1, len(settings.ensemble_offsets))],
                              settings.ensemble_offsets)
    return net.to(device).eval(), tokenizer, settings


def _member(directory: Path, index: int) -> RewardNet:
    return RewardNet(load_sequence_classifier(_member_path(directory, index)))


def _member_path(directory: Path, index: int) -> Path:
    path = directory / MEMBERS_DIR / str(index)
    if not (path / "config.json").is_file() or not any(path.glob("*.safetensors")):
        members = len(_read_settings(directory).ensemble_offsets)
        raise UserError(f"ensemble member {index} of {members} is missing: {path} (retrain with `llamakit "
                        f"train-reward --ensemble {members}`, or restore the directory)", file=str(directory))
    return path


def _read_settings(directory: Path) -> RewardSettings:
    path = directory / SETTINGS_FILE
    try:
        settings = RewardSettings(**json.loads(path.read_text(encoding="utf-8")))
    except (ValueError, TypeError, UnicodeDecodeError) as err:
        raise UserError(f"unreadable reward settings: {err}", file=str(path)) from None
    if settings.format_version > FORMAT_VERSION:
        raise UserError(f"written by a newer llamakit (format {settings.format_version})", file=str(path))
    return settings


def _agree_on_pad(model: nn.Module, tokenizer) -> None:
    """Pad with the id the head skips (config.pad_token_id); a config without one takes the tokenizer's."""
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    elif model.config.pad_token_id != tokenizer.pad_token_id:
        tokenizer.pad_token = tokenizer.convert_ids_to_tokens(model.config.pad_token_id)


def _inferred_settings(directory: Path, config, tokenizer) -> RewardSettings:
    """A sequence classifier llamakit did not train reads texts as llamakit writes them: HH text, EOS appended
    for a causal LM (as TRL's RewardTrainer does), at most FOREIGN_MAX_LENGTH tokens or its context."""
    limits = (FOREIGN_MAX_LENGTH, getattr(config, "max_position_embeddings", None), tokenizer.model_max_length)
    return RewardSettings(backbone=str(directory), max_length=min(n for n in limits if isinstance(n, int) and n > 0),
                          append_eos=wants_eos(tokenizer), read_at=default_read_at(config))


def read_calibration(directory: str | os.PathLike) -> Calibration:
    """calibration.json, checked against the weights. A sequence classifier llamakit did not train may have none:
    its rewards are then used raw (the identity), with a one-line warning saying how to fit one."""
    from rich.markup import escape

    from toolkit.console import console

    directory = Path(directory)
    if reward_dir_kind(directory) == "foreign" and not (directory / CALIBRATION_FILE).is_file():
        console.print(f"[yellow]warning:[/] {escape(str(directory))} has no {CALIBRATION_FILE}: its rewards are used "
                      f"raw (T = 1, mean 0); fit one on held-out pairs with `llamakit calibrate "
                      f"{escape(str(directory))} --data PAIRS.jsonl`", soft_wrap=True)
        return identity(fingerprint(directory))
    return read_calibration_file(directory, fingerprint(directory))
