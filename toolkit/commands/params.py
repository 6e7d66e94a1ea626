"""Click types every command shares, and the flags built from config dataclasses (toolkit/options.py).

Numbers are checked against their range at parse time, paths are never empty: a bad value stops the command
before anything loads, as one line (`error: --flag: why`, exit 2). click's own FloatRange lets "nan" through
(every comparison with nan is false) and "inf" when there is no upper bound, so every float flag uses
`FiniteFloat`.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import typing
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

import click

from toolkit.options import SEED_MAX, flag_fields, flag_name

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


# ---- flags from config dataclasses ---------------------------------------------------------------------------

def _value_type(cls: type, f: dataclasses.Field) -> Any:
    """The annotated type of a field, without its `| None`."""
    hint = typing.get_type_hints(cls)[f.name]
    args = [arg for arg in typing.get_args(hint) if arg is not type(None)]
    return args[0] if args else hint


def field_type(f: dataclasses.Field, value_type: Any) -> click.ParamType:
    """The click type of a flag field: numbers carry the range of its metadata, so a value outside it stops at
    parse time; `choices` become a click.Choice, `path` a NonEmptyPath, `nonempty` text refuses ""."""
    meta = f.metadata
    if "choices" in meta:
        return click.Choice(meta["choices"])
    if "path" in meta:
        return NonEmptyPath(file_okay=meta["path"] != "dir", dir_okay=meta["path"] != "file")
    bounds = {"min": meta.get("min"), "max": meta.get("max"), "min_open": meta.get("min_open", False),
              "max_open": meta.get("max_open", False)}
    if value_type is int:
        return click.IntRange(**bounds)
    if value_type is float:
        return FiniteFloat(**bounds, allow_inf=meta.get("inf", False))
    return NON_EMPTY if meta.get("nonempty") else click.STRING


def field_option(cls: type, name: str, **changes: Any) -> Callable:
    """The click option of field `name` of `cls`, whose parameter is the field's name. `changes` replace
    its default or metadata for one command (another flag name or help text for the same setting)."""
    f = copy.copy(next(f for f in dataclasses.fields(cls) if f.name == name))
    if "default" in changes:
        f.default = changes.pop("default")
    f.metadata = MappingProxyType({**f.metadata, **changes})
    value_type, flag, help_text = _value_type(cls, f), flag_name(f), f.metadata["help"] or None
    decls = [f"--{alias}" for alias in f.metadata.get("aliases", ())] + [f.name]
    if value_type is bool and not f.metadata.get("negatable", True):
        return click.option(f"--{flag}", *decls, is_flag=True, help=help_text)
    if value_type is bool:
        return click.option(f"--{flag}/--no-{flag}", *decls, default=f.default, show_default=True, help=help_text)
    if f.default is dataclasses.MISSING or (f.metadata.get("nonempty") and f.default == ""):
        return click.option(f"--{flag}", *decls, type=field_type(f, value_type), required=True, help=help_text)
    return click.option(f"--{flag}", *decls, type=field_type(f, value_type), default=f.default, show_default=True,
                        help=help_text)


def dataclass_options(*classes: type, defaults: Mapping[str, Any] | None = None) -> Callable:
    """One flag per `flag_field` of each class, in order; `defaults` (by field name) replace the dataclass
    default for this command."""
    defaults = defaults or {}
    options = [field_option(cls, f.name, **({"default": defaults[f.name]} if f.name in defaults else {}))
               for cls in classes for f in flag_fields(cls)]

    def decorate(func: Callable) -> Callable:
        for option in reversed(options):
            func = option(func)
        return func

    return decorate


def pop_config(cls: type, values: dict[str, Any], **extra: Any) -> Any:
    """`cls` from the values of its flags, popped from a command's keyword arguments; `extra` sets the fields
    that are not flags."""
    return cls(**{f.name: values.pop(f.name) for f in flag_fields(cls)}, **extra)
