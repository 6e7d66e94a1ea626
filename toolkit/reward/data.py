"""Preference files in, (prompt, chosen, rejected) pairs out: reading, format detection, held-out split.

Rows become `toolkit.rows.Pair` / `Scored`, whose texts are Anthropic HH style, so HH data, llamakit rows and
the PPO loop's (prompt, response) all look alike to the reward model (`toolkit.rows.hh_join`):

    "\\n\\nHuman: {prompt}\\n\\nAssistant: {response}"
"""

from __future__ import annotations

import itertools
import os
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from toolkit.errors import BadRow, UserError
from toolkit.io import located_rows
from toolkit.rows import ASSISTANT, Pair, Scored, preference_pair, scored_answer

FORMATS = ("auto", "preference", "hh", "implicit", "chatllama")


@dataclass
class PreferenceData:
    source: str
    format: str
    pairs: list[Pair] = field(default_factory=list)
    scored: list[Scored] = field(default_factory=list)
    bad_rows: list[str] = field(default_factory=list)  # the one-line error of each row set aside


def load_preferences(path: str | os.PathLike, fmt: str = "auto", skip_bad_rows: bool = False,
                     candidate_pairs: bool = False) -> PreferenceData:
    """Read a preference file (JSONL / JSON / Parquet) or a `datasets` save_to_disk directory
    (`toolkit.io.located_rows`). A row that does not parse stops the read, or with `skip_bad_rows` is set aside
    and named in `bad_rows`; a file with no good row is an error either way. `candidate_pairs`: each row's
    `ranked_candidate_pairs` follow its own pair."""
    if fmt not in FORMATS:
        raise UserError(f"unknown --format '{fmt}' (one of {', '.join(FORMATS)})")
    path = str(path)
    bad_rows: list[str] = []
    rows = located_rows(path, bad_lines=bad_rows if skip_bad_rows else None)
    if fmt == "auto":
        first, loc = rows[0]
        fmt = detect_format(first, loc["file"], loc.get("line"))
    data = PreferenceData(source=path, format=fmt, bad_rows=bad_rows)
    n_candidate_pairs = 0
    for row, loc in rows:
        try:
            if fmt == "chatllama":
                data.scored.append(scored_answer(row, loc))
            else:
                pair = preference_pair(row, fmt, loc)
                data.pairs.append(pair)
                if candidate_pairs:
                    ranked = ranked_candidate_pairs(row, pair)
                    data.pairs.extend(ranked)
                    n_candidate_pairs += len(ranked)
        except UserError as error:
            if not skip_bad_rows:
                raise BadRow(str(error)) from None
            data.bad_rows.append(str(error))
    if data.bad_rows and not (data.pairs or data.scored):
        raise UserError(f"no good row: all {len(data.bad_rows)} set aside, the first: {data.bad_rows[0]}", file=path)
    if candidate_pairs and not n_candidate_pairs and not data.scored:
        raise UserError("--candidate-pairs: no row keeps two candidates that score apart in meta.candidates "
                        "(`generate-data preferences` writes them there)", file=path)
    return data


def ranked_candidate_pairs(row: dict[str, Any], pair: Pair) -> list[Pair]:
    """Every two of the row's scored candidates (`meta.candidates`, as `generate-data preferences` keeps the K
    answers it ranked) that score apart, the better one chosen and the score difference as margin: the
    K-choose-2 comparisons a prompt gives (InstructGPT's reward model trains on all of them). The row's own pair
    and pairs of identical texts are left out; a row without scored candidates gives none."""
    meta = row.get("meta")
    candidates = meta.get("candidates") if isinstance(meta, dict) else None
    if not isinstance(candidates, list):
        return []
    ranked = [(c["text"], float(c["score"])) for c in candidates
              if isinstance(c, dict) and isinstance(c.get("text"), str) and isinstance(c.get("score"), (int, float))
              and not isinstance(c.get("score"), bool)]
    pairs = []
    for a, b in itertools.combinations(ranked, 2):
        (better, high), (worse, low) = (a, b) if a[1] >= b[1] else (b, a)
        if high > low and better != worse and (better, worse) != (pair.chosen, pair.rejected):
            pairs.append(Pair(pair.prompt, better, worse, round(high - low, 4), pair.line))
    return pairs


def detect_format(row: dict[str, Any], path: str = "<data>", line: int | None = None) -> str:
    """Name of the format of a file, from its first row's keys and value types."""
    keys = set(row)
    scored = {"prompt", "response", "score"} <= keys or {"prompt", "completion", "score"} <= keys
    if {"user_input", "completion"} <= keys or (scored and "chosen" not in keys):
        return "chatllama"
    if "prompt" in keys and ("chosen" in keys or "rejected" in keys):
        return "preference"
    if "chosen" in keys:
        chosen = row["chosen"]
        if isinstance(chosen, str) and ASSISTANT in chosen:
            return "hh"
        return "implicit"
    raise UserError("cannot tell the format: expected `prompt`/`chosen`/`rejected` (llamakit, TRL), "
                    "`chosen`/`rejected` (Anthropic HH, TRL implicit prompt) or `user_input`/`completion`/"
                    f"`score` (ChatLLaMA); found keys {sorted(keys)}", file=path, line=line)


def pairs_from_scored(scored: list[Scored]) -> list[Pair]:
    """Pairs from scored rows that share a prompt: each better answer against each worse one."""
    by_prompt: dict[str, list[Scored]] = defaultdict(list)
    for row in scored:
        by_prompt[row.prompt].append(row)
    pairs = []
    for prompt, rows in by_prompt.items():
        for a in rows:
            for b in rows:
                if a.score > b.score and a.response != b.response:
                    pairs.append(Pair(prompt, a.response, b.response, 0.0, a.line))
    return pairs


def split(items: list, fraction: float, seed: int) -> tuple[list, list]:
    """(train, held-out): a seeded shuffle, so a re-run holds out the same rows."""
    import random

    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    n_out = int(round(len(items) * fraction))
    held = set(order[:n_out])
    return [x for i, x in enumerate(items) if i not in held], [x for i, x in enumerate(items) if i in held]


def split_by_prompt(items: list, fraction: float, seed: int) -> tuple[list, list]:
    """(train, held-out) with every item of a prompt on one side: `split` of the sorted distinct prompts."""
    held = set(split(sorted({item.prompt for item in items}), fraction, seed)[1])
    return [x for x in items if x.prompt not in held], [x for x in items if x.prompt in held]
