"""The annotation store, task loading, export and agreement maths, in-process (fast, no server)."""

from __future__ import annotations

import json
import math
import threading

import pytest
from support.cli import FIXTURES, run_cli

from toolkit.annotate import agreement as agr
from toolkit.annotate.db import LEASE_S, AnnotationDB, display_order
from toolkit.annotate.export import export, ranking_pairs
from toolkit.annotate.tasks import load_tasks, parse_task_row, read_tasks
from toolkit.errors import UserError

TASKS = FIXTURES / "annotate-tasks.jsonl"


@pytest.fixture
def db(tmp_path):
    with AnnotationDB(tmp_path / "ann.sqlite") as store:
        load_tasks(store, TASKS)
        yield store


def test_task_rows_of_every_shape():
    tasks = {t.id: t for t in read_tasks(TASKS)}
    assert tasks["capital"].candidates[0] == "Paris is the capital of France." and len(tasks["capital"].candidates) == 3
    assert tasks["boil"].candidates[2] == "Water never boils."  # "responses" works like "candidates"
    assert tasks["sum"].candidates == ["2 + 2 = 4.", "It is 5.", "22"]
    assert tasks["sum"].meta["prior_scores"] == [5, 2, 1]
    assert tasks["greet"].candidates == ["Hola.", "Bonjour."] and tasks["greet"].meta["prior_ranking"] == [[0], [1]]
    alpaca = parse_task_row({"instruction": "Translate.", "input": "Good morning"}, "f.jsonl", 3)
    assert alpaca.prompt == "Translate.\n\nGood morning" and alpaca.candidates is None


@pytest.mark.parametrize("row, message", [
    ({"candidates": ["a", "b"]}, "f.jsonl:7: field 'prompt': missing"),
    ({"prompt": 3, "candidates": ["a", "b"]}, "f.jsonl:7: field 'prompt': expected a string, got int"),
    ({"prompt": "p", "candidates": "a"}, "f.jsonl:7: field 'candidates': expected a list of answers, got str"),
    ({"prompt": "p", "candidates": ["a"]}, "f.jsonl:7: field 'candidates': needs at least 2 answers"),
    ({"prompt": "p", "candidates": ["a", "a"]}, "f.jsonl:7: field 'candidates': all answers are the same text"),
    ({"prompt": "p", "responses": ["a", 5]}, "f.jsonl:7: field 'responses[1]': expected a string"),
    ({"prompt": "p", "chosen": "a"}, "f.jsonl:7: field 'rejected': expected a string"),
])
def test_bad_task_rows_name_file_line_and_field(row, message):
    with pytest.raises(UserError) as err:
        parse_task_row(row, "f.jsonl", 7)
    assert str(err.value).startswith(message)


def test_prompt_only_rows_need_a_teacher(tmp_path):
    with AnnotationDB(tmp_path / "a.sqlite") as store, pytest.raises(UserError, match="pass --teacher"):
        load_tasks(store, FIXTURES / "annotate-prompts.jsonl")


def test_loading_twice_adds_nothing_and_a_changed_row_is_refused(db, tmp_path):
    assert load_tasks(db, TASKS)["added"] == 0 and db.count_items() == 6
    changed = tmp_path / "changed.jsonl"
    changed.write_text(json.dumps({"id": "capital", "prompt": "Other?", "candidates": ["x", "y"]}) + "\n")
    with pytest.raises(UserError, match="already in the database with other text"):
        load_tasks(db, changed)
    assert db.count_items() == 6


def test_each_item_goes_to_per_item_annotators_and_a_lease_holds_it(db):
    for name in ("alice", "bob", "carol"):
        db.add_annotator(name)
    alice, bob, carol = db.annotators()
    first = db.next_item(alice.id, per_item=1)
    assert db.next_item(alice.id, per_item=1).id == first.id  # a reload brings the same item back
    second = db.next_item(bob.id, per_item=1)
    assert second.id != first.id  # alice's lease keeps it from bob
    db.save_ranking(alice.id, first.id, [[0], [1], [2]])
    assert db.next_item(bob.id, per_item=1).id == second.id
    # with two annotators per item, bob also gets alice's finished item
    assert db.next_item(carol.id, per_item=2).id == first.id
    # an abandoned lease returns to the pool after LEASE_S
    later = db.next_item(carol.id, per_item=1, now=10**10 + LEASE_S)
    assert later.id == first.id  # still carol's own lease
    db.skip_item(carol.id, first.id)
    assert db.next_item(carol.id, per_item=1, now=10**10).id == second.id  # bob's lease expired long ago
    assert db.progress(alice.id, per_item=1) == {"done": 1, "skipped": 0, "open": 5, "items": 6, "complete": 1,
                                                 "per_item": 1}


def test_concurrent_annotators_never_double_an_item(db):
    names = [f"a{i}" for i in range(4)]
    for name in names:
        db.add_annotator(name)
    people = db.annotators()

    def work(annotator):
        while (item := db.next_item(annotator.id, per_item=1)) is not None:
            db.save_ranking(annotator.id, item.id, [[i] for i in range(len(item.candidates))])

    threads = [threading.Thread(target=work, args=(a,)) for a in people]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    rows = db.query("SELECT item_id, COUNT(*) AS n FROM rankings GROUP BY item_id")
    assert len(rows) == 6 and all(r["n"] == 1 for r in rows)


@pytest.mark.parametrize("tiers, unordered, error", [
    ([[0], [1]], None, "exactly once"),
    ([[0], [1], [1, 2]], None, "exactly once"),
    ([[0], [1], [3]], None, "out of range"),
    ([], None, "non-empty"),
    ([[0], [1], [2]], 5, "index of a tier"),
    ("0>1>2", None, "non-empty"),
])
def test_bad_rankings_are_refused(db, tiers, unordered, error):
    db.add_annotator("alice")
    with pytest.raises(ValueError, match=error):
        db.save_ranking(db.annotators()[0].id, "capital", tiers, unordered)
    assert db.rankings() == []


def test_display_order_is_a_stable_per_annotator_shuffle():
    orders = {tuple(display_order(f"item{i}", 1, 4)) for i in range(20)}
    assert all(sorted(o) == [0, 1, 2, 3] for o in orders) and len(orders) > 3
    assert display_order("x", 1, 4) == display_order("x", 1, 4)


def test_pairs_implied_by_rankings():
    assert ranking_pairs([[2], [0], [1]]) == [(2, 0, 0, 1), (2, 1, 0, 2), (0, 1, 1, 2)]
    assert ranking_pairs([[0, 1], [2]]) == [(0, 2, 0, 1), (1, 2, 0, 1)]  # a tie gives no pair inside
    assert ranking_pairs([[0, 1, 2]]) == []
    assert ranking_pairs([[3], [0], [1], [2]], "best-worst") == [(3, 2, 0, 3)]
    assert agr.pair_labels([[1], [0, 2]]) == {(0, 1): "B", (0, 2): "tie", (1, 2): "A"}
    assert agr.pair_labels([[1], [0, 2], [3]], unordered=1) == {(0, 1): "B", (0, 3): "A", (1, 2): "A",
                                                                (1, 3): "A", (2, 3): "A"}


def test_export_writes_generate_data_rows(db, tmp_path):
    db.add_annotator("alice")
    alice = db.annotators()[0]
    db.save_ranking(alice.id, "capital", [[0], [1], [2]], flags={"unusable": [2]})
    db.save_ranking(alice.id, "boil", [[1], [0], [2]], flags={"harmful": [1]}, better="It boils at 100 °C.")
    db.save_ranking(alice.id, "sum", [[0, 1], [2]])
    db.save_ranking(alice.id, "greet", [[0], [1]])
    db.skip_item(alice.id, "xss")
    chat = db.create_chat(alice.id, "self", system="Be brief.")
    db.add_message(chat, alice.id, "user", "Hi <b>there</b>", "human")
    db.add_message(chat, alice.id, "assistant", "Hello!", "human")
    db.set_chat_status(chat, alice.id, "done")
    db.create_chat(alice.id, "self")  # open: not exported

    stats = export(db.path, tmp_path / "prefs.jsonl")
    prefs = [json.loads(line) for line in (tmp_path / "prefs.jsonl").read_text().splitlines()]
    convs = [json.loads(line) for line in (tmp_path / "prefs.conversations.jsonl").read_text().splitlines()]
    pairs = {(r["meta"]["item_id"], r["chosen"], r["rejected"]) for r in prefs}
    assert ("capital", "Paris is the capital of France.", "I like turtles.") in pairs
    assert not any(item == "boil" and chosen == "About 50 degrees Celsius." for item, chosen, _ in pairs)  # harmful
    assert ("boil", "It boils at 100 °C.", "About 50 degrees Celsius.") in pairs  # the rewrite beats everything
    assert ("greet", "Hola.", "Bonjour.") in pairs and not any(r["meta"]["item_id"] == "xss" for r in prefs)
    # capital 3 + boil 1 (2 dropped: flagged chosen) + rewrite 3 + sum 2 (tie gives none) + greet 1
    assert len(prefs) == stats.preference_rows == 10 and stats.dropped_flagged == 2
    for row in prefs:
        assert set(row) == {"id", "prompt", "chosen", "rejected", "meta"}
        assert all(isinstance(row[k], str) for k in ("id", "prompt", "chosen", "rejected"))
        assert row["meta"]["annotator"] == "alice" and row["meta"]["annotated_at"].endswith("Z")
    assert len({r["id"] for r in prefs}) == len(prefs)
    kinds = [c["meta"]["kind"] for c in convs]
    assert kinds == ["chat", "rewrite"]
    assert convs[0]["messages"] == [{"role": "system", "content": "Be brief."},
                                    {"role": "user", "content": "Hi <b>there</b>"},
                                    {"role": "assistant", "content": "Hello!"}]
    assert convs[1]["messages"][1] == {"role": "assistant", "content": "It boils at 100 °C."}
    assert stats.preferences_bytes == (tmp_path / "prefs.jsonl").stat().st_size
    # best-worst: one pair per ranking; the same export twice is byte-identical
    export(db.path, tmp_path / "bw.jsonl", pairs="best-worst", rewrites=False)
    bw = [json.loads(line) for line in (tmp_path / "bw.jsonl").read_text().splitlines()]
    assert {(r["meta"]["item_id"], r["chosen"]) for r in bw} == {
        ("capital", "Paris is the capital of France."), ("sum", "2 + 2 = 4."), ("sum", "It is 5."), ("greet", "Hola.")}
    export(db.path, tmp_path / "again.jsonl")
    assert (tmp_path / "again.jsonl").read_bytes() == (tmp_path / "prefs.jsonl").read_bytes()


def test_chat_turns_alternate_and_only_complete_chats_finish(db):
    db.add_annotator("alice")
    db.add_annotator("bob")
    alice, bob = db.annotators()
    chat = db.create_chat(alice.id, "self")
    with pytest.raises(ValueError, match="the next turn is the user's"):
        db.add_message(chat, alice.id, "assistant", "Hi", "human")
    db.add_message(chat, alice.id, "user", "Hi", "human")
    with pytest.raises(ValueError, match="must end with the assistant"):
        db.set_chat_status(chat, alice.id, "done")
    with pytest.raises(KeyError):
        db.add_message(chat, bob.id, "assistant", "not my chat", "human")
    db.add_message(chat, alice.id, "assistant", "model text", "model")
    db.edit_message(chat, alice.id, 1, "fixed text")
    turn = db.chat(chat)["messages"][1]
    assert turn["author"] == "model+human" and turn["meta"]["model_text"] == "model text"


def test_fleiss_kappa_matches_the_textbook_example():
    # Fleiss (1971) as worked on Wikipedia: 10 subjects, 14 raters, 5 categories -> 0.210
    table = [[0, 0, 0, 0, 14], [0, 2, 6, 4, 2], [0, 0, 3, 5, 6], [0, 3, 9, 2, 0], [2, 2, 8, 1, 1],
             [7, 7, 0, 0, 0], [3, 2, 6, 3, 0], [2, 5, 3, 2, 2], [6, 5, 2, 1, 0], [0, 2, 2, 3, 7]]
    assert agr.fleiss_kappa(table) == pytest.approx(0.2099, abs=1e-4)
    # two raters: Fleiss' kappa is Scott's pi; perfect agreement is 1, uniform labels are undefined
    assert agr.fleiss_kappa([[2, 0, 0], [0, 2, 0], [0, 0, 2]]) == pytest.approx(1.0)
    assert math.isnan(agr.fleiss_kappa([[2, 0, 0], [2, 0, 0]]))


def test_cohen_kappa_by_hand():
    x = ["A", "A", "B", "B", "tie", "A"]
    y = ["A", "B", "B", "B", "tie", "A"]
    po = 5 / 6
    pe = (3 / 6) * (2 / 6) + (2 / 6) * (3 / 6) + (1 / 6) * (1 / 6)
    assert agr.cohen_kappa(x, y) == pytest.approx((po - pe) / (1 - pe))
    assert math.isnan(agr.cohen_kappa(["A"], ["A"]))


def test_agreement_between_people_and_with_the_judge(db, tmp_path):
    for name in ("alice", "bob"):
        db.add_annotator(name)
    alice, bob = db.annotators()
    db.save_ranking(alice.id, "capital", [[0], [1], [2]])
    db.save_ranking(bob.id, "capital", [[0], [2], [1]])  # disagrees on (1, 2)
    db.save_ranking(alice.id, "boil", [[0], [1, 2]])
    db.save_ranking(bob.id, "boil", [[0], [1], [2]])  # tie vs B>C on (1, 2)
    db.save_ranking(alice.id, "greet", [[0], [1]])  # alice alone: no shared unit
    report = agr.agreement(db.path, FIXTURES / "annotate-judged.jsonl")
    (pair,) = report.pairwise
    assert (pair.a, pair.b, pair.units) == ("alice", "bob", 6)
    alice_labels = ["A", "A", "tie", "A", "A", "A"]  # units sorted: boil (0,1) (0,2) (1,2), capital ...
    bob_labels = ["A", "A", "A", "A", "A", "B"]
    assert pair.agreement == pytest.approx(4 / 6)
    assert pair.kappa == pytest.approx(agr.cohen_kappa(alice_labels, bob_labels))
    assert report.fleiss.units == 6 and report.fleiss.agreement == pytest.approx(4 / 6)
    # judge file: capital (0>1) and (2>1) = units (capital,0,1)=A, (capital,1,2)=B; boil scores 9,4,4
    assert report.judge_rows == 4 and report.judge_matched == 3
    by = {c.b: c for c in report.judge}
    assert by["alice"].units == 5 and by["alice"].agreement == pytest.approx(4 / 5)  # alice said A on capital 1-2
    assert by["bob"].units == 5 and by["bob"].agreement == pytest.approx(4 / 5)  # bob: boil 1-2 A vs judge tie
    assert "majority of people" in by
    png = tmp_path / "agreement.png"
    agr.plot(report, png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    # without a judge file the task file's own labels (greet: chosen/rejected, sum: scores) are the judge
    own = agr.agreement(db.path)
    assert own.judge_source == "labels in the task file"
    assert {c.b: c.units for c in own.judge}["alice"] == 1  # greet (0, 1), where alice agrees


def test_guidelines_markdown_cannot_inject_html():
    from toolkit.annotate.app import render_guidelines

    html = render_guidelines("# Rules\n\n<script>alert(1)</script>\n\n[click](javascript:alert(1)) **bold**")
    assert "<h1>Rules</h1>" in html and "<strong>bold</strong>" in html
    assert "<script>" not in html and "&lt;script&gt;" in html
    assert 'href="javascript' not in html


def test_progress_counts_each_annotators_work_and_complete_items(db, tmp_path):
    for name in ("alice", "bob"):
        db.add_annotator(name)
    alice, bob = db.annotators()
    db.save_ranking(alice.id, "capital", [[0], [1], [2]])
    db.save_ranking(bob.id, "capital", [[0], [2], [1]])
    db.save_ranking(alice.id, "sum", [[0, 1], [2]])
    db.skip_item(bob.id, "boil")
    chat = db.create_chat(bob.id, "self")
    db.add_message(chat, bob.id, "user", "Hi", "human")
    db.add_message(chat, bob.id, "assistant", "Hello!", "human")
    db.set_chat_status(chat, bob.id, "done")

    people = {p["annotator"]: p for p in db.team_progress()}
    assert (people["alice"]["ranked"], people["alice"]["skipped"], people["alice"]["chats"]) == (2, 0, 0)
    assert (people["bob"]["ranked"], people["bob"]["skipped"], people["bob"]["chats"]) == (1, 1, 1)
    assert people["bob"]["last_active"] > 0
    assert db.items_with_rankings(2)["complete"] == 1  # only "capital" has two rankings
    assert db.items_with_rankings(1)["complete"] == 2

    shown = run_cli("annotate", "progress", "--db", db.path, "--per-item", 2, "--json")
    assert shown.returncode == 0, shown.stderr
    report = json.loads(shown.stdout)
    assert report["complete"] == 1 and len(report["annotators"]) == 2
    missing = run_cli("annotate", "progress", "--db", tmp_path / "nope.sqlite")
    assert missing.returncode == 2 and "nope.sqlite" in missing.stderr
