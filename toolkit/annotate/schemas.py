"""The JSON bodies the annotation API accepts.

Only what a route itself needs is typed here. The rest is `Any` on purpose: AnnotationDB checks those fields and
its messages ("the tiers must hold each of the 3 candidates exactly once") are what the page shows. Unknown
fields are ignored.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, Field
from pydantic_core import PydanticCustomError


def _string(value: Any) -> str:
    if not isinstance(value, str):
        raise PydanticCustomError("not_a_string", "must be a string")
    return value


class ItemChoice(BaseModel):
    """POST /api/skip. A missing item_id is validated as None, so it gets the same message as a wrong type."""

    item_id: Annotated[str, BeforeValidator(_string)] = Field(None, validate_default=True)


class Ranking(ItemChoice):
    """POST /api/rank."""

    tiers: Any = None
    unordered: Any = None
    flags: Any = None
    better: Any = None


class NewChat(BaseModel):
    """POST /api/chats."""

    mode: Any = None
    system: Any = None


class NewMessage(BaseModel):
    """POST /api/chats/{id}/messages."""

    role: Any = "user"
    content: Any = None


class Edit(BaseModel):
    """PUT /api/chats/{id}/messages/{position}."""

    content: Any = None
