"""`llamakit serve`: an OpenAI-compatible HTTP API for any local causal LM.

Routes: GET /health, GET /v1/models, POST /v1/chat/completions (plain and server-sent-event streaming).
Concurrent requests are batched by the engine; every bad request gets a 4xx with an OpenAI-style body.

What is defended, on every route (/health included):
- DNS rebinding: the Host header must name this server (loopback names, IP literals, --host,
  --allowed-hosts; `*` admits any), else 421.
- Cross-site requests from a web page: a request carrying an Origin other than this server's own gets 403,
  and a POST body must be `application/json` exactly (415 otherwise: `text/plain`, which a page may send
  without asking first, is refused even with `charset=application/json` appended).
- The key (when set) is a bearer token, scheme case-insensitive (RFC 7235), compared in constant time.
- One request never fails another: every sampling field is checked (finite numbers, ranges, a seed that
  fits int64) before the request joins a batch, and the engine isolates a row that still fails; that
  request alone gets a 500 (or an error event in its stream).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import math
import time
import uuid
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from toolkit.chat_format import context_length, encode_chat
from toolkit.engine import BatchingEngine, QueueFull
from toolkit.errors import UserError
from toolkit.generation import SamplingParams
from toolkit.netutil import allowed_hosts, host_allowed, is_json_media_type, listen_socket, same_origin
from toolkit.rows import check_messages


@dataclass
class ServeLimits:
    max_tokens: int = 1024  # cap on max_tokens per choice
    max_n: int = 8
    max_body_bytes: int = 1_000_000
    max_stop: int = 4
    max_top_logprobs: int = 20  # OpenAI's limit


class APIError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None,
                 type_: str = "invalid_request_error", code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type_, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class ChatRequest:
    messages: list[dict[str, str]]
    params: SamplingParams
    n: int
    stream: bool
    include_usage: bool
    max_tokens_given: bool
    logprobs: bool = False


# OpenAI documents `seed` as an int64; torch's generator takes it (choice i uses seed + i, wrapped mod 2**64).
SEED_MIN, SEED_MAX = -2**63, 2**63 - 1


def _number(body: dict, key: str, kind: type, default, low=None, high=None):
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
        raise APIError(400, f"'{key}' must be {'a number' if kind is float else 'an integer'}", param=key)
    if isinstance(value, float) and not math.isfinite(value):
        raise APIError(400, f"'{key}' must be a finite number, got {value}", param=key)
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = (f"must be between {low} and {high}" if low is not None and high is not None
                  else f"must be >= {low}" if low is not None else f"must be <= {high}")
        raise APIError(400, f"'{key}' {bounds}, got {value}", param=key)
    return kind(value)


def _non_finite(body: Any) -> str | None:
    """Path of the first NaN or ±Infinity in a parsed JSON body (Python's json accepts the `NaN` and
    `Infinity` literals and turns 1e999 into inf), or None. Iterative: bodies may nest deeply."""
    stack: list[tuple[str, Any]] = [("", body)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, float) and not math.isfinite(value):
            return path or "body"
        if isinstance(value, dict):
            stack.extend((f"{path}.{k}" if path else str(k), v) for k, v in value.items())
        elif isinstance(value, list):
            stack.extend((f"{path}[{i}]", v) for i, v in enumerate(value))
    return None


def parse_chat_request(body: Any, limits: ServeLimits) -> ChatRequest:
    if not isinstance(body, dict):
        raise APIError(400, "request body must be a JSON object")
    bad = _non_finite(body)
    if bad is not None:
        raise APIError(400, f"'{bad}' must be a finite number (NaN and Infinity are not allowed)", param=bad)
    try:
        messages = check_messages(body.get("messages"))
    except UserError as err:
        raise APIError(400, str(err).removeprefix(f"field '{err.field}': "), param=err.field) from None
    max_tokens_given = body.get("max_completion_tokens", body.get("max_tokens")) is not None
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _number(body, key, int, limits.max_tokens, 1, limits.max_tokens)
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop) or len(stop) > limits.max_stop:
        raise APIError(400, f"'stop' must be a string or a list of at most {limits.max_stop} strings", param="stop")
    seed = _number(body, "seed", int, None, SEED_MIN, SEED_MAX)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise APIError(400, "'stream' must be a boolean", param="stream")
    options = body.get("stream_options") or {}
    logprobs = body.get("logprobs") or False
    if not isinstance(logprobs, bool):
        raise APIError(400, "'logprobs' must be a boolean", param="logprobs")
    top_logprobs = _number(body, "top_logprobs", int, 0, 0, limits.max_top_logprobs)
    if body.get("top_logprobs") is not None and not logprobs:
        raise APIError(400, "'top_logprobs' needs 'logprobs': true", param="top_logprobs")
    if logprobs and stream:
        raise APIError(400, "'logprobs' is not supported with 'stream': true on this server", param="logprobs")
    params = SamplingParams(
        max_new_tokens=max_tokens,
        temperature=_number(body, "temperature", float, 1.0, 0, 2),
        top_p=_number(body, "top_p", float, 1.0, 0, 1) or 1.0,
        top_k=min(_number(body, "top_k", int, 0, 0, None), 2**31 - 1),  # beyond the vocabulary k keeps all
        seed=seed,
        stop=tuple(stop),
        top_logprobs=top_logprobs if logprobs else -1,
    )
    return ChatRequest(messages, params, _number(body, "n", int, 1, 1, limits.max_n), stream,
                       bool(isinstance(options, dict) and options.get("include_usage")), max_tokens_given, logprobs)


def create_app(engine: BatchingEngine, model_name: str, api_key: str | None = None,
               limits: ServeLimits | None = None, hosts: frozenset[str] | None = None):
    """The FastAPI app; `hosts` are the names a Host header may carry (default: loopback names only)."""
    limits = limits or ServeLimits()
    hosts = hosts if hosts is not None else allowed_hosts("127.0.0.1")
    app = FastAPI(title="llamakit", docs_url=None, redoc_url=None, openapi_url=None)
    context = context_length(engine.model)
    started = int(time.time())

    def error_response(err: APIError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    @app.middleware("http")
    async def guard(request: Request, call_next):
        refused = _refusal(request, hosts, api_key, limits)
        if refused is not None:
            return error_response(refused)
        return await call_next(request)

    @app.exception_handler(APIError)
    async def api_error(_request, err: APIError):
        return error_response(err)

    @app.exception_handler(404)
    async def not_found(request, _exc):
        return error_response(APIError(404, f"no route {request.method} {request.url.path}", code="not_found"))

    @app.exception_handler(405)
    async def not_allowed(request, _exc):
        return error_response(APIError(405, f"method {request.method} not allowed on {request.url.path}"))

    @app.get("/health")
    async def health():
        stats = engine.stats
        return {"status": "ok", "model": model_name, "pending": engine.pending, "batches": stats.batches,
                "sequences": stats.sequences, "tokens": stats.tokens, "busy_s": round(stats.busy_s, 3)}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": started,
                                             "owned_by": "llamakit"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        raw = await request.body()
        if len(raw) > limits.max_body_bytes:
            raise APIError(413, f"request body over {limits.max_body_bytes} bytes")
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError, RecursionError):
            raise APIError(400, "request body is not valid JSON") from None
        chat = parse_chat_request(body, limits)
        prompt_ids = encode_chat(engine.tokenizer, chat.messages)
        room = context - len(prompt_ids)
        if room < 1 or (chat.max_tokens_given and chat.params.max_new_tokens > room):
            raise APIError(400, f"this model's maximum context length is {context} tokens; the messages take "
                                f"{len(prompt_ids)} and max_tokens asks for {chat.params.max_new_tokens}",
                           param="messages", code="context_length_exceeded")
        params = [_choice_params(chat.params, i, room) for i in range(chat.n)]
        if engine.pending + chat.n > engine.max_queue:
            raise APIError(503, "server is busy; retry later", type_="server_overloaded",
                           headers={"Retry-After": "1"})
        completion_id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        if chat.stream:
            return StreamingResponse(
                _sse(engine, prompt_ids, params, completion_id, created, model_name, chat.include_usage),
                media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        try:
            results = await _unless_disconnected(request, asyncio.gather(*(engine.complete(prompt_ids, p)
                                                                            for p in params)))
        except QueueFull as err:
            raise APIError(503, f"server is busy: {err}", type_="server_overloaded",
                           headers={"Retry-After": "1"}) from None
        except APIError:
            raise
        except Exception as err:  # noqa: BLE001 - this request's own failure; the others went on
            raise APIError(500, f"generation failed: {err}", type_="server_error") from None
        completion_tokens = sum(c.completion_tokens for c in results)
        return {
            "id": completion_id, "object": "chat.completion", "created": created, "model": model_name,
            "choices": [{"index": i, "message": {"role": "assistant", "content": c.text},
                         "finish_reason": c.finish_reason,
                         "logprobs": _logprobs(engine.tokenizer, c) if chat.logprobs else None}
                        for i, c in enumerate(results)],
            "usage": {"prompt_tokens": len(prompt_ids), "completion_tokens": completion_tokens,
                      "total_tokens": len(prompt_ids) + completion_tokens},
        }

    return app


def _refusal(request: Request, hosts: frozenset[str], api_key: str | None,
             limits: ServeLimits) -> APIError | None:
    """Why `request` must not reach a route, or None. Host first: a DNS-rebinding page learns nothing else."""
    host = request.headers.get("host")
    if not host_allowed(host, hosts):
        return APIError(421, f"this server does not answer to Host {(host or '')[:100]!r}; start it with "
                             "--allowed-hosts NAME to allow a name", code="host_not_allowed")
    origin = request.headers.get("origin")
    if origin is not None and not same_origin(origin, host):
        return APIError(403, f"requests from origin {origin[:100]!r} are refused (cross-site)",
                        code="origin_not_allowed")
    if api_key is not None and request.url.path != "/health" and not _bearer_matches(
            request.headers.get("authorization", ""), api_key):
        return APIError(401, "missing or incorrect API key", code="invalid_api_key")
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limits.max_body_bytes:
        return APIError(413, f"request body over {limits.max_body_bytes} bytes")
    has_body = request.method in ("POST", "PUT", "PATCH")
    if has_body and not is_json_media_type(request.headers.get("content-type")):
        return APIError(415, "the request body must be sent as Content-Type: application/json",
                        code="unsupported_media_type")
    return None


def _bearer_matches(header: str, api_key: str) -> bool:
    """`Authorization: Bearer KEY`, the scheme in any case (RFC 7235); the key compared in constant time."""
    scheme, _, token = header.strip().partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), api_key.encode())


def _logprobs(tokenizer, completion) -> dict:
    """OpenAI's choice.logprobs: {"content": [{token, logprob, bytes, top_logprobs: [...]}]} per token."""
    def entry(token_id: int, logprob: float) -> dict:
        token = tokenizer.decode([token_id])
        return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}

    return {"content": [{**entry(*steps[0]), "top_logprobs": [entry(*alt) for alt in steps[1:]]}
                        for steps in completion.top_logprobs], "refusal": None}


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


def _choice_params(params: SamplingParams, index: int, room: int) -> SamplingParams:
    from dataclasses import replace

    # n choices differ but stay reproducible; mod 2**64 keeps seed + index in torch's range, and torch
    # already reads a negative seed s as s + 2**64, so every in-range seed gives the same text as before.
    seed = None if params.seed is None else (params.seed + index) % 2**64
    return replace(params, seed=seed, max_new_tokens=min(params.max_new_tokens, room))


async def _sse(engine: BatchingEngine, prompt_ids: list[int], params: list[SamplingParams],
               completion_id: str, created: int, model_name: str, include_usage: bool):
    def chunk(choices: list[dict], usage: dict | None = None) -> str:
        data = {"id": completion_id, "object": "chat.completion.chunk", "created": created,
                "model": model_name, "choices": choices}
        if usage is not None:
            data["usage"] = usage
        return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

    events: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, p: SamplingParams) -> None:
        try:
            async for kind, value in engine.stream(prompt_ids, p):
                await events.put((index, kind, value))
        except Exception as err:  # noqa: BLE001 - reported in the stream, the server stays up
            await events.put((index, "error", err))

    tasks = [asyncio.create_task(pump(i, p)) for i, p in enumerate(params)]
    try:
        yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                     for i in range(len(params))])
        finished, completion_tokens = 0, 0
        while finished < len(params):
            index, kind, value = await events.get()
            if kind == "text":
                yield chunk([{"index": index, "delta": {"content": value}, "finish_reason": None}])
            elif kind == "done":
                finished += 1
                completion_tokens += value.completion_tokens
                yield chunk([{"index": index, "delta": {}, "finish_reason": value.finish_reason}])
            else:
                finished += 1
                error = {"error": {"message": str(value), "type": "server_error", "param": None, "code": None}}
                yield f"data: {json.dumps(error)}\n\n"
        if include_usage:
            yield chunk([], {"prompt_tokens": len(prompt_ids), "completion_tokens": completion_tokens,
                             "total_tokens": len(prompt_ids) + completion_tokens})
        yield "data: [DONE]\n\n"
    finally:
        for t in tasks:
            t.cancel()


def serve(model: str = "smollm2-135m", host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          served_name: str | None = None, max_batch: int = 32, batch_wait_ms: float = 20,
          max_queue: int = 512, limits: ServeLimits | None = None, ready_file: str | None = None,
          extra_hosts: tuple[str, ...] = ()) -> None:
    """Load `model` and serve it until interrupted; Host headers other than loopback names, IP literals,
    `host` and `extra_hosts` (`*`: any) are refused."""
    from pathlib import Path

    import uvicorn

    from toolkit.console import console
    from toolkit.models import load_causal_lm

    causal_lm, tokenizer = load_causal_lm(model)
    engine = BatchingEngine(causal_lm, tokenizer, max_batch=max_batch, wait_ms=batch_wait_ms, max_queue=max_queue)
    name = served_name or (model if not Path(model).is_dir() else Path(model).resolve().name)
    app = create_app(engine, name, api_key=api_key, limits=limits, hosts=allowed_hosts(host, extra_hosts))
    sock = listen_socket(host, port)
    port = sock.getsockname()[1]
    url = f"http://{host}:{port}/v1"
    console.print(f"[bold green]serving[/] {name} on {url} (batch ≤ {max_batch}, "
                  f"auth {'on' if api_key else 'off'}); Ctrl-C stops")
    if ready_file:
        from toolkit.io import write_json

        write_json(ready_file, {"url": url, "port": port, "model": name})  # atomic: readers never see half
    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=2)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        engine.close()
