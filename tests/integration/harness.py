"""Shared by the integration tests: start and stop arqd, record checks, sign
JWTs. Standard library only (JWTs are signed with hmac here, independently
of arqd's libjwt)."""
import base64
import hashlib
import hmac
import json
import os
import re
import signal
import subprocess
import urllib.error
import urllib.request

failures = []


def check(cond, what, verbose=False):
    """Record one assertion; the test exits non-zero if any failed."""
    if not cond:
        failures.append(what)
        print(f"FAIL: {what}", flush=True)
    elif verbose:
        print(f"ok: {what}", flush=True)
    return cond


class Arqd:
    """arqd on a free loopback port with its own data directory. The
    deployment's variables are removed from its environment unless given.
    port: a fixed port instead of a free one (to restart arqd where it was).
    log: a file object that gets arqd's stderr instead of a pipe (for long or
    chatty runs, where an unread pipe would fill up and block arqd).
    Without a SECRET_KEY in env, arqd runs with --anonymous (clients without
    a token get full access; arqd refuses to start with neither), and
    without ARQ_API_KEY the server API is opened (auth.api_open): the
    defaults are closed (docs/operations.md, "Security model")."""

    def __init__(self, arqd, data_dir, *extra, env=None, port=0, log=None):
        e = {k: v for k, v in os.environ.items()
             if k not in ("SECRET_KEY", "DATABASE_URL", "API_PORT", "API_HOST", "ARQ_ORIGINS",
                          "ARQ_API_KEY", "ARQ_ANONYMOUS", "SECRET_KEY_PREVIOUS",
                          "ARQ_TRUSTED_PROXIES", "ARQ_MONITOR_TOKEN")}
        e.update(env or {})
        self.proc = subprocess.Popen(
            [arqd, "--host", "127.0.0.1", "--port", str(port), "--data-dir", data_dir,
             *open_flags(e), *extra],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE if log is None else log, text=True,
            env=e)
        line = self.proc.stdout.readline()
        m = re.search(r"ws://127\.0\.0\.1:(\d+)/ws", line)
        if not m:
            self.proc.kill()
            raise SystemExit(f"arqd did not start: {line!r} "
                             f"{self.proc.stderr.read() if self.proc.stderr else ''}")
        self.port = int(m.group(1))
        self.url = f"ws://127.0.0.1:{self.port}/ws"
        self.stderr = ""

    def http(self, method, path, body=None, headers=None):
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", method=method,
                                     data=body, headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def stop(self):
        """SIGTERM; returns the exit status and keeps what arqd logged."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = "timeout"
        self.stderr = self.proc.stderr.read() if self.proc.stderr else ""
        return rc

    def kill_if_running(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def open_flags(env):
    """The flags a test arqd needs for what the defaults keep closed: anonymous
    clients unless env has a SECRET_KEY, the server API unless it has an
    ARQ_API_KEY."""
    flags = []
    if not env.get("SECRET_KEY"):
        flags.append("--anonymous")
    if not env.get("ARQ_API_KEY"):
        flags += ["--set", "auth.api_open=true"]
    return flags


def b64url(b):
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


def make_jwt(claims, key, alg="HS256"):
    header = b64url(json.dumps({"alg": alg, "typ": "JWT"}).encode())
    payload = b64url(json.dumps(claims).encode())
    sig = hmac.new(key.encode(), f"{header}.{payload}".encode(), hashlib.sha256).digest()
    return f"{header}.{payload}.{b64url(sig)}"
