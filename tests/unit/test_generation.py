"""toolkit/generation.py: batched sampling with the KV cache, left padding and per-row settings.

Two tiny random LLaMAs with the real SmolLM2 tokenizer: the shared `tiny_llama` fixture (its small
initialisation makes it repeat its last token), and a "lively" one initialised with larger weights so
greedy text depends on position and context — a padding or cache bug changes its output.
"""

from __future__ import annotations

import pytest
import torch

from toolkit.generation import Completion, SamplingParams, _filter_logits, _sample, generate

TEXTS = ("Hello there, how are you today?", "Hi", "The quick brown fox jumps over the lazy dog, again and again.")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def lively(tiny_llama):
    from support.tiny_models import tiny_llama_config
    from transformers import LlamaForCausalLM

    _, tokenizer = tiny_llama
    torch.manual_seed(1)
    config = tiny_llama_config(len(tokenizer), initializer_range=0.2, bos_token_id=tokenizer.bos_token_id,
                               eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return LlamaForCausalLM(config).eval(), tokenizer


@pytest.fixture(scope="module")
def prompts(tiny_llama):
    _, tokenizer = tiny_llama
    ids = [tokenizer(t).input_ids for t in TEXTS]
    assert len({len(p) for p in ids}) == len(ids)  # all lengths differ: left padding is exercised
    return ids


def one_by_one(model, tokenizer, prompts, params) -> list[Completion]:
    return [generate(model, tokenizer, [p], [s])[0] for p, s in zip(prompts, params, strict=True)]


@torch.no_grad()
def reference_logprobs(model, prompt: list[int], completion: list[int], temperature: float) -> torch.Tensor:
    """log-softmax(logits / T) of one fresh, unpadded, uncached forward pass, at the given tokens."""
    ids = torch.tensor([prompt + completion])
    logits = model(ids).logits[0, len(prompt) - 1:-1].float() / temperature
    return torch.log_softmax(logits, dim=-1).gather(-1, torch.tensor(completion)[:, None])[:, 0]


# ---------------------------------------------------------------- greedy


def test_greedy_batch_equals_one_at_a_time(lively, prompts):
    model, tokenizer = lively
    # Different budgets: rows leave the batch (and the KV cache) at different steps.
    params = [SamplingParams(max_new_tokens=n, temperature=0) for n in (12, 5, 9)]
    batched = generate(model, tokenizer, prompts, params)
    single = one_by_one(model, tokenizer, prompts, params)
    for b, s, p in zip(batched, single, params, strict=True):
        assert b.token_ids == s.token_ids
        assert b.text == s.text
        assert len(b.token_ids) == p.max_new_tokens
        assert b.finish_reason == "length"
    assert len({tuple(c.token_ids) for c in batched}) == 3
    assert any(len(set(c.token_ids)) > 1 for c in batched)  # the model is not just repeating one token


def test_greedy_matches_a_fresh_forward_argmax(lively, prompts):
    """Greedy tokens are the argmax of an uncached forward pass over prompt + completion so far."""
    model, tokenizer = lively
    out = generate(model, tokenizer, prompts, [SamplingParams(max_new_tokens=6, temperature=0)] * 3)
    with torch.no_grad():
        for prompt, c in zip(prompts, out, strict=True):
            logits = model(torch.tensor([prompt + c.token_ids])).logits[0, len(prompt) - 1:-1]
            assert logits.argmax(-1).tolist() == c.token_ids


def test_fields_of_a_completion(tiny_llama, prompts):
    model, tokenizer = tiny_llama
    out = generate(model, tokenizer, prompts, [SamplingParams(max_new_tokens=4, temperature=0)] * 3)
    for prompt, c in zip(prompts, out, strict=True):
        assert c.prompt_tokens == len(prompt)
        assert c.completion_tokens == 4 == len(c.logprobs)
        assert c.finish_reason == "length"
        assert c.text == tokenizer.decode(c.token_ids, skip_special_tokens=True)
        assert all(lp <= 0 for lp in c.logprobs)


# ---------------------------------------------------------------- log-probs


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_equal_a_fresh_forward_at_temperature(lively, prompts, temperature):
    model, tokenizer = lively
    params = [SamplingParams(max_new_tokens=n, temperature=temperature, seed=s)
              for n, s in zip((10, 16, 6), (1, 2, 3), strict=True)]
    out = generate(model, tokenizer, prompts, params)
    for prompt, c in zip(prompts, out, strict=True):
        assert c.completion_tokens == len(c.logprobs) > 0
        expected = reference_logprobs(model, prompt, c.token_ids, temperature)
        assert torch.allclose(torch.tensor(c.logprobs), expected, atol=1e-4), (c.logprobs, expected.tolist())


def test_temperature_changes_the_logprobs(lively, prompts):
    """The log-probs are of the scaled distribution: at T=0.7 they differ from T=1 for the same tokens."""
    model, tokenizer = lively
    c = generate(model, tokenizer, prompts[:1], [SamplingParams(max_new_tokens=6, temperature=0.7, seed=5)])[0]
    at_1 = reference_logprobs(model, prompts[0], c.token_ids, 1.0)
    assert not torch.allclose(torch.tensor(c.logprobs), at_1, atol=1e-3)


def test_greedy_logprobs_are_of_the_unscaled_distribution(lively, prompts):
    model, tokenizer = lively
    out = generate(model, tokenizer, prompts, [SamplingParams(max_new_tokens=5, temperature=0)] * 3)
    for prompt, c in zip(prompts, out, strict=True):
        expected = reference_logprobs(model, prompt, c.token_ids, 1.0)
        assert torch.allclose(torch.tensor(c.logprobs), expected, atol=1e-4)


def test_top_k_restricts_the_sampled_tokens(lively, prompts):
    model, tokenizer = lively
    params = [SamplingParams(max_new_tokens=12, temperature=1.0, top_k=3, seed=s) for s in range(3)]
    out = generate(model, tokenizer, prompts, params)
    with torch.no_grad():
        for prompt, c in zip(prompts, out, strict=True):
            logits = model(torch.tensor([prompt + c.token_ids])).logits[0, len(prompt) - 1:-1]
            top3 = logits.topk(3, dim=-1).indices
            assert all(t in row.tolist() for t, row in zip(c.token_ids, top3, strict=True))
            # Log-probs come from the renormalised top-3 distribution that was sampled from.
            expected = torch.log_softmax(logits.gather(-1, top3), -1)
            picked = torch.stack([expected[i, top3[i].tolist().index(t)] for i, t in enumerate(c.token_ids)])
            assert torch.allclose(torch.tensor(c.logprobs), picked, atol=1e-4)


# ---------------------------------------------------------------- seeds


def test_a_seed_gives_the_same_text_whatever_the_batch(lively, prompts):
    model, tokenizer = lively
    mine = SamplingParams(max_new_tokens=16, temperature=1.0, seed=1234)
    alone = generate(model, tokenizer, [prompts[1]], [mine])[0]
    others = [SamplingParams(max_new_tokens=5, temperature=0.9),  # unseeded, leaves early
              SamplingParams(max_new_tokens=20, temperature=0.5, seed=7, top_p=0.8)]
    in_batch = generate(model, tokenizer, [prompts[0], prompts[1], prompts[2]], [others[0], mine, others[1]])[1]
    last = generate(model, tokenizer, [prompts[2], prompts[0], prompts[1]],
                    [SamplingParams(max_new_tokens=3, temperature=0), others[0], mine])[2]
    assert alone.token_ids == in_batch.token_ids == last.token_ids
    assert alone.text == in_batch.text


def test_rows_that_share_a_prompt_prefill_it_once_and_sample_as_if_alone(lively, prompts):
    """n answers to one prompt (GRPO's group, an n > 1 request): the prompt runs once through the model, and
    every row samples what it samples alone with its seed (the copied cache, logits and mask are its own)."""
    model, tokenizer = lively
    batch = [prompts[2], prompts[0], prompts[2], prompts[2], prompts[0]]
    params = [SamplingParams(max_new_tokens=n, temperature=0.9, seed=s) for n, s in
              zip((10, 7, 12, 3, 9), range(5), strict=True)]
    widths, graphs = [], []

    def record(_, __, kwargs):
        widths.append(kwargs["input_ids"].shape)
        graphs.append(torch.is_grad_enabled())

    hook = model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        shared = generate(model, tokenizer, batch, params)
    finally:
        hook.remove()
    assert widths[0] == (2, len(prompts[2]))  # the two distinct prompts, once each
    assert widths[1] == (5, 1)  # then every row decodes on its copy of the cache
    assert not any(graphs)  # sampling builds no autograd graph
    for got, alone in zip(shared, one_by_one(model, tokenizer, batch, params), strict=True):
        assert got.token_ids == alone.token_ids
        assert got.logprobs == pytest.approx(alone.logprobs, abs=1e-5)
    assert len({tuple(c.token_ids) for c in shared}) == 5


def test_different_seeds_differ_and_unseeded_rows_vary(lively, prompts):
    model, tokenizer = lively
    texts = {generate(model, tokenizer, [prompts[0]], [SamplingParams(max_new_tokens=8, seed=s)])[0].text
             for s in range(4)}
    assert len(texts) == 4
    unseeded = {generate(model, tokenizer, [prompts[0]], [SamplingParams(max_new_tokens=8)])[0].text
                for _ in range(3)}
    assert len(unseeded) > 1


# ---------------------------------------------------------------- finish reasons, stop strings, EOS


def test_finish_reason_length(tiny_llama, prompts):
    model, tokenizer = tiny_llama
    out = generate(model, tokenizer, prompts, [SamplingParams(max_new_tokens=n, temperature=0) for n in (1, 3, 7)])
    assert [c.completion_tokens for c in out] == [1, 3, 7]
    assert {c.finish_reason for c in out} == {"length"}


def test_stop_string_ends_the_text_before_it(lively, prompts):
    model, tokenizer = lively
    full = generate(model, tokenizer, [prompts[2]], [SamplingParams(max_new_tokens=16, temperature=0)])[0]
    stop = full.text[len(full.text) // 2:len(full.text) // 2 + 3]
    assert stop.strip()
    expected = full.text[:full.text.find(stop)]
    params = [SamplingParams(max_new_tokens=16, temperature=0, stop=("never-produced", stop)),
              SamplingParams(max_new_tokens=16, temperature=0)]
    stopped, other = generate(model, tokenizer, [prompts[2], prompts[0]], params)
    assert stopped.finish_reason == "stop"
    assert stopped.text == expected
    assert stop not in stopped.text
    assert stopped.completion_tokens < full.completion_tokens
    assert full.token_ids[:stopped.completion_tokens] == stopped.token_ids
    # The other row ran on to its budget, unchanged.
    assert other.finish_reason == "length"
    assert other.token_ids == generate(model, tokenizer, [prompts[0]], [params[1]])[0].token_ids


def test_eos_token_stops_a_row(lively, prompts, monkeypatch):
    """A row ends with finish_reason "stop" on the first EOS id (here: a token greedy decoding reaches)."""
    model, tokenizer = lively
    full = generate(model, tokenizer, [prompts[0]], [SamplingParams(max_new_tokens=12, temperature=0)])[0]
    eos = full.token_ids[4]
    first = full.token_ids.index(eos)
    monkeypatch.setattr(model.generation_config, "eos_token_id", [tokenizer.eos_token_id, eos])
    out = generate(model, tokenizer, [prompts[0], prompts[1]], [SamplingParams(max_new_tokens=12, temperature=0)] * 2)
    assert out[0].finish_reason == "stop"
    assert out[0].token_ids == full.token_ids[:first + 1]  # the EOS token is part of the completion
    assert len(out[0].logprobs) == first + 1


# ---------------------------------------------------------------- streaming, budgets, cancellation


@pytest.mark.parametrize("stop", [(), (" the", "e")])
def test_streamed_pieces_concatenate_to_the_text(lively, prompts, stop):
    model, tokenizer = lively
    pieces: dict[int, list[str]] = {i: [] for i in range(6)}
    params = [SamplingParams(max_new_tokens=24, temperature=1.0, seed=s, stop=stop) for s in range(6)]
    out = generate(model, tokenizer, [*prompts, *prompts], params, on_text=lambda row, text: pieces[row].append(text))
    for i, c in enumerate(out):
        assert "".join(pieces[i]) == c.text, (pieces[i], c.text)
        assert all(pieces[i])  # no empty pieces
        if stop:
            assert not any(s in c.text for s in stop)


def test_zero_token_budget(lively, prompts):
    model, tokenizer = lively
    params = [SamplingParams(max_new_tokens=0), SamplingParams(max_new_tokens=5, temperature=0),
              SamplingParams(max_new_tokens=0, stop=("x",))]
    calls = []
    out = generate(model, tokenizer, prompts, params, on_text=lambda row, text: calls.append(row))
    for i in (0, 2):
        assert out[i].token_ids == [] and out[i].logprobs == [] and out[i].text == ""
        assert out[i].finish_reason == "length"
        assert out[i].prompt_tokens == len(prompts[i])
    assert set(calls) <= {1}
    assert out[1].token_ids == generate(model, tokenizer, [prompts[1]], [params[1]])[0].token_ids
    only_zero = generate(model, tokenizer, prompts[:2], [SamplingParams(max_new_tokens=0)] * 2)
    assert [c.token_ids for c in only_zero] == [[], []]


def test_cancelled_row_stops_and_the_others_go_on(lively, prompts):
    model, tokenizer = lively
    params = [SamplingParams(max_new_tokens=10, temperature=0)] * 3
    out = generate(model, tokenizer, prompts, params, is_cancelled=lambda row: row == 1)
    assert out[1].finish_reason == "cancelled"
    assert out[1].completion_tokens < 10
    single = one_by_one(model, tokenizer, prompts, params)
    assert out[0].token_ids == single[0].token_ids and out[2].token_ids == single[2].token_ids


def test_one_params_per_prompt(tiny_llama, prompts):
    model, tokenizer = tiny_llama
    with pytest.raises(ValueError, match="one SamplingParams per prompt"):
        generate(model, tokenizer, prompts, [SamplingParams()])


# ---------------------------------------------------------------- _filter_logits by hand


def _kept(filtered: torch.Tensor) -> list[list[int]]:
    return [sorted(torch.nonzero(row > float("-inf")).flatten().tolist()) for row in filtered]


def test_filter_logits_top_k_and_top_p():
    # Probabilities 0.5, 0.3, 0.1, 0.06, 0.04, shuffled so the sort and scatter back are exercised.
    probs = torch.tensor([0.06, 0.5, 0.04, 0.3, 0.1])
    logits = probs.log().repeat(7, 1)
    top_k = torch.tensor([0, 2, 0, 0, 0, 3, 1])
    top_p = torch.tensor([1.0, 1.0, 0.7, 0.5, 0.95, 0.85, 1.0])
    out = _filter_logits(logits, top_p, top_k)
    assert _kept(out) == [
        [0, 1, 2, 3, 4],  # no filter
        [1, 3],  # top-k 2
        [1, 3],  # top-p 0.7: 0.5 < 0.7, then 0.5 + 0.3 >= 0.7 is enough
        [1],  # top-p 0.5: the first token alone reaches it
        [0, 1, 3, 4],  # top-p 0.95: 0.5 + 0.3 + 0.1 + 0.06 = 0.96
        [1, 3],  # top-k 3 renormalised: 0.556, 0.333, 0.111 -> 0.889 >= 0.85 after two
        [1],  # top-k 1
    ]
    kept = out > float("-inf")
    assert torch.equal(out[kept], logits[kept])  # kept logits are unchanged
    assert torch.equal(out[0], logits[0])


def test_filter_logits_keeps_the_best_token_even_for_tiny_top_p():
    logits = torch.tensor([[0.0, 3.0, 1.0]])
    out = _filter_logits(logits, torch.tensor([1e-9]), torch.tensor([0]))
    assert _kept(out) == [[1]]


def test_sample_draws_from_the_distribution():
    probs = torch.tensor([0.1, 0.0, 0.6, 0.3, 0.0]).repeat(20000, 1)
    draws = _sample(probs, torch.Generator().manual_seed(1))
    freq = torch.bincount(draws, minlength=5) / len(draws)
    assert freq[1] == 0 and freq[4] == 0  # probability 0 (e.g. filtered out) is never drawn
    assert torch.allclose(freq, probs[0], atol=0.015)
    again = _sample(probs[:50], torch.Generator().manual_seed(1))
    assert torch.equal(again, draws[:50])  # a generator's seed fixes the draws


def test_sample_never_picks_a_filtered_token_at_the_edges():
    # Only the first and the last token have mass; u = 0 or 1 must not land on the zeros between.
    probs = torch.zeros(4000, 1000)
    probs[:, 0], probs[:, -1] = 0.5, 0.5
    draws = _sample(probs, torch.Generator().manual_seed(2))
    assert set(draws.tolist()) == {0, 999}


# ---------------------------------------------------------------- penalties, logit bias, min-p (issue 18)

@torch.no_grad()
def replay_greedy(model, prompt: list[int], completion: list[int], adjust) -> None:
    """Each greedy token must be the argmax of `adjust(fresh logits, tokens so far)` from an unpadded forward."""
    ids = torch.tensor([prompt + completion])
    logits = model(ids).logits[0, len(prompt) - 1:-1].float()
    for t, token in enumerate(completion):
        expected = adjust(logits[t].clone(), completion[:t])
        assert token == int(expected.argmax()), t


def test_openai_presence_and_frequency_penalties(tiny_llama, prompts):
    model, tokenizer = tiny_llama  # repeats its last token: the penalties have something to change
    params = SamplingParams(max_new_tokens=12, temperature=0, presence_penalty=0.7, frequency_penalty=1.3)
    plain = generate(model, tokenizer, prompts[:1], [SamplingParams(max_new_tokens=12, temperature=0)])[0]
    done = generate(model, tokenizer, prompts[:1], [params])[0]
    assert done.token_ids != plain.token_ids

    def adjust(logits, so_far):
        counts = torch.bincount(torch.tensor(so_far, dtype=torch.long), minlength=logits.shape[-1]).float()
        return logits - 1.3 * counts - 0.7 * (counts > 0).float()

    replay_greedy(model, prompts[0], done.token_ids, adjust)


def test_repetition_penalty_covers_prompt_and_output(tiny_llama, prompts):
    model, tokenizer = tiny_llama
    plain = generate(model, tokenizer, prompts[2:], [SamplingParams(max_new_tokens=12, temperature=0)])[0]
    done = generate(model, tokenizer, prompts[2:], [SamplingParams(max_new_tokens=12, temperature=0,
                                                                   repetition_penalty=1.8)])[0]
    assert done.token_ids != plain.token_ids

    def adjust(logits, so_far):
        seen = torch.tensor(sorted(set(prompts[2]) | set(so_far)))
        logits[seen] = torch.where(logits[seen] > 0, logits[seen] / 1.8, logits[seen] * 1.8)
        return logits

    replay_greedy(model, prompts[2], done.token_ids, adjust)


def test_logit_bias_forces_and_bans_tokens(lively, prompts):
    model, tokenizer = lively
    plain = generate(model, tokenizer, prompts[:1], [SamplingParams(max_new_tokens=6, temperature=0)])[0]
    forced = generate(model, tokenizer, prompts[:1], [SamplingParams(max_new_tokens=6, temperature=1.0, seed=0,
                                                                     logit_bias=((42, 100.0),))])[0]
    assert forced.token_ids == [42] * 6
    banned = generate(model, tokenizer, prompts[:1], [SamplingParams(
        max_new_tokens=6, temperature=0, logit_bias=tuple((t, -100.0) for t in set(plain.token_ids)))])[0]
    assert not set(banned.token_ids) & set(plain.token_ids)


def test_min_p_one_keeps_only_the_likeliest_token(lively, prompts):
    model, tokenizer = lively
    greedy = generate(model, tokenizer, prompts, [SamplingParams(max_new_tokens=8, temperature=0)] * 3)
    hot = generate(model, tokenizer, prompts, [SamplingParams(max_new_tokens=8, temperature=1.5, seed=s, min_p=1.0)
                                               for s in range(3)])
    assert [c.token_ids for c in hot] == [c.token_ids for c in greedy]
    loose = generate(model, tokenizer, prompts, [SamplingParams(max_new_tokens=8, temperature=1.5, seed=s)
                                                 for s in range(3)])
    assert [c.token_ids for c in loose] != [c.token_ids for c in greedy]


def test_each_row_of_a_batch_gets_its_own_adjustments(lively, prompts):
    """One request's penalty or bias never reaches another row of the same batch; plain rows stay bit-identical."""
    model, tokenizer = lively
    rows = [SamplingParams(max_new_tokens=8, temperature=0),
            SamplingParams(max_new_tokens=8, temperature=0, frequency_penalty=-2.0, presence_penalty=-2.0),
            SamplingParams(max_new_tokens=8, temperature=0.9, seed=5, logit_bias=((1000, 100.0),)),
            SamplingParams(max_new_tokens=8, temperature=0.9, seed=6),
            SamplingParams(max_new_tokens=8, temperature=0.9, seed=7, repetition_penalty=3.0, min_p=0.2)]
    batch_prompts = [prompts[i % 3] for i in range(len(rows))]
    batched = generate(model, tokenizer, batch_prompts, rows)
    alone = one_by_one(model, tokenizer, batch_prompts, rows)
    assert [c.token_ids for c in batched] == [c.token_ids for c in alone]
    assert batched[2].token_ids == [1000] * 8
    # the plain rows: the very same tokens and log-probs as in that batch without any adjustment
    stripped = [SamplingParams(max_new_tokens=8, temperature=r.temperature, seed=r.seed) for r in rows]
    plain = generate(model, tokenizer, batch_prompts, stripped)
    for i in (0, 3):
        assert batched[i].token_ids == plain[i].token_ids and batched[i].logprobs == plain[i].logprobs
    assert [batched[i].token_ids != plain[i].token_ids for i in (1, 2, 4)] == [True] * 3


@pytest.mark.parametrize("field, value", [("presence_penalty", 2.5), ("frequency_penalty", -3),
                                          ("frequency_penalty", float("nan")), ("repetition_penalty", 0),
                                          ("repetition_penalty", float("inf")), ("min_p", 1.5),
                                          ("logit_bias", ((5, 101.0),)), ("logit_bias", ((-1, 1.0),))])
def test_out_of_range_adjustments_are_refused(tiny_llama, prompts, field, value):
    model, tokenizer = tiny_llama
    with pytest.raises(ValueError, match=field):
        generate(model, tokenizer, prompts[:1], [SamplingParams(max_new_tokens=2, **{field: value})])


def test_prompt_logprobs_equal_a_fresh_forward(lively, prompts):
    """Legacy `echo` + `logprobs`: every prompt token after the first, scored given the tokens before it, in a
    padded batch, with or without tokens to generate; rows that did not ask get none."""
    model, tokenizer = lively
    params = [SamplingParams(max_new_tokens=0, prompt_logprobs=3), SamplingParams(max_new_tokens=2),
              SamplingParams(max_new_tokens=3, temperature=0, prompt_logprobs=0)]
    done = generate(model, tokenizer, prompts, params)
    assert done[1].prompt_top_logprobs == []
    for prompt, completion, k in ((prompts[0], done[0], 3), (prompts[2], done[2], 0)):
        with torch.no_grad():
            expected = torch.log_softmax(model(torch.tensor([prompt])).logits[0, :-1].float(), -1)
        steps = completion.prompt_top_logprobs
        assert [s[0][0] for s in steps] == prompt[1:]
        assert [s[0][1] for s in steps] == pytest.approx(expected.gather(-1, torch.tensor(prompt[1:])[:, None])[:, 0]
                                                         .tolist(), abs=1e-4)
        assert all(len(s) == k + 1 for s in steps)
        if k:
            top = torch.topk(expected, k, dim=-1)
            assert [[t for t, _ in s[1:]] for s in steps] == top.indices.tolist()
    assert done[2].token_ids == generate(model, tokenizer, prompts[2:], [SamplingParams(max_new_tokens=3,
                                                                                        temperature=0)])[0].token_ids
