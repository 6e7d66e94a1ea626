"""Self-instruct: new task instructions from a few seed tasks, kept only when new enough.

Request k shows the teacher `num_examples` instructions (mostly seed tasks, plus up to two it wrote
earlier, as in Wang et al. 2022) through prompts/self_instruct.txt and keeps the reply when it
  - has 3 to 150 words, does not start with punctuation, and names nothing on the blacklist
    (image, graph, picture, file, map, draw, plot, go to, video, audio, music, flowchart, diagram);
  - has ROUGE-L < 0.7 against every instruction in the pool (seeds + accepted so far).
Rejected replies go to OUT.dropped.jsonl with the reason, so a resumed run does not ask again.
No request starts once there are --num-instructions; replies already on their way are still judged,
so OUT can end up to --concurrency - 1 instructions over.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import re
from dataclasses import asdict, dataclass
from typing import Any

from toolkit.errors import UserError
from toolkit.generate.common import Sampling, TeacherOptions, build_teacher, close_all, nonempty, reply_meta
from toolkit.generate.inputs import read_prompts
from toolkit.generate.rouge import Pool
from toolkit.generate.runner import Caller, Drop, Job, RunOptions, Summary, output_files, row_id, run_jobs
from toolkit.io import read_existing
from toolkit.resources import render_prompt, template_hash
from toolkit.rows import dialogue_text
from toolkit.scorers import BLACKLIST

TEMPLATE = "self_instruct"
PREFIX = re.compile(r"^\s*(?:task\s*\d*\s*[:.)-]|instruction\s*[:.-]|\d+\s*[.):-])\s*", re.IGNORECASE)


@dataclass(frozen=True)
class Filters:
    max_rouge: float = 0.7
    min_words: int = 3
    max_words: int = 150


@dataclass(frozen=True)
class Plan:
    num_instructions: int = 100  # new instructions wanted
    num_examples: int = 8  # instructions shown per request
    machine_examples: int = 2  # of which written earlier by the teacher, once there are some
    max_requests: int = 0  # give up after this many requests (0: 4 x num_instructions)


def clean_instruction(text: str) -> str:
    """The instruction in a reply: first non-empty line, without 'Task 9:' / '1.' prefixes or quotes."""
    line = next((ln for ln in text.strip().splitlines() if ln.strip()), "")
    line = PREFIX.sub("", line).strip()
    if len(line) >= 2 and line[0] == line[-1] and line[0] in "\"'`":
        line = line[1:-1].strip()
    return line


def reject_reason(instruction: str, filters: Filters) -> str | None:
    """Why an instruction is filtered out before the ROUGE-L check (None: it passes)."""
    words = instruction.split()
    if len(words) < filters.min_words:
        return f"too short ({len(words)} words < {filters.min_words})"
    if len(words) > filters.max_words:
        return f"too long ({len(words)} words > {filters.max_words})"
    if not instruction[0].isalnum():
        return "starts with punctuation"
    lowered = instruction.lower()
    hit = next((w for w in BLACKLIST if re.search(rf"\b{re.escape(w)}\b", lowered)), None)
    if hit:
        return f"blacklisted word '{hit}'"
    return None


class SelfInstruct:
    """The pool and the accept/reject decision, shared by all in-flight requests of one run."""

    def __init__(self, seeds: list[str], accepted: list[str], filters: Filters, plan: Plan, seed: int):
        self.seeds, self.machine = seeds, list(accepted)
        self.pool = Pool([*seeds, *accepted])
        self.filters, self.plan, self.seed = filters, plan, seed

    def examples(self, k: int) -> list[str]:
        rng = random.Random(f"{self.seed}-{k}")
        n_machine = min(self.plan.machine_examples, len(self.machine))
        n_seed = min(len(self.seeds), self.plan.num_examples - n_machine)
        chosen = rng.sample(self.seeds, n_seed) + rng.sample(self.machine, n_machine)
        rng.shuffle(chosen)
        return chosen

    def decide(self, instruction: str) -> tuple[str | None, float, str | None]:
        """(reason to reject or None, highest ROUGE-L, most similar); accepting adds it to the pool."""
        reason = reject_reason(instruction, self.filters)
        if reason:
            return reason, 0.0, None
        score, similar = self.pool.most_similar(instruction)
        if score >= self.filters.max_rouge:
            return f"ROUGE-L {score:.2f} >= {self.filters.max_rouge} against the pool", score, similar
        self.pool.add(instruction)
        self.machine.append(instruction)
        return None, score, similar

    @property
    def accepted(self) -> int:
        """Instructions in the output: from earlier runs and this one."""
        return len(self.machine)


def seed_texts(path: str | os.PathLike, limit: int | None) -> list[str]:
    texts = []
    for p in read_prompts(path, limit):
        text = p.row.get("instruction") if isinstance(p.row.get("instruction"), str) else dialogue_text(p.prompt)
        texts.append(" ".join(text.split()))
    if not texts:
        raise UserError("no seed tasks", file=str(path))
    return list(dict.fromkeys(texts))


async def generate(seeds_path: str | os.PathLike, out: str | os.PathLike, *, teacher: str, plan: Plan | None = None,
                   filters: Filters | None = None, sampling: Sampling | None = None,
                   options: RunOptions | None = None, teacher_options: TeacherOptions | None = None,
                   limit: int | None = None, fmt: str = "jsonl") -> Summary:
    plan = plan if plan is not None else Plan()
    filters = filters if filters is not None else Filters()
    sampling = sampling if sampling is not None else Sampling(max_tokens=128, temperature=1.0)
    options = options if options is not None else RunOptions()
    teacher_options = teacher_options if teacher_options is not None else TeacherOptions()
    seeds = seed_texts(seeds_path, limit)
    files = output_files(out, fmt)
    accepted = [r["instruction"] for r in read_existing(files.rows) if isinstance(r.get("instruction"), str)]
    state = SelfInstruct(seeds, accepted, filters, plan, sampling.seed or 0)
    render_prompt(TEMPLATE, examples=seeds[:2])  # a broken prompt file stops here, before any request
    t_hash = template_hash(TEMPLATE)
    seeds_hash = hashlib.sha256("\n".join(seeds).encode()).hexdigest()[:16]
    total = plan.max_requests or 4 * plan.num_instructions
    model = build_teacher(teacher, teacher_options)
    settings = {**asdict(plan), **asdict(filters), "num_instructions": None, "max_requests": None}
    run = {"kind": "instruction", "teacher": model.name, "template": t_hash, "seeds": seeds_hash,
           "sampling": asdict(sampling), "settings": settings}

    def job(k: int) -> Job:
        seed = None if sampling.seed is None else sampling.seed + k
        rid = row_id(kind="instruction", teacher=model.name, template=t_hash, seeds=seeds_hash, request=k,
                     sampling=asdict(sampling), settings=settings)

        async def work(caller: Caller) -> dict[str, Any] | Drop:
            examples = state.examples(k)
            prompt = render_prompt(TEMPLATE, examples=examples)
            reply, text = await caller.chat(model, [{"role": "user", "content": prompt}], nonempty,
                                            **sampling.params(seed=seed))
            instruction = clean_instruction(text)
            reason, score, similar = state.decide(instruction)
            meta = {**reply_meta(reply, t_hash), "teacher": model.name, "request": k, "rouge_l_max": round(score, 4),
                    "most_similar": similar, "examples": examples}
            if reason:
                return Drop(reason, {"instruction": instruction, "raw": text, "meta": meta})
            return {"instruction": instruction, "input": "", "meta": meta}

        return Job(rid, {"request": k}, work, run)

    try:
        summary = await run_jobs([job(k) for k in range(total)], files, options, "self-instruct",
                                 stop=lambda: state.accepted >= plan.num_instructions)
    finally:
        await close_all([model])
    summary.requested = plan.num_instructions
    summary.extra["instructions in output"] = state.accepted
    summary.extra["seed tasks"] = len(seeds)
    return summary


def run(*args: Any, **kwargs: Any) -> Summary:
    return asyncio.run(generate(*args, **kwargs))
