"""`llamakit annotate` against a hostile web page and hostile clients (issue 14): CSRF from another port,
DNS rebinding, a third annotator on a two-annotator item, ids SQLite cannot hold, and a failed first load.

One real app (subprocess, --per-item 2) serves the HTTP tests; alice, bob and carol are its annotators.
"""

from __future__ import annotations

import json
import math
import sqlite3
import threading

import httpx
import pytest
from support.annotate_app import running_app
from support.cli import FIXTURES, free_port, run_cli

from toolkit.annotate.db import AnnotationDB, ItemFull
from toolkit.annotate.tasks import load_tasks

TASKS = FIXTURES / "annotate-tasks.jsonl"
K = {row["id"]: len(row.get("candidates") or row.get("responses") or [row["chosen"], row["rejected"]])
     for row in map(json.loads, TASKS.read_text().splitlines())}
EXTRA_HOST = "annotate.example.org"


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("annotate-hardening")
    db = tmp / "ann.sqlite"
    with AnnotationDB(db) as store:  # users made in-process: three CLI runs would cost seconds
        tokens = {name: store.add_annotator(name) for name in ("alice", "bob", "carol")}
    with running_app(["--tasks", str(TASKS), "--db", str(db), "--port", "0", "--per-item", "2",
                      "--allowed-hosts", EXTRA_HOST], log_file=tmp / "app.log") as running:
        yield f"http://127.0.0.1:{running.port}", tokens, db, running.log


def rows(db, sql, params=()) -> list[tuple]:
    with sqlite3.connect(db) as conn:
        return conn.execute(sql, params).fetchall()


def cookie_login(base: str, token: str) -> httpx.Cookies:
    """The browser's way in: the login form (from the app's own page) sets the session cookie."""
    r = httpx.post(f"{base}/login", data={"token": token}, headers={"Origin": base})
    assert r.status_code == 303, r.text
    return r.cookies


def all_equal(item_id: str) -> dict:
    return {"item_id": item_id, "tiers": [list(range(K[item_id]))]}


# 5. CSRF ------------------------------------------------------------------------------------------------

def test_csrf_simple_request_from_another_port_saves_nothing(app):
    base, tokens, db, _ = app
    evil = f"http://127.0.0.1:{free_port()}"  # another port on 127.0.0.1: the same *site*, SameSite lets it in
    with httpx.Client(base_url=base, cookies=cookie_login(base, tokens["carol"])) as browser:
        # what a page on `evil` can send without a CORS preflight: a "simple" text/plain POST with the cookie
        simple = {"Content-Type": "text/plain; charset=application/json", "Origin": evil}
        r = browser.post("/api/rank", content=json.dumps(all_equal("boil")), headers=simple)
        assert r.status_code in (403, 415) and "error" in r.json()
        r = browser.post("/api/chats", content=json.dumps({"mode": "self"}), headers=simple)
        assert r.status_code in (403, 415) and "error" in r.json()
        # a real JSON media type but a foreign Origin (or none at all, or a foreign Referer): 403
        for headers in ({"Origin": evil}, {}, {"Referer": evil + "/attack.html"}, {"Origin": "null"}):
            r = browser.post("/api/rank", json=all_equal("boil"), headers=headers)
            assert r.status_code == 403 and "cross-origin" in r.json()["error"], headers
            assert browser.post("/api/chats", json={"mode": "self"}, headers=headers).status_code == 403
        # bodiless state changes and the login/logout forms are guarded too (login CSRF, forced logout)
        assert browser.post("/logout", headers={"Origin": evil}).status_code == 403
        assert httpx.post(f"{base}/login", data={"token": tokens["bob"]}, headers={"Origin": evil}
                          ).status_code == 403
        carol = rows(db, "SELECT id FROM annotators WHERE name = 'carol'")[0][0]
        assert rows(db, "SELECT * FROM rankings WHERE annotator_id = ?", (carol,)) == []
        assert rows(db, "SELECT * FROM chats WHERE annotator_id = ?", (carol,)) == []
        # the app's own page: same Origin (or Referer) with the cookie works
        r = browser.post("/api/rank", json=all_equal("boil"), headers={"Origin": base})
        assert r.status_code == 200 and r.json()["saved"]["item_id"] == "boil"
        assert browser.post("/api/chats", json={"mode": "self"}, headers={"Referer": base + "/"}).status_code == 200
        assert len(rows(db, "SELECT * FROM chats WHERE annotator_id = ?", (carol,))) == 1
        assert browser.get("/api/me").status_code == 200  # reads need no Origin
    # scripts authenticate with a bearer header, which no cross-site page can add: no Origin needed
    r = httpx.post(f"{base}/api/chats", json={"mode": "self"}, headers={"Authorization": f"bearer {tokens['bob']}"})
    assert r.status_code == 200


# 6. Host allow-list (DNS rebinding) ----------------------------------------------------------------------

def test_a_foreign_host_header_is_refused(app):
    base, tokens, _, _ = app
    port = base.rsplit(":", 1)[1]
    bearer = {"Authorization": f"Bearer {tokens['alice']}"}
    for host in ("attacker.example", f"attacker.example:{port}", "annotate.example.org.evil.test"):
        assert httpx.get(f"{base}/health", headers={"Host": host}).status_code == 421, host
        r = httpx.get(f"{base}/api/me", headers={"Host": host, **bearer})
        assert r.status_code == 421 and "--allowed-hosts" in r.json()["error"]
        assert httpx.post(f"{base}/api/chats", json={"mode": "self"}, headers={"Host": host, **bearer}
                          ).status_code == 421
        assert httpx.get(f"{base}/static/app.js", headers={"Host": host}).status_code == 421
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"{EXTRA_HOST}:{port}", EXTRA_HOST.upper()):
        assert httpx.get(f"{base}/api/me", headers={"Host": host, **bearer}).status_code == 200, host


# 7. --per-item at write time, and no negative pace --------------------------------------------------------

def test_a_third_annotator_cannot_rank_an_item_meant_for_two(app):
    base, tokens, db, _ = app
    clients = {n: httpx.Client(base_url=base, headers={"Authorization": f"Bearer {t}"}) for n, t in tokens.items()}
    try:
        for name in ("alice", "bob"):
            assert clients[name].post("/api/rank", json=all_equal("capital")).status_code == 200
        r = clients["carol"].post("/api/rank", json=all_equal("capital"))  # straight to the API, no lease
        assert r.status_code == 409 and "2 ranking" in r.json()["error"]
        assert "progress" in r.json()  # the page moves on to the next item
        assert rows(db, "SELECT COUNT(*) FROM rankings WHERE item_id = 'capital'") == [(2,)]
        # revising one's own ranking of a full item is still fine
        r = clients["alice"].post("/api/rank", json={"item_id": "capital", "tiers": [[0], [1], [2]]})
        assert r.status_code == 200
    finally:
        for client in clients.values():
            client.close()
    shown = run_cli("annotate", "progress", "--db", db, "--per-item", 2, "--json")
    assert json.loads(shown.stdout)["complete"] >= 1


def test_per_item_holds_under_concurrent_writers(tmp_path):
    """Six annotators on six connections (as six app processes would be) race for an item meant for two."""
    path = tmp_path / "race.sqlite"
    with AnnotationDB(path) as store:
        load_tasks(store, TASKS)
        for i in range(6):
            store.add_annotator(f"a{i}")
        ids = [a.id for a in store.annotators()]
    outcomes: list[str] = []
    start = threading.Barrier(len(ids))

    def rank(annotator_id: int) -> None:
        with AnnotationDB(path) as own:
            start.wait()
            try:
                own.save_ranking(annotator_id, "sum", [[0], [1], [2]], per_item=2)
                outcomes.append("saved")
            except ItemFull:
                outcomes.append("full")

    threads = [threading.Thread(target=rank, args=(i,)) for i in ids]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == ["full"] * 4 + ["saved"] * 2
    assert rows(path, "SELECT COUNT(*) FROM rankings WHERE item_id = 'sum'") == [(2,)]


def test_pace_is_never_negative(tmp_path):
    path = tmp_path / "pace.sqlite"
    with AnnotationDB(path) as store:
        load_tasks(store, TASKS)
        store.add_annotator("alice")
        store.add_annotator("bob")
        alice, bob = store.annotators()
        item = store.next_item(alice.id, 1, now=1000.0)
        # the answer's clock reads a hair before the lease's (a request that waited on another's transaction)
        seconds = store.save_ranking(alice.id, item.id, [list(range(len(item.candidates)))], now=999.9996)["seconds"]
        assert seconds == 0 and math.copysign(1, seconds) == 1  # not -0.0
        with store.transaction() as conn:  # a row such a clock left in a database written by an older llamakit
            conn.execute("INSERT INTO rankings(item_id, annotator_id, status, tiers, seconds, created_at, updated_at)"
                         " VALUES ('sum', ?, 'done', '[[0, 1, 2]]', -0.0004, 1, 1)", (bob.id,))
    table = run_cli("annotate", "progress", "--db", path)
    shown = table.stdout + table.stderr  # rich prints the table on the console's stream
    assert table.returncode == 0 and "-0.0" not in shown and "bob" in shown
    report = json.loads(run_cli("annotate", "progress", "--db", path, "--json").stdout)
    for person in report["annotators"]:
        assert math.copysign(1, person["median_seconds"]) == 1, person


# 8. ids SQLite cannot hold, and text it cannot store -----------------------------------------------------

def test_out_of_range_ids_are_a_4xx_not_a_500(app):
    base, tokens, _, log = app
    with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {tokens['alice']}"}) as client:
        chat = client.post("/api/chats", json={"mode": "self"}).json()["id"]
        assert client.post(f"/api/chats/{chat}/messages", json={"content": "Hi"}).status_code == 200
        for position in ("99999999999999999999", str(2**63), str(2**64 - 1), "-1", "abc", "1e3", "٣"):
            r = client.put(f"/api/chats/{chat}/messages/{position}", json={"content": "edited"})
            assert r.status_code == 404 and "error" in r.json(), (position, r.text)
        assert client.put(f"/api/chats/{chat}/messages/0", json={"content": "edited"}).status_code == 200
        # JSON may spell a lone surrogate, which SQLite cannot encode: 400, not a 500 from the driver
        lone = {"Content-Type": "application/json"}
        r = client.post(f"/api/chats/{chat}/messages", content=b'{"content": "\\ud800"}', headers=lone)
        assert r.status_code == 400 and "Unicode" in r.json()["error"]
        assert client.post("/api/rank", content=b'{"item_id": "\\udfff", "tiers": [[0]]}', headers=lone
                           ).status_code == 400
    assert "Traceback" not in log.read_text()


# 12. a failed first load leaves no database -------------------------------------------------------------

def test_a_failed_task_load_leaves_no_database(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "p", "candidates": ["a", "b"]}\n{"prompt": "q", "candidates": ["only one"]}\n')
    cases = [(["--tasks", bad], "needs at least 2 answers"),
             (["--tasks", FIXTURES / "annotate-prompts.jsonl"], "pass --teacher"),  # prompt-only, no teacher
             (["--tasks", tmp_path / "missing.jsonl"], "missing.jsonl"),
             ([], "holds no items yet")]
    for i, (args, message) in enumerate(cases):
        db = tmp_path / f"new{i}" / "ann.sqlite"
        proc = run_cli("annotate", *args, "--db", db, "--port", "0")
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
        assert message in lines[0]
        assert not db.exists() and not list(tmp_path.glob(f"new{i}/*")), list(tmp_path.glob(f"new{i}/*"))
    # a database that was there before is never removed, whatever the task file holds
    kept = tmp_path / "kept.sqlite"
    with AnnotationDB(kept) as store:
        store.add_annotator("alice")
    proc = run_cli("annotate", "--tasks", bad, "--db", kept, "--port", "0")
    assert proc.returncode == 2 and kept.is_file()
    assert rows(kept, "SELECT name FROM annotators") == [("alice",)]
