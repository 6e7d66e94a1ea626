"""generate-data against a loopback API that fails on purpose: retries, failed rows, --retry-failed,
kill -9 and resume, bad input rows. The real CLI in a subprocess, the real openai client."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
from support.cli import LLAMAKIT, ROOT, run_cli
from support.fault_server import running_fault_server

from toolkit.errors import EXIT_ROWS_FAILED

RETRY_AFTER = 0.6


@pytest.fixture(scope="module")
def fault_server():
    with running_fault_server(latency=0.02, hang=4.0, retry_after=RETRY_AFTER) as server:
        yield server


def write_prompts(path: Path, prompts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    return path


def rows_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def answers_cmd(prompts: Path, out: Path, server, *extra: str) -> list[str]:
    return ["generate-data", "conversations", "--prompts", prompts, "--out", out, "--teacher", "openai:fault",
            "--base-url", server.url, "--turns", "1", "--json", *extra]


def test_faults_end_as_rows_or_failed_rows_then_retry_failed_completes(tmp_path, fault_server):
    plain = [f"faults-test plain question {i}" for i in range(6)]
    recovering = {
        "429ra": "faults-test rate limited <<faults:429ra>>",
        "429": "faults-test rate limited, no header <<faults:429>>",
        "5xx": "faults-test server errors <<faults:500,502>>",
        "timeout": "faults-test slow server <<faults:timeout>>",
        "reset": "faults-test connection reset <<faults:reset>>",
        "malformed": "faults-test broken JSON <<faults:malformed>>",
        "empty": "faults-test no choices <<faults:empty,503>>",
        "cut": "faults-test answer cut mid-way <<faults:cut>>",
        "never": "faults-test server never answers <<faults:never>>",
    }
    failing = {
        "three 500s": "faults-test down for a while <<faults:500,500,500>>",  # 3 attempts allowed: fails once
        "400": "faults-test bad request <<faults:400>>",  # not retried: fails at once
    }
    prompts = write_prompts(tmp_path / "prompts.jsonl", plain + list(recovering.values()) + list(failing.values()))
    out = tmp_path / "answers.jsonl"
    flags = ("--concurrency", "6", "--max-retries", "2", "--timeout", "1.5", "--backoff-base", "0.05",
             "--backoff-max", "0.2")
    first = run_cli(*answers_cmd(prompts, out, fault_server, *flags), timeout=120)
    assert first.returncode == EXIT_ROWS_FAILED, first.stderr  # finished, but not whole
    summary = json.loads(first.stdout)
    assert summary["rows_done"] == 15 and summary["rows_failed"] == 2, summary

    done = {r["messages"][0]["content"] for r in rows_of(out)}
    assert done == set(plain) | set(recovering.values())
    failed = rows_of(tmp_path / "answers.failed.jsonl")
    errors = {f["inputs"]["prompt"]: f["error"] for f in failed}
    assert set(errors) == set(failing.values())
    three_500s = errors[failing["three 500s"]]
    assert "InternalServerError" in three_500s and "after 3 attempts" in three_500s
    assert "BadRequestError" in errors[failing["400"]] and "after 1 attempts" in errors[failing["400"]]

    stats = fault_server.stats()
    assert stats["requests"][failing["400"]] == 1  # a 400 is not retried
    assert stats["requests"][recovering["5xx"]] == 3
    t_429 = stats["times"][recovering["429ra"]]
    assert t_429[1] - t_429[0] >= RETRY_AFTER * 0.95  # Retry-After honoured although back-off is 0.05 s

    # the same command again: nothing is requested; the failed rows are skipped, not lost
    before = stats["total"]
    again = run_cli(*answers_cmd(prompts, out, fault_server, *flags), timeout=60)
    assert again.returncode == EXIT_ROWS_FAILED  # still not whole until the failed rows are retried
    assert json.loads(again.stdout)["rows_skipped_done_before"] == 15
    assert json.loads(again.stdout)["rows_failed"] == 2
    assert fault_server.stats()["total"] == before

    # --retry-failed asks only for the failed rows, and they complete
    retried = run_cli(*answers_cmd(prompts, out, fault_server, *flags, "--retry-failed"), timeout=60)
    assert retried.returncode == 0, retried.stderr
    assert json.loads(retried.stdout)["rows_done"] == 2
    rows = rows_of(out)
    assert len(rows) == 17 and len({r["id"] for r in rows}) == 17
    assert not (tmp_path / "answers.failed.jsonl").exists()
    assert fault_server.stats()["total"] - before == 2  # one more request each, and both succeed
    for row in rows:
        assert row["meta"]["model"] == "fault" and row["meta"]["finish_reason"] == "stop"
        assert row["meta"]["completion_tokens"] > 0 and "template" in row["meta"]


FAULT_KINDS = ("429ra", "429", "500", "502", "503", "timeout", "reset", "malformed", "cut", "empty", "never")


def test_every_fault_that_never_clears_ends_as_a_failed_row_and_is_not_asked_again(tmp_path, fault_server):
    plain = [f"always-test plain question {i}" for i in range(3)]
    failing = {kind: f"always-test keeps failing {kind} <<faults:always-{kind}>>" for kind in FAULT_KINDS}
    prompts = write_prompts(tmp_path / "prompts.jsonl", plain + list(failing.values()))
    out = tmp_path / "answers.jsonl"
    flags = ("--concurrency", "8", "--max-retries", "1", "--timeout", "1.0", "--backoff-base", "0.05",
             "--backoff-max", "0.2")
    first = run_cli(*answers_cmd(prompts, out, fault_server, *flags), timeout=120)
    assert first.returncode == EXIT_ROWS_FAILED, first.stderr
    summary = json.loads(first.stdout)
    assert summary["rows_done"] == len(plain) and summary["rows_failed"] == len(failing), summary
    assert {r["messages"][0]["content"] for r in rows_of(out)} == set(plain)
    errors = {f["inputs"]["prompt"]: f["error"] for f in rows_of(tmp_path / "answers.failed.jsonl")}
    assert set(errors) == set(failing.values()) and all(errors.values()), errors
    stats = fault_server.stats()
    assert all(stats["ok"][prompt] == 1 for prompt in plain)  # answered once each

    before = stats["total"]  # the same command again: answered rows are done, failed rows wait for --retry-failed
    again = run_cli(*answers_cmd(prompts, out, fault_server, *flags), timeout=60)
    assert again.returncode == EXIT_ROWS_FAILED, again.stderr
    assert fault_server.stats()["total"] == before


def test_a_server_that_never_answers_times_out_every_row_and_ask_says_so(tmp_path):
    """A socket that accepts connections and never reads or answers."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)
        url = f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
        prompts = write_prompts(tmp_path / "prompts.jsonl", [f"silent {i}" for i in range(4)])
        run = run_cli("generate-data", "conversations", "--prompts", prompts, "--out", tmp_path / "answers.jsonl",
                      "--teacher", "openai:fault", "--base-url", url, "--turns", "1", "--timeout", "1",
                      "--max-retries", "1", "--backoff-base", "0.05", timeout=90)
        assert run.returncode == EXIT_ROWS_FAILED, run.stderr
        failed = rows_of(tmp_path / "answers.failed.jsonl")
        assert len(failed) == 4 and all("Timeout" in f["error"] for f in failed), failed
        ask = run_cli("ask", "hello", "--teacher", "openai:x", "--base-url", url, "--timeout", "1", timeout=60)
    assert ask.returncode != 0 and "Traceback" not in ask.stderr
    last = ask.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and url in last and "Timeout" in last, ask.stderr


def test_kill_9_then_same_command_finishes_without_asking_twice(tmp_path):
    n = 60
    prompts = write_prompts(tmp_path / "prompts.jsonl", [f"kill-test question {i}" for i in range(n)])
    out = tmp_path / "answers.jsonl"
    with running_fault_server(latency=0.15) as server:
        args = [*LLAMAKIT, *map(str, answers_cmd(prompts, out, server, "--concurrency", "4"))]
        proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                env={**os.environ})
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if out.exists() and out.read_bytes().count(b"\n") >= 12:
                break
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        assert proc.returncode == -signal.SIGKILL
        written = out.read_bytes()
        finished = []
        for line in written.split(b"\n"):
            try:
                finished.append(json.loads(line)["messages"][0]["content"])
            except ValueError:
                pass  # a torn last line, if the kill landed mid-write
        assert 12 <= len(finished) < n

        again = run_cli(*answers_cmd(prompts, out, server, "--concurrency", "4"), timeout=120)
        assert again.returncode == 0, again.stderr
        lines = out.read_text().splitlines()
        rows = [json.loads(line) for line in lines]  # every line parses: no torn line left
        assert len(rows) == n and len({r["id"] for r in rows}) == n
        assert {r["messages"][0]["content"] for r in rows} == {f"kill-test question {i}" for i in range(n)}
        stats = server.stats()
        for prompt in finished:
            assert stats["requests"][prompt] == 1, prompt  # a finished row is never requested again
        assert stats["total"] <= n + 4  # at most the requests in flight at the kill were asked twice


def test_refused_key_stops_the_run_and_keeps_finished_rows(tmp_path, fault_server):
    prompts = write_prompts(tmp_path / "prompts.jsonl", ["refused-test fine"])
    out = tmp_path / "answers.jsonl"
    assert run_cli(*answers_cmd(prompts, out, fault_server), timeout=60).returncode == 0
    write_prompts(prompts, ["refused-test fine", "refused-test <<faults:always-401>>", "refused-test later"])
    proc = run_cli(*answers_cmd(prompts, out, fault_server, "--concurrency", "1"), timeout=60)
    assert proc.returncode == 2 and "refused every request" in proc.stderr and "AuthenticationError" in proc.stderr
    assert fault_server.stats()["requests"]["refused-test <<faults:always-401>>"] == 1  # not retried
    assert [r["messages"][0]["content"] for r in rows_of(out)] == ["refused-test fine"]


@pytest.mark.parametrize("content, message", [
    ('{"prompt": "fine"}\n{"prompt": "broken\n', ":2: invalid JSON"),
    ('{"prompt": "fine"}\n\n{"question": "where?"}\n', ":3: no prompt field"),
    ('{"prompt": "fine"}\n{"prompt": "   "}\n', ":2: field 'prompt': empty text"),
    ('{"messages": [{"role": "user", "content": "hi"}, {"role": "robot", "content": "x"}]}\n',
     ":1: field 'messages[1].role': unknown role"),
])
def test_bad_input_row_stops_before_any_request(tmp_path, fault_server, content, message):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(content)
    before = fault_server.stats()["total"]
    proc = run_cli(*answers_cmd(prompts, tmp_path / "out.jsonl", fault_server), timeout=60)
    assert proc.returncode == 2
    assert f"{prompts}{message}" in proc.stderr and "Traceback" not in proc.stderr
    assert fault_server.stats()["total"] == before
    assert not (tmp_path / "out.jsonl").exists()


def test_unparsable_scores_are_retried_then_kept_as_failed_rows(tmp_path, fault_server):
    rows = [{"prompt": "scores-test What is 2+2?", "response": "It is four, because two and two make four."},
            {"prompt": "scores-test <<judge:garbage>> Name a colour.", "response": "Blue."}]
    src = tmp_path / "answers.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "scores.jsonl"
    proc = run_cli("generate-data", "scores", "--prompts", src, "--out", out, "--judge", "openai:fault",
                   "--base-url", fault_server.url, "--max-retries", "2", "--backoff-base", "0.01", "--json",
                   timeout=60)
    assert proc.returncode == EXIT_ROWS_FAILED, proc.stderr
    assert json.loads(proc.stdout)["rows_failed"] == 1
    scored = rows_of(out)
    assert len(scored) == 1 and scored[0]["score"] == 5 and scored[0]["response"] == rows[0]["response"]
    failed = rows_of(tmp_path / "scores.failed.jsonl")
    assert len(failed) == 1 and "Unparsable" in failed[0]["error"] and "after 3 attempts" in failed[0]["error"]
    assert failed[0]["inputs"]["response"] == "Blue."


def test_pairwise_preferences_with_position_swap_end_to_end(tmp_path, fault_server):
    rows = [{"prompt": "pairs-test Explain rain.", "responses": ["Water falls.", "Water vapour condenses into drops "
                                                               "that fall when they grow heavy."]},
            {"prompt": "pairs-test Say hi.", "responses": ["Hello there.", "Hi there."]},  # same length: tie
            {"prompt": "pairs-test <<judge:always-A>> Explain snow.", "responses": ["Ice.", "Ice crystals fall."]}]
    src = tmp_path / "cands.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "pairs.jsonl"
    proc = run_cli("generate-data", "preferences", "--prompts", src, "--out", out, "--judge", "openai:fault",
                   "--base-url", fault_server.url, "--pairwise", "--export", "trl-conversational", "--json",
                   timeout=60)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["rows_done"] == 1 and summary["rows_dropped"] == 2  # a real tie and a position-biased judge
    (pair,) = rows_of(out)
    assert pair["chosen"].startswith("Water vapour") and pair["rejected"] == "Water falls."
    assert pair["score_chosen"] == 1.0 and pair["score_rejected"] == 0.0 and pair["margin"] == 1.0
    assert pair["meta"]["verdicts"][0]["first"] == "B" and pair["meta"]["verdicts"][0]["swapped"] == "A"
    dropped = rows_of(tmp_path / "pairs.dropped.jsonl")
    assert {d["dropped"] for d in dropped} == {"tie"}
    trl = rows_of(tmp_path / "pairs.trl-conversational.jsonl")
    assert trl[0]["prompt"] == [{"role": "user", "content": "pairs-test Explain rain."}]
    assert trl[0]["chosen"] == [{"role": "assistant", "content": pair["chosen"]}]


def test_rpm_limit_and_scores_that_need_answers_in_process(tmp_path, fault_server):
    from toolkit.generate import scores
    from toolkit.generate.common import TeacherOptions
    from toolkit.generate.runner import RunOptions

    src = write_prompts(tmp_path / "prompts.jsonl", [f"rpm-test question {i}" for i in range(3)])
    start = time.monotonic()
    summary = scores.run(src, tmp_path / "scores.jsonl", judge="openai:fault", teacher="openai:fault",
                         options=RunOptions(concurrency=8, rpm=120, show_progress=False),
                         teacher_options=TeacherOptions(base_url=fault_server.url))
    elapsed = time.monotonic() - start
    assert summary.done == 3 and summary.usage.requests == 6  # an answer, then its score
    assert elapsed >= 1.8  # 120/min = 2/s with a 2-request bucket: 6 requests need 2 s
    for row in rows_of(tmp_path / "scores.jsonl"):
        assert row["response"].startswith("Answer:") and 0 <= row["score"] <= 5
        assert row["meta"]["response_meta"]["model"] == "fault" and row["meta"]["calls"] == 2
