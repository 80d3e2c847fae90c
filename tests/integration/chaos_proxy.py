"""A TCP proxy that breaks connections on request, for the fault-injection
tests (issue #4). Standard library only.

    proxy = ChaosProxy("127.0.0.1", arqd_port, seed=1)
    proxy.start()                 # its own thread and asyncio loop
    url = proxy.url               # ws://127.0.0.1:PORT/ws, give it to clients
    proxy.cut_random(3)           # break 3 live connections, chosen at random
    proxy.cut_all()               # break every live connection at once
    proxy.stats()                 # counts: accepted, live, cuts, cuts by kind
    proxy.stop()

Each accepted client connection gets its own upstream connection; bytes are
forwarded both ways unchanged (half-closes included). A cut is one of:

- "rst":  both sides closed with SO_LINGER 0, so each peer gets a RST;
- "fin":  both sides closed plainly (a FIN, no close handshake);
- "mixed": one side RST, the other FIN;
- "blackhole": nothing is forwarded any more, silently, and nothing is
  closed: the peers find out only by their own heartbeats (ping/pong), as
  behind a dead router. What they send is read and dropped. The proxy
  closes both sockets `blackhole_s` seconds later (a random duration in that
  range), whatever the peers did meanwhile;
- "stall": the same, except that the proxy stops reading as well, so what
  the peers send piles up in their socket buffers (writes eventually block,
  as towards a host that vanished).

A connection accepted while the upstream cannot be reached (arqd down) is
closed with a RST; that is not counted as a cut.

Also here, for the replay_*_test.py scripts: ArqChaos (runs the arq-chaos
checker, tests/tools/arq_chaos.c) and check_streams (reads its streams back
from arqd with python-websockets + msgpack, imported only there, and checks
what the WAL holds).
"""
import asyncio
import json
import os
import random
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time

KINDS = ("rst", "fin", "mixed", "blackhole", "stall")


def _close(transport, rst):
    """Close abruptly: drop whatever the transport has buffered; with rst,
    SO_LINGER 0 makes the kernel send a RST instead of a FIN."""
    if transport is None or transport.is_closing():
        return
    if rst:
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except OSError:
                pass
    transport.abort()


class _Side(asyncio.Protocol):
    def __init__(self, pair, name):
        self.pair = pair
        self.name = name  # "client" or "upstream"
        self.transport = None

    def peer(self):
        return self.pair.upstream if self.name == "client" else self.pair.client

    def connection_made(self, transport):
        self.transport = transport
        if self.name == "client":
            self.pair.proxy._client_connected(self.pair)

    def data_received(self, data):
        if self.pair.state == "connecting":
            self.pair.early.append(data)  # the client spoke before the upstream was there
            return
        if self.pair.state != "open":
            return  # blackholed or being closed: drop it on the floor
        p = self.peer()
        if p is not None and p.transport is not None and not p.transport.is_closing():
            p.transport.write(data)

    def eof_received(self):
        self.pair.eofs += 1
        if self.pair.state == "open":
            p = self.peer()
            if p is not None and p.transport is not None and not p.transport.is_closing():
                if self.pair.eofs >= 2:  # both peers are done: close both sockets
                    p.transport.close()
                    self.transport.close()
                elif p.transport.can_write_eof():
                    p.transport.write_eof()
        return True  # keep our half open (the peer may still send)

    def connection_lost(self, exc):
        self.pair.proxy._side_lost(self.pair, self, exc)

    # flow control: if the peer cannot keep up, stop reading from this side
    def pause_writing(self):
        p = self.peer()
        if p is not None and p.transport is not None and not p.transport.is_closing():
            p.transport.pause_reading()

    def resume_writing(self):
        p = self.peer()
        if (self.pair.state == "open" and p is not None and p.transport is not None
                and not p.transport.is_closing()):
            p.transport.resume_reading()


class _Pair:
    __slots__ = ("proxy", "id", "client", "upstream", "state", "lost", "early", "eofs")

    def __init__(self, proxy, pid):
        self.proxy = proxy
        self.id = pid
        self.client = _Side(self, "client")
        self.upstream = None
        self.state = "connecting"  # connecting, open, blackhole, closed
        self.lost = 0  # sides whose connection_lost has run
        self.early = []  # client bytes received before the upstream connected
        self.eofs = 0  # sides that sent a FIN (forwarded to the other)


class ChaosProxy:
    def __init__(self, target_host, target_port, seed=None, listen_host="127.0.0.1",
                 weights=None, blackhole_s=(0.5, 2.0), backlog=4096):
        self.target = (target_host, target_port)
        self.listen_host = listen_host
        self.rng = random.Random(seed)
        self.weights = weights or {"rst": 3, "fin": 3, "mixed": 2, "blackhole": 1, "stall": 1}
        self.blackhole_s = blackhole_s
        self.backlog = backlog
        self.port = None
        self.url = None
        self._loop = None
        self._server = None
        self._thread = None
        self._pairs = {}  # id -> _Pair, every pair with a socket still open
        self._next_id = 1
        self.accepted = 0
        self.upstream_failed = 0  # accepted while the upstream was unreachable
        self.cuts = 0
        self.cuts_by_kind = {k: 0 for k in KINDS}

    # ---- control, from any thread ----

    def start(self):
        ready = threading.Event()
        err = []

        def run():
            self._loop = asyncio.new_event_loop()
            asyncio.set_event_loop(self._loop)
            try:
                self._server = self._loop.run_until_complete(self._loop.create_server(
                    lambda: self._new_pair().client, self.listen_host, 0,
                    backlog=self.backlog, reuse_address=True))
                self.port = self._server.sockets[0].getsockname()[1]
                self.url = f"ws://127.0.0.1:{self.port}/ws"
            except Exception as e:  # noqa: BLE001 - reported to start()
                err.append(e)
                ready.set()
                return
            ready.set()
            self._loop.run_forever()
            # stopped: close everything still open, then the loop
            for pair in list(self._pairs.values()):
                self._cut_pair(pair, "rst", count=False)
            self._server.close()
            self._loop.run_until_complete(asyncio.sleep(0.05))
            self._loop.close()

        self._thread = threading.Thread(target=run, name="chaos-proxy", daemon=True)
        self._thread.start()
        ready.wait(10)
        if err or self.port is None:
            raise RuntimeError(f"chaos proxy did not start: {err}")
        return self

    def stop(self):
        if self._loop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)

    def set_target(self, host, port):
        """Connections accepted from now on go to host:port."""
        self._call(lambda: setattr(self, "target", (host, port)))

    def cut_random(self, n=1, kind=None):
        """Break up to n live connections chosen at random (kind: one of
        KINDS, or None for a random mix). Returns how many were cut."""
        return self._call(lambda: self._cut_random(n, kind))

    def cut_all(self, kind=None):
        """Break every live connection at once. Returns how many."""
        return self._call(lambda: self._cut_random(None, kind))

    def live(self):
        """Connections open both ways, not blackholed."""
        return self._call(lambda: sum(1 for p in self._pairs.values() if p.state == "open"))

    def stats(self):
        def s():
            return {"accepted": self.accepted, "upstream_failed": self.upstream_failed,
                    "live": sum(1 for p in self._pairs.values() if p.state == "open"),
                    "open_pairs": len(self._pairs), "cuts": self.cuts,
                    "cuts_by_kind": dict(self.cuts_by_kind)}
        return self._call(s)

    def _call(self, fn, timeout=30):
        async def wrap():
            return fn()
        return asyncio.run_coroutine_threadsafe(wrap(), self._loop).result(timeout)

    # ---- inside the loop ----

    def _new_pair(self):
        pair = _Pair(self, self._next_id)
        self._next_id += 1
        return pair

    def _client_connected(self, pair):
        self.accepted += 1
        self._pairs[pair.id] = pair
        self._loop.create_task(self._connect_upstream(pair))

    async def _connect_upstream(self, pair):
        side = _Side(pair, "upstream")
        pair.upstream = side
        try:
            await self._loop.create_connection(lambda: side, *self.target)
        except OSError:
            self.upstream_failed += 1
            pair.state = "closed"
            _close(pair.client.transport, rst=True)
            self._pairs.pop(pair.id, None)
            return
        if pair.state != "connecting" or pair.client.transport.is_closing():
            # the client went away meanwhile
            pair.state = "closed"
            _close(side.transport, rst=False)
            return
        pair.state = "open"
        for data in pair.early:
            side.transport.write(data)
        pair.early = []

    def _side_lost(self, pair, side, exc):
        pair.lost += 1
        if pair.state == "open":
            # an ordinary close by one peer: pass it on once the data is out
            pair.state = "closed"
            p = side.peer()
            if p is not None and p.transport is not None and not p.transport.is_closing():
                p.transport.close()
        elif pair.state == "connecting":
            pair.state = "closed"  # _connect_upstream cleans up
        # blackhole: keep the other side as it is until the timer closes it
        sides = 2 if pair.upstream is not None and pair.upstream.transport is not None else 1
        if pair.lost >= sides and pair.state != "connecting":
            self._pairs.pop(pair.id, None)

    def _cut_random(self, n, kind):
        live = [p for p in self._pairs.values() if p.state == "open"]
        if n is not None and n < len(live):
            live = self.rng.sample(live, n)
        for pair in live:
            k = kind or self.rng.choices(list(self.weights), list(self.weights.values()))[0]
            self._cut_pair(pair, k)
        return len(live)

    def _cut_pair(self, pair, kind, count=True):
        if count:
            self.cuts += 1
            self.cuts_by_kind[kind] += 1
        c = pair.client.transport
        u = pair.upstream.transport if pair.upstream is not None else None
        if kind in ("blackhole", "stall"):
            pair.state = "blackhole"
            if kind == "stall":
                for t in (c, u):
                    if t is not None and not t.is_closing():
                        t.pause_reading()
            delay = self.rng.uniform(*self.blackhole_s)
            self._loop.call_later(delay, self._end_blackhole, pair)
            return
        pair.state = "closed"
        if kind == "rst":
            _close(c, True)
            _close(u, True)
        elif kind == "fin":
            _close(c, False)
            _close(u, False)
        else:  # mixed
            rst_client = self.rng.random() < 0.5
            _close(c, rst_client)
            _close(u, not rst_client)
        self._pairs.pop(pair.id, None)

    def _end_blackhole(self, pair):
        if pair.state != "blackhole":
            return
        pair.state = "closed"
        rst = self.rng.random() < 0.5
        _close(pair.client.transport, rst)
        _close(pair.upstream.transport if pair.upstream else None, rst)
        self._pairs.pop(pair.id, None)


# ---- driving arq-chaos (tests/tools/arq_chaos.c) and checking the WAL ----

class ArqChaos:
    """arq-chaos as a subprocess. Its stderr (progress lines) is read by a
    thread, kept, and copied to log_path; `ready` is set on its
    "arq-chaos: ready" line."""

    def __init__(self, exe, url, log_path, **opts):
        args = [exe, "--url", url]
        for k, v in opts.items():
            args += ["--" + k.replace("_", "-"), str(v)]
        self.args = args
        self.lines = []
        self.ready = threading.Event()
        self.log = open(log_path, "w")
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True)
        self.log.write(" ".join(args) + "\n")
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))
            self.log.write(f"{time.monotonic() - self.t0:8.3f} {line}")
            self.log.flush()
            if "arq-chaos: ready" in line:
                self.ready.set()

    def running(self):
        return self.proc.poll() is None

    def wait(self, timeout):
        """Wait for the exit; returns (exit code or "timeout", the JSON
        summary or None, stdout)."""
        try:
            out, _ = self.proc.communicate(timeout=timeout)
            rc = self.proc.returncode
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate()
            rc = "timeout"
        self._reader.join(5)
        self.log.close()
        summary = None
        for line in out.splitlines():
            try:
                summary = json.loads(line)
            except ValueError:
                pass
        return rc, summary, out

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def tail(self, n=30):
        return "\n".join(self.lines[-n:])


async def _read_streams(url, streams, timeout):
    import msgpack
    import websockets
    rows = {s: [] for s in streams}
    nexts = {}
    async with websockets.connect(url, subprotocols=["arq.v1"], max_size=None,
                                  open_timeout=timeout) as ws:
        async def send(m):
            await ws.send(msgpack.packb(m, use_bin_type=True))
        await send({"t": "hello", "client": "chaos-read-back"})
        w = msgpack.unpackb(await ws.recv(), raw=False)
        if w.get("t") != "welcome":
            raise RuntimeError(f"read-back: no welcome: {w}")
        for i, s in enumerate(streams):
            await send({"t": "sub", "id": i + 1, "stream": s, "from": 1})
        last = {s: 0 for s in streams}
        acked = {s: 0 for s in streams}
        while len(nexts) < len(streams) or any(last[s] < nexts[s] - 1 for s in nexts):
            m = msgpack.unpackb(await ws.recv(), raw=False)
            t = m.get("t")
            if t == "subok":
                nexts[m["stream"]] = m["next"]
            elif t == "msg":
                s = m["stream"]
                rows[s].append((m["offset"], bytes(m["payload"])))
                last[s] = m["offset"]
                if last[s] - acked[s] >= 256:
                    await send({"t": "ack", "stream": s, "offset": last[s]})
                    acked[s] = last[s]
            elif t in ("nack", "error", "gap"):
                raise RuntimeError(f"read-back: {m}")
    return rows, nexts


def read_streams(url, streams, timeout=60):
    """Every message of each stream, from offset 1 to the last one at the
    time of subscribing, read with python-websockets + msgpack (not libarq).
    Returns ({stream: [(offset, payload)]}, {stream: subok.next})."""
    return asyncio.run(asyncio.wait_for(_read_streams(url, streams, timeout), timeout))


def check_streams(check, url, run_id, n_streams, publishers, messages):
    """Read every chaos.<run_id>.<k> stream back from arqd and check the WAL
    holds each published payload exactly once, on its stream, at contiguous
    offsets from 1. Returns a short summary string."""
    streams = [f"chaos.{run_id}.{k}" for k in range(n_streams)]
    try:
        rows, nexts = read_streams(url, streams)
    except Exception as e:  # noqa: BLE001 - reported as a failed check
        check(False, f"read the streams back: {type(e).__name__}: {e}")
        return "read-back failed"
    want = {}
    for p in range(publishers):
        for j in range(messages):
            want.setdefault(streams[(p + j) % n_streams], set()).add(
                f"{run_id}:{p}:{j}".encode())
    total = dups = 0
    for s in streams:
        got = rows[s]
        offs = [o for o, _ in got]
        check(offs == list(range(1, len(got) + 1)),
              f"{s}: offsets contiguous from 1 (got {len(got)}, next {nexts.get(s)}; "
              f"first bad at index {next((i for i, o in enumerate(offs) if o != i + 1), None)})")
        payloads = [p for _, p in got]
        seen = {}
        for o, p in got:
            seen.setdefault(p, []).append(o)
        twice = {p: o for p, o in seen.items() if len(o) > 1}
        dups += len(twice)
        check(not twice, f"{s}: no payload appended twice; {len(twice)} were, e.g. "
              f"{sorted(twice.items())[:5]}")
        w = want.get(s, set())
        missing = w - set(payloads)
        extra = set(payloads) - w
        check(not missing, f"{s}: every published payload is stored; {len(missing)} missing, "
              f"e.g. {sorted(missing)[:5]}")
        check(not extra, f"{s}: nothing else is stored; {len(extra)} unexpected, "
              f"e.g. {sorted(extra)[:5]}")
        total += len(got)
    return f"{total} messages in {n_streams} streams, {dups} duplicated payloads"


def arqd_metrics(d):
    """arqd's /metrics as {name: value} (labelled series keep their labels in
    the name); {} if it cannot be read."""
    try:
        status, body = d.http("GET", "/metrics")
    except OSError:
        return {}
    if status != 200:
        return {}
    out = {}
    for line in body.decode(errors="replace").splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            try:
                out[name] = float(value)
            except ValueError:
                pass
    return out


def session_counts(d):
    """The session counters of arqd's /metrics (-1: not there)."""
    m = arqd_metrics(d)
    return {k: int(m.get(f"arq_sessions_{k}", -1))
            for k in ("created_total", "resumed_total", "taken_over_total", "live")}


class ChaosRun:
    """What the replay_*_test.py scripts share around their own steps: the
    SIGTERM handler (meson's timeout: clean up as on a failure), the seed
    (ARQ_CHAOS_SEED repeats a run's choices), a temporary directory under
    /var/tmp with arqd's log, and, whatever happens, the cleanup of the arqd,
    proxy and arq-chaos they set on it (ARQ_CHAOS_KEEP=1 keeps the
    directory). Use as a context manager, then call finish().

        run = ChaosRun("crash", "arq-crash-", run_tag="k")
        with run:
            run.d = harness.Arqd(..., log=run.arqd_log)
            ...
        run.finish()
    """

    def __init__(self, name, prefix, run_tag, log_mode="w"):
        signal.signal(signal.SIGTERM, lambda *_: sys.exit("SIGTERM (timeout?)"))
        self.name = name
        self.seed = int(os.environ.get("ARQ_CHAOS_SEED")
                        or random.SystemRandom().randrange(1 << 30))
        self.rng = random.Random(self.seed)
        self.run_id = f"{run_tag}{self.seed}"
        print(f"seed {self.seed} (ARQ_CHAOS_SEED={self.seed} to repeat the choices)",
              flush=True)
        self.tmp = tempfile.mkdtemp(prefix=prefix, dir="/var/tmp")
        self.log_path = os.path.join(self.tmp, "arqd.log")
        self.arqd_log = open(self.log_path, log_mode)
        self.d = self.proxy = self.chaos = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        from harness import failures
        if self.chaos is not None:
            self.chaos.kill()
        if self.proxy is not None:
            self.proxy.stop()
        if self.d is not None:
            self.d.kill_if_running()
        self.arqd_log.close()
        if failures:
            with open(self.log_path) as f:
                print("arqd log (tail):\n" + "".join(f.readlines()[-40:]), flush=True)
        if os.environ.get("ARQ_CHAOS_KEEP"):
            print(f"kept {self.tmp}", flush=True)
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)
        return False

    def finish(self):
        from harness import failures
        if failures:
            print(f"{len(failures)} check(s) failed (seed {self.seed})", flush=True)
            sys.exit(1)
        print(f"replay {self.name} checks passed", flush=True)


def check_chaos_verdict(check, rc, summary, out):
    """arq-chaos's own verdict: exit 0, no violations."""
    check(rc == 0, f"arq-chaos exits 0: {rc} {out!r}")
    check(summary is not None and summary.get("violations") == 0,
          f"arq-chaos: no violations: {summary}")


def check_chaos_acked(check, summary, publishers, messages):
    """Every publish of every publisher was acknowledged."""
    check(summary is not None and summary.get("acked") == publishers * messages,
          f"every publish acked: {summary and summary.get('acked')}")


def check_sessions_kept(check, d, at_ready, summary):
    """From arqd's /metrics: no session created after arq-chaos got ready (each
    would be a resume that failed), and every reconnection resumed."""
    sessions = session_counts(d)
    print(f"arqd sessions: {sessions}", flush=True)
    # every client had its session when arq-chaos got ready: any session
    # created later is a resume that failed
    check(sessions["created_total"] == at_ready["created_total"],
          f"no new session after ready (no failed resume): {at_ready['created_total']} "
          f"at ready, {sessions['created_total']} at the end")
    # (>=: a welcome can be lost in a cut before the client counts it)
    check(summary is not None and sessions["resumed_total"] >= summary.get("reconnects", 0),
          f"every reconnection resumed its session: {sessions['resumed_total']} resumed, "
          f"{summary and summary.get('reconnects')} reconnects")


def read_back_and_stop(check, run, n_streams, publishers, messages):
    """The end of every replay test: arq-chaos's stderr if something failed,
    the independent read-back of every stream, arqd's clean stop."""
    from harness import failures
    if failures:
        print("arq-chaos stderr (tail):\n" + run.chaos.tail(), flush=True)
    if run.d is None:
        return
    print("read back: " + check_streams(check, run.d.url, run.run_id, n_streams, publishers,
                                        messages), flush=True)
    rc = run.d.stop()
    check(rc == 0, f"arqd stops cleanly: {rc}")
