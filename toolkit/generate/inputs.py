"""generate-data's input files: JSONL / JSON / Parquet rows in any format `toolkit.rows` reads, as PromptRows.

The whole file is checked before any request is sent; a bad row stops the run with `file:line: field 'x':
what is wrong` (`file (row N)` inside a JSON array or a Parquet file, which have no lines).
"""

from __future__ import annotations

import os
from typing import Any

from toolkit.io import located_rows
from toolkit.rows import PromptRow, parse_prompt_row


def read_table(path: str | os.PathLike) -> tuple[list[dict[str, Any]], list[int | None]]:
    """Rows of a JSONL / JSON / Parquet file or a `datasets` directory, and each row's line number (JSONL only)."""
    located = located_rows(path)
    return [row for row, _ in located], [loc.get("line") for _, loc in located]


def where(path: str | os.PathLike, index: int, line: int | None) -> dict[str, Any]:
    """UserError location kwargs: file:line for JSONL, 'file' plus 'row N' for JSON arrays."""
    return {"file": str(path), "line": line} if line is not None else {"file": f"{path} (row {index + 1})"}


def read_prompts(path: str | os.PathLike, limit: int | None = None) -> list[PromptRow]:
    """Every row of the file checked (so a bad row stops the run before any request), first `limit` kept."""
    rows, lines = read_table(path)
    prompts = [parse_prompt_row(row, where(path, i, lines[i]), i, lines[i]) for i, row in enumerate(rows)]
    return prompts[:limit] if limit else prompts
