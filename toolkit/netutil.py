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


# ---- who may talk to a local server -------------------------------------------------------------------
# A web page the user visits can send requests to 127.0.0.1 (cross-site request forgery), and a page on a
# domain whose DNS answer flips to 127.0.0.1 can read the answers (DNS rebinding). The checks below close
# both: the Host header must name this server, and a browser's state-changing request must come from the
# server's own origin and carry a media type that a plain HTML form or `no-cors` fetch cannot send.

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})


def host_name(header: str | None) -> str:
    """The name in a Host header (or an Origin's netloc) without port, brackets or trailing dot, lower case."""
    value = (header or "").strip().lower()
    if value.startswith("["):  # [::1]:8000
        return value[1:value.find("]")] if "]" in value else ""
    if value.count(":") == 1:
        value = value.split(":", 1)[0]
    return value.rstrip(".")


def allowed_hosts(bind_host: str, extra: tuple[str, ...] | list[str] = ()) -> frozenset[str]:
    """Names a Host header may carry: loopback names, the bound interface (unless a wildcard) and `extra`
    (`*` admits every name)."""
    names = set(LOOPBACK_NAMES) | {host_name(h) for h in extra if h.strip()}
    if bind_host not in ("0.0.0.0", "::", ""):
        names.add(host_name(bind_host if ":" not in bind_host else f"[{bind_host}]"))
    return frozenset(names)


def host_allowed(header: str | None, allowed: frozenset[str]) -> bool:
    """True when the Host header names this server. IP literals always pass: DNS rebinding needs a domain
    name, and a server bound to 0.0.0.0 is reached by its addresses."""
    import ipaddress

    name = host_name(header)
    if not name:
        return False
    if "*" in allowed or name in allowed or name.endswith(".localhost"):
        return True
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def is_json_media_type(content_type: str | None) -> bool:
    """Exactly application/json (parameters such as charset allowed): `text/plain; charset=application/json`
    is not JSON, and a browser sends it cross-site without asking first."""
    return (content_type or "").split(";", 1)[0].strip().lower() == "application/json"


def same_origin(origin: str | None, host_header: str | None) -> bool:
    """True when an Origin (or Referer) URL points at the host:port the request was sent to."""
    from urllib.parse import urlsplit

    if not origin or not host_header:
        return False
    try:
        netloc = urlsplit(origin.strip()).netloc.lower()
    except ValueError:
        return False
    return bool(netloc) and netloc == host_header.strip().lower()
