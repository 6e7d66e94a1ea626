"""`llamakit serve` under a burst: 200 concurrent `openai` async requests on a tiny random LLaMA, then 60 against
`--max-queue 8`. (That every request is answered or refused, never lost, is tested in tests/cli/test_serve_load.py
and tests/cli/test_faults_serve.py; this measures how fast and how big.)

Prints one JSON line: {"requests", "answered", "p50_s", "p95_s", "tokens_per_s", "wall_s", "rss_mb_before",
"rss_mb_after", "full_queue": {"answered", "refused"}}.
Usage: .venv/bin/python benchmarks/serve_load.py [--requests 200] [--max-tokens 4]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.support.tiny_models import save_tiny_llama  # noqa: E402
from toolkit.server_process import running_server  # noqa: E402


def burst(url: str, n: int, max_tokens: int) -> tuple[list[tuple], float]:
    """n requests at once: (status or "ok", seconds, completion tokens) each, and the wall time."""
    import openai

    async def run() -> list[tuple]:
        async with openai.AsyncOpenAI(base_url=url, api_key="none", max_retries=0, timeout=300) as client:
            async def one(i: int) -> tuple:
                t0 = time.perf_counter()
                try:
                    r = await client.chat.completions.create(
                        model="tiny", messages=[{"role": "user", "content": f"hello number {i}"}],
                        max_tokens=max_tokens)
                    return "ok", time.perf_counter() - t0, r.usage.completion_tokens
                except openai.APIStatusError as err:
                    return err.status_code, time.perf_counter() - t0, 0
            return await asyncio.gather(*(one(i) for i in range(n)))

    started = time.perf_counter()
    results = asyncio.run(run())
    return results, time.perf_counter() - started


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--max-tokens", type=int, default=4)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="llamakit-serve-load-") as work:
        tiny = str(save_tiny_llama(Path(work) / "tiny-llama", seed=0))
        with running_server(tiny, args=("--served-name", "tiny"), startup_timeout=180) as server:
            burst(server.url, 8, args.max_tokens)  # warm-up
            rss_before = rss_mb(server.process.pid)
            results, wall = burst(server.url, args.requests, args.max_tokens)
            rss_after = rss_mb(server.process.pid)
        with running_server(tiny, args=("--served-name", "tiny", "--max-queue", "8", "--max-batch", "4"),
                            startup_timeout=180) as small:
            queued, _ = burst(small.url, 60, 16)

    latencies = sorted(r[1] for r in results)
    answered = [r[0] for r in results].count("ok")
    queue_answered = [r[0] for r in queued].count("ok")
    print(json.dumps({
        "requests": args.requests, "answered": answered,
        "p50_s": round(latencies[(len(latencies) - 1) // 2], 3),
        "p95_s": round(latencies[int(len(latencies) * 0.95) - 1], 3),
        "tokens_per_s": round(sum(r[2] for r in results) / wall, 1), "wall_s": round(wall, 2),
        "rss_mb_before": round(rss_before), "rss_mb_after": round(rss_after),
        "full_queue": {"answered": queue_answered, "refused": len(queued) - queue_answered}}))


if __name__ == "__main__":
    main()
