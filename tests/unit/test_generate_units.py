"""Pure logic of generate-data: ROUGE-L filter, judge parsing, position swap, binarization, retries, limits."""

from __future__ import annotations

import asyncio
import random
import time

import pytest

from toolkit.errors import UserError
from toolkit.generate import instructions, preferences
from toolkit.generate.rouge import Pool, lcs_length, rouge_l
from toolkit.generate.runner import RateLimiter, Unparsable, backoff_delay, classify, retry_after, row_id
from toolkit.generate.scores import parse_score
from toolkit.scorers import blacklist, format_ok, length, parse_rules, refusal, repetition, truncation

# ------------------------------------------------------------------------------------------- ROUGE-L


def test_lcs_and_rouge_l_values():
    assert lcs_length("a b c d".split(), "a c d e".split()) == 3
    # P = 3/4, R = 3/4 -> F = 0.75
    assert rouge_l("a b c d", "a c d e") == pytest.approx(0.75)
    assert rouge_l("Write a poem.", "write a POEM") == pytest.approx(1.0)  # case and punctuation ignored
    assert rouge_l("", "anything") == 0.0
    # P = 2/2, R = 2/4 -> F = 2 * 1 * 0.5 / 1.5
    assert rouge_l("the cat", "the big fat cat") == pytest.approx(2 / 3)


def test_rouge_filter_rejects_near_duplicates_and_grows_the_pool():
    state = instructions.SelfInstruct(["Write a short poem about the sea."], [], instructions.Filters(),
                                      instructions.Plan(num_instructions=5), seed=0)
    reason, score, similar = state.decide("Write a short poem about the ocean.")
    assert reason is not None and "ROUGE-L" in reason and score >= 0.7
    assert similar == "Write a short poem about the sea."
    assert state.decide("Explain how vaccines train the immune system.")[0] is None
    assert state.accepted == 1 and len(state.pool) == 2
    # the accepted instruction is now in the pool too
    assert "ROUGE-L" in state.decide("Explain how vaccines train the immune system!")[0]


@pytest.mark.parametrize("text, reason", [
    ("Sort these.", "too short"),
    (" ".join(["word"] * 151), "too long"),
    ("- List three fruits that are red.", "punctuation"),
    ("Draw a picture of a cat on a mat.", "blacklisted"),
    ("Describe the graph below in detail.", "blacklisted word 'graph'"),
    ("Go to the website and summarise it.", "blacklisted word 'go to'"),
])
def test_length_and_blacklist_filters(text, reason):
    assert reason in instructions.reject_reason(text, instructions.Filters())


def test_three_words_pass_and_prefixes_are_cleaned():
    assert instructions.reject_reason("Name three fruits", instructions.Filters()) is None
    assert instructions.clean_instruction("Task 9: Name three fruits.\nmore text") == "Name three fruits."
    assert instructions.clean_instruction('\n"Summarise the text."') == "Summarise the text."


def test_pool_most_similar():
    pool = Pool(["Name three red fruits.", "Explain photosynthesis."])
    score, text = pool.most_similar("Name three yellow fruits.")
    assert text == "Name three red fruits." and score == pytest.approx(0.75)


# ---------------------------------------------------------------------------------------- judging


def test_parse_rating_and_verdict():
    assert preferences.parse_rating("Good. Rating: [[7]]", 10) == 7
    assert preferences.parse_rating("first [[3]] then Rating: [[8]]", 10) == 8
    with pytest.raises(Unparsable):
        preferences.parse_rating("I like it", 10)
    with pytest.raises(Unparsable):
        preferences.parse_rating("Rating: [[11]]", 10)
    assert preferences.parse_verdict("A is clearer. [[A]]") == "A"
    with pytest.raises(Unparsable):
        preferences.parse_verdict("both fine")


@pytest.mark.parametrize("first, second, outcome", [
    ("A", "B", "x"),  # x won in both positions
    ("B", "A", "y"),  # y won in both positions
    ("A", "A", "tie"),  # the judge always picks position A: position bias, not preference
    ("B", "B", "tie"),
    ("C", "B", "tie"),
    ("A", "C", "tie"),
])
def test_pairwise_position_swap(first, second, outcome):
    assert preferences.swap_verdict(first, second) == outcome


def test_pairwise_scores_count_wins_and_half_ties():
    scores = preferences.pairwise_scores(3, {(0, 1): "x", (0, 2): "tie", (1, 2): "y"})
    assert scores == pytest.approx([0.75, 0.0, 0.75])


def test_binarize_min_margin_and_ties():
    assert preferences.binarize([0.2, 0.9, 0.5]) == (1, 0, pytest.approx(0.7))
    assert preferences.binarize([0.5, 0.5, 0.5]) is None  # tie: dropped
    assert preferences.binarize([0.5, 0.55], min_margin=0.1) is None  # below the margin: dropped
    assert preferences.binarize([0.5, 0.6], min_margin=0.1) == (1, 0, pytest.approx(0.1))  # exactly the margin
    assert preferences.binarize([0.7]) is None


def test_expected_rating_from_first_token_logprobs():
    import math

    alternatives = [(" 4", math.log(0.3)), ("4", math.log(0.1)), ("2", math.log(0.2)), ("The", math.log(0.3)),
                    ("7", math.log(0.05)), ("42", math.log(0.05))]
    rating, mass = preferences.expected_rating(alternatives, max_score=5)
    # "7" is out of range, "42" is not one digit, "The" is no rating: (4 * 0.4 + 2 * 0.2) / 0.6
    assert rating == pytest.approx(2.0 / 0.6) and mass == pytest.approx(0.6)
    with pytest.raises(Unparsable, match="no rating 0..5"):
        preferences.expected_rating([("The", -0.1), ("I", -2.0)], max_score=5)


def test_logprob_judge_needs_logprobs_and_a_one_digit_scale():
    from toolkit.teachers import Reply

    with pytest.raises(UserError, match="returned no logprobs"):
        preferences.read_logprob_rating(Reply(text="4", finish_reason="stop"), 5)
    for judging in (preferences.Judging(judge="hf:x", logprobs=True, pairwise=True),
                    preferences.Judging(judge="hf:x", logprobs=True, max_score=10)):
        with pytest.raises(UserError, match="--judge-logprobs"):
            preferences.run("unused.jsonl", "out.jsonl", teachers=["hf:x"], judging=judging)


def test_combine_judge_and_rules():
    assert preferences.combine(0.8, None, 1.0) == 0.8
    assert preferences.combine(None, 0.4, 1.0) == 0.4
    assert preferences.combine(0.8, 0.4, 1.0) == pytest.approx(0.6)
    assert preferences.combine(0.8, 0.2, 3.0) == pytest.approx(0.35)


@pytest.mark.parametrize("text, score", [("4", 4), ("Score: 3.", 3), ("2/5", 2), ("[[5]]", 5), ("0 out of 5", 0)])
def test_parse_score(text, score):
    assert parse_score(text) == score


@pytest.mark.parametrize("text", ["Good answer!", "3 or 4", "4.5", "7", ""])
def test_parse_score_unparsable(text):
    with pytest.raises(Unparsable):
        parse_score(text)


# ---------------------------------------------------------------------------------------- rule scorers


def test_rule_scorers():
    assert refusal("q", "I'm sorry, but I cannot help with that.", "stop") == 0.0
    assert refusal("q", "Paris is the capital of France.", "stop") == 1.0
    assert truncation("q", "Paris is", "length") == 0.0 and truncation("q", "Paris.", "stop") == 1.0
    assert repetition("q", "the cat sat the cat sat the cat sat", None) < 0.6
    assert repetition("q", "one two three four five", None) == 1.0
    assert blacklist("q", "Here is a diagram of it", None) == 0.0
    assert length("q", " ".join(["w"] * 60), None) == 1.0 and length("q", " ".join(["w"] * 30), None) == 0.5
    assert format_ok("q", "Done.", None) == 1.0 and format_ok("q", "User: hi", None) == 0.0


def test_rules_weighted_and_explained():
    scorer = parse_rules("rules:refusal=3,truncation")
    parts = scorer.explain("q", "I'm sorry, I can't.", "stop")
    assert parts == {"refusal": 0.0, "truncation": 1.0}
    assert scorer.score_one("q", "I'm sorry, I can't.", "stop") == pytest.approx(0.25)
    with pytest.raises(UserError):
        parse_rules("rules:nope")


# ---------------------------------------------------------------------------------- ids, retries, limits


def test_row_id_depends_on_every_part():
    base = dict(teacher="openai:m", template="abc", inputs="hi", sampling={"temperature": 0.7}, seed=0)
    same = row_id(**base)
    assert same == row_id(**dict(reversed(list(base.items()))))
    for key, value in (("teacher", "openai:n"), ("template", "abd"), ("inputs", "hi!"),
                       ("sampling", {"temperature": 0.8}), ("seed", 1)):
        assert row_id(**{**base, key: value}) != same
    assert len(same) == 64


def test_retry_after_headers():
    assert retry_after({"retry-after": "2"}) == 2.0
    assert retry_after({"retry-after-ms": "1500"}) == 1.5
    assert retry_after({}) is None
    date = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 30))
    assert 25 <= retry_after({"retry-after": date}) <= 31


def test_backoff_grows_with_jitter_and_honours_retry_after():
    rng = random.Random(0)
    delays = [backoff_delay(a, 1.0, 60.0, None, rng) for a in range(4)]
    for attempt, delay in enumerate(delays):
        assert 0.5 * 2 ** attempt <= delay <= 2 ** attempt
    assert backoff_delay(0, 1.0, 60.0, None, rng) <= 1.0
    assert 5.0 <= backoff_delay(0, 0.01, 0.02, 5.0, rng) <= 5.5  # the server's wish is a floor
    assert backoff_delay(9, 1.0, 4.0, None, rng) <= 4.0


def test_classify_errors():
    import httpx
    import openai

    request = httpx.Request("POST", "http://x/v1/chat/completions")

    def status(code, headers=None):
        return openai.APIStatusError("x", response=httpx.Response(code, headers=headers or {}, request=request),
                                     body=None)

    assert classify(status(429, {"retry-after": "3"})) == ("retry", 3.0)
    assert classify(status(503)) == ("retry", None)
    assert classify(status(400)) == ("fail", None)
    assert classify(status(401))[0] == "fatal"
    assert classify(openai.APITimeoutError(request=request))[0] == "retry"
    assert classify(asyncio.TimeoutError())[0] == "retry"
    assert classify(Unparsable("no score"))[0] == "retry"
    assert classify(KeyError("x"))[0] == "fail"
    assert classify(UserError("bad spec"))[0] == "fatal"


def test_rate_limiter_requests_per_minute():
    async def go():
        limiter = RateLimiter(rpm=600)  # 10/s, one second of burst
        start = time.monotonic()
        for _ in range(25):
            await limiter.acquire(0)
        return time.monotonic() - start

    elapsed = asyncio.run(go())
    assert 1.3 <= elapsed <= 3.0  # 10 from the full bucket, 15 more at 10/s


def test_rate_limiter_tokens_per_minute_and_pause():
    async def go():
        limiter = RateLimiter(tpm=6000)  # 100 tokens/s
        start = time.monotonic()
        for _ in range(4):
            await limiter.acquire(50)
        tokens_s = time.monotonic() - start
        limiter.pause(0.3)
        start = time.monotonic()
        await limiter.acquire(1)
        return tokens_s, time.monotonic() - start

    tokens_s, paused_s = asyncio.run(go())
    assert 0.8 <= tokens_s <= 2.0  # 200 tokens at 100/s with a 100-token bucket
    assert paused_s >= 0.29
