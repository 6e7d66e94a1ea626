"""`llamakit eval-policy` (issue 15, part 2) on tiny random LLaMAs, through the real CLI in this process.

The truths checked: a policy against itself (same seeds) gives the same answers, win rate ½ exactly and KL 0
exactly (POLICY's log-probs teacher-forced, as BASE's); a perturbed copy gives KL > 0, the same from the
sampler's log-probs (the default) as from a teacher-forced pass, and each answer's KL equals log-probs summed
by hand from a plain forward; the reported means (per constraint family, reward model) equal the ones
recomputed from answers.jsonl; a served BASE (the real `llamakit serve`) works with the KL reported
unavailable; bad input is one line and exit 2, and --out never replaces what the user had. With --best-of N
each kept answer is the candidate the reward model scores highest, and --best-of 1 is the run without the
flag.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
from support.cli import API_KEY, FIXTURES, cli

from toolkit.eval_policy import (
    Z95,
    answer_logprobs,
    best_of_kl_bound,
    candidate_seed,
    family_means,
    paired_outcomes,
    resolve_source,
    row_seed,
    wilson_interval,
    win_rate,
)

TINY = ("--max-new-tokens", "12", "--batch-size", "8")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("eval-policy")


@pytest.fixture(scope="module")
def prompts(work) -> Path:
    """8 Alpaca instructions with 1..3 verifiable constraints each (`generate-data constraints`)."""
    out = work / "heldout.jsonl"
    rc, _, err = cli("generate-data", "constraints", "--prompts", FIXTURES / "alpaca-24.json", "--out", out,
                     "--limit", "8", "--seed", "3")
    assert rc == 0, err
    return out


@pytest.fixture(scope="module")
def perturbed_run(tiny_llama_dir, work) -> Path:
    """An rlhf-style run directory whose policy/ is the tiny model with its final norm scaled (logits × 4)."""
    import torch

    from toolkit.models import load_causal_lm

    model, tokenizer = load_causal_lm(tiny_llama_dir)
    with torch.no_grad():
        model.model.norm.weight.mul_(4.0)
    run = work / "run"
    model.save_pretrained(run / "policy", safe_serialization=True)
    tokenizer.save_pretrained(run / "policy")
    return run


@pytest.fixture(scope="module")
def tiny_rm(tiny_llama_dir, work) -> Path:
    rm = work / "rm"
    rc, _, err = cli("train-reward", "--data", FIXTURES / "hh-harmless-6.jsonl", "--model", tiny_llama_dir, "--out", rm,
                     "--max-steps", "1", "--batch-size", "2", "--eval-split", "0.34", "--max-length", "64")
    assert rc == 0, err
    return rm


def rows_of(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "answers.jsonl").read_text(encoding="utf-8").splitlines()]


def one_line_error(rc: int, err: str) -> str:
    assert rc == 2, err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


# ---------------------------------------------------------------- statistics


def test_wilson_interval_against_a_hand_computed_value():
    """8 wins in 10: p = 0.8, z² = 3.8415; centre = (0.8 + z²/20) / (1 + z²/10) = 0.99207 / 1.38415 = 0.71674;
    half = z / 1.38415 · √(0.016 + z²/400) = 1.41601 · 0.16001 = 0.22658 -> [0.4902, 0.9433]."""
    low, high = wilson_interval(8, 10)
    assert (round(low, 4), round(high, 4)) == (0.4902, 0.9433)
    assert Z95 == pytest.approx(1.959964, abs=1e-6)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    low, high = wilson_interval(5, 10)  # symmetric around ½
    assert low + high == pytest.approx(1.0)


def test_ties_count_one_half():
    outcomes = paired_outcomes([1.0, 0.5, 0.2, 0.7], [0.5, 0.5, 0.9, 0.7 + 1e-12])
    assert outcomes == [1.0, 0.5, 0.0, 0.5]
    w = win_rate(outcomes)
    assert (w["rate"], w["wins"], w["ties"], w["losses"], w["n"]) == (0.5, 1, 2, 1, 4)
    assert (w["low"], w["high"]) == wilson_interval(2.0, 4)


def test_family_means_average_each_kind_over_the_answers_that_ask_for_it():
    parts = [{"constraints": 0.5, "constraints/json": 1.0, "constraints/no_commas": 0.0},
             {"constraints": 1.0, "constraints/json": 0.0}, {"length": 0.3}]
    assert family_means(parts) == ({"json": 0.5, "no_commas": 0.0}, {"json": 2, "no_commas": 1})


def test_sources_alias_hf_prefix_run_dir_and_server(tiny_llama_dir, perturbed_run):
    from toolkit.models import resolve

    alias = resolve_source("smollm2-135m", "POLICY")
    assert alias.path == resolve("smollm2-135m") and alias.context == 8192
    assert resolve_source(f"hf:{tiny_llama_dir}", "POLICY").path == tiny_llama_dir
    assert resolve_source(str(perturbed_run), "POLICY").path == perturbed_run / "policy"  # the run dir is found
    assert resolve_source(str(perturbed_run / "policy"), "POLICY").context == 512  # ... and so is the model dir
    served = resolve_source("openai:tiny", "--baseline")
    assert not served.local and served.teacher == "openai:tiny"
    assert row_seed(0, 5) == 5 and row_seed(1, 0) != row_seed(0, 1)


def test_best_of_candidates_have_seeds_of_their_own():
    """Candidate seeds are reproducible, distinct, shared by nothing else in the run, and not the plain rows' of
    neighbouring --seed values either."""
    candidates = [candidate_seed(0, k, c) for k in range(64) for c in range(4)]
    plain = {row_seed(seed, k) for seed in range(4) for k in range(64)}
    assert len(set(candidates)) == len(candidates) and not plain & set(candidates)
    assert candidates == [candidate_seed(0, k, c) for k in range(64) for c in range(4)]
    assert candidate_seed(0, 0, 0) != candidate_seed(1, 0, 0)
    assert best_of_kl_bound(1) == 0.0 and best_of_kl_bound(4) == pytest.approx(math.log(4) - 0.75)


def test_batched_answer_logprobs_equal_a_plain_forward(tiny_llama):
    """Left-padded prompts and right-padded answers in one batch give each token the log-prob that a plain,
    unpadded forward of that one sequence gives (temperature-scaled logits)."""
    import torch

    model, tokenizer = tiny_llama
    prompts = [tokenizer("Name three fruits.").input_ids, tokenizer("Hi").input_ids,
               tokenizer("Write a haiku about the sea, please, in English.").input_ids]
    answers = [[11, 12, 13, 14, 15], [200], [300, 301, 302]]
    batched = answer_logprobs(model, tokenizer.pad_token_id, prompts, answers, 0.7, lambda n: None)
    for p, a, got in zip(prompts, answers, batched, strict=True):
        with torch.no_grad():
            logits = model(torch.tensor([p + a])).logits[0, len(p) - 1:-1].float() / 0.7
        expected = torch.log_softmax(logits, -1).gather(-1, torch.tensor(a)[:, None])[:, 0]
        assert got == pytest.approx(expected.tolist(), abs=1e-5)


# ---------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def against_itself(tiny_llama_dir, prompts, work):
    out = work / "self"
    rc, stdout, err = cli("eval-policy", tiny_llama_dir, "--prompts", prompts, "--baseline", tiny_llama_dir,
                          "--scorer", "rules:constraints", "--samples", "2", *TINY, "--recompute-logprobs",
                          "--out", out, "--json")
    assert rc == 0, err
    return json.loads(stdout), out


def test_policy_against_itself_wins_half_exactly_at_kl_zero(against_itself):
    """The same path given twice is fine: the same seed per (prompt, sample) gives the same answers."""
    summary, out = against_itself
    rows = rows_of(out)
    assert len(rows) == 8 * 2 * 2  # prompts x samples x sides
    pairs = list(zip(rows[::2], rows[1::2], strict=True))
    assert all(p["policy"] == "policy" and b["policy"] == "baseline" for p, b in pairs)
    assert all(p["answer"] == b["answer"] and p["prompt_id"] == b["prompt_id"] for p, b in pairs)
    assert summary["kl"] == 0.0 and all(p["kl"] == 0.0 for p, _ in pairs)
    scorer = summary["win_rate"]["scorer"]
    assert scorer["rate"] == 0.5 and scorer["ties"] == scorer["n"] == 16
    assert scorer["low"] < 0.5 < scorer["high"]
    # the sampler (KV cache, batched) and the teacher-forced pass agree on the log-probs
    assert summary["policy"]["kl_logprobs"] == "teacher-forced"
    assert summary["policy"]["sampler_logprob_gap"] < 1e-4


def test_reported_means_equal_the_ones_recomputed_from_answers_jsonl(against_itself):
    summary, out = against_itself
    rows = rows_of(out)
    for side in ("policy", "baseline"):
        mine = [r for r in rows if r["policy"] == side]
        by_kind: dict[str, list[float]] = {}
        for r in mine:
            for key, value in r["rules"].items():
                if key.startswith("constraints/"):
                    by_kind.setdefault(key.removeprefix("constraints/"), []).append(value)
        reported = summary[side]
        assert set(reported["per_family"]) == set(by_kind) and len(by_kind) >= 4
        for kind, values in by_kind.items():
            assert reported["per_family"][kind] == pytest.approx(sum(values) / len(values))
            assert reported["family_answers"][kind] == len(values)
        assert reported["scorer"] == pytest.approx(sum(r["scores"]["scorer"] for r in mine) / len(mine))
        assert reported["tokens"] == pytest.approx(sum(r["tokens"] for r in mine) / len(mine))
        assert reported["words"] == pytest.approx(sum(r["words"] for r in mine) / len(mine))
        assert reported["eos_rate"] == pytest.approx(sum(r["finish_reason"] == "stop" for r in mine) / len(mine))


def test_out_holds_the_reports_and_refuses_to_be_replaced_without_overwrite(against_itself, tiny_llama_dir, prompts):
    summary, out = against_itself
    assert sorted(p.name for p in out.iterdir()) == ["answers.jsonl", "llamakit-manifest.json", "report.html",
                                                    "report.md", "summary.json"]
    assert json.loads((out / "summary.json").read_text(encoding="utf-8"))["kl"] == summary["kl"]
    markdown = (out / "report.md").read_text(encoding="utf-8")
    assert "win rate by scorer" in markdown and "KL(POLICY ‖ BASE)" in markdown
    assert "<table>" in (out / "report.html").read_text(encoding="utf-8")
    before = (out / "answers.jsonl").read_bytes()
    rc, _, err = cli("eval-policy", tiny_llama_dir, "--prompts", prompts, *TINY, "--limit", "1", "--out", out)
    assert "pass --overwrite" in one_line_error(rc, err)
    assert (out / "answers.jsonl").read_bytes() == before


def test_bf16_on_a_cpu_without_bf16_units_warns_once_and_still_answers(tiny_llama_dir, prompts, monkeypatch):
    from toolkit.training import accelerator

    monkeypatch.setattr(accelerator, "cpu_has_bf16_units", lambda: False)
    rc, stdout, err = cli("eval-policy", tiny_llama_dir, "--prompts", prompts, *TINY, "--limit", "1", "--bf16",
                          "--json")
    assert rc == 0, err
    assert err.count("--bf16 on a CPU without bfloat16 units") == 1
    assert json.loads(stdout)["bf16"] is True


def test_a_perturbed_policy_from_its_run_dir_has_kl_and_reward_means(perturbed_run, tiny_llama_dir, prompts, tiny_rm,
                                                                     work):
    out = work / "perturbed"
    rc, stdout, err = cli("eval-policy", perturbed_run, "--prompts", prompts, "--baseline", tiny_llama_dir,
                          "--reward", tiny_rm, "--scorer", "rules:constraints", *TINY, "--out", out, "--json")
    assert rc == 0, err
    summary, rows = json.loads(stdout), rows_of(out)
    assert summary["policy"]["path"] == str(perturbed_run / "policy")
    assert summary["kl"] > 0.1, summary["kl"]
    policy_rows = [r for r in rows if r["policy"] == "policy"]
    assert summary["kl"] == pytest.approx(sum(r["kl"] for r in policy_rows) / len(policy_rows))
    for side in ("policy", "baseline"):
        rewards = [r["scores"]["reward"] for r in rows if r["policy"] == side]
        assert all(math.isfinite(x) for x in rewards)
        assert summary[side]["reward"] == pytest.approx(sum(rewards) / len(rewards))
    by_reward = summary["win_rate"]["reward"]
    assert by_reward["n"] == 8 and by_reward["wins"] + by_reward["ties"] + by_reward["losses"] == 8
    # POLICY's log-probs were the sampler's (the float32 default); a teacher-forced pass gives the same KLs
    assert summary["policy"]["kl_logprobs"] == "sampler" and summary["policy"]["sampler_logprob_gap"] is None
    rc, stdout, err = cli("eval-policy", perturbed_run, "--prompts", prompts, "--baseline", tiny_llama_dir,
                          *TINY, "--recompute-logprobs", "--baseline-answers", out, "--json")
    assert rc == 0, err
    recomputed = json.loads(stdout)
    assert recomputed["policy"]["kl_logprobs"] == "teacher-forced"
    assert recomputed["kl"] == pytest.approx(summary["kl"], abs=1e-4)
    expected = paired_outcomes([r["scores"]["reward"] for r in rows if r["policy"] == "policy"],
                               [r["scores"]["reward"] for r in rows if r["policy"] == "baseline"])
    assert by_reward["rate"] == pytest.approx(sum(expected) / len(expected))


@pytest.fixture(scope="module")
def perturbed_eval(perturbed_run, tiny_llama_dir, prompts, tiny_rm, work) -> tuple[Path, tuple]:
    args = (perturbed_run, "--prompts", prompts, "--baseline", tiny_llama_dir, "--reward", tiny_rm, "--scorer",
            "rules:constraints", *TINY)
    out = work / "perturbed-first"
    rc, _, err = cli("eval-policy", *args, "--out", out)
    assert rc == 0, err
    return out, args


def test_reused_base_answers_give_the_run_that_generated_them(perturbed_eval, work):
    first, args = perturbed_eval
    again = work / "perturbed-reused"
    rc, _, err = cli("eval-policy", *args, "--baseline-answers", first, "--out", again)
    assert rc == 0, err
    assert rows_of(again) == rows_of(first)  # same answers, scores, rewards and per-answer KL
    before, after = (json.loads((d / "summary.json").read_text()) for d in (first, again))
    for summary in (before, after):  # timings: the policy's are its own; the base's are the first run's
        for key in ("seconds", "out", "baseline_answers"):
            summary.pop(key)
        for key in ("seconds", "tokens_per_s"):
            summary["policy"].pop(key)
    # from the first run's seconds, as rounded in its summary
    assert after["baseline"].pop("tokens_per_s") == pytest.approx(before["baseline"].pop("tokens_per_s"), rel=0.01)
    assert after == before


def test_reused_base_answers_are_read_not_generated(perturbed_eval, work):
    """A base answer edited in the earlier run's file is the one this run scores."""
    first, args = perturbed_eval
    edited = work / "perturbed-edited"
    shutil.copytree(first, edited)
    rows = rows_of(edited)
    k = next(i for i, r in enumerate(rows) if r["policy"] == "baseline")
    rows[k]["answer"] = "a base answer written by hand"
    (edited / "answers.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = work / "perturbed-from-edited"
    rc, _, err = cli("eval-policy", *args, "--baseline-answers", edited, "--out", out)
    assert rc == 0, err
    assert rows_of(out)[k]["answer"] == "a base answer written by hand"
    assert rows_of(out)[k]["words"] == 6  # measured again on the text read
    assert [r["answer"] for r in rows_of(out) if r["policy"] == "policy"] == \
        [r["answer"] for r in rows if r["policy"] == "policy"]


def test_reused_base_answers_from_another_setting_are_refused(perturbed_eval, perturbed_run, tiny_llama_dir, prompts,
                                                              tmp_path):
    first, args = perturbed_eval
    out = tmp_path / "out"
    plain = tmp_path / "plain.jsonl"
    plain.write_text(json.dumps({"prompt": "Name a fruit."}) + "\n")
    cases = [
        ((*args, "--temperature", "0.5"), "that run's --temperature was 1.0, this one's is 0.5"),
        ((*args, "--seed", "1"), "--seed was 0"),
        ((perturbed_run, "--prompts", prompts, "--baseline", perturbed_run, *TINY), "that run's BASE was"),
        ((perturbed_run, "--prompts", prompts, *TINY), "give --baseline too"),
        ((*args, "--limit", "3", "--samples", "2"), "--samples was 1"),
        ((perturbed_run, "--prompts", plain, "--baseline", tiny_llama_dir, *TINY), "no BASE answer to prompt row 1"),
    ]
    for extra, expected in cases:
        rc, _, err = cli("eval-policy", *extra, "--baseline-answers", first, "--out", out)
        assert expected in one_line_error(rc, err), (extra, err)
        assert not out.exists()
    rc, _, err = cli("eval-policy", *args, "--baseline-answers", tmp_path, "--out", out)
    assert "no summary.json here" in one_line_error(rc, err)


def test_a_served_baseline_and_judge_through_llamakit_serve(tiny_server, tiny_llama_dir, prompts, monkeypatch):
    monkeypatch.setenv("LLAMAKIT_TEST_KEY", API_KEY)
    rc, stdout, err = cli("eval-policy", tiny_llama_dir, "--prompts", prompts, "--baseline", "openai:tiny",
                          "--base-url", tiny_server.url, "--api-key-env", "LLAMAKIT_TEST_KEY", "--judge", "openai:tiny",
                          "--judge-max-tokens", "4", "--scorer", "rules:constraints", "--limit", "2", *TINY, "--json")
    assert rc == 0, err
    summary = json.loads(stdout)
    assert summary["baseline"]["served"] and summary["baseline"]["answers"] == 2
    assert summary["baseline"]["tokens"] > 0
    assert summary["kl"] is None and "is a server" in summary["kl_unavailable"]
    assert set(summary["win_rate"]) == {"scorer", "judge"}
    judged = summary["win_rate"]["judge"]
    # a random tiny judge never writes a verdict: every pair is a tie, said as such
    assert judged["n"] == 2 and judged["no_verdict"] == 2 and judged["rate"] == 0.5
    # and the other way round: what is served as POLICY, a local model as BASE
    rc, stdout, err = cli("eval-policy", "openai:tiny", "--prompts", prompts, "--baseline", tiny_llama_dir,
                          "--base-url", tiny_server.url, "--api-key-env", "LLAMAKIT_TEST_KEY", "--limit", "2", *TINY,
                          "--json")
    assert rc == 0, err
    summary = json.loads(stdout)
    assert summary["policy"]["served"] and not summary["baseline"]["served"]
    assert summary["kl"] is None and summary["kl_unavailable"].startswith("POLICY openai:tiny is a server")


@pytest.fixture(scope="module")
def best_of_runs(perturbed_run, tiny_llama_dir, prompts, tiny_rm, work) -> dict[str, tuple[dict, list[dict]]]:
    """The same comparison without --best-of, with --best-of 1 and with --best-of 3: (summary, rows) each."""
    runs = {}
    for name, extra in (("plain", ()), ("one", ("--best-of", "1")), ("three", ("--best-of", "3"))):
        out = work / f"best-of-{name}"
        rc, stdout, err = cli("eval-policy", perturbed_run, "--prompts", prompts, "--baseline", tiny_llama_dir,
                              "--reward", tiny_rm, "--scorer", "rules:constraints", "--limit", "4", *TINY, *extra,
                              "--out", out, "--json")
        assert rc == 0, err
        runs[name] = json.loads(stdout), rows_of(out)
    return runs


def test_best_of_1_is_the_run_without_the_flag(best_of_runs):
    (plain, plain_rows), (one, one_rows) = best_of_runs["plain"], best_of_runs["one"]
    assert one_rows == plain_rows and all("best_of" not in r for r in one_rows)
    timing = ("seconds", "tokens_per_s")
    for side in ("policy", "baseline"):
        assert {k: v for k, v in one[side].items() if k not in timing} == \
               {k: v for k, v in plain[side].items() if k not in timing}
        assert one[side]["best_of"] is None
    assert one["best_of"] == plain["best_of"] == 1 and one["kl"] == plain["kl"]
    assert one["kl_note"] is None and one["win_rate"] == plain["win_rate"]


def test_best_of_keeps_the_candidate_the_reward_model_scores_highest(best_of_runs, tiny_rm):
    from toolkit.reward import load_reward_model

    summary, rows = best_of_runs["three"]
    assert summary["best_of"] == 3 and len(rows) == 4 * 2  # one kept answer per prompt and side
    for r in rows:
        rewards, kept = r["best_of"]["rewards"], r["best_of"]["kept"]
        assert len(rewards) == 3 and kept == rewards.index(max(rewards))  # ties: the first
        assert r["scores"]["reward"] == max(rewards)
    # the candidates differ (seeds of their own), so selection had something to choose from
    assert any(len(set(r["best_of"]["rewards"])) == 3 for r in rows)
    # the kept text is the one that scored max: scoring it afresh gives that score back
    rescored = load_reward_model(str(tiny_rm)).score([r["prompt"] for r in rows], [r["answer"] for r in rows])
    assert rescored == pytest.approx([r["scores"]["reward"] for r in rows], abs=1e-4)
    for side in ("policy", "baseline"):
        mine = [r for r in rows if r["policy"] == side]
        picked = summary[side]["best_of"]
        assert picked["kept_reward"] == pytest.approx(sum(r["scores"]["reward"] for r in mine) / len(mine))
        assert picked["kept_reward"] == summary[side]["reward"]
        everything = [x for r in mine for x in r["best_of"]["rewards"]]
        assert picked["candidate_reward"] == pytest.approx(sum(everything) / len(everything))
        assert picked["kept_reward"] >= picked["candidate_reward"]
        assert picked["generated_tokens"] >= sum(r["tokens"] for r in mine)
        # every later metric sees the kept answer
        assert summary[side]["scorer"] == pytest.approx(sum(r["scores"]["scorer"] for r in mine) / len(mine))
    # the KL is taken on the kept answers, and said so
    assert summary["kl"] == pytest.approx(sum(r["kl"] for r in rows if r["policy"] == "policy") / 4)
    assert "kept answers" in summary["kl_note"]
    assert summary["best_of_kl_bound"] == pytest.approx(math.log(3) - 2 / 3)


# ---------------------------------------------------------------- bad input


def test_bad_inputs_are_one_line_and_exit_2(tiny_llama_dir, prompts, tiny_rm, tmp_path, monkeypatch):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps({"prompt": "word " * 600}) + "\n")
    plain = tmp_path / "plain.jsonl"
    plain.write_text(json.dumps({"prompt": "Name a fruit."}) + "\n")
    uncalibrated = tmp_path / "rm-uncalibrated"
    shutil.copytree(tiny_rm, uncalibrated)
    (uncalibrated / "calibration.json").unlink()
    not_a_model = tmp_path / "notes"
    not_a_model.mkdir()
    (not_a_model / "notes.txt").write_text("x")
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    out = tmp_path / "out"
    cases = [
        ((tiny_llama_dir, "--prompts", empty), "file is empty"),
        ((tiny_llama_dir, "--prompts", long, *TINY), "does not fit the context"),
        ((tiny_llama_dir, "--prompts", prompts, "--reward", uncalibrated), "not calibrated"),
        ((not_a_model, "--prompts", prompts), "is not a model"),
        ((tiny_rm, "--prompts", prompts), "is a reward model"),
        ((tmp_path / "missing", "--prompts", prompts), "neither an embedded alias"),
        ((tiny_llama_dir, "--prompts", plain, "--scorer", "rules:constraints"), "constraints"),
        ((tiny_llama_dir, "--prompts", prompts, "--judge", "openai:gpt-4o-mini"), "give --baseline"),
        ((tiny_llama_dir, "--prompts", prompts, "--baseline", "openai:gpt-4o-mini"), "needs an API key"),
        ((tiny_llama_dir, "--prompts", prompts, "--scorer", "length"), "--scorer takes rules"),
        ((tiny_llama_dir, "--prompts", prompts, "--baseline", "rules:length"), "cannot write them"),
        ((tiny_llama_dir, "--prompts", prompts, "--best-of", "4"), "give --reward RM_DIR"),
        ((tiny_llama_dir, "--prompts", prompts, "--best-of", "4", "--reward", tiny_rm, "--temperature", "0"),
         "needs --temperature > 0"),
    ]
    for args, expected in cases:
        rc, _, err = cli("eval-policy", *args, "--out", out)
        assert expected in one_line_error(rc, err), (args, err)
        assert not out.exists()


def test_out_onto_a_foreign_non_empty_directory_is_refused(tiny_llama_dir, prompts, tmp_path):
    folder = tmp_path / "precious"
    folder.mkdir()
    (folder / "notes.txt").write_text("notes", encoding="utf-8")
    for extra in ((), ("--overwrite",)):
        rc, _, err = cli("eval-policy", tiny_llama_dir, "--prompts", prompts, "--out", folder, *extra)
        assert "not written by llamakit" in one_line_error(rc, err)
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt"]
