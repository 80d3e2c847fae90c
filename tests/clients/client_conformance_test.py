#!/usr/bin/python3
"""One conformance suite for every ARQ client (issue #19): the scenarios are
written once, here, and each client runs them through its agent, a small
program that turns JSON-line commands into calls of the client library and
reports what the library tells the application (clients/js/test/agent.mjs,
clients/python/tests/agent.py; protocol in tests/clients/README.md).

Scenarios run against a real arqd (started by harness.Arqd on a free
loopback port, in a temporary directory), through chaos_proxy.ChaosProxy
where connections must break, or against a scripted arq.v1 server (this
file) where the server must do something arqd does only by accident (a gap,
a puback lost with its connection, a 503).

    client_conformance_test.py --agent js|python --arqd PATH [--node PATH]
                               [--js-dist PATH/index.js] [--only a,b] [--skip a,b]

libarq is not run here: the `arq` CLI prints messages but not the events
the scenarios check (subok epochs, redeliveries dropped, state changes), and
tests/tools/arq_chaos.c already checks it the same way under chaos.
"""
import argparse
import asyncio
import json
import os
import shutil
import signal
import sys
import tempfile
import time

import msgpack
import websockets

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(ROOT, "tests", "integration"))
import harness  # noqa: E402
from chaos_proxy import ChaosProxy, _read_streams  # noqa: E402

SECRET = "conformance-secret-0123456789abcdef"
STEP = 20  # seconds any one expected event may take


def check(cond, what):
    return harness.check(cond, what, verbose=True)


class Agent:
    """One client under test, in its own process."""

    def __init__(self, argv, name):
        self.argv = argv
        self.name = name
        self.events = []
        self.changed = asyncio.Condition()

    async def start(self):
        self.proc = await asyncio.create_subprocess_exec(
            *self.argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
        self.reader = asyncio.get_running_loop().create_task(self._read())
        await self.wait(lambda e: e["ev"] == "ready")
        return self

    async def _read(self):
        while True:
            line = await self.proc.stdout.readline()
            if not line:
                break
            ev = json.loads(line)
            async with self.changed:
                self.events.append(ev)
                self.changed.notify_all()

    def send(self, **cmd):
        self.proc.stdin.write((json.dumps(cmd) + "\n").encode())

    def select(self, pred):
        return [e for e in self.events if pred(e)]

    async def wait(self, pred, timeout=STEP, n=1):
        """The n-th event matching pred; raises TimeoutError naming what was awaited."""
        async def go():
            async with self.changed:
                await self.changed.wait_for(lambda: len(self.select(pred)) >= n)
        try:
            await asyncio.wait_for(go(), timeout)
        except asyncio.TimeoutError:
            raise TimeoutError(f"{self.name}: event not seen; last events: {self.events[-5:]}") from None
        return self.select(pred)[n - 1]

    async def stats(self):
        k = len(self.select(lambda e: e["ev"] == "stats"))
        self.send(cmd="stats")
        return await self.wait(lambda e: e["ev"] == "stats", n=k + 1)

    def msgs(self, stream):
        return [(e["offset"], e["payload"]) for e in self.events if e["ev"] == "msg" and e["stream"] == stream]

    async def stop(self):
        if self.proc.returncode is None:
            self.proc.stdin.close()
            try:
                await asyncio.wait_for(self.proc.wait(), 5)
            except asyncio.TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        await self.reader


class Raw:
    """The suite's own arq.v1 client (python-websockets + msgpack, no client
    library): publishes, reads back, and takes sessions over."""

    async def connect(self, url, **hello):
        self.ws = await websockets.connect(url, subprotocols=["arq.v1"], max_size=None)
        await self.ws.send(msgpack.packb({"t": "hello", "client": "conformance", **hello}))
        self.welcome = await self.recv()
        self.id = 0
        return self

    async def recv(self):
        return msgpack.unpackb(await asyncio.wait_for(self.ws.recv(), STEP), raw=False)

    async def publish(self, stream, payload, msgid=None):
        self.id += 1
        m = {"t": "pub", "id": self.id, "stream": stream, "payload": payload.encode()}
        if msgid:
            m["msgid"] = msgid
        await self.ws.send(msgpack.packb(m))
        while True:
            r = await self.recv()
            if r.get("id") == self.id:
                return r

    async def close(self):
        await self.ws.close()


class Scripted:
    """A scripted arq.v1 server: script(conn_index, ws, rx) plays one
    connection; rx() returns the next client message (decoded) and keeps the
    raw frames in self.frames."""

    def __init__(self, script):
        self.script = script
        self.conns = 0
        self.frames = []
        self.errors = []

    async def start(self):
        self.server = await websockets.serve(self._handle, "127.0.0.1", 0, subprotocols=["arq.v1"])
        self.url = f"ws://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/ws"
        return self

    async def _handle(self, ws, *_path):
        n = self.conns
        self.conns += 1

        async def rx():
            while True:
                raw = await asyncio.wait_for(ws.recv(), STEP)
                self.frames.append((n, raw))
                return msgpack.unpackb(raw, raw=False)

        async def tx(**m):
            await ws.send(msgpack.packb(m))

        try:
            await self.script(n, rx, tx, ws)
        except websockets.ConnectionClosed:
            pass
        except Exception as e:  # a broken expectation: the test reports it
            self.errors.append(f"connection {n}: {e!r}")

    async def stop(self):
        self.server.close()
        await self.server.wait_closed()


def cut(ws):
    """Lose a connection the way a network does: no close frame."""
    ws.transport.abort()


def welcome(session="s1", resumed=False, subs=None, max_inflight=1024):
    m = {"t": "welcome", "session": session, "resume_token": f"rt-{session}", "resumed": resumed,
         "session_ttl": 86400, "server": "scripted", "max_payload": 1 << 20, "max_inflight": max_inflight}
    if resumed:
        m["subs"] = subs or []
    return m


def offsets(msgs):
    return [o for o, _ in msgs]


class Suite:
    def __init__(self, args):
        self.args = args
        self.tmp = tempfile.mkdtemp(prefix="arq-clients-")
        self.procs = []
        self.n_agents = 0

    def agent_argv(self):
        if self.args.agent == "js":
            return [self.args.node, os.path.join(ROOT, "clients", "js", "test", "agent.mjs"), self.args.js_dist]
        return ["/usr/bin/python3", os.path.join(ROOT, "clients", "python", "tests", "agent.py")]

    async def agent(self, url, **opts):
        self.n_agents += 1
        a = await Agent(self.agent_argv(), f"{self.args.agent}-agent-{self.n_agents}").start()
        self.procs.append(a)
        a.send(cmd="connect", url=url, **opts)
        return a

    def arqd(self, name, *extra, env=None, port=0, data=None):
        d = data or os.path.join(self.tmp, name)
        os.makedirs(d, exist_ok=True)
        log = open(os.path.join(self.tmp, f"{name}.log"), "a")
        return harness.Arqd(self.args.arqd, d, *extra, env=env, port=port, log=log)

    async def cleanup(self):
        for a in self.procs:
            await a.stop()
        self.procs = []

    # ---- scenarios against arqd ----

    async def resume(self):
        """Cut the connection: the session resumes and the subscription goes on
        after what was delivered, each offset once."""
        d = self.arqd("resume")
        proxy = ChaosProxy("127.0.0.1", d.port, seed=1)
        proxy.start()
        try:
            pub = await Raw().connect(d.url)
            a = await self.agent(proxy.url)
            await a.wait(lambda e: e["ev"] == "connected")
            a.send(cmd="subscribe", stream="conf.resume", **{"from": "earliest"})
            await a.wait(lambda e: e["ev"] == "subok")
            for i in range(1, 6):
                await pub.publish("conf.resume", f"m{i}")
            await a.wait(lambda e: e["ev"] == "msg" and e["offset"] == 5)
            await asyncio.sleep(0.2)  # let the acks reach the server (behaviour is the same either way)
            proxy.cut_all("rst")
            await a.wait(lambda e: e["ev"] == "state" and e["to"] == "disconnected")
            for i in range(6, 11):
                await pub.publish("conf.resume", f"m{i}")
            await a.wait(lambda e: e["ev"] == "msg" and e["offset"] == 10)
            await a.wait(lambda e: e["ev"] == "state" and e["to"] == "connected", n=2)
            s = await a.stats()
            check(s["resumed"] >= 1, f"resume: the session was resumed ({s})")
            check(a.msgs("conf.resume") == [(i, f"m{i}") for i in range(1, 11)],
                  f"resume: offsets 1..10 once, in order ({offsets(a.msgs('conf.resume'))})")
            seq = [e["to"] for e in a.select(lambda e: e["ev"] == "state")]
            check(seq[:2] == ["connecting", "connected"] and "reconnecting" in seq and "recovering" in seq,
                  f"resume: states connecting, connected, ..., reconnecting, recovering, connected ({seq})")
            await pub.close()
        finally:
            await self.cleanup()
            proxy.stop()
            d.stop()

    async def redelivery(self):
        """Unacked deliveries come again after a resume: the client drops them."""
        d = self.arqd("redelivery")
        proxy = ChaosProxy("127.0.0.1", d.port, seed=2)
        proxy.start()
        try:
            pub = await Raw().connect(d.url)
            for i in range(1, 6):
                await pub.publish("conf.redeliver", f"m{i}")
            a = await self.agent(proxy.url)
            await a.wait(lambda e: e["ev"] == "connected")
            a.send(cmd="subscribe", stream="conf.redeliver", ack="none", **{"from": "earliest"})
            await a.wait(lambda e: e["ev"] == "msg" and e["offset"] == 5)
            proxy.cut_all("rst")
            await a.wait(lambda e: e["ev"] == "state" and e["to"] == "connected", n=2)
            deadline = time.monotonic() + STEP
            while (s := await a.stats())["redeliveries_dropped"] < 5 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            check(s["resumed"] >= 1 and s["redeliveries_dropped"] >= 5,
                  f"redelivery: resumed, the server's 5 redeliveries dropped ({s})")
            await pub.publish("conf.redeliver", "m6")
            await a.wait(lambda e: e["ev"] == "msg" and e["offset"] == 6)
            check(a.msgs("conf.redeliver") == [(i, f"m{i}") for i in range(1, 7)],
                  f"redelivery: the application saw 1..6 once ({offsets(a.msgs('conf.redeliver'))})")
            await pub.close()
        finally:
            await self.cleanup()
            proxy.stop()
            d.stop()

    async def dedup(self):
        """The same msgid twice: one message, the second puback is dup with the original offset."""
        d = self.arqd("dedup")
        try:
            a = await self.agent(d.url)
            await a.wait(lambda e: e["ev"] == "connected")
            a.send(cmd="publish", stream="conf.dedup", payload="x", msgid="conf-dedup-1", tag=1)
            first = await a.wait(lambda e: e["ev"] in ("puback", "puberr") and e["tag"] == 1)
            a.send(cmd="publish", stream="conf.dedup", payload="x", msgid="conf-dedup-1", tag=2)
            second = await a.wait(lambda e: e["ev"] in ("puback", "puberr") and e["tag"] == 2)
            check(first["ev"] == "puback" and not first["dup"], f"dedup: first puback not dup ({first})")
            check(second["ev"] == "puback" and second["dup"] and second["offset"] == first["offset"],
                  f"dedup: second puback dup with the original offset ({second})")
            a.send(cmd="publish", stream="conf.dedup", payload="y", tag=3)
            third = await a.wait(lambda e: e["ev"] in ("puback", "puberr") and e["tag"] == 3)
            check(third["ev"] == "puback" and third["offset"] == first["offset"] + 1 and third["msgid"],
                  f"dedup: a publish without msgid gets a generated one and the next offset ({third})")
            back = (await read_back(d.url, ["conf.dedup"]))["conf.dedup"]
            check([p for _, p in back] == [b"x", b"y"], f"dedup: the stream holds x, y once each ({back})")
        finally:
            await self.cleanup()
            d.stop()

    async def takeover(self):
        """Another connection resumes the session: ours is closed with 4001 and
        does not reconnect (it would take the session back)."""
        d = self.arqd("takeover")
        try:
            a = await self.agent(d.url)
            await a.wait(lambda e: e["ev"] == "connected")
            sess = await a.wait(lambda e: e["ev"] == "session")
            other = await Raw().connect(d.url, session=sess["session"], resume_token=sess["resume_token"])
            check(other.welcome.get("resumed") is True, f"takeover: the other connection resumed ({other.welcome})")
            st = await a.wait(lambda e: e["ev"] == "state" and e["to"] == "failed")
            check(st.get("error", {}).get("code") == "session-taken",
                  f"takeover: failed with session-taken ({st})")
            await asyncio.sleep(0.5)  # would be enough for a reconnect with this backoff (10-300 ms)
            s = await a.stats()
            check(s["connects"] == 1 and s["state"] == "failed", f"takeover: no reconnection ({s})")
            a.send(cmd="publish", stream="conf.takeover", payload="late", tag=1)
            late = await a.wait(lambda e: e["ev"] in ("puback", "puberr") and e["tag"] == 1)
            check(late["ev"] == "puberr", f"takeover: a publish after the takeover fails ({late})")
            await other.close()
        finally:
            await self.cleanup()
            d.stop()

    async def flow_control(self):
        """max_inflight 4: a client that does not ack gets 4 messages; each ack opens the window again."""
        d = self.arqd("flow", "--set", "limits.max_inflight=4")
        try:
            pub = await Raw().connect(d.url)
            for i in range(1, 11):
                await pub.publish("conf.flow", f"m{i}")
            a = await self.agent(d.url)
            await a.wait(lambda e: e["ev"] == "connected")
            a.send(cmd="subscribe", stream="conf.flow", ack="none", **{"from": "earliest"})
            await a.wait(lambda e: e["ev"] == "msg" and e["offset"] == 4)
            await asyncio.sleep(0.5)  # room for a 5th message if the server sent one
            check(offsets(a.msgs("conf.flow")) == [1, 2, 3, 4], f"flow: 4 unacked ({offsets(a.msgs('conf.flow'))})")
            a.send(cmd="ack", stream="conf.flow", offset=4)
            await a.wait(lambda e: e["ev"] == "msg" and e["offset"] == 8)
            a.send(cmd="ack", stream="conf.flow", offset=8)
            await a.wait(lambda e: e["ev"] == "msg" and e["offset"] == 10)
            check(offsets(a.msgs("conf.flow")) == list(range(1, 11)), "flow: 1..10 after two acks")
            a.send(cmd="ack", stream="conf.flow", offset=11)
            bad = await a.wait(lambda e: e["ev"] == "error")
            check(bad["code"] == "invalid", f"flow: acking beyond what was handed out is refused locally ({bad})")
            b = await self.agent(d.url)
            await b.wait(lambda e: e["ev"] == "connected")
            b.send(cmd="subscribe", stream="conf.flow", **{"from": "earliest"})
            await b.wait(lambda e: e["ev"] == "msg" and e["offset"] == 10)
            check(offsets(b.msgs("conf.flow")) == list(range(1, 11)), "flow: auto-ack keeps the window moving")
            await pub.close()
        finally:
            await self.cleanup()
            d.stop()

    async def token_refresh(self):
        """The token provider is called before every attempt: an expired token
        (401) is followed by a fresh one; the same refused token twice ends the client."""
        now = int(time.time())
        claims = {"sub": "bot-1", "pub": ["*"], "subscribe": ["*"]}
        valid1 = harness.make_jwt({**claims, "exp": now + 3600}, SECRET)
        expired = harness.make_jwt({**claims, "exp": now - 60}, SECRET)
        valid2 = harness.make_jwt({**claims, "exp": now + 7200}, SECRET)
        d = self.arqd("token", env={"SECRET_KEY": SECRET})
        proxy = ChaosProxy("127.0.0.1", d.port, seed=3)
        proxy.start()
        try:
            a = await self.agent(proxy.url, tokens=[valid1, expired, valid2])
            await a.wait(lambda e: e["ev"] == "connected")
            a.send(cmd="publish", stream="conf.token", payload="one", tag=1)
            await a.wait(lambda e: e["ev"] == "puback" and e["tag"] == 1)
            proxy.cut_all("rst")
            await a.wait(lambda e: e["ev"] == "state" and e["to"] == "connected", n=2)
            tokens = [e["n"] for e in a.select(lambda e: e["ev"] == "token")]
            refused = a.select(lambda e: e["ev"] == "state" and (e.get("error") or {}).get("status") == 401)
            check(tokens == [1, 2, 3], f"token: provider called before each of 3 attempts ({tokens})")
            check(len(refused) == 1, f"token: the expired token was refused once with 401 ({refused})")
            a.send(cmd="publish", stream="conf.token", payload="two", tag=2)
            two = await a.wait(lambda e: e["ev"] in ("puback", "puberr") and e["tag"] == 2)
            check(two["ev"] == "puback", f"token: publishing works with the fresh token ({two})")
            b = await self.agent(d.url, tokens=[expired])
            fail = await b.wait(lambda e: e["ev"] == "connect_failed")
            calls = [e["n"] for e in b.select(lambda e: e["ev"] == "token")]
            check(fail["status"] == 401 and calls == [1, 2],
                  f"token: the same refused token twice ends the client ({fail}, calls {calls})")
            c = await self.agent(d.url, token=expired)
            fail = await c.wait(lambda e: e["ev"] == "connect_failed")
            check(fail["status"] == 401, f"token: a fixed token refused with 401 is final ({fail})")
        finally:
            await self.cleanup()
            proxy.stop()
            d.stop()

    async def epoch_change(self):
        """arqd loses its history (data directory replaced): the re-subscription
        with the old epoch is refused (409), the client reports the new epoch
        and continues in the new history. Epochs are uint64s: exact, both ways."""
        d = self.arqd("epoch1")
        proxy = ChaosProxy("127.0.0.1", d.port, seed=4)
        proxy.start()
        try:
            pub = await Raw().connect(d.url)
            for i in range(1, 4):
                await pub.publish("conf.epoch", f"old{i}")
            a = await self.agent(proxy.url)
            await a.wait(lambda e: e["ev"] == "connected")
            a.send(cmd="subscribe", stream="conf.epoch", **{"from": "earliest"})
            ok1 = await a.wait(lambda e: e["ev"] == "subok")
            await a.wait(lambda e: e["ev"] == "msg" and e["offset"] == 3)
            await pub.close()
            proxy.set_target("127.0.0.1", 1)  # nothing listens there: attempts fail until the new arqd is ready
            proxy.cut_all("rst")
            d.stop()
            d = self.arqd("epoch2")
            pub = await Raw().connect(d.url)
            for i in range(1, 3):
                await pub.publish("conf.epoch", f"new{i}")
            sub = await pub_sub_info(d.url, "conf.epoch")
            proxy.set_target("127.0.0.1", d.port)
            ep = await a.wait(lambda e: e["ev"] == "epoch")
            await a.wait(lambda e: e["ev"] == "msg" and e["payload"] == "new2")
            check(ep["old"] == ok1["epoch"] and ep["new"] == str(sub["epoch"]) and ep["old"] != ep["new"],
                  f"epoch: event old {ok1['epoch']} -> new {sub['epoch']} ({ep})")
            check(a.msgs("conf.epoch") == [(1, "old1"), (2, "old2"), (3, "old3"), (1, "new1"), (2, "new2")],
                  f"epoch: the old history, then the new one from offset 1 ({a.msgs('conf.epoch')})")
            # An explicit epoch (often > 2^53) must reach the server exactly, as a uint64.
            b = await self.agent(d.url)
            await b.wait(lambda e: e["ev"] == "connected")
            b.send(cmd="subscribe", stream="conf.epoch", epoch=str(sub["epoch"]), **{"from": 2})
            okb = await b.wait(lambda e: e["ev"] in ("subok", "subfail"))
            await b.wait(lambda e: e["ev"] == "msg" and e["offset"] == 2)
            check(okb["ev"] == "subok" and okb["epoch"] == str(sub["epoch"]),
                  f"epoch: sub with the current epoch {sub['epoch']} accepted ({okb})")
            await pub.publish("conf.epoch2", "x")
            b.send(cmd="subscribe", stream="conf.epoch2", epoch=ok1["epoch"], **{"from": 1})
            bad = await b.wait(lambda e: e["ev"] in ("subok", "subfail") and e["stream"] == "conf.epoch2")
            check(bad["ev"] == "subfail" and bad["status"] == 409,
                  f"epoch: a first sub with a wrong epoch is refused with 409 ({bad})")
            await pub.close()
        finally:
            await self.cleanup()
            proxy.stop()
            d.stop()

    # ---- scenarios against a scripted server ----

    async def publish_retry(self):
        """A publish whose puback was lost with the connection is re-sent after
        the resume, byte for byte (same msgid); it resolves once, with dup."""
        state = {}

        async def script(n, rx, tx, ws):
            hello = await rx()
            if n == 0:
                await tx(**welcome())
                p = await rx()
                state["first"] = p
                cut(ws)  # stored, but the puback never leaves
                return
            state["hello2"] = hello
            await tx(**welcome(resumed=True))
            p = await rx()
            state["second"] = p
            await tx(t="puback", id=p["id"], stream=p["stream"], offset=7, dup=True)
            await ws.wait_closed()

        srv = await Scripted(script).start()
        try:
            a = await self.agent(srv.url)
            await a.wait(lambda e: e["ev"] == "connected")
            a.send(cmd="publish", stream="conf.retry", payload="once", tag=1)
            ack = await a.wait(lambda e: e["ev"] in ("puback", "puberr") and e["tag"] == 1)
            await asyncio.sleep(0.2)
            f, s = state.get("first", {}), state.get("second", {})
            check(ack["ev"] == "puback" and ack["dup"] and ack["offset"] == 7,
                  f"retry: the publish resolved with the server's dup answer ({ack})")
            check(len(a.select(lambda e: e["ev"] in ("puback", "puberr"))) == 1, "retry: resolved exactly once")
            check(f.get("msgid") and f.get("msgid") == s.get("msgid") and f.get("payload") == s.get("payload"),
                  f"retry: re-sent with the same msgid ({f.get('msgid')} / {s.get('msgid')})")
            h = state.get("hello2", {})
            check(h.get("session") == "s1" and h.get("resume_token") == "rt-s1",
                  f"retry: the reconnect resumed the session ({h})")
            st = await a.stats()
            check(st["publishes_resent"] == 1, f"retry: counted as re-sent ({st})")
        finally:
            await self.cleanup()
            await srv.stop()
            check(not srv.errors, f"retry: script {srv.errors}")

    async def nack_503(self):
        """A 503 is retried with the same msgid after a backoff; the publish resolves once."""
        seen = []

        async def script(n, rx, tx, ws):
            await rx()
            await tx(**welcome())
            p = await rx()
            seen.append(p)
            await tx(t="nack", id=p["id"], code=503, reason="storage full")
            p = await rx()
            seen.append(p)
            await tx(t="puback", id=p["id"], stream=p["stream"], offset=1, dup=False)
            await ws.wait_closed()

        srv = await Scripted(script).start()
        try:
            a = await self.agent(srv.url)
            await a.wait(lambda e: e["ev"] == "connected")
            a.send(cmd="publish", stream="conf.503", payload="p", tag=1)
            ack = await a.wait(lambda e: e["ev"] in ("puback", "puberr"))
            check(ack["ev"] == "puback" and ack["offset"] == 1, f"503: resolved after the retry ({ack})")
            check(len(seen) == 2 and seen[0]["msgid"] == seen[1]["msgid"], f"503: retried with the same msgid")
        finally:
            await self.cleanup()
            await srv.stop()
            check(not srv.errors, f"503: script {srv.errors}")

    async def gap(self):
        """A gap is reported once; redeliveries on the wire and after a resume
        are dropped; acks never pass what the connection delivered and are
        sent again after the resume. The subok's epoch is a uint64 above 2^63."""
        big = 2**63 + 5
        acks = {0: [], 1: []}
        sent = {0: 0, 1: 0}

        async def drain(n, rx):
            while True:
                m = await rx()
                if m.get("t") == "ack":
                    acks[n].append(m["offset"])

        async def script(n, rx, tx, ws):
            await rx()
            if n == 0:
                await tx(**welcome())
                s = await rx()
                await tx(t="subok", id=s["id"], stream=s["stream"], epoch=big, first=5, next=7)
                await tx(t="gap", stream="conf.gap", **{"from": 1, "to": 4})
                for o in (5, 6, 5):  # 5 again: a redelivery on the same connection
                    await tx(t="msg", stream="conf.gap", offset=o, ts=1, payload=f"g{o}".encode())
                sent[0] = 6
                try:
                    await asyncio.wait_for(drain(0, rx), 1.0)
                except asyncio.TimeoutError:
                    pass
                cut(ws)
                return
            # resumed: the server had recorded acked 3, and restarts there
            await tx(**welcome(resumed=True, subs=[{"stream": "conf.gap", "epoch": big, "acked": 3, "next": 8}]))
            await tx(t="gap", stream="conf.gap", **{"from": 4, "to": 4})
            for o in (5, 6, 7):
                await tx(t="msg", stream="conf.gap", offset=o, ts=1, payload=f"g{o}".encode())
            sent[1] = 7
            await drain(1, rx)

        srv = await Scripted(script).start()
        try:
            a = await self.agent(srv.url)
            await a.wait(lambda e: e["ev"] == "connected")
            a.send(cmd="subscribe", stream="conf.gap", **{"from": 1})
            ok = await a.wait(lambda e: e["ev"] == "subok")
            await a.wait(lambda e: e["ev"] == "msg" and e["offset"] == 7)
            deadline = time.monotonic() + STEP
            while (not acks[1] or acks[1][-1] != 7) and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            check(ok["epoch"] == str(big), f"gap: the subok epoch is exact ({ok['epoch']})")
            gaps = [(e["from"], e["to"]) for e in a.select(lambda e: e["ev"] == "gap")]
            check(gaps == [(1, 4)], f"gap: reported once ({gaps})")
            check(a.msgs("conf.gap") == [(5, "g5"), (6, "g6"), (7, "g7")],
                  f"gap: 5, 6, 7 once each ({a.msgs('conf.gap')})")
            check(acks[0] and max(acks[0]) <= sent[0] and acks[1] and max(acks[1]) <= sent[1],
                  f"gap: acks within what each connection delivered ({acks})")
            check(acks[1] and acks[1][-1] == 7, f"gap: after the resume the acks catch up to 7 ({acks[1]})")
            check(acks[1] == sorted(acks[1]), f"gap: acks only grow ({acks[1]})")
        finally:
            await self.cleanup()
            await srv.stop()
            check(not srv.errors, f"gap: script {srv.errors}")

    # ---- chaos ----

    async def chaos(self):
        """The checks of tests/tools/arq_chaos.c with this client: publishers
        and subscribers through a proxy that cuts connections, arqd SIGKILLed
        and restarted on the same port and data directory. Every acked publish
        is delivered to every subscriber exactly once, in order; the streams
        read back independently hold exactly the acked publishes."""
        run, n_streams, n_pub, n_sub, count = f"c{os.getpid()}", 2, 2, 2, self.args.chaos_messages
        prefix = f"chaos.{run}"
        streams = [f"{prefix}.{k}" for k in range(n_streams)]
        data = os.path.join(self.tmp, "chaos-data")
        d = self.arqd("chaos", data=data)
        port = d.port
        proxy = ChaosProxy("127.0.0.1", port, seed=5)
        proxy.start()
        try:
            subs = [await self.agent(proxy.url) for _ in range(n_sub)]
            pubs = [await self.agent(proxy.url) for _ in range(n_pub)]
            for a in subs + pubs:
                await a.wait(lambda e: e["ev"] == "connected")
            for a in subs:
                for s in streams:
                    a.send(cmd="subscribe", stream=s, **{"from": 1})
                await a.wait(lambda e: e["ev"] == "subok", n=n_streams)
            for p, a in enumerate(pubs):
                a.send(cmd="publish_many", prefix=prefix, streams=n_streams, count=count, depth=8, run=run, p=p,
                       rate=self.args.chaos_rate)
            kills = 0
            cuts = 0
            deadline = time.monotonic() + 120
            while not all(a.select(lambda e: e["ev"] == "published") for a in pubs):
                if time.monotonic() > deadline:
                    raise TimeoutError("chaos: publishers did not finish")
                await asyncio.sleep(0.15)
                acked = sum(len(a.select(lambda e: e["ev"] == "puback")) for a in pubs)
                if kills < 2 and acked > (kills + 1) * count * n_pub // 3:
                    d.proc.send_signal(signal.SIGKILL)
                    d.proc.wait()
                    kills += 1
                    d = self.arqd("chaos", port=port, data=data)
                else:
                    proxy.cut_random(1, kind=("rst", "fin", "mixed")[cuts % 3])
                    cuts += 1
            acked = {}  # (stream, offset) -> payload
            failed = []
            for p, a in enumerate(pubs):
                for e in a.select(lambda e: e["ev"] in ("puback", "puberr")):
                    if e["ev"] == "puberr":
                        failed.append(e)
                        continue
                    key = (e["stream"], e["offset"])
                    payload = f"{run}:{p}:{e['tag']}"
                    if key in acked and acked[key] != payload:
                        failed.append(f"two publishes acked at {key}")
                    acked[key] = payload
            check(not failed, f"chaos: every publish acked ({failed[:3]})")
            check(len(acked) == n_pub * count, f"chaos: {n_pub * count} distinct acked offsets ({len(acked)})")
            top = {s: max((o for (st, o) in acked if st == s), default=0) for s in streams}
            for a in subs:
                for s in streams:
                    await a.wait(lambda e, s=s: e["ev"] == "msg" and e["stream"] == s and e["offset"] == top[s], 60)
            for i, a in enumerate(subs):
                for s in streams:
                    got = a.msgs(s)
                    check(offsets(got) == list(range(1, top[s] + 1)),
                          f"chaos: subscriber {i} saw {s} 1..{top[s]} once, in order "
                          f"(first bad: {next((x for x, y in zip(offsets(got), range(1, top[s] + 1)) if x != y), None)},"
                          f" {len(got)} messages)")
                    check(all(acked.get((s, o)) == p for o, p in got),
                          f"chaos: subscriber {i} got the acked payload at each offset of {s}")
                check(not a.select(lambda e: e["ev"] in ("gap", "epoch")), f"chaos: subscriber {i}: no gap, no epoch")
            back = await read_back(d.url, streams)
            for s in streams:
                want = [(o, acked[(s, o)].encode()) for o in range(1, top[s] + 1)]
                check(back[s] == want, f"chaos: {s} read back holds exactly the acked publishes "
                                       f"({len(back[s])} vs {len(want)})")
            payloads = [p for s in streams for _, p in back[s]]
            check(len(payloads) == len(set(payloads)), "chaos: no payload stored twice")
            st = [await a.stats() for a in subs + pubs]
            reconnects = sum(x["reconnects"] for x in st)
            check(kills == 2 and reconnects >= len(st), f"chaos: {kills} kills, {cuts} cuts, {reconnects} reconnects")
            print(f"chaos: {len(acked)} publishes, {kills} SIGKILLs, {cuts} cuts, {reconnects} reconnections, "
                  f"{sum(x['redeliveries_dropped'] for x in st)} redeliveries dropped, "
                  f"{sum(x['publishes_resent'] for x in st)} publishes re-sent", flush=True)
        finally:
            await self.cleanup()
            proxy.stop()
            d.kill_if_running()


async def read_back(url, streams):
    """Every message of the streams, read by chaos_proxy's own reader (not the client under test)."""
    rows, _ = await asyncio.wait_for(_read_streams(url, streams, STEP), STEP * 3)
    return rows


async def pub_sub_info(url, stream):
    """The stream's subok as the server gives it to a fresh connection."""
    r = await Raw().connect(url)
    await r.ws.send(msgpack.packb({"t": "sub", "id": 1, "stream": stream, "from": "latest"}))
    while True:
        m = await r.recv()
        if m.get("t") == "subok":
            await r.close()
            return m


SCENARIOS = ["resume", "redelivery", "dedup", "takeover", "flow_control", "token_refresh", "epoch_change",
             "publish_retry", "nack_503", "gap", "chaos"]


async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--agent", choices=["js", "python"], required=True)
    ap.add_argument("--arqd", required=True)
    ap.add_argument("--node", default="node")
    ap.add_argument("--js-dist", default=os.path.join(ROOT, "clients", "js", "dist", "index.js"))
    ap.add_argument("--only", default="")
    ap.add_argument("--skip", default="")
    ap.add_argument("--chaos-messages", type=int, default=300, help="per publisher")
    ap.add_argument("--chaos-rate", type=int, default=60, help="per publisher and second")
    args = ap.parse_args()
    only = [s for s in args.only.split(",") if s] or SCENARIOS
    skip = set(s for s in args.skip.split(",") if s)
    suite = Suite(args)
    try:
        for name in only:
            if name in skip:
                continue
            start = time.monotonic()
            before = len(harness.failures)
            try:
                await asyncio.wait_for(getattr(suite, name)(), 180)
            except Exception as e:
                check(False, f"{name}: {e!r}")
            ok = len(harness.failures) == before
            print(f"{'ok' if ok else 'FAIL'}: scenario {name} ({time.monotonic() - start:.1f} s)", flush=True)
    finally:
        shutil.rmtree(suite.tmp, ignore_errors=True)
    if harness.failures:
        print(f"{len(harness.failures)} check(s) failed", flush=True)
        sys.exit(1)


if __name__ == "__main__":
    asyncio.run(main())
