"""The model card (README.md) that sft, rlhf and dpo write beside their model, from templates/model_card.md:
Hub metadata (huggingface_hub's ModelCardData), the command line, a fingerprint of the training data, the
hyper-parameters, the final metrics and how to load it."""

from __future__ import annotations

import hashlib
import os
import re
import shlex
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

FINGERPRINT_HEX = 16
CHUNK = 1 << 20


def render_card(*, method: str, summary: str, base: str, data: str, rows: int, unit: str, config: Mapping[str, Any],
                metrics: Mapping[str, Any], model_dir: str | os.PathLike, adapter_dir: str | os.PathLike | None = None,
                tags: Sequence[str] = (), argv: Sequence[str] | None = None) -> str:
    """The card's text. `base` and `data` as the user gave them (`data` "" for a model made without data);
    `rows` counted in `unit` (conversations, prompts, pairs); `argv` defaults to this process's sys.argv."""
    import jinja2
    from huggingface_hub import ModelCard, ModelCardData

    from toolkit.models import hub_id
    from toolkit.resources import template_path

    dataset = _hub_dataset(data) if data else None
    card_data = ModelCardData(library_name="transformers", base_model=hub_id(base), tags=["llamakit", method, *tags],
                              datasets=[dataset] if dataset else None, pipeline_tag="text-generation")
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, autoescape=False, keep_trailing_newline=True)
    text = env.from_string(template_path("model_card.md").read_text(encoding="utf-8")).render(
        card_data=card_data.to_yaml(), title="/".join(Path(model_dir).parts[-2:]), summary=summary,
        base=base, command=command_line(argv), data=data, fingerprint=data_fingerprint(data) if data else None,
        rows=rows, unit=unit,
        config=[(k, _cell(v)) for k, v in config.items()], metrics=[(k, _cell(v)) for k, v in metrics.items()],
        model_dir=str(model_dir), adapter_dir=str(adapter_dir) if adapter_dir else None)
    return str(ModelCard(text))  # parsed once here: a card the Hub tools cannot read is a bug, not a file


def command_line(argv: Sequence[str] | None = None) -> str:
    """The command as run, shell-quoted so that it can be pasted back; `llamakit` however it was started (the
    console script, `python -m toolkit`, torchrun / accelerate launch -m toolkit). URL credentials are hidden."""
    from toolkit.console import redact

    argv = list(sys.argv if argv is None else argv) or [""]
    program = Path(argv[0])
    if program.name == "llamakit" or (program.name == "__main__.py" and program.parent.name == "toolkit"):
        argv[0] = "llamakit"
    return redact(shlex.join(argv))


def data_fingerprint(path: str | os.PathLike) -> str:
    """sha256 of a data file's bytes (first 16 hex digits); for a directory (a saved dataset), of every file's
    relative path and bytes in path order."""
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    digest = hashlib.sha256()
    for file in files:
        if path.is_dir():
            digest.update(file.relative_to(path).as_posix().encode() + b"\0")
        with open(file, "rb") as f:
            while chunk := f.read(CHUNK):
                digest.update(chunk)
    return digest.hexdigest()[:FINGERPRINT_HEX]


def _hub_dataset(data: str) -> str | None:
    """The Hub id of a data file inside the Hugging Face cache (datasets--ORG--NAME); None otherwise."""
    for part in reversed(Path(data).resolve().parts):
        match = re.fullmatch(r"datasets--([\w.-]+)--([\w.-]+)", part)
        if match:
            return f"{match[1]}/{match[2]}"
    return None


def _cell(value: Any) -> str:
    """A value as one Markdown table cell."""
    if isinstance(value, float):
        text = f"{value:.6g}"
    elif isinstance(value, bool):
        text = str(value).lower()
    else:
        text = str(value)
    return " ".join(text.replace("|", "\\|").split()) or "—"
