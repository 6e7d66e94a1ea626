"""Terminal output: progress and tables go to stderr (rich), machine-readable results to stdout."""

from __future__ import annotations

import json
import os
import re
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

console = Console(stderr=True)


LOG_EVERY_S = 60.0  # a progress line in a log file (stderr not a terminal) at most this often


class _LoggedProgress(Progress):
    """A bar that draws nothing where stderr is a file (rich redraws terminals only), so a run under nohup or a
    scheduler prints one plain line per task at most every LOG_EVERY_S instead: name, done/total, elapsed, ETA."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._logged_at: dict[Any, float] = {}

    def update(self, task_id: Any, **kwargs: Any) -> None:
        super().update(task_id, **kwargs)
        self._log(task_id)

    def advance(self, task_id: Any, advance: float = 1) -> None:
        super().advance(task_id, advance)
        self._log(task_id)

    def _log(self, task_id: Any) -> None:
        now = time.monotonic()
        if now - self._logged_at.setdefault(task_id, now) < LOG_EVERY_S:
            return
        self._logged_at[task_id] = now
        task = next(t for t in self.tasks if t.id == task_id)
        done = f"{task.completed:g}/{task.total:g}" if task.total is not None else f"{task.completed:g}"
        left = f", ~{task.time_remaining:.0f} s left" if task.time_remaining is not None else ""
        status = f"  {task.fields['status']}" if task.fields.get("status") else ""
        self.console.print(f"{task.description}: {done} after {task.elapsed or 0:.0f} s{left}{status}",
                           markup=False, highlight=False)


def progress(transient: bool = False) -> Progress:
    """The one progress-bar style every long-running command uses."""
    kind = Progress if console.is_terminal else _LoggedProgress
    return kind(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[status]}"),
                console=console, transient=transient)


def is_main_rank() -> bool:
    """Whether this process prints what a run reports once: rank 0 of a distributed run (torchrun and accelerate
    launch set RANK; Accelerate sets it from MPI's variables too), or a process that is not part of one."""
    return os.environ.get("RANK", "0") == "0"


def summary_table(title: str, rows: Mapping[str, Any] | Iterable[tuple[str, Any]]) -> None:
    """A two-column table on stderr, printed by rank 0 only."""
    if not is_main_rank():
        return
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    for key, value in (rows.items() if isinstance(rows, Mapping) else rows):
        table.add_row(str(key), _fmt(value))
    console.print(table)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def emit_json(data: Any) -> None:
    """One JSON object on stdout, printed by rank 0 only (every rank of a run returns from the same command)."""
    if not is_main_rank():
        return
    sys.stdout.write(json.dumps(data, ensure_ascii=False, default=str) + "\n")
    sys.stdout.flush()


# ------------------------------------------------------------------ what a run leaves on disk, if stopped

_OUTPUTS: list[tuple[str | Callable[[], str], str]] = []


def note_output(kept: str | Callable[[], str], resume: str) -> None:
    """Record what this run writes, for the one line printed when SIGINT/SIGTERM stops it.

    `kept` says what stays on disk ("rows finished so far are kept in out.jsonl"; a callable is asked
    only then, e.g. to count the rows), `resume` how to go on ("run the same command again to resume"; "" when
    `kept` says it)."""
    _OUTPUTS.append((kept, resume))


def forget_outputs() -> None:
    _OUTPUTS.clear()


def interrupted_line(signal_name: str) -> str:
    """`interrupted by SIGTERM: <what is kept>; <how to resume>` from what the command noted."""
    kept, resumes = [], []
    for what, resume in _OUTPUTS:
        try:
            kept.append(what() if callable(what) else what)
        except Exception:  # noqa: BLE001 - the line must be printed even when counting fails
            continue
        if resume and resume not in resumes:
            resumes.append(resume)
    parts = [*kept, *resumes]
    return f"interrupted by {signal_name}" + (": " + "; ".join(parts) if parts else "")


# ------------------------------------------------------------------ secrets never printed or stored

_URL = re.compile(r"\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s'\"<>`]+")
# api_key, key, token, access_token, x-api-key, client_secret, password, sig ... (whole names, any case)
_SECRET_KEYS = re.compile(r"(?i)^(?:.*[_-])?(?:api[_-]?key|key|token|secret|password|passwd|pwd|sig|signature|auth|"
                          r"credentials?)$")


def redact_url(url: str) -> str:
    """`url` without credentials: user:password@ becomes ***@, and the values of query keys such as
    api_key=, key=, token= become ***. Anything that is not a URL comes back as it was."""
    from urllib.parse import urlsplit, urlunsplit

    try:
        parts = urlsplit(url)
    except ValueError:
        return url
    netloc = parts.netloc
    if "@" in netloc:
        netloc = "***@" + netloc.rpartition("@")[2]
    query = "&".join(_redact_pair(pair) for pair in parts.query.split("&")) if parts.query else parts.query
    if (netloc, query) == (parts.netloc, parts.query):
        return url  # nothing secret: exactly as given
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def _redact_pair(pair: str) -> str:
    name, eq, _value = pair.partition("=")
    return f"{name}=***" if eq and _SECRET_KEYS.match(name) else pair


def redact(text: str) -> str:
    """Every URL inside `text` through redact_url (error messages quote URLs from many libraries)."""
    def one(match: re.Match) -> str:
        url = match.group(0)
        body = url.rstrip(".,;:)]}")  # the sentence's punctuation, not the URL's
        return redact_url(body) + url[len(body):]

    return _URL.sub(one, text)
