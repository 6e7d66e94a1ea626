"""Start `llamakit serve` as a child process and wait until it answers (used by demo, tests, benchmarks)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from toolkit.netutil import wait_until_ready


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
    with tempfile.TemporaryDirectory(prefix="llamakit-serve-") as tmp:
        ready = Path(tmp) / "ready.json"
        log = open(log_file or Path(tmp) / "serve.log", "w")  # noqa: SIM115 - closed below
        process = subprocess.Popen(
            [sys.executable, "-m", "toolkit", "serve", "--model", model, "--port", "0", "--ready-file", str(ready),
             *args], stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
        try:
            def log_tail() -> str:
                log.flush()
                return (Path(log.name).read_text(errors="replace").strip().splitlines()[-1:] or [""])[0]

            info = wait_until_ready(process, ready, name="llamakit serve", timeout=startup_timeout,
                                    log_tail=log_tail)
            yield RunningServer(info["url"], info["port"], info["model"], process)
        finally:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            log.close()
