"""Dynamic batching: requests that arrive within a short window share one `generate` call.

A single worker thread owns the model. Callers (the HTTP server, the in-process `hf:` teacher) submit
token ids and sampling settings and read events from an asyncio queue: text deltas as they are
produced, then the finished Completion (or the error that stopped that request).

One request never fails another: a row's settings are checked before it joins a batch, and when a batch
still fails, its rows are run again one by one so that only the row that fails alone gets the error.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from toolkit.generation import Completion, SamplingParams, check_params, generate


class QueueFull(Exception):
    """More requests are waiting than --max-queue allows."""


@dataclass
class _Request:
    prompt_ids: list[int]
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    wants_text: bool = True  # False: only the Completion is read; no text is pushed, so a retry is invisible
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: bool = False
    streamed: bool = False  # some text already went to the caller: a retry cannot take it back

    def push(self, kind: str, value: object) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))


@dataclass
class EngineStats:
    batches: int = 0
    sequences: int = 0
    tokens: int = 0
    busy_s: float = 0.0


class BatchingEngine:
    def __init__(self, model, tokenizer, max_batch: int = 32, wait_ms: float = 20, max_queue: int = 512):
        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.wait_s, self.max_queue = max_batch, wait_ms / 1000, max_queue
        self.stats = EngineStats()
        self._queue: queue.Queue[_Request] = queue.Queue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._work, name="llamakit-engine", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    @property
    def pending(self) -> int:
        return self._queue.qsize()

    async def stream(self, prompt_ids: list[int], params: SamplingParams, *,
                     text: bool = True) -> AsyncIterator[tuple[str, object]]:
        """Yield ("text", str) events (none when `text` is False), then one ("done", Completion); raises
        what generation raised for this request (ValueError for settings that cannot be sampled)."""
        if self._queue.qsize() >= self.max_queue:
            raise QueueFull(f"{self._queue.qsize()} requests are already waiting")
        request = _Request(list(prompt_ids), params, asyncio.get_running_loop(), wants_text=text)
        self._queue.put(request)
        finished = False
        try:
            while True:
                kind, value = await request.events.get()
                if kind == "error":
                    finished = True
                    raise value  # type: ignore[misc]
                yield kind, value
                if kind == "done":
                    finished = True
                    return
        finally:
            # The caller stopped listening (client disconnected): stop spending compute on this row.
            request.cancelled = not finished

    async def complete(self, prompt_ids: list[int], params: SamplingParams) -> Completion:
        async for kind, value in self.stream(prompt_ids, params, text=False):
            if kind == "done":
                return value  # type: ignore[return-value]
        raise RuntimeError("generation ended without a result")

    def _next_batch(self) -> list[_Request]:
        try:
            batch = [self._queue.get(timeout=0.2)]
        except queue.Empty:
            return []
        deadline = time.monotonic() + self.wait_s
        while len(batch) < self.max_batch:
            remaining = deadline - time.monotonic()
            try:
                batch.append(self._queue.get(timeout=max(remaining, 0)) if remaining > 0
                             else self._queue.get_nowait())
            except queue.Empty:
                break
        return batch

    def _work(self) -> None:
        while not self._stop.is_set():
            batch = [r for r in self._next_batch() if not r.cancelled and _admit(r)]
            if batch:
                self._run(batch)

    def _run(self, batch: list[_Request]) -> None:
        """Generate for `batch`; if the batch fails, retry its rows one by one so only the culprit fails."""
        start = time.perf_counter()

        def on_text(row: int, text: str) -> None:
            if batch[row].wants_text:
                batch[row].streamed = True
                batch[row].push("text", text)

        try:
            completions = generate(self.model, self.tokenizer, [r.prompt_ids for r in batch],
                                   [r.params for r in batch], on_text=on_text,
                                   is_cancelled=lambda row: batch[row].cancelled)
        except Exception as err:  # noqa: BLE001 - handed to the caller(s), the worker stays up
            if len(batch) == 1:
                batch[0].push("error", err)
                return
            for r in batch:
                if r.streamed:  # its text is already on the wire; a rerun would send it twice
                    r.push("error", err)
                elif not r.cancelled:
                    self._run([r])
            return
        self.stats.batches += 1
        self.stats.sequences += len(batch)
        self.stats.tokens += sum(c.completion_tokens for c in completions)
        self.stats.busy_s += time.perf_counter() - start
        for r, c in zip(batch, completions, strict=True):
            r.push("done", c)


def _admit(request: _Request) -> bool:
    """Check a request's settings before it joins a batch; a bad one gets its error alone."""
    try:
        check_params(request.params)
    except ValueError as err:
        request.push("error", err)
        return False
    return True
