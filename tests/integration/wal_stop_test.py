#!/usr/bin/python3
"""A failing disk under arqd (issue #16): fsync returns EIO (the fault shim,
tests/tools/fault_shim.c, LD_PRELOADed while a trigger file exists).

Usage: wal_stop_test.py ARQD FAULT_SHIM

- the WAL stops for good: publishes are refused with nack 503 "storage
  stopped"; the stop is logged once, at error level, with its cause;
- a new connection still gets a welcome (a session that is not stored,
  "durable": false), not "500 out of memory", and is served what the WAL
  holds;
- /health is 503 "unhealthy" with the reason; arq_wal_state says failed;
- SIGTERM ends arqd with exit status 1;
- restarted on a healthy disk, every acknowledged publish is there, and the
  refused ones, retried with the same msgid, are stored exactly once (a
  refused publish may or may not have been stored: dedup decides).
"""
import asyncio
import os
import shutil
import sys
import tempfile
import time

sys.dont_write_bytecode = True  # no __pycache__ in the source tree
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import msgpack  # noqa: E402
import websockets  # noqa: E402
from arq_replay_util import Arqd, check, failures, grep_log, passed, publish, subscribe  # noqa: E402,E501

ARQD, SHIM = sys.argv[1:3]


async def new_client(url):
    async with websockets.connect(url, subprotocols=["arq.v1"], close_timeout=2) as ws:
        await ws.send(msgpack.packb({"t": "hello"}))
        w = msgpack.unpackb(await asyncio.wait_for(ws.recv(), 10), raw=False)
        r = None
        if w.get("t") == "welcome":
            await ws.send(msgpack.packb({"t": "pub", "id": 1, "stream": "stop.s",
                                         "payload": b"after"}, use_bin_type=True))
            r = msgpack.unpackb(await asyncio.wait_for(ws.recv(), 10), raw=False)
        return w, r


async def publish_each(url, ids, trigger=None, session=None):
    """Publish ids (payload = msgid) one after the other on one connection;
    with trigger, the disk starts failing once the session is stored. An
    anonymous client's dedup namespace is its session: a retry resumes it.
    Returns (welcome, answers in order)."""
    out = []
    async with websockets.connect(url, subprotocols=["arq.v1"], close_timeout=2) as ws:
        await ws.send(msgpack.packb({"t": "hello", **(session or {})}))
        w = msgpack.unpackb(await asyncio.wait_for(ws.recv(), 10), raw=False)
        check(w.get("t") == "welcome" and "durable" not in w, f"a stored session: {w}")
        if trigger:
            open(trigger, "w").close()  # the disk starts failing
        for i, m in enumerate(ids):
            await ws.send(msgpack.packb({"t": "pub", "id": i + 1, "stream": "stop.s",
                                         "payload": m.encode(), "msgid": m}, use_bin_type=True))
            while True:
                r = msgpack.unpackb(await asyncio.wait_for(ws.recv(), 10), raw=False)
                if r["t"] in ("puback", "nack") and r["id"] == i + 1:
                    out.append(r)
                    break
    return w, out


def read_all(url, stream):
    """Every message of stream (the subok says how many there are)."""
    _, _, extra = subscribe(url, stream, 1, 1)
    n = extra["subok"]["next"] - 1
    msgs, _, _ = subscribe(url, stream, 1, n)
    check(len(msgs) == n, f"read back {len(msgs)} of {n}")
    return msgs


def main():
    tmp = tempfile.mkdtemp(prefix="arq-stop-", dir="/var/tmp")
    data, log, trigger = (os.path.join(tmp, x) for x in ("data", "arqd.log", "fault"))
    asan = os.environ.get("ASAN_OPTIONS", "")
    env = {"LD_PRELOAD": SHIM, "ARQ_FAULT_FILE": trigger,
           "ASAN_OPTIONS": (asan + ":" if asan else "") + "verify_asan_link_order=0"}
    t0 = time.time()
    try:
        a = Arqd(ARQD, data, log, env=env)
        try:
            before = [f"b{i}".encode() for i in range(50)]
            res = publish(a.url, "stop.s", before, msgids=[f"b{i}" for i in range(50)])
            acked = {f"b{i}": o for i, (o, _) in enumerate(res) if o}
            check(len(acked) == 50, f"acknowledged before the fault: {len(acked)}")

            ids = [f"a{i}" for i in range(40)]
            w, res = asyncio.run(publish_each(a.url, ids, trigger=trigger))
            session = {"session": w["session"], "resume_token": w["resume_token"]}
            refused = [ids[i] for i, r in enumerate(res) if r["t"] == "nack"]
            acked.update({ids[i]: r["offset"] for i, r in enumerate(res) if r["t"] == "puback"})
            check(refused and res[-1]["t"] == "nack",
                  f"publishes refused once fsync fails: {res[-1]}")
            check(all(r["code"] == 503 and r["reason"] == "storage stopped"
                      for r in res if r["t"] == "nack"),
                  f"with nack 503 storage stopped: {[r for r in res if r['t'] == 'nack'][:2]}")

            w, r = asyncio.run(new_client(a.url))
            check(w.get("t") == "welcome" and w.get("durable") is False,
                  f"a new connection is welcomed with a session that is not stored: {w}")
            check(r and r["t"] == "nack" and r["code"] == 503 and r["reason"] == "storage stopped",
                  f"its publish: nack 503 storage stopped: {r}")
            msgs, _, _ = subscribe(a.url, "stop.s", 1, 5)
            check([p for _, p, _ in msgs] == before[:5], "a new subscriber is served")

            code, body = a.http("GET", "/health")
            check(code == 503 and b'"status":"unhealthy"' in body and b"wal stopped" in body,
                  f"/health 503 unhealthy with the reason: {code} {body[:200]}")
            check(a.metric('arq_wal_state{state="failed"}') == 1, "arq_wal_state{state=failed} 1")
        finally:
            rc = a.stop()
        check(rc == 1, f"SIGTERM after a stop: exit status 1 ({rc})")
        stops = grep_log(log, r"event=wal_stopped")
        check(len(stops) == 1 and "level=error" in stops[0], f"the stop logged once, as an "
                                                               f"error: {stops}")
        check(stops and ("fdatasync of the journal: Input/output error" in stops[0] or
                         "folding the journal into LMDB: Input/output error" in stops[0]),
              f"with its cause: {stops}")
        check(grep_log(log, r"level=error event=stopped exit=1"), "log: stopped exit=1")
        check(not grep_log(log, r"out of memory"), "log: no out of memory")

        os.unlink(trigger)  # a healthy disk again (the shim passes through)
        a = Arqd(ARQD, data, log)
        try:
            msgs = read_all(a.url, "stop.s")
            have = {}
            for off, p, _ in msgs:
                have.setdefault(p.decode(), []).append(off)
            check(all(have.get(m) == [o] for m, o in acked.items()),
                  f"every acknowledged publish at its offset, once ({len(acked)})")
            w, res = asyncio.run(publish_each(a.url, refused, session=session))
            check(w.get("resumed") is True, f"the publisher's session resumed: {w}")
            check(all(r["t"] == "puback" for r in res),
                  f"the refused ones, retried, are acknowledged: {res[:3]}")
            msgs = read_all(a.url, "stop.s")
            payloads = [p.decode() for _, p, _ in msgs]
            check(all(payloads.count(m) == 1 for m in refused),
                  "each refused publish stored exactly once after its retry")
        finally:
            check(a.stop() == 0, "the restarted arqd exits 0")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"took {time.time() - t0:.1f} s", flush=True)
    if failures:
        print(f"{len(failures)} check(s) failed", flush=True)
        sys.exit(1)
    print(f"all {passed[0]} checks passed", flush=True)


main()
