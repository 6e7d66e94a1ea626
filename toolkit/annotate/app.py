"""The annotation web app: FastAPI routes, token auth, and the plain HTML/JS pages in templates/annotate/.

Auth: every page and API call needs an annotator's token, sent as `Authorization: Bearer TOKEN` or as the
HttpOnly cookie the login form sets. A wrong token is a 401. The pages render all prompt, answer and chat
text with textContent (never as HTML), and a strict Content-Security-Policy forbids inline scripts.

Cross-site requests: every request's Host must be on the allow-list (421 otherwise: DNS rebinding), and every
state-changing request that does not carry `Authorization: Bearer` (the cookie is sent by the browser on its
own) must come from the app's own origin (Origin, else Referer; 403 otherwise: CSRF). JSON bodies need exactly
`Content-Type: application/json`, which a cross-site form or `no-cors` fetch cannot send (415 otherwise).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse
from starlette.concurrency import run_in_threadpool
from starlette.staticfiles import StaticFiles

from toolkit.annotate.db import MAX_ROW_ID, AnnotationDB, Annotator, Item, ItemFull, display_order
from toolkit.console import redact
from toolkit.netutil import allowed_hosts, host_allowed, is_json_media_type, same_origin

COOKIE = "llamakit_annotate"
MAX_BODY = 1_000_000
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    # not no-referrer: under it a browser sends `Origin: null` even on the page's own POSTs, and the
    # same-origin check below would refuse them; same-origin still gives other sites nothing
    "Referrer-Policy": "same-origin",
    "X-Frame-Options": "DENY",
}


@dataclass
class ChatSettings:
    max_tokens: int = 256
    temperature: float = 0.7
    timeout_s: float = 120.0


SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


class HTTPError(Exception):
    def __init__(self, status: int, message: str, extra: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.extra = status, message, extra or {}


def render_guidelines(markdown_text: str) -> str:
    """Markdown -> HTML with raw HTML disabled (it is escaped), so the guidelines file cannot inject scripts."""
    from markdown_it import MarkdownIt

    return MarkdownIt("commonmark", {"html": False, "linkify": False}).render(markdown_text)


def item_view(item: Item, annotator_id: int) -> dict[str, Any]:
    """What an annotator sees: the candidates in their own shuffled order, each with its stored index."""
    order = display_order(item.id, annotator_id, len(item.candidates))
    return {"id": item.id, "prompt": item.prompt, "k": len(item.candidates),
            "candidates": [{"index": i, "text": item.candidates[i]} for i in order]}


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


def turn_position(text: str) -> int:
    """A turn number from the URL; HTTPError 404 for anything SQLite cannot hold (it would overflow)."""
    if not text.isascii() or not text.isdigit() or int(text) > MAX_ROW_ID:
        raise HTTPError(404, "no such chat or turn")
    return int(text)


def create_app(db: AnnotationDB, *, per_item: int = 1, guidelines_markdown: str = "",
               teacher_factory: Callable[[], Any] | None = None, teacher_name: str | None = None,
               chat: ChatSettings | None = None, hosts: frozenset[str] | None = None) -> FastAPI:
    """The app; `hosts` is the Host allow-list (default: loopback names only, see netutil.allowed_hosts)."""
    from toolkit.resources import template_path

    hosts = allowed_hosts("127.0.0.1") if hosts is None else hosts

    chat = chat or ChatSettings()
    page = template_path("annotate/index.html").read_text(encoding="utf-8")
    page = page.replace("<!--GUIDELINES-->", render_guidelines(guidelines_markdown))
    login_page = template_path("annotate/login.html").read_text(encoding="utf-8")
    login_failed = login_page.replace('<p id="login-error" class="error" hidden>',
                                      '<p id="login-error" class="error">')

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.teacher = await run_in_threadpool(teacher_factory) if teacher_factory else None
        try:
            yield
        finally:
            if app.state.teacher is not None:
                from toolkit.teachers import close_teacher

                await close_teacher(app.state.teacher)

    app = FastAPI(title="llamakit annotate", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.teacher = None
    app.mount("/static", StaticFiles(directory=template_path("annotate/static")), name="static")

    def who(request: Request) -> Annotator | None:
        """The annotator behind the request; HTTPError 401 when a token is given but wrong, None when none."""
        header = request.headers.get("authorization")
        if header is not None:
            scheme, _, token = header.partition(" ")
            annotator = db.annotator_for_token(token.strip()) if scheme.lower() == "bearer" else None
            if annotator is None:
                raise HTTPError(401, "wrong or malformed bearer token")
            return annotator
        cookie = request.cookies.get(COOKIE)
        if cookie is not None:
            annotator = db.annotator_for_token(cookie)
            if annotator is None:
                raise HTTPError(401, "your login token is no longer valid; log in again")
            return annotator
        return None

    def need(request: Request) -> Annotator:
        annotator = who(request)
        if annotator is None:
            raise HTTPError(401, "log in with your annotator token (Authorization: Bearer TOKEN)")
        return annotator

    async def body(request: Request) -> dict[str, Any]:
        if not is_json_media_type(request.headers.get("content-type")):
            raise HTTPError(415, "send JSON (Content-Type: application/json)")
        raw = await request.body()
        if len(raw) > MAX_BODY:
            raise HTTPError(413, f"request body over {MAX_BODY} bytes")
        try:
            data = json.loads(raw or b"{}")
        except ValueError:
            raise HTTPError(400, "request body is not valid JSON") from None
        if not isinstance(data, dict):
            raise HTTPError(400, "request body must be a JSON object")
        try:  # JSON may spell lone surrogates (\ud800), which SQLite cannot store as UTF-8: a 500 later
            json.dumps(data, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise HTTPError(400, "request body holds text that is not valid Unicode (a lone surrogate)") from None
        return data

    @app.middleware("http")
    async def headers(request: Request, call_next):
        refused = refusal(request, hosts)
        if refused is not None:
            response = JSONResponse({"error": refused[1]}, status_code=refused[0])
        else:
            response = await call_next(request)
        for key, value in SECURITY_HEADERS.items():
            response.headers.setdefault(key, value)
        if request.url.path.startswith("/api/"):
            response.headers["Cache-Control"] = "no-store"
        return response

    @app.exception_handler(HTTPError)
    async def http_error(request: Request, err: HTTPError):
        headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else {}
        if err.status == 401 and not request.url.path.startswith("/api/"):
            response = HTMLResponse(login_failed, status_code=401, headers=headers)
            response.delete_cookie(COOKIE, path="/")
            return response
        return JSONResponse({"error": err.message, **err.extra}, status_code=err.status, headers=headers)

    @app.exception_handler(404)
    async def not_found(request: Request, _exc):
        return JSONResponse({"error": f"no route {request.method} {request.url.path}"}, status_code=404)

    @app.get("/health")
    async def health():
        return {"status": "ok", "items": await run_in_threadpool(db.count_items)}

    @app.get("/login")
    async def login_form():
        return HTMLResponse(login_page)

    @app.post("/login")
    async def login(request: Request):
        raw = await request.body()
        if len(raw) > 10_000:
            raise HTTPError(413, "request body too large")
        token = (parse_qs(raw.decode("utf-8", "replace")).get("token") or [""])[0].strip()
        annotator = await run_in_threadpool(db.annotator_for_token, token)
        if annotator is None:
            response = HTMLResponse(login_failed, status_code=401)
            response.delete_cookie(COOKIE, path="/")
            return response
        response = RedirectResponse("/", status_code=303)
        response.set_cookie(COOKIE, token, httponly=True, samesite="strict", path="/", max_age=30 * 24 * 3600)
        return response

    @app.post("/logout")
    async def logout():
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(COOKIE, path="/")
        return response

    @app.get("/")
    async def index(request: Request):
        if await run_in_threadpool(who, request) is None:
            return RedirectResponse("/login", status_code=303)
        return HTMLResponse(page, headers={"Cache-Control": "no-store"})

    def state(annotator: Annotator) -> dict[str, Any]:
        return {"progress": db.progress(annotator.id, per_item)}

    def next_view(annotator: Annotator) -> dict[str, Any]:
        item = db.next_item(annotator.id, per_item)
        return {"item": item_view(item, annotator.id) if item else None, **state(annotator)}

    @app.get("/api/me")
    def me(request: Request):
        annotator = need(request)
        return {"name": annotator.name, "per_item": per_item, **state(annotator),
                "chat": {"model": teacher_name, "available": teacher_factory is not None}}

    @app.get("/api/next")
    def next_item(request: Request):
        return next_view(need(request))

    @app.get("/api/items/{item_id}")
    def get_item(item_id: str, request: Request):
        annotator = need(request)
        item = db.item(item_id)
        if item is None:
            raise HTTPError(404, "no such item")
        return {"item": item_view(item, annotator.id), "answer": db.ranking(annotator.id, item_id),
                **state(annotator)}

    @app.get("/api/history")
    def history(request: Request):
        annotator = need(request)
        return {"items": db.history(annotator.id)}

    @app.post("/api/rank")
    async def rank(request: Request):
        annotator = await run_in_threadpool(need, request)
        data = await body(request)
        item_id = data.get("item_id")
        if not isinstance(item_id, str):
            raise HTTPError(400, "'item_id' must be a string")

        def save():
            try:
                saved = db.save_ranking(annotator.id, item_id, data.get("tiers"), data.get("unordered"),
                                        data.get("flags"), data.get("better"), per_item=per_item)
            except KeyError:
                raise HTTPError(404, "no such item") from None
            except ItemFull as err:
                raise HTTPError(409, str(err), next_view(annotator)) from None
            except ValueError as err:
                raise HTTPError(400, str(err)) from None
            return {"saved": saved, **next_view(annotator)}

        return await run_in_threadpool(save)

    @app.post("/api/skip")
    async def skip(request: Request):
        annotator = await run_in_threadpool(need, request)
        data = await body(request)
        item_id = data.get("item_id")
        if not isinstance(item_id, str):
            raise HTTPError(400, "'item_id' must be a string")

        def run():
            try:
                db.skip_item(annotator.id, item_id)
            except KeyError:
                raise HTTPError(404, "no such item") from None
            return next_view(annotator)

        return await run_in_threadpool(run)

    # chats ----------------------------------------------------------------------------------------

    def chat_view(chat_id: str, annotator: Annotator) -> dict[str, Any]:
        found = db.chat(chat_id, annotator.id)
        if found is None:
            raise HTTPError(404, "no such chat")
        return found

    @app.get("/api/chats")
    def list_chats(request: Request):
        annotator = need(request)
        return {"chats": [{k: c[k] for k in ("id", "mode", "model", "status", "turns", "first", "created_at",
                                              "updated_at")} for c in db.chats(annotator.id)]}

    @app.post("/api/chats")
    async def new_chat(request: Request):
        annotator = await run_in_threadpool(need, request)
        data = await body(request)
        mode = data.get("mode")
        if mode == "model" and teacher_factory is None:
            raise HTTPError(400, "no model to chat with: start the app with --teacher SPEC")

        def create():
            try:
                chat_id = db.create_chat(annotator.id, mode, teacher_name if mode == "model" else None,
                                         data.get("system"))
            except ValueError as err:
                raise HTTPError(400, str(err)) from None
            return chat_view(chat_id, annotator)

        return await run_in_threadpool(create)

    @app.get("/api/chats/{chat_id}")
    def get_chat(chat_id: str, request: Request):
        return chat_view(chat_id, need(request))

    async def model_turn(chat_id: str, annotator: Annotator) -> dict[str, Any]:
        """Ask the teacher for the assistant's next turn and store it; 502 (chat kept) when the model fails."""
        found = await run_in_threadpool(chat_view, chat_id, annotator)
        messages = ([{"role": "system", "content": found["system"]}] if found["system"] else []) + [
            {"role": m["role"], "content": m["content"]} for m in found["messages"]]
        teacher = request_teacher()
        try:
            reply = await asyncio.wait_for(
                teacher.chat(messages, max_tokens=chat.max_tokens, temperature=chat.temperature),
                timeout=chat.timeout_s)
        except Exception as err:  # noqa: BLE001 - the annotator sees the error and can retry
            raise HTTPError(502, redact(f"the model did not answer: {type(err).__name__}: {err}")[:500],
                            {"chat": found}) from None
        text = reply.text if reply.text.strip() else "(the model returned an empty answer)"

        def store():
            db.add_message(chat_id, annotator.id, "assistant", text, "model", reply.meta)
            return chat_view(chat_id, annotator)

        return await run_in_threadpool(store)

    def request_teacher():
        if app.state.teacher is None:
            raise HTTPError(400, "no model to chat with: start the app with --teacher SPEC")
        return app.state.teacher

    @app.post("/api/chats/{chat_id}/messages")
    async def post_message(chat_id: str, request: Request):
        annotator = await run_in_threadpool(need, request)
        data = await body(request)
        found = await run_in_threadpool(chat_view, chat_id, annotator)
        role = data.get("role", "user")
        if found["mode"] == "model" and role != "user":
            raise HTTPError(400, "in a chat with a model you write the user's turns (edit a model turn instead)")

        def add():
            try:
                db.add_message(chat_id, annotator.id, role, data.get("content"), "human")
            except KeyError:
                raise HTTPError(404, "no such chat") from None
            except ValueError as err:
                raise HTTPError(400, str(err)) from None

        await run_in_threadpool(add)
        if found["mode"] == "model":
            return await model_turn(chat_id, annotator)
        return await run_in_threadpool(chat_view, chat_id, annotator)

    @app.post("/api/chats/{chat_id}/reply")
    async def retry_reply(chat_id: str, request: Request):
        annotator = await run_in_threadpool(need, request)
        found = await run_in_threadpool(chat_view, chat_id, annotator)
        if found["mode"] != "model" or found["status"] != "open":
            raise HTTPError(400, "only an open chat with a model gets model turns")
        if not found["messages"] or found["messages"][-1]["role"] != "user":
            raise HTTPError(400, "the model answers after a user turn")
        return await model_turn(chat_id, annotator)

    @app.put("/api/chats/{chat_id}/messages/{position}")
    async def edit_message(chat_id: str, position: str, request: Request):
        annotator = await run_in_threadpool(need, request)
        data = await body(request)
        turn = turn_position(position)

        def edit():
            try:
                db.edit_message(chat_id, annotator.id, turn, data.get("content"))
            except KeyError:
                raise HTTPError(404, "no such chat or turn") from None
            except ValueError as err:
                raise HTTPError(400, str(err)) from None
            return chat_view(chat_id, annotator)

        return await run_in_threadpool(edit)

    def set_status(chat_id: str, request: Request, status: str):
        annotator = need(request)
        try:
            db.set_chat_status(chat_id, annotator.id, status)
        except KeyError:
            raise HTTPError(404, "no such chat") from None
        except ValueError as err:
            raise HTTPError(400, str(err)) from None
        return chat_view(chat_id, annotator)

    @app.post("/api/chats/{chat_id}/finish")
    def finish_chat(chat_id: str, request: Request):
        return set_status(chat_id, request, "done")

    @app.post("/api/chats/{chat_id}/discard")
    def discard_chat(chat_id: str, request: Request):
        return set_status(chat_id, request, "discarded")

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
