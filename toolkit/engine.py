"""Dynamic batching: requests that arrive within a short window share one `generate` call.

A single worker thread owns the model. Callers (the HTTP server, the in-process `hf:` teacher) submit
token ids and sampling settings and read events from an asyncio queue: text deltas as they are
produced, then the finished Completion (or the error that stopped the batch).
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from toolkit.generation import Completion, SamplingParams, generate


class QueueFull(Exception):
    """More requests are waiting than --max-queue allows."""


@dataclass
class _Request:
    prompt_ids: list[int]
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: bool = False

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

    async def stream(self, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[tuple[str, object]]:
        """Yield ("text", str) events, then one ("done", Completion); raises what generation raised."""
        if self._queue.qsize() >= self.max_queue:
            raise QueueFull(f"{self._queue.qsize()} requests are already waiting")
        request = _Request(list(prompt_ids), params, asyncio.get_running_loop())
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
        async for kind, value in self.stream(prompt_ids, params):
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
            batch = [r for r in self._next_batch() if not r.cancelled]
            if not batch:
                continue
            start = time.perf_counter()
            def on_text(row: int, text: str, batch: list[_Request] = batch) -> None:
                batch[row].push("text", text)

            try:
                completions = generate(self.model, self.tokenizer, [r.prompt_ids for r in batch],
                                       [r.params for r in batch], on_text=on_text,
                                       is_cancelled=lambda row, batch=batch: batch[row].cancelled)
            except Exception as err:  # noqa: BLE001 - handed to every waiting caller
                for r in batch:
                    r.push("error", err)
                continue
            self.stats.batches += 1
            self.stats.sequences += len(batch)
            self.stats.tokens += sum(c.completion_tokens for c in completions)
            self.stats.busy_s += time.perf_counter() - start
            for r, c in zip(batch, completions, strict=True):
                r.push("done", c)
