"""Start a loopback server as a child process and wait until it answers.

One way for every child that takes `--ready-file` (`llamakit serve` for the demo, `llamakit annotate`, the
tests' fault server): the child writes its URL and port to that file once it listens, then /health answers.
"""

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
class ChildServer:
    url: str  # as the ready file gives it
    port: int
    process: subprocess.Popen
    log: Path  # the child's stdout and stderr
    info: dict  # the whole ready file


def start_child(command: list[str], *, name: str, log_file: str | os.PathLike, env: dict[str, str] | None = None,
                startup_timeout: float = 120) -> ChildServer:
    """Run `COMMAND --ready-file F`, its output appended to `log_file`; return once /health answers.

    A child that fails to start is stopped, and the UserError names it with the last lines of its log."""
    with tempfile.TemporaryDirectory(prefix="llamakit-ready-") as tmp:
        ready = Path(tmp) / "ready.json"
        with open(log_file, "a") as log:  # the child has its own copy of the descriptor
            process = subprocess.Popen([*command, "--ready-file", str(ready)], stdout=log, stderr=subprocess.STDOUT,
                                       env={**os.environ, **(env or {})})
        try:
            info = wait_until_ready(process, ready, name=name, timeout=startup_timeout,
                                    log_tail=lambda: _tail(Path(log_file)))
        except BaseException:
            stop_child(process)
            raise
    return ChildServer(info["url"], info["port"], process, Path(log_file), info)


def stop_child(process: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL if it is still running 10 s later."""
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@contextlib.contextmanager
def running_child(command: list[str], *, name: str, log_file: str | os.PathLike | None = None,
                  env: dict[str, str] | None = None, startup_timeout: float = 120) -> Iterator[ChildServer]:
    """`start_child` for the length of a `with` block (the log in a temp dir unless `log_file` is given)."""
    with tempfile.TemporaryDirectory(prefix="llamakit-child-") as tmp:
        child = start_child(command, name=name, log_file=log_file or Path(tmp) / "child.log", env=env,
                            startup_timeout=startup_timeout)
        try:
            yield child
        finally:
            stop_child(child.process)


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
    if log_file:
        Path(log_file).write_text("")  # one run per log: a rerun of the demo replaces the last one's
    command = [sys.executable, "-m", "toolkit", "serve", "--model", model, "--port", "0", *args]
    with running_child(command, name="llamakit serve", log_file=log_file, env=env,
                       startup_timeout=startup_timeout) as child:
        yield RunningServer(child.url, child.port, child.info["model"], child.process)


def _tail(log: Path, lines: int = 3) -> str:
    return " | ".join(log.read_text(errors="replace").strip().splitlines()[-lines:])
