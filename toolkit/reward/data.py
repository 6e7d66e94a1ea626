"""Preference files in, (prompt, chosen, rejected) pairs out: reading, format detection, held-out split.

Rows become `toolkit.rows.Pair` / `Scored`, whose texts are Anthropic HH style, so HH data, llamakit rows and
the PPO loop's (prompt, response) all look alike to the reward model (`toolkit.rows.hh_join`):

    "\\n\\nHuman: {prompt}\\n\\nAssistant: {response}"
"""

from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from toolkit.errors import UserError
from toolkit.rows import ASSISTANT, Loc, Pair, Scored, preference_pair, scored_answer

FORMATS = ("auto", "preference", "hh", "implicit", "chatllama")


@dataclass
class PreferenceData:
    source: str
    format: str
    pairs: list[Pair] = field(default_factory=list)
    scored: list[Scored] = field(default_factory=list)


def _loc(path: str, line: int | None, row: int) -> Loc:
    """File and line of one row, for error messages; a JSON array or a datasets dir has no lines: name the row."""
    return {"file": path, "line": line} if line is not None else {"file": f"{path}: row {row}"}


def load_preferences(path: str | os.PathLike, fmt: str = "auto") -> PreferenceData:
    """Read a preference file (JSONL / JSON) or a `datasets` save_to_disk directory."""
    if fmt not in FORMATS:
        raise UserError(f"unknown --format '{fmt}' (one of {', '.join(FORMATS)})")
    path = str(path)
    rows, lines = _read(path)
    if fmt == "auto":
        fmt = detect_format(rows[0], path, lines[0] if lines else None)
    data = PreferenceData(source=path, format=fmt)
    for i, row in enumerate(rows):
        loc = _loc(path, lines[i] if lines else None, i + 1)
        if fmt == "chatllama":
            data.scored.append(scored_answer(row, loc))
        else:
            data.pairs.append(preference_pair(row, fmt, loc))
    return data


def _read(path: str) -> tuple[list[dict[str, Any]], list[int] | None]:
    """Rows and, for JSONL, the line number of each (blank lines are skipped by read_rows)."""
    from toolkit.io import read_rows

    p = Path(path)
    if p.is_dir():
        return _read_datasets_dir(p), None
    rows = read_rows(p)
    text = p.read_text(encoding="utf-8-sig")
    if text.lstrip().startswith("[") or p.suffix == ".json":
        return rows, None
    lines = [n for n, line in enumerate(text.splitlines(), start=1) if line.strip()]
    return rows, lines


def _read_datasets_dir(path: Path) -> list[dict[str, Any]]:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as err:
        raise UserError(f"not a `datasets` save_to_disk directory ({err})", file=str(path)) from None
    if isinstance(loaded, datasets.DatasetDict):
        split = "train" if "train" in loaded else next(iter(loaded), None)
        if split is None:
            raise UserError("the DatasetDict holds no split", file=str(path))
        loaded = loaded[split]
    rows = loaded.to_list()
    if not rows:
        raise UserError("the dataset holds no rows", file=str(path))
    return rows


def detect_format(row: dict[str, Any], path: str = "<data>", line: int | None = None) -> str:
    """Name of the format of a file, from its first row's keys and value types."""
    keys = set(row)
    if {"user_input", "completion"} <= keys or ({"prompt", "response", "score"} <= keys and "chosen" not in keys):
        return "chatllama"
    if "prompt" in keys and ("chosen" in keys or "rejected" in keys):
        return "preference"
    if "chosen" in keys:
        chosen = row["chosen"]
        if isinstance(chosen, str) and ASSISTANT in chosen:
            return "hh"
        return "implicit"
    raise UserError("cannot tell the format: expected `prompt`/`chosen`/`rejected` (llamakit, TRL), "
                    "`chosen`/`rejected` (Anthropic HH, TRL implicit prompt) or `user_input`/`completion`/"
                    f"`score` (ChatLLaMA); found keys {sorted(keys)}", file=path, line=line)


def pairs_from_scored(scored: list[Scored]) -> list[Pair]:
    """Pairs from scored rows that share a prompt: each better answer against each worse one."""
    by_prompt: dict[str, list[Scored]] = defaultdict(list)
    for row in scored:
        by_prompt[row.prompt].append(row)
    pairs = []
    for prompt, rows in by_prompt.items():
        for a in rows:
            for b in rows:
                if a.score > b.score and a.response != b.response:
                    pairs.append(Pair(prompt, a.response, b.response, 0.0, a.line))
    return pairs


def split(items: list, fraction: float, seed: int) -> tuple[list, list]:
    """(train, held-out): a seeded shuffle, so a re-run holds out the same rows."""
    import random

    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    n_out = int(round(len(items) * fraction))
    held = set(order[:n_out])
    return [x for i, x in enumerate(items) if i not in held], [x for i, x in enumerate(items) if i in held]
