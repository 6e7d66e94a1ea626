"""A loopback OpenAI-compatible chat server with a fixed latency and faults on demand (tests).

It stands in for a remote API: every answer comes after `--latency` seconds, and markers inside a
request's last user message script what happens to that exact request text, attempt by attempt:

    <<faults:429ra,500,timeout>>   1st attempt 429 with Retry-After, 2nd a 500, 3rd hangs, 4th+ answer
    <<faults:always-500>>           every attempt gets that fault

Faults: 429ra (429 + Retry-After: --retry-after s), 429 (no header), 500, 502, 503, 400, 401,
timeout (hangs --hang s before answering), never (never answers at all), reset (headers sent, then the
connection is dropped), malformed (200 with a broken JSON body), cut (200, half the body sent, then the
connection is dropped: a response cut mid-way), empty (200 with `choices: []`).

Answers are deterministic: a normal request gets a few words whose count depends on the seed and
temperature; a judge prompt (from prompts/judge_*.txt, score_rubric.txt) gets a verdict that prefers
the longer response, so judge logic can be tested end to end. `<<judge:garbage>>` makes judges
answer without a score, `<<judge:always-A>>` makes the pairwise judge pick position A every time.

GET /stats returns per-request-text counts ("ok": answers without an injected fault) and arrival times:
{"requests": {text: n}, "ok": {text: n}, "times": {text: [unix seconds, ...]}, "total": n}.

    python tests/support/fault_server.py --port 0 --latency 0.2 --ready-file ready.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import re
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from toolkit.server_process import running_child

FAULT_MARK = re.compile(r"<<faults:([a-z0-9,\-]+)>>")
JUDGE_MARK = re.compile(r"<<judge:([a-zA-Z\-]+)>>")
WORDS = ("alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet")


@dataclass
class Settings:
    latency: float = 0.0
    hang: float = 30.0
    retry_after: float = 1.0


class FaultApp:
    """A raw ASGI app (no framework in the hot path, so the server is never the bottleneck)."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.requests: Counter[str] = Counter()
        self.ok: Counter[str] = Counter()
        self.times: dict[str, list[float]] = {}
        self.total = 0

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        path, method = scope["path"], scope["method"]
        if method == "GET" and path == "/stats":
            await _json(send, 200, {"requests": dict(self.requests), "ok": dict(self.ok), "times": self.times,
                                    "total": self.total})
        elif method == "GET" and path in ("/health", "/v1/models"):
            await _json(send, 200, {"object": "list", "data": [{"id": "fault", "object": "model"}]})
        elif method == "POST" and path == "/v1/chat/completions":
            await self.chat(body, send)
        else:
            await _json(send, 404, {"error": {"message": f"no route {method} {path}"}})

    async def chat(self, body: bytes, send: Any) -> None:
        try:
            request = json.loads(body)
            messages = request["messages"]
            text = next(m["content"] for m in reversed(messages) if m["role"] == "user")
        except (ValueError, KeyError, StopIteration, TypeError):
            await _json(send, 400, {"error": {"message": "bad request", "type": "invalid_request_error"}})
            return
        self.total += 1
        self.requests[text] += 1
        self.times.setdefault(text, []).append(time.time())
        attempt = self.requests[text]
        fault = _fault_for(text, attempt)
        if self.settings.latency:
            await asyncio.sleep(self.settings.latency)
        if fault == "timeout":
            await asyncio.sleep(self.settings.hang)
        elif fault == "never":
            await asyncio.Event().wait()  # until the server stops: only the client's timeout ends this
        elif fault in ("429ra", "429"):
            headers = [(b"retry-after", str(self.settings.retry_after).encode())] if fault == "429ra" else []
            await _json(send, 429, {"error": {"message": "rate limited", "type": "rate_limit_error"}}, headers)
            return
        elif fault in ("400", "401", "500", "502", "503"):
            await _json(send, int(fault), {"error": {"message": f"injected {fault}", "type": "server_error"}})
            return
        elif fault == "reset":
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"application/json"), (b"content-length", b"1000")]})
            raise ConnectionResetError("injected connection reset")  # uvicorn drops the connection
        elif fault == "malformed":
            await _raw(send, 200, b'{"id": "chatcmpl-x", "object": "chat.completion", "choices": [{"ind')
            return
        content = _answer(text, request)
        words = content.split()
        max_tokens = request.get("max_tokens") or request.get("max_completion_tokens") or 10_000
        finish = "stop"
        if len(words) > max_tokens:
            content, finish = " ".join(words[:max_tokens]), "length"
        completion = _completion(self.total, request, content, finish, messages)
        if fault == "cut":
            body = json.dumps(completion).encode()
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"application/json"),
                                    (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body[: len(body) // 2], "more_body": True})
            raise ConnectionResetError("injected cut")  # uvicorn drops the connection mid-body
        if fault == "empty":
            completion["choices"] = []
        if fault is None:  # a late answer after a 'timeout' or an empty one is not an answer the client can use
            self.ok[text] += 1
        await _json(send, 200, completion)


def _completion(number: int, request: dict, content: str, finish: str, messages: list) -> dict:
    prompt_tokens = sum(len(str(m.get("content", "")).split()) for m in messages)
    return {"id": f"chatcmpl-{number}", "object": "chat.completion", "created": int(time.time()),
            "model": request.get("model", "fault"),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": finish}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": len(content.split()),
                      "total_tokens": prompt_tokens + len(content.split())}}


def _fault_for(text: str, attempt: int) -> str | None:
    match = FAULT_MARK.search(text)
    if not match:
        return None
    plan = match.group(1).split(",")
    if len(plan) == 1 and plan[0].startswith("always-"):
        return plan[0][len("always-"):]
    return plan[attempt - 1] if attempt <= len(plan) else None


def _answer(text: str, request: dict) -> str:
    judge = JUDGE_MARK.search(text)
    mode = judge.group(1) if judge else ""
    if "[Response A]" in text and "[[A]]" in text:  # pairwise judge: prefers the longer response
        if mode == "garbage":
            return "Both are fine, I think."
        if mode == "always-A":
            return "A looks better. [[A]]"
        a = _section(text, "[Response A]", "[Response B]")
        b = _section(text, "[Response B]", "\n\nFirst give")
        verdict = "A" if len(a.split()) > len(b.split()) else "B" if len(b.split()) > len(a.split()) else "C"
        return f"Judged by length. [[{verdict}]]"
    if "Rating: [[N]]" in text:  # pointwise judge: one point per word, capped
        if mode == "garbage":
            return "It is a decent answer."
        top = int(m.group(1)) if (m := re.search(r"to (\d+) \(excellent\)", text)) else 10
        words = len(_section(text, "[Assistant response]", "\n\nFirst give").split())
        return f"Judged by length. Rating: [[{min(top, words)}]]"
    if "score only" in text:  # ChatLLaMA-style 0-5 rubric
        if mode == "garbage":
            return "Good answer!"
        return str(min(5, len(text.rsplit("Assistant:", 1)[-1].split("\n\nReply", 1)[0].split())))
    seed = request.get("seed") or 0
    temperature = request.get("temperature")
    digest = hashlib.sha256(f"{text}|{seed}|{temperature}".encode()).digest()
    count = 2 + digest[0] % 7
    return "Answer: " + " ".join(WORDS[(digest[1] + i) % len(WORDS)] for i in range(count)) + "."


def _section(text: str, start: str, end: str) -> str:
    head = text.split(start, 1)[-1]
    return head.split(end, 1)[0].strip()


async def _json(send: Any, status: int, data: dict, headers: list | None = None) -> None:
    await _raw(send, status, json.dumps(data).encode(), headers)


async def _raw(send: Any, status: int, body: bytes, headers: list | None = None) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()), *(headers or [])]})
    await send({"type": "http.response.body", "body": body})


def serve(port: int, settings: Settings, ready_file: str | None) -> None:
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    config = uvicorn.Config(FaultApp(settings), log_level="critical", access_log=False, http="h11",
                            loop="asyncio", lifespan="on", backlog=2048, timeout_keep_alive=60)
    server = uvicorn.Server(config)
    actual = sock.getsockname()[1]
    if ready_file:
        tmp = Path(ready_file).with_suffix(".tmp")
        tmp.write_text(json.dumps({"port": actual, "url": f"http://127.0.0.1:{actual}/v1"}))
        os.replace(tmp, ready_file)
    server.run(sockets=[sock])


@dataclass
class FaultServer:
    url: str  # ends in /v1
    port: int
    process: subprocess.Popen

    def stats(self) -> dict:
        import httpx

        return httpx.get(f"http://127.0.0.1:{self.port}/stats", timeout=10).json()


@contextlib.contextmanager
def running_fault_server(latency: float = 0.0, hang: float = 30.0, retry_after: float = 1.0,
                         startup_timeout: float = 30.0) -> Iterator[FaultServer]:
    """The fault server in its own process (so it never shares a GIL with the client under test)."""
    command = [sys.executable, str(Path(__file__).resolve()), "--port", "0", "--latency", str(latency),
               "--hang", str(hang), "--retry-after", str(retry_after)]
    with running_child(command, name="fault server", startup_timeout=startup_timeout) as child:
        yield FaultServer(child.url, child.port, child.process)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--latency", type=float, default=0.0, help="seconds before every answer")
    parser.add_argument("--hang", type=float, default=30.0, help="seconds a 'timeout' fault hangs")
    parser.add_argument("--retry-after", type=float, default=1.0, help="Retry-After of a 429ra fault")
    parser.add_argument("--ready-file", default=None)
    args = parser.parse_args()
    serve(args.port, Settings(args.latency, args.hang, args.retry_after), args.ready_file)


if __name__ == "__main__":
    main()
