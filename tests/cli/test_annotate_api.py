"""The real `llamakit annotate` app in a subprocess, driven over HTTP: auth, two annotators at once, kill -9."""

from __future__ import annotations

import json
import sqlite3
import threading

import httpx
import pytest
from support.annotate_app import running_app, start_app, stop_app
from support.cli import FIXTURES, free_port, run_cli

TASKS = FIXTURES / "annotate-tasks.jsonl"


def add_user(db, name) -> str:
    proc = run_cli("annotate", "add-user", name, "--db", db, check=True)
    token = proc.stdout.strip()
    assert len(token) >= 30 and "\n" not in token
    return token


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("annotate-api")
    db = tmp / "ann.sqlite"
    tokens = {name: add_user(db, name) for name in ("alice", "bob")}
    with running_app(["--tasks", str(TASKS), "--db", str(db), "--port", "0", "--per-item", "2"],
                     log_file=tmp / "app.log") as running:
        yield running, tokens, db


def test_wrong_or_missing_token_is_refused(app):
    running, tokens, _ = app
    base = f"http://127.0.0.1:{running.port}"
    for headers in ({"Authorization": "Bearer not-a-token"}, {"Authorization": f"Basic {tokens['alice']}"},
                    {"Cookie": "llamakit_annotate=not-a-token"}, {}):
        r = httpx.get(f"{base}/api/next", headers=headers)
        assert r.status_code == 401, headers
        assert r.headers["www-authenticate"] == "Bearer" and "error" in r.json()
    r = httpx.get(f"{base}/", headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and "Wrong token" in r.text
    assert httpx.get(f"{base}/").status_code == 303  # no token at all: the login page
    r = httpx.post(f"{base}/login", data={"token": "guess"}, headers={"Origin": base})  # the login page's form
    assert r.status_code == 401 and "Wrong token" in r.text
    assert "Max-Age=0" in r.headers.get("set-cookie", "Max-Age=0")  # no session for a wrong token
    # a good token: the form sets an HttpOnly, SameSite cookie that then works on its own
    r = httpx.post(f"{base}/login", data={"token": tokens["alice"]}, headers={"Origin": base})
    assert r.status_code == 303 and r.headers["location"] == "/"
    cookie = r.headers["set-cookie"]
    assert "HttpOnly" in cookie and "samesite=strict" in cookie.lower()
    with httpx.Client(base_url=base, cookies=r.cookies) as client:
        assert client.get("/api/me").json()["name"] == "alice"
        page = client.get("/")
        assert page.status_code == 200 and "script-src 'self'" in page.headers["content-security-policy"]
        # a JSON API: a cross-site form post (no JSON content type, no Origin of this app) is refused
        assert client.post("/api/rank", data={"item_id": "capital"}).status_code in (403, 415)
        assert client.post("/api/rank", data={"item_id": "capital"}, headers={"Origin": base}).status_code == 415
    assert httpx.get(f"{base}/health").json()["items"] == 6


def rank_everything(base, token, order, log):
    """One annotator's loop: next item, rank it by the stored index order, until nothing is left."""
    with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {token}"}, timeout=30) as client:
        item = client.get("/api/next").json()["item"]
        while item is not None:
            tiers = [[i] for i in order(item["k"])]
            r = client.post("/api/rank", json={"item_id": item["id"], "tiers": tiers})
            assert r.status_code == 200, r.text
            log.append(item["id"])
            item = r.json()["item"]


def test_two_annotators_at_once_on_the_same_items(app):
    running, tokens, db = app
    base = f"http://127.0.0.1:{running.port}"
    seen = {"alice": [], "bob": []}
    orders = {"alice": lambda k: range(k), "bob": lambda k: reversed(range(k))}
    threads = [threading.Thread(target=rank_everything, args=(base, tokens[n], orders[n], seen[n])) for n in seen]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert sorted(seen["alice"]) == sorted(seen["bob"]) == ["boil", "capital", "greet", "reverse", "sum", "xss"]
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT i.id, a.name, r.tiers FROM rankings r JOIN items i ON i.id = r.item_id "
                            "JOIN annotators a ON a.id = r.annotator_id WHERE r.status = 'done'").fetchall()
    assert len(rows) == 12
    for _item, name, tiers in rows:
        tiers = json.loads(tiers)
        assert tiers == sorted(tiers) if name == "alice" else tiers == sorted(tiers, reverse=True)
    progress = httpx.get(f"{base}/api/next", headers={"Authorization": f"Bearer {tokens['bob']}"}).json()
    assert progress["item"] is None and progress["progress"]["complete"] == 6


def test_kill_9_mid_session_loses_nothing_and_the_annotator_goes_on(tmp_path):
    db = tmp_path / "ann.sqlite"
    token = add_user(db, "alice")
    port = free_port()
    args = ["--tasks", str(TASKS), "--db", str(db), "--port", str(port)]
    headers = {"Authorization": f"Bearer {token}"}
    base = f"http://127.0.0.1:{port}"
    running = start_app(args, log_file=tmp_path / "app.log")
    try:
        item = httpx.get(f"{base}/api/next", headers=headers).json()["item"]
        done = []
        for _ in range(2):
            r = httpx.post(f"{base}/api/rank", headers=headers, json={"item_id": item["id"], "tiers": [
                list(range(item["k"]))]})  # "all equal" is an answer too
            assert r.status_code == 200
            done.append(item["id"])
            item = r.json()["item"]
        in_front = item["id"]  # on screen, not answered yet
    finally:
        stop_app(running.process, kill=True)
    running = start_app(["--db", str(db), "--port", str(port)], log_file=tmp_path / "app.log")  # no --tasks now
    try:
        data = httpx.get(f"{base}/api/next", headers=headers).json()
        assert data["item"]["id"] == in_front
        assert data["progress"]["done"] == 2
        with sqlite3.connect(db) as conn:
            assert [r[0] for r in conn.execute("SELECT item_id FROM rankings ORDER BY id")] == done
    finally:
        stop_app(running.process)


def test_bad_input_is_a_clear_4xx(app):
    running, tokens, _ = app
    with httpx.Client(base_url=f"http://127.0.0.1:{running.port}",
                      headers={"Authorization": f"Bearer {tokens['alice']}"}) as client:
        r = client.post("/api/rank", json={"item_id": "capital", "tiers": [[0], [0], [1]]})
        assert r.status_code == 400 and "exactly once" in r.json()["error"]
        assert client.post("/api/rank", json={"item_id": "nope", "tiers": [[0]]}).status_code == 404
        assert client.post("/api/rank", content=b"{not json", headers={"Content-Type": "application/json"}
                           ).status_code == 400
        r = client.post("/api/chats", json={"mode": "model"})
        assert r.status_code == 400 and "--teacher" in r.json()["error"]
        chat = client.post("/api/chats", json={"mode": "self"}).json()
        assert client.post(f"/api/chats/{chat['id']}/finish").status_code == 400
        other = {"Authorization": f"Bearer {tokens['bob']}"}
        assert client.get(f"/api/chats/{chat['id']}", headers=other).status_code == 404  # not bob's chat


def test_cli_errors_are_one_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "p", "candidates": ["a", "b"]}\n{"prompt": "q", "candidates": ["only one"]}\n')
    proc = run_cli("annotate", "--tasks", bad, "--db", tmp_path / "a.sqlite", "--port", "0")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: {bad}:2: field 'candidates': needs at least 2 answers to rank, got 1")
    proc = run_cli("annotate", "--db", tmp_path / "empty.sqlite", "--port", "0")
    assert proc.returncode == 2 and "holds no items yet" in proc.stderr
    proc = run_cli("annotate", "export", "--db", tmp_path / "missing.sqlite", "--out", tmp_path / "x.jsonl")
    assert proc.returncode == 2 and "no such annotation database" in proc.stderr
    db = tmp_path / "u.sqlite"
    add_user(db, "alice")
    proc = run_cli("annotate", "add-user", "alice", "--db", db)
    assert proc.returncode == 2 and "already exists" in proc.stderr
