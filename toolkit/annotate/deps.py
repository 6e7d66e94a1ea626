"""What a route needs, as FastAPI dependencies: the app's shared state, the annotator behind the request, and
a JSON body read into a pydantic model.

The annotator comes from `Authorization: Bearer TOKEN` or from the HttpOnly cookie the login form sets; a wrong
token is a 401. JSON bodies need exactly `Content-Type: application/json`, which a cross-site form or `no-cors`
fetch cannot send (415 otherwise).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar

from fastapi import Depends, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError

from toolkit.annotate.db import AnnotationDB, Annotator
from toolkit.netutil import is_json_media_type

COOKIE = "llamakit_annotate"
MAX_BODY = 1_000_000

Body = TypeVar("Body", bound=BaseModel)


class HTTPError(Exception):
    """An answer other than 200: the app turns it into `{"error": message, **extra}` with this status."""

    def __init__(self, status: int, message: str, extra: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.extra = status, message, extra or {}


@dataclass
class ChatSettings:
    max_tokens: int = 256
    temperature: float = 0.7
    timeout_s: float = 120.0


@dataclass
class AnnotateState:
    """Everything the routes share; create_app builds it once and keeps it on `app.state.annotate`."""

    db: AnnotationDB
    per_item: int
    hosts: frozenset[str]  # the Host allow-list
    chat: ChatSettings
    page: str  # the annotation page, guidelines included
    login_page: str
    login_failed: str  # the login page showing its "wrong token" line
    teacher_factory: Callable[[], Any] | None = None
    teacher_name: str | None = None
    teacher: Any = None  # made from teacher_factory by the app's lifespan


def app_state(request: Request) -> AnnotateState:
    return request.app.state.annotate


State = Annotated[AnnotateState, Depends(app_state)]


def who(request: Request, state: State) -> Annotator | None:
    """The annotator behind the request; HTTPError 401 when a token is given but wrong, None when none."""
    header = request.headers.get("authorization")
    if header is not None:
        scheme, _, token = header.partition(" ")
        annotator = state.db.annotator_for_token(token.strip()) if scheme.lower() == "bearer" else None
        if annotator is None:
            raise HTTPError(401, "wrong or malformed bearer token")
        return annotator
    cookie = request.cookies.get(COOKIE)
    if cookie is not None:
        annotator = state.db.annotator_for_token(cookie)
        if annotator is None:
            raise HTTPError(401, "your login token is no longer valid; log in again")
        return annotator
    return None


Visitor = Annotated[Annotator | None, Depends(who)]


def need(annotator: Visitor) -> Annotator:
    if annotator is None:
        raise HTTPError(401, "log in with your annotator token (Authorization: Bearer TOKEN)")
    return annotator


Current = Annotated[Annotator, Depends(need)]


async def json_object(request: Request) -> dict[str, Any]:
    """The request's body as a JSON object, refused before any field is looked at: 415 for another media type,
    413 when too big, 400 when not JSON, not an object, or holding text SQLite cannot store."""
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


def json_body(model: type[Body]) -> Callable[[Request], Awaitable[Body]]:
    """A dependency giving the body as `model`. It reads the body itself rather than letting FastAPI do it, so
    that the annotator is checked (401) before the body (415, 400), as a dependency listed first."""

    async def read(request: Request) -> Body:
        data = await json_object(request)
        try:
            return model.model_validate(data)
        except ValidationError as err:
            raise RequestValidationError(err.errors()) from None

    return read
