"""Config dataclass fields that are also CLI flags: declared once with `flag_field`, read by the flag builder
(toolkit/commands/params.py) and by `check_ranges`, so a default, help text or range is written in one place.

No click here: the configs (SFTConfig, PPOConfig, reward TrainConfig, the generate-data engine options)
import this module without importing the command layer. A field's metadata holds:

    help        the flag's help text ("" for none); a field without it is not a flag (show_progress ...)
    flag        the flag's name when it is not the field's name in kebab-case ("margin" for use_margin)
    aliases     further spellings of the same flag ("grad-accum")
    min, max, min_open, max_open, inf    the range of a number (inf: the float may be infinite)
    nonempty    text that must not be empty ("" as the default then means: required)
    path        "any", "file" or "dir": a path that must not be empty
    choices     the values a text flag takes
    negatable   False for a boolean that is an on-switch only (`--lora`, no `--no-lora`)

A YAML config file's keys are the flag names or the field names.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from toolkit.errors import UserError

# Seeds get offsets (seed + 7919 * rank, seed + j per candidate) and some libraries take only 32-bit seeds
# (numpy's legacy seeding): 2^31 - 1 leaves room for the offsets in all of them.
SEED_MAX = 2**31 - 1
# seed · SEED_STRIDE + i gives every (seed, i) its own seed: i (a row, an epoch) stays below this prime in any
# run, so two seeds' sequences never overlap. Also the shift to a fresh sampling seed on a retry.
SEED_STRIDE = 1_000_003


def flag_field(default: Any = dataclasses.MISSING, help: str = "", **meta: Any) -> Any:  # noqa: A002 - reads best
    """A config field that becomes one CLI flag, with `help` and the metadata keys listed above. No default:
    a required flag."""
    return dataclasses.field(default=default, metadata={"help": help, **meta})


def flag_fields(cls: type) -> list[dataclasses.Field]:
    """The fields of `cls` declared with `flag_field`, in order."""
    return [f for f in dataclasses.fields(cls) if "help" in f.metadata]


def flag_name(f: dataclasses.Field) -> str:
    """`--NAME` of a field without the dashes: its `flag` metadata, else the field name in kebab-case."""
    return f.metadata.get("flag", f.name.replace("_", "-"))


def describe_range(meta: dict[str, Any]) -> str:
    """"≥ 1", "> 0", "in [0, 1]", "in (0, 1]" for a field's range metadata."""
    lo, hi = meta.get("min"), meta.get("max")
    if lo is not None and hi is not None:
        return f"in {'(' if meta.get('min_open') else '['}{lo}, {hi}{')' if meta.get('max_open') else ']'}"
    if lo is not None:
        return f"{'>' if meta.get('min_open') else '≥'} {lo}"
    return f"{'<' if meta.get('max_open') else '≤'} {hi}"


def range_error(value: Any, meta: dict[str, Any]) -> str | None:
    """Why `value` is outside the range in `meta`, or None when it is inside (or has no range)."""
    if meta.get("nonempty") and isinstance(value, str) and not value.strip():
        return "must not be empty"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if math.isnan(value) or (math.isinf(value) and not meta.get("inf")):
        return "must be a finite number"
    lo, hi = meta.get("min"), meta.get("max")
    below = lo is not None and (value < lo or (meta.get("min_open", False) and value == lo))
    above = hi is not None and (value > hi or (meta.get("max_open", False) and value == hi))
    return f"must be {describe_range(meta)}, got {value}" if below or above else None


def check_ranges(config: Any) -> None:
    """Raise UserError naming the flag of the first field outside its range (what the CLI checks at parse
    time, for configs built in Python)."""
    for f in dataclasses.fields(config):
        why = range_error(getattr(config, f.name), f.metadata)
        if why:
            raise UserError(f"--{flag_name(f)}: {why}")
