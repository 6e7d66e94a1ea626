"""Datasets cross over losslessly: one reader for JSONL / JSON / Parquet / `datasets` dirs, typed Arrow messages,
every `data convert --to` format round-tripping, OpenAI / TRL message fields kept."""

from __future__ import annotations

import itertools
import json

import pytest
from support.cli import FIXTURES, run_cli

from toolkit.errors import UserError
from toolkit.generate.formats import FORMATS, convert, read_llamakit, write_rows
from toolkit.io import located_rows, read_rows
from toolkit.reward.data import load_preferences
from toolkit.rows import check_messages, llamakit_row, row_to_messages

LOC = {"file": "f.jsonl", "line": 3}


def M(*turns: tuple[str, str]) -> list[dict]:
    return [{"role": role, "content": content} for role, content in turns]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def arrow(rows):
    """Rows as an Arrow table with every row's columns (from_pylist takes the first row's keys only)."""
    import pyarrow as pa

    columns = list(dict.fromkeys(k for row in rows for k in row))
    return pa.table({k: pa.array([row.get(k) for row in rows]) for k in columns})


def target(tmp_path, fmt: str, name: str):
    return tmp_path / {"parquet": f"{name}.parquet", "hf": name, "sharegpt": f"{name}.json",
                       "chatllama": f"{name}.json"}.get(fmt, f"{name}.jsonl")


TOOL_CALL = {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": "{\"a\": 2, \"b\": 3}"}}
RICH = [{"role": "system", "content": "Use tools."},
        {"role": "user", "content": "2+3?", "name": "ann"},
        {"role": "assistant", "content": "", "tool_calls": [TOOL_CALL], "weight": 0},
        {"role": "tool", "content": "5", "tool_call_id": "call_1"},
        {"role": "assistant", "content": "It is 5.", "weight": 1}]


# ------------------------------------------------------------------------------------------- the reader


def test_one_reader_for_parquet_and_datasets_dirs(tmp_path):
    import datasets
    import pyarrow.parquet as pq

    rows = [{"prompt": M(("user", "a"), ("assistant", "b"), ("user", "c")), "chosen": "y", "rejected": "n"},
            {"prompt": M(("user", "q")), "chosen": "yes", "rejected": "no", "margin": 0.5}]
    pq.write_table(arrow(rows), tmp_path / "p.parquet")
    datasets.Dataset(arrow(rows)).save_to_disk(str(tmp_path / "ds"))
    for path in (tmp_path / "p.parquet", tmp_path / "ds"):
        assert read_rows(path) == [rows[0], rows[1]], path  # a column absent from a row (null) is no key
        assert [loc for _, loc in located_rows(path)] == [{"file": f"{path} (row 1)"}, {"file": f"{path} (row 2)"}]
        assert [p.margin for p in load_preferences(path).pairs] == [0.0, 0.5]
    bad = [{"prompt": "p", "chosen": "a", "rejected": "b"}, {"prompt": "p", "chosen": "a", "rejected": "a"}]
    pq.write_table(arrow(bad), tmp_path / "bad.parquet")
    with pytest.raises(UserError, match=r"bad\.parquet \(row 2\): field 'rejected': identical"):
        load_preferences(tmp_path / "bad.parquet")


def test_dataset_dict_dirs_and_hub_ids(tmp_path):
    import datasets

    one = datasets.Dataset.from_list([{"prompt": "q", "response": "a", "score": 1.0}])
    datasets.DatasetDict({"train": one}).save_to_disk(str(tmp_path / "single"))
    assert read_rows(tmp_path / "single") == [{"prompt": "q", "response": "a", "score": 1.0}]
    datasets.DatasetDict({"train": one, "test": one}).save_to_disk(str(tmp_path / "two"))
    with pytest.raises(UserError, match=r"two: holds the splits train, test: pass one of them, e\.g\. .*two/train$"):
        read_rows(tmp_path / "two")
    assert read_rows(tmp_path / "two" / "test")[0]["prompt"] == "q"
    with pytest.raises(UserError) as err:
        read_rows("Anthropic/hh-rlhf")
    message = str(err.value)
    assert "\n" not in message and "Hub dataset id" in message and "never downloads" in message
    assert "load_dataset('Anthropic/hh-rlhf', split='train').to_json('hh-rlhf.jsonl')" in message
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"empty: not a `datasets` save_to_disk directory"):
        read_rows(tmp_path / "empty")


def test_cli_reads_parquet_and_hf_dirs(tmp_path):
    convert(FIXTURES / "hh-harmless-6.jsonl", tmp_path / "ds", "hf")
    proc = run_cli("data", "convert", tmp_path / "ds", tmp_path / "back.jsonl", "--to", "hh", timeout=120)
    assert proc.returncode == 0, proc.stderr
    original = [json.loads(line) for line in (FIXTURES / "hh-harmless-6.jsonl").read_text().splitlines()]
    assert [json.loads(line) for line in (tmp_path / "back.jsonl").read_text().splitlines()] == original
    proc = run_cli("data", "convert", "org/some-set", tmp_path / "x.jsonl", "--to", "hh", timeout=60)
    assert proc.returncode == 2 and "download it first" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


# ------------------------------------------------------------------------------------ typed Arrow columns


def test_parquet_and_hf_keep_messages_typed(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"prompt": M(("user", "a"), ("assistant", "b"), ("user", "c")), "chosen": "y", "rejected": "n"},
            {"prompt": "single", "chosen": "yes", "rejected": "no", "meta": {"judge": "j"}}]
    write_rows(rows, tmp_path / "p.parquet", "parquet")
    write_rows(rows, tmp_path / "ds", "hf")
    prompt_type = pq.read_schema(tmp_path / "p.parquet").field("prompt").type
    assert pa.types.is_list(prompt_type) and pa.types.is_struct(prompt_type.value_type)
    assert {prompt_type.value_type.field(i).name: str(prompt_type.value_type.field(i).type)
            for i in range(prompt_type.value_type.num_fields)} == {"role": "string", "content": "string"}
    features = datasets.load_from_disk(str(tmp_path / "ds")).features
    assert features["prompt"] == datasets.List({"role": datasets.Value("string"), "content": datasets.Value("string")})
    for path in (tmp_path / "p.parquet", tmp_path / "ds"):
        assert read_llamakit(path) == rows


def test_hf_copy_scores_like_the_jsonl(tmp_path):
    """The user's 0.85 vs 0.90: the reward model must read the same texts from every copy."""
    rows = [{"prompt": M(("user", f"q{i}"), ("assistant", "ok"), ("user", "more?")), "chosen": f"yes {i}",
             "rejected": "no"} for i in range(3)] + [{"prompt": "plain", "chosen": "a", "rejected": "b"}]
    src = write_jsonl(tmp_path / "p.jsonl", rows)
    texts = {}
    for fmt in ("llamakit", "parquet", "hf", "trl-standard", "trl-conversational", "hh"):
        path = target(tmp_path, fmt, f"copy-{fmt}")
        convert(src, path, fmt)
        texts[fmt] = [(p.chosen_text, p.rejected_text) for p in load_preferences(path).pairs]
    assert all(t == texts["llamakit"] for t in texts.values()), texts


# ------------------------------------------------------------------------------------------- round trips

# What each format holds. Lossy by design, so left out of the round trips below:
#   hh, trl-standard  text turns "\n\nHuman: ...\n\nAssistant: ...": no system message (folded into the first human
#                     turn), no message fields beyond the text (name, weight, tool calls: converting refuses them),
#                     turn texts are stripped of edge whitespace;
#   chatllama         one user_input text: a multi-turn history is flattened to "User: ...\n\nAssistant: ..." text
#                     and its system message dropped; no preference rows;
#   sharegpt          conversations only, {from, value} turns (no name, weight or tool calls).
KINDS = {"llamakit": "cpsq", "parquet": "cpsq", "hf": "cpsq", "trl-conversational": "cpsq", "trl-standard": "cpsq",
         "chatllama": "csq", "sharegpt": "c", "hh": "cp"}
KIND_NAMES = {"c": "conversation", "p": "preference", "s": "score", "q": "prompt"}
TYPED = {"llamakit", "parquet", "hf", "trl-conversational"}  # keep every message field


def sample(kind: str, formats: tuple[str, str]) -> list[dict]:
    """Rows of `kind` holding as much as both formats can."""
    multi_turn = "chatllama" not in formats
    system = multi_turn and not {"hh", "trl-standard"} & set(formats)
    history = [*M(("system", "Be brief."))[:int(system)], *M(("user", "Hi"), ("assistant", "Hello"))[:2 * multi_turn]]
    prompt = [*history, *M(("user", "Bye?"))]
    if kind == "c":
        rows = [{"id": "c1", "meta": {"model": "m"}, "messages": [*prompt, *M(("assistant", "See you"))]},
                {"id": "c2", "messages": M(("user", "Q"), ("assistant", "A"))}]
        if set(formats) <= TYPED:
            rows.append({"id": "c3", "messages": RICH})
        return rows
    if kind == "p":
        return [{"id": "p1", "prompt": prompt, "chosen": "Yes.", "rejected": "No.", "margin": 0.5,
                 "score_chosen": 0.9, "score_rejected": 0.4},
                {"id": "p2", "meta": {"judge": "j"}, "prompt": "Single?", "chosen": "Yes!", "rejected": "No!"}]
    if kind == "s":
        return [{"id": "s1", "prompt": prompt, "response": "Fine.", "score": 3.5},
                {"id": "s2", "prompt": "Q", "response": "A", "score": 1}]
    return [{"id": "q1", "prompt": prompt}, {"id": "q2", "prompt": "Just this"}]


ROUND_TRIPS = [(a, b, k) for a, b in itertools.permutations(FORMATS, 2) for k in KINDS[a] if k in KINDS[b]]


@pytest.mark.parametrize(("a", "b", "kind"), ROUND_TRIPS, ids=[f"{a}-{b}-{KIND_NAMES[k]}" for a, b, k in ROUND_TRIPS])
def test_round_trip(tmp_path, a, b, kind):
    base = write_jsonl(tmp_path / "base.jsonl", sample(kind, (a, b)))
    first, there, back = target(tmp_path, a, "a"), target(tmp_path, b, "b"), target(tmp_path, a, "a2")
    convert(base, first, a)
    convert(first, there, b)
    convert(there, back, a)
    assert read_rows(back) == read_rows(first)
    if a == "llamakit":
        assert read_llamakit(back) == read_llamakit(base)


def test_trl_standard_keeps_the_separator_trl_concatenates_with(tmp_path):
    src = write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": M(("user", "What do you do with pens?")), "chosen": "No, sorry!", "rejected": "Write.",
         "margin": 1.5, "score_chosen": 4, "score_rejected": 1}])
    convert(src, tmp_path / "std.jsonl", "trl-standard")
    std = json.loads((tmp_path / "std.jsonl").read_text())
    # TRL's trainers read prompt + chosen as one text: the answer must not be glued to the prompt
    assert std["prompt"] + std["chosen"] == "\n\nHuman: What do you do with pens?\n\nAssistant: No, sorry!"
    assert (std["margin"], std["score_chosen"], std["score_rejected"]) == (1.5, 4, 1)
    convert(tmp_path / "std.jsonl", tmp_path / "hh.jsonl", "hh")
    hh = json.loads((tmp_path / "hh.jsonl").read_text())
    assert hh["chosen"] == "\n\nHuman: What do you do with pens?\n\nAssistant: No, sorry!"
    convert(src, tmp_path / "conv.jsonl", "trl-conversational")
    conv = json.loads((tmp_path / "conv.jsonl").read_text())
    assert (conv["margin"], conv["score_chosen"], conv["score_rejected"]) == (1.5, 4, 1)
    plain = write_jsonl(tmp_path / "plain.jsonl", [{"prompt": "The sky is", "chosen": " blue.", "rejected": " green."}])
    assert read_llamakit(plain) == [{"prompt": "The sky is", "chosen": " blue.", "rejected": " green."}]


def test_text_formats_refuse_what_they_cannot_hold(tmp_path):
    src = write_jsonl(tmp_path / "rich.jsonl", [{"messages": M(("user", "a"), ("assistant", "b"))},
                                                {"messages": RICH}])
    for fmt in ("hh", "sharegpt", "chatllama", "trl-standard"):
        with pytest.raises(UserError, match=rf"row 2: {fmt} holds only role and content: field 'messages\[1\]'"):
            convert(src, target(tmp_path, fmt, "out"), fmt)
        assert not target(tmp_path, fmt, "out").exists()


# ---------------------------------------------------------------------------------------- message fields


def test_openai_message_fields_are_kept():
    parts = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
             {"role": "assistant", "content": "x", "weight": 0}]
    assert check_messages(parts) == [{"role": "user", "content": "ab"}, {"role": "assistant", "content": "x",
                                                                        "weight": 0}]
    assert check_messages(RICH) == RICH
    no_content = [{"role": "assistant", "content": None, "tool_calls": [TOOL_CALL]}]
    assert check_messages(no_content) == [{"role": "assistant", "content": "", "tool_calls": [TOOL_CALL]}]
    as_dict = [{"role": "assistant", "content": "", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": {"x": 1}}}]}]
    assert check_messages(as_dict)[0]["tool_calls"][0]["function"]["arguments"] == "{\"x\": 1}"


@pytest.mark.parametrize(("messages", "field", "text"), [
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], "messages[0].content[0]",
     "image_url parts are not supported (text only)"),
    ([{"role": "user", "content": "x", "weight": 0}], "messages[0].weight", "only on assistant messages"),
    ([{"role": "assistant", "content": "x", "weight": 0.5}], "messages[0].weight", "must be 0 or 1"),
    ([{"role": "user", "content": "x", "name": 3}], "messages[0].name", "must be a string"),
    ([{"role": "assistant", "content": "", "tool_calls": [{"type": "function"}]}],
     "messages[0].tool_calls[0].function", "expected {name, arguments}"),
    ([{"role": "user", "content": "", "tool_calls": [TOOL_CALL]}], "messages[0].tool_calls", "only on assistant"),
])
def test_message_field_errors(messages, field, text):
    with pytest.raises(UserError) as err:
        check_messages(messages, "messages", LOC)
    assert err.value.field == field and text in str(err.value) and str(err.value).startswith("f.jsonl:3: ")


def test_image_part_in_a_file_names_row_and_field(tmp_path):
    src = write_jsonl(tmp_path / "img.jsonl", [
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "look"},
                                                   {"type": "image_url", "image_url": {"url": "x"}}]},
                      {"role": "assistant", "content": "a cat"}]}])
    proc = run_cli("data", "convert", src, tmp_path / "o.jsonl", "--to", "hh", timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip() == (f"error: {src}:1: field 'messages[0].content[1]': image_url parts are not "
                                   "supported (text only)")


def test_trl_prompt_completion_rows():
    row = {"prompt": M(("system", "s"), ("user", "a"), ("assistant", "b"), ("user", "c")),
           "completion": M(("assistant", "d"))}
    assert row_to_messages(row, "f.jsonl", 1) == [*M(("system", "s"), ("user", "a")),
                                                  {"role": "assistant", "content": "b", "weight": 0},
                                                  *M(("user", "c"), ("assistant", "d"))]
    assert row_to_messages(row, "f.jsonl", 1, for_prompt=True) == row["prompt"]
    assert llamakit_row(row, LOC) == {"messages": [*row["prompt"], *row["completion"]]}
    standard = {"prompt": "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant:", "completion": " d"}
    assert row_to_messages(standard, "f.jsonl", 1) == [*M(("user", "a")),
                                                       {"role": "assistant", "content": "b", "weight": 0},
                                                       *M(("user", "c"), ("assistant", "d"))]
    assert llamakit_row(standard, LOC) == {"messages": M(("user", "a"), ("assistant", "b"), ("user", "c"),
                                                         ("assistant", "d"))}
    scored = {"prompt": M(("user", "q")), "completion": M(("assistant", "r")), "score": 2}
    assert llamakit_row(scored, LOC) == {"prompt": "q", "response": "r", "score": 2}


def test_preference_readers_take_prompt_completion_scores(tmp_path):
    src = write_jsonl(tmp_path / "s.jsonl", [
        {"prompt": M(("user", "q")), "completion": M(("assistant", "good")), "score": 4},
        {"prompt": M(("user", "q")), "completion": M(("assistant", "bad")), "score": 1}])
    data = load_preferences(src)
    assert data.format == "chatllama" and [(s.prompt, s.response) for s in data.scored] == [("q", "good"), ("q", "bad")]
