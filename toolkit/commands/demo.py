"""`llamakit demo`, `report`, `init` and `chat`: the pipeline end to end, its report, and trying the result."""

from __future__ import annotations

import click

from toolkit.commands.params import NON_EMPTY, FiniteFloat, NonEmptyPath
from toolkit.config import config_option
from toolkit.models import allow_pickle_option


@click.command("demo")
@click.option("--out", default="runs/demo", show_default=True, type=NonEmptyPath(file_okay=False),
              help="Run directory; a second run resumes after the last finished stage.")
@click.option("--fast", is_flag=True, help="Tiny sizes (for tests): a few rows and steps per stage.")
@click.option("--model", default="smollm2-135m", show_default=True, type=NON_EMPTY,
              help="Actor and teacher: an embedded alias or a local Hugging Face directory.")
@click.option("--reward-model", default="minilm-l6", show_default=True, type=NON_EMPTY,
              help="Backbone of the reward model (train-reward --model): an alias or a local Hugging Face directory.")
@config_option
def demo_cmd(out, fast, model, reward_model):
    """The whole RLHF pipeline offline on a CPU: serve a teacher, generate data, SFT, reward model, PPO, report."""
    from toolkit.console import note_output
    from toolkit.demo import run_demo

    note_output(f"finished stages are kept in {out}", "run the same command again to go on after the last one")
    root = click.get_current_context().find_root().command

    def invoke(args: list[str]) -> int | None:
        return root.main(args=args, prog_name="llamakit", standalone_mode=False)

    run_demo(invoke, out, fast=fast, model=model, reward_model=reward_model)


@click.command("report")
@click.argument("run_dir", metavar="PATH", type=NonEmptyPath())
@click.option("--screenshot", "png", default=None, type=NonEmptyPath(dir_okay=False),
              help="Also render report.html with headless Chromium to this PNG.")
@config_option
def report_cmd(run_dir, png):
    """Write report.md and a self-contained report.html for PATH: a pipeline run (demo, init), the output of
    one stage (rlhf, sft, train-reward), or a data file (then NAME.report.html beside it)."""
    from toolkit.console import console
    from toolkit.report import screenshot, write_report

    html = write_report(run_dir)
    console.print(f"report: {html}")
    if png:
        console.print(f"screenshot: {screenshot(html, png)}")


@click.command("init")
@click.argument("directory", default="pipeline", type=NonEmptyPath(file_okay=False))
@click.option("--force", is_flag=True, help="Overwrite files that exist already.")
@config_option
def init_cmd(directory, force):
    """Write a commented pipeline (one --config file per stage) to edit and run stage by stage."""
    import shutil
    from pathlib import Path

    from toolkit.console import console
    from toolkit.errors import UserError
    from toolkit.resources import template_path

    source, target = template_path("pipeline"), Path(directory)
    files = sorted(p for p in source.iterdir() if p.suffix in (".yaml", ".md"))
    clash = [f.name for f in files if (target / f.name).exists()]
    if clash and not force:
        raise UserError(f"{', '.join(clash)} exist already (use --force to overwrite)", file=str(target))
    target.mkdir(parents=True, exist_ok=True)
    for f in files:
        shutil.copyfile(f, target / f.name)
    shutil.copyfile(template_path("demo/seed_tasks.jsonl"), target / "seed_tasks.jsonl")
    console.print(f"wrote {len(files)} files to {target}/ — read {target}/README.md, then run each stage with "
                  f"`llamakit <command> --config {target}/<stage>.yaml`")


@click.command("chat")
@click.argument("model_dir", type=NON_EMPTY)
@click.option("--system", default=None, help="System message.")
@click.option("--max-tokens", default=256, show_default=True, type=click.IntRange(1))
@click.option("--temperature", default=0.7, show_default=True, type=FiniteFloat(0))
@allow_pickle_option
@config_option
def chat_cmd(model_dir, system, max_tokens, temperature):
    """A small terminal chat with a model (a trained policy dir or an alias). Empty line or Ctrl-D quits."""
    from toolkit.chat_format import context_length, encode_chat
    from toolkit.console import console
    from toolkit.generation import SamplingParams, generate
    from toolkit.models import load_causal_lm

    model, tokenizer = load_causal_lm(model_dir)
    history = [{"role": "system", "content": system}] if system else []
    console.print(f"[bold]chatting with {model_dir}[/] (empty line to quit)")
    while True:
        try:
            text = click.prompt("you", default="", show_default=False, prompt_suffix="> ", err=True)
        except (EOFError, click.exceptions.Abort):
            break
        if not text.strip():
            break
        history.append({"role": "user", "content": text})
        ids = encode_chat(tokenizer, history)
        room = context_length(model) - len(ids)
        if room < 8:
            history = history[:1] + history[-1:] if system else history[-1:]
            ids = encode_chat(tokenizer, history)
            room = context_length(model) - len(ids)
        click.echo("bot> ", nl=False)
        reply = generate(model, tokenizer, [ids], [SamplingParams(max_new_tokens=min(max_tokens, room),
                                                                  temperature=temperature)],
                         on_text=lambda _row, piece: click.echo(piece, nl=False))[0]
        click.echo()
        history.append({"role": "assistant", "content": reply.text})


COMMANDS = [demo_cmd, report_cmd, init_cmd, chat_cmd]
