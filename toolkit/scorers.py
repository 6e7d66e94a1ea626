"""Rule scorers: cheap, explainable rewards that need no model (`rules:length,refusal=2,...`).

Every rule maps (prompt, response, finish_reason) to a score in [0, 1], higher is better; a spec's
score is the weighted mean, and `explain` shows each rule's part so a row can say why it won.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from toolkit.errors import UserError

REFUSAL_PHRASES = (
    "i'm sorry", "i am sorry", "i cannot", "i can't", "i can not", "as an ai", "as a language model",
    "i'm not able to", "i am not able to", "i won't", "i will not", "i apologize",
)
BLACKLIST = ("image", "graph", "picture", "file", "map", "draw", "plot", "go to", "video", "audio",
             "music", "flowchart", "diagram")


def length(prompt: str, response: str, finish_reason: str | None, target_words: int = 60) -> float:
    """1 near a target length, falling off for answers much shorter or longer."""
    words = len(response.split())
    if words == 0:
        return 0.0
    ratio = words / target_words
    return float(min(ratio, 1 / ratio))


def refusal(prompt: str, response: str, finish_reason: str | None) -> float:
    """0 for answers that open with a refusal or an 'as an AI' disclaimer."""
    head = response.strip().lower()[:160]
    return 0.0 if any(p in head for p in REFUSAL_PHRASES) else 1.0


def repetition(prompt: str, response: str, finish_reason: str | None, n: int = 3) -> float:
    """Share of distinct word n-grams: 1 for no repeats, towards 0 for loops."""
    words = response.lower().split()
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 1.0


def truncation(prompt: str, response: str, finish_reason: str | None) -> float:
    """0 when the answer was cut off by the token limit (finish_reason == 'length')."""
    return 0.0 if finish_reason == "length" else 1.0


def blacklist(prompt: str, response: str, finish_reason: str | None) -> float:
    """0 when the answer talks about things a text model cannot do (images, files, audio ...)."""
    text = response.lower()
    return 0.0 if any(re.search(rf"\b{re.escape(w)}\b", text) for w in BLACKLIST) else 1.0


def nonempty(prompt: str, response: str, finish_reason: str | None) -> float:
    return 1.0 if response.strip() else 0.0


def format_ok(prompt: str, response: str, finish_reason: str | None) -> float:
    """Ends like a finished sentence or block, and does not echo role markers into the answer."""
    text = response.strip()
    if not text or re.search(r"(^|\n)(user|assistant|human)\s*:", text, re.IGNORECASE):
        return 0.0
    return 1.0 if text[-1] in ".!?)\"'`*" or text.endswith("```") else 0.5


RULES: dict[str, Callable[[str, str, str | None], float]] = {
    "length": length, "refusal": refusal, "repetition": repetition, "truncation": truncation,
    "blacklist": blacklist, "nonempty": nonempty, "format": format_ok,
}


@dataclass
class RuleScorer:
    weights: dict[str, float]

    @property
    def name(self) -> str:
        return "rules:" + ",".join(f"{k}={v:g}" for k, v in self.weights.items())

    def explain(self, prompt: str, response: str, finish_reason: str | None = None) -> dict[str, float]:
        return {rule: RULES[rule](prompt, response, finish_reason) for rule in self.weights}

    def score_one(self, prompt: str, response: str, finish_reason: str | None = None) -> float:
        parts = self.explain(prompt, response, finish_reason)
        return sum(self.weights[r] * v for r, v in parts.items()) / sum(self.weights.values())

    def score(self, prompts: Sequence[str], responses: Sequence[str],
              finish_reasons: Sequence[str | None] | None = None) -> list[float]:
        reasons = finish_reasons or [None] * len(responses)
        return [self.score_one(p, r, f) for p, r, f in zip(prompts, responses, reasons, strict=True)]


def parse_rules(spec: str) -> RuleScorer:
    """`rules:length,refusal=2` -> RuleScorer({'length': 1, 'refusal': 2}); bare `rules` means all."""
    kind, _, body = spec.partition(":")
    if kind.strip() != "rules":
        raise UserError(f"rule scorers are written rules or rules:NAME[=WEIGHT],..., got '{spec}'")
    if not body.strip():
        return RuleScorer({name: 1.0 for name in RULES})
    weights: dict[str, float] = {}
    for item in body.split(","):
        name, _, weight = item.strip().partition("=")
        if name not in RULES:
            raise UserError(f"unknown rule '{name}' in '{spec}' (known: {', '.join(RULES)})")
        try:
            weights[name] = float(weight) if weight else 1.0
        except ValueError:
            raise UserError(f"rule weight '{weight}' in '{spec}' is not a number") from None
        if not math.isfinite(weights[name]) or weights[name] < 0:
            raise UserError(f"rule weight '{weight}' in '{spec}' must be a finite number >= 0")
    if sum(weights.values()) <= 0:
        raise UserError(f"rule weights in '{spec}' must add up to more than 0")
    return RuleScorer(weights)
