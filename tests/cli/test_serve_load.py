"""`llamakit serve` under load: every request answered or refused with 503, none hangs; disconnects stop work."""

from __future__ import annotations

import asyncio
import time

import httpx
import openai
import pytest
from support.cli import API_KEY


def burst(url: str, n: int, key: str = API_KEY, max_tokens: int = 4):
    async def run():
        async with openai.AsyncOpenAI(base_url=url, api_key=key, max_retries=0, timeout=120) as client:
            async def one(i):
                start = time.perf_counter()
                try:
                    r = await client.chat.completions.create(
                        model="tiny", messages=[{"role": "user", "content": f"hello {i}"}], max_tokens=max_tokens)
                    return "ok", time.perf_counter() - start, r.usage.completion_tokens
                except openai.APIStatusError as err:
                    return err.status_code, time.perf_counter() - start, 0
            return await asyncio.gather(*(one(i) for i in range(n)))
    return asyncio.run(run())


def test_200_concurrent_requests_all_answered(tiny_server):
    results = burst(tiny_server.url, 200)
    assert [r[0] for r in results].count("ok") == 200
    latencies = sorted(r[1] for r in results)
    print(f"p50 {latencies[100]:.2f}s p95 {latencies[190]:.2f}s")


def test_full_queue_refuses_with_503_and_recovers(tiny_llama_dir):
    from toolkit.server_process import running_server

    with running_server(str(tiny_llama_dir), args=("--max-queue", "8", "--max-batch", "4",
                                                   "--served-name", "tiny")) as server:
        results = burst(server.url, 60, key="none", max_tokens=16)
        codes = [r[0] for r in results]
        assert set(codes) <= {"ok", 503}
        assert codes.count("ok") >= 8 and codes.count(503) >= 1
        again = burst(server.url, 4, key="none")
        assert [r[0] for r in again] == ["ok"] * 4


def test_streaming_client_that_disconnects_does_not_hold_the_engine(tiny_server):
    base = f"http://127.0.0.1:{tiny_server.port}"
    before = httpx.get(f"{base}/health").json()
    body = {"model": "tiny", "messages": [{"role": "user", "content": "go"}], "max_tokens": 64, "stream": True,
            "temperature": 1.0}
    with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {API_KEY}"}) as response:
        for _line in response.iter_lines():
            break  # read the first event, then hang up
    time.sleep(1.0)
    after = httpx.get(f"{base}/health").json()
    assert after["pending"] == 0
    assert after["tokens"] - before["tokens"] < 64  # the rest of the answer was never generated
    assert httpx.get(f"{base}/health").status_code == 200


@pytest.mark.parametrize("path", ["/v1/models", "/v1/chat/completions"])
def test_every_route_but_health_needs_the_key(tiny_server, path):
    base = f"http://127.0.0.1:{tiny_server.port}"
    response = httpx.request("POST" if "chat" in path else "GET", base + path, json={}, timeout=10)
    assert response.status_code == 401
    assert httpx.get(f"{base}/health").status_code == 200
