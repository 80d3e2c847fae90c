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
import random
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

STREAMS, PUBLISHERS, SUBSCRIBERS = 6, 4, 4
MESSAGES, PUB_RATE = 600, 25  # each publisher: at least 24 s of load
MIN_CUTS = 200


def check(cond, what):
    return harness.check(cond, what, verbose=True)


def main():
    # meson's timeout sends SIGTERM: clean up (finally:) as on a failure
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("SIGTERM (timeout?)"))
    seed = int(os.environ.get("ARQ_CHAOS_SEED") or random.SystemRandom().randrange(1 << 30))
    rng = random.Random(seed)
    run_id = f"c{seed}"
    print(f"seed {seed} (ARQ_CHAOS_SEED={seed} to repeat the choices)", flush=True)
    tmp = tempfile.mkdtemp(prefix="arq-chaos-", dir="/var/tmp")
    arqd_log = open(os.path.join(tmp, "arqd.log"), "w")
    d = proxy = chaos = None
    try:
        d = harness.Arqd(ARQD, os.path.join(tmp, "data"), "--set", "server.ping_interval_ms=100",
                         "--set", "server.pong_timeout_ms=300", log=arqd_log)
        proxy = ChaosProxy("127.0.0.1", d.port, seed=seed).start()
        chaos = ArqChaos(ARQ_CHAOS, proxy.url, os.path.join(tmp, "arq-chaos.log"),
                         streams=STREAMS, publishers=PUBLISHERS, subscribers=SUBSCRIBERS,
                         messages=MESSAGES, pub_rate=PUB_RATE, run_id=run_id, timeout=150)
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
        check(rc == 0, f"arq-chaos exits 0: {rc} {out!r}")
        check(summary is not None and summary.get("violations") == 0,
              f"arq-chaos: no violations: {summary}")
        check(summary is not None and summary.get("reconnects", 0) > 0,
              "arq-chaos reconnected")
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
    print("replay chaos checks passed", flush=True)


main()
