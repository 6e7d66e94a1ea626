"""DPO's shared-prompt forward (issue 17): a pair's prompt runs once and both answers run on its KV cache. Same
log-probs and gradients as the plain concatenated forward, used only where it saves ≥ 10% of token positions,
and a whole training run gives the same metrics with it on or off."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from support.cli import FIXTURES

from toolkit.dpo import (
    IGNORE,
    PAIR_METRICS,
    DPOConfig,
    PairTokens,
    collate,
    collate_pairs,
    concatenated_logps,
    shared_prompt_batch,
    tokenize_pairs,
    train_dpo,
)


def _mixed_pairs(tokenizer) -> list[PairTokens]:
    """HH pairs of different prompt lengths, one whose answers share their first tokens, and one whose prompts
    differ from the first token (nothing shared: an all-padding prefix row)."""
    from toolkit.reward.data import load_preferences

    hh = load_preferences(FIXTURES / "hh-harmless-6.jsonl").pairs[:3]
    tokens, _ = tokenize_pairs(hh, tokenizer, 128, 80)
    prompt = tokens[0].chosen[:tokens[0].chosen_start]
    same_start = PairTokens(prompt + [500, 501, 502, 503], len(prompt), prompt + [500, 501, 700], len(prompt))
    apart = PairTokens([11, 12, 13, 14, 15, 16], 3, [21, 22, 23, 24], 2)
    return [*tokens, same_start, apart]


@pytest.mark.parametrize("average", [False, True], ids=["sum", "mean"])
def test_shared_prompt_logps_and_gradients_equal_the_concatenated_forward(tiny_llama, average):
    model, tokenizer = tiny_llama
    model = copy.deepcopy(model).train()
    pairs = _mixed_pairs(tokenizer)
    lengths = {p.chosen_start for p in pairs}
    assert len(lengths) >= 3  # prompts of different lengths
    shared = shared_prompt_batch(pairs, tokenizer.pad_token_id, min_saving=None)
    assert shared is not None and shared["prefix_ids"].shape[1] == max(lengths)
    assert shared["prefix_mask"][-1].sum() == 0  # the pair that shares nothing
    assert shared["suffix_labels"][6, 0] == 500  # its first answer token is scored, predicted by the prefix
    plain = collate(pairs, tokenizer.pad_token_id)
    results = []
    for batch in (shared, plain):
        model.zero_grad()
        chosen, rejected = concatenated_logps(model, batch, average)
        (chosen.sum() + 2 * rejected.sum()).backward()
        layer = model.model.layers[1]
        results.append((chosen.detach(), rejected.detach(), layer.self_attn.q_proj.weight.grad.clone(),
                        layer.mlp.down_proj.weight.grad.clone(), model.model.embed_tokens.weight.grad.clone()))
    for got, want in zip(*results, strict=True):
        assert torch.isfinite(got).all()
        # float32 sums in another order: the embedding's gradient (up to ~30 here) differs by ~1e-5 at most
        torch.testing.assert_close(got, want, atol=1e-4 if got.dim() == 1 else 2e-5, rtol=1e-4)


def test_the_shared_batch_scores_only_answer_tokens_and_keeps_a_token_of_each_answer():
    # prompt [1, 2, 3], answers [4, 5] and [4, 6]: the cut stops at the prompt (k = 3), not after the shared 4
    batch = shared_prompt_batch([PairTokens([1, 2, 3, 4, 5], 3, [1, 2, 3, 4, 6], 3),
                                 PairTokens([7, 8, 9, 9], 2, [7, 8, 9, 9, 9, 9], 2)], pad_id=0, min_saving=None)
    assert batch["prefix_ids"].tolist() == [[1, 2, 3], [0, 7, 8]]  # left-padded
    assert batch["prefix_mask"].tolist() == [[1, 1, 1], [0, 1, 1]]
    assert batch["suffix_ids"].tolist() == [[4, 5, 0, 0], [4, 6, 0, 0], [9, 9, 0, 0], [9, 9, 9, 9]]
    assert batch["suffix_labels"].tolist() == [[4, 5, IGNORE, IGNORE], [4, 6, IGNORE, IGNORE],
                                               [9, 9, IGNORE, IGNORE], [9, 9, 9, 9]]
    assert batch["suffix_mask"].tolist() == [[1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1]]
    # answers that alone make up the whole text share only what precedes the later one's start
    whole = shared_prompt_batch([PairTokens([1, 2, 3], 1, [1, 2, 4], 2)], pad_id=0, min_saving=None)
    assert whole["prefix_ids"].tolist() == [[1]] and whole["suffix_labels"].tolist() == [[2, 3], [IGNORE, 4]]


def test_the_plain_forward_runs_when_sharing_does_not_pay():
    # 10 prompt + 10 answer tokens per text: 10 + 2·10 positions instead of 2·20, a 25% saving
    long_prompt = PairTokens(list(range(1, 21)), 10, list(range(1, 11)) + list(range(50, 60)), 10)
    assert "prefix_ids" in collate_pairs([long_prompt], pad_id=0, share=True)
    assert "prefix_ids" not in collate_pairs([long_prompt], pad_id=0, share=False)
    # 1 prompt + 9 answer tokens: 1 + 2·9 of 2·10 positions, 5% saved
    short_prompt = PairTokens(list(range(1, 11)), 1, [1] + list(range(50, 59)), 1)
    assert shared_prompt_batch([short_prompt], pad_id=0) is None
    assert collate_pairs([short_prompt], pad_id=0, share=True).keys() == {"input_ids", "attention_mask", "labels"}
    # no pair shares a token
    apart = PairTokens([1, 2, 3, 4], 2, [5, 6, 7, 8], 2)
    assert shared_prompt_batch([apart], pad_id=0, min_saving=None) is None
    # padding eats the saving: one pair's prompt is long, the other's answer
    mixed = [PairTokens(list(range(1, 41)) + [90], 40, list(range(1, 41)) + [91], 40),
             PairTokens([1] + list(range(100, 140)), 1, [1] + list(range(200, 240)), 1)]
    assert shared_prompt_batch(mixed, pad_id=0) is None


@pytest.mark.parametrize(("lora", "precompute_ref"), [(False, False), (True, False), (True, True)],
                         ids=["frozen-copy", "adapter-off", "precomputed"])
def test_training_with_and_without_sharing_gives_the_same_metrics(tiny_llama_dir, tmp_path, lora, precompute_ref):
    runs = {}
    for shared in (True, False):
        out = tmp_path / f"run-{shared}"
        result = train_dpo(DPOConfig(data=str(FIXTURES / "hh-harmless-6.jsonl"), policy=str(tiny_llama_dir),
                                     eval_data=str(FIXTURES / "hh-harmless-6.jsonl"), out=str(out), lora=lora,
                                     lora_r=4, max_steps=2, batch_size=3, max_length=48, max_prompt_length=24,
                                     learning_rate=1e-2, precompute_ref=precompute_ref, shared_prefix=shared))
        run = json.loads((out / "run.json").read_text())
        runs[shared] = (result.history, result.eval_metrics, run)
    (history, eval_metrics, run), (plain_history, plain_eval, plain_run) = runs[True], runs[False]
    assert run["shared_prefix"] is True and run["shared_prefix_batches"] == 2  # both steps' batches shared
    assert plain_run["shared_prefix"] is False and plain_run["shared_prefix_batches"] == 0
    assert history[1]["logps/chosen"] != history[0]["logps/chosen"]  # the policy moved
    for got, want in zip(history, plain_history, strict=True):
        for key in (*PAIR_METRICS, "grad_norm"):
            assert got[key] == pytest.approx(want[key], abs=1e-4), (got["step"], key)
    assert eval_metrics == pytest.approx(plain_eval, abs=1e-4)
