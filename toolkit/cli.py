"""`llamakit`: a thin click layer. Each sub-command lives in toolkit/commands/ and calls plain functions."""

from __future__ import annotations

import os
import sys
import traceback
import warnings

import click

from toolkit.errors import UserError

CONTEXT = {"help_option_names": ["-h", "--help"], "show_default": True, "max_content_width": 110}


@click.group(context_settings=CONTEXT)
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
@click.version_option(package_name="llamakit")
def cli(debug: bool) -> None:
    """Build a ChatGPT-style assistant from a LLaMA-family model with RLHF: data, reward models, PPO."""


def _register() -> None:
    """Every module in toolkit/commands/ lists its click commands in COMMANDS (imports stay light)."""
    import importlib
    import pkgutil

    import toolkit.commands

    for info in sorted(pkgutil.iter_modules(toolkit.commands.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"toolkit.commands.{info.name}")
        for command in getattr(module, "COMMANDS", ()):
            cli.add_command(command)


_register()


def main(argv: list[str] | None = None) -> None:
    # peft asks transformers for a deprecated attribute on every LoRA model: noise, not the user's to fix.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    args = sys.argv[1:] if argv is None else argv
    debug = "--debug" in args or os.environ.get("LLAMAKIT_DEBUG") == "1"
    try:
        result = cli.main(args=args, prog_name="llamakit", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as err:
        err.show()
        sys.exit(err.exit_code)
    except UserError as err:
        if debug:
            traceback.print_exc()
        click.echo(f"error: {err}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except Exception as err:  # noqa: BLE001 - the one place that turns crashes into one line
        if debug:
            traceback.print_exc()
        else:
            click.echo(f"error: {type(err).__name__}: {err} (run with --debug for the traceback)", err=True)
        sys.exit(1)
    sys.exit(result if isinstance(result, int) else 0)
