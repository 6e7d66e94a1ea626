"""toolkit/scorers.py: each rule on crafted answers, weighted means, explain, spec parsing."""

from __future__ import annotations

import pytest

from toolkit.errors import UserError
from toolkit.scorers import (
    RULES,
    RuleScorer,
    blacklist,
    format_ok,
    length,
    nonempty,
    parse_rules,
    refusal,
    repetition,
    truncation,
)

P = "Tell me about the moon."


def words(n: int) -> str:
    return " ".join(f"w{i}" for i in range(n))


# ---------------------------------------------------------------- rules, one by one


@pytest.mark.parametrize(("n", "expected"), [(60, 1.0), (30, 0.5), (120, 0.5), (15, 0.25), (240, 0.25), (0, 0.0)])
def test_length(n, expected):
    assert length(P, words(n), None) == pytest.approx(expected)


def test_length_target_and_whitespace():
    assert length(P, words(10), None, target_words=10) == 1.0
    assert length(P, "  \n\t ", None) == 0.0
    assert length(P, "one\ntwo\tthree", None, target_words=3) == 1.0


@pytest.mark.parametrize(("response", "expected"), [
    ("I'm sorry, but I cannot help with that.", 0.0),
    ("  AS AN AI language model, I do not have opinions.", 0.0),
    ("I apologize for the confusion.", 0.0),
    ("I won't do that.", 0.0),
    ("The moon is about 384,400 km from Earth.", 1.0),
    ("Sorry to hear that! Here is how to fix it.", 1.0),  # "sorry" alone is not a refusal
    (words(60) + " I'm sorry.", 1.0),  # only the opening (first 160 characters) counts
    ("", 1.0),
])
def test_refusal(response, expected):
    assert refusal(P, response, "stop") == expected


@pytest.mark.parametrize(("response", "expected"), [
    ("the cat sat on the mat today", 1.0),  # no repeated trigram
    ("a b c a b c a b c", 3 / 7),  # 7 trigrams, 3 distinct
    ("go go go go go", 1 / 3),  # 3 trigrams, all the same
    ("two words", 1.0),  # too short to repeat
    ("", 1.0),
    ("A B C a b c", 3 / 4),  # case-insensitive: "a b c" appears twice among 4 trigrams
])
def test_repetition(response, expected):
    assert repetition(P, response, None) == pytest.approx(expected)


def test_repetition_n():
    assert repetition(P, "a b a b a b", None, n=2) == pytest.approx(2 / 5)


@pytest.mark.parametrize(("finish", "expected"), [("length", 0.0), ("stop", 1.0), (None, 1.0), ("cancelled", 1.0)])
def test_truncation(finish, expected):
    assert truncation(P, "Some answer that was", finish) == expected


@pytest.mark.parametrize(("response", "expected"), [
    ("Here is an image of the moon.", 0.0),
    ("Please go to the website.", 0.0),
    ("I drew a DIAGRAM for you.", 0.0),
    ("Let me plot it.", 0.0),
    ("Imagine a mapping of files... no: imagine mapping.", 1.0),  # whole words only
    ("The moon orbits the Earth.", 1.0),
    ("Open the file.", 0.0),
])
def test_blacklist(response, expected):
    assert blacklist(P, response, None) == expected


def test_nonempty():
    assert nonempty(P, "x", None) == 1.0
    assert nonempty(P, " \n ", None) == 0.0


@pytest.mark.parametrize(("response", "expected"), [
    ("The moon is bright.", 1.0),
    ("Is it bright?", 1.0),
    ("Wow!", 1.0),
    ("```python\nprint(1)\n```", 1.0),
    ('He said "yes"', 1.0),
    ("The moon is", 0.5),  # unfinished sentence
    ("", 0.0),
    ("Sure.\nUser: and now?", 0.0),  # echoes a role marker
    ("assistant: The moon.", 0.0),
    ("Human : hi.", 0.0),
    ("The user: a person.", 1.0),  # "user:" in a sentence is not a turn marker
])
def test_format(response, expected):
    assert format_ok(P, response, None) == expected


def test_every_rule_maps_into_0_1():
    answers = ["", "I'm sorry.", words(200), "a a a a a a", "Here is an image", "Done.", "x " * 500]
    for name, rule in RULES.items():
        for answer in answers:
            for finish in (None, "stop", "length"):
                assert 0.0 <= rule(P, answer, finish) <= 1.0, (name, answer, finish)


# ---------------------------------------------------------------- weights and explain


def test_weighted_mean_and_explain():
    scorer = RuleScorer({"length": 1.0, "refusal": 3.0})
    answer = "I'm sorry, I cannot. " + words(26)  # 30 words: length 0.5, refusal 0
    assert scorer.explain(P, answer) == {"length": pytest.approx(0.5), "refusal": 0.0}
    assert scorer.score_one(P, answer) == pytest.approx((1 * 0.5 + 3 * 0.0) / 4)
    good = words(60)
    assert scorer.score_one(P, good) == pytest.approx(1.0)
    assert scorer.score([P, P], [answer, good]) == pytest.approx([0.125, 1.0])


def test_finish_reasons_reach_the_rules():
    scorer = parse_rules("rules:truncation,nonempty")
    assert scorer.score([P, P, P], ["cut off", "done.", ""], ["length", "stop", "stop"]) == [0.5, 1.0, 0.5]
    assert scorer.explain(P, "cut off", "length") == {"truncation": 0.0, "nonempty": 1.0}
    with pytest.raises(ValueError):
        scorer.score([P], ["a", "b"])


def test_a_better_answer_scores_higher_with_all_rules():
    scorer = parse_rules("rules")
    good = "The moon is Earth's only natural satellite, about 384,400 km away. " + words(45) + "."
    bad = "I'm sorry, as an AI I cannot draw a diagram.\nUser: " + "again " * 30
    assert scorer.score_one(P, good, "stop") > scorer.score_one(P, bad, "length")
    parts = scorer.explain(P, bad, "length")
    assert set(parts) == set(RULES)
    assert parts["refusal"] == parts["truncation"] == parts["blacklist"] == parts["format"] == 0.0


# ---------------------------------------------------------------- parsing specs


def test_parse_rules():
    scorer = parse_rules("rules:length,refusal=2, repetition=0.5")
    assert scorer.weights == {"length": 1.0, "refusal": 2.0, "repetition": 0.5}
    assert scorer.name == "rules:length=1,refusal=2,repetition=0.5"
    assert parse_rules(scorer.name).weights == scorer.weights  # the name round-trips


@pytest.mark.parametrize("spec", ["rules", "rules:", " rules "])
def test_bare_rules_means_all(spec):
    assert parse_rules(spec).weights == {name: 1.0 for name in RULES}


def test_zero_weight_is_allowed_if_another_counts():
    scorer = parse_rules("rules:length=0,refusal")
    assert scorer.score_one(P, "I'm sorry.") == 0.0


@pytest.mark.parametrize(("spec", "message"), [
    ("rules:lenght", "unknown rule 'lenght'"),
    ("rules:length,,refusal", "unknown rule ''"),
    ("rules:length=abc", "'abc' in 'rules:length=abc' is not a number"),
    ("rules:length=0", "add up to more than 0"),
    ("rules:length=-1,refusal=3", "finite number >= 0"),
    ("rules:length=nan", "finite number >= 0"),
    ("rules:length=inf", "finite number >= 0"),
    ("rulez:length", "rules:NAME"),
    ("rules-length", "rules:NAME"),
    ("length,refusal", "rules:NAME"),
])
def test_parse_errors(spec, message):
    with pytest.raises(UserError) as err:
        parse_rules(spec)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_unknown_rule_lists_the_known_ones():
    with pytest.raises(UserError) as err:
        parse_rules("rules:bogus")
    for name in RULES:
        assert name in str(err.value)
