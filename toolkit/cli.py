"""`llamakit`: a thin click layer. Each sub-command lives in toolkit/commands/ and calls plain functions."""

from __future__ import annotations

import os
import signal
import sys
import traceback
import warnings

import click

from toolkit.console import forget_outputs, interrupted_line, redact
from toolkit.errors import UserError

CONTEXT = {"help_option_names": ["-h", "--help"], "show_default": True, "max_content_width": 110}


@click.group(context_settings=CONTEXT)
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
@click.version_option(package_name="llamakit")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Build a ChatGPT-style assistant from a LLaMA-family model with RLHF: data, reward models, PPO."""
    _catch_signals(ctx)


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM, raised in the main thread so that every `finally:` runs (rows flushed, locks and
    temp dirs removed) before the process exits with 128 + the signal number. A KeyboardInterrupt, so
    subprocess and click treat SIGTERM as they treat Ctrl-C."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


_caught: list[int] = []


def _on_signal(signum: int, _frame: object) -> None:
    if _caught:  # a second signal while cleaning up: the user insists; stop now (rows are fsync'd as written)
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    _caught.append(signum)
    if not _cancel_event_loop():
        raise Interrupted(signum)


def _cancel_event_loop() -> bool:
    """Inside a running event loop (generate-data, ask), cancel its tasks as asyncio.run does for Ctrl-C,
    instead of raising: a raise lands in whatever callback runs (aiohttp's, asyncio's own) and leaves
    tasks half-stopped. Cancelled, every task runs its `finally:` and the command ends in CancelledError."""
    asyncio = sys.modules.get("asyncio")
    if asyncio is None:
        return False

    def cancel_all() -> None:
        for task in asyncio.all_tasks(loop):
            task.cancel()

    try:
        loop = asyncio.get_running_loop()
        loop.call_soon_threadsafe(cancel_all)
    except RuntimeError:  # no loop running in this thread, or one closing
        return False
    return True


def _catch_signals(ctx: click.Context) -> None:
    """While the command runs, SIGINT and SIGTERM stop it through `_on_signal`; the old handlers come back
    after it. (`serve` and `annotate` run uvicorn, which handles both itself, then raises them again.)"""
    try:
        previous = {sig: signal.signal(sig, _on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    except ValueError:  # not the main thread (llamakit embedded in another program): its handlers stay
        return
    _caught.clear()
    forget_outputs()  # what an earlier command of this process noted is not on this one's disk

    def restore() -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    ctx.call_on_close(restore)


def _exit_interrupted(signum: int) -> None:
    """One line: which signal, what is kept on disk and how to resume; exit 130 (SIGINT) or 143 (SIGTERM)."""
    click.echo(interrupted_line(signal.Signals(signum).name), err=True)
    sys.exit(128 + signum)


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
    _caught.clear()  # signals caught by an earlier call in this process (tests) are not this one's
    try:
        result = cli.main(args=args, prog_name="llamakit", standalone_mode=False)
    except click.exceptions.Abort as err:
        if isinstance(err.__cause__, Interrupted):  # click wraps every KeyboardInterrupt in Abort
            _exit_interrupted(err.__cause__.signum)
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as err:
        if isinstance(err, click.exceptions.NoArgsIsHelpError):  # a bare group prints its help
            err.show()
            sys.exit(err.exit_code)
        # One line like every other bad input (click's own format adds a Usage block and a --help hint):
        # `error: --flag: why` for a bad value, click's sentence for the rest (missing option, no such command).
        message, param = err.format_message(), getattr(err, "param", None)
        if type(err) is click.BadParameter and param is not None:
            flags = [o for o in param.opts if o.startswith("--")] if isinstance(param, click.Option) else []
            message = f"{flags[0] if flags else param.human_readable_name}: {err.message}"
        click.echo(f"error: {' '.join(message.split())}", err=True)
        sys.exit(err.exit_code)
    except UserError as err:
        if debug:
            traceback.print_exc()
        click.echo(f"error: {redact(str(err))}", err=True)  # URLs lose their credentials
        sys.exit(2)
    except KeyboardInterrupt as err:
        if isinstance(err, Interrupted):
            _exit_interrupted(err.signum)
        click.echo("interrupted", err=True)
        sys.exit(130)
    except Exception as err:  # noqa: BLE001 - the one place that turns crashes into one line
        if debug:
            traceback.print_exc()
        else:
            click.echo(f"error: {type(err).__name__}: {redact(str(err))} (run with --debug for the traceback)",
                       err=True)
        sys.exit(1)
    except BaseException:
        if _caught:  # the signal cancelled the command's event loop: it ends in asyncio's CancelledError
            _exit_interrupted(_caught[0])
        raise
    if _caught:  # the work ended anyway (the signal came as its event loop stopped): still say so
        _exit_interrupted(_caught[0])
    code = result if isinstance(result, int) else 0
    if _leave_process_group():
        _exit_now(code)
    sys.exit(code)


def _leave_process_group() -> bool:
    """Under torchrun / accelerate launch, leave the process group before the interpreter exits, as PyTorch asks.
    True when this process was in one."""
    dist = sys.modules.get("torch.distributed")  # only when the command loaded torch
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
        return True
    return False


def _exit_now(code: int) -> None:
    """End a launched rank whose work is saved without the interpreter's teardown: a ZeRO-3 rank that had
    finished, printed its summary and left its group still aborted now and then in the C++ runtime's exit
    ("terminate called without an active exception": a thread of DeepSpeed's or the group's destroyed while
    running), and the launcher then failed the whole run. Every file is written and closed by now; only the
    streams need flushing."""
    import logging

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
