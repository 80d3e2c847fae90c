"""A private MariaDB Galera cluster for tests, through scripts/galera: nodes
on 127.0.0.1 in a temporary directory under /var/tmp, queried with the
`mariadb` command-line client as the user `arq`. Standard library only.

    with Galera(script) as g:      # stop() and the directory removed on exit
        g.start(3)
        g.query(1, "SHOW GLOBAL STATUS LIKE 'wsrep_cluster_size'")  # [['wsrep_cluster_size', '3']]
        g.kill(2)                  # SIGKILL node 2
        g.start_node(2)            # rejoins (IST or SST), returns once Synced
"""
import os
import shutil
import subprocess
import tempfile
import urllib.parse

PROVIDER = "/usr/lib/galera/libgalera_smm.so"
SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "scripts",
                      "galera")


def missing():
    """Why no cluster can be started here (a sentence for a skip message), or
    None if everything scripts/galera needs is installed."""
    if not os.path.exists(PROVIDER):
        return f"{PROVIDER} missing (Debian package galera-4)"
    for tool in ("rsync", "mariadbd", "mariadb-install-db", "mariadb"):
        if not shutil.which(tool):
            return f"{tool} not installed"
    return None


class Galera:
    """scripts/galera in a directory of its own. urls: one DATABASE_URL per
    node, node K at urls[K-1] (nodes are numbered from 1, as in the script).
    A command of the script that fails raises RuntimeError with its stderr."""

    def __init__(self, script=SCRIPT):
        self.script = script
        self.dir = None
        self.urls = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()
        return False

    def _run(self, *args, timeout=300):
        p = subprocess.run([self.script, *args], capture_output=True, text=True,
                           timeout=timeout)
        if p.returncode:
            raise RuntimeError(f"scripts/galera {' '.join(args)}: exit {p.returncode}: "
                               f"{p.stderr.strip()}")
        return p.stdout

    def start(self, n=3):
        """A fresh cluster of n nodes, every one Synced; returns urls."""
        self.dir = tempfile.mkdtemp(prefix="arq-galera-", dir="/var/tmp")
        out = self._run("start", self.dir, str(n))
        self.urls = [line.split("=", 1)[1] for line in out.splitlines()
                     if line.startswith("DATABASE_URL_")]
        if len(self.urls) != n:
            raise RuntimeError(f"scripts/galera start printed {out!r}")
        return self.urls

    def kill(self, k):
        """SIGKILL node k; returns once the process is gone."""
        self._run("kill", self.dir, str(k))

    def start_node(self, k):
        """Start node k again; returns once it is Synced in the cluster."""
        self._run("start-node", self.dir, str(k))

    def status(self):
        """scripts/galera status: one line per node."""
        return self._run("status", self.dir).splitlines()

    def pid(self, k):
        """Node k's mariadbd PID (as of its last start)."""
        with open(os.path.join(self.dir, f"node{k}", "mariadbd.pid")) as f:
            return int(f.read().strip())

    def query(self, k, sql, timeout=30):
        """Run sql (one or more statements) on node k as `arq` in database
        arq; the rows of the last result, each a list of strings. A failed
        statement raises RuntimeError with the client's message (which has
        the error number, e.g. "ERROR 1213 (40001)")."""
        u = urllib.parse.urlsplit(self.urls[k - 1])
        p = subprocess.run(["mariadb", "--no-defaults", "-h127.0.0.1", f"-P{u.port}",
                            f"-u{u.username}", f"-p{urllib.parse.unquote(u.password)}",
                            u.path.lstrip("/"), "-N", "-B", "-e", sql],
                           capture_output=True, text=True, timeout=timeout)
        if p.returncode:
            raise RuntimeError(f"node{k}: {p.stderr.strip()}")
        return [line.split("\t") for line in p.stdout.splitlines()]

    def wsrep(self, k, name):
        """A wsrep status variable of node k, e.g. wsrep("cluster_size")."""
        rows = self.query(k, f"SHOW GLOBAL STATUS LIKE 'wsrep_{name}'")
        return rows[0][1] if rows else None

    def stop(self):
        """Stop every node and remove the directory; safe to call twice and
        after a failed start."""
        if self.dir is None:
            return
        try:
            subprocess.run([self.script, "stop", self.dir], capture_output=True, timeout=120)
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None
            self.urls = []
