"""Token log-probs through a plain linear head, a chunk of positions at a time (toolkit.head_logprobs), and `dpo`'s
use of it: the answers' positions alone meet the head, and a frozen head (LoRA) keeps no logits for backward."""

from __future__ import annotations

import copy

import pytest
import torch

from toolkit.dpo import collate, concatenated_logps, shared_prompt_batch, tokenize_pairs
from toolkit.head_logprobs import FrozenHeadLogprobs, frozen_plain_linear, head_logprobs, plain_linear
from toolkit.rows import Pair


def test_head_logprobs_in_chunks_equal_the_log_softmax_and_its_gradients():
    torch.manual_seed(0)
    V, H, N, T = 257, 16, 11, 0.7
    head = torch.nn.Linear(H, V, bias=False)
    hidden = torch.randn(N, H, requires_grad=True)
    tokens = torch.randint(0, V, (N,))
    weights = torch.randn(N)
    expected = torch.log_softmax(head(hidden) / T, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    expected_grads = torch.autograd.grad((expected * weights).sum(), (hidden, head.weight))
    for chunk in (4, 256):  # chunks of 4, 4, 3 positions and one of 11
        got = head_logprobs(head, hidden, tokens, T, chunk=chunk)  # a head that trains: logits kept
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
        for got_grad, want in zip(torch.autograd.grad((got * weights).sum(), (hidden, head.weight)), expected_grads,
                                  strict=True):
            torch.testing.assert_close(got_grad, want, rtol=0, atol=1e-5)
    head.weight.requires_grad_(False)  # frozen (LoRA): the gradient formed in forward, no logits kept
    assert frozen_plain_linear(head)
    calls = []
    original = FrozenHeadLogprobs.forward
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(FrozenHeadLogprobs, "forward", staticmethod(lambda *a: calls.append(1) or original(*a)))
        got = head_logprobs(head, hidden, tokens, T, chunk=4)
    assert len(calls) == 3
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    (got_grad,) = torch.autograd.grad((got * weights).sum(), hidden)
    torch.testing.assert_close(got_grad, expected_grads[0], rtol=0, atol=1e-5)
    with torch.no_grad():  # a reference pass over the same positions: the same bits as the policy's
        assert torch.equal(head_logprobs(head, hidden, tokens, T, chunk=4), got.detach())
    assert head_logprobs(head, hidden[:0], tokens[:0], T).shape == (0,)
    assert not plain_linear(torch.nn.Linear(H, V)) and not plain_linear(torch.nn.Embedding(V, H))  # a bias; not Linear


def _lora_policy(model):
    from toolkit.training.model import add_lora

    torch.manual_seed(0)
    policy = add_lora(copy.deepcopy(model), 4, 8, task_type="CAUSAL_LM")
    with torch.no_grad():
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)  # a trained adapter, so that every LoRA weight has a gradient
    return policy


@pytest.mark.parametrize("layout", ["plain", "shared"])
def test_dpo_with_lora_takes_the_frozen_head_and_keeps_the_gradients_of_the_logits(tiny_llama, monkeypatch, layout):
    model, tokenizer = tiny_llama
    policy = _lora_policy(model)
    pairs = [Pair(f"Question {i}: how do I {w}?", f"You {w} slowly and carefully, step by step.", f"No. {w}!")
             for i, w in enumerate(("boil an egg", "tie a knot", "plant a tree"))]
    tokens, _ = tokenize_pairs(pairs, tokenizer, 64, 32)
    batch = collate(tokens, tokenizer.pad_token_id)
    if layout == "shared":
        batch = shared_prompt_batch(tokens, tokenizer.pad_token_id, min_saving=None)
    frozen_calls = []
    original = FrozenHeadLogprobs.forward
    monkeypatch.setattr(FrozenHeadLogprobs, "forward",
                        staticmethod(lambda *a: frozen_calls.append(1) or original(*a)))
    results = []
    for apart in (True, False):  # the head applied apart to the answers' hidden states, or the model's logits
        monkeypatch.setattr("toolkit.head_logprobs.plain_linear", lambda head, apart=apart: apart)
        policy.zero_grad()
        chosen, rejected = concatenated_logps(policy, batch)
        (chosen.sum() - 2 * rejected.sum()).backward()
        results.append((chosen.detach(), rejected.detach(),
                        {n: p.grad.clone() for n, p in policy.named_parameters() if p.requires_grad}))
        assert bool(frozen_calls) == apart
        frozen_calls.clear()
    (chosen, rejected, grads), (want_chosen, want_rejected, want_grads) = results
    torch.testing.assert_close(chosen, want_chosen, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(rejected, want_rejected, rtol=1e-5, atol=1e-4)
    assert want_grads and all(g.abs().max() > 0 for g in want_grads.values())
    for name, want in want_grads.items():
        # float32 sums in another order; a wrong gradient differs by the gradient's own size
        torch.testing.assert_close(grads[name], want, rtol=1e-4, atol=1e-4 * float(want.abs().max()), msg=name)
    assert type(policy.get_base_model().get_output_embeddings()) is torch.nn.Linear  # the head is back in place
