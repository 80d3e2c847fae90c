#!/usr/bin/python3
"""bench/clients/bench_py.py - arq_client (clients/python) as an application
uses it, timed: the Python row of bench/clients.sh (docs/benchmarks.md,
"Client libraries"). bench_js.mjs and bench_libarq.c do the same with the
other two libraries; the three take the same options and print the same JSON.

Usage: bench_py.py --url URL --prefix PREFIX --mode publish|delivery|reconnect
                   [--count N] [--size BYTES] [--window W] [--warmup M]
                   [--cuts K] [--control HOST:PORT] [--server-pid PID]
                   [--timeout SEC]

Modes (streams PREFIX.pub, PREFIX.pub.warm, PREFIX.del, PREFIX.del.warm and
PREFIX.rc, which must be new: offsets 1..N are checked):
- publish: M warm-up publishes to PREFIX.pub.warm (not timed), then N publishes
  of BYTES each to PREFIX.pub, every one with its own msgid, at most W
  waiting for their puback (W defaults to 10000, the max_pending of all three
  libraries: the most a library lets wait). Timed from the first publish to
  the last puback: msgs_per_s = N / seconds.
- delivery: a first client publishes N messages to PREFIX.del and M to
  PREFIX.del.warm, then closes. A second client connects, receives PREFIX.del.warm
  from earliest (not timed), then subscribes to PREFIX.del from earliest with
  a message callback and the library's acking (auto-ack), timed from the
  subscribe call to the N-th message: msgs_per_s = N / seconds. Every offset
  1..N must arrive once, in order, with BYTES of payload.
- reconnect: one client with reconnection, connected through the cut proxy
  (URL is the proxy's), subscribed to PREFIX.rc from latest. K times: publish
  one message and wait for it on the subscription (the subscription is live),
  wait 20 ms, ask the proxy on CONTROL to cut (cut_proxy.py), and take the
  time from the cut (the proxy's CLOCK_MONOTONIC reading) to the state event
  "connected" that follows; the welcome must have resumed the session. Backoff
  1 ms base, 10 ms cap: the defaults (100 ms, 10 s) would add a random wait of
  0..100 ms that measures the random draw, not the library; the 20 ms in the
  connected state restart the libraries' backoff counter (they reset it after
  a connection that lasted the cap). The time is also split at the state
  events in between, each part a median over the cuts: detect (the cut to
  "disconnected": the loss noticed), backoff ("disconnected" to
  "reconnecting": the attempt starts) and handshake ("reconnecting" to
  "connected": TCP, WebSocket upgrade, hello, the resumed welcome handled).

stdout: one JSON line: client, library, mode, count, size, window, seconds,
msgs_per_s, cpu_s (this process's user + system CPU over the timed part),
cpu_us_per_msg, server_cpu (arqd's share of one core over the timed part,
from /proc/PID/stat, with --server-pid; else null); reconnect mode: cuts,
resumed, median_ms, p90_ms (nearest rank), min_ms, max_ms, detect_ms,
backoff_ms, handshake_ms, samples_ms.
Exit: 0; 1 on a failure (message on stderr); 2 usage.
"""
import argparse
import asyncio
import json
import math
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "clients",
                                "python"))
from arq_client import VERSION, ArqError, Client  # noqa: E402


class Failure(Exception):
    pass


def server_cpu_s(pid):
    """arqd's user + system CPU seconds so far, or None."""
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Timed:
    """Wall time, this process's CPU and arqd's CPU over a timed part."""

    def __init__(self, server_pid):
        self.pid = server_pid
        self.t0 = time.monotonic()
        self.c0 = time.process_time()
        self.s0 = server_cpu_s(server_pid)

    def stop(self):
        self.seconds = time.monotonic() - self.t0
        self.cpu = time.process_time() - self.c0
        s1 = server_cpu_s(self.pid)
        self.server = None if self.s0 is None or s1 is None else (s1 - self.s0) / self.seconds


async def publish_n(client, stream, n, data, window, msgid_prefix):
    """n publishes of data to stream, at most window of them waiting for a
    puback; returns once every puback is in. The stream is new: each puback
    must be a new offset in 1..n."""
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    sent = acked = 0
    seen = bytearray(n + 1)  # offsets 1..n, each once

    def on_ack(fut):
        nonlocal acked
        e = fut.exception()  # retrieved even when no longer wanted (after a failure)
        if done.done():
            return
        if e is not None:
            done.set_exception(Failure(f"publish to {stream!r} failed: {e}"))
            return
        a = fut.result()
        if a.dup or not 1 <= a.offset <= n or seen[a.offset]:
            done.set_exception(Failure(f"publish to {stream!r}: offset {a.offset} unexpected or "
                                       f"twice (a new stream has 1..{n})"))
            return
        seen[a.offset] = 1
        acked += 1
        if sent < n:
            send()
        if acked == n:
            done.set_result(None)

    def send():
        nonlocal sent
        fut = client.publish(stream, data, msgid=f"{msgid_prefix}-{sent}")
        sent += 1
        fut.add_done_callback(on_ack)

    if n == 0:
        return
    for _ in range(min(window, n)):
        send()
    await done


async def receive_n(client, stream, n, size, server_pid=None, timed=False):
    """Subscribe to stream from earliest and wait for offsets 1..n, in order.
    With timed, returns the Timed clock run from the subscribe call to the
    n-th message."""
    done = asyncio.get_running_loop().create_future()
    expect = 1
    t = None

    def on_message(m):
        nonlocal expect
        if done.done():
            return
        if m.offset != expect or len(m.payload) != size:
            done.set_exception(Failure(f"{stream!r}: offset {m.offset} ({len(m.payload)} bytes) "
                                       f"where {expect} ({size} bytes) was due"))
            return
        expect += 1
        if expect > n:
            if t is not None:
                t.stop()
            done.set_result(None)

    if timed:
        t = Timed(server_pid)
    client.subscribe(stream, "earliest", on_message=on_message)
    await done
    return t


def rate_result(a, mode, t):
    return {"mode": mode, "count": a.count, "size": a.size, "window": a.window,
            "seconds": round(t.seconds, 6), "msgs_per_s": round(a.count / t.seconds, 1),
            "cpu_s": round(t.cpu, 4), "cpu_us_per_msg": round(t.cpu / a.count * 1e6, 3),
            "server_cpu": None if t.server is None else round(t.server, 3)}


async def mode_publish(a, data):
    async with Client(a.url) as c:
        await publish_n(c, f"{a.prefix}.pub.warm", a.warmup, data, a.window, f"{a.prefix}-pw")
        t = Timed(a.server_pid)
        await publish_n(c, f"{a.prefix}.pub", a.count, data, a.window, f"{a.prefix}-p")
        t.stop()
    return rate_result(a, "publish", t)


async def mode_delivery(a, data):
    async with Client(a.url) as c:
        await publish_n(c, f"{a.prefix}.del", a.count, data, a.window, f"{a.prefix}-d")
        await publish_n(c, f"{a.prefix}.del.warm", a.warmup, data, a.window, f"{a.prefix}-dw")
    async with Client(a.url) as c:
        if a.warmup:
            await receive_n(c, f"{a.prefix}.del.warm", a.warmup, a.size)
        t = await receive_n(c, f"{a.prefix}.del", a.count, a.size, a.server_pid, timed=True)
    return rate_result(a, "delivery", t)


def percentile(sorted_xs, p):
    """Nearest rank: the smallest sample with at least p% of them at or below it."""
    return sorted_xs[max(0, math.ceil(p / 100 * len(sorted_xs)) - 1)]


def median(sorted_xs):
    n = len(sorted_xs)
    return sorted_xs[n // 2] if n % 2 else (sorted_xs[n // 2 - 1] + sorted_xs[n // 2]) / 2


def reconnect_result(a, samples_ns, parts_ns, resumed):
    ms = sorted(x / 1e6 for x in samples_ns)
    return {"mode": "reconnect", "cuts": a.cuts, "size": a.size, "resumed": resumed,
            "median_ms": round(median(ms), 3), "p90_ms": round(percentile(ms, 90), 3),
            "min_ms": round(ms[0], 3), "max_ms": round(ms[-1], 3),
            **{f"{k}_ms": round(median(sorted(v)) / 1e6, 3) for k, v in parts_ns.items()},
            "samples_ms": [round(x / 1e6, 3) for x in samples_ns]}


async def mode_reconnect(a, data):
    if a.control is None:
        raise Failure("--mode reconnect needs --control HOST:PORT (the cut proxy)")
    host, _, port = a.control.rpartition(":")
    ctl_r, ctl_w = await asyncio.open_connection(host, int(port))
    closing = False
    connected = {"n": 0, "t": 0}
    seen = {}  # state -> monotonic_ns() of its last event
    changed = asyncio.Event()
    got = {"n": 0}
    arrived = asyncio.Event()

    def on_state(old, new, err):
        seen[new] = time.monotonic_ns()
        if new == "connected":
            connected["t"] = time.monotonic_ns()
            connected["n"] += 1
            changed.set()
        elif new in ("failed", "closed") and not closing:
            changed.set()

    def on_message(m):
        got["n"] += 1
        arrived.set()

    c = Client(a.url, backoff_base=0.001, backoff_cap=0.01)
    c.on("state", on_state)
    samples = []
    parts = {"detect": [], "backoff": [], "handshake": []}
    try:
        await c.connect()
        sub = c.subscribe(f"{a.prefix}.rc", "latest", on_message=on_message)
        await sub.ready
        for i in range(a.cuts):
            # the subscription is live on this connection: a publish comes back through it
            want = got["n"] + 1
            await c.publish(f"{a.prefix}.rc", data, msgid=f"{a.prefix}-r-{i}")
            while got["n"] < want:
                arrived.clear()
                await arrived.wait()
            await asyncio.sleep(0.02)
            before, resumed = connected["n"], c.stats.resumed
            ctl_w.write(b"cut\n")
            line = (await ctl_r.readline()).split()
            if len(line) != 3 or line[0] != b"cut" or int(line[2]) < 1:
                raise Failure(f"cut proxy answered {line!r} (no connection to cut?)")
            t_cut = int(line[1])
            while connected["n"] == before:
                if c.state in ("failed", "closed"):
                    raise Failure(f"client {c.state} after cut {i + 1}")
                changed.clear()
                await changed.wait()
            samples.append(connected["t"] - t_cut)
            parts["detect"].append(seen["disconnected"] - t_cut)
            parts["backoff"].append(seen["reconnecting"] - seen["disconnected"])
            parts["handshake"].append(connected["t"] - seen["reconnecting"])
            if c.stats.resumed != resumed + 1:
                raise Failure(f"cut {i + 1}: the welcome did not resume the session")
        want = got["n"] + 1  # and once more after the last cut
        await c.publish(f"{a.prefix}.rc", data, msgid=f"{a.prefix}-r-{a.cuts}")
        while got["n"] < want:
            arrived.clear()
            await arrived.wait()
        resumed = c.stats.resumed
    finally:
        closing = True
        await c.close()
        ctl_w.close()
    return reconnect_result(a, samples, parts, resumed)


def parse_args():
    p = argparse.ArgumentParser(description="arq_client benchmark driver (docs/benchmarks.md)")
    p.add_argument("--url", required=True)
    p.add_argument("--prefix", required=True)
    p.add_argument("--mode", required=True, choices=("publish", "delivery", "reconnect"))
    p.add_argument("--count", type=int, default=20000)
    p.add_argument("--size", type=int, default=100)
    p.add_argument("--window", type=int, default=10000)
    p.add_argument("--warmup", type=int, default=1000)
    p.add_argument("--cuts", type=int, default=20)
    p.add_argument("--control")
    p.add_argument("--server-pid", type=int)
    p.add_argument("--timeout", type=float, default=120)
    a = p.parse_args()
    if a.count < 1 or a.size < 0 or a.window < 1 or a.warmup < 0 or a.cuts < 1 or a.timeout <= 0:
        p.error("--count, --window, --cuts >= 1; --size, --warmup >= 0; --timeout > 0")
    return a


async def main():
    a = parse_args()
    data = b"x" * a.size
    run = {"publish": mode_publish, "delivery": mode_delivery, "reconnect": mode_reconnect}[a.mode]
    try:
        r = await asyncio.wait_for(run(a, data), a.timeout)
    except asyncio.TimeoutError:
        print(f"bench_py: {a.mode} not done within {a.timeout} s", file=sys.stderr)
        return 1
    except (Failure, ArqError, OSError) as e:
        print(f"bench_py: {a.mode}: {e}", file=sys.stderr)
        return 1
    print(json.dumps({"client": "python", "library": f"arq_client {VERSION}", **r}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
