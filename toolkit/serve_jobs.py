"""What both generation routes of `llamakit serve` do with checked requests: fit them in the context, queue
them on the engine (all or none), wait unless the client hangs up, and merge streamed events."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace

from fastapi import Request

from toolkit.engine import BatchingEngine, QueueFull
from toolkit.generation import Completion, SamplingParams
from toolkit.serve_params import APIError, ServeLimits


@dataclass
class Served:
    """The model behind the routes and what they need to know about it."""
    engine: BatchingEngine
    name: str  # the id /v1/models reports and responses carry
    names: frozenset[str]  # every `model` a request may ask for
    limits: ServeLimits
    context: int  # positions the model has
    vocab: int  # width of its logits
    started: int


Job = tuple[list[int], SamplingParams]


def fit(served: Served, prompt_ids: list[int], params: SamplingParams, max_tokens_given: bool, n: int,
        param: str) -> list[Job]:
    """`n` jobs for one prompt, each with its own seed, their budget cut to the room the context leaves; a
    max_tokens asked for explicitly that does not fit is OpenAI's context_length_exceeded."""
    room = served.context - len(prompt_ids)
    if room < 1 or (max_tokens_given and params.max_new_tokens > room):
        raise APIError(400, f"this model's maximum context length is {served.context} tokens; the {param} take "
                            f"{len(prompt_ids)} and max_tokens asks for {params.max_new_tokens}",
                       param=param, code="context_length_exceeded")
    return [(prompt_ids, choice_params(params, i, room)) for i in range(n)]


def choice_params(params: SamplingParams, index: int, room: int) -> SamplingParams:
    # n choices differ but stay reproducible; mod 2**64 keeps seed + index in torch's range, and torch
    # already reads a negative seed s as s + 2**64, so every in-range seed gives the same text as before.
    seed = None if params.seed is None else (params.seed + index) % 2**64
    return replace(params, seed=seed, max_new_tokens=min(params.max_new_tokens, room))


def check_capacity(engine: BatchingEngine, jobs: int) -> None:
    if engine.pending + jobs > engine.max_queue:
        raise APIError(503, "server is busy; retry later", type_="server_overloaded", headers={"Retry-After": "1"})


async def complete_all(request: Request, engine: BatchingEngine, jobs: list[Job]) -> list[Completion]:
    """Every job's Completion; a failure of this request's own rows is its 500 (the others went on)."""
    try:
        return await _unless_disconnected(request, asyncio.gather(*(engine.complete(p, s) for p, s in jobs)))
    except QueueFull as err:
        raise APIError(503, f"server is busy: {err}", type_="server_overloaded",
                       headers={"Retry-After": "1"}) from None
    except APIError:
        raise
    except Exception as err:  # noqa: BLE001 - this request's own failure; the others went on
        raise APIError(500, f"generation failed: {err}", type_="server_error") from None


async def _unless_disconnected(request: Request, work):
    """Await `work`, cancelling it (and so its rows in the engine) if the client hangs up first: a client
    that timed out and retries must not leave its abandoned generation queued ahead of the retry."""
    task = asyncio.ensure_future(work)
    while True:
        done, _ = await asyncio.wait({task}, timeout=0.5)
        if done:
            return task.result()
        if await request.is_disconnected():
            task.cancel()
            raise APIError(499, "client closed the request")


async def events(engine: BatchingEngine, jobs: list[Job]) -> AsyncIterator[tuple[int, str, object]]:
    """(job index, "text" | "done" | "error", value) as the jobs produce them, until every job ended; the
    jobs still running are cancelled when the caller stops listening."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, prompt_ids: list[int], params: SamplingParams) -> None:
        try:
            async for kind, value in engine.stream(prompt_ids, params):
                await queue.put((index, kind, value))
        except Exception as err:  # noqa: BLE001 - reported in the stream, the server stays up
            await queue.put((index, "error", err))

    tasks = [asyncio.create_task(pump(i, p, s)) for i, (p, s) in enumerate(jobs)]
    try:
        finished = 0
        while finished < len(jobs):
            event = await queue.get()
            finished += event[1] in ("done", "error")
            yield event
    finally:
        for t in tasks:
            t.cancel()


def sse(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def sse_error(err: object) -> str:
    return sse({"error": {"message": str(err), "type": "server_error", "param": None, "code": None}})


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}
