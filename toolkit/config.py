"""`--config file.yaml` for every command: keys are the command's flag names, flags on the command line win."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

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
        try:
            options[name].type_cast_value(ctx, value)
        except click.BadParameter as err:
            raise UserError(f"wrong type: {err.message}", file=path, field=str(key)) from None
        defaults[options[name].name] = value
    return defaults


def config_option(func):
    """Add `--config FILE` to a click command; its values become the defaults of the other flags."""

    def callback(ctx: click.Context, _param: click.Parameter, value: str | None) -> None:
        if value:
            ctx.default_map = {**(ctx.default_map or {}), **load_config(value, ctx.command, ctx)}

    return click.option("--config", type=click.Path(dir_okay=False), is_eager=True, expose_value=False,
                        callback=callback,
                        help="YAML file whose keys are this command's flag names; flags given here win.")(func)
