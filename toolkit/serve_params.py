"""Request bodies of `llamakit serve`, checked before anything reaches the engine.

Every parameter of OpenAI's `chat.completions.create` and `completions.create` (openai-python's
CompletionCreateParams) is either honoured or refused with a 400 naming it, and a key OpenAI does not know is
refused too, as OpenAI does: a client never gets a 200 for something the server ignored. vLLM's `top_k`,
`min_p` and `repetition_penalty` are honoured as extras.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

from toolkit.errors import UserError
from toolkit.generation import SamplingParams
from toolkit.rows import check_messages


@dataclass
class ServeLimits:
    max_tokens: int = 1024  # cap on max_tokens per choice
    max_n: int = 8
    max_body_bytes: int = 1_000_000
    max_stop: int = 4
    max_top_logprobs: int = 20  # OpenAI's limit (chat)
    max_legacy_logprobs: int = 5  # OpenAI's limit (completions)
    max_prompts: int = 64  # prompts in one legacy completions request


class APIError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None,
                 type_: str = "invalid_request_error", code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type_, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# Accepted and type-checked; they change nothing a local model produces (OpenAI uses them for abuse
# monitoring and routing).
HINTS = {"user": str, "safety_identifier": str, "prompt_cache_key": str, "metadata": dict}

# Refused unless null or one of the listed values, with the reason given in the 400.
REFUSED_CHAT: dict[str, tuple[tuple, str]] = {
    "tools": ((), "tool calling is not supported"),
    "tool_choice": (("none",), "tool calling is not supported; only \"none\" is accepted"),
    "parallel_tool_calls": ((), "tool calling is not supported"),
    "functions": ((), "function calling is not supported"),
    "function_call": (("none",), "function calling is not supported; only \"none\" is accepted"),
    "audio": ((), "audio output is not supported"),
    "modalities": ((["text"],), "only [\"text\"] is supported"),
    "prediction": ((), "predicted outputs are not supported"),
    "web_search_options": ((), "web search is not supported"),
    "reasoning_effort": ((), "this model is not a reasoning model"),
    "verbosity": ((), "this model has no verbosity setting"),
    "moderation": ((), "moderation is not supported"),
    "prompt_cache_options": ((), "prompt cache options are not supported"),
    "prompt_cache_retention": ((), "prompt cache retention is not supported"),
    "store": ((False,), "completions are never stored"),
    "service_tier": (("auto", "default"), "there is one service tier"),
}
REFUSED_COMPLETIONS: dict[str, tuple[tuple, str]] = {
    "suffix": ((), "insertion (suffix) is not supported"),
}

SAMPLING = ("model", "max_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "stop", "n", "stream",
            "stream_options", "presence_penalty", "frequency_penalty", "repetition_penalty", "logit_bias")
CHAT_KEYS = frozenset({*SAMPLING, *HINTS, *REFUSED_CHAT, "messages", "max_completion_tokens", "logprobs",
                       "top_logprobs", "response_format"})
COMPLETION_KEYS = frozenset({*SAMPLING, *HINTS, *REFUSED_COMPLETIONS, "prompt", "echo", "logprobs", "best_of"})

# OpenAI documents `seed` as an int64; torch's generator takes it (choice i uses seed + i, wrapped mod 2**64).
SEED_MIN, SEED_MAX = -2**63, 2**63 - 1


@dataclass
class Common:
    """What chat and legacy completions share: the sampling settings and how to answer."""
    params: SamplingParams
    n: int
    stream: bool
    include_usage: bool
    max_tokens_given: bool


@dataclass
class ChatRequest:
    messages: list[dict[str, str]]
    common: Common
    logprobs: bool = False


@dataclass
class CompletionRequest:
    prompts: list[str | list[int]]
    common: Common
    echo: bool = False
    logprobs: int | None = None  # legacy form: how many alternatives per token


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


def _same(value: Any, allowed: Any) -> bool:
    return type(value) is type(allowed) and value == allowed  # `store: 0` is not `false`


def check_keys(body: Any, known: frozenset[str], refused: dict[str, tuple[tuple, str]]) -> dict:
    """The body as a dict, after refusing non-finite numbers, unknown keys and unsupported parameters."""
    if not isinstance(body, dict):
        raise APIError(400, "request body must be a JSON object")
    bad = _non_finite(body)
    if bad is not None:
        raise APIError(400, f"'{bad}' must be a finite number (NaN and Infinity are not allowed)", param=bad)
    for key in body:
        if key not in known:
            raise APIError(400, f"Unrecognized request argument supplied: {key}", param=key,
                           code="unknown_parameter")
    for key, (allowed, why) in refused.items():
        value = body.get(key)
        if value is not None and not any(_same(value, a) for a in allowed):
            raise APIError(400, f"Unsupported parameter: '{key}' ({why} by llamakit serve)", param=key,
                           code="unsupported_parameter")
    for key, kind in HINTS.items():
        if body.get(key) is not None and not isinstance(body[key], kind):
            raise APIError(400, f"'{key}' must be {'a string' if kind is str else 'an object'}", param=key)
    return body


def check_model(body: dict, names: frozenset[str]) -> None:
    """OpenAI's 404 for a model this server does not serve; a body without `model` means the served one."""
    model = body.get("model")
    if model is None:
        return
    if not isinstance(model, str):
        raise APIError(400, "'model' must be a string", param="model")
    if model not in names:
        raise APIError(404, f"The model `{model[:200]}` does not exist or you do not have access to it.",
                       param="model", code="model_not_found")


def _logit_bias(body: dict, vocab: int) -> tuple[tuple[int, float], ...]:
    bias = body.get("logit_bias")
    if bias is None:
        return ()
    if not isinstance(bias, dict):
        raise APIError(400, "'logit_bias' must be an object mapping token ids to numbers", param="logit_bias")
    pairs = []
    for key, value in bias.items():
        token = int(key) if key.isdigit() else -1
        if not 0 <= token < vocab:
            raise APIError(400, f"'logit_bias' key {key[:40]!r} is not a token id of this model (0..{vocab - 1})",
                           param="logit_bias")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not -100 <= value <= 100:
            raise APIError(400, f"'logit_bias' value for token {token} must be a number between -100 and 100",
                           param="logit_bias")
        pairs.append((token, float(value)))
    return tuple(pairs)


def _stop(body: dict, limits: ServeLimits) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop) or len(stop) > limits.max_stop:
        raise APIError(400, f"'stop' must be a string or a list of at most {limits.max_stop} strings", param="stop")
    return tuple(stop)


def _stream(body: dict) -> tuple[bool, bool]:
    """(stream, include_usage); OpenAI refuses stream_options without streaming, and so does this server."""
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise APIError(400, "'stream' must be a boolean", param="stream")
    options = body.get("stream_options")
    if options is None:
        return stream, False
    if not isinstance(options, dict):
        raise APIError(400, "'stream_options' must be an object", param="stream_options")
    if not stream:
        raise APIError(400, "'stream_options' is only allowed when 'stream' is true", param="stream_options")
    for key, value in options.items():
        if key not in ("include_usage", "include_obfuscation") or not isinstance(value, bool):
            raise APIError(400, f"'stream_options.{key}' is not supported (include_usage: true/false is)",
                           param=f"stream_options.{key}")
        if key == "include_obfuscation" and value:
            raise APIError(400, "'stream_options.include_obfuscation' is not supported: events are not padded",
                           param="stream_options.include_obfuscation", code="unsupported_parameter")
    return stream, bool(options.get("include_usage"))


def _common(body: dict, limits: ServeLimits, vocab: int, max_tokens_key: str, default_max_tokens: int,
            top_logprobs: int, min_tokens: int = 1) -> Common:
    max_tokens = _number(body, max_tokens_key, int, default_max_tokens, min_tokens, limits.max_tokens)
    stream, include_usage = _stream(body)
    params = SamplingParams(
        max_new_tokens=max_tokens,
        temperature=_number(body, "temperature", float, 1.0, 0, 2),
        top_p=_number(body, "top_p", float, 1.0, 0, 1) or 1.0,
        top_k=min(_number(body, "top_k", int, 0, 0, None), 2**31 - 1),  # beyond the vocabulary k keeps all
        min_p=_number(body, "min_p", float, 0.0, 0, 1),
        seed=_number(body, "seed", int, None, SEED_MIN, SEED_MAX),
        stop=_stop(body, limits),
        top_logprobs=top_logprobs,
        presence_penalty=_number(body, "presence_penalty", float, 0.0, -2, 2),
        frequency_penalty=_number(body, "frequency_penalty", float, 0.0, -2, 2),
        repetition_penalty=_repetition_penalty(body),
        logit_bias=_logit_bias(body, vocab),
    )
    return Common(params, _number(body, "n", int, 1, 1, limits.max_n), stream, include_usage,
                  body.get(max_tokens_key) is not None)


def _repetition_penalty(body: dict) -> float:
    value = _number(body, "repetition_penalty", float, 1.0, 0, 2**31)
    if value <= 0:
        raise APIError(400, "'repetition_penalty' must be > 0", param="repetition_penalty")
    return value


def parse_chat_request(body: Any, limits: ServeLimits, vocab: int) -> ChatRequest:
    body = check_keys(body, CHAT_KEYS, REFUSED_CHAT)
    try:
        messages = check_messages(body.get("messages"))
    except UserError as err:
        raise APIError(400, str(err).removeprefix(f"field '{err.field}': "), param=err.field) from None
    _response_format(body.get("response_format"))
    logprobs = body.get("logprobs") or False
    if not isinstance(logprobs, bool):
        raise APIError(400, "'logprobs' must be a boolean", param="logprobs")
    top_logprobs = _number(body, "top_logprobs", int, 0, 0, limits.max_top_logprobs)
    if body.get("top_logprobs") is not None and not logprobs:
        raise APIError(400, "'top_logprobs' needs 'logprobs': true", param="top_logprobs")
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    common = _common(body, limits, vocab, key, limits.max_tokens, top_logprobs if logprobs else -1)
    if logprobs and common.stream:
        raise APIError(400, "'logprobs' is not supported with 'stream': true on this server", param="logprobs")
    return ChatRequest(messages, common, logprobs)


def _response_format(value: Any) -> None:
    """Plain text is what the model writes; JSON modes would need constrained decoding, which this server
    does not do, so they are refused rather than ignored."""
    if value is None:
        return
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "text":
        return
    if kind in ("json_object", "json_schema"):
        raise APIError(400, f"Unsupported parameter: 'response_format' of type '{kind}' (llamakit serve has no "
                            "constrained decoding; only {\"type\": \"text\"} is supported)",
                       param="response_format", code="unsupported_parameter")
    raise APIError(400, "'response_format' must be {\"type\": \"text\"} on this server", param="response_format")


def parse_completion_request(body: Any, limits: ServeLimits, vocab: int) -> CompletionRequest:
    body = check_keys(body, COMPLETION_KEYS, REFUSED_COMPLETIONS)
    prompts = _prompts(body.get("prompt"), limits, vocab)
    echo = body.get("echo") or False
    if not isinstance(echo, bool):
        raise APIError(400, "'echo' must be a boolean", param="echo")
    logprobs = _number(body, "logprobs", int, None, 0, limits.max_legacy_logprobs)
    common = _common(body, limits, vocab, "max_tokens", min(16, limits.max_tokens),  # OpenAI's default: 16
                     -1 if logprobs is None else logprobs, min_tokens=0 if echo else 1)  # echo alone scores
    if echo and logprobs is not None:
        common.params = replace(common.params, prompt_logprobs=logprobs)
    best_of = _number(body, "best_of", int, None, 1, None)
    if best_of is not None and best_of != common.n:
        raise APIError(400, f"'best_of' must equal n ({common.n}) on this server: it returns every sample",
                       param="best_of", code="unsupported_parameter")
    if logprobs is not None and common.stream:
        raise APIError(400, "'logprobs' is not supported with 'stream': true on this server", param="logprobs")
    if len(prompts) * common.n > limits.max_prompts:
        raise APIError(400, f"at most {limits.max_prompts} completions per request (prompts x n)", param="prompt")
    return CompletionRequest(prompts, common, echo, logprobs)


def _prompts(value: Any, limits: ServeLimits, vocab: int) -> list[str | list[int]]:
    """`prompt` as OpenAI takes it: a string, a list of strings, a list of token ids or a list of those."""
    def token_ids(ids: list) -> bool:
        return bool(ids) and all(isinstance(t, int) and not isinstance(t, bool) for t in ids)

    if isinstance(value, str):
        prompts: list = [value]
    elif isinstance(value, list) and token_ids(value):
        prompts = [value]
    elif isinstance(value, list) and value and all(isinstance(p, str) or (isinstance(p, list) and token_ids(p))
                                                   for p in value):
        prompts = value
    else:
        raise APIError(400, "'prompt' must be a non-empty string, a list of strings, a list of token ids or a list "
                            "of such lists", param="prompt")
    if len(prompts) > limits.max_prompts:
        raise APIError(400, f"'prompt' holds {len(prompts)} prompts; at most {limits.max_prompts}", param="prompt")
    for i, p in enumerate(prompts):
        if p == "":
            raise APIError(400, f"'prompt[{i}]' is empty", param="prompt")
        if isinstance(p, list) and not all(0 <= t < vocab for t in p):
            raise APIError(400, f"'prompt[{i}]' holds a token id outside 0..{vocab - 1}", param="prompt")
    return prompts


def request_schema(known: frozenset[str], refused: dict[str, tuple[tuple, str]], required: str) -> dict:
    """The JSON body as /openapi.json shows it: every accepted key, the refused ones marked."""
    properties = {key: ({"description": f"refused unless null or one of {list(refused[key][0])}: "
                                        f"{refused[key][1]}"} if key in refused else {})
                  for key in sorted(known)}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": {
        "type": "object", "required": [required], "additionalProperties": False, "properties": properties}}}}}
