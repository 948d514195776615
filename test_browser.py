"""Real-browser tests: alive.js and the live endpoint, driven by Debian's chromium through Playwright.

Run by `make test` as its own pytest invocation (sync Playwright and asyncio do not share a
process): `.venv/bin/python -m pytest -q test_browser.py -p no:cacheprovider`. Each test copies an
example app into tmp_path (its runtime data under .asok/ stays out of the repository) and serves it
with `python asok.py serve` in a subprocess with DEBUG=true. Without chromium or playwright the tier
skips, saying how to install them; with CI=true it fails instead.
"""
import gzip
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

import pytest

HERE = Path(__file__).resolve().parent
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
ARTIFACTS = HERE / "test-artifacts"
TIMEOUT_MS = 10_000

# every page records the codes of the live errors it is told about
RECORD_ERRORS = ("window.asokErrors = [];"
                 "document.addEventListener('asok:error', e => asokErrors.push(e.detail.code));")
TWO_COUNTERS = """{% extends "html/base.html" %}
{% block main %}
{{ component('Counter', count=1) }}
{{ component('Counter', count=100) }}
{% endblock %}
"""


def _missing():
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed: run `make deps`"
    if not os.access(CHROMIUM, os.X_OK):
        return f"{CHROMIUM} is missing: run `apt-get install chromium` (or `make browser`)"
    return None


# ── the server under test ────────────────────────────────────────────

def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """`python asok.py serve APP_DIR` in a subprocess, stopped and started again on the same port."""

    def __init__(self, app_dir, env=None):
        self.app_dir = app_dir
        self.env = env or {}
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(app_dir.parent / f"{app_dir.name}-{self.port}-server.log", "ab")
        self.proc = None

    def start(self):
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE / "asok.py"), "serve", str(self.app_dir), "--port", str(self.port)],
            env=dict(os.environ, DEBUG="true", **self.env), stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return self
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the server did not start; see {self.log.name}")
                time.sleep(0.05)

    def stop(self, sig=signal.SIGTERM):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def serve(tmp_path):
    """serve("counter", {"src/pages/two.html": "..."}) copies the example, adds the files, serves it;
    serve(same_as=server) starts a second process serving the same folder."""
    servers = []

    def start(example=None, files=None, env=None, folder=None, same_as=None):
        if same_as is not None:
            app_dir = same_as.app_dir
        else:
            app_dir = tmp_path / (folder or example)
            shutil.copytree(HERE / "examples" / example, app_dir, ignore=shutil.ignore_patterns(".asok"))
        for name, text in (files or {}).items():
            (app_dir / name).parent.mkdir(parents=True, exist_ok=True)
            (app_dir / name).write_text(text)
        servers.append(Server(app_dir, env))
        return servers[-1].start()

    try:
        yield start
    finally:
        for server in servers:
            server.stop()
            server.log.close()


# ── the browser ──────────────────────────────────────────────────────

@pytest.fixture(scope="session")
def browser():
    missing = _missing()
    if missing:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"browser tests cannot run under CI=true: {missing}")
        pytest.skip(missing)
    from playwright.sync_api import sync_playwright
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def context(browser):
    context = browser.new_context()
    context.set_default_timeout(TIMEOUT_MS)
    context.add_init_script(RECORD_ERRORS)
    try:
        yield context
    finally:
        context.close()


@pytest.fixture
def page(context):
    return context.new_page()


def expect(locator):
    from playwright.sync_api import expect
    return expect(locator)


def counts(page):
    """The counts shown by the page's counters, in page order."""
    return [int(text.removeprefix("Count: ")) for text in page.locator("h3").all_inner_texts()]


def expect_count(page, count, index=0):
    expect(page.locator("h3").nth(index)).to_have_text(f"Count: {count}", timeout=TIMEOUT_MS)


def expect_error(page, code):
    page.wait_for_function("code => asokErrors.includes(code)", arg=code, timeout=TIMEOUT_MS)


def burst(page, selector, times):
    """Click `selector` `times` times within one task: all of them before any reply can arrive."""
    page.evaluate("([selector, times]) => { for (let i = 0; i < times; i++) "
                  "document.querySelector(selector).click(); }", [selector, times])


def expect_connected(page, connected):
    html = expect(page.locator("html"))
    if connected:
        html.not_to_have_class("asok-disconnected", timeout=TIMEOUT_MS)
    else:
        html.to_have_class("asok-disconnected", timeout=TIMEOUT_MS)


INCREMENT = "[ws-click=increment]"


# ── counter: clicks, reloads, restarts ───────────────────────────────

def test_a_click_increments(serve, page):
    server = serve("counter")
    page.goto(server.url)
    expect_count(page, 10)
    page.click(INCREMENT)
    expect_count(page, 11)
    page.click("[ws-click=decrement]")
    expect_count(page, 10)
    expect(page.locator("p")).to_have_text("\"Add 1\" clicks this session: 1")


def test_thirty_clicks_faster_than_the_round_trip_add_thirty(serve, page):
    server = serve("counter")
    page.goto(server.url)
    expect_count(page, 10)
    burst(page, INCREMENT, 30)
    expect_count(page, 40)
    expect(page.locator("p")).to_have_text("\"Add 1\" clicks this session: 30")
    page.reload()
    expect_count(page, 40)
    assert page.evaluate("asokErrors") == []


def test_reload_and_restart_keep_the_count_and_the_page_stays_live(serve, page):
    server = serve("counter")
    page.goto(server.url)
    burst(page, INCREMENT, 3)
    expect_count(page, 13)
    page.reload()
    expect_count(page, 13)
    server.stop()
    expect_connected(page, False)
    server.start()
    expect_connected(page, True)
    page.click(INCREMENT)
    expect_count(page, 14)
    page.reload()
    expect_count(page, 14)


def test_kill_9_right_after_an_acknowledged_click_loses_nothing(serve, page):
    server = serve("counter")
    page.goto(server.url)
    page.click(INCREMENT)
    expect_count(page, 11)  # the reply is in: the click is acknowledged
    server.stop(signal.SIGKILL)
    server.start()
    page.reload()
    expect_count(page, 11)
    expect(page.locator("p")).to_have_text("\"Add 1\" clicks this session: 1")


def test_a_socket_dropped_by_the_server_reconnects_and_sends_what_was_made_meanwhile(serve, page):
    server = serve("counter")
    page.goto(server.url)
    page.click(INCREMENT)
    expect_count(page, 11)
    server.stop()  # the server closes the socket (1001, going away)
    expect_connected(page, False)
    page.click(INCREMENT)  # made while disconnected
    expect(page.locator("[data-asok-component]")).to_have_class("asok-loading")
    server.start()
    expect_connected(page, True)
    expect_count(page, 12)
    expect(page.locator("[data-asok-component]")).not_to_have_class("asok-loading")
    page.click(INCREMENT)
    expect_count(page, 13)
    page.reload()
    expect_count(page, 13)


def test_two_tabs_clicking_alternately_end_at_the_sum(serve, context):
    server = serve("counter")
    tabs = [context.new_page(), context.new_page()]
    for tab in tabs:
        tab.goto(server.url)
        expect_count(tab, 10)
    for _ in range(8):
        for tab in tabs:
            tab.click(INCREMENT)
    for tab in tabs:
        expect(tab.locator("[data-asok-component]")).not_to_have_class("asok-loading")
    assert max(counts(tabs[0]) + counts(tabs[1])) == 26
    for tab in tabs:
        tab.reload()
        expect_count(tab, 26)


def test_a_click_in_one_tab_shows_in_the_other_without_a_click_there(serve, context):
    server = serve("counter")
    watching, clicking = context.new_page(), context.new_page()
    for tab in (watching, clicking):
        tab.goto(server.url)
        expect_count(tab, 10)
        expect_connected(tab, True)
    clicking.click(INCREMENT)
    expect_count(clicking, 11)
    expect_count(watching, 11)
    expect(watching.locator("p")).to_have_text("\"Add 1\" clicks this session: 1")
    burst(watching, INCREMENT, 5)
    expect_count(clicking, 16)
    expect_count(watching, 16)
    assert watching.evaluate("asokErrors") == [] and clicking.evaluate("asokErrors") == []


def test_each_component_has_its_own_queue(serve, page):
    server = serve("counter", {"src/pages/two.html": TWO_COUNTERS})
    page.goto(server.url + "/two")
    assert counts(page) == [1, 100]
    first, second = (f"[data-asok-component]:nth-of-type({n}) {INCREMENT}" for n in (1, 2))
    in_flight = page.evaluate("([first, second]) => { for (let i = 0; i < 10; i++) {"
                              "document.querySelector(first).click(); document.querySelector(second).click(); }"
                              "return document.querySelectorAll('.asok-loading').length; }", [first, second])
    assert in_flight == 2  # one event in flight per component, not one per page
    expect_count(page, 11, 0)
    expect_count(page, 110, 1)
    page.reload()
    assert counts(page) == [11, 110]


# ── under a WSGI server, which cannot carry the live socket ──────────

WSGI_SERVE = ("import sys, wsgiref.simple_server, asok; app = asok.load_app(sys.argv[1]); "
              "wsgiref.simple_server.make_server('127.0.0.1', int(sys.argv[2]), app).serve_forever()")


def test_under_wsgi_the_page_says_once_in_the_console_that_the_live_socket_is_refused(tmp_path, page):
    app_dir = tmp_path / "counter"
    shutil.copytree(HERE / "examples" / "counter", app_dir, ignore=shutil.ignore_patterns(".asok"))
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-c", WSGI_SERVE, str(app_dir), str(port)], cwd=HERE,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, "the WSGI server did not start"
                time.sleep(0.05)
        said, tries = [], []
        page.on("console", lambda m: m.type == "error" and m.text.startswith("asok:") and said.append(m.text))
        page.on("websocket", lambda ws: tries.append(ws.url))
        page.goto(f"http://127.0.0.1:{port}/")
        expect_count(page, 10)  # the page itself renders under WSGI
        expect_connected(page, False)
        deadline = time.monotonic() + 20
        while len(tries) < 3:  # alive.js keeps trying, backing off
            assert time.monotonic() < deadline, f"only {len(tries)} attempts"
            page.wait_for_timeout(100)
        assert said == ["asok: no live socket (WSGI? no websockets?)"]  # said once, not at every try
    finally:
        proc.kill()
        proc.wait()


# ── replies that carry only what changed ─────────────────────────────

ROWS_APP = {
    "src/components/Rows.py": """from asok import Component, exposed


class Rows(Component):
    rows = [{"id": i, "name": f"row {i}", "n": 0} for i in range(30)]
    made = 0

    @exposed
    def bump(self, i: int):
        self.rows[i]["n"] += 1

    @exposed
    def insert(self, at: int):
        self.made += 1
        self.rows.insert(at, {"id": 100 + self.made, "name": f"new {self.made} ✓", "n": 0})

    @exposed
    def remove(self, at: int):
        del self.rows[at]

    @exposed
    def reverse(self):
        self.rows.reverse()
""",
    "src/components/rows.html": """<div>
<button ws-click="bump(2)">bump</button><button ws-click="insert(1)">insert</button>
<button ws-click="remove(0)">remove</button><button ws-click="reverse">reverse</button>
<ul><% for r in rows %><li id="r{{ r.id }}"><b>{{ r.name }}</b> <i>{{ r.n }}</i></li><% endfor %></ul>
<% if made > 1 %>{{ component('Counter', count=made) }}<% endif %>
</div>
""",
    "src/pages/rows.html": """{% extends "html/base.html" %}
{% block main %}
{{ component('Rows') }}
{% endblock %}
""",
}

# the component as alive.js left it, against the same component parsed from the whole page the
# server renders now: equal, ignoring the signed tokens (their issue time differs) and classes
SAME_AS_RENDERED = """async () => {
  const doc = new DOMParser().parseFromString(await (await fetch(location.href)).text(), "text/html");
  const bare = root => {
    const copy = root.cloneNode(true);
    for (const el of [copy, ...copy.querySelectorAll("[data-asok-component]")])
      el.removeAttribute("data-asok-state"), el.removeAttribute("class");
    return copy;
  };
  return bare(document.querySelector("[data-asok-component=Rows]")).isEqualNode(bare(doc.querySelector("[data-asok-component=Rows]")));
}"""


def test_a_diff_applied_by_alive_js_gives_the_dom_of_the_whole_html(serve, page):
    server = serve("counter", ROWS_APP)
    frames = []
    page.on("websocket", lambda ws: ws.on("framereceived", lambda frame: frames.append(frame)))
    page.goto(server.url + "/rows")
    expect_connected(page, True)
    steps = [("bump", "#r2 i", "1"), ("bump", "#r2 i", "2"), ("insert", "#r101 b", "new 1 ✓"),
             ("insert", "#r102 b", "new 2 ✓"), ("remove", "ul li:first-child b", "new 2 ✓"),
             ("reverse", "ul li:first-child b", "row 29"), ("bump", "ul li:nth-child(3) i", "1")]
    for n, (button, selector, text) in enumerate(steps, 1):
        page.click(f"[data-asok-component=Rows] > div > button:text-is('{button}')")
        expect(page.locator(selector).first).to_have_text(text)
        page.wait_for_function("n => document.querySelectorAll('.asok-loading').length == 0", arg=n)
        assert page.evaluate(SAME_AS_RENDERED), (button, n)
    # the nested counter (rendered once two rows were made) keeps its own events and diffs
    for count in (3, 4):
        page.click(f"[data-asok-component=Counter] {INCREMENT}")
        expect_count(page, count)
        assert page.evaluate(SAME_AS_RENDERED)
    page.click("[data-asok-component=Rows] > div > button:text-is('insert')")
    expect(page.locator("ul li:nth-child(2) b")).to_have_text("new 3 ✓")
    expect_count(page, 4)  # the parent's re-render shows the child's saved count
    assert page.evaluate(SAME_AS_RENDERED)
    replies = [json.loads(f) for f in frames if '"id"' in f]
    diffs = [r for r in replies if "d" in r]
    assert len(diffs) >= 7 and all("html" not in r for r in diffs)  # all but each component's first reply
    whole = next(f for f in frames if '"html"' in f and "row 29" in f)  # the list's first reply
    assert len(json.dumps(diffs[0])) * 4 < len(whole)  # a bumped row: the change, not the list
    assert page.evaluate("asokErrors") == []


# ── live updates: every view in sync, chat, timers, catch-up, processes ──

def new_context(browser):
    context = browser.new_context()
    context.set_default_timeout(TIMEOUT_MS)
    context.add_init_script(RECORD_ERRORS)
    return context


def live_stats(server):
    with urllib.request.urlopen(server.url + "/live-stats", timeout=10) as response:
        return json.loads(response.read())


STATS_APP = """from asok import Asok

app = Asok(__file__)


@app.route("/live-stats")
def live_stats():
    return app.live.stats()
"""


def cuttable(page):
    """Route the page's live socket through Playwright: cut() closes it and refuses reconnects
    until mend()."""
    state = {"cut": False, "open": []}

    def handler(ws):
        if state["cut"]:
            ws.close()
            return
        ws.connect_to_server()
        state["open"].append(ws)

    page.route_web_socket("**/asok/live", handler)

    def cut():
        state["cut"] = True
        for ws in state["open"]:
            ws.close()
        state["open"].clear()

    return cut, lambda: state.update(cut=False)


def chat_open(page, server, name):
    page.goto(server.url)
    expect_connected(page, True)
    page.fill(".name", name)


def chat_say(page, text):
    page.locator(".draft").click()
    page.keyboard.type(text)
    page.keyboard.press("Enter")
    expect(page.locator(".draft")).to_have_value("")  # sent: the server cleared it (as a user waits to see)


def test_chat_two_users_see_each_other_at_once_while_typing_keeps_text_focus_and_caret(serve, browser):
    server = serve("chat")
    ann_context, bob_context = new_context(browser), new_context(browser)
    try:
        ann, bob = ann_context.new_page(), bob_context.new_page()
        for page in (ann, bob):
            page.set_viewport_size({"width": 800, "height": 640})
        chat_open(ann, server, "Ann")
        chat_open(bob, server, "Bob")
        bob.locator(".draft").click()
        bob.keyboard.type("half a thought")
        for _ in range(8):
            bob.keyboard.press("ArrowLeft")  # the caret after "half a"
        chat_say(ann, "hello Bob")
        expect(bob.locator(".log li").first).to_contain_text("Ann hello Bob")
        typing = bob.evaluate("() => { const el = document.activeElement;"
                              "return [el.className, el.value, el.selectionStart, el.selectionEnd]; }")
        assert typing == ["draft", "half a thought", 6, 6]  # Bob did nothing, and lost nothing
        bob.keyboard.type(" finished")
        bob.keyboard.press("Enter")
        expect(ann.locator(".log li b")).to_have_text(["Bob", "Ann"])  # the newest first in the list
        expect(ann.locator(".log li").first).to_contain_text("half a finished thought")
        bob.locator(".draft").click()
        bob.keyboard.type("still typing")
        for n in range(25):  # more than fits: the list stays scrolled to the newest
            chat_say(ann, f"line {n}")
        expect(bob.locator(".log li").first).to_contain_text("line 24")
        expect(bob.locator(".draft")).to_be_focused()
        expect(bob.locator(".draft")).to_have_value("still typing")
        expect(bob.locator(".log li").first).to_be_in_viewport()
        expect(bob.locator(".log li").last).not_to_be_in_viewport()
        ARTIFACTS.mkdir(exist_ok=True)
        bob.screenshot(path=str(ARTIFACTS / "chat.png"))
        assert ann.evaluate("asokErrors") == [] and bob.evaluate("asokErrors") == []
    finally:
        ann_context.close()
        bob_context.close()


def test_chat_across_two_nodes_on_redis(redis_nodes, browser):
    node_a, node_b = redis_nodes("chat")
    ann_context, bob_context = new_context(browser), new_context(browser)
    try:
        ann, bob = ann_context.new_page(), bob_context.new_page()
        chat_open(ann, node_a, "Ann")
        chat_open(bob, node_b, "Bob")
        bob.locator(".draft").click()
        bob.keyboard.type("typing on B")
        chat_say(ann, "hello from A")
        expect(bob.locator(".log li").first).to_contain_text("Ann hello from A")  # carried by Redis
        expect(bob.locator(".draft")).to_be_focused()
        expect(bob.locator(".draft")).to_have_value("typing on B")
        bob.keyboard.press("Enter")
        expect(ann.locator(".log li").first).to_contain_text("Bob typing on B")
        assert ann.evaluate("asokErrors") == [] and bob.evaluate("asokErrors") == []
    finally:
        ann_context.close()
        bob_context.close()


def test_a_timer_updates_the_page_on_its_own_and_stops_when_the_tab_closes(serve, context):
    server = serve("clock", {"app.py": STATS_APP})
    page = context.new_page()
    assert '<dd class="ticks">0</dd>' in page.goto(server.url).text()  # as rendered (a tick may come at once)
    expect(page.locator(".ticks")).to_have_text(re.compile(r"^([2-9]|\d\d+)$"))  # two ticks pushed, no click
    assert live_stats(server) == {"views": 1, "timers": 1}
    page.close()
    for _ in range(200):  # the server's own account: no view left, no timer running
        if live_stats(server)["timers"] == 0:
            break
        time.sleep(0.05)
    assert live_stats(server) == {"views": 0, "timers": 0}


def test_a_tab_whose_socket_was_cut_shows_the_latest_state_when_it_is_back(serve, context):
    server = serve("counter")
    away, other = context.new_page(), context.new_page()
    cut, mend = cuttable(away)
    for tab in (away, other):
        tab.goto(server.url)
        expect_connected(tab, True)
    cut()
    expect_connected(away, False)
    burst(other, INCREMENT, 3)
    expect_count(other, 13)
    assert counts(away) == [10]  # nothing reached it while cut
    mend()
    expect_connected(away, True)
    expect_count(away, 13)  # the join brought the saved state


def test_a_tab_whose_socket_was_cut_shows_a_message_published_meanwhile(serve, browser):
    server = serve("chat")
    ann_context, bob_context = new_context(browser), new_context(browser)
    try:
        away, here, bob = ann_context.new_page(), ann_context.new_page(), bob_context.new_page()
        cut, mend = cuttable(away)
        chat_open(away, server, "Ann")
        here.goto(server.url)
        chat_open(bob, server, "Bob")
        cut()
        expect_connected(away, False)
        chat_say(bob, "while you were away")
        expect(here.locator(".log li").first).to_contain_text("while you were away")
        expect(away.locator(".log li").first).to_have_text("No messages yet in #lobby.")
        mend()
        expect(away.locator(".log li").first).to_contain_text("while you were away")
    finally:
        ann_context.close()
        bob_context.close()


def test_a_tab_shows_what_changed_while_its_server_was_down(serve, context):
    server = serve("counter")
    tab = context.new_page()
    tab.goto(server.url)
    expect_connected(tab, True)
    server.stop()
    expect_connected(tab, False)
    elsewhere = serve(same_as=server)  # another process on the folder takes a click meanwhile
    other = context.new_page()
    other.goto(elsewhere.url)
    other.click(INCREMENT)
    expect_count(other, 11)
    server.start()
    expect_connected(tab, True)
    expect_count(tab, 11)


def test_two_processes_on_one_folder_show_each_others_changes(serve, context):
    one = serve("counter")
    two = serve(same_as=one)
    tab_one, tab_two = context.new_page(), context.new_page()
    tab_one.goto(one.url)
    tab_two.goto(two.url)
    for tab in (tab_one, tab_two):
        expect_connected(tab, True)
    tab_one.click(INCREMENT)
    expect_count(tab_two, 11)
    burst(tab_two, INCREMENT, 4)
    expect_count(tab_one, 15)
    expect_count(tab_two, 15)


def test_one_publish_is_applied_once_for_three_tabs_on_two_processes(serve, browser):
    one = serve("chat")
    two = serve(same_as=one)
    ann_context, bob_context = new_context(browser), new_context(browser)
    try:
        tabs = [ann_context.new_page() for _ in range(3)]
        for tab, server in zip(tabs, (one, one, two)):
            tab.goto(server.url)
            expect_connected(tab, True)
        bob = bob_context.new_page()
        chat_open(bob, one, "Bob")
        chat_say(bob, "once")
        chat_say(bob, "and then")
        for tab in tabs:
            expect(tab.locator(".log li").first).to_contain_text("and then")
            expect(tab.locator(".log li", has_text="once")).to_have_count(1)
        tabs[2].reload()
        expect(tabs[2].locator(".log li b")).to_have_text(["Bob", "Bob"])  # as saved: each message once
    finally:
        ann_context.close()
        bob_context.close()


# ── two nodes on one Redis ───────────────────────────────────────────

@pytest.fixture
def redis_nodes(serve):
    """redis_nodes("counter") serves the example twice, from two folders, on one Redis
    (its store and broker) with one SECRET_KEY: two machines, as far as asok can tell."""
    pytest.importorskip("redis")
    from test_asok import REDIS_APP_PY, redis_server_process
    with redis_server_process() as (port, _):
        env = {"REDIS_PORT": str(port), "SECRET_KEY": "n" * 40}
        yield lambda example: [serve(example, {"app.py": REDIS_APP_PY}, env, f"{example}-{name}") for name in "AB"]


def test_two_nodes_on_redis_a_click_on_one_shows_on_the_other_and_one_dies(redis_nodes, context):
    node_a, node_b = redis_nodes("counter")
    on_a, on_b = context.new_page(), context.new_page()  # cookies are per host, so both share a session
    for tab, node in ((on_a, node_a), (on_b, node_b)):
        tab.goto(node.url)
        expect_count(tab, 10)
        expect_connected(tab, True)
    on_a.click(INCREMENT)
    expect_count(on_a, 11)
    expect_count(on_b, 11)  # pushed through Redis; no click on B
    burst(on_b, INCREMENT, 4)
    expect_count(on_b, 15)
    expect_count(on_a, 15)
    node_a.stop(signal.SIGKILL)
    expect_connected(on_a, False)
    on_b.click(INCREMENT)
    expect_count(on_b, 16)
    on_b.reload()
    expect_count(on_b, 16)
    assert on_b.evaluate("asokErrors") == []


# ── refusals ─────────────────────────────────────────────────────────

TAMPER = """() => {
    const root = document.querySelector("[data-asok-component]"), token = root.dataset.asokState;
    const cut = token.lastIndexOf("."), payload = JSON.parse(token.slice(0, cut));
    payload.s.count = 1000;
    root.dataset.asokState = JSON.stringify(payload) + token.slice(cut);
}"""
TAKE_THE_SECOND = """() => {
    const [first, second] = document.querySelectorAll("[data-asok-component]");
    first.dataset.asokState = second.dataset.asokState;
}"""


def console_errors(page):
    errors = []
    page.on("console", lambda message: message.type == "error" and errors.append(message.text))
    return errors


def test_a_tampered_state_reloads_the_page_once_then_is_refused_and_changes_nothing(serve, page):
    server = serve("counter")
    errors = console_errors(page)
    page.goto(server.url)
    page.evaluate(TAMPER)
    with page.expect_navigation():  # bad_state: a reload gets a good state
        page.click(INCREMENT)
    expect_count(page, 10)
    page.evaluate(TAMPER)
    page.click(INCREMENT)  # the same again: no second reload, so no loop
    expect_error(page, "bad_state")
    assert any(text.startswith("asok: bad_state ") for text in errors)
    assert counts(page) == [10]
    page.reload()
    expect_count(page, 10)


def test_a_state_taken_from_another_component_is_refused_and_changes_nothing(serve, page):
    server = serve("counter", {"src/pages/two.html": TWO_COUNTERS})
    page.goto(server.url + "/two")
    page.evaluate(TAKE_THE_SECOND)
    with page.expect_navigation():
        page.locator(INCREMENT).first.click()
    assert counts(page) == [1, 100]
    page.evaluate(TAKE_THE_SECOND)
    page.locator(INCREMENT).first.click()
    expect_error(page, "bad_state")
    assert counts(page) == [1, 100]
    page.reload()
    assert counts(page) == [1, 100]


def test_after_the_server_key_changes_the_page_reloads_itself_once_and_works(serve, page):
    server = serve("counter", env={"SECRET_KEY": "the first key " * 3})
    page.goto(server.url)
    page.click(INCREMENT)
    expect_count(page, 11)
    server.stop()
    server.env["SECRET_KEY"] = "the second key " * 3  # a redeploy with a new key: the cookie is void
    server.start()
    expect_connected(page, True)
    page.evaluate("window.before = true")
    with page.expect_navigation():  # no_session
        page.click(INCREMENT)
    expect_count(page, 10)  # a new session
    assert page.evaluate("window.before") is None
    page.click(INCREMENT)
    expect_count(page, 11)
    page.click(INCREMENT)
    expect_count(page, 12)
    assert page.evaluate("asokErrors") == []


@pytest.mark.parametrize("method, code", [("_internal_calculation", "private_method"),
                                          ("render", "not_exposed")])
def test_a_call_to_a_method_that_is_not_exposed_is_refused_and_changes_nothing(serve, page, method, code):
    server = serve("counter")
    errors = console_errors(page)
    page.goto(server.url)
    page.evaluate("method => document.querySelector('[ws-click=increment]').setAttribute('ws-click', method)",
                  method)
    page.click(f"[ws-click={method}]")
    expect_error(page, code)
    assert [text for text in errors if text.startswith(f"asok: {code} ")]
    assert counts(page) == [10]
    page.reload()
    expect_count(page, 10)


# ── inputs: ws-input, ws-model, ws-submit ────────────────────────────

def test_typing_while_the_component_rerenders_loses_nothing_and_keeps_focus_and_caret(serve, page):
    server = serve("search")
    replies = []
    page.on("websocket", lambda ws: ws.on("framereceived", lambda frame: replies.append(frame)))
    page.goto(server.url)
    page.locator("input[ws-input]").focus()
    head, middle, tail = "pineapple and a mango", "watermelon, kiwi", "grape"  # 21 + 16 + 5 = 42
    for n, char in enumerate(head + tail):
        page.keyboard.type(char)
        if n % 4 == 3:  # pause past the debounce: the component re-renders while we type on
            page.wait_for_timeout(200)
    for _ in tail:
        page.keyboard.press("ArrowLeft")
    for n, char in enumerate(middle):
        page.keyboard.type(char)
        if n % 4 == 3:
            page.wait_for_timeout(200)
    text = head + middle + tail
    renders_while_typing = len(replies)
    state = page.evaluate("() => { const el = document.activeElement;"
                          "return [el.getAttribute('ws-input'), el.value, el.selectionStart, el.selectionEnd]; }")
    assert state == ["search", text, len(head + middle), len(head + middle)]
    assert renders_while_typing >= 3
    expect(page.locator("li")).to_have_text(f"No fruit matches \u201c{text}\u201d.")
    assert page.evaluate("document.activeElement.value") == text
    page.reload()
    expect(page.locator("input[ws-input]")).to_have_value(text)


TODO_TEXTS = "li [ws-input=rename]"


def add_todos(page, *texts):
    draft = page.locator("input[ws-model=draft]")
    draft.click()
    for n, text in enumerate(texts):
        page.keyboard.type(text)
        page.keyboard.press("Enter")
        expect(page.locator(TODO_TEXTS)).to_have_count(n + 1)


def expect_todos(page, texts):
    """The todo items' texts, as the inputs show them, become `texts`."""
    page.wait_for_function("texts => JSON.stringify([...document.querySelectorAll('li [ws-input=rename]')]"
                           ".map(el => el.value)) == JSON.stringify(texts)", arg=texts, timeout=TIMEOUT_MS)


def expect_idle(page):
    expect(page.locator(".asok-loading")).to_have_count(0)


def test_todo_ws_model_and_enter_add_an_item_and_clear_the_input(serve, page):
    server = serve("todo")
    page.goto(server.url)
    draft = page.locator("input[ws-model=draft]")
    draft.click()
    page.keyboard.type("buy milk")
    page.keyboard.press("Enter")
    expect_todos(page, ["buy milk"])
    expect(draft).to_have_value("")
    expect(draft).to_be_focused()
    # typed right after Enter, while the reply may still be in flight: nothing is lost
    page.keyboard.type("call mum")
    expect(draft).to_have_value("call mum")
    page.keyboard.press("Enter")
    expect_todos(page, ["buy milk", "call mum"])
    expect(draft).to_have_value("")
    page.locator("li input[type=checkbox]").first.check()  # toggle(1, true): the argument, then the value
    expect(page.locator(TODO_TEXTS).first).to_have_class("done")
    page.reload()
    expect_todos(page, ["buy milk", "call mum"])
    expect(page.locator("li input[type=checkbox]").first).to_be_checked()
    expect(page.locator(TODO_TEXTS).first).to_have_class("done")


TYPE_THEN_REMOVE = """([field, text, remove]) => {
    field = document.querySelector(field);
    field.value += text;
    field.dispatchEvent(new Event("input", {bubbles: true}));  // debounced: not sent yet
    if (remove) document.querySelector(remove).click();
}"""


def test_typing_in_an_item_while_others_are_removed_keeps_the_text_in_that_item(serve, context):
    server = serve("todo")
    tab, other = context.new_page(), context.new_page()
    tab.goto(server.url)
    add_todos(tab, "one", "two", "three", "four", "five")
    third = "#todo-3 [ws-input=rename]"
    tab.locator(third).click()
    tab.keyboard.press("End")
    # item 2 removed within the debounce of typing in item 3
    tab.evaluate(TYPE_THEN_REMOVE, [third, " and more", "#todo-2 [aria-label=Remove]"])
    expect(tab.locator("#todo-2")).to_have_count(0)
    expect_idle(tab)
    assert tab.evaluate("[document.activeElement.closest('li').id, document.activeElement.value]") == [
        "todo-3", "three and more"]
    # item 1 removed from another tab while this one types in item 3
    other.goto(server.url)
    other.click("#todo-1 [aria-label=Remove]")
    expect(other.locator("#todo-1")).to_have_count(0)
    tab.locator(third).press("End")
    tab.keyboard.type(", again")
    expect_idle(tab)
    tab.wait_for_timeout(300)  # past the debounce
    expect_idle(tab)
    for page in (tab, other):
        page.reload()
        expect(page.locator("li")).to_have_count(3)
        assert page.locator("li").evaluate_all("lis => lis.map(li => li.id)") == ["todo-3", "todo-4", "todo-5"]
        expect_todos(page, ["three and more, again", "four", "five"])
    assert tab.evaluate("asokErrors") == [] and other.evaluate("asokErrors") == []


def test_a_component_removed_while_its_typing_waits_for_the_debounce_is_forgotten(serve, page):
    server = serve("todo")
    sent, crashes = [], []
    page.on("websocket", lambda ws: ws.on("framesent", lambda text: sent.append(json.loads(text))))
    page.on("pageerror", lambda error: crashes.append(str(error)))
    page.goto(server.url)
    add_todos(page, "one", "two")
    page.locator("#todo-2 [ws-input=rename]").click()
    sent.clear()
    page.evaluate(TYPE_THEN_REMOVE, ["#todo-2 [ws-input=rename]", " typed", "#todo-2 [aria-label=Remove]"])
    expect(page.locator("#todo-2")).to_have_count(0)
    page.wait_for_timeout(400)  # past the debounce: the removed item's queue went with it
    assert [m.get("method") for m in sent] == ["remove"]
    assert crashes == [] and page.evaluate("asokErrors") == []


def test_form_submit_shows_validation_errors_then_succeeds(serve, page):
    server = serve("form")
    page.goto(server.url)
    page.fill("input[name=name]", "a")
    page.fill("input[name=email]", "not an address")
    page.click("button[type=submit]")
    expect(page.locator(".error")).to_have_text(["Please give a name of at least 2 characters.",
                                                 "That does not look like an email address."])
    assert page.url.rstrip("/") == server.url  # the submit was taken over, not sent as a form
    page.fill("input[name=name]", "Ada")
    page.fill("input[name=email]", "ada@example.org")
    page.click("button[type=submit]")
    expect(page.locator(".ok")).to_have_text("Thanks, Ada! We will write to ada@example.org.")


# ── the examples gallery and the shared stylesheet ───────────────────

PNG = b"\x89PNG\r\n\x1a\n"


def test_every_gallery_page_loads_with_no_console_error_and_is_screenshotted(tmp_path, context):
    examples = tmp_path / "examples"
    shutil.copytree(HERE / "examples", examples, ignore=shutil.ignore_patterns(".asok", "__pycache__"))
    expected = sorted(p.name for p in examples.iterdir() if (p / "app.py").is_file() or (p / "src").is_dir())
    server = Server(examples)
    try:
        server.start()
        page = context.new_page()
        page.set_viewport_size({"width": 900, "height": 640})
        problems = []
        page.on("console", lambda m: m.type == "error" and problems.append(f"{page.url}: {m.text}"))
        page.on("pageerror", lambda e: problems.append(f"{page.url}: {e}"))
        page.goto(server.url)
        names = page.locator(".gallery a b").all_inner_texts()
        hrefs = [a.get_attribute("href") for a in page.locator(".gallery a").all()]
        assert names == expected
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "gallery.png"))
        for name, href in zip(names, hrefs):
            page.goto(href, wait_until="networkidle")
            assert "system-ui" in page.evaluate("getComputedStyle(document.body).fontFamily"), name
            shot = ARTIFACTS / f"gallery-{name}.png"
            page.screenshot(path=str(shot), full_page=True)
            assert shot.read_bytes()[:8] == PNG
        assert problems == []
    finally:
        server.stop()
        server.log.close()


def test_no_gallery_page_is_wider_than_a_360_px_phone(tmp_path, context):
    examples = tmp_path / "examples"
    shutil.copytree(HERE / "examples", examples, ignore=shutil.ignore_patterns(".asok", "__pycache__"))
    server = Server(examples)
    try:
        server.start()
        page = context.new_page()
        page.set_viewport_size({"width": 360, "height": 740})
        page.goto(server.url)
        links = [(a.locator("b").inner_text(), a.get_attribute("href")) for a in page.locator(".gallery a").all()]
        assert len(links) >= 10
        widths = {"index": page.evaluate("document.documentElement.scrollWidth")}
        ARTIFACTS.mkdir(exist_ok=True)
        for name, href in links:
            page.goto(href, wait_until="networkidle")
            widths[name] = page.evaluate("document.documentElement.scrollWidth")
            page.screenshot(path=str(ARTIFACTS / f"phone-{name}.png"), full_page=True)
        assert {name: width for name, width in widths.items() if width > 360} == {}
    finally:
        server.stop()
        server.log.close()


def test_the_stylesheet_shows_a_component_loading_and_the_page_disconnected(serve, page):
    server = serve("counter")
    page.goto(server.url)
    component = page.locator("[data-asok-component]")
    assert component.evaluate("el => getComputedStyle(el).opacity") == "1"
    component.evaluate("el => { el.style.transition = 'none'; el.classList.add('asok-loading'); }")
    assert component.evaluate("el => getComputedStyle(el).opacity") == "0.55"
    component.evaluate("el => { el.classList.remove('asok-loading'); el.style.transition = ''; }")
    server.stop()
    expect_connected(page, False)
    banner = page.evaluate("getComputedStyle(document.body, '::before').content")
    assert banner == '"Reconnecting\u2026"'
    assert "grayscale" in component.evaluate("el => getComputedStyle(el).filter")
    server.start()
    expect_connected(page, True)
    assert page.evaluate("getComputedStyle(document.body, '::before').content") == "none"


# ── uploads, URL-bound state, sign-in ────────────────────────────────

def png_bytes(pad=0):
    """A valid 8x8 PNG, with `pad` bytes of a text chunk to make it as large as a test needs."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    pixels = b"".join(b"\x00" + b"\x33\x67\xd6" * 8 for _ in range(8))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 8, 8, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(pixels)) + (chunk(b"tEXt", b"pad\x00" + b"x" * pad) if pad else b"")
            + chunk(b"IEND", b""))


PROGRESS = """root => {
  window.seen = {pct: [], uploading: false};
  new MutationObserver(() => {
    seen.uploading ||= root.classList.contains("asok-uploading");
    const pct = root.dataset.asokUpload, css = root.style.getPropertyValue("--asok-upload");
    if (pct !== undefined && css == pct + "%" && seen.pct.at(-1) != +pct) seen.pct.push(+pct);
  }).observe(root, {attributes: true});
}"""


def test_an_avatar_upload_shows_progress_and_the_method_saves_the_file(serve, page, tmp_path):
    server = serve("upload")
    picture = tmp_path / "me.png"
    picture.write_bytes(png_bytes(pad=900 * 1024))
    page.goto(server.url)
    page.eval_on_selector("[data-asok-component=Avatar]", PROGRESS)
    page.set_input_files("#photo", str(picture))
    page.fill("input[name=name]", "Ann")  # each key re-renders the component through ws-model
    expect(page.locator("input[name=name]")).to_have_value("Ann")
    page.wait_for_function("JSON.parse(document.querySelector('[data-asok-component]').dataset.asokState"
                           ".split('.').slice(0, -1).join('.')).s.name == 'Ann'")
    assert page.eval_on_selector("#photo", "el => el.files.length") == 1  # the selection survived the re-renders
    cdp = page.context.new_cdp_session(page)  # a slow uplink, so the progress has steps to show
    cdp.send("Network.enable")
    cdp.send("Network.emulateNetworkConditions", {"offline": False, "latency": 0, "downloadThroughput": -1,
                                                  "uploadThroughput": 1024 * 1024})
    page.click("button[type=submit]")
    expect(page.locator("img.face")).to_have_attribute("src", re.compile(r"^/static/avatars/[0-9a-f]{16}\.png$"))
    cdp.send("Network.emulateNetworkConditions", {"offline": False, "latency": 0, "downloadThroughput": -1,
                                                  "uploadThroughput": -1})
    seen = page.evaluate("seen")
    assert seen["uploading"] and seen["pct"][0] == 0 and seen["pct"][-1] == 100
    assert any(0 < pct < 100 for pct in seen["pct"]), seen
    expect(page.locator(".ok")).to_have_text("Saved, Ann.")
    src = page.get_attribute("img.face", "src")
    assert page.request.get(server.url + src).body() == picture.read_bytes()  # the method got the file
    assert page.eval_on_selector("#photo", "el => el.files.length") == 0  # done: the selection is cleared
    assert not list((server.app_dir / ".asok" / "uploads").iterdir())  # nothing left waiting


def test_a_too_large_or_wrong_type_avatar_gets_its_error_next_to_the_field(serve, page, tmp_path):
    server = serve("upload")
    page.goto(server.url)
    error = page.locator("label:has(#photo) + p.error")
    (tmp_path / "big.png").write_bytes(png_bytes(pad=3 << 20))
    page.set_input_files("#photo", str(tmp_path / "big.png"))
    page.click("button[type=submit]")
    expect(error).to_have_text("big.png is 3.0 MiB; an avatar may be 1 MiB at most.")
    (tmp_path / "notes.txt").write_text("not a picture")
    page.set_input_files("#photo", str(tmp_path / "notes.txt"))
    page.click("button[type=submit]")
    expect(error).to_have_text("notes.txt is not a PNG, JPEG or GIF picture.")
    (tmp_path / "renamed.png").write_text("not a picture either")  # the type says PNG, the bytes do not
    page.set_input_files("#photo", str(tmp_path / "renamed.png"))
    page.click("button[type=submit]")
    expect(error).to_have_text("renamed.png is not a PNG, JPEG or GIF picture.")
    # past the component's max_upload the server refuses the upload itself: the message is the field's
    (tmp_path / "huge.png").write_bytes(png_bytes(pad=(10 << 20) + 1))
    page.set_input_files("#photo", str(tmp_path / "huge.png"))
    page.click("button[type=submit]")
    expect_error(page, "too_large")
    message = page.eval_on_selector("#photo", "el => el.validationMessage")
    assert "this form takes at most 10.0 MiB" in message
    expect(error).to_be_hidden()  # the error about renamed.png is not left beside huge.png
    assert page.locator("img.face").count() == 0 and not list((server.app_dir / "static").glob("avatars/*"))


def where(page):
    return page.locator(".where").inner_text(), page.locator("tbody tr td").first.inner_text()


def test_table_sort_and_page_are_in_the_url_and_back_and_forward_restore_them(serve, page):
    server = serve("table")
    page.goto(server.url)
    assert where(page) == ("Page 1 of 5", "Apple")
    page.click("text=Price / kg")
    page.wait_for_url(server.url + "/?sort=price")
    assert where(page) == ("Page 1 of 5", "Watermelon")
    page.click("text=Price / kg")
    page.wait_for_url(server.url + "/?sort=-price")
    page.click("text=Next →")
    page.wait_for_url(server.url + "/?sort=-price&page=2")
    assert where(page) == ("Page 2 of 5", "Strawberry")
    page.go_back()
    page.wait_for_url(server.url + "/?sort=-price")
    expect(page.locator(".where")).to_have_text("Page 1 of 5")
    assert where(page) == ("Page 1 of 5", "Raspberry")
    page.go_back()
    page.wait_for_url(server.url + "/?sort=price")
    expect(page.locator("tbody tr td").first).to_have_text("Watermelon")
    page.go_forward()
    page.go_forward()
    page.wait_for_url(server.url + "/?sort=-price&page=2")
    expect(page.locator(".where")).to_have_text("Page 2 of 5")
    assert where(page) == ("Page 2 of 5", "Strawberry")
    page.click("text=Next →")  # the restored state is the one the next click works on
    page.wait_for_url(server.url + "/?sort=-price&page=3")
    assert where(page) == ("Page 3 of 5", "Papaya")


def test_an_edited_table_link_out_of_range_is_clamped_in_the_page_and_the_address(serve, page):
    server = serve("table")
    page.goto(server.url + "/?page=999&sort=bogus")
    page.wait_for_url(server.url + "/?page=5")  # the last page, sorted by name (the default: not shown)
    assert where(page) == ("Page 5 of 5", "Raspberry")
    page.click("text=← Previous")  # from the page shown, not from 999
    page.wait_for_url(server.url + "/?page=4")
    page.goto(server.url + "/?page=-3&sort=-origin")
    page.wait_for_url(server.url + "/?sort=-origin")
    assert where(page) == ("Page 1 of 5", "Dragon fruit")  # Vietnam first


def test_a_shared_table_link_shows_its_page_and_sort_in_another_session_and_the_same(serve, page, browser):
    server = serve("table")
    page.goto(server.url)
    page.click("text=Origin")
    page.wait_for_url(server.url + "/?sort=origin")
    link = server.url + "/?page=3&sort=-price"
    other = browser.new_context()
    try:
        tab = other.new_page()
        tab.goto(link)
        assert where(tab) == ("Page 3 of 5", "Papaya")
        tab.reload()
        assert where(tab) == ("Page 3 of 5", "Papaya")
    finally:
        other.close()
    page.goto(link)  # the same session had origin order saved: the link wins
    assert where(page) == ("Page 3 of 5", "Papaya")
    page.click("text=Next →")
    page.wait_for_url(server.url + "/?page=4&sort=-price")
    page.goto(server.url)  # no query string: the saved state, and the URL shows it
    assert where(page)[0] == "Page 4 of 5"
    page.wait_for_url(server.url + "/?page=4&sort=-price")


def session_id(context):
    return next(c["value"] for c in context.cookies() if c["name"] == "asok_session").rpartition(".")[0]


def sign_in(page, name, password):
    page.fill("input[name=name]", name)
    page.fill("input[name=password]", password)
    page.click("button[type=submit]")


def test_sign_in_rotates_the_session_id_and_sign_out_leaves_the_next_user_nothing(serve, page, context):
    server = serve("signin")
    page.goto(server.url + "/account")
    page.wait_for_url(server.url + "/signin?next=/account")  # before_request sent us here
    sign_in(page, "ann", "wrong")
    expect(page.locator(".error")).to_have_text("That name and password do not match.")
    before = session_id(context)
    sign_in(page, "ann", "ann-secret")
    page.wait_for_url(server.url + "/account")
    assert session_id(context) != before  # session.regenerate()
    page.fill("[ws-model=draft]", "ann's plan")
    page.press("[ws-model=draft]", "Enter")
    expect(page.locator(".notes li span")).to_have_text(["ann's plan"])
    old_tab = context.new_page()
    old_tab.goto(server.url + "/account")
    expect(old_tab.locator(".notes li span")).to_have_text(["ann's plan"])
    page.click("text=Sign out")
    page.wait_for_url(server.url + "/signin")
    # a tab still open: its state is gone with the session (bad_state), so it reloads itself, and
    # the reloaded page is the sign-in form
    with old_tab.expect_navigation():
        old_tab.fill("[ws-model=draft]", "after sign-out")
        old_tab.press("[ws-model=draft]", "Enter")
    old_tab.wait_for_url(server.url + "/signin?next=/account")
    sign_in(page, "bob", "bob-secret")
    page.wait_for_url(server.url + "/account")
    expect(page.locator("h1")).to_have_text("Bob's notes")
    expect(page.locator(".notes li")).to_have_text(["No notes yet."])
    page.reload()
    expect(page.locator(".notes li")).to_have_text(["No notes yet."])
    assert "ann's plan" not in page.content()
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "signin.png"))


# ── identity: the keyed morph, ws-hook, ws-ignore ───────────────────

ROWS = {
    "src/components/Rows.py": """from asok import Component, exposed


class Rows(Component):
    rows = [1, 2, 3, 4, 5]
    added = 5

    @exposed
    def delete(self, row: int):
        self.rows.remove(row)

    @exposed
    def insert_top(self):
        self.added += 1
        self.rows.insert(0, self.added)

    @exposed
    def swap(self, a: int, b: int):
        i, j = self.rows.index(a), self.rows.index(b)
        self.rows[i], self.rows[j] = b, a
""",
    "src/components/rows.html": """<div><ul>
<% for row in rows %><li id="row-<< row >>">Row << row >> <input aria-label="row << row >>">
<button ws-click="delete(<< row >>)">Delete</button></li>
<% endfor %></ul>
<button ws-click="insert_top">Insert at the top</button> <button ws-click="swap(3, 4)">Swap 3 and 4</button>
</div>
""",
    "src/pages/rows.html": "{% extends 'html/base.html' %}{% block main %}{{ component('Rows') }}{% endblock %}",
}

WIDGET = {
    "src/components/Widget.py": """from asok import Component, exposed


class Widget(Component):
    count = 0

    @exposed
    def increment(self):
        self.count += 1
""",
    "src/components/widget.html": """<div>
<h3>Count: << count >></h3>
<% if count < 2 %><span ws-hook="Probe" data-count="<< count >>">probe</span><% endif %>
<div id="chart" ws-ignore>drawn by the server at << count >></div>
<iframe id="frame" srcdoc="<p>frame</p>" title="frame"></iframe>
<button ws-click="increment">Add 1</button>
</div>
""",
    "src/pages/widget.html": """{% extends 'html/base.html' %}{% block main %}
<script>
window.hookCalls = [];
window.asokHooks = {Probe: Object.fromEntries(["mounted", "updated", "destroyed"].map(
  name => [name, el => hookCalls.push(`${name} ${el.dataset.count} ${el.isConnected}`)]))};
</script>
{{ component('Widget') }}
{% endblock %}""",
}


CART = {
    "src/components/Cart.py": """from asok import Component, exposed, on


class Cart(Component):
    lines = [1, 2]
    qty = {}
    note = "none"

    @on("changed")
    def changed(self, payload):
        self.qty = {**self.qty, str(payload["line"]): payload["qty"]}

    @exposed
    def renote(self, note: str):
        self.note = note


class Line(Component):
    line_id = 0
    qty = 0
    note = ""

    def update(self, note, **props):
        self.note = note

    @exposed
    def add(self):
        self.qty += 1
        self.emit("changed", {"line": self.line_id, "qty": self.qty})
""",
    "src/components/cart.html": """<div><h3>Total: << sum(qty.values()) >></h3>
<button ws-click='renote("gift")'>Gift wrap</button>
<% for n in lines %><< component('Line', key=n, line_id=n, note=note) >><% endfor %></div>
""",
    "src/components/line.html": """<p>Line << line_id >>: <span class="qty"><< qty >></span>
<span class="note"><< note >></span> <button ws-click="add">Add one</button></p>
""",
    "src/pages/cart.html": "{% extends 'html/base.html' %}{% block main %}{{ component('Cart') }}{% endblock %}",
}


def test_a_childs_emit_updates_its_parent_in_the_same_round_trip(serve, page):
    server = serve("counter", CART)
    received, sent = [], []
    page.on("websocket", lambda ws: (ws.on("framereceived", lambda text: received.append(text)),
                                     ws.on("framesent", lambda text: sent.append(text))))
    page.goto(server.url + "/cart")
    expect_connected(page, True)
    for _ in range(200):  # the join goes as the socket opens, which may be after the page shows connected
        if any('"join"' in text for text in sent):
            break
        page.wait_for_timeout(25)
    received.clear(), sent.clear()  # joined; nothing is saved, so no answer
    second = page.locator("[data-asok-component=Line]").nth(1)
    second.locator("button").click()
    expect(page.locator("h3")).to_have_text("Total: 1")
    expect(second.locator(".qty")).to_have_text("1")
    messages = [json.loads(text) for text in received]
    assert len(sent) == 1 and [("id" in m, m.get("cid")) for m in messages] == [(True, None), (False, "/cart#Cart-0")]
    page.reload()
    expect(page.locator("h3")).to_have_text("Total: 1")


def test_a_parent_rerender_with_a_new_prop_reaches_the_childs_update(serve, page):
    server = serve("counter", CART)
    page.goto(server.url + "/cart")
    second = page.locator("[data-asok-component=Line]").nth(1)
    second.locator("button").click()
    expect(second.locator(".qty")).to_have_text("1")  # the line has saved state now
    page.click("text=Gift wrap")
    expect(page.locator(".note")).to_have_text(["gift", "gift"])
    expect(second.locator(".qty")).to_have_text("1")
    page.reload()
    expect(page.locator(".note")).to_have_text(["gift", "gift"])
    assert page.evaluate("asokErrors") == []


def focus_state(page):
    return page.evaluate("() => { const el = document.activeElement;"
                         "return [el.closest('li')?.id, el.value, el.selectionStart, el.selectionEnd]; }")


def test_keyed_rows_keep_typed_text_focus_and_caret_through_delete_insert_and_swap(serve, page):
    server = serve("counter", ROWS)
    page.goto(server.url + "/rows")
    page.evaluate("document.querySelectorAll('li').forEach(li => li.original = true)")
    page.locator("#row-4 input").click()
    page.keyboard.type("four, typed")
    for _ in range(4):
        page.keyboard.press("ArrowLeft")
    page.keyboard.press("Shift+ArrowLeft")  # a selection of one character, before the last four
    assert focus_state(page) == ["row-4", "four, typed", 6, 7]
    for action, rows in [("delete(2)", "1 3 4 5"), ("insert_top", "6 1 3 4 5"), ("swap(3, 4)", "6 1 4 3 5"),
                         ("swap(3, 4)", "6 1 3 4 5")]:  # row 4 before row 3: the focused row is passed over
        page.evaluate("action => document.querySelector(`[ws-click='${action}']`).click()", action)  # focus stays
        page.wait_for_function("rows => [...document.querySelectorAll('li')].map(li => li.id.slice(4)).join(' ') == rows",
                               arg=rows)
        assert focus_state(page) == ["row-4", "four, typed", 6, 7], action
    # every row that was there is the same element, moved rather than recreated
    assert page.evaluate("[...document.querySelectorAll('li')].map(li => !!li.original)") == [False] + [True] * 4
    page.keyboard.type("T")  # replaces the selected "t"
    expect(page.locator("#row-4 input")).to_have_value("four, Typed")
    assert page.evaluate("asokErrors") == []


def test_a_ws_hook_sees_mounted_updated_and_destroyed(serve, page):
    server = serve("counter", WIDGET)
    page.goto(server.url + "/widget")
    page.wait_for_function("hookCalls.length == 1")
    page.click("[ws-click=increment]")
    expect_count(page, 1)
    page.click("[ws-click=increment]")
    expect_count(page, 2)
    assert page.evaluate("hookCalls") == ["mounted 0 true", "updated 1 true", "destroyed 1 false"]


def test_a_ws_ignore_subtree_changed_by_page_javascript_survives_rerenders(serve, page):
    server = serve("counter", WIDGET)
    page.goto(server.url + "/widget")
    page.evaluate("() => { const chart = document.getElementById('chart');"
                  "chart.innerHTML = '<canvas></canvas> drawn by the page'; chart.dataset.drawn = 'yes'; }")
    for count in (1, 2):
        page.click("[ws-click=increment]")
        expect_count(page, count)
    expect(page.locator("#chart")).to_have_text("drawn by the page")
    expect(page.locator("#chart")).to_have_attribute("data-drawn", "yes")
    expect(page.locator("#chart canvas")).to_have_count(1)


def test_unchanged_attributes_are_not_rewritten_so_an_iframe_is_not_reloaded(serve, page):
    server = serve("counter", WIDGET)
    page.goto(server.url + "/widget")
    frame = page.frame_locator("iframe")
    expect(frame.locator("p")).to_have_text("frame")
    page.evaluate("""() => {
        document.querySelector("iframe").contentDocument.body.dataset.marked = "yes";
        window.rewritten = [];
        const root = document.querySelector("[data-asok-component]");
        new MutationObserver(records => records.forEach(r => r.target != root && rewritten.push(r.attributeName)))
          .observe(root, {attributes: true, subtree: true});
    }""")
    for count in (1, 2):
        page.click("[ws-click=increment]")
        expect_count(page, count)
    assert page.evaluate("document.querySelector('iframe').contentDocument.body.dataset.marked") == "yes"
    assert page.evaluate("rewritten") == ["data-count"]  # the hooked span's count, and nothing else


# ── artifact ─────────────────────────────────────────────────────────

def test_counter_page_screenshot_is_saved(serve, page):
    server = serve("counter")
    page.set_viewport_size({"width": 800, "height": 420})
    page.goto(server.url)
    page.click(INCREMENT)
    expect_count(page, 11)
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "counter.png"
    page.screenshot(path=str(shot))
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_runtime_a_page_downloads_fits_in_2048_bytes_after_gzip_9(serve, page):
    server = serve("counter")
    scripts = []
    page.on("response", lambda r: scripts.append(r) if r.request.resource_type == "script" else None)
    page.goto(server.url)
    expect_connected(page, True)
    assert [urlparse(r.url).path for r in scripts] == ["/asok/alive.js"]
    assert scripts[0].headers["content-encoding"] == "gzip"  # sent compressed, and cached by version
    assert "immutable" in scripts[0].headers["cache-control"]
    served = sum(len(gzip.compress(r.body(), 9)) for r in scripts)  # Playwright gives the decoded body
    assert served <= 2048, f"the page's scripts are {served} bytes after gzip -9; the budget is 2048"


# ── raw WebSocket: examples/echo ─────────────────────────────────────

ECHO_IN_BROWSER = """async (url) => {
  const ws = new WebSocket(url);
  ws.binaryType = "arraybuffer";
  const replies = [];
  const done = new Promise((resolve, reject) => {
    ws.onmessage = (e) => {
      replies.push(typeof e.data == "string" ? "text:" + e.data : "bytes:" + [...new Uint8Array(e.data)].join(","));
      if (replies.length == 3) resolve();
    };
    ws.onerror = () => reject(new Error("websocket error"));
  });
  await new Promise((resolve) => ws.onopen = resolve);
  ws.send("hello");
  ws.send(new Uint8Array([0, 1, 255]));
  ws.send("é".repeat(70000));
  await done;
  ws.close(1000, "bye");
  await new Promise((resolve) => ws.onclose = (e) => resolve(replies.push("close:" + e.code)));
  return replies;
}"""


def test_chromium_websocket_gets_its_messages_back_from_echo(serve, page):
    server = serve("echo")
    page.goto(server.url + "/static-or-not")  # any page of that origin: the socket is same-origin
    replies = page.evaluate(ECHO_IN_BROWSER, server.url.replace("http", "ws") + "/echo")
    assert replies == ["text:hello", "bytes:0,1,255", "text:" + "é" * 70000, "close:1000"]
