"""Dataset formats in and out (`llamakit data convert IN OUT --to FORMAT`, `--export` of generate-data).

Every row read is first made a llamakit row (`toolkit.rows.llamakit_row`) of one of four kinds:
    conversation  {"messages": [{"role", "content"}, ...]}
    preference    {"prompt": text | messages, "chosen": text, "rejected": text, ...}
    score         {"prompt": text | messages, "response": text, "score": number}
    prompt        {"prompt": text | messages}
from any of: llamakit rows, TRL conversational / standard / prompt-completion, Anthropic HH text,
ShareGPT, ChatLLaMA actor / reward rows, Alpaca, self-instruct seeds; JSONL, JSON, Parquet or a `datasets`
directory. Written as one of FORMATS; `hf` is a Hugging Face `datasets` directory (save_to_disk); Parquet and
`hf` keep messages as typed list<struct<role, content, ...>> columns.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from toolkit.errors import UserError
from toolkit.io import located_rows
from toolkit.rows import (
    Messages,
    dialogue_text,
    llamakit_row,
    prompt_messages,
    row_kind,
    split_last_answer,
    standard_answer,
    standard_prompt,
    to_hh,
)

FORMATS = ("llamakit", "parquet", "hf", "sharegpt", "chatllama", "trl-conversational", "trl-standard", "hh")
SHAREGPT_FROM = {"user": "human", "assistant": "gpt", "system": "system"}
TYPED = ("llamakit", "parquet", "hf", "trl-conversational")  # keep every message field (name, weight, tool calls)
KEPT = ("id", "meta")  # every format keeps these; preference rows also margin, score_chosen, score_rejected
PAIR_EXTRAS = ("margin", "score_chosen", "score_rejected")


# ------------------------------------------------------------------------------------------ reading


def read_llamakit(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of any supported format as llamakit rows; the first bad row stops with file:line (file (row N))."""
    out = []
    for row, loc in located_rows(path):
        if isinstance(row.get("meta"), str):  # Parquet / hf keep meta as JSON text
            try:
                row = {**row, "meta": json.loads(row["meta"])}
            except ValueError:
                pass
        out.append(llamakit_row(row, loc))
    return out


# ---------------------------------------------------------------------------------------- converting


def convert_row(row: dict[str, Any], fmt: str) -> dict[str, Any]:
    """One llamakit row -> `fmt` (raises UserError for a kind or a message field the format cannot hold)."""
    if fmt in ("llamakit", "parquet", "hf"):
        return row
    if fmt not in FORMATS:
        raise UserError(f"unknown format '{fmt}' (one of: {', '.join(FORMATS)})")
    what = row_kind(row)
    if fmt not in TYPED:
        for key in ("messages", "prompt"):
            if isinstance(row.get(key), list):
                _plain(row[key], key, fmt)
    keep = {k: row[k] for k in KEPT if k in row}
    extras = {k: row[k] for k in PAIR_EXTRAS if k in row}
    converted = {"sharegpt": _sharegpt, "chatllama": _chatllama, "trl-conversational": _trl_conversational,
                 "trl-standard": _trl_standard, "hh": _hh}[fmt](row, what)
    return {**keep, **converted, **(extras if what == "preference" else {})}


def _plain(messages: Messages, key: str, fmt: str) -> None:
    """Text formats hold a role and a text per turn: refuse (never drop) anything more."""
    for i, m in enumerate(messages):
        more = sorted(m.keys() - {"role", "content"}) or (["the tool role"] if m["role"] == "tool" else [])
        if more:
            raise UserError(f"{fmt} holds only role and content: field '{key}[{i}]' has {', '.join(more)} "
                            f"(write {', '.join(TYPED)} to keep it)")


def _ending_answer(messages: Messages, fmt: str) -> tuple[Messages, str]:
    if messages[-1]["role"] != "assistant":
        raise UserError(f"{fmt} holds conversations ending with the assistant's answer")
    return split_last_answer(messages)


def _sharegpt(row: dict[str, Any], what: str) -> dict[str, Any]:
    if what != "conversation":
        raise UserError(f"sharegpt holds conversations, not {what} rows")
    return {"conversations": [{"from": SHAREGPT_FROM[m["role"]], "value": m["content"]} for m in row["messages"]]}


def _chatllama(row: dict[str, Any], what: str) -> dict[str, Any]:
    if what == "conversation":
        history, answer = _ending_answer(row["messages"], "chatllama")
        return {"user_input": dialogue_text(history), "completion": answer}
    if what == "score":
        return {"user_input": dialogue_text(row["prompt"]), "completion": row["response"], "score": row["score"]}
    if what == "prompt":
        return {"user_input": dialogue_text(row["prompt"])}
    raise UserError("chatllama has actor (conversation), reward (score) and rlhf (prompt) rows; "
                    "preference rows convert to trl-* or hh")


def _trl_conversational(row: dict[str, Any], what: str) -> dict[str, Any]:
    if what == "conversation":
        return {"messages": row["messages"]}
    prompt = prompt_messages(row["prompt"])
    if what == "preference":
        return {"prompt": prompt, "chosen": [{"role": "assistant", "content": row["chosen"]}],
                "rejected": [{"role": "assistant", "content": row["rejected"]}]}
    if what == "score":
        return {"prompt": prompt, "completion": [{"role": "assistant", "content": row["response"]}],
                "score": row["score"]}
    return {"prompt": prompt}


def _trl_standard(row: dict[str, Any], what: str) -> dict[str, Any]:
    """TRL tokenises prompt + completion as one text: the HH prompt ends with the assistant's cue and every answer
    starts with the separator (`toolkit.rows.standard_prompt`)."""
    if what == "conversation":
        history, answer = _ending_answer(row["messages"], "trl-standard")
        return {"prompt": standard_prompt(history), "completion": standard_answer(answer)}
    prompt = standard_prompt(prompt_messages(row["prompt"]))
    if what == "preference":
        return {"prompt": prompt, "chosen": standard_answer(row["chosen"]),
                "rejected": standard_answer(row["rejected"])}
    if what == "score":
        return {"prompt": prompt, "completion": standard_answer(row["response"]), "score": row["score"]}
    return {"prompt": prompt}


def _hh(row: dict[str, Any], what: str) -> dict[str, Any]:
    if what == "preference":
        prompt = prompt_messages(row["prompt"])
        return {"chosen": to_hh([*prompt, {"role": "assistant", "content": row["chosen"]}]),
                "rejected": to_hh([*prompt, {"role": "assistant", "content": row["rejected"]}])}
    if what == "conversation":
        return {"text": to_hh(row["messages"])}
    raise UserError(f"hh holds preference pairs and dialogues, not {what} rows")


def arrow_table(rows: list[dict[str, Any]]) -> Any:
    """Rows as a typed Arrow table: messages as list<struct<role, content, ...>> (the fields the rows use), a prompt
    column that mixes text and messages as messages throughout (read back, one user message is its text again),
    meta (free-form, unlike every other column) as JSON text."""
    import pyarrow as pa

    mixed = len({isinstance(r["prompt"], list) for r in rows if "prompt" in r}) > 1
    typed = [{k: (json.dumps(v, ensure_ascii=False) if k == "meta" else
                  prompt_messages(v) if k == "prompt" and mixed else v) for k, v in row.items()} for row in rows]
    columns = list(dict.fromkeys(k for row in typed for k in row))  # every row's keys, not only the first's
    try:
        return pa.table({k: pa.array([row.get(k) for row in typed]) for k in columns})
    except (pa.ArrowInvalid, pa.ArrowTypeError) as err:
        raise UserError(f"rows do not fit one Arrow schema: {' '.join(str(err).split())}") from None


def write_rows(rows: Iterable[dict[str, Any]], path: str | os.PathLike, fmt: str, *, overwrite: bool = False,
               source: str | os.PathLike | None = None) -> int:
    """Write llamakit rows as `fmt` (JSONL, or a JSON array when the name ends in .json). An existing `path`
    is replaced only with `overwrite` (an `hf` directory only when it is a dataset llamakit wrote). A row the
    format cannot hold stops it before anything is written, naming the row (of `source`)."""
    from toolkit.io import claim_output_dir, ensure_writable_dir, require_new_file, why

    path = Path(path)
    if fmt == "hf":
        claim_output_dir(path, "hf-dataset", overwrite=overwrite)
    else:
        require_new_file(path, overwrite=overwrite)
    out = []
    for n, row in enumerate(rows, start=1):
        try:
            out.append(convert_row(row, fmt))
        except UserError as err:
            raise UserError(f"row {n}: {err}", file=None if source is None else str(source)) from None
    ensure_writable_dir(path.parent)
    try:
        _write(out, path, fmt, overwrite)
    except OSError as err:  # disk full, quota: the target is untouched (each format writes a temp, then renames)
        raise UserError(f"cannot write: {why(err)}", file=str(path)) from None
    return len(out)


def _write(out: list[dict[str, Any]], path: Path, fmt: str, overwrite: bool) -> None:
    from toolkit.io import atomic_dir

    if fmt == "parquet":
        import pyarrow.parquet as pq

        tmp = path.with_name(f".{path.name}.tmp")
        pq.write_table(arrow_table(out), tmp)
        os.replace(tmp, path)
    elif fmt == "hf":
        import datasets

        datasets.disable_progress_bars()
        table = arrow_table(out)
        with atomic_dir(path, "hf-dataset", overwrite=overwrite) as tmp:
            datasets.Dataset(table).save_to_disk(str(tmp))
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
    return write_rows(read_llamakit(src), dst, fmt, overwrite=overwrite, source=src)


def export_path(out: str | os.PathLike, fmt: str) -> Path:
    """Where `--export FMT` of a generate-data run goes, beside OUT: answers.jsonl -> answers.sharegpt.json."""
    out = Path(out)
    stem = out.name.split(".")[0]
    suffix = {"hf": ".hf", "chatllama": ".chatllama.json", "sharegpt": ".sharegpt.json",
              "parquet": ".parquet"}.get(fmt, f".{fmt}.jsonl")
    return out.with_name(stem + suffix)
