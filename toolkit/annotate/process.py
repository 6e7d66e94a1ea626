"""Start `llamakit annotate` as a child process and wait until it answers (for scripts and tests)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from toolkit.errors import UserError
from toolkit.netutil import wait_until_ready


@dataclass
class RunningApp:
    url: str  # ends in /
    port: int
    process: subprocess.Popen
    log: Path


def start_app(args: list[str], *, env: dict[str, str] | None = None, log_file: str | os.PathLike,
              startup_timeout: float = 120) -> RunningApp:
    """`llamakit annotate ARGS --ready-file ...`; returns once /health answers."""
    ready = Path(tempfile.mkdtemp(prefix="llamakit-annotate-")) / "ready.json"
    log = open(log_file, "a")  # noqa: SIM115 - the child keeps writing to it
    process = subprocess.Popen([sys.executable, "-m", "toolkit", "annotate", *args, "--ready-file", str(ready)],
                               stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    log.close()
    try:
        info = wait_until_ready(process, ready, name="llamakit annotate", timeout=startup_timeout,
                                log_tail=lambda: " | ".join(Path(log_file).read_text(errors="replace")
                                                            .strip().splitlines()[-3:]))
    except UserError:
        stop_app(process)
        raise
    finally:
        ready.unlink(missing_ok=True)
        ready.parent.rmdir()
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
