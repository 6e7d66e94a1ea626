"""Click types every command shares: numbers checked against their range at parse time, paths never empty.

A bad value stops the command before anything loads, as one line (`error: --flag: why`, exit 2). click's
own FloatRange lets "nan" through (every comparison with nan is false) and "inf" when there is no upper
bound, so every float flag uses `FiniteFloat`.
"""

from __future__ import annotations

import math
from typing import Any

import click

from rlhf.config import SEED_MAX

SEED = click.IntRange(0, SEED_MAX)
PORT = click.IntRange(0, 65535)


class FiniteFloat(click.FloatRange):
    """click.FloatRange that also refuses nan, and inf unless `allow_inf` (where inf has a meaning)."""

    def __init__(self, min: float | None = None, max: float | None = None, min_open: bool = False,  # noqa: A002
                 max_open: bool = False, allow_inf: bool = False) -> None:
        super().__init__(min, max, min_open=min_open, max_open=max_open)
        self.allow_inf = allow_inf

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        number = click.FLOAT.convert(value, param, ctx)
        if math.isnan(number) or (math.isinf(number) and not self.allow_inf):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return super().convert(number, param, ctx)


def _refuse_empty(value: Any, param: click.Parameter | None, ctx: click.Context | None,
                  param_type: click.ParamType) -> None:
    # "" is no file name: Path("") is "." and fails much later, after models load ("has an empty name").
    if isinstance(value, str) and not value.strip():
        param_type.fail("must not be empty", param, ctx)


class NonEmptyPath(click.Path):
    """click.Path that refuses an empty string."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        _refuse_empty(value, param, ctx, self)
        return super().convert(value, param, ctx)


class NonEmptyString(click.types.StringParamType):
    """Text that must not be empty (model aliases, reward specs, module lists)."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        _refuse_empty(value, param, ctx, self)
        return super().convert(value, param, ctx)


NON_EMPTY = NonEmptyString()



class FloatList(click.ParamType):
    """Comma-separated numbers ("0.7,1.0"), each checked by `item` (a FiniteFloat): a tuple of floats."""

    name = "floats"

    def __init__(self, item: FiniteFloat) -> None:
        self.item = item

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, (tuple, list)):
            parts = list(value)
        else:
            parts = [part for part in str(value).split(",") if part.strip()]
        if not parts:
            self.fail("takes numbers separated by commas", param, ctx)
        return tuple(self.item.convert(part.strip() if isinstance(part, str) else part, param, ctx)
                     for part in parts)
