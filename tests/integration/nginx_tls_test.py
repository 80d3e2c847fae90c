#!/usr/bin/python3
"""deploy/nginx/arq.conf with Debian's nginx in front of arqd (issue #18).

Usage: nginx_tls_test.py PATH_TO_ARQD PATH_TO_ARQ PATH_TO_ARQ_CONF PATH_TO_ARQ_REPLAY

A CA and a server certificate for "localhost" are made with openssl in a
temporary directory; the shipped arq.conf is used as it is but for its ports,
certificate paths and upstream port (loopback, free ports). Then, through
nginx over TLS:
  - `arq` publishes and subscribes with wss://localhost (verifying against
    --ca), refuses a server it cannot verify (no --ca; an IP the certificate
    does not name), and with --token-command refreshes its token on a live
    connection past the first token's expiry;
  - a WebSocket client connecting from 127.0.0.2, with a forged
    X-Forwarded-For, is logged by arqd as 127.0.0.2 (nginx is the trusted
    proxy; the forged hop is not believed);
  - /metrics is not reachable, /health shows the status only.
Skipped (exit 77) when nginx is not installed.
"""
import asyncio
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time

import msgpack
import websockets

ARQD, ARQ, CONF, REPLAY = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
KEY = "nginx-test-secret-0123456789abcdef"
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


def token(sub, ttl=3600):
    return harness.make_jwt({"sub": sub, "exp": int(time.time()) + ttl, "pub": ["*"],
                             "subscribe": ["*"]}, KEY)


def openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_certs(d):
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=arq test CA",
            cwd=d)
    openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=localhost", cwd=d)
    with open(os.path.join(d, "ext.cnf"), "w") as f:
        f.write("subjectAltName=DNS:localhost\nextendedKeyUsage=serverAuth\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", "server.pem", "-days", "2", "-extfile", "ext.cnf", cwd=d)


def nginx_conf(tmp, https_port, http_port, arqd_port):
    """The shipped server blocks with test ports and paths, in a main config."""
    text = open(CONF).read()
    text = re.sub(r"^\s*listen \[::\]:\d+[^;]*;\n", "", text, flags=re.M)
    text = text.replace("listen 443 ssl;", f"listen 127.0.0.1:{https_port} ssl;")
    text = text.replace("listen 80;", f"listen 127.0.0.1:{http_port};")
    text = text.replace("server 127.0.0.1:8000;", f"server 127.0.0.1:{arqd_port};")
    text = text.replace("/etc/ssl/arq/fullchain.pem", os.path.join(tmp, "server.pem"))
    text = text.replace("/etc/ssl/arq/privkey.pem", os.path.join(tmp, "server.key"))
    check(f"127.0.0.1:{https_port} ssl" in text and f"127.0.0.1:{arqd_port}" in text,
          "arq.conf has the listen/upstream lines the test rewrites")
    with open(os.path.join(tmp, "arq.conf"), "w") as f:
        f.write(text)
    main = f"""
daemon off;
master_process on;
worker_processes 1;
user root;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log info;
events {{ worker_connections 256; }}
http {{
    access_log {tmp}/nginx-access.log;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    include {tmp}/arq.conf;
}}
"""
    path = os.path.join(tmp, "nginx.conf")
    with open(path, "w") as f:
        f.write(main)
    return path


def arq(*args, timeout=60, input=None):
    env = {k: v for k, v in os.environ.items() if k not in ("ARQ_URL", "ARQ_TOKEN")}
    p = subprocess.run([ARQ, *args], capture_output=True, text=True, timeout=timeout, env=env,
                       input=input)
    return p.returncode, p.stdout, p.stderr


async def forwarded_scenario(url, ctx, arqd_log):
    ws = await websockets.connect(url, subprotocols=["arq.v1"], ssl=ctx,
                                  local_addr=("127.0.0.2", 0),
                                  extra_headers={"X-Forwarded-For": "198.51.100.77"})
    await ws.send(msgpack.packb({"t": "hello", "token": "not-a-token"}))
    r = msgpack.unpackb(await asyncio.wait_for(ws.recv(), 10), raw=False)
    check(r.get("code") == 401, f"a bad token through nginx is refused: {r}")
    await ws.close()
    deadline = time.time() + 10
    while time.time() < deadline and "auth_failed" not in open(arqd_log).read():
        await asyncio.sleep(0.05)
    log = open(arqd_log).read()
    check(re.search(r"event=auth_failed peer=127\.0\.0\.2 ", log),
          "arqd logs the client's address as nginx forwarded it (127.0.0.2)")
    check("198.51.100.77" not in log, "the hop the client forged is not believed")


def main():
    if not os.path.exists(NGINX):
        print("nginx not installed: skipped")
        sys.exit(77)
    tmp = tempfile.mkdtemp(prefix="arq-nginx-", dir="/var/tmp")
    os.chmod(tmp, 0o755)
    arqd = nginx = None
    try:
        make_certs(tmp)
        ca = os.path.join(tmp, "ca.pem")
        arqd_port, https_port, http_port = free_port(), free_port(), free_port()
        arqd_log = os.path.join(tmp, "arqd.log")
        env = {k: v for k, v in os.environ.items()
               if k not in ("SECRET_KEY", "ARQ_ANONYMOUS", "DATABASE_URL", "ARQ_API_KEY")}
        env["SECRET_KEY"] = KEY
        arqd = subprocess.Popen(
            [ARQD, "--host", "127.0.0.1", "--port", str(arqd_port), "--data-dir",
             os.path.join(tmp, "data"), "--set", "server.trusted_proxies=127.0.0.1",
             "--set", "auth.expiry_grace_s=1", "--set", "server.monitor_allow=127.0.0.1"],
            stdout=subprocess.PIPE, stderr=open(arqd_log, "w"), text=True, env=env)
        check("listening on" in arqd.stdout.readline(), "arqd started")
        conf = nginx_conf(tmp, https_port, http_port, arqd_port)
        t = subprocess.run([NGINX, "-t", "-p", tmp, "-e", os.path.join(tmp, "nginx-error.log"),
                            "-c", conf], capture_output=True, text=True)
        check(t.returncode == 0, f"nginx -t accepts arq.conf: {t.stderr[-500:]}")
        nginx = subprocess.Popen([NGINX, "-p", tmp, "-e", os.path.join(tmp, "nginx-error.log"),
                                  "-c", conf], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", https_port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        url = f"wss://localhost:{https_port}/ws"
        tok = token("alice")

        # publish and subscribe through nginx over TLS, verifying the certificate
        rc, out, err = arq("--url", url, "--ca", ca, "--token", tok, "pub", "tls.s", "hello")
        check(rc == 0 and out.strip() == "1", f"arq pub over wss: {rc} {out!r} {err!r}")
        rc, out, err = arq("--url", url, "--ca", ca, "--token", tok, "pub", "tls.s", "-",
                           input="two\nthree\n")
        check(rc == 0 and out.split() == ["2", "3"], f"arq pub - over wss: {rc} {out!r} {err!r}")
        env = {k: v for k, v in os.environ.items() if k != "ARQ_URL"}
        env["ARQ_TOKEN"] = tok  # instead of --token
        p = subprocess.run([ARQ, "--url", url, "--ca", ca, "sub", "tls.s", "--count", "3"],
                           capture_output=True, text=True, timeout=60, env=env)
        lines = [x for x in p.stdout.splitlines() if x]
        check(p.returncode == 0 and len(lines) == 3 and '"payload":"three"' in lines[2],
              f"arq sub over wss with ARQ_TOKEN: {p.returncode} {p.stdout!r} {p.stderr!r}")
        # arq-replay republish through the proxy too (libarq: wss, --ca)
        rc, out, err = run_replay("republish", "--data-dir", os.path.join(tmp, "data"),
                                  "--url", url, "--ca", ca, "--token", tok, "tls.s",
                                  "--to-stream", "tls.copy")
        check(rc == 0, f"arq-replay republish over wss: {rc} {out!r} {err[-400:]!r}")
        rc, out, err = arq("--url", url, "--ca", ca, "--token", tok, "pub", "tls.copy", "after")
        check(rc == 0 and out.strip() == "4", f"the copy holds the three lines: {out!r} {err!r}")
        # verification is on by default: our CA is not the system's
        rc, out, err = arq("--url", url, "--token", tok, "pub", "tls.s", "x")
        check(rc == 1 and "certificate verify failed" in err,
              f"an unverifiable server is refused: {rc} {err!r}")
        rc, out, err = arq("--url", f"wss://127.0.0.1:{https_port}/ws", "--ca", ca, "--token",
                           tok, "pub", "tls.s", "x")
        check(rc == 1 and "certificate verify failed" in err,
              f"a certificate that does not name the host is refused: {rc} {err!r}")
        rc, out, err = arq("--url", url, "--ca", ca, "pub", "tls.s", "x")
        check(rc == 1 and "401" in err, f"no token through nginx: refused: {rc} {err!r}")

        # the forwarded address, as arqd logs it
        ctx = ssl.create_default_context(cafile=ca)
        asyncio.run(forwarded_scenario(url, ctx, arqd_log))

        # monitoring stays inside: a client at 127.0.0.2 (not in this arqd's
        # monitor_allow) through nginx
        import http.client
        for path, want in (("/metrics", 403), ("/health", 200)):
            hc = http.client.HTTPSConnection("localhost", https_port, context=ctx, timeout=10,
                                             source_address=("127.0.0.2", 0))
            hc.request("GET", path)
            r = hc.getresponse()
            st, body = r.status, r.read()
            hc.close()
            check(st == want, f"{path} through nginx: {st}")
            if path == "/health":
                check(body.strip() == b'{"status":"healthy"}',
                      f"/health through nginx: the status only: {body!r}")

        # a token that expires during the run: --token-command mints short ones
        # (4 s, grace 1 s); the subscriber must outlive the first one
        mint = os.path.join(tmp, "mint.py")
        with open(mint, "w") as f:
            f.write("import sys; sys.path.insert(0, %r)\nimport harness, time\n"
                    "print(harness.make_jwt({'sub': 'bob', 'exp': int(time.time()) + 4, "
                    "'pub': ['*'], 'subscribe': ['*']}, %r))\n"
                    % (os.path.dirname(os.path.abspath(__file__)), KEY))
        sub = subprocess.Popen([ARQ, "--url", url, "--ca", ca, "--token-command",
                                f"/usr/bin/python3 {mint}", "sub", "tls.long", "--from",
                                "earliest", "--count", "2"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
        rc, out, err = arq("--url", url, "--ca", ca, "--token", tok, "pub", "tls.long", "first")
        first_at = time.time()
        while time.time() < first_at + 8:  # past the first token's exp + grace
            time.sleep(0.2)
        rc, out, err = arq("--url", url, "--ca", ca, "--token", tok, "pub", "tls.long", "second")
        try:
            o, e = sub.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            sub.kill()
            o, e = sub.communicate()
        got = [x for x in o.splitlines() if x]
        check(sub.returncode == 0 and len(got) == 2 and '"payload":"second"' in got[1],
              f"arq sub with --token-command outlives its first token: {sub.returncode} {o!r} "
              f"{e!r}")
        log = open(arqd_log).read()
        check("subject=bob" not in log, "the refreshing subscriber was never closed for expiry")
        st, body = harness_http(arqd_port, "/metrics")
        m = re.search(rb"^arq_token_refreshes_total (\d+)$", body, re.M)
        check(m and int(m.group(1)) >= 1, "arqd counted the refresh")
    finally:
        if nginx and nginx.poll() is None:
            nginx.send_signal(signal.SIGQUIT)
            try:
                nginx.wait(timeout=20)
            except subprocess.TimeoutExpired:
                nginx.kill()
                nginx.wait()
        if arqd and arqd.poll() is None:
            arqd.send_signal(signal.SIGTERM)
            try:
                arqd.wait(timeout=20)
            except subprocess.TimeoutExpired:
                arqd.kill()
                arqd.wait()
        if failures:
            for f in ("arqd.log", "nginx-error.log"):
                p = os.path.join(tmp, f)
                if os.path.exists(p):
                    print(f"--- {f} (tail)\n" + "".join(open(p).readlines()[-20:]))
        shutil.rmtree(tmp, ignore_errors=True)
    if failures:
        print(f"{len(failures)} check(s) failed")
        sys.exit(1)
    print("all checks passed")


def run_replay(*args):
    env = {k: v for k, v in os.environ.items()
           if k not in ("ARQ_URL", "ARQ_TOKEN", "SECRET_KEY", "DATABASE_URL", "ARQ_DATA_DIR")}
    p = subprocess.run([REPLAY, *args, "--no-progress"], capture_output=True, text=True,
                       timeout=120, env=env)
    return p.returncode, p.stdout, p.stderr


def harness_http(port, path):
    import urllib.request
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
        return r.status, r.read()


main()
