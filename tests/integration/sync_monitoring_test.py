#!/usr/bin/python3
"""Monitoring that fires for the MySQL sync (issue #18).

Usage: sync_monitoring_test.py ARQD MARIADB_SCRIPT ARQ_RULES_YML GRAFANA_JSON

Against a private MariaDB (scripts/mariadb):
  - MySQL unreachable from the start: arq_sync_lag_seconds grows while
    lag_records does (it stayed 0.000), and arqd says sync_degraded once;
  - MySQL stopped under a running arqd: one `level=warn event=sync_down` line
    with the reason, the lag grows; MySQL back: `event=sync_up`, lag 0 and
    /health's last_error cleared;
  - a MySQL error quoting UTF-8 (a user name "üser"): /health's last_error
    holds the characters, not each byte escaped;
  - every metric deploy/prometheus/arq-rules.yml and the Grafana dashboard
    use is one arqd exports.
Assertions are on behaviour (a value that grows, a line that appears once);
the waits are generous deadlines.
"""
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

ARQD, MARIADB, RULES, DASHBOARD = sys.argv[1:5]
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from harness import failures  # noqa: E402


def check(cond, what):
    return harness.check(cond, what, verbose=True)


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


class Arqd:
    def __init__(self, tmp, name, url):
        self.log = os.path.join(tmp, name + ".log")
        env = {k: v for k, v in os.environ.items()
               if k not in ("SECRET_KEY", "API_PORT", "API_HOST", "ARQ_API_KEY", "ARQ_ANONYMOUS")}
        env["DATABASE_URL"] = url
        self.proc = subprocess.Popen(
            [ARQD, "--host", "127.0.0.1", "--port", "0", "--data-dir", os.path.join(tmp, name),
             "--anonymous", "--set", "auth.api_open=true"],
            stdout=subprocess.PIPE, stderr=open(self.log, "w"), text=True, env=env)
        line = self.proc.stdout.readline()
        m = re.search(r":(\d+)/ws", line)
        if not m:
            raise SystemExit(f"arqd did not start: {line!r} {open(self.log).read()}")
        self.port = int(m.group(1))

    def get(self, path):
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=10) as r:
            return r.read()

    def health(self):
        return json.loads(self.get("/health"))

    def metric(self, name):
        for line in self.get("/metrics").decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        return None

    def publish(self, n, stream="mon.s"):
        for i in range(n):
            req = urllib.request.Request(f"http://127.0.0.1:{self.port}/api/publish",
                                         data=json.dumps({"stream": stream,
                                                          "payload": f"m{i}"}).encode(),
                                         method="POST",
                                         headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=10) as r:
                r.read()

    def text(self):
        return open(self.log, errors="replace").read()

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


def wait(pred, timeout=60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(0.1)
    return None


def lag_grows(a):
    """Two readings of arq_sync_lag_seconds, the second larger and > 0."""
    first = wait(lambda: (a.metric("arq_sync_lag_seconds") or 0) > 0 and
                 a.metric("arq_sync_lag_seconds"))
    if not first:
        return False, None, None
    second = wait(lambda: (a.metric("arq_sync_lag_seconds") or 0) > first + 0.5 and
                  a.metric("arq_sync_lag_seconds"), timeout=30)
    return bool(second), first, second


def main():
    tmp = tempfile.mkdtemp(prefix="arq-syncmon-", dir="/var/tmp")
    mdb_dir = os.path.join(tmp, "mariadb")
    procs = []
    try:
        out = subprocess.run([MARIADB, "start", mdb_dir], check=True, capture_output=True,
                             text=True).stdout
        url = out.strip().split("DATABASE_URL=", 1)[1]
        mport = int(url.rsplit(":", 1)[1].split("/")[0])
        opts = "?connect_timeout=1&read_timeout=2&write_timeout=2"

        # 1. MySQL unreachable since the start
        dead = f"mysql://arq:x@127.0.0.1:{free_port()}/arq{opts}"
        a = Arqd(tmp, "down-from-start", dead)
        procs.append(a)
        a.publish(5)
        ok, l1, l2 = lag_grows(a)
        check(ok, f"MySQL down from the start: arq_sync_lag_seconds grows ({l1} -> {l2})")
        h = a.health()
        check(h["sync"]["state"] == "degraded" and h["sync"]["lag_records"] == 5,
              f"/health sync while down: {h['sync']}")
        check(a.text().count("event=sync_degraded") == 1 and "event=sync_down" not in a.text(),
              "the start-up outage is said once (sync_degraded), not again by the watcher")
        a.stop()

        # 2. MySQL stopped under a running arqd, then back
        b = Arqd(tmp, "outage", url + opts)
        procs.append(b)
        b.publish(3)
        check(wait(lambda: b.health()["sync"].get("lag_records") == 0 and
                   b.health()["sync"]["state"] == "ok"), "synced while MySQL is up")
        subprocess.run([MARIADB, "stop", mdb_dir], check=True, capture_output=True)
        b.publish(4)
        check(wait(lambda: "event=sync_down" in b.text()), "sync_down is logged")
        line = next((x for x in b.text().splitlines() if "event=sync_down" in x), "")
        check("level=warn" in line and "reason=" in line and "lag_records=" in line,
              f"at warn level with its reason: {line}")
        ok, l1, l2 = lag_grows(b)
        check(ok, f"MySQL stopped: arq_sync_lag_seconds grows ({l1} -> {l2})")
        check(b.health()["sync"]["last_error"] != "", "last_error says why while it is down")
        subprocess.run([MARIADB, "start", mdb_dir, str(mport)], check=True, capture_output=True)
        check(wait(lambda: "event=sync_up" in b.text(), timeout=90), "sync_up is logged")
        h = wait(lambda: (lambda h: h["sync"]["state"] == "ok" and
                          h["sync"]["lag_records"] == 0 and h)(b.health()), timeout=60)
        check(h and h["sync"]["last_error"] == "" and h["sync"]["lag_seconds"] == 0,
              f"after recovery: lag 0, last_error cleared: {h and h['sync']}")
        check(b.text().count("event=sync_down") == 1, "one sync_down line for one outage")
        # the alert rules use only what arqd exports (with MySQL sync on)
        exported = {ln.split("{")[0].split()[0] for ln in b.get("/metrics").decode().splitlines()
                    if ln and not ln.startswith("#")}
        for path in (RULES, DASHBOARD):
            used = set(re.findall(r"\b((?:arq|process)_[a-z0-9_]+)", open(path).read()))
            used.discard("arq_rules")
            missing = sorted(u for u in used  # a histogram's name stands for its series
                             if u not in exported and u + "_count" not in exported)
            check(used and not missing,
                  f"every metric {os.path.basename(path)} names is exported: missing {missing}")
        b.stop()

        # 3. a MySQL error that quotes UTF-8
        bad_user = url.replace("mysql://arq:", "mysql://%C3%BCser:", 1) + opts
        c = Arqd(tmp, "utf8", bad_user)
        procs.append(c)
        raw = wait(lambda: (lambda r: b"ser" in r and r)(c.get("/health")))
        check(raw and "üser".encode() in raw and b"\\u00c3" not in raw,
              f"/health keeps UTF-8 in last_error: {raw!r}")
        check(raw and json.loads(raw)["sync"]["last_error"].find("üser") >= 0,
              "and it is valid JSON with the name in it")
        c.stop()
    finally:
        for p in procs:
            if p.proc.poll() is None:
                p.proc.kill()
                p.proc.wait()
        subprocess.run([MARIADB, "stop", mdb_dir], check=False, capture_output=True)
        if failures:
            for f in sorted(os.listdir(tmp)):
                if f.endswith(".log"):
                    print(f"--- {f}\n" + "".join(open(os.path.join(tmp, f)).readlines()[-12:]))
        shutil.rmtree(tmp, ignore_errors=True)
    if failures:
        print(f"{len(failures)} check(s) failed")
        sys.exit(1)
    print("all checks passed")


main()
