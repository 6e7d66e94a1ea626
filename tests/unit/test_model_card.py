"""toolkit/model_card.py: the README.md of a trained policy, parsed back by huggingface_hub's ModelCard."""

from __future__ import annotations

import hashlib
import json
import shlex

from huggingface_hub import ModelCard

from toolkit.model_card import command_line, data_fingerprint, render_card
from toolkit.models import hub_id


def card_for(tmp_path, **overrides) -> tuple[str, ModelCard]:
    data = tmp_path / "data.jsonl"
    data.write_bytes(b'{"prompt": "a", "response": "b"}\n{"prompt": "c", "response": "d"}\n')
    settings = dict(method="sft", summary="supervised fine-tuning", base="smollm2-135m", data=str(data), rows=2,
                    unit="conversations", config={"learning_rate": 2e-5, "lora": True, "system_prompt": "a | b\nc",
                                                  "data": str(data)},
                    metrics={"loss": 1.234567891, "steps": 6}, model_dir=tmp_path / "run" / "model",
                    argv=["/venv/bin/llamakit", "sft", "--data", str(data), "--system-prompt", "it's"])
    settings.update(overrides)
    text = render_card(**settings)
    path = tmp_path / "README.md"
    path.write_text(text, encoding="utf-8")
    return text, ModelCard.load(path)


def test_the_card_parses_with_hub_metadata_and_says_how_it_was_made(tmp_path):
    text, card = card_for(tmp_path)
    assert card.data.library_name == "transformers"
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"  # the embedded alias's source
    assert card.data.tags == ["llamakit", "sft"]
    assert card.data.pipeline_tag == "text-generation"
    assert card.data.to_dict().get("datasets") is None  # a local file is no Hub dataset
    data = tmp_path / "data.jsonl"
    digest = hashlib.sha256(data.read_bytes()).hexdigest()[:16]
    assert f"sha256 `{digest}`" in card.text and "2 conversations" in card.text
    assert f"llamakit sft --data {data} --system-prompt 'it'\"'\"'s'" in card.text  # shell-quoted, runnable
    assert "| learning_rate | 2e-05 |" in card.text
    assert "| system_prompt | a \\| b c |" in card.text  # a cell never breaks the table
    assert "| loss | 1.23457 |" in card.text and "| steps | 6 |" in card.text
    assert f'AutoModelForCausalLM.from_pretrained("{tmp_path / "run" / "model"}")' in card.text
    assert "adapter" not in card.text.lower()
    assert text.startswith("---\n")


def test_the_card_names_the_adapter_and_extra_tags_and_hub_datasets(tmp_path):
    hub_data = tmp_path / "hub" / "datasets--Anthropic--hh-rlhf" / "snapshots" / "abc" / "train.jsonl"
    hub_data.parent.mkdir(parents=True)
    hub_data.write_text('{"prompt": "x"}\n')
    _, card = card_for(tmp_path, method="rlhf", tags=("ppo",), data=str(hub_data), rows=1, unit="prompts",
                       adapter_dir=tmp_path / "run" / "adapter")
    assert card.data.tags == ["llamakit", "rlhf", "ppo"]
    assert card.data.datasets == ["Anthropic/hh-rlhf"]
    assert f'AutoPeftModelForCausalLM.from_pretrained("{tmp_path / "run" / "adapter"}")' in card.text


def test_an_unknown_local_base_is_named_in_the_text_not_the_metadata(tmp_path, tiny_llama_dir):
    _, card = card_for(tmp_path, base=str(tiny_llama_dir))
    assert card.data.base_model is None  # the Hub's base_model must be a Hub id
    assert f"`{tiny_llama_dir}`" in card.text


def test_data_fingerprint_of_a_file_and_of_a_directory(tmp_path):
    file = tmp_path / "rows.jsonl"
    file.write_bytes(b"x" * 3_000_000)
    assert data_fingerprint(file) == hashlib.sha256(b"x" * 3_000_000).hexdigest()[:16]
    folder = tmp_path / "dataset"
    (folder / "train").mkdir(parents=True)
    (folder / "train" / "data.arrow").write_bytes(b"abc")
    first = data_fingerprint(folder)
    assert len(first) == 16 and first == data_fingerprint(folder)
    (folder / "train" / "data.arrow").write_bytes(b"abd")
    assert data_fingerprint(folder) != first


def test_command_line_names_llamakit_however_it_was_started():
    assert command_line(["/x/bin/llamakit", "rlhf", "--reward", "rules:length"]) == \
        "llamakit rlhf --reward rules:length"
    assert command_line(["/repo/toolkit/__main__.py", "sft", "--system-prompt", "be brief"]) == \
        "llamakit sft --system-prompt 'be brief'"
    assert shlex.split(command_line(["train.py", "--data", "a b"])) == ["train.py", "--data", "a b"]
    assert "secret" not in command_line(["llamakit", "rlhf", "--reward", "http://user:secret@host/v1"])


def test_hub_id_of_aliases_hub_cache_dirs_and_llamakit_outputs(tmp_path, tiny_llama_dir):
    assert hub_id("smollm2-135m") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert hub_id(tiny_llama_dir) is None
    cached = tmp_path / "models--acme--tiny" / "snapshots" / "abc"
    cached.mkdir(parents=True)
    assert hub_id(cached) == "acme/tiny"
    sft_out = tmp_path / "sft-model"
    sft_out.mkdir()
    (sft_out / "llamakit-manifest.json").write_text(json.dumps({"kind": "sft-model", "base": "smollm2-135m"}))
    assert hub_id(sft_out) == "HuggingFaceTB/SmolLM2-135M-Instruct"  # rlhf --policy runs/sft/model
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "meta-llama/Llama-2-7b-hf"}))
    assert hub_id(adapter) == "meta-llama/Llama-2-7b-hf"  # a TRL adapter whose base is not downloaded here
