"""/health, the login form and session cookie, logout, and the annotation page."""

from __future__ import annotations

from urllib.parse import parse_qs

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from starlette.concurrency import run_in_threadpool

from toolkit.annotate.deps import COOKIE, HTTPError, State, Visitor

MAX_LOGIN_BODY = 10_000
COOKIE_MAX_AGE_S = 30 * 24 * 3600

router = APIRouter()


@router.get("/health")
def health(state: State):
    return {"status": "ok", "items": state.db.count_items()}


@router.get("/login")
def login_form(state: State) -> HTMLResponse:
    return HTMLResponse(state.login_page)


@router.post("/login")
async def login(request: Request, state: State) -> Response:
    # the login page's own form posts urlencoded `token=...`: read by hand, it is the only non-JSON body
    raw = await request.body()
    if len(raw) > MAX_LOGIN_BODY:
        raise HTTPError(413, "request body too large")
    token = (parse_qs(raw.decode("utf-8", "replace")).get("token") or [""])[0].strip()
    annotator = await run_in_threadpool(state.db.annotator_for_token, token)
    if annotator is None:
        response: Response = HTMLResponse(state.login_failed, status_code=401)
        response.delete_cookie(COOKIE, path="/")
        return response
    response = RedirectResponse("/", status_code=303)
    response.set_cookie(COOKIE, token, httponly=True, samesite="strict", path="/", max_age=COOKIE_MAX_AGE_S)
    return response


@router.post("/logout")
def logout() -> RedirectResponse:
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(COOKIE, path="/")
    return response


@router.get("/")
def index(annotator: Visitor, state: State) -> Response:
    if annotator is None:
        return RedirectResponse("/login", status_code=303)
    return HTMLResponse(state.page, headers={"Cache-Control": "no-store"})
