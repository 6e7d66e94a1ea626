"""The paired change of two arms measured on the same items (prompts, test pairs): mean and normal 95% interval."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any


def paired_points(diffs: Sequence[float]) -> dict[str, Any]:
    """Mean of per-item differences (already in points) and its normal 95% interval, rounded to 0.1."""
    n = len(diffs)
    if n < 2:
        return {"points": None, "ci95": None, "n": n}
    m = sum(diffs) / n
    half = 1.96 * math.sqrt(sum((d - m) ** 2 for d in diffs) / (n - 1) / n)
    return {"points": round(m, 1), "ci95": [round(m - half, 1), round(m + half, 1)], "n": n}
