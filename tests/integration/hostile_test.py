#!/usr/bin/python3
"""Hostile clients against one arqd (issue #17), while a normal client (from
another loopback address, 127.0.0.2) publishes and subscribes throughout.

Usage: hostile_test.py ARQD

The attacks, each with the bound it must meet:
  fragments   20 connections, each one message of 200,000 1-byte fragments
              before any hello: closed with 1009 after limits.max_fragments;
              memory does not grow with them
  no hello    connections that upgrade and never say hello: at most
              limits.max_connections_per_address at once from one address,
              the rest refused (and too fast ones refused by the rate); all
              closed (1008) after server.hello_timeout_ms
  streams     thousands of sub/unsub pairs to streams that do not exist:
              arq_streams stays small, memory does not grow
  tail cache  large messages to several streams nobody reads: the caches stay
              within limits.tail_cache_bytes
  sessions    one address creating sessions fast: refused over
              limits.session_rate, the oldest evicted over
              limits.max_sessions_per_address
  namespaces  a token subject may not name arq:'s namespaces; a token whose
              subject is "api" cannot block the server API's message ids; a
              message id reused on another stream is stored
  web pages   a WebSocket from another page's origin is refused, text/plain
              posts too; with server.hosts a foreign Host is refused
  secrets     SECRET_KEY under 32 bytes refuses to start
  descriptors arqd under a low RLIMIT_NOFILE: max_connections fitted to it,
              /health still answers (from another address), no busy loop

After the attacks: the normal client got every message it published, in
order, once, and nothing it had acknowledged is missing; arqd's anonymous
memory (RssAnon) stayed under RSS_BOUND_MIB (not checked under ASan, whose
shadow memory and quarantine make it meaningless).
"""
import asyncio
import base64
import hashlib
import hmac
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request

sys.dont_write_bytecode = True  # no __pycache__ in the source tree
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import msgpack  # noqa: E402
import websockets  # noqa: E402
from arq_replay_util import Arqd, check, failures, grep_log, passed  # noqa: E402

ARQD = sys.argv[1]
RSS_BOUND_MIB = 160  # documented in docs/operations.md, "Limits and abuse"
KEY = "hostile-test-secret-key-0123456789abcdef"
LIMITS = ("--set", "server.hello_timeout_ms=1500", "--set", "limits.max_connections_per_address=300",
          "--set", "limits.connection_rate=200", "--set", "limits.connection_burst=2000",
          "--set", "limits.tail_cache_bytes=8M", "--set", "limits.max_sessions_per_address=40",
          "--set", "limits.max_sessions_per_owner=40",
          "--set", "limits.session_rate=20", "--set", "limits.session_burst=40",
          "--set", "limits.stream_idle_s=2")


def b64u(b):
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


def jwt(sub, pub=("*",), subscribe=("*",)):
    h = b64u(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    p = b64u(json.dumps({"sub": sub, "exp": int(time.time()) + 3600, "pub": list(pub),
                         "subscribe": list(subscribe)}).encode())
    s = hmac.new(KEY.encode(), f"{h}.{p}".encode(), hashlib.sha256).digest()
    return f"{h}.{p}.{b64u(s)}"


def rss_anon_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1])
    return 0


def under_asan(pid):
    with open(f"/proc/{pid}/maps") as f:
        return "libasan" in f.read()


def raw_upgrade(port, src="127.0.0.1", origin=None, host="127.0.0.1"):
    """A TCP connection upgraded to WebSocket by hand (for frames no
    library sends). Returns (socket, status line)."""
    s = socket.socket()
    s.bind((src, 0))
    s.connect(("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    extra = f"Origin: {origin}\r\n" if origin else ""
    s.sendall(f"GET /ws HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
              f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
              f"Sec-WebSocket-Protocol: arq.v1\r\n{extra}\r\n".encode())
    head = b""
    s.settimeout(10)
    while b"\r\n\r\n" not in head:
        d = s.recv(4096)
        if not d:
            break
        head += d
    return s, head.split(b"\r\n", 1)[0].decode(errors="replace")


def close_code(s, timeout=10):
    """Read until the server's close frame; its code (None if none came)."""
    s.settimeout(timeout)
    buf = b""
    try:
        while True:
            d = s.recv(65536)
            if not d:
                break
            buf += d
            i = buf.find(b"\x88")
            if i >= 0 and len(buf) >= i + 4:
                return struct.unpack(">H", buf[i + 2:i + 4])[0]
    except OSError:
        pass
    return None


class Normal:
    """The normal client: publishes (msgid n<i>) and subscribes to its own
    stream over one connection from 127.0.0.2, for as long as it runs."""

    def __init__(self, url):
        self.url, self.acked, self.got, self.errors = url, {}, [], []
        self.stop = False

    async def run(self):
        try:
            async with websockets.connect(self.url, subprotocols=["arq.v1"], max_size=None,
                                          close_timeout=2, ping_interval=None,
                                          local_addr=("127.0.0.2", 0)) as ws:
                await ws.send(msgpack.packb({"t": "hello", "token": jwt("normal")}))
                w = msgpack.unpackb(await ws.recv(), raw=False)
                if w.get("t") != "welcome":
                    self.errors.append(f"no welcome: {w}")
                    return
                await ws.send(msgpack.packb({"t": "sub", "id": 1, "stream": "normal.s",
                                             "from": "earliest"}))
                i = 0

                async def reader():
                    while True:
                        m = msgpack.unpackb(await ws.recv(), raw=False)
                        if m["t"] == "puback":
                            self.acked[m["id"]] = m["offset"]
                        elif m["t"] == "msg":
                            self.got.append((m["offset"], bytes(m["payload"])))
                            await ws.send(msgpack.packb({"t": "ack", "stream": "normal.s",
                                                         "offset": m["offset"]}))
                        elif m["t"] in ("nack", "error"):
                            self.errors.append(m)
                rt = asyncio.ensure_future(reader())
                while not self.stop:
                    i += 1
                    await ws.send(msgpack.packb({"t": "pub", "id": 100 + i, "stream": "normal.s",
                                                 "payload": f"n{i}".encode(), "msgid": f"n{i}"},
                                                use_bin_type=True))
                    await asyncio.sleep(0.02)
                self.sent = i
                await asyncio.sleep(1.0)  # the last pubacks and deliveries
                rt.cancel()
        except Exception as e:  # noqa: BLE001 - reported as a check
            self.errors.append(f"{type(e).__name__}: {e}")


def attack_fragments(port):
    socks = []
    for _ in range(20):
        s, status = raw_upgrade(port)
        socks.append((s, status))
    codes = []
    for s, status in socks:
        if " 101 " not in status:
            codes.append(status)
            continue
        try:
            s.sendall(b"\x02\x81\x00\x00\x00\x00\x81" + b"\x00\x81\x00\x00\x00\x00a" * 200000)
        except OSError:
            pass  # the server stopped reading: fine
        codes.append(close_code(s))
        s.close()
    return codes


def attack_no_hello(port):
    """Upgrade and never say hello, as many as possible from one address."""
    socks, refused = [], 0
    for _ in range(800):
        try:
            s, status = raw_upgrade(port)
        except OSError:
            refused += 1
            continue
        if " 101 " in status:
            socks.append(s)
        else:
            refused += 1
            s.close()
    return socks, refused


async def attack_streams(url, n):
    async with websockets.connect(url, subprotocols=["arq.v1"], close_timeout=2) as ws:
        await ws.send(msgpack.packb({"t": "hello", "token": jwt("mallory", subscribe=["u.mallory.*"])}))
        msgpack.unpackb(await ws.recv(), raw=False)
        for i in range(n):
            await ws.send(msgpack.packb({"t": "sub", "id": 2 * i + 1,
                                         "stream": f"u.mallory.x{i}", "from": "latest"}))
            await ws.send(msgpack.packb({"t": "unsub", "id": 2 * i + 2,
                                         "stream": f"u.mallory.x{i}"}))
            if i % 500 == 499:  # keep the answers flowing
                while True:
                    m = msgpack.unpackb(await ws.recv(), raw=False)
                    if m.get("id") == 2 * i + 2:
                        break


async def attack_tail_cache(url):
    big = os.urandom(256 * 1024)
    async with websockets.connect(url, subprotocols=["arq.v1"], max_size=None,
                                  close_timeout=2) as ws:
        await ws.send(msgpack.packb({"t": "hello", "token": jwt("tail")}))
        msgpack.unpackb(await ws.recv(), raw=False)
        n = 0
        for s in range(4):
            for i in range(32):
                n += 1
                await ws.send(msgpack.packb({"t": "pub", "id": n, "stream": f"tail.{s}",
                                             "payload": big}, use_bin_type=True))
        acked = 0
        while acked < n:
            m = msgpack.unpackb(await ws.recv(), raw=False)
            acked += m["t"] in ("puback", "nack")


async def attack_sessions(url, n):
    """n new sessions of one owner (one token subject), one after the
    other. Returns the hello answers' codes (0 for a welcome)."""
    codes = []
    for _ in range(n):
        async with websockets.connect(url, subprotocols=["arq.v1"], close_timeout=1) as ws:
            await ws.send(msgpack.packb({"t": "hello", "token": jwt("churner")}))
            m = msgpack.unpackb(await ws.recv(), raw=False)
            codes.append(0 if m["t"] == "welcome" else m.get("code"))
    return codes


async def namespaces(url, port):
    out = {}
    async with websockets.connect(url, subprotocols=["arq.v1"], close_timeout=1) as ws:
        await ws.send(msgpack.packb({"t": "hello", "token": jwt("arq:api:open")}))
        out["reserved"] = msgpack.unpackb(await ws.recv(), raw=False)
    async with websockets.connect(url, subprotocols=["arq.v1"], close_timeout=1) as ws:
        await ws.send(msgpack.packb({"t": "hello", "token": jwt("api")}))
        msgpack.unpackb(await ws.recv(), raw=False)
        for i, stream in enumerate(("orders", "orders.other")):
            await ws.send(msgpack.packb({"t": "pub", "id": i + 1, "stream": stream,
                                         "payload": b"from the user", "msgid": "order-1001"}))
            out[stream] = msgpack.unpackb(await ws.recv(), raw=False)
    return out


def http(port, method, path, body=None, headers=None, src="127.0.0.2"):
    import http.client
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10, source_address=(src, 0))
    c.request(method, path, body=body, headers=headers or {})
    r = c.getresponse()
    return r.status, r.read()


def metric(port, name):
    _, body = http(port, "GET", "/metrics")
    for line in body.decode().splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return None


def main():
    tmp = tempfile.mkdtemp(prefix="arq-hostile-", dir="/var/tmp")
    t0 = time.time()
    try:
        run(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"took {time.time() - t0:.1f} s", flush=True)
    if failures:
        print(f"{len(failures)} check(s) failed", flush=True)
        sys.exit(1)
    print(f"all {passed[0]} hostile-client checks passed", flush=True)


def run(tmp):
    log = os.path.join(tmp, "arqd.log")
    a = Arqd(ARQD, os.path.join(tmp, "data"), log, env={"SECRET_KEY": KEY,
                                                         "ARQ_API_KEY": "hostile-api-key"},
             extra=LIMITS)
    pid = a.proc.pid
    asan = under_asan(pid)
    base_kib = rss_anon_kib(pid)
    peak = [base_kib]

    def sample():
        peak[0] = max(peak[0], rss_anon_kib(pid))

    normal = Normal(a.url)
    loop = asyncio.new_event_loop()
    import threading
    th = threading.Thread(target=lambda: loop.run_until_complete(normal.run()), daemon=True)
    th.start()
    try:
        time.sleep(0.5)
        # -- fragments
        codes = attack_fragments(a.port)
        sample()
        check(all(c == 1009 for c in codes), f"fragments: every connection closed 1009: {codes}")
        # -- no hello
        socks, refused = attack_no_hello(a.port)
        sample()
        check(len(socks) <= 300, f"no hello: at most 300 open from one address ({len(socks)})")
        check(refused >= 400, f"no hello: the rest refused ({refused})")
        st, _ = http(a.port, "GET", "/health")
        check(st == 200, f"no hello: /health from another address meanwhile: {st}")
        closed = [close_code(s, timeout=10) for s in socks]
        for s in socks:
            s.close()
        check(all(c == 1008 for c in closed),
              f"no hello: closed 1008 after the deadline: {set(closed)}")
        check((metric(a.port, "arq_hello_timeouts_total") or 0) >= len(socks),
              "no hello: arq_hello_timeouts_total")
        check(grep_log(log, r"event=connection_refused reason=address_(limit|rate)"),
              "no hello: refusals logged")
        check(len(grep_log(log, r"event=connection_refused")) <= 3,
              "no hello: refusals logged at most once per 10 s")
        # -- streams
        asyncio.run(attack_streams(a.url, 5000))
        sample()
        streams = metric(a.port, "arq_streams")
        check(streams is not None and streams < 50, f"streams: arq_streams stays small ({streams})")
        # -- tail cache
        asyncio.run(attack_tail_cache(a.url))
        sample()
        cached = metric(a.port, "arq_tail_cache_bytes")
        check(cached is not None and cached <= 8 << 20,
              f"tail cache: within limits.tail_cache_bytes ({cached})")
        check((metric(a.port, "arq_tail_cache_evictions_total") or 0) > 0,
              "tail cache: frames evicted")
        # -- sessions
        codes = asyncio.run(attack_sessions(a.url, 120))
        sample()
        check(codes.count(0) >= 40 and 429 in codes,
              f"sessions: some welcomed, the rest refused 429 ({codes.count(0)} welcomed)")
        check((metric(a.port, "arq_sessions_evicted_total") or 0) > 0, "sessions: oldest evicted")
        check((metric(a.port, "arq_sessions_refused_total") or 0) > 0, "sessions: rate refused")
        # -- namespaces
        ns = asyncio.run(namespaces(a.url, a.port))
        check(ns["reserved"].get("t") == "error" and ns["reserved"].get("code") == 401,
              f"namespaces: a subject in arq: is refused: {ns['reserved']}")
        check(ns["orders"]["t"] == "puback" and ns["orders.other"]["t"] == "puback"
              and ns["orders.other"]["dup"] is False,
              f"namespaces: a msgid reused on another stream is stored: {ns}")
        st, body = http(a.port, "POST", "/api/publish",
                        json.dumps({"stream": "orders", "payload": "backend",
                                    "msgid": "order-1001"}).encode(),
                        {"Content-Type": "application/json",
                         "Authorization": "Bearer hostile-api-key"})
        check(st == 200 and json.loads(body)["duplicate"] is False,
              f"namespaces: the server API's order-1001 is not the user's: {st} {body}")
        # -- web pages
        s, status = raw_upgrade(a.port, origin="http://evil.example")
        s.close()
        check(" 403 " in status, f"web: WebSocket from another origin refused: {status}")
        s, status = raw_upgrade(a.port, origin="http://127.0.0.1", host="127.0.0.1")
        s.close()
        check(" 101 " in status, f"web: WebSocket from its own origin served: {status}")
        st, _ = http(a.port, "POST", "/api/publish", b'{"stream":"x","payload":"y"}',
                     {"Content-Type": "text/plain", "Authorization": "Bearer hostile-api-key"})
        check(st == 415, f"web: text/plain post refused ({st})")
    finally:
        normal.stop = True
        th.join(30)
        sample()
        rc = a.stop()
    check(rc == 0, f"arqd exits 0: {rc}")
    check(not normal.errors, f"normal client: no errors: {normal.errors[:3]}")
    sent = getattr(normal, "sent", 0)
    check(sent > 100 and len(normal.acked) == sent,
          f"normal client: every publish acknowledged ({len(normal.acked)} of {sent})")
    offs = [o for o, _ in normal.got]
    check(offs == list(range(1, len(offs) + 1)) and len(offs) >= len(normal.acked) - 5,
          f"normal client: delivered once, in order ({len(offs)} of {len(normal.acked)})")
    # nothing acknowledged lost: read back after a restart
    a = Arqd(ARQD, os.path.join(tmp, "data"), log, env={"SECRET_KEY": KEY}, extra=LIMITS)
    try:
        stored = asyncio.run(read_back(a.url, len(normal.acked)))
        want = {off: f"n{i - 100}".encode() for i, off in normal.acked.items()}
        check(all(stored.get(o) == p for o, p in want.items()),
              f"nothing acknowledged lost ({len(stored)} read back)")
    finally:
        a.stop()
    used = (peak[0] - base_kib) // 1024
    print(f"RssAnon: {base_kib // 1024} MiB at start, peak {peak[0] // 1024} MiB (+{used})",
          flush=True)
    if asan:
        print("RSS bound not checked under ASan", flush=True)
    else:
        check(peak[0] // 1024 < RSS_BOUND_MIB, f"RssAnon peak under {RSS_BOUND_MIB} MiB "
                                               f"({peak[0] // 1024} MiB)")
    others(tmp)


async def read_back(url, n):
    out = {}
    async with websockets.connect(url, subprotocols=["arq.v1"], max_size=None,
                                  close_timeout=2) as ws:
        await ws.send(msgpack.packb({"t": "hello", "token": jwt("reader")}))
        msgpack.unpackb(await ws.recv(), raw=False)
        await ws.send(msgpack.packb({"t": "sub", "id": 1, "stream": "normal.s", "from": 1}))
        while len(out) < n:
            m = msgpack.unpackb(await asyncio.wait_for(ws.recv(), 10), raw=False)
            if m["t"] == "msg":
                out[m["offset"]] = bytes(m["payload"])
                await ws.send(msgpack.packb({"t": "ack", "stream": "normal.s",
                                             "offset": m["offset"]}))
    return out


def others(tmp):
    """Separate arqds: a short key, a Host allow-list, a low descriptor limit."""
    p = subprocess.run([ARQD, "--port", "0", "--data-dir", os.path.join(tmp, "k")],
                       env={**os.environ, "SECRET_KEY": "a"}, capture_output=True, text=True,
                       timeout=20)
    check(p.returncode != 0 and "SECRET_KEY is too short" in p.stderr,
          f"secrets: a 1-byte SECRET_KEY refuses to start: {p.returncode}")
    log = os.path.join(tmp, "hosts.log")
    a = Arqd(ARQD, os.path.join(tmp, "h"), log, extra=("--set", "server.hosts=arq.example"))
    try:
        st, _ = http(a.port, "GET", "/health", headers={"Host": "evil.example"})
        check(st == 421, f"web: a foreign Host is refused with server.hosts ({st})")
        st, _ = http(a.port, "GET", "/health", headers={"Host": "arq.example"})
        check(st == 200, f"web: a listed Host is served ({st})")
    finally:
        a.stop()
    # descriptors: prlimit below what max_connections needs
    log = os.path.join(tmp, "fd.log")
    lf = open(log, "w")
    proc = subprocess.Popen(["prlimit", "--nofile=256:256", ARQD, "--host", "127.0.0.1", "--port",
                             "0", "--data-dir", os.path.join(tmp, "f"), "--anonymous", "--set",
                             "server.max_connections=5000"],
                            stdout=subprocess.PIPE, stderr=lf, text=True)
    try:
        line = proc.stdout.readline()
        port = int(line.split("ws://127.0.0.1:")[1].split("/")[0])
        socks = []
        for _ in range(400):
            try:
                socks.append(socket.create_connection(("127.0.0.1", port), timeout=2))
            except OSError:
                pass
        st, _ = http(port, "GET", "/health")
        check(st == 200, f"descriptors: /health answers with the server full ({st})")
        for s in socks:
            s.close()
    finally:
        proc.terminate()
        proc.wait(20)
        lf.close()
    check(grep_log(log, r"event=fd_limit .*max_connections_now=192"),
          "descriptors: max_connections fitted to the limit, and said")
    check(len(open(log).readlines()) < 20, "descriptors: no flood of log lines")


main()
