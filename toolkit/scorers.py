"""Rule scorers: cheap, explainable rewards that need no model (`rules:length,refusal=2,...`).

Every rule maps (prompt, response, finish_reason) to a score in [0, 1], higher is better; a spec's
score is the weighted mean, and `explain` shows each rule's part so a row can say why it won.

A context rule also reads the prompt's row (its structured fields, the `context`): `constraints` scores
the share of the row's verifiable constraints (toolkit/constraints.py) the answer satisfies, and explains
it per family as `constraints/<kind>`. Callers pass each prompt's row as `context=` / `contexts=`, and call
`check_context` on every row before any generation, so a row the rule cannot score stops the run at once.
A bare `rules` means every context-free rule (the context rules need rows made for them).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from toolkit import constraints as verifiable
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


def constraints(prompt: str, response: str, finish_reason: str | None,
                context: Mapping[str, Any]) -> tuple[float, dict[str, float]]:
    """Share of the row's `constraints` the answer satisfies, and the share per constraint kind."""
    rules = context["constraints"]
    return verifiable.fraction(response, rules), verifiable.per_kind(response, rules)


def _constraints_problem(context: Mapping[str, Any]) -> tuple[str, str] | None:
    if "constraints" not in context:
        return "constraints", ("missing: rules:constraints scores answers against each row's constraints "
                               "(make such rows with `llamakit generate-data constraints`)")
    try:
        verifiable.validate(context["constraints"])
    except ValueError as err:
        return "constraints", str(err)
    return None


@dataclass(frozen=True)
class ContextRule:
    """A rule that reads the prompt's row: (prompt, response, finish_reason, row) -> (score, {part: score})."""

    score: Callable[[str, str, str | None, Mapping[str, Any]], tuple[float, dict[str, float]]]
    problem: Callable[[Mapping[str, Any]], tuple[str, str] | None]  # (field, why) when a row cannot be scored
    fields: tuple[str, ...]  # the row fields it reads


CONTEXT_RULES: dict[str, ContextRule] = {"constraints": ContextRule(constraints, _constraints_problem,
                                                                    ("constraints",))}
KNOWN = (*RULES, *CONTEXT_RULES)


@dataclass
class RuleScorer:
    weights: dict[str, float]

    @property
    def name(self) -> str:
        return "rules:" + ",".join(f"{k}={v:g}" for k, v in self.weights.items())

    @property
    def needs_context(self) -> bool:
        """True when a rule reads the prompt's row (rules:constraints): pass `context` / `contexts`."""
        return any(rule in CONTEXT_RULES for rule in self.weights)

    def context_of(self, row: Mapping[str, Any]) -> dict[str, Any]:
        """The fields of `row` the rules read ({} for context-free rules): what a cached score depends on."""
        return {f: row.get(f) for rule in self.weights if rule in CONTEXT_RULES for f in CONTEXT_RULES[rule].fields}

    def check_context(self, context: Mapping[str, Any] | None, **where: Any) -> None:
        """Raise a one-line UserError (at `where`: file, line) when a rule cannot score this row."""
        for rule in self.weights:
            if rule not in CONTEXT_RULES:
                continue
            if context is None:
                raise UserError(f"rules:{rule} needs each prompt's row, and this caller gives none", **where)
            problem = CONTEXT_RULES[rule].problem(context)
            if problem is not None:
                raise UserError(problem[1], field=problem[0], **where)

    def explain(self, prompt: str, response: str, finish_reason: str | None = None,
                context: Mapping[str, Any] | None = None) -> dict[str, float]:
        """Each rule's score; a context rule adds its parts as `rule/part` (e.g. constraints/no_commas)."""
        parts: dict[str, float] = {}
        for rule in self.weights:
            if rule in RULES:
                parts[rule] = RULES[rule](prompt, response, finish_reason)
                continue
            self.check_context(context)
            parts[rule], details = CONTEXT_RULES[rule].score(prompt, response, finish_reason, context)
            parts.update({f"{rule}/{key}": value for key, value in details.items()})
        return parts

    def score_one(self, prompt: str, response: str, finish_reason: str | None = None,
                  context: Mapping[str, Any] | None = None) -> float:
        return self.combine(self.explain(prompt, response, finish_reason, context))

    def combine(self, parts: Mapping[str, float]) -> float:
        """The weighted mean of the rules' scores in `explain`'s parts (its `rule/part` entries are ignored)."""
        return sum(w * parts[rule] for rule, w in self.weights.items()) / sum(self.weights.values())

    def score(self, prompts: Sequence[str], responses: Sequence[str],
              finish_reasons: Sequence[str | None] | None = None,
              contexts: Sequence[Mapping[str, Any] | None] | None = None) -> list[float]:
        """One score per response; `contexts`: each prompt's row, for the context rules."""
        reasons = finish_reasons or [None] * len(responses)
        rows = contexts if contexts is not None else [None] * len(responses)
        return [self.score_one(p, r, f, c) for p, r, f, c in zip(prompts, responses, reasons, rows, strict=True)]


def parse_rules(spec: str) -> RuleScorer:
    """`rules:length,refusal=2` -> RuleScorer({'length': 1, 'refusal': 2}); bare `rules` means all the
    context-free rules (`rules:constraints` must be asked for by name: it needs rows with constraints)."""
    kind, _, body = spec.partition(":")
    if kind.strip() != "rules":
        raise UserError(f"rule scorers are written rules or rules:NAME[=WEIGHT],..., got '{spec}'")
    if not body.strip():
        return RuleScorer({name: 1.0 for name in RULES})
    weights: dict[str, float] = {}
    for item in body.split(","):
        name, _, weight = item.strip().partition("=")
        if name not in KNOWN:
            raise UserError(f"unknown rule '{name}' in '{spec}' (known: {', '.join(KNOWN)})")
        try:
            weights[name] = float(weight) if weight else 1.0
        except ValueError:
            raise UserError(f"rule weight '{weight}' in '{spec}' is not a number") from None
        if not math.isfinite(weights[name]) or weights[name] < 0:
            raise UserError(f"rule weight '{weight}' in '{spec}' must be a finite number >= 0")
    if sum(weights.values()) <= 0:
        raise UserError(f"rule weights in '{spec}' must add up to more than 0")
    return RuleScorer(weights)
