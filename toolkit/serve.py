"""`llamakit serve`: an OpenAI-compatible HTTP API for any local causal LM.

Routes: GET /health, GET /v1/models, GET /v1/models/{id}, POST /v1/chat/completions and the legacy
POST /v1/completions (both plain and server-sent-event streaming), GET /openapi.json. Concurrent requests are
batched by the engine; every bad request gets a 4xx with an OpenAI-style body: an unknown or unsupported
parameter is a 400 naming it (toolkit/serve_params.py), an unknown model a 404 `model_not_found`.

What is defended, on every route (/health included):
- DNS rebinding: the Host header must name this server (loopback names, IP literals, --host,
  --allowed-hosts; `*` admits any), else 421.
- Cross-site requests from a web page: a request carrying an Origin other than this server's own gets 403,
  and a POST body must be `application/json` exactly (415 otherwise: `text/plain`, which a page may send
  without asking first, is refused even with `charset=application/json` appended).
- The key (when set) is a bearer token, scheme case-insensitive (RFC 7235), compared in constant time; every
  route but /health needs it, /openapi.json included (one rule, nothing to audit route by route).
- One request never fails another: every sampling field is checked (finite numbers, ranges, a seed that
  fits int64) before the request joins a batch, and the engine isolates a row that still fails; that
  request alone gets a 500 (or an error event in its stream).
"""

from __future__ import annotations

import hmac
import json
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from toolkit.chat_format import context_length, encode_chat
from toolkit.engine import BatchingEngine
from toolkit.netutil import allowed_hosts, host_allowed, is_json_media_type, listen_socket, same_origin
from toolkit.serve_completions import completions
from toolkit.serve_jobs import Served, check_capacity, complete_all, events, fit, sse, sse_error, usage
from toolkit.serve_params import (
    CHAT_KEYS,
    COMPLETION_KEYS,
    REFUSED_CHAT,
    REFUSED_COMPLETIONS,
    APIError,
    ServeLimits,
    check_model,
    parse_chat_request,
    request_schema,
)


def create_app(engine: BatchingEngine, model_name: str, api_key: str | None = None,
               limits: ServeLimits | None = None, hosts: frozenset[str] | None = None,
               aliases: tuple[str, ...] = ()):
    """The FastAPI app; `hosts` are the names a Host header may carry (default: loopback names only); requests
    may name the model `model_name` or any of `aliases` (e.g. the --model path it was loaded from)."""
    limits = limits or ServeLimits()
    hosts = hosts if hosts is not None else allowed_hosts("127.0.0.1")
    app = FastAPI(title="llamakit serve", docs_url=None, redoc_url=None, openapi_url="/openapi.json")
    served = Served(engine, model_name, frozenset({model_name, *aliases}), limits, context_length(engine.model),
                    vocab_size(engine.model), int(time.time()))

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
        return {"object": "list", "data": [_model_card(served)]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        check_model({"model": model_id}, served.names)
        return _model_card(served)

    @app.post("/v1/chat/completions", openapi_extra=request_schema(CHAT_KEYS, REFUSED_CHAT, "messages"))
    async def chat_completions(request: Request):
        return await _chat(served, request, await _read_json(request, limits))

    @app.post("/v1/completions", openapi_extra=request_schema(COMPLETION_KEYS, REFUSED_COMPLETIONS, "prompt"))
    async def legacy_completions(request: Request):
        return await completions(served, request, await _read_json(request, limits))

    return app


def vocab_size(model) -> int:
    """Width of the model's logits: the ids a logit_bias or a token prompt may use."""
    return model.get_output_embeddings().weight.shape[0]


def _model_card(served: Served) -> dict:
    return {"id": served.name, "object": "model", "created": served.started, "owned_by": "llamakit"}


async def _read_json(request: Request, limits: ServeLimits):
    raw = await request.body()
    if len(raw) > limits.max_body_bytes:
        raise APIError(413, f"request body over {limits.max_body_bytes} bytes")
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise APIError(400, "request body is not valid JSON") from None


async def _chat(served: Served, request: Request, body: object):
    if isinstance(body, dict):
        check_model(body, served.names)
    chat = parse_chat_request(body, served.limits, served.vocab)
    common, engine = chat.common, served.engine
    prompt_ids = encode_chat(engine.tokenizer, chat.messages)
    jobs = fit(served, prompt_ids, common.params, common.max_tokens_given, common.n, "messages")
    check_capacity(engine, len(jobs))
    header = {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "created": int(time.time()), "model": served.name}
    if common.stream:
        return StreamingResponse(_chat_stream(served, jobs, header, len(prompt_ids), common.include_usage),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    results = await complete_all(request, engine, jobs)
    return {
        **header, "object": "chat.completion",
        "choices": [{"index": i, "message": {"role": "assistant", "content": c.text},
                     "finish_reason": c.finish_reason,
                     "logprobs": _logprobs(engine.tokenizer, c) if chat.logprobs else None}
                    for i, c in enumerate(results)],
        "usage": usage(len(prompt_ids), sum(c.completion_tokens for c in results)),
    }


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


async def _chat_stream(served: Served, jobs, header: dict, prompt_tokens: int, include_usage: bool):
    def chunk(choices: list[dict], usage_: dict | None = None) -> str:
        data = {**header, "object": "chat.completion.chunk", "choices": choices}
        if usage_ is not None:
            data["usage"] = usage_
        return sse(data)

    yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                 for i in range(len(jobs))])
    completion_tokens = 0
    async for index, kind, value in events(served.engine, jobs):
        if kind == "text":
            yield chunk([{"index": index, "delta": {"content": value}, "finish_reason": None}])
        elif kind == "done":
            completion_tokens += value.completion_tokens
            yield chunk([{"index": index, "delta": {}, "finish_reason": value.finish_reason}])
        else:
            yield sse_error(value)
    if include_usage:
        yield chunk([], usage(prompt_tokens, completion_tokens))
    yield "data: [DONE]\n\n"


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
    # clients that name the model as it was started (`openai:path/to/policy`, as the demo does) are served too
    app = create_app(engine, name, api_key=api_key, limits=limits, hosts=allowed_hosts(host, extra_hosts),
                     aliases=(model,))
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
