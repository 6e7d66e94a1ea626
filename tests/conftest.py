"""Shared fixtures: a tiny random LLaMA with the real SmolLM2 tokenizer, free loopback ports, the CLI."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "fixtures"
LLAMAKIT = [sys.executable, "-m", "toolkit"]


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """A ~200k-parameter random LLaMA saved as a normal Hugging Face directory."""
    from support.tiny_models import save_tiny_llama

    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama") / "model", seed=0)


@pytest.fixture(scope="session")
def tiny_llama(tiny_llama_dir):
    from toolkit.models import load_causal_lm

    return load_causal_lm(tiny_llama_dir)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_cli(*args: str, check: bool = False, timeout: float = 600, env: dict | None = None,
            cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run the real `llamakit` CLI in a subprocess, as a user would."""
    proc = subprocess.run([*LLAMAKIT, *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, cwd=cwd or ROOT)
    if check and proc.returncode != 0:
        raise AssertionError(f"llamakit {' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


API_KEY = "test-secret-key"


@pytest.fixture(scope="session")
def tiny_server(tiny_llama_dir):
    """The real `llamakit serve` (subprocess, 127.0.0.1) on the tiny model, with a bearer key."""
    from toolkit.server_process import running_server

    with running_server(str(tiny_llama_dir), args=("--api-key-env", "LLAMAKIT_TEST_KEY", "--max-tokens-cap", "64",
                                                   "--max-n", "4", "--served-name", "tiny"),
                        env={"LLAMAKIT_TEST_KEY": API_KEY}) as server:
        yield server
