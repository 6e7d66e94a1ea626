"""Teachers: anything with one async `chat(messages, **params) -> Reply`, chosen by a spec string.

    openai:MODEL                        AsyncOpenAI (OpenAI, vLLM, TGI, Ollama, `llamakit serve` via base_url)
    langchain:module.path:ClassName     any LangChain chat model, built with --teacher-kwargs
    hf:ALIAS_OR_PATH                    a local transformers model in this process, batched
    rules:NAMES                         rule scorers: they score answers, they cannot write them
"""

from __future__ import annotations

import asyncio
import importlib
import os
import socket
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from toolkit.console import redact_url
from toolkit.errors import UserError

OPENAI_PARAMS = ("temperature", "top_p", "max_tokens", "seed", "stop", "logprobs", "top_logprobs")


@dataclass
class Reply:
    text: str
    finish_reason: str | None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    model: str = ""
    latency_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)
    # Asked for with logprobs=True, top_logprobs=k: per generated token, the k likeliest (token, log-prob)
    # (or the sampled token alone when k = 0); None when the teacher gave none.
    logprobs: list[list[tuple[str, float]]] | None = None

    @property
    def meta(self) -> dict[str, Any]:
        """What a generated row records about the call (never the key)."""
        return {"model": self.model, "finish_reason": self.finish_reason, "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens, "latency_s": round(self.latency_s, 4)}


class Teacher(Protocol):
    name: str

    async def chat(self, messages: list[dict[str, str]], **params: Any) -> Reply: ...


class OpenAITeacher:
    """The real `openai` client; talks to OpenAI or any compatible server (--base-url)."""

    def __init__(self, model: str, base_url: str | None = None, api_key_env: str = "OPENAI_API_KEY",
                 timeout: float = 60.0, max_retries: int = 2):
        from openai import AsyncOpenAI

        key = os.environ.get(api_key_env)
        if not key:
            if base_url is None:
                raise UserError(f"openai:{model} needs an API key in ${api_key_env} (or --base-url for a "
                                "local server)")
            key = "none"  # local servers without auth still want a header
        self.name = f"openai:{model}"
        self.model = model
        self.client = AsyncOpenAI(api_key=key, base_url=base_url, timeout=timeout, max_retries=max_retries,
                                  http_client=_http_client(timeout))
        self.url = redact_url(str(self.client.base_url).rstrip("/"))  # for messages: never its credentials

    async def chat(self, messages: list[dict[str, str]], **params: Any) -> Reply:
        from openai.types.chat import ChatCompletion

        request = {k: v for k, v in params.items() if k in OPENAI_PARAMS and v is not None}
        start = time.perf_counter()
        # `post` is the client's documented door for raw bodies: same auth, timeouts and typed errors, without
        # re-validating our plain dict params (a third of the client's CPU per request).
        try:
            response = await self.client.post("/chat/completions", cast_to=ChatCompletion,
                                              body={"model": self.model, "messages": messages, **request})
        except Exception as err:
            cause = unreachable(err, self.url)
            if cause is None:
                raise
            raise cause from err
        if not response.choices:
            raise ValueError("the server answered with no choices")
        choice = response.choices[0]
        usage = response.usage
        content = choice.logprobs.content if choice.logprobs is not None else None
        return Reply(text=choice.message.content or "", finish_reason=choice.finish_reason,
                     prompt_tokens=usage.prompt_tokens if usage else 0,
                     completion_tokens=usage.completion_tokens if usage else 0,
                     model=response.model or self.model, latency_s=time.perf_counter() - start,
                     logprobs=token_alternatives([t.model_dump() for t in content]) if content else None)

    async def aclose(self) -> None:
        await self.client.close()


def _http_client(timeout: float):
    """openai's aiohttp transport when `aiohttp` is installed (about half the CPU per request of httpx,
    which is what caps a busy client at high concurrency), else its default httpx client.
    LLAMAKIT_HTTP=httpx forces httpx."""
    if os.environ.get("LLAMAKIT_HTTP", "") != "httpx":
        try:
            import aiohttp  # noqa: F401
            from openai import DefaultAioHttpClient

            return DefaultAioHttpClient(timeout=timeout)
        except ImportError:
            pass
    return None


class Unreachable(ConnectionError):
    """A teacher's server that cannot be reached, and why in words: connection refused, unknown host.
    A ConnectionError, so generate-data retries it like any transport error."""


def unreachable(err: BaseException, url: str) -> Unreachable | None:
    """The real cause under a client's transport error, or None when there is none to tell.

    Client stacks rename causes on the way up (openai's aiohttp transport reports a refused connection as
    APITimeoutError after no time at all); the OSError at the bottom of the chain says what happened."""
    seen: set[int] = set()
    cause: BaseException | None = err
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, ConnectionRefusedError):
            return Unreachable(f"connection refused by {url}: nothing listens there (is the server running?)")
        if isinstance(cause, socket.gaierror):
            return Unreachable(f"cannot resolve the host of {url} ({cause.strerror or cause})")
        cause = cause.__cause__ or cause.__context__
    return None


def token_alternatives(content: list[dict[str, Any]]) -> list[list[tuple[str, float]]]:
    """OpenAI's `choices[0].logprobs.content` (as dicts) -> per token, its top (token, log-prob) list, or the
    sampled token alone when no alternatives were asked for."""
    return [[(alt["token"], float(alt["logprob"])) for alt in (t.get("top_logprobs") or [t])] for t in content]


class LangChainTeacher:
    """Any LangChain chat model; sampling params go through `.bind()` as LangChain call kwargs."""

    def __init__(self, class_path: str, kwargs: dict[str, Any] | None = None):
        module_name, _, class_name = class_path.rpartition(":")
        if not module_name or not class_name:
            raise UserError(f"langchain teacher must be 'langchain:module.path:ClassName', got '{class_path}'")
        try:
            cls = getattr(importlib.import_module(module_name), class_name)
        except (ImportError, AttributeError) as err:
            raise UserError(f"cannot import LangChain chat model '{class_path}': {err}") from None
        try:
            self.model = cls(**(kwargs or {}))
        except Exception as err:  # noqa: BLE001 - pydantic/validation errors from any provider
            raise UserError(f"cannot build {class_name} from --teacher-kwargs: {err}".splitlines()[0]) from None
        if not callable(getattr(self.model, "ainvoke", None)) or not callable(getattr(self.model, "bind", None)):
            raise UserError(f"'{class_path}' is not a LangChain chat model (it has no ainvoke/bind)")
        self.name = f"langchain:{class_path}"

    async def chat(self, messages: list[dict[str, str]], **params: Any) -> Reply:
        from langchain_core.messages import AIMessage, HumanMessage, SystemMessage

        kinds = {"system": SystemMessage, "user": HumanMessage, "assistant": AIMessage}
        lc_messages = [kinds[m["role"]](content=m["content"]) for m in messages]
        bound = {k: v for k, v in params.items() if k in OPENAI_PARAMS and v is not None}
        stop = bound.pop("stop", None)
        runnable = self.model.bind(**bound) if bound else self.model
        start = time.perf_counter()
        try:
            message = await runnable.ainvoke(lc_messages, stop=stop)
        except Exception as err:
            url = getattr(self.model, "openai_api_base", None) or getattr(self.model, "base_url", None)
            cause = unreachable(err, redact_url(str(url)) if url else "the teacher's server")
            if cause is None:
                raise
            raise cause from err
        content = message.content
        if isinstance(content, list):
            content = "".join(p.get("text", "") if isinstance(p, dict) else str(p) for p in content)
        usage = getattr(message, "usage_metadata", None) or {}
        meta = getattr(message, "response_metadata", None) or {}
        tokens = (meta.get("logprobs") or {}).get("content") if isinstance(meta.get("logprobs"), dict) else None
        return Reply(text=content, finish_reason=meta.get("finish_reason"),
                     prompt_tokens=usage.get("input_tokens", 0), completion_tokens=usage.get("output_tokens", 0),
                     model=meta.get("model_name") or meta.get("model") or self.name,
                     latency_s=time.perf_counter() - start, logprobs=token_alternatives(tokens) if tokens else None)


class HFTeacher:
    """A local transformers model in this process; concurrent chats share batched generation."""

    def __init__(self, model: str, max_batch: int = 32, batch_wait_ms: float = 20):
        from toolkit.engine import BatchingEngine
        from toolkit.models import load_causal_lm

        causal_lm, tokenizer = load_causal_lm(model)
        self.engine = BatchingEngine(causal_lm, tokenizer, max_batch=max_batch, wait_ms=batch_wait_ms)
        self.name = f"hf:{model}"

    async def chat(self, messages: list[dict[str, str]], **params: Any) -> Reply:
        from toolkit.chat_format import context_length, encode_chat
        from toolkit.generation import SamplingParams
        from toolkit.rows import check_messages

        prompt_ids = encode_chat(self.engine.tokenizer, check_messages(messages))
        room = context_length(self.engine.model) - len(prompt_ids)
        if room < 1:
            raise ValueError(f"the messages take {len(prompt_ids)} tokens, over the model's context")
        stop = params.get("stop") or ()
        sampling = SamplingParams(
            max_new_tokens=min(int(params.get("max_tokens") or 256), room),
            temperature=float(params["temperature"]) if params.get("temperature") is not None else 1.0,
            top_p=float(params.get("top_p") or 1.0), seed=params.get("seed"),
            stop=(stop,) if isinstance(stop, str) else tuple(stop),
            top_logprobs=int(params.get("top_logprobs") or 0) if params.get("logprobs") else -1)
        start = time.perf_counter()
        completion = await self.engine.complete(prompt_ids, sampling)
        decode = self.engine.tokenizer.decode
        logprobs = [[(decode([i]), lp) for i, lp in (steps[1:] or steps[:1])] for steps in completion.top_logprobs]
        return Reply(text=completion.text, finish_reason=completion.finish_reason,
                     prompt_tokens=completion.prompt_tokens, completion_tokens=completion.completion_tokens,
                     model=self.name, latency_s=time.perf_counter() - start, logprobs=logprobs or None)

    async def aclose(self) -> None:
        await asyncio.to_thread(self.engine.close)


class RulesTeacher:
    """Rule scorers behind the teacher spec syntax; for `--scorer` / `--judge`, not for writing text."""

    def __init__(self, spec: str):
        from toolkit.scorers import parse_rules

        self.scorer = parse_rules(spec)
        self.name = self.scorer.name

    def score(self, prompt: str, response: str, finish_reason: str | None = None,
              context: dict[str, Any] | None = None) -> float:
        """`context`: the prompt's row, for rules that read it (rules:constraints)."""
        return self.scorer.score_one(prompt, response, finish_reason, context)

    async def chat(self, messages: list[dict[str, str]], **params: Any) -> Reply:
        raise UserError(f"{self.name} scores answers; it cannot write them — use an openai:, langchain: or "
                        "hf: teacher to generate")


def make_teacher(spec: str, *, base_url: str | None = None, api_key_env: str = "OPENAI_API_KEY",
                 kwargs: dict[str, Any] | None = None, timeout: float = 60.0, max_retries: int = 2):
    """Build a teacher from its spec (see the module docstring)."""
    kind, _, rest = spec.partition(":")
    if kind not in ("openai", "langchain", "hf", "rules"):
        raise UserError(f"unknown teacher kind '{kind}' in '{spec}' (use openai:, langchain:, hf: or rules:)")
    if kind == "rules":
        return RulesTeacher(spec)
    if not rest:
        raise UserError(f"teacher spec '{spec}' needs a target, e.g. openai:gpt-4o-mini, hf:smollm2-135m")
    if kind == "openai":
        return OpenAITeacher(rest, base_url=base_url, api_key_env=api_key_env, timeout=timeout,
                             max_retries=max_retries)
    if kind == "langchain":
        return LangChainTeacher(rest, kwargs)
    return HFTeacher(rest)


async def close_teacher(teacher: Any) -> None:
    closer = getattr(teacher, "aclose", None)
    if closer is not None:
        await closer()
