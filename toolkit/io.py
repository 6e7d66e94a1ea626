"""Files in and out: JSON/JSONL rows with line-numbered errors, crash-safe appends, atomic directories."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from toolkit.errors import UserError


def read_rows(path: str | os.PathLike, *, allow_empty: bool = False) -> list[dict[str, Any]]:
    """Rows of a JSONL file, a JSON array, or a JSON object holding one list; errors name file and line."""
    path = Path(path)
    if not path.is_file():
        raise UserError("no such file", file=str(path))
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise UserError(f"not UTF-8 text (byte {err.start})", file=str(path), line=line) from None
    stripped = text.lstrip()
    if not stripped:
        if allow_empty:
            return []
        raise UserError("file is empty", file=str(path))
    if stripped[0] == "[" or path.suffix == ".json":
        rows = _json_document(path, text)
        for number, row in enumerate(rows, start=1):
            if not isinstance(row, dict):
                raise UserError(f"row {number} is {type(row).__name__}, expected a JSON object", file=str(path))
    else:
        rows = []
        for line, row in _jsonl_rows(path, text):
            if not isinstance(row, dict):
                raise UserError(f"row is {type(row).__name__}, expected a JSON object", file=str(path), line=line)
            rows.append(row)
    if not rows and not allow_empty:
        raise UserError("file holds no rows", file=str(path))
    return rows


def _json_document(path: Path, text: str) -> list:
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as err:
        if text.lstrip().startswith("{") and "\n{" in text:
            raise UserError("looks like JSONL (one object per line) but the file is named .json",
                            file=str(path), line=err.lineno) from None
        raise UserError(f"invalid JSON: {err.msg}", file=str(path), line=err.lineno) from None
    if isinstance(doc, dict):
        lists = [v for v in doc.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise UserError("expected a JSON array of rows (or JSONL)", file=str(path))
        doc = lists[0]
    if not isinstance(doc, list):
        raise UserError("expected a JSON array of rows (or JSONL)", file=str(path))
    return doc


def _jsonl_rows(path: Path, text: str) -> Iterator[tuple[int, Any]]:
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"invalid JSON: {err.msg} (column {err.colno})", file=str(path), line=number) from None


def ensure_writable_dir(directory: str | os.PathLike) -> None:
    """Create `directory` (with parents) and prove a file can be made in it: a run whose output cannot be
    written fails now, in one line, instead of after hours of work when it saves."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".llamakit-probe-", dir=directory)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise UserError(f"cannot write here: {why(err)}", file=str(directory)) from None


def why(err: OSError) -> str:
    """An OSError in words a user can act on ("File exists" for a file blocking a directory says little)."""
    if isinstance(err, (FileExistsError, NotADirectoryError)):
        return f"'{err.filename}' is a file, not a directory" if err.filename else "a file is in the way"
    return err.strerror or str(err)


def require_str(row: dict, key: str, path: str | os.PathLike, line: int, *, allow_empty: bool = False) -> str:
    """A string field of a row, or a one-line error naming file, line and field."""
    if key not in row:
        raise UserError("missing", file=str(path), line=line, field=key)
    value = row[key]
    if not isinstance(value, str):
        raise UserError(f"expected a string, got {type(value).__name__}", file=str(path), line=line, field=key)
    if not allow_empty and not value.strip():
        raise UserError("empty string", file=str(path), line=line, field=key)
    return value


class RowWriter:
    """Append-only JSONL output: every row is flushed and fsync'd, so a kill -9 loses at most the row
    being written; a torn last line left by such a kill is cut off when the file is reopened.
    An exclusive lock keeps a second process from interleaving rows into the same file."""

    def __init__(self, path: str | os.PathLike):
        from filelock import FileLock, Timeout

        self.path = Path(path)
        parent = self.path.parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise UserError(f"cannot create output directory: {why(err)}", file=str(parent)) from None
        self._lock = FileLock(str(self.path) + ".lock")
        try:
            self._lock.acquire(timeout=0)
        except Timeout:
            raise UserError("another llamakit process is writing this file", file=str(self.path)) from None
        except OSError as err:
            raise UserError(f"cannot write here: {err.strerror}", file=str(parent)) from None
        try:
            drop_torn_tail(self.path)
            self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        except OSError as err:
            self._lock.release()
            raise UserError(f"cannot write: {err.strerror}", file=str(self.path)) from None

    def write(self, row: dict) -> None:
        self._append(json.dumps(row, ensure_ascii=False) + "\n")

    def write_many(self, rows: list[dict]) -> None:
        """Group commit: append whole lines, then one flush + fsync for all of them."""
        self._append("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))

    def _append(self, text: str) -> None:
        try:
            self._file.write(text)
            self._file.flush()
            os.fsync(self._file.fileno())
        except OSError as err:
            # Disk full, quota, a vanished mount: rows already fsync'd stay; a half-written last line is
            # dropped when the file is reopened.
            raise UserError(f"cannot write: {err.strerror or err}", file=str(self.path)) from None

    def close(self) -> None:
        try:
            self._file.close()
        except OSError:
            pass  # the write that failed already raised; closing must still release the lock
        finally:
            self._lock.release()

    def __enter__(self) -> RowWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def drop_torn_tail(path: Path) -> int:
    """Cut an unterminated or unparsable last line (left by a kill mid-write); return bytes removed."""
    if not path.is_file() or path.stat().st_size == 0:
        return 0
    with open(path, "rb+") as f:
        data = f.read()
        end = len(data)
        if data.endswith(b"\n"):
            last_start = data.rfind(b"\n", 0, end - 1) + 1
            try:
                json.loads(data[last_start:end])
                return 0
            except ValueError:
                cut = last_start
        else:
            cut = data.rfind(b"\n") + 1
        f.truncate(cut)
        return end - cut


def read_existing(path: str | os.PathLike) -> list[dict]:
    """Rows already in an output file (for resume), tolerating a torn last line."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike) -> Iterator[Path]:
    """Build a directory under a temporary name and rename it into place only when complete."""
    target = Path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_temps(target)
        # Not mkdtemp: its private 0700 mode would stay on the renamed directory; mkdir honours the umask.
        tmp = target.with_name(f".{target.name}.tmp-{_HOST}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        tmp.mkdir()
    except OSError as err:
        raise UserError(f"cannot write output: {why(err)}", file=str(target)) from None
    try:
        yield tmp
        if target.exists():
            backup = target.with_name(f".{target.name}.old")
            shutil.rmtree(backup, ignore_errors=True)
            os.replace(target, backup)
            os.replace(tmp, target)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


_HOST = socket.gethostname().replace("/", "_")


def _remove_stale_temps(target: Path) -> None:
    """Delete temp dirs that a killed process left beside `target` (a checkpoint's can be gigabytes).
    Only those of this host whose process is gone: another live writer's temp dir is never touched."""
    prefix = f".{target.name}.tmp-"
    for tmp in target.parent.glob(prefix + "*"):
        host, _, rest = tmp.name[len(prefix):].rpartition("-")[0].rpartition("-")
        if host != _HOST or not rest.isdigit() or _alive(int(rest)):
            continue
        shutil.rmtree(tmp, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Write JSON through a temp file and rename, so readers never see half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)
