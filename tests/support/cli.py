"""Running the real CLI from a test: as a user would (a child process), or in this process through the
console script's entry point (the same code, without a second of interpreter start-up)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures"
LLAMAKIT = [sys.executable, "-m", "toolkit"]
API_KEY = "test-secret-key"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_cli(*args: str, check: bool = False, timeout: float = 600, env: dict | None = None,
            cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run the real `llamakit` CLI in a subprocess, as a user would."""
    proc = subprocess.run([*LLAMAKIT, *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, cwd=cwd or ROOT)
    if check and proc.returncode != 0:
        raise AssertionError(f"llamakit {' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


def cli(*args) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `llamakit ARGS`, run in this process through `toolkit.cli.main`."""
    import torch

    from toolkit.cli import main

    out, err = io.StringIO(), io.StringIO()
    threads = torch.get_num_threads()  # --threads must not leak into the tests that follow
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), pytest.raises(SystemExit) as done:
            main([str(a) for a in args])
    finally:
        torch.set_num_threads(threads)
    return int(done.value.code or 0), out.getvalue(), err.getvalue()


def hh_slice(path: Path, start: int, stop: int) -> Path:
    """Rows [start, stop) of the Anthropic HH fixture, written to `path`."""
    rows = (FIXTURES / "hh-harmless-200.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
    path.write_text("".join(rows[start:stop]), encoding="utf-8")
    return path


def kill_when(argv: list[str], ready: Callable[[], bool], limit: float = 120) -> None:
    """Start `llamakit ARGV`, SIGKILL it as soon as `ready()` holds; fail if it ends or stalls first."""
    proc = subprocess.Popen([*LLAMAKIT, *argv], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + limit
    try:
        while not ready():
            assert proc.poll() is None, f"ended before the kill point: {proc.stderr.read().decode()[-2000:]}"
            assert time.monotonic() < deadline, "kill point never reached"
            time.sleep(0.02)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        proc.stderr.close()


def run_tiny_benchmark(script: Path, out: Path, *flags: str) -> subprocess.CompletedProcess:
    """A benchmarks/ script in its --tiny mode (tiny random LLaMA, the fixtures) keeping its work in `out`. One
    torch thread for the stages that run alone too (those run side by side always get one): the tiny model gains
    nothing from a second, and on a busy 2-core machine OpenMP threads spin against the others."""
    return subprocess.run([sys.executable, str(script), "--tiny", "--threads", "1", "--out", str(out), *flags],
                          capture_output=True, text=True, timeout=900, cwd=ROOT)


def one_json_line(proc: subprocess.CompletedProcess) -> dict:
    """The result a benchmark prints: exit 0 and exactly one JSON line on stdout (progress goes to stderr)."""
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, proc.stdout
    return json.loads(lines[0])
