"""Pieces the sub-commands share: sampling params, teachers without their own retries, row meta."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from toolkit.errors import UserError
from toolkit.options import SEED_MAX
from toolkit.options import flag_field as _f


@dataclass(frozen=True)
class Sampling:
    max_tokens: int = _f(256, "Tokens per answer at most.", min=1)
    temperature: float = _f(0.7, min=0)
    top_p: float = _f(1.0, min=0, max=1)
    seed: int | None = _f(0, "Base seed sent with requests (part of every row id).", min=0, max=SEED_MAX)

    def params(self, **override: Any) -> dict[str, Any]:
        """Keyword arguments for `teacher.chat` (seed None means the teacher's own randomness)."""
        return {**asdict(self), **override}


@dataclass(frozen=True)
class TeacherOptions:
    base_url: str | None = _f(None, "OpenAI-compatible server for openai: teachers.")
    api_key_env: str = _f("OPENAI_API_KEY", "Environment variable holding the API key (never printed or stored).")
    kwargs_json: str = _f("{}", "JSON kwargs for langchain: teachers, e.g. '{\"model\": \"gpt-4o-mini\"}'.",
                          flag="teacher-kwargs")
    timeout: float = 60.0  # seconds per request: the CLI sets it from RunOptions.timeout


def teacher_kwargs(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text or "{}")
    except ValueError as err:
        raise UserError(f"--teacher-kwargs is not JSON: {err}") from None
    if not isinstance(value, dict):
        raise UserError("--teacher-kwargs must be a JSON object")
    return value


def build_teacher(spec: str, options: TeacherOptions) -> Any:
    """A teacher whose client does not retry on its own: the runner retries, honouring Retry-After."""
    from toolkit.teachers import make_teacher

    kwargs = teacher_kwargs(options.kwargs_json)
    if spec.startswith("langchain:"):
        kwargs.setdefault("max_retries", 0)
    return make_teacher(spec, base_url=options.base_url, api_key_env=options.api_key_env, kwargs=kwargs,
                        timeout=options.timeout, max_retries=0)


async def close_all(teachers: Sequence[Any]) -> None:
    from toolkit.teachers import close_teacher

    seen: set[int] = set()
    for teacher in teachers:
        if teacher is not None and id(teacher) not in seen:
            seen.add(id(teacher))
            await close_teacher(teacher)


def reply_meta(reply: Any, template: str | None = None) -> dict[str, Any]:
    """model, template hash, tokens, latency, finish_reason of one call (never a key)."""
    meta = dict(reply.meta)
    if template is not None:
        meta["template"] = template
    return meta


def sum_meta(metas: Sequence[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    """Meta of a row made by several calls: tokens and latency summed, the last finish_reason."""
    out: dict[str, Any] = {
        "model": sorted({m.get("model", "") for m in metas if m.get("model")}),
        "prompt_tokens": sum(m.get("prompt_tokens", 0) for m in metas),
        "completion_tokens": sum(m.get("completion_tokens", 0) for m in metas),
        "latency_s": round(sum(m.get("latency_s", 0.0) for m in metas), 4),
        "finish_reason": metas[-1].get("finish_reason") if metas else None,
        "calls": len(metas),
    }
    if len(out["model"]) == 1:
        out["model"] = out["model"][0]
    out.update(extra)
    return out


def nonempty(text: str) -> str:
    """A parse function for `Caller.chat`: an empty reply is retried, not written."""
    from toolkit.generate.runner import Unparsable

    if not text.strip():
        raise Unparsable("the teacher answered with empty text")
    return text.strip()
