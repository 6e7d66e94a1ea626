"""Files in and out: rows of JSONL / JSON / Parquet / `datasets` dirs with row-numbered errors, crash-safe
appends, atomic directories."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from toolkit.errors import BadRow, UserError

Loc = dict[str, Any]  # UserError keywords naming a row: {"file", "line"} in JSONL, {"file": "F (row N)"} elsewhere
DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".txt", ".csv", ".arrow")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def read_rows(path: str | os.PathLike, *, allow_empty: bool = False) -> list[dict[str, Any]]:
    """Rows of a JSONL file, a JSON array (or a JSON object holding one list), a Parquet file or a `datasets`
    save_to_disk directory; errors name file and line (row for the formats without lines)."""
    return [row for row, _ in located_rows(path, allow_empty=allow_empty)]


def located_rows(path: str | os.PathLike, *, allow_empty: bool = False,
                 bad_lines: list[str] | None = None) -> list[tuple[dict[str, Any], Loc]]:
    """`read_rows`, each row with its place for errors: file and line in JSONL, file and 1-based row number in a
    JSON array, a Parquet file or a `datasets` directory. Given a `bad_lines` list, a JSONL line that is not a
    JSON object (a row cut by a killed writer), or a JSON array's element that is not, goes there as its one-line
    error instead of stopping the read.

    Parquet and `datasets` columns are typed: a column a row does not have reads as null there, so nulls are
    dropped and such a row reads as the JSON row it was written from. A DatasetDict directory with one split is
    that split; with several, the error asks for one (DIR/SPLIT is a dataset directory itself)."""
    path = Path(path)
    if path.is_dir():
        rows = _without_nulls(_datasets_dir(path))
    elif not path.is_file():
        raise UserError(_missing(path), file=str(path))
    elif _is_parquet(path):
        rows = _without_nulls(_parquet(path))
    else:
        return _json_rows(path, allow_empty, bad_lines)
    if not rows and not allow_empty:
        raise UserError("holds no rows", file=str(path))
    return [(row, {"file": f"{path} (row {n})"}) for n, row in enumerate(rows, start=1)]


def _missing(path: Path) -> str:
    """"no such file", or, for what looks like a Hub dataset id, how to get it: nothing is ever fetched."""
    name = str(path)
    if not _HUB_ID.fullmatch(name) or path.suffix in DATA_SUFFIXES or Path(name.split("/")[0]).exists():
        return "no such file"
    stem = name.split("/")[1]
    return (f"no such file or directory; '{name}' looks like a Hugging Face Hub dataset id, and llamakit never "
            f"downloads: download it first, e.g. python -c \"import datasets; datasets.load_dataset('{name}', "
            f"split='train').to_json('{stem}.jsonl')\" (or huggingface-cli download --repo-type dataset {name} "
            f"--local-dir {stem}), then pass the file")


def _is_parquet(path: Path) -> bool:
    with open(path, "rb") as f:
        return path.suffix == ".parquet" or f.read(4) == b"PAR1"


def _parquet(path: Path) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path).to_pylist()
    except Exception as err:  # noqa: BLE001 - pyarrow raises many kinds
        raise UserError(f"cannot read Parquet: {' '.join(str(err).split())}", file=str(path)) from None


def _datasets_dir(path: Path) -> list[dict[str, Any]]:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as err:
        raise UserError(f"not a `datasets` save_to_disk directory ({' '.join(str(err).split())})",
                        file=str(path)) from None
    if isinstance(loaded, datasets.DatasetDict):
        splits = list(loaded)
        if len(splits) != 1:
            example = path / ("train" if "train" in splits else splits[0])
            raise UserError(f"holds the splits {', '.join(splits)}: pass one of them, e.g. {example}",
                            file=str(path))
        loaded = loaded[splits[0]]
    return loaded.data.table.to_pylist()


def _without_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value


def _json_rows(path: Path, allow_empty: bool, bad_lines: list[str] | None) -> list[tuple[dict[str, Any], Loc]]:
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
    rows: list[tuple[dict[str, Any], Loc]] = []
    if stripped[0] == "[" or path.suffix == ".json":
        for number, row in enumerate(_json_document(path, text), start=1):
            if not isinstance(row, dict):
                error = BadRow(f"row {number} is {type(row).__name__}, expected a JSON object", file=str(path))
                if bad_lines is None:
                    raise error
                bad_lines.append(str(error))
                continue
            rows.append((row, {"file": f"{path} (row {number})"}))
    else:
        for line, row in _jsonl_rows(path, text, bad_lines):
            if not isinstance(row, dict):
                error = BadRow(f"row is {type(row).__name__}, expected a JSON object", file=str(path), line=line)
                if bad_lines is None:
                    raise error
                bad_lines.append(str(error))
                continue
            rows.append((row, {"file": str(path), "line": line}))
    if not rows and bad_lines:
        raise UserError(f"no good row: all {len(bad_lines)} set aside, the first: {bad_lines[0]}", file=str(path))
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


def _jsonl_rows(path: Path, text: str, bad_lines: list[str] | None = None) -> Iterator[tuple[int, Any]]:
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as err:
            error = BadRow(f"invalid JSON: {err.msg} (column {err.colno})", file=str(path), line=number)
            if bad_lines is None:
                raise error from None
            bad_lines.append(str(error))


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


MIN_FREE_BYTES = 1 << 20


def require_room(path: Path) -> None:
    """Fail before any work when rows could not be kept: the output is a device or directory (/dev/full, /dev/null)
    rather than a regular file, or the disk holding it is full."""
    if path.exists() and not path.is_file():
        raise UserError("not a regular file (a device or a directory): rows cannot be kept there", file=str(path))
    try:
        stats = os.statvfs(path.parent)
    except OSError:
        return  # the lock or the open that follows names the real problem
    if stats.f_blocks and stats.f_bavail * stats.f_frsize < MIN_FREE_BYTES:  # /proc has no blocks at all
        raise UserError(f"no space left on the device ({stats.f_bavail * stats.f_frsize // 1024} kB free)",
                        file=str(path))


class RowWriter:
    """Append-only JSONL output: every row is flushed and fsync'd, so a kill -9 loses at most the row
    being written; a torn last line left by such a kill is cut off when the file is reopened.
    An exclusive lock (flock on OUT.lock, deleted again on close) keeps a second process from interleaving
    rows into the same file."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        parent = self.path.parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise UserError(f"cannot create output directory: {why(err)}", file=str(parent)) from None
        require_room(self.path)
        self._lock_path = Path(str(self.path) + ".lock")
        self._lock_fd = self._lock()
        try:
            drop_torn_tail(self.path)
            self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        except OSError as err:
            self._unlock()
            raise UserError(f"cannot write: {err.strerror}", file=str(self.path)) from None

    def _lock(self) -> int:
        """Take OUT.lock at once or fail: "another llamakit process is writing this file" only when one is;
        a place where no file can be made (/proc, a read-only mount) is "cannot write here".

        close() deletes OUT.lock while still holding it, so a writer that opened the file just before may
        then lock a file no longer at that path while a third process locks a new one: both would write.
        Hence a lock counts only while the path still names the file locked; otherwise try again."""
        import errno
        import fcntl

        flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
        for _ in range(100):
            try:
                fd = os.open(self._lock_path, flags, 0o644)
            except OSError as err:
                reason = (f"cannot create files in '{self.path.parent}'" if isinstance(err, FileNotFoundError)
                          and self.path.parent.is_dir() else why(err))
                raise UserError(f"cannot write here: {reason}", file=str(self.path)) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                os.close(fd)
                if err.errno in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES):
                    raise UserError("another llamakit process is writing this file", file=str(self.path)) from None
                raise UserError(f"cannot lock files here: {why(err)}", file=str(self.path)) from None
            if self._names(fd):
                return fd
            os.close(fd)  # its holder deleted it after we opened it: lock what the path names now
        raise UserError("another llamakit process is writing this file", file=str(self.path))

    def _names(self, fd: int) -> bool:
        """Whether OUT.lock is (still) the file open as `fd`."""
        try:
            here, there = os.fstat(fd), os.stat(self._lock_path, follow_symlinks=False)
        except OSError:
            return False
        return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)

    def _unlock(self) -> None:
        """Delete OUT.lock, then let go of it: no lock file is left beside a finished output. Idempotent."""
        fd, self._lock_fd = self._lock_fd, -1
        if fd < 0:
            return
        try:
            if self._names(fd):
                os.unlink(self._lock_path)
        except OSError:
            pass  # a lock file left behind is harmless: the next writer locks it again
        finally:
            os.close(fd)  # closing the descriptor drops the flock

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
            self._unlock()

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


MANIFEST = "llamakit-manifest.json"  # {"kind": ...} at the top of every directory llamakit writes


def output_kind(directory: str | os.PathLike) -> str | None:
    """What llamakit output `directory` holds ("reward-model", "sft-run" ...), or None when it is not one.
    Directories written before the manifest existed are recognised by their files."""
    directory = Path(directory)
    try:
        kind = json.loads((directory / MANIFEST).read_text(encoding="utf-8")).get("kind")
        if isinstance(kind, str):
            return kind
    except (OSError, ValueError, AttributeError):
        pass
    if (directory / "reward_config.json").is_file():
        return "reward-model"
    if (directory / "dataset_info.json").is_file() and (directory / "state.json").is_file():
        return "hf-dataset"
    if (directory / "manifest.json").is_file() and (directory / "state.json").is_file():
        return "checkpoint"
    if (directory / "metrics.jsonl").is_file() or (directory / "checkpoints").is_dir():
        return "rlhf-run" if (directory / "samples.jsonl").is_file() else "sft-run"
    return None


def claim_output_dir(target: str | os.PathLike, kind: str, *, overwrite: bool = False) -> None:
    """Refuse, before any work, an output directory whose contents would be lost: a directory that is not
    empty may only be replaced when it is this command's own earlier output and `overwrite` says so."""
    target = Path(target)
    if not target.exists():
        return
    if not target.is_dir():
        raise UserError("exists and is not a directory; choose another --out", file=str(target))
    try:
        empty = all(entry.name == MANIFEST for entry in target.iterdir())  # a run that wrote nothing yet
    except OSError as err:
        raise UserError(f"cannot read: {why(err)}", file=str(target)) from None
    if empty:
        return
    found = output_kind(target)
    if found is None:
        raise UserError("directory is not empty and was not written by llamakit; nothing was changed: "
                        "choose another --out", file=str(target))
    if found != kind:
        raise UserError(f"holds a {found}, not a {kind}; nothing was changed: choose another --out",
                        file=str(target))
    if not overwrite:
        raise UserError(f"holds a {kind} from an earlier run; pass --overwrite to replace it or choose another "
                        "--out", file=str(target))


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike, kind: str, *, overwrite: bool = False) -> Iterator[Path]:
    """Build a directory under a temporary name and rename it into place only when complete.

    An existing `target` is replaced only as `claim_output_dir` allows; when it was taken by something
    else while the work ran, the finished output is kept beside it and the error names where."""
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
        if not (tmp / MANIFEST).is_file():
            write_json(tmp / MANIFEST, {"kind": kind})
        try:
            claim_output_dir(target, kind, overwrite=overwrite)
        except UserError as err:
            beside = _free_name(target)
            os.replace(tmp, beside)
            raise UserError(f"{err}; the new output was written beside it: {beside}") from None
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


def _free_name(target: Path) -> Path:
    n = 2
    while target.with_name(f"{target.name}-{n}").exists():
        n += 1
    return target.with_name(f"{target.name}-{n}")


def claim_run_dir(out: str | os.PathLike, kind: str, *, resume: bool, overwrite: bool) -> None:
    """A training run's --out (metrics, checkpoints, model): new, empty, or this kind's own earlier run
    (continued with `resume`, replaced with `overwrite`). Checks only; every process may call it."""
    out = Path(out)
    if resume and overwrite:
        raise UserError("--resume continues the run in --out and --overwrite replaces it: choose one")
    if resume:
        found = output_kind(out) if out.is_dir() and any(out.iterdir()) else kind
        if found != kind:
            raise UserError(f"--resume: holds {'a ' + found if found else 'files llamakit did not write'}, "
                            f"not a {kind}; nothing was changed", file=str(out))
        return
    try:
        claim_output_dir(out, kind, overwrite=overwrite)
    except UserError as err:
        if output_kind(out) == kind and not overwrite:
            raise UserError(f"'{out}' already holds a run; pass --resume to continue it, --overwrite to replace "
                            "it, or choose another --out") from None
        raise err from None


def start_run_dir(out: str | os.PathLike, kind: str, *, overwrite: bool) -> None:
    """After `claim_run_dir`, on the main process: empty an earlier run being replaced, mark the directory."""
    out = Path(out)
    if overwrite and out.is_dir() and output_kind(out) == kind:
        for entry in out.iterdir():
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
    out.mkdir(parents=True, exist_ok=True)
    if not (out / MANIFEST).is_file():
        write_json(out / MANIFEST, {"kind": kind})


def require_new_file(path: str | os.PathLike, *, overwrite: bool = False) -> None:
    """Refuse to replace a file the user already has, unless `overwrite` says so."""
    path = Path(path)
    if path.is_dir():
        raise UserError("is a directory; give a file name", file=str(path))
    if path.exists() and not overwrite:
        raise UserError("exists already; pass --overwrite to replace it or choose another name", file=str(path))


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
