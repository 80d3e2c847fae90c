#!/usr/bin/python3
"""docs/runbook.md, incident by incident: the signs it names show up, and its
exact commands recover (a real arqd, a private MariaDB with one database per
incident, arq-replay).

Usage: arq_replay_runbook_test.py ARQD ARQ_REPLAY MARIADB_SCRIPT [INCIDENT...]

  1 broker crash        SIGKILL under load; restart; verify 0; every
                        acknowledged publish present once
  2 disk full           WAL at wal.map_size_max: nack 503 "storage full",
                        /health degraded with the reason, storage_full in
                        the log; restart with a larger map; publishing
                        resumes; verify 0; nothing lost. As root, also the
                        filesystem full (a loop-mounted ext4): refused, room
                        made, resumed without a restart, storage_available
  3 MySQL outage        mariadbd SIGSTOPped: publishes acked, /health degraded
                        with a growing lag, streams works without MySQL;
                        SIGCONT: lag 0, verify 0
  4 MySQL data loss     MySQL reloaded from an older dump (arqd stopped
                        meanwhile): the drain rewrites, verify 0; rows deleted:
                        verify names them, resync, 0
  5 WAL disk loss       data directory removed: restore; arqd on it delivers
                        the same messages, same epochs, continues; a client's
                        session resumes from MySQL at its acked offset;
                        --new-epoch makes a subscription with the old epoch
                        get 409 (the session resumes without that cursor)
  6 corrupted record    a flipped byte in the live WAL: the subscriber stops
                        with error 500; verify names stream and offset;
                        backup, restore --from-wal, swap: all delivered, 0
  7 consumer replay     republish --dry-run, twice: the consumer's stream
                        holds the range once
  8 rollback            backup before the "upgrade"; the WAL is then refused
                        (format version bumped): restore --from-wal BACKUP
                        with MySQL gives back every message
  9 fsync error         fsync fails with EIO (tests/tools/fault_shim.c,
                        $ARQ_FAULT_SHIM): wal_stopped logged once as an error,
                        /health 503 with the cause, nack 503 storage stopped;
                        backup works; exit 1; restarted: verify 0, every
                        acknowledged publish present
"""
import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

sys.dont_write_bytecode = True  # no __pycache__ in the source tree
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import msgpack  # noqa: E402
import websockets  # noqa: E402
from arq_replay_util import (Arqd, MariaDB, Replay, check, failures, flip_bytes,  # noqa: E402
                             grep_log, make_jwt, passed, publish, subscribe)

ARQD, REPLAY, MARIADB = sys.argv[1:4]
ONLY = set(sys.argv[4:])
KEY = "runbook-secret-key-0123456789abcdef"
TOKEN = make_jwt("runbook", KEY)


class Ctx:
    def __init__(self, tmp, db, rp):
        self.tmp, self.db, self.rp = tmp, db, rp

    def setup(self, name, mysql=True, extra=(), env=None):
        """A data dir, a database and an arqd for one incident (env: more
        variables for this first arqd only)."""
        d = os.path.join(self.tmp, name)
        os.makedirs(d)
        self.data = os.path.join(d, "data")
        self.log = os.path.join(d, "arqd.log")
        self.dbname = "rb_" + name
        self.url = self.db.new_db(self.dbname) if mysql else None
        self.env = {"SECRET_KEY": KEY, **({"DATABASE_URL": self.url} if mysql else {})}
        self.extra = extra
        return self.start(env=env)

    def start(self, data=None, extra=None, port=0, env=None):
        return Arqd(ARQD, data or self.data, self.log, env={**self.env, **(env or {})},
                    extra=self.extra if extra is None else extra, port=port)

    def W(self, data=None):
        return ["--data-dir", data or self.data]

    def D(self):
        return ["--database-url", self.url]

    def verify_ok(self, what, data=None):
        rc, v, err = self.rp.json("verify", *self.W(data), *self.D())
        check(rc == 0 and v and v["ok"], f"{what}: verify exit {rc}: "
              f"{v and v['problems'][:3]} {err}")


def payloads(prefix, n, start=1):
    return [f"{prefix} {i}".encode() for i in range(start, start + n)]


# ---- 1. broker crash ---------------------------------------------------------------

def broker_crash(c):
    a = c.setup("crash")
    acked = {}
    stop = threading.Event()

    def load():
        i = 0
        while not stop.is_set():
            batch = list(range(i, i + 20))
            try:
                res = publish(a.url, "crash.s", [f"c{k}".encode() for k in batch], TOKEN,
                              msgids=[f"c{k}" for k in batch])
                for k, (off, _) in zip(batch, res):
                    if off:
                        acked[f"c{k}"] = off
                i += 20
            except Exception:  # the broker is down: retry the same ids
                time.sleep(0.05)

    th = threading.Thread(target=load, daemon=True)
    th.start()
    time.sleep(0.5)
    port = a.port
    a.kill9()
    a = c.start(port=port)  # "start it as usual"
    time.sleep(0.5)
    stop.set()
    th.join(timeout=30)
    try:
        h = a.wait_synced()
        check(h and h["status"] == "healthy", f"crash: healthy after restart: {h}")
        c.verify_ok("crash")
        rc, lines, _ = c.rp.lines("dump", *c.W(), "crash.s")
        got = {x["msgid"]: x["offset"] for x in lines}
        check(len(got) == len(lines), "crash: every message id once")
        check(all(got.get(m) == o for m, o in acked.items()),
              f"crash: every acknowledged publish at its offset ({len(acked)} acked)")
    finally:
        a.stop()


# ---- 2. disk full -----------------------------------------------------------------

def disk_full(c):
    a = c.setup("full", mysql=False, extra=("--set", "wal.map_size_max=64M"))
    big = b"x" * (1000 * 1000)
    acked, refused = 0, None
    try:
        for i in range(200):
            res = publish(a.url, "full.s", [big], TOKEN, msgids=[f"f{i}"])
            if res[0][0] is None:
                refused = res[0][1]
                break
            acked += 1
        check(refused == 503, f"full: publishes refused with 503 (after {acked}): {refused}")
        failed = a.metric("arq_wal_failed_commits_total")
        check(failed and failed >= 1, f"full: arq_wal_failed_commits_total {failed}")
        check(a.metric('arq_wal_state{state="full"}') == 1, "full: arq_wal_state{state=full} 1")
        h = a.health()
        check(h and h["status"] == "degraded" and
              "wal.map_size_max (64 MiB)" in h.get("reason", ""),
              f"full: /health degraded with the reason: {h}")
        rc, st, _ = c.rp.json("streams", *c.W())
        check(rc == 0 and st["streams"][0]["count"] == acked, f"full: streams sees {acked}")
    finally:
        a.stop()
    check(grep_log(c.log, r"level=warn event=storage_full reason=\"the WAL's map is at"),
          "full: storage_full in the log")
    check(not grep_log(c.log, r"wal_stopped"), "full: not a stop")
    a = c.start(extra=("--set", "wal.map_size_max=256M"))
    try:
        res = publish(a.url, "full.s", [big, big], TOKEN, msgids=["f-again", f"f{acked}"])
        check(all(o for o, _ in res), f"full: publishing resumes after the map was raised: {res}")
        rc, v, _ = c.rp.json("verify", *c.W())
        check(rc == 0 and v["ok"] and v["records"] == acked + 2,
              f"full: verify 0, nothing lost ({v and v['records']} records, {acked} + 2)")
        h = a.health()
        check(h and h["status"] == "healthy", f"full: /health healthy again: {h}")
    finally:
        a.stop()
    disk_full_fs(c)


def disk_full_fs(c):
    """The filesystem full (root only: a loop-mounted ext4 image): refused,
    room made, resumed without a restart."""
    if os.geteuid() != 0:
        print("full: skipping the filesystem-full part (needs root for a loop mount)")
        return
    d = os.path.join(c.tmp, "fullfs")
    img, mnt = os.path.join(d, "fs.img"), os.path.join(d, "mnt")
    os.makedirs(mnt)
    with open(img, "wb") as f:
        f.truncate(128 << 20)
    for cmd in (["mkfs.ext4", "-q", "-F", "-m", "0", img], ["mount", "-o", "loop", img, mnt]):
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode:
            print(f"full: skipping the filesystem-full part: {' '.join(cmd[:2])}: {r.stderr}")
            return
    try:
        log = c.log
        a = c.start(data=os.path.join(mnt, "data"), extra=("--set", "wal.journal_max=2M"))
        filler = os.path.join(mnt, "filler")
        try:
            st = os.statvfs(mnt)
            with open(filler, "wb") as f:  # all but ~4 MiB
                os.posix_fallocate(f.fileno(), 0, st.f_bavail * st.f_frsize - (4 << 20))
            big = b"y" * (1000 * 1000)
            acked, refused = 0, None
            for i in range(200):
                res = publish(a.url, "fs.s", [big], TOKEN, msgids=[f"fs{i}"])
                if res[0][0] is None:
                    refused = res[0][1]
                    break
                acked += 1
            check(refused == 503, f"fs full: refused with 503 after {acked}: {refused}")
            h = a.health()
            check(h and h["status"] == "degraded" and "no space left" in h.get("reason", ""),
                  f"fs full: /health degraded, no space left: {h}")
            os.unlink(filler)  # "free space on it": nothing to do in ARQ
            deadline = time.time() + 20
            while time.time() < deadline and (a.health() or {}).get("status") != "healthy":
                time.sleep(0.1)
            res = publish(a.url, "fs.s", [big], TOKEN, msgids=[f"fs{acked}"])
            check(res[0][0] == acked + 1, f"fs full: publishing resumes, no restart: {res}")
            check((a.health() or {}).get("status") == "healthy", "fs full: healthy again")
        finally:
            a.stop()
        # logged within 10 s of storage_full, or at exit (changes are summed up)
        check(grep_log(log, r"event=storage_available"), "fs full: storage_available logged")
    finally:
        subprocess.run(["umount", "-l", mnt], capture_output=True)


# ---- 3. MySQL outage ----------------------------------------------------------------

def mysql_outage(c):
    a = c.setup("outage")
    try:
        publish(a.url, "out.s", payloads("before", 20), TOKEN)
        a.wait_synced()
        pid = c.db.pid()
        os.kill(pid, signal.SIGSTOP)
        try:
            res = publish(a.url, "out.s", payloads("during", 50), TOKEN)
            check(all(o for o, _ in res), "outage: publishes acknowledged while MySQL is stopped")
            deadline = time.time() + 15
            h = None
            while time.time() < deadline:
                h = a.health()
                if h and h["sync"]["state"] == "degraded" and h["sync"]["lag_records"] >= 50:
                    break
                time.sleep(0.2)
            check(h and h["sync"]["state"] == "degraded" and h["sync"]["lag_records"] >= 50,
                  f"outage: /health sync degraded with the lag: {h and h['sync']}")
            lag = a.metric("arq_sync_lag_records")
            check(lag and lag >= 50, f"outage: arq_sync_lag_records {lag}")
            rc, st, _ = c.rp.json("streams", *c.W())
            check(rc == 0 and st["streams"][0]["count"] == 70,
                  f"outage: streams works without MySQL: {rc}")
        finally:
            os.kill(pid, signal.SIGCONT)
        a.wait_synced(timeout=60)
        c.verify_ok("outage")
    finally:
        a.stop()


# ---- 4. MySQL data loss ---------------------------------------------------------------

def mysql_loss(c):
    a = c.setup("mloss")
    dump = os.path.join(c.tmp, "mloss", "mysql.sql")
    try:
        publish(a.url, "ml.s", payloads("old", 100), TOKEN)
        a.wait_synced()
        c.db.dump(c.dbname, dump)                      # last night's backup
        publish(a.url, "ml.s", payloads("new", 100, 101), TOKEN)
        a.wait_synced()
        rows_before = a.metric("arq_sync_rows_total")
    finally:
        a.stop()
    # MySQL "lost a day": restored from the backup, arqd stopped meanwhile
    c.db.sql(f"DROP DATABASE {c.dbname}; CREATE DATABASE {c.dbname} CHARACTER SET utf8mb4 "
             "COLLATE utf8mb4_bin", db="mysql")
    c.db.load(c.dbname, dump)
    n = c.db.sql("SELECT COUNT(*) FROM arq_messages", db=c.dbname)[0][0]
    check(n == "100", f"mloss: MySQL holds the older 100 rows: {n}")
    a = c.start()
    try:
        a.wait_synced()
        rows = a.metric("arq_sync_rows_total")
        check(rows == 100, f"mloss: the drain rewrote the 100 rows MySQL lost: {rows} "
                           f"(before the loss: {rows_before})")
        c.verify_ok("mloss: the drain rewrote what MySQL lost")
        n = c.db.sql("SELECT COUNT(*) FROM arq_messages", db=c.dbname)[0][0]
        check(n == "200", f"mloss: MySQL holds 200 rows again: {n}")
        # rows deleted, watermark untouched
        c.db.sql("DELETE FROM arq_messages WHERE `offset` BETWEEN 150 AND 159", db=c.dbname)
        rc, v, _ = c.rp.json("verify", *c.W(), *c.D())
        probs = [(p["kind"], p["from"], p["to"]) for p in (v["problems"] if v else [])]
        check(rc == 1 and probs == [("missing", 150, 159)], f"mloss: verify names them: {probs}")
        rc, r, _ = c.rp.json("resync", *c.W(), *c.D(), "--dry-run")
        check(rc == 0 and r["streams"][0]["inserted"] == 10, f"mloss: dry run: {r}")
        rc, r, _ = c.rp.json("resync", *c.W(), *c.D())
        check(rc == 0 and r["streams"][0]["inserted"] == 10, f"mloss: resync: {r}")
        c.verify_ok("mloss: after resync")
    finally:
        a.stop()


# ---- 5. WAL disk loss ------------------------------------------------------------------

async def _session_acks(url, stream, upto):
    """A new session subscribes to stream from 1, acks offset upto and leaves:
    (welcome, epoch of the subscription)."""
    async with websockets.connect(url, subprotocols=["arq.v1"], close_timeout=2) as ws:
        await ws.send(msgpack.packb({"t": "hello", "token": TOKEN}))
        w = msgpack.unpackb(await ws.recv(), raw=False)
        await ws.send(msgpack.packb({"t": "sub", "id": 1, "stream": stream, "from": 1}))
        epoch, last = None, 0
        while last < upto:
            m = msgpack.unpackb(await asyncio.wait_for(ws.recv(), 10), raw=False)
            if m["t"] == "subok":
                epoch = m["epoch"]
            elif m["t"] == "msg":
                last = m["offset"]
        await ws.send(msgpack.packb({"t": "ack", "stream": stream, "offset": upto}))
        await asyncio.sleep(0.3)  # acks are written within about 100 ms
    return w, epoch


async def _resume(url, session, resume_token, count):
    """hello with session and resume_token: (welcome, [(offset, payload)] of
    the first count messages delivered without a sub)."""
    msgs = []
    async with websockets.connect(url, subprotocols=["arq.v1"], close_timeout=2) as ws:
        await ws.send(msgpack.packb({"t": "hello", "token": TOKEN, "session": session,
                                     "resume_token": resume_token}))
        w = msgpack.unpackb(await ws.recv(), raw=False)
        while len(msgs) < count:
            try:
                m = msgpack.unpackb(await asyncio.wait_for(ws.recv(), 3), raw=False)
            except asyncio.TimeoutError:
                break
            if m["t"] == "msg":
                msgs.append((m["offset"], bytes(m["payload"])))
    return w, msgs


def wait_for_rows(c, sql, want, what, timeout=20):
    deadline = time.time() + timeout
    rows = None
    while time.time() < deadline:
        rows = c.db.sql(sql, db=c.dbname)
        if rows == want:
            return True
        time.sleep(0.1)
    return check(False, f"{what}: {rows}, want {want}")


def wal_loss(c):
    a = c.setup("wloss")
    try:
        publish(a.url, "wl.a", payloads("a", 150), TOKEN)
        publish(a.url, "wl.b", payloads("b", 30), TOKEN)
        a.wait_synced()
        before = {s: subscribe(a.url, s, 1, 10**6, TOKEN, timeout=2) for s in ("wl.a", "wl.b")}
        # a client with a durable session that acked up to 100; the drain
        # copies its session and cursor to MySQL (about once a second)
        w0, epoch0 = asyncio.run(_session_acks(a.url, "wl.a", 100))
        sid, rtok = w0["session"], w0["resume_token"]
        wait_for_rows(c, f"SELECT owner, HEX(secret) = SHA2('{rtok}', 256) FROM arq_sessions "
                         f"WHERE session = '{sid}'", [["runbook", "1"]],
                      "wloss: the session is in arq_sessions, with its token's digest")
        wait_for_rows(c, f"SELECT `offset` FROM arq_cursors WHERE session = '{sid}'", [["100"]],
                      "wloss: its acked offset is in arq_cursors")
    finally:
        a.kill9()
    shutil.rmtree(c.data)                                 # the disk is gone
    new = os.path.join(c.tmp, "wloss", "newdata")
    rc, r, err = c.rp.json("restore", *c.D(), "--data-dir", new)
    check(rc == 0 and r["built"] and r["records"] == 180 and r["new_epochs"] == 0,
          f"wloss: restore: {rc} {r} {err}")
    check(r and r.get("sessions", 0) >= 1 and r.get("cursors", 0) >= 1,
          f"wloss: restore reports the sessions and cursors it took from MySQL: {r}")
    a = c.start(data=new)
    try:
        # the session resumes on the rebuilt WAL: same session, its
        # subscription back at its acked offset, delivery from 101 on
        w, msgs = asyncio.run(_resume(a.url, sid, rtok, 50))
        check(w.get("resumed") is True and w.get("session") == sid,
              f"wloss: the session resumed on the WAL rebuilt from MySQL: {w}")
        check([(x["stream"], x["acked"], x["epoch"]) for x in w.get("subs", [])] ==
              [("wl.a", 100, epoch0)], f"wloss: its subscription came back: {w.get('subs')}")
        check(msgs == [(i, f"a {i}".encode()) for i in range(101, 151)],
              f"wloss: delivery resumes after the acked offset: "
              f"{[o for o, _ in msgs[:3]]}.. ({len(msgs)})")
        for s, (msgs0, _, ex0) in before.items():
            msgs, gaps, ex = subscribe(a.url, s, 1, len(msgs0), TOKEN)
            check(msgs == msgs0 and not gaps and ex["subok"]["epoch"] == ex0["subok"]["epoch"],
                  f"wloss: {s} delivered the same ({len(msgs)}/{len(msgs0)}), same epoch")
        res = publish(a.url, "wl.a", [b"after"], TOKEN)
        check(res == [(151, False)], f"wloss: publishing continues: {res}")
        a.wait_synced()
        c.verify_ok("wloss", data=new)
    finally:
        a.stop()
    # lag unknown at the time of the loss: --new-epoch
    new2 = os.path.join(c.tmp, "wloss", "newdata2")
    rc, r, err = c.rp.json("restore", *c.D(), "--data-dir", new2, "--new-epoch")
    check(rc == 0 and r["new_epochs"] == 2, f"wloss: restore --new-epoch: {rc} {err}")
    a = c.start(data=new2)
    try:
        old_epoch = before["wl.a"][2]["subok"]["epoch"]
        _, _, ex = subscribe(a.url, "wl.a", 10, 1, TOKEN, epoch=old_epoch)
        check(ex.get("nack", {}).get("code") == 409,
              f"wloss: a subscription with the old epoch gets 409: {ex}")
        # the session comes back, but not its offset on a stream whose
        # offsets may now name other messages: the client resubscribes
        w, _ = asyncio.run(_resume(a.url, sid, rtok, 0))
        check(w.get("resumed") is True and w.get("subs") == [],
              f"wloss: --new-epoch: resumed without the cursor of a new epoch: {w}")
    finally:
        a.stop()


# ---- 6. corrupted record -----------------------------------------------------------------

def corrupt(c):
    a = c.setup("corrupt")
    marker = b"CORRUPT-ME-0042-XYZ"
    try:
        pl = payloads("c", 100)
        pl[41] = b"payload " + marker
        publish(a.url, "co.s", pl, TOKEN)
        a.wait_synced()
    finally:
        a.stop()
    n = flip_bytes(os.path.join(c.data, "data.mdb"), marker)
    check(n >= 1, f"corrupt: flipped {n} copies")
    a = c.start()
    try:
        msgs, _, ex = subscribe(a.url, "co.s", 1, 100, TOKEN, timeout=3)
        check([o for o, _, _ in msgs] == list(range(1, 42)) and
              any(e["code"] == 500 for e in ex.get("errors", [])),
              f"corrupt: the subscriber stops before offset 42 with error 500: "
              f"{len(msgs)} {ex.get('errors')}")
        rc, v, _ = c.rp.json("verify", *c.W(), *c.D())
        probs = [(p["kind"], p["stream"], p["from"], p.get("mysql_copy")) for p in
                 (v["problems"] if v else [])]
        check(rc == 1 and probs == [("corrupt", "co.s", 42, True)],
              f"corrupt: verify names stream and offset: {probs}")
        bk = os.path.join(c.tmp, "corrupt", "evidence")
        check(c.rp.run("backup", *c.W(), bk)[0] == 0, "corrupt: backup of the evidence")
    finally:
        a.stop()
    new = c.data + ".new"
    rc, r, err = c.rp.json("restore", "--from-wal", c.data, *c.D(), "--data-dir", new)
    check(rc == 0 and r["new_epochs"] == 0, f"corrupt: restore --from-wal: {rc} {err}")
    check(r and r.get("sessions", 0) >= 1, f"corrupt: sessions come from the old WAL: {r}")
    os.rename(c.data, c.data + ".corrupt")
    os.rename(new, c.data)
    a = c.start()
    try:
        msgs, gaps, _ = subscribe(a.url, "co.s", 1, 100, TOKEN)
        check([p for _, p, _ in msgs] == pl and not gaps,
              f"corrupt: all 100 delivered after the repair ({len(msgs)})")
        c.verify_ok("corrupt: after the repair")
    finally:
        a.stop()


# ---- 7. consumer replay -------------------------------------------------------------------

def consumer_replay(c):
    a = c.setup("creplay")
    try:
        pl = payloads("r", 80)
        publish(a.url, "cr.s", pl, TOKEN)
        a.wait_synced()
        base = ["republish", "--url", a.url, *c.W(), *c.D(), "cr.s", "--range", "21..60",
                "--to-stream", "cr.s.replay"]
        rc, r, _ = c.rp.json(*base, "--dry-run")
        check(rc == 0 and r["would_publish"] == 40, f"creplay: dry run: {r}")
        env = {"SECRET_KEY": KEY}
        rc1, r1, e1 = c.rp.json(*base, env=env)
        rc2, r2, e2 = c.rp.json(*base, env=env)
        check(rc1 == 0 and r1["published"] == 40 and rc2 == 0 and r2["duplicates"] == 40 and
              r2["published"] == 0, f"creplay: twice publishes once: {r1} {r2} {e1} {e2}")
        msgs, _, _ = subscribe(a.url, "cr.s.replay", "earliest", 100, TOKEN, timeout=3)
        check([p for _, p, _ in msgs] == pl[20:60], f"creplay: the consumer's stream: {len(msgs)}")
    finally:
        a.stop()


# ---- 8. rollback ----------------------------------------------------------------------------

def rollback(c):
    a = c.setup("rollback")
    bk = os.path.join(c.tmp, "rollback", "pre-upgrade")
    try:
        publish(a.url, "rb.s", payloads("v1", 60), TOKEN)
        rc, _, err = c.rp.run("backup", *c.W(), bk)
        check(rc == 0, f"rollback: backup before the upgrade: {err}")
        # the "new release" runs for a while
        publish(a.url, "rb.s", payloads("v2", 40, 61), TOKEN)
        a.wait_synced()
    finally:
        a.stop()
    # it wrote a format the old release cannot read (this build writes 3)
    path = os.path.join(c.data, "data.mdb")
    with open(path, "r+b") as f:
        data = f.read().replace(b"format_version\x03\x00\x00\x00", b"format_version\x04\x00\x00\x00")
        f.seek(0)
        f.write(data)
    try:
        # arqd's early exit on wal_open_failed does not free the parsed
        # DATABASE_URL (programs/arqd.c): keep LeakSanitizer quiet about it
        # in sanitizer builds, so that this test checks the runbook only.
        c.start(env={"ASAN_OPTIONS": "detect_leaks=0"})
        check(False, "rollback: the old arqd should refuse the WAL")
    except RuntimeError:
        pass
    check(grep_log(c.log, r"wal_open_failed.*format version 4"),
          "rollback: the log says wal_open_failed with the format version")
    rc, _, err = c.rp.run("verify", *c.W(), *c.D())
    check(rc == 1 and "format version 4" in err, f"rollback: verify refuses too: {rc} {err}")
    new = c.data + ".rollback"
    rc, r, err = c.rp.json("restore", "--from-wal", bk, *c.D(), "--data-dir", new)
    check(rc == 0 and r["records"] == 100 and r["new_epochs"] == 0,
          f"rollback: restore from the backup and MySQL: {rc} {r and r['streams']} {err}")
    a = c.start(data=new)
    try:
        msgs, gaps, _ = subscribe(a.url, "rb.s", 1, 100, TOKEN)
        check([p for _, p, _ in msgs] == payloads("v1", 60) + payloads("v2", 40, 61),
              f"rollback: every message, from before and after the backup ({len(msgs)})")
        c.verify_ok("rollback", data=new)
    finally:
        a.stop()


# ---- 9. fsync or write error ------------------------------------------------------

async def publish_through_fault(url, trigger, n):
    """A client connected before the device fails publishes n messages
    (msgids late0...) once it does; the answers."""
    out = []
    async with websockets.connect(url, subprotocols=["arq.v1"], close_timeout=2) as ws:
        await ws.send(msgpack.packb({"t": "hello", "token": TOKEN}))
        msgpack.unpackb(await ws.recv(), raw=False)
        open(trigger, "w").close()  # the device starts failing
        for i in range(n):
            await ws.send(msgpack.packb({"t": "pub", "id": i + 1, "stream": "fsync.s",
                                         "payload": f"late {i}".encode(), "msgid": f"late{i}"},
                                        use_bin_type=True))
            while True:
                r = msgpack.unpackb(await asyncio.wait_for(ws.recv(), 10), raw=False)
                if r["t"] in ("puback", "nack") and r["id"] == i + 1:
                    out.append(r)
                    break
    return out


def fsync_error(c):
    shim = os.environ.get("ARQ_FAULT_SHIM")
    if not shim:
        check(False, "fsync: ARQ_FAULT_SHIM is not set (tests/integration/meson.build sets it)")
        return
    trigger = os.path.join(c.tmp, "fsync-fault")
    asan = os.environ.get("ASAN_OPTIONS", "")
    fault_env = {"LD_PRELOAD": shim, "ARQ_FAULT_FILE": trigger,
                 "ASAN_OPTIONS": (asan + ":" if asan else "") + "verify_asan_link_order=0"}
    a = c.setup("fsync", env=fault_env)
    acked = {}
    try:
        res = publish(a.url, "fsync.s", payloads("ok", 30), TOKEN, msgids=[f"k{i}" for i in range(30)])
        acked.update({f"k{i}": o for i, (o, _) in enumerate(res) if o})
        a.wait_synced()
        res = asyncio.run(publish_through_fault(a.url, trigger, 5))
        acked.update({f"late{i}": r["offset"] for i, r in enumerate(res) if r["t"] == "puback"})
        refused = [r for r in res if r["t"] == "nack"]
        check(refused and all(r["code"] == 503 and r["reason"] == "storage stopped"
                              for r in refused),
              f"fsync: publishes refused with 503 storage stopped: {res}")
        code, body = a.http("GET", "/health")  # curl -s $HEALTH
        check(code == 503 and b'"status":"unhealthy"' in body and
              b"wal stopped: fdatasync of the journal: Input/output error" in body,
              f"fsync: /health 503 wal stopped with the cause: {code} {body[:160]}")
        check(a.metric('arq_wal_state{state="failed"}') == 1, "fsync: arq_wal_state failed")
        bk = os.path.join(c.tmp, "fsync-backup")
        os.makedirs(bk)
        rc, _, err = c.rp.run("backup", *c.W(), bk)  # while it still reads
        check(rc == 0, f"fsync: arq-replay backup works while the WAL is stopped: {err}")
    finally:
        rc = a.stop()
    check(rc == 1, f"fsync: arqd exits 1 after the stop: {rc}")
    stops = grep_log(c.log, r"event=wal_stopped")
    check(len(stops) == 1 and "level=error" in stops[0] and
          'reason="fdatasync of the journal: Input/output error"' in stops[0],
          f"fsync: one wal_stopped line at error level with the cause: {stops}")
    check(grep_log(c.log, r"level=error event=stopped exit=1"), "fsync: event=stopped exit=1")
    os.unlink(trigger)  # the device fixed or replaced
    a = c.start()
    try:
        a.wait_synced()
        c.verify_ok("fsync")
        rc, lines, _ = c.rp.lines("dump", *c.W(), "fsync.s")
        got = {x["msgid"]: x["offset"] for x in lines}
        check(all(got.get(m) == o for m, o in acked.items()),
              f"fsync: every acknowledged publish at its offset ({len(acked)})")
    finally:
        a.stop()


INCIDENTS = [("1", broker_crash), ("2", disk_full), ("3", mysql_outage), ("4", mysql_loss),
             ("5", wal_loss), ("6", corrupt), ("7", consumer_replay), ("8", rollback),
             ("9", fsync_error)]


def main():
    tmp = tempfile.mkdtemp(prefix="arq-runbook-", dir="/var/tmp")
    db = MariaDB(MARIADB, os.path.join(tmp, "mdb"))
    c = Ctx(tmp, db, Replay(REPLAY))
    t0 = time.time()
    try:
        for key, fn in INCIDENTS:
            if ONLY and key not in ONLY:
                continue
            t = time.time()
            before = len(failures)
            try:
                fn(c)
            except Exception as e:  # one incident's crash must not hide the others
                check(False, f"{fn.__name__}: {type(e).__name__}: {e}")
            print(f"incident {key} {fn.__name__}: {'ok' if len(failures) == before else 'FAILED'}"
                  f" ({time.time() - t:.1f} s)", flush=True)
            if len(failures) != before and os.path.exists(getattr(c, "log", "")):
                print("arqd log (tail):\n" + "".join(open(c.log).readlines()[-10:]), flush=True)
    finally:
        db.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"took {time.time() - t0:.1f} s", flush=True)
    if failures:
        print(f"{len(failures)} check(s) failed", flush=True)
        sys.exit(1)
    print(f"all {passed[0]} runbook checks passed", flush=True)


main()
