"""Dataset formats in and out (`llamakit data convert IN OUT --to FORMAT`, `--export` of generate-data).

Every row read is first made a llamakit row (`toolkit.rows.llamakit_row`) of one of four kinds:
    conversation  {"messages": [{"role", "content"}, ...]}
    preference    {"prompt": text | messages, "chosen": text, "rejected": text, ...}
    score         {"prompt": text | messages, "response": text, "score": number}
    prompt        {"prompt": text | messages}
from any of: llamakit rows, TRL conversational / standard / prompt-completion, Anthropic HH text,
ShareGPT, ChatLLaMA actor / reward rows, Alpaca, self-instruct seeds; JSONL, JSON or Parquet.
Written as one of FORMATS; `hf` is a Hugging Face `datasets` directory (save_to_disk).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from toolkit.errors import UserError
from toolkit.generate.inputs import read_table, where
from toolkit.rows import dialogue_text, llamakit_row, prompt_messages, row_kind, split_last_answer, to_hh

FORMATS = ("llamakit", "parquet", "hf", "sharegpt", "chatllama", "trl-conversational", "trl-standard", "hh")
SHAREGPT_FROM = {"user": "human", "assistant": "gpt", "system": "system"}


# ------------------------------------------------------------------------------------------ reading


def read_llamakit(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of any supported format as llamakit rows; the first bad row stops with file:line."""
    rows, lines = read_table(path)
    out = []
    for i, row in enumerate(rows):
        loc = where(path, i, lines[i])
        if isinstance(row.get("meta"), str):  # Parquet / hf keep meta as JSON text
            try:
                row = {**row, "meta": json.loads(row["meta"])}
            except ValueError:
                pass
        out.append(llamakit_row(row, loc))
    return out


# ---------------------------------------------------------------------------------------- converting


def convert_row(row: dict[str, Any], fmt: str) -> dict[str, Any]:
    """One llamakit row -> `fmt` (raises UserError for a kind the format cannot hold)."""
    what = row_kind(row)
    keep = {"id": row["id"]} if "id" in row else {}
    if fmt in ("llamakit", "parquet", "hf"):
        return row
    if fmt == "sharegpt":
        if what == "conversation":
            messages = row["messages"]
        elif what == "score":
            messages = [*prompt_messages(row["prompt"]), {"role": "assistant", "content": row["response"]}]
        else:
            raise UserError(f"sharegpt holds conversations, not {what} rows")
        return {**keep, "conversations": [{"from": SHAREGPT_FROM[m["role"]], "value": m["content"]} for m in messages]}
    if fmt == "chatllama":
        if what == "conversation":
            history, answer = split_last_answer(row["messages"])
            return {"user_input": dialogue_text(history), "completion": answer}
        if what == "score":
            return {"user_input": dialogue_text(row["prompt"]), "completion": row["response"], "score": row["score"]}
        if what == "prompt":
            return {"user_input": dialogue_text(row["prompt"])}
        raise UserError("chatllama has actor (conversation), reward (score) and rlhf (prompt) rows; "
                        "preference rows convert to trl-* or hh")
    if fmt == "trl-conversational":
        if what == "preference":
            return {**keep, "prompt": prompt_messages(row["prompt"]),
                    "chosen": [{"role": "assistant", "content": row["chosen"]}],
                    "rejected": [{"role": "assistant", "content": row["rejected"]}]}
        if what == "conversation":
            return {**keep, "messages": row["messages"]}
        if what == "score":
            return {**keep, "prompt": prompt_messages(row["prompt"]),
                    "completion": [{"role": "assistant", "content": row["response"]}], "score": row["score"]}
        return {**keep, "prompt": prompt_messages(row["prompt"])}
    if fmt == "trl-standard":
        if what == "preference":
            return {**keep, "prompt": dialogue_text(row["prompt"]), "chosen": row["chosen"],
                    "rejected": row["rejected"]}
        if what == "conversation":
            history, answer = split_last_answer(row["messages"])
            return {**keep, "prompt": dialogue_text(history), "completion": answer}
        if what == "score":
            return {**keep, "prompt": dialogue_text(row["prompt"]), "completion": row["response"],
                    "score": row["score"]}
        return {**keep, "prompt": dialogue_text(row["prompt"])}
    if fmt == "hh":
        if what == "preference":
            prompt = prompt_messages(row["prompt"])
            return {"chosen": to_hh([*prompt, {"role": "assistant", "content": row["chosen"]}]),
                    "rejected": to_hh([*prompt, {"role": "assistant", "content": row["rejected"]}])}
        if what == "conversation":
            return {"text": to_hh(row["messages"])}
        raise UserError(f"hh holds preference pairs and dialogues, not {what} rows")
    raise UserError(f"unknown format '{fmt}' (one of: {', '.join(FORMATS)})")


def _arrow_safe(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """meta as JSON text, and columns that mix text and lists as JSON text, so Arrow takes any rows."""
    columns: dict[str, set[type]] = {}
    for row in rows:
        for k, v in row.items():
            columns.setdefault(k, set()).add(type(v))
    mixed = {k for k, types in columns.items() if k == "meta" or (len(types - {type(None)}) > 1)}
    return [{k: (json.dumps(v, ensure_ascii=False) if k in mixed and not isinstance(v, str) else v)
             for k, v in row.items()} for row in rows]


def write_rows(rows: Iterable[dict[str, Any]], path: str | os.PathLike, fmt: str, *, overwrite: bool = False) -> int:
    """Write llamakit rows as `fmt` (JSONL, or a JSON array when the name ends in .json). An existing `path`
    is replaced only with `overwrite` (an `hf` directory only when it is a dataset llamakit wrote)."""
    from toolkit.io import claim_output_dir, ensure_writable_dir, require_new_file, why

    path = Path(path)
    if fmt == "hf":
        claim_output_dir(path, "hf-dataset", overwrite=overwrite)
    else:
        require_new_file(path, overwrite=overwrite)
    out = [convert_row(r, fmt) for r in rows]
    ensure_writable_dir(path.parent)
    try:
        _write(out, path, fmt, overwrite)
    except OSError as err:  # disk full, quota: the target is untouched (each format writes a temp, then renames)
        raise UserError(f"cannot write: {why(err)}", file=str(path)) from None
    return len(out)


def _write(out: list[dict[str, Any]], path: Path, fmt: str, overwrite: bool) -> None:
    from toolkit.io import atomic_dir

    if fmt == "parquet":
        import pandas as pd

        tmp = path.with_name(f".{path.name}.tmp")
        pd.DataFrame(_arrow_safe(out)).to_parquet(tmp, index=False)
        os.replace(tmp, path)
    elif fmt == "hf":
        import datasets

        datasets.disable_progress_bars()
        with atomic_dir(path, "hf-dataset", overwrite=overwrite) as tmp:
            datasets.Dataset.from_list(_arrow_safe(out)).save_to_disk(str(tmp))
    else:
        tmp = path.with_name(f".{path.name}.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            if path.suffix == ".json":
                json.dump(out, f, ensure_ascii=False, indent=1)
                f.write("\n")
            else:
                f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in out)
        os.replace(tmp, path)


def convert(src: str | os.PathLike, dst: str | os.PathLike, fmt: str, *, overwrite: bool = False) -> int:
    if fmt not in FORMATS:
        raise UserError(f"unknown format '{fmt}' (one of: {', '.join(FORMATS)})")
    if Path(src).resolve() == Path(dst).resolve():
        raise UserError("IN and OUT are the same file", file=str(dst))
    return write_rows(read_llamakit(src), dst, fmt, overwrite=overwrite)


def export_path(out: str | os.PathLike, fmt: str) -> Path:
    """Where `--export FMT` of a generate-data run goes, beside OUT: answers.jsonl -> answers.sharegpt.json."""
    out = Path(out)
    stem = out.name.split(".")[0]
    suffix = {"hf": ".hf", "chatllama": ".chatllama.json", "sharegpt": ".sharegpt.json",
              "parquet": ".parquet"}.get(fmt, f".{fmt}.jsonl")
    return out.with_name(stem + suffix)
