"""Preference formats in, one text format out; bad input gives one line naming file, line and field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from support.cli import FIXTURES, run_cli

from toolkit.errors import UserError
from toolkit.reward.data import detect_format, load_preferences, pairs_from_scored

HH = FIXTURES / "hh-harmless-200.jsonl"


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def test_hh_text_splits_at_the_last_assistant_turn_and_joins_back():
    data = load_preferences(HH)
    assert data.format == "hh" and len(data.pairs) == 200
    row = json.loads(HH.read_text(encoding="utf-8").splitlines()[0])
    pair = data.pairs[0]
    assert pair.prompt.startswith("\n\nHuman:") and "\n\nAssistant:" not in pair.chosen
    assert pair.chosen_text == row["chosen"] and pair.rejected_text == row["rejected"]
    assert pair.line == 1


def test_llamakit_string_rows_look_like_hh(tmp_path):
    row = {"prompt": "Hi?", "chosen": "Hello!", "rejected": "Go away.", "margin": 1.5}
    f = write_jsonl(tmp_path / "p.jsonl", [row])
    data = load_preferences(f)
    assert data.format == "preference"
    assert data.pairs[0].chosen_text == "\n\nHuman: Hi?\n\nAssistant: Hello!"
    assert data.pairs[0].margin == 1.5


def test_trl_conversational_rows(tmp_path):
    row = {"prompt": [{"role": "system", "content": "Be nice."}, {"role": "user", "content": "Hi?"}],
           "chosen": [{"role": "assistant", "content": "Hello!"}],
           "rejected": [{"role": "assistant", "content": "Go away."}]}
    multi = {"prompt": [{"role": "user", "content": "A"}, {"role": "assistant", "content": "B"},
                        {"role": "user", "content": "C"}],
             "chosen": [{"role": "assistant", "content": "D"}], "rejected": [{"role": "assistant", "content": "E"}]}
    data = load_preferences(write_jsonl(tmp_path / "c.jsonl", [row, multi]))
    assert data.format == "preference"
    assert data.pairs[0].chosen_text == "\n\nHuman: Hi?\n\nAssistant: Hello!"  # system left out, like the PPO loop
    assert data.pairs[1].rejected_text == "\n\nHuman: A\n\nAssistant: B\n\nHuman: C\n\nAssistant: E"


def test_trl_implicit_prompt_rows(tmp_path):
    conv = {"chosen": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello!"}],
            "rejected": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "No."}]}
    data = load_preferences(write_jsonl(tmp_path / "i.jsonl", [conv]))
    assert data.format == "implicit"
    assert (data.pairs[0].prompt, data.pairs[0].chosen, data.pairs[0].rejected) == ("Hi?", "Hello!", "No.")
    text = {"chosen": "The sky is blue.", "rejected": "The sky is green."}
    data = load_preferences(write_jsonl(tmp_path / "t.jsonl", [text]))
    assert data.format == "implicit"
    assert (data.pairs[0].prompt, data.pairs[0].chosen, data.pairs[0].rejected) == ("The sky is", "blue.", "green.")


def test_chatllama_scored_rows_and_pairs_from_them(tmp_path):
    rows = [{"user_input": "Q1", "completion": "good", "score": 4.5},
            {"user_input": "Q1", "completion": "bad", "score": "1"},
            {"user_input": "Q2", "completion": "only one", "score": 3}]
    data = load_preferences(write_jsonl(tmp_path / "s.jsonl", rows))
    assert data.format == "chatllama" and [r.score for r in data.scored] == [4.5, 1.0, 3.0]
    pairs = pairs_from_scored(data.scored)
    assert [(p.prompt, p.chosen, p.rejected) for p in pairs] == [("Q1", "good", "bad")]


def test_datasets_directory(tmp_path):
    import datasets

    rows = [json.loads(line) for line in HH.read_text(encoding="utf-8").splitlines()[:5]]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    data = load_preferences(tmp_path / "ds")
    assert data.format == "hh" and len(data.pairs) == 5
    with pytest.raises(UserError, match=r"\(row 2\): field 'rejected'"):
        bad = [{"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: a\n\nAssistant: c"},
               {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: a\n\nAssistant: b"}]
        datasets.Dataset.from_list(bad).save_to_disk(str(tmp_path / "bad"))
        load_preferences(tmp_path / "bad")


def test_detection_rules():
    assert detect_format({"prompt": "p", "chosen": "a", "rejected": "b"}) == "preference"
    assert detect_format({"chosen": "\n\nHuman: x\n\nAssistant: y", "rejected": "z"}) == "hh"
    assert detect_format({"user_input": "p", "completion": "a", "score": 1}) == "chatllama"
    with pytest.raises(UserError, match="cannot tell the format"):
        detect_format({"text": "x"}, "f.jsonl", 1)


def test_json_array_errors_name_the_row(tmp_path):
    f = tmp_path / "a.json"
    f.write_text(json.dumps([{"prompt": "p", "chosen": "a", "rejected": "b"}, {"prompt": "p", "chosen": "a"}]))
    with pytest.raises(UserError, match=r"a\.json \(row 2\): field 'rejected': missing"):
        load_preferences(f)


GOOD = {"prompt": "Hi?", "chosen": "Hello!", "rejected": "Go away."}


@pytest.mark.parametrize("name, content, expected", [
    ("empty", [""], r"empty\.jsonl: file is empty"),
    ("invalid-json", [GOOD, GOOD, '{"prompt": "x", "chosen": '], r"invalid-json\.jsonl:3: invalid JSON"),
    ("missing-rejected", [GOOD, {"prompt": "p", "chosen": "a"}],
     r"missing-rejected\.jsonl:2: field 'rejected': missing"),
    ("identical", [GOOD, {"prompt": "p", "chosen": "same", "rejected": "same"}],
     r"identical\.jsonl:2: field 'rejected': identical to 'chosen'"),
    ("non-string", [GOOD, GOOD, {"prompt": "p", "chosen": 42, "rejected": "b"}],
     r"non-string\.jsonl:3: field 'chosen': expected a string or a list of messages, got int"),
    ("one-pair", [GOOD], r"one-pair\.jsonl: only 1 pair\(s\); training needs at least 2"),
])
def test_bad_input_is_one_line_through_the_cli(tmp_path, name, content, expected):
    import re

    f = tmp_path / f"{name}.jsonl"
    if content == [""]:
        f.write_text("")
    else:
        write_jsonl(f, content)
    out = tmp_path / "rm"
    proc = run_cli("train-reward", "--data", f, "--out", out, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert re.search(expected, lines[0]), lines[0]
    assert "Traceback" not in proc.stderr
    assert not out.exists()


def test_skip_bad_rows_reads_the_rest_and_names_each_row_set_aside(tmp_path):
    """A row without `rejected`, a line that is a list and a cut last line (a killed writer): without the flag the
    first line that does not parse stops the read as a BadRow; with it the good rows load and each bad one is named
    by file and line (the lines that are no JSON object first, as the file is read before its rows)."""
    from toolkit.errors import BadRow

    f = write_jsonl(tmp_path / "p.jsonl", [GOOD, {"prompt": "p", "chosen": "a"}, GOOD, "[1, 2]",
                                           '{"prompt": "x", "chosen": '])
    with pytest.raises(BadRow, match=r"p\.jsonl:4: row is list, expected a JSON object"):
        load_preferences(f)
    with pytest.raises(BadRow, match=r"p\.jsonl:2: field 'rejected': missing"):
        load_preferences(write_jsonl(f, [GOOD, {"prompt": "p", "chosen": "a"}]))
    f = write_jsonl(tmp_path / "p.jsonl", [GOOD, {"prompt": "p", "chosen": "a"}, GOOD, "[1, 2]",
                                           '{"prompt": "x", "chosen": '])
    data = load_preferences(f, skip_bad_rows=True)
    assert [pair.line for pair in data.pairs] == [1, 3]
    assert [bad.split(": ")[0] for bad in data.bad_rows] == [f"{f}:4", f"{f}:5", f"{f}:2"]  # lines first, then rows
    assert "field 'rejected': missing" in data.bad_rows[2] and "invalid JSON" in data.bad_rows[1]

    none_good = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "p", "chosen": "a"}, "[1]"])
    with pytest.raises(UserError, match=r"bad\.jsonl: no good row: all 2 set aside, the first: "):
        load_preferences(none_good, skip_bad_rows=True)


def test_bad_margin_and_score_fields(tmp_path):
    f = write_jsonl(tmp_path / "m.jsonl", [{**GOOD, "margin": "big"}])
    with pytest.raises(UserError, match=r"m\.jsonl:1: field 'margin': expected a number"):
        load_preferences(f)
    f = write_jsonl(tmp_path / "s.jsonl", [{"user_input": "p", "completion": "a", "score": "high"}])
    with pytest.raises(UserError, match=r"s\.jsonl:1: field 'score'"):
        load_preferences(f)
    f = write_jsonl(tmp_path / "h.jsonl", [{"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "no turns"}])
    with pytest.raises(UserError, match=r"h\.jsonl:1: field 'rejected': no 'Assistant:' turn"):
        load_preferences(f)


def _ranked_row(prompt: str, scored: list[tuple[str, float]], chosen: str, rejected: str) -> dict:
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected,
            "meta": {"candidates": [{"text": t, "score": s} for t, s in scored]}}


def test_candidate_pairs_are_every_two_candidates_that_score_apart(tmp_path):
    """K candidates as `generate-data preferences` keeps them: every two that score apart become a pair, better
    first, their score difference the margin; the row's own pair, ties and a candidate without a numeric score give
    none, and a row without candidates keeps just its pair. Without the flag the file reads as before."""
    rows = [_ranked_row("Q1", [("a", 1.0), ("b", 0.5), ("c", 0.5), ("d", 0.0), ("e", True)], "a", "d"),
            {"prompt": "Q2", "chosen": "x", "rejected": "y"}]
    path = write_jsonl(tmp_path / "prefs.jsonl", rows)
    assert [(p.chosen, p.rejected) for p in load_preferences(path).pairs] == [("a", "d"), ("x", "y")]
    pairs = load_preferences(path, candidate_pairs=True).pairs
    got = [(p.prompt, p.chosen, p.rejected, p.margin, p.line) for p in pairs]
    assert got == [("Q1", "a", "d", 0.0, 1),
                   ("Q1", "a", "b", 0.5, 1), ("Q1", "a", "c", 0.5, 1), ("Q1", "b", "d", 0.5, 1),
                   ("Q1", "c", "d", 0.5, 1), ("Q2", "x", "y", 0.0, 2)]


def test_candidate_pairs_hold_out_whole_prompts(tmp_path):
    """A prompt's comparisons share answers, so --eval-split holds out prompts: no prompt is on both sides, and
    every pair is on one side."""
    from toolkit.reward.train import TrainConfig, _load

    rows = [_ranked_row(f"Q{i}", [(f"good {i}", 1.0), (f"fair {i}", 0.5), (f"bad {i}", 0.0)], f"good {i}", f"bad {i}")
            for i in range(10)]
    path = write_jsonl(tmp_path / "prefs.jsonl", rows)
    cfg = TrainConfig(data=str(path), out=str(tmp_path / "rm"), candidate_pairs=True, eval_split=0.3)
    train, _, heldout, fmt, _ = _load(cfg, [])
    assert fmt == "preference" and len(train) + len(heldout) == 10 * 3
    assert {p.prompt for p in train}.isdisjoint({p.prompt for p in heldout})
    assert len({p.prompt for p in heldout}) == 3


def test_candidate_pairs_without_candidates_is_one_line_through_the_cli(tmp_path):
    out = tmp_path / "rm"
    proc = run_cli("train-reward", "--data", HH, "--out", out, "--candidate-pairs", timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "--candidate-pairs: no row keeps two candidates" in lines[0], proc.stderr
    assert "hh-harmless-200.jsonl" in lines[0] and not out.exists()
