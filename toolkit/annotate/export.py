"""Annotations -> the files the trainers read, in generate-data's formats.

Preference rows  {"id", "prompt", "chosen", "rejected", "meta"}   (train-reward)
    all pairs implied by each ranking (better tier over worse tier; ties and unranked middles give none),
    or best vs worst only; a written better answer is chosen over every (worst) candidate.
Conversation rows {"id", "messages": [{"role", "content"}, ...], "meta"}   (sft)
    finished chats, and each written better answer as a one-turn demonstration.
meta carries the annotator, timestamps (ISO 8601, UTC) and where the item came from.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from toolkit.annotate.db import AnnotationDB
from toolkit.errors import UserError

PAIR_MODES = ("all", "best-worst")


def iso(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    return datetime.fromtimestamp(timestamp, tz=timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def _id(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(["annotate", *parts], ensure_ascii=False).encode()).hexdigest()[:16]


def ranking_pairs(tiers: list[list[int]], mode: str = "all") -> list[tuple[int, int, int, int]]:
    """(chosen, rejected, chosen tier, rejected tier) for one ranking, best tier first.

    "all": every candidate over every candidate in a lower tier (InstructGPT's K-choose-2 comparisons).
    "best-worst": the top tier over the bottom tier only."""
    if mode not in PAIR_MODES:
        raise ValueError(f"pairs must be one of {PAIR_MODES}")
    if len(tiers) < 2:
        return []
    if mode == "best-worst":
        last = len(tiers) - 1
        return [(a, b, 0, last) for a in tiers[0] for b in tiers[last]]
    return [(a, b, i, j) for i, upper in enumerate(tiers) for j in range(i + 1, len(tiers))
            for a in upper for b in tiers[j]]


@dataclass
class ExportStats:
    preference_rows: int = 0
    conversation_rows: int = 0
    rankings: int = 0
    chats: int = 0
    rewrites: int = 0
    dropped_flagged: int = 0
    dropped_same_text: int = 0
    per_annotator: Counter = field(default_factory=Counter)
    preferences_bytes: int = 0
    conversations_bytes: int = 0
    preferences_path: str = ""
    conversations_path: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {"preference_rows": self.preference_rows, "conversation_rows": self.conversation_rows,
                "rankings": self.rankings, "chats": self.chats, "rewrites": self.rewrites,
                "dropped_flagged": self.dropped_flagged, "dropped_same_text": self.dropped_same_text,
                "per_annotator": dict(self.per_annotator), "preferences_bytes": self.preferences_bytes,
                "conversations_bytes": self.conversations_bytes, "preferences_path": self.preferences_path,
                "conversations_path": self.conversations_path}


def preference_rows(db: AnnotationDB, *, pairs: str = "all", keep_flagged: bool = False, rewrites: bool = True,
                    stats: ExportStats | None = None) -> list[dict[str, Any]]:
    """Preference rows from every finished ranking, oldest first."""
    stats = stats if stats is not None else ExportStats()
    items = {item.id: item for item in db.items()}
    rows: list[dict[str, Any]] = []
    for answer in db.rankings():
        item = items[answer["item_id"]]
        tiers = answer["tiers"]
        flagged = {i for kind in answer["flags"].values() for i in kind}
        base = {"source": "annotate", "item_id": item.id, "annotator": answer["annotator"],
                "annotated_at": iso(answer["created_at"]), "updated_at": iso(answer["updated_at"]),
                "seconds": answer["seconds"], "k": len(item.candidates), "pairs": pairs,
                "ranking": tiers, "unordered_tier": answer["unordered"], "flags": answer["flags"],
                "item_meta": item.meta}
        stats.rankings += 1
        for chosen, rejected, chosen_tier, rejected_tier in ranking_pairs(tiers, pairs):
            if chosen in flagged and not keep_flagged:
                stats.dropped_flagged += 1
                continue
            if item.candidates[chosen] == item.candidates[rejected]:
                stats.dropped_same_text += 1
                continue
            rows.append({"id": _id(item.id, answer["annotator"], chosen, rejected), "prompt": item.prompt,
                         "chosen": item.candidates[chosen], "rejected": item.candidates[rejected],
                         "meta": {**base, "kind": "ranking", "chosen_index": chosen, "rejected_index": rejected,
                                  "chosen_tier": chosen_tier, "rejected_tier": rejected_tier}})
            stats.per_annotator[answer["annotator"]] += 1
        better = answer["better"]
        if rewrites and better:
            losers = tiers[-1] if pairs == "best-worst" else [i for tier in tiers for i in tier]
            for rejected in losers:
                if item.candidates[rejected] == better:
                    stats.dropped_same_text += 1
                    continue
                rows.append({"id": _id(item.id, answer["annotator"], "better", rejected), "prompt": item.prompt,
                             "chosen": better, "rejected": item.candidates[rejected],
                             "meta": {**base, "kind": "rewrite", "chosen_index": None, "rejected_index": rejected}})
                stats.per_annotator[answer["annotator"]] += 1
    stats.preference_rows = len(rows)
    return rows


def conversation_rows(db: AnnotationDB, *, rewrites: bool = True, stats: ExportStats | None = None
                      ) -> list[dict[str, Any]]:
    """Conversation rows: every finished chat, then every written better answer as a one-turn demonstration."""
    stats = stats if stats is not None else ExportStats()
    rows: list[dict[str, Any]] = []
    for summary in db.chats(status="done"):
        chat = db.chat(summary["id"])
        messages = ([{"role": "system", "content": chat["system"]}] if chat["system"] else []) + [
            {"role": m["role"], "content": m["content"]} for m in chat["messages"]]
        rows.append({"id": _id("chat", chat["id"]), "messages": messages,
                     "meta": {"source": "annotate", "kind": "chat", "chat_id": chat["id"], "mode": chat["mode"],
                              "annotator": chat["annotator"], "model": chat["model"],
                              "authors": [m["author"] for m in chat["messages"]],
                              "created_at": iso(chat["created_at"]), "finished_at": iso(chat["updated_at"]),
                              "turn_meta": [m["meta"] for m in chat["messages"]]}})
        stats.chats += 1
    if rewrites:
        items = {item.id: item for item in db.items()}
        for answer in db.rankings():
            if not answer["better"]:
                continue
            item = items[answer["item_id"]]
            rows.append({"id": _id("rewrite", item.id, answer["annotator"]),
                         "messages": [{"role": "user", "content": item.prompt},
                                      {"role": "assistant", "content": answer["better"]}],
                         "meta": {"source": "annotate", "kind": "rewrite", "item_id": item.id,
                                  "annotator": answer["annotator"], "created_at": iso(answer["created_at"]),
                                  "updated_at": iso(answer["updated_at"])}})
            stats.rewrites += 1
    stats.conversation_rows = len(rows)
    return rows


def write_rows(path: str | os.PathLike, rows: list[dict[str, Any]]) -> int:
    """Write JSONL through a temporary file and rename, so a reader never sees half an export; returns bytes."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    except OSError as err:
        raise UserError(f"cannot write: {err.strerror}", file=str(path)) from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path.stat().st_size


def default_conversations_path(out: str | os.PathLike) -> Path:
    out = Path(out)
    suffix = "".join(out.suffixes) or ".jsonl"
    return out.with_name(out.name[: len(out.name) - len("".join(out.suffixes))] + ".conversations" + suffix)


def export(db_path: str | os.PathLike, out: str | os.PathLike, conversations_out: str | os.PathLike | None = None,
           *, pairs: str = "all", keep_flagged: bool = False, rewrites: bool = True) -> ExportStats:
    """Write preference rows to `out` and conversation rows beside it (or to `conversations_out`)."""
    if pairs not in PAIR_MODES:
        raise UserError(f"--pairs must be one of {', '.join(PAIR_MODES)}")
    conversations_out = Path(conversations_out) if conversations_out else default_conversations_path(out)
    if Path(out).resolve() == conversations_out.resolve():
        raise UserError("preference and conversation outputs must be different files", file=str(out))
    stats = ExportStats()
    with AnnotationDB(db_path, readonly=True) as db:
        prefs = preference_rows(db, pairs=pairs, keep_flagged=keep_flagged, rewrites=rewrites, stats=stats)
        conversations = conversation_rows(db, rewrites=rewrites, stats=stats)
    stats.preferences_bytes = write_rows(out, prefs)
    stats.conversations_bytes = write_rows(conversations_out, conversations)
    stats.preferences_path, stats.conversations_path = str(out), str(conversations_out)
    return stats
