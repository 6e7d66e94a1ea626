"""The annotation store: one SQLite file in WAL mode, safe for several annotators and for restarts.

Every write is one transaction committed (synchronous=FULL) before the function returns, so the web app
answers only after an annotation is on disk. Rank items are shown to `per_item` annotators each; an
annotator holds a lease on the item in front of them, so a restart (or a reload) brings the same item back.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import secrets
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from toolkit.errors import UserError

SCHEMA_VERSION = 1
LEASE_S = 30 * 60  # an item left open this long goes back to the pool for other annotators
MAX_TEXT = 50_000  # characters in one message or rewrite
MAX_ROW_ID = 2**63 - 1  # SQLite INTEGER is 64-bit signed; a bigger Python int raises OverflowError when bound

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS annotators (
    id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE, token_sha256 TEXT NOT NULL UNIQUE,
    created_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS items (
    id TEXT PRIMARY KEY, position INTEGER NOT NULL, prompt TEXT NOT NULL, candidates TEXT NOT NULL,
    meta TEXT NOT NULL, created_at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS items_position ON items(position);
CREATE TABLE IF NOT EXISTS leases (
    item_id TEXT NOT NULL REFERENCES items(id), annotator_id INTEGER NOT NULL REFERENCES annotators(id),
    leased_at REAL NOT NULL, PRIMARY KEY (item_id, annotator_id));
CREATE TABLE IF NOT EXISTS rankings (
    id INTEGER PRIMARY KEY, item_id TEXT NOT NULL REFERENCES items(id),
    annotator_id INTEGER NOT NULL REFERENCES annotators(id),
    status TEXT NOT NULL CHECK (status IN ('done', 'skipped')),
    tiers TEXT, unordered INTEGER, flags TEXT NOT NULL DEFAULT '{}', better TEXT, shown_order TEXT,
    seconds REAL, created_at REAL NOT NULL, updated_at REAL NOT NULL, UNIQUE (item_id, annotator_id));
CREATE TABLE IF NOT EXISTS chats (
    id TEXT PRIMARY KEY, annotator_id INTEGER NOT NULL REFERENCES annotators(id),
    mode TEXT NOT NULL CHECK (mode IN ('model', 'self')), model TEXT, system TEXT,
    status TEXT NOT NULL CHECK (status IN ('open', 'done', 'discarded')),
    created_at REAL NOT NULL, updated_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS messages (
    chat_id TEXT NOT NULL REFERENCES chats(id), position INTEGER NOT NULL, role TEXT NOT NULL,
    content TEXT NOT NULL, author TEXT NOT NULL, meta TEXT NOT NULL DEFAULT '{}', created_at REAL NOT NULL,
    PRIMARY KEY (chat_id, position));
"""

FLAG_KINDS = ("harmful", "unusable")


class ItemFull(Exception):
    """The item already has its `per_item` rankings (or the rest of them are leased to others)."""


@dataclass
class Annotator:
    id: int
    name: str


@dataclass
class Item:
    id: str
    position: int
    prompt: str
    candidates: list[str]
    meta: dict[str, Any]


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def display_order(item_id: str, annotator_id: int, k: int) -> list[int]:
    """The order an annotator sees the K candidates in: shuffled per (item, annotator) against position bias."""
    order = list(range(k))
    seed = int(hashlib.sha256(f"{item_id}:{annotator_id}".encode()).hexdigest()[:16], 16)
    random.Random(seed).shuffle(order)
    return order


def validate_ranking(tiers: Any, unordered: Any, k: int) -> tuple[list[list[int]], int | None]:
    """Check a ranking: tiers best first, each a list of candidate indices; together they hold all K once.

    Candidates in one tier are tied, except in the tier `unordered` (e.g. the middle of a best/worst pick),
    whose members were not compared with each other."""
    if not isinstance(tiers, list) or not tiers or not all(isinstance(t, list) and t for t in tiers):
        raise ValueError("'tiers' must be a non-empty list of non-empty lists of candidate indices")
    seen: list[int] = []
    for tier in tiers:
        for index in tier:
            if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < k:
                raise ValueError(f"candidate index {index!r} out of range 0..{k - 1}")
            seen.append(index)
    if sorted(seen) != list(range(k)):
        raise ValueError(f"the tiers must hold each of the {k} candidates exactly once")
    if unordered is not None:
        if isinstance(unordered, bool) or not isinstance(unordered, int) or not 0 <= unordered < len(tiers):
            raise ValueError("'unordered' must be the index of a tier or null")
        if len(tiers[unordered]) < 2:
            unordered = None
    return [list(t) for t in tiers], unordered


def validate_flags(flags: Any, k: int) -> dict[str, list[int]]:
    if flags is None:
        return {}
    if not isinstance(flags, dict) or set(flags) - set(FLAG_KINDS):
        raise ValueError(f"'flags' must map {' / '.join(FLAG_KINDS)} to candidate indices")
    out = {}
    for kind, indices in flags.items():
        if not isinstance(indices, list) or not all(
                isinstance(i, int) and not isinstance(i, bool) and 0 <= i < k for i in indices):
            raise ValueError(f"flags.{kind} must be a list of candidate indices 0..{k - 1}")
        if indices:
            out[kind] = sorted(set(indices))
    return out


class AnnotationDB:
    """All reads and writes of the annotation store. Thread-safe; one connection per instance."""

    def __init__(self, path: str | os.PathLike, *, readonly: bool = False, create: bool = True):
        self.path = Path(path)
        if readonly or not create:
            if not self.path.is_file():
                raise UserError("no such annotation database (start `llamakit annotate --tasks ...` first)",
                                file=str(self.path))
        else:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as err:
                raise UserError(f"cannot create directory: {err.strerror}", file=str(self.path.parent)) from None
        self._lock = threading.RLock()
        try:
            if readonly:
                self.conn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, check_same_thread=False,
                                            isolation_level=None, timeout=10)
            else:
                self.conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=10)
            self.conn.row_factory = sqlite3.Row
            self.conn.execute("PRAGMA busy_timeout = 10000")
            if not readonly:
                self.conn.execute("PRAGMA journal_mode = WAL")
                self.conn.execute("PRAGMA synchronous = FULL")
                self.conn.execute("PRAGMA foreign_keys = ON")
                self.conn.executescript(SCHEMA)
                self._check_version()
            else:
                self.conn.execute("SELECT 1 FROM items LIMIT 1")
        except sqlite3.DatabaseError as err:
            raise UserError(f"not a usable annotation database: {err}", file=str(self.path)) from None

    def _check_version(self) -> None:
        row = self.conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        if row is None:
            self.conn.execute("INSERT INTO meta(key, value) VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
        elif int(row[0]) != SCHEMA_VERSION:
            raise UserError(f"database schema version {row[0]}, this llamakit reads {SCHEMA_VERSION}",
                            file=str(self.path))

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> AnnotationDB:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE ... COMMIT under the instance lock: other processes wait, nothing half-written."""
        with self._lock:
            self.conn.execute("BEGIN IMMEDIATE")
            try:
                yield self.conn
            except BaseException:
                self.conn.execute("ROLLBACK")
                raise
            self.conn.execute("COMMIT")

    def query(self, sql: str, params: tuple = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self.conn.execute(sql, params).fetchall()

    # annotators -------------------------------------------------------------------------------------

    def add_annotator(self, name: str, *, rotate: bool = False) -> str:
        """Create an annotator (or give an existing one a new token with rotate=True); returns the token."""
        name = name.strip()
        if not name or len(name) > 64 or any(ch in name for ch in "\r\n\t"):
            raise UserError(f"annotator name must be 1-64 characters on one line, got {name!r}")
        token = secrets.token_urlsafe(24)
        with self.transaction() as conn:
            existing = conn.execute("SELECT id FROM annotators WHERE name = ?", (name,)).fetchone()
            if existing and not rotate:
                raise UserError(f"annotator '{name}' already exists (use --rotate for a new token)")
            if existing:
                conn.execute("UPDATE annotators SET token_sha256 = ? WHERE id = ?", (hash_token(token), existing[0]))
            else:
                conn.execute("INSERT INTO annotators(name, token_sha256, created_at) VALUES (?, ?, ?)",
                             (name, hash_token(token), time.time()))
        return token

    def annotator_for_token(self, token: str) -> Annotator | None:
        if not token:
            return None
        rows = self.query("SELECT id, name FROM annotators WHERE token_sha256 = ?", (hash_token(token),))
        return Annotator(rows[0]["id"], rows[0]["name"]) if rows else None

    def annotators(self) -> list[Annotator]:
        return [Annotator(r["id"], r["name"]) for r in self.query("SELECT id, name FROM annotators ORDER BY id")]

    # items ------------------------------------------------------------------------------------------

    def item_ids(self) -> set[str]:
        return {r[0] for r in self.query("SELECT id FROM items")}

    def next_position(self) -> int:
        return self.query("SELECT COALESCE(MAX(position), -1) FROM items")[0][0] + 1

    def add_items(self, items: list[tuple]) -> int:
        """Insert (id, prompt, candidates, meta[, position]) rows; an id already stored with the same text is
        skipped, with different text it is an error. Items are shown in position order (default: after the
        last). Returns how many were new."""
        added = 0
        with self.transaction() as conn:
            next_free = conn.execute("SELECT COALESCE(MAX(position), -1) FROM items").fetchone()[0] + 1
            for item_id, prompt, candidates, meta, *where in items:
                old = conn.execute("SELECT prompt, candidates FROM items WHERE id = ?", (item_id,)).fetchone()
                if old is not None:
                    if old["prompt"] != prompt or json.loads(old["candidates"]) != candidates:
                        raise UserError(f"item id '{item_id}' is already in the database with other text "
                                        f"(give the row a new id)", file=str(self.path))
                    continue
                position = where[0] if where and where[0] is not None else next_free
                conn.execute("INSERT INTO items(id, position, prompt, candidates, meta, created_at) "
                             "VALUES (?, ?, ?, ?, ?, ?)",
                             (item_id, position, prompt, json.dumps(candidates, ensure_ascii=False),
                              json.dumps(meta, ensure_ascii=False), time.time()))
                next_free = max(next_free, position + 1)
                added += 1
        return added

    def item(self, item_id: str) -> Item | None:
        rows = self.query("SELECT * FROM items WHERE id = ?", (item_id,))
        return _item(rows[0]) if rows else None

    def items(self) -> list[Item]:
        return [_item(r) for r in self.query("SELECT * FROM items ORDER BY position")]

    def count_items(self) -> int:
        return self.query("SELECT COUNT(*) FROM items")[0][0]

    # ranking ----------------------------------------------------------------------------------------

    def next_item(self, annotator_id: int, per_item: int, *, now: float | None = None) -> Item | None:
        """The item in front of this annotator: the one they hold a lease on, else the first item they have
        not answered whose done answers plus other live leases are under `per_item` (leased to them now)."""
        now = time.time() if now is None else now
        with self.transaction() as conn:
            held = conn.execute(
                "SELECT i.* FROM leases l JOIN items i ON i.id = l.item_id WHERE l.annotator_id = ? AND NOT EXISTS "
                "(SELECT 1 FROM rankings r WHERE r.item_id = l.item_id AND r.annotator_id = l.annotator_id) "
                "ORDER BY l.leased_at, i.position LIMIT 1", (annotator_id,)).fetchone()
            if held is not None:
                return _item(held)
            row = conn.execute(
                "SELECT i.* FROM items i WHERE NOT EXISTS "
                "  (SELECT 1 FROM rankings r WHERE r.item_id = i.id AND r.annotator_id = ?) "
                "AND (SELECT COUNT(*) FROM rankings r WHERE r.item_id = i.id AND r.status = 'done') "
                "  + (SELECT COUNT(*) FROM leases l WHERE l.item_id = i.id AND l.annotator_id != ? "
                "     AND l.leased_at > ? AND NOT EXISTS (SELECT 1 FROM rankings r WHERE r.item_id = l.item_id "
                "     AND r.annotator_id = l.annotator_id)) < ? "
                "ORDER BY i.position LIMIT 1", (annotator_id, annotator_id, now - LEASE_S, per_item)).fetchone()
            if row is None:
                return None
            conn.execute("INSERT OR REPLACE INTO leases(item_id, annotator_id, leased_at) VALUES (?, ?, ?)",
                         (row["id"], annotator_id, now))
            return _item(row)

    def save_ranking(self, annotator_id: int, item_id: str, tiers: Any, unordered: Any = None, flags: Any = None,
                     better: Any = None, *, per_item: int | None = None, now: float | None = None) -> dict[str, Any]:
        """Validate and store (or revise) one annotator's ranking of an item; committed on return.

        With `per_item`, a new ranking of an item that already has its rankings raises ItemFull: the count and
        the insert share one BEGIN IMMEDIATE transaction, so two annotators (or processes) cannot both take the
        last slot. Revising one's own ranking is always allowed."""
        item = self.item(item_id)
        if item is None:
            raise KeyError(item_id)
        k = len(item.candidates)
        tiers, unordered = validate_ranking(tiers, unordered, k)
        flags = validate_flags(flags, k)
        if better is not None:
            if not isinstance(better, str):
                raise ValueError("'better' must be a string or null")
            better = better.strip() or None
            if better is not None and len(better) > MAX_TEXT:
                raise ValueError(f"'better' is over {MAX_TEXT} characters")
        with self.transaction() as conn:
            # read the clock inside the transaction: a lease written by a request that held the lock while
            # this one waited is newer than a clock read before, and the pace would come out negative
            now = time.time() if now is None else now
            if per_item is not None:
                _check_room(conn, item_id, annotator_id, per_item, now)
            lease = conn.execute("SELECT leased_at FROM leases WHERE item_id = ? AND annotator_id = ?",
                                 (item_id, annotator_id)).fetchone()
            seconds = _non_negative(round(now - lease[0], 3)) if lease is not None else None
            conn.execute(
                "INSERT INTO rankings(item_id, annotator_id, status, tiers, unordered, flags, better, shown_order, "
                "seconds, created_at, updated_at) VALUES (?, ?, 'done', ?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT(item_id, annotator_id) DO UPDATE SET status = 'done', tiers = excluded.tiers, "
                "unordered = excluded.unordered, flags = excluded.flags, better = excluded.better, "
                "seconds = COALESCE(excluded.seconds, rankings.seconds), updated_at = excluded.updated_at",
                (item_id, annotator_id, json.dumps(tiers), unordered, json.dumps(flags),
                 better, json.dumps(display_order(item_id, annotator_id, k)), seconds, now, now))
            conn.execute("DELETE FROM leases WHERE item_id = ? AND annotator_id = ?", (item_id, annotator_id))
        return {"item_id": item_id, "tiers": tiers, "unordered": unordered, "flags": flags, "better": better,
                "seconds": seconds}

    def skip_item(self, annotator_id: int, item_id: str, *, now: float | None = None) -> None:
        now = time.time() if now is None else now
        if self.item(item_id) is None:
            raise KeyError(item_id)
        with self.transaction() as conn:
            conn.execute(
                "INSERT INTO rankings(item_id, annotator_id, status, created_at, updated_at) "
                "VALUES (?, ?, 'skipped', ?, ?) ON CONFLICT(item_id, annotator_id) DO NOTHING",
                (item_id, annotator_id, now, now))
            conn.execute("DELETE FROM leases WHERE item_id = ? AND annotator_id = ?", (item_id, annotator_id))

    def ranking(self, annotator_id: int, item_id: str) -> dict[str, Any] | None:
        rows = self.query("SELECT * FROM rankings WHERE annotator_id = ? AND item_id = ?", (annotator_id, item_id))
        return _ranking(rows[0]) if rows else None

    def rankings(self, *, status: str = "done") -> list[dict[str, Any]]:
        """All answers joined with annotator names, oldest first."""
        rows = self.query("SELECT r.*, a.name AS annotator FROM rankings r JOIN annotators a ON a.id = r.annotator_id "
                          "WHERE r.status = ? ORDER BY r.created_at, r.id", (status,))
        return [_ranking(r) for r in rows]

    def history(self, annotator_id: int, limit: int = 50) -> list[str]:
        """Item ids this annotator answered, most recent first."""
        rows = self.query("SELECT item_id FROM rankings WHERE annotator_id = ? AND status = 'done' "
                          "ORDER BY created_at DESC, id DESC LIMIT ?", (annotator_id, limit))
        return [r[0] for r in rows]

    def progress(self, annotator_id: int, per_item: int) -> dict[str, int]:
        row = self.query(
            "SELECT (SELECT COUNT(*) FROM rankings WHERE annotator_id = ? AND status = 'done') AS done, "
            "(SELECT COUNT(*) FROM rankings WHERE annotator_id = ? AND status = 'skipped') AS skipped, "
            "(SELECT COUNT(*) FROM items i WHERE NOT EXISTS (SELECT 1 FROM rankings r WHERE r.item_id = i.id "
            "  AND r.annotator_id = ?) AND (SELECT COUNT(*) FROM rankings r WHERE r.item_id = i.id "
            "  AND r.status = 'done') < ?) AS open, "
            "(SELECT COUNT(*) FROM items) AS items, "
            "(SELECT COUNT(*) FROM items i WHERE (SELECT COUNT(*) FROM rankings r WHERE r.item_id = i.id "
            "  AND r.status = 'done') >= ?) AS complete",
            (annotator_id, annotator_id, annotator_id, per_item, per_item))[0]
        return {key: row[key] for key in row.keys()} | {"per_item": per_item}

    def team_progress(self) -> list[dict[str, Any]]:
        """One row per annotator: items ranked and skipped, median seconds per item, chats, last activity."""
        rows = self.query(
            "SELECT a.name, "
            "(SELECT COUNT(*) FROM rankings r WHERE r.annotator_id = a.id AND r.status = 'done') AS ranked, "
            "(SELECT COUNT(*) FROM rankings r WHERE r.annotator_id = a.id AND r.status = 'skipped') AS skipped, "
            "(SELECT COUNT(*) FROM chats c WHERE c.annotator_id = a.id AND c.status = 'done') AS chats, "
            "MAX(COALESCE((SELECT MAX(updated_at) FROM rankings r WHERE r.annotator_id = a.id), 0), "
            "    COALESCE((SELECT MAX(updated_at) FROM chats c WHERE c.annotator_id = a.id), 0)) AS last_active "
            "FROM annotators a ORDER BY a.name")
        out = []
        for row in rows:
            seconds = sorted(r[0] for r in self.query(
                "SELECT r.seconds FROM rankings r JOIN annotators a ON a.id = r.annotator_id "
                "WHERE a.name = ? AND r.status = 'done' AND r.seconds IS NOT NULL", (row["name"],)))
            median = _non_negative(seconds[len(seconds) // 2]) if seconds else None
            out.append({"annotator": row["name"], "ranked": row["ranked"], "skipped": row["skipped"],
                        "chats": row["chats"], "median_seconds": median,
                        "last_active": row["last_active"] or None})
        return out

    def items_with_rankings(self, per_item: int) -> dict[str, int]:
        """How many items have reached `per_item` finished rankings, and how many are still short of it."""
        row = self.query(
            "SELECT COUNT(*) AS items, COALESCE(SUM(n >= ?), 0) AS complete FROM (SELECT i.id, "
            "(SELECT COUNT(*) FROM rankings r WHERE r.item_id = i.id AND r.status = 'done') AS n FROM items i)",
            (per_item,))[0]
        return {"items": row["items"], "complete": row["complete"], "per_item": per_item}

    # chats ------------------------------------------------------------------------------------------

    def create_chat(self, annotator_id: int, mode: str, model: str | None = None, system: str | None = None) -> str:
        if mode not in ("model", "self"):
            raise ValueError("mode must be 'model' or 'self'")
        if system is not None and (not isinstance(system, str) or len(system) > MAX_TEXT):
            raise ValueError(f"'system' must be a string of at most {MAX_TEXT} characters")
        chat_id = uuid.uuid4().hex
        now = time.time()
        with self.transaction() as conn:
            conn.execute("INSERT INTO chats(id, annotator_id, mode, model, system, status, created_at, updated_at) "
                         "VALUES (?, ?, ?, ?, ?, 'open', ?, ?)",
                         (chat_id, annotator_id, mode, model, (system or "").strip() or None, now, now))
        return chat_id

    def chat(self, chat_id: str, annotator_id: int | None = None) -> dict[str, Any] | None:
        sql = "SELECT c.*, a.name AS annotator FROM chats c JOIN annotators a ON a.id = c.annotator_id WHERE c.id = ?"
        params: tuple = (chat_id,)
        if annotator_id is not None:
            sql += " AND c.annotator_id = ?"
            params += (annotator_id,)
        rows = self.query(sql, params)
        if not rows:
            return None
        chat = dict(rows[0])
        chat["messages"] = [
            {"position": m["position"], "role": m["role"], "content": m["content"], "author": m["author"],
             "meta": json.loads(m["meta"]), "created_at": m["created_at"]}
            for m in self.query("SELECT * FROM messages WHERE chat_id = ? ORDER BY position", (chat_id,))]
        return chat

    def chats(self, annotator_id: int | None = None, status: str | None = None) -> list[dict[str, Any]]:
        sql = ("SELECT c.*, a.name AS annotator, (SELECT COUNT(*) FROM messages m WHERE m.chat_id = c.id) AS turns, "
               "(SELECT content FROM messages m WHERE m.chat_id = c.id ORDER BY position LIMIT 1) AS first "
               "FROM chats c JOIN annotators a ON a.id = c.annotator_id WHERE 1 = 1")
        params: tuple = ()
        if annotator_id is not None:
            sql += " AND c.annotator_id = ?"
            params += (annotator_id,)
        if status is not None:
            sql += " AND c.status = ?"
            params += (status,)
        return [dict(r) for r in self.query(sql + " ORDER BY c.created_at, c.id", params)]

    def add_message(self, chat_id: str, annotator_id: int, role: str, content: str, author: str,
                    meta: dict | None = None) -> int:
        """Append one turn to an open chat; roles alternate user, assistant, user ... Returns its position."""
        if role not in ("user", "assistant"):
            raise ValueError("role must be 'user' or 'assistant'")
        _check_message(content)
        now = time.time()
        with self.transaction() as conn:
            _check_open(conn, chat_id, annotator_id)
            last = conn.execute("SELECT position, role FROM messages WHERE chat_id = ? ORDER BY position DESC LIMIT 1",
                                (chat_id,)).fetchone()
            expected = "user" if last is None or last["role"] == "assistant" else "assistant"
            if role != expected:
                raise ValueError(f"the next turn is the {expected}'s")
            position = 0 if last is None else last["position"] + 1
            conn.execute("INSERT INTO messages(chat_id, position, role, content, author, meta, created_at) "
                         "VALUES (?, ?, ?, ?, ?, ?, ?)",
                         (chat_id, position, role, content, author, json.dumps(meta or {}), now))
            conn.execute("UPDATE chats SET updated_at = ? WHERE id = ?", (now, chat_id))
        return position

    def edit_message(self, chat_id: str, annotator_id: int, position: int, content: str) -> None:
        """The annotator corrects a turn (a model's answer becomes author 'model+human')."""
        if isinstance(position, bool) or not isinstance(position, int) or not 0 <= position <= MAX_ROW_ID:
            raise KeyError(f"{chat_id}:{position}")
        _check_message(content)
        now = time.time()
        with self.transaction() as conn:
            _check_open(conn, chat_id, annotator_id)
            message = conn.execute("SELECT author, content, meta FROM messages WHERE chat_id = ? AND position = ?",
                                   (chat_id, position)).fetchone()
            if message is None:
                raise KeyError(f"{chat_id}:{position}")
            if message["content"] == content:
                return
            author = "model+human" if message["author"].startswith("model") else message["author"]
            meta = json.loads(message["meta"])
            if message["author"] == "model":
                meta["model_text"] = message["content"]
            conn.execute("UPDATE messages SET content = ?, author = ?, meta = ? WHERE chat_id = ? AND position = ?",
                         (content, author, json.dumps(meta), chat_id, position))
            conn.execute("UPDATE chats SET updated_at = ? WHERE id = ?", (now, chat_id))

    def set_chat_status(self, chat_id: str, annotator_id: int, status: str) -> None:
        if status not in ("done", "discarded", "open"):
            raise ValueError("bad status")
        with self.transaction() as conn:
            chat = conn.execute("SELECT status FROM chats WHERE id = ? AND annotator_id = ?",
                                (chat_id, annotator_id)).fetchone()
            if chat is None:
                raise KeyError(chat_id)
            if status == "done":
                roles = [r[0] for r in conn.execute("SELECT role FROM messages WHERE chat_id = ? ORDER BY position",
                                                    (chat_id,))]
                if "user" not in roles or not roles or roles[-1] != "assistant":
                    raise ValueError("a finished chat needs at least one user turn and must end with the "
                                     "assistant's")
            conn.execute("UPDATE chats SET status = ?, updated_at = ? WHERE id = ?", (status, time.time(), chat_id))


@contextmanager
def open_for_load(path: str | os.PathLike) -> Iterator[AnnotationDB]:
    """Open the database to load tasks into; when this call created the file and the block fails before an item
    or annotator is stored, the file is removed again, so a failed first load leaves no empty database behind.
    A database that existed before is never removed."""
    path = Path(path)
    existed = path.exists()
    try:
        with AnnotationDB(path) as db:
            yield db
    except BaseException:
        if not existed:
            _remove_if_unused(path)
        raise


def _remove_if_unused(path: Path) -> None:
    conn = sqlite3.connect(path)
    try:
        used = conn.execute("SELECT (SELECT COUNT(*) FROM items) + (SELECT COUNT(*) FROM annotators)").fetchone()[0]
    except sqlite3.DatabaseError:
        return  # not readable as ours: leave it for the user to look at
    finally:
        conn.close()
    if used:
        return
    for suffix in ("", "-wal", "-shm", "-journal"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)


def _item(row: sqlite3.Row) -> Item:
    return Item(row["id"], row["position"], row["prompt"], json.loads(row["candidates"]), json.loads(row["meta"]))


def _ranking(row: sqlite3.Row) -> dict[str, Any]:
    out = dict(row)
    for key in ("tiers", "shown_order"):
        out[key] = json.loads(out[key]) if out.get(key) else None
    out["flags"] = json.loads(out.get("flags") or "{}")
    return out


def _non_negative(seconds: float) -> float:
    """Clamp a duration at 0 (rows written before the clock fix may hold -0.0004), never -0.0."""
    return seconds if seconds > 0 else 0.0


def _check_room(conn, item_id: str, annotator_id: int, per_item: int, now: float) -> None:
    """ItemFull unless this annotator may add a ranking of the item: they ranked it before (a revision), or the
    done rankings of others leave a slot. Without a live lease of their own, others' live leases hold slots too
    (the rule next_item hands items out by), so a direct POST cannot take a slot someone is working on."""
    row = conn.execute(
        "SELECT EXISTS (SELECT 1 FROM rankings WHERE item_id = :item AND annotator_id = :me AND status = 'done') "
        "  AS mine, "
        "(SELECT COUNT(*) FROM rankings WHERE item_id = :item AND annotator_id != :me AND status = 'done') AS done, "
        "EXISTS (SELECT 1 FROM leases WHERE item_id = :item AND annotator_id = :me AND leased_at > :since) "
        "  AS leased, "
        "(SELECT COUNT(*) FROM leases l WHERE l.item_id = :item AND l.annotator_id != :me AND l.leased_at > :since "
        "  AND NOT EXISTS (SELECT 1 FROM rankings r WHERE r.item_id = l.item_id "
        "  AND r.annotator_id = l.annotator_id)) AS held",
        {"item": item_id, "me": annotator_id, "since": now - LEASE_S}).fetchone()
    if row["mine"]:
        return
    taken = row["done"] + (0 if row["leased"] else row["held"])
    if taken >= per_item:
        raise ItemFull(f"this item already has its {per_item} ranking(s)"
                       + ("" if row["done"] >= per_item else " or is being ranked by others"))


def _check_message(content: object) -> None:
    if not isinstance(content, str) or not content.strip():
        raise ValueError("the message is empty")
    if len(content) > MAX_TEXT:
        raise ValueError(f"the message is over {MAX_TEXT} characters")


def _check_open(conn, chat_id: str, annotator_id: int) -> None:
    """The chat exists, is this annotator's, and is still open (KeyError / ValueError otherwise)."""
    chat = conn.execute("SELECT status FROM chats WHERE id = ? AND annotator_id = ?",
                        (chat_id, annotator_id)).fetchone()
    if chat is None:
        raise KeyError(chat_id)
    if chat["status"] != "open":
        raise ValueError(f"this chat is {chat['status']}")
