"""Shared by the arq-replay tests (arq_replay_test.py, arq_replay_runbook_test.py):
a private MariaDB (scripts/mariadb) with one database per scenario, arqd with
DATABASE_URL on a free loopback port, arq-replay runs, an independent
WebSocket client (python3-websockets + python3-msgpack) and byte flips in a
WAL file. Standard library otherwise; everything under /var/tmp, processes
stopped by their PID."""
import asyncio
import base64
import hashlib
import hmac
import json
import os
import re
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request

import msgpack
import websockets

failures = []
passed = [0]
# What ASan, LSan and UBSan print (a sanitizer build runs these tests too).
SANITIZER = re.compile(r"ERROR: (Address|Leak)Sanitizer|runtime error:")


def check(cond, what):
    """Record one assertion; the test exits non-zero if any failed."""
    if cond:
        passed[0] += 1
    else:
        failures.append(what)
        print(f"FAIL: {what}", flush=True)
    return cond


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def b64url(b):
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


def make_jwt(sub, key, pub=("*",), subscribe=("*",), ttl=3600):
    claims = {"sub": sub, "exp": int(time.time()) + ttl, "pub": list(pub),
              "subscribe": list(subscribe)}
    header = b64url(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    payload = b64url(json.dumps(claims).encode())
    sig = hmac.new(key.encode(), f"{header}.{payload}".encode(), hashlib.sha256).digest()
    return f"{header}.{payload}.{b64url(sig)}"


class MariaDB:
    """scripts/mariadb in DIR; databases made on demand, each its own URL."""

    def __init__(self, script, d):
        self.script = script
        self.dir = d
        out = subprocess.run([script, "start", d], check=True, capture_output=True,
                             text=True).stdout
        self.base_url = out.strip().split("DATABASE_URL=", 1)[1]
        self.port = int(self.base_url.rsplit(":", 1)[1].split("/")[0])

    def pid(self):
        with open(os.path.join(self.dir, "mariadbd.pid")) as f:
            return int(f.read().strip())

    def sql(self, sql, db="arq"):
        out = subprocess.run(["mariadb", "--no-defaults",
                              f"--socket={os.path.join(self.dir, 'mariadbd.sock')}", "-uroot",
                              db, "-N", "-B", "-e", sql],
                             check=True, capture_output=True, text=True).stdout
        return [line.split("\t") for line in out.splitlines()]

    def new_db(self, name):
        """A fresh database `name` the arq user may use; its DATABASE_URL."""
        self.sql(f"DROP DATABASE IF EXISTS {name}; CREATE DATABASE {name} CHARACTER SET utf8mb4 "
                 f"COLLATE utf8mb4_bin; GRANT ALL ON {name}.* TO 'arq'@'127.0.0.1'; "
                 f"GRANT ALL ON {name}.* TO 'arq'@'localhost'", db="mysql")
        return self.base_url.rsplit("/", 1)[0] + "/" + name + "?connect_timeout=2&read_timeout=5"

    def dump(self, db, path):
        with open(path, "w") as f:
            subprocess.run(["mariadb-dump", "--no-defaults",
                            f"--socket={os.path.join(self.dir, 'mariadbd.sock')}", "-uroot",
                            "--single-transaction", db], check=True, stdout=f)

    def load(self, db, path):
        with open(path) as f:
            p = subprocess.run(["mariadb", "--no-defaults",
                                f"--socket={os.path.join(self.dir, 'mariadbd.sock')}", "-uroot",
                                db], stdin=f, capture_output=True, text=True)
        if p.returncode:
            raise RuntimeError(f"loading {path} into {db}: {p.stderr.strip()}")

    def stop(self):
        try:
            os.kill(self.pid(), signal.SIGCONT)
        except (OSError, ValueError):
            pass
        subprocess.run([self.script, "stop", self.dir], check=False, capture_output=True)


class Arqd:
    """arqd on a loopback port with its data directory; the deployment's
    variables come only from env."""

    def __init__(self, arqd, data, log_path, env=None, extra=(), port=0):
        e = {k: v for k, v in os.environ.items()
             if k not in ("SECRET_KEY", "DATABASE_URL", "API_PORT", "API_HOST", "ARQ_API_KEY",
                          "ARQ_ORIGINS", "ARQ_DATA_DIR", "ARQ_TOKEN", "ARQ_URL")}
        e.update(env or {})
        self.log = open(log_path, "a")
        self.port = port or free_port()
        flags = [] if e.get("SECRET_KEY") else ["--anonymous"]
        if not e.get("ARQ_API_KEY"):
            flags += ["--set", "auth.api_open=true"]
        self.proc = subprocess.Popen(
            [arqd, "--host", "127.0.0.1", "--port", str(self.port), "--data-dir", data, *flags,
             *extra],
            stdout=subprocess.PIPE, stderr=self.log, text=True, env=e)
        line = self.proc.stdout.readline()
        if "listening on" not in line:
            self.proc.kill()
            self.proc.wait()
            self.log.close()
            raise RuntimeError(f"arqd did not start: {line!r} (log {log_path})")
        self.url = f"ws://127.0.0.1:{self.port}/ws"

    def http(self, method, path, body=None, headers=None, timeout=5):
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", method=method,
                                     data=body, headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def health(self):
        try:
            return json.loads(self.http("GET", "/health")[1])
        except (OSError, ValueError):
            return None

    def metric(self, name):
        text = self.http("GET", "/metrics")[1].decode()
        for line in text.splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
        return None

    def wait_synced(self, timeout=60):
        deadline = time.time() + timeout
        h = None
        while time.time() < deadline:
            h = self.health()
            if h and h["sync"].get("state") == "ok" and h["sync"].get("lag_records") == 0:
                return h
            time.sleep(0.1)
        check(False, f"sync did not catch up: {h}")
        return h

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if not self.log.closed:
            self.log.close()
            with open(self.log.name, errors="replace") as f:
                text = f.read()
            check(not SANITIZER.search(text), f"arqd: sanitizer report in {self.log.name}")
        return self.proc.returncode

    def kill9(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
        if not self.log.closed:
            self.log.close()


class Replay:
    """Runs arq-replay with a clean environment (plus env)."""

    def __init__(self, exe):
        self.exe = exe

    def run(self, *args, env=None, timeout=300):
        e = {k: v for k, v in os.environ.items()
             if k not in ("SECRET_KEY", "DATABASE_URL", "ARQ_DATA_DIR", "ARQ_TOKEN", "ARQ_URL")}
        e.update(env or {})
        p = subprocess.run([self.exe, *args], capture_output=True, env=e, timeout=timeout)
        err = p.stderr.decode(errors="replace")
        check(not SANITIZER.search(err), f"arq-replay {' '.join(args[:3])}: sanitizer report: "
                                         f"{err[-2000:]}")
        return p.returncode, p.stdout, err

    def json(self, *args, env=None):
        rc, out, err = self.run(*args, "--json", env=env)
        try:
            return rc, json.loads(out), err
        except ValueError:
            check(False, f"arq-replay {' '.join(args)} --json printed no JSON: {out!r} {err}")
            return rc, None, err

    def lines(self, *args, env=None):
        """JSON lines (dump)."""
        rc, out, err = self.run(*args, env=env)
        return rc, [json.loads(x) for x in out.decode().splitlines() if x.strip()], err


# ---- an independent WebSocket client ----------------------------------------------


async def _hello(ws, token):
    await ws.send(msgpack.packb({"t": "hello", **({"token": token} if token else {})}))
    w = msgpack.unpackb(await ws.recv(), raw=False)
    if w.get("t") != "welcome":
        raise RuntimeError(f"no welcome: {w}")
    return w


async def _publish(url, stream, payloads, token, msgids, headers):
    out = []
    async with websockets.connect(url, subprotocols=["arq.v1"], max_size=None,
                                  close_timeout=2) as ws:
        await _hello(ws, token)
        pending = {}
        for i, p in enumerate(payloads):
            m = {"t": "pub", "id": i + 1, "stream": stream, "payload": p}
            if msgids:
                m["msgid"] = msgids[i]
            if headers and headers[i]:
                m["headers"] = headers[i]
            await ws.send(msgpack.packb(m, use_bin_type=True))
            pending[i + 1] = i
            while len(pending) >= 64 or (i == len(payloads) - 1 and pending):
                r = msgpack.unpackb(await ws.recv(), raw=False)
                if r["t"] == "puback":
                    pending.pop(r["id"])
                    out.append((r["id"], r["offset"], r["dup"]))
                elif r["t"] == "nack":
                    pending.pop(r["id"])
                    out.append((r["id"], None, r["code"]))
    return [(o, d) for _, o, d in sorted(out)]


def publish(url, stream, payloads, token=None, msgids=None, headers=None):
    """[(offset or None, dup flag or nack code)] in order of payloads."""
    return asyncio.run(_publish(url, stream, payloads, token, msgids, headers))


async def _subscribe(url, stream, frm, count, token, epoch, timeout):
    msgs, gaps, extra = [], [], {}
    async with websockets.connect(url, subprotocols=["arq.v1"], max_size=None,
                                  close_timeout=2) as ws:
        await _hello(ws, token)
        sub = {"t": "sub", "id": 1, "stream": stream, "from": frm}
        if epoch is not None:
            sub["epoch"] = epoch
        await ws.send(msgpack.packb(sub))
        deadline = time.time() + timeout
        while len(msgs) < count:
            left = deadline - time.time()
            if left <= 0:
                break
            try:
                m = msgpack.unpackb(await asyncio.wait_for(ws.recv(), left), raw=False)
            except asyncio.TimeoutError:
                break
            if m["t"] == "subok":
                extra["subok"] = m
            elif m["t"] == "nack":
                extra["nack"] = m
                break
            elif m["t"] == "gap":
                gaps.append((m["from"], m["to"]))
            elif m["t"] == "error":
                extra.setdefault("errors", []).append(m)
                break  # e.g. 500 "stream read failed": nothing more comes
            elif m["t"] == "msg":
                msgs.append((m["offset"], bytes(m["payload"]), m.get("headers")))
                await ws.send(msgpack.packb({"t": "ack", "stream": stream, "offset": m["offset"]}))
    return msgs, gaps, extra


def subscribe(url, stream, frm=1, count=1, token=None, epoch=None, timeout=20):
    """(messages [(offset, payload, headers)], gaps, {subok, nack, errors})."""
    return asyncio.run(_subscribe(url, stream, frm, count, token, epoch, timeout))


def flip_bytes(path, marker, delta=1):
    """Flip one byte inside every copy of marker in the file (LMDB keeps no
    checksums of its own, and free pages may hold stale copies). Returns how
    many copies were changed."""
    with open(path, "r+b") as f:
        data = bytearray(f.read())
        n, i = 0, data.find(marker)
        while i >= 0:
            data[i + len(marker) // 2] ^= delta
            n += 1
            i = data.find(marker, i + len(marker))
        f.seek(0)
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return n


def grep_log(path, pattern):
    with open(path) as f:
        return [ln for ln in f if re.search(pattern, ln)]
