"""The async engine under every `generate-data` sub-command.

A sub-command turns its input rows into `Job`s (an id plus an async `work(caller)` that makes a few
teacher calls and returns a row). `run_jobs` then:

- skips jobs whose id is already in the output (resume after a crash or `kill -9`); failed jobs are
  skipped too unless `retry_failed`;
- runs the rest on `concurrency` workers; every teacher call goes through `Caller.chat`: a semaphore
  (at most `concurrency` requests in flight), a requests/min + tokens/min limiter, a timeout, and
  retries with exponential back-off and jitter that honour `Retry-After` (a 429 pauses every worker);
- appends each finished row to the output (flush + fsync, in a writer thread that commits whatever
  rows are queued at once, so the event loop never waits on the disk); rows that fail after all
  retries go to `OUT.failed.jsonl` with their error,
  rows filtered out on purpose (ties, duplicates ...) to `OUT.dropped.jsonl`, so a re-run skips them;
- sums requests, retries, tokens and cost, and returns a `Summary` for the final table.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import queue
import random
import re
import threading
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

from toolkit.errors import UserError
from toolkit.io import RowWriter, read_existing
from toolkit.options import SEED_STRIDE
from toolkit.options import flag_field as _f

RETRY_AFTER_CAP_S = 300.0  # a server asking for more than five minutes is treated as asking for five


@dataclass
class RunOptions:
    """Every knob of the engine; each field declared with `_f` is one flag (toolkit/options.py)."""

    concurrency: int = _f(16, "Requests in flight at most.", min=1)
    rpm: float = _f(0.0, "Requests per minute at most (0: no limit).", min=0)
    # the token estimate is corrected by the usage each reply reports
    tpm: float = _f(0.0, "Tokens per minute at most, prompt + max_tokens estimated (0: no limit).", min=0)
    max_retries: int = _f(5, "Retries per request (429, 5xx, timeouts, resets, malformed or unparsable replies).",
                          min=0)  # after the first attempt
    timeout: float = _f(60.0, "Seconds per request.", min=0.001)
    backoff_base: float = _f(1.0, "First back-off in seconds (doubled per retry, with jitter; Retry-After wins).",
                             min=0)
    backoff_max: float = _f(60.0, "Longest back-off in seconds.", min=0)
    retry_failed: bool = _f(False, "Run again the rows recorded in OUT.failed.jsonl.", negatable=False)
    append: bool = _f(False, "Add rows to an OUT made with other settings (teacher, sampling, scorer ...); without "
                      "it such a run is refused (OUT.settings.json records each run's settings).", negatable=False)
    price_in: float = _f(0.0, "USD per million prompt tokens, for the cost line.", min=0)
    price_out: float = _f(0.0, "USD per million completion tokens.", min=0)
    show_progress: bool = True


# ---------------------------------------------------------------------------------------------- ids


def row_id(**parts: Any) -> str:
    """sha256 of everything that decides a row: teacher, template hash, inputs, sampling params, seed."""
    blob = json.dumps(parts, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


# ------------------------------------------------------------------------------------------ outputs


@dataclass
class OutputFiles:
    rows: Path  # finished rows, JSONL, append-only (the journal when the final format is Parquet)
    failed: Path  # rows that failed after all retries, with their error
    dropped: Path  # rows finished but filtered out (ties, below the margin, too similar ...)
    parquet: Path | None = None  # final Parquet file written from `rows` at the end
    settings: Path | None = None  # the generation settings every run onto this output used


def output_files(out: str | os.PathLike, fmt: str = "jsonl") -> OutputFiles:
    """`prefs.jsonl` -> prefs.jsonl, prefs.failed.jsonl, prefs.dropped.jsonl (Parquet: a JSONL journal beside)."""
    out = Path(out)
    if fmt not in ("jsonl", "parquet"):
        raise UserError(f"unknown output format '{fmt}' (jsonl or parquet)")
    journal = out.with_name(out.name + ".jsonl") if fmt == "parquet" else out
    stem = journal.name[: -len(".jsonl")] if journal.name.endswith(".jsonl") else journal.name
    return OutputFiles(journal, journal.with_name(f"{stem}.failed.jsonl"),
                       journal.with_name(f"{stem}.dropped.jsonl"), out if fmt == "parquet" else None,
                       journal.with_name(f"{stem}.settings.json"))


# --------------------------------------------------------------------------------------------- jobs


@dataclass
class Drop:
    """What a job returns for a row it finished but filters out (kept in OUT.dropped.jsonl)."""

    reason: str
    row: dict[str, Any]


EXTRA_ROWS = "extra_rows"  # key of a job's result: [(id suffix, row)] written after the job's own row


@dataclass
class Job:
    id: str
    inputs: dict[str, Any]  # kept in the failed record, so the user sees what failed
    # a row, a dropped row, or a row and the rows that go with it (`extra_rows`)
    work: Callable[[Caller], Awaitable[dict[str, Any] | Drop]]
    # The run's generation settings: the parts of the id that are not the row's input (teacher, templates,
    # sampling, judging ...). An output made with other settings is not extended without --append.
    settings: dict[str, Any] = field(default_factory=dict)


class Unparsable(ValueError):
    """A reply that arrived but could not be used (no score, empty text): retried like a failed call."""


class RequestFailed(Exception):
    """A request that failed after all its retries (or with an error that retrying cannot fix)."""

    def __init__(self, message: str, attempts: int):
        super().__init__(message)
        self.attempts = attempts


class FatalError(UserError):
    """An error every row would hit (bad key, unknown model): the run stops, finished rows stay."""


# ------------------------------------------------------------------------------------ rate limiting


class RateLimiter:
    """Requests/min and tokens/min token buckets (one second of burst) plus a shared pause for 429s."""

    def __init__(self, rpm: float = 0.0, tpm: float = 0.0):
        self.rates = {"requests": rpm / 60.0, "tokens": tpm / 60.0}
        self.level = {k: max(1.0, r) for k, r in self.rates.items()}  # start full
        self.stamp = time.monotonic()
        self.paused_until = 0.0

    def _refill(self, now: float) -> None:
        elapsed, self.stamp = now - self.stamp, now
        for kind, rate in self.rates.items():
            if rate > 0:
                self.level[kind] = min(max(1.0, rate), self.level[kind] + elapsed * rate)

    async def acquire(self, tokens: float) -> None:
        while True:
            now = time.monotonic()
            if now < self.paused_until:
                await asyncio.sleep(self.paused_until - now)
                continue
            self._refill(now)
            need = {"requests": 1.0, "tokens": float(tokens)}
            wait = 0.0
            for kind, rate in self.rates.items():
                if rate > 0:  # a request bigger than the bucket waits for a full bucket, then goes into debt
                    short = min(need[kind], max(1.0, rate)) - self.level[kind]
                    wait = max(wait, short / rate)
            if wait <= 0:
                for kind, rate in self.rates.items():
                    if rate > 0:
                        self.level[kind] -= need[kind]
                return
            await asyncio.sleep(wait)

    def refund(self, tokens: float) -> None:
        """Correct the token bucket once the real usage is known (positive: we took too many)."""
        if self.rates["tokens"] > 0:
            self.level["tokens"] += tokens

    def pause(self, seconds: float) -> None:
        self.paused_until = max(self.paused_until, time.monotonic() + seconds)


# ------------------------------------------------------------------------------------------ retries


def classify(err: BaseException) -> tuple[str, float | None]:
    """('retry' | 'fail' | 'fatal', Retry-After seconds) for an exception raised by a teacher call."""
    try:
        import openai
    except ImportError:  # pragma: no cover - openai is a dependency
        openai = None
    if isinstance(err, (FatalError, UserError)):
        return "fatal", None
    if isinstance(err, (asyncio.TimeoutError, TimeoutError, Unparsable, ConnectionError)):
        return "retry", None
    if openai is not None:
        if isinstance(err, openai.APIStatusError):
            status = err.status_code
            if status in (401, 403, 404):
                return "fatal", None
            if status in (408, 409, 425, 429) or status >= 500:
                return "retry", retry_after(err.response.headers if err.response is not None else {})
            return "fail", None
        if isinstance(err, (openai.APIConnectionError, openai.APIResponseValidationError)):
            return "retry", None
    if isinstance(err, (json.JSONDecodeError, ValueError)):  # malformed body, "no choices"
        return "retry", None
    name = type(err).__name__
    if any(word in name for word in ("Timeout", "Connect", "Protocol", "RemoteDisconnected", "ReadError")):
        return "retry", None  # transport errors of other client stacks (httpx, aiohttp) under LangChain
    return "fail", None


def retry_after(headers: Any) -> float | None:
    """Seconds from `retry-after-ms` or `retry-after` (seconds or an HTTP date); None when absent."""
    try:
        if headers.get("retry-after-ms"):
            return float(headers["retry-after-ms"]) / 1000.0
        value = headers.get("retry-after")
    except (AttributeError, ValueError, TypeError):
        return None
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def backoff_delay(attempt: int, base: float, cap: float, hint: float | None, rng: random.Random) -> float:
    """Exponential back-off with jitter; a server's Retry-After is a floor, never cut short."""
    exponential = min(cap, base * (2 ** attempt)) * rng.uniform(0.5, 1.0)
    if hint is not None:
        return min(RETRY_AFTER_CAP_S, hint) + rng.uniform(0.0, 0.1 * max(hint, 0.1))
    return exponential


def describe(err: BaseException) -> str:
    if isinstance(err, (asyncio.TimeoutError, TimeoutError)) and not str(err):
        return "TimeoutError: no answer within the timeout"
    from toolkit.console import redact

    text = redact(" ".join(str(err).split()))  # stored in OUT.failed.jsonl: never a URL's credentials
    return f"{type(err).__name__}: {text[:300]}" if text else type(err).__name__


# ------------------------------------------------------------------------------------------- caller


@dataclass
class Usage:
    requests: int = 0
    retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    errors: Counter = field(default_factory=Counter)


class Caller:
    """The one door to teachers: limits, timeouts, retries and usage for every request of a run."""

    def __init__(self, options: RunOptions, seed: int | None = None):
        self.options = options
        self.semaphore = asyncio.Semaphore(max(1, options.concurrency))
        self.limiter = RateLimiter(options.rpm, options.tpm)
        self.usage = Usage()
        self.rng = random.Random(seed)

    async def chat(self, teacher: Any, messages: list[dict[str, str]],
                   parse: Callable[[str], Any] | None = None, *, read: Callable[[Any], Any] | None = None,
                   **params: Any) -> tuple[Any, Any]:
        """(reply, parse(reply.text)) after retries; raises RequestFailed or FatalError.

        `parse` turns the reply text into what the caller needs and raises Unparsable when it cannot;
        such replies are retried like failed calls (with the seed moved on, so a sampling teacher
        answers differently). `read` does the same with the whole Reply (e.g. its logprobs)."""
        opts = self.options
        estimate = sum(len(m.get("content", "")) for m in messages) / 4 + (params.get("max_tokens") or 256)
        attempt = 0
        while True:
            await self.limiter.acquire(estimate)
            try:
                async with self.semaphore:
                    self.usage.requests += 1
                    reply = await asyncio.wait_for(teacher.chat(messages, **params), opts.timeout)
                used = (reply.prompt_tokens or 0) + (reply.completion_tokens or 0)
                self.usage.prompt_tokens += reply.prompt_tokens or 0
                self.usage.completion_tokens += reply.completion_tokens or 0
                if used:
                    self.limiter.refund(estimate - used)
                value = read(reply) if read is not None else parse(reply.text) if parse is not None else reply.text
                return reply, value
            except Exception as err:  # noqa: BLE001 - every failure is classified below
                verdict, hint = classify(err)
                self.usage.errors[type(err).__name__] += 1
                if verdict == "fatal":
                    if isinstance(err, UserError):
                        raise
                    raise FatalError(f"the teacher refused every request: {describe(err)}") from None
                if verdict == "fail" or attempt >= opts.max_retries:
                    raise RequestFailed(describe(err), attempt + 1) from None
                delay = backoff_delay(attempt, opts.backoff_base, opts.backoff_max, hint, self.rng)
                if hint is not None:
                    self.limiter.pause(delay)  # the server said when: everyone waits, not only this call
                attempt += 1
                self.usage.retries += 1
                if isinstance(err, Unparsable) and params.get("seed") is not None:  # the same seed: the same junk
                    params = {**params, "seed": params["seed"] + SEED_STRIDE}
                await asyncio.sleep(delay)


# ------------------------------------------------------------------------------------------ summary


@dataclass
class Summary:
    title: str
    requested: int = 0
    done: int = 0  # finished in this run
    skipped: int = 0  # already finished or dropped in an earlier run
    failed: int = 0  # failed in this run or kept failed from an earlier run (not retried)
    dropped: int = 0  # filtered out in this run
    elapsed_s: float = 0.0
    usage: Usage = field(default_factory=Usage)
    cost_usd: float = 0.0
    files: OutputFiles | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        u = self.usage
        data = {
            "rows requested": self.requested, "rows done": self.done, "rows skipped (done before)": self.skipped,
            "rows failed": self.failed, "rows dropped": self.dropped, "requests": u.requests,
            "retries": u.retries, "prompt tokens": u.prompt_tokens, "completion tokens": u.completion_tokens,
            "cost (USD)": round(self.cost_usd, 6),
            "requests/s": round(u.requests / self.elapsed_s, 2) if self.elapsed_s else 0.0,
            "rows/s": round(self.done / self.elapsed_s, 2) if self.elapsed_s else 0.0,
            "elapsed (s)": round(self.elapsed_s, 2),
        }
        if u.errors:
            data["errors"] = ", ".join(f"{k} x{v}" for k, v in u.errors.most_common())
        data.update(self.extra)
        if self.files is not None:
            data["output"] = str(self.files.parquet or self.files.rows)
            if self.failed:
                data["failed rows"] = f"{self.files.failed} (re-run with --retry-failed)"
        return data

    def as_json(self) -> dict[str, Any]:
        return {re.sub(r"[^a-z0-9]+", "_", k.lower()).strip("_"): v for k, v in self.as_dict().items()}


# ------------------------------------------------------------------------------------------- writer


class _Journal:
    """Rows, failed rows and dropped rows, each an append-only file, written by one thread.

    The thread takes every row queued since its last write, appends them and fsyncs once (group
    commit): a row is on disk a few milliseconds after its job ends, and the event loop never waits
    on the disk."""

    def __init__(self, files: OutputFiles):
        self.files = files
        self.rows = RowWriter(files.rows)  # takes the lock: a second process on the same output stops here
        self._others: dict[str, RowWriter] = {}
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="llamakit-writer", daemon=True)
        self._thread.start()

    def _writer(self, kind: str) -> RowWriter:
        if kind == "rows":
            return self.rows
        if kind not in self._others:
            self._others[kind] = RowWriter(getattr(self.files, kind))
        return self._others[kind]

    def _loop(self) -> None:
        stop = False
        while not stop:
            batch = [self._queue.get()]
            while True:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            by_kind: dict[str, list[dict]] = {}
            for item in batch:
                if item is None:
                    stop = True
                else:
                    by_kind.setdefault(item[0], []).extend(item[1])
            try:
                for kind, rows in by_kind.items():
                    self._writer(kind).write_many(rows)
            except BaseException as err:  # noqa: BLE001 - handed to the event loop, which stops the run
                self._error = err
                return

    def write(self, kind: str, *rows: dict) -> None:
        """Queue rows that reach the file together, in one group commit."""
        if self._error is not None:
            raise self._error
        self._queue.put((kind, rows))

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()
        for writer in (self.rows, *self._others.values()):
            writer.close()
        if self._error is not None:
            raise self._error


def check_settings(files: OutputFiles, settings: dict[str, Any], *, append: bool) -> None:
    """Refuse to extend an output made with other generation settings (the same prompts would get a second
    set of rows, which training then counts twice), unless `append`; record the settings of this run."""
    from toolkit.io import write_json

    settings = json.loads(json.dumps(settings, sort_keys=True, default=str))
    path = files.settings
    try:
        known = json.loads(path.read_text(encoding="utf-8"))["runs"] if path.is_file() else []
    except (OSError, ValueError, KeyError, TypeError):
        raise UserError("unreadable settings record; delete it only if OUT holds rows of one run",
                        file=str(path)) from None
    if settings in known:
        return
    if known and not append and files.rows.is_file() and files.rows.stat().st_size:
        changes = _differences(known[-1], settings)
        raise UserError(f"holds rows made with other settings ({changes}); pass --append to add rows made "
                        "with these settings to the same file, or choose another --out", file=str(files.rows))
    write_json(path, {"runs": [*known, settings]})


def _differences(old: Any, new: Any, prefix: str = "") -> str:
    """`judging.scorer: 'rules:length' -> 'rules:length,repetition'`, the first three differences."""
    found: list[str] = []

    def walk(a: Any, b: Any, key: str) -> None:
        if isinstance(a, dict) and isinstance(b, dict):
            for k in sorted(set(a) | set(b)):
                walk(a.get(k), b.get(k), f"{key}.{k}" if key else str(k))
        elif a != b:
            found.append(f"{key or 'settings'}: {a!r} -> {b!r}")

    walk(old, new, prefix)
    return "; ".join(found[:3]) + (f"; {len(found) - 3} more" if len(found) > 3 else "")


def _ids(path: Path) -> set[str]:
    return {r["id"] for r in read_existing(path) if isinstance(r.get("id"), str)}


def _compact_failed(path: Path, done: set[str]) -> int:
    """Keep one record per failed id that is still not done; return how many remain."""
    latest: dict[str, dict] = {}
    for record in read_existing(path):
        if isinstance(record.get("id"), str) and record["id"] not in done:
            latest[record["id"]] = record
    if not latest:
        path.unlink(missing_ok=True)
        return 0
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for record in latest.values():
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return len(latest)


@contextlib.contextmanager
def _progress(show: bool, title: str, total: int) -> Iterator[Callable[..., None]]:
    if not show or total == 0:
        yield lambda **_: None
        return
    from toolkit.console import progress

    with progress() as bar:
        task = bar.add_task(title, total=total, status="")
        yield lambda **kw: bar.update(task, **kw)


# ---------------------------------------------------------------------------------------------- run


async def run_jobs(jobs: list[Job], files: OutputFiles, options: RunOptions, title: str,
                   on_row: Callable[[dict[str, Any]], None] | None = None,
                   caller: Caller | None = None, stop: Callable[[], bool] | None = None) -> Summary:
    """Run the jobs not finished yet; every job ends as a row, a dropped row or a failed row.

    `stop()` is asked before each job starts; once it says True, jobs not started are left for later
    (self-instruct stops when it has enough instructions)."""
    start = time.perf_counter()
    summary = Summary(title, requested=len(jobs), files=files)
    journal = _Journal(files)  # lock first, then read what an earlier run left
    try:
        if jobs and files.settings is not None:
            check_settings(files, jobs[0].settings, append=options.append)
        done = _ids(files.rows) | _ids(files.dropped)
        failed_before = _ids(files.failed) - done
        todo: deque[Job] = deque()
        for job in jobs:
            if job.id in done:
                summary.skipped += 1
            elif job.id in failed_before and not options.retry_failed:
                summary.failed += 1
            else:
                todo.append(job)
        caller = caller or Caller(options)
        with _progress(options.show_progress, title, len(todo)) as advance:

            async def worker() -> None:
                while todo and not (stop is not None and stop()):
                    job = todo.popleft()
                    try:
                        result = await job.work(caller)
                    except (FatalError, UserError):
                        raise
                    except Exception as err:  # noqa: BLE001 - one row's failure never stops the others
                        attempts = getattr(err, "attempts", 1)
                        journal.write("failed", {"id": job.id, "error": describe(err) if not isinstance(
                            err, RequestFailed) else f"{err} (after {attempts} attempts)",
                            "attempts": attempts, "inputs": job.inputs,
                            "time": time.strftime("%Y-%m-%dT%H:%M:%S")})
                        summary.failed += 1
                    else:
                        if isinstance(result, Drop):
                            journal.write("dropped", {"id": job.id, "dropped": result.reason, **result.row})
                            summary.dropped += 1
                        else:
                            extras = result.pop(EXTRA_ROWS, [])
                            row = {"id": job.id, **result}
                            # the job's row (its id marks the job done) and its extra rows in one append: a
                            # kill never keeps the one without the others, nor writes an extra row twice
                            journal.write("rows", row, *({"id": f"{job.id}-{suffix}", **extra}
                                                         for suffix, extra in extras))
                            for suffix, _ in extras:
                                key = f"{suffix} rows"
                                summary.extra[key] = summary.extra.get(key, 0) + 1
                            summary.done += 1
                            if on_row is not None:
                                on_row(row)
                    advance(advance=1, status=f"[red]{summary.failed} failed" if summary.failed else "")

            workers = [asyncio.ensure_future(worker()) for _ in range(min(max(1, options.concurrency), len(todo)))]
            try:
                await asyncio.gather(*workers)
            finally:
                for w in workers:
                    w.cancel()
                await asyncio.gather(*workers, return_exceptions=True)
    finally:
        journal.close()
        summary.elapsed_s = time.perf_counter() - start
        summary.usage = caller.usage if caller else Usage()
        summary.cost_usd = (summary.usage.prompt_tokens * options.price_in
                            + summary.usage.completion_tokens * options.price_out) / 1e6
    if files.failed.exists():
        _compact_failed(files.failed, _ids(files.rows) | _ids(files.dropped))
    return summary


def finish(summary: Summary, *, as_json: bool = False) -> None:
    """The final table (stderr) or one JSON object (stdout); Parquet written from the journal."""
    from toolkit.console import console, emit_json, summary_table

    files = summary.files
    if files is not None and files.parquet is not None:
        from toolkit.generate.formats import write_rows

        write_rows(read_existing(files.rows), files.parquet, "parquet", overwrite=True)  # made from the journal
    if as_json:
        emit_json(summary.as_json())
    else:
        summary_table(summary.title, summary.as_dict())
        if summary.failed:
            console.print(f"[yellow]{summary.failed} row(s) failed; their errors are in "
                          f"{files.failed if files else ''};"
                          " run the same command with --retry-failed to try them again[/]")
