"""Start `llamakit annotate` as a child process and wait until it answers (for scripts and tests)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from toolkit.errors import UserError


@dataclass
class RunningApp:
    url: str  # ends in /
    port: int
    process: subprocess.Popen
    log: Path


def start_app(args: list[str], *, env: dict[str, str] | None = None, log_file: str | os.PathLike,
              startup_timeout: float = 120) -> RunningApp:
    """`llamakit annotate ARGS --ready-file ...`; returns once /health answers."""
    import httpx

    ready = Path(tempfile.mkdtemp(prefix="llamakit-annotate-")) / "ready.json"
    log = open(log_file, "a")  # noqa: SIM115 - the child keeps writing to it
    process = subprocess.Popen([sys.executable, "-m", "toolkit", "annotate", *args, "--ready-file", str(ready)],
                               stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    log.close()
    deadline = time.monotonic() + startup_timeout
    while not ready.is_file():
        if process.poll() is not None:
            tail = Path(log_file).read_text(errors="replace").strip().splitlines()[-3:] or ["no output"]
            raise UserError(f"llamakit annotate exited with code {process.returncode}: {' | '.join(tail)}")
        if time.monotonic() > deadline:
            stop_app(process)
            raise UserError(f"llamakit annotate did not start within {startup_timeout:.0f} s")
        time.sleep(0.05)
    info = json.loads(ready.read_text())  # written through a temporary file and a rename: always whole
    ready.unlink()
    ready.parent.rmdir()
    while True:
        try:
            httpx.get(f"http://127.0.0.1:{info['port']}/health", timeout=2)
            break
        except httpx.TransportError:
            if time.monotonic() > deadline or process.poll() is not None:
                stop_app(process)
                raise UserError("llamakit annotate is not answering on /health") from None
            time.sleep(0.05)
    return RunningApp(info["url"], info["port"], process, Path(log_file))


def stop_app(process: subprocess.Popen, *, kill: bool = False) -> None:
    """Terminate (or SIGKILL, to test crash safety) the app and wait for it."""
    if process.poll() is None:
        process.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@contextlib.contextmanager
def running_app(args: list[str], *, env: dict[str, str] | None = None, log_file: str | os.PathLike | None = None,
                startup_timeout: float = 120) -> Iterator[RunningApp]:
    with tempfile.TemporaryDirectory(prefix="llamakit-annotate-log-") as tmp:
        app = start_app(args, env=env, log_file=log_file or Path(tmp) / "annotate.log",
                        startup_timeout=startup_timeout)
        try:
            yield app
        finally:
            stop_app(app.process)
