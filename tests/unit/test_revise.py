"""Revising an answer by code to meet its constraints (toolkit/revise.py), and `generate-data preferences
--revise`, which makes the revised answer the chosen side of a pair against the answer as written."""

from __future__ import annotations

import json

import pytest
from support.cli import cli

from toolkit import constraints as C
from toolkit.revise import bulletize, cut_to_words, drop_unfinished, improve, revise

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


def test_preferences_revise_needs_the_constraints_scorer(tmp_path):
    src = tmp_path / "p.jsonl"
    src.write_text(json.dumps({"prompt": "Hi.", "responses": ["a", "bb"]}) + "\n")
    code, _, stderr = cli("generate-data", "preferences", "--prompts", src, "--out", tmp_path / "o.jsonl",
                          "--scorer", "rules:length", "--revise")
    assert code == 2 and "--revise edits answers to meet each row's constraints" in stderr, stderr
