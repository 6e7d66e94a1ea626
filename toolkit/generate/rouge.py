"""ROUGE-L (longest common subsequence F-measure), as self-instruct uses it to keep instructions diverse.

Tokens as in Google's `rouge-score` without stemming: lower-cased, runs of [a-z0-9].
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

TOKEN = re.compile(r"[a-z0-9]+")


def tokens(text: str) -> list[str]:
    return TOKEN.findall(text.lower())


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence (O(len(a) * len(b)) time, O(len(b)) memory)."""
    if not a or not b:
        return 0
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b, start=1):
            current.append(previous[j - 1] + 1 if x == y else max(previous[j], current[j - 1]))
        previous = current
    return previous[-1]


def rouge_l(a: str | Sequence[str], b: str | Sequence[str]) -> float:
    """ROUGE-L F1 between two texts (or token lists); 0 when either is empty."""
    ta = tokens(a) if isinstance(a, str) else list(a)
    tb = tokens(b) if isinstance(b, str) else list(b)
    lcs = lcs_length(ta, tb)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(ta), lcs / len(tb)
    return 2 * precision * recall / (precision + recall)


class Pool:
    """Instructions accepted so far; `most_similar` is the ROUGE-L filter's question."""

    def __init__(self, texts: Iterable[str] = ()):
        self.texts: list[str] = []
        self._tokens: list[list[str]] = []
        for text in texts:
            self.add(text)

    def add(self, text: str) -> None:
        self.texts.append(text)
        self._tokens.append(tokens(text))

    def most_similar(self, text: str) -> tuple[float, str | None]:
        """(highest ROUGE-L against the pool, that pool entry)."""
        candidate = tokens(text)
        best, best_text = 0.0, None
        cset = set(candidate)
        for other, other_text in zip(self._tokens, self.texts, strict=True):
            if not cset.intersection(other):
                continue
            score = rouge_l(candidate, other)
            if score > best:
                best, best_text = score, other_text
        return best, best_text

    def __len__(self) -> int:
        return len(self.texts)
