"""`llamakit ask`: one question to any teacher, to check a teacher spec before a long run."""

from __future__ import annotations

import json

import click

from toolkit.commands.params import SEED, FiniteFloat
from toolkit.config import config_option
from toolkit.models import allow_pickle_option


@click.command("ask")
@click.argument("question")
@click.option("--teacher", default="hf:smollm2-135m", show_default=True,
              help="openai:MODEL | langchain:module:Class | hf:ALIAS_OR_PATH")
@click.option("--base-url", default=None, help="OpenAI-compatible server for openai: teachers.")
@click.option("--api-key-env", default="OPENAI_API_KEY", show_default=True,
              help="Environment variable holding the API key.")
@click.option("--teacher-kwargs", default="{}", show_default=True, help="JSON kwargs for a langchain: teacher.")
@click.option("--system", default=None, help="Optional system message.")
@click.option("--max-tokens", default=128, show_default=True, type=click.IntRange(1))
@click.option("--temperature", default=0.7, show_default=True, type=FiniteFloat(0))
@click.option("--seed", default=None, type=SEED, help="Sampling seed [default: the teacher's own randomness].")
@click.option("--timeout", default=60.0, show_default=True, type=FiniteFloat(0, min_open=True),
              help="Seconds per request.")
@click.option("--json", "as_json", is_flag=True, help="Print the reply as one JSON object.")
@allow_pickle_option
@config_option
def ask_cmd(question, teacher, base_url, api_key_env, teacher_kwargs, system, max_tokens, temperature, seed,
            timeout, as_json):
    """Ask QUESTION to a teacher and print its answer with usage and latency."""
    import asyncio

    from toolkit.console import console, emit_json, redact, redact_url, summary_table
    from toolkit.errors import UserError
    from toolkit.teachers import Unreachable, close_teacher, make_teacher

    try:
        kwargs = json.loads(teacher_kwargs)
    except ValueError as err:
        raise UserError(f"--teacher-kwargs is not JSON: {err}") from None
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question}]

    async def run():
        t = make_teacher(teacher, base_url=base_url, api_key_env=api_key_env, kwargs=kwargs, timeout=timeout)
        try:
            return await t.chat(messages, max_tokens=max_tokens, temperature=temperature, seed=seed)
        finally:
            await close_teacher(t)

    try:
        reply = asyncio.run(run())
    except UserError:
        raise
    except Unreachable as err:  # names the (redacted) URL and the cause already
        raise UserError(f"{teacher} failed: {err}") from err
    except Exception as err:  # noqa: BLE001 - `ask` checks a teacher spec: how the call failed is the answer
        where = f" at {redact_url(base_url)}" if base_url else ""  # never the URL's user:password or key=
        raise UserError(redact(f"{teacher}{where} failed: {type(err).__name__}: {err}")) from err
    if as_json:
        emit_json({"text": reply.text, **reply.meta})
        return
    console.print(reply.text)
    summary_table(teacher, reply.meta)


COMMANDS = [ask_cmd]
