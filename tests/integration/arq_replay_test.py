#!/usr/bin/python3
"""arq-replay's commands against a WAL and a MySQL built by this test
(a real arqd syncing into a private MariaDB).

Usage: arq_replay_test.py ARQD ARQ_REPLAY MARIADB_SCRIPT

  - usage errors exit 2, --help 0; every reading command runs next to arqd;
  - streams: offsets, epochs (the subscriber's), counts, bytes, sync lag;
  - dump: JSON lines (UTF-8 text, base64 for binary, headers as an object),
    msgpack, ranges with first/last;
  - verify: clean -> 0; a row deleted from and a row altered in MySQL are
    reported as exact ranges (missing 10..12, different 20: payload);
  - resync: --dry-run changes nothing, then repairs, and a second run is a
    no-op; verify -> 0 again;
  - backup while publishing: a consistent copy that verifies;
  - a corrupted copy (one flipped payload byte): verify reports its stream
    and offset; dump skips it, or takes MySQL's copy (which matches the
    record's checksum) when given the database; streams, resync and
    republish report it; its backup still has it;
  - republish twice publishes once (to another stream, token made from
    SECRET_KEY; and with --token), older offsets come from MySQL;
  - restore from MySQL: arqd on the rebuilt WAL delivers the same messages
    with the same epochs, then keeps publishing and syncing (verify -> 0).
"""
import base64
import os
import shutil
import sys
import tempfile
import threading
import time

import msgpack

sys.dont_write_bytecode = True  # no __pycache__ in the source tree
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from arq_replay_util import (Arqd, MariaDB, Replay, check, failures, flip_bytes, make_jwt,  # noqa
                             passed, publish, subscribe)

ARQD, REPLAY, MARIADB = sys.argv[1:4]
KEY = "test-secret-key-0123456789-abcdef"
TOKEN = make_jwt("tester", KEY)


def payload_a(i):
    return f"message {i} of rp.a MARK-{i:05d}-END".encode()


def main():
    tmp = tempfile.mkdtemp(prefix="arq-replay-", dir="/var/tmp")
    db = MariaDB(MARIADB, os.path.join(tmp, "mdb"))
    url = db.new_db("rp_cmd")
    data = os.path.join(tmp, "data")
    log = os.path.join(tmp, "arqd.log")
    env = {"DATABASE_URL": url, "SECRET_KEY": KEY, "ARQ_API_KEY": "api-key-1"}
    rp = Replay(REPLAY)
    a = Arqd(ARQD, data, log, env=env)
    t0 = time.time()
    try:
        run(tmp, db, url, data, log, env, rp, a)
    finally:
        a.stop()
        db.stop()
        if failures:
            print("arqd log (tail):\n" + "".join(open(log).readlines()[-15:]))
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"took {time.time() - t0:.1f} s", flush=True)
    if failures:
        print(f"{len(failures)} check(s) failed", flush=True)
        sys.exit(1)
    print(f"all {passed[0]} arq-replay command checks passed", flush=True)


def run(tmp, db, url, data, log, env, rp, a):
    W = ["--data-dir", data]
    D = ["--database-url", url]
    # ---- a WAL built by the test -------------------------------------------------
    res = publish(a.url, "rp.a", [payload_a(i) for i in range(1, 201)], TOKEN,
                  msgids=[f"a-{i}" for i in range(1, 201)])
    check([o for o, _ in res] == list(range(1, 201)), "rp.a offsets 1..200")
    binary = [bytes([0xff, 0xfe, i % 256, 0]) for i in range(50)]
    res = publish(a.url, "rp.b", binary, TOKEN,
                  headers=[{"k": f"v{i}"} if i % 2 == 0 else None for i in range(50)])
    check([o for o, _ in res] == list(range(1, 51)), "rp.b offsets 1..50")
    for i in range(10):
        st, body = a.http("POST", "/api/publish",
                          body=f'{{"stream":"rp.c","payload":"out {i}"}}'.encode(),
                          headers={"Authorization": "Bearer api-key-1",
                                   "Content-Type": "application/json"})
        check(st == 200, f"server API publish {i}: {st} {body!r}")
    a.wait_synced()
    _, _, ex = subscribe(a.url, "rp.a", 1, 1, TOKEN)
    epoch_a = ex["subok"]["epoch"]

    # ---- usage -------------------------------------------------------------------
    for cmd in ("streams", "dump", "verify", "resync", "republish", "restore", "backup"):
        rc, out, _ = rp.run(cmd, "--help")
        check(rc == 0 and b"usage: arq-replay " + cmd.encode() in out, f"{cmd} --help")
    check(rp.run()[0] == 2, "no command: exit 2")
    check(rp.run("frobnicate")[0] == 2, "unknown command: exit 2")
    check(rp.run("dump", *W, "rp.a", "--from", "zero")[0] == 2, "bad --from: exit 2")
    check(rp.run("dump", *W, "rp.a", "--range", "9..5")[0] == 2, "inverted range: exit 2")
    check(rp.run("dump", *W)[0] == 2, "dump without a stream: exit 2")
    check(rp.run("streams")[0] == 2, "no data dir: exit 2")
    check(rp.run("resync", *W)[0] == 2, "resync without a database: exit 2")
    check(rp.run("dump", *W, "no.such.stream")[0] == 1, "unknown stream: exit 1")
    check(rp.run("streams", "--data-dir", os.path.join(tmp, "nowhere"))[0] == 1,
          "missing WAL: exit 1")

    # ---- streams (next to the running arqd) ---------------------------------------
    rc, st, err = rp.json("streams", *W, *D)
    check(rc == 0, f"streams: exit {rc} {err}")
    by = {s["stream"]: s for s in st["streams"]} if st else {}
    check(set(by) == {"rp.a", "rp.b", "rp.c"}, f"streams listed: {sorted(by)}")
    if "rp.a" in by:
        s = by["rp.a"]
        check((s["first"], s["last"], s["count"]) == (1, 200, 200), f"rp.a extent: {s}")
        check(s["epoch"] == str(epoch_a), f"rp.a epoch {s['epoch']} == subscriber's {epoch_a}")
        check(s["bytes"] == sum(len(payload_a(i)) for i in range(1, 201)), f"rp.a bytes {s}")
        check(s["lag_records"] == 0 and s["synced_to"] == 200, f"rp.a synced: {s}")
    check(st and st["sync"]["watermark"] == 260 and st["sync"]["lag_records"] == 0,
          f"sync watermark 260: {st and st['sync']}")
    rc, out, _ = rp.run("streams", *W)
    check(rc == 0 and b"rp.b" in out and b"sync: unknown" in out, "streams text without MySQL")

    # ---- dump ----------------------------------------------------------------------
    rc, lines, err = rp.lines("dump", *W, "rp.a", "--from", "5", "--to", "9")
    check(rc == 0 and [x["offset"] for x in lines] == [5, 6, 7, 8, 9], f"dump 5..9: {rc} {err}")
    check(all(x["payload"] == payload_a(x["offset"]).decode() and x["source"] == "wal" and
              x["msgid"] == f"a-{x['offset']}" and x["producer"] == "tester" and
              x["direction"] == "in" for x in lines), f"dump fields: {lines[:1]}")
    rc, lines, _ = rp.lines("dump", *W, "rp.a", "--range", "last-2..")
    check([x["offset"] for x in lines] == [198, 199, 200], "dump --range last-2..")
    rc, lines, _ = rp.lines("dump", *W, "rp.b", "--to", "first+3")
    check(rc == 0 and len(lines) == 4, f"dump rp.b first 4: {len(lines)}")
    if lines:
        check(lines[0].get("encoding") == "base64" and
              base64_eq(lines[0]["payload"], binary[0]), f"binary payload as base64: {lines[0]}")
        check(lines[0].get("headers") == {"k": "v0"} and "headers" not in lines[1],
              f"headers as an object: {lines[:2]}")
    rc, lines, _ = rp.lines("dump", *W, "rp.c")
    check(len(lines) == 10 and all(x["direction"] == "out" for x in lines), "rp.c direction out")
    rc, out, _ = rp.run("dump", *W, "rp.b", "--range", "2..3", "--format", "msgpack")
    objs = unpack_all(out)
    check(rc == 0 and [o["offset"] for o in objs] == [2, 3] and objs[0]["payload"] == binary[1]
          and objs[1]["headers"] == {"k": "v2"}, f"dump msgpack: {objs}")

    # ---- verify, MySQL damaged, resync ----------------------------------------------
    rc, v, err = rp.json("verify", *W, *D)
    check(rc == 0 and v and v["ok"] and v["compared"] == 260, f"verify clean: {rc} {v} {err}")
    db.sql("DELETE FROM arq_messages WHERE stream = 'rp.a' AND `offset` BETWEEN 10 AND 12; "
           "UPDATE arq_messages SET payload = 'garbage' WHERE stream = 'rp.a' AND `offset` = 20",
           db="rp_cmd")
    rc, v, err = rp.json("verify", *W, *D)
    probs = sorted((p["kind"], p.get("stream"), p.get("from"), p.get("to")) for p in
                   (v["problems"] if v else []))
    check(rc == 1 and probs == [("different", "rp.a", 20, 20), ("missing", "rp.a", 10, 12)],
          f"verify finds the deleted and the altered row: {rc} {probs}")
    diff = [p for p in (v["problems"] if v else []) if p["kind"] == "different"]
    check(diff and diff[0]["fields"] == ["payload"], f"the altered column: {diff}")
    rc, out, _ = rp.run("verify", *W, *D)
    check(rc == 1 and b"offsets 10..12" in out and b"MISSING" in out and b"DIFFERENT" in out,
          f"verify text: {out!r}")
    rc, r1, _ = rp.json("resync", *W, *D, "--dry-run")
    a_stats = [s for s in (r1["streams"] if r1 else []) if s["stream"] == "rp.a"]
    check(rc == 0 and a_stats and (a_stats[0]["inserted"], a_stats[0]["replaced"]) == (3, 1),
          f"resync --dry-run counts: {r1}")
    check(rp.run("verify", *W, *D)[0] == 1, "dry run changed nothing")
    rc, r2, _ = rp.json("resync", *W, *D, "rp.a", "--range", "1..100")
    check(rc == 0 and r2["streams"][0]["inserted"] == 3 and r2["streams"][0]["replaced"] == 1 and
          r2["streams"][0]["same"] == 96, f"resync repairs: {r2}")
    rc, r3, _ = rp.json("resync", *W, *D)
    check(rc == 0 and all(s["inserted"] == 0 and s["replaced"] == 0 for s in r3["streams"]),
          f"resync again changes nothing: {r3}")
    check(rp.run("verify", *W, *D)[0] == 0, "verify after resync: 0")

    # ---- backup while publishing ---------------------------------------------------
    stop = threading.Event()
    more = []

    def load():
        i = 0
        while not stop.is_set():
            more.extend(publish(a.url, "rp.load", [f"load {i + k}".encode() for k in range(20)],
                                TOKEN))
            i += 20

    th = threading.Thread(target=load, daemon=True)
    th.start()
    time.sleep(0.3)
    bk = os.path.join(tmp, "backup")
    rc, b, err = rp.json("backup", *W, bk)
    stop.set()
    th.join(timeout=30)
    check(rc == 0 and b and b["streams"] >= 3, f"hot backup: {rc} {b} {err}")
    check(rp.run("backup", *W, bk)[0] == 2, "backup into a non-empty directory: exit 2")
    rc, v, err = rp.json("verify", "--data-dir", bk)
    check(rc == 0 and v["ok"], f"the backup verifies: {v} {err}")
    rc, st, _ = rp.json("streams", "--data-dir", bk)
    load_s = [s for s in st["streams"] if s["stream"] == "rp.load"] if st else []
    check(load_s and load_s[0]["first"] == 1 and load_s[0]["count"] == load_s[0]["last"],
          f"rp.load in the backup is a contiguous prefix: {load_s}")
    a.wait_synced()

    # ---- a corrupted copy ------------------------------------------------------------
    bad = os.path.join(tmp, "corrupt")
    os.mkdir(bad)
    shutil.copy(os.path.join(bk, "data.mdb"), os.path.join(bad, "data.mdb"))
    n = flip_bytes(os.path.join(bad, "data.mdb"), b"MARK-00077-END")
    check(n == 1, f"the marker is in the compact copy once: {n}")
    rc, v, _ = rp.json("verify", "--data-dir", bad)
    probs = [(p["kind"], p.get("stream"), p.get("from"), p.get("to")) for p in
             (v["problems"] if v else [])]
    check(rc == 1 and probs == [("corrupt", "rp.a", 77, 77)],
          f"verify reports the flipped byte with stream and offset: {rc} {probs}")
    rc, v, _ = rp.json("verify", "--data-dir", bad, *D, "rp.a")
    check(rc == 1 and v and v["problems"][0]["mysql_copy"] is True,
          f"MySQL holds a good copy of it: {v and v['problems']}")
    rc, out, _ = rp.run("verify", "--data-dir", bad)
    check(b"stream 'rp.a' offset 77" in out, f"verify text names it: {out!r}")
    rc, lines, err = rp.lines("dump", "--data-dir", bad, "rp.a", "--range", "76..78")
    check(rc == 1 and [x["offset"] for x in lines] == [76, 78] and "offset 77" in err,
          f"dump skips the corrupt record and says so: {rc} {[x['offset'] for x in lines]} {err}")
    rc, lines, err = rp.lines("dump", "--data-dir", bad, *D, "rp.a", "--range", "76..78")
    check(rc == 0 and [(x["offset"], x["source"]) for x in lines] ==
          [(76, "wal"), (77, "mysql"), (78, "wal")] and
          lines[1]["payload"] == payload_a(77).decode(),
          f"dump takes MySQL's good copy: {rc} {lines} {err}")
    check(rp.run("streams", "--data-dir", bad)[0] == 1, "streams on the corrupt copy: exit 1")
    rc, r, err = rp.json("resync", "--data-dir", bad, *D, "rp.a")
    check(rc == 1 and r["streams"][0]["corrupt"] == 1 and r["streams"][0]["inserted"] == 0 and
          "offset 77" in err, f"resync from the corrupt copy skips offset 77: {r} {err}")
    rc, r, err = rp.json("republish", "--url", a.url, "--data-dir", bad, "rp.a", "--dry-run")
    check(rc == 1 and r["would_publish"] == 199 and r["skipped"] == 1 and "offset 77" in err,
          f"republish from the corrupt copy would skip offset 77: {r} {err}")
    bad2 = os.path.join(tmp, "corrupt-backup")
    check(rp.run("backup", "--data-dir", bad, bad2)[0] == 0, "backup of the corrupt copy")
    rc, v, _ = rp.json("verify", "--data-dir", bad2)
    check(rc == 1 and [(p["kind"], p["from"]) for p in v["problems"]] == [("corrupt", 77)],
          f"the corrupt record is still found in its backup: {v and v['problems']}")

    # ---- republish: twice publishes once ----------------------------------------------
    R = ["republish", "--url", a.url, *W, "rp.a", "--range", "1..50", "--to-stream", "rp.copy"]
    check(rp.run(*R)[0] == 2, "republish without a token: exit 2")
    rc, r, err = rp.json(*R, "--dry-run")
    check(rc == 0 and r["would_publish"] == 50, f"republish --dry-run: {r} {err}")
    rc, r, err = rp.json(*R, env={"SECRET_KEY": KEY})
    check(rc == 0 and (r["published"], r["duplicates"], r["failed"]) == (50, 0, 0),
          f"republish: 50 published: {r} {err}")
    rc, r, err = rp.json(*R, env={"SECRET_KEY": KEY})
    check(rc == 0 and (r["published"], r["duplicates"]) == (0, 50),
          f"republish again: all duplicates: {r} {err}")
    msgs, _, _ = subscribe(a.url, "rp.copy", 1, 60, TOKEN, timeout=3)
    check([(o, p) for o, p, _ in msgs] == [(i, payload_a(i)) for i in range(1, 51)],
          f"rp.copy holds rp.a 1..50 once: {len(msgs)} messages")
    tok = make_jwt("ops", KEY, pub=["rp.copy2"])
    R2 = ["republish", "--url", a.url, *W, "rp.b", "--to-stream", "rp.copy2", "--token", tok]
    rc, r, err = rp.json(*R2)
    rc2, r2, err2 = rp.json(*R2)
    check(rc == 0 and rc2 == 0 and r["published"] == 50 and r2["duplicates"] == 50,
          f"republish with --token twice: {r} {r2} {err} {err2}")
    msgs, _, _ = subscribe(a.url, "rp.copy2", 1, 50, TOKEN, timeout=5)
    check([(o, p, h) for o, p, h in msgs] ==
          [(i + 1, binary[i], {"k": f"v{i}"} if i % 2 == 0 else None) for i in range(50)],
          f"rp.copy2 carries rp.b's payloads and headers: {msgs[:2]}")
    rc, r, err = rp.json("republish", "--url", a.url, *W, "rp.a", "--to-stream", "other",
                         "--range", "1..2", "--token", tok)
    check(rc == 1 and r["failed"] == 2, f"a target the token may not publish to: exit 1 {r}")

    # ---- older offsets from MySQL (a WAL holding only the tail) -----------------------
    tail = os.path.join(tmp, "tail")
    rc, r, err = rp.json("restore", *D, "--data-dir", tail, "--tail", "20")
    check(rc == 0 and r["built"], f"restore --tail 20: {rc} {err}")
    rc, lines, err = rp.lines("dump", "--data-dir", tail, *D, "rp.a", "--range", "179..182")
    check(rc == 0 and [(x["offset"], x["source"]) for x in lines] ==
          [(179, "mysql"), (180, "mysql"), (181, "wal"), (182, "wal")],
          f"dump reads below the WAL from MySQL: {[(x['offset'], x['source']) for x in lines]}")
    rc, lines, err = rp.lines("dump", "--data-dir", tail, "rp.a", "--range", "179..182")
    check(rc == 1 and [x["offset"] for x in lines] == [181, 182] and "179..180" in err,
          f"without MySQL the older offsets are reported: {err}")
    R3 = ["republish", "--url", a.url, "--data-dir", tail, *D, "rp.a", "--range", "171..190",
          "--to-stream", "rp.copy3"]
    rc, r, err = rp.json(*R3, env={"SECRET_KEY": KEY})
    check(rc == 0 and r["published"] == 20, f"republish across MySQL and the WAL: {r} {err}")
    msgs, _, _ = subscribe(a.url, "rp.copy3", 1, 20, TOKEN)
    check([p for _, p, _ in msgs] == [payload_a(i) for i in range(171, 191)],
          "rp.copy3 holds rp.a 171..190")

    # ---- restore from MySQL: the same messages from a rebuilt WAL ----------------------
    a.wait_synced()
    before = {s: subscribe(a.url, s, 1, 10**6, TOKEN, timeout=3) for s in ("rp.a", "rp.b")}
    a.stop()
    new = os.path.join(tmp, "restored")
    rc, r, err = rp.json("restore", *D, "--data-dir", new)
    check(rc == 0 and r["built"] and r["new_epochs"] == 0, f"restore: {rc} {r and r['records']} {err}")
    b2 = Arqd(ARQD, new, log, env=env)
    try:
        for s in ("rp.a", "rp.b"):
            old_msgs, _, old_ex = before[s]
            msgs, gaps, ex = subscribe(b2.url, s, 1, len(old_msgs), TOKEN)
            check(msgs == old_msgs and not gaps,
                  f"{s}: a subscriber receives the same messages ({len(msgs)}/{len(old_msgs)})")
            check(ex["subok"]["epoch"] == old_ex["subok"]["epoch"], f"{s}: same epoch")
        res = publish(b2.url, "rp.a", [b"after restore"], TOKEN, msgids=["a-after"])
        check(res == [(201, False)], f"publishing continues at offset 201: {res}")
        res = publish(b2.url, "rp.a", [b"dup"], TOKEN, msgids=["a-7"])
        check(res == [(7, True)], f"dedup entries came back with the records: {res}")
        b2.wait_synced()
        rc, v, err = rp.json("verify", "--data-dir", new, *D)
        check(rc == 0 and v["ok"], f"verify the restored WAL against MySQL: {v} {err}")
    finally:
        b2.stop()


def base64_eq(s, raw):
    return base64.b64decode(s) == raw


def unpack_all(buf):
    u = msgpack.Unpacker(raw=False)
    u.feed(buf)
    return list(u)


main()
