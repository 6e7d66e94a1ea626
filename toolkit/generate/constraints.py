"""`generate-data constraints`: verifiable instruction-following prompts from any prompt file.

Each input prompt gets 1..3 (--per-prompt) compatible constraints from toolkit/constraints.py, stated in
plain English after the instruction and kept as data beside it:

    {"id", "prompt": "<instruction>\\n\\n<constraint sentences>", "base_prompt": "<instruction>",
     "constraints": [{"kind", "args"}], "meta": {"seed", "source_row", "phrasings", "template"}}

The original instruction is `base_prompt`, not `instruction`: readers of Alpaca rows (llamakit's own SFT and
PPO loaders among them) take `instruction` before `prompt`, and would train on the text without its
constraints. A dialogue prompt keeps its turns; the sentences join its last user turn.

Everything is drawn from a generator seeded by (--seed, the instruction's text), so the same command gives
the same file byte for byte, and an instruction gets the same constraints whatever rows surround it. The
step is local and fast: the whole file is written at once (temp file + rename), never half.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from toolkit import constraints as verifiable
from toolkit.errors import UserError
from toolkit.generate.inputs import read_prompts
from toolkit.generate.runner import row_id
from toolkit.rows import Messages, PromptRow, dialogue_text


@dataclass(frozen=True)
class PerPrompt:
    """How many constraints each prompt gets: drawn uniformly in low..high."""

    low: int = 1
    high: int = 3

    def __str__(self) -> str:
        return str(self.low) if self.low == self.high else f"{self.low}..{self.high}"


def parse_per_prompt(text: str, kinds: Sequence[str] = verifiable.KINDS) -> PerPrompt:
    """'2' or '1..3' -> PerPrompt; a ValueError says why not (also when the kinds cannot give that many)."""
    low_text, sep, high_text = str(text).strip().partition("..")
    try:
        low = int(low_text)
        high = int(high_text) if sep else low
    except ValueError:
        raise ValueError(f"expected N or LOW..HIGH (e.g. 2 or 1..3), got {text!r}") from None
    if not 1 <= low <= high:
        raise ValueError(f"expected 1 <= LOW <= HIGH, got {text!r}")
    if not verifiable.kind_sets(tuple(kinds), high):
        most = max(n for n in range(1, len(kinds) + 1) if verifiable.kind_sets(tuple(kinds), n))
        raise ValueError(f"at most {most} of the kinds {', '.join(kinds)} can be asked together, not {high}")
    return PerPrompt(low, high)


def parse_kinds(text: str | None) -> tuple[str, ...]:
    """'json,no_commas' -> ('json', 'no_commas') in the canonical order; None or '' -> every kind."""
    if not text or not text.strip():
        return verifiable.KINDS
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in verifiable.FAMILIES]
    if unknown:
        raise ValueError(f"unknown constraint kind '{unknown[0]}' (known: {', '.join(verifiable.KINDS)})")
    return tuple(kind for kind in verifiable.KINDS if kind in names)


def _with_sentences(prompt: str | Messages, sentences: str) -> str | Messages:
    if isinstance(prompt, str):
        return f"{prompt.rstrip()}\n\n{sentences}"
    last = max(i for i, m in enumerate(prompt) if m["role"] == "user")
    turns = [dict(m) for m in prompt]
    turns[last]["content"] = f"{turns[last]['content'].rstrip()}\n\n{sentences}"
    return turns


def make_row(p: PromptRow, *, seed: int, per_prompt: PerPrompt, kinds: Sequence[str], template: str) -> dict[str, Any]:
    """One output row for input prompt `p` (deterministic in seed and the prompt's text)."""
    text = dialogue_text(p.prompt)
    rng = verifiable.rng_for(seed, text)
    count = rng.randint(per_prompt.low, per_prompt.high)
    drawn = verifiable.draw(text, rng, count, kinds)
    rules = [c for c, _ in drawn]
    sentences = " ".join(verifiable.describe(c, phrasing) for c, phrasing in drawn)
    rid = row_id(kind="constraints", inputs=p.prompt, constraints=rules, seed=seed, template=template)
    return {"id": rid, "prompt": _with_sentences(p.prompt, sentences), "base_prompt": p.prompt,
            "constraints": rules,
            "meta": {"seed": seed, "source_row": p.index + 1, "phrasings": [i for _, i in drawn],
                     "template": template}}


def build_rows(prompts: Sequence[PromptRow], *, seed: int = 0, per_prompt: PerPrompt = PerPrompt(),
               kinds: Sequence[str] = verifiable.KINDS) -> tuple[list[dict[str, Any]], int]:
    """(rows, duplicates dropped): a prompt repeated in the input is written once (it would get the same
    constraints, and the same id, again)."""
    template = verifiable.phrasings_hash()
    rows: dict[str, dict[str, Any]] = {}
    for p in prompts:
        row = make_row(p, seed=seed, per_prompt=per_prompt, kinds=kinds, template=template)
        rows.setdefault(row["id"], row)
    return list(rows.values()), len(prompts) - len(rows)


def run(prompts_path: str | os.PathLike, out: str | os.PathLike, *, seed: int = 0,
        per_prompt: PerPrompt = PerPrompt(), kinds: Sequence[str] = verifiable.KINDS, limit: int | None = None,
        overwrite: bool = False) -> dict[str, Any]:
    """Read the prompts (any input format), write OUT (JSONL, or a JSON array for a .json name); a summary."""
    from toolkit.generate.formats import write_rows
    from toolkit.io import require_new_file

    if Path(prompts_path).resolve() == Path(out).resolve():
        raise UserError("--out is the --prompts file; choose another name", file=str(out))
    require_new_file(out, overwrite=overwrite)  # before reading: a refused run does no work
    rows, duplicates = build_rows(read_prompts(prompts_path, limit or None), seed=seed, per_prompt=per_prompt,
                                  kinds=kinds)
    write_rows(rows, out, "llamakit", overwrite=overwrite)
    per_kind = Counter(c["kind"] for row in rows for c in row["constraints"])
    return {"out": str(out), "rows": len(rows), "duplicates": duplicates, "seed": seed,
            "per_prompt": str(per_prompt), "constraints": sum(per_kind.values()),
            "per_kind": {kind: per_kind[kind] for kind in kinds}}
