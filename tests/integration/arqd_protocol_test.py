#!/usr/bin/python3
"""arqd driven by a client we did not write: Debian's python3-websockets and
python3-msgpack, speaking arq.v1 exactly as docs/protocol.md specifies it.

Usage: arqd_protocol_test.py PATH_TO_ARQD

Starts arqd on a free loopback port with a temporary data directory, runs the
scenarios below, stops it with SIGTERM (expects exit 0 and close code 1001),
restarts it on the same directory and checks that everything is still there.
"""
import asyncio
import json
import os
import random
import re
import shutil
import sys
import tempfile

import msgpack
import websockets

ARQD = sys.argv[1]
SEED = int(os.environ.get("ARQ_TEST_SEED", random.randrange(1 << 30)))
random.seed(SEED)
print(f"seed {SEED} (set ARQ_TEST_SEED to reproduce)", flush=True)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from harness import failures  # noqa: E402


def check(cond, what):
    return harness.check(cond, what, verbose=False)


def Arqd(data_dir, *extra, env=None):
    return harness.Arqd(ARQD, data_dir, *extra, env=env)


def pack(obj):
    return msgpack.packb(obj, use_bin_type=True)


class Client:
    """A minimal arq.v1 client written from docs/protocol.md."""

    @classmethod
    async def connect(cls, url, hello=True, resume=None):
        """resume: a previous welcome whose session to resume."""
        c = cls()
        c.ws = await websockets.connect(url, subprotocols=["arq.v1"], max_size=None)
        c.next_id = 1
        if hello:
            h = {"t": "hello", "client": "python-test"}
            if resume:
                h["session"] = resume["session"]
                h["resume_token"] = resume["resume_token"]
            await c.send(h)
            c.welcome = await c.recv()
        return c

    async def send(self, obj):
        await self.ws.send(pack(obj))

    async def recv(self, timeout=10):
        data = await asyncio.wait_for(self.ws.recv(), timeout)
        assert isinstance(data, bytes), "server sent a text frame"
        return msgpack.unpackb(data, raw=False)

    async def request(self, obj):
        obj["id"] = self.next_id
        self.next_id += 1
        await self.send(obj)
        return obj["id"]

    async def publish(self, stream, payload, msgid=None, headers=None):
        m = {"t": "pub", "stream": stream, "payload": payload}
        if msgid is not None:
            m["msgid"] = msgid
        if headers is not None:
            m["headers"] = headers
        rid = await self.request(m)
        while True:
            r = await self.recv()
            if r.get("id") == rid and r["t"] in ("puback", "nack"):
                return r

    async def recv_msgs(self, n, ack=True):
        """Receive n msg frames, acking each (the window is max_inflight)."""
        out = []
        while len(out) < n:
            m = await self.recv()
            if m["t"] != "msg":
                continue
            out.append(m)
            if ack:
                await self.send({"t": "ack", "stream": m["stream"], "offset": m["offset"]})
        return out

    async def close(self):
        await self.ws.close()


async def scenario_basic(d):
    c = await Client.connect(d.url)
    w = c.welcome
    check(w["t"] == "welcome" and w["session"] and w["resume_token"], f"welcome: {w}")
    check(w["max_payload"] == 4096 and w["max_inflight"] == 8, f"welcome limits: {w}")
    acks = []
    for i in range(10):
        r = await c.publish("chat.room1", f"hello {i}".encode(), msgid=f"m{i}",
                            headers={"k": str(i)})
        acks.append(r)
    check([a["t"] for a in acks] == ["puback"] * 10, f"pubacks: {acks}")
    check([a["offset"] for a in acks] == list(range(1, 11)), f"offsets: {acks}")
    check(all(a["dup"] is False and a["stream"] == "chat.room1" for a in acks), "dup flags")
    again = await c.publish("chat.room1", b"hello 3 again", msgid="m3")
    check(again["t"] == "puback" and again["offset"] == 4 and again["dup"] is True,
          f"duplicate publish: {again}")

    s = await Client.connect(d.url)
    rid = await s.request({"t": "sub", "stream": "chat.room1", "from": "earliest"})
    ok = await s.recv()
    check(ok["t"] == "subok" and ok["id"] == rid and ok["first"] == 1 and ok["next"] == 11
          and ok["epoch"] != 0, f"subok: {ok}")
    got = await s.recv_msgs(10)
    check(len(got) == 10, f"msgs: {got[:2]}")
    check([m["offset"] for m in got] == list(range(1, 11)), "delivery order")
    check([bytes(m["payload"]) for m in got] == [f"hello {i}".encode() for i in range(10)],
          "payloads")
    check(all(m["headers"] == {"k": str(m["offset"] - 1)} for m in got), "headers")
    check(all(m["ts"] > 1_600_000_000_000_000 for m in got), "timestamps in microseconds")

    # live delivery to a subscriber from "latest"
    live = await Client.connect(d.url)
    await live.request({"t": "sub", "stream": "chat.room1", "from": "latest"})
    ok2 = await live.recv()
    check(ok2["t"] == "subok" and ok2["next"] == 11, f"subok latest: {ok2}")
    r = await c.publish("chat.room1", b"live one")
    m1 = (await live.recv_msgs(1))[0]
    m2 = (await s.recv_msgs(1))[0]
    check(m1["t"] == "msg" and m1["offset"] == r["offset"] == 11
          and bytes(m1["payload"]) == b"live one", f"live msg: {m1}")
    check(m2["offset"] == 11, "existing subscriber got the live message")

    # epoch mismatch
    rid = await live.request({"t": "sub", "stream": "chat.room1", "from": 1,
                              "epoch": ok["epoch"] ^ 1})
    n = await live.recv()
    check(n["t"] == "nack" and n["id"] == rid and n["code"] == 409, f"epoch mismatch: {n}")
    # from an offset
    late = await Client.connect(d.url)
    await late.request({"t": "sub", "stream": "chat.room1", "from": 9, "epoch": ok["epoch"]})
    ok3 = await late.recv()
    got3 = await late.recv_msgs(3)
    check(ok3["t"] == "subok" and [m["offset"] for m in got3] == [9, 10, 11],
          f"sub from offset 9: {ok3} {got3}")
    # unsubscribe
    rid = await late.request({"t": "unsub", "stream": "chat.room1"})
    u = await late.recv()
    check(u["t"] == "unsubok" and u["id"] == rid, f"unsubok: {u}")
    for x in (c, s, live, late):
        await x.close()
    return ok["epoch"]


async def scenario_errors(d):
    c = await Client.connect(d.url)
    n = await c.publish("bad..name", b"x")
    check(n["t"] == "nack" and n["code"] == 400, f"invalid stream name: {n}")
    n = await c.publish("big", b"x" * 5000)
    check(n["t"] == "nack" and n["code"] == 413, f"payload too large: {n}")
    await c.send({"t": "ack", "stream": "nosuch", "offset": 5})
    e = await c.recv()
    check(e["t"] == "error" and e["code"] == 404, f"ack unknown subscription: {e}")
    await c.request({"t": "sub", "stream": "err.s", "from": "earliest"})
    await c.recv()
    await c.send({"t": "ack", "stream": "err.s", "offset": 3})
    e = await c.recv()
    check(e["t"] == "error" and e["code"] == 409, f"ack beyond delivered: {e}")
    await c.send({"t": "nosuchtype"})
    e = await c.recv()
    check(e["t"] == "error" and e["code"] == 400, f"unknown type: {e}")
    await c.ws.send(b"\xc1")  # never used in msgpack
    e = await c.recv()
    check(e["t"] == "error" and e["code"] == 400, f"malformed msgpack: {e}")
    await c.close()

    # first message must be hello
    c = await Client.connect(d.url, hello=False)
    await c.send({"t": "pub", "id": 1, "stream": "x", "payload": b"y"})
    e = await c.recv()
    check(e["t"] == "error" and e["code"] == 400, f"no hello: {e}")
    try:
        await asyncio.wait_for(c.ws.recv(), 5)
        check(False, "connection stayed open without hello")
    except websockets.ConnectionClosed as cc:
        check(cc.rcvd is not None and cc.rcvd.code == 1008, f"close code without hello: {cc}")

    # a text frame is not part of the protocol
    c = await Client.connect(d.url)
    await c.ws.send("hello as text")
    try:
        await asyncio.wait_for(c.ws.recv(), 5)
        check(False, "text frame accepted")
    except websockets.ConnectionClosed as cc:
        check(cc.rcvd is not None and cc.rcvd.code == 1003, f"close code for text: {cc}")

    # a message above the frame limit
    c = await Client.connect(d.url)
    await c.ws.send(b"\x00" * 70000)
    try:
        await asyncio.wait_for(c.ws.recv(), 5)
        check(False, "oversized frame accepted")
    except websockets.ConnectionClosed as cc:
        check(cc.rcvd is not None and cc.rcvd.code == 1009, f"close code too big: {cc}")

    # no subprotocol: refused at the handshake
    try:
        ws = await websockets.connect(d.url)
        await ws.close()
        check(False, "handshake without arq.v1 accepted")
    except websockets.InvalidStatusCode as e:
        check(e.status_code == 400, f"handshake without subprotocol: {e}")


async def scenario_flow_control(d):
    """max_inflight is 8 in this run: 8 messages, then nothing until an ack."""
    p = await Client.connect(d.url)
    for i in range(20):
        await p.publish("flow.s", f"f{i}".encode())
    s = await Client.connect(d.url)
    await s.request({"t": "sub", "stream": "flow.s", "from": "earliest"})
    await s.recv()
    first = [await s.recv() for _ in range(8)]
    check([m["offset"] for m in first] == list(range(1, 9)), "first window")
    try:
        extra = await s.recv(timeout=0.5)
        check(False, f"delivered beyond max_inflight: {extra}")
    except asyncio.TimeoutError:
        pass
    await s.send({"t": "ack", "stream": "flow.s", "offset": 4})
    more = [await s.recv() for _ in range(4)]
    check([m["offset"] for m in more] == [9, 10, 11, 12], f"after ack 4: {more}")
    await p.close()
    await s.close()


async def scenario_fanout(d, streams=12, publishers=8, subscribers=16, per_pub=50):
    """Random publishers and subscribers on many streams against a model:
    every subscriber receives exactly its streams' messages, in order, once."""
    names = [f"fan.{i}" for i in range(streams)]
    subs = []
    for i in range(subscribers):
        c = await Client.connect(d.url)
        mine = random.sample(names, random.randint(1, streams))
        for n in mine:
            await c.request({"t": "sub", "stream": n, "from": "earliest"})
            ok = await c.recv()
            assert ok["t"] == "subok", ok
        subs.append((c, mine))
    model = {n: [] for n in names}

    async def publisher(k):
        c = await Client.connect(d.url)
        for j in range(per_pub):
            n = random.choice(names)
            payload = f"p{k}-{j}".encode()
            r = await c.publish(n, payload, msgid=f"{k}-{j}")
            assert r["t"] == "puback", r
            model[n].append((r["offset"], payload))
        await c.close()

    async def subscriber(c, mine, expected):
        got = {n: [] for n in mine}
        need = sum(expected[n] for n in mine)
        while sum(len(v) for v in got.values()) < need:
            m = await c.recv(timeout=20)
            if m["t"] != "msg":
                continue
            got[m["stream"]].append((m["offset"], bytes(m["payload"])))
            await c.send({"t": "ack", "stream": m["stream"], "offset": m["offset"]})
        return got

    await asyncio.gather(*(publisher(k) for k in range(publishers)))
    expected = {n: len(v) for n, v in model.items()}
    results = await asyncio.gather(*(subscriber(c, mine, expected) for c, mine in subs))
    for (c, mine), got in zip(subs, results):
        for n in mine:
            want = sorted(model[n])
            check(got[n] == want, f"fan-out: {n} got {len(got[n])} want {len(want)}")
            check([o for o, _ in got[n]] == list(range(1, len(want) + 1)),
                  f"fan-out offsets contiguous for {n}")
        # nothing more arrives
        try:
            extra = await c.recv(timeout=0.2)
            check(extra["t"] != "msg", f"extra delivery {extra}")
        except asyncio.TimeoutError:
            pass
        await c.close()
    print(f"fan-out: {publishers * per_pub} publishes, {subscribers} subscribers on "
          f"{streams} streams", flush=True)


def scenario_http(d):
    st, body = d.http("GET", "/health")
    h = json.loads(body)
    check(st == 200 and h["status"] == "healthy" and "wal" in h
          and h["sync"]["state"] == "disabled", f"/health: {st} {h}")
    st, body = d.http("POST", "/api/publish",
                      json.dumps({"stream": "user.17.inbox", "payload": "from backend",
                                  "msgid": "b1", "headers": {"kind": "reply"}}).encode(),
                      {"Content-Type": "application/json"})
    r = json.loads(body)
    check(st == 200 and r == {"offset": 1, "duplicate": False}, f"/api/publish: {st} {r}")
    st, body = d.http("POST", "/api/publish",
                      json.dumps({"stream": "user.17.inbox", "payload": "x",
                                  "msgid": "b1"}).encode(), {"Content-Type": "application/json"})
    check(st == 200 and json.loads(body) == {"offset": 1, "duplicate": True},
          f"/api/publish duplicate: {body}")
    st, body = d.http("POST", "/api/publish",
                      json.dumps({"stream": "user.17.inbox",
                                  "payload_base64": "AAEC/w=="}).encode(),
                      {"Content-Type": "application/json"})
    check(st == 200 and json.loads(body)["offset"] == 2, f"/api/publish base64: {body}")
    st, _ = d.http("POST", "/api/publish", b"{not json", {"Content-Type": "application/json"})
    check(st == 400, f"/api/publish bad json: {st}")
    # a page may post text/plain anywhere without a CORS preflight: refused
    st, _ = d.http("POST", "/api/publish",
                   json.dumps({"stream": "user.17.inbox", "payload": "csrf"}).encode(),
                   {"Content-Type": "text/plain"})
    check(st == 415, f"/api/publish text/plain: 415 ({st})")
    st, _ = d.http("POST", "/api/publish",
                   json.dumps({"stream": "user.17.inbox", "payload": "csrf"}).encode(),
                   {"Content-Type": "application/json", "Origin": "http://evil.example"})
    check(st == 403, f"/api/publish from another origin: 403 ({st})")
    st, body = d.http("POST", "/api/publish",
                      json.dumps({"stream": "user.17.inbox", "payload": "h",
                                  "headers": {f"k{i}": "v" for i in range(40)}}).encode(),
                      {"Content-Type": "application/json"})
    check(st == 413, f"/api/publish with 40 headers: 413 ({st} {body})")
    st, body = d.http("HEAD", "/metrics")
    check(st == 200 and body == b"", f"HEAD /metrics: no body ({len(body)} bytes)")
    st, _ = d.http("GET", "/nope")
    check(st == 404, f"404: {st}")
    st, body = d.http("GET", "/metrics")
    text = body.decode()
    check(st == 200 and "arq_publishes_total" in text and "arq_wal_commit_seconds_bucket" in text
          and "arq_connections" in text, "/metrics content")
    m = re.search(r"^arq_publishes_total (\d+)$", text, re.M)
    check(m and int(m.group(1)) >= 10, "publish counter")
    # publishes go through the WAL's journal; its folds are LMDB commits
    check(re.search(r"^arq_wal_journal 1$", text, re.M), "the journal is in use")
    m = re.search(r"^arq_wal_folds_total (\d+)$", text, re.M)
    check(m and int(m.group(1)) >= 1, "journal folds counted")
    # publish time inside arqd: one sample per acknowledged publish (new or
    # duplicate) in each of the three histograms, cumulative buckets
    acked = sum(int(re.search(rf"^{n} (\d+)$", text, re.M).group(1))
                for n in ("arq_publishes_total", "arq_publish_duplicates_total"))
    for h in ("arq_publish_seconds", "arq_publish_wait_seconds", "arq_publish_dispatch_seconds"):
        counts = [int(v) for v in re.findall(rf"^{h}_bucket{{le=\"[^\"]+\"}} (\d+)$", text, re.M)]
        m = re.search(rf"^{h}_count (\d+)$", text, re.M)
        les = re.findall(rf"^{h}_bucket{{le=\"([^\"]+)\"}}", text, re.M)
        # buckets up to 10 s, one at the 200 ms target of the alert rules
        check("0.2" in les and les[-2:] == ["10", "+Inf"], f"{h} buckets: {les}")
        check(len(counts) == 19 and counts == sorted(counts) and m
              and counts[-1] == int(m.group(1)) == acked, f"{h}: {counts} against {acked}")
        m = re.search(rf"^{h}_sum (\S+)$", text, re.M)
        check(m and float(m.group(1)) >= 0, f"{h}_sum")
    tot = float(re.search(r"^arq_publish_seconds_sum (\S+)$", text, re.M).group(1))
    parts = sum(float(re.search(rf"^{h}_sum (\S+)$", text, re.M).group(1))
                for h in ("arq_publish_wait_seconds", "arq_publish_dispatch_seconds"))
    check(tot >= parts * 0.999, f"publish time {tot} s holds its parts {parts} s")


async def read_inbox(d):
    s = await Client.connect(d.url)
    await s.request({"t": "sub", "stream": "user.17.inbox", "from": "earliest"})
    await s.recv()
    a = await s.recv()
    b = await s.recv()
    check(bytes(a["payload"]) == b"from backend" and a["headers"] == {"kind": "reply"},
          f"server API message delivered: {a}")
    check(bytes(b["payload"]) == b"\x00\x01\x02\xff", f"base64 payload: {b}")
    return s


async def scenario_resume(d):
    """Section 4a: a session comes back with its subscriptions, delivering
    after the acked offset; a wrong token gets a new session; a connection
    still holding the session is closed with 4001."""
    p = await Client.connect(d.url)
    for i in range(5):
        await p.publish("resume.s", f"r{i + 1}".encode(), msgid=f"res-{i + 1}")
    a = await Client.connect(d.url)
    w1 = a.welcome
    check(w1["resumed"] is False and w1["session_ttl"] == 86400 and "subs" not in w1,
          f"first welcome: {w1}")
    await a.request({"t": "sub", "stream": "resume.s", "from": 1})
    ok = await a.recv()
    got = await a.recv_msgs(4, ack=False)
    check([m["offset"] for m in got] == [1, 2, 3, 4], f"first delivery: {got}")
    await a.send({"t": "ack", "stream": "resume.s", "offset": 2})
    await asyncio.sleep(0.3)  # acks are persisted in batches (~100 ms)
    await a.close()

    b = await Client.connect(d.url, resume=w1)
    w2 = b.welcome
    check(w2["resumed"] is True and w2["session"] == w1["session"] and
          w2["resume_token"] == w1["resume_token"], f"resumed welcome: {w2}")
    check(w2.get("subs") == [{"stream": "resume.s", "epoch": ok["epoch"], "acked": 2,
                              "next": 6}], f"restored subscriptions: {w2.get('subs')}")
    got = await b.recv_msgs(3)
    check([m["offset"] for m in got] == [3, 4, 5],
          f"after resume: delivered-but-unacked again, then the rest: {got}")
    # an anonymous session's dedup spans the reconnect: same producer
    r = await b.publish("resume.s", b"r1", msgid="res-1")
    check(r["t"] == "puback" and r["dup"] is False,
          f"another session's msgid is its own: {r}")
    r = await b.publish("resume.s", b"r6", msgid="res-6")
    r2 = await b.publish("resume.s", b"r6", msgid="res-6")
    check(r2["dup"] is True and r2["offset"] == r["offset"], f"dedup in the session: {r2}")

    # takeover: b still holds the session; c resumes it, b is closed with 4001
    c = await Client.connect(d.url, resume=w1)
    check(c.welcome["resumed"] is True, f"takeover welcome: {c.welcome}")
    try:
        while True:
            await b.recv(timeout=10)
    except websockets.ConnectionClosed as cc:
        check(cc.rcvd is not None and cc.rcvd.code == 4001, f"taken-over close code: {cc}")
    await c.close()

    # a wrong token, or another session's id, starts a new session
    bad = dict(w1, resume_token="00" * 16)
    e = await Client.connect(d.url, resume=bad)
    check(e.welcome["resumed"] is False and e.welcome["session"] != w1["session"],
          f"wrong token: {e.welcome}")
    for x in (p, e):
        await x.close()
    return w1


async def refused_hello(d, hello):
    """hello is answered with error 400 and close 1008 (not a new session)."""
    c = await Client.connect(d.url, hello=False)
    await c.send(hello)
    e = await c.recv()
    try:
        await asyncio.wait_for(c.ws.recv(), 5)
        code = None
    except websockets.ConnectionClosed as cc:
        code = cc.rcvd.code if cc.rcvd else None
    except asyncio.TimeoutError:
        code = "still open"
        await c.close()
    return e, code


def raw_map(*pairs):
    """A msgpack map whose values are given as raw bytes (b"...") or objects."""
    out = bytes([0x80 | len(pairs)])
    for k, v in pairs:
        out += pack(k) + (v if isinstance(v, bytes) else pack(v))
    return out


async def scenario_as_documented(d):
    """The places where a client author found server and document apart
    (issue #19): each now behaves as docs/protocol.md says."""
    c = await Client.connect(d.url)
    check(c.welcome["server"].startswith("arq/"), f"server value: {c.welcome['server']}")
    # a request with a bad field is refused with its id, naming the field
    for bad, field in (({"from": 0}, "from"), ({"from": "soon"}, "from"),
                       ({"from": 1, "epoch": 1.5e19}, "epoch"),
                       ({"from": 1, "epoch": -3}, "epoch")):
        rid = await c.request(dict({"t": "sub", "stream": "doc.bad"}, **bad))
        n = await c.recv()
        check(n["t"] == "nack" and n.get("id") == rid and n["code"] == 400
              and f"'{field}'" in n["reason"], f"sub {bad}: nack with id naming {field}: {n}")
    check("BigInt" in n["reason"], f"the epoch's reason tells a JavaScript author: {n}")
    await c.send({"t": "pub", "id": 2.5, "stream": "doc.bad", "payload": b"x"})
    e = await c.recv()
    check(e["t"] == "error" and e["code"] == 400 and "'id'" in e["reason"],
          f"a request without a readable id: error: {e}")
    await c.send({"t": "ack", "stream": "doc.bad", "offset": "3"})
    e = await c.recv()
    check(e["t"] == "error" and e["code"] == 400 and "'offset'" in e["reason"], f"bad ack: {e}")

    # what a JavaScript msgpack encoder sends for a BigInt / an integer:
    # uint64 (0xcf) and int64 (0xd3) holding small values are unsigned ints
    r = await c.publish("doc.ints", b"one")
    stream_epoch = None
    await c.ws.send(raw_map(("t", "sub"), ("id", b"\xd3" + (77).to_bytes(8, "big")),
                            ("stream", "doc.ints"), ("from", b"\xcf" + (1).to_bytes(8, "big"))))
    ok = await c.recv()
    check(ok["t"] == "subok" and ok["id"] == 77, f"int64/uint64-encoded id and from: {ok}")
    stream_epoch = ok["epoch"]
    m = await c.recv()
    check(m["t"] == "msg" and m["offset"] == r["offset"], f"delivered: {m}")
    await c.ws.send(raw_map(("t", "unsub"), ("id", 78), ("stream", "doc.ints")))
    check((await c.recv())["t"] == "unsubok", "unsubscribed")
    await c.ws.send(raw_map(("t", "sub"), ("id", 79), ("stream", "doc.ints"), ("from", 1),
                            ("epoch", b"\xcf" + stream_epoch.to_bytes(8, "big"))))
    ok = await c.recv()
    check(ok["t"] == "subok" and ok["id"] == 79, f"uint64-encoded epoch accepted: {ok}")
    await c.recv()  # offset 1 again
    # a second sub to the same stream: 409, documented
    rid = await c.request({"t": "sub", "stream": "doc.ints", "from": "earliest"})
    n = await c.recv()
    check(n["t"] == "nack" and n["id"] == rid and n["code"] == 409, f"second sub: {n}")
    # a lower ack is ignored without a reply; an ack for no subscription is 404
    await c.send({"t": "ack", "stream": "doc.ints", "offset": 1})
    await c.send({"t": "ack", "stream": "doc.ints", "offset": 1})
    await c.send({"t": "ack", "stream": "doc.none", "offset": 1})
    e = await c.recv()
    check(e["t"] == "error" and e["code"] == 404, f"ack without subscription: {e}")

    # sub from N beyond next: delivery starts at N once it is published
    for i in range(2):
        await c.publish("doc.ahead", f"a{i}".encode())
    s = await Client.connect(d.url)
    await s.request({"t": "sub", "stream": "doc.ahead", "from": 5})
    ok = await s.recv()
    check(ok["t"] == "subok" and ok["next"] == 3, f"subok from 5: {ok}")
    for i in range(2, 6):
        await c.publish("doc.ahead", f"a{i}".encode())
    got = await s.recv_msgs(2)
    check([m["offset"] for m in got] == [5, 6], f"from 5 delivers 5, 6 (not 3): {got}")
    # an epoch for a stream that does not exist: its history is gone (409)
    rid = await s.request({"t": "sub", "stream": "doc.never", "from": 4, "epoch": 12345})
    n = await s.recv()
    check(n["t"] == "nack" and n["id"] == rid and n["code"] == 409,
          f"epoch of a stream that does not exist: {n}")
    await s.close()

    # hello with half a resume, or ids longer than 64 bytes: refused
    w = c.welcome
    for h, what in (({"session": w["session"]}, "session without resume_token"),
                    ({"resume_token": w["resume_token"]}, "resume_token without session"),
                    ({"session": "a" * 65, "resume_token": w["resume_token"]}, "65-byte session"),
                    ({"session": "not a session!", "resume_token": "x"}, "junk session")):
        e, code = await refused_hello(d, dict({"t": "hello"}, **h))
        check(e["t"] == "error" and e["code"] == 400 and code == 1008,
              f"{what}: error 400 + 1008 ({e}, {code})")
    await c.close()

    # a resume right after the close sees everything that connection did
    for i in range(10):
        a = await Client.connect(d.url)
        w = a.welcome
        await a.request({"t": "sub", "stream": f"doc.quick.{i}", "from": "latest"})
        await a.recv()
        await a.request({"t": "sub", "stream": "doc.ints", "from": 1})
        await a.recv()
        await a.close()
        b = await Client.connect(d.url, resume=w)
        names = sorted(x["stream"] for x in b.welcome.get("subs", []))
        check(b.welcome["resumed"] and names == ["doc.ints", f"doc.quick.{i}"],
              f"try {i}: a subscription just made survives a quick resume: {names}")
        await b.request({"t": "unsub", "stream": "doc.ints"})
        while (await b.recv())["t"] not in ("unsubok", "nack"):
            pass
        await b.close()
        e = await Client.connect(d.url, resume=w)
        names = [x["stream"] for x in e.welcome.get("subs", [])]
        check(names == [f"doc.quick.{i}"], f"try {i}: an unsub survives a quick resume: {names}")
        await e.close()

    # a subscription made before its stream exists: epoch 0 in subok, the
    # stream's epoch later; the session keeps it (also once written)
    a = await Client.connect(d.url)
    w = a.welcome
    await a.request({"t": "sub", "stream": "doc.unborn", "from": 1})
    ok = await a.recv()
    check(ok["epoch"] == 0 and ok["next"] == 1, f"subok before the stream exists: {ok}")
    p = await Client.connect(d.url)
    r = await p.publish("doc.unborn", b"first")
    await a.recv_msgs(1, ack=False)
    await a.close()
    await asyncio.sleep(0.5)  # the handoff is written: the WAL answers
    b = await Client.connect(d.url, resume=w)
    subs = b.welcome.get("subs", [])
    check(len(subs) == 1 and subs[0]["stream"] == "doc.unborn" and subs[0]["epoch"] != 0
          and subs[0]["acked"] == 0 and subs[0]["next"] == 2,
          f"a subscription from before the stream existed is the session's: {subs}")
    got = await b.recv_msgs(1)
    check(got[0]["offset"] == r["offset"], f"and redelivers what was not acked: {got}")
    await b.close()
    await p.close()

    # POST /api/publish with a chunked body: 411 (send Content-Length)
    import http.client
    hc = http.client.HTTPConnection("127.0.0.1", d.port, timeout=10)
    hc.putrequest("POST", "/api/publish")
    hc.putheader("Content-Type", "application/json")
    hc.putheader("Transfer-Encoding", "chunked")
    hc.endheaders()
    body = json.dumps({"stream": "doc.http", "payload": "x"}).encode()
    hc.send(b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body))
    resp = hc.getresponse()
    check(resp.status == 411, f"chunked /api/publish: 411 ({resp.status} {resp.read()})")
    hc.close()

    # a message over the limit while the client keeps sending: 1009, not 1006
    for i in range(5):
        c = await Client.connect(d.url)
        try:
            for _ in range(40):
                await c.ws.send(b"\x00" * 200000)
            await asyncio.wait_for(c.ws.recv(), 10)
            code = None
        except websockets.ConnectionClosed as cc:
            code = cc.rcvd.code if cc.rcvd else None
        check(code == 1009, f"try {i}: oversized while sending: close {code}")


async def scenario_shutdown(d):
    s = await Client.connect(d.url)
    rc_holder = {}
    loop = asyncio.get_running_loop()
    fut = loop.run_in_executor(None, d.stop)
    try:
        await asyncio.wait_for(s.ws.recv(), 20)
        check(False, "no close on shutdown")
    except websockets.ConnectionClosed as cc:
        check(cc.rcvd is not None and cc.rcvd.code == 1001, f"shutdown close code: {cc}")
    rc_holder["rc"] = await fut
    check(rc_holder["rc"] == 0, f"arqd exit status on SIGTERM: {rc_holder['rc']}")


async def scenario_resume_after_restart(d, w1):
    """Sessions are durable: resumed after arqd restarted."""
    b = await Client.connect(d.url, resume=w1)
    check(b.welcome["resumed"] is True, f"resume after restart: {b.welcome}")
    subs = b.welcome.get("subs") or [{}]
    check(subs[0].get("stream") == "resume.s" and subs[0].get("acked", 0) >= 5,
          f"acked offset after restart: {subs}")
    await b.close()


async def scenario_after_restart(d, epoch):
    s = await Client.connect(d.url)
    await s.request({"t": "sub", "stream": "chat.room1", "from": "earliest"})
    ok = await s.recv()
    check(ok["epoch"] == epoch and ok["next"] == 12, f"after restart: {ok}")
    got = await s.recv_msgs(11)
    check([m["offset"] for m in got] == list(range(1, 12)), "all messages after restart")
    c = await Client.connect(d.url)
    r = await c.publish("chat.room1", b"after restart")
    check(r["offset"] == 12, f"offsets continue after restart: {r}")
    # The server API's producer is stable across restarts: dedup there.
    st, body = d.http("POST", "/api/publish",
                      json.dumps({"stream": "user.17.inbox", "payload": "again",
                                  "msgid": "b1"}).encode(), {"Content-Type": "application/json"})
    check(st == 200 and json.loads(body) == {"offset": 1, "duplicate": True},
          f"dedup survives restart: {st} {body}")
    await s.close()
    await c.close()


def main():
    tmp = tempfile.mkdtemp(prefix="arq-it-", dir="/var/tmp")
    data = os.path.join(tmp, "data")
    opts = ["--set", "limits.max_message_bytes=4096", "--set", "limits.max_frame_bytes=65536",
            "--set", "limits.max_inflight=8"]
    d = Arqd(data, *opts)
    try:
        epoch = asyncio.run(scenario_basic(d))
        asyncio.run(scenario_errors(d))
        asyncio.run(scenario_flow_control(d))
        asyncio.run(scenario_fanout(d))
        scenario_http(d)
        asyncio.run(read_inbox(d))
        w1 = asyncio.run(scenario_resume(d))
        asyncio.run(scenario_as_documented(d))
        asyncio.run(scenario_shutdown(d))
        check("level=error" not in d.stderr, f"errors logged: {d.stderr[-2000:]}")
        check("from backend" not in d.stderr and "hello 3" not in d.stderr,
              "payloads must never be logged")
        d = Arqd(data, *opts)
        asyncio.run(scenario_after_restart(d, epoch))
        asyncio.run(scenario_resume_after_restart(d, w1))
        rc = d.stop()
        check(rc == 0, f"second stop: {rc}")
    finally:
        if d.proc.poll() is None:
            d.proc.kill()
        shutil.rmtree(tmp, ignore_errors=True)
    if failures:
        print(f"{len(failures)} check(s) failed", flush=True)
        sys.exit(1)
    print("all protocol checks passed", flush=True)


main()
