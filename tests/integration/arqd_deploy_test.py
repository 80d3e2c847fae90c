#!/usr/bin/python3
"""arqd as a deployed service (issue #18): the security model's defaults, one
owner per data directory, SIGHUP reload, sd_notify, and token expiry with
refresh during a connection.

Usage: arqd_deploy_test.py PATH_TO_ARQD

Every arqd listens on 127.0.0.1 (a free port) in a temporary directory and is
stopped by its PID. Clients are Debian's python3-websockets + python3-msgpack;
a "client behind a proxy" is a TCP connection from 127.0.0.2 (Linux routes all
of 127/8 to lo), so that a forwarded address can be told from the peer.
No timing thresholds: waits are generous deadlines for an event to happen.
"""
import asyncio
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import msgpack
import websockets

ARQD = sys.argv[1]
KEY = "deploy-test-key-1-0123456789abcdef"
KEY2 = "deploy-test-key-2-0123456789abcdef"
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from harness import failures  # noqa: E402

CLEAN = ("SECRET_KEY", "DATABASE_URL", "API_PORT", "API_HOST", "ARQ_ORIGINS", "ARQ_API_KEY",
         "ARQ_ANONYMOUS", "SECRET_KEY_PREVIOUS", "ARQ_TRUSTED_PROXIES", "ARQ_MONITOR_TOKEN",
         "ARQ_CONFIG", "NOTIFY_SOCKET", "LISTEN_FDS", "LISTEN_PID", "WATCHDOG_USEC")


def check(cond, what):
    return harness.check(cond, what, verbose=True)


def token(sub, key=KEY, ttl=3600, **extra):
    return harness.make_jwt({"sub": sub, "exp": int(time.time()) + ttl, "pub": ["*"],
                             "subscribe": ["*"], **extra}, key)


def env_for(extra):
    e = {k: v for k, v in os.environ.items() if k not in CLEAN}
    e.update(extra or {})
    return e


class Server:
    """arqd with its stderr in a file (read with .log())."""

    def __init__(self, tmp, name, *args, env=None, data=None):
        self.logpath = os.path.join(tmp, name + ".log")
        self.data = data or os.path.join(tmp, name)
        self.logf = open(self.logpath, "w")
        self.proc = subprocess.Popen(
            [ARQD, "--host", "127.0.0.1", "--port", "0", "--data-dir", self.data, *args],
            stdout=subprocess.PIPE, stderr=self.logf, text=True, env=env_for(env))
        line = self.proc.stdout.readline()
        m = re.search(r"ws://127\.0\.0\.1:(\d+)/ws", line)
        if not m:
            self.proc.wait(timeout=10)
            raise SystemExit(f"arqd did not start: {line!r} {self.log()}")
        self.port = int(m.group(1))
        self.url = f"ws://127.0.0.1:{self.port}/ws"

    def log(self):
        with open(self.logpath, errors="replace") as f:
            return f.read()

    def wait_log(self, pattern, timeout=20):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if re.search(pattern, self.log()):
                return True
            time.sleep(0.05)
        return False

    def http(self, method, path, body=None, headers=None, src="127.0.0.1"):
        """A raw HTTP/1.1 request from source address src; (status, body)."""
        s = socket.create_connection(("127.0.0.1", self.port), timeout=10,
                                     source_address=(src, 0))
        h = {"Host": "arq", "Connection": "close", **(headers or {})}
        if body is not None:
            h["Content-Length"] = str(len(body))
            h.setdefault("Content-Type", "application/json")
        req = f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in h.items())
        s.sendall(req.encode() + b"\r\n" + (body or b""))
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
        s.close()
        head, _, rest = data.partition(b"\r\n\r\n")
        return int(head.split()[1]), rest

    def stop(self, signalled=False):
        if self.proc.poll() is None:
            if not signalled:
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.logf.close()
        check(not re.search(r"ERROR: (Address|Leak)Sanitizer|runtime error:", self.log()),
              f"no sanitizer report in {self.logpath}")
        return self.proc.returncode


def run_arqd(tmp, *args, env=None):
    """arqd expected to refuse to start: (exit status, its stderr)."""
    p = subprocess.run([ARQD, "--host", "127.0.0.1", "--port", "0", "--data-dir",
                        os.path.join(tmp, "refused"), *args], capture_output=True, text=True,
                       env=env_for(env), timeout=30)
    return p.returncode, p.stderr


async def ws_hello(url, tok=None, src="127.0.0.1", headers=None):
    ws = await websockets.connect(url, subprotocols=["arq.v1"], local_addr=(src, 0),
                                  extra_headers=headers or {}, close_timeout=2)
    await ws.send(msgpack.packb({"t": "hello", **({"token": tok} if tok else {})}))
    return ws, msgpack.unpackb(await asyncio.wait_for(ws.recv(), 10), raw=False)


async def recv_until(ws, t, timeout=10):
    deadline = time.time() + timeout
    while True:
        m = msgpack.unpackb(await asyncio.wait_for(ws.recv(), deadline - time.time()), raw=False)
        if m.get("t") == t:
            return m


# ---- the security model's defaults -------------------------------------------


def scenario_policy(tmp):
    rc, err = run_arqd(tmp)
    check(rc == 2 and "refusing_to_start" in err and "auth.anonymous" in err,
          f"no SECRET_KEY and no auth.anonymous: refused ({rc}, {err[-300:]!r})")
    rc, err = run_arqd(tmp, "--anonymous", env={"SECRET_KEY": KEY})
    check(rc == 2 and "choose" in err, f"anonymous and a secret key: refused ({rc})")
    rc, err = run_arqd(tmp, "--set", "server.trusted_proxies=10.1.0.0/8", env={"SECRET_KEY": KEY})
    check(rc == 2 and "host bits" in err, f"a bad trusted_proxies range: refused ({rc})")


async def scenario_anonymous(tmp):
    d = Server(tmp, "anon", "--anonymous")
    try:
        check("event=anonymous_access" in d.log() and "level=warn" in d.log(),
              "anonymous access is said at warn level")
        ws, w = await ws_hello(d.url)
        check(w.get("t") == "welcome" and "token_expires" not in w, f"anonymous welcome: {w}")
        await ws.send(msgpack.packb({"t": "refresh", "id": 5, "token": token("u")}))
        r = await recv_until(ws, "nack")
        check(r.get("id") == 5 and r.get("code") == 400, f"refresh on an anonymous connection: {r}")
        # a takeover (close 4001) is logged at warn, once
        ws2 = await websockets.connect(d.url, subprotocols=["arq.v1"], close_timeout=2)
        await ws2.send(msgpack.packb({"t": "hello", "session": w["session"],
                                      "resume_token": w["resume_token"]}))
        w2 = msgpack.unpackb(await asyncio.wait_for(ws2.recv(), 10), raw=False)
        check(w2.get("resumed") is True, f"the session is resumed elsewhere: {w2}")
        code = None
        try:
            while True:
                await asyncio.wait_for(ws.recv(), 10)
        except websockets.ConnectionClosed as e:
            code = e.code
        check(code == 4001, f"the first connection is closed with 4001: {code}")
        check(d.wait_log(r"level=warn event=session_taken_over peer=127\.0\.0\.1:\d+ session="
                         + w["session"]), "the takeover is logged at warn with the session")
        await ws2.close()
        st, body = d.http("POST", "/api/publish", b'{"stream":"s","payload":"x"}')
        check(st == 403 and b"api_open" in body,
              f"server API closed without a key even when anonymous: {st} {body!r}")
    finally:
        d.stop()


async def scenario_proxy(tmp):
    """Forwarded addresses only from trusted proxies; monitoring access."""
    d = Server(tmp, "proxy", "--set", "server.trusted_proxies=127.0.0.1",
               "--set", "server.monitor_token=mon-token", "--set", "auth.api_key=api-key-1",
               env={"SECRET_KEY": KEY})
    try:
        # a client behind the (trusted) proxy at 127.0.0.1: the forwarded address is logged
        for src, xff, want in (("127.0.0.1", "203.0.113.9", "203.0.113.9"),
                               ("127.0.0.1", "198.51.100.1, 203.0.113.10", "203.0.113.10"),
                               ("127.0.0.2", "203.0.113.11", "127.0.0.2")):
            ws, w = await ws_hello(d.url, tok="not-a-token", src=src,
                                   headers={"X-Forwarded-For": xff})
            check(w.get("code") == 401, f"bad token refused: {w}")
            await ws.close()
            check(d.wait_log(rf"event=auth_failed peer={re.escape(want)}\b"),
                  f"from {src} with X-Forwarded-For {xff!r}: logged as {want}")
        check("peer=203.0.113.11" not in d.log(),
              "a forwarded address from an untrusted peer is never believed")
        # X-Real-IP from the trusted proxy
        ws, w = await ws_hello(d.url, tok="bad", headers={"X-Real-IP": "192.0.2.44"})
        await ws.close()
        check(d.wait_log(r"event=auth_failed peer=192\.0\.2\.44\b"), "X-Real-IP from a trusted proxy")

        # /metrics: direct loopback yes; through the proxy from elsewhere no, unless the token
        st, body = d.http("GET", "/metrics")
        check(st == 200 and b"arq_build_info{" in body, f"/metrics from loopback: {st}")
        st, _ = d.http("GET", "/metrics", headers={"X-Forwarded-For": "203.0.113.9"})
        check(st == 403, f"/metrics from a proxied remote client: {st}")
        st, _ = d.http("GET", "/metrics", src="127.0.0.2",
                       headers={"X-Forwarded-For": "127.0.0.1"})
        check(st == 403, f"/metrics via an untrusted peer claiming loopback: {st}")
        st, body = d.http("GET", "/metrics", headers={"X-Forwarded-For": "203.0.113.9",
                                                      "Authorization": "Bearer mon-token"})
        check(st == 200 and b"process_resident_memory_bytes" in body, f"/metrics with token: {st}")
        st, _ = d.http("GET", "/metrics", headers={"X-Forwarded-For": "203.0.113.9",
                                                   "Authorization": "Bearer mon-tokeX"})
        check(st == 403, f"/metrics with a wrong token: {st}")
        st, body = d.http("GET", "/health", headers={"X-Forwarded-For": "203.0.113.9"})
        check(st == 200 and json.loads(body) == {"status": "healthy"},
              f"/health for a remote client: the status only: {body!r}")
        st, body = d.http("GET", "/health")
        check(st == 200 and "wal" in json.loads(body), "/health details from loopback")
        # the server API needs its key
        st, _ = d.http("POST", "/api/publish", b'{"stream":"s","payload":"x"}')
        check(st == 401, f"/api/publish without the key: {st}")
        st, body = d.http("POST", "/api/publish", b'{"stream":"s","payload":"x"}',
                          headers={"Authorization": "Bearer api-key-1"})
        check(st == 200 and json.loads(body)["offset"] == 1, f"/api/publish with the key: {body!r}")
    finally:
        d.stop()


async def scenario_proxy_limits(tmp):
    """Behind a trusted proxy, the per-address limits count the forwarded
    client addresses, not the proxy's: one client is held to its limit, the
    others (through the same proxy) are not; anonymous sessions too."""
    d = Server(tmp, "proxylim", "--anonymous", "--set", "server.trusted_proxies=127.0.0.1",
               "--set", "limits.max_connections_per_address=3")
    held = []
    try:
        for i in range(3):
            ws, w = await ws_hello(d.url, headers={"X-Forwarded-For": "203.0.113.5"})
            check(w.get("t") == "welcome", f"client A, connection {i + 1}: {w}")
            held.append((ws, w))
        try:
            ws, w = await ws_hello(d.url, headers={"X-Forwarded-For": "203.0.113.5"})
            check(False, f"client A's fourth connection through the proxy: {w}")
            held.append((ws, w))
        except websockets.InvalidStatusCode as e:
            check(e.status_code == 429, f"client A's fourth connection: 429 ({e.status_code})")
        for i in range(6):  # other clients through the same proxy are not held back
            ws, w = await ws_hello(d.url, headers={"X-Forwarded-For": f"198.51.100.{i + 1}"})
            check(w.get("t") == "welcome", f"client B{i}: welcomed ({w})")
            held.append((ws, w))
        check(d.wait_log(r"event=connection_refused reason=address_limit address=203\.0\.113\.5 "
                         r"via=\"trusted proxy\""), "the refusal names the forwarded address")
    finally:
        for ws, _ in held:
            await ws.close()
        d.stop()
    # sessions of an anonymous client are owned by its forwarded address: at
    # the limit (2, all held open) the third is refused with 429
    d = Server(tmp, "proxysess", "--anonymous", "--set", "server.trusted_proxies=127.0.0.1",
               "--set", "limits.max_sessions_per_address=2")
    try:
        a1, w1 = await ws_hello(d.url, headers={"X-Forwarded-For": "192.0.2.77"})
        a2, w2 = await ws_hello(d.url, headers={"X-Forwarded-For": "192.0.2.77"})
        a3, w3 = await ws_hello(d.url, headers={"X-Forwarded-For": "192.0.2.77"})
        check(w1.get("t") == "welcome" and w2.get("t") == "welcome",
              f"two sessions of one forwarded address: {w1.get('t')} {w2.get('t')}")
        check(w3.get("t") == "error" and w3.get("code") == 429,
              f"a third session of that address, both held open: 429 ({w3})")
        a4, w4 = await ws_hello(d.url, headers={"X-Forwarded-For": "192.0.2.78"})
        check(w4.get("t") == "welcome", f"another forwarded address has its own sessions: {w4}")
        for ws in (a1, a2, a3, a4):
            await ws.close()
    finally:
        d.stop()


# ---- one owner per data directory ---------------------------------------------


def scenario_lock(tmp):
    d = Server(tmp, "lock", "--anonymous")
    try:
        rc, err = run_arqd(tmp, "--anonymous", "--data-dir", d.data)
        check(rc == 1 and d.data in err and f"pid {d.proc.pid}" in err,
              f"a second arqd on the directory exits 1 naming it and the holder: {rc} {err!r}")
        st, body = d.http("GET", "/health")
        check(st == 200, "the first one still serves")
    finally:
        d.stop()
    d2 = Server(tmp, "lock2", "--anonymous", data=d.data)  # released at exit
    rc = d2.stop()
    check(rc == 0, f"after the holder stopped, the directory can be taken again: {rc}")


# ---- SIGHUP ----------------------------------------------------------------------


async def scenario_reload(tmp):
    conf = os.path.join(tmp, "arqd.ini")

    def write(text):
        with open(conf + ".new", "w") as f:
            f.write(text)
        os.replace(conf + ".new", conf)

    write(f"[server]\nlog_level = info\n[auth]\nsecret_key = {KEY}\n")
    d = Server(tmp, "reload", "--config", conf)
    try:
        old_tok = token("alice", KEY)
        ws_old, w = await ws_hello(d.url, old_tok)
        check(w.get("t") == "welcome", "welcomed with the first key")
        # rotation: the new key signs, the old one still verifies
        write(f"[server]\nlog_level = debug\n[auth]\nsecret_key = {KEY2}\n"
              f"previous_secret_key = {KEY}\norigins = https://app.example\n")
        d.proc.send_signal(signal.SIGHUP)
        check(d.wait_log(r"event=reloaded changed=4 "), "reload applied four changes")
        log = d.log()
        check("key=auth.secret_key value=(secret)" in log and KEY2 not in log,
              "a changed secret is logged as changed, never its value")
        check("key=server.log_level from=info to=debug" in log, "the log level change is logged")
        for tok, what in ((token("bob", KEY2), "the new key"), (old_tok, "the previous key")):
            ws, w = await ws_hello(d.url, tok)
            check(w.get("t") == "welcome", f"after the rotation, a token of {what} is welcomed")
            await ws.close()
        ws, w = await ws_hello(d.url, token("eve", "some-other-key"))
        check(w.get("code") == 401, "a token of neither key is refused")
        await ws.close()
        try:
            await websockets.connect(d.url, subprotocols=["arq.v1"],
                                     origin="https://evil.example")
            check(False, "the reloaded origin list applies")
        except websockets.InvalidStatusCode as e:
            check(e.status_code == 403, f"the reloaded origin list applies: {e.status_code}")
        # the connection made before the reload keeps working
        await ws_old.send(msgpack.packb({"t": "pub", "id": 1, "stream": "r", "payload": b"x"}))
        r = await recv_until(ws_old, "puback")
        check(r.get("offset") == 1, "a connection from before the reload goes on")
        await ws_old.close()
        # a bad configuration is refused and the running one stays
        write(f"[auth]\nsecret_key = {KEY2}\nanonymous = true\n")
        d.proc.send_signal(signal.SIGHUP)
        check(d.wait_log(r"level=error event=reload_failed reason=\"auth.anonymous = true and"),
              "a bad reload says why")
        write("[server]\nport = notaport\n")
        d.proc.send_signal(signal.SIGHUP)
        check(d.wait_log(r"event=reload_failed reason=\"line 2: server.port"),
              "an invalid value is refused with its line")
        ws, w = await ws_hello(d.url, token("bob", KEY2))
        check(w.get("t") == "welcome", "the old configuration still runs after bad reloads")
        await ws.close()
        ws, w = await ws_hello(d.url)
        check(w.get("code") == 401, "and it still wants a token")
        await ws.close()
        # something only a restart changes
        write(f"[server]\nlog_level = debug\nsession_ttl_s = 60\n[auth]\nsecret_key = {KEY2}\n"
              f"previous_secret_key = {KEY}\norigins = https://app.example\n")
        d.proc.send_signal(signal.SIGHUP)
        check(d.wait_log(r"level=warn event=reload_needs_restart key=server.session_ttl_s"),
              "a change that needs a restart is named")
        # limits change at once
        ws_l, w = await ws_hello(d.url, token("bob", KEY2))
        check(w.get("max_payload") == 1048576, f"before: max_payload 1 MiB: {w.get('max_payload')}")
        write(f"[server]\nlog_level = debug\nsession_ttl_s = 60\n[auth]\nsecret_key = {KEY2}\n"
              f"previous_secret_key = {KEY}\norigins = https://app.example\n"
              f"[limits]\nmax_message_bytes = 1K\n")
        d.proc.send_signal(signal.SIGHUP)
        check(d.wait_log(r"key=limits.max_message_bytes from=1048576 to=1024"),
              "the payload limit change is logged")
        await ws_l.send(msgpack.packb({"t": "pub", "id": 3, "stream": "r", "payload": b"x" * 2000}))
        r = await recv_until(ws_l, "nack")
        check(r.get("id") == 3 and r.get("code") == 413,
              f"the lowered payload limit applies to a connection from before: {r}")
        await ws_l.close()
        ws_l, w = await ws_hello(d.url, token("bob", KEY2))
        check(w.get("max_payload") == 1024, f"and welcome announces it: {w.get('max_payload')}")
        await ws_l.close()
        check(d.proc.poll() is None, "SIGHUP never stops arqd")
    finally:
        check(d.stop() == 0, "arqd exits 0 after the reloads")


# ---- sd_notify ---------------------------------------------------------------------


def scenario_notify(tmp):
    path = os.path.join(tmp, "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(20)
    msgs = []

    def wait_for(word):
        deadline = time.time() + 20
        while time.time() < deadline:
            if any(word in m for m in msgs):
                return True
            try:
                msgs.append(sock.recv(4096).decode())
            except socket.timeout:
                break
        return any(word in m for m in msgs)

    d = Server(tmp, "notify", "--anonymous",
               env={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "200000"})
    try:
        check(wait_for("READY=1"), f"READY=1 sent: {msgs}")
        ready = next(m for m in msgs if "READY=1" in m)
        check(f"MAINPID={d.proc.pid}" in ready and "STATUS=serving on 127.0.0.1:" in ready,
              f"READY with MAINPID and STATUS: {ready!r}")
        # READY comes after the listener is bound: it answers now
        check(d.http("GET", "/health")[0] == 200, "listening when READY was sent")
        n0 = sum(m.count("WATCHDOG=1") for m in msgs)
        check(wait_for("WATCHDOG=1"), "watchdog pings")
        deadline = time.time() + 20
        while sum(m.count("WATCHDOG=1") for m in msgs) < n0 + 3 and time.time() < deadline:
            msgs.append(sock.recv(4096).decode())
        check(sum(m.count("WATCHDOG=1") for m in msgs) >= n0 + 3, "watchdog pings keep coming")
        # a stopped loop stops the pings (what makes systemd restart a stuck arqd)
        os.kill(d.proc.pid, signal.SIGSTOP)
        time.sleep(0.1)
        sock.settimeout(0.2)
        drained = 0
        try:
            while drained < 100:
                sock.recv(4096)
                drained += 1
        except socket.timeout:
            pass
        got = []
        sock.settimeout(1.0)
        try:
            got.append(sock.recv(4096))
        except socket.timeout:
            pass
        check(not got, "no watchdog ping while the loop does not run")
        os.kill(d.proc.pid, signal.SIGCONT)
        sock.settimeout(20)
        d.proc.send_signal(signal.SIGHUP)
        check(wait_for("RELOADING=1"), "RELOADING=1 on SIGHUP")
        d.proc.send_signal(signal.SIGTERM)
        check(wait_for("STOPPING=1"), "STOPPING=1 on SIGTERM")
    finally:
        check(d.stop(signalled=True) == 0, "arqd exits 0")
        sock.close()


# ---- token expiry during a connection ------------------------------------------------


async def scenario_expiry(tmp):
    d = Server(tmp, "expiry", "--set", "auth.expiry_grace_s=1", env={"SECRET_KEY": KEY})
    try:
        # not refreshed: closed with 4002 after exp + grace
        ws, w = await ws_hello(d.url, token("carol", ttl=2))
        check(w.get("t") == "welcome" and w.get("token_expires", 0) > time.time(),
              f"welcome carries token_expires: {w}")
        code = None
        try:
            while True:
                await asyncio.wait_for(ws.recv(), 30)
        except websockets.ConnectionClosed as e:
            code = e.code
        except asyncio.TimeoutError:
            pass
        check(code == 4002, f"an expired token's connection is closed with 4002: {code}")
        check(d.wait_log(r"event=token_expired peer=127\.0\.0\.1:\d+ subject=carol"),
              "the expiry is logged")

        # refreshed before exp: it outlives the first token
        ws, w = await ws_hello(d.url, token("dave", ttl=2))
        exp1 = w["token_expires"]
        await ws.send(msgpack.packb({"t": "refresh", "id": 7, "token": token("mallory")}))
        r = await recv_until(ws, "nack")
        check(r.get("id") == 7 and r.get("code") == 403, f"refresh with another subject: {r}")
        await ws.send(msgpack.packb({"t": "refresh", "id": 8, "token": token("dave", KEY2)}))
        r = await recv_until(ws, "nack")
        check(r.get("id") == 8 and r.get("code") == 401, f"refresh with a bad token: {r}")
        # the new token only grants publishing to dave.*
        newtok = harness.make_jwt({"sub": "dave", "exp": int(time.time()) + 3600,
                                   "pub": ["dave.*"], "subscribe": ["*"]}, KEY)
        await ws.send(msgpack.packb({"t": "refresh", "id": 9, "token": newtok}))
        r = await recv_until(ws, "refreshok")
        check(r.get("id") == 9 and r.get("token_expires", 0) > exp1 + 60, f"refreshok: {r}")
        while time.time() < exp1 + 3:  # past the old exp + grace
            await asyncio.sleep(0.2)
        await ws.send(msgpack.packb({"t": "pub", "id": 10, "stream": "dave.x", "payload": b"1"}))
        r = await recv_until(ws, "puback")
        check(r.get("id") == 10, "a refreshed connection outlives its first token")
        await ws.send(msgpack.packb({"t": "pub", "id": 11, "stream": "other", "payload": b"1"}))
        r = await recv_until(ws, "nack")
        check(r.get("id") == 11 and r.get("code") == 403, "the new token's grants apply")
        await ws.close()
    finally:
        d.stop()


def scenario_storage(tmp):
    """The WAL past 90 % of wal.map_size_max: said once, at warn, with why."""
    d = Server(tmp, "storage", "--anonymous", "--set", "auth.api_open=true",
               "--set", "wal.map_size_max=1M")
    try:
        body = json.dumps({"stream": "big", "payload": "x" * 16384}).encode()
        codes = []
        for _ in range(120):
            st, _ = d.http("POST", "/api/publish", body)
            codes.append(st)
            if st != 200:
                break
        check(codes.count(200) > 10, f"publishes stored before the map filled: {codes.count(200)}")
        check(d.wait_log(r"level=warn event=storage_nearly_full reason=\"the WAL uses \d+% of "
                         r"wal.map_size_max \(1 MiB\)\""),
              "storage nearly full is logged at warn with its reason")
        time.sleep(1.5)  # the watcher runs once a second: a second line would show by now
        check(d.log().count("event=storage_nearly_full ") == 1, "once")
    finally:
        d.stop()


def main():
    tmp = tempfile.mkdtemp(prefix="arq-deploy-", dir="/var/tmp")
    try:
        scenario_policy(tmp)
        asyncio.run(scenario_anonymous(tmp))
        asyncio.run(scenario_proxy(tmp))
        asyncio.run(scenario_proxy_limits(tmp))
        scenario_lock(tmp)
        asyncio.run(scenario_reload(tmp))
        scenario_notify(tmp)
        asyncio.run(scenario_expiry(tmp))
        scenario_storage(tmp)
    finally:
        if failures:
            for f in sorted(os.listdir(tmp)):
                if f.endswith(".log"):
                    print(f"--- {f} (tail)\n" + "".join(open(os.path.join(tmp, f)).readlines()[-15:]))
        shutil.rmtree(tmp, ignore_errors=True)
    if failures:
        print(f"{len(failures)} check(s) failed")
        sys.exit(1)
    print("all checks passed")


main()
