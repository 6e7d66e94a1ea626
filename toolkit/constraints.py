"""Verifiable instruction-following constraints (IFEval-style): the gold that no model has to judge.

A constraint is data, `{"kind": "no_commas", "args": {}}`, kept in a prompt row's `constraints` list beside
the prompt text that states it in plain English. A checker reads the data, never the prose:

    check(answer, constraint) -> bool            one constraint, by code
    fraction(answer, constraints) -> float       share satisfied (what `rules:constraints` scores)
    per_kind(answer, constraints) -> {kind: share}
    validate(row["constraints"])                 a ValueError naming the bad item and argument
    draw(text, rng_for(seed, text), count) -> [(constraint, phrasing number)]   compatible constraints
    describe(constraint, phrasing number) -> the sentence written into the prompt

Every family has a checker `check(answer, **args) -> bool`, an argument sampler and several phrasings
(prompts/constraints/<kind>.txt). What a checker decides, for every family:
  - an empty or whitespace-only answer satisfies nothing (else RL learns to say nothing);
  - leading and trailing whitespace never matters;
  - words are runs of letters/digits, with inner ' or - ("don't", "state-of-the-art" are one word);
  - keywords and forbidden words match whole words, case-insensitively;
  - start_word and end_phrase are case-sensitive ("sure" does not start with "Sure");
  - bullets: lines starting with a bullet marker (`*`, `-`, `+`, `•`) and a space; exactly N of them and
    all `* ` (a list written with `-` is not the list asked for);
  - json: the whole answer is one non-empty JSON object; one surrounding markdown code fence
    (```json ... ```) is allowed, as IFEval allows it; any other text around the object fails;
  - postscript: a line after the answer's first line that starts with the marker ("P.S.") and has text;
    "PS", "P.S" and "p.s." are not "P.S.";
  - quotes: the answer starts and ends with a double quote ("..." or “...”) and has text inside.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import random
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from toolkit.resources import prompt_path

Constraint = dict[str, Any]  # {"kind": str, "args": {...}}

WORD = re.compile(r"[^\W_]+(?:['’-][^\W_]+)*")
BULLET = re.compile(r"^[ \t]*([*+•-])[ \t]+\S", re.MULTILINE)
FENCE = re.compile(r"^```[A-Za-z]*[ \t]*\n(.*)\n[ \t]*```$", re.DOTALL)
TITLE = re.compile(r"<<[^\n<>]*[^\s<>][^\n<>]*>>")

# Argument pools of the samplers. Forbidden words are common filler words, none of them part of an end
# phrase or a start word, and keywords never come from this list, so a forbidden word clashes with nothing.
AT_MOST_WORDS = (20, 30, 50, 80)
AT_LEAST_WORDS = (10, 20, 30, 40)
FORBIDDEN_WORDS = ("very", "really", "just", "actually", "basically", "thing", "things", "also", "however",
                   "important", "many", "some")
END_PHRASES = ("Is there anything else I can help with?", "Let me know if you have additional questions.",
               "Hope this helps!", "That is all.", "Thank you for reading.")
START_WORDS = ("Sure", "Yes", "Certainly", "Well", "Okay", "Absolutely", "Great", "First")
FALLBACK_KEYWORDS = ("example", "reason", "people", "world", "idea", "answer")
STOPWORDS = frozenset("""
about above after again against also another answer based because been before being below between both
could describe does doing down during each explain following from further generate give have having here
into itself more most other over provide same should some such than that their them then there these
they this those through under until were what when where which while with would write your list create
make name find given using following sentence sentences text word words input output example
calculate suggest brainstorm develop arrange identify classify compose rewrite summarize compare translate
convert construct design edit analyze evaluate determine predict tell think imagine choose select rank
outline paraphrase formulate propose compute produce rephrase categorize insert""".split())


def _has_text(check: Callable[..., bool]) -> Callable[..., bool]:
    """An empty answer satisfies no constraint: 'no commas' or 'at most 50 words' for silence is a hack."""

    @functools.wraps(check)
    def checked(answer: str, **args: Any) -> bool:
        return bool(answer.strip()) and check(answer.strip(), **args)

    return checked


def count_words(text: str) -> int:
    return len(WORD.findall(text))


def _has_word(text: str, word: str) -> bool:
    return re.search(rf"(?<!\w){re.escape(word)}(?!\w)", text, re.IGNORECASE) is not None


# ------------------------------------------------------------------------------------------ checkers


@_has_text
def word_limit(answer: str, relation: str, num_words: int) -> bool:
    """At most / at least `num_words` words."""
    n = count_words(answer)
    return n <= num_words if relation == "at_most" else n >= num_words


@_has_text
def keywords(answer: str, keywords: Sequence[str]) -> bool:
    """Every keyword appears as a whole word (any case)."""
    return all(_has_word(answer, k) for k in keywords)


@_has_text
def forbidden_word(answer: str, word: str) -> bool:
    """The word does not appear as a whole word (any case)."""
    return not _has_word(answer, word)


@_has_text
def lowercase(answer: str) -> bool:
    """No capital letter, and at least one letter."""
    return answer.islower()


@_has_text
def no_commas(answer: str) -> bool:
    return "," not in answer and "，" not in answer


@_has_text
def end_phrase(answer: str, phrase: str) -> bool:
    """The answer ends with exactly this phrase (only whitespace may follow)."""
    return answer.endswith(phrase.strip())


@_has_text
def start_word(answer: str, word: str) -> bool:
    """The first word is exactly this word; punctuation may follow it ("Sure," passes, "Surely" does not)."""
    return re.match(rf"{re.escape(word)}(?!\w)", answer) is not None


@_has_text
def bullets(answer: str, num_bullets: int) -> bool:
    """Exactly `num_bullets` bullet lines, all written `* `."""
    markers = BULLET.findall(answer)
    return len(markers) == num_bullets and all(m == "*" for m in markers)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


@_has_text
def json_object(answer: str) -> bool:
    """The whole answer is one non-empty JSON object (inside one optional ``` fence)."""
    fenced = FENCE.match(answer)
    body = fenced.group(1) if fenced else answer
    try:
        value = json.loads(body, parse_constant=_reject_constant)
    except ValueError:
        return False
    return isinstance(value, dict) and len(value) > 0


@_has_text
def title(answer: str) -> bool:
    """A title in double angular brackets, <<like this>>, on one line."""
    return TITLE.search(answer) is not None


@_has_text
def postscript(answer: str, marker: str = "P.S.") -> bool:
    """A line after the first one that starts with the marker and goes on with some text."""
    return re.search(rf"\n[ \t]*{re.escape(marker)}[ \t]*\S", answer) is not None


@_has_text
def quotes(answer: str) -> bool:
    """Starts and ends with a double quote ("..." or “...”), with text inside."""
    pairs = (('"', '"'), ("“", "”"))
    return len(answer) > 2 and any(answer[0] == a and answer[-1] == b for a, b in pairs) and bool(answer[1:-1].strip())


# ------------------------------------------------------------------------------------------ samplers


def content_words(text: str) -> list[str]:
    """Distinct lowercase words of the instruction worth asking for again: not its first word (mostly the
    task's verb, "Calculate", which an answer does not repeat), no stopwords, no filler words."""
    head_and_rest = text.split(maxsplit=1)
    seen: dict[str, None] = {}
    for word in re.findall(r"[A-Za-z]{4,}", head_and_rest[-1] if len(head_and_rest) > 1 else text):
        word = word.lower()
        if word not in STOPWORDS and word not in FORBIDDEN_WORDS:
            seen.setdefault(word)
    return list(seen)


def _sample_word_limit(rng: random.Random, text: str) -> dict[str, Any]:
    relation = rng.choice(("at_most", "at_least"))
    return {"relation": relation, "num_words": rng.choice(AT_MOST_WORDS if relation == "at_most" else AT_LEAST_WORDS)}


def _sample_keywords(rng: random.Random, text: str) -> dict[str, Any]:
    # Words of the instruction itself: an on-topic answer can use them (IFEval draws from a fixed list).
    pool = content_words(text) or list(FALLBACK_KEYWORDS)
    return {"keywords": rng.sample(pool, min(len(pool), rng.choice((1, 2))))}


def _render_keywords(args: Mapping[str, Any]) -> dict[str, str]:
    quoted = [f'"{k}"' for k in args["keywords"]]
    if len(quoted) == 1:
        return {"keywords": f"the word {quoted[0]}"}
    return {"keywords": "the words " + ", ".join(quoted[:-1]) + " and " + quoted[-1]}


@dataclass(frozen=True)
class Family:
    kind: str
    check: Callable[..., bool]  # check(answer, **args) -> bool
    sample: Callable[[random.Random, str], dict[str, Any]]  # (rng, instruction) -> args
    params: Mapping[str, Callable[[Any], bool]]  # arg name -> is this value allowed
    render: Callable[[Mapping[str, Any]], dict[str, str]] = lambda args: {k: str(v) for k, v in args.items()}


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _text(value: Any) -> bool:
    return isinstance(value, str) and bool(value.strip())


FAMILIES: dict[str, Family] = {f.kind: f for f in (
    Family("word_limit", word_limit, _sample_word_limit,
           {"relation": lambda v: v in ("at_most", "at_least"), "num_words": _positive_int},
           lambda a: {"relation": a["relation"].replace("_", " "), "num_words": str(a["num_words"])}),
    Family("keywords", keywords, _sample_keywords,
           {"keywords": lambda v: isinstance(v, list) and bool(v) and all(_text(k) for k in v)}, _render_keywords),
    Family("forbidden_word", forbidden_word, lambda rng, text: {"word": rng.choice(FORBIDDEN_WORDS)}, {"word": _text}),
    Family("lowercase", lowercase, lambda rng, text: {}, {}),
    Family("no_commas", no_commas, lambda rng, text: {}, {}),
    Family("end_phrase", end_phrase, lambda rng, text: {"phrase": rng.choice(END_PHRASES)}, {"phrase": _text}),
    Family("start_word", start_word, lambda rng, text: {"word": rng.choice(START_WORDS)},
           {"word": lambda v: _text(v) and len(v.split()) == 1}),
    Family("bullets", bullets, lambda rng, text: {"num_bullets": rng.randint(2, 5)}, {"num_bullets": _positive_int}),
    Family("json", json_object, lambda rng, text: {}, {}),
    Family("title", title, lambda rng, text: {}, {}),
    Family("postscript", postscript, lambda rng, text: {"marker": "P.S."}, {"marker": _text}),
    Family("quotes", quotes, lambda rng, text: {}, {}),
)}
KINDS = tuple(FAMILIES)

# Pairs no answer can satisfy together (or only by an odd answer nobody would write): never drawn together.
CONFLICTS = frozenset(frozenset(pair) for pair in (
    ("json", "bullets"), ("json", "quotes"), ("json", "title"), ("json", "postscript"), ("json", "end_phrase"),
    ("json", "start_word"), ("json", "no_commas"),  # an object with two keys has a comma
    ("lowercase", "start_word"), ("lowercase", "end_phrase"), ("lowercase", "postscript"),  # capitals there
    ("quotes", "start_word"), ("quotes", "end_phrase"), ("quotes", "title"), ("quotes", "postscript"),
    ("title", "start_word"), ("postscript", "end_phrase"),
))


# ------------------------------------------------------------------------------------------ checking


def validate(value: Any) -> list[Constraint]:
    """A row's `constraints` value checked: a ValueError says which item and argument is wrong."""
    if not isinstance(value, list) or not value:
        raise ValueError("expected a non-empty list of {\"kind\", \"args\"} objects")
    for i, item in enumerate(value):
        if not isinstance(item, dict) or item.get("kind") not in FAMILIES:
            kind = item.get("kind") if isinstance(item, dict) else item
            raise ValueError(f"item {i}: unknown constraint kind {kind!r} (known: {', '.join(KINDS)})")
        args = item.get("args", {})
        family = FAMILIES[item["kind"]]
        if not isinstance(args, dict):
            raise ValueError(f"item {i} ({family.kind}): 'args' must be an object")
        for name in set(args) ^ set(family.params):
            what = "unknown" if name in args else "missing"
            raise ValueError(f"item {i} ({family.kind}): {what} argument '{name}'")
        for name, ok in family.params.items():
            if not ok(args[name]):
                raise ValueError(f"item {i} ({family.kind}): argument '{name}' has a bad value {args[name]!r}")
    return value


def check(answer: str, constraint: Mapping[str, Any]) -> bool:
    """Does `answer` satisfy one constraint {"kind", "args"}?"""
    return FAMILIES[constraint["kind"]].check(answer, **constraint.get("args", {}))


def fraction(answer: str, constraints: Sequence[Mapping[str, Any]]) -> float:
    """Share of the constraints the answer satisfies, in [0, 1]."""
    return sum(check(answer, c) for c in constraints) / len(constraints)


def per_kind(answer: str, constraints: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """{kind: share satisfied} (1.0 or 0.0 unless a row holds one kind twice)."""
    results: dict[str, list[bool]] = {}
    for c in constraints:
        results.setdefault(c["kind"], []).append(check(answer, c))
    return {kind: sum(r) / len(r) for kind, r in results.items()}


# ------------------------------------------------------------------------------------------ drawing


@functools.cache
def phrasings(kind: str) -> tuple[str, ...]:
    """The plain-English phrasings of a family, from prompts/constraints/<kind>.txt."""
    lines = prompt_path(f"constraints/{kind}").read_text(encoding="utf-8").splitlines()
    return tuple(line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#"))


def phrasings_hash() -> str:
    """Short hash of every phrasing file: part of each generated row's id."""
    digest = hashlib.sha256()
    for kind in KINDS:
        digest.update(prompt_path(f"constraints/{kind}").read_bytes())
    return digest.hexdigest()[:12]


def describe(constraint: Mapping[str, Any], phrasing: int = 0) -> str:
    """The constraint in plain English, with phrasing number `phrasing` of its family."""
    family = FAMILIES[constraint["kind"]]
    options = phrasings(family.kind)
    return options[phrasing % len(options)].format_map(family.render(constraint.get("args", {})))


def compatible(kinds: Sequence[str]) -> bool:
    """No two of these kinds are in CONFLICTS (and none repeats)."""
    return len(set(kinds)) == len(kinds) and not any(
        frozenset((a, b)) in CONFLICTS for i, a in enumerate(kinds) for b in kinds[i + 1:])


def rng_for(seed: int, text: str) -> random.Random:
    """A generator that depends only on the seed and the instruction's text: an instruction gets the same
    constraints wherever it sits in the file, and whichever rows --limit keeps."""
    digest = hashlib.sha256(f"{seed}\x00{text}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


@functools.cache
def kind_sets(kinds: tuple[str, ...], count: int) -> tuple[tuple[str, ...], ...]:
    """Every compatible set of `count` kinds out of `kinds` (at most C(12, 5) = 792 of them)."""
    return tuple(s for s in itertools.combinations(kinds, count) if compatible(s))


def draw(text: str, rng: random.Random, count: int,
         kinds: Sequence[str] = KINDS) -> list[tuple[Constraint, int]]:
    """`count` compatible constraints for the instruction `text`: [(constraint, phrasing number)].

    Kinds are drawn one at a time, uniformly among those that still complete a compatible set of `count`
    (so every kind is as likely to come first, and the draw never runs into a dead end); then each kind's
    arguments and phrasing. A ValueError when no compatible set of `count` kinds exists."""
    sets = kind_sets(tuple(kinds), count)
    if not sets:
        raise ValueError(f"no {count} of the kinds {', '.join(kinds)} can be asked together")
    chosen: list[str] = []
    for _ in range(count):
        options = [k for k in kinds if k not in chosen and any(k in s and set(chosen) <= set(s) for s in sets)]
        chosen.append(rng.choice(options))
    return [({"kind": kind, "args": FAMILIES[kind].sample(rng, text)}, rng.randrange(len(phrasings(kind))))
            for kind in chosen]
