"""`llamakit annotate`: the human-feedback web app, its users, its export and its agreement report."""

from __future__ import annotations

import json

import click

from toolkit.commands.params import PORT, SEED, FiniteFloat, NonEmptyPath
from toolkit.config import config_option
from toolkit.models import allow_pickle_option


@click.group("annotate", invoke_without_command=True)
@click.option("--tasks", type=NonEmptyPath(dir_okay=False), default=None,
              help="JSONL/JSON items to rank: prompt + candidates/responses, prompt/chosen/rejected, or prompts "
                   "only (with --teacher). Loaded into --db; may be left out once loaded.")
@click.option("--db", "db_path", default="annotations.sqlite", show_default=True, type=NonEmptyPath(dir_okay=False),
              help="SQLite file holding items, annotators and every answer (created if missing).")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Interface to bind; anything but loopback must be asked for explicitly.")
@click.option("--port", default=8080, show_default=True, type=PORT, help="Port (0 picks a free one).")
@click.option("--allowed-hosts", multiple=True, metavar="NAMES",
              help="More names the Host header may carry (repeatable or comma-separated; `*` = any), e.g. the "
                   "name of a reverse proxy. Loopback names, IP addresses and --host are always allowed; any "
                   "other Host gets 421, which stops DNS-rebinding pages.")
@click.option("--per-item", default=1, show_default=True, type=click.IntRange(1, 100),
              help="How many annotators see each item.")
@click.option("--guidelines", type=NonEmptyPath(dir_okay=False), default=None,
              help="Markdown shown beside the task (default: templates/annotate/guidelines.md).")
@click.option("--teacher", default=None,
              help="Model for Chat mode and for writing candidates of prompt-only tasks: openai:MODEL | "
                   "langchain:module:Class | hf:ALIAS_OR_PATH.")
@click.option("--base-url", default=None, help="OpenAI-compatible server for an openai: teacher.")
@click.option("--api-key-env", default="OPENAI_API_KEY", show_default=True,
              help="Environment variable holding the teacher's API key.")
@click.option("--teacher-kwargs", default="{}", show_default=True, help="JSON kwargs for a langchain: teacher.")
@click.option("--num-candidates", default=4, show_default=True, type=click.IntRange(2, 9),
              help="Answers the teacher writes per prompt-only task.")
@click.option("--max-tokens", default=256, show_default=True, type=click.IntRange(1),
              help="Longest answer the teacher writes.")
@click.option("--temperature", default=1.0, show_default=True, type=FiniteFloat(0),
              help="Sampling temperature for candidates.")
@click.option("--chat-temperature", default=0.7, show_default=True, type=FiniteFloat(0),
              help="Sampling temperature in Chat mode.")
@click.option("--seed", default=0, show_default=True, type=SEED,
              help="Candidate j of a prompt is sampled with seed+j.")
@click.option("--timeout", default=120.0, show_default=True, type=FiniteFloat(0, min_open=True),
              help="Seconds per teacher request.")
@click.option("--ready-file", default=None, type=NonEmptyPath(dir_okay=False),
              help="Write {url, port} here once listening (for scripts).")
@click.option("--json", "as_json", is_flag=True, help="Print the load summary as JSON (then serve).")
@allow_pickle_option
@config_option
@click.pass_context
def annotate_cmd(ctx, tasks, db_path, host, port, allowed_hosts, per_item, guidelines, teacher, base_url,
                 api_key_env, teacher_kwargs, num_candidates, max_tokens, temperature, chat_temperature, seed,
                 timeout, ready_file, as_json):
    """Start the annotation web app: people rank answers and play user and assistant.

    \b
    llamakit annotate add-user alice --db ann.sqlite        # prints alice's token
    llamakit annotate --tasks prefs.jsonl --db ann.sqlite --per-item 2 --teacher openai:gpt-4o-mini
    llamakit annotate export --db ann.sqlite --out human-prefs.jsonl
    llamakit annotate agreement --db ann.sqlite --judge-file judged.jsonl
    """
    if ctx.invoked_subcommand is not None:
        return
    from pathlib import Path

    from toolkit.annotate.app import run
    from toolkit.annotate.db import open_for_load
    from toolkit.annotate.deps import ChatSettings
    from toolkit.annotate.tasks import GenerationSettings, check_tasks, load_tasks
    from toolkit.console import emit_json, progress, summary_table
    from toolkit.errors import UserError
    from toolkit.resources import template_path

    try:
        kwargs = json.loads(teacher_kwargs)
    except ValueError as err:
        raise UserError(f"--teacher-kwargs is not JSON: {err}") from None
    guidelines_file = Path(guidelines) if guidelines else template_path("annotate/guidelines.md")
    if not guidelines_file.is_file():
        raise UserError("no such guidelines file", file=str(guidelines_file))
    try:
        guidelines_text = guidelines_file.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError("not UTF-8 text", file=str(guidelines_file)) from None

    factory = None
    if teacher:
        from toolkit.teachers import make_teacher

        if teacher.startswith("rules:"):
            raise UserError("--teacher must write answers (openai:, langchain: or hf:), not rules:")

        def factory():
            return make_teacher(teacher, base_url=base_url, api_key_env=api_key_env, kwargs=kwargs, timeout=timeout)

    # the task file is read and checked before the database file is created: a bad file leaves no empty DB
    settings = GenerationSettings(num_candidates=num_candidates, max_tokens=max_tokens, temperature=temperature,
                                  seed=seed)
    rows = check_tasks(tasks, factory is not None, settings) if tasks else None
    if rows is None and not Path(db_path).exists():
        raise UserError("the database holds no items yet: pass --tasks FILE", file=db_path)
    with open_for_load(db_path) as db:
        summary = {"items": db.count_items()}
        if rows is not None:
            with progress() as bar:
                bars: list = []

                def step(done, total):
                    if not bars:
                        bars.append(bar.add_task("writing candidates", total=total, status=teacher))
                    bar.update(bars[0], completed=done)

                summary = load_tasks(db, tasks, factory, settings, progress=step, tasks=rows)
        if summary["items"] == 0:
            raise UserError("the database holds no items yet: pass --tasks FILE", file=db_path)
        annotators = len(db.annotators())
    summary = {**summary, "annotators": annotators, "per_item": per_item, "db": db_path}
    if as_json:
        emit_json(summary)
    else:
        summary_table("annotate", summary)
    run(db_path, host=host, port=port, per_item=per_item, guidelines_markdown=guidelines_text,
        teacher_factory=factory, teacher_name=teacher,
        chat=ChatSettings(max_tokens=max_tokens, temperature=chat_temperature, timeout_s=timeout),
        ready_file=ready_file,
        extra_hosts=tuple(h.strip() for value in allowed_hosts for h in value.split(",") if h.strip()))


@annotate_cmd.command("add-user")
@click.argument("name")
@click.option("--db", "db_path", default="annotations.sqlite", show_default=True, type=NonEmptyPath(dir_okay=False),
              help="The annotation database (created if missing).")
@click.option("--rotate", is_flag=True, help="Give an existing annotator a new token (the old one stops working).")
@click.option("--json", "as_json", is_flag=True, help="Print {name, token} as JSON.")
@config_option
def add_user_cmd(name, db_path, rotate, as_json):
    """Create annotator NAME and print their login token (shown once; only its hash is stored)."""
    from toolkit.annotate.db import AnnotationDB
    from toolkit.console import console, emit_json

    with AnnotationDB(db_path) as db:
        token = db.add_annotator(name, rotate=rotate)
    if as_json:
        emit_json({"name": name.strip(), "token": token})
        return
    click.echo(token)
    console.print(f"[green]{'new token for' if rotate else 'added'}[/] {name.strip()} — give them this token; "
                  "they log in with it on the app's page")


@annotate_cmd.command("progress")
@click.option("--db", "db_path", required=True, type=NonEmptyPath(dir_okay=False), help="The annotation database.")
@click.option("--per-item", default=1, show_default=True, type=click.IntRange(1, 100),
              help="Rankings each item needs (as given to the app) to count as complete.")
@click.option("--json", "as_json", is_flag=True, help="Print {items, complete, per_item, annotators} as JSON.")
@config_option
def progress_cmd(db_path, per_item, as_json):
    """The team's progress: items complete, and per annotator items ranked, skipped, pace and chats."""
    import datetime

    from rich.table import Table

    from toolkit.annotate.db import AnnotationDB
    from toolkit.console import console, emit_json

    with AnnotationDB(db_path, readonly=True, create=False) as db:
        totals, people = db.items_with_rankings(per_item), db.team_progress()
    if as_json:
        emit_json({**totals, "annotators": people})
        return
    table = Table(title=f"{totals['complete']} of {totals['items']} items have {per_item} ranking(s)",
                  title_justify="left")
    for column in ("annotator", "ranked", "skipped", "s / item", "chats", "last active"):
        table.add_column(column, justify="left" if column in ("annotator", "last active") else "right")
    for p in people:
        last = (datetime.datetime.fromtimestamp(p["last_active"]).strftime("%Y-%m-%d %H:%M")
                if p["last_active"] else "—")
        pace = "—" if p["median_seconds"] is None else f"{p['median_seconds']:.1f}"
        table.add_row(p["annotator"], str(p["ranked"]), str(p["skipped"]), pace, str(p["chats"]), last)
    console.print(table)


@annotate_cmd.command("export")
@click.option("--db", "db_path", required=True, type=NonEmptyPath(dir_okay=False), help="The annotation database.")
@click.option("--out", required=True, type=NonEmptyPath(dir_okay=False),
              help="Preference pairs (prompt/chosen/rejected JSONL) for train-reward.")
@click.option("--conversations", "conversations_out", default=None, type=NonEmptyPath(dir_okay=False),
              help="Conversation rows (messages JSONL) for sft [default: OUT with .conversations before the "
                   "suffix].")
@click.option("--pairs", type=click.Choice(["all", "best-worst"]), default="all", show_default=True,
              help="All pairs each ranking implies, or the best tier over the worst only.")
@click.option("--keep-flagged", is_flag=True,
              help="Keep pairs whose chosen answer was flagged harmful/unusable (dropped by default).")
@click.option("--no-rewrites", is_flag=True, help="Leave out the better answers annotators wrote.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@config_option
def export_cmd(db_path, out, conversations_out, pairs, keep_flagged, no_rewrites, as_json):
    """Write preference pairs and conversation rows (generate-data's formats) from the annotations."""
    from toolkit.annotate.export import export
    from toolkit.console import emit_json, summary_table

    stats = export(db_path, out, conversations_out, pairs=pairs, keep_flagged=keep_flagged,
                   rewrites=not no_rewrites)
    if as_json:
        emit_json(stats.as_dict())
        return
    rows = stats.as_dict()
    per = rows.pop("per_annotator")
    summary_table("annotate export", {**rows, **{f"pairs from {k}": v for k, v in sorted(per.items())}})


@annotate_cmd.command("agreement")
@click.option("--db", "db_path", required=True, type=NonEmptyPath(dir_okay=False), help="The annotation database.")
@click.option("--judge-file", default=None, type=NonEmptyPath(dir_okay=False),
              help="An LLM judge's labels on the same items: preference rows (prompt/chosen/rejected) or rows "
                   "with candidates and scores [default: the labels the task file carried, if any].")
@click.option("--no-task-labels", is_flag=True, help="Do not use the task file's own labels as the judge.")
@click.option("--plot", "plot_path", default=None, type=NonEmptyPath(dir_okay=False),
              help="PNG heatmap of the kappas [default: DB name + -agreement.png].")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@config_option
def agreement_cmd(db_path, judge_file, no_task_labels, plot_path, as_json):
    """Inter-annotator agreement (Cohen's, Fleiss' kappa) and how far the LLM judge agrees with people."""
    import math
    from pathlib import Path

    from rich.table import Table

    from toolkit.annotate.agreement import agreement, plot, strength
    from toolkit.console import console, emit_json

    report = agreement(db_path, judge_file, use_task_labels=not no_task_labels)
    plot_path = plot_path or str(Path(db_path).with_name(Path(db_path).stem + "-agreement.png"))
    plot(report, plot_path)
    if as_json:
        emit_json({**report.as_dict(), "plot": plot_path})
        return
    table = Table(title=f"agreement on candidate pairs ({report.units} labelled, {report.shared_units} by 2+ people)",
                  title_justify="left")
    for column in ("rater", "vs", "pairs", "agreement", "kappa", "strength"):
        table.add_column(column, justify="right" if column in ("pairs", "agreement", "kappa") else "left")
    rows = report.pairwise + ([report.fleiss] if report.fleiss else []) + report.judge
    for c in rows:
        table.add_row(c.a, c.b + (" (Fleiss)" if c.kind == "fleiss" else ""), str(c.units),
                      "—" if math.isnan(c.agreement) else f"{c.agreement:.0%}",
                      "—" if math.isnan(c.kappa) else f"{c.kappa:.3f}", strength(c.kappa))
    console.print(table)
    if report.judge_source:
        console.print(f"judge: {report.judge_source} ({report.judge_matched} of {report.judge_rows} rows matched "
                      "items)")
    console.print(f"[bold]{report.verdict}[/]")
    console.print(f"plot: {plot_path}")


COMMANDS = [annotate_cmd]
