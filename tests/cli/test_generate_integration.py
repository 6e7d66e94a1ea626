"""generate-data through the real CLI against a real `llamakit serve` (tiny random LLaMA) with the real
openai and langchain-openai clients, and in-process with an hf: teacher."""

from __future__ import annotations

import json
import shutil

from support.cli import API_KEY, FIXTURES, run_cli

from toolkit.generate import instructions, preferences
from toolkit.generate.common import Sampling
from toolkit.generate.runner import RunOptions

ENV = {"LLAMAKIT_TEST_KEY": API_KEY}


def rows_of(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_conversations_with_openai_client_against_llamakit_serve(tiny_server, tmp_path):
    out = tmp_path / "conv.jsonl"
    args = ("generate-data", "conversations", "--prompts", FIXTURES / "self-instruct-seeds-24.jsonl", "--limit", "3",
            "--out", out, "--teacher", "openai:tiny", "--base-url", tiny_server.url, "--api-key-env",
            "LLAMAKIT_TEST_KEY", "--turns", "2", "--window", "1", "--max-tokens", "6", "--user-max-tokens", "6",
            "--concurrency", "3", "--export", "sharegpt", "--json")
    proc = run_cli(*args, env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["rows_done"] == 3
    rows = rows_of(out)
    assert len(rows) == 3 and len({r["id"] for r in rows}) == 3
    for row in rows:
        assert [m["role"] for m in row["messages"]] == ["user", "assistant", "user", "assistant"]
        assert row["meta"]["model"] == "tiny" and row["meta"]["calls"] == 3
        assert 0 < row["meta"]["completion_tokens"] <= 18
        assert API_KEY not in json.dumps(row)
    sharegpt = json.loads((tmp_path / "conv.sharegpt.json").read_text())
    assert [t["from"] for t in sharegpt[0]["conversations"]] == ["human", "gpt", "human", "gpt"]
    # the same command again: resumed, nothing asked
    again = run_cli(*args, env=ENV, timeout=300)
    assert json.loads(again.stdout)["rows_skipped_done_before"] == 3 and json.loads(again.stdout)["requests"] == 0


def test_preferences_with_langchain_client_against_llamakit_serve(tiny_server, tmp_path):
    out = tmp_path / "prefs.jsonl"
    kwargs = {"base_url": tiny_server.url, "api_key": API_KEY, "model": "tiny", "timeout": 62}
    proc = run_cli("generate-data", "preferences", "--prompts", FIXTURES / "self-instruct-seeds-24.jsonl",
                   "--limit", "3",
                   "--out", out, "--teacher", "langchain:langchain_openai:ChatOpenAI", "--teacher-kwargs",
                   json.dumps(kwargs), "--num-candidates", "3", "--temperatures", "0.5,1.5", "--max-tokens", "12",
                   "--scorer", "rules:length,repetition,truncation", "--json", timeout=300)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["rows_done"] + summary["rows_dropped"] == 3 and summary["rows_failed"] == 0
    assert summary["requests"] == 9
    for row in rows_of(out):
        assert isinstance(row["prompt"], str) and isinstance(row["chosen"], str) and isinstance(row["rejected"], str)
        assert row["score_chosen"] - row["score_rejected"] == row["margin"] or abs(
            row["score_chosen"] - row["score_rejected"] - row["margin"]) < 1e-3
        assert row["margin"] > 0
        assert set(row["meta"]["chosen"]["rules"]) == {"length", "repetition", "truncation"}
        assert [c["temperature"] for c in row["meta"]["candidates"]] == [0.5, 1.5, 0.5]


def test_hf_teacher_in_process_for_preferences_and_instructions(tiny_llama_dir, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "Name a fruit."}\n{"messages": [{"role": "user", "content": "Hi!"}]}\n')
    prefs = preferences.run(prompts, tmp_path / "p.jsonl", teachers=[f"hf:{tiny_llama_dir}"],
                            judging=preferences.Judging(scorer="rules:length,repetition"), num_candidates=2,
                            temperatures=(0.7, 1.3), sampling=Sampling(max_tokens=8),
                            options=RunOptions(concurrency=4, show_progress=False))
    assert prefs.done + prefs.dropped == 2 and prefs.usage.requests == 4 and prefs.failed == 0
    seeds = tmp_path / "seeds.jsonl"
    shutil.copy(FIXTURES / "self-instruct-seeds-24.jsonl", seeds)
    summary = instructions.run(seeds, tmp_path / "inst.jsonl", teacher=f"hf:{tiny_llama_dir}",
                               plan=instructions.Plan(num_instructions=2, max_requests=6),
                               sampling=Sampling(max_tokens=12, temperature=1.0),
                               options=RunOptions(concurrency=3, show_progress=False))
    assert summary.usage.requests >= 1 and summary.failed == 0
    kept = rows_of(tmp_path / "inst.jsonl") if (tmp_path / "inst.jsonl").exists() else []
    dropped = rows_of(tmp_path / "inst.dropped.jsonl") if (tmp_path / "inst.dropped.jsonl").exists() else []
    assert len(kept) + len(dropped) == summary.usage.requests  # random weights write junk: mostly filtered
    for row in dropped:
        assert row["dropped"]
