"""The annotation web app: create_app assembles the FastAPI app from the routers in routes/, the middleware in
guard.py and the error handlers here; `run` serves it. The pages live in templates/annotate/.

Auth: every page and API call needs an annotator's token, sent as `Authorization: Bearer TOKEN` or as the
HttpOnly cookie the login form sets. A wrong token is a 401. The pages render all prompt, answer and chat
text with textContent (never as HTML), and a strict Content-Security-Policy forbids inline scripts.

Cross-site requests are refused by guard.py (Host allow-list: 421, CSRF: 403) and deps.json_body (anything but
`Content-Type: application/json`: 415).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.staticfiles import StaticFiles

from toolkit.annotate.db import AnnotationDB
from toolkit.annotate.deps import COOKIE, AnnotateState, ChatSettings, HTTPError, app_state
from toolkit.annotate.guard import guard
from toolkit.annotate.routes import chats, pages, rank
from toolkit.netutil import allowed_hosts
from toolkit.resources import template_path
from toolkit.teachers import close_teacher


def render_guidelines(markdown_text: str) -> str:
    """Markdown -> HTML with raw HTML disabled (it is escaped), so the guidelines file cannot inject scripts."""
    from markdown_it import MarkdownIt

    return MarkdownIt("commonmark", {"html": False, "linkify": False}).render(markdown_text)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    state: AnnotateState = app.state.annotate
    state.teacher = await run_in_threadpool(state.teacher_factory) if state.teacher_factory else None
    try:
        yield
    finally:
        if state.teacher is not None:
            await close_teacher(state.teacher)


async def http_error(request: Request, err: HTTPError) -> Response:
    """`{"error": ...}` with the status; a 401 outside /api/ is the login page (and forgets the cookie)."""
    headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else {}
    if err.status == 401 and not request.url.path.startswith("/api/"):
        response = HTMLResponse(app_state(request).login_failed, status_code=401, headers=headers)
        response.delete_cookie(COOKIE, path="/")
        return response
    return JSONResponse({"error": err.message, **err.extra}, status_code=err.status, headers=headers)


async def invalid_body(request: Request, err: RequestValidationError) -> JSONResponse:
    """A body field of the wrong type: 400 with one line naming the field, like every other bad input."""
    first = err.errors()[0]
    field = ".".join(str(part) for part in first["loc"])
    return JSONResponse({"error": f"'{field}' {first['msg']}"}, status_code=400)


async def not_found(request: Request, _exc: Exception) -> JSONResponse:
    return JSONResponse({"error": f"no route {request.method} {request.url.path}"}, status_code=404)


def create_app(db: AnnotationDB, *, per_item: int = 1, guidelines_markdown: str = "",
               teacher_factory: Callable[[], Any] | None = None, teacher_name: str | None = None,
               chat: ChatSettings | None = None, hosts: frozenset[str] | None = None) -> FastAPI:
    """The app; `hosts` is the Host allow-list (default: loopback names only, see netutil.allowed_hosts)."""
    page = template_path("annotate/index.html").read_text(encoding="utf-8")
    page = page.replace("<!--GUIDELINES-->", render_guidelines(guidelines_markdown))
    login_page = template_path("annotate/login.html").read_text(encoding="utf-8")
    login_failed = login_page.replace('<p id="login-error" class="error" hidden>',
                                      '<p id="login-error" class="error">')
    app = FastAPI(title="llamakit annotate", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.annotate = AnnotateState(
        db=db, per_item=per_item, hosts=allowed_hosts("127.0.0.1") if hosts is None else hosts,
        chat=chat or ChatSettings(), page=page, login_page=login_page, login_failed=login_failed,
        teacher_factory=teacher_factory, teacher_name=teacher_name)
    app.mount("/static", StaticFiles(directory=template_path("annotate/static")), name="static")
    app.middleware("http")(guard)
    app.add_exception_handler(HTTPError, http_error)
    app.add_exception_handler(RequestValidationError, invalid_body)
    app.add_exception_handler(404, not_found)
    for router in (pages.router, rank.router, chats.router):
        app.include_router(router)
    return app


def run(db_path: str, *, host: str = "127.0.0.1", port: int = 8080, per_item: int = 1,
        guidelines_markdown: str = "", teacher_factory: Callable[[], Any] | None = None,
        teacher_name: str | None = None, chat: ChatSettings | None = None, ready_file: str | None = None,
        extra_hosts: tuple[str, ...] | list[str] = ()) -> None:
    """Serve the annotation app until interrupted (binds loopback unless told otherwise). Host headers other
    than loopback names, `host` and `extra_hosts` ("*": any) are refused."""
    import uvicorn

    from toolkit.console import console
    from toolkit.io import write_json
    from toolkit.netutil import listen_socket

    db = AnnotationDB(db_path)
    app = create_app(db, per_item=per_item, guidelines_markdown=guidelines_markdown,
                     teacher_factory=teacher_factory, teacher_name=teacher_name, chat=chat,
                     hosts=allowed_hosts(host, extra_hosts))
    sock = listen_socket(host, port)
    port = sock.getsockname()[1]
    url = f"http://{host if ':' not in host else f'[{host}]'}:{port}/"
    annotators = db.annotators()
    console.print(f"[bold green]annotate[/] {db.count_items()} items, each for {per_item} annotator(s), "
                  f"{len(annotators)} annotator(s), chat model: {teacher_name or 'none'} — open {url} "
                  f"(Ctrl-C stops; every answer is saved as it is given)")
    if not annotators:
        console.print(f"[yellow]no annotators yet:[/] llamakit annotate add-user NAME --db {db_path}")
    if host not in ("127.0.0.1", "localhost", "::1"):
        console.print("[yellow]listening beyond this machine over plain HTTP:[/] tokens and answers travel "
                      "unencrypted; put the app behind an HTTPS reverse proxy on networks you do not trust")
        if not extra_hosts:
            console.print("[yellow]only IP addresses, loopback names and --host reach it:[/] pass --allowed-hosts "
                          "NAME for a machine or proxy name (other Host headers get 421)")
    if ready_file:
        write_json(ready_file, {"url": url, "port": port, "started": time.time()})  # atomic: never half-read
    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=2)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        db.close()
