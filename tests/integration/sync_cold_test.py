#!/usr/bin/python3
"""The cold tier: with aggressive WAL retention (records older than 1 s and
already in MySQL are dropped), a subscriber from offset 1 receives every
message, in order, once, with no gap - the old ones served from MySQL, then
the WAL, then live. A MariaDB stopped in the middle of a cold read only
delays delivery. Against a real MariaDB (scripts/mariadb).

Usage: sync_cold_test.py ARQD MARIADB_SCRIPT
"""
import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import msgpack
import websockets

ARQD, MARIADB = sys.argv[1:3]
N_OLD = 3000
failures = []


def check(cond, what):
    if not cond:
        failures.append(what)
        print(f"FAIL: {what}", flush=True)
    return cond


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def http(port, method, path, body=None):
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method, data=body)
    with urllib.request.urlopen(req, timeout=10) as r:
        return r.status, r.read()


async def publish_many(url, stream, n, start):
    async with websockets.connect(url, subprotocols=["arq.v1"], max_size=None) as ws:
        await ws.send(msgpack.packb({"t": "hello"}))
        msgpack.unpackb(await ws.recv())
        pending = 0
        for i in range(n):
            await ws.send(msgpack.packb({"t": "pub", "id": i + 1, "stream": stream,
                                         "payload": f"m{start + i}".encode(),
                                         "msgid": f"{stream}-{start + i}"}, use_bin_type=True))
            pending += 1
            while pending >= 64 or (i == n - 1 and pending):
                r = msgpack.unpackb(await ws.recv(), raw=False)
                if r["t"] == "puback":
                    pending -= 1
                elif r["t"] == "nack":
                    raise SystemExit(f"nack: {r}")


async def read_all(url, stream, want, stop_db=None):
    """Subscribe from offset 1 and read `want` messages, acking as we go."""
    got, gaps = [], []
    async with websockets.connect(url, subprotocols=["arq.v1"], max_size=None) as ws:
        await ws.send(msgpack.packb({"t": "hello"}))
        msgpack.unpackb(await ws.recv())
        await ws.send(msgpack.packb({"t": "sub", "id": 1, "stream": stream, "from": 1}))
        stopped = False
        while len(got) < want:
            m = msgpack.unpackb(await asyncio.wait_for(ws.recv(), 60), raw=False)
            if m["t"] == "gap":
                gaps.append(m)
            elif m["t"] == "msg":
                got.append((m["offset"], bytes(m["payload"])))
                await ws.send(msgpack.packb({"t": "ack", "stream": stream,
                                             "offset": m["offset"]}))
                if stop_db and not stopped and len(got) == 500:
                    # MariaDB unreachable in the middle of the cold reads
                    stopped = True
                    stop_db()
    return got, gaps


def main():
    tmp = tempfile.mkdtemp(prefix="arq-cold-", dir="/var/tmp")
    mdb = os.path.join(tmp, "mdb")
    out = subprocess.run([MARIADB, "start", mdb], check=True, capture_output=True,
                         text=True).stdout
    url = out.strip().split("DATABASE_URL=", 1)[1] + "?connect_timeout=1&read_timeout=2"
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("SECRET_KEY", "API_PORT")}
    env["DATABASE_URL"] = url
    log = open(os.path.join(tmp, "arqd.log"), "w")
    proc = subprocess.Popen([ARQD, "--port", str(port), "--data-dir", os.path.join(tmp, "data"),
                             "--anonymous", "--set", "wal.retain_age_s=1",
                             "--set", "wal.retain_every_ms=100"],
                            stdout=subprocess.PIPE, stderr=log, text=True, env=env)
    line = proc.stdout.readline()
    ws_url = f"ws://127.0.0.1:{port}/ws"
    try:
        check("listening on" in line, f"arqd started: {line!r}")
        asyncio.run(publish_many(ws_url, "cold.s", N_OLD, 1))
        # wait until the old records are in MySQL and out of the WAL
        deadline = time.time() + 60
        h = {}
        while time.time() < deadline:
            h = json.loads(http(port, "GET", "/health")[1])
            if h["sync"]["lag_records"] == 0 and h["wal"]["first_seq"] > N_OLD // 2:
                break
            time.sleep(0.2)
        check(h["wal"]["first_seq"] > N_OLD // 2, f"retention dropped the old records: {h}")
        # a few more, still in the WAL
        asyncio.run(publish_many(ws_url, "cold.s", 200, N_OLD + 1))
        total = N_OLD + 200

        pid = int(open(os.path.join(mdb, "mariadbd.pid")).read())

        def stop_db():
            os.kill(pid, signal.SIGSTOP)
            # continue it a moment later, from another thread of the loop
            asyncio.get_running_loop().call_later(1.5, os.kill, pid, signal.SIGCONT)

        got, gaps = asyncio.run(read_all(ws_url, "cold.s", total, stop_db))
        check(not gaps, f"gap reports: {gaps[:3]}")
        check([o for o, _ in got] == list(range(1, total + 1)),
              f"offsets 1..{total} in order, once (got {len(got)}, first {got[:3]})")
        check([p for _, p in got] == [f"m{i}".encode() for i in range(1, total + 1)],
              "payloads as published")
        metrics = http(port, "GET", "/metrics")[1].decode()
        cold = [ln for ln in metrics.splitlines() if ln.startswith("arq_cold_records_total")]
        check(cold and int(cold[0].split()[1]) >= N_OLD // 2, f"served from MySQL: {cold}")
        errs = [ln for ln in metrics.splitlines() if ln.startswith("arq_cold_errors_total")]
        print(f"delivered {len(got)}; {cold[0] if cold else ''}; {errs[0] if errs else ''}",
              flush=True)
        # and live after the catch-up
        proc.send_signal(signal.SIGTERM)
        check(proc.wait(timeout=30) == 0, "arqd exit status")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        try:
            os.kill(int(open(os.path.join(mdb, "mariadbd.pid")).read()), signal.SIGCONT)
        except (OSError, ValueError):
            pass
        subprocess.run([MARIADB, "stop", mdb], check=False)
        log.close()
        if failures:
            print("arqd log (tail):\n" + "".join(open(os.path.join(tmp, "arqd.log")).readlines()[-20:]))
        shutil.rmtree(tmp, ignore_errors=True)
    if failures:
        print(f"{len(failures)} check(s) failed", flush=True)
        sys.exit(1)
    print("all cold tier checks passed", flush=True)


main()
