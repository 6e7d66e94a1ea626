"""llamakit serve: 16 concurrent requests (dynamic batching) vs the same 16 one after another.

Runs the embedded smollm2-135m under the real `llamakit serve`, asks through the real `openai` client,
and prints one JSON line: {"batched_tokens_per_s", "sequential_tokens_per_s", "speedup", ...}.
Usage: .venv/bin/python benchmarks/serve_throughput.py [--requests 16] [--max-tokens 64] [--model smollm2-135m]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

import openai

from toolkit.server_process import running_server

PROMPTS = [
    "Write a short story about a robot learning to paint.",
    "Explain how a bicycle works to a ten-year-old.",
    "Describe the water cycle in detail.",
    "Give me a recipe for a simple vegetable soup.",
    "What are the benefits of regular exercise? Explain each one.",
    "Write a letter to a friend about your summer holidays.",
    "Explain the difference between weather and climate.",
    "Describe a day in the life of a medieval farmer.",
]


def request(i: int, max_tokens: int) -> dict:
    # Same prompt and seed per index in both modes, and no stop on EOS cut short: long answers.
    return {"messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}], "max_tokens": max_tokens,
            "temperature": 0.8, "seed": i}


async def run(server, n: int, max_tokens: int, concurrent: bool) -> tuple[float, int]:
    async with openai.AsyncOpenAI(base_url=server.url, api_key="none", max_retries=0, timeout=600) as client:
        async def one(i: int) -> int:
            reply = await client.chat.completions.create(model=server.model, **request(i, max_tokens))
            return reply.usage.completion_tokens

        start = time.perf_counter()
        if concurrent:
            tokens = await asyncio.gather(*(one(i) for i in range(n)))
        else:
            tokens = [await one(i) for i in range(n)]
        return time.perf_counter() - start, sum(tokens)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()
    with running_server(args.model, args=("--max-batch", str(args.requests))) as server:
        asyncio.run(run(server, 2, 8, concurrent=True))  # warm-up
        seq_s, seq_tokens = asyncio.run(run(server, args.requests, args.max_tokens, concurrent=False))
        bat_s, bat_tokens = asyncio.run(run(server, args.requests, args.max_tokens, concurrent=True))
    batched, sequential = bat_tokens / bat_s, seq_tokens / seq_s
    print(json.dumps({
        "batched_tokens_per_s": round(batched, 2), "sequential_tokens_per_s": round(sequential, 2),
        "speedup": round(batched / sequential, 2), "requests": args.requests, "model": args.model,
        "batched_tokens": bat_tokens, "sequential_tokens": seq_tokens,
        "batched_s": round(bat_s, 2), "sequential_s": round(seq_s, 2),
    }))


if __name__ == "__main__":
    main()
