"""ChatLLaMA's role-play: a user-simulator agent and an assistant agent talk for T turns from a seed prompt.

Each agent is its own teacher with its own system prompt from prompts/; each sees only the last k
turns (window memory). The user simulator sees the dialogue with the roles flipped, so "its" replies
are the user's next messages. `--turns 1` gives single-turn answers (one request per row).
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import asdict, dataclass
from typing import Any

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
from toolkit.generate.runner import Caller, Job, RunOptions, Summary, output_files, row_id, run_jobs
from toolkit.resources import render_prompt, template_hash
from toolkit.rows import Messages, PromptRow


@dataclass(frozen=True)
class Dialogue:
    turns: int = 2  # assistant answers per conversation
    window: int = 4  # each agent sees the last k turns (user + assistant message pairs)
    assistant_system: str = "assistant_system"  # prompt names under prompts/ (or paths to .txt files)
    user_system: str = "user_simulator_system"
    user_temperature: float = 0.9
    user_max_tokens: int = 96


def window(messages: Messages, k: int) -> Messages:
    """The last k turns: the messages from the k-th last user message on (k <= 0 keeps everything)."""
    if k <= 0:
        return list(messages)
    starts = [i for i, m in enumerate(messages) if m["role"] == "user"]
    return list(messages[starts[-k]:]) if len(starts) >= k else list(messages)


def flip_roles(messages: Messages) -> Messages:
    """The dialogue seen from the user simulator's side: user <-> assistant."""
    swap = {"user": "assistant", "assistant": "user"}
    return [{"role": swap[m["role"]], "content": m["content"]} for m in messages if m["role"] in swap]


def seed_messages(prompt: str | Messages) -> tuple[str | None, Messages]:
    """(system message of the seed if any, dialogue so far)."""
    if isinstance(prompt, str):
        return None, [{"role": "user", "content": prompt}]
    system = next((m["content"] for m in prompt if m["role"] == "system"), None)
    return system, [dict(m) for m in prompt if m["role"] != "system"]


@dataclass(frozen=True)
class Agents:
    assistant: Any
    user_sim: Any
    assistant_system: str  # rendered once per run
    hashes: dict[str, str]  # template hashes, part of every row id and meta


def make_agents(assistant: Any, user_sim: Any, dialogue: Dialogue) -> Agents:
    hashes = {"assistant": template_hash(dialogue.assistant_system)}
    if dialogue.turns > 1:
        hashes["user"] = template_hash(dialogue.user_system)
        render_prompt(dialogue.user_system, goal="check")  # a broken prompt file stops before any request
    return Agents(assistant, user_sim, render_prompt(dialogue.assistant_system), hashes)


async def converse(caller: Caller, agents: Agents, prompt: str | Messages, dialogue: Dialogue,
                   sampling: Sampling) -> dict[str, Any]:
    seed_system, history = seed_messages(prompt)
    assistant_system = seed_system or agents.assistant_system
    user_system = ""
    if dialogue.turns > 1:
        goal = next(m["content"] for m in history if m["role"] == "user")
        user_system = render_prompt(dialogue.user_system, goal=goal)
    metas = []
    for turn in range(dialogue.turns):
        seed = None if sampling.seed is None else sampling.seed + turn
        if turn > 0:
            sim_messages = [{"role": "system", "content": user_system}, *flip_roles(window(history, dialogue.window))]
            reply, text = await caller.chat(agents.user_sim, sim_messages, nonempty, **sampling.params(
                temperature=dialogue.user_temperature, max_tokens=dialogue.user_max_tokens,
                seed=None if seed is None else seed + 100_000))
            history.append({"role": "user", "content": text})
            metas.append(reply_meta(reply, agents.hashes["user"]))
        messages = [{"role": "system", "content": assistant_system}, *window(history, dialogue.window)]
        reply, text = await caller.chat(agents.assistant, messages, nonempty, **sampling.params(seed=seed))
        history.append({"role": "assistant", "content": text})
        metas.append(reply_meta(reply, agents.hashes["assistant"]))
    out = ([{"role": "system", "content": seed_system}] if seed_system else []) + history
    extra = {"teacher": agents.assistant.name, "template": agents.hashes, "turns": dialogue.turns}
    if dialogue.turns > 1:
        extra["user_teacher"] = agents.user_sim.name
    return {"messages": out, "meta": sum_meta(metas, **extra)}


def make_jobs(prompts: list[PromptRow], agents: Agents, dialogue: Dialogue, sampling: Sampling) -> list[Job]:
    """One job per seed prompt; duplicates (same id) are run once."""
    settings = {**asdict(dialogue), "assistant_system": None, "user_system": None}
    if dialogue.turns <= 1:
        settings.update(user_temperature=None, user_max_tokens=None, window=None)
    user_name = agents.user_sim.name if dialogue.turns > 1 else None
    sampling_key = asdict(sampling)
    run = {"kind": "conversation", "teacher": agents.assistant.name, "user_teacher": user_name,
           "templates": agents.hashes, "sampling": sampling_key, "dialogue": settings}
    jobs: dict[str, Job] = {}
    for p in prompts:
        rid = row_id(kind="conversation", teacher=agents.assistant.name, user_teacher=user_name,
                     templates=agents.hashes, inputs=p.prompt, sampling=sampling_key, dialogue=settings)

        async def work(caller: Caller, prompt: str | Messages = p.prompt) -> dict[str, Any]:
            return await converse(caller, agents, prompt, dialogue, sampling)

        jobs.setdefault(rid, Job(rid, {"prompt": p.prompt, "line": p.line}, work, run))
    return list(jobs.values())


async def generate(prompts_path: str | os.PathLike, out: str | os.PathLike, *, teacher: str,
                   user_teacher: str | None = None, dialogue: Dialogue | None = None,
                   sampling: Sampling | None = None, options: RunOptions | None = None,
                   teacher_options: TeacherOptions | None = None, limit: int | None = None,
                   fmt: str = "jsonl") -> Summary:
    """Read seed prompts (all checked first), then run the conversations that are not done yet."""
    dialogue = dialogue if dialogue is not None else Dialogue()
    sampling = sampling if sampling is not None else Sampling()
    options = options if options is not None else RunOptions()
    teacher_options = teacher_options if teacher_options is not None else TeacherOptions()
    prompts = read_prompts(prompts_path, limit)
    files = output_files(out, fmt)
    assistant = build_teacher(teacher, teacher_options)
    user_sim = build_teacher(user_teacher, teacher_options) if user_teacher and user_teacher != teacher else assistant
    try:
        jobs = make_jobs(prompts, make_agents(assistant, user_sim, dialogue), dialogue, sampling)
        summary = await run_jobs(jobs, files, options, f"conversations ({dialogue.turns} turns)")
    finally:
        await close_all([assistant, user_sim])
    summary.extra["duplicates"] = len(prompts) - len(jobs)
    return summary


def run(*args: Any, **kwargs: Any) -> Summary:
    return asyncio.run(generate(*args, **kwargs))
