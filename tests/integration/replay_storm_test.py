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
import resource
import sys
import time

ARQD, ARQ, ARQ_CHAOS = sys.argv[1], sys.argv[2], sys.argv[3]
sys.dont_write_bytecode = True  # no __pycache__ in the source tree
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from chaos_proxy import (ArqChaos, ChaosProxy, ChaosRun, check_chaos_acked,  # noqa: E402
                         check_chaos_verdict, check_sessions_kept, read_back_and_stop,
                         session_counts)

STREAMS, PUBLISHERS, SUBSCRIBERS = 8, 4, 2000
MESSAGES, PUB_RATE = 200, 10  # each publisher: at least 20 s of load
STORMS = 2


def check(cond, what):
    return harness.check(cond, what, verbose=True)


def main():
    # the proxy holds two sockets per connection; arqd and arq-chaos one each
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 3 * (SUBSCRIBERS + PUBLISHERS) + 512
    if soft < want:
        if hard != resource.RLIM_INFINITY and hard < want:
            print(f"SKIP: needs {want} file descriptors, the hard limit is {hard}", flush=True)
            sys.exit(77)
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))  # inherited by both
    run = ChaosRun("storm", "arq-storm-", run_tag="s")
    rng, tmp = run.rng, run.tmp
    with run:
        # 2,000 clients from one address, all at once: the per-address limits
        # (default 1,000 connections, 200/s with a burst of 1,000) raised
        d = run.d = harness.Arqd(ARQD, os.path.join(tmp, "data"), "--set",
                                 "server.max_connections=5000", "--set",
                                 "limits.max_connections_per_address=5000", "--set",
                                 "limits.connection_rate=0", "--set",
                                 "limits.max_sessions_per_address=10000", "--set",
                                 "limits.session_rate=0", log=run.arqd_log)
        proxy = run.proxy = ChaosProxy("127.0.0.1", d.port, seed=run.seed,
                                       blackhole_s=(6.0, 9.0)).start()
        chaos = run.chaos = ArqChaos(ARQ_CHAOS, proxy.url, os.path.join(tmp, "arq-chaos.log"),
                                     streams=STREAMS, publishers=PUBLISHERS,
                                     subscribers=SUBSCRIBERS, sub_streams=1, messages=MESSAGES,
                                     pub_rate=PUB_RATE, run_id=run.run_id, hb_interval_ms=1000,
                                     hb_timeout_ms=3000, backoff_cap_ms=1000, timeout=170)
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
        check_chaos_verdict(check, rc, summary, out)
        check(summary is not None and summary.get("reconnects", 0) >= sum(cut),
              f"arq-chaos reconnected every cut connection: "
              f"{summary and summary.get('reconnects')} >= {sum(cut)}")
        check_chaos_acked(check, summary, PUBLISHERS, MESSAGES)
        check_sessions_kept(check, d, at_ready, summary)
        read_back_and_stop(check, run, STREAMS, PUBLISHERS, MESSAGES)
    run.finish()


main()
