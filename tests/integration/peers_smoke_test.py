#!/usr/bin/python3
"""bench/peers.sh runs end to end and its verdicts follow from its own rows.

Usage: peers_smoke_test.py PATH_TO_PEERS_SH BUILD_DIR

One short invocation (1 s windows, 4 connections, 1 subscriber, ROUNDS=3)
against the arqd, redis-server and nats-server the script starts itself.
No speed is compared with anything; what is checked is the script's own
arithmetic and housekeeping:
- every round of both depths is printed, and each row's ratio is its ARQ
  rate over its Redis rate, with "met" exactly when the ratio is >= 1;
- the verdict line gives, per depth, the median of that depth's printed
  ratios, and "met" exactly when that median is >= 1;
- the group-commit summary lists every round's ARQ run;
- the NATS table is there exactly when nats-server is installed;
- the Redis latency rows (arq-redis-bench) ran at half of Redis's printed
  peak and at ARQ's half-peak rate, and the p99 comparison quotes them;
- afterwards the servers it started are gone (by the PIDs it printed) and
  its data directory is removed.
"""
import os
import re
import shutil
import subprocess
import sys

PEERS, BUILD = sys.argv[1], os.path.abspath(sys.argv[2])
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import check, failures  # noqa: E402

ROUNDS = 3
CONNS = 4


def median(xs):
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie is gone for our purpose: it no longer runs.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def latency_row(out, head):
    """(rate in the heading, achieved rate, delivery p99 ms) of a latency row."""
    m = re.search(rf"^{head}: (\d+) \w+/s open loop.*:\n  achieved (\d+) publishes/s; "
                  r"delivery p50 [\d.]+ ms, p99 ([\d.]+) ms", out, re.M)
    return (int(m.group(1)), int(m.group(2)), float(m.group(3))) if m else None


def check_redis_latency(out):
    """The Redis latency rows: at half of Redis's printed peak and at ARQ's
    half-peak rate, both run (deliveries came back), and the p99 comparison
    quotes the two rows it names."""
    peak = re.search(r"^Peak with 1 subscribers \(\d+ x 16\): (\d+) XADD/s$", out, re.M)
    check(peak is not None, "Redis peak with subscribers printed")
    arq = latency_row(out, "Latency at half of that peak")
    half = latency_row(out, "Redis at half of its peak")
    same = latency_row(out, "Redis at ARQ's half-peak rate")
    check(arq is not None and half is not None and same is not None,
          f"latency rows: ARQ {arq}, Redis half {half}, Redis at ARQ's rate {same}")
    if not (peak and arq and half and same):
        return
    # the peak is printed rounded to units, the half is taken from the raw rate
    check(abs(half[0] - int(peak.group(1)) / 2) <= 1,
          f"Redis half {half[0]} is not half of its peak {peak.group(1)}")
    check(same[0] == arq[0], f"Redis ran at {same[0]}/s, ARQ's half-peak rate is {arq[0]}/s")
    check(half[1] > 0 and same[1] > 0, f"Redis rows achieved {half[1]}, {same[1]} XADD/s")
    cmp = re.search(r"^Delivery p99 at (\d+)/s: ARQ ([\d.]+) ms, Redis ([\d.]+) ms; "
                    r"ARQ/Redis ([\d.]+)", out, re.M)
    check(cmp is not None, "p99 comparison printed")
    if cmp:
        a, r, ratio = float(cmp.group(2)), float(cmp.group(3)), float(cmp.group(4))
        check(int(cmp.group(1)) == arq[0] and a == arq[2] and r == same[2],
              f"comparison {cmp.group(0)!r} does not quote the rows ({arq}, {same})")
        check(r > 0 and abs(ratio - a / r) <= 0.005 + 0.005 * a / r**2 + 0.005 / r,
              f"ARQ/Redis {ratio} is not {a}/{r}")


def main():
    missing = [t for t in ("redis-server", "redis-benchmark", "redis-cli", "jq")
               if not shutil.which(t)]
    if missing:
        print(f"peers smoke: skipped, not installed: {missing}", flush=True)
        sys.exit(77)
    env = dict(os.environ, SECONDS_PER_RUN="1", ROUNDS=str(ROUNDS), CONNS=str(CONNS),
               SUBS="1")
    env.pop("KEEP", None)
    env.pop("ARQD_ARGS", None)
    p = subprocess.run(["bash", PEERS, BUILD], capture_output=True, text=True, env=env,
                       timeout=280)
    out = p.stdout + p.stderr
    check(p.returncode == 0, f"peers.sh exit {p.returncode}: {out[-3000:]}")

    # | 4 x 1, 2   |  ARQ/s | ARQ p99 | Redis/s | Redis p99 | ratio | met/MISSED |
    row = re.compile(r"^\| (\d+) x (\d+), (\d+) +\| +(\d+) \| +[\d.]+ \| +(\d+) \| +[\d.]+ \| "
                     r"+([\d.]+) \| +(met|MISSED) \|$", re.M)
    ratios = {1: {}, 16: {}}
    for m in row.finditer(out):
        conns, depth, rnd = int(m.group(1)), int(m.group(2)), int(m.group(3))
        arq, redis, ratio, verdict = int(m.group(4)), int(m.group(5)), float(m.group(6)), m.group(7)
        check(conns == CONNS and depth in ratios, f"row {m.group(0)!r}")
        if depth not in ratios:
            continue
        ratios[depth][rnd] = ratio
        if redis > 0:
            # the rates are printed rounded to units, the ratio to 0.01
            check(abs(arq / redis - ratio) <= 0.005 + 1.0 / redis + arq / redis**2,
                  f"row ratio {ratio} is not {arq}/{redis}")
        check(verdict == ("met" if ratio >= 1 else "MISSED") or abs(ratio - 1) < 0.005,
              f"row verdict {verdict} for ratio {ratio}")
    for depth in (1, 16):
        check(sorted(ratios[depth]) == list(range(1, ROUNDS + 1)),
              f"rounds printed for depth {depth}: {sorted(ratios[depth])}")

    line = re.search(r"ARQ/Redis, the goal's verdict:(.*)", out)
    check(line is not None, "verdict line printed")
    if line:
        for depth in (1, 16):
            m = re.search(rf"{CONNS} x {depth}: median ([\d.]+) over {ROUNDS} round\(s\) "
                          r"\((met|MISSED)\);", line.group(1))
            check(m is not None, f"median for depth {depth} in {line.group(1)!r}")
            if m and len(ratios[depth]) == ROUNDS:
                want = median(list(ratios[depth].values()))
                got = float(m.group(1))
                # the printed ratios are rounded to 0.01 and so is the median
                check(abs(got - want) <= 0.0101, f"depth {depth}: median {got}, rows give {want}")
                check(m.group(2) == ("met" if got >= 1 else "MISSED") or abs(got - 1) < 0.0051,
                      f"depth {depth}: verdict {m.group(2)} for median {got}")

    for r in range(1, ROUNDS + 1):
        for name in (f"arq_w1.{r}", f"arq_w16.{r}"):
            check(re.search(rf"^  {re.escape(name)} +[\d.]+ msgs/commit", out, re.M) is not None,
                  f"group-commit summary lists {name}")

    has_nats = shutil.which("nats-server") is not None
    check(("Against NATS JetStream" in out) == has_nats,
          f"NATS table present: {'Against NATS JetStream' in out}, nats-server: {has_nats}")
    check("goal delivery p99 <= 2 ms:" in out, "latency verdict printed")
    check_redis_latency(out)

    pids = [int(x) for x in re.findall(r"\bpid (\d+)", out.split("\n==", 1)[0])]
    check(len(pids) >= 2 + has_nats, f"server PIDs printed: {pids}")
    for pid in pids:
        check(not alive(pid), f"pid {pid} still runs after peers.sh exited")
    tmp = re.search(r"data under (\S+)", out)
    check(tmp is not None and not os.path.exists(tmp.group(1)),
          f"data directory removed: {tmp.group(1) if tmp else None}")

    if failures:
        print(f"{len(failures)} check(s) failed", flush=True)
        sys.exit(1)
    print(f"peers smoke: ok ({ROUNDS} rounds, medians checked)", flush=True)


if __name__ == "__main__":
    main()
