#!/usr/bin/python3
"""ack = replicated on a real 3-node Galera cluster (issue #20, part 1): the
machine running arqd is lost (kill -9 and its data directory deleted) and
every publish whose acknowledgement a client printed is in MySQL exactly
once, at the offset it was acknowledged with, in order.

Usage: ha_replicated_test.py ARQD ARQ ARQ_REPLAY GALERA_SCRIPT

- a 3-node Galera cluster (scripts/galera, SST by rsync) on loopback; arqd
  syncs into node 1 through a TCP proxy; the checks read node 2 (what node 1
  committed was certified and applied on the others);
- `arq pub -` with the deployment's wal.ack = replicated publishes lines
  under load while the test: kills Galera node 3 (the other two keep a
  primary component); partitions arqd from MySQL (the proxy blackholes every
  connection and refuses new ones): publishes are refused (503 replication
  unavailable / timeout, also on POST /api/publish), /health says degraded,
  nothing is acknowledged meanwhile that MySQL lacks; heals it; then kills
  arqd with SIGKILL and deletes its data directory;
- a subscriber (`arq sub --state FILE`) ran all along: everything it printed
  is in MySQL at the same offset (deliveries wait for MySQL in a replicated
  deployment); on a new machine, `arq-replay restore` from MySQL (keeping
  the epochs) and a new arqd, the subscriber resumes from its state file
  with the same epoch and gets exactly the rest: no reset, no gap, no
  duplicate;
- a fresh WAL pointed at that database is refused (sync "failed", the reason
  named) instead of never copying a record;
- negative control: the same with wal.ack = local (into another database)
  loses acknowledged publishes, which the same check reports: the test can
  see the loss it is designed to catch.
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

sys.dont_write_bytecode = True  # no __pycache__ in the source tree
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from arq_replay_util import Arqd, check, failures, free_port  # noqa: E402
from chaos_proxy import ChaosProxy  # noqa: E402


def wait_for(cond, what, timeout=60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    check(False, f"timed out waiting for {what}")
    return False


class Galera:
    def __init__(self, script, d):
        self.script, self.dir = script, d
        out = subprocess.run([script, "start", d, "3"], capture_output=True, text=True,
                             timeout=300)
        if out.returncode != 0:
            raise SystemExit(f"scripts/galera start failed: {out.stderr[-2000:]}")
        with open(os.path.join(d, "urls")) as f:
            self.urls = [u.strip() for u in f if u.strip()]

    def sql(self, k, stmt, db="arq"):
        out = subprocess.run(
            ["mariadb", "--no-defaults", f"--socket={self.dir}/node{k}/mariadbd.sock", "-uroot",
             "-N", "-B", db, "-e", stmt], capture_output=True, text=True, timeout=60)
        if out.returncode != 0:
            raise RuntimeError(f"node {k}: {stmt}: {out.stderr}")
        return [line.split("\t") for line in out.stdout.splitlines()]

    def kill(self, k):
        subprocess.run([self.script, "kill", self.dir, str(k)], check=True, timeout=60)

    def stop(self):
        subprocess.run([self.script, "stop", self.dir], timeout=120)


def port_of(url):
    return int(url.split("@", 1)[1].split("/", 1)[0].rsplit(":", 1)[1])


class Publisher:
    """`arq pub -` fed line by line from a thread; printed offsets collected.
    Line i is f"{tag}-{i:06d}"; the CLI prints offsets in input order, each
    once its puback arrived."""

    def __init__(self, arq, url, tag, stream, extra=()):
        self.tag = tag
        self.printed = []
        self.sent = 0
        self.stop_ev = threading.Event()
        self.proc = subprocess.Popen(
            [arq, "-u", url, "--msgid-prefix", f"{tag}-", "--retries", "0", *extra, "pub",
             stream, "-"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True, bufsize=1)
        self.t_in = threading.Thread(target=self._feed, daemon=True)
        self.t_out = threading.Thread(target=self._read, daemon=True)
        self.t_err = threading.Thread(target=self._drain_err, daemon=True)
        self.err = []
        self.t_in.start()
        self.t_out.start()
        self.t_err.start()

    def line(self, i):
        return f"{self.tag}-{i:06d}"

    def _feed(self):
        try:
            while not self.stop_ev.is_set():
                # at most 400 lines ahead of the acknowledgements: a bounded
                # backlog, so the run after a fault measures the fault
                if self.sent - len(self.printed) < 400:
                    for _ in range(20):
                        self.proc.stdin.write(self.line(self.sent) + "\n")
                        self.sent += 1
                    self.proc.stdin.flush()
                time.sleep(0.005)
        except (BrokenPipeError, ValueError, OSError):
            pass

    def _read(self):
        for line in self.proc.stdout:
            line = line.strip()
            if line.isdigit():
                self.printed.append(int(line))

    def _drain_err(self):
        for line in self.proc.stderr:
            self.err.append(line)

    def wait_more(self, n, what, timeout=90):
        want = len(self.printed) + n
        return wait_for(lambda: len(self.printed) >= want, f"{n} more acks ({what})", timeout)

    def kill(self):
        self.stop_ev.set()
        self.proc.kill()
        self.proc.wait()
        self.t_out.join(10)
        return list(self.printed)


def verify(g, db, stream, pub, printed):
    """(missing, wrong, dups, rows): printed acks absent from MySQL, printed
    offsets holding another line, lines stored twice, and all rows."""
    rows = g.sql(2, f"SELECT `offset`, CAST(payload AS CHAR) FROM arq_messages "
                    f"WHERE stream = '{stream}' ORDER BY `offset`", db=db)
    by_off = {int(o): p for o, p in rows}
    payloads = [p for _, p in rows]
    missing = wrong = 0
    for i, off in enumerate(printed):
        got = by_off.get(off)
        if got is None:
            missing += 1
        elif got != pub.line(i):
            wrong += 1
    dups = len(payloads) - len(set(payloads))
    return missing, wrong, dups, rows


class Subscriber:
    """`arq sub STREAM --state FILE`: the JSON lines it printed."""

    def __init__(self, arq, url, stream, state, extra=()):
        self.lines = []
        self.proc = subprocess.Popen([arq, "-u", url, "--retries", "0", "sub", stream, "--state",
                                      state, *extra], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        self.t = threading.Thread(target=self._read, daemon=True)
        self.t.start()

    def _read(self):
        for line in self.proc.stdout:
            try:
                self.lines.append(json.loads(line))
            except ValueError:
                pass

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.t.join(10)
        return list(self.lines)


def partition(proxy, dead_port):
    proxy.set_target("127.0.0.1", dead_port)
    proxy.cut_all("blackhole")


def run(arqd_bin, arq_bin, replay_bin, galera_script):
    tmp = tempfile.mkdtemp(prefix="arq-ha-", dir="/var/tmp")
    g = None
    proxies = []
    daemons = []
    pubs = []
    try:
        t0 = time.time()
        g = Galera(galera_script, os.path.join(tmp, "galera"))
        print(f"galera: 3 nodes Synced in {time.time() - t0:.1f} s", flush=True)
        check(all(g.sql(k, "SHOW STATUS LIKE 'wsrep_cluster_size'")[0][1] == "3"
                  for k in (1, 2, 3)), "the cluster has 3 nodes")
        g.sql(1, "CREATE DATABASE arq_ctl", db="arq")
        g.sql(1, "GRANT ALL ON arq_ctl.* TO 'arq'@'127.0.0.1'", db="arq")
        url1 = g.urls[0]
        node1 = port_of(url1)
        dead = free_port()  # nothing listens there: a partition refuses new connections

        # ---- ack = replicated: the machine is lost ----
        proxy = ChaosProxy("127.0.0.1", node1, seed=20).start()
        proxies.append(proxy)
        db_url = (url1.replace(f"127.0.0.1:{node1}", f"127.0.0.1:{proxy.port}") +
                  "?connect_timeout=2&read_timeout=3&write_timeout=3")
        data = os.path.join(tmp, "data-a")
        a = Arqd(arqd_bin, data, os.path.join(tmp, "arqd-a.log"), env={"DATABASE_URL": db_url},
                 extra=["--set", "wal.ack=replicated", "--set", "wal.ack_timeout_ms=2000"])
        daemons.append(a)
        wait_for(lambda: (a.health() or {}).get("status") == "healthy", "arqd healthy")
        code, body = a.http("POST", "/api/publish",
                            json.dumps({"stream": "api", "payload": "x", "ack": "replicated"})
                            .encode(), {"Content-Type": "application/json"})
        check(code == 200, f"POST /api/publish ack replicated: 200 ({code} {body[:80]})")

        pub = Publisher(arq_bin, a.url, "r", "ha")
        pubs.append(pub)
        pub.wait_more(300, "replicated, healthy cluster")
        # subscribed once the stream exists: its state file records the epoch
        state = os.path.join(tmp, "sub.state")
        sub = Subscriber(arq_bin, a.url, "ha", state)
        pubs.append(sub)
        g.kill(3)
        print("galera node 3 killed", flush=True)
        pub.wait_more(300, "replicated, node 3 down")
        check(g.sql(2, "SHOW STATUS LIKE 'wsrep_cluster_status'")[0][1] == "Primary",
              "nodes 1 and 2 stay a primary component")

        partition(proxy, dead)
        print("arqd partitioned from MySQL", flush=True)
        wait_for(lambda: (a.health() or {}).get("status") == "degraded",
                 "/health degraded while partitioned")
        h = a.health() or {}
        check("replication unavailable" in h.get("reason", ""),
              f"/health names the cause: {h.get('reason')!r}")
        code, body = a.http("POST", "/api/publish",
                            json.dumps({"stream": "api", "payload": "y"}).encode(),
                            {"Content-Type": "application/json"})
        check(code == 503 and b"replication" in body,
              f"POST /api/publish while partitioned: 503 replication ... ({code} {body[:80]})")
        wait_for(lambda: (a.metric("arq_publish_replication_refused_total") or 0) +
                 (a.metric("arq_publish_replication_timeouts_total") or 0) > 0,
                 "replicated publishes refused or timed out while partitioned")
        during = len(pub.printed)
        time.sleep(1.0)
        proxy.set_target("127.0.0.1", node1)
        print(f"healed ({during} acks printed before)", flush=True)
        pub.wait_more(300, "replicated, after the partition")

        a.kill9()
        shutil.rmtree(data)
        print("arqd killed, its data directory deleted", flush=True)
        printed = pub.kill()
        seen = sub.kill()
        missing, wrong, dups, rows = verify(g, "arq", "ha", pub, printed)
        print(f"replicated: {len(printed)} acks printed, {len(rows)} rows on node 2; "
              f"missing {missing}, wrong {wrong}, duplicates {dups}", flush=True)
        check(len(printed) >= 900, f"load ran: {len(printed)} acks")
        check(missing == 0, f"replicated: no printed ack missing from MySQL ({missing} missing)")
        check(wrong == 0, f"replicated: every printed offset holds its line ({wrong} wrong)")
        check(dups == 0, f"replicated: no line stored twice ({dups} duplicates)")
        offs = [int(o) for o, _ in rows]
        check(offs == list(range(1, len(offs) + 1)),
              "replicated: MySQL's offsets are 1..n, in order, without a hole")
        order = [int(p.split("-")[1]) for _, p in rows]
        check(order == sorted(order), "replicated: lines are stored in the order published")
        by_off = {int(o): p for o, p in rows}
        unseen = [m["offset"] for m in seen if by_off.get(m["offset"]) != m.get("payload")]
        print(f"subscriber saw {len(seen)} messages before the loss", flush=True)
        check(len(seen) > 0 and not unseen,
              f"replicated: every message the subscriber saw is in MySQL at its offset "
              f"({len(unseen)} are not: {unseen[:5]})")

        # a new machine: the WAL rebuilt from MySQL, epochs kept
        data_n = os.path.join(tmp, "data-n")
        out = subprocess.run([replay_bin, "restore", "--database-url", url1, "--data-dir",
                              data_n], capture_output=True, text=True, timeout=300)
        check(out.returncode == 0, f"arq-replay restore: exit 0 ({out.stderr[-300:]})")
        n = Arqd(arqd_bin, data_n, os.path.join(tmp, "arqd-n.log"), env={"DATABASE_URL": url1},
                 extra=["--set", "wal.ack=replicated"])
        daemons.append(n)
        with open(state) as f:
            st = json.load(f)
        check(st.get("epoch") not in (None, "0"), f"the state file names an epoch: {st}")
        rest = len(rows) - st["offset"]
        check(rest > 0, f"the subscriber has something left to read ({rest})")
        if rest > 0:
            sub2 = Subscriber(arq_bin, n.url, "ha", state, extra=["--count", str(rest)])
            rc = sub2.proc.wait(timeout=60)
            got = sub2.kill()
            print(f"restored from MySQL; the subscriber resumed after offset {st['offset']} "
                  f"(epoch {st.get('epoch')}) and got {len(got)} of {rest}", flush=True)
            check(rc == 0, f"the resumed subscriber (same epoch) ends with exit 0: "
                           f"{''.join(sub2.proc.stderr.read() or '')[-300:]}")
            check([m["offset"] for m in got] == list(range(st["offset"] + 1, len(rows) + 1)),
                  "resumed after its offset: the rest, in order, no gap, no duplicate")
            check(all(by_off.get(m["offset"]) == m.get("payload") for m in got),
                  "resumed: each message as stored")
        n.kill9()

        # a fresh WAL on that database is refused, not silently left unsynced
        f = Arqd(arqd_bin, os.path.join(tmp, "data-f"), os.path.join(tmp, "arqd-f.log"),
                 env={"DATABASE_URL": url1})
        daemons.append(f)
        f.http("POST", "/api/publish", json.dumps({"stream": "f", "payload": "x"}).encode(),
               {"Content-Type": "application/json"})
        wait_for(lambda: (f.health() or {}).get("sync", {}).get("state") == "failed",
                 "a fresh WAL on a filled database: sync failed")
        err = (f.health() or {}).get("sync", {}).get("last_error", "")
        check("past this WAL's end" in err, f"... saying why: {err!r}")
        f.kill9()

        # ---- negative control: ack = local loses the unsynced tail ----
        proxy2 = ChaosProxy("127.0.0.1", node1, seed=21).start()
        proxies.append(proxy2)
        ctl_url = (url1.replace(f"127.0.0.1:{node1}", f"127.0.0.1:{proxy2.port}")
                   .rsplit("/", 1)[0] + "/arq_ctl?connect_timeout=2&read_timeout=3")
        data_b = os.path.join(tmp, "data-b")
        b = Arqd(arqd_bin, data_b, os.path.join(tmp, "arqd-b.log"),
                 env={"DATABASE_URL": ctl_url}, extra=["--set", "wal.ack=local"])
        daemons.append(b)
        wait_for(lambda: (b.health() or {}).get("sync", {}).get("state") == "ok", "control synced")
        ctl = Publisher(arq_bin, b.url, "l", "ctl")
        pubs.append(ctl)
        ctl.wait_more(300, "local, healthy")
        partition(proxy2, dead)
        ctl.wait_more(300, "local, partitioned: still acknowledged")
        b.kill9()
        shutil.rmtree(data_b)
        printed = ctl.kill()
        missing, wrong, dups, rows = verify(g, "arq_ctl", "ctl", ctl, printed)
        print(f"negative control (ack = local): {len(printed)} acks printed, {len(rows)} rows; "
              f"missing {missing}", flush=True)
        check(missing > 0, "negative control: ack = local with the machine lost loses "
                           f"acknowledged publishes ({missing} missing): the check can fail")
    finally:
        for p in pubs:
            if p.proc.poll() is None:
                p.proc.kill()
        for d in daemons:
            d.kill9()
        for p in proxies:
            p.stop()
        if g:
            g.stop()
        if failures:
            print(f"kept {tmp} for inspection", flush=True)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def main():
    if len(sys.argv) != 5:
        print(__doc__)
        return 2
    arqd_bin, arq_bin, replay_bin, galera = sys.argv[1:]
    if not os.path.exists("/usr/lib/galera/libgalera_smm.so") or not shutil.which("rsync"):
        print("SKIP: galera-4 (/usr/lib/galera/libgalera_smm.so) or rsync is not installed")
        return 77
    run(arqd_bin, arq_bin, replay_bin, galera)
    if failures:
        print(f"{len(failures)} check(s) failed")
        return 1
    print("ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
