"""PPO, GRPO and RLOO on a tiny random LLaMA (SmolLM2 tokenizer): sampling log-probs, reference, LoRA,
first-minibatch ratio, resume, NaN and bad prompt files. Each test takes seconds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from support.cli import FIXTURES
from torch.utils.checkpoint import checkpoint

from rlhf.config import PPOConfig
from rlhf.policy import (
    ActorCritic,
    Reference,
    _grouped_hidden,
    causal_lm,
    frozen_copy,
    frozen_plain_linear,
    load_critic,
    logprobs_of,
    response_hidden,
    response_logits,
)
from rlhf.rollout import batch_indices, load_prompts, sample
from rlhf.trainer import train
from toolkit.errors import UserError
from toolkit.models import load_causal_lm
from toolkit.training.model import add_lora

PROMPTS = FIXTURES / "prompts-alpaca-32.jsonl"


def tiny_cfg(policy: Path, out: Path, **overrides) -> PPOConfig:
    settings = dict(policy=str(policy), reward="rules:length", prompts=str(PROMPTS), out=str(out), steps=2,
                    batch_size=4, num_minibatches=2, ppo_epochs=2, max_new_tokens=8, sample_every=1)
    settings.update(overrides)
    return PPOConfig(**settings)


def eos_prone(lm, tokenizer, push: float = 0.72):
    """Make EOS likely (so some rows stop early): every embedding shares a large direction, and EOS
    leans further along it. The residual stream then points that way and EOS's logit stands out."""
    with torch.no_grad():
        emb = lm.get_input_embeddings().weight
        emb[:, 0] += 10.0
        emb[tokenizer.eos_token_id, 0] += push
    return lm


def prompt_ids(tokenizer) -> list[list[int]]:
    texts = ["Hi", "Tell me a story about a dragon who could not fly", "Name four mammals.", "Why?"]
    return [tokenizer(t).input_ids for t in texts]


def forward_logprobs(lm, rollout, temperature: float) -> torch.Tensor:
    with torch.no_grad():
        return ActorCritic(lm)(rollout.query_responses, rollout.attention_mask, rollout.context_length,
                               temperature, rollout.responses)[0]


def test_sampling_logprobs_equal_a_fresh_forward_pass_with_left_padding(tiny_llama_dir):
    lm, tok = load_causal_lm(tiny_llama_dir)
    eos_prone(lm, tok)
    ids = prompt_ids(tok)
    assert len({len(i) for i in ids}) > 1  # different lengths: left padding is exercised
    for seed in range(20):  # a batch where some rows stop at EOS and some run out of budget
        torch.manual_seed(seed)
        rollout = sample(lm, tok, ids, max_new_tokens=12, temperature=0.7)
        if rollout.contain_eos.any() and not rollout.contain_eos.all():
            break
    else:
        pytest.fail("no batch with rows both with and without EOS")
    lengths = rollout.response_mask.sum(1)
    assert lengths.min() < 12  # right padding after early EOS is exercised too
    for i in range(len(ids)):  # masks: real tokens first, EOS last where finish_reason == stop
        n = int(lengths[i])
        assert rollout.response_mask[i, :n].all() and not rollout.response_mask[i, n:].any()
        assert bool(rollout.contain_eos[i]) == (rollout.finish_reasons[i] == "stop")
        assert (int(rollout.responses[i, n - 1]) == tok.eos_token_id) == bool(rollout.contain_eos[i])
    fresh = forward_logprobs(lm, rollout, 0.7)
    real = rollout.response_mask.bool()
    torch.testing.assert_close(fresh[real], rollout.sample_logprobs[real], atol=1e-5, rtol=2e-5)
    # the temperature matters: at T=1 the same tokens have other log-probs
    assert (forward_logprobs(lm, rollout, 1.0)[real] - rollout.sample_logprobs[real]).abs().max() > 1e-3


def test_a_group_s_prompt_runs_once_with_the_same_logits_and_gradients(tiny_llama_dir, monkeypatch):
    lm, tok = load_causal_lm(tiny_llama_dir)
    eos_prone(lm, tok)
    lm = add_lora(lm, 4, 8, "all-linear", task_type="CAUSAL_LM")
    with torch.no_grad():  # a trained adapter: B ≠ 0, so A's gradients are not 0 either
        for name, param in lm.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.02)
    ids = [i for i in prompt_ids(tok) for _ in range(3)]  # K = 3 answers to each prompt, as a group's rows lie
    for seed in range(20):
        torch.manual_seed(seed)
        rollout = sample(lm, tok, ids, max_new_tokens=10, temperature=0.7)
        if rollout.response_mask.sum(1).min() < 10:  # right padding after an early EOS is exercised
            break
    else:
        pytest.fail("no batch with a row that stopped early")
    args = (rollout.query_responses, rollout.attention_mask, rollout.context_length, 0.7)
    actor = ActorCritic(lm, value_head=False)
    assert frozen_plain_linear(causal_lm(lm).get_output_embeddings())  # a LoRA model's head takes that path
    results = []
    # the frozen head's gradient formed in forward (LoRA), then the logits kept or recomputed (a checkpoint)
    for group_size, frozen_head_path, recompute in ((1, True, False), (3, True, False), (1, False, False),
                                                    (1, False, True)):
        monkeypatch.setattr("rlhf.policy.frozen_plain_linear", lambda head, fast=frozen_head_path: fast)
        actor.recompute_logits = recompute
        actor.zero_grad()
        logprobs, _, _ = actor(*args, rollout.responses, group_size=group_size)
        picked = logprobs * rollout.response_mask
        picked.sum().backward()
        results.append((picked.detach(), {n: p.grad.clone() for n, p in actor.named_parameters() if p.requires_grad}))
    (plain, plain_grads), *others = results
    assert plain_grads and all(grad.abs().max() > 0 for grad in plain_grads.values())
    for other, other_grads in others:
        torch.testing.assert_close(other, plain, atol=1e-5, rtol=1e-5)
        for name, grad in plain_grads.items():
            torch.testing.assert_close(other_grads[name], grad, atol=1e-6, rtol=1e-4, msg=name)
    reference = Reference(actor, None)
    torch.testing.assert_close(reference.logprobs(*args, rollout.responses, group_size=3),
                               reference.logprobs(*args, rollout.responses), atol=1e-5, rtol=1e-5)


def _train_steps(actor: ActorCritic, rollout, n: int = 3, lr: float = 1e-2) -> None:
    optimizer = torch.optim.Adam([p for p in actor.parameters() if p.requires_grad], lr=lr)
    for _ in range(n):
        logprobs, _, values = actor(rollout.query_responses, rollout.attention_mask, rollout.context_length, 1.0,
                                    rollout.responses)
        loss = -logprobs.mean() + values.pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def test_reference_stays_fixed_while_the_policy_moves(tiny_llama_dir):
    lm, tok = load_causal_lm(tiny_llama_dir)
    ref_lm = frozen_copy(lm)
    actor = ActorCritic(lm)
    reference = Reference(actor, ref_lm)
    torch.manual_seed(0)
    rollout = sample(lm, tok, prompt_ids(tok), max_new_tokens=6, temperature=1.0)
    args = (rollout.query_responses, rollout.attention_mask, rollout.context_length, 1.0, rollout.responses)
    ref_before, policy_before = reference.logprobs(*args), forward_logprobs(lm, rollout, 1.0)
    torch.testing.assert_close(ref_before, policy_before)  # π_ref = π at the start
    _train_steps(actor, rollout)
    assert not any(p.requires_grad for p in ref_lm.parameters())
    assert torch.equal(reference.logprobs(*args), ref_before)  # bit for bit
    assert (forward_logprobs(lm, rollout, 1.0) - policy_before).abs().max() > 1e-2


def test_lora_reference_is_the_base_model_with_the_adapter_disabled(tiny_llama_dir):
    base, tok = load_causal_lm(tiny_llama_dir)
    lm, _ = load_causal_lm(tiny_llama_dir)
    lm = add_lora(lm, r=4, alpha=8, target="all-linear", task_type="CAUSAL_LM")
    actor = ActorCritic(lm)
    reference = Reference(actor, None)
    torch.manual_seed(0)
    rollout = sample(base, tok, prompt_ids(tok), max_new_tokens=6, temperature=1.0)
    args = (rollout.query_responses, rollout.attention_mask, rollout.context_length, 1.0, rollout.responses)
    base_logprobs = forward_logprobs(base, rollout, 1.0)
    _train_steps(actor, rollout)
    trainable = {n for n, p in lm.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)  # only the adapter trains
    with lm.disable_adapter():
        torch.testing.assert_close(forward_logprobs(lm, rollout, 1.0), base_logprobs, atol=1e-6, rtol=0)
    torch.testing.assert_close(reference.logprobs(*args), base_logprobs, atol=1e-6, rtol=0)
    assert (forward_logprobs(lm, rollout, 1.0) - base_logprobs).abs().max() > 1e-2  # adapter on: moved


def test_first_minibatch_of_first_epoch_is_on_policy(tiny_llama_dir, tmp_path):
    result = train(tiny_cfg(tiny_llama_dir, tmp_path / "run", steps=1, learning_rate=1e-3))
    stats = result.update_stats
    assert stats["ratio_dev"].shape == (2, 2, 1)
    assert stats["ratio_dev"][0, 0, 0] < 1e-5  # ratio = 1 (to float32 round-off)
    assert stats["ratio"][0, 0, 0].item() == pytest.approx(1.0, abs=1e-6)
    assert stats["approxkl"][0, 0, 0] < 1e-10
    assert stats["clipfrac"][0, 0, 0] == 0
    assert stats["vf_clipfrac"][0, 0, 0] == 0
    assert stats["ratio_dev"][1].max() > 1e-4  # later minibatches see a policy that has moved
    row = result.history[0]
    assert row["objective/kl"] == pytest.approx(0.0, abs=1e-5)  # π = π_ref before any update
    assert row["objective/kl_k3"] == pytest.approx(0.0, abs=1e-6)
    assert row["val/sampling_logprob_gap"] < 1e-4  # the KL and the ratio score the tokens actually sampled


# two prompts × K = 2 answers: the same 4 rows per step as tiny_cfg's PPO batch
GROUPS = dict(batch_size=2, group_size=2)


@pytest.mark.parametrize("algo", ["grpo", "rloo"])
def test_critic_free_first_minibatch_is_on_policy_and_trains_no_value_model(tiny_llama_dir, tmp_path, algo):
    result = train(tiny_cfg(tiny_llama_dir, tmp_path / "run", steps=1, learning_rate=1e-3, algo=algo, **GROUPS))
    stats = result.update_stats
    assert stats["ratio_dev"].shape == (2, 2, 1)  # 4 rows in 2 minibatches, 2 epochs
    assert stats["ratio_dev"][0, 0, 0] < 1e-5
    assert stats["ratio"][0, 0, 0].item() == pytest.approx(1.0, abs=1e-6)
    assert stats["approxkl"][0, 0, 0] < 1e-10 and stats["clipfrac"][0, 0, 0] == 0
    assert stats["ratio_dev"][1].max() > 1e-4  # the policy moved
    assert (stats["vf_loss"] == 0).all() and (stats["vf_clipfrac"] == 0).all()
    row = result.history[0]
    assert row["episode"] == 4 and row["loss/value_avg"] == 0  # episodes count answers; no value loss
    assert row["objective/kl"] == pytest.approx(0.0, abs=1e-5)
    samples = [json.loads(line) for line in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    assert samples[0]["prompt"] == samples[1]["prompt"]  # a group: one prompt answered K times, rows next to each other
    checkpoint = tmp_path / "run" / "checkpoints" / "step-000001"
    assert (checkpoint / "policy").is_dir() and not list(checkpoint.glob("value*"))  # no value head saved
    actor = ActorCritic(load_causal_lm(tiny_llama_dir)[0], value_head=False)
    assert not actor.has_values and all(n.startswith("lm.") for n, _ in actor.named_parameters())


def test_one_epoch_of_one_minibatch_takes_log_pi_old_from_the_update_and_trains_as_with_the_extra_forward(
        tiny_llama_dir, tmp_path, monkeypatch):
    forwards = []
    actor_forward = ActorCritic.forward
    monkeypatch.setattr(ActorCritic, "forward",
                        lambda self, *a, **k: forwards.append(1) or actor_forward(self, *a, **k))
    settings = dict(steps=2, algo="grpo", ppo_epochs=1, num_minibatches=1, learning_rate=3e-3, **GROUPS)
    cfg = tiny_cfg(tiny_llama_dir, tmp_path / "reused", **settings)
    assert cfg.logprobs_from_update
    reused = train(cfg)
    assert len(forwards) == 2  # one forward of the policy per step: the update's
    assert (reused.update_stats["ratio_dev"] == 0).all()  # π_old is π_new detached: the ratio is exactly 1

    monkeypatch.setattr(PPOConfig, "logprobs_from_update", property(lambda self: False))
    forwards.clear()
    extra = train(tiny_cfg(tiny_llama_dir, tmp_path / "extra", **settings))
    assert len(forwards) == 4  # the rollout's forward and the update's
    a, b = _metrics(tmp_path / "reused"), _metrics(tmp_path / "extra")
    assert abs(a[1]["objective/kl"]) > 1e-2  # the policy moved in step 1
    for key, value in b[1].items():
        if key not in VOLATILE:
            assert a[1][key] == pytest.approx(value, rel=1e-3, abs=1e-5), key
    assert reused.step == extra.step == 2


@pytest.mark.parametrize("algo", ["grpo", "rloo"])  # rloo: the KL in the reward, so the rollout's forward runs too
@pytest.mark.parametrize("minibatches", [1, 2])  # 2: each minibatch holds one whole group of 3
def test_running_each_group_s_prompt_once_trains_as_running_every_row(tiny_llama_dir, tmp_path, monkeypatch, algo,
                                                                       minibatches):
    settings = dict(steps=1, algo=algo, ppo_epochs=1, num_minibatches=minibatches, learning_rate=3e-3,
                    batch_size=2, group_size=3)
    shared = tiny_cfg(tiny_llama_dir, tmp_path / "shared", **settings)
    assert shared.shares_group_prompts
    grouped = []
    monkeypatch.setattr("rlhf.policy._grouped_hidden", lambda *a: grouped.append(a[-1]) or _grouped_hidden(*a))
    train(shared)
    rollout_forwards = 1 if shared.logprobs_from_update else 2  # the reference's (and the policy's, for π_old)
    assert grouped == [3] * (rollout_forwards + minibatches)  # the update's forwards ran each prompt once too
    monkeypatch.setattr(PPOConfig, "shares_group_prompts", property(lambda self: False))
    train(tiny_cfg(tiny_llama_dir, tmp_path / "rows", **settings))
    _assert_same_first_step(tiny_llama_dir, tmp_path / "shared", tmp_path / "rows")


def test_gradient_checkpointing_recomputes_and_trains_as_without_it(tiny_llama_dir, tmp_path, monkeypatch):
    recomputed = []  # every weight trains, the head too: its logits are recomputed in backward
    monkeypatch.setattr("rlhf.policy.checkpoint", lambda *a, **k: recomputed.append(1) or checkpoint(*a, **k))
    settings = dict(steps=1, ppo_epochs=1, num_minibatches=1, learning_rate=3e-3)
    train(tiny_cfg(tiny_llama_dir, tmp_path / "checkpointed", gradient_checkpointing=True, **settings))
    assert recomputed
    recomputed.clear()
    train(tiny_cfg(tiny_llama_dir, tmp_path / "plain", **settings))
    assert not recomputed
    _assert_same_first_step(tiny_llama_dir, tmp_path / "checkpointed", tmp_path / "plain")


def _assert_same_first_step(start_dir: Path, run: Path, expected: Path) -> None:
    for key, value in _metrics(expected)[0].items():  # the rollout: same answers, scores, log-probs and KL
        if key not in VOLATILE:
            assert _metrics(run)[0][key] == pytest.approx(value, rel=1e-3, abs=1e-5), key
    # the update: the same step, up to rounding (here ~1e-6 of it). Later steps are not compared: on some CPUs
    # that rounding sends step 2's sampling down another path and the two runs part
    start = _weights(start_dir)
    step, expected_step = _weights(run / "policy") - start, _weights(expected / "policy") - start
    assert expected_step.norm() > 0.1  # the policy moved
    assert (step - expected_step).norm() < 1e-4 * expected_step.norm()


def _weights(model_dir: Path) -> torch.Tensor:
    from safetensors.torch import load_file

    weights = load_file(model_dir / "model.safetensors")
    return torch.cat([weights[name].flatten().float() for name in sorted(weights)])


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


VOLATILE = ("time/rollout", "time/update", "time/step")


@pytest.mark.parametrize("algo", ["ppo", "grpo"])
def test_resume_reproduces_the_uninterrupted_run(tiny_llama_dir, tmp_path, algo):
    common = dict(learning_rate=3e-3, save_every=1, adaptive_kl=True, kl_target=0.01, kl_horizon=100, algo=algo,
                  **(GROUPS if algo == "grpo" else {}))
    train(tiny_cfg(tiny_llama_dir, tmp_path / "full", steps=2, **common))
    train(tiny_cfg(tiny_llama_dir, tmp_path / "cut", steps=1, **common))  # "interrupted" after step 1
    assert (tmp_path / "cut" / "checkpoints" / "step-000001" / "manifest.json").is_file()
    resumed = train(tiny_cfg(tiny_llama_dir, tmp_path / "cut", steps=2, resume=True, **common))
    assert resumed.step == 2
    a, b = _metrics(tmp_path / "full"), _metrics(tmp_path / "cut")
    assert [r["step"] for r in b] == [1, 2]
    assert a[1]["objective/kl_coef"] != a[0]["objective/kl_coef"]  # the adaptive β state was restored
    assert a[1]["objective/kl"] != 0  # the policy had moved: weights and Adam state were restored
    for key, value in a[1].items():
        if key not in VOLATILE:
            assert b[1][key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
    samples = [json.loads(line) for line in (tmp_path / "cut" / "samples.jsonl").read_text().splitlines()]
    full_samples = [json.loads(line) for line in (tmp_path / "full" / "samples.jsonl").read_text().splitlines()]
    assert [s["response"] for s in samples] == [s["response"] for s in full_samples]  # same RNG, same prompts


def test_a_critic_free_checkpoint_resumed_as_ppo_is_a_clear_error(tiny_llama_dir, tmp_path):
    out = tmp_path / "run"
    train(tiny_cfg(tiny_llama_dir, out, steps=1, algo="grpo", **GROUPS))
    with pytest.raises(UserError, match=r"step-000001 has no value model .*same --algo"):
        train(tiny_cfg(tiny_llama_dir, out, steps=2, resume=True))


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_checkpoint(tiny_llama_dir, tmp_path):
    out = tmp_path / "run"
    train(tiny_cfg(tiny_llama_dir, out, steps=1))
    checkpoint = out / "checkpoints" / "step-000001"
    before = sorted(p.name for p in checkpoint.rglob("*"))
    with pytest.raises(UserError, match=r"loss became NaN at step 2 .*step-000001"):
        train(tiny_cfg(tiny_llama_dir, out, steps=3, resume=True, learning_rate=1e30, num_minibatches=4))
    assert sorted(p.name for p in checkpoint.rglob("*")) == before
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-000001"]
    assert [r["step"] for r in _metrics(out)] == [1]


def test_output_dir_of_another_run_is_not_overwritten(tiny_llama_dir, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    (out / "samples.jsonl").write_text("")
    with pytest.raises(UserError, match="already holds a run"):
        train(tiny_cfg(tiny_llama_dir, out))
    (out / "samples.jsonl").unlink()  # an sft run's files: not this command's own, not even with --overwrite
    with pytest.raises(UserError, match="holds a sft-run, not a rlhf-run"):
        train(tiny_cfg(tiny_llama_dir, out, overwrite=True))


def test_prompt_files(tiny_llama, tmp_path):
    _, tok = tiny_llama
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(UserError, match="empty"):
        load_prompts(str(empty), tok)
    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps({"prompt": "short"}) + "\n" + json.dumps({"prompt": "word " * 400}) + "\n")
    with pytest.raises(UserError, match=r"long\.jsonl:2: prompt is \d+ tokens, longer than --max-prompt-tokens 64"):
        load_prompts(str(long), tok, max_prompt_tokens=64)
    prompts, truncated = load_prompts(str(long), tok, max_prompt_tokens=64, truncate=True)
    assert truncated == 1 and len(prompts[1].ids) == 64
    assert tok.decode(prompts[1].ids).endswith("<|im_start|>assistant\n")  # cut from the left
    mixed = tmp_path / "mixed.jsonl"
    rows = [{"messages": [{"role": "user", "content": "a?"}, {"role": "assistant", "content": "b"}]},
            {"instruction": "Add", "input": "2 and 2"}, {"conversations": [{"from": "human", "value": "c?"}]},
            {"user_input": "d?"}]
    mixed.write_text("".join(json.dumps(r) + "\n" for r in rows))
    prompts, _ = load_prompts(str(mixed), tok)
    assert [p.text for p in prompts] == ["a?", "Add\n\n2 and 2", "c?", "d?"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "ok"}) + "\n" + json.dumps({"question": "?"}) + "\n")
    with pytest.raises(UserError, match=r"bad\.jsonl:2: unknown row format"):
        load_prompts(str(bad), tok)


def test_prompt_order_depends_only_on_step_and_covers_the_file():
    seen = [i for step in range(1, 5) for i in batch_indices(8, step, 4, 0, 1, seed=3)]
    assert sorted(seen[:8]) == list(range(8)) and sorted(seen[8:]) == list(range(8))
    assert batch_indices(8, 3, 4, 0, 1, seed=3) == seen[8:12]
    ranks = batch_indices(10, 1, 2, 0, 2, seed=0) + batch_indices(10, 1, 2, 1, 2, seed=0)
    assert len(set(ranks)) == 4  # two processes never share a prompt within a step


def test_separate_critic_from_a_model_directory(tiny_llama_dir, tmp_path):
    result = train(tiny_cfg(tiny_llama_dir, tmp_path / "run", steps=1, critic=str(tiny_llama_dir)))
    assert result.history[0]["loss/value_avg"] > 0
    _, tok = load_causal_lm(tiny_llama_dir)
    with pytest.raises(UserError, match="different tokenizer"):
        load_critic("minilm-l6", "rules:length", tok)


def test_k1_kl_is_unbiased_for_the_exact_kl_of_the_sampled_prefixes(tiny_llama_dir):
    """objective/kl (Σ_t log π − log π_ref on the sampled tokens, padding masked) must average to the
    exact KL. Per row, E[k1_t | prefix] = KL(π(·|prefix) ‖ π_ref(·|prefix)), so the paired difference
    Σ_t k1_t − Σ_t KL_t has mean 0 (a negative objective/kl on a small batch is this estimator's noise
    when the true KL is small, not a bias); arg-max tokens or a flipped sign shift it by many standard
    errors."""
    from rlhf.objective import per_token_rewards

    torch.manual_seed(0)
    lm, tok = load_causal_lm(tiny_llama_dir)
    eos_prone(lm, tok, push=0.6)
    ref_lm = frozen_copy(lm)
    with torch.no_grad():  # π_ref: the same model with its final norm's gains scattered
        ref_lm.model.norm.weight.mul_(torch.exp(2 * torch.randn_like(ref_lm.model.norm.weight)))
    actor, reference, T = ActorCritic(lm), Reference(ActorCritic(lm), ref_lm), 0.7
    rollout = sample(lm, tok, prompt_ids(tok) * 16, max_new_tokens=8, temperature=T)
    mask = rollout.response_mask
    assert not mask.all()  # some rows stop at EOS: padding is exercised
    args = (rollout.query_responses, rollout.attention_mask, rollout.context_length, T)
    with torch.no_grad():
        logits = response_logits(lm, response_hidden(lm, *args[:3]), T)
        ref_logits = ref_lm.get_output_embeddings()(
            ref_lm.get_decoder()(input_ids=rollout.query_responses, attention_mask=rollout.attention_mask,
                                 position_ids=(rollout.attention_mask.cumsum(-1) - 1).clamp(min=0))
            .last_hidden_state[:, rollout.context_length - 1:-1]) / T
    logprobs = actor(*args, rollout.responses)[0].detach()
    ref_logprobs = reference.logprobs(*args, rollout.responses)
    # padding holds junk log-probs (the pad token's): the KL must ignore them
    _, kl, _ = per_token_rewards(scores=torch.zeros(len(mask)), logprobs=logprobs, ref_logprobs=ref_logprobs,
                                 mask=mask, contain_eos=rollout.contain_eos, kl_coef=0.1, missing_eos_penalty=0.0)
    assert (kl[mask == 0] == 0).all()
    logp, ref_logp = torch.log_softmax(logits, -1), torch.log_softmax(ref_logits, -1)
    exact = ((logp.exp() * (logp - ref_logp)).sum(-1) * mask).sum(1)  # Σ_t KL_t per row, ≥ 0
    k1 = kl.sum(1)
    assert exact.mean() > 0.5  # π and π_ref differ enough for a bias to show
    diff = k1 - exact
    standard_error = diff.std() / len(diff) ** 0.5
    assert diff.mean().abs() < 4 * standard_error, (k1.mean(), exact.mean(), standard_error)

    def detected(estimate: torch.Tensor) -> bool:
        return bool((estimate - exact).mean().abs() > 4 * (estimate - exact).std() / len(diff) ** 0.5)

    # the same check catches ChatLLaMA's mistakes: the arg-max token scored instead of the sampled
    # one, and the KL with its sign flipped (temperature is pinned by the sampling log-prob test above)
    greedy = logits.argmax(-1)
    assert detected(((logprobs_of(logits, greedy) - logprobs_of(ref_logits, greedy)) * mask).sum(1))
    assert detected(-k1)


def test_a_reference_other_than_the_starting_policy_is_the_kl_s_anchor(tiny_llama_dir, tmp_path):
    from support.tiny_models import save_tiny_llama

    other = save_tiny_llama(tmp_path / "other", seed=1)
    row = train(tiny_cfg(tiny_llama_dir, tmp_path / "run", steps=1, lora=True, reference=str(other))).history[0]
    # π = the starting policy before any update, so a KL at step 1 is its distance from the other model
    assert row["objective/kl_k3"] > 0.1 and row["objective/kl"] > 0.1
    same = train(tiny_cfg(tiny_llama_dir, tmp_path / "same", steps=1, lora=True,
                          reference=str(tiny_llama_dir))).history[0]
    assert same["objective/kl"] == pytest.approx(0.0, abs=1e-5)  # a frozen copy of the start: the adapter-off π_ref
    foreign = save_tiny_llama(tmp_path / "foreign", tokenizer_from="minilm-l6", seed=0)
    with pytest.raises(UserError, match="--reference .* different tokenizer"):
        train(tiny_cfg(tiny_llama_dir, tmp_path / "foreign-run", steps=1, reference=str(foreign)))


def test_kl_budget_ends_the_run_on_the_last_policy_inside_it(tiny_llama_dir, tmp_path):
    common = dict(learning_rate=1e-2, batch_size=8, steps=4, kl_coef=0.0)
    free = train(tiny_cfg(tiny_llama_dir, tmp_path / "free", save_every=1, keep_checkpoints=0, **common))
    kl = [row["objective/kl"] for row in free.history]  # row s: the rollouts of the policy after s − 1 updates
    assert kl[0] == pytest.approx(0.0, abs=1e-5)  # π_ref is the starting policy
    # the first step after step 2 whose rollouts' KL exceeds every earlier one's (the k1 mean of 8 answers is noisy)
    first_over = next(s for s in range(3, len(kl) + 1) if kl[s - 1] > max(kl[:s - 1]))
    budget = (max(kl[:first_over - 1]) + kl[first_over - 1]) / 2
    capped = train(tiny_cfg(tiny_llama_dir, tmp_path / "capped", kl_budget=budget, **common))
    assert capped.step == first_over - 2
    assert [row["step"] for row in _metrics(tmp_path / "capped")] == list(range(1, first_over + 1))
    run = json.loads((tmp_path / "capped" / "run.json").read_text())
    assert run["steps_done"] == first_over - 2 and f"rollouts of step {first_over}" in run["stopped"]
    # the saved policy's metrics, not the over-budget step's
    assert run["final"]["step"] == first_over - 2 and run["final"]["objective/kl"] == kl[first_over - 3]
    card = (tmp_path / "capped" / "policy" / "README.md").read_text()
    assert f"| step | {first_over - 2} |" in card
    inside = _weights(tmp_path / "free" / "checkpoints" / f"step-{first_over - 2:06d}" / "policy")
    assert torch.equal(_weights(tmp_path / "capped" / "policy"), inside)
    assert not torch.equal(inside, _weights(tiny_llama_dir))


def test_a_starting_policy_over_the_kl_budget_is_a_clear_error(tiny_llama_dir, tmp_path):
    from support.tiny_models import save_tiny_llama

    other = save_tiny_llama(tmp_path / "other", seed=1)
    with pytest.raises(UserError, match=r"--kl-budget 0.01: the starting policy is already .* nats"):
        train(tiny_cfg(tiny_llama_dir, tmp_path / "run", steps=2, reference=str(other), kl_budget=0.01))
