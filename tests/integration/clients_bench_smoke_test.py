#!/usr/bin/python3
"""The client benchmark (bench/clients.sh and its three drivers) runs end to
end and reports what it measured, consistently (docs/benchmarks.md, "Client
libraries: JS and Python against libarq").

Usage: clients_bench_smoke_test.py PATH_TO_ARQD PATH_TO_ARQ_CLIENT_BENCH BUILD_DIR [NODE]

Tiny counts; no figure is compared with a speed (that is the benchmark's
job, not a test's). Checked:
- each driver (libarq's arq-client-bench, bench_py.py, and bench_js.mjs when
  NODE is given) completes each mode against a real arqd, the reconnect mode
  through the cut proxy, and prints one JSON line with the same fields as the
  others, rates and times positive, every cut followed by a resumed session;
- a driver refuses bad usage with exit 2, and fails (exit 1, a message on
  stderr) when the reconnect mode has no cut proxy to ask;
- bench/clients.sh (2 repetitions) prints a row per client in its 3 tables,
  libarq's own ratios are 1, and afterwards the arqd and the cut proxy it
  started (by the PIDs it printed) are gone and its directory is removed.
"""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ARQD, CBENCH, BUILD = sys.argv[1], sys.argv[2], os.path.abspath(sys.argv[3])
NODE = sys.argv[4] if len(sys.argv) > 4 else None
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, "..", ".."))
sys.path.insert(0, HERE)
import harness  # noqa: E402
from harness import check, failures  # noqa: E402

PYTHON = "/usr/bin/python3"
DRIVERS = {"libarq": [CBENCH], "python": [PYTHON, os.path.join(ROOT, "bench/clients/bench_py.py")]}
if NODE:
    DRIVERS["js"] = [NODE, os.path.join(ROOT, "bench/clients/bench_js.mjs")]
COUNT, WARMUP, WINDOW, CUTS = 300, 20, 64, 3

RATE_FIELDS = {"client", "library", "mode", "count", "size", "window", "seconds", "msgs_per_s",
               "cpu_s", "cpu_us_per_msg", "server_cpu"}
RECONNECT_FIELDS = {"client", "library", "mode", "cuts", "size", "resumed", "median_ms", "p90_ms",
                    "min_ms", "max_ms", "detect_ms", "backoff_ms", "handshake_ms", "samples_ms"}


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def run(client, *args, timeout=60):
    return subprocess.run(DRIVERS[client] + list(args), capture_output=True, text=True,
                          timeout=timeout)


def driver(client, mode, url, prefix, *extra, server_pid=None):
    """One run; its JSON, or None (a failed check says why)."""
    args = ["--url", url, "--prefix", prefix, "--mode", mode, "--count", str(COUNT), "--size",
            "100", "--window", str(WINDOW), "--warmup", str(WARMUP), "--cuts", str(CUTS),
            "--timeout", "30", *extra]
    if server_pid is not None:
        args += ["--server-pid", str(server_pid)]
    p = run(client, *args)
    if not check(p.returncode == 0, f"{client} {mode}: exit {p.returncode}: {p.stderr[-2000:]}"):
        return None
    lines = p.stdout.splitlines()
    check(len(lines) == 1, f"{client} {mode}: one line on stdout: {p.stdout[:500]!r}")
    try:
        return json.loads(lines[0])
    except (IndexError, json.JSONDecodeError):
        check(False, f"{client} {mode}: not JSON: {p.stdout[:500]!r}")
        return None


def check_rate(client, mode, r):
    what = f"{client} {mode}"
    check(set(r) == RATE_FIELDS, f"{what}: fields {sorted(r)}")
    check(r.get("client") == client and r.get("mode") == mode, f"{what}: named {r.get('client')} "
          f"{r.get('mode')}")
    check(r.get("count") == COUNT and r.get("size") == 100 and r.get("window") == WINDOW,
          f"{what}: options echoed: {r}")
    check(r.get("seconds", 0) > 0 and r.get("msgs_per_s", 0) > 0, f"{what}: positive rate: {r}")
    secs, rate = r.get("seconds", 0), r.get("msgs_per_s", 0)
    check(secs > 0 and abs(rate - COUNT / secs) <= 0.01 * rate + 1,
          f"{what}: msgs_per_s is count / seconds: {r}")
    check(r.get("cpu_s", -1) >= 0 and r.get("cpu_us_per_msg", -1) >= 0, f"{what}: CPU: {r}")
    check(isinstance(r.get("server_cpu"), (int, float)) and r["server_cpu"] >= 0,
          f"{what}: arqd's CPU read with --server-pid: {r.get('server_cpu')}")


def check_reconnect(client, r):
    what = f"{client} reconnect"
    check(set(r) == RECONNECT_FIELDS, f"{what}: fields {sorted(r)}")
    check(r.get("client") == client and r.get("mode") == "reconnect", f"{what}: named: {r}")
    check(r.get("cuts") == CUTS and r.get("resumed") == CUTS,
          f"{what}: every one of {CUTS} cuts resumed the session: {r}")
    s = r.get("samples_ms") or []
    check(len(s) == CUTS and all(x > 0 for x in s), f"{what}: {CUTS} positive samples: {s}")
    if len(s) == CUTS:
        check(r["min_ms"] == min(s) and r["max_ms"] == max(s), f"{what}: min/max of the samples")
        check(0 < r["min_ms"] <= r["median_ms"] <= r["p90_ms"] <= r["max_ms"],
              f"{what}: min <= median <= p90 <= max: {r}")
    check(r.get("detect_ms", -1) > 0 and r.get("backoff_ms", -1) >= 0
          and r.get("handshake_ms", -1) > 0, f"{what}: the parts: {r}")


def drivers_directly(tmp):
    d = harness.Arqd(ARQD, os.path.join(tmp, "data"))
    proxy = subprocess.Popen([PYTHON, os.path.join(ROOT, "bench/clients/cut_proxy.py"),
                              str(d.port)], stdout=subprocess.PIPE, text=True)
    try:
        m = re.match(r"cut_proxy listening (127\.0\.0\.1:\d+) control (127\.0\.0\.1:\d+)$",
                     proxy.stdout.readline().strip())
        if not check(m is not None, "the cut proxy starts"):
            return
        data, control = m.groups()
        for client in DRIVERS:
            for mode in ("publish", "delivery"):
                r = driver(client, mode, d.url, f"smoke.{client}.{mode}",
                           server_pid=d.proc.pid)
                if r is not None:
                    check_rate(client, mode, r)
            r = driver(client, "reconnect", f"ws://{data}/ws", f"smoke.{client}.rc",
                       "--control", control)
            if r is not None:
                check_reconnect(client, r)
            # bad usage: exit 2; a reconnect without the proxy: exit 1, said on stderr
            p = run(client, "--url", d.url, "--prefix", "x", "--mode", "sideways")
            check(p.returncode == 2, f"{client}: --mode sideways: exit {p.returncode}")
            p = run(client, "--url", d.url, "--prefix", f"smoke.{client}.noproxy", "--mode",
                    "reconnect", "--cuts", "1")
            check(p.returncode == 1 and "control" in p.stderr,
                  f"{client}: reconnect without --control: exit {p.returncode}, {p.stderr!r}")
    finally:
        proxy.send_signal(signal.SIGTERM)
        try:
            proxy.wait(10)
        except subprocess.TimeoutExpired:
            proxy.kill()
        rc = d.stop()
        check(rc == 0, f"arqd stops cleanly: {rc} {d.stderr[-1000:]}")


def orchestrator():
    clients = " ".join(["libarq", "python"] + (["js"] if NODE else []))
    env = dict(os.environ, REPS="2", COUNT="200", WARMUP="10", CUTS="2", WINDOW="50",
               CLIENTS=clients, DRIVER_TIMEOUT="30")
    if NODE:
        env["NODE"] = NODE
    p = subprocess.run(["bash", os.path.join(ROOT, "bench/clients.sh"), BUILD], env=env,
                       capture_output=True, text=True, timeout=240)
    out = p.stdout + p.stderr
    if not check(p.returncode == 0, f"clients.sh: exit {p.returncode}: {out[-3000:]}"):
        return
    for c in clients.split():
        rows = re.findall(rf"^\| {c} +\|.*\|$", p.stdout, re.M)
        check(len(rows) == 3, f"clients.sh: {c} has a row in each of the 3 tables: {rows}")
        if rows and c == "libarq":
            check(rows[0].count("| 1 (1; 1-1) ") == 3,
                  f"clients.sh: libarq's ratios are 1: {rows[0]}")
        for rep in (1, 2):
            for mode in ("publish", "delivery", "reconnect"):
                check(re.search(rf"^  {rep} {mode} {c}: ", p.stderr, re.M) is not None,
                      f"clients.sh: repetition {rep}, {mode}, {c} reported")
    m = re.search(r"arqd pid (\d+) at .*; cut proxy pid (\d+) at", p.stdout)
    tmp = re.search(r"data under (/var/tmp/arq-clients\.\w+) ", p.stdout)
    if check(m is not None and tmp is not None, "clients.sh names its PIDs and directory"):
        for pid in map(int, m.groups()):
            deadline = time.monotonic() + 5
            while alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            check(not alive(pid), f"clients.sh stopped pid {pid}")
        check(not os.path.exists(tmp.group(1)), f"clients.sh removed {tmp.group(1)}")


def main():
    if not NODE:
        print("no node (or clients/js not built): the JS driver is left out", flush=True)
    tmp = tempfile.mkdtemp(prefix="arq-clients-smoke.", dir="/var/tmp")
    try:
        drivers_directly(tmp)
        orchestrator()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if failures:
        print(f"{len(failures)} check(s) failed", flush=True)
        sys.exit(1)
    print(f"clients bench smoke: {', '.join(DRIVERS)}: all checks passed", flush=True)


if __name__ == "__main__":
    main()
