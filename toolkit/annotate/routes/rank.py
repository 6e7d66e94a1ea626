"""Ranking: who is logged in, the next item to rank, one item again, history, and saving or skipping an answer."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends

from toolkit.annotate.db import Annotator, Item, ItemFull, display_order
from toolkit.annotate.deps import AnnotateState, Current, HTTPError, State, json_body
from toolkit.annotate.schemas import ItemChoice, Ranking

router = APIRouter(prefix="/api")


def item_view(item: Item, annotator_id: int) -> dict[str, Any]:
    """What an annotator sees: the candidates in their own shuffled order, each with its stored index."""
    order = display_order(item.id, annotator_id, len(item.candidates))
    return {"id": item.id, "prompt": item.prompt, "k": len(item.candidates),
            "candidates": [{"index": i, "text": item.candidates[i]} for i in order]}


def progress(state: AnnotateState, annotator: Annotator) -> dict[str, Any]:
    return {"progress": state.db.progress(annotator.id, state.per_item)}


def next_view(state: AnnotateState, annotator: Annotator) -> dict[str, Any]:
    item = state.db.next_item(annotator.id, state.per_item)
    return {"item": item_view(item, annotator.id) if item else None, **progress(state, annotator)}


@router.get("/me")
def me(annotator: Current, state: State):
    return {"name": annotator.name, "per_item": state.per_item, **progress(state, annotator),
            "chat": {"model": state.teacher_name, "available": state.teacher_factory is not None}}


@router.get("/next")
def next_item(annotator: Current, state: State):
    return next_view(state, annotator)


@router.get("/items/{item_id}")
def get_item(item_id: str, annotator: Current, state: State):
    item = state.db.item(item_id)
    if item is None:
        raise HTTPError(404, "no such item")
    return {"item": item_view(item, annotator.id), "answer": state.db.ranking(annotator.id, item_id),
            **progress(state, annotator)}


@router.get("/history")
def history(annotator: Current, state: State):
    return {"items": state.db.history(annotator.id)}


# the annotator is a parameter before the body: a request without a valid token is a 401 before its body is read
@router.post("/rank")
def rank(annotator: Current, data: Annotated[Ranking, Depends(json_body(Ranking))], state: State):
    try:
        saved = state.db.save_ranking(annotator.id, data.item_id, data.tiers, data.unordered, data.flags,
                                      data.better, per_item=state.per_item)
    except KeyError:
        raise HTTPError(404, "no such item") from None
    except ItemFull as err:  # the page moves on to the next item
        raise HTTPError(409, str(err), next_view(state, annotator)) from None
    except ValueError as err:
        raise HTTPError(400, str(err)) from None
    return {"saved": saved, **next_view(state, annotator)}


@router.post("/skip")
def skip(annotator: Current, data: Annotated[ItemChoice, Depends(json_body(ItemChoice))], state: State):
    try:
        state.db.skip_item(annotator.id, data.item_id)
    except KeyError:
        raise HTTPError(404, "no such item") from None
    return next_view(state, annotator)
