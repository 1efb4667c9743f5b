"""The annotation app, driven like people drive it: a real server process (`rlhf feedback serve` on
127.0.0.1) and headless Chromium (Debian's `chromium` + playwright).

Keyboard-only labelling, SIGKILL and restart mid-batch without losing a label, two annotators in
parallel never on the same item, an XSS payload in a model output shown as text, writes without a
token or CSRF token refused, oversized bodies refused, the admin page's agreement.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from conftest import ROOT
from feedback_helpers import XSS, make_batch

from rlhf.data import demo
from rlhf.feedback.simulate import free_port
from rlhf.feedback.store import Store

REQUIRE = os.environ.get("RLHF_REQUIRE_BROWSER") == "1"  # set by .ci/run where chromium could be installed
try:
    import playwright.sync_api as playwright_api
except ImportError:
    if REQUIRE:
        raise
    pytest.skip("pip install playwright (the dev extra; see .ci/run)", allow_module_level=True)
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
if CHROMIUM is None:
    if REQUIRE:
        raise RuntimeError("RLHF_REQUIRE_BROWSER=1 but no chromium binary on PATH")
    pytest.skip("no chromium binary (apt-get install -y chromium; see .ci/chromium.sh)", allow_module_level=True)

class Server:
    """`rlhf feedback serve` as a real process on a free loopback port."""

    def __init__(self, cwd: Path, store: Path, batches: list[Path], overlap: int = 1):
        self.cwd, self.store, self.batches, self.overlap = cwd, store, batches, overlap
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> Server:
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen([sys.executable, "-m", "rlhf.cli", "feedback", "serve",
                                      *map(str, self.batches), "--store", str(self.store), "--port", str(self.port),
                                      "--overlap", str(self.overlap)], cwd=self.cwd, env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{self.url}/healthz", timeout=2).read()
                return self
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"server did not start: {self.proc.stdout.read()}") from None
                time.sleep(0.1)

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)


@pytest.fixture
def workdir(tmp_path):
    return tmp_path


@pytest.fixture
def servers():
    started: list[Server] = []

    def start(*args, **kw) -> Server:
        s = Server(*args, **kw).start()
        started.append(s)
        return s
    yield start
    for s in started:
        s.kill()


@pytest.fixture(scope="module")
def browser():
    with playwright_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        yield b
        b.close()


def sign_in_with_keyboard(page, url: str, token: str) -> None:
    page.goto(url + "/")
    # the token field has autofocus; a loaded machine may apply it after the load event: wait for it, so no
    # keystroke is typed into nothing (the test still fails if autofocus is gone)
    page.wait_for_function("document.activeElement && document.activeElement.name === 'token'", timeout=15000)
    page.keyboard.type(token)
    with page.expect_navigation():
        page.keyboard.press("Enter")


def press(page, key: str) -> None:
    with page.expect_navigation():
        page.keyboard.press(key)


def current_item(page) -> tuple[str, str]:
    parts = urllib.parse.urlparse(page.url).path.split("/")
    return parts[2], parts[3]


def test_keyboard_only_labelling_survives_sigkill_and_can_go_back(workdir, servers, browser):
    batch = make_batch(workdir / "batches", 6)
    store_path = workdir / "labels.db"
    token = Store(store_path).add_annotator("alice")
    server = servers(workdir, store_path, [batch.path])
    page = browser.new_page()
    sign_in_with_keyboard(page, server.url, token)
    assert "item 1 of 6" in page.inner_text("#progress")
    assert "1" in page.inner_text(".choices") and "Space" in page.inner_text(".choices")  # keys shown
    shot = os.environ.get("RLHF_FEEDBACK_SCREENSHOT")
    if shot:
        page.set_viewport_size({"width": 1200, "height": 720})
        page.screenshot(path=shot, full_page=True)
    pressed = {}
    for key in ("1", "2", "3"):
        pressed[current_item(page)] = key
        press(page, key)

    server.kill()  # SIGKILL mid-batch: every acknowledged label must be in the database
    db = Store(store_path)
    got = {(r["batch_id"], r["item_id"]): r["choice"] for r in db.labels()}
    keymap = {"1": "left", "2": "right", "3": "tie", "4": "both_bad", " ": "skip"}
    assert got == {k: keymap[v] for k, v in pressed.items()}

    server = servers(workdir, store_path, [batch.path])  # restarted: same store, same batch
    page.goto(server.url + "/label")  # the cookie still signs alice in
    assert "item 4 of 6" in page.inner_text("#progress")
    for key in ("4", " "):
        pressed[current_item(page)] = key
        press(page, key)
    last = current_item(page)
    press(page, "Backspace")  # back to the previous item (the skipped one)
    previous = current_item(page)
    assert previous != last and pressed[previous] == " "
    assert page.get_attribute('button[value="skip"]', "class") == "current"  # its current answer is shown
    page.click("textarea")
    page.keyboard.type("B misses the point")
    page.keyboard.press("Tab")  # leave the text box, then answer with the key
    pressed[previous] = "1"
    press(page, "1")
    assert current_item(page) == last
    pressed[last] = "2"
    press(page, "2")
    assert page.inner_text("#done") == "All done"

    rows = {(r["batch_id"], r["item_id"]): r for r in Store(store_path).labels()}
    assert {k: r["choice"] for k, r in rows.items()} == {k: keymap[v] for k, v in pressed.items()}
    assert rows[previous]["reason"] == "B misses the point" and rows[previous]["revisions"] == 1
    for r in rows.values():  # the winner in batch terms follows the recorded order
        if r["choice"] == "left":
            assert r["winner"] == ("b" if r["flipped"] else "a")


def test_two_annotators_in_parallel_never_get_the_same_item(workdir, servers, browser):
    batch = make_batch(workdir / "batches", 8, seed=3)
    store_path = workdir / "labels.db"
    st = Store(store_path)
    tokens = {n: st.add_annotator(n) for n in ("ann", "bob")}
    server = servers(workdir, store_path, [batch.path])
    pages = {}
    for name, token in tokens.items():
        pages[name] = browser.new_context().new_page()
        sign_in_with_keyboard(pages[name], server.url, token)
    seen = {n: [] for n in tokens}
    active = set(tokens)
    while active:  # interleaved: each has an item open while the other answers
        for name in sorted(active):
            p = pages[name]
            if p.query_selector("#done"):
                active.discard(name)
                continue
            seen[name].append(current_item(p))
            press(p, "1")
    assert set(seen["ann"]).isdisjoint(seen["bob"])
    assert len(seen["ann"]) + len(seen["bob"]) == 8 and seen["ann"] and seen["bob"]
    assert len(Store(store_path).labels()) == 8


def test_many_annotators_at_once_over_http_get_distinct_items(workdir, servers):
    from rlhf.feedback.simulate import simulate

    batch = make_batch(workdir / "batches", 30, seed=4)
    store_path = workdir / "labels.db"
    st = Store(store_path)
    tokens = {n: st.add_annotator(n) for n in demo.ANNOTATORS}
    server = servers(workdir, store_path, [batch.path])
    counts = simulate(server.url, tokens)
    assert sum(counts.values()) == 30
    per_item = {}
    for r in Store(store_path).labels():
        per_item.setdefault(r["item_id"], []).append(r["annotator"])
    assert len(per_item) == 30 and all(len(v) == 1 for v in per_item.values())


def test_model_output_with_html_is_shown_as_text_and_runs_nothing(workdir, servers, browser):
    batch = make_batch(workdir / "batches", 1, xss_item=0)
    store_path = workdir / "labels.db"
    token = Store(store_path).add_annotator("eve")
    server = servers(workdir, store_path, [batch.path])
    page = browser.new_page()
    errors = []
    page.on("pageerror", lambda e: errors.append(e))
    sign_in_with_keyboard(page, server.url, token)
    shown = page.inner_text("#response-a") + page.inner_text("#response-b")
    assert XSS in shown  # the payload, literally
    assert page.evaluate("typeof window.__xss") == "undefined"
    assert page.query_selector_all(".resp img") == [] and len(page.query_selector_all("script")) == 1
    press(page, "1")  # the page's own keyboard script still works
    assert errors == []
    assert page.query_selector("#done")


def _post(url: str, data: dict, headers: dict | None = None) -> int:
    req = urllib.request.Request(url, data=urllib.parse.urlencode(data).encode(), headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def test_writes_need_a_token_and_a_csrf_token_and_bodies_are_bounded(workdir, servers, browser):
    batch = make_batch(workdir / "batches", 2)
    store_path = workdir / "labels.db"
    st = Store(store_path)
    token = st.add_annotator("mallory")
    server = servers(workdir, store_path, [batch.path])
    bearer = {"Authorization": f"Bearer {token}", "Accept": "application/json"}
    item = json.loads(urllib.request.urlopen(urllib.request.Request(f"{server.url}/api/next", headers=bearer)).read())
    target = f"{server.url}/label/{item['batch_id']}/{item['item_id']}"
    good = {"choice": "left", "csrf": item["csrf"], "shown_at": "0"}
    assert _post(target, good) == 401                                             # no token
    assert _post(target, good, {"Authorization": "Bearer not-a-token"}) == 401    # unknown token
    assert _post(target, {**good, "csrf": ""}, bearer) == 403                     # no CSRF token
    assert _post(target, {**good, "csrf": "0" * 64}, bearer) == 403               # wrong CSRF token
    assert _post(target, {**good, "reason": "x" * 100_000}, bearer) == 413        # too large
    assert Store(store_path).labels() == []
    assert _post(target, good, bearer) == 200
    assert len(Store(store_path).labels()) == 1
    # a signed-in browser whose form lacks the CSRF token is refused too
    page = browser.new_page()
    sign_in_with_keyboard(page, server.url, token)
    page.evaluate("document.querySelector('input[name=csrf]').value = 'forged'")
    page.keyboard.press("2")
    page.wait_for_load_state()
    assert "CSRF" in page.inner_text("body")
    assert len(Store(store_path).labels()) == 1
    # the admin page needs an admin token
    assert urllib.request.urlopen(urllib.request.Request(f"{server.url}/healthz")).status == 200
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(urllib.request.Request(f"{server.url}/admin", headers=bearer))
    assert e.value.code == 403


def test_admin_page_shows_progress_and_agreement_with_overlap(workdir, servers):
    from rlhf.feedback.simulate import simulate

    batch = make_batch(workdir / "batches", 10, seed=5)
    store_path = workdir / "labels.db"
    st = Store(store_path)
    tokens = {n: st.add_annotator(n) for n in ("sim-01", "sim-02", "sim-03")}
    admin = st.add_annotator("lead", admin=True)
    server = servers(workdir, store_path, [batch.path], overlap=2)
    assert sum(simulate(server.url, tokens).values()) == 20
    per_item = {}
    for r in Store(store_path).labels():
        per_item.setdefault(r["item_id"], set()).add(r["annotator"])
    assert all(len(v) == 2 for v in per_item.values())  # k = 2 distinct annotators per item
    html = urllib.request.urlopen(urllib.request.Request(f"{server.url}/admin", headers={
        "Authorization": f"Bearer {admin}"})).read().decode()
    assert "labels: 20 of 20" in html and "Cohen's kappa" in html and "10 items, 10 annotator pairs" in html
