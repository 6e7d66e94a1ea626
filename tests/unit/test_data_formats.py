"""Input readers (Alpaca, self-instruct, HH, ShareGPT, llamakit), `data convert` and `data stats`."""

from __future__ import annotations

import json

import pytest
from support.cli import FIXTURES, run_cli

from toolkit.errors import UserError
from toolkit.generate.formats import convert, read_llamakit, write_rows
from toolkit.generate.inputs import read_prompts
from toolkit.generate.stats import compute, plot
from toolkit.rows import parse_hh, to_hh


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_readers_for_every_input_format(tmp_path):
    rows = [
        {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},  # Alpaca
        {"instruction": "Sort these.", "instances": [{"input": "b, a", "output": "a, b"}]},  # self-instruct seed
        {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello!", "rejected": "\n\nHuman: Hi\n\nAssistant: Go away."},  # HH
        {"conversations": [{"from": "human", "value": "Q?"}, {"from": "gpt", "value": "A."}]},  # ShareGPT
        {"messages": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hey"}]},
        {"prompt": "Plain prompt", "responses": ["one", "two"]},
    ]
    prompts = read_prompts(write_jsonl(tmp_path / "mixed.jsonl", rows))
    assert prompts[0].prompt == "Add the numbers.\n\n2 and 3" and prompts[0].response == "5"
    assert prompts[1].prompt == "Sort these.\n\nb, a" and prompts[1].response == "a, b"
    assert prompts[2].prompt == [{"role": "user", "content": "Hi"}] and prompts[2].responses == ["Hello!", "Go away."]
    assert prompts[3].prompt == [{"role": "user", "content": "Q?"}] and prompts[3].response == "A."
    assert prompts[4].prompt[0]["role"] == "system"
    assert prompts[5].responses == ["one", "two"]
    assert [p.line for p in prompts] == [1, 2, 3, 4, 5, 6]
    assert len(read_prompts(FIXTURES / "self-instruct-seeds-24.jsonl", limit=5)) == 5


def test_json_array_errors_name_the_row(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text(json.dumps([{"instruction": "ok"}, {"instruction": ""}]))
    with pytest.raises(UserError, match=r"rows.json \(row 2\): field 'instruction': empty text"):
        read_prompts(path)


def test_hh_text_round_trip():
    text = "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: How are you?\n\nAssistant: Fine."
    messages = parse_hh(text)
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant"]
    assert to_hh(messages) == text


def test_convert_hh_to_trl_and_back(tmp_path):
    src = FIXTURES / "hh-harmless-6.jsonl"
    assert convert(src, tmp_path / "trl.jsonl", "trl-conversational") == 6
    trl = [json.loads(line) for line in (tmp_path / "trl.jsonl").read_text().splitlines()]
    assert trl[0]["chosen"][0]["role"] == "assistant" and trl[0]["prompt"][-1]["role"] == "user"
    convert(tmp_path / "trl.jsonl", tmp_path / "hh.jsonl", "hh")
    original = [json.loads(line) for line in src.read_text().splitlines()]
    back = [json.loads(line) for line in (tmp_path / "hh.jsonl").read_text().splitlines()]
    assert back == [{"chosen": r["chosen"], "rejected": r["rejected"]} for r in original]
    convert(src, tmp_path / "std.jsonl", "trl-standard")
    std = json.loads((tmp_path / "std.jsonl").read_text().splitlines()[0])
    # TRL reads prompt + chosen as one text: HH text, the answer after the separator
    assert std["prompt"] + std["chosen"] == original[0]["chosen"]


def test_convert_conversations_everywhere(tmp_path):
    conv = write_jsonl(tmp_path / "conv.jsonl", [
        {"id": "a", "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                                 {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "See you"}],
         "meta": {"model": "m", "template": {"assistant": "x"}}},
        {"id": "b", "messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}],
         "meta": {"model": "m"}}])
    convert(conv, tmp_path / "sg.json", "sharegpt")
    sharegpt = json.loads((tmp_path / "sg.json").read_text())
    assert sharegpt[0]["conversations"][1] == {"from": "gpt", "value": "Hello"}
    convert(tmp_path / "sg.json", tmp_path / "back.jsonl", "llamakit")
    back = read_llamakit(tmp_path / "back.jsonl")
    assert [r["messages"] for r in back] == [r["messages"] for r in read_llamakit(conv)]
    convert(conv, tmp_path / "actor.json", "chatllama")
    actor = json.loads((tmp_path / "actor.json").read_text())
    assert actor[0] == {"id": "a", "meta": {"model": "m", "template": {"assistant": "x"}},
                        "user_input": "User: Hi\n\nAssistant: Hello\n\nUser: Bye", "completion": "See you"}
    convert(conv, tmp_path / "c.parquet", "parquet")
    assert [r["id"] for r in read_llamakit(tmp_path / "c.parquet")] == ["a", "b"]
    assert read_llamakit(tmp_path / "c.parquet")[0]["meta"]["template"] == {"assistant": "x"}
    convert(conv, tmp_path / "ds", "hf")
    import datasets

    assert datasets.load_from_disk(str(tmp_path / "ds"))["id"] == ["a", "b"]
    with pytest.raises(UserError, match="hh holds"):
        write_rows([{"prompt": "x", "response": "y", "score": 3}], tmp_path / "x.jsonl", "hh")


def test_data_stats_table_and_png(tmp_path):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [
        {"id": str(i), "prompt": f"q{i}", "chosen": "a long good answer " * (i + 1), "rejected": "short",
         "score_chosen": 0.9, "score_rejected": 0.2 + i / 20, "margin": 0.7 - i / 20} for i in range(8)])
    numbers = compute(pairs)
    assert numbers["rows"] == 8 and numbers["kinds"] == "preference 8" and numbers["unique ids"] == 8
    assert numbers["margins max"] == 0.7 and numbers["chosen longer than rejected"] == "100.0%"
    png = plot(numbers, tmp_path / "stats.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    proc = run_cli("data", "stats", pairs, "--json", timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["rows"] == 8 and (tmp_path / "pairs.stats.png").is_file()


def test_data_convert_cli_bad_row(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"chosen": "x", "rejected": "y"}\n')
    proc = run_cli("data", "convert", bad, tmp_path / "out.jsonl", "--to", "hh", timeout=60)
    assert proc.returncode == 2 and f"{bad}:1: field 'prompt': missing" in proc.stderr
