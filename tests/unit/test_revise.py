"""Revising an answer by code to meet its constraints (toolkit/revise.py), and `generate-data preferences
--revise`, which makes the revised answer the chosen side of a pair against the answer as written;
--contrast, which adds the chosen answer against itself in a format its prompt did not ask for."""

from __future__ import annotations

import json
import random

import pytest
from support.cli import cli

from toolkit import constraints as C
from toolkit.revise import CONTRAST_FORMATS, bulletize, contrast, cut_to_words, drop_unfinished, improve, revise

ANSWER = "The sun is a star. It is very hot, and it is far away."


def one(kind: str, **args) -> list[dict]:
    return [{"kind": kind, "args": args}]


@pytest.mark.parametrize(("constraints", "expected"), [
    (one("lowercase"), "the sun is a star. it is very hot, and it is far away."),
    (one("no_commas"), "The sun is a star. It is very hot and it is far away."),
    (one("forbidden_word", word="very"), "The sun is a star. It is hot, and it is far away."),
    (one("quotes"), f'"{ANSWER}"'),
    (one("json"), json.dumps({"answer": ANSWER})),
    (one("end_phrase", phrase="That is all."), ANSWER + "\n\nThat is all."),
    (one("postscript", marker="P.S."), ANSWER + "\n\nP.S. I hope this helps."),
    (one("start_word", word="Sure"), "Sure, the sun is a star. It is very hot, and it is far away."),
    (one("title"), "<<Stars Shine>>\n\n" + ANSWER),
    (one("word_limit", relation="at_most", num_words=6), "The sun is a star."),
    (one("bullets", num_bullets=2), "* The sun is a star.\n* It is very hot, and it is far away."),
])
def test_each_family_gets_the_smallest_edit_and_then_passes(constraints, expected):
    edited = revise(ANSWER, constraints, instruction="Why do stars shine?")
    assert edited == expected
    assert C.fraction(edited, constraints) == 1.0
    assert C.fraction(ANSWER, constraints) == 0.0 or constraints[0]["kind"] == "forbidden_word"


def test_constraints_drawn_together_are_met_together():
    rng_rows = [C.draw(f"Explain topic number {i} to a child.", C.rng_for(0, str(i)), 3) for i in range(200)]
    answer = ("Plants make food from light. They need water, air and sun. Leaves do most of the work. "
              "Roots take up water. Stems hold them up.")
    met = checked = 0
    for i, drawn in enumerate(rng_rows):
        constraints = [c for c, _ in drawn]
        edited = revise(answer, constraints, f"Explain topic number {i} to a child.")
        # Everything but keywords and a word minimum (new content) is within code's reach, and so are
        # bullets unless a word maximum leaves too few sentences to make them from.
        kinds = {c["kind"]: c["args"] for c in constraints}
        short = kinds.get("word_limit", {}).get("relation") == "at_most"
        reachable = [c for c in constraints if c["kind"] != "keywords" and not (c["kind"] == "bullets" and short)
                     and not (c["kind"] == "word_limit" and c["args"]["relation"] == "at_least")]
        if reachable:
            assert C.fraction(edited, reachable) == 1.0, (constraints, edited)
            checked += 1
        met += C.fraction(edited, constraints) == 1.0
    assert checked > 150 and met > 100, (checked, met)


def test_only_the_missed_constraints_are_edited_for():
    answer = "Here you go.\nP.S. Enjoy it."
    assert revise(answer, one("postscript", marker="P.S.")) == answer
    constraints = one("postscript", marker="P.S.") + one("quotes")
    assert revise(answer, constraints) == f'"{answer}"'


def test_word_limit_leaves_room_for_what_is_added():
    constraints = one("word_limit", relation="at_most", num_words=10) + one("end_phrase", phrase="Hope this helps!")
    edited = revise("One two three. Four five six. Seven eight nine ten eleven.", constraints)
    assert edited == "One two three. Four five six.\n\nHope this helps!"
    assert C.fraction(edited, constraints) == 1.0
    assert cut_to_words("A very long first sentence without any end", 3) == "A very long."


def test_bullets_from_lines_or_sentences_and_none_when_too_few():
    assert bulletize("1. apples\n2. pears\n- plums", 2) == "* apples\n* pears plums"
    assert bulletize("Red. Green. Blue.", 3) == "* Red.\n* Green.\n* Blue."
    assert bulletize("Only one sentence", 2) is None


def test_start_word_keeps_I_and_acronyms_and_goes_on_its_own_line_above_bullets():
    assert revise("I think so.", one("start_word", word="Yes")) == "Yes, I think so."
    assert revise("I'm sure.", one("start_word", word="Okay")) == "Okay, I'm sure."
    assert revise("NASA did it.", one("start_word", word="Well")) == "Well, NASA did it."
    # a name stays a name where the instruction or the answer has it capitalised inside a sentence
    assert revise("Paris is big.", one("start_word", word="So"), "Tell me about Paris.") == "So, Paris is big."
    assert revise("Mars is red. We love Mars.", one("start_word", word="So")) == "So, Mars is red. We love Mars."
    assert revise("Paris is big.", one("start_word", word="So"), "Paris: tell me more.") == "So, paris is big."
    assert revise("The sun is hot. The end.", one("start_word", word="So")) == "So, the sun is hot. The end."
    constraints = one("start_word", word="Sure") + one("bullets", num_bullets=2)
    edited = revise("Red. Blue.", constraints)
    assert edited == "Sure:\n* Red.\n* Blue." and C.fraction(edited, constraints) == 1.0


def test_a_cut_answer_loses_its_unfinished_sentence():
    assert drop_unfinished("It rains. Water falls from the") == "It rains."
    assert drop_unfinished("Water falls from the") == "Water falls from the"
    constraints = one("end_phrase", phrase="That is all.")
    assert improve("It rains. Water falls from the", constraints, cut=True) == "It rains.\n\nThat is all."


def test_improve_refuses_an_edit_that_breaks_what_the_answer_met():
    # Dropping the cut sentence would take the answer under its word minimum: the whole answer is kept.
    constraints = one("word_limit", relation="at_least", num_words=6) + one("end_phrase", phrase="That is all.")
    assert improve("It rains. Water falls from the", constraints, cut=True) == \
        "It rains. Water falls from the\n\nThat is all."
    assert improve("A fine answer.", one("keywords", keywords=["apple"])) is None  # nothing code can add
    assert improve("Already fine.", one("no_commas")) is None  # nothing to improve


def test_preferences_revise_pairs_the_edited_best_answer_against_itself(tmp_path):
    src = tmp_path / "prompts.jsonl"
    rows = [
        {"prompt": "Name a planet.\n\nAnswer in lowercase only.", "base_prompt": "Name a planet.",
         "constraints": one("lowercase") + one("no_commas"),
         "responses": ["Mars, the red one.", "Mars is red, and cold."]},
        {"prompt": "Name a fruit.\n\nInclude the word apple.", "constraints": one("keywords", keywords=["apple"]),
         "responses": ["An apple.", "A pear."]},  # code cannot add a keyword: best against worst as before
    ]
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "prefs.jsonl"
    code, _, stderr = cli("generate-data", "preferences", "--prompts", src, "--out", out,
                          "--scorer", "rules:constraints", "--revise", "--json")
    assert code == 0, stderr
    pairs = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(p["chosen"], p["rejected"], p["score_chosen"], p["score_rejected"]) for p in pairs] == [
        ("mars the red one.", "Mars, the red one.", 1.0, 0.0), ("An apple.", "A pear.", 1.0, 0.0)]
    revised = pairs[0]["meta"]["candidates"][-1]
    assert (revised["source"], revised["of"], revised["rules"]["constraints/lowercase"]) == ("revised", 0, 1.0)
    assert pairs[0]["meta"]["chosen"]["source"] == "revised"


def test_preferences_revise_and_contrast_need_the_constraints_scorer(tmp_path):
    src = tmp_path / "p.jsonl"
    src.write_text(json.dumps({"prompt": "Hi.", "responses": ["a", "bb"]}) + "\n")
    for flag in ("--revise", "--contrast"):
        code, _, stderr = cli("generate-data", "preferences", "--prompts", src, "--out", tmp_path / "o.jsonl",
                              "--scorer", "rules:length", flag)
        assert code == 2 and f"{flag} edits answers by each row's constraints" in stderr, stderr


def test_contrast_applies_only_a_format_the_prompt_did_not_ask_for():
    asked = one("lowercase") + one("no_commas")
    answer = "the sun is a star."
    seen = set()
    for seed in range(40):
        drawn = contrast(answer, asked, "Describe the sun.", random.Random(seed))
        if drawn is None:  # a title or a P.S. would break the lowercase the prompt asked for
            continue
        kind, edited = drawn
        seen.add(kind)
        assert C.check(edited, {"kind": kind, "args": CONTRAST_FORMATS[kind]})  # the unasked format is met
        assert C.per_kind(edited, asked) == C.per_kind(answer, asked)  # and the asked ones as before
    assert seen == {"quotes", "json"}
    everything = [{"kind": k, "args": a} for k, a in CONTRAST_FORMATS.items()]
    assert contrast(answer, everything, "", random.Random(0)) is None  # no format left to add


def test_contrast_is_none_when_the_edit_would_change_an_asked_constraint():
    # a JSON wrapper breaks "* " bullets; quotes go on lines of their own and keep them
    bullets = one("bullets", num_bullets=2)
    answer = "* Red.\n* Blue."
    results = {}
    for seed in range(60):
        drawn = contrast(answer, bullets, "Name colours.", random.Random(seed))
        rng_kind = random.Random(seed).choice(list(CONTRAST_FORMATS))
        results[rng_kind] = drawn
    assert results["json"] is None
    assert results["lowercase"] == ("lowercase", "* red.\n* blue.")
    assert results["quotes"] == ("quotes", '"\n* Red.\n* Blue.\n"')


def test_preferences_contrast_adds_a_pair_that_the_checker_ties(tmp_path):
    src = tmp_path / "prompts.jsonl"
    rows = [{"prompt": "Name a planet.\n\nAnswer in lowercase only.", "base_prompt": "Name a planet.",
             "constraints": one("lowercase"), "responses": ["Mars.", "mars is red."]}]
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "prefs.jsonl"
    args = ("generate-data", "preferences", "--prompts", src, "--out", out, "--scorer", "rules:constraints",
            "--contrast", "--json")
    code, stdout, stderr = cli(*args)
    assert code == 0, stderr
    assert json.loads(stdout)["contrast_rows"] == 1
    pair, extra = [json.loads(line) for line in out.read_text().splitlines()]
    assert (pair["chosen"], pair["rejected"]) == ("mars is red.", "Mars.")
    assert extra["id"] == pair["id"] + "-contrast" and extra["chosen"] == pair["chosen"]
    kind = extra["meta"]["contrast"]
    assert kind in CONTRAST_FORMATS and kind != "lowercase"
    assert extra["rejected"] != extra["chosen"] and C.check(extra["rejected"], one("lowercase")[0])
    assert extra["score_rejected"] == extra["score_chosen"] == 1.0 and extra["margin"] == 0.0
    # a rerun finds the job done and writes neither row again
    assert cli(*args)[0] == 0 and len(out.read_text().splitlines()) == 2
