"""`llamakit serve`: an OpenAI-compatible endpoint for a local model."""

from __future__ import annotations

import os

import click

from toolkit.commands.params import NON_EMPTY, FiniteFloat, NonEmptyPath
from toolkit.config import config_option
from toolkit.models import allow_pickle_option


@click.command("serve")
@click.option("--model", default="smollm2-135m", show_default=True, type=NON_EMPTY,
              help="Alias of an embedded model or a local Hugging Face directory (e.g. a trained policy).")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Interface to bind; anything but loopback must be asked for explicitly.")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535),
              help="Port (0 picks a free one).")
@click.option("--allowed-hosts", multiple=True, metavar="NAMES",
              help="More names the Host header may carry (repeatable or comma-separated; `*` = any). "
                   "Loopback names, IP addresses and --host are always allowed; any other Host gets 421, "
                   "which stops DNS-rebinding pages. Browser requests from another Origin get 403, and POST "
                   "bodies must be application/json (415).")
@click.option("--api-key-env", default=None,
              help="Name of an environment variable holding the bearer key clients must send.")
@click.option("--api-key", default=None, help="Bearer key clients must send (prefer --api-key-env: argv is visible).")
@click.option("--served-name", default=None,
              help="Model id reported by /v1/models (default: the alias or dir name); requests may name the "
                   "model by it or by the --model value, any other name is a 404.")
@click.option("--max-batch", default=32, show_default=True, type=click.IntRange(1),
              help="Most sequences generated together.")
@click.option("--batch-wait-ms", default=20.0, show_default=True, type=FiniteFloat(0),
              help="How long the first request of a batch waits for company.")
@click.option("--max-queue", default=512, show_default=True, type=click.IntRange(1),
              help="Waiting sequences beyond this get 503.")
@click.option("--max-tokens-cap", default=1024, show_default=True, type=click.IntRange(1),
              help="Largest max_tokens a request may ask for.")
@click.option("--max-n", default=8, show_default=True, type=click.IntRange(1),
              help="Largest n (choices per request).")
@click.option("--ready-file", default=None, type=NonEmptyPath(dir_okay=False),
              help="Write {url, port, model} here once listening (for scripts).")
@allow_pickle_option
@config_option
def serve_cmd(model, host, port, allowed_hosts, api_key_env, api_key, served_name, max_batch, batch_wait_ms,
              max_queue, max_tokens_cap, max_n, ready_file):
    """Serve a local causal LM through the OpenAI chat-completions and legacy completions APIs (streaming
    included). OpenAI parameters it cannot honour (tools, JSON modes, audio ...) and unknown keys get a 400
    naming them.

    Each request's sampling fields are checked (finite numbers, ranges, an int64 seed) before it joins a
    batch, so one bad request cannot fail the others; the Host, Origin and Content-Type checks keep web
    pages (cross-site requests, DNS rebinding) from driving the model.
    """
    from toolkit.errors import UserError
    from toolkit.serve import ServeLimits, serve

    if api_key_env:
        api_key = os.environ.get(api_key_env)
        if not api_key:
            raise UserError(f"--api-key-env {api_key_env}: that environment variable is empty or unset")
    serve(model=model, host=host, port=port, api_key=api_key, served_name=served_name, max_batch=max_batch,
          batch_wait_ms=batch_wait_ms, max_queue=max_queue, ready_file=ready_file,
          limits=ServeLimits(max_tokens=max_tokens_cap, max_n=max_n),
          extra_hosts=tuple(h.strip() for value in allowed_hosts for h in value.split(",") if h.strip()))


COMMANDS = [serve_cmd]
