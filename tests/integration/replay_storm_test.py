#!/usr/bin/python3
"""A reconnection storm (issue #4): 2,000 subscribers lose their
connections at the same moment, twice, and all of them resume and catch up.

Usage: replay_storm_test.py PATH_TO_ARQD PATH_TO_ARQ PATH_TO_ARQ_CHAOS

arqd (max_connections 5000) runs on a free loopback port with a temporary
data directory; arq-chaos runs 2,000 subscribers (one stream each) and 4
publishers at a modest rate through chaos_proxy. Once arq-chaos is ready,
every connection is cut at once (a mix of RST, FIN, blackhole, stall), and
again a few seconds later. A blackholed or stalled connection stays open in
the proxy for 6 to 9 s, longer than the clients' heartbeat timeout (3 s) and
shorter than arqd's keep-alive (20 s + 10 s): the client's new connection
resumes the session while arqd still holds the old one, which is closed
with 4001.
Heartbeats are slower than arq-chaos's defaults so that 2,000 clients on a
busy machine do not time out merely because the machine is busy.

Checked: all clients are connected again before each storm; arq-chaos's
own verdict (exit 0, no violations, every cut client reconnected); no
session was lost (arqd's /metrics: no session created after ready); then
independently, reading every stream back with python-websockets: each
published payload is in the WAL exactly once, on its stream, at contiguous
offsets from 1.

ARQ_CHAOS_SEED=N repeats a run's choices (the timing is not repeatable);
ARQ_CHAOS_KEEP=1 keeps the temporary directory (data dir and logs).
"""
import os
import random
import resource
import shutil
import signal
import sys
import tempfile
import time

ARQD, ARQ, ARQ_CHAOS = sys.argv[1], sys.argv[2], sys.argv[3]
sys.dont_write_bytecode = True  # no __pycache__ in the source tree
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from chaos_proxy import ArqChaos, ChaosProxy, check_streams, session_counts  # noqa: E402
from harness import failures  # noqa: E402

STREAMS, PUBLISHERS, SUBSCRIBERS = 8, 4, 2000
MESSAGES, PUB_RATE = 200, 10  # each publisher: at least 20 s of load
STORMS = 2


def check(cond, what):
    return harness.check(cond, what, verbose=True)


def main():
    # meson's timeout sends SIGTERM: clean up (finally:) as on a failure
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("SIGTERM (timeout?)"))
    # the proxy holds two sockets per connection; arqd and arq-chaos one each
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 3 * (SUBSCRIBERS + PUBLISHERS) + 512
    if soft < want:
        if hard != resource.RLIM_INFINITY and hard < want:
            print(f"SKIP: needs {want} file descriptors, the hard limit is {hard}", flush=True)
            sys.exit(77)
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))  # inherited by both
    seed = int(os.environ.get("ARQ_CHAOS_SEED") or random.SystemRandom().randrange(1 << 30))
    rng = random.Random(seed)
    run_id = f"s{seed}"
    print(f"seed {seed} (ARQ_CHAOS_SEED={seed} to repeat the choices)", flush=True)
    tmp = tempfile.mkdtemp(prefix="arq-storm-", dir="/var/tmp")
    arqd_log = open(os.path.join(tmp, "arqd.log"), "w")
    d = proxy = chaos = None
    try:
        d = harness.Arqd(ARQD, os.path.join(tmp, "data"), "--set", "server.max_connections=5000",
                         log=arqd_log)
        proxy = ChaosProxy("127.0.0.1", d.port, seed=seed, blackhole_s=(6.0, 9.0)).start()
        chaos = ArqChaos(ARQ_CHAOS, proxy.url, os.path.join(tmp, "arq-chaos.log"),
                         streams=STREAMS, publishers=PUBLISHERS, subscribers=SUBSCRIBERS,
                         sub_streams=1, messages=MESSAGES, pub_rate=PUB_RATE, run_id=run_id,
                         hb_interval_ms=1000, hb_timeout_ms=3000, backoff_cap_ms=1000,
                         timeout=170)
        ready = check(chaos.ready.wait(90), "arq-chaos gets ready")
        t0 = time.monotonic()
        at_ready = session_counts(d)
        cut = []
        clients = SUBSCRIBERS + PUBLISHERS
        for i in range(STORMS if ready else 0):
            # every client connected again (after the previous storm)...
            deadline = time.monotonic() + 90
            while proxy.live() < clients and chaos.running() and time.monotonic() < deadline:
                time.sleep(0.1)
            live = proxy.live()
            check(live >= clients, f"before storm {i + 1}: all {clients} clients connected "
                  f"through the proxy: {live}")
            # ...and working for a moment
            time.sleep(rng.uniform(0.5, 3.0))
            if not chaos.running():
                break
            n = proxy.cut_all()
            cut.append(n)
            print(f"storm {i + 1} at {time.monotonic() - t0:.1f} s: cut {n} connections; "
                  f"{proxy.stats()}", flush=True)
        check(len(cut) == STORMS and all(n >= clients * 9 // 10 for n in cut),
              f"{STORMS} storms, each cutting (nearly) all {clients} connections: {cut}")
        rc, summary, out = chaos.wait(200 if ready else 1)
        print(f"arq-chaos: exit {rc}, {time.monotonic() - t0:.1f} s after ready: {summary}",
              flush=True)
        print(f"proxy: {proxy.stats()}", flush=True)
        check(rc == 0, f"arq-chaos exits 0: {rc} {out!r}")
        check(summary is not None and summary.get("violations") == 0,
              f"arq-chaos: no violations: {summary}")
        check(summary is not None and summary.get("reconnects", 0) >= sum(cut),
              f"arq-chaos reconnected every cut connection: "
              f"{summary and summary.get('reconnects')} >= {sum(cut)}")
        check(summary is not None and summary.get("acked") == PUBLISHERS * MESSAGES,
              f"every publish acked: {summary and summary.get('acked')}")
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
        if failures:
            print("arq-chaos stderr (tail):\n" + chaos.tail(), flush=True)
        print("read back: " + check_streams(check, d.url, run_id, STREAMS, PUBLISHERS,
                                            MESSAGES), flush=True)
        rc = d.stop()
        check(rc == 0, f"arqd stops cleanly: {rc}")
    finally:
        if chaos is not None:
            chaos.kill()
        if proxy is not None:
            proxy.stop()
        if d is not None:
            d.kill_if_running()
        arqd_log.close()
        if failures:
            with open(os.path.join(tmp, "arqd.log")) as f:
                print("arqd log (tail):\n" + "".join(f.readlines()[-40:]), flush=True)
        if os.environ.get("ARQ_CHAOS_KEEP"):
            print(f"kept {tmp}", flush=True)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    if failures:
        print(f"{len(failures)} check(s) failed (seed {seed})", flush=True)
        sys.exit(1)
    print("replay storm checks passed", flush=True)


main()
