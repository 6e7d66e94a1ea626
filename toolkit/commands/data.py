"""`llamakit generate-data ...` (instructions, conversations, preferences, scores) and `llamakit data ...`.

A thin layer: flags -> dataclasses -> toolkit.generate.*; heavy imports happen inside the commands.
"""

from __future__ import annotations

import click

from toolkit.commands.params import SEED, FiniteFloat, FloatList, NonEmptyPath, dataclass_options, pop_config
from toolkit.config import config_option
from toolkit.generate.common import Sampling, TeacherOptions
from toolkit.generate.runner import RunOptions
from toolkit.models import allow_pickle_option

TEACHER_HELP = "openai:MODEL | langchain:module:Class | hf:ALIAS_OR_PATH"


def common_options(**sampling_defaults: float | int):
    """Flags every generate-data sub-command shares: the output, one per field of the engine's RunOptions,
    Sampling and TeacherOptions (`sampling_defaults` replace Sampling's defaults), and --json."""
    output = [
        click.option("--out", required=True, type=NonEmptyPath(dir_okay=False),
                     help="Output file (JSONL rows; resumed when it exists). Failed rows go to OUT.failed.jsonl."),
        click.option("--format", "fmt", type=click.Choice(["jsonl", "parquet"]), default="jsonl", show_default=True,
                     help="Output format; parquet is written at the end from a JSONL journal OUT.jsonl."),
        click.option("--limit", type=click.IntRange(0), default=0, show_default=True,
                     help="Use only the first N input rows (0 = all)."),
    ]
    engine_flags = dataclass_options(RunOptions, Sampling, TeacherOptions, defaults=sampling_defaults)
    as_json = click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON object on stdout.")

    def decorate(func):
        func = engine_flags(as_json(func))
        for option in reversed(output):
            func = option(func)
        return config_option(allow_pickle_option(func))

    return decorate


def engine(kw: dict) -> tuple[RunOptions, Sampling, TeacherOptions, dict]:
    """Pop the shared flags into (RunOptions, Sampling, TeacherOptions, output kwargs)."""
    options = pop_config(RunOptions, kw)
    sampling = pop_config(Sampling, kw)
    teacher_options = pop_config(TeacherOptions, kw, timeout=options.timeout)
    _note_rows_kept(kw["out"], kw["fmt"])
    return options, sampling, teacher_options, {"out": kw.pop("out"), "fmt": kw.pop("fmt"), "limit": kw.pop("limit")}


def _note_rows_kept(out: str, fmt: str) -> None:
    """What SIGINT/SIGTERM leaves: every finished row is on disk (fsync'd) and a re-run skips it."""
    from toolkit.console import note_output
    from toolkit.generate.runner import output_files

    def kept() -> str:
        rows = output_files(out, fmt).rows
        with open(rows, "rb") as f:
            count = sum(1 for line in f if line.endswith(b"\n"))
        return f"the {count} rows finished so far are kept in {rows}"

    note_output(kept, "run the same command again to resume (finished rows are skipped)")


def report(summary, as_json: bool, exports: tuple[str, ...] = ()) -> int:
    """Print the summary and write the exports; the exit code: EXIT_ROWS_FAILED when rows failed, else 0."""
    from toolkit.console import console
    from toolkit.errors import EXIT_ROWS_FAILED
    from toolkit.generate.formats import export_path, write_rows
    from toolkit.generate.runner import finish
    from toolkit.io import read_existing

    finish(summary, as_json=as_json)
    if exports:
        rows = read_existing(summary.files.rows)
        for fmt in exports:
            path = export_path(summary.files.parquet or summary.files.rows, fmt)
            count = write_rows(rows, path, fmt, overwrite=True)  # derived from OUT, remade each run
            console.print(f"exported {count} rows as {fmt}: {path}")
    return EXIT_ROWS_FAILED if summary.failed else 0


@click.group("generate-data")
def generate_data() -> None:
    """Make instructions, conversations, preference pairs and scored answers with teacher LLMs.

    Runs are concurrent, rate limited and resumable: run the same command again after a crash and
    only unfinished rows are requested.

    Exit code: 0 when every row is done (or dropped on purpose), 3 when some rows failed after their
    retries (errors in OUT.failed.jsonl; the same command with --retry-failed runs them again), 2 on bad
    input or flags."""


@generate_data.command("instructions")
@click.option("--seeds", required=True, type=NonEmptyPath(),
              help="Seed tasks: self-instruct seed_tasks.jsonl, Alpaca rows or prompt rows.")
@click.option("--teacher", default="hf:smollm2-135m", show_default=True, help=TEACHER_HELP)
@click.option("--num-instructions", type=click.IntRange(1), default=100, show_default=True,
              help="New instructions wanted in OUT.")
@click.option("--num-examples", type=click.IntRange(1), default=8, show_default=True,
              help="Instructions shown to the teacher per request.")
@click.option("--max-rouge", type=FiniteFloat(0, 1), default=0.7, show_default=True,
              help="Keep an instruction only when its ROUGE-L against every pool entry is below this.")
@click.option("--min-words", type=click.IntRange(1), default=3, show_default=True)
@click.option("--max-words", type=click.IntRange(1), default=150, show_default=True)
@click.option("--max-requests", type=click.IntRange(0), default=0, show_default=True,
              help="Stop after this many requests (0: 4 x --num-instructions).")
@common_options(temperature=1.0, max_tokens=128)
def instructions_cmd(seeds, teacher, num_instructions, num_examples, max_rouge, min_words, max_words,
                     max_requests, as_json, **kw):
    """Self-instruct: new task instructions from seed tasks, ROUGE-L, length and blacklist filtered."""
    from toolkit.generate import instructions

    options, sampling, teacher_options, out = engine(kw)
    summary = instructions.run(
        seeds, out["out"], teacher=teacher, sampling=sampling, options=options, teacher_options=teacher_options,
        limit=out["limit"], fmt=out["fmt"],
        plan=instructions.Plan(num_instructions=num_instructions, num_examples=num_examples,
                               max_requests=max_requests),
        filters=instructions.Filters(max_rouge=max_rouge, min_words=min_words, max_words=max_words))
    return report(summary, as_json)


@generate_data.command("conversations")
@click.option("--prompts", required=True, type=NonEmptyPath(),
              help="Seed prompts: llamakit, Alpaca, self-instruct, HH text or ShareGPT rows (JSONL/JSON).")
@click.option("--teacher", default="hf:smollm2-135m", show_default=True, help=f"The assistant agent: {TEACHER_HELP}")
@click.option("--user-teacher", default=None, help="The user-simulator agent (default: the --teacher).")
@click.option("--turns", type=click.IntRange(1), default=2, show_default=True,
              help="Assistant answers per conversation (1: single-turn answers).")
@click.option("--window", type=click.IntRange(0), default=4, show_default=True,
              help="Each agent sees the last k turns (0: all).")
@click.option("--user-temperature", type=FiniteFloat(0), default=0.9, show_default=True)
@click.option("--user-max-tokens", type=click.IntRange(1), default=96, show_default=True)
@click.option("--assistant-system", default="assistant_system", show_default=True,
              help="System prompt of the assistant: a name under prompts/ or a .txt file.")
@click.option("--user-system", default="user_simulator_system", show_default=True,
              help="System prompt of the user simulator (Jinja variable: goal).")
@click.option("--export", "exports", multiple=True, type=click.Choice(["chatllama", "sharegpt", "hf"]),
              help="Also write the conversations in this format beside OUT (repeatable).")
@common_options()
def conversations_cmd(prompts, teacher, user_teacher, turns, window, user_temperature, user_max_tokens,
                      assistant_system, user_system, exports, as_json, **kw):
    """Role-play: a user-simulator agent and an assistant agent talk for --turns turns per seed prompt."""
    from toolkit.generate import conversations

    options, sampling, teacher_options, out = engine(kw)
    dialogue = conversations.Dialogue(turns=turns, window=window, assistant_system=assistant_system,
                                      user_system=user_system, user_temperature=user_temperature,
                                      user_max_tokens=user_max_tokens)
    summary = conversations.run(prompts, out["out"], teacher=teacher, user_teacher=user_teacher, dialogue=dialogue,
                                sampling=sampling, options=options, teacher_options=teacher_options,
                                limit=out["limit"], fmt=out["fmt"])
    return report(summary, as_json, exports)


@generate_data.command("preferences")
@click.option("--prompts", required=True, type=NonEmptyPath(),
              help="Prompts (any input format); rows with 'responses' (2+) are judged as they are.")
@click.option("--teacher", "teachers", multiple=True, default=("hf:smollm2-135m",), show_default=True,
              help=f"Writes candidates (repeatable: candidates cycle over teachers). {TEACHER_HELP}")
@click.option("--num-candidates", type=click.IntRange(2), default=4, show_default=True, help="K answers per prompt.")
@click.option("--temperatures", default=None, type=FloatList(FiniteFloat(0)),
              help="Comma-separated temperatures the candidates cycle over (default: --temperature).")
@click.option("--judge", default=None, help=f"Judge LLM: {TEACHER_HELP} (or rules:... as a scorer).")
@click.option("--pairwise", is_flag=True, help="Judge pairs, each asked twice with positions swapped.")
@click.option("--judge-logprobs", is_flag=True,
              help="Read the judge's rating as the expected digit under its first-token logprobs (one token "
                   "per answer; no output format to follow). Needs a judge that reports logprobs.")
@click.option("--scorer", default=None, help="Rule scorers, e.g. rules:length,refusal=2,repetition,truncation.")
@click.option("--scorer-weight", type=FiniteFloat(0), default=1.0, show_default=True,
              help="Weight of the rules against the judge when both are given.")
@click.option("--max-score", type=click.IntRange(1), default=None, show_default="10, or 5 with --judge-logprobs",
              help="Pointwise judge rating scale 0..N.")
@click.option("--min-margin", type=FiniteFloat(0, 1), default=0.0, show_default=True,
              help="Keep a pair only when best - worst >= this (scores are in [0, 1]); ties are always dropped.")
@click.option("--judge-temperature", type=FiniteFloat(0), default=0.0, show_default=True)
@click.option("--judge-max-tokens", type=click.IntRange(1), default=256, show_default=True)
@click.option("--revise", is_flag=True,
              help="With --scorer rules:constraints: chosen = the best candidate edited by code to meet more of "
                   "its constraints (lowercase, quotes, closing phrase, P.S., ...), rejected = that candidate "
                   "as written; prompts code cannot improve are paired best vs worst.")
@click.option("--contrast", is_flag=True,
              help="With --scorer rules:constraints: after each pair, a second one: its chosen answer against "
                   "itself in a format the prompt did not ask for (quotes, lowercase, JSON, title, P.S.; one "
                   "drawn per prompt), so DPO learns to format only when asked.")
@click.option("--export", "exports", multiple=True, type=click.Choice(["trl-conversational", "trl-standard", "hh"]),
              help="Also write the pairs in this format beside OUT (repeatable).")
@common_options()
def preferences_cmd(prompts, teachers, num_candidates, temperatures, judge, pairwise, judge_logprobs, scorer,
                    scorer_weight, max_score, min_margin, judge_temperature, judge_max_tokens, revise, contrast,
                    exports, as_json, **kw):
    """K candidates per prompt, scored by a judge and/or rules, binarized into chosen / rejected."""
    from toolkit.generate import preferences

    options, sampling, teacher_options, out = engine(kw)
    if max_score is None:
        max_score = 5 if judge_logprobs else 10
    judging = preferences.Judging(judge=judge, pairwise=pairwise, scorer=scorer, scorer_weight=scorer_weight,
                                  max_score=max_score, min_margin=min_margin, judge_temperature=judge_temperature,
                                  judge_max_tokens=judge_max_tokens, logprobs=judge_logprobs, revise=revise,
                                  contrast=contrast)
    summary = preferences.run(prompts, out["out"], teachers=teachers, judging=judging, num_candidates=num_candidates,
                              temperatures=temperatures or (sampling.temperature,),
                              sampling=sampling, options=options, teacher_options=teacher_options,
                              limit=out["limit"], fmt=out["fmt"])
    return report(summary, as_json, exports)


@generate_data.command("scores")
@click.option("--prompts", required=True, type=NonEmptyPath(),
              help="Rows with a prompt and an answer (response, completion, output, last assistant turn).")
@click.option("--judge", required=True, help=f"Fills prompts/score_rubric.txt with a 0-5 score. {TEACHER_HELP}")
@click.option("--teacher", default=None, help="Writes the answer for rows that have none.")
@click.option("--judge-max-tokens", type=click.IntRange(1), default=16, show_default=True)
@click.option("--judge-temperature", type=FiniteFloat(0), default=0.0, show_default=True)
@common_options()
def scores_cmd(prompts, judge, teacher, judge_max_tokens, judge_temperature, as_json, **kw):
    """ChatLLaMA-style reward data: one answer and a 0-5 rubric score per row; unparsable scores are retried."""
    from toolkit.generate import scores

    options, sampling, teacher_options, out = engine(kw)
    judge_sampling = Sampling(max_tokens=judge_max_tokens, temperature=judge_temperature, top_p=1.0,
                              seed=sampling.seed)
    summary = scores.run(prompts, out["out"], judge=judge, teacher=teacher, sampling=sampling,
                         judge_sampling=judge_sampling, options=options, teacher_options=teacher_options,
                         limit=out["limit"], fmt=out["fmt"])
    return report(summary, as_json)


@click.group("data")
def data_group() -> None:
    """Look at and convert data files (conversations, preference pairs, scored answers)."""


@data_group.command("stats")
@click.argument("file", type=NonEmptyPath())
@click.option("--png", default=None, type=NonEmptyPath(dir_okay=False),
              help="Histogram PNG (default: FILE's name with .stats.png).")
@click.option("--json", "as_json", is_flag=True, help="Print the numbers as one JSON object on stdout.")
@config_option
def stats_cmd(file, png, as_json):
    """Rows, kinds, turns, lengths, score and margin histograms of FILE (any supported format)."""
    from pathlib import Path

    from toolkit.console import console, emit_json, summary_table
    from toolkit.generate import stats

    numbers = stats.compute(file)
    png_path = stats.plot(numbers, png or Path(file).with_name(Path(file).name.split(".")[0] + ".stats.png"))
    numbers.pop("_series")
    numbers["png"] = str(png_path)
    if as_json:
        emit_json(numbers)
    else:
        summary_table(f"data stats: {file}", numbers)
        console.print(f"histograms: {png_path}")


@data_group.command("convert")
@click.argument("src", metavar="IN", type=NonEmptyPath())
@click.argument("dst", metavar="OUT", type=NonEmptyPath())
@click.option("--to", "fmt", required=True,
              type=click.Choice(["llamakit", "parquet", "hf", "sharegpt", "chatllama", "trl-conversational",
                                 "trl-standard", "hh"]),
              help="Output format (hf: a datasets directory; .json OUT: a JSON array, else JSONL).")
@click.option("--overwrite", is_flag=True,
              help="Replace OUT if it exists (an hf directory only when llamakit wrote it).")
@config_option
def convert_cmd(src, dst, fmt, overwrite):
    """Convert IN (llamakit, TRL, HH, ShareGPT, ChatLLaMA, Alpaca, OpenAI messages; JSONL / JSON / Parquet / a
    `datasets` directory) to OUT."""
    from toolkit.console import console
    from toolkit.generate.formats import convert

    count = convert(src, dst, fmt, overwrite=overwrite)
    console.print(f"wrote {count} rows as {fmt}: {dst}")


def _constraint_kinds(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[str, ...]:
    from toolkit.generate.constraints import parse_kinds

    try:
        return parse_kinds(value)
    except ValueError as err:
        raise click.BadParameter(str(err), ctx, param) from None


@generate_data.command("constraints")
@click.option("--prompts", required=True, type=NonEmptyPath(),
              help="Instructions: llamakit, Alpaca, self-instruct, HH text or ShareGPT rows (JSONL/JSON/Parquet).")
@click.option("--out", required=True, type=NonEmptyPath(dir_okay=False),
              help="Prompt rows with their constraints (JSONL; a JSON array when the name ends in .json).")
@click.option("--per-prompt", default="1..3", show_default=True,
              help="Constraints per prompt: N, or LOW..HIGH drawn uniformly per prompt.")
@click.option("--kinds", default=None, callback=_constraint_kinds,
              help="Comma-separated constraint kinds to draw from, e.g. word_limit,keywords,no_commas,json "
                   "(default: all twelve; a wrong name lists them).")
@click.option("--seed", type=SEED, default=0, show_default=True,
              help="Draws the kinds, arguments and phrasings (with each instruction's text).")
@click.option("--limit", type=click.IntRange(0), default=0, show_default=True,
              help="Use only the first N input rows (0 = all).")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON object on stdout.")
@config_option
def constraints_cmd(prompts, out, per_prompt, kinds, seed, limit, overwrite, as_json):
    """Verifiable instruction-following prompts: IFEval-style constraints (word limits, keywords, JSON,
    bullets, P.S. ...) written into each prompt and kept as data for `--scorer rules:constraints`."""
    from toolkit.console import console, emit_json, summary_table
    from toolkit.errors import UserError
    from toolkit.generate import constraints

    try:
        count = constraints.parse_per_prompt(per_prompt, kinds)
    except ValueError as err:
        raise UserError(f"--per-prompt: {err}") from None
    summary = constraints.run(prompts, out, seed=seed, per_prompt=count, kinds=kinds, limit=limit,
                              overwrite=overwrite)
    if as_json:
        emit_json(summary)
    else:
        summary_table(f"constraints: {out}", {k: v for k, v in summary.items() if k != "per_kind"})
        console.print("per kind: " + ", ".join(f"{k} {n}" for k, n in summary["per_kind"].items()))


COMMANDS = [generate_data, data_group]
