"""toolkit/plan.py: the counts behind `llamakit plan`, against hand-computed values and the real libraries."""

from __future__ import annotations

from dataclasses import replace

import pytest

from toolkit.errors import UserError
from toolkit.plan import (
    GIB,
    HEAD_CHUNK,
    PRESETS,
    PlanConfig,
    Shape,
    activations,
    best_fit,
    estimate,
    gathered_weights,
    head_logits,
    kv_cache,
    launch_command,
    model_states,
    parse_memory,
)

TINY = Shape("tiny", layers=2, hidden=64, intermediate=128, heads=4, kv_heads=2, vocab=1000, tied_embeddings=True)


def test_llama_parameter_counts_are_meta_s():
    # the published sizes of Meta's checkpoints (sum of the tensors' numel)
    assert PRESETS["llama-7b"].parameters == 6_738_415_616
    assert PRESETS["llama-13b"].parameters == 13_015_864_320
    assert PRESETS["llama-65b"].parameters == 65_285_660_672


def test_parameter_and_lora_counts_equal_transformers_and_peft():
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=TINY.vocab, hidden_size=TINY.hidden, intermediate_size=TINY.intermediate,
                         num_hidden_layers=TINY.layers, num_attention_heads=TINY.heads,
                         num_key_value_heads=TINY.kv_heads, tie_word_embeddings=True)
    model = LlamaForCausalLM(config)
    assert TINY.parameters == sum(p.numel() for p in model.parameters())
    peft_model = get_peft_model(model, LoraConfig(r=8, target_modules="all-linear"))
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert TINY.lora_parameters(8) == trainable


def test_kv_cache_equals_the_cache_transformers_fills():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=TINY.vocab, hidden_size=TINY.hidden, intermediate_size=TINY.intermediate,
                         num_hidden_layers=TINY.layers, num_attention_heads=TINY.heads,
                         num_key_value_heads=TINY.kv_heads)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        cache = model(torch.ones(3, 10, dtype=torch.long), use_cache=True).past_key_values
    filled = sum(layer.keys.numel() * 4 + layer.values.numel() * 4 for layer in cache.layers)
    assert kv_cache(TINY, PlanConfig(bf16=False), sequences=3, tokens=10) == filled


def test_zero_shards_what_the_paper_and_deepspeed_say():
    shape = PRESETS["llama-7b"]
    plain = model_states(shape, PlanConfig(gpus=4, zero=0))
    zero2 = model_states(shape, PlanConfig(gpus=4, zero=2))
    zero3 = model_states(shape, PlanConfig(gpus=4, zero=3))
    n, largest = shape.parameters, 32000 * 4096  # the embedding (and the untied LM head)
    assert plain == {"weights": 2 * n, "gradients": 2 * n, "optimizer": 12 * n}  # 16 bytes per parameter
    # DeepSpeed's estimate_zero2_model_states_mem_needs: 2n + 18n/gpus (bf16 gradient partition 2, its fp32 copy
    # 4, fp32 master weights 4, m and v 8), plus the largest gradient whole before its bucket is reduced
    assert zero2 == {"weights": 2 * n, "gradients": 6 * n / 4 + 2 * largest, "optimizer": 12 * n / 4}
    assert zero3 == {**zero2, "weights": 2 * n / 4}
    offloaded = model_states(shape, PlanConfig(gpus=4, zero=3, offload=True))
    assert offloaded == {"weights": 0, "gradients": 2 * n / 4 + 2 * largest, "optimizer": 0}
    # the fp32 master partition stays when the weights are fp32 themselves (the CPU runs)
    assert model_states(shape, PlanConfig(gpus=4, zero=2, bf16=False))["optimizer"] == 12 * n / 4


def test_zero3_keeps_up_to_the_presets_live_parameters_gathered():
    big = PRESETS["llama-65b"]
    assert estimate(PlanConfig(stage="sft", model="llama-65b", gpus=8, zero=3)).parts["gathered_weights"] == 2 * 1e9
    assert "gathered_weights" not in estimate(PlanConfig(stage="sft", model="llama-65b", gpus=8, zero=2)).parts
    # rlhf gathering the policy to generate holds all of it; layer by layer, what the backward keeps
    rlhf = PlanConfig(stage="rlhf", model="llama-65b", gpus=8, zero=3, lora=True)
    assert estimate(rlhf).parts["gathered_weights"] == 2 * big.parameters
    assert estimate(replace(rlhf, gather_for_generation=False)).parts["gathered_weights"] == 2 * 1e9
    # a model under the limit stays whole
    assert gathered_weights(TINY, PlanConfig(stage="sft", gpus=8, zero=3)) == 2 * TINY.parameters


def test_lora_keeps_no_gradients_or_optimizer_state_for_the_frozen_base():
    shape = PRESETS["llama-7b"]
    states = model_states(shape, PlanConfig(lora=True, lora_r=16))
    trainable = shape.lora_parameters(16)
    assert 39e6 < trainable < 41e6  # ≈ 40M, as the 7B presets' comments say
    assert states == {"weights": 2 * shape.parameters + 4 * trainable, "gradients": 4 * trainable,
                      "optimizer": 8 * trainable}


def test_rlhf_counts_the_copies_and_the_reference_is_free_with_lora():
    full = estimate(PlanConfig(stage="rlhf", model="llama-7b"))
    lora = estimate(PlanConfig(stage="rlhf", model="llama-7b", lora=True))
    weights = 2 * PRESETS["llama-7b"].parameters
    assert full.parts["reference"] == weights and lora.parts["reference"] == 0
    assert full.parts["reward_model"] == weights
    assert "reward_model" not in estimate(PlanConfig(stage="rlhf", reward_model="rules")).parts
    critic = estimate(PlanConfig(stage="rlhf", model="llama-7b", lora=True, critic="llama-7b"))
    assert critic.parts["critic"] > weights  # a second model: its own weights, adapter states, activations
    grpo = estimate(PlanConfig(stage="rlhf", algo="grpo", group_size=4, batch_size=2))
    ppo = estimate(PlanConfig(stage="rlhf", batch_size=8))
    assert grpo.parts["rollout_kv_cache"] == ppo.parts["rollout_kv_cache"]  # 2 prompts × 4 answers = 8 rollouts


def test_rlhf_head_meets_answers_only_and_a_group_runs_its_prompt_once():
    shape = PRESETS["llama-7b"]
    ppo = PlanConfig(stage="rlhf", lora=True, batch_size=8)
    per_prompt_token = activations(shape, ppo, 8, 1, logits=False)
    longer = estimate(replace(ppo, max_prompt_tokens=512)).parts["activations"]
    # 256 more prompt tokens: their layer activations and nothing at the head
    assert longer - estimate(ppo).parts["activations"] == pytest.approx(256 * per_prompt_token)
    # a frozen head forms one answer's logits at a time
    no_head = activations(shape, ppo, 8, 256, logits=False) + activations(shape, ppo, 8, 128, logits=False)
    assert estimate(ppo).parts["activations"] - no_head == pytest.approx(3 * 128 * shape.vocab * 4)
    grpo = PlanConfig(stage="rlhf", algo="grpo", group_size=4, batch_size=2, lora=True)  # 8 rollouts, 2 prompts
    saved = estimate(ppo).parts["activations"] - estimate(grpo).parts["activations"]
    assert saved == pytest.approx(6 * 256 * activations(shape, ppo, 1, 1, logits=False))
    # a minibatch of 2 rollouts holds no whole group of 4, so rlhf runs every row's prompt
    assert estimate(replace(grpo, num_minibatches=4)).parts["activations"] == pytest.approx(
        estimate(replace(ppo, batch_size=2)).parts["activations"])
    for unshared in (replace(grpo, gradient_checkpointing=True), replace(grpo, zero=2, gpus=2)):
        like_ppo = replace(ppo, gradient_checkpointing=unshared.gradient_checkpointing, zero=unshared.zero,
                           gpus=unshared.gpus)
        assert estimate(unshared).parts["activations"] == estimate(like_ppo).parts["activations"]
    # two minibatches: the backward holds 4 rollouts, the rollout still generates all 8
    halves = replace(ppo, num_minibatches=2)
    assert estimate(halves).parts["activations"] == estimate(replace(ppo, batch_size=4)).parts["activations"]
    assert estimate(halves).parts["rollout_kv_cache"] == estimate(ppo).parts["rollout_kv_cache"]
    with pytest.raises(UserError, match="--num-minibatches"):
        estimate(replace(ppo, batch_size=3, num_minibatches=2))
    # two micro-batches of one minibatch: the backward holds one of them, as with two minibatches
    accumulated = replace(ppo, gradient_accumulation_steps=2)
    assert estimate(accumulated).parts == estimate(halves).parts
    assert "--num-minibatches 1 --max-prompt-tokens 256 --max-new-tokens 128 --gradient-accumulation-steps 2" in (
        launch_command(estimate(accumulated)))
    with pytest.raises(UserError, match="--gradient-accumulation-steps: must divide the minibatch size 4"):
        estimate(replace(halves, gradient_accumulation_steps=3))
    # the launch command runs what was estimated, not rlhf's own defaults
    assert launch_command(estimate(replace(grpo, num_minibatches=2))) == (
        "llamakit rlhf --policy llama-7b --lora --bf16 --algo grpo --group-size 4 --batch-size 2 "
        "--num-minibatches 2 --max-prompt-tokens 256 --max-new-tokens 128")


def test_best_fit_prefers_the_least_machinery():
    cfg = PlanConfig(stage="sft", model="llama-7b", gpus=1, gpu_memory_gib=40)
    assert not estimate(cfg).fits
    fit = best_fit(cfg)
    assert fit is not None and fit.config.lora and fit.config.zero == 0 and fit.total <= 40 * GIB
    mid = best_fit(PlanConfig(stage="sft", model="llama-13b", gpus=8, gpu_memory_gib=80))
    assert mid is not None and mid.config.zero == 2 and not mid.config.lora
    big = best_fit(PlanConfig(stage="sft", model="llama-65b", gpus=8, gpu_memory_gib=80))  # 16 B/param: 130 GB
    assert big is not None and big.config.zero == 3 and big.config.lora
    assert best_fit(PlanConfig(stage="sft", model="llama-65b", gpus=1, gpu_memory_gib=8)) is None


@pytest.mark.parametrize("text, gib", [("80GiB", 80.0), ("24GB", 24.0), ("40", 40.0), ("12.5g", 12.5)])
def test_parse_memory(text, gib):
    assert parse_memory(text) == gib


@pytest.mark.parametrize("cfg, message", [
    (PlanConfig(zero=1), "--zero"), (PlanConfig(offload=True), "--offload"), (PlanConfig(stage="ppo"), "--stage"),
    (PlanConfig(model="/nonexistent/dir"), "--model"),
])
def test_bad_settings_are_one_line(cfg, message):
    with pytest.raises(UserError, match=message):
        estimate(replace(cfg))


def test_the_head_keeps_no_logits_when_frozen_and_applied_apart():
    import inspect

    from toolkit.head_logprobs import head_logprobs

    assert HEAD_CHUNK == inspect.signature(head_logprobs).parameters["chunk"].default
    shape, positions = PRESETS["llama-7b"], 4 * 1024
    row = shape.vocab * 4
    assert head_logits(shape, PlanConfig(lora=True), positions) == 3 * HEAD_CHUNK * row  # one chunk at a time
    assert head_logits(shape, PlanConfig(), positions) == positions * row + 2 * HEAD_CHUNK * row  # kept
    assert head_logits(shape, PlanConfig(lora=True, zero=3, gpus=8), positions) == 3 * positions * row
