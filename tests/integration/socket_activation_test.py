#!/usr/bin/python3
"""Zero-downtime restarts through socket activation (issue #18).

Usage: socket_activation_test.py PATH_TO_ARQD PATH_TO_ARQ

This test plays systemd's part (systemd is not PID 1 here): it binds and
listens on 127.0.0.1 (a free port) itself and hands the socket to each arqd it
starts as fd 3 with LISTEN_FDS=1 and LISTEN_PID set to that arqd's PID, as
systemd does for arqd.socket. Then it restarts arqd several times (SIGTERM,
wait for the exit, start the next one on the same socket and data directory)
while
  - `arq pub -` publishes a line at a time (libarq reconnects, resumes, and
    re-sends unacknowledged publishes with their msgid),
  - a WebSocket subscriber sees each restart as close 1001,
  - a prober opens TCP connections and asks /health the whole time.
It asserts that every publish `arq pub -` acknowledged is in the stream
exactly once with the offset it printed, every line is acknowledged, the
subscriber saw 1001, and no connection attempt was refused (the backlog
holds them while no arqd runs). No timing thresholds.
"""
import asyncio
import os
import re
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
RESTARTS = 4
LINES = 400
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from harness import failures  # noqa: E402

CLEAN = ("SECRET_KEY", "DATABASE_URL", "API_PORT", "API_HOST", "ARQ_ORIGINS", "ARQ_API_KEY",
         "ARQ_ANONYMOUS", "ARQ_CONFIG", "NOTIFY_SOCKET", "LISTEN_FDS", "LISTEN_PID",
         "LISTEN_FDNAMES", "ARQ_URL", "ARQ_TOKEN")


def check(cond, what):
    return harness.check(cond, what, verbose=True)


def start_arqd(lsock, data, log):
    """arqd with lsock as its fd 3, as systemd's socket activation passes it."""
    lfd = lsock.fileno()

    def child():
        if lfd != 3:
            os.dup2(lfd, 3)  # the copy is inheritable
        else:
            os.set_inheritable(3, True)  # Python's sockets are close-on-exec
        for k in CLEAN:
            os.environ.pop(k, None)
        os.environ["LISTEN_FDS"] = "1"
        os.environ["LISTEN_PID"] = str(os.getpid())

    return subprocess.Popen([ARQD, "--anonymous", "--data-dir", data, "--port", "1"],
                            stdout=subprocess.PIPE, stderr=log, text=True, close_fds=False,
                            preexec_fn=child)


class Prober(threading.Thread):
    """TCP connects and GET /health in a loop until stopped."""

    def __init__(self, port):
        super().__init__(daemon=True)
        self.port = port
        self.stop = threading.Event()
        self.ok = 0
        self.refused = 0
        self.other = []

    def run(self):
        while not self.stop.is_set():
            try:
                s = socket.create_connection(("127.0.0.1", self.port), timeout=60)
                s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                data = b""
                while True:
                    c = s.recv(4096)
                    if not c:
                        break
                    data += c
                s.close()
                if data.startswith(b"HTTP/1.1 200"):
                    self.ok += 1
                else:
                    self.other.append(data[:40])
            except ConnectionRefusedError:
                self.refused += 1
            except OSError as e:  # e.g. reset by the draining arqd
                self.other.append(repr(e))
            time.sleep(0.005)


async def subscriber(port, closes, stop):
    """Connects, and reconnects after each close, recording close codes."""
    while not stop.is_set():
        try:
            async with websockets.connect(f"ws://127.0.0.1:{port}/ws", subprotocols=["arq.v1"],
                                          close_timeout=2) as ws:
                await ws.send(msgpack.packb({"t": "hello"}))
                await ws.recv()
                while True:
                    await ws.recv()
        except websockets.ConnectionClosed as e:
            closes.append(e.code)
        except Exception as e:  # a handshake cut by a draining arqd, a refusal
            closes.append(repr(e))
        await asyncio.sleep(0.05)


def drive(pub, a, lsock, data, log, procs, per_phase):
    """Feed `arq pub -` and restart arqd between phases; returns lines sent."""
    sent = 0
    for r in range(RESTARTS + 1):
        for _ in range(per_phase):
            pub.stdin.write(f"line-{sent}\n")
            pub.stdin.flush()
            sent += 1
            time.sleep(0.002)
        if r == RESTARTS:
            break
        a.send_signal(signal.SIGTERM)
        # lines written while no arqd runs wait in libarq, then go out
        for _ in range(10):
            pub.stdin.write(f"line-{sent}\n")
            pub.stdin.flush()
            sent += 1
        rc = a.wait(timeout=60)
        check(rc == 0, f"restart {r + 1}: the old arqd drained and exited 0 ({rc})")
        a = start_arqd(lsock, data, log)
        procs.append(a)
        a.stdout.readline()
    return sent


def main():
    tmp = tempfile.mkdtemp(prefix="arq-sockact-", dir="/var/tmp")
    data = os.path.join(tmp, "data")
    lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(4096)
    port = lsock.getsockname()[1]
    log = open(os.path.join(tmp, "arqd.log"), "w")
    procs = []
    closes = []
    stop_sub = threading.Event()
    loop = asyncio.new_event_loop()
    sub_thread = threading.Thread(target=lambda: loop.run_until_complete(
        subscriber(port, closes, stop_sub)), daemon=True)
    prober = Prober(port)
    pub = None
    try:
        a = start_arqd(lsock, data, log)
        procs.append(a)
        line = a.stdout.readline()
        check(f"127.0.0.1:{port}/ws" in line,
              f"arqd took the inherited socket (the --port 1 flag is ignored): {line!r}")
        prober.start()
        sub_thread.start()
        pub = subprocess.Popen([ARQ, "--url", f"ws://127.0.0.1:{port}/ws", "pub", "sa.s", "-",
                                "--msgid-prefix", "sa-"],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
        per_phase = LINES // (RESTARTS + 1)
        sent = 0
        try:
            sent = drive(pub, a, lsock, data, log, procs, per_phase)
        except BrokenPipeError:
            pub.wait(timeout=30)
            check(False, f"arq pub - ended early ({pub.returncode}): {pub.stderr.read()[-800:]!r}")
            return
        pub.stdin.close()
        out = pub.stdout.read()
        err = pub.stderr.read()
        pub.wait(timeout=120)
        check(pub.returncode == 0, f"arq pub - exits 0: {pub.returncode} {err[-500:]!r}")
        offsets = [int(x) for x in out.split()]
        check(len(offsets) == sent, f"every line acknowledged: {len(offsets)} of {sent}")
        # the stream holds each line exactly once, at the offset printed for it
        got = asyncio.run(read_all(port, sent))
        payloads = [p for _, p in got]
        check(len(payloads) == len(set(payloads)) == sent,
              f"each publish stored once: {len(payloads)} stored, {len(set(payloads))} distinct")
        want = {f"line-{i}".encode(): off for i, off in enumerate(offsets)}
        check(all(want.get(p) == o for o, p in got),
              "every printed offset names its line in the stream")
        prober.stop.set()
        prober.join(timeout=70)
        check(prober.ok > 0 and prober.refused == 0,
              f"no connection refused across {RESTARTS} restarts "
              f"({prober.ok} /health answered, {prober.refused} refused, other: {prober.other[:3]})")
        stop_sub.set()
        n1001 = closes.count(1001)
        check(n1001 >= RESTARTS, f"the subscriber saw close 1001 at each restart: {closes}")
        check(not any(isinstance(c, str) and "Refused" in c for c in closes),
              f"the subscriber's reconnects were never refused: {closes}")
    finally:
        stop_sub.set()
        prober.stop.set()
        if pub and pub.poll() is None:
            pub.kill()
            pub.wait()
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        lsock.close()
        log.close()
        text = open(os.path.join(tmp, "arqd.log"), errors="replace").read()
        check(not re.search(r"ERROR: (Address|Leak)Sanitizer|runtime error:", text),
              "no sanitizer report")
        check(text.count("event=socket_activated") == RESTARTS + 1,
              "each arqd says it was socket-activated")
        if failures:
            print("arqd log (tail):\n" + "".join(text.splitlines(True)[-30:]))
        shutil.rmtree(tmp, ignore_errors=True)


async def read_all(port, n):
    got = []
    async with websockets.connect(f"ws://127.0.0.1:{port}/ws", subprotocols=["arq.v1"],
                                  max_size=None) as ws:
        await ws.send(msgpack.packb({"t": "hello"}))
        await ws.recv()
        await ws.send(msgpack.packb({"t": "sub", "id": 1, "stream": "sa.s", "from": "earliest"}))
        deadline = time.time() + 60
        while len(got) < n + 1 and time.time() < deadline:
            try:
                m = msgpack.unpackb(await asyncio.wait_for(ws.recv(), 2), raw=False)
            except asyncio.TimeoutError:
                break  # nothing more (n + 1 would be a duplicate)
            if m["t"] == "msg":
                got.append((m["offset"], bytes(m["payload"])))
                await ws.send(msgpack.packb({"t": "ack", "stream": "sa.s", "offset": m["offset"]}))
    return got


main()
if failures:
    print(f"{len(failures)} check(s) failed")
    sys.exit(1)
print("all checks passed")
