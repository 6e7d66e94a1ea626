"""ChatLLaMA-style scored answers: a judge fills prompts/score_rubric.txt with a 0-5 score per answer.

Answers come from the input row (`response`, `completion`, Alpaca `output`, the last assistant turn)
or, for rows with only a prompt, from --teacher. A reply without a usable score is asked again (with
the seed moved on); when it still has none the row is kept in OUT.failed.jsonl with the judge's last
reply in the error, never dropped silently.
"""

from __future__ import annotations

import asyncio
import os
import re
from dataclasses import asdict
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
from toolkit.generate.inputs import read_prompts
from toolkit.generate.runner import (
    Caller,
    Job,
    RunOptions,
    Summary,
    Unparsable,
    output_files,
    row_id,
    run_jobs,
)
from toolkit.resources import render_prompt, template_hash
from toolkit.rows import PromptRow, dialogue_text

TEMPLATE = "score_rubric"
MAX_SCORE = 5
DENOMINATOR = re.compile(r"\s*(?:/|out of)\s*5\b", re.IGNORECASE)
NUMBER = re.compile(r"(?<![\w.])-?\d+(?:\.\d+)?")


def parse_score(text: str, max_score: int = MAX_SCORE) -> int:
    """The one integer 0..max_score in a judge's reply ('4', 'Score: 4', '4/5', '[[4]]').

    Raises Unparsable for no number, several different numbers, fractions or values out of range."""
    cleaned = DENOMINATOR.sub(" ", text)
    numbers = {float(n) for n in NUMBER.findall(cleaned)}
    if len(numbers) != 1:
        what = "no score" if not numbers else f"several numbers {sorted(numbers)}"
        raise Unparsable(f"{what} in the judge's reply: {text.strip()[:120]!r}")
    value = numbers.pop()
    if value != int(value) or not 0 <= value <= max_score:
        raise Unparsable(f"score {value:g} is not an integer in 0..{max_score}: {text.strip()[:120]!r}")
    return int(value)


async def score_row(caller: Caller, p: PromptRow, judge: Any, teacher: Any | None, sampling: Sampling,
                    judge_sampling: Sampling, hashes: dict[str, str], system: str) -> dict[str, Any]:
    metas = []
    question = dialogue_text(p.prompt)
    response = p.response
    response_meta = None
    if response is None:
        messages = [{"role": "user", "content": p.prompt}] if isinstance(p.prompt, str) else list(p.prompt)
        if messages[0]["role"] != "system":
            messages = [{"role": "system", "content": system}, *messages]
        reply, response = await caller.chat(teacher, messages, nonempty, **sampling.params())
        response_meta = reply_meta(reply, hashes.get("assistant"))
        metas.append(response_meta)
    rubric = render_prompt(TEMPLATE, prompt=question, response=response)
    reply, score = await caller.chat(judge, [{"role": "user", "content": rubric}], parse_score,
                                     **judge_sampling.params())
    metas.append(reply_meta(reply, hashes["judge"]))
    return {"prompt": p.prompt, "response": response, "score": score,
            "meta": sum_meta(metas, judge=judge.name, teacher=teacher.name if response_meta else None,
                             template=hashes, judge_reply=reply.text.strip()[:500], response_meta=response_meta)}


async def generate(prompts_path: str | os.PathLike, out: str | os.PathLike, *, judge: str,
                   teacher: str | None = None, sampling: Sampling | None = None,
                   judge_sampling: Sampling | None = None,
                   options: RunOptions | None = None, teacher_options: TeacherOptions | None = None,
                   limit: int | None = None, fmt: str = "jsonl") -> Summary:
    sampling = sampling if sampling is not None else Sampling()
    judge_sampling = judge_sampling if judge_sampling is not None else Sampling(max_tokens=16, temperature=0.0)
    options = options if options is not None else RunOptions()
    teacher_options = teacher_options if teacher_options is not None else TeacherOptions()
    if judge.startswith("rules"):
        raise UserError("scores needs an LLM judge (openai:, langchain:, hf:); rule scores come with `preferences "
                        "--scorer`")
    prompts = read_prompts(prompts_path, limit)
    files = output_files(out, fmt)
    missing = [p for p in prompts if p.response is None]
    if missing and not teacher:
        first = missing[0]
        where = f"{prompts_path}:{first.line}" if first.line else f"{prompts_path} (row {first.index + 1})"
        raise UserError(f"{where}: no answer to score (response, completion, output or a last assistant turn);"
                        " give --teacher to write answers for such rows")
    render_prompt(TEMPLATE, prompt="check", response="check")
    hashes = {"judge": template_hash(TEMPLATE)}
    if missing:
        hashes["assistant"] = template_hash("assistant_system")
    built: list[Any] = []
    try:
        judge_t = build_teacher(judge, teacher_options)
        built.append(judge_t)
        teacher_t = build_teacher(teacher, teacher_options) if missing else None
        built.append(teacher_t)
        system = render_prompt("assistant_system")
        run = {"kind": "score", "judge": judge_t.name, "teacher": teacher_t.name if teacher_t else None,
               "templates": hashes, "sampling": asdict(sampling), "judge_sampling": asdict(judge_sampling)}
        jobs: dict[str, Job] = {}
        for p in prompts:
            rid = row_id(kind="score", judge=judge_t.name, teacher=teacher_t.name if p.response is None else None,
                         templates=hashes, inputs=p.prompt, response=p.response,
                         sampling=asdict(sampling) if p.response is None else None,
                         judge_sampling=asdict(judge_sampling))

            async def work(caller: Caller, p: PromptRow = p) -> dict[str, Any]:
                return await score_row(caller, p, judge_t, teacher_t, sampling, judge_sampling, hashes, system)

            jobs.setdefault(rid, Job(rid, {"prompt": p.prompt, "response": p.response, "line": p.line}, work,
                                     run))
        summary = await run_jobs(list(jobs.values()), files, options, "scores (0-5 rubric)")
    finally:
        await close_all(built)
    summary.extra["duplicates"] = len(prompts) - len(jobs)
    return summary


def run(*args: Any, **kwargs: Any) -> Summary:
    return asyncio.run(generate(*args, **kwargs))
