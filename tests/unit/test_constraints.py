"""Verifiable instruction-following constraints: the checkers by hand-written answers, the seeded draw,
`generate-data constraints`, and `rules:constraints` through `generate-data preferences` and `rlhf`."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from support.cli import FIXTURES, cli

from toolkit import constraints as C
from toolkit.errors import UserError
from toolkit.scorers import RULES, parse_rules

ALPACA = FIXTURES / "alpaca-24.json"


def one_line_error(code: int, stderr: str) -> str:
    assert code == 2, stderr
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    return lines[0]


# ---------------------------------------------------------------- every family, passing and failing answers

CASES = [
    # word_limit: words are runs of letters/digits with inner ' or -
    ("word_limit", {"relation": "at_most", "num_words": 5}, "one two three four five", True),
    ("word_limit", {"relation": "at_most", "num_words": 5}, "one two three four five six", False),
    ("word_limit", {"relation": "at_most", "num_words": 5}, "  one two three  \n\n", True),
    ("word_limit", {"relation": "at_most", "num_words": 2}, "State-of-the-art, don't!", True),
    ("word_limit", {"relation": "at_least", "num_words": 3}, "one two", False),
    ("word_limit", {"relation": "at_least", "num_words": 3}, "one, two, three.", True),
    # keywords: whole words, any case
    ("keywords", {"keywords": ["solar", "energy"]}, "Solar ENERGY is clean.", True),
    ("keywords", {"keywords": ["solar", "energy"]}, "Solar power is clean.", False),
    ("keywords", {"keywords": ["energy"]}, "An energetic answer.", False),
    # forbidden_word: whole words, any case
    ("forbidden_word", {"word": "very"}, "It is very good.", False),
    ("forbidden_word", {"word": "very"}, "VERY good.", False),
    ("forbidden_word", {"word": "very"}, "Every day is good.", True),
    # lowercase: no capital and at least one letter
    ("lowercase", {}, "all in lower case, 100%.\n", True),
    ("lowercase", {}, "All in lower case.", False),
    ("lowercase", {}, "123 !!", False),
    # no_commas (the full-width comma too)
    ("no_commas", {}, "One two three.", True),
    ("no_commas", {}, "One, two.", False),
    ("no_commas", {}, "One，two.", False),
    # end_phrase: exact and case-sensitive; trailing whitespace does not matter
    ("end_phrase", {"phrase": "Hope this helps!"}, "Here it is. Hope this helps!", True),
    ("end_phrase", {"phrase": "Hope this helps!"}, "Here it is. Hope this helps!  \n\n", True),
    ("end_phrase", {"phrase": "Hope this helps!"}, "Here it is. Hope this helps! Bye.", False),
    ("end_phrase", {"phrase": "Hope this helps!"}, "Here it is. hope this helps!", False),
    ("end_phrase", {"phrase": "Hope this helps!"}, "Here it is. Hope this helps", False),
    # start_word: the first word exactly, punctuation may follow
    ("start_word", {"word": "Sure"}, "Sure, here it is.", True),
    ("start_word", {"word": "Sure"}, "\n  Sure! Here.", True),
    ("start_word", {"word": "Sure"}, "sure, here it is.", False),
    ("start_word", {"word": "Sure"}, "Surely not.", False),
    ("start_word", {"word": "Sure"}, "**Sure**, here.", False),
    ("start_word", {"word": "Sure"}, "Well, Sure.", False),
    # bullets: exactly N lines "* ", and no list written with another marker
    ("bullets", {"num_bullets": 3}, "* a\n* b\n* c", True),
    ("bullets", {"num_bullets": 3}, "Here:\n* a\n* b\n  * c\n\nDone.", True),
    ("bullets", {"num_bullets": 3}, "**Bold heading**\n* a\n* b\n* c", True),
    ("bullets", {"num_bullets": 3}, "- a\n- b\n- c", False),
    ("bullets", {"num_bullets": 3}, "* a\n* b\n* c\n- d", False),
    ("bullets", {"num_bullets": 3}, "* a\n* b", False),
    ("bullets", {"num_bullets": 2}, "*a\n*b", False),
    # json: one non-empty object; one surrounding code fence is allowed (as in IFEval), other text is not
    ("json", {}, '{"answer": "Paris"}', True),
    ("json", {}, '  {"answer": "Paris", "n": 1}  \n', True),
    ("json", {}, '```json\n{"answer": "Paris"}\n```', True),
    ("json", {}, '```\n{"answer": "Paris"}\n```', True),
    ("json", {}, 'Here you go: {"answer": "Paris"}', False),
    ("json", {}, '```json\n{"answer": "Paris"}\n```\nHope this helps.', False),
    ("json", {}, '["Paris"]', False),
    ("json", {}, "{}", False),
    ("json", {}, '{"answer": NaN}', False),
    ("json", {}, "{'answer': 'Paris'}", False),
    # title: <<...>> with text, on one line
    ("title", {}, "<<Poem of Joy>>\nRoses are red.", True),
    ("title", {}, "A poem: <<joy>>", True),
    ("title", {}, "<<>> nothing", False),
    ("title", {}, "<<   >> nothing", False),
    ("title", {}, "<Poem of Joy>", False),
    ("title", {}, "<<Poem\nof Joy>>", False),
    # postscript: "P.S." exactly, on a line after the first, with text after it
    ("postscript", {"marker": "P.S."}, "Main answer.\nP.S. One more thing.", True),
    ("postscript", {"marker": "P.S."}, "Main answer.\n\n  P.S. One more thing.\n", True),
    ("postscript", {"marker": "P.S."}, "Main answer.\nPS One more thing.", False),
    ("postscript", {"marker": "P.S."}, "Main answer.\nP.S One more thing.", False),
    ("postscript", {"marker": "P.S."}, "Main answer.\np.s. One more thing.", False),
    ("postscript", {"marker": "P.S."}, "Main answer. P.S. inline is no postscript.", False),
    ("postscript", {"marker": "P.S."}, "P.S. There is no answer before me.", False),
    ("postscript", {"marker": "P.S."}, "Main answer.\nP.S.", False),
    # quotes: "..." or “...” around the whole answer, with text inside
    ("quotes", {}, '"Paris is the capital."', True),
    ("quotes", {}, '  "Paris."  \n', True),
    ("quotes", {}, "“Paris.”", True),
    ("quotes", {}, '"Paris." he said', False),
    ("quotes", {}, "'Paris.'", False),
    ("quotes", {}, '""', False),
    ("quotes", {}, '"  "', False),
]


@pytest.mark.parametrize(("kind", "args", "answer", "expected"), CASES)
def test_checker(kind, args, answer, expected):
    assert C.check(answer, {"kind": kind, "args": args}) is expected
    assert C.FAMILIES[kind].check(answer, **args) is expected  # the family's own check(answer, **args)


def test_every_family_has_cases_both_ways_and_the_issue_lists_twelve():
    assert len(C.KINDS) >= 12
    for kind in C.KINDS:
        assert {expected for k, _, _, expected in CASES if k == kind} == {True, False}, kind


@pytest.mark.parametrize("kind", C.KINDS)
def test_an_empty_answer_satisfies_nothing(kind):
    args = C.FAMILIES[kind].sample(random.Random(0), "Describe the water cycle.")
    for answer in ("", "   ", "\n\t\n"):
        assert C.check(answer, {"kind": kind, "args": args}) is False


def test_fraction_and_per_kind():
    rules = [{"kind": "no_commas", "args": {}}, {"kind": "lowercase", "args": {}},
             {"kind": "keywords", "args": {"keywords": ["rain"]}}]
    answer = "Rain falls and rises again"
    assert C.fraction(answer, rules) == pytest.approx(2 / 3)
    assert C.per_kind(answer, rules) == {"no_commas": 1.0, "lowercase": 0.0, "keywords": 1.0}
    twice = [{"kind": "forbidden_word", "args": {"word": "rain"}}, {"kind": "forbidden_word", "args": {"word": "sun"}}]
    assert C.per_kind(answer, twice) == {"forbidden_word": 0.5}


@pytest.mark.parametrize(("value", "message"), [
    (None, "non-empty list"),
    ([], "non-empty list"),
    ([{"kind": "shout", "args": {}}], "item 0: unknown constraint kind 'shout'"),
    (["no_commas"], "unknown constraint kind 'no_commas'"),
    ([{"kind": "no_commas", "args": {}}, {"kind": "word_limit", "args": {"num_words": 5}}],
     "item 1 (word_limit): missing argument 'relation'"),
    ([{"kind": "bullets", "args": {"num_bullets": 0}}], "argument 'num_bullets' has a bad value 0"),
    ([{"kind": "bullets", "args": {"num_bullets": "3"}}], "argument 'num_bullets' has a bad value '3'"),
    ([{"kind": "json", "args": {"strict": True}}], "unknown argument 'strict'"),
    ([{"kind": "keywords", "args": {"keywords": "rain"}}], "argument 'keywords' has a bad value"),
    ([{"kind": "lowercase", "args": []}], "'args' must be an object"),
])
def test_validate_names_the_bad_item(value, message):
    with pytest.raises(ValueError) as err:
        C.validate(value)
    assert message in str(err.value)


# ---------------------------------------------------------------- phrasings and the seeded draw


@pytest.mark.parametrize("kind", C.KINDS)
def test_every_phrasing_renders_with_sampled_args(kind):
    rng = random.Random(1)
    assert len(C.phrasings(kind)) >= 3  # several phrasings per family
    for i in range(len(C.phrasings(kind))):
        for _ in range(5):
            constraint = {"kind": kind, "args": C.FAMILIES[kind].sample(rng, "List five sources of renewable energy")}
            C.validate([constraint])
            text = C.describe(constraint, i)
            assert text.strip() and "{" not in text and "}" not in text and "\n" not in text, text
            for value in constraint["args"].values():  # the arguments are stated in the sentence
                for item in value if isinstance(value, list) else [value]:
                    assert str(item).replace("_", " ") in text, (text, item)


def test_phrasings_ship_as_prompt_files():
    from toolkit.resources import PROMPTS

    for kind in C.KINDS:
        assert (PROMPTS / "constraints" / f"{kind}.txt").is_file()


def test_draw_is_seeded_compatible_and_covers_every_kind():
    texts = [f"Explain topic number {i} about gardening and weather" for i in range(300)]
    seen = set()
    for count in (1, 2, 3, 5):
        for text in texts:
            drawn = C.draw(text, C.rng_for(7, text), count)
            assert drawn == C.draw(text, C.rng_for(7, text), count)  # same seed and text, same draw
            kinds = [c["kind"] for c, _ in drawn]
            assert len(kinds) == count and C.compatible(kinds), kinds
            seen.update(kinds)
            args = {c["kind"]: c["args"] for c, _ in drawn}
            if "keywords" in args and "forbidden_word" in args:
                assert args["forbidden_word"]["word"] not in args["keywords"]["keywords"]
    assert seen == set(C.KINDS)
    other = [C.draw(t, C.rng_for(8, t), 2) for t in texts[:50]]
    assert other != [C.draw(t, C.rng_for(7, t), 2) for t in texts[:50]]  # another seed, another draw


def test_keywords_come_from_the_instruction_but_not_its_verb_or_filler():
    rng = random.Random(0)
    drawn = {k for _ in range(200) for k in C.FAMILIES["keywords"].sample(rng, "Calculate the average rainfall "
                                                                           "of some very wet cities")["keywords"]}
    assert drawn == {"average", "rainfall", "cities"}
    assert C.FAMILIES["keywords"].sample(rng, "Hi")["keywords"][0] in C.FALLBACK_KEYWORDS


def test_no_conflicting_pair_is_drawn_and_the_conflicts_are_real():
    assert not C.compatible(["json", "bullets"]) and not C.compatible(["json", "quotes"])
    assert not C.compatible(["lowercase", "start_word"]) and not C.compatible(["no_commas", "no_commas"])
    # Each conflict is one no reasonable answer meets: e.g. capitals are needed for "Sure" / "P.S.".
    start_sure = {"kind": "start_word", "args": {"word": "Sure"}}
    for answer in ("Sure, it is done.", "sure, it is done."):
        assert not (C.check(answer, start_sure) and C.check(answer, {"kind": "lowercase", "args": {}}))
    # A set with a conflict-free witness answer passes all its checks (the draw's sets are satisfiable).
    rules = [{"kind": "json", "args": {}}, {"kind": "lowercase", "args": {}},
             {"kind": "keywords", "args": {"keywords": ["rain"]}}, {"kind": "forbidden_word", "args": {"word": "very"}},
             {"kind": "word_limit", "args": {"relation": "at_most", "num_words": 10}}]
    assert C.compatible([r["kind"] for r in rules])
    assert C.fraction('{"answer": "rain falls"}', rules) == 1.0


# ---------------------------------------------------------------- `generate-data constraints`


def test_generate_constraints_cli_is_deterministic(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    for out in (a, b):
        code, stdout, stderr = cli("generate-data", "constraints", "--prompts", ALPACA, "--out", out,
                                   "--per-prompt", "1..3", "--seed", "3", "--json")
        assert code == 0, stderr
    assert a.read_bytes() == b.read_bytes()  # same command twice: byte-identical
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["rows"] == 24 and summary["duplicates"] == 0
    rows = [json.loads(line) for line in a.read_text().splitlines()]
    source = json.loads(ALPACA.read_text())
    counts = set()
    for row, src in zip(rows, source, strict=True):
        base = src["instruction"] + (f"\n\n{src['input']}" if src["input"] else "")
        assert row["base_prompt"] == base and "instruction" not in row  # loaders read instruction first
        C.validate(row["constraints"])
        counts.add(len(row["constraints"]))
        sentences = [C.describe(c, i) for c, i in zip(row["constraints"], row["meta"]["phrasings"], strict=True)]
        assert row["prompt"] == base + "\n\n" + " ".join(sentences)
        assert len(row["id"]) == 64 and row["meta"]["seed"] == 3
    assert counts == {1, 2, 3}
    assert summary["constraints"] == sum(len(r["constraints"]) for r in rows)

    # An instruction gets the same constraints wherever it sits: --limit, or the file reversed.
    rev = tmp_path / "reversed.json"
    rev.write_text(json.dumps(source[::-1]))
    code, _, stderr = cli("generate-data", "constraints", "--prompts", rev, "--out", tmp_path / "r.jsonl",
                          "--seed", "3", "--limit", "5")
    assert code == 0, stderr
    again = {r["id"]: r for r in map(json.loads, (tmp_path / "r.jsonl").read_text().splitlines())}
    assert len(again) == 5
    for row in rows[-5:]:
        assert again[row["id"]]["prompt"] == row["prompt"]

    # Another seed, other constraints; a fixed count.
    code, _, _ = cli("generate-data", "constraints", "--prompts", ALPACA, "--out", tmp_path / "s.jsonl",
                     "--seed", "4", "--per-prompt", "2", "--kinds", "json,no_commas,lowercase,bullets,title")
    assert code == 0
    rows4 = [json.loads(line) for line in (tmp_path / "s.jsonl").read_text().splitlines()]
    assert all(len(r["constraints"]) == 2 for r in rows4)
    kinds = {c["kind"] for r in rows4 for c in r["constraints"]}
    assert kinds <= {"json", "no_commas", "lowercase", "bullets", "title"}


def test_generate_constraints_keeps_dialogues_and_any_input_format(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in [
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                      {"role": "user", "content": "Name a planet."}]},
        {"prompt": "Name a colour."},
        {"prompt": "Name a colour."},  # a duplicate: written once
        {"conversations": [{"from": "human", "value": "Name a fruit."}]},
    ]) + "\n")
    out = tmp_path / "out.json"
    code, stdout, stderr = cli("generate-data", "constraints", "--prompts", src, "--out", out, "--json")
    assert code == 0, stderr
    assert json.loads(stdout.strip().splitlines()[-1])["duplicates"] == 1
    rows = json.loads(out.read_text())  # a .json name: a JSON array
    assert len(rows) == 3
    dialogue = rows[0]["prompt"]
    assert [m["role"] for m in dialogue] == ["user", "assistant", "user"]
    assert dialogue[:2] == rows[0]["base_prompt"][:2]
    assert dialogue[2]["content"].startswith("Name a planet.\n\n") and len(dialogue[2]["content"]) > 20


def test_generate_constraints_bad_input_and_existing_output(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "fine"}\n{"instruction": 5}\n')
    out = tmp_path / "out.jsonl"
    line = one_line_error(*cli("generate-data", "constraints", "--prompts", bad, "--out", out)[::2])
    assert line == f"error: {bad}:2: field 'instruction': expected a string, got int"
    assert not out.exists()

    out.write_text("keep me\n")
    line = one_line_error(*cli("generate-data", "constraints", "--prompts", ALPACA, "--out", out)[::2])
    assert "exists already; pass --overwrite" in line and out.read_text() == "keep me\n"
    code, _, stderr = cli("generate-data", "constraints", "--prompts", ALPACA, "--out", out, "--overwrite")
    assert code == 0, stderr
    assert len(out.read_text().splitlines()) == 24

    for flags, expected in ((("--per-prompt", "0"), "--per-prompt"), (("--per-prompt", "3..1"), "--per-prompt"),
                            (("--per-prompt", "two"), "N or LOW..HIGH"), (("--per-prompt", "9"), "at most 7"),
                            (("--kinds", "json,jsn"), "unknown constraint kind 'jsn'"),
                            (("--kinds", "json,quotes", "--per-prompt", "2"), "at most 1 of the kinds json, quotes")):
        line = one_line_error(*cli("generate-data", "constraints", "--prompts", ALPACA, "--out",
                                   tmp_path / "x.jsonl", *flags)[::2])
        assert expected in line, (flags, line)
    assert not (tmp_path / "x.jsonl").exists()


# ---------------------------------------------------------------- rules:constraints


ROW = {"prompt": "Name a planet.\n\nDo not use any commas. Answer in lowercase.",
       "constraints": [{"kind": "no_commas", "args": {}}, {"kind": "lowercase", "args": {}}]}


def test_rules_constraints_scores_the_fraction_and_explains_per_kind():
    scorer = parse_rules("rules:constraints")
    assert scorer.needs_context and scorer.context_of(ROW) == {"constraints": ROW["constraints"]}
    assert scorer.score_one(ROW["prompt"], "mars is red", "stop", ROW) == 1.0
    assert scorer.score_one(ROW["prompt"], "Mars is red", "stop", ROW) == 0.5
    assert scorer.explain(ROW["prompt"], "Mars, red", None, ROW) == {
        "constraints": 0.0, "constraints/no_commas": 0.0, "constraints/lowercase": 0.0}
    both = parse_rules("rules:constraints=3,nonempty")
    assert both.score(["p", "p"], ["mars", "Mars, red"], None, [ROW, ROW]) == [1.0, pytest.approx(0.25)]
    assert "constraints" not in parse_rules("rules").weights  # bare `rules` stays context-free
    assert parse_rules("rules").context_of(ROW) == {} and not parse_rules("rules:length").needs_context
    assert set(parse_rules("rules").weights) == set(RULES)


def test_rules_constraints_refuses_a_row_it_cannot_score():
    scorer = parse_rules("rules:constraints")
    with pytest.raises(UserError, match=r"^p.jsonl:3: field 'constraints': missing: rules:constraints"):
        scorer.check_context({"prompt": "x"}, file="p.jsonl", line=3)
    with pytest.raises(UserError, match="field 'constraints': item 0: unknown constraint kind 'shout'"):
        scorer.check_context({"constraints": [{"kind": "shout"}]}, file="p.jsonl", line=3)
    with pytest.raises(UserError, match="needs each prompt's row"):
        scorer.score_one("p", "answer")
    parse_rules("rules:length").check_context(None)  # context-free rules need nothing


def test_rules_teacher_passes_the_row():
    from toolkit.teachers import make_teacher

    assert make_teacher("rules:constraints").score(ROW["prompt"], "mars", None, ROW) == 1.0


def _pairs_file(tmp_path: Path) -> Path:
    path = tmp_path / "prefs-in.jsonl"
    rows = [
        {**ROW, "responses": ["Mars, the red one.", "mars"]},
        {"prompt": "Name a fruit.\n\nWrap your entire output in JSON format.",
         "constraints": [{"kind": "json", "args": {}}, {"kind": "keywords", "args": {"keywords": ["apple"]}}],
         "responses": ['```json\n{"fruit": "apple"}\n```', "An apple."]},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_preferences_with_rules_constraints(tmp_path):
    out = tmp_path / "prefs.jsonl"
    code, _, stderr = cli("generate-data", "preferences", "--prompts", _pairs_file(tmp_path), "--out", out,
                          "--scorer", "rules:constraints", "--json")
    assert code == 0, stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["chosen"], r["rejected"]) for r in rows] == [
        ("mars", "Mars, the red one."), ('```json\n{"fruit": "apple"}\n```', "An apple.")]
    assert [(r["score_chosen"], r["score_rejected"]) for r in rows] == [(1.0, 0.0), (1.0, 0.5)]
    candidates = rows[1]["meta"]["candidates"]
    assert candidates[1]["rules"] == {"constraints": 0.5, "constraints/json": 0.0, "constraints/keywords": 1.0}


def test_preferences_refuse_rows_without_constraints_before_any_call(tmp_path):
    src = tmp_path / "mixed.jsonl"
    src.write_text(json.dumps({**ROW, "responses": ["a", "b"]}) + "\n" + json.dumps({"prompt": "Name a fruit."}) + "\n")
    out = tmp_path / "prefs.jsonl"
    # The second row has no responses, so the teacher would be loaded: the check comes first.
    line = one_line_error(*cli("generate-data", "preferences", "--prompts", src, "--out", out, "--scorer",
                               "rules:constraints", "--teacher", "hf:/nonexistent-model")[::2])
    assert line.startswith(f"error: {src}:2: field 'constraints': missing: rules:constraints"), line
    assert not out.exists()


# ---------------------------------------------------------------- rules:constraints as the PPO reward


def test_rlhf_reward_sees_each_prompts_constraints(tiny_llama_dir, tmp_path):
    # Random-model answers are never JSON and never contain "qqqq": each non-empty one scores exactly 1/2.
    prompts = tmp_path / "prompts.jsonl"
    rule = [{"kind": "forbidden_word", "args": {"word": "qqqq"}}, {"kind": "json", "args": {}}]
    prompts.write_text("".join(json.dumps({"prompt": f"Say something about {w}.", "constraints": rule}) + "\n"
                               for w in ("rain", "snow", "wind", "sun")))
    out = tmp_path / "run"
    code, _, stderr = cli("rlhf", "--policy", tiny_llama_dir, "--reward", "rules:constraints", "--prompts", prompts,
                          "--out", out, "--steps", "1", "--batch-size", "4", "--num-minibatches", "2",
                          "--ppo-epochs", "1", "--max-new-tokens", "8", "--sample-every", "1",
                          "--samples-per-step", "4", "--missing-eos-penalty", "0")
    assert code == 0, stderr
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 4
    for s in samples:
        assert s["score"] == pytest.approx(C.fraction(s["response"], rule))
    assert any(s["score"] == 0.5 for s in samples)

    bad = tmp_path / "bad.jsonl"
    bad.write_text(prompts.read_text() + json.dumps({"prompt": "No constraints here."}) + "\n")
    line = one_line_error(*cli("rlhf", "--policy", tiny_llama_dir, "--reward", "rules:constraints", "--prompts", bad,
                               "--out", tmp_path / "run2", "--steps", "1")[::2])
    assert line.startswith(f"error: {bad}:5: field 'constraints': missing"), line
    assert not (tmp_path / "run2").exists()


def test_rlhf_loader_reads_the_prompt_with_its_constraints(tiny_llama_dir, tmp_path):
    from rlhf.rewards import make_reward_fn, score_rollout
    from rlhf.rollout import load_prompts
    from toolkit.models import load_tokenizer

    out = tmp_path / "c.jsonl"
    assert cli("generate-data", "constraints", "--prompts", ALPACA, "--out", out, "--limit", "4")[0] == 0
    prompts, _ = load_prompts(str(out), load_tokenizer(tiny_llama_dir))
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [p.text for p in prompts] == [r["prompt"] for r in rows]  # not base_prompt: the constraints are asked
    assert [p.context["constraints"] for p in prompts] == [r["constraints"] for r in rows]
    reward = make_reward_fn("rules:constraints", prompts, str(out))
    answers = ["", "x"] * 2
    scores = score_rollout(reward, [p.text for p in prompts], answers, ["stop"] * 4,
                           contexts=[p.context for p in prompts])
    expected = [C.fraction(a, r["constraints"]) for a, r in zip(answers, rows, strict=True)]
    assert scores.tolist() == pytest.approx(expected)
    # a reward function written for three arguments still works when contexts are passed
    assert score_rollout(lambda p, r, f: [1.0] * len(r), ["p"], ["a"], ["stop"], contexts=[{}]).tolist() == [1.0]
