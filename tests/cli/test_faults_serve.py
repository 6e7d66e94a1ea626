"""`llamakit serve --api-key-env` (the shared tiny server of conftest.py): no key, a wrong key or the key in
another scheme is a 401 on every route but /health, unknown routes included; a burst leaves nothing pending."""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest
from support.cli import API_KEY


@pytest.mark.parametrize("method, route", [("GET", "/v1/models"), ("POST", "/v1/chat/completions"),
                                           ("GET", "/v1/nowhere")])
def test_no_key_a_wrong_key_or_another_scheme_is_401(tiny_server, method, route):
    base = f"http://127.0.0.1:{tiny_server.port}"
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {API_KEY}"}):
        response = httpx.request(method, base + route, json={}, headers=headers, timeout=10)
        assert response.status_code == 401, (headers, response.text)
    assert httpx.get(f"{base}/health", timeout=10).status_code == 200  # /health needs no key


def test_a_burst_of_requests_is_answered_and_leaves_nothing_pending(tiny_server):
    async def burst() -> list[str]:
        async with openai.AsyncOpenAI(base_url=tiny_server.url, api_key=API_KEY, max_retries=0, timeout=120) as client:
            replies = await asyncio.gather(*(client.chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": f"hello number {i}"}], max_tokens=4)
                for i in range(50)))
        return [reply.choices[0].message.content for reply in replies]

    assert all(isinstance(text, str) for text in asyncio.run(burst()))
    assert httpx.get(f"http://127.0.0.1:{tiny_server.port}/health", timeout=10).json()["pending"] == 0
