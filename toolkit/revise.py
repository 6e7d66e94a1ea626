"""Revise an answer by code so that it meets its row's verifiable constraints: the chosen side of a pair
the policy never writes by itself.

A policy that almost never writes in lowercase, in quotes or with a given closing phrase gives its own
best-of-K answers no pair that shows those families (docs/method-comparison.md: 0-12 pairs each out of
960 prompts). `revise(answer, constraints, instruction)` makes the smallest edit a careful writer would
make for each family and leaves the rest of the answer as it is:

  forbidden_word  the word deleted            no_commas   commas dropped          lowercase  lowered
  word_limit      at most N: cut after the last whole sentence that fits (else after the Nth word)
  bullets         the answer's lines or sentences made into exactly N `* ` bullets (when it has N)
  title           a <<Title>> line from the instruction's content words, above the answer
  start_word      "Word, " before the answer     end_phrase  the phrase after it     postscript  a P.S. line
  quotes          the answer in double quotes (on lines of their own around a list)
  json            {"answer": the answer}

What code cannot write honestly it leaves alone: missing keywords and an answer under a word minimum
need new content. The caller checks the result with the checker (`constraints.fraction`): a revision
is only worth a pair when it satisfies more than the answer did.

`contrast(answer, constraints, instruction, rng)` is the other half of the lesson: the answer with a format
its prompt did *not* ask for (quotes, lowercase, JSON, a title, a P.S.), the rejected side of a pair against
the answer itself. DPO on revised pairs alone learnt the formats but wrapped 74 of 200 held-out answers in
quotes where 31 prompts asked (docs/method-comparison.md, "Contrast pairs").
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Mapping, Sequence
from typing import Any

from toolkit.constraints import WORD, check, content_words, count_words, per_kind

SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
LIST_MARKER = re.compile(r"^[ \t]*(?:[*+•-]|\d+[.)])[ \t]+")
POSTSCRIPT_TEXT = "I hope this helps."
# whole-answer formats a policy can overuse once it has learnt them; each edit needs no argument
CONTRAST_FORMATS: dict[str, dict[str, Any]] = {"quotes": {}, "lowercase": {}, "json": {}, "title": {},
                                                "postscript": {"marker": "P.S."}}


def _args(constraints: Sequence[Mapping[str, Any]], kind: str) -> Mapping[str, Any] | None:
    return next((c.get("args", {}) for c in constraints if c["kind"] == kind), None)


def drop_word(text: str, word: str) -> str:
    """Delete a word wherever it stands as a whole word (any case), and the space after it."""
    text = re.sub(rf"(?<!\w){re.escape(word)}(?!\w)[ \t]?", "", text, flags=re.IGNORECASE)
    return re.sub(r"[ \t]{2,}", " ", text)


def drop_commas(text: str) -> str:
    return re.sub(r"[ \t]*[,，][ \t]*", " ", text).replace(" \n", "\n")


def cut_to_words(text: str, limit: int) -> str:
    """At most `limit` words: the longest run of whole sentences that fits, or the first `limit` words
    with a full stop when even the first sentence is longer."""
    if count_words(text) <= limit:
        return text
    kept = ""
    for sentence in SENTENCE_END.split(text):
        candidate = f"{kept} {sentence}".strip() if kept else sentence
        if count_words(candidate) > limit:
            break
        kept = candidate
    if kept:
        return kept
    words = list(WORD.finditer(text))
    return text[: words[limit - 1].end()].rstrip(",;:") + "." if limit >= 1 else ""


def bulletize(text: str, num_bullets: int) -> str | None:
    """Exactly `num_bullets` `* ` bullets from the answer's lines (or, when it has too few lines, its
    sentences); extra items join the last bullet. None when the answer has fewer items than bullets."""
    lines = [LIST_MARKER.sub("", line).strip() for line in text.splitlines()]
    items = [line for line in lines if line]
    if len(items) < num_bullets:
        items = [s.strip() for s in SENTENCE_END.split(" ".join(items)) if s.strip()]
    if len(items) < num_bullets:
        return None
    items = items[: num_bullets - 1] + [" ".join(items[num_bullets - 1:])]
    return "\n".join(f"* {item}" for item in items)


def title_for(instruction: str) -> str:
    """A short title from the instruction's content words ("Answer" when it has none)."""
    words = content_words(instruction)[:3]
    return " ".join(w.capitalize() for w in words) or "Answer"


def _decapitalize(text: str, instruction: str = "") -> str:
    """Lower the first letter of an answer that now follows "Word, ": not "I", "I'm", an acronym ("NASA"),
    or a name, which code tells from a common word only where the answer or the instruction also has it
    capitalised inside a sentence ("Paris" in "Tell me about Paris")."""
    first = WORD.match(text)
    if not first or first.start() != 0:
        return text
    word = first.group()
    if len(word) == 1 or word[1] in "'’" or not word[1:].isalpha() or not word[1:].islower():
        return text
    if _inside_a_sentence(word, text[len(word):]) or _inside_a_sentence(word, instruction):
        return text
    return text[0].lower() + text[1:]


def _inside_a_sentence(word: str, text: str) -> bool:
    """Whether `word`, capitalised as given, occurs in `text` after another word of its sentence."""
    for match in re.finditer(rf"\b{re.escape(word)}\b", text):
        before = text[: match.start()].rstrip(" \t\"'“‘(")
        if before and before[-1] not in ".!?:\n*-":
            return True
    return False


def drop_unfinished(text: str) -> str:
    """An answer cut at the token limit without its unfinished last sentence (unchanged when it has no
    whole sentence before the cut)."""
    sentences = SENTENCE_END.split(text)
    if len(sentences) < 2:
        return text
    return text[: text.rindex(sentences[-1])].rstrip()


def revise(answer: str, constraints: Sequence[Mapping[str, Any]], instruction: str = "",
           cut: bool = False) -> str:
    """The answer edited to meet as many of the constraints as code can meet (see the module doc); only the
    constraints it misses are edited for. `cut`: the answer stopped at the token limit, so its unfinished
    last sentence goes first."""
    def needs(kind: str) -> Mapping[str, Any] | None:
        args = _args(constraints, kind)
        return None if args is None or check(answer, {"kind": kind, "args": args}) else args

    body = drop_unfinished(answer.strip()) if cut else answer.strip()
    bullets = needs("bullets")
    start = needs("start_word")
    prefix = f"<<{title_for(instruction)}>>\n\n" if needs("title") is not None else ""
    if start is not None:
        prefix += f"{start['word']}:\n" if bullets is not None else f"{start['word']}, "
    suffix = ""
    end = needs("end_phrase")
    if end is not None:
        suffix = "\n\n" + end["phrase"].strip()
    postscript = needs("postscript")
    if postscript is not None:
        suffix += f"\n\n{postscript['marker']} {POSTSCRIPT_TEXT}"
    limit = _args(constraints, "word_limit")
    wrapped_json = needs("json") is not None
    if limit is not None and limit["relation"] == "at_most":
        reserved = count_words(prefix + suffix) + wrapped_json  # the key "answer" is a word too
        body = cut_to_words(body, max(1, limit["num_words"] - reserved))
    if bullets is not None:
        body = bulletize(body, bullets["num_bullets"]) or body
    if start is not None and bullets is None:
        body = _decapitalize(body, instruction)
    text = prefix + body + suffix
    forbidden = _args(constraints, "forbidden_word")
    if forbidden is not None:
        text = drop_word(text, forbidden["word"]).strip()
    if _args(constraints, "no_commas") is not None:
        text = drop_commas(text)
    if _args(constraints, "lowercase") is not None and not text.islower():
        text = text.lower()
    if needs("quotes") is not None:  # on lines of their own around a list, whose first line must stay a bullet
        text = text.strip('"')
        text = f'"\n{text}\n"' if LIST_MARKER.match(text) else f'"{text}"'
    if wrapped_json:
        text = json.dumps({"answer": text}, ensure_ascii=False)
    return text


def improve(answer: str, constraints: Sequence[Mapping[str, Any]], instruction: str = "",
            cut: bool = False) -> str | None:
    """`revise`'s edit when it meets more of the constraints and breaks none the answer met; else None.
    A cut answer is first tried without its unfinished sentence, then whole (dropping the sentence can
    take it under a word minimum)."""
    before = per_kind(answer, constraints)
    for drop in ((True, False) if cut else (False,)):
        edited = revise(answer, constraints, instruction, cut=drop)
        after = per_kind(edited, constraints)
        if all(after[k] >= before[k] for k in before) and sum(after.values()) > sum(before.values()):
            return edited
    return None


def contrast(answer: str, constraints: Sequence[Mapping[str, Any]], instruction: str,
             rng: random.Random) -> tuple[str, str] | None:
    """(format, edited): the answer with one format its constraints do not ask for, drawn once with `rng`;
    None when the draw would change nothing or change how the answer meets its own constraints (a JSON
    wrapper breaks its bullets), since then the pair would teach something other than "only when asked"."""
    asked = {c["kind"] for c in constraints}
    free = [kind for kind in CONTRAST_FORMATS if kind not in asked]
    if not free:
        return None
    kind = rng.choice(free)
    edited = revise(answer, [{"kind": kind, "args": CONTRAST_FORMATS[kind]}], instruction)
    if edited == answer.strip() or per_kind(edited, constraints) != per_kind(answer, constraints):
        return None
    return kind, edited
