"""generate-data throughput: 320 single-turn answers from an API that answers in 200 ms, three ways.

A plain asyncio HTTP server in its own process (so it never shares a GIL with the clients) stands in
for a remote OpenAI-compatible API: every POST /v1/chat/completions is answered after a fixed latency.
The same 320 prompts are then answered
  1. by llamakit's real `generate-data conversations --turns 1` code path at --concurrency 32
     (row ids, resume scan, limiter, retries, fsync'd JSONL rows, summary): llamakit_rps is rows over
     the run's own elapsed time, as its final table shows it; llamakit_wall_rps also counts reading
     the prompts and building the client, which the peers do before their clocks start,
  2. one request after another with the `openai` client (ChatLLaMA's way),
  3. by LangChain `ChatOpenAI.abatch` with max_concurrency=32,
and one JSON line is printed: llamakit_rps, sequential_rps, langchain_rps, limit_rps (= 32 / 0.2 s)
and the ratios. llamakit and LangChain run --repeat times each (best reported, every run listed),
since a shared machine's other load shows up as noise; the sequential loop is bound by latency alone.
Usage: .venv/bin/python benchmarks/generate_throughput.py [--requests 320]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONCURRENCY = 32
LATENCY_S = 0.2
ANSWER = json.dumps({
    "id": "chatcmpl-bench", "object": "chat.completion", "created": 0, "model": "bench",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "Paris is the capital of France."},
                 "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 20, "completion_tokens": 7, "total_tokens": 27}}).encode()


# ------------------------------------------------------------------ the fixed-latency server (child process)


class _FixedLatency(asyncio.Protocol):
    """HTTP/1.1 keep-alive, Content-Length bodies only: all an OpenAI client sends."""

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport, self.buffer = transport, b""

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while (end := self.buffer.find(b"\r\n\r\n")) >= 0:
            head = self.buffer[:end].decode("latin-1").split("\r\n")
            length = 0
            for line in head[1:]:
                name, _, value = line.partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value)
            if len(self.buffer) < end + 4 + length:
                return
            path = head[0].split(" ")[1] if " " in head[0] else ""
            self.buffer = self.buffer[end + 4 + length:]
            body = ANSWER if path.endswith("/chat/completions") else b'{"object": "list", "data": []}'
            asyncio.get_running_loop().call_later(LATENCY_S, self._answer, body)

    def _answer(self, body: bytes) -> None:
        if not self.transport.is_closing():
            self.transport.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
                                 % (len(body), body))


async def _serve(ready_file: str) -> None:
    server = await asyncio.get_running_loop().create_server(_FixedLatency, "127.0.0.1", 0, backlog=4096)
    port = server.sockets[0].getsockname()[1]
    Path(ready_file).write_text(str(port))
    await server.serve_forever()


def start_server() -> tuple[subprocess.Popen, int]:
    ready = Path(tempfile.mkdtemp(prefix="bench-")) / "port"
    process = subprocess.Popen([sys.executable, __file__, "--serve", str(ready)])
    deadline = time.monotonic() + 30
    while not ready.is_file() or not ready.read_text():
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("the fixed-latency server did not start")
        time.sleep(0.05)
    return process, int(ready.read_text())


# --------------------------------------------------------------------------------------- the three ways


def prompts(n: int) -> list[str]:
    return [f"Question {i}: what is the capital of France? Answer in one sentence." for i in range(n)]


def run_llamakit(url: str, n: int, workdir: Path) -> tuple[float, float]:
    from toolkit.generate import conversations
    from toolkit.generate.common import Sampling, TeacherOptions
    from toolkit.generate.runner import RunOptions

    src, out = workdir / "prompts.jsonl", workdir / f"answers-{time.time_ns()}.jsonl"
    src.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts(n)))
    start = time.perf_counter()
    summary = conversations.run(src, out, teacher="openai:bench", dialogue=conversations.Dialogue(turns=1),
                                sampling=Sampling(max_tokens=64), options=RunOptions(concurrency=CONCURRENCY,
                                                                                     show_progress=False),
                                teacher_options=TeacherOptions(base_url=url))
    wall = time.perf_counter() - start
    rows = out.read_text().splitlines()
    assert summary.done == n and len(rows) == n and len({json.loads(r)["id"] for r in rows}) == n
    # The run itself (resume scan, every request, every row fsync'd, files closed), as the final table
    # reports it; `wall` adds reading the prompts and building the client, which the peers do untimed.
    return n / summary.elapsed_s, n / wall


def run_sequential(url: str, n: int) -> float:
    from openai import OpenAI

    client = OpenAI(base_url=url, api_key="none", max_retries=0)
    start = time.perf_counter()
    for p in prompts(n):
        reply = client.chat.completions.create(model="bench", messages=[{"role": "user", "content": p}],
                                               max_tokens=64, temperature=0.7)
        assert reply.choices[0].message.content
    elapsed = time.perf_counter() - start
    client.close()
    return n / elapsed


def run_langchain(url: str, n: int, repeat: int) -> list[float]:
    """Warm-up and measurements in one event loop: langchain-openai caches its async client per process."""
    from langchain_openai import ChatOpenAI

    model = ChatOpenAI(model="bench", base_url=url, api_key="none", max_retries=0, max_tokens=64, temperature=0.7)

    async def go() -> list[float]:
        await model.abatch([[("user", p)] for p in prompts(CONCURRENCY)], config={"max_concurrency": CONCURRENCY})
        rates = []
        for _ in range(repeat):
            start = time.perf_counter()
            replies = await model.abatch([[("user", p)] for p in prompts(n)], config={"max_concurrency": CONCURRENCY})
            assert all(r.content for r in replies)
            rates.append(n / (time.perf_counter() - start))
        return rates

    return asyncio.run(go())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=320)
    parser.add_argument("--sequential-requests", type=int, default=None,
                        help="requests for the sequential loop (default: --requests)")
    parser.add_argument("--repeat", type=int, default=3,
                        help="runs of llamakit and LangChain each; the best is reported (the machine is shared)")
    parser.add_argument("--serve", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        asyncio.run(_serve(args.serve))
        return
    process, port = start_server()
    url = f"http://127.0.0.1:{port}/v1"
    try:
        with tempfile.TemporaryDirectory(prefix="bench-generate-") as tmp:
            run_llamakit(url, CONCURRENCY, Path(tmp))  # warm-up: imports, first connections
            llamakit_runs = [run_llamakit(url, args.requests, Path(tmp)) for _ in range(args.repeat)]
        langchain_runs = run_langchain(url, args.requests, args.repeat)
        sequential = run_sequential(url, args.sequential_requests or args.requests)
    finally:
        process.terminate()
        process.wait()
    limit = CONCURRENCY / LATENCY_S
    llamakit, langchain = max(r[0] for r in llamakit_runs), max(langchain_runs)
    print(json.dumps({
        "llamakit_rps": round(llamakit, 2), "sequential_rps": round(sequential, 2),
        "langchain_rps": round(langchain, 2), "limit_rps": round(limit, 2),
        "ratio_to_limit": round(llamakit / limit, 3), "ratio_to_langchain": round(llamakit / langchain, 3),
        "ratio_to_sequential": round(llamakit / sequential, 2), "requests": args.requests,
        "llamakit_runs": [round(r[0], 1) for r in llamakit_runs],
        "llamakit_wall_rps": [round(r[1], 1) for r in llamakit_runs],
        "langchain_runs": [round(r, 1) for r in langchain_runs],
        "http": _transport(), "load_avg_1m": round(os.getloadavg()[0], 2), "cpus": os.cpu_count()}))


def _transport() -> str:
    try:
        import aiohttp  # noqa: F401
    except ImportError:
        return "httpx"
    return "httpx" if os.environ.get("LLAMAKIT_HTTP") == "httpx" else "aiohttp"


if __name__ == "__main__":
    main()
