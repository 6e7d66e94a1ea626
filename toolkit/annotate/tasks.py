"""Task files -> rank items: a prompt with K >= 2 candidate answers.

Accepted rows (JSONL / JSON), one item each:
    {"prompt": str, "candidates": [str | {"text": str, ...}, ...]}      (also "responses" for "candidates")
    {"prompt": str, "chosen": str, "rejected": str}                    (a preference pair: 2 candidates)
    {"prompt": str} or {"instruction": str, "input"?: str}             (prompt only: needs a teacher to write
                                                                        --num-candidates answers at load time)
An "id" (string) in the row becomes the item id; otherwise a hash of the prompt and candidates. "meta" is kept.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Any

from toolkit.errors import UserError

TEXT_KEYS = ("text", "content", "response", "completion")


@dataclass
class TaskRow:
    line: int
    id: str | None
    prompt: str
    candidates: list[str] | None  # None: prompt only, a teacher writes them
    meta: dict[str, Any] = field(default_factory=dict)


def _hash(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, ensure_ascii=False).encode()).hexdigest()[:16]


def _text(value: Any, path: str, line: int, field_name: str) -> str:
    if isinstance(value, dict):
        for key in TEXT_KEYS:
            if isinstance(value.get(key), str):
                value = value[key]
                break
    if not isinstance(value, str):
        raise UserError(f"expected a string (or an object with {'/'.join(TEXT_KEYS)}), got "
                        f"{type(value).__name__}", file=path, line=line, field=field_name)
    if not value.strip():
        raise UserError("empty answer", file=path, line=line, field=field_name)
    return value


def parse_task_row(row: dict[str, Any], path: str, line: int) -> TaskRow:
    """One task row -> TaskRow, or a one-line error naming file, row and field."""
    if isinstance(row.get("prompt"), str):
        prompt = row["prompt"]
    elif isinstance(row.get("instruction"), str):
        prompt = row["instruction"].strip()
        extra = row.get("input")
        if isinstance(extra, str) and extra.strip():
            prompt = f"{prompt}\n\n{extra.strip()}"
    elif "prompt" in row:
        raise UserError(f"expected a string, got {type(row['prompt']).__name__}", file=path, line=line,
                        field="prompt")
    else:
        raise UserError("missing (or 'instruction' for Alpaca rows)", file=path, line=line, field="prompt")
    if not prompt.strip():
        raise UserError("empty prompt", file=path, line=line, field="prompt")
    meta = dict(row["meta"]) if isinstance(row.get("meta"), dict) else {}
    row_id = row.get("id")
    if row_id is not None and not isinstance(row_id, (str, int)):
        raise UserError("expected a string", file=path, line=line, field="id")
    key = "candidates" if "candidates" in row else "responses" if "responses" in row else None
    candidates: list[str] | None
    if key is not None:
        values = row[key]
        if not isinstance(values, list):
            raise UserError(f"expected a list of answers, got {type(values).__name__}", file=path, line=line,
                            field=key)
        candidates = [_text(v, path, line, f"{key}[{i}]") for i, v in enumerate(values)]
        scores = row.get("scores")
        if scores is None and values and all(isinstance(v, dict) and "score" in v for v in values):
            scores = [v["score"] for v in values]
        if isinstance(scores, list) and len(scores) == len(candidates):
            meta["prior_scores"] = scores
    elif "chosen" in row or "rejected" in row:
        candidates = [_text(row.get("chosen"), path, line, "chosen"), _text(row.get("rejected"), path, line,
                                                                            "rejected")]
        meta["prior_ranking"] = [[0], [1]]
        if "margin" in row:
            meta["prior_margin"] = row["margin"]
    else:
        candidates = None
    if candidates is not None:
        if len(candidates) < 2:
            raise UserError(f"needs at least 2 answers to rank, got {len(candidates)}", file=path, line=line,
                            field=key or "candidates")
        if len(set(candidates)) < 2:
            raise UserError("all answers are the same text; nothing to rank", file=path, line=line,
                            field=key or "candidates")
        if len(candidates) > 9:
            raise UserError(f"at most 9 answers per prompt (keys 1-9), got {len(candidates)}", file=path,
                            line=line, field=key or "candidates")
    return TaskRow(line, None if row_id is None else str(row_id), prompt, candidates, meta)


def read_tasks(path: str | os.PathLike) -> list[TaskRow]:
    from toolkit.io import read_rows

    rows = read_rows(path)
    tasks = [parse_task_row(row, str(path), number) for number, row in enumerate(rows, start=1)]
    seen: dict[str, int] = {}
    for task in tasks:
        if task.id is not None:
            if task.id in seen:
                raise UserError(f"id '{task.id}' also on row {seen[task.id]}", file=str(path), line=task.line,
                                field="id")
            seen[task.id] = task.line
    return tasks


@dataclass
class GenerationSettings:
    num_candidates: int = 4
    max_tokens: int = 256
    temperature: float = 1.0
    seed: int = 0
    concurrency: int = 8


def check_tasks(path: str | os.PathLike, has_teacher: bool,
                settings: GenerationSettings | None = None) -> list[TaskRow]:
    """Read and validate a task file without touching any database: every row parses, and prompt-only rows
    have a teacher to write their candidates. The command runs this before it creates the database file."""
    tasks = read_tasks(path)
    settings = settings or GenerationSettings()
    prompt_only = next((t for t in tasks if t.candidates is None), None)
    if prompt_only is not None:
        if not has_teacher:
            raise UserError(f"row {prompt_only.line} has a prompt but no candidates; pass --teacher SPEC "
                            "(and --num-candidates K) to have a model write them", file=str(path),
                            line=prompt_only.line)
        if settings.num_candidates < 2:
            raise UserError("--num-candidates must be at least 2")
    return tasks


def load_tasks(db, path: str | os.PathLike, teacher_factory=None, settings: GenerationSettings | None = None,
               progress=None, tasks: list[TaskRow] | None = None) -> dict[str, int]:
    """Put the task file's items into the database; prompt-only rows get candidates from the teacher.

    Items already in the database are skipped (a re-run resumes candidate generation where it stopped).
    `tasks`: the file's rows as check_tasks returned them (read here when None)."""
    settings = settings or GenerationSettings()
    if tasks is None:
        tasks = check_tasks(path, teacher_factory is not None, settings)
    base = db.next_position()  # items keep the file's order, even when candidates arrive out of order
    ready: list[tuple] = []
    to_write: list[TaskRow] = []
    for task in tasks:
        meta = {**task.meta, "source": {"file": os.path.basename(str(path)), "line": task.line}}
        if task.candidates is not None:
            ready.append((task.id or _hash(task.prompt, task.candidates), task.prompt, task.candidates, meta,
                          base + task.line))
        else:
            to_write.append(task)
    added = db.add_items(ready) if ready else 0
    generated = 0
    if to_write:
        if teacher_factory is None:  # check_tasks refused this already when it read the rows
            raise UserError("prompt-only rows need --teacher SPEC", file=str(path), line=to_write[0].line)
        known = db.item_ids()
        pending = [t for t in to_write if _generated_id(t, settings) not in known]
        if pending:
            generated = asyncio.run(_generate(db, path, pending, teacher_factory, settings, base, progress))
    return {"rows": len(tasks), "added": added + generated, "generated": generated, "items": db.count_items()}


def _generated_id(task: TaskRow, settings: GenerationSettings) -> str:
    return task.id or _hash(task.prompt, settings.num_candidates, settings.max_tokens, settings.temperature,
                            settings.seed)


async def _generate(db, path, tasks: list[TaskRow], teacher_factory, settings: GenerationSettings, base: int,
                    progress=None) -> int:
    """K answers per prompt from the teacher (seeds seed..seed+K-1); each item stored as soon as it is whole."""
    from toolkit.teachers import close_teacher

    teacher = teacher_factory()
    gate = asyncio.Semaphore(settings.concurrency)
    done = 0

    async def one(task: TaskRow) -> None:
        nonlocal done
        messages = [{"role": "user", "content": task.prompt}]

        async def answer(j: int):
            async with gate:
                return await teacher.chat(messages, max_tokens=settings.max_tokens,
                                          temperature=settings.temperature, seed=settings.seed + j)

        try:
            replies = await asyncio.gather(*(answer(j) for j in range(settings.num_candidates)))
        except UserError:
            raise
        except Exception as err:  # noqa: BLE001 - any client error names the row
            raise UserError(f"the teacher failed on this prompt: {type(err).__name__}: {err}", file=str(path),
                            line=task.line) from None
        texts = [r.text for r in replies]
        meta = {**task.meta, "source": {"file": os.path.basename(str(path)), "line": task.line},
                "generated_by": getattr(teacher, "name", "teacher"), "candidate_meta": [r.meta for r in replies],
                "sampling": {"temperature": settings.temperature, "max_tokens": settings.max_tokens,
                             "seed": settings.seed}}
        db.add_items([(_generated_id(task, settings), task.prompt, texts, meta, base + task.line)])
        done += 1
        if progress is not None:
            progress(done, len(tasks))

    try:
        await asyncio.gather(*(one(t) for t in tasks))
    finally:
        await close_teacher(teacher)
    return done
