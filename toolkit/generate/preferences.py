"""Preference pairs: K answers per prompt, scored by a judge LLM and/or rule scorers, best vs worst.

Candidates come from one or several teachers and temperatures (or from the row's own `responses`).
Scores, each in [0, 1]:
  - pointwise judge (prompts/judge_pointwise.txt): rating / max_score;
  - logprob judge (prompts/judge_logprobs.txt, --judge-logprobs): the expected rating under the judge's
    distribution over the digits 0..max_score as its first token (G-Eval), / max_score; one token per
    answer and no format to follow, so a judge that cannot write "Rating: [[N]]" still gives a score
    (as good as the judge: the embedded 135M model's is close to chance);
  - pairwise judge (prompts/judge_pairwise.txt): every pair asked twice with the positions swapped;
    a pair's winner must win both times, a disagreement is a tie; score = (wins + ties / 2) / (K - 1);
  - rules (toolkit/scorers.py): weighted mean of the rules, each rule's part kept in the row.
With both, score = (judge + w * rules) / (1 + w). The best and the worst candidate become chosen and
rejected when their margin is > 0 and >= --min-margin; otherwise the row is dropped (ties).
--revise (rules:constraints): the chosen answer is the best candidate edited by code to meet more of its
row's constraints (toolkit/revise.py), the rejected one the same candidate unedited, so a pair shows a
family the policy itself almost never meets; a candidate code cannot improve is binarized as above.
--contrast (rules:constraints): after each pair, a second one (id `<pair id>-contrast`): the chosen answer
against itself in a format its row did not ask for, so the policy learns to format only when asked.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import os
import random
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from toolkit.errors import UserError
from toolkit.generate.common import (
    Sampling,
    TeacherOptions,
    build_teacher,
    close_all,
    nonempty,
    reply_meta,
    sum_meta,
)
from toolkit.generate.inputs import read_prompts, where
from toolkit.generate.runner import (
    EXTRA_ROWS,
    Caller,
    Drop,
    Job,
    RunOptions,
    Summary,
    Unparsable,
    output_files,
    row_id,
    run_jobs,
)
from toolkit.resources import render_prompt, template_hash
from toolkit.rows import Messages, PromptRow, dialogue_text

RATING = re.compile(r"rating\s*:?\s*\[\[\s*(\d+(?:\.\d+)?)\s*\]\]", re.IGNORECASE)
BRACKETED = re.compile(r"\[\[\s*(\d+(?:\.\d+)?)\s*\]\]")
VERDICT = re.compile(r"\[\[\s*([ABC])\s*\]\]")


@dataclass(frozen=True)
class Judging:
    judge: str | None = None  # teacher spec of the judge LLM
    pairwise: bool = False
    scorer: str | None = None  # rules:length,refusal,...
    scorer_weight: float = 1.0  # weight of the rules when a judge is used too
    max_score: int = 10  # pointwise rating scale 0..max_score
    min_margin: float = 0.0
    judge_temperature: float = 0.0
    judge_max_tokens: int = 256
    logprobs: bool = False  # read the rating from the first token's log-probs (max_score <= 9)
    revise: bool = False  # chosen = the best candidate edited by code to meet the row's constraints
    contrast: bool = False  # a second pair: chosen against itself in a format the row did not ask for


OFF_BY_DEFAULT = ("logprobs", "revise", "contrast")  # flags that join a row's id only when on (older rows keep theirs)


TOP_LOGPROBS = 20  # OpenAI's maximum
# ------------------------------------------------------------------------------------- pure logic


def parse_rating(text: str, max_score: int) -> float:
    """'... Rating: [[7]]' -> 7.0; anything else (or out of 0..max_score) raises Unparsable."""
    found = RATING.findall(text) or BRACKETED.findall(text)
    if not found:
        raise Unparsable(f"no 'Rating: [[N]]' in the judge's reply: {text.strip()[:120]!r}")
    value = float(found[-1])
    if not 0 <= value <= max_score:
        raise Unparsable(f"rating {value:g} is outside 0..{max_score}")
    return value


def expected_rating(alternatives: list[tuple[str, float]] | None, max_score: int) -> tuple[float, float]:
    """(E[rating], P(any rating)) from the judge's first-token alternatives [(token, log-prob)], counting
    the tokens that are one digit 0..max_score (with or without spaces around); Unparsable if none is."""
    mass = [0.0] * (max_score + 1)
    for token, logprob in alternatives or []:
        digit = token.strip()
        if len(digit) == 1 and digit.isdigit() and int(digit) <= max_score:
            mass[int(digit)] += math.exp(logprob)
    total = sum(mass)
    if total <= 0:
        seen = [t for t, _ in (alternatives or [])][:8]
        raise Unparsable(f"no rating 0..{max_score} among the judge's likeliest first tokens {seen}")
    return sum(k * m for k, m in enumerate(mass)) / total, total


def read_logprob_rating(reply: Any, max_score: int) -> tuple[float, float]:
    if not reply.logprobs:
        raise UserError(f"the judge {reply.model or ''} returned no logprobs: --judge-logprobs needs a server "
                        "that reports them (OpenAI, vLLM, llamakit serve, hf:); drop the flag to read "
                        "'Rating: [[N]]' from the text")
    return expected_rating(reply.logprobs[0], max_score)


def parse_verdict(text: str) -> str:
    """'... [[A]]' -> 'A' (the last verdict in the reply wins); no verdict raises Unparsable."""
    found = VERDICT.findall(text)
    if not found:
        raise Unparsable(f"no [[A]] / [[B]] / [[C]] in the judge's reply: {text.strip()[:120]!r}")
    return found[-1]


def swap_verdict(first: str, second: str) -> str:
    """Winner of x vs y from two verdicts: `first` with x as A and y as B, `second` with y as A, x as B.

    'x' or 'y' when both verdicts name the same answer; 'tie' on [[C]] or when the judge changed its
    mind with the positions (position bias)."""
    x_first = {"A": "x", "B": "y"}.get(first, "tie")
    x_second = {"A": "y", "B": "x"}.get(second, "tie")
    return x_first if x_first == x_second else "tie"


def pairwise_scores(k: int, outcomes: dict[tuple[int, int], str]) -> list[float]:
    """(wins + ties / 2) / (k - 1) per candidate from {(i, j): 'x' | 'y' | 'tie'} (x = i, y = j)."""
    points = [0.0] * k
    for (i, j), outcome in outcomes.items():
        if outcome == "x":
            points[i] += 1
        elif outcome == "y":
            points[j] += 1
        else:
            points[i] += 0.5
            points[j] += 0.5
    return [p / (k - 1) if k > 1 else 0.0 for p in points]


def binarize(scores: Sequence[float], min_margin: float = 0.0) -> tuple[int, int, float] | None:
    """(best, worst, margin) when the margin is > 0 and >= min_margin; None for ties (dropped)."""
    if len(scores) < 2:
        return None
    best = max(range(len(scores)), key=lambda i: scores[i])
    worst = min(range(len(scores)), key=lambda i: scores[i])
    margin = scores[best] - scores[worst]
    if margin <= 1e-12 or margin < min_margin - 1e-12:
        return None
    return best, worst, margin


def combine(judge: float | None, rules: float | None, weight: float) -> float:
    if judge is None and rules is None:
        raise ValueError("nothing scored the candidate")
    if judge is None:
        return float(rules)
    if rules is None:
        return float(judge)
    return (judge + weight * rules) / (1 + weight)


# --------------------------------------------------------------------------------------- the job


@dataclass(frozen=True)
class Setup:
    teachers: tuple[Any, ...]
    temperatures: tuple[float, ...]
    num_candidates: int
    judge: Any | None
    scorer: Any | None  # toolkit.scorers.RuleScorer
    judging: Judging
    sampling: Sampling
    hashes: dict[str, str]
    system: str = ""  # the assistant system prompt, rendered once


def candidate_plan(setup: Setup) -> list[tuple[Any, float, int | None]]:
    """(teacher, temperature, seed) per candidate: teachers cycle fastest, then temperatures."""
    plan = []
    n_t = len(setup.teachers)
    for j in range(setup.num_candidates):
        teacher = setup.teachers[j % n_t]
        temperature = setup.temperatures[(j // n_t) % len(setup.temperatures)]
        seed = None if setup.sampling.seed is None else setup.sampling.seed + j
        plan.append((teacher, temperature, seed))
    return plan


async def judge_pointwise(caller: Caller, setup: Setup, question: str, answers: list[str]):
    j = setup.judging

    async def one(answer: str):
        prompt = render_prompt("judge_pointwise", prompt=question, response=answer, max_score=j.max_score)
        return await caller.chat(setup.judge, [{"role": "user", "content": prompt}],
                                 lambda text: parse_rating(text, j.max_score),
                                 **setup.sampling.params(temperature=j.judge_temperature,
                                                         max_tokens=j.judge_max_tokens))

    async def one_by_logprobs(answer: str):
        prompt = render_prompt("judge_logprobs", prompt=question, response=answer, max_score=j.max_score)
        return await caller.chat(setup.judge, [{"role": "user", "content": prompt}],
                                 read=lambda reply: read_logprob_rating(reply, j.max_score),
                                 **setup.sampling.params(temperature=0.0, max_tokens=1, logprobs=True,
                                                         top_logprobs=TOP_LOGPROBS))

    if j.logprobs:
        results = await asyncio.gather(*(one_by_logprobs(a) for a in answers))
        details = [{"rating": round(v, 4), "rating_mass": round(m, 4)} for _, (v, m) in results]
        ratings = [v for _, (v, _) in results]
    else:
        results = await asyncio.gather(*(one(a) for a in answers))
        details = [{"rating": v} for _, v in results]
        ratings = [v for _, v in results]
    metas = [reply_meta(r, setup.hashes["judge"]) for r, _ in results]
    return [v / j.max_score for v in ratings], details, metas


async def judge_pairwise(caller: Caller, setup: Setup, question: str, answers: list[str]):
    j = setup.judging
    pairs = list(itertools.combinations(range(len(answers)), 2))

    async def ask(a: str, b: str):
        prompt = render_prompt("judge_pairwise", prompt=question, response_a=a, response_b=b)
        return await caller.chat(setup.judge, [{"role": "user", "content": prompt}], parse_verdict,
                                 **setup.sampling.params(temperature=j.judge_temperature,
                                                         max_tokens=j.judge_max_tokens))

    calls = [ask(answers[i], answers[k]) for i, k in pairs] + [ask(answers[k], answers[i]) for i, k in pairs]
    results = await asyncio.gather(*calls)
    firsts, seconds = results[: len(pairs)], results[len(pairs):]
    outcomes = {pair: swap_verdict(f[1], s[1]) for pair, f, s in zip(pairs, firsts, seconds, strict=True)}
    scores = pairwise_scores(len(answers), outcomes)
    details: list[dict[str, Any]] = [{"wins": 0, "ties": 0} for _ in answers]
    for (i, k), outcome in outcomes.items():
        if outcome == "tie":
            details[i]["ties"] += 1
            details[k]["ties"] += 1
        else:
            details[i if outcome == "x" else k]["wins"] += 1
    verdicts = [{"pair": [i, k], "first": f[1], "swapped": s[1], "outcome": outcomes[(i, k)]}
                for (i, k), f, s in zip(pairs, firsts, seconds, strict=True)]
    metas = [reply_meta(r, setup.hashes["judge"]) for r, _ in results]
    return scores, details, metas, verdicts


async def make_pair(caller: Caller, setup: Setup, p: PromptRow) -> dict[str, Any] | Drop:
    prompt: str | Messages = p.prompt
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if messages[0]["role"] != "system":
        messages = [{"role": "system", "content": setup.system}, *messages]
    metas: list[dict[str, Any]] = []
    candidates: list[dict[str, Any]] = []
    if len(p.responses) >= 2:
        candidates = [{"text": r, "source": "input"} for r in p.responses]
    else:
        plan = candidate_plan(setup)
        replies = await asyncio.gather(*(caller.chat(t, messages, nonempty, **setup.sampling.params(
            temperature=temp, seed=seed)) for t, temp, seed in plan))
        for (teacher, temp, _), (reply, text) in zip(plan, replies, strict=True):
            meta = reply_meta(reply, setup.hashes["assistant"])
            metas.append(meta)
            candidates.append({"text": text, "teacher": teacher.name, "temperature": temp,
                               "finish_reason": reply.finish_reason, "completion_tokens": reply.completion_tokens})
    answers = [c["text"] for c in candidates]
    question = dialogue_text(prompt)
    judge_scores: list[float] | None = None
    verdicts = None
    if setup.judge is not None:
        if setup.judging.pairwise:
            judge_scores, details, judge_metas, verdicts = await judge_pairwise(caller, setup, question, answers)
        else:
            judge_scores, details, judge_metas = await judge_pointwise(caller, setup, question, answers)
        metas.extend(judge_metas)
        for c, d in zip(candidates, details, strict=True):
            c["judge"] = d
    rule_scores: list[float] | None = None
    if setup.scorer is not None:
        rule_scores = []
        for c in candidates:
            parts = setup.scorer.explain(question, c["text"], c.get("finish_reason"), p.row)
            c["rules"] = {k: round(v, 4) for k, v in parts.items()}
            rule_scores.append(setup.scorer.combine(parts))
            if judge_scores is not None:
                c["rules_score"] = round(rule_scores[-1], 4)  # beside the judge's, to see if they agree
    scores = [combine(judge_scores[i] if judge_scores else None, rule_scores[i] if rule_scores else None,
                      setup.judging.scorer_weight) for i in range(len(candidates))]
    for c, s in zip(candidates, scores, strict=True):
        c["score"] = round(s, 4)
    meta = sum_meta(metas, teachers=[t.name for t in setup.teachers],
                    judge=setup.judge.name if setup.judge is not None else None,
                    scorer=setup.scorer.name if setup.scorer is not None else None,
                    pairwise=setup.judging.pairwise, template=setup.hashes, candidates=candidates)
    if verdicts is not None:
        meta["verdicts"] = verdicts
    picked = revised_pair(setup, p, question, candidates, scores) if setup.judging.revise else None
    picked = picked or binarize(scores, setup.judging.min_margin)
    if picked is None:
        margin = max(scores) - min(scores) if scores else 0.0
        reason = "tie" if margin <= 1e-12 else f"margin {margin:.4f} < --min-margin {setup.judging.min_margin}"
        return Drop(reason, {"prompt": prompt, "meta": meta})
    best, worst, margin = picked
    meta["chosen"] = {k: v for k, v in candidates[best].items() if k != "text"}
    meta["rejected"] = {k: v for k, v in candidates[worst].items() if k != "text"}
    row = {"prompt": prompt, "chosen": candidates[best]["text"], "rejected": candidates[worst]["text"],
           "score_chosen": round(scores[best], 4), "score_rejected": round(scores[worst], 4),
           "margin": round(margin, 4), "meta": meta}
    if setup.judging.contrast:
        row[EXTRA_ROWS] = contrast_rows(setup, p, question, row)
    return row


def contrast_rows(setup: Setup, p: PromptRow, question: str, pair: dict[str, Any]) -> list[tuple[str, dict]]:
    """The pair's chosen answer against itself in a format its row did not ask for (toolkit/revise.py's
    `contrast`): both meet the row's constraints alike, so the checker ties them and the pair says only
    "format when asked". The format is drawn with --seed and the prompt, so a rerun draws the same."""
    from toolkit.revise import contrast

    rng = random.Random(f"{setup.sampling.seed}/{question}")
    drawn = contrast(pair["chosen"], p.row["constraints"], p.row.get("base_prompt") or question, rng)
    if drawn is None:
        return []
    kind, edited = drawn
    return [("contrast", {"prompt": pair["prompt"], "chosen": pair["chosen"], "rejected": edited,
                          "score_chosen": pair["score_chosen"], "score_rejected": pair["score_chosen"], "margin": 0.0,
                          "meta": {"contrast": kind, "scorer": pair["meta"].get("scorer")}})]


def revised_pair(setup: Setup, p: PromptRow, question: str, candidates: list[dict[str, Any]],
                 scores: list[float]) -> tuple[int, int, float] | None:
    """(revised, best, margin): the best candidate (a finished one among equals) edited by code to meet more
    of the row's constraints, appended to `candidates` and `scores`, against itself; None when code can
    not improve it or the edit does not raise the score by --min-margin."""
    from toolkit.revise import improve

    best = max(range(len(candidates)), key=lambda i: (scores[i], candidates[i].get("finish_reason") != "length"))
    original = candidates[best]
    edited = improve(original["text"], p.row["constraints"], p.row.get("base_prompt") or question,
                     cut=original.get("finish_reason") == "length")
    if edited is None:
        return None
    parts = setup.scorer.explain(question, edited, "stop", p.row)
    revised = {"text": edited, "source": "revised", "of": best, "rules": {k: round(v, 4) for k, v in parts.items()}}
    score = setup.scorer.combine(parts)
    margin = score - scores[best]
    if margin <= 1e-12 or margin < setup.judging.min_margin - 1e-12:
        return None
    revised["score"] = round(score, 4)
    candidates.append(revised)
    scores.append(score)
    return len(candidates) - 1, best, margin


def make_jobs(prompts: list[PromptRow], setup: Setup) -> list[Job]:
    settings = {k: v for k, v in asdict(setup.judging).items() if k not in OFF_BY_DEFAULT or v}
    judging = {**settings, "judge": setup.judge.name if setup.judge is not None else None,
               "scorer": setup.scorer.name if setup.scorer is not None else None}
    run = {"kind": "preference", "teachers": [t.name for t in setup.teachers],
           "temperatures": list(setup.temperatures), "num_candidates": setup.num_candidates,
           "templates": setup.hashes, "sampling": asdict(setup.sampling), "judging": judging}
    jobs: dict[str, Job] = {}
    for p in prompts:
        given = p.responses if len(p.responses) >= 2 else None
        rid = row_id(kind="preference", teachers=None if given else [t.name for t in setup.teachers],
                     temperatures=None if given else list(setup.temperatures),
                     num_candidates=None if given else setup.num_candidates, templates=setup.hashes,
                     inputs=p.prompt, responses=given, sampling=asdict(setup.sampling), judging=judging,
                     **(setup.scorer.context_of(p.row) if setup.scorer is not None else {}))  # rules:constraints

        async def work(caller: Caller, p: PromptRow = p) -> dict[str, Any] | Drop:
            return await make_pair(caller, setup, p)

        jobs.setdefault(rid, Job(rid, {"prompt": p.prompt, "line": p.line}, work, run))
    return list(jobs.values())


async def generate(prompts_path: str | os.PathLike, out: str | os.PathLike, *, teachers: Sequence[str],
                   judging: Judging, num_candidates: int = 4, temperatures: Sequence[float] = (0.7,),
                   sampling: Sampling | None = None, options: RunOptions | None = None,
                   teacher_options: TeacherOptions | None = None, limit: int | None = None,
                   fmt: str = "jsonl") -> Summary:
    sampling = sampling if sampling is not None else Sampling()
    options = options if options is not None else RunOptions()
    teacher_options = teacher_options if teacher_options is not None else TeacherOptions()
    from toolkit.scorers import parse_rules

    judge_spec, scorer_spec = judging.judge, judging.scorer
    if judge_spec and judge_spec.startswith("rules"):  # a rules "judge" is a scorer
        judge_spec, scorer_spec = None, scorer_spec or judge_spec
    if not judge_spec and not scorer_spec:
        raise UserError("give --judge SPEC (an LLM) and/or --scorer rules:... to score the candidates")
    if scorer_spec and not scorer_spec.startswith("rules"):
        raise UserError(f"--scorer takes rules:NAMES, got '{scorer_spec}' (use --judge for an LLM)")
    if num_candidates < 2:
        raise UserError("--num-candidates must be at least 2 to make a pair")
    if judging.max_score < 1:
        raise UserError("--max-score must be at least 1")
    if judging.logprobs and (judging.pairwise or judging.max_score > 9):
        raise UserError("--judge-logprobs reads one digit from a pointwise judge: use it without --pairwise "
                        "and with --max-score 9 or less")
    scorer = parse_rules(scorer_spec) if scorer_spec else None
    for flag, on in (("--revise", judging.revise), ("--contrast", judging.contrast)):
        if on and (judge_spec or scorer is None or "constraints" not in scorer.weights):
            raise UserError(f"{flag} edits answers by each row's constraints: it needs --scorer rules:constraints "
                            "(rows from `generate-data constraints`) and no --judge")
    prompts = read_prompts(prompts_path, limit)
    if scorer is not None:  # a row the rules cannot score (no constraints) stops the run before any call
        for p in prompts:
            scorer.check_context(p.row, **where(prompts_path, p.index, p.line))
    files = output_files(out, fmt)
    hashes = {"assistant": template_hash("assistant_system")}
    if judge_spec:
        hashes["judge"] = template_hash("judge_pairwise" if judging.pairwise else
                                        "judge_logprobs" if judging.logprobs else "judge_pointwise")
    needs_teachers = any(len(p.responses) < 2 for p in prompts)
    if needs_teachers and not teachers:
        raise UserError("give --teacher SPEC to write the candidates (or rows with 'responses')")
    built: list[Any] = []
    try:
        gen = tuple(build_teacher(spec, teacher_options) for spec in dict.fromkeys(teachers)) if needs_teachers else ()
        built.extend(gen)
        judge = build_teacher(judge_spec, teacher_options) if judge_spec else None
        built.append(judge)
        setup = Setup(gen, tuple(temperatures) or (sampling.temperature,), num_candidates, judge, scorer,
                      judging, sampling, hashes, render_prompt("assistant_system"))
        jobs = make_jobs(prompts, setup)
        title = f"preferences ({num_candidates} candidates{', pairwise' if judging.pairwise else ''})"
        summary = await run_jobs(jobs, files, options, title)
    finally:
        await close_all(built)
    summary.extra["duplicates"] = len(prompts) - len(jobs)
    return summary


def run(*args: Any, **kwargs: Any) -> Summary:
    return asyncio.run(generate(*args, **kwargs))
