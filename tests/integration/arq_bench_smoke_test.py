#!/usr/bin/python3
"""arq-bench reports what it measured, consistently (docs/benchmarks.md).

Usage: arq_bench_smoke_test.py PATH_TO_ARQD PATH_TO_ARQ_BENCH [PATH_TO_ARQ_NATS_BENCH
                               [PATH_TO_ARQ_REDIS_BENCH]]

Short runs of the load generator against a real arqd, in JSON: an open-loop
run with subscribers, a closed-loop run, a catch-up and a reconnection storm. No figure is compared with a
speed (that is the benchmarks' job); what is checked is that the report holds
together: every publish acknowledged and delivered to every subscriber, the
two parts of the delivery latency each within the whole, arqd's publish-time
histograms read from /metrics with their stages inside the total, and the
options echoed back. With arq-nats-bench (and nats-server on PATH), a short
run against a private nats-server with JetStream: every publish acknowledged.
With arq-redis-bench (and redis-server on PATH), short runs against a private
redis-server with appendfsync always: every XADD answered, each delivered to
both subscribers exactly once per window (edges aside), the options echoed.
"""
import contextlib
import json
import os
import socket
import shutil
import subprocess
import sys
import tempfile
import time

ARQD, BENCH = sys.argv[1], sys.argv[2]
NATS_BENCH = sys.argv[3] if len(sys.argv) > 3 else None
REDIS_BENCH = sys.argv[4] if len(sys.argv) > 4 else None
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from harness import check, failures  # noqa: E402


def bench(url, *args):
    p = subprocess.run([BENCH, "--url", url, "--json", *args], capture_output=True, text=True,
                       timeout=120)
    check(p.returncode == 0, f"arq-bench {args}: exit {p.returncode}: {p.stderr[-2000:]}")
    try:
        return json.loads(p.stdout), p.stderr
    except json.JSONDecodeError:
        check(False, f"arq-bench {args}: not JSON: {p.stdout[:500]!r}")
        return None, p.stderr


def within(part, whole):
    """part's quantile may not exceed whole's: per sample the part is at most
    the whole (up to the histogram's ~3% buckets and the clock conversion)."""
    return part <= whole * 1.05 + 50


def open_loop(d):
    r, text = bench(d.url, "-c", "4", "-s", "2", "--streams", "2", "--rate", "2000",
                    "--tick-us", "1000", "--seconds", "1", "--warmup", "0.5",
                    "--server-pid", str(d.proc.pid))
    if r is None:
        return
    c = r["config"]
    check(c["rate"] == 2000 and c["tick_us"] == 1000 and c["subscribers"] == 2
          and c["conns"] == 4, f"config echoed: {c}")
    check(r["nacks"] == 0 and r["not_sent"] == 0, f"no nacks, nothing unsent: {r}")
    pub, dl = r["puback_latency"], r["delivery_latency"]
    check(pub["samples"] > 0 and dl["samples"] > 0, f"samples: {pub} {dl}")
    # each publish of the window reaches both subscribers; the window's edges
    # may cut a few either way
    check(abs(dl["samples"] - 2 * pub["samples"]) <= 0.05 * dl["samples"] + 20,
          f"deliveries {dl['samples']} against 2 x pubacks {pub['samples']}")
    for part in ("sent_to_decoded", "decoded_to_delivered"):
        p = r[part]
        check(p["samples"] == dl["samples"], f"{part}: a split of every delivery: {p}")
        for q in ("p50_us", "p99_us"):
            check(within(p[q], dl[q]), f"{part} {q} {p[q]} within the delivery's {dl[q]}")
    a = r["arqd_publish_ms"]
    check(a is not None, "arqd's publish-time histograms were read")
    if a:
        for k in ("total", "wait", "dispatch"):
            check(a[k]["mean"] >= 0 and (a[k]["p99_le"] is None or a[k]["p99_le"] > 0)
                  and (a[k]["p50_le"] is None or a[k]["p99_le"] is None
                       or a[k]["p50_le"] <= a[k]["p99_le"]), f"{k}: {a[k]}")
        # per publish total = wait + commit + dispatch, over the same publishes
        check(a["total"]["mean"] * 1.01 + 0.001 >= a["wait"]["mean"] + a["dispatch"]["mean"],
              f"stages within the total: {a}")
    check(r["wal"] is not None and r["wal"]["commits_per_s"] > 0, f"WAL figures: {r['wal']}")
    check(r["server_cpu"] is not None and r["server_cpu"] >= 0, "arqd's CPU read")
    for line in ("sent -> arqd decoded:", "decoded -> delivered:", "arqd publish time",
                 "durable -> loop ran it", "machine stalls:", "(sent every 1000 us)"):
        check(line in text, f"text report has {line!r}")


def closed_loop(d):
    r, _ = bench(d.url, "-c", "3", "-w", "4", "--seconds", "0.5", "--warmup", "0.2")
    if r is None:
        return
    check(r["config"]["depth"] == 4 and r["publishes_per_s"] > 0 and r["nacks"] == 0,
          f"closed loop: {r['config']} {r['publishes_per_s']}")
    # no subscribers: no delivery samples, and the split is empty too
    check(r["delivery_latency"]["samples"] == 0 and r["sent_to_decoded"]["samples"] == 0,
          "no deliveries without subscribers")


def catchup(d, data_dir):
    r, _ = bench(d.url, "--catchup", "2000", "-c", "4", "-w", "8", "--data-dir", data_dir)
    if r is None:
        return
    check(r["mode"] == "catchup" and r["config"]["messages"] == 2000, f"catch-up config: {r}")
    reps = r["catchup"]
    check(len(reps) == 1 and reps[0]["msgs"] == 2000 and reps[0]["first_msg_ms"] >= 0
          and reps[0]["wire_bytes"] > 2000 * 128, f"one catch-up of all 2,000: {reps}")
    # the same records read straight from LMDB (read-only, beside arqd), four ways
    check(len(r["raw"]) == 4, f"four LMDB reads: {list(r['raw'])}")
    for k, v in r["raw"].items():
        check(v is not None and v["value_bytes"] >= 2000 * 128 and v["records_per_s"] > 0,
              f"LMDB read {k} read the catch-up's records: {v}")
    check(isinstance(r["goal_500k"], bool), "the goal is reported, whatever it is")


def storm(d):
    r, _ = bench(d.url, "--storm", "20", "--streams", "4")
    if r is None:
        return
    c, re_ = r["connect"], r["reconnect"]
    check(c["welcomed"] == 20 and c["holes"] == 0, f"storm: all 20 welcomed first: {c}")
    check(re_["welcomed"] == 20 and re_["resumed"] == 20 and re_["fresh"] == 0
          and re_["redelivered"] == 0 and re_["holes"] == 0,
          f"storm: all 20 resumed their sessions, nothing lost or twice: {re_}")
    check(r["errors"] == 0 and r["server_closes"] == 0, f"storm errors: {r['errors']}")


def free_port():
    with socket.socket() as so:
        so.bind(("127.0.0.1", 0))
        return so.getsockname()[1]


@contextlib.contextmanager
def peer_server(tmp, name, argv, ready):
    """Runs a peer's server (argv) with its output in TMP/NAME.log, waits (up
    to 10 s) for the line READY, and stops it afterwards."""
    path = os.path.join(tmp, f"{name}.log")
    with open(path, "w") as log:
        p = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        try:
            for _ in range(100):
                with open(path) as f:
                    if ready in f.read():
                        break
                time.sleep(0.1)
            yield p
        finally:
            p.terminate()
            p.wait(timeout=20)


def nats(tmp):
    server = shutil.which("nats-server")
    if not NATS_BENCH or not server:
        print("arq-nats-bench or nats-server missing: NATS run skipped", flush=True)
        return
    port = free_port()
    argv = [server, "-a", "127.0.0.1", "-p", str(port), "-js", "-sd", os.path.join(tmp, "nats")]
    with peer_server(tmp, "nats", argv, "Server is ready") as p:
        r = subprocess.run([NATS_BENCH, "--url", f"nats://127.0.0.1:{port}", "-c", "4", "-w",
                            "4", "--seconds", "0.5", "--warmup", "0.2", "--json",
                            "--server-pid", str(p.pid)], capture_output=True, text=True,
                           timeout=60)
        check(r.returncode == 0, f"arq-nats-bench: exit {r.returncode}: {r.stderr[-1500:]}")
        if r.returncode == 0:
            j = json.loads(r.stdout)
            check(j["errors"] == 0 and j["publishes_per_s"] > 0
                  and j["ack_latency"]["samples"] > 0 and j["config"]["depth"] == 4
                  and j["server_cpu"] is not None, f"arq-nats-bench report: {j}")
            # a second run reuses the stream the first one created
            r = subprocess.run([NATS_BENCH, "--url", f"nats://127.0.0.1:{port}", "-c", "2",
                                "--seconds", "0.2", "--warmup", "0"], capture_output=True,
                               text=True, timeout=60)
            check(r.returncode == 0, f"arq-nats-bench again: {r.stderr[-800:]}")
        r = subprocess.run([NATS_BENCH, "--url", "nats://127.0.0.1:1", "-c", "1"],
                           capture_output=True, text=True, timeout=30)
        check(r.returncode == 1 and "connect" in r.stderr, f"no server: {r.returncode} {r.stderr}")


def redis(tmp):
    server = shutil.which("redis-server")
    if not REDIS_BENCH or not server:
        print("arq-redis-bench or redis-server missing: Redis run skipped", flush=True)
        return
    port = free_port()
    url = f"redis://127.0.0.1:{port}"
    os.mkdir(os.path.join(tmp, "redis"))
    argv = [server, "--bind", "127.0.0.1", "--port", str(port), "--appendonly", "yes",
            "--appendfsync", "always", "--save", "", "--dir", os.path.join(tmp, "redis")]
    with peer_server(tmp, "redis", argv, "Ready to accept connections") as p:
        redis_runs(url, p.pid)


def redis_runs(url, pid):
    def run(*args):
        r = subprocess.run([REDIS_BENCH, "--url", url, "--json", "--server-pid", str(pid),
                            *args], capture_output=True, text=True, timeout=60)
        check(r.returncode == 0, f"arq-redis-bench {args}: exit {r.returncode}: "
                                 f"{r.stderr[-1500:]}")
        return json.loads(r.stdout) if r.returncode == 0 else None

    j = run("-c", "4", "-s", "2", "--rate", "2000", "--tick-us", "1000", "--seconds", "1",
            "--warmup", "0.5", "--count", "50")
    if j:
        c = j["config"]
        check(c["rate"] == 2000 and c["tick_us"] == 1000 and c["subscribers"] == 2
              and c["conns"] == 4 and c["xread_count"] == 50 and j["server_cpu"] is not None,
              f"config echoed: {j}")
        pub, dl = j["puback_latency"], j["delivery_latency"]
        check(j["errors"] == 0 and j["not_sent"] == 0 and pub["samples"] > 0,
              f"every XADD answered: {j}")
        check(abs(dl["samples"] - 2 * pub["samples"]) <= 0.05 * dl["samples"] + 20,
              f"deliveries {dl['samples']} against 2 x XADD replies {pub['samples']}")
    # a second, closed-loop run starts from deleted streams: had it read the
    # first run's ~3,000 entries from 0-0 (no warm-up: inside the window),
    # the deliveries would outnumber the XADDs
    j = run("-c", "3", "-w", "4", "-s", "1", "--seconds", "0.3", "--warmup", "0")
    if j:
        pub, dl = j["puback_latency"], j["delivery_latency"]
        check(j["config"]["depth"] == 4 and j["publishes_per_s"] > 0,
              f"closed loop: {j['config']} {j['publishes_per_s']}")
        check(dl["samples"] <= pub["samples"] * 1.05 + 20 and dl["samples"] > 0,
              f"closed loop: deliveries {dl['samples']} against XADDs {pub['samples']}")
    r = subprocess.run([REDIS_BENCH, "--url", "redis://127.0.0.1:1", "-c", "1"],
                       capture_output=True, text=True, timeout=30)
    check(r.returncode == 1 and "connect" in r.stderr, f"no server: {r.returncode} {r.stderr}")
    for args in (["--url", "nats://127.0.0.1:1"], ["--url", url, "--tick-us", "5"],
                 ["--url", url, "-s", "x"]):
        r = subprocess.run([REDIS_BENCH, *args], capture_output=True, text=True, timeout=30)
        check(r.returncode == 2, f"{args}: {r.returncode} {r.stderr}")


def usage_errors():
    for args in (["--tick-us", "5"], ["--tick-us", "x"], ["--rate", "0"]):
        p = subprocess.run([BENCH, "--url", "ws://127.0.0.1:1/ws", *args], capture_output=True,
                           text=True, timeout=30)
        check(p.returncode == 2 and "bad value" in p.stderr, f"{args}: {p.returncode} {p.stderr}")


def main():
    tmp = tempfile.mkdtemp(prefix="arq-bench-smoke-", dir="/var/tmp")
    d = harness.Arqd(ARQD, os.path.join(tmp, "data"))
    try:
        open_loop(d)
        closed_loop(d)
        catchup(d, os.path.join(tmp, "data"))
        storm(d)
        nats(tmp)
        redis(tmp)
        usage_errors()
    finally:
        rc = d.stop()
        check(rc == 0, f"arqd exit {rc}")
        shutil.rmtree(tmp, ignore_errors=True)
    if failures:
        print(f"{len(failures)} check(s) failed", flush=True)
        sys.exit(1)
    print("arq-bench smoke: ok", flush=True)


if __name__ == "__main__":
    main()
