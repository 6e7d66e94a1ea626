"""toolkit/rows.py: every row format to messages, prompts and pairs; every error names file, row and field."""

from __future__ import annotations

import pytest

from toolkit.errors import UserError
from toolkit.rows import (
    SHAREGPT_ROLES,
    Pair,
    check_messages,
    dialogue_text,
    hh_answer_field,
    hh_join,
    hh_prompt,
    hh_prompt_field,
    llamakit_row,
    parse_hh,
    parse_prompt_row,
    preference_pair,
    prompt_messages,
    row_kind,
    row_to_messages,
    scored_answer,
    split_hh,
    split_last_answer,
    to_hh,
)

LOC = {"file": "f.jsonl", "line": 3}


def M(*turns: tuple[str, str]) -> list[dict[str, str]]:
    return [{"role": role, "content": content} for role, content in turns]


def raises(pattern: str):
    return pytest.raises(UserError, match=pattern)


# ---------------------------------------------------------------- check_messages (the one messages validator)


def test_check_messages_accepts_and_normalises():
    messages = [{"role": "system", "content": "s", "name": "x"},
                {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
                {"role": "assistant", "content": ""}]
    assert check_messages(messages) == [{"role": "system", "content": "s", "name": "x"},
                                        {"role": "user", "content": "ab"}, {"role": "assistant", "content": ""}]


@pytest.mark.parametrize(("messages", "field", "text"), [
    ([], "messages", "non-empty list"),
    ("hello", "messages", "non-empty list"),
    ({"role": "user", "content": "x"}, "messages", "non-empty list"),
    (["hello"], "messages[0]", "must be an object"),
    ([{"role": "user", "content": "x"}, {"role": "robot", "content": "y"}], "messages[1].role", "'robot'"),
    ([{"content": "x"}], "messages[0].role", "None"),
    ([{"role": "user", "content": 3}], "messages[0].content", "must be a string"),
    ([{"role": "user"}], "messages[0].content", "must be a string"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], "messages[0].content[0]",
     "image_url parts are not supported (text only)"),
    ([{"role": "user", "content": [{"type": "text", "text": "a"}, "b"]}], "messages[0].content[1]",
     "must be a {type, text} part"),
])
def test_check_messages_errors(messages, field, text):
    with pytest.raises(UserError) as err:
        check_messages(messages)
    assert err.value.field == field
    assert text in str(err.value)


def test_check_messages_errors_name_file_line_and_field():
    with raises(r"^f\.jsonl:3: field 'prompt\[1\]\.role': unknown role 'robot' \(one of: system, user, assistant, "
                r"tool\)$"):
        check_messages(M(("user", "a"), ("robot", "b")), "prompt", LOC)
    with raises(r"^f\.jsonl:3: field 'messages': expected a non-empty list of \{role, content\} messages$"):
        check_messages([], "messages", LOC)
    with raises(r"^f\.jsonl:3: field 'messages\[0\]': must be an object, got int$"):
        check_messages([3], "messages", LOC)
    with raises(r"^f\.jsonl:3: field 'messages\[0\]\.content': empty text$"):
        check_messages(M(("user", "  ")), "messages", LOC, require_text=True)
    assert check_messages(M(("user", "  ")), "messages", LOC) == M(("user", "  "))


def test_sharegpt_turns():
    turns = [{"from": "human", "value": "Q"}, {"from": "GPT", "value": "A"}, {"from": "bard", "value": "B"}]
    assert check_messages(turns, "conversations", LOC, sharegpt=True) == M(("user", "Q"), ("assistant", "A"),
                                                                          ("assistant", "B"))
    assert set(SHAREGPT_ROLES.values()) == {"system", "user", "assistant"}
    with raises(r"^f\.jsonl:3: field 'conversations\[0\]\.from': unknown speaker 'robot' \(known: human, "):
        check_messages([{"from": "robot", "value": "x"}], "conversations", LOC, sharegpt=True)
    with raises(r"^f\.jsonl:3: field 'conversations': expected a non-empty list of \{from, value\} messages$"):
        check_messages([], "conversations", LOC, sharegpt=True)
    with raises(r"^f\.jsonl:3: field 'conversations\[0\]\.value': must be a string$"):
        check_messages([{"from": "human", "value": 3}], "conversations", LOC, sharegpt=True)


# ------------------------------------------------------------------------------------------ HH text


def test_hh_parse_render_and_split():
    text = "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: How are you?\n\nAssistant: Fine."
    messages = parse_hh(text)
    assert messages == M(("user", "Hi there"), ("assistant", "Hello!"), ("user", "How are you?"),
                         ("assistant", "Fine."))
    assert to_hh(messages) == text
    assert parse_hh("Human: a\n\nAssistant: b") == M(("user", "a"), ("assistant", "b"))
    assert to_hh(M(("system", "Be kind."), ("user", "Hi"), ("assistant", "Yo"))) == \
        "\n\nHuman: Be kind.\n\nHi\n\nAssistant: Yo"
    prompt, answer = split_hh(text, "chosen", LOC)
    assert answer == "Fine." and hh_join(prompt, answer) == text
    assert split_hh("\n\nHuman: a\n\nAssistant:  b ", "chosen", LOC) == ("\n\nHuman: a", " b ")
    with raises(r"^f\.jsonl:3: field 'rejected': no 'Assistant:' turn in HH text$"):
        split_hh("no turns", "rejected", LOC)
    with raises(r"^f\.jsonl:3: field 'chosen': expected a string, got int$"):
        split_hh(5, "chosen", LOC)


def test_hh_join_and_hh_prompt():
    assert hh_join("\n\nHuman: a\n\nAssistant: b\n\nHuman: c", "d") == \
        "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: d"
    assert hh_join("Human: a", "b") == "\n\nHuman: a\n\nAssistant: b"
    assert hh_join("plain", "b") == "\n\nHuman: plain\n\nAssistant: b"
    assert hh_join("", "b") == "\n\nAssistant: b"
    assert hh_prompt(M(("system", "s"), ("user", "q"))) == "q"
    assert hh_prompt(M(("user", "a"), ("assistant", "b"), ("user", "c"))) == "\n\nHuman: a\n\nAssistant: b\n\nHuman: c"


def test_dialogue_text_and_prompt_helpers():
    assert dialogue_text("plain") == "plain"
    assert dialogue_text(M(("system", "s"), ("user", "q"))) == "q"
    assert dialogue_text(M(("user", "a"), ("assistant", "b"), ("user", "c"))) == "User: a\n\nAssistant: b\n\nUser: c"
    assert prompt_messages("q") == M(("user", "q"))
    assert split_last_answer(M(("user", "a"), ("assistant", "b"), ("user", "c"))) == (M(("user", "a")), "b")
    assert split_last_answer(M(("user", "a"))) == (M(("user", "a")), "")


# -------------------------------------------------------------------- row_to_messages (sft, rlhf prompts)


def test_every_format_becomes_the_same_conversation():
    expected = M(("user", "Name a colour."), ("assistant", "Blue."))
    rows = [
        {"messages": expected},
        {"conversations": [{"from": "human", "value": "Name a colour."}, {"from": "gpt", "value": "Blue."}]},
        {"instruction": "Name a colour.", "input": "", "output": "Blue."},
        {"user_input": "Name a colour.", "completion": "Blue."},
        {"prompt": "Name a colour.", "response": "Blue."},
        {"prompt": "Name a colour.", "completion": "Blue."},
        {"prompt": "Name a colour.", "chosen": "Blue.", "rejected": "Red."},
    ]
    for row in rows:
        assert row_to_messages(row, "f.jsonl", 1) == expected, row
        assert row_to_messages(row, "f.jsonl", 1, for_prompt=True) == expected[:1], row
    assert row_to_messages({"instruction": "Sum", "input": "2, 3", "output": "5"}, "f.json", 1)[0]["content"] == \
        "Sum\n\n2, 3"
    assert row_to_messages({"instruction": "Sum"}, "f.jsonl", 1, for_prompt=True) == M(("user", "Sum"))
    dialogue = M(("system", "s"), ("user", "a"), ("assistant", "b"), ("user", "c"), ("assistant", "d"))
    assert row_to_messages({"messages": dialogue}, "f.jsonl", 1, for_prompt=True) == dialogue[:4]


@pytest.mark.parametrize(("row", "for_prompt", "message"), [
    ({"messages": M(("user", "hi"))}, False, r"f\.jsonl:3: no assistant turn to learn from"),
    ({"messages": M(("user", "hi"), ("assistant", " "))}, False, r"f\.jsonl:3: no assistant turn to learn from"),
    ({"messages": M(("system", "s"), ("assistant", "x"))}, True, r"f\.jsonl:3: no user turn to use as a prompt"),
    ({"instruction": "x"}, False, r"f\.jsonl:3: missing the answer \(one of: output\)"),
    ({"prompt": "x"}, False, r"f\.jsonl:3: missing the answer \(one of: response, completion, chosen\)"),
    ({"question": "?"}, True, r"f\.jsonl:3: unknown row format: expected messages \| conversations \| instruction"),
    ({"prompt": "  "}, True, r"f\.jsonl:3: field 'prompt': empty text"),
    ({"prompt": 5}, True, r"f\.jsonl:3: field 'prompt': expected a string, got int"),
    ({"instruction": "x", "input": 5}, True, r"f\.jsonl:3: field 'input': expected a string, got int"),
    ({"user_input": "u", "completion": ""}, False, r"f\.jsonl:3: field 'completion': empty text"),
    ({"messages": [{"role": "robot", "content": "x"}]}, True, r"f\.jsonl:3: field 'messages\[0\]\.role': unknown role"),
    ({"conversations": [{"from": "human", "value": "a"}, {"from": "robot", "value": "b"}]}, False,
     r"f\.jsonl:3: field 'conversations\[1\]\.from': unknown speaker"),
])
def test_row_to_messages_errors(row, for_prompt, message):
    with raises("^" + message):
        row_to_messages(row, "f.jsonl", 3, for_prompt)


# ------------------------------------------------------------------------ parse_prompt_row (generate-data)


def test_every_format_becomes_a_prompt_row():
    cases = [
        ({"prompt": "P"}, "P", None, []),
        ({"prompt": "P", "response": "R"}, "P", "R", []),
        ({"prompt": "P", "completion": "R"}, "P", "R", []),
        ({"prompt": "P", "responses": ["a", "b"]}, "P", None, ["a", "b"]),
        ({"prompt": M(("user", "a"), ("assistant", "b"), ("user", "c"))}, M(("user", "a"), ("assistant", "b"),
                                                                           ("user", "c")), None, []),
        ({"messages": M(("system", "s"), ("user", "q"), ("assistant", "a"))}, M(("system", "s"), ("user", "q")), "a",
         []),
        ({"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]}, M(("user", "Q")), "A",
         []),
        ({"instruction": "Add.", "input": "2 and 3", "output": "5"}, "Add.\n\n2 and 3", "5", []),
        ({"instruction": "Sort.", "instances": [{"input": "b, a", "output": "a, b"}]}, "Sort.\n\nb, a", "a, b", []),
        ({"user_input": "U", "completion": "C"}, "U", "C", []),
        ({"chosen": "\n\nHuman: Hi\n\nAssistant: Hello!", "rejected": "\n\nHuman: Hi\n\nAssistant: Go away."},
         M(("user", "Hi")), "Hello!", ["Hello!", "Go away."]),
    ]
    for row, prompt, response, responses in cases:
        p = parse_prompt_row(row, LOC, 4, 3)
        assert (p.prompt, p.response, p.responses, p.index, p.line, p.row) == (prompt, response, responses, 4, 3, row)


@pytest.mark.parametrize(("row", "message"), [
    ({"question": "?"}, r"f\.jsonl:3: no prompt field \(expected one of: prompt, messages, instruction"),
    ({"prompt": "   "}, r"f\.jsonl:3: field 'prompt': empty text"),
    ({"prompt": 5}, r"f\.jsonl:3: field 'prompt': expected a string, got int"),
    ({"instruction": "x", "input": 5}, r"f\.jsonl:3: field 'input': expected a string, got int"),
    ({"messages": M(("user", "hi"), ("user", ""))}, r"f\.jsonl:3: field 'messages\[1\]\.content': empty text"),
    ({"messages": M(("user", "hi"), ("robot", "x"))}, r"f\.jsonl:3: field 'messages\[1\]\.role': unknown role"),
    ({"messages": M(("assistant", "a"))}, r"f\.jsonl:3: field 'messages': the dialogue must end with a user message"),
    ({"prompt": "p", "responses": ["a", ""]}, r"f\.jsonl:3: field 'responses': expected a list of non-empty strings"),
])
def test_parse_prompt_row_errors(row, message):
    with raises("^" + message):
        parse_prompt_row(row, LOC)


def test_json_array_rows_are_named_by_row():
    with raises(r"^rows\.json \(row 2\): field 'instruction': empty text$"):
        parse_prompt_row({"instruction": ""}, {"file": "rows.json (row 2)"})


# --------------------------------------------------------------------- llamakit rows (data convert, stats)


def test_llamakit_rows_of_every_kind():
    hh = {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello!", "rejected": "\n\nHuman: Hi\n\nAssistant: Go away."}
    assert row_kind(hh) == "preference"
    assert llamakit_row({**hh, "id": "x"}, LOC) == {"id": "x", "prompt": "Hi", "chosen": "Hello!",
                                                   "rejected": "Go away."}
    implicit = {"chosen": M(("user", "a"), ("user", "q"), ("assistant", "y")), "rejected": M(("assistant", "n"))}
    assert llamakit_row(implicit, LOC) == {"prompt": M(("user", "a"), ("user", "q")), "chosen": "y", "rejected": "n"}
    trl = {"prompt": M(("user", "q")), "chosen": M(("assistant", "y")), "rejected": M(("assistant", "n")),
           "margin": 1}
    assert llamakit_row(trl, LOC) == {"prompt": "q", "chosen": "y", "rejected": "n", "margin": 1}
    sharegpt = {"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]}
    assert row_kind(sharegpt) == "conversation"
    assert llamakit_row(sharegpt, LOC) == {"messages": M(("user", "Q"), ("assistant", "A"))}
    alpaca = {"instruction": "Add.", "input": "2 and 3", "output": "5"}
    assert llamakit_row(alpaca, LOC) == {"messages": M(("user", "Add.\n\n2 and 3"), ("assistant", "5"))}
    score = {"prompt": "q", "response": "r", "score": 4, "meta": {"m": 1}}
    assert row_kind(score) == "score"
    assert llamakit_row(score, LOC) == {"meta": {"m": 1}, "prompt": "q", "response": "r", "score": 4}
    assert row_kind({"prompt": "q"}) == "prompt" and llamakit_row({"prompt": "q"}, LOC) == {"prompt": "q"}


@pytest.mark.parametrize(("row", "message"), [
    ({"chosen": "x", "rejected": "y"}, r"f\.jsonl:3: field 'prompt': missing"),
    ({"prompt": "p", "chosen": " ", "rejected": "y"}, r"f\.jsonl:3: field 'chosen': empty text"),
    ({"prompt": "p", "chosen": M(("user", "x")), "rejected": "y"},
     r"f\.jsonl:3: field 'chosen': the last message must be the assistant's answer"),
    ({"chosen": "\n\nHuman: only a question", "rejected": "x"},
     r"f\.jsonl:3: field 'chosen': not an HH dialogue ending with an Assistant turn"),
    ({"instruction": "x", "output": " "}, r"f\.jsonl:3: field 'output': missing or empty answer"),
    ({"prompt": "p", "response": "r", "score": "high"}, r"f\.jsonl:3: field 'score': expected a number"),
])
def test_llamakit_row_errors(row, message):
    with raises("^" + message):
        llamakit_row(row, LOC)


# ---------------------------------------------------------------- preference pairs and scored answers (reward)


def test_preference_pairs_of_every_format():
    hh = {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello!", "rejected": "\n\nHuman: Hi\n\nAssistant: Go away."}
    pair = preference_pair(hh, "hh", LOC)
    assert pair == Pair("\n\nHuman: Hi", "Hello!", "Go away.", 0.0, 3)
    assert (pair.chosen_text, pair.rejected_text) == (hh["chosen"], hh["rejected"])
    differ = {"chosen": hh["chosen"], "rejected": "\n\nHuman: Hey\n\nAssistant: Go away."}
    assert preference_pair(differ, "hh", LOC).rejected_text == differ["rejected"]
    trl = {"prompt": M(("system", "Be nice."), ("user", "Hi?")), "chosen": M(("assistant", "Hello!")),
           "rejected": M(("assistant", "Go away.")), "margin": 1.5}
    pair = preference_pair(trl, "preference", LOC)
    assert (pair.prompt, pair.chosen, pair.rejected, pair.margin) == ("Hi?", "Hello!", "Go away.", 1.5)
    assert pair.chosen_text == "\n\nHuman: Hi?\n\nAssistant: Hello!"
    implicit = {"chosen": M(("user", "Hi?"), ("assistant", "Hello!")), "rejected": M(("user", "Hi?"),
                                                                                    ("assistant", "No."))}
    pair = preference_pair(implicit, "implicit", LOC)
    assert (pair.prompt, pair.chosen, pair.rejected) == ("Hi?", "Hello!", "No.")
    pair = preference_pair({"chosen": "The sky is blue.", "rejected": "The sky is green."}, "implicit", LOC)
    assert (pair.prompt, pair.chosen, pair.rejected) == ("The sky is", "blue.", "green.")
    assert preference_pair({"prompt": "p", "chosen": "a", "rejected": ""}, "preference", LOC).rejected == ""


@pytest.mark.parametrize(("row", "fmt", "message"), [
    ({"prompt": "p", "chosen": "a"}, "preference", r"f\.jsonl:3: field 'rejected': missing"),
    ({"prompt": "p", "chosen": "same", "rejected": "same"}, "preference",
     r"f\.jsonl:3: field 'rejected': identical to 'chosen' \(a pair must differ\)"),
    ({"prompt": "p", "chosen": 42, "rejected": "b"}, "preference",
     r"f\.jsonl:3: field 'chosen': expected a string or a list of messages, got int"),
    ({"prompt": " ", "chosen": "a", "rejected": "b"}, "preference", r"f\.jsonl:3: field 'prompt': empty text"),
    ({"prompt": "p", "chosen": "a", "rejected": "b", "margin": "big"}, "preference",
     r"f\.jsonl:3: field 'margin': expected a number, got str"),
    ({"prompt": M(("system", "s")), "chosen": "a", "rejected": "b"}, "preference",
     r"f\.jsonl:3: field 'prompt': no user or assistant message"),
    ({"prompt": "p", "chosen": M(("user", "a")), "rejected": "b"}, "preference",
     r"f\.jsonl:3: field 'chosen': expected the answer as assistant message\(s\)"),
    ({"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "no turns"}, "hh",
     r"f\.jsonl:3: field 'rejected': no 'Assistant:' turn in HH text"),
    ({"chosen": M(("assistant", "a")), "rejected": M(("assistant", "b"))}, "implicit",
     r"f\.jsonl:3: field 'chosen': no shared user turn before the answers"),
    ({"chosen": "a", "rejected": 3}, "implicit", r"f\.jsonl:3: field 'rejected': expected a string, got int"),
])
def test_preference_pair_errors(row, fmt, message):
    with raises("^" + message):
        preference_pair(row, fmt, LOC)


def test_scored_answers():
    scored = scored_answer({"user_input": "Q", "completion": "A", "score": "2.5"}, LOC)
    assert (scored.prompt, scored.response, scored.score, scored.line) == ("Q", "A", 2.5, 3)
    assert scored.text == "\n\nHuman: Q\n\nAssistant: A"
    scored = scored_answer({"prompt": M(("user", "Q")), "response": M(("assistant", "A"), ("user", "more?"),
                                                                      ("assistant", "B")), "score": 1}, LOC)
    assert (scored.prompt, scored.response) == ("Q", "A\n\nHuman: more?\n\nAssistant: B")
    assert hh_prompt_field("Q", "prompt", LOC) == "Q" and hh_answer_field("A", "completion", LOC) == "A"
    with raises(r"^f\.jsonl:3: field 'score': expected a number, got 'high'$"):
        scored_answer({"user_input": "Q", "completion": "A", "score": "high"}, LOC)
    with raises(r"^f\.jsonl:3: field 'score': expected a number, got bool$"):
        scored_answer({"user_input": "Q", "completion": "A", "score": True}, LOC)
    with raises(r"^f\.jsonl:3: field 'score': missing$"):
        scored_answer({"user_input": "Q", "completion": "A"}, LOC)
