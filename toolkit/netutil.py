"""Loopback plumbing shared by `serve` and `annotate`: bind a socket, wait for a child server to answer."""

from __future__ import annotations

import json
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from toolkit.errors import UserError


def listen_socket(host: str, port: int) -> socket.socket:
    """A bound socket (port 0 picks a free one); bound here so a busy port is a one-line error, not a traceback."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port}: {err.strerror}") from None
    return sock


def wait_until_ready(process: subprocess.Popen, ready: Path, *, name: str, timeout: float,
                     log_tail: Callable[[], str]) -> dict:
    """Wait for the child's ready file (written whole, by rename), then for /health; returns the file's JSON.

    The child is left running on failure: the caller owns it and stops it.
    """
    import httpx

    deadline = time.monotonic() + timeout
    while not ready.is_file():
        if process.poll() is not None:
            raise UserError(f"{name} exited with code {process.returncode}: {log_tail() or 'no output'}")
        if time.monotonic() > deadline:
            raise UserError(f"{name} did not start within {timeout:.0f} s")
        time.sleep(0.05)
    info = json.loads(ready.read_text())
    while True:
        try:
            httpx.get(f"http://127.0.0.1:{info['port']}/health", timeout=2)
            return info
        except httpx.TransportError:
            if time.monotonic() > deadline or process.poll() is not None:
                raise UserError(f"{name} is not answering on /health") from None
            time.sleep(0.05)
