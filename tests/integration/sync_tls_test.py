#!/usr/bin/python3
"""DATABASE_URL tls=1 and tls_ca=PATH against a real MariaDB that offers TLS.

Usage: sync_tls_test.py ARQD MARIADB_SCRIPT

The test makes its own CA and a server certificate for 127.0.0.1 (openssl),
and a second, unrelated CA; it starts a private MariaDB (scripts/mariadb) with
that certificate and a user that the server accepts only over TLS
(REQUIRE SSL). Then, through `arqd --migrate` (one connection, exit 0 when
it got in):
  - without tls the user is refused: so the server enforces TLS, and a
    connection that gets in below did use it;
  - tls=1 gets in (encrypted, server not verified);
  - tls_ca=<our CA> gets in (server certificate verified against it);
  - tls_ca=<the other CA> is refused, with a TLS error that says so;
an arqd serving with tls_ca drains published messages into MySQL over that
connection; and after a restart of MariaDB with a certificate of the same CA
for another name, tls_ca refuses it while tls=1 still connects. Last, with a
chain (a root CA, an intermediate CA it signed, and a server certificate the
intermediate signed, served together with the intermediate), tls_ca=<the root>
connects, and so does a CA file holding the unrelated CA and the root.
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.parse

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import Arqd, check, failures  # noqa: E402

ARQD, MARIADB = sys.argv[1:3]
API_KEY = "tls-test-api-key"


def openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_pki(d):
    """ca.pem signs server-cert.pem (SAN IP:127.0.0.1) and other-name-cert.pem (SAN
    DNS:db.example, same key); other-ca.pem is unrelated."""
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    for name in ("ca", "other-ca"):
        openssl("req", "-x509", *ec, "-keyout", f"{name}-key.pem", "-out", f"{name}.pem",
                "-days", "2", "-subj", f"/CN=arq test {name}", cwd=d)
    openssl("req", *ec, "-keyout", "server-key.pem", "-out", "server.csr",
            "-subj", "/CN=127.0.0.1", cwd=d)
    with open(os.path.join(d, "san.ext"), "w") as f:
        f.write("subjectAltName=IP:127.0.0.1\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca-key.pem",
            "-CAcreateserial", "-out", "server-cert.pem", "-days", "2", "-extfile", "san.ext",
            cwd=d)
    # The same key, certified by the same CA for another name only.
    with open(os.path.join(d, "other-name.ext"), "w") as f:
        f.write("subjectAltName=DNS:db.example\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca-key.pem",
            "-CAcreateserial", "-out", "other-name-cert.pem", "-days", "2", "-extfile",
            "other-name.ext", cwd=d)


def make_chain(d):
    """root-ca.pem signs inter-ca.pem (a CA), which signs chain-cert.pem (SAN
    IP:127.0.0.1); chain.pem is the server certificate then the intermediate,
    as a server sends them."""
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    openssl("req", "-x509", *ec, "-keyout", "root-ca-key.pem", "-out", "root-ca.pem",
            "-days", "2", "-subj", "/CN=arq test root", cwd=d)
    openssl("req", *ec, "-keyout", "inter-ca-key.pem", "-out", "inter-ca.csr",
            "-subj", "/CN=arq test intermediate", cwd=d)
    with open(os.path.join(d, "ca.ext"), "w") as f:
        f.write("basicConstraints=critical,CA:TRUE,pathlen:0\n"
                "keyUsage=critical,keyCertSign,cRLSign\n")
    openssl("x509", "-req", "-in", "inter-ca.csr", "-CA", "root-ca.pem", "-CAkey",
            "root-ca-key.pem", "-CAcreateserial", "-out", "inter-ca.pem", "-days", "2",
            "-extfile", "ca.ext", cwd=d)
    openssl("req", *ec, "-keyout", "chain-key.pem", "-out", "chain.csr",
            "-subj", "/CN=127.0.0.1", cwd=d)
    openssl("x509", "-req", "-in", "chain.csr", "-CA", "inter-ca.pem", "-CAkey",
            "inter-ca-key.pem", "-CAcreateserial", "-out", "chain-cert.pem", "-days", "2",
            "-extfile", "san.ext", cwd=d)
    with open(os.path.join(d, "chain.pem"), "w") as out:
        for name in ("chain-cert.pem", "inter-ca.pem"):
            with open(os.path.join(d, name)) as f:
                out.write(f.read())
    with open(os.path.join(d, "bundle.pem"), "w") as out:
        for name in ("other-ca.pem", "root-ca.pem"):
            with open(os.path.join(d, name)) as f:
                out.write(f.read())


def migrate(url):
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    env["DATABASE_URL"] = url
    r = subprocess.run([ARQD, "--migrate"], capture_output=True, text=True, env=env,
                       timeout=60)
    return r.returncode, r.stdout + r.stderr


def main():
    tmp = tempfile.mkdtemp(prefix="arq-sync-tls-", dir="/var/tmp")
    mdb = os.path.join(tmp, "mdb")
    pki = os.path.join(tmp, "pki")
    os.makedirs(pki)
    a = None
    started = False
    try:
        make_pki(pki)
        env = dict(os.environ)
        env["MARIADBD_ARGS"] = (f"--ssl-ca={pki}/ca.pem --ssl-cert={pki}/server-cert.pem "
                                f"--ssl-key={pki}/server-key.pem")
        out = subprocess.run([MARIADB, "start", mdb], check=True, capture_output=True,
                             text=True, env=env).stdout
        started = True
        url = out.strip().split("DATABASE_URL=", 1)[1]
        hostport = url.split("@", 1)[1].split("/", 1)[0]
        sock = os.path.join(mdb, "mariadbd.sock")

        def root_sql(sql):
            return subprocess.run(["mariadb", "--no-defaults", f"--socket={sock}", "-uroot",
                                   "-N", "-B", "-e", sql],
                                  check=True, capture_output=True, text=True).stdout.strip()

        check(root_sql("SELECT @@have_ssl") == "YES", "the test server offers TLS")
        root_sql("CREATE USER 'tlsu'@'127.0.0.1' IDENTIFIED BY 'tls pw' REQUIRE SSL; "
                 "GRANT ALL ON arq.* TO 'tlsu'@'127.0.0.1'")
        base = f"mysql://tlsu:{urllib.parse.quote('tls pw')}@{hostport}/arq?connect_timeout=5"
        ca = urllib.parse.quote(f"{pki}/ca.pem")
        other = urllib.parse.quote(f"{pki}/other-ca.pem")

        rc, text = migrate(base)
        check(rc != 0 and "Access denied" in text,
              f"without tls the REQUIRE SSL user is refused: {rc} {text[-300:]!r}")
        rc, text = migrate(base + "&tls=1")
        check(rc == 0, f"tls=1 connects and migrates: {rc} {text[-300:]!r}")
        rc, text = migrate(base + "&tls_ca=" + ca)
        check(rc == 0, f"tls_ca=<the server's CA> connects: {rc} {text[-300:]!r}")
        rc, text = migrate(base + "&tls_ca=" + other)
        low = text.lower()
        check(rc != 0 and ("certificate" in low or "verif" in low or "tls" in low or
                           "ssl" in low),
              f"tls_ca=<another CA> is refused with a TLS error: {rc} {text[-300:]!r}")
        check("tls pw" not in text and "tls%20pw" not in text,
              "the password is not in arqd's output")

        # The drain over a verified connection.
        a = Arqd(ARQD, os.path.join(tmp, "data"),
                 env={"DATABASE_URL": base + "&tls_ca=" + ca, "ARQ_API_KEY": API_KEY})
        n = 20
        for i in range(n):
            st, body = a.http("POST", "/api/publish",
                              body=json.dumps({"stream": "tls.s", "payload": f"m{i}"}).encode(),
                              headers={"Authorization": f"Bearer {API_KEY}",
                                       "Content-Type": "application/json"})
            check(st == 200, f"publish {i}: {st} {body!r}")
        health = None
        deadline = time.time() + 30
        while time.time() < deadline:
            st, body = a.http("GET", "/health")
            health = json.loads(body)
            sync = health.get("sync", {})
            if sync.get("state") == "ok" and sync.get("watermark", 0) >= n and \
                    sync.get("lag_records") == 0:
                break
            time.sleep(0.2)
        check(health and health["sync"].get("state") == "ok" and
              health["sync"].get("lag_records") == 0,
              f"the sync drains over TLS: {health and health.get('sync')}")
        rows = root_sql("SELECT COUNT(*) FROM arq.arq_messages WHERE stream = 'tls.s'")
        check(rows == str(n), f"MySQL holds the {n} messages: {rows}")
        rc = a.stop()
        check(rc == 0, f"arqd exits 0: {rc} {a.stderr[-1500:]}")
        a = None

        # The server's certificate must name the host too: restart MariaDB with a
        # certificate from the same CA for db.example only.
        subprocess.run([MARIADB, "stop", mdb], check=True, capture_output=True)
        env["MARIADBD_ARGS"] = (f"--ssl-ca={pki}/ca.pem --ssl-cert={pki}/other-name-cert.pem "
                                f"--ssl-key={pki}/server-key.pem")
        subprocess.run([MARIADB, "start", mdb, hostport.rsplit(":", 1)[1]], check=True,
                       capture_output=True, env=env)
        rc, text = migrate(base + "&tls=1")
        check(rc == 0, f"tls=1 does not look at the name: {rc} {text[-300:]!r}")
        rc, text = migrate(base + "&tls_ca=" + ca)
        check(rc != 0, f"tls_ca= refuses a certificate for another name: {rc} {text[-300:]!r}")

        # A certificate chain: the server sends its certificate and the
        # intermediate; the client trusts the root only.
        make_chain(pki)
        subprocess.run([MARIADB, "stop", mdb], check=True, capture_output=True)
        env["MARIADBD_ARGS"] = (f"--ssl-ca={pki}/root-ca.pem --ssl-cert={pki}/chain.pem "
                                f"--ssl-key={pki}/chain-key.pem")
        subprocess.run([MARIADB, "start", mdb, hostport.rsplit(":", 1)[1]], check=True,
                       capture_output=True, env=env)
        root = urllib.parse.quote(f"{pki}/root-ca.pem")
        bundle = urllib.parse.quote(f"{pki}/bundle.pem")
        rc, text = migrate(base + "&tls_ca=" + root)
        check(rc == 0, f"tls_ca=<root> verifies root -> intermediate -> server: "
                       f"{rc} {text[-300:]!r}")
        rc, text = migrate(base + "&tls_ca=" + bundle)
        check(rc == 0, f"tls_ca=<a file of two CAs, the root among them>: {rc} {text[-300:]!r}")
        rc, text = migrate(base + "&tls_ca=" + other)
        check(rc != 0, f"tls_ca=<the unrelated CA> refuses the chain: {rc} {text[-300:]!r}")
    finally:
        if a is not None:
            a.kill_if_running()
        if started:
            subprocess.run([MARIADB, "stop", mdb], check=False, capture_output=True)
        shutil.rmtree(tmp, ignore_errors=True)
    if failures:
        print(f"{len(failures)} check(s) failed", flush=True)
        sys.exit(1)
    print("all sync TLS checks passed", flush=True)


if __name__ == "__main__":
    main()
