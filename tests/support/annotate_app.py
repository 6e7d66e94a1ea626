"""`llamakit annotate` in a child process, started and stopped the way the tests need (kill -9 included)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from contextlib import AbstractContextManager

from toolkit.server_process import ChildServer, running_child, start_child, stop_child

NAME = "llamakit annotate"


def _command(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "toolkit", "annotate", *args]


def start_app(args: list[str], *, env: dict[str, str] | None = None, log_file: str | os.PathLike,
              startup_timeout: float = 120) -> ChildServer:
    """`llamakit annotate ARGS`; returns once /health answers (its url ends in /)."""
    return start_child(_command(args), name=NAME, log_file=log_file, env=env, startup_timeout=startup_timeout)


def stop_app(process: subprocess.Popen, *, kill: bool = False) -> None:
    """Stop the app; `kill` sends SIGKILL, to test what survives a crash."""
    if kill and process.poll() is None:
        process.send_signal(signal.SIGKILL)
    stop_child(process)


def running_app(args: list[str], *, env: dict[str, str] | None = None, log_file: str | os.PathLike | None = None,
                startup_timeout: float = 120) -> AbstractContextManager[ChildServer]:
    return running_child(_command(args), name=NAME, log_file=log_file, env=env, startup_timeout=startup_timeout)
