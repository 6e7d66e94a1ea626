"""The reward read-out (a causal model's last real token, an encoder's [CLS]), truncation, save/load, the API."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from toolkit.errors import UserError
from toolkit.prefix_cache import position_ids_from_mask
from toolkit.reward.model import (
    TextEncoder,
    last_token_index,
    new_reward_model,
    pad,
    wants_eos,
)


@pytest.fixture(scope="module")
def llama_rm(tiny_llama_dir):
    torch.manual_seed(0)
    model, tokenizer, _ = new_reward_model(str(tiny_llama_dir))
    return model.eval(), tokenizer


def test_last_token_index_left_and_right_padding():
    right = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    left = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]])
    assert last_token_index(right).tolist() == [2, 4, 0]
    assert last_token_index(left).tolist() == [4, 4, 4]
    assert position_ids_from_mask(left)[0].tolist() == [0, 0, 0, 1, 2]


def test_llama_reward_model_pads_with_its_own_token_and_gets_eos_appended(llama_rm, tiny_llama_dir):
    from toolkit.models import load_tokenizer

    model, tokenizer = llama_rm
    backbone = load_tokenizer(tiny_llama_dir)
    assert backbone.pad_token_id == backbone.eos_token_id  # the case that trips pad-id-based read-outs
    assert tokenizer.pad_token_id == tokenizer.unk_token_id != tokenizer.eos_token_id
    assert model.model.config.pad_token_id == tokenizer.pad_token_id
    assert wants_eos(tokenizer)
    ids, _ = TextEncoder(tokenizer, 64, True).encode(["Hello there"])
    assert ids[0][-1] == tokenizer.eos_token_id


def test_reward_is_read_at_the_last_real_token_whichever_side_is_padded(llama_rm):
    model, tokenizer = llama_rm
    encoder = TextEncoder(tokenizer, 64, True)
    texts = ["\n\nHuman: hi\n\nAssistant: hello, how can I help you today?", "\n\nHuman: hi\n\nAssistant: no"]
    ids, _ = encoder.encode(texts)
    with torch.no_grad():
        alone = [model(torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long)).item() for s in ids]
        for side in ("right", "left"):
            batched = model(*pad(ids, tokenizer.pad_token_id, side)).tolist()
            assert batched == pytest.approx(alone, abs=1e-4), side
        # ... and it is the head at the EOS that ends the text, not at the token before it.
        hidden = model.model.model(input_ids=torch.tensor([ids[1]])).last_hidden_state[0]
        assert alone[1] == pytest.approx(model.model.score(hidden[-1]).item(), abs=1e-5)
        assert alone[1] != pytest.approx(model.model.score(hidden[-2]).item(), abs=1e-5)


def test_reward_changes_when_only_the_last_token_changes(llama_rm):
    model, tokenizer = llama_rm
    a = tokenizer("The answer is yes", add_special_tokens=False).input_ids
    b = a[:-1] + [tokenizer("no", add_special_tokens=False).input_ids[0]]
    input_ids, mask = pad([a + [tokenizer.eos_token_id], b + [tokenizer.eos_token_id]], tokenizer.pad_token_id)
    with torch.no_grad():
        r = model(input_ids, mask)
    assert r[0] != r[1]


def test_truncation_keeps_the_end_of_the_text(llama_rm):
    _, tokenizer = llama_rm
    encoder = TextEncoder(tokenizer, 16, True)
    text = " ".join(f"w{i}" for i in range(200)) + " FINAL ANSWER"
    (ids,), cut = encoder.encode([text])
    assert cut == 1 and len(ids) == 16 and ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(ids[:-1]).endswith("FINAL ANSWER")


def test_truncation_keeps_encoder_special_tokens():
    from toolkit.models import load_tokenizer

    tokenizer = load_tokenizer("minilm-l6")
    assert not wants_eos(tokenizer)
    encoder = TextEncoder(tokenizer, 12, False)
    (ids,), cut = encoder.encode([" ".join(["cat"] * 50) + " final answer"])
    assert cut == 1 and len(ids) == 12
    assert ids[0] == tokenizer.cls_token_id and ids[-1] == tokenizer.sep_token_id
    assert tokenizer.decode(ids[1:-1]).endswith("final answer")


@pytest.fixture(scope="module")
def trained_llama_rm(tiny_llama_dir, tmp_path_factory):
    """A few LoRA steps on the tiny LLaMA, calibrated with isotonic regression (the non-default method)."""
    from support.cli import FIXTURES

    from toolkit.reward.train import TrainConfig, train_reward

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 200k-parameter model: one thread is as fast, and steady on a shared machine
    out = tmp_path_factory.mktemp("llama-rm") / "rm"
    cfg = TrainConfig(data=str(FIXTURES / "hh-harmless-200.jsonl"), out=str(out), model=str(tiny_llama_dir),
                      lora=True, lora_r=4, max_length=48, batch_size=8, epochs=1, max_steps=3, eval_split=0.3,
                      learning_rate=1e-3, calibration="isotonic", show_progress=False)
    yield out, train_reward(cfg)
    torch.set_num_threads(threads)


def test_a_few_steps_on_tiny_llama_with_lora_then_the_api(trained_llama_rm):
    from toolkit.reward import load_reward_model

    out, result = trained_llama_rm
    assert result.metrics["train"]["optimizer_steps"] == 3
    settings = json.loads((out / "reward_config.json").read_text())
    assert settings["append_eos"] is True and settings["lora"] is True
    assert not (out / "adapter_config.json").exists()  # LoRA merged: a plain backbone dir
    cal = json.loads((out / "calibration.json").read_text())
    assert cal["method"] == "isotonic" and cal["n_pairs"] == 60 and len(cal["isotonic"]["x"]) >= 2

    rm = load_reward_model(str(out))
    prompts, responses = ["How do I bake bread?", "hi"], ["Mix flour, water, yeast; bake at 230 C.", "hello"]
    raw = rm.raw_scores(prompts, responses)
    scores = rm.score(prompts, responses, batch_size=1)
    assert scores == pytest.approx([(r - cal["reward_mean"]) / cal["temperature"] for r in raw], rel=1e-4, abs=1e-5)
    assert rm.raw_scores(prompts[:1], responses[:1]) == pytest.approx(raw[:1], abs=1e-4)  # batch-independent
    p = rm.preference_probabilities(prompts[:1] * 2, responses, responses[::-1])
    assert all(0 < x < 1 for x in p) and p[0] == pytest.approx(1 - p[1], abs=1e-6)  # isotonic is symmetric
    with pytest.raises(UserError, match="2 prompts but 1 responses"):
        rm.score(prompts, responses[:1])


def test_missing_or_foreign_calibration_is_a_clear_error(trained_llama_rm, tiny_llama_dir, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    from toolkit.reward import load_reward_model

    out, _ = trained_llama_rm
    changed = tmp_path / "changed"
    shutil.copytree(out, changed)
    # Other weights under the same calibration.json (e.g. a re-trained model copied over): refused. Only the head
    # changes here, so the weight file keeps its size.
    weights = load_file(str(changed / "model.safetensors"))
    weights["score.weight"] += 0.01
    save_file(weights, str(changed / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(UserError, match="calibration.json: field 'fingerprint': fitted on other weights"):
        load_reward_model(str(changed))
    (changed / "calibration.json").unlink()
    with pytest.raises(UserError, match="no calibration.json"):
        load_reward_model(str(changed))
    with pytest.raises(UserError, match="not a reward model"):
        load_reward_model(str(tiny_llama_dir))
    assert Path(changed / "model.safetensors").is_file()


def test_regression_on_chatllama_scored_rows_with_bf16(tiny_llama_dir, tmp_path):
    from support.cli import FIXTURES, cli

    from toolkit.reward.data import load_preferences

    rows = []
    for pair in load_preferences(FIXTURES / "hh-harmless-200.jsonl").pairs[:40]:
        rows += [{"user_input": pair.prompt, "completion": pair.chosen, "score": 4},
                 {"user_input": pair.prompt, "completion": pair.rejected, "score": 1}]
    data = tmp_path / "scored.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "rm"
    rc, stdout, stderr = cli("train-reward", "--data", data, "--out", out, "--model", tiny_llama_dir, "--objective",
                             "regression", "--bf16", "--max-length", "32", "--batch-size", "8", "--max-steps", "2",
                             "--learning-rate", "1e-3", "--threads", "1", "--json")
    assert rc == 0, stderr
    metrics = json.loads(stdout)
    assert metrics["train"]["scored_rows"] == 72 and metrics["train"]["optimizer_steps"] == 2
    assert metrics["heldout"]["raw"]["n"] == 4  # 4 held-out prompts, each a (score 4, score 1) pair
    assert any("only 4 held-out pairs" in w for w in metrics["warnings"])
    assert json.loads((out / "reward_config.json").read_text())["objective"] == "regression"


def test_shared_prefix_forward_matches_two_full_forwards(tiny_llama_dir):
    """Causal backbones: prefix once + both answers on its cache = the two full texts, rewards and gradients."""
    from toolkit.reward.model import is_causal, shared_prefix_batch

    torch.manual_seed(0)
    model, tokenizer, _ = new_reward_model(str(tiny_llama_dir))
    assert is_causal(model.model.config) and model.shares_prefix
    encoder = TextEncoder(tokenizer, 40, True)
    prompt = "\n\nHuman: what is the capital of France, and why is it famous?\n\nAssistant:"
    chosen = [prompt + " Paris, for the Eiffel tower.", "\n\nHuman: hi\n\nAssistant: hello there, friend",
              prompt + " " + "Paris is famous for many things. " * 3]  # too long: cut, both at the same point
    rejected = [prompt + " Lyon.", "\n\nHuman: hi\n\nAssistant: go away", prompt + " I do not know."]
    # And a pair whose answers alone are too long: cut text by text, nothing shared (an all-padding prefix row).
    chosen.append("\n\nHuman: go on\n\nAssistant: " + "once upon a time " * 12)
    rejected.append("\n\nHuman: go on\n\nAssistant: " + "a long time ago " * 12)
    ids, cut = encoder.encode_pairs(chosen, rejected)
    assert cut == 3 and max(len(s) for s in ids) == 40 and ids[6][0] != ids[7][0]
    grads = []
    for shared in (True, False):
        model.zero_grad()
        if shared:
            tensors = shared_prefix_batch(ids[0::2], ids[1::2], tokenizer.pad_token_id, min_saving=None)
            rewards = model(*tensors)
            r_c, r_r = rewards[0::2], rewards[1::2]
            assert tensors[0].shape[1] > 20  # the prompt really is shared
        else:
            input_ids, mask = pad(ids[0::2] + ids[1::2], tokenizer.pad_token_id)
            r_c, r_r = model(input_ids, mask).chunk(2)
        (-torch.nn.functional.logsigmoid(r_c - r_r).mean()).backward()
        grads.append((r_c.detach(), r_r.detach(), model.model.model.layers[0].self_attn.q_proj.weight.grad.clone()))
    assert torch.allclose(grads[0][0], grads[1][0], atol=1e-5) and torch.allclose(grads[0][1], grads[1][1], atol=1e-5)
    assert torch.allclose(grads[0][2], grads[1][2], atol=1e-6, rtol=1e-4)


def test_shared_prefix_is_used_in_training_and_not_for_encoders(tiny_llama_dir, tmp_path):
    from transformers import AutoConfig

    from toolkit.models import resolve
    from toolkit.reward.model import is_causal
    from toolkit.reward.train import TrainConfig, train_reward

    assert not is_causal(AutoConfig.from_pretrained(resolve("minilm-l6")))  # BERT: every token sees the answer
    # PPO-style pairs: a long shared prompt, short answers. (HH pairs share ~60% of their tokens, but with
    # batch padding the saving shrinks to nothing there; the forward then falls back to the plain one.)
    story = "Tell me, in your own words and with care, what the old lighthouse keeper saw that night"
    rows = [{"prompt": f"{story} ({i})?", "chosen": f"A ship, number {i}.", "rejected": "No."} for i in range(24)]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    runs = {}
    for shared in (True, False):
        cfg = TrainConfig(data=str(data), out=str(tmp_path / f"rm-{shared}"), model=str(tiny_llama_dir),
                          max_length=64, batch_size=8, max_steps=2, eval_split=0.25, shared_prefix=shared,
                          show_progress=False)
        runs[shared] = train_reward(cfg).metrics["train"]
    assert runs[True]["shared_prefix"] and not runs[False]["shared_prefix"]
    # Same batches, fewer token positions through the model, the same loss.
    assert runs[True]["tokens_forwarded"] < 0.7 * runs[False]["tokens_forwarded"]
    assert runs[True]["loss_history"][0] == pytest.approx(runs[False]["loss_history"][0], abs=1e-4)


def test_an_encoder_reads_its_reward_through_its_pooler_and_classifier_at_cls():
    """What BertForSequenceClassification computes (dropout off): classifier(pooler(h[CLS])), right-padded."""
    torch.manual_seed(0)
    model, tokenizer, _ = new_reward_model("minilm-l6")
    assert model.read_at == "first" and not model.shares_prefix
    model.eval()
    encoder = TextEncoder(tokenizer, 64, wants_eos(tokenizer))
    ids, _ = encoder.encode(["\n\nHuman: hi\n\nAssistant: hello, how can I help you today?",
                             "\n\nHuman: hi\n\nAssistant: no"])
    assert all(seq[0] == tokenizer.cls_token_id for seq in ids)
    with torch.no_grad():
        alone = [model(torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long)).item() for s in ids]
        assert model(*pad(ids, tokenizer.pad_token_id)).tolist() == pytest.approx(alone, abs=1e-4)
        bert = model.model.bert
        hidden = bert(input_ids=torch.tensor([ids[0]])).last_hidden_state
        assert alone[0] == pytest.approx(model.model.classifier(bert.pooler(hidden)).item(), abs=1e-5)


def test_collapse_warning_flags_flat_reward_differences_only():
    """A run whose held-out reward differences barely vary (std < 0.1: every verdict within 0.45-0.55) gets a
    warning; a model that spreads its verdicts, or too few pairs to say, does not."""
    import random

    from toolkit.reward.train import collapse_warning

    rng = random.Random(0)
    flat = [0.02 + rng.gauss(0, 0.03) for _ in range(92)]
    spread = [0.1 + rng.gauss(0, 0.6) for _ in range(92)]
    warning = collapse_warning(flat)
    assert warning is not None and warning.startswith("the reward differences on the 92 calibration pairs barely vary")
    assert collapse_warning(spread) is None
    assert collapse_warning(flat[:20]) is None
