"""Session fixtures shared by every folder: a tiny random LLaMA with the real SmolLM2 tokenizer, and the real
`llamakit serve` on it. Helpers live in tests/support/ (importable as `support.*`)."""

from __future__ import annotations

from pathlib import Path

import pytest
from support.cli import API_KEY


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """A ~200k-parameter random LLaMA saved as a normal Hugging Face directory."""
    from support.tiny_models import save_tiny_llama

    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama") / "model", seed=0)


@pytest.fixture(scope="session")
def tiny_llama(tiny_llama_dir):
    from toolkit.models import load_causal_lm

    return load_causal_lm(tiny_llama_dir)


@pytest.fixture(scope="session")
def tiny_server(tiny_llama_dir):
    """The real `llamakit serve` (subprocess, 127.0.0.1) on the tiny model, with a bearer key."""
    from toolkit.server_process import running_server

    with running_server(str(tiny_llama_dir), args=("--api-key-env", "LLAMAKIT_TEST_KEY", "--max-tokens-cap", "64",
                                                   "--max-n", "4", "--served-name", "tiny"),
                        env={"LLAMAKIT_TEST_KEY": API_KEY}) as server:
        yield server


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one torch thread, and far faster than on two when other processes share the
    CPU; a module opts in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
