"""Running the real CLI from a test: as a user would (a child process), or in this process through the
console script's entry point (the same code, without a second of interpreter start-up)."""

from __future__ import annotations

import contextlib
import io
import os
import socket
import subprocess
import sys
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
