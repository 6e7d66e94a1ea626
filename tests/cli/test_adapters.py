"""PEFT adapters in and out (issue 18, parts 3 and 7), and the model cards of sft, rlhf and dpo.

In: an adapter directory as TRL's SFTTrainer with a `peft_config` leaves it (made here by plain peft) works
wherever a causal LM is read: `llamakit serve`, `rlhf --policy`, `eval-policy` (and `hf:` teachers, in
test_teachers.py); each gives the logits of base + adapter. Out: `--save-adapter` writes OUT/adapter beside the
merged model, loadable by plain peft onto the base it names, with the merged model's logits.
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from support.adapters import logits_of, peft_logits, save_tiny_adapter
from support.cli import FIXTURES, cli, hh_slice

from toolkit.model_card import data_fingerprint
from toolkit.models import load_causal_lm, load_tokenizer

PROMPTS = FIXTURES / "prompts-alpaca-32.jsonl"
TEXT = "Give me three tips for staying healthy."
RLHF_TINY = ("--steps", "1", "--batch-size", "2", "--num-minibatches", "1", "--ppo-epochs", "1",
             "--max-new-tokens", "4", "--sample-every", "0")
DPO_TINY = ("--max-length", "48", "--max-prompt-length", "24", "--batch-size", "2", "--learning-rate", "1e-2")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def adapter(tiny_llama_dir, tmp_path_factory) -> Path:
    return save_tiny_adapter(tiny_llama_dir, tmp_path_factory.mktemp("trl-adapter") / "adapter")


@pytest.fixture(scope="module")
def ids(tiny_llama_dir) -> list[int]:
    return load_tokenizer(tiny_llama_dir)(TEXT).input_ids


def check_saved_adapter(out: Path, merged_dir: Path, base: Path, ids: list[int]) -> None:
    """OUT/adapter names `base` by its absolute path, and base + adapter (plain peft, AutoPeft, llamakit) has the
    merged model's logits; training moved the adapter away from zero."""
    from peft import AutoPeftModelForCausalLM

    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(base.resolve())
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert not list((out / "adapter").glob("model*.safetensors"))  # the adapter alone, not the whole model
    merged = logits_of(load_causal_lm(merged_dir)[0], ids)
    torch.testing.assert_close(peft_logits(base, out / "adapter", ids), merged, atol=1e-5, rtol=0)
    torch.testing.assert_close(logits_of(AutoPeftModelForCausalLM.from_pretrained(out / "adapter"), ids), merged,
                               atol=1e-5, rtol=0)
    torch.testing.assert_close(logits_of(load_causal_lm(out / "adapter")[0], ids), merged, atol=1e-5, rtol=0)
    assert (merged - logits_of(load_causal_lm(base)[0], ids)).abs().max() > 1e-3


def load_card(directory: Path) -> ModelCard:
    card = ModelCard.load(directory / "README.md")
    assert card.data.library_name == "transformers"
    assert "```python" in card.text and f'from_pretrained("{directory}")' in card.text
    return card


# ---------------------------------------------------------------- out: --save-adapter and model cards


def test_sft_save_adapter_and_model_card(tiny_llama_dir, tmp_path, ids, monkeypatch):
    out, data = tmp_path / "sft", FIXTURES / "alpaca-24.json"
    argv = ["sft", "--data", data, "--model", tiny_llama_dir, "--out", out, "--lora", "--save-adapter", "--lora-r",
            "4", "--max-steps", "2", "--batch-size", "4", "--learning-rate", "1e-2", "--max-length", "64",
            "--system-prompt", "Be brief, 'please'."]
    monkeypatch.setattr(sys, "argv", ["/venv/bin/llamakit", *map(str, argv)])  # as the console script sets it
    code, _, err = cli(*argv)
    assert code == 0, err
    check_saved_adapter(out, out / "model", tiny_llama_dir, ids)
    card = load_card(out / "model")
    assert card.data.tags == ["llamakit", "sft"]
    assert shlex.join(["llamakit", *map(str, argv)]) in card.text  # the command as run, shell-quoted
    assert f"sha256 `{data_fingerprint(data)}`" in card.text and "24 conversations" in card.text
    assert "| lora_r | 4 |" in card.text and "| learning_rate | 0.01 |" in card.text
    final = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert f"| loss | {final['loss']:.6g} |" in card.text
    assert f'AutoPeftModelForCausalLM.from_pretrained("{out / "adapter"}")' in card.text


def test_dpo_save_adapter_and_model_card(tiny_llama_dir, tmp_path, ids):
    out, data = tmp_path / "dpo", hh_slice(tmp_path / "pairs.jsonl", 0, 4)
    code, _, err = cli("dpo", "--data", data, "--policy", tiny_llama_dir, "--out", out, "--lora", "--lora-r", "4",
                       "--save-adapter", "--max-steps", "2", *DPO_TINY)
    assert code == 0, err
    check_saved_adapter(out, out / "policy", tiny_llama_dir, ids)
    card = load_card(out / "policy")
    assert card.data.tags == ["llamakit", "dpo"]
    assert f"sha256 `{data_fingerprint(data)}`" in card.text and "4 pairs" in card.text
    assert "| beta | 0.1 |" in card.text and "| rewards/accuracies |" in card.text


def test_rlhf_save_adapter_and_model_card(tiny_llama_dir, tmp_path, ids):
    out = tmp_path / "rlhf"
    code, _, err = cli("rlhf", "--policy", tiny_llama_dir, "--reward", "rules:length", "--prompts", PROMPTS, "--out",
                       out, "--lora", "--lora-r", "4", "--save-adapter", "--learning-rate", "5e-2", *RLHF_TINY)
    assert code == 0, err
    check_saved_adapter(out, out / "policy", tiny_llama_dir, ids)
    card = load_card(out / "policy")
    assert card.data.tags == ["llamakit", "rlhf", "ppo"]
    assert f"sha256 `{data_fingerprint(PROMPTS)}`" in card.text and "32 prompts" in card.text
    assert "| objective/kl |" in card.text and "| reward | rules:length |" in card.text


@pytest.mark.parametrize("command", ["sft", "dpo", "rlhf"])
def test_save_adapter_without_lora_is_one_line_and_writes_nothing(tiny_llama_dir, tmp_path, command):
    out = tmp_path / "out"
    data = {"sft": ("--data", FIXTURES / "alpaca-24.json", "--model"), "dpo": ("--data", FIXTURES /
            "hh-harmless-6.jsonl", "--policy"), "rlhf": ("--prompts", PROMPTS, "--policy")}[command]
    code, _, err = cli(command, *data, tiny_llama_dir, "--out", out, "--save-adapter")
    assert code == 2, err
    assert err.strip().splitlines() == [err.strip()] and "--save-adapter" in err and "--lora" in err
    assert not out.exists()


# ---------------------------------------------------------------- in: an adapter wherever a causal LM is read


def test_rlhf_policy_can_be_an_adapter(tiny_llama_dir, adapter, tmp_path, ids):
    """An update of 1e-12 leaves the weights as loaded: the saved policy is base + adapter."""
    out = tmp_path / "rlhf"
    code, _, err = cli("rlhf", "--policy", adapter, "--reward", "rules:length", "--prompts", PROMPTS, "--out", out,
                       "--learning-rate", "1e-12", *RLHF_TINY)
    assert code == 0, err
    torch.testing.assert_close(logits_of(load_causal_lm(out / "policy")[0], ids),
                               peft_logits(tiny_llama_dir, adapter, ids), atol=1e-5, rtol=0)
    assert ModelCard.load(out / "policy" / "README.md").data.tags == ["llamakit", "rlhf", "ppo"]


@pytest.mark.parametrize("command", ["rlhf", "dpo"])
def test_a_checkpoints_adapter_loads_from_anywhere_on_the_policy_the_run_loaded(tiny_llama_dir, adapter, tmp_path,
                                                                                 ids, monkeypatch, command):
    """--policy given relative to the working directory, and itself an adapter: the LoRA adapter in
    checkpoints/step-1 names the policy directory by its absolute path (not 'policy-in/' as typed, nor the first
    adapter's own base), so from another directory it loads onto base + first adapter: the saved policy's logits."""
    import shutil

    shutil.copytree(adapter, tmp_path / "policy-in")
    monkeypatch.chdir(tmp_path)
    args = {"rlhf": ("--reward", "rules:length", "--prompts", PROMPTS, "--learning-rate", "5e-2", *RLHF_TINY),
            "dpo": ("--data", hh_slice(tmp_path / "pairs.jsonl", 0, 4), "--max-steps", "1", *DPO_TINY)}[command]
    code, _, err = cli(command, "--policy", "policy-in", "--out", "run", "--lora", "--lora-r", "4", "--save-every",
                       "1", *args)
    assert code == 0, err
    checkpoint = next((tmp_path / "run" / "checkpoints").iterdir()) / ("policy" if command == "rlhf" else "model")
    config = json.loads((checkpoint / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tmp_path / "policy-in")
    monkeypatch.chdir(tiny_llama_dir)  # anywhere else
    torch.testing.assert_close(logits_of(load_causal_lm(checkpoint)[0], ids),
                               logits_of(load_causal_lm(tmp_path / "run" / "policy")[0], ids), atol=1e-5, rtol=0)


def test_serve_an_adapter(tiny_llama_dir, adapter):
    """The real server on an adapter dir: its first-token log-probs are base + adapter's (plain peft)."""
    import openai

    from toolkit.chat_format import encode_chat
    from toolkit.server_process import running_server

    messages = [{"role": "user", "content": TEXT}]
    prompt = encode_chat(load_tokenizer(tiny_llama_dir), messages)
    top = torch.log_softmax(peft_logits(tiny_llama_dir, adapter, prompt)[-1], -1).topk(5)
    with running_server(str(adapter)) as server:
        client = openai.OpenAI(base_url=server.url, api_key="none", max_retries=0)
        reply = client.chat.completions.create(model=server.model, messages=messages, max_tokens=1, temperature=0,
                                               logprobs=True, top_logprobs=5)
    assert server.model == "adapter"
    first = reply.choices[0].logprobs.content[0]
    assert [t.logprob for t in first.top_logprobs] == pytest.approx(top.values.tolist(), abs=1e-5)


def test_eval_policy_on_an_adapter(tiny_llama_dir, adapter, tmp_path):
    """POLICY an adapter, BASE the same adapter merged by plain peft: the same answers at KL 0; against the bare
    base model the KL is not 0 (the adapter was applied)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    merged = tmp_path / "merged"
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), adapter).merge_and_unload() \
        .save_pretrained(merged)
    load_tokenizer(tiny_llama_dir).save_pretrained(merged)
    common = ("--prompts", PROMPTS, "--limit", "4", "--max-new-tokens", "8", "--json")
    code, stdout, err = cli("eval-policy", adapter, "--baseline", merged, *common, "--out", tmp_path / "same")
    assert code == 0, err
    summary = json.loads(stdout)
    assert summary["policy"]["path"] == str(adapter)
    assert abs(summary["kl"]) < 1e-5
    rows = [json.loads(line) for line in (tmp_path / "same" / "answers.jsonl").read_text().splitlines()]
    assert all(p["answer"] == b["answer"] for p, b in zip(rows[::2], rows[1::2], strict=True))
    code, stdout, err = cli("eval-policy", f"hf:{adapter}", "--baseline", tiny_llama_dir, *common)
    assert code == 0, err
    assert abs(json.loads(stdout)["kl"]) > 1e-3

