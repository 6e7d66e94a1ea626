"""PPO, GRPO and RLOO arithmetic against hand-computed values: GAE, whitening, KL controllers, per-token
rewards, group advantages, losses, and the config checks of --algo."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf.config import PPOConfig
from rlhf.objective import (
    AdaptiveKLController,
    FixedKLController,
    gae,
    group_advantages,
    group_loss,
    kl_k1,
    kl_k3,
    last_token_index,
    make_kl_controller,
    masked_mean,
    masked_var,
    masked_whiten,
    per_token_rewards,
    ppo_loss,
)
from toolkit.errors import UserError


def test_gae_matches_hand_computed_example():
    # Row 0: three real tokens, reward 1 at the end.      Row 1: two real tokens, then padding.
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 2.0, 0.0]])
    values = torch.tensor([[0.5, 0.4, 0.3], [1.0, 0.5, 9.9]])  # 9.9 sits on padding and must be ignored
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    advantages, returns = gae(rewards=rewards, values=values, mask=mask, gamma=1.0, lam=0.95)
    # Row 0: δ2 = 1 − 0.3 = 0.7; δ1 = 0.3 − 0.4 = −0.1; δ0 = 0.4 − 0.5 = −0.1
    #        A2 = 0.7; A1 = −0.1 + 0.95·0.7 = 0.565; A0 = −0.1 + 0.95·0.565 = 0.43675
    # Row 1: δ1 = 2 + 0 − 0.5 = 1.5 (no bootstrap past the end); δ0 = 0.5 − 1.0 = −0.5
    #        A1 = 1.5; A0 = −0.5 + 0.95·1.5 = 0.925; padding: 0
    expected = torch.tensor([[0.43675, 0.565, 0.7], [0.925, 1.5, 0.0]])
    torch.testing.assert_close(advantages, expected)
    torch.testing.assert_close(returns, torch.tensor([[0.93675, 0.965, 1.0], [1.925, 2.0, 0.0]]))


def test_gae_with_discount():
    rewards, values = torch.tensor([[1.0, 0.0, 3.0]]), torch.tensor([[0.2, 0.1, 0.5]])
    advantages, _ = gae(rewards=rewards, values=values, mask=torch.ones(1, 3), gamma=0.9, lam=0.5)
    d2 = 3.0 - 0.5
    d1 = 0.0 + 0.9 * 0.5 - 0.1
    d0 = 1.0 + 0.9 * 0.1 - 0.2
    a2, a1 = d2, d1 + 0.45 * d2
    torch.testing.assert_close(advantages, torch.tensor([[d0 + 0.45 * a1, a1, a2]]))


def test_gae_lambda_one_is_monte_carlo_return_minus_value():
    rewards = torch.tensor([[0.5, -1.0, 2.0, 0.25]])
    values = torch.tensor([[0.3, 0.2, -0.4, 0.9]])
    advantages, returns = gae(rewards=rewards, values=values, mask=torch.ones(1, 4), gamma=1.0, lam=1.0)
    mc = torch.flip(torch.cumsum(torch.flip(rewards, [1]), 1), [1])
    torch.testing.assert_close(returns, mc)
    torch.testing.assert_close(advantages, mc - values)


def test_whitening_uses_only_real_tokens():
    values = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 5.0, -50.0, 7.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    real = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    assert masked_mean(values, mask).item() == pytest.approx(3.0)
    assert masked_var(values, mask).item() == pytest.approx(real.var().item())  # unbiased, like torch
    white = masked_whiten(values, mask)
    kept = white[mask.bool()]
    assert kept.mean().item() == pytest.approx(0.0, abs=1e-6)
    assert kept.std().item() == pytest.approx(1.0, abs=1e-4)
    assert (white[~mask.bool()] == 0).all()
    torch.testing.assert_close(kept, (real - 3.0) / real.std())
    # shift_mean=False keeps the mean (used for rewards)
    assert masked_whiten(values, mask, shift_mean=False)[mask.bool()].mean().item() == pytest.approx(3.0)


def test_fixed_kl_controller_never_moves():
    ctl = FixedKLController(0.05)
    for kl in (0.0, 3.0, 60.0):
        ctl.update(kl, 512)
    assert ctl.value == 0.05


def test_adaptive_kl_controller_follows_ziegler():
    ctl = AdaptiveKLController(0.05, target=6.0, horizon=10000)
    ctl.update(current_kl=9.0, n_steps=100)  # error 0.5 clipped to 0.2 → β · (1 + 0.2 · 100/10000)
    assert ctl.value == pytest.approx(0.05 * 1.002)
    ctl.update(current_kl=6.0, n_steps=100)  # on target: unchanged
    assert ctl.value == pytest.approx(0.05 * 1.002)
    ctl.update(current_kl=4.5, n_steps=1000)  # error −0.25 clipped to −0.2 → shrinks
    assert ctl.value == pytest.approx(0.05 * 1.002 * (1 - 0.2 * 0.1))
    ctl.update(current_kl=5.7, n_steps=1000)  # error −0.05 (inside the clip)
    assert ctl.value == pytest.approx(0.05 * 1.002 * 0.98 * (1 - 0.05 * 0.1))
    state = ctl.state_dict()
    other = make_kl_controller(1.0, True, 6.0, 10000)
    other.load_state_dict(state)
    assert other.value == ctl.value


def test_reward_lands_on_last_real_token_and_eos_penalty_only_without_eos():
    B, R = 3, 5
    logprobs = torch.tensor([[-1.0, -2.0, -1.5, -0.5, -0.7]] * B)
    ref_logprobs = logprobs - 0.1  # k1 KL = +0.1 on every token
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    contain_eos = torch.tensor([True, False, True])
    scores = torch.tensor([1.0, 2.0, 3.0])
    rewards, kl, penalized = per_token_rewards(scores=scores, logprobs=logprobs, ref_logprobs=ref_logprobs,
                                               mask=mask, contain_eos=contain_eos, kl_coef=0.5,
                                               missing_eos_penalty=1.5)
    assert last_token_index(mask).tolist() == [2, 4, 0]
    torch.testing.assert_close(kl, 0.1 * mask.float())
    torch.testing.assert_close(penalized, torch.tensor([1.0, 0.5, 3.0]))  # only row 1 lacks EOS
    expected = -0.5 * 0.1 * mask.float()
    expected[0, 2] += 1.0
    expected[1, 4] += 0.5
    expected[2, 0] += 3.0
    torch.testing.assert_close(rewards, expected)
    assert (rewards[mask == 0] == 0).all()  # nothing on padding
    torch.testing.assert_close(kl_k1(logprobs, ref_logprobs), torch.full((B, R), 0.1))


def _loss_inputs(shift: float):
    torch.manual_seed(0)
    B, R, V = 2, 4, 7
    logits = torch.randn(B, R, V)
    responses = torch.randint(0, V, (B, R))
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    new_logprobs = torch.log_softmax(logits, -1).gather(-1, responses[..., None])[..., 0]
    values = torch.randn(B, R)
    advantages = torch.tensor([[1.0, -1.0, 0.5, 2.0], [-0.5, 1.0, 0.0, 0.0]])
    return dict(new_logprobs=new_logprobs, entropy=torch.rand(B, R), new_values=values, mask=mask,
                logprobs=new_logprobs - shift, values=values.clone(), advantages=advantages, returns=values + 0.3)


def _coefficients(cfg: PPOConfig) -> dict[str, float]:
    return dict(cliprange=cfg.cliprange, cliprange_value=cfg.cliprange_value, vf_coef=cfg.vf_coef,
                ent_coef=cfg.ent_coef)


def test_ppo_loss_on_policy_has_ratio_one_and_no_clipping():
    loss, stats = ppo_loss(**_loss_inputs(0.0), **_coefficients(PPOConfig()))
    assert stats["ratio"].item() == pytest.approx(1.0)
    assert stats["ratio_dev"].item() < 1e-6
    assert stats["approxkl"].item() < 1e-12
    assert stats["clipfrac"].item() == 0.0
    assert stats["vf_clipfrac"].item() == 0.0
    # values equal old values and returns = values + 0.3 → value loss 0.5 · 0.09
    assert stats["vf_loss"].item() == pytest.approx(0.045)
    assert math.isfinite(loss.item())


def test_ppo_loss_clips_when_the_ratio_leaves_the_trust_region():
    # ratio = e^0.5 ≈ 1.65 everywhere
    _, stats = ppo_loss(**_loss_inputs(0.5), **_coefficients(PPOConfig(cliprange=0.2)))
    assert stats["ratio"].item() == pytest.approx(math.exp(0.5), rel=1e-5)
    # clipped where the advantage is positive (the objective is capped there): 4 of the 6 real tokens
    assert stats["clipfrac"].item() == pytest.approx(4 / 6)
    assert stats["approxkl"].item() == pytest.approx(0.5 * 0.25, rel=1e-5)


def test_group_advantages_match_a_hand_computed_example():
    scores = torch.tensor([1.0, 2.0, 3.0, 6.0, 0.0, 0.0, 1.0, 1.0])  # two prompts, K = 4 answers each
    # group 1: mean 3, deviations (-2, -1, 0, 3), Bessel std sqrt(14/3); group 2: mean 0.5, std sqrt(1/3)
    std1, std2 = math.sqrt(14 / 3), math.sqrt(1 / 3)
    grpo = [d / (std1 + 1e-4) for d in (-2, -1, 0, 3)] + [d / (std2 + 1e-4) for d in (-0.5, -0.5, 0.5, 0.5)]
    torch.testing.assert_close(group_advantages(scores=scores, group_size=4, method="grpo"), torch.tensor(grpo))
    # leave-one-out: r_i − (sum − r_i) / 3; group 1 sum 12: 1 − 11/3, 2 − 10/3, 3 − 3, 6 − 2
    rloo = [-8 / 3, -4 / 3, 0.0, 4.0, -2 / 3, -2 / 3, 2 / 3, 2 / 3]
    torch.testing.assert_close(group_advantages(scores=scores, group_size=4, method="rloo"), torch.tensor(rloo))
    # K = 2: the other answer is the whole baseline
    pair = group_advantages(scores=torch.tensor([3.0, 1.0]), group_size=2, method="rloo")
    torch.testing.assert_close(pair, torch.tensor([2.0, -2.0]))
    with pytest.raises(ValueError, match="unknown"):
        group_advantages(scores=scores, group_size=4, method="ppo")


def test_identical_rewards_in_a_group_give_zero_advantage():
    scores = torch.tensor([0.7] * 4 + [-2.0] * 4 + [5.0, 5.0, 5.0, 5.0])
    for method in ("grpo", "rloo"):
        advantages = group_advantages(scores=scores, group_size=4, method=method)
        assert torch.equal(advantages, torch.zeros(12)), method  # no division blow-up: std 0 + 1e-4


def test_k3_is_never_negative_and_zero_only_where_the_policies_agree():
    torch.manual_seed(0)
    logprobs, ref_logprobs = -torch.rand(1000) * 8, -torch.rand(1000) * 8
    k3 = kl_k3(logprobs, ref_logprobs)
    assert (k3 >= 0).all() and (k3 > 0).all()
    assert torch.equal(kl_k3(logprobs, logprobs), torch.zeros(1000))
    # by hand: ρ = π_ref / π = e^-1 → (e^-1 − 1) + 1
    assert kl_k3(torch.tensor([0.0]), torch.tensor([-1.0])).item() == pytest.approx(math.exp(-1))


def test_group_loss_is_the_policy_loss_plus_beta_k3_and_has_ppo_s_statistics():
    inputs = _loss_inputs(0.0)
    common = dict(new_logprobs=inputs["new_logprobs"], entropy=inputs["entropy"], mask=inputs["mask"],
                  logprobs=inputs["logprobs"], advantages=inputs["advantages"], cliprange=0.2, ent_coef=0.0)
    ref_logprobs = inputs["logprobs"] - 0.3
    loss0, stats = group_loss(**common, ref_logprobs=ref_logprobs, kl_coef=0.0)
    assert set(stats) == set(ppo_loss(**_loss_inputs(0.0), **_coefficients(PPOConfig()))[1])  # same columns
    assert stats["ratio"].item() == pytest.approx(1.0) and stats["ratio_dev"].item() < 1e-6
    assert stats["vf_loss"].item() == 0 and stats["vf_clipfrac"].item() == 0 and stats["clipfrac"].item() == 0
    assert loss0.item() == pytest.approx(stats["pg_loss"].item())
    loss, _ = group_loss(**common, ref_logprobs=ref_logprobs, kl_coef=0.5)
    k3 = math.exp(-0.3) - 1 + 0.3  # the same log-ratio on every real token
    assert loss.item() == pytest.approx(loss0.item() + 0.5 * k3, rel=1e-5)
    new_logprobs = inputs["new_logprobs"].clone().requires_grad_(True)
    group_loss(**{**common, "new_logprobs": new_logprobs}, ref_logprobs=ref_logprobs, kl_coef=0.0)[0].backward()
    assert new_logprobs.grad[1, 2:].abs().max() == 0  # padding gets no gradient


def test_algo_settings_are_checked_and_minibatches_cover_the_groups():
    cfg = PPOConfig(prompts="p.jsonl", algo="grpo", batch_size=3, group_size=4, num_minibatches=4)
    cfg.validate()
    assert (cfg.rollout_size, cfg.minibatch_size, cfg.kl_mode) == (12, 3, "loss")
    assert PPOConfig(prompts="p.jsonl", algo="rloo").kl_mode == "reward"
    assert PPOConfig(prompts="p.jsonl").kl_mode == "reward"
    assert PPOConfig(prompts="p.jsonl", group_size=1).rollout_size == 8  # PPO: one answer per prompt
    PPOConfig(prompts="p.jsonl", group_size=1).validate()  # K is grpo / rloo's only
    bad = [(dict(algo="grpo", group_size=1), "--group-size: --algo grpo needs at least 2"),
           (dict(algo="rloo", critic="reward"), "--critic: --algo rloo trains no critic"),
           (dict(kl_in="loss"), "--kl-in: loss needs --algo grpo or rloo"),
           (dict(algo="a2c"), "--algo: ppo | grpo | rloo"),
           (dict(kl_in="both"), "--kl-in: auto | loss | reward"),
           (dict(algo="grpo", batch_size=3, group_size=2, num_minibatches=4),
            "--num-minibatches: must divide --batch-size × --group-size 6"),
           (dict(batch_size=6, num_minibatches=4), r"--num-minibatches: must divide --batch-size 6$")]
    for settings, message in bad:
        with pytest.raises(UserError, match=message):
            PPOConfig(prompts="p.jsonl", **settings).validate()
    PPOConfig(prompts="p.jsonl", algo="rloo", kl_in="loss").validate()
    PPOConfig(prompts="p.jsonl", algo="grpo", kl_in="reward").validate()


def test_zero3_generation_gathers_the_policy_only_when_asked():
    import contextlib
    from types import SimpleNamespace

    from rlhf.trainer import _gathered

    zero3 = SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(zero_stage=3)))
    module = torch.nn.Linear(2, 2)
    # gather_for_generation: false (33B/65B presets): ZeRO-3's own per-layer gathering, no full copy
    assert isinstance(_gathered(zero3, module, gather=False), contextlib.nullcontext)
    no_deepspeed = SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=None))
    assert isinstance(_gathered(no_deepspeed, module, gather=True), contextlib.nullcontext)


def test_log_probs_and_entropy_one_answer_at_a_time_equal_the_whole_batch_formulas():
    from rlhf.policy import response_logprobs

    torch.manual_seed(0)
    V, H, T = 257, 16, 0.7
    lm = torch.nn.Module()
    head = torch.nn.Linear(H, V, bias=False)
    lm.get_output_embeddings = lambda: head
    hidden = torch.randn(3, 5, H, requires_grad=True)
    tokens = torch.randint(0, V, (3, 5))
    logp = torch.log_softmax(head(hidden) / T, dim=-1)
    expected = logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    expected_entropy = -(logp.exp() * logp).sum(-1)
    weights = torch.randn(3, 5)
    for entropy, recompute in (("stat", False), ("loss", False), ("stat", True), ("loss", True)):
        got, got_entropy = response_logprobs(lm, hidden, tokens, T, entropy, recompute)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
        torch.testing.assert_close(got_entropy, expected_entropy, rtol=0, atol=1e-5)
        assert got_entropy.requires_grad == (entropy == "loss")
        # kept or recomputed, the logits give the gradient of the whole-batch formula, to the head's weight too
        got_grads = torch.autograd.grad((got * weights).sum(), (hidden, head.weight))
        expected_grads = torch.autograd.grad((expected * weights).sum(), (hidden, head.weight), retain_graph=True)
        for got_grad, expected_grad in zip(got_grads, expected_grads, strict=True):
            torch.testing.assert_close(got_grad, expected_grad, rtol=0, atol=1e-5)
    (entropy_grad,) = torch.autograd.grad(response_logprobs(lm, hidden, tokens, T, "loss")[1].sum(), hidden)
    torch.testing.assert_close(entropy_grad, torch.autograd.grad(expected_entropy.sum(), hidden)[0], rtol=0, atol=1e-5)
    head.weight.requires_grad_(False)  # a frozen head (LoRA): the gradient formed in forward, the same
    got, got_entropy = response_logprobs(lm, hidden, tokens, T, "stat")
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(got_entropy, expected_entropy, rtol=0, atol=1e-5)
    (got_grad,) = torch.autograd.grad((got * weights).sum(), hidden)
    logp = torch.log_softmax(head(hidden) / T, dim=-1)
    (expected_grad,) = torch.autograd.grad((logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) * weights).sum(), hidden)
    torch.testing.assert_close(got_grad, expected_grad, rtol=0, atol=1e-5)
    with torch.no_grad():
        assert torch.equal(response_logprobs(lm, hidden, tokens, T)[0], got)  # as the rollout takes them
        assert response_logprobs(lm, hidden, tokens, T)[1] is None
    empty = response_logprobs(lm, hidden[:0], tokens[:0], T, "stat")  # a micro-batch with no answer
    assert empty[0].shape == empty[1].shape == (0, 5)
    with pytest.raises(ValueError, match="entropy"):
        response_logprobs(lm, hidden, tokens, T, "yes")
