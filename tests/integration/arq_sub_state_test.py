#!/usr/bin/python3
"""`arq sub --state FILE`, and libarq's reconnection under it, against a real arqd.

Usage: arq_sub_state_test.py PATH_TO_ARQD PATH_TO_ARQ

- Three runs of `arq sub S --from 1 --count 10 --state F` print offsets
  1..10, 11..20, 21..30: each continues where the last one stopped.
- The state file is JSON {stream, epoch (a decimal string: a uint64),
  offset, session}; a state file of
  another stream is refused; SIGINT writes it too.
- arqd is SIGKILLed and restarted (same data dir, same port) twice while
  `arq sub --count 40 --state F` waits: it reconnects and prints every offset
  1..40 exactly once, in order.
- The stream's history is reset under a running `arq sub` (arqd replaced by
  one with an empty data dir on the same port): once republished before the
  sub reconnects (its re-subscription with the old epoch gets 409), once not
  yet (the stream does not exist: epoch 0). Both times the epoch change is
  reported and the new history is printed from offset 1. A state file whose
  epoch is gone starts over from the earliest offset, with a warning.
- Against a scripted server (python-websockets + msgpack, FakeArqd), what
  libarq does after a reconnect, message by message: hello carries the
  session and resume token; a resumed subscription is not subscribed again,
  its redeliveries are dropped and the acks catch up without acking ahead of
  what was redelivered; a new session re-subscribes from the next offset
  with the epoch, and a 409 there restarts from earliest with the epoch
  change reported; a publish answered 503 is retried, and unanswered ones
  are re-sent in order with their msgids; close 4001 and 1000 end the client
  without reconnecting.
"""
import asyncio
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import msgpack
import websockets

ARQD, ARQ = sys.argv[1], sys.argv[2]
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from harness import failures  # noqa: E402


def check(cond, what):
    return harness.check(cond, what, verbose=False)


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def arq(url, *args, input=None, timeout=60):
    env = {k: v for k, v in os.environ.items() if k != "ARQ_URL"}
    r = subprocess.run([ARQ, "--url", url, *args], input=input, capture_output=True,
                       timeout=timeout, env=env)
    return r.returncode, r.stdout.decode(errors="replace"), r.stderr.decode(errors="replace")


def publish(url, stream, payloads):
    data = "".join(p + "\n" for p in payloads).encode()
    rc, out, err = arq(url, "pub", stream, "-", input=data)
    check(rc == 0 and len(out.split()) == len(payloads),
          f"publish {len(payloads)} to {stream}: {rc} {out!r} {err!r}")
    return [int(x) for x in out.split()] if rc == 0 else []


def rows(out):
    r = []
    for line in out.splitlines():
        try:
            r.append(json.loads(line))
        except ValueError:
            r.append({"bad": line})
    return r


def read_state(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        return {"error": str(e)}


def scenario_runs(url, tmp):
    stream = "state.a"
    offs = publish(url, stream, [f"m{i}" for i in range(1, 31)])
    check(offs == list(range(1, 31)), f"30 messages at offsets 1..30: {offs}")
    f = os.path.join(tmp, "a.json")
    for run in range(3):
        rc, out, err = arq(url, "sub", stream, "--from", "1", "--count", "10", "--state", f)
        got = rows(out)
        want = list(range(run * 10 + 1, run * 10 + 11))
        check(rc == 0 and [r.get("offset") for r in got] == want,
              f"run {run + 1} prints offsets {want[0]}..{want[-1]}: {rc} "
              f"{[r.get('offset') for r in got]} {err!r}")
        check([r.get("payload") for r in got] == [f"m{i}" for i in want],
              f"run {run + 1} payloads")
        st = read_state(f)
        check(st.get("stream") == stream and st.get("offset") == want[-1]
              and isinstance(st.get("epoch"), str) and int(st["epoch"]) > 0
              and isinstance(st.get("session"), str),
              f"state file after run {run + 1}: {st}")
    check(not os.path.exists(f + ".tmp"), "no temporary state file left behind")

    # the next run waits for new messages, then continues after 30
    publish(url, stream, ["m31", "m32"])
    rc, out, err = arq(url, "sub", stream, "--count", "2", "--state", f)
    check(rc == 0 and [r.get("offset") for r in rows(out)] == [31, 32],
          f"run 4 continues at 31: {rc} {out!r} {err!r}")

    # a state file of another stream is refused and left alone
    before = open(f).read()
    rc, out, err = arq(url, "sub", "state.other", "--count", "1", "--state", f)
    check(rc != 0 and out == "" and "state.a" in err,
          f"state file of another stream refused: {rc} {out!r} {err!r}")
    check(open(f).read() == before, "refused state file unchanged")
    # a malformed one too
    bad = os.path.join(tmp, "bad.json")
    with open(bad, "w") as fh:
        fh.write("{not json")
    rc, out, err = arq(url, "sub", stream, "--count", "1", "--state", bad)
    check(rc == 1 and out == "" and "state file" in err, f"malformed state file: {rc} {err!r}")
    rc, out, err = arq(url, "pub", stream, "x", "--state", f)
    check(rc == 2, f"--state is for sub only: {rc} {err!r}")

    # without --count: SIGINT exits 0 and records the last message printed
    g = os.path.join(tmp, "g.json")
    p = subprocess.Popen([ARQ, "--url", url, "sub", stream, "--from", "5", "--state", g],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    lines = read_lines(p, 28, 20)
    p.send_signal(signal.SIGINT)
    try:
        out, err = p.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        p.kill()
        out, err = p.communicate()
    got = [r.get("offset") for r in rows("".join(lines) + out.decode())]
    check(p.returncode == 0 and got == list(range(5, 33)),
          f"sub --state until SIGINT: {p.returncode} {got} {err!r}")
    check(read_state(g).get("offset") == 32, f"SIGINT wrote the state: {read_state(g)}")
    publish(url, stream, ["m33"])
    rc, out, err = arq(url, "sub", stream, "--count", "1", "--state", g)
    check(rc == 0 and [r.get("offset") for r in rows(out)] == [33],
          f"after SIGINT the next run continues at 33: {rc} {out!r} {err!r}")


def read_lines(p, n, timeout):
    """Read n lines of p's stdout (or fewer on timeout/EOF)."""
    lines, buf = [], b""
    end = time.time() + timeout
    fd = p.stdout.fileno()
    while len(lines) < n and time.time() < end:
        r, _, _ = select.select([fd], [], [], 0.2)
        if not r:
            continue
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        buf += chunk
        while b"\n" in buf and len(lines) < n:
            line, buf = buf.split(b"\n", 1)
            lines.append(line.decode() + "\n")
    if buf:
        lines.append(buf.decode())  # a partial line: keep it for the caller
    return lines


def scenario_restart(tmp, live):
    data = os.path.join(tmp, "data-restart")
    port = free_port()
    d = harness.Arqd(ARQD, data, port=port)
    live.append(d)
    url = d.url
    stream = "state.k"
    f = os.path.join(tmp, "k.json")
    p = subprocess.Popen([ARQ, "--url", url, "sub", stream, "--from", "1", "--count", "40",
                          "--state", f], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    lines = []
    try:
        publish(url, stream, [f"k{i}" for i in range(1, 11)])
        lines += read_lines(p, 10, 20)
        check(len(lines) == 10, f"10 messages before the first kill: {len(lines)}")
        for round_ in range(2):
            d.proc.kill()
            d.proc.wait()
            time.sleep(0.2)
            d = harness.Arqd(ARQD, data, port=port)
            live.append(d)
            n = 10 if round_ == 0 else 20
            first = len(lines) + 1
            offs = publish(url, stream, [f"k{i}" for i in range(first, first + n)])
            check(offs == list(range(first, first + n)),
                  f"after restart {round_ + 1} offsets continue at {first}: {offs}")
            if round_ == 0:
                lines += read_lines(p, 10, 30)
        out, err = p.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        p.kill()
        out, err = p.communicate()
    got = rows("".join(lines) + out.decode())
    check(p.returncode == 0, f"sub through two arqd kills exits 0: {p.returncode} {err!r}")
    check([r.get("offset") for r in got] == list(range(1, 41)),
          f"offsets 1..40 exactly once, in order: {[r.get('offset') for r in got]}")
    check([r.get("payload") for r in got] == [f"k{i}" for i in range(1, 41)],
          "payloads k1..k40")
    check(err.decode().count("reconnecting") >= 2, f"the reconnections were reported: {err!r}")
    check(read_state(f).get("offset") == 40, f"state after 40: {read_state(f)}")

    # a restarted arq continues from the state file across the restarts too
    publish(url, stream, [f"k{i}" for i in range(41, 46)])
    rc, out, err = arq(url, "sub", stream, "--count", "5", "--state", f)
    check(rc == 0 and [r.get("offset") for r in rows(out)] == list(range(41, 46)),
          f"next run prints 41..45: {rc} {out!r} {err!r}")

    # --no-reconnect: a kill ends sub with 1
    p = subprocess.Popen([ARQ, "--url", url, "sub", stream, "--no-reconnect"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    read_lines(p, 45, 20)
    d.proc.kill()
    d.proc.wait()
    try:
        out, err = p.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        p.kill()
        out, err = p.communicate()
    check(p.returncode == 1 and b"error:" in err and b"reconnecting" not in err,
          f"--no-reconnect exits 1 on connection loss: {p.returncode} {err!r}")
    # --retries 2 with arqd gone: gives up quickly
    t0 = time.time()
    rc, out, err = arq(url, "sub", stream, "--retries", "2", timeout=30)
    check(rc == 1 and "refused" in err and time.time() - t0 < 10,
          f"--retries 2 gives up: {rc} {time.time() - t0:.1f}s {err!r}")


class StderrLines:
    """Collects a process's stderr lines in a thread."""

    def __init__(self, p):
        self.lines = []
        self.t = threading.Thread(target=self._run, args=(p,), daemon=True)
        self.t.start()

    def _run(self, p):
        for line in p.stderr:
            self.lines.append(line.decode(errors="replace"))

    def wait_for(self, text, n, timeout):
        end = time.time() + timeout
        while time.time() < end:
            if sum(text in line for line in self.lines) >= n:
                return True
            time.sleep(0.05)
        return False

    def text(self):
        return "".join(self.lines)


def scenario_epoch(tmp, live):
    port = free_port()
    a = harness.Arqd(ARQD, os.path.join(tmp, "data-epoch-a"), port=port)
    live.append(a)
    url = a.url
    stream = "state.e"
    f = os.path.join(tmp, "e.json")
    publish(url, stream, [f"e{i}" for i in range(1, 6)])
    p = subprocess.Popen([ARQ, "--url", url, "sub", stream, "--count", "11", "--state", f],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    err = StderrLines(p)
    lines = read_lines(p, 5, 20)
    check(len(lines) == 5, f"5 messages of the first history: {lines}")
    end = time.time() + 5
    while read_state(f).get("offset") != 5 and time.time() < end:
        time.sleep(0.05)  # written within ~200 ms
    epoch_a = int(read_state(f).get("epoch", "0"))
    check(epoch_a > 0, f"state file written while running: {read_state(f)}")

    # (a) reset and republished while the sub is stopped: 409, then from 1
    os.kill(p.pid, signal.SIGSTOP)
    a.proc.kill()
    a.proc.wait()
    b = harness.Arqd(ARQD, os.path.join(tmp, "data-epoch-b"), port=port)
    live.append(b)
    publish(url, stream, ["n1", "n2", "n3"])
    os.kill(p.pid, signal.SIGCONT)
    lines += read_lines(p, 3, 30)
    check(err.wait_for("epoch changed", 1, 10), f"epoch change reported: {err.text()!r}")

    # (b) reset, the sub reconnects before the stream exists (epoch 0)
    os.kill(p.pid, signal.SIGSTOP)
    b.proc.kill()
    b.proc.wait()
    c = harness.Arqd(ARQD, os.path.join(tmp, "data-epoch-c"), port=port)
    live.append(c)
    os.kill(p.pid, signal.SIGCONT)
    check(err.wait_for("epoch changed", 2, 30),
          f"epoch change to a missing stream reported: {err.text()!r}")
    publish(url, stream, ["z1", "z2", "z3"])
    try:
        p.wait(timeout=30)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
    got = rows("".join(lines) + p.stdout.read().decode())
    err.t.join(5)
    check(p.returncode == 0, f"sub across two history resets exits 0: {p.returncode} "
                             f"{err.text()!r}")
    check([(r.get("offset"), r.get("payload")) for r in got]
          == [(i, f"e{i}") for i in range(1, 6)] + [(1, "n1"), (2, "n2"), (3, "n3"),
                                                    (1, "z1"), (2, "z2"), (3, "z3")],
          f"each history printed from offset 1: {got}")
    st = read_state(f)
    # the last history's epoch is unknown to the client (0): its stream did not
    # exist when it subscribed
    check(st.get("offset") == 3 and st.get("epoch") == "0",
          f"state file in the new history: {st} (old epoch {epoch_a})")

    # a state file whose epoch is gone: warning, then from the earliest offset
    g = os.path.join(tmp, "stale.json")
    with open(g, "w") as fh:
        json.dump({"stream": "state.s", "epoch": "12345", "offset": 7}, fh)
    publish(c.url, "state.s", ["w1", "w2"])
    rc, out, errtext = arq(c.url, "sub", "state.s", "--count", "2", "--state", g)
    check(rc == 0 and [(r.get("offset"), r.get("payload")) for r in rows(out)]
          == [(1, "w1"), (2, "w2")] and "12345" in errtext and "earliest" in errtext,
          f"stale state epoch: from earliest with a warning: {rc} {out!r} {errtext!r}")
    st = read_state(g)
    check(st.get("offset") == 2 and st.get("epoch") not in ("12345", "0", None),
          f"stale state file rewritten: {st}")
    c.stop()


class FakeConn:
    """One client connection to FakeArqd: what it sent is kept in `log`."""

    def __init__(self, ws):
        self.ws = ws
        self.log = []
        self.pending = []

    async def send(self, **m):
        await self.ws.send(msgpack.packb(m, use_bin_type=True))

    async def _next(self, timeout):
        m = msgpack.unpackb(await asyncio.wait_for(self.ws.recv(), timeout), raw=False)
        self.log.append(m)
        return m

    async def expect(self, t, timeout=10):
        """The next client message of type t (others are kept for later)."""
        for i, m in enumerate(self.pending):
            if m.get("t") == t:
                return self.pending.pop(i)
        while True:
            m = await self._next(timeout)
            if m.get("t") == t:
                return m
            self.pending.append(m)

    async def wait_ack(self, offset, timeout=10):
        while not any(m.get("t") == "ack" and m.get("offset") == offset for m in self.log):
            await self._next(timeout)

    async def welcome(self, session, token, resumed=False, subs=None):
        m = {"t": "welcome", "session": session, "resume_token": token, "resumed": resumed,
             "session_ttl": 60, "server": "fake", "max_payload": 1 << 20,
             "max_inflight": 1024}
        if resumed:
            m["subs"] = subs or []
        await self.send(**m)

    async def msgs(self, stream, offsets, prefix):
        for o in offsets:
            await self.send(t="msg", stream=stream, offset=o, ts=1, payload=f"{prefix}{o}".encode())

    async def until_closed(self, timeout=20):
        try:
            while True:
                await self._next(timeout)
        except (websockets.ConnectionClosed, asyncio.TimeoutError):
            pass


class FakeArqd:
    """A scripted arq.v1 server on a free port: connection i runs scripts[i]
    (an async function of a FakeConn); later connections are refused with
    close 1011. Failures inside a script land in `errors`."""

    def __init__(self):
        self.scripts, self.conns, self.errors, self.done = [], [], [], 0
        self.loop = asyncio.new_event_loop()
        started = threading.Event()

        def run():
            asyncio.set_event_loop(self.loop)
            self.server = self.loop.run_until_complete(
                websockets.serve(self._handler, "127.0.0.1", 0, subprotocols=["arq.v1"]))
            self.port = self.server.sockets[0].getsockname()[1]
            started.set()
            self.loop.run_forever()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        started.wait(10)
        self.url = f"ws://127.0.0.1:{self.port}/ws"

    def script(self, *scripts):
        self.scripts, self.conns, self.errors, self.done = list(scripts), [], [], 0

    def wait_done(self, timeout=10):
        """Wait until every connection's script has returned (what the
        client sent before it exited is then all in the logs)."""
        end = time.time() + timeout
        while self.done < len(self.conns) and time.time() < end:
            time.sleep(0.05)

    async def _handler(self, ws, path=None):
        i = len(self.conns)
        conn = FakeConn(ws)
        self.conns.append(conn)
        if i >= len(self.scripts):
            await ws.close(1011, "no script")
            return
        try:
            await self.scripts[i](conn)
        except Exception as e:  # noqa: BLE001 - reported by the test
            self.errors.append(f"connection {i + 1}: {e!r}")
            await ws.close(1011, "script failed")
        finally:
            self.done += 1

    def stop(self):
        async def close():
            self.server.close()
            await self.server.wait_closed()

        try:
            asyncio.run_coroutine_threadsafe(close(), self.loop).result(10)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(5)


def sent(conn, t):
    return [m for m in conn.log if m.get("t") == t]


def scenario_fake(tmp):
    fake = FakeArqd()
    try:
        fake_resume(fake)
        fake_resubscribe(fake, tmp)
        fake_publish(fake)
        for code in (4001, 1000):
            fake_final_close(fake, code)
    finally:
        fake.stop()


def fake_resume(fake):
    """Resumed session: the subscription continues, redeliveries 3..5 are
    dropped, acks catch up (5 once 5 is redelivered, never ahead of it)."""
    S = "fake.r"

    async def c1(c):
        h = await c.expect("hello")
        if "session" in h:
            raise AssertionError(f"first hello has a session: {h}")
        await c.welcome("sess-1", "tok-1")
        s = await c.expect("sub")
        await c.send(t="subok", id=s["id"], stream=S, epoch=77, first=1, next=1)
        await c.msgs(S, range(1, 6), "r")
        await c.wait_ack(5)
        c.ws.transport.abort()  # the network goes away

    async def c2(c):
        await c.expect("hello")
        await c.welcome("sess-1", "tok-1", resumed=True,
                        subs=[{"stream": S, "epoch": 77, "acked": 2, "next": 6}])
        await c.msgs(S, range(3, 6), "r")  # redelivered: not acked on the server
        await asyncio.sleep(0.2)
        await c.msgs(S, range(6, 8), "r")
        await c.until_closed()

    fake.script(c1, c2)
    rc, out, err = arq(fake.url, "sub", S, "--from", "1", "--count", "7", timeout=30)
    fake.wait_done()
    got = [(r.get("offset"), r.get("payload")) for r in rows(out)]
    check(rc == 0 and got == [(i, f"r{i}") for i in range(1, 8)],
          f"fake resume: offsets 1..7 once: {rc} {got} {err!r} {fake.errors}")
    check(not fake.errors, f"fake resume scripts: {fake.errors}")
    if len(fake.conns) == 2:
        c1c, c2c = fake.conns
        hello = sent(c2c, "hello")
        check(hello and hello[0].get("session") == "sess-1"
              and hello[0].get("resume_token") == "tok-1",
              f"hello after the loss resumes the session: {hello}")
        check(not sent(c2c, "sub"), f"a restored subscription is not re-sent: {c2c.log}")
        check([m["offset"] for m in sent(c2c, "ack")] == [5, 6, 7],
              f"acks after the resume: 5 (after its redelivery), 6, 7: {sent(c2c, 'ack')}")
        check([m["offset"] for m in sent(c1c, "ack")] == [1, 2, 3, 4, 5],
              f"acks before: {sent(c1c, 'ack')}")
    else:
        check(False, f"fake resume: 2 connections, got {len(fake.conns)}")


def fake_resubscribe(fake, tmp):
    """New session: re-subscribe from the next offset with the epoch; 409 ->
    epoch change reported, earliest without epoch, new history printed."""
    S = "fake.b"
    f = os.path.join(tmp, "fake-b.json")

    async def c1(c):
        await c.expect("hello")
        await c.welcome("sess-b", "tok-b")
        s = await c.expect("sub")
        await c.send(t="subok", id=s["id"], stream=S, epoch=77, first=1, next=1)
        await c.msgs(S, range(1, 4), "old")
        await c.wait_ack(3)
        await c.ws.close(1001, "going away")

    async def c2(c):
        await c.expect("hello")
        await c.welcome("sess-b2", "tok-b2")  # the resume failed: a new session
        s = await c.expect("sub")
        if s.get("from") != 4 or s.get("epoch") != 77:
            raise AssertionError(f"re-subscription not from 4 with epoch 77: {s}")
        await c.send(t="nack", id=s["id"], code=409, reason="epoch mismatch")
        s = await c.expect("sub")
        if s.get("from") != "earliest" or "epoch" in s:
            raise AssertionError(f"after 409 not from earliest without epoch: {s}")
        await c.send(t="subok", id=s["id"], stream=S, epoch=88, first=1, next=1)
        await c.msgs(S, range(1, 3), "new")
        await c.until_closed()

    fake.script(c1, c2)
    rc, out, err = arq(fake.url, "sub", S, "--count", "5", "--state", f, timeout=30)
    fake.wait_done()
    got = [(r.get("offset"), r.get("payload")) for r in rows(out)]
    check(rc == 0 and got == [(1, "old1"), (2, "old2"), (3, "old3"), (1, "new1"), (2, "new2")],
          f"fake re-subscribe + 409: {rc} {got} {err!r} {fake.errors}")
    check(not fake.errors, f"fake re-subscribe scripts: {fake.errors}")
    check("epoch changed from 77 to 88" in err, f"epoch change reported: {err!r}")
    st = read_state(f)
    check(st.get("epoch") == "88" and st.get("offset") == 2, f"state in the new epoch: {st}")


def fake_publish(fake):
    """503 is retried with the same msgid; publishes without a puback are
    re-sent in order after the reconnect; offsets printed in input order."""
    S = "fake.p"
    ids = {}

    async def c1(c):
        await c.expect("hello")
        await c.welcome("sess-p", "tok-p")
        a = await c.expect("pub")
        ids["a"] = a.get("msgid")
        await c.send(t="nack", id=a["id"], code=503, reason="try later")
        b = await c.expect("pub")
        ids["b"] = b.get("msgid")
        d = await c.expect("pub")
        await c.send(t="puback", id=d["id"], stream=S, offset=3, dup=False)
        r = await c.expect("pub", timeout=5)  # the retry of a, left unanswered
        ids["a-retry"] = r.get("msgid")
        await c.ws.close(1001, "going away")

    async def c2(c):
        h = await c.expect("hello")
        if h.get("session") != "sess-p":
            raise AssertionError(f"no resume: {h}")
        await c.welcome("sess-p", "tok-p", resumed=True, subs=[])
        x = await c.expect("pub")
        y = await c.expect("pub")
        ids["resent"] = [x.get("msgid"), y.get("msgid")]
        await c.send(t="puback", id=y["id"], stream=S, offset=2, dup=False)
        await c.send(t="puback", id=x["id"], stream=S, offset=1, dup=True)
        await c.until_closed()

    fake.script(c1, c2)
    rc, out, err = arq(fake.url, "pub", S, "-", input=b"a\nb\nc\n", timeout=30)
    fake.wait_done()
    check(rc == 0 and out == "1\n2\n3\n", f"fake publish: {rc} {out!r} {err!r} {fake.errors}")
    check(not fake.errors, f"fake publish scripts: {fake.errors}")
    check(ids.get("a") and ids.get("a") == ids.get("a-retry") and ids.get("b")
          and ids.get("resent") == [ids.get("a"), ids.get("b")],
          f"503 retry and re-send keep the msgids, in order: {ids}")
    if len(fake.conns) == 2:
        check(len(sent(fake.conns[1], "pub")) == 2, "the acked publish is not re-sent")


def fake_final_close(fake, code):
    S = f"fake.c{code}"

    async def c1(c):
        await c.expect("hello")
        await c.welcome("sess-c", "tok-c")
        s = await c.expect("sub")
        await c.send(t="subok", id=s["id"], stream=S, epoch=5, first=1, next=1)
        await c.msgs(S, [1], "x")
        await c.wait_ack(1)
        await c.ws.close(code, "taken over" if code == 4001 else "bye")

    fake.script(c1)
    rc, out, err = arq(fake.url, "sub", S, "--count", "3", timeout=30)
    time.sleep(0.5)
    fake.wait_done()
    check(rc == 1 and len(rows(out)) == 1 and f"({code} " in err and "reconnecting" not in err,
          f"close {code} ends sub without reconnecting: {rc} {out!r} {err!r}")
    check(len(fake.conns) == 1, f"close {code}: no second connection: {len(fake.conns)}")


def main():
    tmp = tempfile.mkdtemp(prefix="arq-sub-state-", dir="/var/tmp")
    live = []  # every arqd started, killed at the end if still running
    try:
        d = harness.Arqd(ARQD, os.path.join(tmp, "data"))
        live.append(d)
        scenario_runs(d.url, tmp)
        rc = d.stop()
        check(rc == 0, f"arqd stop: {rc}")
        scenario_restart(tmp, live)
        scenario_epoch(tmp, live)
        scenario_fake(tmp)
    finally:
        for d in live:
            d.kill_if_running()
        shutil.rmtree(tmp, ignore_errors=True)
    if failures:
        print(f"{len(failures)} check(s) failed", flush=True)
        sys.exit(1)
    print("all arq sub --state checks passed", flush=True)


main()
