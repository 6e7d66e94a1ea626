"""POST /v1/completions, OpenAI's legacy text-completion API: raw prompts (strings or token ids, one or a list),
`n` choices per prompt, `echo`, legacy `logprobs` (tokens, token_logprobs, top_logprobs, text_offset) and
server-sent-event streaming. Choice `i * n + j` is prompt i's j-th sample, as OpenAI numbers them."""

from __future__ import annotations

import time
import uuid

from fastapi import Request
from fastapi.responses import StreamingResponse

from toolkit.generation import Completion
from toolkit.serve_jobs import Served, check_capacity, complete_all, events, fit, sse, sse_error, usage
from toolkit.serve_params import check_model, parse_completion_request


async def completions(served: Served, request: Request, body: object):
    if isinstance(body, dict):
        check_model(body, served.names)
    req = parse_completion_request(body, served.limits, served.vocab)
    tokenizer = served.engine.tokenizer
    encoded = [p if isinstance(p, list) else tokenizer(p).input_ids for p in req.prompts]
    common = req.common
    jobs = [job for ids in encoded
            for job in fit(served, ids, common.params, common.max_tokens_given, common.n, "prompt")]
    check_capacity(served.engine, len(jobs))
    prompt_texts = [p if isinstance(p, str) else tokenizer.decode(p) for p in req.prompts]
    echoes = [prompt_texts[i // common.n] if req.echo else "" for i in range(len(jobs))]
    header = {"id": f"cmpl-{uuid.uuid4().hex[:24]}", "object": "text_completion", "created": int(time.time()),
              "model": served.name}
    prompt_tokens = sum(len(ids) for ids in encoded)
    if common.stream:
        return StreamingResponse(_stream(served, jobs, header, echoes, prompt_tokens, common.include_usage),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    results = await complete_all(request, served.engine, jobs)
    choices = [{"index": i, "text": echoes[i] + c.text, "finish_reason": c.finish_reason,
                "logprobs": None if req.logprobs is None else
                legacy_logprobs(tokenizer, c, encoded[i // common.n], prompt_texts[i // common.n], req.echo)}
               for i, c in enumerate(results)]
    return {**header, "choices": choices, "usage": usage(prompt_tokens, sum(c.completion_tokens for c in results))}


def legacy_logprobs(tokenizer, completion: Completion, prompt_ids: list[int], prompt_text: str, echo: bool) -> dict:
    """The legacy `logprobs` object. Log-probs are the model's own (before temperature and penalties), as in
    chat; top_logprobs holds the k likeliest tokens plus the sampled one, so up to k + 1 entries (as OpenAI);
    text_offset counts characters of prompt + completion, so without echo the first token sits at
    len(prompt). With echo the prompt's tokens come first, the very first without a log-prob (null)."""
    def alternatives(steps: list[tuple[int, float]]) -> dict[str, float]:
        found: dict[str, float] = {}
        for token_id, logprob in [*steps[1:], steps[0]]:
            found.setdefault(tokenizer.decode([token_id]), logprob)
        return found

    def offsets(ids: list[int], start: int) -> list[int]:
        return [start + len(tokenizer.decode(ids[:i], skip_special_tokens=True)) for i in range(len(ids))]

    steps = completion.top_logprobs
    out = {"tokens": [tokenizer.decode([t]) for t in completion.token_ids],
           "token_logprobs": [s[0][1] for s in steps], "top_logprobs": [alternatives(s) for s in steps],
           "text_offset": offsets(completion.token_ids, len(prompt_text))}
    if echo:
        scored = completion.prompt_top_logprobs
        out = {"tokens": [tokenizer.decode([t]) for t in prompt_ids] + out["tokens"],
               "token_logprobs": [None] + [s[0][1] for s in scored] + out["token_logprobs"],
               "top_logprobs": [None] + [alternatives(s) for s in scored] + out["top_logprobs"],
               "text_offset": offsets(prompt_ids, 0) + out["text_offset"]}
    return out


async def _stream(served: Served, jobs, header: dict, echoes: list[str], prompt_tokens: int, include_usage: bool):
    def chunk(index: int, text: str, finish_reason: str | None = None) -> str:
        return sse({**header, "choices": [{"index": index, "text": text, "logprobs": None,
                                           "finish_reason": finish_reason}]})

    for i, echo in enumerate(echoes):
        if echo:
            yield chunk(i, echo)
    completion_tokens = 0
    async for index, kind, value in events(served.engine, jobs):
        if kind == "text":
            yield chunk(index, value)
        elif kind == "done":
            completion_tokens += value.completion_tokens
            yield chunk(index, "", value.finish_reason)
        else:
            yield sse_error(value)
    if include_usage:
        yield sse({**header, "choices": [], "usage": usage(prompt_tokens, completion_tokens)})
    yield "data: [DONE]\n\n"

