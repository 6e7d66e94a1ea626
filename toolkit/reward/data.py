"""Preference data in, (prompt, chosen, rejected) pairs out: format detection, validation, the text format.

Every format is turned into the same text, Anthropic HH style, so HH data, llamakit rows and the PPO
loop's (prompt, response) all look alike to the reward model:

    "\\n\\nHuman: {prompt}\\n\\nAssistant: {response}"

A prompt that is already HH text (several turns, starting with "\\n\\nHuman:") is kept as it is.
System messages are left out, as the PPO loop's `prompt_text` leaves them out.
"""

from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from toolkit.errors import UserError

HUMAN, ASSISTANT = "\n\nHuman:", "\n\nAssistant:"
ROLE_NAMES = {"user": "Human", "assistant": "Assistant"}
FORMATS = ("auto", "preference", "hh", "implicit", "chatllama")


def join(prompt: str, response: str) -> str:
    """The one text the reward model reads for a prompt and a response (training and scoring alike)."""
    if prompt.startswith(HUMAN):
        head = prompt
    elif prompt.startswith(HUMAN.lstrip()):
        head = "\n\n" + prompt
    elif prompt:
        head = f"{HUMAN} {prompt}"
    else:
        head = ""
    return f"{head}{ASSISTANT} {response}"


@dataclass
class Pair:
    prompt: str
    chosen: str
    rejected: str
    margin: float = 0.0
    line: int | None = None
    rejected_prompt: str | None = None  # only where a row's two dialogues differ before the last answer

    @property
    def chosen_text(self) -> str:
        return join(self.prompt, self.chosen)

    @property
    def rejected_text(self) -> str:
        return join(self.rejected_prompt if self.rejected_prompt is not None else self.prompt, self.rejected)


@dataclass
class Scored:
    prompt: str
    response: str
    score: float
    line: int | None = None

    @property
    def text(self) -> str:
        return join(self.prompt, self.response)


@dataclass
class PreferenceData:
    source: str
    format: str
    pairs: list[Pair] = field(default_factory=list)
    scored: list[Scored] = field(default_factory=list)


class _Where:
    """File and line (or row, for a JSON array / datasets dir) of one row, for error messages."""

    def __init__(self, path: str, line: int | None, row: int):
        self.path, self.line, self.row = path, line, row

    def error(self, message: str, field: str | None = None) -> UserError:
        if self.line is None:  # no line numbers in a JSON array or a datasets dir: name the row instead
            return UserError(message, file=f"{self.path}: row {self.row}", field=field)
        return UserError(message, file=self.path, line=self.line, field=field)


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
        where = _Where(path, lines[i] if lines else None, i + 1)
        if fmt == "chatllama":
            data.scored.append(_scored(row, where))
        else:
            data.pairs.append(_pair(row, fmt, where))
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


def _pair(row: dict[str, Any], fmt: str, where: _Where) -> Pair:
    for key in ("chosen", "rejected") + (("prompt",) if fmt == "preference" else ()):
        if key not in row:
            raise where.error("missing", field=key)
    margin = _margin(row, where)
    if fmt == "hh":
        chosen_prompt, chosen = _split_hh(row["chosen"], "chosen", where)
        rejected_prompt, rejected = _split_hh(row["rejected"], "rejected", where)
        pair = Pair(chosen_prompt, chosen, rejected, margin, where.line,
                    None if rejected_prompt == chosen_prompt else rejected_prompt)
    elif fmt == "implicit":
        pair = _implicit(row, where, margin)
    else:
        prompt = _as_prompt(row["prompt"], "prompt", where)
        pair = Pair(prompt, _as_response(row["chosen"], "chosen", where),
                    _as_response(row["rejected"], "rejected", where), margin, where.line)
        # A blank prompt or a blank preferred answer is a broken row, not a preference; a blank *rejected*
        # answer is kept (models do answer with nothing, and that answer is rightly the worse one).
        for key, text in (("prompt", pair.prompt), ("chosen", pair.chosen)):
            if not text.strip():
                raise where.error("empty text", field=key)
    if pair.chosen_text == pair.rejected_text:
        raise where.error("identical to 'chosen' (a pair must differ)", field="rejected")
    return pair


def _margin(row: dict[str, Any], where: _Where) -> float:
    value = row.get("margin")
    if value is None:
        return 0.0
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise where.error(f"expected a number, got {type(value).__name__}", field="margin")
    return float(value)


def _split_hh(text: Any, key: str, where: _Where) -> tuple[str, str]:
    if not isinstance(text, str):
        raise where.error(f"expected a string, got {type(text).__name__}", field=key)
    cut = text.rfind(ASSISTANT)
    if cut < 0:
        raise where.error(f"no '{ASSISTANT.strip()}' turn in HH text", field=key)
    answer = text[cut + len(ASSISTANT):]
    return text[:cut], answer[1:] if answer.startswith(" ") else answer


def _check_messages(value: list, key: str, where: _Where) -> list[dict[str, str]]:
    messages = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or \
                m.get("role") not in ("system", "user", "assistant"):
            raise where.error(f"item {i} is not a {{role: system|user|assistant, content: string}} message",
                              field=key)
        messages.append({"role": m["role"], "content": m["content"]})
    return messages


def _turns_text(messages: list[dict[str, str]]) -> str:
    return "".join(f"\n\n{ROLE_NAMES[m['role']]}: {m['content']}" for m in messages if m["role"] != "system")


def _as_prompt(value: Any, key: str, where: _Where) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        turns = [m for m in _check_messages(value, key, where) if m["role"] != "system"]
        if not turns:
            raise where.error("no user or assistant message", field=key)
        # One user turn reads as plain text, several as HH text: the PPO loop's prompt_text does the same.
        return turns[0]["content"] if len(turns) == 1 and turns[0]["role"] == "user" else _turns_text(turns)
    raise where.error(f"expected a string or a list of messages, got {type(value).__name__}", field=key)


def _as_response(value: Any, key: str, where: _Where) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        messages = [m for m in _check_messages(value, key, where) if m["role"] != "system"]
        if not messages or messages[0]["role"] != "assistant":
            raise where.error("expected the answer as assistant message(s)", field=key)
        return messages[0]["content"] + _turns_text(messages[1:])
    raise where.error(f"expected a string or a list of messages, got {type(value).__name__}", field=key)


def _implicit(row: dict[str, Any], where: _Where, margin: float) -> Pair:
    """TRL's implicit-prompt rows: the shared start of chosen and rejected is the prompt."""
    chosen, rejected = row["chosen"], row["rejected"]
    if isinstance(chosen, list) and isinstance(rejected, list):
        c = _check_messages(chosen, "chosen", where)
        r = _check_messages(rejected, "rejected", where)
        n = 0
        while n < min(len(c), len(r)) and c[n] == r[n]:
            n += 1
        while n > 0 and c[n - 1]["role"] == "assistant":  # the answers start at an assistant turn
            n -= 1
        if n == 0:
            raise where.error("no shared user turn before the answers", field="chosen")
        return Pair(_as_prompt(c[:n], "chosen", where), _as_response(c[n:], "chosen", where),
                    _as_response(r[n:], "rejected", where), margin, where.line)
    for key, value in (("chosen", chosen), ("rejected", rejected)):
        if not isinstance(value, str):
            raise where.error(f"expected a string, got {type(value).__name__}", field=key)
    n = len(os.path.commonprefix([chosen, rejected]))
    space = max(chosen.rfind(" ", 0, n), chosen.rfind("\n", 0, n))
    n = space + 1 if space >= 0 else 0  # cut between words, not inside one
    return Pair(chosen[:n].rstrip(), chosen[n:], rejected[n:], margin, where.line)


def _scored(row: dict[str, Any], where: _Where) -> Scored:
    prompt_key = "user_input" if "user_input" in row else "prompt"
    answer_key = "completion" if "completion" in row else "response"
    for key in (prompt_key, answer_key, "score"):
        if key not in row:
            raise where.error("missing", field=key)
    prompt = _as_prompt(row[prompt_key], prompt_key, where)
    response = _as_response(row[answer_key], answer_key, where)
    score = row["score"]
    if isinstance(score, str):
        try:
            score = float(score)
        except ValueError:
            raise where.error(f"expected a number, got {score!r}", field="score") from None
    if isinstance(score, bool) or not isinstance(score, (int, float)) or score != score:
        raise where.error(f"expected a number, got {type(score).__name__}", field="score")
    return Scored(prompt, response, float(score), where.line)


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
