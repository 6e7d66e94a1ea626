"""`llamakit serve`: an OpenAI-compatible endpoint for a local model."""

from __future__ import annotations

import os

import click

from toolkit.config import config_option
from toolkit.models import allow_pickle_option


@click.command("serve")
@click.option("--model", default="smollm2-135m", show_default=True,
              help="Alias of an embedded model or a local Hugging Face directory (e.g. a trained policy).")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Interface to bind; anything but loopback must be asked for explicitly.")
@click.option("--port", default=8000, show_default=True, help="Port (0 picks a free one).")
@click.option("--api-key-env", default=None,
              help="Name of an environment variable holding the bearer key clients must send.")
@click.option("--api-key", default=None, help="Bearer key clients must send (prefer --api-key-env: argv is visible).")
@click.option("--served-name", default=None, help="Model id reported by /v1/models (default: the alias or dir name).")
@click.option("--max-batch", default=32, show_default=True, help="Most sequences generated together.")
@click.option("--batch-wait-ms", default=20.0, show_default=True,
              help="How long the first request of a batch waits for company.")
@click.option("--max-queue", default=512, show_default=True, help="Waiting sequences beyond this get 503.")
@click.option("--max-tokens-cap", default=1024, show_default=True, help="Largest max_tokens a request may ask for.")
@click.option("--max-n", default=8, show_default=True, help="Largest n (choices per request).")
@click.option("--ready-file", default=None, type=click.Path(dir_okay=False),
              help="Write {url, port, model} here once listening (for scripts).")
@allow_pickle_option
@config_option
def serve_cmd(model, host, port, api_key_env, api_key, served_name, max_batch, batch_wait_ms, max_queue,
              max_tokens_cap, max_n, ready_file):
    """Serve a local causal LM through the OpenAI chat-completions API (streaming included)."""
    from toolkit.errors import UserError
    from toolkit.serve import ServeLimits, serve

    if api_key_env:
        api_key = os.environ.get(api_key_env)
        if not api_key:
            raise UserError(f"--api-key-env {api_key_env}: that environment variable is empty or unset")
    serve(model=model, host=host, port=port, api_key=api_key, served_name=served_name, max_batch=max_batch,
          batch_wait_ms=batch_wait_ms, max_queue=max_queue, ready_file=ready_file,
          limits=ServeLimits(max_tokens=max_tokens_cap, max_n=max_n))


COMMANDS = [serve_cmd]
