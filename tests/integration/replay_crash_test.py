#!/usr/bin/python3
"""arqd killed (SIGKILL) and restarted again and again under load (issue
#4): nothing acknowledged is lost, nothing is stored twice, every subscriber
gets everything once, in order, and sessions resume across the crashes.

Usage: replay_crash_test.py PATH_TO_ARQD PATH_TO_ARQ PATH_TO_ARQ_CHAOS

arqd runs on a free loopback port with a temporary data directory; arq-chaos
(libarq publishers and subscribers with automatic reconnection) connects to
it directly. Once arq-chaos is ready, arqd is SIGKILLed at random moments
(from just after its start, mid-recovery, to 1.5 s later) and restarted on the
same port with the same data directory, sometimes after a pause, at least 20
times; then the run is left to finish. Checked: arq-chaos's own verdict
(exit 0, no violations, it did reconnect), every reconnection resumed its
session (arqd's debug log of hellos), then independently, reading
every stream back with python-websockets: each published payload is in the
WAL exactly once, on its stream, at contiguous offsets from 1.

ARQ_CHAOS_SEED=N repeats a run's choices (the timing is not repeatable);
ARQ_CHAOS_KEEP=1 keeps the temporary directory (data dir and logs).
"""
import os
import signal
import sys
import time

ARQD, ARQ, ARQ_CHAOS = sys.argv[1], sys.argv[2], sys.argv[3]
sys.dont_write_bytecode = True  # no __pycache__ in the source tree
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from chaos_proxy import (ArqChaos, ChaosRun, check_chaos_acked,  # noqa: E402
                         check_chaos_verdict, read_back_and_stop)

STREAMS, PUBLISHERS, SUBSCRIBERS = 5, 4, 3
MESSAGES, PUB_RATE = 800, 25  # each publisher: at least 32 s of load
MIN_KILLS = 20


def check(cond, what):
    return harness.check(cond, what, verbose=True)


def main():
    run = ChaosRun("crash", "arq-crash-", run_tag="k", log_mode="a")
    rng, tmp, arqd_log = run.rng, run.tmp, run.arqd_log
    data = os.path.join(tmp, "data")
    kills = 0
    with run:
        d = run.d = harness.Arqd(ARQD, data, "--log-level", "debug", log=arqd_log)
        port = d.port
        chaos = run.chaos = ArqChaos(ARQ_CHAOS, d.url, os.path.join(tmp, "arq-chaos.log"),
                                     streams=STREAMS, publishers=PUBLISHERS,
                                     subscribers=SUBSCRIBERS, messages=MESSAGES,
                                     pub_rate=PUB_RATE, run_id=run.run_id, timeout=150)
        ready = check(chaos.ready.wait(60), "arq-chaos gets ready")
        t0 = time.monotonic()
        while ready and chaos.running() and kills < MIN_KILLS:
            # up for a while: often long enough to do some work, sometimes
            # killed during startup/recovery
            time.sleep(rng.choice((0.0, 0.05, 0.2)) if rng.random() < 0.2
                       else rng.uniform(0.3, 1.5))
            if not chaos.running():
                break
            d.proc.send_signal(signal.SIGKILL)
            d.proc.wait()
            kills += 1
            arqd_log.write(f"--- test: SIGKILL #{kills} at {time.monotonic() - t0:.3f} s\n")
            arqd_log.flush()
            if rng.random() < 0.25:
                time.sleep(rng.uniform(0.1, 1.0))  # down for a while: connects are refused
            try:
                d = run.d = harness.Arqd(ARQD, data, "--log-level", "debug", port=port,
                                         log=arqd_log)
            except SystemExit as e:
                check(False, f"arqd restarts on port {port} after kill #{kills}: {e}")
                d = run.d = None
                break
        kill_s = time.monotonic() - t0
        print(f"{kills} kills in {kill_s:.1f} s", flush=True)
        check(kills >= MIN_KILLS, f"at least {MIN_KILLS} SIGKILLs while arq-chaos ran: {kills}")
        rc, summary, out = chaos.wait(180 if ready and d is not None else 1)
        print(f"arq-chaos: exit {rc}, {time.monotonic() - t0:.1f} s after ready: {summary}",
              flush=True)
        check_chaos_verdict(check, rc, summary, out)
        check(summary is not None and summary.get("reconnects", 0) > 0,
              "arq-chaos reconnected")
        check_chaos_acked(check, summary, PUBLISHERS, MESSAGES)
        # arqd logs every hello (at debug level): after the first connections,
        # every session must come back, however often arqd was killed
        # (every client had its session when arq-chaos got ready, before the
        # first kill: any session created later is a resume that failed)
        with open(run.log_path) as f:
            log = f.read()
        before, _, after = log.partition("--- test: SIGKILL #1 ")
        new_before, new_after = (sum(1 for ln in part.splitlines()
                                     if "event=hello " in ln and "resumed=false" in ln)
                                 for part in (before, after))
        resumed = log.count("resumed=true")
        print(f"arqd hellos: {new_before} new sessions before the first kill, {new_after} "
              f"after, {resumed} resumed", flush=True)
        check(new_after == 0, f"no session lost to a crash (no new session after the "
              f"first kill): {new_after}")
        check(summary is not None and resumed >= summary.get("reconnects", 0),
              f"every reconnection resumed its session: {resumed} resumed, "
              f"{summary and summary.get('reconnects')} reconnects")
        read_back_and_stop(check, run, STREAMS, PUBLISHERS, MESSAGES)
    run.finish()


main()
