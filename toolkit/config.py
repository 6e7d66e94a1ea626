"""`--config file.yaml` for every command: keys are the command's flag names, flags on the command line win.

Relative paths in a config file are read from the file's directory, so `llamakit sft --config pipe/sft.yaml`
works from anywhere: the values of path options (click.Path, and the file/output options sft and rlhf declare
as text) always; the values of options that take a path *or* a name (`--model smollm2-135m`, `--reward
rules:length`, `--critic value-head`) only when that path exists there. Flags typed on the command line stay
relative to the working directory, as the shell completed them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import click

from toolkit.commands.params import NonEmptyPath
from toolkit.errors import UserError


def load_config(path: str, command: click.Command, ctx: click.Context) -> dict[str, Any]:
    """Read a YAML config and check every key and value against the command's options."""
    import yaml

    file = Path(path)
    if not file.is_file():
        raise UserError("config file not found", file=path)
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        raise UserError(f"invalid YAML: {getattr(err, 'problem', err)}", file=path,
                        line=mark.line + 1 if mark else None) from None
    except UnicodeDecodeError:
        raise UserError("not UTF-8 text", file=path) from None
    if not isinstance(data, dict):
        raise UserError("expected a mapping of flag names to values", file=path)
    # Keys are flag names (`json` for `--json` even when the parameter is called `as_json`).
    options: dict[str, click.Option] = {}
    for p in command.params:
        if isinstance(p, click.Option) and p.name != "config":
            for flag in [p.name, *(o for o in p.opts if o.startswith("--"))]:
                options[flag.lstrip("-").replace("-", "_")] = p
    defaults: dict[str, Any] = {}
    for key, value in data.items():
        name = str(key).lstrip("-").replace("-", "_")
        if name not in options:
            known = ", ".join(sorted({o.lstrip("-") for p in set(options.values()) for o in p.opts
                                      if o.startswith("--")}))
            raise UserError(f"unknown key for `{command.name}` (known: {known})", file=path, field=str(key))
        if options[name].multiple and not isinstance(value, list):
            value = [value]  # `teacher: x` for a repeatable flag means one value
        value = from_config_dir(options[name], value, file.parent)
        try:
            options[name].type_cast_value(ctx, value)
        except click.BadParameter as err:
            raise UserError(f"wrong type: {err.message}", file=path, field=str(key)) from None
        defaults[options[name].name] = value
    return defaults


# Options that always hold a path, also where declared as plain text (sft and rlhf flags come from dataclasses).
PATH_OPTIONS = frozenset({"data", "eval_data", "prompts", "seeds", "out"})
# Options that hold a path or a name (an alias, a rules: spec, a prompt under prompts/): a path when it exists.
PATH_OR_NAME_OPTIONS = frozenset({"model", "policy", "baseline", "reward", "critic", "assistant_system", "user_system"})


def from_config_dir(option: click.Option, value: Any, base: Path) -> Any:
    """`value` of `option` read from a config file in `base`, with a relative path made relative to `base`."""
    if isinstance(value, list):
        return [from_config_dir(option, v, base) for v in value]
    if (not isinstance(value, str) or not value.strip() or value == "-" or os.path.isabs(value)
            or value.startswith("~") or base == Path(".")):
        return value
    moved = str(base / value)
    if isinstance(option.type, click.Path) or option.name in PATH_OPTIONS:
        return moved
    if option.name in PATH_OR_NAME_OPTIONS and os.path.exists(moved):
        return moved
    return value


def config_option(func):
    """Add `--config FILE` to a click command; its values become the defaults of the other flags."""

    def callback(ctx: click.Context, _param: click.Parameter, value: str | None) -> None:
        if value:
            ctx.default_map = {**(ctx.default_map or {}), **load_config(value, ctx.command, ctx)}

    return click.option("--config", type=NonEmptyPath(dir_okay=False), is_eager=True, expose_value=False,
                        callback=callback,
                        help="YAML file whose keys are this command's flag names; flags given here win. Relative "
                             "paths in it are taken from the file's directory (for --model, --policy, --reward: "
                             "when that path exists there).")(func)
