"""`rlhf --guide revise` (rlhf/guide.py): a group's revised best answer in place of its worst, by hand.

The truths checked: where code can meet more of a row's constraints and the reward scores the edit higher, the
group's lowest-scoring answer (never its best) becomes the edit, laid out as the sampler lays a finished answer
(its tokens, then EOS; masks and the prompt columns as before); a group without constraints, or whose best
answer code cannot improve, is left exactly as it was.
"""

from __future__ import annotations

import torch

from rlhf.guide import replace_responses, revise_groups
from rlhf.rollout import Rollout, TokenizedPrompt
from toolkit.generation import left_pad
from toolkit.models import load_tokenizer
from toolkit.scorers import parse_rules

LOWERCASE = [{"kind": "lowercase", "args": {}}]
KEYWORDS = [{"kind": "keywords", "args": {"keywords": ["zebra"]}}]


def _rollout(tokenizer, prompts: list[TokenizedPrompt], answers: list[str], eos: int) -> Rollout:
    queries, query_mask = left_pad([p.ids for p in prompts], tokenizer.pad_token_id)
    tokens = [tokenizer(a, add_special_tokens=False).input_ids + [eos] for a in answers]
    width = max(len(t) for t in tokens)
    responses = torch.full((len(answers), width), tokenizer.pad_token_id)
    mask = torch.zeros((len(answers), width), dtype=torch.long)
    for i, t in enumerate(tokens):
        responses[i, :len(t)], mask[i, :len(t)] = torch.tensor(t), 1
    return Rollout(query_responses=torch.cat([queries, responses], 1), attention_mask=torch.cat([query_mask, mask], 1),
                   context_length=queries.shape[1], responses=responses, response_mask=mask,
                   contain_eos=torch.ones(len(answers), dtype=torch.bool),
                   sample_logprobs=-torch.rand(responses.shape) * mask, responses_text=answers,
                   finish_reasons=["stop"] * len(answers))


def test_the_revised_best_answer_replaces_the_worst_of_its_group_and_nothing_else():
    tokenizer = load_tokenizer("smollm2-135m")
    eos = tokenizer.eos_token_id
    rows = [("Describe the sea.", LOWERCASE), ("Name an animal.", KEYWORDS), ("Say hello.", [])]
    prompts = []
    for k, (text, constraints) in enumerate(rows):
        context = {"prompt": text, **({"constraints": constraints} if constraints else {})}
        ids = tokenizer(text, add_special_tokens=False).input_ids
        prompts += [TokenizedPrompt(text, ids, k + 1, context)] * 3
    answers = ["The Sea is Blue.", "the sea is WIDE and deep, it is", "Waves!",  # lowercase: none meets it
               "A cat.", "A Dog.", "Horse",  # keywords: code cannot add one
               "Hello.", "HI", "Hey there"]  # no constraints
    rollout = _rollout(tokenizer, prompts, answers, eos)
    reward = parse_rules("rules:constraints").score
    scores = torch.tensor(reward([p.text for p in prompts[:6]], answers[:6], ["stop"] * 6,
                                 contexts=[p.context for p in prompts[:6]]) + [0.5, 0.2, 0.1])  # the last: by hand
    scores[1] = -1.0  # the group's worst: it, not the last row, is replaced
    guided_rollout, new_scores, guided = revise_groups(prompts, rollout, scores, 3, reward, tokenizer, eos, 32)

    assert guided.tolist() == [False, True] + [False] * 7
    assert guided_rollout.responses_text[1] == "the sea is blue."  # row 0, the best (first among equals), lowered
    assert guided_rollout.finish_reasons[1] == "stop" and bool(guided_rollout.contain_eos[1])
    assert new_scores[1] == 1.0 and torch.equal(new_scores[[0, *range(2, 9)]], scores[[0, *range(2, 9)]])
    expected = tokenizer("the sea is blue.", add_special_tokens=False).input_ids + [eos]
    n = len(expected)
    assert guided_rollout.responses[1, :n].tolist() == expected
    assert guided_rollout.response_mask[1].tolist() == [1] * n + [0] * (guided_rollout.responses.shape[1] - n)
    assert float(guided_rollout.sample_logprobs[1].abs().sum()) == 0.0
    ctx = rollout.context_length
    assert torch.equal(guided_rollout.query_responses[:, :ctx], rollout.query_responses[:, :ctx])
    assert torch.equal(guided_rollout.query_responses[:, ctx:], guided_rollout.responses)
    assert torch.equal(guided_rollout.attention_mask[:, ctx:], guided_rollout.response_mask)
    width = rollout.responses.shape[1]
    for i in [0, *range(2, 9)]:  # every other row exactly as sampled
        assert guided_rollout.responses_text[i] == answers[i]
        assert torch.equal(guided_rollout.responses[i, :width], rollout.responses[i])
        assert torch.equal(guided_rollout.sample_logprobs[i, :width], rollout.sample_logprobs[i])


def test_an_edit_that_does_not_fit_the_budget_or_no_group_to_guide_leaves_the_rollout_alone():
    tokenizer = load_tokenizer("smollm2-135m")
    eos = tokenizer.eos_token_id
    ids = tokenizer("Describe the sea.", add_special_tokens=False).input_ids
    prompts = [TokenizedPrompt("Describe the sea.", ids, 1, {"constraints": LOWERCASE})] * 2
    answers = ["The Sea is Blue and Wide and Deep.", "Waves!"]
    rollout = _rollout(tokenizer, prompts, answers, eos)
    reward = parse_rules("rules:constraints").score
    scores = torch.zeros(2)
    same, same_scores, guided = revise_groups(prompts, rollout, scores, 2, reward, tokenizer, eos, 4)
    assert same is rollout and torch.equal(same_scores, scores) and not guided.any()
    assert replace_responses(rollout, {}, tokenizer.pad_token_id) is rollout
