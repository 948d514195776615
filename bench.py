"""asok benchmark: `make bench` (or `.venv/bin/python bench.py [--quick] [--client raw|asok]`).

Measures, in one run and beside a baseline each time:
  1. live events through examples/counter over real WebSockets (1 and 50 connections),
  2. the same load generator against examples/echo's `/echo` WebSocket (the floor),
  3. the counter page with wrk (keep-alive, 1 and 10 connections) beside a minimal
     asyncio HTTP server written below (stdlib only, fixed 1 KB body),
  4. template renders/s beside Jinja2 (the counter component's template and a 100-row page),
  5. server RSS per idle WebSocket connection with 1,000 open, and push fan-out: one publish to
     1,000 joined views of 1,000 sessions (ms until the last has its HTML, CPU per update;
     the component on the event loop, on_loop = True, and again in threads),
     and the server's RSS after greedy clients (pings never read, replies never read, 16 MiB
     events, two million tiny fragments, bodies a byte at a time) beside its idle RSS,
  6. bytes: the counter page, alive.js after gzip -9, one increment's request and reply,
  7. beside pyview (its own .venv-pyview; uvicorn with uvloop and httptools): the same counter
     and a 1,000-row list written for both, the same load generator speaking each one's browser
     protocol, rounds alternating the two servers; the ratios asok/pyview and issue 16's targets.
  8. scale-out: `--workers 2` beside one worker (page req/s, live events/s, both unpinned),
     and live events/s with the Redis session store and broker beside the file store.
  9. a 10 MiB upload through a page route and through examples/upload's live component:
     MiB/s and the server's peak RSS growth (streamed to disk, so it stays under 4 MiB).
Prints the tables and writes the same figures to bench-results.json (--json to change).

Servers are subprocesses bound to 127.0.0.1, started on a temporary copy of the example
folder (so .asok/ data stays out of the repository), with DEBUG unset and a random
SECRET_KEY, pinned to one core while the load generator (this process, wrk) runs on another,
and always killed. Every loop is bounded in count and in time.
"""

import argparse
import asyncio
import base64
import contextlib
import gc
import gzip
import html
import http.client
import json
import os
import platform
import random
import re
import resource
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

HERE = Path(__file__).resolve().parent
ASOK = HERE / "asok.py"
EXAMPLES = HERE / "examples"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
COUNT_RE = re.compile(r"Count: (-?\d+)")


def asok_ref(token):
    """What alive.js sends as `state`: the reference inside a token that has one, else the token."""
    return json.loads(token.rpartition(".")[0]).get("r") or token


def asok_html(data, held):
    """The whole HTML of a reply, as alive.js builds it: `html`, or the diff `d` applied to the
    HTML held (`held` = (save number, html)); returns (save number, html) to hold next."""
    if "d" in data:
        old, new, at = held[1].encode("utf-16-le"), b"", 0
        for i in range(0, len(data["d"]), 3):
            new += old[2 * at:2 * data["d"][i]] + data["d"][i + 2].encode("utf-16-le")
            at = data["d"][i + 1]
        new = (new + old[2 * at:]).decode("utf-16-le")
    else:
        new = data["html"]
    return json.loads(data["state"].rpartition(".")[0])["q"], new


def asok_call(rid, v_cid, component, state, method, args, csrf, held):
    message = {"id": rid, "cid": v_cid, "component": component, "state": asok_ref(state),
               "method": method, "args": args, "csrf": csrf}
    if held is not None:
        message["h"] = held[0]
    return json.dumps(message, separators=(",", ":"))
PCOUNT_RE = re.compile(r"clicks this session: (\d+)")
CSRF_RE = re.compile(r'<meta name="csrf-token" content="([^"]*)"')
COMPONENT_RE = re.compile(r'<div id="([^"]*)" data-asok-component="(\w+)" data-asok-state="([^"]*)">')

FULL = dict(live_warm=0.5, live_secs=5.0, wrk_secs=10, wrk_nocookie_secs=3, tpl_secs=0.5, tpl_rounds=3,
            idle_conns=1000, fanout_views=1000, fanout_rounds=5, peer_rounds=3, peer_live_secs=3.0, peer_wrk_secs=5,
            greedy_bodies=200)
QUICK = dict(live_warm=0.3, live_secs=1.5, wrk_secs=2, wrk_nocookie_secs=1, tpl_secs=0.2, tpl_rounds=2,
             idle_conns=1000, fanout_views=1000, fanout_rounds=5, peer_rounds=1, peer_live_secs=1.0, peer_wrk_secs=1,
             greedy_bodies=200)
MAX_EVENTS_PER_CLIENT = 1_000_000   # the time window ends a run long before this
REPLY_TIMEOUT = 5.0                 # an event without a reply after this is lost
SERVER_START_TIMEOUT = 15.0

TARGETS = {  # key: (comparison, limit, label)
    "live50_events_per_s": (">=", 10_000, "live events, 50 conns: events/s"),
    "live50_cpu_us_per_event": ("<=", 100, "live events, 50 conns: server CPU µs/event"),
    "live50_p99_ms": ("<=", 10, "live events, 50 conns: p99 ms"),
    "live1_p50_ms": ("<=", 0.25, "live events, 1 conn: p50 ms"),
    "page10_req_per_s": (">=", 10_000, "counter page, 10 conns: req/s"),
    "tpl_counter_x_jinja": (">=", 2.0, "template counter / Jinja2"),
    "tpl_rows_x_jinja": (">=", 1.0, "template 100-row page / Jinja2"),
    "idle_ws_kib_per_conn": ("<=", 16, "RSS per idle WebSocket, KiB"),
    "greedy_rss_growth_mib": ("<=", 32, "RSS growth after the greedy clients, MiB"),
    "fanout_p99_ms": ("<=", 200, "one publish to 1,000 views: ms until the last has its HTML (p99)"),
    "fanout_kib_per_view": ("<=", 16, "RSS per joined idle view, KiB"),
    "bytes_counter_page": ("<=", 4096, "counter page bytes (body)"),
    "bytes_alive_js_gz": ("<=", 2048, "alive.js gzip -9 bytes"),
    "bytes_increment_reply": ("<=", 400, "increment reply bytes (frame)"),
    "upload_route_rss_mib": ("<", 4, "10 MiB upload to a page route: server RSS growth, MiB"),
    "upload_live_rss_mib": ("<", 4, "10 MiB live upload: server RSS growth, MiB"),
    "workers2_page10_ratio": (">=", 1.3, "--workers 2 / 1 worker, page req/s"),
    "workers2_live50_ratio": (">=", 1.3, "--workers 2 / 1 worker, live events/s"),
}


# ═══ Cores, processes, /proc ═════════════════════════════════════════════

def pick_cores():
    """(server core, load core); None when there is only one core to use."""
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        return None, None
    return cores[0], cores[1]


SERVER_CORE, LOAD_CORE = pick_cores()


def pinned(core):
    if core is None:
        return None
    return lambda: os.sched_setaffinity(0, {core})


def unpinned():
    """Every core for the child (this process runs pinned to the load core, and a child would
    inherit that)."""
    os.sched_setaffinity(0, range(os.cpu_count() or 1))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proc_cpu_seconds(pid):
    """utime + stime of a process (all its threads), in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_rss_bytes(pid):
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * PAGE_SIZE


def child_pids(parent):
    pids = []
    for stat_file in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat_file.read_text().rpartition(")")[2].split()[1]) == parent:
                pids.append(int(stat_file.parent.name))
        except (OSError, ValueError, IndexError):
            pass
    return pids


def self_cpu_seconds():
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def raise_fd_limit(want=8192):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


class Server:
    """A server subprocess on 127.0.0.1:port, pinned to the server core; `with` kills it."""

    def __init__(self, argv, port, workdir, label, pin=True, env=None):
        self.argv, self.port, self.workdir, self.label = argv, port, Path(workdir), label
        self.pin, self.extra_env = pin, env or {}
        self.proc = None
        self.log = None

    def __enter__(self):
        env = {k: v for k, v in os.environ.items() if k not in ("DEBUG", "SECRET_KEY_FALLBACKS")}
        env["SECRET_KEY"] = secrets.token_hex(32)
        env["PYTHONDONTWRITEBYTECODE"] = "1"
        env.update(self.extra_env)
        self.log = open(self.workdir / f"{self.label}.log", "wb")
        self.proc = subprocess.Popen(self.argv, cwd=self.workdir, env=env, stdout=self.log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     preexec_fn=pinned(SERVER_CORE) if self.pin else unpinned)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self):
        deadline = time.monotonic() + SERVER_START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.label} exited with {self.proc.returncode}: {self.tail()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"{self.label} did not listen on {self.port} within {SERVER_START_TIMEOUT}s")

    def tail(self):
        self.log.flush()
        return (self.workdir / f"{self.label}.log").read_bytes()[-2000:].decode(errors="replace")

    @property
    def pid(self):
        return self.proc.pid

    def cpu(self):
        """CPU seconds of the server and of its worker processes (`--workers`)."""
        return proc_cpu_seconds(self.proc.pid) + sum(proc_cpu_seconds(p) for p in child_pids(self.proc.pid))

    def rss(self):
        return proc_rss_bytes(self.proc.pid)

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(3)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self.log is not None:
            self.log.close()

    def __exit__(self, *exc):
        died = self.proc is not None and self.proc.poll() is not None
        self.stop()
        logged = (self.workdir / f"{self.label}.log").read_bytes() if self.log is not None else b""
        if died:
            print(f"bench: {self.label} server exited early ({self.proc.returncode}); its log ends:\n"
                  f"{logged[-3000:].decode(errors='replace')}", file=sys.stderr)
        elif b"Traceback" in logged:  # the temporary folder goes with the run: say it now
            first = logged[logged.index(b"Traceback"):][:3000].decode(errors="replace")
            print(f"bench: {self.label} server logged an error (the first of "
                  f"{logged.count(b'Traceback')}):\n{first}", file=sys.stderr)


def asok_server(example, tmp, label, *args, files=None, pin=True, env=None):
    """`python asok.py serve <copy of examples/example> [args]` on a free port; `files` are
    written into the copy ({relative path: text})."""
    folder = Path(tmp) / label
    shutil.copytree(EXAMPLES / example, folder, ignore=shutil.ignore_patterns(".asok", "__pycache__"))
    for rel, text in (files or {}).items():
        (folder / rel).write_text(text)
    port = free_port()
    argv = [sys.executable, str(ASOK), "serve", str(folder), "--port", str(port), "--no-access-log", *args]
    return Server(argv, port, tmp, label, pin, env)


def baseline_server(tmp):
    port = free_port()
    return Server([sys.executable, str(Path(__file__).resolve()), "--baseline-server", str(port)],
                  port, tmp, "baseline-http")


# ═══ The minimal asyncio HTTP server (the page baseline) ═════════════════

BASELINE_BODY = (b"<!doctype html><title>baseline</title><p>" + b"x" * 1024)[:1024]


class _BaselineHTTP(asyncio.Protocol):
    """Keep-alive HTTP/1.1 with a fixed 1 KB body; GET requests without bodies only."""
    date = (0, b"")

    def connection_made(self, transport):
        self.transport = transport
        self.buf = b""

    def data_received(self, data):
        self.buf += data
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buf) > 65536:
                    self.transport.close()
                return
            head, self.buf = self.buf[:end], self.buf[end + 4:]
            now = int(time.time())
            if _BaselineHTTP.date[0] != now:
                stamp = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(now)).encode()
                _BaselineHTTP.date = (now, stamp)
            close = b"\r\nconnection: close" in head.lower()
            self.transport.write(b"HTTP/1.1 200 OK\r\nDate: " + _BaselineHTTP.date[1] +
                                 b"\r\nContent-Type: text/html; charset=utf-8\r\nContent-Length: 1024\r\n" +
                                 (b"Connection: close\r\n" if close else b"") + b"\r\n" + BASELINE_BODY)
            if close:
                self.transport.close()
                return


def run_baseline_server(port):
    async def main():
        loop = asyncio.get_running_loop()
        server = await loop.create_server(_BaselineHTTP, "127.0.0.1", port, backlog=1024)
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGINT, stop.set)
        async with server:
            await stop.wait()
    asyncio.run(main())


# ═══ HTTP helpers (setup only) ═══════════════════════════════════════════

def http_get(port, path="/", cookie=None):
    """(status, headers list, body bytes, raw response size) of one GET."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        headers = {"Cookie": cookie} if cookie else {}
        conn.request("GET", path, headers=headers)
        resp = conn.getresponse()
        body = resp.read()
        head_size = len(f"HTTP/1.1 {resp.status} {resp.reason}\r\n") + sum(
            len(k) + len(v) + 4 for k, v in resp.getheaders()) + 2
        return resp.status, resp.getheaders(), body, head_size + len(body)
    finally:
        conn.close()


class Visitor:
    """What a browser holds after GET /: the session cookie, the CSRF token, the component."""

    def __init__(self, port):
        status, headers, body, self.page_wire = http_get(port)
        if status != 200:
            raise RuntimeError(f"GET / answered {status}")
        text = body.decode()
        self.page_body = len(body)
        cookies = [v.split(";")[0] for k, v in headers if k.lower() == "set-cookie"]
        if not cookies:
            raise RuntimeError("GET / set no session cookie")
        self.cookie = "; ".join(cookies)
        self.csrf = CSRF_RE.search(text).group(1)
        found = COMPONENT_RE.findall(text)
        counters = [f for f in found if f[1] == "Counter"]
        if not counters:
            raise RuntimeError(f"no Counter component on the page (found {found})")
        cid, self.component, state = counters[0]
        self.cid, self.state = html.unescape(cid), html.unescape(state)
        self.count = int(COUNT_RE.search(text).group(1))
        self.pcount = int(PCOUNT_RE.search(text).group(1))


# ═══ WebSocket load generator ════════════════════════════════════════════

class RawWS(asyncio.Protocol):
    """A lean RFC 6455 client on asyncio.Protocol: masked frames out, one waiter for replies in."""

    def __init__(self, request):
        self.request = request
        self.buf = bytearray()
        self.loop = asyncio.get_running_loop()
        self.opened = self.loop.create_future()
        self.handshaken = False
        self.messages = []
        self.waiter = None
        self.closed = False
        self.fragments = None

    @classmethod
    async def connect(cls, port, path, cookie=None, timeout=10):
        key = base64.b64encode(os.urandom(16)).decode()
        headers = [f"GET {path} HTTP/1.1", f"Host: 127.0.0.1:{port}", "Upgrade: websocket",
                   "Connection: Upgrade", f"Sec-WebSocket-Key: {key}", "Sec-WebSocket-Version: 13",
                   f"Origin: http://127.0.0.1:{port}"]
        if cookie:
            headers.append(f"Cookie: {cookie}")
        request = ("\r\n".join(headers) + "\r\n\r\n").encode()
        loop = asyncio.get_running_loop()
        _, proto = await asyncio.wait_for(
            loop.create_connection(lambda: cls(request), "127.0.0.1", port), timeout)
        try:
            await asyncio.wait_for(proto.opened, timeout)
        except BaseException:
            proto.transport.abort()
            raise
        return proto

    def connection_made(self, transport):
        self.transport = transport
        transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        transport.write(self.request)

    def connection_lost(self, exc):
        self.closed = True
        if not self.opened.done():
            self.opened.set_exception(ConnectionError("closed during the handshake"))
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError("connection closed"))

    def data_received(self, data):
        self.buf += data
        if not self.handshaken:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self.buf[:end])
            del self.buf[:end + 4]
            if not head.startswith(b"HTTP/1.1 101"):
                self.opened.set_exception(ConnectionError(head.split(b"\r\n")[0].decode(errors="replace")))
                self.transport.close()
                return
            self.handshaken = True
            self.opened.set_result(None)
        buf = self.buf
        while len(buf) >= 2:
            b0, b1 = buf[0], buf[1]
            n, off = b1 & 0x7F, 2
            if n == 126:
                if len(buf) < 4:
                    return
                n, off = int.from_bytes(buf[2:4], "big"), 4
            elif n == 127:
                if len(buf) < 10:
                    return
                n, off = int.from_bytes(buf[2:10], "big"), 10
            if b1 & 0x80:
                self.transport.close()   # a server must not mask
                return
            if len(buf) < off + n:
                return
            payload = bytes(buf[off:off + n])
            del buf[:off + n]
            opcode, fin = b0 & 0x0F, b0 & 0x80
            if opcode == 9:
                self.transport.write(frame(0xA, payload))
            elif opcode == 8:
                if not self.closed:
                    self.transport.write(frame(0x8, payload[:2]))
                    self.transport.close()
                return
            elif opcode in (0, 1, 2):
                if opcode:
                    self.fragments = [opcode, payload]
                else:
                    self.fragments.append(payload)
                if fin:
                    kind, *parts = self.fragments
                    self.fragments = None
                    data = b"".join(parts)
                    self._deliver(data.decode() if kind == 1 else data)

    def _deliver(self, message):
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            self.waiter = None
            waiter.set_result(message)
        else:
            self.messages.append(message)

    def send(self, text):
        self.transport.write(frame(0x1, text.encode()))

    async def recv(self, timeout=REPLY_TIMEOUT):
        if self.messages:
            return self.messages.pop(0)
        if self.closed:
            raise ConnectionError("connection closed")
        self.waiter = waiter = self.loop.create_future()
        timer = self.loop.call_later(timeout, _expire, waiter)
        try:
            return await waiter
        finally:
            timer.cancel()

    async def close(self):
        if not self.closed:
            self.transport.write(frame(0x8, b"\x03\xe8"))
            self.transport.close()


def _expire(waiter):
    if not waiter.done():
        waiter.set_exception(TimeoutError("no reply in time"))


def frame(opcode, payload):
    """A masked client frame (RFC 6455 §5.2), XOR done on one big integer."""
    n = len(payload)
    if n < 126:
        head = bytes((0x80 | opcode, 0x80 | n))
    elif n < 65536:
        head = bytes((0x80 | opcode, 0x80 | 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((0x80 | opcode, 0x80 | 127)) + n.to_bytes(8, "big")
    key = os.urandom(4)
    if n:
        keys = (key * (n // 4 + 1))[:n]
        payload = (int.from_bytes(payload, "big") ^ int.from_bytes(keys, "big")).to_bytes(n, "big")
    return head + key + payload


class AsokWS:
    """The same interface over asok's own AsyncWebSocketClient."""

    def __init__(self, client):
        self.client = client

    @classmethod
    async def connect(cls, port, path, cookie=None, timeout=10):
        import asok
        headers = {"Cookie": cookie} if cookie else {}
        client = await asok.AsyncWebSocketClient.connect(
            f"ws://127.0.0.1:{port}{path}", origin=f"http://127.0.0.1:{port}", headers=headers,
            timeout=timeout)
        return cls(client)

    def send(self, text):
        # AsyncWebSocketClient.send is a coroutine; the write itself happens before its drain.
        return self.client.send(text)

    async def recv(self, timeout=REPLY_TIMEOUT):
        return await self.client.receive(timeout)

    async def close(self):
        try:
            await asyncio.wait_for(self.client.close(), 2)
        except (asyncio.TimeoutError, OSError):
            pass


class Stats:
    def __init__(self):
        self.latencies = []     # ns, events completed inside the window
        self.events = 0         # events completed inside the window
        self.total = 0          # events answered, all phases
        self.lost = 0           # sent without a good reply
        self.out_of_order = 0   # count not previous + 1
        self.final_mismatch = 0  # clients whose last count / session clicks disagree with clicks
        self.errors = []

    def answered(self, took, window):
        """An event answered right, `took` ns after it was sent; timed if the window measures."""
        self.total += 1
        if window.measuring:
            self.latencies.append(took)
            self.events += 1


async def timed(stats, t0, waiting):
    """(what `waiting` gives, ns since t0), or (None, 0) counted as lost: a timeout or a closed socket."""
    try:
        result = await waiting
    except (TimeoutError, ConnectionError) as exc:
        stats.lost += 1
        stats.errors.append(repr(exc))
        return None, 0
    return result, time.perf_counter_ns() - t0


class Window:
    measuring = False
    stopped = False


async def send(ws, text):
    result = ws.send(text)
    if result is not None:
        await result


async def asok_exchange(ws, rid, text, stats):
    """One call and its reply, as alive.js makes them: (the reply's data, nanoseconds it took),
    or (None, 0) once counted as lost (a timeout, a refusal, the reply of another request)."""
    t0 = time.perf_counter_ns()
    await send(ws, text)
    reply, took = await timed(stats, t0, ws.recv())
    if reply is None:
        return None, 0
    data = json.loads(reply)
    if data.get("id") != rid or "error" in data:
        stats.lost += 1
        stats.errors.append(reply[:300])
        return None, 0
    return data, took


async def live_client(ws, visitor, stats, window, turns=None, side=0):
    """Click increment like alive.js: next event after the reply, with the new state. With
    `turns` (a Turns), `turns.block` at a time, in the turns it gives `side`, timed only there."""
    page = f"{random.random()}:"
    state, prev, start, clicks, held = visitor.state, visitor.count, visitor.count, 0, None
    for n in range(1, MAX_EVENTS_PER_CLIENT + 1):
        if turns is not None:
            await turns.wait(side, window)
        if window.stopped:
            break
        rid = page + str(n)
        text = asok_call(rid, visitor.cid, visitor.component, state, "increment", [], visitor.csrf, held)
        data, took = await asok_exchange(ws, rid, text, stats)
        if data is None:
            break
        state = data["state"]
        held = asok_html(data, held)
        count = int(COUNT_RE.search(held[1]).group(1))
        if count != prev + 1:
            stats.out_of_order += 1
        prev = count
        clicks += 1
        if turns is None or turns.started is not None:
            stats.answered(took, window)
        else:
            stats.total += 1
        last_html = held[1]
        if turns is not None:
            turns.done(side, window)
    if turns is not None:
        turns.changed.set()  # (the other side, if it waits, sees the window stopped)
    if clicks:
        pcount = int(PCOUNT_RE.search(last_html).group(1))
        if prev != start + clicks or pcount != visitor.pcount + clicks:
            stats.final_mismatch += 1
            stats.errors.append(f"last count {prev} (expected {start + clicks}), "
                                f"session clicks {pcount} (expected {visitor.pcount + clicks})")


async def echo_client(ws, size, stats, window):
    for n in range(1, MAX_EVENTS_PER_CLIENT + 1):
        if window.stopped:
            break
        head = f'{{"id":"{random.random()}:{n}","pad":"'
        text = head + "x" * max(0, size - len(head) - 2) + '"}'
        t0 = time.perf_counter_ns()
        await send(ws, text)
        reply, took = await timed(stats, t0, ws.recv())
        if reply is None:
            break
        if reply != text:
            stats.lost += 1
            stats.errors.append("echo differs")
            break
        stats.answered(took, window)


def percentile(values, p):
    if not values:
        return float("nan")
    values = sorted(values)
    k = min(len(values) - 1, max(0, round(p / 100 * len(values) + 0.5) - 1))
    return values[k]


async def ws_run(server, clients, make_task, warm, secs, client_kind):
    """Run `clients` tasks (made by make_task(ws, stats, window)) for warm + secs seconds."""
    cls = client_kind if isinstance(client_kind, type) else AsokWS if client_kind == "asok" else RawWS
    stats, window = Stats(), Window()
    conns, tasks = [], []
    try:
        for ws_args in clients:
            conns.append(await cls.connect(server.port, *ws_args))
        tasks = [asyncio.ensure_future(make_task(ws, i, stats, window)) for i, ws in enumerate(conns)]
        await asyncio.sleep(warm)
        cpu0, self0, t0 = server.cpu(), self_cpu_seconds(), time.perf_counter()
        window.measuring = True
        await asyncio.sleep(secs)
        window.measuring = False
        cpu1, self1, t1 = server.cpu(), self_cpu_seconds(), time.perf_counter()
        window.stopped = True
        done, pending = await asyncio.wait(tasks, timeout=REPLY_TIMEOUT + 2)
        for task in pending:
            task.cancel()
            stats.errors.append("client did not finish")
        for task in done:
            if task.exception() is not None:
                stats.errors.append(repr(task.exception()))
    finally:
        for task in tasks:
            task.cancel()
        for ws in conns:
            await ws.close()
    wall = t1 - t0
    lat = stats.latencies
    return {
        "connections": len(clients),
        "events_per_s": stats.events / wall,
        "p50_ms": percentile(lat, 50) / 1e6,
        "p99_ms": percentile(lat, 99) / 1e6,
        "server_cpu_us_per_event": (cpu1 - cpu0) / max(stats.events, 1) * 1e6,
        "server_cpu_pct": (cpu1 - cpu0) / wall * 100,
        "client_cpu_pct": (self1 - self0) / wall * 100,
        "events": stats.events,
        "events_all_phases": stats.total,
        "lost": stats.lost,
        "out_of_order": stats.out_of_order,
        "final_mismatch": stats.final_mismatch,
        "errors": stats.errors[:5],
    }


def run_live(tmp, opts, cfg):
    results = {}
    with asok_server("counter", tmp, "counter-live") as server:
        for n in (1, 50):
            visitors = [Visitor(server.port) for _ in range(n)]
            clients = [("/asok/live", v.cookie) for v in visitors]

            def task(ws, i, stats, window):
                return live_client(ws, visitors[i], stats, window)
            results[f"live{n}"] = asyncio.run(ws_run(server, clients, task, cfg["live_warm"],
                                                     cfg["live_secs"], opts.client))
        probe = Visitor(server.port)
        size = len(json.dumps({"id": f"{random.random()}:1", "cid": probe.cid, "component": probe.component,
                               "state": probe.state, "method": "increment", "args": [], "csrf": probe.csrf},
                              separators=(",", ":")))
    with asok_server("echo", tmp, "echo") as server:
        for n in (1, 50):
            clients = [("/echo", None)] * n

            def task(ws, i, stats, window):
                return echo_client(ws, size, stats, window)
            results[f"echo{n}"] = asyncio.run(ws_run(server, clients, task, cfg["live_warm"],
                                                     cfg["live_secs"], opts.client))
            results[f"echo{n}"]["message_bytes"] = size
    return results


# ═══ Pages: wrk against asok and the baseline ════════════════════════════

def wrk(port, conns, secs, cookie=None):
    cmd = ["wrk", "-t1", f"-c{conns}", f"-d{secs}s", "--latency", "--timeout", "5s"]
    if cookie:
        cmd += ["-H", f"Cookie: {cookie}"]
    cmd.append(f"http://127.0.0.1:{port}/")
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=secs + 30,
                         preexec_fn=pinned(LOAD_CORE)).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    p99 = re.search(r"^\s+99%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
    p50 = re.search(r"^\s+50%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
    scale = {"us": 1e-3, "ms": 1.0, "s": 1e3}
    bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    errors = re.search(r"Socket errors:(.*)", out)
    total = re.search(r"(\d+) requests in", out)
    return {"secs": secs, "requests": int(total.group(1)) if total else 0,
            "errors": (int(bad.group(1)) if bad else 0) + sum(map(int, re.findall(r"\d+", errors.group(1) if errors else ""))),
            "req_per_s": rps, "p50_ms": float(p50.group(1)) * scale[p50.group(2)],
            "p99_ms": float(p99.group(1)) * scale[p99.group(2)],
            "non_2xx": int(bad.group(1)) if bad else 0,
            "socket_errors": errors.group(1).strip() if errors else ""}


def wrk_cpu(server, conns, secs, cookie=None):
    """wrk plus the server's CPU per request (from /proc) and its share of a core."""
    cpu0, t0 = server.cpu(), time.perf_counter()
    r = wrk(server.port, conns, secs, cookie)
    cpu, wall = server.cpu() - cpu0, time.perf_counter() - t0
    r["server_cpu_pct"] = cpu / wall * 100
    r["server_cpu_us_per_req"] = cpu / max(r["req_per_s"] * secs, 1) * 1e6
    return r


def run_pages(tmp, cfg):
    if shutil.which("wrk") is None:
        raise RuntimeError("wrk is not installed (apt-get install wrk; `make bench` does it)")
    results = {}
    with asok_server("counter", tmp, "counter-page") as server:
        visitor = Visitor(server.port)
        http_get(server.port, cookie=visitor.cookie)   # warm: a returning visitor's page
        results["page_bytes"] = {"body": visitor.page_body, "wire": visitor.page_wire}
        status, headers, alive, _ = http_get(server.port, "/asok/alive.js")
        results["alive_js"] = {"status": status, "bytes": len(alive),
                               "gzip9": len(gzip.compress(alive, compresslevel=9, mtime=0))}
        for n in (1, 10):
            results[f"page{n}"] = wrk_cpu(server, n, cfg["wrk_secs"], visitor.cookie)
        results["page10_nocookie"] = wrk_cpu(server, 10, cfg["wrk_nocookie_secs"])
    with baseline_server(tmp) as server:
        for n in (1, 10):
            results[f"baseline{n}"] = wrk_cpu(server, n, cfg["wrk_secs"])
    return results


# ═══ Scale-out: --workers 2 beside one worker; the Redis store beside the file store ═══
# Neither server is pinned here: with two workers the point is to use both cores, and the one
# worker it is compared with gets the same freedom. The load generator stays on its core, so
# on this 2-core machine the workers share a core with it. Both run in the same step, one after
# the other, twice, alternating which goes first.

REDIS_APP = """
import os
import redis
from asok import Asok, RedisBroker, RedisSessionStore
client = redis.Redis(host="127.0.0.1", port=int(os.environ["BENCH_REDIS_PORT"]))
app = Asok(__file__, session_store=RedisSessionStore(client), broker=RedisBroker(client))
"""


def live50(server, opts, cfg, n=50):
    visitors = [Visitor(server.port) for _ in range(n)]

    def task(ws, i, stats, window):
        return live_client(ws, visitors[i], stats, window)
    return asyncio.run(ws_run(server, [("/asok/live", v.cookie) for v in visitors], task,
                              cfg["live_warm"], cfg["live_secs"], opts.client))


def run_scale(tmp, opts, cfg):
    results = {"workers1": [], "workers2": []}
    for turn in range(2):
        for workers in ((1, 2) if turn == 0 else (2, 1)):
            label = f"counter-w{workers}-{turn}"
            with asok_server("counter", tmp, label, "--workers", str(workers), pin=False) as server:
                visitor = Visitor(server.port)
                page = wrk_cpu(server, 10, cfg["wrk_secs"], visitor.cookie)
                live = live50(server, opts, cfg)
                results[f"workers{workers}"].append({"page10": page, "live50": live})
    redis_exe = shutil.which("redis-server")
    if redis_exe is None:
        results["redis"] = {"skipped": "redis-server is not installed (make bench installs it)"}
        return results
    try:
        import redis  # noqa: F401  (the app imports it; the bench only checks it is there)
    except ImportError:
        results["redis"] = {"skipped": "redis-py is not installed in this Python (make deps)"}
        return results
    port = free_port()
    redis_proc = subprocess.Popen([redis_exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                   "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not _listening(port):
            if time.monotonic() > deadline:
                raise RuntimeError("redis-server did not start")
            time.sleep(0.05)
        store = {}
        for kind, files in (("file", None), ("redis", {"app.py": REDIS_APP})):
            with asok_server("counter", tmp, f"counter-{kind}-store", files=files,
                             env={"BENCH_REDIS_PORT": str(port)}) as server:
                store[kind] = live50(server, opts, cfg)
        results["redis"] = store
    finally:
        redis_proc.kill()
        redis_proc.wait()
    return results


def _listening(port):
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False


# ═══ Templates: asok beside Jinja2 ═══════════════════════════════════════

ROWS_BASE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{% block title %}asok{% endblock %}</title>
</head>
<body>
<header><h1>{% block heading %}Report{% endblock %}</h1></header>
<main>
{% block main %}{% endblock %}
</main>
<footer>{{ footer }}</footer>
</body>
</html>
"""

ROWS_PAGE = """{% extends "base.html" %}
{% block title %}{{ title }}{% endblock %}
{% block main %}
<table>
<tr><th>#</th><th>Name</th><th>Email</th><th>Score</th></tr>
{% for row in rows %}
<tr class="{% if loop.first %}first{% elif loop.last %}last{% endif %}">
<td>{{ loop.index }}</td><td>{{ row.name | title }}</td><td>{{ row.email }}</td><td>{{ row.score }}</td>
</tr>
{% endfor %}
</table>
{% endblock %}
"""


def template_fixture(tmp):
    folder = Path(tmp) / "templates"
    folder.mkdir()
    (folder / "base.html").write_text(ROWS_BASE)
    (folder / "rows.html").write_text(ROWS_PAGE)
    shutil.copy(EXAMPLES / "counter" / "src" / "components" / "counter.html", folder / "counter.html")
    rows = [{"name": f"user {i} smith & <co>", "email": f"o'neil{i}@example.com", "score": i * 7 % 101}
            for i in range(100)]
    contexts = {
        "counter.html": {"count": 10, "session": {"pcount": 3}},
        "rows.html": {"title": "Scores & ranks", "rows": rows, "footer": "made with <3"},
    }
    return folder, contexts


def time_renders(render, secs, rounds):
    """Best renders/s over `rounds` rounds of about `secs` seconds each."""
    best = 0.0
    render()
    for _ in range(rounds):
        n, batch = 0, 50
        start = time.perf_counter()
        deadline = start + secs
        while True:
            for _ in range(batch):
                render()
            n += batch
            now = time.perf_counter()
            if now >= deadline or n >= 10_000_000:
                break
        best = max(best, n / (now - start))
    return best


def run_templates(tmp, cfg):
    import asok
    import jinja2
    folder, contexts = template_fixture(tmp)
    ours = asok.Templates(folder)
    theirs = jinja2.Environment(loader=jinja2.FileSystemLoader(str(folder)), autoescape=True,
                                auto_reload=False)
    results = {}
    for name, ctx in contexts.items():
        a, j = ours.get(name), theirs.get_template(name)
        out_a, out_j = a.render(**ctx), j.render(**ctx)
        same = html.unescape(out_a).split() == html.unescape(out_j).split()
        asok_rps = time_renders(lambda: a.render(**ctx), cfg["tpl_secs"], cfg["tpl_rounds"])
        jinja_rps = time_renders(lambda: j.render(**ctx), cfg["tpl_secs"], cfg["tpl_rounds"])
        results[name] = {"asok_per_s": asok_rps, "jinja2_per_s": jinja_rps, "ratio": asok_rps / jinja_rps,
                         "same_output": same, "bytes": len(out_a.encode())}
    results["jinja2_version"] = jinja2.__version__
    return results


# ═══ Memory: RSS per idle WebSocket ══════════════════════════════════════

def run_idle(tmp, cfg):
    n = cfg["idle_conns"]
    limit = raise_fd_limit(n * 2 + 512)
    if limit < n + 256:
        return {"skipped": f"fd limit {limit} is below {n + 256}"}

    async def main(server, cookie):
        conns = []
        try:
            warm = [await RawWS.connect(server.port, "/asok/live", cookie) for _ in range(20)]
            for ws in warm:
                await ws.close()
            await asyncio.sleep(0.5)
            before = server.rss()
            for start in range(0, n, 100):
                batch = [RawWS.connect(server.port, "/asok/live", cookie) for _ in range(min(100, n - start))]
                conns += await asyncio.wait_for(asyncio.gather(*batch), 30)
            await asyncio.sleep(1.0)
            after = server.rss()
            alive = sum(not ws.closed for ws in conns)
            return before, after, alive
        finally:
            for ws in conns:
                await ws.close()

    with asok_server("counter", tmp, "counter-idle") as server:
        visitor = Visitor(server.port)
        before, after, alive = asyncio.run(main(server, visitor.cookie))
    return {"connections": n, "open_at_measure": alive, "rss_before_mib": before / 2**20,
            "rss_after_mib": after / 2**20, "kib_per_conn": (after - before) / n / 1024}


# ═══ Memory: RSS after greedy clients ════════════════════════════════════

def proc_peak_rss_bytes(pid):
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def ws_open(port, cookie=None):
    """A blocking socket after a WebSocket handshake on /asok/live (the greedy clients' side)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    key = base64.b64encode(os.urandom(16)).decode()
    head = (f"GET /asok/live HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
            + (f"Cookie: {cookie}\r\n" if cookie else "") + "\r\n")
    sock.sendall(head.encode())
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            raise RuntimeError(f"closed during the handshake: {data!r}")
        data += chunk
    if not data.startswith(b"HTTP/1.1 101"):
        raise RuntimeError(f"upgrade refused: {data[:80]!r}")
    return sock


def flood(sock, data, limit):
    """Send `data` again and again until `limit` bytes went or the server stopped taking them
    for 2 s (or closed); the bytes sent."""
    sock.settimeout(2)
    sent = 0
    try:
        while sent < limit:
            sock.sendall(data)
            sent += len(data)
    except OSError:
        pass
    return sent


def run_greedy(tmp, cfg):
    """The counter server's RSS when idle, then after each greedy client of issue 10 has done
    its worst (each kept open, none reading), and whether a normal client still gets a correct
    increment. Each case is bounded in bytes and in time (a flood stops after 2 s refused)."""
    limit = raise_fd_limit(cfg["greedy_bodies"] + 512)
    bodies = min(cfg["greedy_bodies"], limit - 256)
    with asok_server("counter", tmp, "counter-greedy") as server:
        visitor = Visitor(server.port)
        for _ in range(20):  # warm: pages and increments, so the idle figure is not a cold start
            asyncio.run(_one_increment(server.port, visitor))
        time.sleep(0.5)
        idle = server.rss()
        held, cases = [], {}
        try:
            sock = ws_open(server.port)
            cases["pings, pongs never read"] = flood(sock, frame(0x9, b"p" * 125) * 1000, 64 << 20)
            held.append(sock)
            event = json.dumps({"id": "g:1", "cid": visitor.cid, "component": "X" * 200_000, "state": "s",
                                "method": "m", "args": [], "csrf": visitor.csrf}).encode()
            sock = ws_open(server.port, visitor.cookie)
            cases["200 KB refusals never read"] = flood(sock, frame(0x1, event), 256 << 20)
            held.append(sock)
            sock = ws_open(server.port, visitor.cookie)
            huge = frame(0x1, b'{"id": "' + b"x" * (16 << 20) + b'"}')
            cases["16 MiB events"] = flood(sock, huge, 4 * len(huge))
            held.append(sock)
            sock = ws_open(server.port, visitor.cookie)
            opening = bytearray(frame(0x1, b"[1"))
            opening[0] &= 0x7F  # not final: the fragments below continue it
            tiny = bytearray(frame(0x0, b",1"))
            tiny[0] &= 0x7F
            cases["2,000,000 fragments"] = flood(sock, bytes(opening) + bytes(tiny) * 2_000_000, 32 << 20)
            held.append(sock)
            trickling = []
            for _ in range(bodies):
                sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
                sock.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\nx")
                trickling.append(sock)
            held += trickling
            cases[f"{bodies} bodies a byte at a time"] = bodies
            time.sleep(1.0)
            after, peak = server.rss(), proc_peak_rss_bytes(server.pid)
            served = asyncio.run(_one_increment(server.port, visitor))
        finally:
            for sock in held:
                sock.close()
    return {"idle_mib": idle / 2**20, "after_mib": after / 2**20, "peak_mib": peak / 2**20,
            "growth_mib": (max(after, peak) - idle) / 2**20, "normal_increment_ok": served,
            "bytes_sent": cases}


async def _one_increment(port, visitor):
    """One increment by a well-behaved client: True if it answers the count plus one."""
    ws = await RawWS.connect(port, "/asok/live", visitor.cookie)
    try:
        rid = f"{random.random()}:1"
        await send(ws, json.dumps({"id": rid, "cid": visitor.cid, "component": visitor.component,
                                   "state": visitor.state, "method": "increment", "args": [],
                                   "csrf": visitor.csrf}))
        data = json.loads(await ws.recv())
        if data.get("id") != rid or "error" in data:
            return False
        count = int(COUNT_RE.search(data["html"]).group(1))
        ok = count == visitor.count + 1
        visitor.state, visitor.count = data["state"], count
        return ok
    finally:
        await ws.close()


# ═══ Push fan-out: one publish to 1,000 views of 1,000 sessions ══════════

FANOUT_FILES = {
    "app.py": '''from asok import Asok

app = Asok(__file__)


@app.route("/publish/<int:n>")
def publish(n):
    app.publish("fanout", n)
    return "ok"


@app.route("/live-stats")
def live_stats():
    return app.live.stats()
''',
    "src/components/Ping.py": '''from asok import Component, on


class Ping(Component):
    on_loop = ON_LOOP  # True: its handler never blocks, applied on the event loop; False: in threads
    n = 0

    @on("fanout")
    def heard(self, n):
        self.n = n
''',
    "src/components/ping.html": "<p>n = {{ n }}</p>",
    "src/pages/index.html": "<!doctype html><title>fan-out</title>{{ component('Ping') }}",
}


def run_fanout(tmp, cfg):
    """The fan-out of one publish (run_fanout_once), with Ping's handler on the event loop
    (`on_loop = True`, the target) and in threads (the default)."""
    result = run_fanout_once(tmp, cfg, True)
    if "skipped" not in result:
        result["threads"] = run_fanout_once(tmp, cfg, False)
    return result


def run_fanout_once(tmp, cfg, on_loop):
    """One publish to `fanout_views` views, each of its own session (as many browsers), on one
    server: time from the publish until the last view has its new HTML (p50 / p99 over
    `fanout_rounds` publishes), server CPU per delivered update, and RSS per joined view."""
    n, rounds = cfg["fanout_views"], cfg["fanout_rounds"]
    limit = raise_fd_limit(n * 2 + 512)
    if limit < n + 256:
        return {"skipped": f"fd limit {limit} is below {n + 256}"}
    folder = Path(tmp) / f"fanout-{'loop' if on_loop else 'threads'}"
    for rel, text in FANOUT_FILES.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_text(text.replace("ON_LOOP", str(on_loop)))
    port = free_port()
    argv = [sys.executable, str(ASOK), "serve", str(folder), "--port", str(port), "--no-access-log"]

    def visitor():
        status, headers, body, _ = http_get(port)
        text = body.decode()
        cookie = "; ".join(v.split(";")[0] for k, v in headers if k.lower() == "set-cookie")
        cid, name, state = COMPONENT_RE.findall(text)[0]
        return cookie, CSRF_RE.search(text).group(1), html.unescape(cid), name, html.unescape(state)

    async def main(server):
        visitors = [visitor() for _ in range(n)]
        conns = []
        try:
            before = server.rss()
            for start in range(0, n, 100):
                batch = [RawWS.connect(port, "/asok/live", v[0]) for v in visitors[start:start + 100]]
                conns += await asyncio.wait_for(asyncio.gather(*batch), 30)
            for ws, (cookie, csrf, cid, name, state) in zip(conns, visitors):
                ws.send(json.dumps({"join": [[cid, name, state]], "url": "/", "csrf": csrf}))
            deadline = time.monotonic() + 30
            while json.loads(http_get(port, "/live-stats")[2])["views"] < n:
                if time.monotonic() > deadline:
                    raise RuntimeError("the views did not all join within 30 s")
                await asyncio.sleep(0.1)
            await asyncio.sleep(0.5)
            joined_rss = server.rss()
            loop = asyncio.get_running_loop()
            times, missed = [], 0
            for k in range(0, rounds + 1):  # publish 0 is the first save of 1,000 sessions: timed apart
                if k == 1:
                    cpu0 = server.cpu()
                want = f"n = {100 + k}<"

                async def updated(ws):
                    while True:
                        message = await ws.recv(timeout=10)
                        if want in message:
                            return time.perf_counter()

                waits = [asyncio.ensure_future(updated(ws)) for ws in conns]
                t0 = time.perf_counter()
                await loop.run_in_executor(None, http_get, port, f"/publish/{100 + k}")
                done = await asyncio.gather(*waits, return_exceptions=True)
                arrived = [t for t in done if isinstance(t, float)]
                missed += len(done) - len(arrived)
                times.append((max(arrived) - t0) * 1000 if arrived else float("nan"))
                await asyncio.sleep(0.3)
            cpu = server.cpu() - cpu0
            cold, times = times[0], times[1:]
            return {"views": n, "rounds": rounds, "last_view_ms": times, "missed": missed, "cold_ms": cold,
                    "p50_ms": percentile(times, 50), "p99_ms": percentile(times, 99),
                    "server_cpu_us_per_update": cpu / (n * rounds) * 1e6,
                    "kib_per_joined_view": (joined_rss - before) / n / 1024}
        finally:
            for ws in conns:
                await ws.close()

    with Server(argv, port, tmp, f"fanout-{'loop' if on_loop else 'threads'}") as server:
        return asyncio.run(main(server))


# ═══ Bytes of one increment ══════════════════════════════════════════════

def run_increment_bytes(tmp):
    async def main(server):
        v = Visitor(server.port)
        ws = await RawWS.connect(server.port, "/asok/live", v.cookie)
        try:
            state, held = v.state, None
            for n in range(2):  # the second is an increment on a saved counter whose HTML the page holds
                text = asok_call(f"{random.random()}:{n}", v.cid, v.component, state, "increment", [], v.csrf, held)
                ws.send(text)
                reply = await ws.recv()
                if "error" not in json.loads(reply):
                    state, held = json.loads(reply)["state"], asok_html(json.loads(reply), held)
        finally:
            await ws.close()
        if "error" in json.loads(reply):
            raise RuntimeError(f"increment refused: {reply}")
        req, rep = len(text.encode()), len(reply.encode())
        return {"request": req, "request_frame": len(frame(1, text.encode())),
                "reply": rep, "reply_frame": rep + (2 if rep < 126 else 4)}

    with asok_server("counter", tmp, "counter-bytes") as server:
        return asyncio.run(main(server))


# ═══ A 10 MiB upload: through a page route and through the live component ═══

UPLOAD_BYTES = 10 << 20
UPLOAD_ROUTE = """from asok import Asok

app = Asok(__file__)


@app.route("/bench-upload", methods=["POST"], csrf=False)
def bench_upload(request):
    upload = request.files["photo"]
    return {"size": upload.size, "first": upload.read(8).hex()}
"""


class RSSPeak:
    """Samples a process's RSS every 2 ms in a thread while the `with` block runs."""

    def __init__(self, pid):
        self.pid, self.peak, self.done = pid, 0, None

    def __enter__(self):
        import threading
        self.done = threading.Event()
        self.peak = proc_rss_bytes(self.pid)

        def sample():
            for _ in range(100_000):  # ~200 s at most
                self.peak = max(self.peak, proc_rss_bytes(self.pid))
                if self.done.wait(0.002):
                    return

        self.thread = threading.Thread(target=sample, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.done.set()
        self.thread.join(5)
        self.peak = max(self.peak, proc_rss_bytes(self.pid))


def post_multipart(port, path, fields, data, cookie=None):
    """POST fields and `data` as the file `photo` (multipart); the JSON answer."""
    boundary = "bench" + secrets.token_hex(8)
    head = "".join(f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'
                   for k, v in fields.items())
    head += (f'--{boundary}\r\nContent-Disposition: form-data; name="photo"; filename="big.png"\r\n'
             f"Content-Type: image/png\r\n\r\n")
    tail = f"\r\n--{boundary}--\r\n".encode()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.putrequest("POST", path)
        conn.putheader("Content-Type", f"multipart/form-data; boundary={boundary}")
        conn.putheader("Content-Length", str(len(head.encode()) + len(data) + len(tail)))
        if cookie:
            conn.putheader("Cookie", cookie)
        conn.endheaders()
        conn.send(head.encode())
        view = memoryview(data)
        for at in range(0, len(data), 256 * 1024):  # as a browser sends it: in pieces, not one buffer
            conn.send(view[at:at + 256 * 1024])
        conn.send(tail)
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def run_upload(tmp, cfg):
    """MiB/s and the server's peak RSS growth for a 10 MiB file: POSTed to a route that reads
    request.files, and uploaded for examples/upload's Avatar as alive.js does (POST /asok/upload,
    then the live event whose method gets the UploadedFile)."""
    sys.path.insert(0, str(HERE))
    import asok
    data = b"\x89PNG\r\n\x1a\n" + os.urandom(UPLOAD_BYTES - 8)
    out = {}
    with asok_server("upload", tmp, "upload", files={"app.py": UPLOAD_ROUTE}) as server:
        page = http_get(server.port)
        cookie = next(v.split(";")[0] for k, v in page[1] if k.lower() == "set-cookie")
        text = page[2].decode()
        csrf = CSRF_RE.search(text).group(1)
        cid, name, state = (html.unescape(x) for x in COMPONENT_RE.search(text).groups())
        post_multipart(server.port, "/bench-upload", {}, data[:4096])  # warm: imports, first allocations
        rounds = []
        for _ in range(cfg.get("upload_rounds", 3)):
            time.sleep(0.3)
            base = server.rss()
            with RSSPeak(server.pid) as peak:
                t = time.perf_counter()
                status, answer = post_multipart(server.port, "/bench-upload", {}, data)
                elapsed = time.perf_counter() - t
            if status != 200 or answer["size"] != UPLOAD_BYTES:
                raise RuntimeError(f"the page route answered {status} {answer}")
            rounds.append((UPLOAD_BYTES / 2**20 / elapsed, (peak.peak - base) / 2**20))
        out["route"] = {"mib_per_s": median([r[0] for r in rounds]), "rss_growth_mib": max(r[1] for r in rounds),
                        "rounds": rounds}
        ws = asok.WebSocketClient.connect(f"ws://127.0.0.1:{server.port}/asok/live",
                                          origin=f"http://127.0.0.1:{server.port}", headers={"Cookie": cookie})
        try:
            rounds = []
            for n in range(cfg.get("upload_rounds", 3)):
                time.sleep(0.3)
                base = server.rss()
                with RSSPeak(server.pid) as peak:
                    t = time.perf_counter()
                    status, answer = post_multipart(server.port, "/asok/upload", {
                        "cid": cid, "component": name, "state": state, "csrf_token": csrf}, data, cookie)
                    if status != 200:
                        raise RuntimeError(f"/asok/upload answered {status} {answer}")
                    ws.send(json.dumps({"id": f"bench:{n}", "cid": cid, "component": name, "state": state,
                                        "method": "save", "csrf": csrf,
                                        "args": [{"name": "bench", "photo": {"$upload": answer["files"]["photo"][0]}}]}))
                    reply = json.loads(ws.receive(timeout=30))
                    elapsed = time.perf_counter() - t
                if "error" in reply or "1 MiB at most" not in reply.get("html", ""):
                    raise RuntimeError(f"the live event did not reach the method: {str(reply)[:300]}")
                state = reply["state"]
                rounds.append((UPLOAD_BYTES / 2**20 / elapsed, (peak.peak - base) / 2**20))
        finally:
            ws.close()
        left = list((Path(tmp) / "upload" / ".asok" / "uploads").glob("*"))
        out["live"] = {"mib_per_s": median([r[0] for r in rounds]), "rss_growth_mib": max(r[1] for r in rounds),
                       "rounds": rounds, "files_left": len(left)}
    return out


# ═══ Beside pyview: the same load generator against a pyview counter ═════

PYVIEW_PYTHON = HERE / ".venv-pyview" / "bin" / "python"   # `make bench` creates it (pyview-web, uvicorn[standard])
LIST_ROWS, LIST_ROW = 1000, 500      # the list component's rows, and the row one event changes
BIG_ROWS = 10_000                    # the growth target's list: one row of 10,000 changes per event
OTHERS = 199                         # the growth target's other components saved in the session
MANY_BLOCK = 20                      # events per turn when the two growth sessions take turns

# One template for both list components; {button} is each framework's way to call bump(500).
LIST_TEMPLATE = """<div>
{button}
<table>
{{% for row in rows %}}<tr id="row-{{{{ row.id }}}}"><td>{{{{ row.name }}}}</td><td>{{{{ row.score }}}}</td></tr>
{{% endfor %}}</table>
</div>
"""
ASOK_LIST_BUTTON = f'<button ws-click="bump({LIST_ROW})">Bump row {LIST_ROW}</button>'
PYVIEW_LIST_BUTTON = f'<button phx-click="bump" phx-value-i="{LIST_ROW}">Bump row {LIST_ROW}</button>'

ASOK_LIST_COMPONENT = f'''from asok.component import Component, exposed


class Rows(Component):
    rows = []

    def mount(self):
        self.rows = [{{"id": i, "name": f"row {{i}}", "score": 0}} for i in range({LIST_ROWS})]

    @exposed
    def bump(self, i: int):
        self.rows[i]["score"] += 1
'''

ASOK_LIST_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>rows</title>
</head>
<body>
{{ component('Rows') }}
</body>
</html>
"""

# pyview's documented shape: a LiveView class in a module, its template in the .html beside it,
# PyView().add_live_view(path, view), a rootTemplate callable; pyview's static app.js mounted.
PYVIEW_COUNTER_VIEW = '''from pyview import LiveView, LiveViewSocket


class CounterLiveView(LiveView):
    """examples/counter: starts at 10; increment also counts the clicks of this session."""

    async def mount(self, socket: LiveViewSocket, session):
        socket.context = {"count": 10, "pcount": session.get("pcount", 0)}

    async def handle_event(self, event, payload, socket: LiveViewSocket):
        if event == "increment":
            socket.context["count"] += 1
            socket.context["pcount"] += 1
        elif event == "decrement":
            socket.context["count"] -= 1
'''

PYVIEW_LIST_VIEW = f'''from pyview import LiveView, LiveViewSocket


class RowsLiveView(LiveView):
    async def mount(self, socket: LiveViewSocket, session):
        socket.context = {{"rows": [{{"id": i, "name": f"row {{i}}", "score": 0}} for i in range({LIST_ROWS})]}}

    async def handle_event(self, event, payload, socket: LiveViewSocket):
        if event == "bump":
            socket.context["rows"][int(payload["i"])]["score"] += 1
'''

PYVIEW_APP = '''import os

os.environ.setdefault("PYVIEW_SECRET", os.environ.get("SECRET_KEY", ""))

from starlette.staticfiles import StaticFiles  # noqa: E402

from pyview import PyView  # noqa: E402
from pv_counter import CounterLiveView  # noqa: E402
from pv_rows import RowsLiveView  # noqa: E402
from pv_rows10k import BigRowsLiveView  # noqa: E402

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>pyview</title>
<style>
body { font: 16px/1.5 system-ui, sans-serif; max-width: 40rem; margin: 2rem auto; padding: 0 1rem; }
button { font: inherit; padding: .3rem .8rem; margin-right: .4rem; }
.phx-click-loading { opacity: .7; }
.phx-disconnected body { outline: 3px solid #e66; }
</style>
<meta name="csrf-token" content="%(csrf)s"><script src="/static/assets/app.js" defer></script></head>
<body>

<h1>Welcome</h1>
<div data-phx-main="true" data-phx-session="%(session)s" data-phx-static="" id="phx-%(id)s">%(content)s</div>

</body>
</html>
"""


def root_template(context):
    return PAGE % {"csrf": context["csrf_token"], "session": context["session"], "id": context["id"],
                   "content": context["content"]}


app = PyView()
app.mount("/static", StaticFiles(packages=[("pyview", "static")]), name="static")
app.rootTemplate = root_template
app.add_live_view("/", CounterLiveView)
app.add_live_view("/rows", RowsLiveView)
app.add_live_view("/rows10k", BigRowsLiveView)
'''


def pyview_counter_template():
    """examples/counter's counter.html with pyview's attribute and variable names."""
    src = (EXAMPLES / "counter" / "src" / "components" / "counter.html").read_text()
    out = src.replace('ws-click="', 'phx-click="').replace('session.get("pcount", 0)', "pcount")
    if "ws-" in out or "{%" in out or set(re.findall(r"\{\{\s*(.*?)\s*\}\}", out)) - {"count", "pcount"}:
        raise RuntimeError("examples/counter/src/components/counter.html uses markup bench.py cannot give "
                           "pyview yet: update pyview_counter_template() in bench.py")
    return out


def pyview_versions(python):
    code = ("import importlib.metadata as m, json; print(json.dumps({p: m.version(p) for p in "
            "('pyview-web', 'uvicorn', 'uvloop', 'httptools', 'websockets', 'starlette')}))")
    out = subprocess.run([str(python), "-c", code], capture_output=True, text=True, timeout=60)
    if out.returncode:
        raise RuntimeError(f"{python} cannot report pyview's versions: {out.stderr[-500:]}")
    return json.loads(out.stdout)


def pyview_server(tmp, python):
    """uvicorn serving the pyview app written from the strings above, on a free port."""
    folder = Path(tmp) / "pyview-app"
    folder.mkdir(exist_ok=True)
    (folder / "bench_pyview_app.py").write_text(PYVIEW_APP)
    (folder / "pv_counter.py").write_text(PYVIEW_COUNTER_VIEW)
    (folder / "pv_counter.html").write_text(pyview_counter_template())
    (folder / "pv_rows.py").write_text(PYVIEW_LIST_VIEW)
    (folder / "pv_rows.html").write_text(LIST_TEMPLATE.format(button=PYVIEW_LIST_BUTTON))
    (folder / "pv_rows10k.py").write_text(PYVIEW_LIST_VIEW.replace(f"range({LIST_ROWS})", f"range({BIG_ROWS})")
                                          .replace("class RowsLiveView", "class BigRowsLiveView"))
    (folder / "pv_rows10k.html").write_text(LIST_TEMPLATE.format(button=PYVIEW_LIST_BUTTON))
    port = free_port()
    argv = [str(python), "-m", "uvicorn", "bench_pyview_app:app", "--host", "127.0.0.1", "--port", str(port),
            "--loop", "uvloop", "--http", "httptools", "--no-access-log", "--log-level", "warning"]
    return Server(argv, port, folder, "pyview")


def asok_list_server(tmp, rows=LIST_ROWS):
    """asok serving one page with the list component of `rows` rows (1,000 unless told)."""
    folder = Path(tmp) / f"asok-list-{rows}"
    (folder / "src" / "pages").mkdir(parents=True)
    (folder / "src" / "components").mkdir(parents=True)
    (folder / "src" / "pages" / "index.html").write_text(ASOK_LIST_PAGE)
    (folder / "src" / "components" / "Rows.py").write_text(
        ASOK_LIST_COMPONENT.replace(f"range({LIST_ROWS})", f"range({rows})"))
    (folder / "src" / "components" / "rows.html").write_text(LIST_TEMPLATE.format(button=ASOK_LIST_BUTTON))
    port = free_port()
    argv = [sys.executable, str(ASOK), "serve", str(folder), "--port", str(port), "--no-access-log"]
    return Server(argv, port, tmp, f"asok-list-{rows}")


# The Phoenix LiveView client's rendered tree: {"s": statics, "0": dynamic, ...}, and for a
# comprehension {"s": statics, "d": [[dynamics of one item], ...]}; a diff is merged key by key.

def phx_merge(tree, diff):
    for key, value in diff.items():
        old = tree.get(key)
        if isinstance(value, dict) and isinstance(old, dict) and "s" not in value:
            phx_merge(old, value)
        else:
            tree[key] = value


def phx_html(node):
    if isinstance(node, str):
        return node
    if not isinstance(node, dict) or not isinstance(node.get("s"), list):
        raise ValueError(f"a rendered node bench.py cannot turn into HTML: {str(node)[:200]}")
    s = node["s"]
    if "d" in node:
        return "".join(_phx_fill(s, item) for item in node["d"])
    return _phx_fill(s, [node.get(str(i), "") for i in range(len(s) - 1)])


def _phx_fill(statics, dynamics):
    out = [statics[0]]
    for static, dynamic in zip(statics[1:], dynamics):
        out.append(phx_html(dynamic))
        out.append(static)
    return "".join(out)


def phx_find(node, marker):
    """Keys leading to the dynamic right after a static ending with `marker` (outside comprehensions)."""
    if not isinstance(node, dict) or "d" in node:
        return None
    for i, static in enumerate(node.get("s", [])[:-1]):
        if static.endswith(marker):
            return [str(i)]
        found = phx_find(node.get(str(i)), marker)
        if found:
            return [str(i)] + found
    return None


def phx_get(tree, path):
    for key in path:
        tree = tree[key]
    return tree


class PyviewVisitor:
    """What phoenix.js reads from a pyview page: the CSRF token and the main view's id, session, static."""

    def __init__(self, port, path="/"):
        status, _, body, self.page_wire = http_get(port, path)
        if status != 200:
            raise RuntimeError(f"pyview GET {path} answered {status}")
        text = body.decode()
        self.path, self.page_body = path, len(body)
        self.csrf = html.unescape(CSRF_RE.search(text).group(1))
        main = re.search(r"<div ([^>]*data-phx-main[^>]*)>", text)
        if not main:
            raise RuntimeError(f"no data-phx-main element on pyview's {path}")
        attrs = dict(re.findall(r'([\w-]+)="([^"]*)"', main.group(1)))
        self.id, self.session = attrs["id"], html.unescape(attrs["data-phx-session"])
        self.static = html.unescape(attrs.get("data-phx-static", "")) or None


class PhxWS(RawWS):
    """RawWS speaking the Phoenix channel protocol as phoenix.js does ([join_ref, ref, topic, event,
    payload] arrays); connect() joins the page's LiveView and keeps its rendered tree."""

    @classmethod
    async def connect(cls, port, path, visitor, timeout=10):
        ws = await super().connect(port, f"/live/websocket?_csrf_token={visitor.csrf}&vsn=2.0.0", None, timeout)
        try:
            ws.topic, ws.join_ref, ws.ref = f"lv:{visitor.id}", "1", 1
            reply = await ws.call("phx_join", {
                "url": f"http://127.0.0.1:{port}{visitor.path}",
                "params": {"_csrf_token": visitor.csrf, "_mounts": 0, "_live_referer": None},
                "session": visitor.session, "static": visitor.static, "flash": None}, timeout)
            if reply.get("status") != "ok" or "rendered" not in reply.get("response", {}):
                raise ConnectionError(f"pyview refused the join: {str(reply)[:300]}")
            ws.tree = reply["response"]["rendered"]
        except BaseException:
            ws.transport.abort()
            raise
        return ws

    def push(self, event, payload):
        """Send one message; its ref, and its bytes as sent."""
        self.ref += 1
        ref = str(self.ref)
        text = json.dumps([self.join_ref, ref, self.topic, event, payload], separators=(",", ":"))
        self.send(text)
        return ref, len(text.encode())

    async def reply(self, ref, timeout=REPLY_TIMEOUT):
        """The phx_reply payload for ref, and the reply's bytes."""
        for _ in range(100):
            text = await self.recv(timeout)
            msg = json.loads(text)
            if msg[1] == ref and msg[3] == "phx_reply":
                return msg[4], len(text.encode())
        raise ConnectionError(f"no phx_reply for ref {ref} among 100 messages")

    async def call(self, event, payload, timeout=REPLY_TIMEOUT):
        ref, _ = self.push(event, payload)
        return (await self.reply(ref, timeout))[0]


def phx_click(event, **values):
    """A phx-click on a <button> with phx-value-* attributes, as phoenix.js sends it."""
    return {"type": "click", "event": event, "value": {**values, "value": ""}, "cid": None}


async def pyview_live_client(ws, visitor, stats, window):
    """Click increment like phoenix.js: next event after the reply; the diff must carry count + 1."""
    path = phx_find(ws.tree, "Count: ")
    if path is None:
        stats.errors.append("no count in pyview's rendered tree")
        stats.lost += 1
        return
    prev = start = int(phx_get(ws.tree, path))
    pstart = int(PCOUNT_RE.search(phx_html(ws.tree)).group(1))
    clicks = 0
    for _ in range(MAX_EVENTS_PER_CLIENT):
        if window.stopped:
            break
        t0 = time.perf_counter_ns()
        ref, _ = ws.push("event", phx_click("increment"))
        got, took = await timed(stats, t0, ws.reply(ref))
        if got is None:
            break
        reply = got[0]
        if reply.get("status") != "ok" or "diff" not in reply.get("response", {}):
            stats.lost += 1
            stats.errors.append(str(reply)[:300])
            break
        phx_merge(ws.tree, reply["response"]["diff"])
        count = int(phx_get(ws.tree, path))
        if count != prev + 1:
            stats.out_of_order += 1
        prev = count
        clicks += 1
        stats.answered(took, window)
    if clicks:
        page = phx_html(ws.tree)
        count, pcount = int(COUNT_RE.search(page).group(1)), int(PCOUNT_RE.search(page).group(1))
        if count != prev or prev != start + clicks or pcount != pstart + clicks:
            stats.final_mismatch += 1
            stats.errors.append(f"pyview: last count {count} (expected {start + clicks}), "
                                f"clicks {pcount} (expected {pstart + clicks})")


def peer_turn(kind, server, cfg):
    """One server's share of a round: live events at 1 and 50 connections, the page at 1 and 10
    (live events only for "asok-threads", the counter with `on_loop = False`)."""
    out = {}
    for n in (1, 50):
        if kind.startswith("asok"):
            visitors = [Visitor(server.port) for _ in range(n)]
            clients = [("/asok/live", v.cookie) for v in visitors]
            client_cls, client = RawWS, live_client
        else:
            visitors = [PyviewVisitor(server.port) for _ in range(n)]
            clients = [("/", v) for v in visitors]
            client_cls, client = PhxWS, pyview_live_client

        def task(ws, i, stats, window):
            return client(ws, visitors[i], stats, window)
        out[f"live{n}"] = asyncio.run(ws_run(server, clients, task, cfg["live_warm"], cfg["peer_live_secs"],
                                             client_cls))
    if kind == "asok-threads":
        return out
    cookie = Visitor(server.port).cookie if kind == "asok" else None
    for n in (1, 10):
        out[f"page{n}"] = wrk_cpu(server, n, cfg["peer_wrk_secs"], cookie)
    return out


def asok_bytes(counter_port, list_port):
    """Bytes of one increment on the counter and of one row's change in the 1,000-row list."""
    async def event(ws, v, method, args):
        text = asok_call(f"{random.random()}:1", v["cid"], v["component"], v["state"], method, args, v["csrf"],
                         v.get("held"))
        ws.send(text)
        reply = await ws.recv()
        data = json.loads(reply)
        if "error" in data:
            raise RuntimeError(f"asok refused {method}: {reply[:300]}")
        v["state"] = data["state"]
        v["held"] = asok_html(data, v.get("held"))
        data["html"] = v["held"][1]
        return data, len(text.encode()), len(reply.encode())

    async def main():
        c = Visitor(counter_port)
        counter = {"cid": c.cid, "component": c.component, "state": c.state, "csrf": c.csrf}
        ws = await RawWS.connect(counter_port, "/asok/live", c.cookie)
        try:
            for _ in range(2):   # the second event is on a saved component whose HTML the page holds
                data, inc_req, inc_rep = await event(ws, counter, "increment", [])
        finally:
            await ws.close()
        if int(COUNT_RE.search(data["html"]).group(1)) != c.count + 2:
            raise RuntimeError("asok's increment did not add 1")
        status, headers, body, _ = http_get(list_port)
        if status != 200:
            raise RuntimeError(f"asok's list page answered {status}")
        text = body.decode()
        cookie = "; ".join(v.split(";")[0] for k, v in headers if k.lower() == "set-cookie")
        cid, component, state = next(f for f in COMPONENT_RE.findall(text) if f[1] == "Rows")
        rows = {"cid": html.unescape(cid), "component": component, "state": html.unescape(state),
                "csrf": html.unescape(CSRF_RE.search(text).group(1))}
        ws = await RawWS.connect(list_port, "/asok/live", cookie)
        try:
            for _ in range(2):   # the second event is on a saved component
                data, list_req, list_rep = await event(ws, rows, "bump", [LIST_ROW])
        finally:
            await ws.close()
        if f'<tr id="row-{LIST_ROW}"><td>row {LIST_ROW}</td><td>2</td></tr>' not in data["html"]:
            raise RuntimeError(f"asok's bump({LIST_ROW}) did not change row {LIST_ROW}")
        return {"increment_request": inc_req, "increment_reply": inc_rep, "list_request": list_req,
                "list_reply": list_rep, "list_page": len(body), "counter_page": c.page_body}
    return asyncio.run(main())


def pyview_bytes(port):
    async def main():
        v = PyviewVisitor(port)
        ws = await PhxWS.connect(port, "/", v)
        try:
            path = phx_find(ws.tree, "Count: ")
            before = int(phx_get(ws.tree, path))
            ref, inc_req = ws.push("event", phx_click("increment"))
            reply, inc_rep = await ws.reply(ref)
            phx_merge(ws.tree, reply["response"]["diff"])
        finally:
            await ws.close()
        if int(phx_get(ws.tree, path)) != before + 1:
            raise RuntimeError(f"pyview's increment did not add 1: {reply}")
        lv = PyviewVisitor(port, "/rows")
        ws = await PhxWS.connect(port, "/rows", lv)
        try:
            for _ in range(2):
                ref, list_req = ws.push("event", phx_click("bump", i=str(LIST_ROW)))
                reply, list_rep = await ws.reply(ref)
                phx_merge(ws.tree, reply["response"]["diff"])
        finally:
            await ws.close()
        if f'<tr id="row-{LIST_ROW}"><td>row {LIST_ROW}</td><td>2</td></tr>' not in phx_html(ws.tree):
            raise RuntimeError(f"pyview's bump did not change row {LIST_ROW}")
        return {"increment_request": inc_req, "increment_reply": inc_rep, "list_request": list_req,
                "list_reply": list_rep, "list_page": lv.page_body, "counter_page": v.page_body}
    return asyncio.run(main())


def run_peers(tmp, opts, cfg):
    """asok and pyview round by round (the order swapped each round), then the bytes of each."""
    python = Path(opts.pyview).absolute()   # not resolve(): the venv is known by its own path
    if not python.exists():
        return {"skipped": f"{python} does not exist: `make bench` creates .venv-pyview with pyview-web and "
                           "uvicorn[standard] (or pass --pyview PYTHON)"}
    if shutil.which("wrk") is None:
        raise RuntimeError("wrk is not installed (apt-get install wrk; `make bench` does it)")
    results = {"versions": pyview_versions(python), "rounds": []}
    rounds = opts.rounds or cfg["peer_rounds"]
    counter = (EXAMPLES / "counter" / "src" / "components" / "Counter.py").read_text()
    threads = {"src/components/Counter.py": re.sub(r"\n    on_loop = True[^\n]*", "\n    on_loop = False", counter)}
    # (False: always in a thread; unset, asok would find the counter's methods pure and use the loop)
    with asok_server("counter", tmp, "peer-asok") as asok_srv, pyview_server(tmp, python) as pv_srv, \
            asok_server("counter", tmp, "peer-asok-threads", files=threads) as threads_srv:
        servers = {"asok": asok_srv, "pyview": pv_srv, "asok-threads": threads_srv}
        for r in range(rounds):
            order = ("asok", "pyview", "asok-threads") if r % 2 == 0 else ("asok-threads", "pyview", "asok")
            done = {}
            for kind in order:
                print(f"bench: peers round {r + 1}/{rounds}: {kind}", file=sys.stderr, flush=True)
                done[kind] = peer_turn(kind, servers[kind], cfg)
            results["rounds"].append(done)
        with asok_list_server(tmp) as list_srv:
            results["bytes"] = {"asok": asok_bytes(asok_srv.port, list_srv.port), "pyview": pyview_bytes(pv_srv.port)}
        results["growth"] = run_growth(tmp, cfg, rounds, pv_srv)
    return results


# ── Growth (issue 16): other components saved in the session, a 10,000-row list, idle sockets ──

MANY_PAGE = ('<!doctype html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>many</title>\n</head>\n'
             "<body>\n" + "{{ component('Counter', count=10) }}\n" * (OTHERS + 1) + "</body>\n</html>\n")


def page_components(port, path="/", cookie=None):
    """(cookie, csrf, [(cid, component, state token), ...]) of one page load."""
    status, headers, body, _ = http_get(port, path, cookie)
    if status != 200:
        raise RuntimeError(f"GET {path} answered {status}")
    text = body.decode()
    cookies = [v.split(";")[0] for k, v in headers if k.lower() == "set-cookie"]
    found = [(html.unescape(c), name, html.unescape(t)) for c, name, t in COMPONENT_RE.findall(text)]
    return "; ".join(cookies) or cookie, html.unescape(CSRF_RE.search(text).group(1)), found


async def asok_increment_each(port, cookie, csrf, comps):
    """One increment on each of `comps` (so the session saves them); the session's clicks after."""
    ws = await RawWS.connect(port, "/asok/live", cookie)
    page, clicks = f"{random.random()}:", None
    try:
        for n, (cid, name, state) in enumerate(comps, 1):
            ws.send(asok_call(page + str(n), cid, name, state, "increment", [], csrf, None))
            for _ in range(10):  # a push may come first
                data = json.loads(await ws.recv())
                if data.get("id") == page + str(n):
                    break
            if "error" in data or "html" not in data:
                raise RuntimeError(f"asok refused an increment of {cid}: {str(data)[:300]}")
            clicks = int(PCOUNT_RE.search(data["html"]).group(1))
    finally:
        await ws.close()
    return clicks


def thread_cpu_ns(pid):
    """On-CPU ns of every thread of a process (/proc/PID/task/*/schedstat: ns, where /proc/PID/stat
    counts 10 ms ticks, too coarse for a turn of a few ms)."""
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError):
            with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                total += int(f.read().split()[0])
    return total


class Turns:
    """Clients taking turns of `block` events each, one client at a time: each side's events/s
    is its events over the time of its own turns, so a drift of the machine (here it halved the
    rate for seconds at a time, in one half turn and not the next) hits every side alike."""

    def __init__(self, sides, block, pid):
        self.sides, self.block, self.pid = sides, block, pid
        self.turn, self.left, self.changed = 0, block, asyncio.Event()
        self.wall, self.cpu = [0] * sides, [0] * sides  # ns inside each side's measured turns
        self.started = None

    async def wait(self, side, window):
        while self.turn != side and not window.stopped:
            self.changed.clear()
            await self.changed.wait()
        if self.started is None and window.measuring:
            self.started = (time.perf_counter_ns(), thread_cpu_ns(self.pid))

    def done(self, side, window):
        self.left -= 1
        if self.left and not window.stopped:
            return
        if self.started is not None:
            t0, c0 = self.started
            self.wall[side] += time.perf_counter_ns() - t0
            self.cpu[side] += thread_cpu_ns(self.pid) - c0
            self.started = None
        self.turn, self.left = (self.turn + 1) % self.sides, self.block
        self.changed.set()


def many_visitor(server, others):
    """The first counter of a fresh session's /many page, `others` of its other counters saved first."""
    cookie, csrf, comps = page_components(server.port, "/many")
    if len(comps) != OTHERS + 1:
        raise RuntimeError(f"/many shows {len(comps)} components, not {OTHERS + 1}")
    clicks = asyncio.run(asok_increment_each(server.port, cookie, csrf, comps[1:1 + others])) if others else 0
    cid, name, state = comps[0]
    return cookie, types.SimpleNamespace(cid=cid, component=name, state=state, csrf=csrf, count=10, pcount=clicks)


async def many_pair(server, visitors, warm, secs, block=MANY_BLOCK):
    """One connection per visitor (cookie, visitor), taking turns of `block` events: a result per
    visitor as ws_run gives it, its rate and CPU over its own turns."""
    turns, window = Turns(len(visitors), block, server.proc.pid), Window()
    stats = [Stats() for _ in visitors]
    conns, tasks = [], []
    try:
        for cookie, _ in visitors:
            conns.append(await RawWS.connect(server.port, "/asok/live", cookie))
        tasks = [asyncio.ensure_future(live_client(ws, v, stats[i], window, turns, i))
                 for i, (ws, (_, v)) in enumerate(zip(conns, visitors))]
        await asyncio.sleep(warm)
        window.measuring = True
        await asyncio.sleep(secs)
        window.measuring = False
        window.stopped = True
        turns.changed.set()
        done, pending = await asyncio.wait(tasks, timeout=REPLY_TIMEOUT + 2)
        for task in pending:
            task.cancel()
            stats[0].errors.append("client did not finish")
        for task in done:
            if task.exception() is not None:
                stats[0].errors.append(repr(task.exception()))
    finally:
        for task in tasks:
            task.cancel()
        for ws in conns:
            await ws.close()
    out = []
    for i, st in enumerate(stats):
        wall, lat = turns.wall[i] / 1e9, st.latencies
        out.append({"connections": 1, "events_per_s": st.events / wall if wall else 0.0,
                    "p50_ms": percentile(lat, 50) / 1e6, "p99_ms": percentile(lat, 99) / 1e6,
                    "server_cpu_us_per_event": turns.cpu[i] / 1e3 / max(st.events, 1),
                    "events": st.events, "events_all_phases": st.total, "lost": st.lost,
                    "out_of_order": st.out_of_order, "final_mismatch": st.final_mismatch, "errors": st.errors[:5]})
    return out


BIG_ROW_RE = re.compile(r'<tr id="row-%d"><td>row %d</td><td>(\d+)</td></tr>' % (LIST_ROW, LIST_ROW))


async def asok_list_client(ws, visitor, stats, window):
    """bump(LIST_ROW) like alive.js, each after the previous reply; the row's score must follow."""
    page, state, held, clicks = f"{random.random()}:", visitor.state, None, 0
    for n in range(1, MAX_EVENTS_PER_CLIENT + 1):
        if window.stopped:
            break
        rid = page + str(n)
        text = asok_call(rid, visitor.cid, visitor.component, state, "bump", [LIST_ROW], visitor.csrf, held)
        data, took = await asok_exchange(ws, rid, text, stats)
        if data is None:
            break
        state, held = data["state"], asok_html(data, held)
        clicks += 1
        stats.answered(took, window)
        if n > 1:
            visitor.call_bytes.append(len(text.encode()))
    if clicks and int(BIG_ROW_RE.search(held[1]).group(1)) != clicks:
        stats.final_mismatch += 1
        stats.errors.append(f"row {LIST_ROW} shows {BIG_ROW_RE.search(held[1]).group(1)} after {clicks} bumps")


async def pyview_list_client(ws, visitor, stats, window):
    """The same against pyview: phx-click bump with phx-value-i, the diff merged into the tree."""
    clicks = 0
    for _ in range(MAX_EVENTS_PER_CLIENT):
        if window.stopped:
            break
        t0 = time.perf_counter_ns()
        ref, _ = ws.push("event", phx_click("bump", i=str(LIST_ROW)))
        got, took = await timed(stats, t0, ws.reply(ref))
        if got is None:
            break
        reply = got[0]
        if reply.get("status") != "ok":
            stats.lost += 1
            stats.errors.append(str(reply)[:300])
            break
        phx_merge(ws.tree, reply.get("response", {}).get("diff", {}))
        clicks += 1
        stats.answered(took, window)
    if clicks:
        found = BIG_ROW_RE.search(phx_html(ws.tree))
        if not found or int(found.group(1)) != clicks:
            stats.final_mismatch += 1
            stats.errors.append(f"pyview: row {LIST_ROW} shows {found and found.group(1)} after {clicks} bumps")


def big_list_turn(kind, server, cfg):
    """Events/s of one connection bumping one row of the 10,000-row list (a fresh page each turn)."""
    secs = max(cfg["peer_live_secs"], 2.0)
    if kind == "asok":
        cookie, csrf, comps = page_components(server.port)
        cid, name, state = next(c for c in comps if c[1] == "Rows")
        visitor = types.SimpleNamespace(cid=cid, component=name, state=state, csrf=csrf, call_bytes=[])
        run = asyncio.run(ws_run(server, [("/asok/live", cookie)], lambda ws, i, st, w: asok_list_client(
            ws, visitor, st, w), cfg["live_warm"], secs, "raw"))
        run["call_bytes"] = max(visitor.call_bytes, default=0)
        run["first_state_bytes"] = len(state)
        return run
    visitor = PyviewVisitor(server.port, "/rows10k")
    return asyncio.run(ws_run(server, [("/rows10k", visitor)], lambda ws, i, st, w: pyview_list_client(
        ws, visitor, st, w), cfg["live_warm"], secs, PhxWS))


async def idle_rss(server, items, warm):
    """The server's RSS before and after opening a socket for each (path, cookie, first message);
    `warm` sockets are opened and closed first (the allocator's first growth is not theirs)."""
    conns = []
    try:
        for path, cookie, message in warm:
            ws = await RawWS.connect(server.port, path, cookie)
            if message:
                ws.send(message)
            await asyncio.sleep(0.01)
            await ws.close()
        await asyncio.sleep(0.5)
        before = server.rss()
        for start in range(0, len(items), 100):
            batch = items[start:start + 100]
            opened = await asyncio.wait_for(asyncio.gather(
                *(RawWS.connect(server.port, path, cookie) for path, cookie, _ in batch)), 30)
            for ws, (_, _, message) in zip(opened, batch):
                if message:
                    ws.send(message)
            conns += opened
        await asyncio.sleep(1.0)
        after = server.rss()
        return before, after, sum(not ws.closed for ws in conns)
    finally:
        for ws in conns:
            await ws.close()


def run_idle_views(tmp, cfg):
    """RSS per idle WebSocket: /asok/live sockets, each of its own session with its page's counter
    joined (as alive.js joins on open), beside examples/echo's /echo sockets."""
    n, warm = cfg["idle_conns"], 20
    limit = raise_fd_limit(n * 2 + 512)
    if limit < n + 256:
        return {"skipped": f"fd limit {limit} is below {n + 256}"}
    out = {"connections": n}
    with asok_server("echo", tmp, "idle-echo") as server:
        before, after, alive = asyncio.run(idle_rss(server, [("/echo", None, None)] * n, [("/echo", None, None)] * warm))
        out["echo"] = {"kib_per_conn": (after - before) / n / 1024, "open": alive}
    with asok_server("counter", tmp, "idle-live") as server:
        items = []
        for _ in range(n + warm):
            v = Visitor(server.port)
            join = json.dumps({"join": [[v.cid, v.component, asok_ref(v.state)]], "url": "/", "csrf": v.csrf})
            items.append(("/asok/live", v.cookie, join))
        before, after, alive = asyncio.run(idle_rss(server, items[warm:], items[:warm]))
        out["live"] = {"kib_per_conn": (after - before) / n / 1024, "open": alive}
    out["extra_kib"] = out["live"]["kib_per_conn"] - out["echo"]["kib_per_conn"]
    return out


def run_growth(tmp, cfg, rounds, pv_srv):
    """Issue 16's growth targets, `rounds` rounds alternating the order within each pair."""
    out = {"many": [], "big": []}
    with asok_server("counter", tmp, "peer-many", files={"src/pages/many.html": MANY_PAGE}) as many, \
            asok_list_server(tmp, BIG_ROWS) as big:
        for r in range(rounds):
            print(f"bench: growth round {r + 1}/{rounds}", file=sys.stderr, flush=True)
            # two fresh sessions, 0 and 199 others saved, their connections taking turns of
            # MANY_BLOCK events (half a turn each, one after the other, moved the ratio from
            # 0.61x to 1.16x between neighbouring pairs here: the machine's rate drifts by 2x)
            sides = (0, OTHERS) if r % 2 == 0 else (OTHERS, 0)
            visitors = [many_visitor(many, k) for k in sides]
            results = asyncio.run(many_pair(many, visitors, cfg["live_warm"], cfg["peer_live_secs"] * 2))
            out["many"].append({str(k): result for k, result in zip(sides, results)})
            order = ("asok", "pyview") if r % 2 == 0 else ("pyview", "asok")
            out["big"].append({kind: big_list_turn(kind, big if kind == "asok" else pv_srv, cfg) for kind in order})
    print("bench: idle sockets (live, echo)", file=sys.stderr, flush=True)
    out["idle"] = run_idle_views(tmp, cfg)
    return out


PEER_FIGURES = [  # (label, run, figure)
    ("live  1 conn  events/s", "live1", "events_per_s"),
    ("live  1 conn  server CPU µs/event", "live1", "server_cpu_us_per_event"),
    ("live  1 conn  p50 ms", "live1", "p50_ms"),
    ("live  1 conn  p99 ms", "live1", "p99_ms"),
    ("live 50 conn  events/s", "live50", "events_per_s"),
    ("live 50 conn  server CPU µs/event", "live50", "server_cpu_us_per_event"),
    ("live 50 conn  p50 ms", "live50", "p50_ms"),
    ("live 50 conn  p99 ms", "live50", "p99_ms"),
    ("page  1 conn  req/s", "page1", "req_per_s"),
    ("page  1 conn  server CPU µs/req", "page1", "server_cpu_us_per_req"),
    ("page 10 conn  req/s", "page10", "req_per_s"),
    ("page 10 conn  server CPU µs/req", "page10", "server_cpu_us_per_req"),
]
PEER_BYTES = [  # (label, key)
    ("increment request bytes", "increment_request"),
    ("increment reply bytes", "increment_reply"),
    (f"{LIST_ROWS:,}-row list, one row: request bytes", "list_request"),
    (f"{LIST_ROWS:,}-row list, one row: reply bytes", "list_reply"),
    ("counter page bytes (body)", "counter_page"),
    (f"{LIST_ROWS:,}-row list page bytes (body)", "list_page"),
]
PEER_TARGETS = {  # key (run.figure or bytes key): (comparison, limit on asok/pyview, label) -- issue 16
    "live50.events_per_s": (">=", 2.0, "live events/s, 50 conns"),
    "live50.server_cpu_us_per_event": ("<=", 0.5, "server CPU µs/event, 50 conns"),
    "live1.p50_ms": ("<=", 1.0, "p50 ms, 1 conn"),
    "page10.req_per_s": (">=", 4.0, "page req/s, 10 conns"),
    "increment_reply": ("<=", 1.5, "reply bytes per increment"),
    "list_reply": ("<=", 2.0, f"reply bytes, one row of {LIST_ROWS:,}"),
}
PEER_ABSOLUTE = {"list_reply": ("<", 1024, f"asok reply bytes, one row of {LIST_ROWS:,}")}


def median(values):
    values = sorted(values)
    n = len(values)
    return values[n // 2] if n % 2 else (values[n // 2 - 1] + values[n // 2]) / 2


def _spread(values, unit=""):
    if len(values) == 1:
        return fmt(values[0]) + unit
    return f"{fmt(median(values))}{unit} ({fmt(min(values))}-{fmt(max(values))})"


def peer_figures(peers):
    """{key: {"asok": [...], "pyview": [...], "ratio": [...]}} over rounds (one value for bytes)."""
    figures = {}
    for _, run, fig in PEER_FIGURES:
        a = [r["asok"][run][fig] for r in peers["rounds"]]
        p = [r["pyview"][run][fig] for r in peers["rounds"]]
        figures[f"{run}.{fig}"] = {"asok": a, "pyview": p,
                                   "ratio": [x / y if y else float("nan") for x, y in zip(a, p)]}
    for _, key in PEER_BYTES:
        a, p = peers["bytes"]["asok"][key], peers["bytes"]["pyview"][key]
        figures[key] = {"asok": [a], "pyview": [p], "ratio": [a / p if p else float("nan")]}
    return figures


def _met(op, limit, value):
    return "pass" if (value >= limit if op == ">=" else value <= limit if op == "<=" else value < limit) else "FAIL"


def print_peers(peers):
    """The side-by-side table (median of rounds, min-max) and the issue's target ratios."""
    if "skipped" in peers:
        print(f"\nbeside pyview: skipped: {peers['skipped']}")
        return {}
    v, n = peers["versions"], len(peers["rounds"])
    print(f"\nbeside pyview {v['pyview-web']} (uvicorn {v['uvicorn']}, uvloop {v['uvloop']}, httptools "
          f"{v['httptools']}, websockets {v['websockets']}): the same load generator and cores, {n} round(s) "
          "alternating which server goes first; median (min-max) of rounds; ratio per round")
    figures = peer_figures(peers)
    rows = []
    for label, run, fig in PEER_FIGURES:
        f = figures[f"{run}.{fig}"]
        rows.append((label, _spread(f["asok"]), _spread(f["pyview"]), _spread(f["ratio"], "x")))
    for label, run, fig in PEER_FIGURES[:8]:  # the counter without on_loop: its methods in the thread pool
        if all("asok-threads" in r for r in peers["rounds"]):
            a = [r["asok-threads"][run][fig] for r in peers["rounds"]]
            p = [r["pyview"][run][fig] for r in peers["rounds"]]
            rows.append((f"{label} (in threads)", _spread(a), _spread(p),
                         _spread([x / y if y else float("nan") for x, y in zip(a, p)], "x")))
    for label, key in PEER_BYTES:
        f = figures[key]
        rows.append((label, fmt(f["asok"][0]), fmt(f["pyview"][0]), _spread(f["ratio"], "x")))
    bad = []
    for kind in ("asok", "pyview", "asok-threads"):
        for r in peers["rounds"]:
            for run in ("live1", "live50"):
                if kind not in r:
                    continue
                x = r[kind][run]
                if x["lost"] or x["out_of_order"] or x["final_mismatch"]:
                    bad.append(f"{kind} {run}: lost {x['lost']}, out of order {x['out_of_order']}, "
                               f"mismatches {x['final_mismatch']} {x['errors'][:2]}")
            for run in ("page1", "page10") if kind != "asok-threads" else ():
                if r[kind][run]["errors"]:
                    bad.append(f"{kind} {run}: {r[kind][run]['errors']} errors ({r[kind][run]['socket_errors']})")
    rows.append(("events lost / out of order, page errors", "0" if not any(b.startswith("asok") for b in bad)
                 else "SOME", "0" if not any(b.startswith("pyview") for b in bad) else "SOME", ""))
    print_rows(("measure", "asok", "pyview", "asok/pyview"), rows)
    for b in bad:
        print(f"  {b}")
    if peers.get("growth"):
        peers["growth"]["list_call_bytes"] = peers["bytes"]["asok"]["list_request"]
        print_growth(peers["growth"])
    starved = [f"{kind} {run} round {i + 1}: {r[kind][run]['server_cpu_pct']:.0f}%"
               for i, r in enumerate(peers["rounds"]) for kind in ("asok", "pyview") for run in ("live50", "page10")
               if r[kind][run]["server_cpu_pct"] < 60]
    if starved:
        print("  the machine is busy: under full load a server got less than 60% of its core, so these ratios "
              "are unreliable (" + "; ".join(starved) + ")")
    out, checks = {}, []
    for key, (op, limit, label) in PEER_TARGETS.items():
        ratio = median(figures[key]["ratio"])
        verdict = _met(op, limit, ratio)
        out[key] = {"ratio": ratio, "op": op, "limit": limit, "pass": verdict == "pass"}
        checks.append((label, f"{ratio:.3g}x", f"{op} {limit:g}x", verdict))
    for key, (op, limit, label) in PEER_ABSOLUTE.items():
        value = figures[key]["asok"][0]
        verdict = _met(op, limit, value)
        out[key + ".asok"] = {"value": value, "op": op, "limit": limit, "pass": verdict == "pass"}
        checks.append((label, fmt(value), f"{op} {limit:g}", verdict))
    growth = peers.get("growth")
    if growth:
        for key, (op, limit, label, value, unit) in growth_checks(growth).items():
            verdict = _met(op, limit, value)
            out[key] = {"value": value, "op": op, "limit": limit, "pass": verdict == "pass"}
            checks.append((label, fmt(value) + unit, f"{op} {limit:g}{unit}", verdict))
    print("\nissue 16 targets, asok/pyview (median of rounds)")
    print_rows(("target", "figure", "target", ""), checks, right=(1,))
    met = sum(c[3] == "pass" for c in checks)
    print(f"{met} of {len(checks)} met")
    return out


def growth_checks(growth):
    """{key: (comparison, limit, label, value, unit)} of issue 16's growth targets."""
    many = [r[str(OTHERS)]["events_per_s"] / r["0"]["events_per_s"] for r in growth["many"]]
    big = [r["asok"]["events_per_s"] / r["pyview"]["events_per_s"] if r["pyview"]["events_per_s"] else float("inf")
           for r in growth["big"]]
    out = {"growth.others": (">=", 0.9, f"events/s, {OTHERS} others saved / none", median(many), "x"),
           "growth.big_list": (">=", 2.0, f"events/s, one row of {BIG_ROWS:,}", median(big), "x")}
    small = growth.get("list_call_bytes")
    if small:
        calls = max(r["asok"]["call_bytes"] for r in growth["big"])
        out["growth.call_bytes"] = ("<=", 1.05, f"call bytes once saved, {BIG_ROWS:,} / {LIST_ROWS:,} rows",
                                    calls / small, "x")
    idle = growth.get("idle", {})
    if "extra_kib" in idle:
        out["growth.idle_kib"] = ("<=", 1.0, "RSS per idle live socket - echo's", idle["extra_kib"], " KiB")
    return out


def print_growth(growth):
    """The growth figures behind the targets: medians (min-max) of the rounds."""
    rows = []
    for k in ("0", str(OTHERS)):
        for fig, label in (("events_per_s", "events/s"), ("p50_ms", "p50 ms"),
                           ("server_cpu_us_per_event", "server CPU µs/event")):
            rows.append((f"counter, {k} other components saved: {label}",
                         _spread([r[k][fig] for r in growth["many"]]), ""))
    for fig, label in (("events_per_s", "events/s"), ("p50_ms", "p50 ms"),
                       ("server_cpu_us_per_event", "server CPU µs/event")):
        rows.append((f"{BIG_ROWS:,}-row list, one row: {label}", _spread([r["asok"][fig] for r in growth["big"]]),
                     _spread([r["pyview"][fig] for r in growth["big"]])))
    rows.append((f"{BIG_ROWS:,}-row list: call bytes once saved (first state)",
                 f"{max(r['asok']['call_bytes'] for r in growth['big'])} "
                 f"({growth['big'][0]['asok']['first_state_bytes']:,})", ""))
    idle = growth.get("idle", {})
    if "extra_kib" in idle:
        rows.append((f"RSS per idle WebSocket KiB ({idle['connections']:,} open)",
                     f"live {fmt(idle['live']['kib_per_conn'])}, echo {fmt(idle['echo']['kib_per_conn'])}", ""))
    bad = [f"{kind}: {r[kind]['errors'][:2]}" for part in ("many", "big") for r in growth[part] for kind in r
           if r[kind]["lost"] or r[kind]["out_of_order"] or r[kind]["final_mismatch"]]
    print(f"\ngrowth (issue 16): one connection per session; two fresh sessions per round, taking turns of "
          f"{MANY_BLOCK} events; median (min-max) of {len(growth['many'])} round(s)")
    print_rows(("measure", "asok", "pyview"), rows, right=(1, 2))
    for b in bad:
        print(f"  lost or wrong: {b}")


def print_rows(heads, rows, right=(1, 2, 3)):
    widths = [max(len(str(r[i])) for r in rows + [heads]) for i in range(len(heads))]
    line = "  ".join("-" * w for w in widths)
    print(line)
    print("  ".join(h.ljust(w) for h, w in zip(heads, widths)).rstrip())
    print(line)
    for r in rows:
        print("  ".join(str(c).rjust(w) if i in right else str(c).ljust(w)
                        for i, (c, w) in enumerate(zip(r, widths))).rstrip())
    print(line)


# ═══ Profile (--profile): py-spy on the server during live-50 and page-10 ═══

def pyspy():
    found = shutil.which("py-spy") or (Path(sys.executable).parent / "py-spy")
    if not Path(found).exists():
        raise RuntimeError("py-spy is not installed: .venv/bin/pip install py-spy")
    return str(found)


def spy_start(pid, out, secs):
    return subprocess.Popen([pyspy(), "record", "-p", str(pid), "-f", "raw", "-o", str(out), "-r", "250",
                             "-d", str(int(secs) + 1), "--gil", "--nonblocking"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=pinned(LOAD_CORE))


def spy_summary(path, top=15):
    """Top functions by own samples (leaf frames) and by inclusive samples, from py-spy's raw output."""
    own, incl, total = {}, {}, 0
    for line in Path(path).read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        frames = [f for f in stack.split(";") if not f.startswith("thread (")]
        if not frames:
            continue
        total += n
        leaf = frames[-1]
        own[leaf] = own.get(leaf, 0) + n
        for f in set(frames):
            incl[f] = incl.get(f, 0) + n

    def tidy(frame):
        return re.sub(r"\((/[^:)]*/)?([^/:)]+):(\d+)\)", r"(\2:\3)", frame)
    pick = lambda d: [(tidy(f), round(100 * n / total, 1)) for f, n in sorted(d.items(), key=lambda x: -x[1])[:top]]
    return {"samples": total, "own_pct": pick(own), "inclusive_pct": pick(incl)}


def run_profile(tmp, cfg):
    secs = max(cfg["live_secs"], 3)
    results = {}
    with asok_server("counter", tmp, "counter-profile") as server:
        visitors = [Visitor(server.port) for _ in range(50)]

        def task(ws, i, stats, window):
            return live_client(ws, visitors[i], stats, window)
        out = Path(tmp) / "live50.txt"
        spy = spy_start(server.pid, out, secs + 0.5)
        try:
            run = asyncio.run(ws_run(server, [("/asok/live", v.cookie) for v in visitors], task, 0.5, secs, "raw"))
        finally:
            spy.wait(secs + 20)
        results["live50"] = dict(spy_summary(out), events_per_s=run["events_per_s"])
        out = Path(tmp) / "page10.txt"
        spy = spy_start(server.pid, out, secs)
        try:
            page = wrk(server.port, 10, int(secs), visitors[0].cookie)
        finally:
            spy.wait(secs + 20)
        results["page10"] = dict(spy_summary(out), req_per_s=page["req_per_s"])
    results["handlers"] = run_handler_profile(tmp)
    return results


def run_handler_profile(tmp, n_events=3000, n_pages=2000):
    """cProfile of the live-event and page handlers called in this process (no server, no socket):
    what one event or one page costs inside asok, and where."""
    import asok
    import cProfile
    import pstats
    folder = Path(tmp) / "counter-inproc"
    shutil.copytree(EXAMPLES / "counter", folder, ignore=shutil.ignore_patterns(".asok", "__pycache__"))
    app = asok.Asok(folder, debug=False, secret_key=secrets.token_hex(32))
    client = asok.TestClient(app)
    handle = client.live("/", "Counter")
    results = {}
    for name, n, fn in (("live_event", n_events, lambda: handle.call("increment")),
                        ("page", n_pages, lambda: client.get("/"))):
        for _ in range(200):
            fn()
        start = time.perf_counter()
        for _ in range(n):
            fn()
        per = (time.perf_counter() - start) / n * 1e6
        gc.collect()
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(n):
            fn()
        prof.disable()
        st = pstats.Stats(prof)
        total = sum(v[2] for v in st.stats.values())
        top = sorted(st.stats.items(), key=lambda kv: -kv[1][2])[:15]
        results[name] = {"us_per_call": per, "own_pct": [
            (f"{func[2]} ({Path(func[0]).name}:{func[1]})", round(100 * v[2] / total, 1), v[1] // n if n else 0)
            for func, v in top]}
    app.executor.shutdown(wait=False)
    return results


def print_profile(prof):
    for name in ("live_event", "page"):
        h = prof.get("handlers", {}).get(name)
        if not h:
            continue
        print(f"\nin-process cProfile of {name} (no server): {h['us_per_call']:.0f} µs per call "
              f"without the profiler; top functions by own time (% of all, calls per {name})")
        for f, pct, calls in h["own_pct"]:
            print(f"  {pct:5.1f}%  x{calls:<3} {f}")
    prof = {k: v for k, v in prof.items() if k != "handlers"}
    for name, p in prof.items():
        rate = p.get("events_per_s") or p.get("req_per_s")
        print(f"\nprofile of the server during {name} ({p['samples']} samples, {fmt(rate)}/s under py-spy)")
        print("  own time                                                         | inclusive")
        for (f1, p1), (f2, p2) in zip(p["own_pct"], p["inclusive_pct"]):
            print(f"  {p1:5.1f}% {f1[:58]:58} | {p2:5.1f}% {f2[:58]}")


# ═══ Table ═══════════════════════════════════════════════════════════════

def check(key, value):
    op, limit, _ = TARGETS[key]
    ok = value >= limit if op == ">=" else value < limit if op == "<" else value <= limit
    return f"{op} {limit:g}", "pass" if ok else "FAIL"


def fmt(x, digits=3):
    if isinstance(x, float):
        if x != x:
            return "n/a"
        if abs(x) >= 100:
            return f"{x:,.0f}"
        return f"{x:.{digits}g}" if abs(x) < 1 else f"{x:.{digits - 1}f}" if abs(x) < 10 else f"{x:.1f}"
    if isinstance(x, int):
        return f"{x:,}"
    return str(x)


def build(results):
    """Table rows (what, figure, baseline / note, target, result) and the flat figures."""
    rows, figures = [], {}

    def row(what, value, note="", key=None, unit=""):
        target, verdict = check(key, value) if key else ("", "")
        if key:
            figures[key] = value
        rows.append((what, fmt(value) + unit, note, target, verdict))

    live = results.get("live")
    if live:
        for n in (1, 50):
            r, e = live[f"live{n}"], live[f"echo{n}"]
            ratio = r["events_per_s"] / e["events_per_s"] if e["events_per_s"] else float("nan")
            row(f"live {n:>2} conn  events/s", r["events_per_s"],
                f"echo {fmt(e['events_per_s'])}/s; live/echo {ratio:.2f}",
                "live50_events_per_s" if n == 50 else None)
            row(f"live {n:>2} conn  p50 ms", r["p50_ms"], f"echo {fmt(e['p50_ms'])}",
                "live1_p50_ms" if n == 1 else None)
            row(f"live {n:>2} conn  p99 ms", r["p99_ms"], f"echo {fmt(e['p99_ms'])}",
                "live50_p99_ms" if n == 50 else None)
            row(f"live {n:>2} conn  server CPU µs/event", r["server_cpu_us_per_event"],
                f"echo {fmt(e['server_cpu_us_per_event'])}; server {r['server_cpu_pct']:.0f}% "
                f"client {r['client_cpu_pct']:.0f}% of a core (echo: {e['server_cpu_pct']:.0f}% / "
                f"{e['client_cpu_pct']:.0f}%)",
                "live50_cpu_us_per_event" if n == 50 else None)
            row(f"live {n:>2} conn  lost / out-of-order", f"{r['lost']} / {r['out_of_order']}",
                f"final mismatches {r['final_mismatch']}; echo lost {e['lost']}", None)
            rows[-1] = rows[-1][:3] + ("= 0 / 0", "pass" if r["lost"] == r["out_of_order"] ==
                                       r["final_mismatch"] == e["lost"] == 0 else "FAIL")
            figures[f"live{n}_lost"], figures[f"live{n}_out_of_order"] = r["lost"], r["out_of_order"]
            figures[f"live{n}_events_per_s"] = r["events_per_s"]
            figures[f"echo{n}_events_per_s"] = e["events_per_s"]
    pages = results.get("pages")
    if pages:
        for n in (1, 10):
            p, b = pages[f"page{n}"], pages[f"baseline{n}"]
            row(f"page {n:>2} conn  req/s", p["req_per_s"],
                f"baseline {fmt(b['req_per_s'])}/s; ratio {p['req_per_s'] / b['req_per_s']:.2f}"
                + (f"; non-2xx {p['non_2xx']}" if p["non_2xx"] else ""),
                "page10_req_per_s" if n == 10 else None)
            row(f"page {n:>2} conn  p99 ms", p["p99_ms"], f"baseline {fmt(b['p99_ms'])}")
            row(f"page {n:>2} conn  errors", p["errors"],
                f"{fmt(p['requests'])} requests in {p['secs']} s (socket errors and non-2xx)")
            rows[-1] = rows[-1][:3] + ("= 0", "pass" if p["errors"] == 0 else "FAIL")
            figures[f"page{n}_errors"] = p["errors"]
            row(f"page {n:>2} conn  server CPU µs/req", p["server_cpu_us_per_req"],
                f"baseline {fmt(b['server_cpu_us_per_req'])}; server {p['server_cpu_pct']:.0f}% of a core "
                f"(baseline {b['server_cpu_pct']:.0f}%)")
            figures[f"page{n}_server_cpu_us_per_req"] = p["server_cpu_us_per_req"]
            figures[f"page{n}_p99_ms"] = p["p99_ms"]
            figures[f"baseline{n}_req_per_s"] = b["req_per_s"]
        nc = pages["page10_nocookie"]
        row("page 10 conn  no cookie req/s", nc["req_per_s"], f"p99 {fmt(nc['p99_ms'])} ms; new session each")
        figures["page10_nocookie_req_per_s"] = nc["req_per_s"]
    scale = results.get("scale")
    if scale:
        one, two = scale["workers1"], scale["workers2"]
        for what, key, figure in (("page 10 conn  req/s", "page10", "req_per_s"),
                                  ("live 50 conn  events/s", "live50", "events_per_s")):
            a = median([r[key][figure] for r in one])
            b = median([r[key][figure] for r in two])
            row(f"--workers 2 {what}", b, f"1 worker {fmt(a)} (unpinned, same step)")
            row(f"--workers 2 / 1 worker, {what.split()[0]}", b / a, "median of 2 turns",
                f"workers2_{key}_ratio", "x")
            bad = sum(r[key]["errors"] if key == "page10" else
                      r[key]["lost"] + r[key]["out_of_order"] + r[key]["final_mismatch"] for r in one + two)
            row(f"--workers 1 and 2 {what.split()[0]} errors / lost", bad, "all turns")
            rows[-1] = rows[-1][:3] + ("= 0", "pass" if bad == 0 else "FAIL")
        store = scale["redis"]
        if "skipped" in store:
            rows.append(("live 50 conn  Redis store events/s", "skipped", store["skipped"], "", ""))
        else:
            f, r = store["file"], store["redis"]
            row("live 50 conn  Redis store events/s", r["events_per_s"],
                f"file store {fmt(f['events_per_s'])}/s; ratio {r['events_per_s'] / f['events_per_s']:.2f}; "
                f"p99 {fmt(r['p99_ms'])} ms (file {fmt(f['p99_ms'])})")
            row("live 50 conn  Redis store lost / out-of-order", f"{r['lost']} / {r['out_of_order']}",
                f"final mismatches {r['final_mismatch']}")
            rows[-1] = rows[-1][:3] + ("= 0 / 0", "pass" if r["lost"] == r["out_of_order"] ==
                                       r["final_mismatch"] == 0 else "FAIL")
    tpl = results.get("templates")
    if tpl:
        for name, key, label in (("counter.html", "tpl_counter_x_jinja", "counter"),
                                 ("rows.html", "tpl_rows_x_jinja", "100-row page")):
            t = tpl[name]
            row(f"template {label} renders/s", t["asok_per_s"], f"Jinja2 {fmt(t['jinja2_per_s'])}/s"
                + ("" if t["same_output"] else "; OUTPUT DIFFERS"))
            row(f"template {label} asok/Jinja2", t["ratio"], "", key, "x")
    idle = results.get("idle")
    if idle and "kib_per_conn" in idle:
        row("RSS per idle WebSocket KiB", idle["kib_per_conn"],
            f"{idle['open_at_measure']} open; {idle['rss_before_mib']:.1f} -> {idle['rss_after_mib']:.1f} MiB",
            "idle_ws_kib_per_conn")
    elif idle:
        rows.append(("RSS per idle WebSocket KiB", "skipped", idle["skipped"], "", ""))
    greedy = results.get("greedy")
    if greedy:
        row("RSS idle MiB", greedy["idle_mib"], "the counter server before the greedy clients")
        row("RSS after greedy clients MiB", greedy["after_mib"],
            f"peak {greedy['peak_mib']:.1f} MiB; {len(greedy['bytes_sent'])} greedy cases still open "
            f"(details in the JSON); a normal increment " + ("right" if greedy["normal_increment_ok"] else "FAILED"))
        row("RSS growth after greedy clients MiB", greedy["growth_mib"], "peak or final, minus idle",
            "greedy_rss_growth_mib")
    fan = results.get("fanout")
    if fan and "p50_ms" in fan:
        row(f"fan-out {fan['views']:,} views  p50 ms", fan["p50_ms"],
            f"one publish, time until the last view has its HTML; {fan['rounds']} publishes, "
            f"missed {fan['missed']}")
        row(f"fan-out {fan['views']:,} views  p99 ms", fan["p99_ms"],
            f"the first publish, which writes 1,000 new session files: {fmt(fan['cold_ms'])} ms", "fanout_p99_ms")
        row("fan-out server CPU µs/update", fan["server_cpu_us_per_update"], "apply, save, render, push per view")
        threads = fan.get("threads") or {}
        if "p50_ms" in threads:
            row(f"fan-out {threads['views']:,} views in threads  p50 ms", threads["p50_ms"],
                f"Ping without on_loop = True (the default): its handler in worker threads; missed {threads['missed']}")
            row(f"fan-out {threads['views']:,} views in threads  p99 ms", threads["p99_ms"],
                f"server CPU {fmt(threads['server_cpu_us_per_update'])} µs/update")
        row("RSS per joined idle view KiB", fan["kib_per_joined_view"], "socket + view + subscription",
            "fanout_kib_per_view")
    elif fan:
        rows.append(("fan-out", "skipped", fan["skipped"], "", ""))
    if pages:
        row("counter page bytes", pages["page_bytes"]["body"], f"{pages['page_bytes']['wire']} B with headers",
            "bytes_counter_page")
        row("alive.js gzip -9 bytes", pages["alive_js"]["gzip9"], f"{pages['alive_js']['bytes']} B raw",
            "bytes_alive_js_gz")
    up = results.get("upload")
    if up:
        for key, label in (("route", "upload 10 MiB  page route MiB/s"), ("live", "upload 10 MiB  live MiB/s")):
            row(label, up[key]["mib_per_s"], "POST multipart, read in request.files" if key == "route" else
                "POST /asok/upload, then the event; method gets the UploadedFile")
            row(label.replace("MiB/s", "RSS MiB"), up[key]["rss_growth_mib"],
                "server's peak RSS growth during it (the most of the rounds)", f"upload_{key}_rss_mib")
    inc = results.get("increment")
    if inc:
        row("increment request bytes", inc["request"], f"{inc['request_frame']} B framed")
        figures["bytes_increment_request"] = inc["request"]
        row("increment reply bytes (frame)", inc["reply_frame"], f"{inc['reply']} B payload",
            "bytes_increment_reply")
    return rows, figures


def print_table(rows):
    heads = ("measure", "figure", "baseline / note", "target", "")
    widths = [max(len(str(r[i])) for r in rows + [heads]) for i in range(5)]
    line = "  ".join("-" * w for w in widths)
    print(line)
    print("  ".join(h.ljust(w) for h, w in zip(heads, widths)))
    print(line)
    for r in rows:
        print("  ".join((str(c).rjust(w) if i == 1 else str(c).ljust(w)) for i, (c, w) in
                        enumerate(zip(r, widths))).rstrip())
    print(line)


def machine():
    model = ""
    try:
        model = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "")
    except OSError:
        pass
    return {"python": platform.python_version(), "cpu": model, "cores": os.cpu_count(),
            "server_core": SERVER_CORE, "load_core": LOAD_CORE, "platform": platform.platform()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a ~30 s smoke run")
    parser.add_argument("--client", choices=("raw", "asok"), default="raw",
                        help="WebSocket load generator: a lean asyncio client (default) or "
                             "asok.AsyncWebSocketClient")
    parser.add_argument("--only", default="live,pages,templates,idle,greedy,fanout,increment,upload,peers,scale",
                        help="comma-separated parts to run")
    parser.add_argument("--profile", action="store_true",
                        help="also run py-spy on the server during live-50 and page-10 and print the top "
                             "functions (pip install py-spy into .venv first)")
    parser.add_argument("--pyview", default=str(PYVIEW_PYTHON),
                        help="the Python of a virtual environment with pyview-web and uvicorn[standard] "
                             "(peers part; `make bench` creates .venv-pyview)")
    parser.add_argument("--rounds", type=int, default=0,
                        help="rounds of asok and pyview in the peers part (default 3, 1 with --quick)")
    parser.add_argument("--json", default="bench-results.json", help="where to write the figures")
    parser.add_argument("--baseline-server", type=int, metavar="PORT", help=argparse.SUPPRESS)
    opts = parser.parse_args(argv)
    if opts.baseline_server:
        return run_baseline_server(opts.baseline_server)
    cfg = QUICK if opts.quick else FULL
    if LOAD_CORE is not None:
        os.sched_setaffinity(0, {LOAD_CORE})
    raise_fd_limit()
    parts = set(opts.only.split(","))
    results, started = {}, time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="asok-bench-") as tmp:
        steps = [("live", lambda: run_live(tmp, opts, cfg)), ("pages", lambda: run_pages(tmp, cfg)),
                 ("templates", lambda: run_templates(tmp, cfg)), ("idle", lambda: run_idle(tmp, cfg)),
                 ("greedy", lambda: run_greedy(tmp, cfg)),
                 ("fanout", lambda: run_fanout(tmp, cfg)),
                 ("increment", lambda: run_increment_bytes(tmp)), ("upload", lambda: run_upload(tmp, cfg)),
                 ("peers", lambda: run_peers(tmp, opts, cfg)),
                 ("scale", lambda: run_scale(tmp, opts, cfg)),
                 ("profile", lambda: run_profile(tmp, cfg))]
        if opts.profile:
            parts.add("profile")
        for name, step in steps:
            if name not in parts:
                continue
            print(f"bench: {name} ...", file=sys.stderr, flush=True)
            t = time.perf_counter()
            results[name] = step()
            print(f"bench: {name} done in {time.perf_counter() - t:.1f}s", file=sys.stderr, flush=True)
    rows, figures = build(results)
    print(f"asok benchmark ({'quick' if opts.quick else 'full'}; client {opts.client}; "
          f"server on core {SERVER_CORE}, load on core {LOAD_CORE}; {machine()['cpu']})")
    if rows:
        print_table(rows)
    peer_targets = print_peers(results["peers"]) if "peers" in results else {}
    if "profile" in results:
        print_profile(results["profile"])
    failed = [r[0] for r in rows if r[4] == "FAIL"]
    print(f"{len(failed)} target(s) missed" + (f": {', '.join(failed)}" if failed else "")
          + f"; {time.perf_counter() - started:.0f}s")
    out = {"quick": opts.quick, "client": opts.client, "machine": machine(),
           "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "figures": figures,
           "targets": {k: {"op": op, "limit": lim, "label": label, "pass": check(k, figures[k])[1] == "pass"}
                       for k, (op, lim, label) in TARGETS.items() if k in figures},
           "peer_targets": peer_targets,
           "details": results}
    Path(opts.json).write_text(json.dumps(out, indent=2, default=str) + "\n")
    print(f"figures written to {opts.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
