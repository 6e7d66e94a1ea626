"""A person's session in a real browser: headless Chromium (Debian's) through Selenium and chromedriver.

Alice logs in with her token, ranks items with the keyboard while Bob ranks the same items over HTTP
(two annotators per item), the server is killed mid-session and restarted, she carries on, meets an item
full of HTML that must show as text, chats with the tiny model behind the real `llamakit serve`, writes a
chat playing both sides; then the SQLite rows, the export, the agreement report and `train-reward` on the
export are checked. Measured (printed, not asserted): items/minute with the keyboard, export size.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import tempfile
import threading
import time
from pathlib import Path

import httpx
import pytest
from support.annotate_app import start_app, stop_app
from support.cli import API_KEY, FIXTURES, free_port, run_cli

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
TASKS = FIXTURES / "annotate-tasks.jsonl"
# The README's screenshot is refreshed only on request, so a test run never dirties the checkout.
SCREENSHOT_DIR = os.environ.get("LLAMAKIT_SCREENSHOT_DIR")  # e.g. docs/
SCREENSHOT = Path(SCREENSHOT_DIR) / "annotate-rank.png" if SCREENSHOT_DIR else None
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1280,900"]


@pytest.fixture(scope="module")
def browser():
    if not (Path(CHROMIUM).is_file() and Path(CHROMEDRIVER).is_file()):
        pytest.fail("the browser tests need Debian's chromium and chromium-driver (apt-get install -y chromium "
                    "chromium-driver; `make setup` does it)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="llamakit-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS + [f"--user-data-dir={profile}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def wait(driver, condition, timeout=20, what="condition"):
    """Poll until condition(driver) holds; elements replaced by a navigation or a re-render are retried."""
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.02, ignored_exceptions=(
        NoSuchElementException, StaleElementReferenceException)).until(condition, message=f"timed out: {what}")


def keys(driver, *sequence, shift=False, ctrl=False):
    """Type into whatever has the focus, as a person would (modifiers held down around the keys)."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    chain = ActionChains(driver)
    held = [k for k, on in ((Keys.SHIFT, shift), (Keys.CONTROL, ctrl)) if on]
    for k in held:
        chain.key_down(k)
    for k in sequence:
        chain.send_keys(k)
    for k in held:
        chain.key_up(k)
    chain.perform()


def current_item(driver) -> str:
    return driver.find_element("id", "rank-view").get_attribute("data-item-id")


def positions(driver) -> dict[int, int]:
    """stored candidate index -> the number key it has on this annotator's screen."""
    cards = driver.find_elements("css selector", "#candidates .card")
    return {int(c.get_attribute("data-index")): int(c.get_attribute("data-pos")) + 1 for c in cards}


def rank_best_first(driver, before_enter=None) -> float:
    """The scripted annotator: candidates in stored order are best first; type their keys, Enter.
    Returns the seconds from reading the screen to the next item being on it (the answer saved)."""
    from selenium.webdriver.common.keys import Keys

    start = time.perf_counter()
    item = current_item(driver)
    keymap = positions(driver)
    keys(driver, *[str(keymap[i]) for i in range(len(keymap) - 1)])  # the last one places itself
    if before_enter:
        paused = time.perf_counter()
        before_enter(keymap)
        start += time.perf_counter() - paused
    keys(driver, Keys.ENTER)
    wait(driver, lambda d: current_item(d) != item, what=f"item after {item}")
    return time.perf_counter() - start


def login(driver, base, token):
    driver.get(base + "/")
    wait(driver, lambda d: d.current_url.endswith("/login"), what="redirect to /login")
    field = driver.find_element("id", "token")
    field.clear()
    field.send_keys(token)
    driver.find_element("id", "login-button").click()


def annotate_over_http(base, token, log):
    """Bob ranks the same items through the API (worst first), at the same time as Alice."""
    with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {token}"}, timeout=30) as client:
        item = client.get("/api/next").json()["item"]
        while item is not None:
            time.sleep(0.05)
            r = client.post("/api/rank", json={"item_id": item["id"],
                                               "tiers": [[i] for i in reversed(range(item["k"]))]})
            r.raise_for_status()
            log.append((item["id"], time.monotonic()))
            item = r.json()["item"]


def test_a_session_in_the_browser(browser, tiny_server, tiny_llama_dir, tmp_path):
    from selenium.common.exceptions import NoAlertPresentException
    from selenium.webdriver.common.keys import Keys

    db = tmp_path / "ann.sqlite"
    tokens = {n: run_cli("annotate", "add-user", n, "--db", db, check=True).stdout.strip() for n in ("alice", "bob")}
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    args = ["--db", str(db), "--port", str(port), "--per-item", "2", "--teacher", "openai:tiny",
            "--base-url", tiny_server.url, "--api-key-env", "LLAMAKIT_TEST_KEY", "--max-tokens", "16"]
    env = {"LLAMAKIT_TEST_KEY": API_KEY}
    log = tmp_path / "app.log"
    app = start_app(["--tasks", str(TASKS), *args], env=env, log_file=log)
    try:
        # a wrong token: the login page says so and nothing else opens
        login(browser, base, "not-my-token")
        wait(browser, lambda d: d.find_element("id", "login-error").is_displayed(), what="login error")
        login(browser, base, tokens["alice"])
        wait(browser, lambda d: d.find_element("tag name", "body").get_attribute("data-ready") == "1",
             what="app ready")
        assert browser.find_element("id", "who").text == "alice"
        assert "How to rank" in browser.find_element("id", "guidelines").text

        bob_log: list = []
        bob = threading.Thread(target=annotate_over_http, args=(base, tokens["bob"], bob_log))
        bob.start()

        timings = []
        ranked = []

        def screenshot(keymap):
            line = browser.find_element("id", "ranking-line").text
            assert line.split() == [str(keymap[0]), ">", str(keymap[1]), ">", str(keymap[2])]
            badges = [browser.find_element("css selector", f'.card[data-index="{i}"] .rank-badge').text
                      for i in range(3)]
            assert badges == ["1st", "2nd", "3rd"]
            if SCREENSHOT is not None:
                browser.save_screenshot(str(SCREENSHOT))

        ranked.append(current_item(browser))
        timings.append(rank_best_first(browser, before_enter=screenshot))
        for _ in range(2):
            ranked.append(current_item(browser))
            timings.append(rank_best_first(browser))
        assert ranked == ["reverse", "capital", "boil"]
        bob.join(timeout=30)
        assert [i for i, _ in bob_log] == ["reverse", "capital", "boil", "sum", "greet", "xss"]

        # the server dies (kill -9) with "sum" on Alice's screen; it comes back on the same port
        in_front = current_item(browser)
        assert in_front == "sum"
        stop_app(app.process, kill=True)
        app = start_app(args, env=env, log_file=log)
        browser.refresh()
        wait(browser, lambda d: d.find_element("tag name", "body").get_attribute("data-ready") == "1",
             what="app ready after restart")
        assert current_item(browser) == in_front  # she continues where she stopped
        assert browser.find_element("id", "rank-view").get_attribute("data-done") == "3"
        timings.append(rank_best_first(browser))

        # a two-answer item with a best/worst pick from the bottom: Shift+digit places the worst
        keymap = positions(browser)
        keys(browser, str(keymap[1]), shift=True)
        assert browser.find_element("css selector", '.card[data-index="1"] .rank-badge').text == "2nd"
        keys(browser, Keys.ENTER)
        wait(browser, lambda d: current_item(d) == "xss", what="xss item")

        # HTML in a prompt and in answers shows as text and never runs
        prompt = browser.find_element("id", "prompt").text
        assert prompt == "<script>window.__pwned = 1;</script>Explain the <b>bold</b> tag."
        texts = {c.get_attribute("data-index"): c.find_element("css selector", ".card-text").text
                 for c in browser.find_elements("css selector", "#candidates .card")}
        fixture = next(r for r in map(json.loads, TASKS.read_text().splitlines()) if r["id"] == "xss")["candidates"]
        assert texts == {str(i): t for i, t in enumerate(fixture)}
        assert browser.find_elements("css selector", "main img, main script, #prompt b, .card-text b") == []
        assert browser.execute_script("return typeof window.__pwned") == "undefined"
        with pytest.raises(NoAlertPresentException):
            browser.switch_to.alert.text  # noqa: B018 - raises when no alert is open
        timings.append(rank_best_first(browser))
        wait(browser, lambda d: d.find_element("id", "rank-done").is_displayed(), what="all done")

        # Chat: Alice plays the user against the tiny model behind `llamakit serve`
        keys(browser, "c", "n")
        wait(browser, lambda d: d.switch_to.active_element.get_attribute("id") == "composer", what="composer")
        for turn, text in enumerate(["Hello! <b>Who</b> are you?", "Tell me more about llamas."]):
            keys(browser, text, Keys.ENTER)
            wait(browser, lambda d, n=2 * (turn + 1): len(d.find_elements("css selector", "#transcript .msg")) == n
                 and d.find_element("id", "chat-status-line").text == "saved ✓", timeout=60, what="model reply")
        keys(browser, Keys.ENTER, ctrl=True)
        wait(browser, lambda d: d.find_element("id", "chat-status").text == "done", what="chat finished")
        assert browser.find_elements("css selector", "#transcript b") == []
        # ... and writes both sides herself
        keys(browser, Keys.ESCAPE, "m")
        wait(browser, lambda d: d.find_element("id", "chat-status").text == "open", what="new chat")
        keys(browser, "How do I boil an egg?", Keys.ENTER)
        wait(browser, lambda d: "assistant" in d.find_element("id", "composer-role").text, what="assistant turn")
        keys(browser, "Put it in boiling water for 8 minutes, then in cold water.", Keys.ENTER)
        wait(browser, lambda d: len(d.find_elements("css selector", "#transcript .msg")) == 2, what="2 turns")
        keys(browser, Keys.ENTER, ctrl=True)
        wait(browser, lambda d: d.find_element("id", "chat-status").text == "done", what="chat finished")
    except Exception:
        browser.save_screenshot(str(tmp_path / "failure.png"))
        status = {i: browser.find_element("id", i).text for i in ("status", "chat-status-line", "composer-role")}
        print(f"\nbrowser state at the failure: {status}; screenshot {tmp_path / 'failure.png'}\n"
              f"app log: {log.read_text()[-2000:]}")
        raise
    finally:
        stop_app(app.process)

    # what is on disk
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT a.name, r.item_id, r.tiers, r.unordered, r.seconds FROM rankings r "
                            "JOIN annotators a ON a.id = r.annotator_id WHERE r.status = 'done'").fetchall()
        chats = conn.execute("SELECT c.id, c.mode, c.status, c.model FROM chats c ORDER BY c.created_at").fetchall()
        turns = {cid: conn.execute("SELECT role, author, content FROM messages WHERE chat_id = ? ORDER BY position",
                                   (cid,)).fetchall() for cid, *_ in chats}
    answers = {(name, item): (json.loads(tiers), unordered, seconds) for name, item, tiers, unordered, seconds in rows}
    assert len(answers) == 12
    for item in ("reverse", "capital", "boil", "sum", "xss"):
        assert answers[("alice", item)][:2] == ([[0], [1], [2]], None)
        assert answers[("bob", item)][:2] == ([[2], [1], [0]], None)
    assert answers[("alice", "greet")][:2] == ([[0], [1]], None)
    assert all(seconds is not None and seconds >= 0 for _, _, seconds in answers.values())
    assert [(mode, status) for _, mode, status, _ in chats] == [("model", "done"), ("self", "done")]
    model_chat, self_chat = (turns[c[0]] for c in chats)
    assert [(r, a) for r, a, _ in model_chat] == [("user", "human"), ("assistant", "model")] * 2
    assert model_chat[0][2] == "Hello! <b>Who</b> are you?" and chats[0][3] == "openai:tiny"
    assert [(r, a) for r, a, _ in self_chat] == [("user", "human"), ("assistant", "human")]

    # export -> the formats generate-data writes
    out = tmp_path / "human-prefs.jsonl"
    stats = json.loads(run_cli("annotate", "export", "--db", db, "--out", out, "--json", check=True).stdout)
    prefs = [json.loads(line) for line in out.read_text().splitlines()]
    convs = [json.loads(line) for line in (tmp_path / "human-prefs.conversations.jsonl").read_text().splitlines()]
    assert len(prefs) == stats["preference_rows"] == 32  # 5 items x 3 pairs + 1, for each of the two people
    assert {r["meta"]["annotator"] for r in prefs} == {"alice", "bob"}
    xss = [r for r in prefs if r["meta"]["item_id"] == "xss" and r["meta"]["annotator"] == "alice"]
    assert {(r["chosen"], r["rejected"]) for r in xss} == {(fixture[0], fixture[1]), (fixture[0], fixture[2]),
                                                           (fixture[1], fixture[2])}
    assert [c["meta"]["kind"] for c in convs] == ["chat", "chat"]
    assert [m["role"] for m in convs[0]["messages"]] == ["user", "assistant", "user", "assistant"]
    assert convs[1]["messages"][1]["content"] == "Put it in boiling water for 8 minutes, then in cold water."
    from toolkit.rows import row_to_messages  # what `llamakit sft` reads the conversations with

    assert [row_to_messages(c, "conversations", i) for i, c in enumerate(convs, 1)] == [c["messages"] for c in convs]

    # agreement: people with each other and with the judged file
    report = json.loads(run_cli("annotate", "agreement", "--db", db, "--judge-file", FIXTURES / "annotate-judged.jsonl",
                                "--plot", tmp_path / "agreement.png", "--json", check=True).stdout)
    (pair,) = report["pairwise"]
    assert pair["units"] == 16 and pair["agreement"] == 0.0  # Bob ranked everything the other way round
    assert report["judge_matched"] == 3 and (tmp_path / "agreement.png").stat().st_size > 5000

    # the export trains a reward model end to end (the real `llamakit train-reward`, tiny backbone)
    rm = tmp_path / "rm"
    trained = run_cli("train-reward", "--data", out, "--out", rm, "--model",
                      tiny_llama_dir, "--epochs", "1", "--eval-split", "0.3", "--max-length", "64", "--json",
                      timeout=300)
    assert trained.returncode == 0, trained.stderr[-2000:]
    metrics = json.loads(trained.stdout.strip().splitlines()[-1])
    assert metrics["train"]["pairs"] + metrics["heldout"]["raw"]["n"] == len(prefs)
    assert (rm / "calibration.json").is_file()

    rate = 60 * len(timings) / sum(timings)
    print(f"\nannotate measured: {len(timings)} items ranked with the keyboard in {sum(timings):.2f} s "
          f"= {rate:.0f} items/minute (scripted annotator: per item {', '.join(f'{t:.3f}' for t in timings)} s); "
          f"export {stats['preference_rows']} pairs = {stats['preferences_bytes']} bytes "
          f"({stats['preferences_bytes'] / max(stats['preference_rows'], 1):.0f} B/pair), "
          f"{stats['conversation_rows']} conversations = {stats['conversations_bytes']} bytes")


def test_prompt_only_tasks_get_candidates_from_a_teacher(tiny_server, tmp_path):
    db = tmp_path / "gen.sqlite"
    args = ["--tasks", str(FIXTURES / "annotate-prompts.jsonl"), "--db", str(db), "--port", "0",
            "--teacher", "openai:tiny", "--base-url", tiny_server.url, "--api-key-env", "LLAMAKIT_TEST_KEY",
            "--num-candidates", "3", "--max-tokens", "8"]
    app = start_app(args, env={"LLAMAKIT_TEST_KEY": API_KEY}, log_file=tmp_path / "gen.log")
    try:
        assert httpx.get(f"http://127.0.0.1:{app.port}/health").json()["items"] == 2
    finally:
        stop_app(app.process)
    with sqlite3.connect(db) as conn:
        items = conn.execute("SELECT prompt, candidates, meta FROM items ORDER BY position").fetchall()
    assert [p for p, _, _ in items] == ["Name a colour of the sky.", "Translate to French.\n\nGood morning"]
    for _, candidates, meta in items:
        meta = json.loads(meta)
        assert len(json.loads(candidates)) == 3 and meta["generated_by"] == "openai:tiny"
        assert [m["model"] for m in meta["candidate_meta"]] == ["tiny"] * 3
        assert all(0 < m["completion_tokens"] <= 8 for m in meta["candidate_meta"])
    # loading the same file again (same sampling settings) does not ask the teacher: the items are there
    from toolkit.annotate.db import AnnotationDB
    from toolkit.annotate.tasks import GenerationSettings, load_tasks

    def no_teacher():
        raise AssertionError("the teacher was asked again")

    with AnnotationDB(db) as store:
        again = load_tasks(store, FIXTURES / "annotate-prompts.jsonl", no_teacher,
                           GenerationSettings(num_candidates=3, max_tokens=8))
    assert again == {"rows": 2, "added": 0, "generated": 0, "items": 2}
