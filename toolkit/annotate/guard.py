"""The middleware in front of every route: requests that must not reach the routes, headers every answer carries.

Every request's Host must be on the allow-list (421 otherwise: DNS rebinding), and every state-changing request
that does not carry `Authorization: Bearer` (the cookie is sent by the browser on its own) must come from the
app's own origin (Origin, else Referer; 403 otherwise: CSRF).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from fastapi import Request, Response
from fastapi.responses import JSONResponse

from toolkit.annotate.deps import app_state
from toolkit.netutil import host_allowed, same_origin

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    # not no-referrer: under it a browser sends `Origin: null` even on the page's own POSTs, and the
    # same-origin check below would refuse them; same-origin still gives other sites nothing
    "Referrer-Policy": "same-origin",
    "X-Frame-Options": "DENY",
}


def bearer_request(request: Request) -> bool:
    """The request carries `Authorization: Bearer ...`: a script's, since a browser never adds that header to a
    cross-site request (it would need a CORS preflight this app never grants)."""
    scheme, _, _ = request.headers.get("authorization", "").strip().partition(" ")
    return scheme.lower() == "bearer"


def refusal(request: Request, hosts: frozenset[str]) -> tuple[int, str] | None:
    """(status, message) when the request must not reach the routes: a foreign Host, or a cookie-authenticated
    state-changing request from another origin. None when it may go on."""
    host = request.headers.get("host")
    if not host_allowed(host, hosts):
        return 421, (f"this app does not answer to Host {host!r}; start it with --allowed-hosts NAME to allow "
                     "a name")
    if request.method in SAFE_METHODS or bearer_request(request):
        return None
    origin = request.headers.get("origin") or request.headers.get("referer")
    if not same_origin(origin, host):
        return 403, ("cross-origin request refused: send it from this app's own page (Origin or Referer must be "
                     "this server), or authenticate with Authorization: Bearer TOKEN")
    return None


async def guard(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
    refused = refusal(request, app_state(request).hosts)
    if refused is not None:
        response: Response = JSONResponse({"error": refused[1]}, status_code=refused[0])
    else:
        response = await call_next(request)
    for key, value in SECURITY_HEADERS.items():
        response.headers.setdefault(key, value)
    if request.url.path.startswith("/api/"):
        response.headers["Cache-Control"] = "no-store"
    return response
