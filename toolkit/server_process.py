"""Start `llamakit serve` as a child process and wait until it answers (used by demo, tests, benchmarks)."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from toolkit.errors import UserError


@dataclass
class RunningServer:
    url: str  # ends in /v1
    port: int
    model: str
    process: subprocess.Popen


@contextlib.contextmanager
def running_server(model: str = "smollm2-135m", *, args: tuple[str, ...] = (), env: dict[str, str] | None = None,
                   startup_timeout: float = 300, log_file: str | os.PathLike | None = None) -> Iterator[RunningServer]:
    """`llamakit serve --port 0` in a subprocess; yields once /health answers; stops it afterwards."""
    import httpx

    with tempfile.TemporaryDirectory(prefix="llamakit-serve-") as tmp:
        ready = Path(tmp) / "ready.json"
        log = open(log_file or Path(tmp) / "serve.log", "w")  # noqa: SIM115 - closed below
        process = subprocess.Popen(
            [sys.executable, "-m", "toolkit", "serve", "--model", model, "--port", "0", "--ready-file", str(ready),
             *args], stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
        try:
            deadline = time.monotonic() + startup_timeout
            while not ready.is_file():
                if process.poll() is not None:
                    log.flush()
                    tail = Path(log.name).read_text(errors="replace").strip().splitlines()[-1:] or ["no output"]
                    raise UserError(f"llamakit serve exited with code {process.returncode}: {tail[0]}")
                if time.monotonic() > deadline:
                    raise UserError(f"llamakit serve did not start within {startup_timeout:.0f} s")
                time.sleep(0.1)
            info = json.loads(ready.read_text())
            while True:
                try:
                    httpx.get(f"http://127.0.0.1:{info['port']}/health", timeout=2)
                    break
                except httpx.TransportError:
                    if time.monotonic() > deadline or process.poll() is not None:
                        raise UserError("llamakit serve is not answering on /health") from None
                    time.sleep(0.1)
            yield RunningServer(info["url"], info["port"], info["model"], process)
        finally:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            log.close()
