"""Chats: an annotator writes both sides ("self"), or the user's side with a teacher model answering ("model").

A model turn that fails is a 502 carrying the chat as stored (the user's turn kept), so the page can retry.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from typing import Annotated, Any

from fastapi import APIRouter, Depends
from starlette.concurrency import run_in_threadpool

from toolkit.annotate.db import MAX_ROW_ID, AnnotationDB, Annotator
from toolkit.annotate.deps import AnnotateState, Current, HTTPError, State, json_body
from toolkit.annotate.schemas import Edit, NewChat, NewMessage
from toolkit.console import redact

NO_TEACHER = "no model to chat with: start the app with --teacher SPEC"
LISTED = ("id", "mode", "model", "status", "turns", "first", "created_at", "updated_at")

router = APIRouter(prefix="/api/chats")


def chat_view(db: AnnotationDB, chat_id: str, annotator: Annotator) -> dict[str, Any]:
    found = db.chat(chat_id, annotator.id)
    if found is None:
        raise HTTPError(404, "no such chat")
    return found


def turn_position(text: str) -> int:
    """A turn number from the URL; HTTPError 404 for anything SQLite cannot hold (it would overflow)."""
    if not text.isascii() or not text.isdigit() or int(text) > MAX_ROW_ID:
        raise HTTPError(404, "no such chat or turn")
    return int(text)



@contextlib.contextmanager
def refusals_as_http(missing: str) -> Iterator[None]:
    """The database's refusals as answers: an unknown chat or turn (KeyError) is 404 `missing`, a rule it
    enforces (ValueError) is 400 with its message."""
    try:
        yield
    except KeyError:
        raise HTTPError(404, missing) from None
    except ValueError as err:
        raise HTTPError(400, str(err)) from None


def add_human_turn(db: AnnotationDB, chat_id: str, annotator: Annotator, role: Any, content: Any) -> None:
    with refusals_as_http("no such chat"):
        db.add_message(chat_id, annotator.id, role, content, "human")


def store_model_turn(db: AnnotationDB, chat_id: str, annotator: Annotator, text: str,
                     meta: dict[str, Any]) -> dict[str, Any]:
    db.add_message(chat_id, annotator.id, "assistant", text, "model", meta)
    return chat_view(db, chat_id, annotator)


async def model_turn(state: AnnotateState, chat_id: str, annotator: Annotator) -> dict[str, Any]:
    """Ask the teacher for the assistant's next turn and store it; 502 (chat kept) when the model fails."""
    found = await run_in_threadpool(chat_view, state.db, chat_id, annotator)
    messages = ([{"role": "system", "content": found["system"]}] if found["system"] else []) + [
        {"role": m["role"], "content": m["content"]} for m in found["messages"]]
    if state.teacher is None:
        raise HTTPError(400, NO_TEACHER)
    try:
        reply = await asyncio.wait_for(
            state.teacher.chat(messages, max_tokens=state.chat.max_tokens, temperature=state.chat.temperature),
            timeout=state.chat.timeout_s)
    except Exception as err:  # noqa: BLE001 - the annotator sees the error and can retry
        raise HTTPError(502, redact(f"the model did not answer: {type(err).__name__}: {err}")[:500],
                        {"chat": found}) from None
    text = reply.text if reply.text.strip() else "(the model returned an empty answer)"
    return await run_in_threadpool(store_model_turn, state.db, chat_id, annotator, text, reply.meta)


def set_status(state: AnnotateState, chat_id: str, annotator: Annotator, status: str) -> dict[str, Any]:
    with refusals_as_http("no such chat"):
        state.db.set_chat_status(chat_id, annotator.id, status)
    return chat_view(state.db, chat_id, annotator)


@router.get("")
def list_chats(annotator: Current, state: State):
    return {"chats": [{k: c[k] for k in LISTED} for c in state.db.chats(annotator.id)]}


# the annotator is a parameter before the body: a request without a valid token is a 401 before its body is read
@router.post("")
def new_chat(annotator: Current, data: Annotated[NewChat, Depends(json_body(NewChat))], state: State):
    if data.mode == "model" and state.teacher_factory is None:
        raise HTTPError(400, NO_TEACHER)
    try:
        chat_id = state.db.create_chat(annotator.id, data.mode, state.teacher_name if data.mode == "model" else None,
                                       data.system)
    except ValueError as err:
        raise HTTPError(400, str(err)) from None
    return chat_view(state.db, chat_id, annotator)


@router.get("/{chat_id}")
def get_chat(chat_id: str, annotator: Current, state: State):
    return chat_view(state.db, chat_id, annotator)


@router.post("/{chat_id}/messages")
async def post_message(chat_id: str, annotator: Current,
                       data: Annotated[NewMessage, Depends(json_body(NewMessage))], state: State):
    found = await run_in_threadpool(chat_view, state.db, chat_id, annotator)
    if found["mode"] == "model" and data.role != "user":
        raise HTTPError(400, "in a chat with a model you write the user's turns (edit a model turn instead)")
    await run_in_threadpool(add_human_turn, state.db, chat_id, annotator, data.role, data.content)
    if found["mode"] == "model":
        return await model_turn(state, chat_id, annotator)
    return await run_in_threadpool(chat_view, state.db, chat_id, annotator)


@router.post("/{chat_id}/reply")
async def retry_reply(chat_id: str, annotator: Current, state: State):
    found = await run_in_threadpool(chat_view, state.db, chat_id, annotator)
    if found["mode"] != "model" or found["status"] != "open":
        raise HTTPError(400, "only an open chat with a model gets model turns")
    if not found["messages"] or found["messages"][-1]["role"] != "user":
        raise HTTPError(400, "the model answers after a user turn")
    return await model_turn(state, chat_id, annotator)


@router.put("/{chat_id}/messages/{position}")
def edit_message(chat_id: str, position: str, annotator: Current,
                 data: Annotated[Edit, Depends(json_body(Edit))], state: State):
    turn = turn_position(position)
    with refusals_as_http("no such chat or turn"):
        state.db.edit_message(chat_id, annotator.id, turn, data.content)
    return chat_view(state.db, chat_id, annotator)


@router.post("/{chat_id}/finish")
def finish_chat(chat_id: str, annotator: Current, state: State):
    return set_status(state, chat_id, annotator, "done")


@router.post("/{chat_id}/discard")
def discard_chat(chat_id: str, annotator: Current, state: State):
    return set_status(state, chat_id, annotator, "discarded")
