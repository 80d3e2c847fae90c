#!/usr/bin/python3
"""Storage full on a real, small filesystem (issue #16): a loop-mounted ext4
image made here, as root (skipped, exit 77, where that is not possible).

Usage: storage_full_test.py ARQD ARQ ARQ_REPLAY

1. The disk fills while `arq pub -` publishes through a proxy that cuts its
   connections: publishes are refused with 503 "storage full" (never "storage
   stopped"), /health is 200 "degraded" with the reason, arq_wal_state says
   full, the server API answers 503, a new WebSocket client gets a session
   marked "durable": false and is still served; once room returns, arqd goes
   on by itself (no restart), the CLI finishes, and every line it printed
   names the offset that holds that line, each line stored exactly once.
2. arqd killed (-9) with acknowledged batches only in its journal, the disk
   filled completely, arqd started again: it starts, serves every message,
   and refuses publishes with 503 "storage full" once the map has no room.
"""
import asyncio
import json
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
from arq_replay_util import Arqd, Replay, check, failures, grep_log, passed  # noqa: E402
from chaos_proxy import ChaosProxy  # noqa: E402

ARQD, ARQ, REPLAY = sys.argv[1:4]
SKIP = 77
FS_MB = 256
LINE = 3000  # payload bytes per line
FLAGS = ("--set", "wal.journal_max=2M", "--set", "wal.map_size_max=1G")


def sh(*cmd):
    return subprocess.run(cmd, capture_output=True, text=True)


def free_bytes(path):
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def fill(path, leave):
    """A file that leaves about `leave` bytes free on path's filesystem (the
    last MiB may not be allocatable: the file's own metadata needs blocks)."""
    with open(path, "ab") as f:
        n = free_bytes(os.path.dirname(path)) - leave
        while n > 0:
            try:
                os.posix_fallocate(f.fileno(), os.fstat(f.fileno()).st_size, n)
                return
            except OSError:
                n -= 1 << 20


def lines(prefix, n):
    return [f"{prefix}-{i:06d}-".encode() + b"x" * LINE for i in range(n)]


def cli_err(out_path):
    with open(out_path + ".err") as f:
        return f.read()[-400:]


def run_pub(url, stream, data, out_path, *extra):
    """`arq pub STREAM -` in the background; stdin from a file."""
    src = out_path + ".in"
    with open(src, "wb") as f:
        f.write(b"\n".join(data) + b"\n")
    return subprocess.Popen([ARQ, "--url", url, *extra, "pub", stream, "-"],
                            stdin=open(src, "rb"), stdout=open(out_path, "w"),
                            stderr=open(out_path + ".err", "w"))


def wait_health(a, pred, timeout=60):
    deadline = time.time() + timeout
    h = None
    while time.time() < deadline:
        h = a.health()
        if h and pred(h):
            return h
        time.sleep(0.1)
    return h


def stored(rp, data, stream):
    rc, recs, err = rp.lines("dump", "--data-dir", data, stream)
    check(rc == 0, f"arq-replay dump {stream}: exit {rc} {err[-300:]}")
    return {r["offset"]: r["payload"].encode() for r in recs}


def check_printed(what, data_lines, printed_path, have):
    printed = [int(x) for x in open(printed_path).read().split()]
    check(len(printed) == len(data_lines),
          f"{what}: the CLI printed {len(printed)} offsets for {len(data_lines)} lines")
    wrong = [(i, o) for i, o in enumerate(printed) if have.get(o) != data_lines[i]]
    check(not wrong, f"{what}: every printed offset holds its line ({len(wrong)} do not: "
                     f"{wrong[:3]})")
    check(sorted(have.values()) == sorted(data_lines),
          f"{what}: each line stored exactly once ({len(have)} records)")
    check(sorted(have) == list(range(1, len(have) + 1)), f"{what}: offsets contiguous")


async def ws_checks(url):
    """A new client while storage is full: its session is not stored, it is
    still served, and its publish is refused with 503 storage full."""
    async with websockets.connect(url, subprotocols=["arq.v1"], max_size=None,
                                  close_timeout=2) as ws:
        await ws.send(msgpack.packb({"t": "hello"}))
        w = msgpack.unpackb(await ws.recv(), raw=False)
        await ws.send(msgpack.packb({"t": "sub", "id": 1, "stream": "warm", "from": "earliest"}))
        got = None
        while got is None:
            m = msgpack.unpackb(await asyncio.wait_for(ws.recv(), 10), raw=False)
            if m["t"] == "msg":
                got = m
        big = b"y" * 900000
        nack = None
        for i in range(20):  # the map may still take a few small writes
            await ws.send(msgpack.packb({"t": "pub", "id": 10 + i, "stream": "ws.s",
                                         "payload": big}, use_bin_type=True))
            while True:
                r = msgpack.unpackb(await asyncio.wait_for(ws.recv(), 10), raw=False)
                if r["t"] in ("puback", "nack") and r.get("id") == 10 + i:
                    break
            if r["t"] == "nack":
                nack = r
                break
        return w, got, nack


def api_publish_refused(a, tries=20):
    """POST /api/publish of 900 KB until refused (the map may have room
    left): the refusal (or the last answer)."""
    body = json.dumps({"stream": "api.s", "payload": "z" * 900000}).encode()
    for _ in range(tries):
        code, out = a.http("POST", "/api/publish", body, {"Content-Type": "application/json"})
        if code != 200:
            return code, out
    return code, out


def scenario_fill_and_resume(tmp, mnt, rp):
    data = os.path.join(mnt, "data")
    log = os.path.join(tmp, "arqd-1.log")
    a = Arqd(ARQD, data, log, extra=FLAGS)
    proxy = ChaosProxy("127.0.0.1", a.port, seed=16)
    proxy.start()
    stop_cuts = threading.Event()
    filler = os.path.join(mnt, "filler")
    try:
        # The map starts with 64 MiB of blocks; the disk is then filled to
        # 4 MiB free, so that main (~90 MiB of pages) meets a full disk once
        # the map must grow; without the filler it fits.
        warm = lines("warm", 200)
        p = run_pub(a.url, "warm", warm, os.path.join(tmp, "warm.out"))
        check(p.wait(120) == 0, f"warm-up publish exits 0 {cli_err(os.path.join(tmp, 'warm.out'))}")
        fill(filler, 4 << 20)

        main = lines("main", 22000)
        cli = run_pub(proxy.url, "main", main, os.path.join(tmp, "main.out"), "--retries", "0")

        def cuts():
            while not stop_cuts.wait(0.3):
                proxy.cut_random(1, kind="rst")
        th = threading.Thread(target=cuts, daemon=True)
        th.start()

        h = wait_health(a, lambda h: h["wal"]["state"] == "full")
        check(h and h["status"] == "degraded" and "no space left" in h["wal"].get("reason", ""),
              f"full: /health degraded with the reason: {h}")
        code, body = a.http("GET", "/health")
        check(code == 200, f"full: /health answers 200 while degraded: {code}")
        check(a.metric('arq_wal_state{state="full"}') == 1, "full: arq_wal_state{state=full} 1")
        check(a.metric('arq_wal_state{state="failed"}') == 0, "full: not failed")
        code, out = api_publish_refused(a)
        check(code == 503 and b"storage full" in out,
              f"full: POST /api/publish 503 storage full: {code} {out[:100]}")
        w, msg, nack = asyncio.run(ws_checks(a.url))
        check(w.get("t") == "welcome" and w.get("durable") is False,
              f"full: a new session is not stored and says so: {w}")
        check(msg and msg["offset"] == 1 and bytes(msg["payload"]) == warm[0],
              "full: a new subscriber is served")
        check(nack and nack["code"] == 503 and nack["reason"] == "storage full",
              f"full: a publish gets nack 503 storage full: {nack}")
        check(cli.poll() is None, "full: the CLI waits (retries), it has not given up")

        os.unlink(filler)  # room again
        try:
            rc = cli.wait(120)
        except subprocess.TimeoutExpired:
            cli.kill()
            rc = "timeout"
        stop_cuts.set()
        th.join(5)
        check(rc == 0, f"the CLI finished once there was room: exit {rc} "
                       f"{cli_err(os.path.join(tmp, 'main.out'))}")
        check(proxy.stats()["cuts"] > 0, f"connections were cut: {proxy.stats()}")
        h = wait_health(a, lambda h: h["status"] == "healthy", timeout=20)
        check(h and h["wal"]["state"] == "ok", f"room again: /health healthy by itself: {h}")
        check_printed("full", main, os.path.join(tmp, "main.out"), stored(rp, data, "main"))
        check(len(stored(rp, data, "warm")) == len(warm), "warm-up stream intact")
    finally:
        stop_cuts.set()
        proxy.stop()
        rc = a.stop()
        if os.path.exists(filler):
            os.unlink(filler)
    check(rc == 0, f"arqd exits 0 after storage full (nothing failed): {rc}")
    check(grep_log(log, r"event=storage_full .*no space left"), "log: storage_full with the reason")
    check(grep_log(log, r"event=storage_available"), "log: storage_available")
    check(not grep_log(log, r"wal_stopped|level=error"), "log: no stop, no error")


def scenario_restart_full(tmp, mnt, rp):
    data = os.path.join(mnt, "data")
    log = os.path.join(tmp, "arqd-2.log")
    # Folds only after 1 s of quiet: the kill leaves acknowledged batches in
    # the journal alone.
    a = Arqd(ARQD, data, log, extra=FLAGS + ("--set", "wal.apply_us=1000000", "--set",
                                             "wal.apply_idle_us=1000000"))
    tail = lines("tail", 300)
    p = run_pub(a.url, "tail", tail, os.path.join(tmp, "tail.out"))
    check(p.wait(60) == 0, f"tail publish exits 0: {cli_err(os.path.join(tmp, 'tail.out'))}")
    a.kill9()
    filler = os.path.join(mnt, "filler2")
    fill(filler, 0)
    try:
        check(free_bytes(mnt) < (1 << 20), f"the disk is full: {free_bytes(mnt)} bytes free")
        try:
            a = Arqd(ARQD, data, log, extra=FLAGS)
        except RuntimeError as e:
            check(False, f"restart on a full disk: {e}: {open(log).read()[-500:]}")
            return
        try:
            h = a.health()
            check(h and h["status"] in ("healthy", "degraded"), f"restart full: /health {h}")
            check_printed("restart full", tail, os.path.join(tmp, "tail.out"),
                          stored(rp, data, "tail"))
            # what the map's blocks still hold is taken, then refused
            code, out = api_publish_refused(a, tries=400)
            check(code == 503 and b"storage full" in out,
                  f"restart full: publishes refused 503 storage full: {code} {out[:100]}")
            h = a.health()
            check(h and h["status"] == "degraded", f"restart full: /health degraded: {h}")
        finally:
            rc = a.stop()
        check(rc == 0, f"restart full: arqd exits 0: {rc}")
        check(not grep_log(log, r"wal_open_failed|wal_stopped"), "restart full: no open failure")
    finally:
        os.unlink(filler)


def main():
    if os.geteuid() != 0:
        print("SKIP: loop-mounting a small filesystem needs root")
        sys.exit(SKIP)
    tmp = tempfile.mkdtemp(prefix="arq-full-", dir="/var/tmp")
    img, mnt = os.path.join(tmp, "fs.img"), os.path.join(tmp, "mnt")
    os.makedirs(mnt)
    with open(img, "wb") as f:
        f.truncate(FS_MB << 20)
    r = sh("mkfs.ext4", "-q", "-F", "-m", "0", img)
    if r.returncode == 0:
        r = sh("mount", "-o", "loop", img, mnt)
    if r.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        print(f"SKIP: cannot make and loop-mount an ext4 image here: {r.stderr.strip()}")
        sys.exit(SKIP)
    t0 = time.time()
    rp = Replay(REPLAY)
    try:
        for fn in (scenario_fill_and_resume, scenario_restart_full):
            t = time.time()
            before = len(failures)
            try:
                fn(tmp, mnt, rp)
            except Exception as e:  # one scenario's crash must not hide the other
                check(False, f"{fn.__name__}: {type(e).__name__}: {e}")
            print(f"{fn.__name__}: {'ok' if len(failures) == before else 'FAILED'} "
                  f"({time.time() - t:.1f} s)", flush=True)
    finally:
        if os.environ.get("ARQ_KEEP"):
            print(f"kept {tmp}")
            sys.exit(1)
        sh("umount", "-l", mnt)
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"took {time.time() - t0:.1f} s", flush=True)
    if failures:
        print(f"{len(failures)} check(s) failed", flush=True)
        sys.exit(1)
    print(f"all {passed[0]} storage checks passed", flush=True)


main()
