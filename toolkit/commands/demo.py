"""`llamakit demo`: the embedded LLaMA behind `llamakit serve`, asked through the real `openai` client."""

from __future__ import annotations

import click

from toolkit.config import config_option

DEMO_QUESTIONS = (
    "What is the capital of France?",
    "Give me two tips for writing clear emails.",
    "Explain in one sentence what a reward model is.",
    "Name three fruits that are red.",
)


@click.command("demo")
@click.option("--model", default="smollm2-135m", show_default=True, help="Model to serve.")
@click.option("--max-tokens", default=48, show_default=True)
@config_option
def demo_cmd(model, max_tokens):
    """Start `llamakit serve` on a free loopback port and chat with it through the openai client."""
    import asyncio
    import time

    from openai import AsyncOpenAI
    from rich.table import Table

    from toolkit.console import console
    from toolkit.server_process import running_server

    with console.status(f"starting llamakit serve --model {model} ..."):
        server_cm = running_server(model)
        server = server_cm.__enter__()
    try:
        console.print(f"[green]serving[/] {server.model} at {server.url}")
        client = AsyncOpenAI(base_url=server.url, api_key="none")

        async def ask_all():
            start = time.perf_counter()
            replies = await asyncio.gather(*(client.chat.completions.create(
                model=server.model, messages=[{"role": "user", "content": q}], max_tokens=max_tokens,
                temperature=0.7, seed=i) for i, q in enumerate(DEMO_QUESTIONS)))
            elapsed = time.perf_counter() - start
            console.print("[bold]streaming:[/] ", end="")
            stream = await client.chat.completions.create(
                model=server.model, messages=[{"role": "user", "content": "Say hello in French and English."}],
                max_tokens=max_tokens, stream=True)
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    console.print(chunk.choices[0].delta.content, end="")
            console.print()
            await client.close()
            return replies, elapsed

        replies, elapsed = asyncio.run(ask_all())
        table = Table(title=f"{len(replies)} concurrent requests, batched, in {elapsed:.1f} s")
        for column in ("question", "answer", "tokens", "finish"):
            table.add_column(column)
        for q, r in zip(DEMO_QUESTIONS, replies, strict=True):
            table.add_row(q, r.choices[0].message.content, str(r.usage.completion_tokens), r.choices[0].finish_reason)
        console.print(table)
    finally:
        server_cm.__exit__(None, None, None)


COMMANDS = [demo_cmd]
