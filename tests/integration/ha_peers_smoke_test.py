#!/usr/bin/python3
"""bench/ha_peers.sh runs end to end, reports both replicated peers and cleans up.

Usage: ha_peers_smoke_test.py PATH_TO_HA_PEERS_SH BUILD_DIR

One short invocation (1 s windows, 4 connections) against the 3-node NATS
JetStream cluster and the Redis primary with 2 replicas the script starts
itself (~20 s). No speed is compared with anything; what is checked:
- the JSON report has, for NATS (R3) and for Redis (XADD + WAIT 1), a row at
  depth 1 and at depth 16, each with a non-zero rate and latencies, and the
  NATS rows were measured on a 3-replica stream over 3 servers;
- Redis's WAIT rows say how many publishes fell short of a replica
  (wait_short, a number), and none was refused;
- the NATS quorum check found no PubAck while both followers were stopped
  and one with a single follower stopped;
- the ARQ rows are skipped with a reason when ARQ_HA is not set;
- afterwards the servers it started (by the PIDs it printed) are gone and
  its data directory is removed.
Skipped (77) without nats-server, redis-server, redis-cli or jq.
"""
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

HA, BUILD = sys.argv[1], os.path.abspath(sys.argv[2])
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import check, failures  # noqa: E402


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


def main():
    missing = [t for t in ("nats-server", "redis-server", "redis-cli", "jq") if not shutil.which(t)]
    if missing:
        print(f"ha_peers smoke: skipped, not installed: {missing}", flush=True)
        sys.exit(77)
    with tempfile.TemporaryDirectory() as d:
        out_json = os.path.join(d, "ha_peers.json")
        env = dict(os.environ, SECONDS_PER_RUN="1", CONNS="4", ROUNDS="1", OUT=out_json)
        for k in ("KEEP", "ARQ_HA"):
            env.pop(k, None)
        p = subprocess.run(["bash", HA, BUILD], capture_output=True, text=True, env=env,
                           timeout=120)
        out = p.stdout + p.stderr
        check(p.returncode == 0, f"ha_peers.sh exit {p.returncode}: {out[-3000:]}")
        report = None
        try:
            with open(out_json) as f:
                report = json.load(f)
        except (OSError, ValueError) as e:
            check(False, f"JSON report {out_json}: {e}")

    if report is not None:
        check(report.get("conns") == 4 and report.get("seconds_per_run") == 1,
              f"config in the report: {report.get('conns')}, {report.get('seconds_per_run')}")
        for peer in ("nats", "redis"):
            rows = report.get(peer, {}).get("rows", [])
            depths = sorted(r.get("depth") for r in rows)
            check(depths == [1, 16], f"{peer}: rows at depths {depths}")
            for r in rows:
                what = f"{peer} 4 x {r.get('depth')}"
                check((r.get("publishes_per_s") or 0) > 0, f"{what}: rate {r.get('publishes_per_s')}")
                check((r.get("p50_us") or 0) > 0 and (r.get("p99_us") or 0) >= r.get("p50_us", 0),
                      f"{what}: p50 {r.get('p50_us')} us, p99 {r.get('p99_us')} us")
                check(r.get("errors") == 0, f"{what}: errors {r.get('errors')}")
                raw = r.get("raw", {})
                if peer == "nats":
                    cfg = raw.get("config", {})
                    check(cfg.get("replicas") == 3 and cfg.get("servers") == 3,
                          f"{what}: replicas {cfg.get('replicas')}, servers {cfg.get('servers')}")
                    check(raw.get("stream_leader") in ("n1", "n2", "n3"),
                          f"{what}: stream leader {raw.get('stream_leader')!r}")
                else:
                    check(raw.get("config", {}).get("wait") == 1,
                          f"{what}: WAIT {raw.get('config', {}).get('wait')}")
                    check(isinstance(raw.get("wait_short"), int),
                          f"{what}: wait_short {raw.get('wait_short')!r}")
        q = report.get("nats", {}).get("quorum_check", {})
        check(q.get("ok") is True and q.get("ack_with_both_followers_stopped") is False
              and q.get("ack_with_one_follower_stopped") is True, f"quorum check: {q}")
        check("skipped" in report.get("arq", {}), f"ARQ rows without ARQ_HA: {report.get('arq')}")
        check("NATS JetStream R3" in out and "Redis XADD+WAIT 1" in out, "table printed")

    head = out.split("\n==", 1)[0]
    pids = [int(x) for x in re.findall(r"\d+", " ".join(re.findall(r"pids ([\d ]+)", head)))]
    check(len(pids) == 6, f"server PIDs printed: {pids}")
    for pid in pids:
        check(not alive(pid), f"pid {pid} still runs after ha_peers.sh exited")
    tmp = re.search(r"data under (\S+)", out)
    check(tmp is not None and not os.path.exists(tmp.group(1)),
          f"data directory removed: {tmp.group(1) if tmp else None}")

    if failures:
        print(f"{len(failures)} check(s) failed", flush=True)
        sys.exit(1)
    print("ha_peers smoke: ok", flush=True)


if __name__ == "__main__":
    main()
