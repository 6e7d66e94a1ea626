"""Input rows in the formats people have: llamakit rows, Alpaca, self-instruct seeds, HH text, ShareGPT.

Every row becomes a `Prompt`: a text or a list of chat messages ending with a user turn, plus an
optional answer already in the row. The whole file is checked before any request is sent; a bad row
stops the run with `file:line: field 'x': what is wrong`.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from toolkit.errors import UserError
from toolkit.io import read_rows

ROLES = {"system", "user", "assistant"}
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "bing": "assistant", "bard": "assistant", "model": "assistant",
                  "system": "system"}
HH_TURN = re.compile(r"\n\n(Human|Assistant): ?")
PROMPT_FIELDS = "prompt, messages, instruction, conversations (ShareGPT), chosen (HH text), user_input"

Messages = list[dict[str, str]]


@dataclass
class Prompt:
    index: int  # 0-based row number in the file
    line: int | None  # 1-based line of a JSONL file (None inside a JSON array)
    prompt: str | Messages  # text, or chat messages ending with a user message
    response: str | None = None  # an answer already in the row (output, response, last assistant turn)
    responses: list[str] = field(default_factory=list)  # several answers already in the row
    row: dict[str, Any] = field(default_factory=dict)


def read_table(path: str | os.PathLike) -> tuple[list[dict[str, Any]], list[int | None]]:
    """Rows of a JSONL / JSON / Parquet file, and each row's line number (JSONL only)."""
    path = Path(path)
    if path.suffix == ".parquet":
        import pandas as pd

        if not path.is_file():
            raise UserError("no such file", file=str(path))
        try:
            frame = pd.read_parquet(path)
        except Exception as err:  # noqa: BLE001 - pyarrow raises many kinds
            raise UserError(f"cannot read Parquet: {err}", file=str(path)) from None
        rows = json.loads(frame.to_json(orient="records", force_ascii=False))
        return rows, [None] * len(rows)
    rows = read_rows(path)
    text = path.read_text(encoding="utf-8-sig")
    if text.lstrip().startswith("[") or path.suffix == ".json":
        return rows, [None] * len(rows)
    lines = [n for n, line in enumerate(text.splitlines(), start=1) if line.strip()]
    return rows, lines


def where(path: str | os.PathLike, index: int, line: int | None) -> dict[str, Any]:
    """UserError location kwargs: file:line for JSONL, 'file' plus 'row N' for JSON arrays."""
    return {"file": str(path), "line": line} if line is not None else {"file": f"{path} (row {index + 1})"}


def parse_hh(text: str) -> Messages:
    """Anthropic HH text ("\\n\\nHuman: ...\\n\\nAssistant: ...") -> chat messages."""
    parts = HH_TURN.split(text if text.startswith("\n\n") else "\n\n" + text.lstrip())
    messages: Messages = []
    for speaker, content in zip(parts[1::2], parts[2::2], strict=True):
        messages.append({"role": "user" if speaker == "Human" else "assistant", "content": content.strip()})
    return messages


def to_hh(messages: Messages) -> str:
    """Chat messages -> HH text; a system message is folded into the first human turn."""
    out, system = [], ""
    for m in messages:
        if m["role"] == "system":
            system = m["content"].strip() + "\n\n"
            continue
        speaker = "Human" if m["role"] == "user" else "Assistant"
        out.append(f"\n\n{speaker}: {system if speaker == 'Human' else ''}{m['content']}")
        if speaker == "Human":
            system = ""
    return "".join(out)


def prompt_text(prompt: str | Messages) -> str:
    """A prompt as one text, for judges and stats: a single user turn as-is, a dialogue with speakers."""
    if isinstance(prompt, str):
        return prompt
    turns = [m for m in prompt if m["role"] != "system"]
    if len(turns) == 1:
        return turns[0]["content"]
    return "\n\n".join(f"{'User' if m['role'] == 'user' else 'Assistant'}: {m['content']}" for m in turns)


def check_messages(value: Any, key: str, loc: dict[str, Any], *, sharegpt: bool = False) -> Messages:
    if not isinstance(value, list) or not value:
        raise UserError("expected a non-empty list of messages", field=key, **loc)
    messages: Messages = []
    for i, m in enumerate(value):
        name = f"{key}[{i}]"
        if not isinstance(m, dict):
            raise UserError(f"expected an object, got {type(m).__name__}", field=name, **loc)
        role_key, text_key = ("from", "value") if sharegpt else ("role", "content")
        role = m.get(role_key)
        role = SHAREGPT_ROLES.get(str(role).lower()) if sharegpt else role
        if role not in ROLES:
            raise UserError(f"unknown role {m.get(role_key)!r}", field=f"{name}.{role_key}", **loc)
        content = m.get(text_key)
        if not isinstance(content, str):
            raise UserError("missing or not a string", field=f"{name}.{text_key}", **loc)
        if not content.strip():
            raise UserError("empty text", field=f"{name}.{text_key}", **loc)
        messages.append({"role": role, "content": content})
    return messages


def _text(row: dict, key: str, loc: dict[str, Any], *, optional: bool = False) -> str | None:
    if key not in row or (optional and row[key] in (None, "")):
        if optional:
            return None
        raise UserError("missing", field=key, **loc)
    value = row[key]
    if not isinstance(value, str):
        raise UserError(f"expected a string, got {type(value).__name__}", field=key, **loc)
    if not value.strip():
        if optional:
            return None
        raise UserError("empty text", field=key, **loc)
    return value


def _split_dialogue(messages: Messages, key: str, loc: dict[str, Any]) -> tuple[Messages, str | None]:
    """A dialogue ending with an assistant turn -> (prompt up to the last user turn, that answer)."""
    answer = None
    if messages[-1]["role"] == "assistant":
        answer = messages[-1]["content"]
        messages = messages[:-1]
    if not messages or messages[-1]["role"] != "user":
        raise UserError("the dialogue must end with a user message (or a user message and its answer)",
                        field=key, **loc)
    return messages, answer


def parse_prompt_row(row: dict[str, Any], loc: dict[str, Any], index: int = 0, line: int | None = None) -> Prompt:
    """One input row, in whichever supported format it is, -> Prompt (or a UserError naming the field)."""
    response = None
    responses: list[str] = []
    if "messages" in row:
        prompt, response = _split_dialogue(check_messages(row["messages"], "messages", loc), "messages", loc)
    elif "conversations" in row:
        messages = check_messages(row["conversations"], "conversations", loc, sharegpt=True)
        prompt, response = _split_dialogue(messages, "conversations", loc)
    elif "prompt" in row:
        if isinstance(row["prompt"], list):
            prompt, _ = _split_dialogue(check_messages(row["prompt"], "prompt", loc), "prompt", loc)
        else:
            prompt = _text(row, "prompt", loc)
    elif "instruction" in row:  # Alpaca, or a self-instruct seed task with instances
        prompt = _text(row, "instruction", loc)
        extra = _text(row, "input", loc, optional=True)
        instances = row.get("instances")
        if extra is None and isinstance(instances, list) and instances and isinstance(instances[0], dict):
            extra = instances[0].get("input") or None
            response = instances[0].get("output") or None
        if extra:
            prompt = f"{prompt}\n\n{extra}"
        response = _text(row, "output", loc, optional=True) or response
    elif "user_input" in row:  # ChatLLaMA actor / reward rows
        prompt = _text(row, "user_input", loc)
        response = _text(row, "completion", loc, optional=True)
    elif "chosen" in row and isinstance(row["chosen"], str) and "Human:" in row["chosen"]:
        chosen = _text(row, "chosen", loc)
        prompt, response = _split_dialogue(parse_hh(chosen) or [{"role": "user", "content": ""}], "chosen", loc)
        if "rejected" in row:
            rejected = _split_dialogue(parse_hh(_text(row, "rejected", loc)), "rejected", loc)[1]
            responses = [r for r in (response, rejected) if r]
    else:
        raise UserError(f"no prompt field (expected one of: {PROMPT_FIELDS})", **loc)
    for key in ("response", "completion"):
        if key in row and response is None and "user_input" not in row:
            response = _text(row, key, loc)
    if "responses" in row:
        value = row["responses"]
        if not isinstance(value, list) or not all(isinstance(r, str) and r.strip() for r in value):
            raise UserError("expected a list of non-empty strings", field="responses", **loc)
        responses = list(value)
    return Prompt(index, line, prompt, response, responses, row)


def read_prompts(path: str | os.PathLike, limit: int | None = None) -> list[Prompt]:
    """Every row of the file checked (so a bad row stops the run before any request), first `limit` kept."""
    rows, lines = read_table(path)
    prompts = [parse_prompt_row(row, where(path, i, lines[i]), i, lines[i]) for i, row in enumerate(rows)]
    return prompts[:limit] if limit else prompts
