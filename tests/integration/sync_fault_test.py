#!/usr/bin/python3
"""MySQL sync under faults, against a real MariaDB (scripts/mariadb).

Usage: sync_fault_test.py ARQD WAL_DUMP MARIADB_SCRIPT

A publisher keeps publishing through the server API (each message with a
message id, retried with the same id until acknowledged) while:
  1. arqd is SIGKILLed at random moments and restarted (>= 20 cycles);
  2. MariaDB is SIGSTOPped (then continued) or SIGKILLed (then restarted on
     the same port) during the load (>= 10 cycles). Publishes must keep being
     acknowledged during every MariaDB outage.
Then, once the sync has caught up: MySQL equals the WAL, record for record
(same seq, stream, offset, checksum, length), with no duplicate and every
acknowledged message present exactly once.
"""
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

ARQD, WAL_DUMP, MARIADB = sys.argv[1:4]
SEED = int(os.environ.get("ARQ_TEST_SEED", random.randrange(1 << 30)))
rng = random.Random(SEED)
print(f"seed {SEED} (set ARQ_TEST_SEED to reproduce)", flush=True)
CRASH_CYCLES = int(os.environ.get("ARQ_SYNC_CRASH_CYCLES", "20"))
DB_CYCLES = int(os.environ.get("ARQ_SYNC_DB_CYCLES", "10"))

failures = []


def check(cond, what):
    if not cond:
        failures.append(what)
        print(f"FAIL: {what}", flush=True)
    return cond


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class MariaDB:
    def __init__(self, d):
        self.dir = d
        out = subprocess.run([MARIADB, "start", d], check=True, capture_output=True,
                             text=True).stdout
        self.url = out.strip().split("DATABASE_URL=", 1)[1]
        self.port = int(self.url.rsplit(":", 1)[1].split("/")[0])

    def pid(self):
        with open(os.path.join(self.dir, "mariadbd.pid")) as f:
            return int(f.read().strip())

    def restart(self):
        subprocess.run([MARIADB, "start", self.dir, str(self.port)], check=True,
                       capture_output=True)

    def stop(self):
        subprocess.run([MARIADB, "stop", self.dir], check=False, capture_output=True)

    def query(self, sql):
        out = subprocess.run(["mariadb", "--no-defaults",
                              f"--socket={os.path.join(self.dir, 'mariadbd.sock')}", "-uroot",
                              "arq", "-N", "-B", "-e", sql],
                             check=True, capture_output=True, text=True).stdout
        return [line.split("\t") for line in out.splitlines()]


class Arqd:
    def __init__(self, data, port, url, log):
        env = {k: v for k, v in os.environ.items()
               if k not in ("SECRET_KEY", "API_PORT", "API_HOST", "ARQ_API_KEY")}
        env["DATABASE_URL"] = url
        self.proc = subprocess.Popen(
            [ARQD, "--host", "127.0.0.1", "--port", str(port), "--data-dir", data,
             "--anonymous", "--set", "auth.api_open=true"],
            stdout=subprocess.PIPE, stderr=log, text=True, env=env)
        line = self.proc.stdout.readline()
        if "listening on" not in line:
            self.proc.kill()
            raise SystemExit(f"arqd did not start: {line!r}")
        self.port = port

    def http(self, method, path, body=None, timeout=5):
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", method=method,
                                     data=body)
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()

    def kill(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=30)


class Publisher(threading.Thread):
    """Sequential server-API publishes; a failed one is retried with the same
    msgid (so a publish acknowledged before a crash is never appended twice)."""

    def __init__(self, port):
        super().__init__(daemon=True)
        self.port = port
        self.stop_flag = threading.Event()
        self.acked = {}  # msgid -> (stream, offset)
        self.lock = threading.Lock()

    def count(self):
        with self.lock:
            return len(self.acked)

    def run(self):
        i = 0
        while not self.stop_flag.is_set():
            msgid = f"m{i}"
            stream = f"sync.{i % 5}"
            body = json.dumps({"stream": stream, "payload": f"payload {i} " + "x" * (i % 50),
                               "msgid": msgid}).encode()
            while not self.stop_flag.is_set():
                try:
                    req = urllib.request.Request(f"http://127.0.0.1:{self.port}/api/publish",
                                                 method="POST", data=body,
                                                 headers={"Content-Type": "application/json"})
                    with urllib.request.urlopen(req, timeout=5) as r:
                        res = json.loads(r.read())
                    with self.lock:
                        self.acked[msgid] = (stream, res["offset"])
                    break
                except (urllib.error.URLError, ConnectionError, OSError, ValueError):
                    time.sleep(0.02)
            i += 1


def health(a):
    try:
        st, body = a.http("GET", "/health", timeout=2)
        return json.loads(body)
    except (urllib.error.URLError, ConnectionError, OSError, ValueError):
        return None


def wait_synced(a, timeout=180):
    deadline = time.time() + timeout
    h = None
    while time.time() < deadline:
        h = health(a)
        if h and h["sync"]["state"] == "ok" and h["sync"]["lag_records"] == 0:
            return h
        time.sleep(0.2)
    check(False, f"sync did not catch up: {h}")
    return h


def main():
    tmp = tempfile.mkdtemp(prefix="arq-syncfault-", dir="/var/tmp")
    data = os.path.join(tmp, "data")
    log = open(os.path.join(tmp, "arqd.log"), "w")
    db = MariaDB(os.path.join(tmp, "mdb"))
    url = db.url + "?connect_timeout=1&read_timeout=2&write_timeout=2"
    port = free_port()
    a = Arqd(data, port, url, log)
    pub = Publisher(port)
    print(f"MariaDB pid {db.pid()} port {db.port}, arqd port {port}", flush=True)
    try:
        pub.start()
        # 1. arqd SIGKILLed during load and sync, restarted on the same data
        for cycle in range(CRASH_CYCLES):
            time.sleep(rng.uniform(0.1, 0.5))
            a.kill()
            a = Arqd(data, port, url, log)
        print(f"crash cycles: {CRASH_CYCLES}, acked so far {pub.count()}", flush=True)

        # 2. MariaDB stopped or killed during load: publishing goes on
        for cycle in range(DB_CYCLES):
            time.sleep(rng.uniform(0.2, 0.5))
            before = pub.count()
            try:
                os.kill(db.pid(), 0)
            except OSError:
                with open(os.path.join(db.dir, "mariadbd.err")) as f:
                    print("MariaDB died:\n" + "".join(f.readlines()[-15:]), flush=True)
                raise
            if cycle % 2 == 0:
                pid = db.pid()
                os.kill(pid, signal.SIGSTOP)
                time.sleep(rng.uniform(0.5, 1.5))
                during = pub.count()
                os.kill(pid, signal.SIGCONT)
                kind = "SIGSTOP"
            else:
                os.kill(db.pid(), signal.SIGKILL)
                time.sleep(rng.uniform(0.5, 1.0))
                during = pub.count()
                db.restart()
                kind = "SIGKILL"
            check(during > before,
                  f"db cycle {cycle} ({kind}): no publish acknowledged during the outage "
                  f"({before} -> {during})")
        print(f"db cycles: {DB_CYCLES}, acked so far {pub.count()}", flush=True)
        time.sleep(0.5)
        pub.stop_flag.set()
        pub.join(timeout=30)
        h = wait_synced(a)
        print(f"synced: {h['sync'] if h else None}", flush=True)

        # MySQL equals the WAL
        rc = a.stop()
        check(rc == 0, f"arqd exit status on SIGTERM: {rc}")
        wal = subprocess.run([WAL_DUMP, data], check=True, capture_output=True,
                             text=True).stdout.splitlines()
        wal_rows = [line.split("\t") for line in wal]
        sql_rows = db.query("SELECT seq, stream, `offset`, LOWER(LPAD(HEX(checksum), 16, '0')), "
                            "LENGTH(payload) FROM arq_messages ORDER BY seq")
        check(len(wal_rows) > 0, "the WAL has records")
        check(len(wal_rows) == len(sql_rows),
              f"row counts: WAL {len(wal_rows)}, MySQL {len(sql_rows)}")
        diff = [(w, s) for w, s in zip(wal_rows, sql_rows) if w != s]
        check(not diff, f"WAL and MySQL differ at {len(diff)} rows, first: {diff[:3]}")
        dup = db.query("SELECT COUNT(*) - COUNT(DISTINCT msgid) FROM arq_messages")
        check(dup == [["0"]], f"duplicate message ids in MySQL: {dup}")
        gaps = db.query("SELECT stream, COUNT(*), MIN(`offset`), MAX(`offset`) FROM arq_messages "
                        "GROUP BY stream")
        for stream, n, lo, hi in gaps:
            check(lo == "1" and int(hi) == int(n), f"offsets of {stream} not 1..N: {n} {lo} {hi}")
        got = {r[0]: (r[1], int(r[2])) for r in
               db.query("SELECT msgid, stream, `offset` FROM arq_messages")}
        missing = [m for m, v in pub.acked.items() if got.get(m) != v]
        check(not missing, f"{len(missing)} acknowledged publishes not in MySQL as acked, "
                           f"e.g. {missing[:5]}")
        wm = db.query("SELECT watermark_seq FROM arq_sync_state")
        check(wm and int(wm[0][0]) == len(wal_rows), f"watermark {wm} vs {len(wal_rows)} records")
        print(f"{len(wal_rows)} records, {len(pub.acked)} acknowledged publishes, "
              f"MySQL == WAL", flush=True)
    finally:
        pub.stop_flag.set()
        if a.proc.poll() is None:
            a.proc.kill()
            a.proc.wait()
        try:
            os.kill(db.pid(), signal.SIGCONT)
        except (OSError, ValueError):
            pass
        db.stop()
        log.close()
        if failures:
            with open(os.path.join(tmp, "arqd.log")) as f:
                print("arqd log (tail):\n" + "".join(f.readlines()[-30:]), flush=True)
        if failures or os.environ.get("ARQ_KEEP_TMP"):
            print(f"kept {tmp}", flush=True)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    if failures:
        print(f"{len(failures)} check(s) failed", flush=True)
        sys.exit(1)
    print("all sync fault checks passed", flush=True)


main()
