#!/usr/bin/python3
"""scripts/galera and tests/integration/galera.py: a 3-node MariaDB Galera
cluster on loopback that tests can break and mend.

Usage: galera_test.py GALERA_SCRIPT

- every node sees a cluster of 3, Synced, and listens on 127.0.0.1 only;
- a row written on node1 is read on node3;
- node2 SIGKILLed: node1 and node3 stay a Primary component of 2 and take
  writes;
- node2 started again rejoins (cluster of 3, Synced) with the rows written
  while it was down;
- stop() ends every node and removes the cluster's directory.

Skipped (exit 77) without Galera (galera-4) or rsync, its SST method.
"""
import os
import subprocess
import sys
import time

sys.dont_write_bytecode = True  # no __pycache__ in the source tree
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import galera  # noqa: E402
from harness import check, failures  # noqa: E402

SCRIPT = sys.argv[1] if len(sys.argv) > 1 else galera.SCRIPT


def skip(why):
    print(f"skipped: {why}")
    sys.exit(77)


def wait_for(what, cond, timeout=30):
    """Poll cond() until true; False (and a FAIL recorded) after timeout."""
    deadline = time.time() + timeout
    while True:
        try:
            if cond():
                return True
        except RuntimeError:
            pass  # a node that does not answer yet
        if time.time() > deadline:
            return check(False, f"{what} within {timeout} s")
        time.sleep(0.2)


def listening(pid):
    """The local addresses pid listens on (TCP), from ss."""
    out = subprocess.run(["ss", "-Htlnp"], capture_output=True, text=True).stdout
    return [line.split()[3] for line in out.splitlines() if f"pid={pid}," in line]


def read(g, k, sql):
    # wsrep_sync_wait: this read waits until node k has applied what the
    # cluster committed before it (ARQ itself only reads its own writes on
    # one connection, so it does not need this).
    return g.query(k, f"SET SESSION wsrep_sync_wait = 1; {sql}")


def main():
    why = galera.missing()
    if why:
        skip(why)
    t0 = time.time()
    g = galera.Galera(SCRIPT)
    with g:
        g.start(3)
        t_start = time.time() - t0
        print(f"cluster of 3 started in {t_start:.1f} s", flush=True)
        check(len(g.urls) == 3 and len(set(g.urls)) == 3 and
              all(u.startswith("mysql://arq:") and "@127.0.0.1:" in u and u.endswith("/arq")
                  for u in g.urls), f"three DATABASE_URLs: {g.urls}")
        for k in (1, 2, 3):
            check(g.wsrep(k, "cluster_size") == "3", f"node{k}: wsrep_cluster_size 3")
            check(g.wsrep(k, "local_state_comment") == "Synced", f"node{k}: Synced")
            addrs = listening(g.pid(k))
            check(addrs and all(a.startswith("127.0.0.1:") for a in addrs),
                  f"node{k} listens on 127.0.0.1 only: {addrs}")

        g.query(1, "CREATE TABLE g (id INT PRIMARY KEY, v VARCHAR(64) NOT NULL)")
        g.query(1, "INSERT INTO g VALUES (1, 'from node1')")
        check(read(g, 3, "SELECT id, v FROM g") == [["1", "from node1"]],
              "a row written on node1 is read on node3")

        g.kill(2)
        for k in (1, 3):
            wait_for(f"node{k}: Primary component of 2 after node2 is killed",
                     lambda k=k: g.wsrep(k, "cluster_size") == "2" and
                     g.wsrep(k, "cluster_status") == "Primary")
        print(f"node2 killed, cluster of 2 at {time.time() - t0:.1f} s", flush=True)
        try:
            g.query(3, "INSERT INTO g VALUES (2, 'from node3 while node2 was down')")
            g.query(1, "INSERT INTO g VALUES (3, 'from node1 while node2 was down')")
            writes = True
        except RuntimeError as e:
            writes = str(e)
        check(writes is True, f"the two remaining nodes take writes: {writes}")

        g.start_node(2)
        print(f"node2 rejoined at {time.time() - t0:.1f} s", flush=True)
        for k in (1, 2, 3):
            check(g.wsrep(k, "cluster_size") == "3", f"node{k}: wsrep_cluster_size 3 again")
        check(g.wsrep(2, "local_state_comment") == "Synced", "node2: Synced again")
        check(read(g, 2, "SELECT id FROM g ORDER BY id") == [["1"], ["2"], ["3"]],
              "node2 has the rows written while it was down")
        d = g.dir
        pids = [g.pid(k) for k in (1, 2, 3)]
    check(not os.path.exists(d), f"stop() removed {d}")
    check(not any(os.path.exists(f"/proc/{p}/cmdline") and
                  open(f"/proc/{p}/cmdline", "rb").read() for p in pids),
          f"no node left running after stop(): {pids}")
    print(f"took {time.time() - t0:.1f} s", flush=True)
    if failures:
        print(f"{len(failures)} check(s) failed", flush=True)
        sys.exit(1)
    print("galera: ok", flush=True)


if __name__ == "__main__":
    main()
