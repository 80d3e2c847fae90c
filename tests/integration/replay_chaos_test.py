#!/usr/bin/python3
"""Connections cut at random under load (issue #4): nothing acknowledged is
lost, nothing is stored twice, every subscriber gets everything once, in
order.

Usage: replay_chaos_test.py PATH_TO_ARQD PATH_TO_ARQ PATH_TO_ARQ_CHAOS

arqd (pinging every 100 ms, giving up after 300 ms without a pong) runs on a
free loopback port with a temporary data directory; arq-chaos (libarq
publishers and subscribers with automatic reconnection) talks to it through
chaos_proxy, which cuts live connections at random — RST, FIN, or a silent
blackhole only heartbeats can detect — until at least 200 cuts happened, then
lets the run finish. Checked: arq-chaos's own verdict (exit 0, no
violations, it did reconnect); no session was lost (arqd's /metrics: no
session created after ready); then independently, reading every stream back
with python-websockets: each published payload is in the WAL exactly once,
on its stream, at contiguous offsets from 1.

ARQ_CHAOS_SEED=N repeats a run's choices (the timing is not repeatable);
ARQ_CHAOS_KEEP=1 keeps the temporary directory (data dir and logs).
"""
import os
import sys
import time

ARQD, ARQ, ARQ_CHAOS = sys.argv[1], sys.argv[2], sys.argv[3]
sys.dont_write_bytecode = True  # no __pycache__ in the source tree
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from chaos_proxy import (ArqChaos, ChaosProxy, ChaosRun, check_chaos_acked,  # noqa: E402
                         check_chaos_verdict, check_sessions_kept, read_back_and_stop,
                         session_counts)

STREAMS, PUBLISHERS, SUBSCRIBERS = 6, 4, 4
MESSAGES, PUB_RATE = 600, 25  # each publisher: at least 24 s of load
MIN_CUTS = 200


def check(cond, what):
    return harness.check(cond, what, verbose=True)


def main():
    run = ChaosRun("chaos", "arq-chaos-", run_tag="c")
    rng, tmp = run.rng, run.tmp
    with run:
        d = run.d = harness.Arqd(ARQD, os.path.join(tmp, "data"), "--set",
                                 "server.ping_interval_ms=100", "--set",
                                 "server.pong_timeout_ms=300", log=run.arqd_log)
        proxy = run.proxy = ChaosProxy("127.0.0.1", d.port, seed=run.seed).start()
        chaos = run.chaos = ArqChaos(ARQ_CHAOS, proxy.url, os.path.join(tmp, "arq-chaos.log"),
                                     streams=STREAMS, publishers=PUBLISHERS,
                                     subscribers=SUBSCRIBERS, messages=MESSAGES,
                                     pub_rate=PUB_RATE, run_id=run.run_id, timeout=150)
        ready = check(chaos.ready.wait(60), "arq-chaos gets ready")
        t0 = time.monotonic()
        at_ready = session_counts(d)
        # cut one or two live connections every 20..150 ms until MIN_CUTS
        while ready and chaos.running() and proxy.cuts < MIN_CUTS:
            time.sleep(rng.uniform(0.02, 0.15))
            proxy.cut_random(rng.choice((1, 1, 1, 2)))
        cut_s = time.monotonic() - t0
        st = proxy.stats()
        print(f"proxy after {cut_s:.1f} s of cutting: {st}", flush=True)
        check(st["cuts"] >= MIN_CUTS,
              f"at least {MIN_CUTS} cuts while arq-chaos ran: {st['cuts']}")
        rc, summary, out = chaos.wait(180 if ready else 1)
        print(f"arq-chaos: exit {rc}, {time.monotonic() - t0:.1f} s after ready: {summary}",
              flush=True)
        check_chaos_verdict(check, rc, summary, out)
        check(summary is not None and summary.get("reconnects", 0) > 0,
              "arq-chaos reconnected")
        check_chaos_acked(check, summary, PUBLISHERS, MESSAGES)
        check_sessions_kept(check, d, at_ready, summary)
        read_back_and_stop(check, run, STREAMS, PUBLISHERS, MESSAGES)
    run.finish()


main()
