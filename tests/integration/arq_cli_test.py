#!/usr/bin/python3
"""The `arq` command-line client (and so libarq) against a real arqd.

Usage: arq_cli_test.py PATH_TO_ARQD PATH_TO_ARQ

Starts arqd on a free loopback port with a temporary data directory (once
anonymous, once with a SECRET_KEY), runs `arq pub` / `arq sub` against it and
checks their output; binary payloads are published with Debian's
python3-websockets + python3-msgpack, an implementation we did not write.
"""
import asyncio
import base64
import json
import os
import re
import shutil
import socket
import signal
import subprocess
import sys
import tempfile
import time

import msgpack
import websockets

ARQD, ARQ = sys.argv[1], sys.argv[2]
SECRET = "cli-test-secret-key-0123456789abcdef"
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from harness import failures  # noqa: E402


def check(cond, what):
    return harness.check(cond, what, verbose=False)


def Arqd(data_dir, *extra, env=None):
    return harness.Arqd(ARQD, data_dir, *extra, env=env)


def make_jwt(claims, key=SECRET, alg="HS256"):
    return harness.make_jwt(claims, key, alg)


def arq(*args, input=None, env_url=None, timeout=60):
    env = {k: v for k, v in os.environ.items() if k != "ARQ_URL"}
    if env_url:
        env["ARQ_URL"] = env_url
    r = subprocess.run([ARQ, *args], input=input, capture_output=True, timeout=timeout, env=env)
    return r.returncode, r.stdout.decode(errors="replace"), r.stderr.decode(errors="replace")


async def py_publish(url, stream, payload):
    async with websockets.connect(url, subprotocols=["arq.v1"]) as ws:
        await ws.send(msgpack.packb({"t": "hello", "client": "py"}, use_bin_type=True))
        msgpack.unpackb(await ws.recv(), raw=False)
        await ws.send(msgpack.packb({"t": "pub", "id": 1, "stream": stream, "payload": payload},
                                    use_bin_type=True))
        while True:
            r = msgpack.unpackb(await asyncio.wait_for(ws.recv(), 10), raw=False)
            if r.get("id") == 1:
                return r


def json_lines(out):
    rows = []
    for line in out.splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            rows.append({"bad": line})
    return rows


def scenario_anonymous(d):
    url = d.url
    # pub: one message each, offsets 1, 2, 3
    outs = [arq("--url", url, "pub", "cli.a", f"hello {i}") for i in range(3)]
    check([o[:2] for o in outs] == [(0, "1\n"), (0, "2\n"), (0, "3\n")],
          f"arq pub prints offsets 1,2,3: {outs}")

    # ARQ_URL from the environment; --url wins over it
    rc, out, err = arq("pub", "cli.env", "x", env_url=url)
    check(rc == 0 and out == "1\n", f"ARQ_URL is used: {rc} {out!r} {err!r}")

    # pub - : 100 stdin lines, pipelined, offsets in input order
    lines = [f"line {i} \"quoted\" \\ é" for i in range(100)]
    rc, out, err = arq("--url", url, "pub", "cli.a", "-", input="\n".join(lines).encode() + b"\n")
    offs = [int(x) for x in out.split()] if rc == 0 else []
    check(rc == 0 and offs == list(range(4, 104)), f"pub - prints 100 offsets 4..103: {rc} {err}")

    # the last line without a newline is a message too; empty lines are empty messages
    rc, out, err = arq("--url", url, "pub", "cli.b", "-", input=b"one\n\nthree")
    check(rc == 0 and out == "1\n2\n3\n", f"pub - last line without newline: {rc} {out!r} {err}")

    # sub --from earliest --count 103
    rc, out, err = arq("--url", url, "sub", "cli.a", "--from", "earliest", "--count", "103")
    rows = json_lines(out)
    want = [f"hello {i}" for i in range(3)] + lines
    check(rc == 0 and len(rows) == 103, f"sub --count 103 prints 103 lines: {rc} {len(rows)} {err}")
    check([r.get("offset") for r in rows] == list(range(1, 104)), "sub offsets 1..103 in order")
    check(all(r.get("stream") == "cli.a" for r in rows), "sub stream field")
    check([r.get("payload") for r in rows] == want, "sub payloads match what was published")
    check(all(isinstance(r.get("ts"), int) and r["ts"] > 1_600_000_000_000_000 for r in rows)
          and all("encoding" not in r for r in rows), "sub ts in microseconds, text payloads")

    # default --from is earliest; --from N
    rc, out, err = arq("--url", url, "sub", "cli.b", "--count", "3")
    check(rc == 0 and [r.get("payload") for r in json_lines(out)] == ["one", "", "three"],
          f"sub default from earliest: {rc} {out!r} {err}")
    rc, out, err = arq("--url", url, "sub", "cli.a", "--from", "100", "--count", "2")
    check(rc == 0 and [r.get("offset") for r in json_lines(out)] == [100, 101],
          f"sub --from 100: {rc} {out!r} {err}")

    # binary payload -> base64
    blob = bytes([0, 0xff, 0xfe, 0x80, 10, 13]) + os.urandom(64)
    r = asyncio.run(py_publish(url, "cli.bin", blob))
    check(r.get("t") == "puback" and r.get("offset") == 1, f"python publish: {r}")
    rc, out, err = arq("--url", url, "sub", "cli.bin", "--count", "1")
    rows = json_lines(out)
    check(rc == 0 and len(rows) == 1 and rows[0].get("encoding") == "base64"
          and base64.b64decode(rows[0].get("payload", "")) == blob,
          f"binary payload comes out base64: {rc} {out!r} {err}")

    # pub --header: every message of the run carries them; sub prints them as an object
    rc, out, err = arq("--url", url, "pub", "cli.h", "-H", "a=1", "--header", "b=x=y", "one")
    check(rc == 0 and out == "1\n", f"pub --header: {rc} {out!r} {err!r}")
    rc, out, err = arq("--url", url, "pub", "cli.h", "two")
    rc2, out2, err2 = arq("--url", url, "pub", "cli.h", "-H", "k=", "-", input=b"l1\nl2\n")
    check(rc == 0 and rc2 == 0 and out2 == "3\n4\n", f"pub - --header: {rc2} {out2!r} {err2!r}")
    rc, out, err = arq("--url", url, "sub", "cli.h", "--count", "4")
    rows = json_lines(out)
    check(rc == 0 and [r.get("headers") for r in rows] ==
          [{"a": "1", "b": "x=y"}, None, {"k": ""}, {"k": ""}]
          and [r.get("payload") for r in rows] == ["one", "two", "l1", "l2"],
          f"sub prints the headers as published: {rc} {out!r} {err}")
    r = asyncio.run(py_publish(url, "cli.h", b"five"))
    rc, out, err = arq("--url", url, "sub", "cli.h", "--from", "5", "--count", "1")
    check(rc == 0 and "headers" not in json_lines(out)[0], f"no headers, no key: {out!r}")

    # sub --from latest started before a publish receives it
    p = subprocess.Popen([ARQ, "--url", url, "sub", "cli.live", "--from", "latest", "--count",
                          "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    time.sleep(0.5)  # give it time to subscribe
    arq("--url", url, "pub", "cli.live", "before-latest-is-irrelevant")
    try:
        out, err = p.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        p.kill()
        out, err = p.communicate()
    rows = json_lines(out.decode())
    check(p.returncode == 0 and len(rows) == 1 and rows[0].get("offset") == 1
          and rows[0].get("payload") == "before-latest-is-irrelevant",
          f"sub --from latest receives a later publish: {p.returncode} {out!r} {err!r}")

    # sub without --count: SIGINT ends it with 0
    p = subprocess.Popen([ARQ, "--url", url, "sub", "cli.b"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    time.sleep(0.5)
    p.send_signal(signal.SIGINT)
    try:
        out, err = p.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        p.kill()
        out, err = p.communicate()
    check(p.returncode == 0 and len(out.splitlines()) == 3,
          f"sub until SIGINT exits 0: {p.returncode} {out!r} {err!r}")

    # nack: invalid stream name -> error: 400 ..., exit 1
    rc, out, err = arq("--url", url, "pub", "bad..name", "x")
    check(rc == 1 and out == "" and re.match(r"error: 400 \S", err),
          f"nack prints 'error: <code> <reason>': {rc} {out!r} {err!r}")
    # payload over max_payload: refused before sending
    rc, out, err = arq("--url", url, "pub", "cli.big", "-", input=b"x" * (2 << 20))
    check(rc == 1 and "error" in err, f"oversized payload: {rc} {err!r}")

    # bad URL, unreachable port, wrong path
    rc, out, err = arq("--url", "http://127.0.0.1/ws", "pub", "s", "x")
    check(rc != 0 and "invalid URL" in err, f"bad URL: {rc} {err!r}")
    rc, out, err = arq("--url", "ws://no.such.host.invalid:1/ws", "pub", "s", "x")
    check(rc == 1 and "cannot resolve no.such.host.invalid" in err, f"unknown host: {rc} {err!r}")
    rc, out, err = arq("--url", "ws://bad_host!:1/ws", "pub", "s", "x")
    check(rc == 2 and "invalid URL" in err, f"not a host name: {rc} {err!r}")
    rc, out, err = arq("--url", "ws://127.0.0.1:1/ws", "pub", "s", "x")
    check(rc == 1 and "connect to 127.0.0.1:1" in err and "refused" in err,
          f"unreachable port: {rc} {err!r}")
    rc, out, err = arq("--url", f"ws://localhost:{d.port}/nope", "pub", "s", "x")
    check(rc == 1 and "HTTP 404" in err, f"wrong path: {rc} {err!r}")

    # usage
    for args in (["pub"], ["pub", "s"], ["frob", "s"], ["sub", "s", "--from", "0"],
                 ["sub", "s", "--count", "x"], ["pub", "s", "x", "--count", "1"], ["--bogus"],
                 ["pub", "s", "x", "-H", "novalue"], ["pub", "s", "x", "-H", "=v"],
                 ["sub", "s", "-H", "a=b"]):
        rc, out, err = arq("--url", url, *args)
        check(rc == 2 and err, f"usage error {args}: {rc} {err!r}")
    rc, out, err = arq("--help")
    check(rc == 0 and "usage" in out, "--help")
    rc, out, err = arq("--version")
    check(rc == 0 and out.startswith("arq "), "--version")


def scenario_connection_loss(tmp):
    d = Arqd(os.path.join(tmp, "data-loss"))
    p = subprocess.Popen([ARQ, "--url", d.url, "sub", "cli.lost"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    time.sleep(0.5)
    rc_d = d.stop()
    try:
        out, err = p.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        p.kill()
        out, err = p.communicate()
    check(rc_d == 0, f"arqd stop: {rc_d}")
    check(p.returncode == 1 and b"error:" in err,
          f"sub exits 1 on connection loss: {p.returncode} {err!r}")


def scenario_url_list(tmp):
    """-u A,B: a node that refuses connections is failed over to the next."""
    d = Arqd(os.path.join(tmp, "data-urls"))
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    dead = f"ws://127.0.0.1:{s.getsockname()[1]}/ws"  # bound, not listening: refused
    try:
        rc, out, err = arq("--url", f"{dead},{d.url}", "pub", "cli.urls", "-", input=b"a\nb\n")
        check(rc == 0 and out.split() == ["1", "2"],
              f"pub - over a dead URL and a live one: both published ({rc} {out!r} {err!r})")
        rc, out, err = arq("--url", f"{d.url},http://x/", "pub", "cli.urls", "c")
        check(rc != 0 and out == "", f"a list with a bad URL is refused ({rc} {err!r})")
        rc, out, err = arq("--url", d.url, "sub", "cli.urls", "--count", "2")
        check(rc == 0 and [m["payload"] for m in json_lines(out)] == ["a", "b"],
              f"what went through the list is stored once each: {out!r}")
    finally:
        s.close()
        d.stop()


def scenario_auth(tmp):
    d = Arqd(os.path.join(tmp, "data-auth"), env={"SECRET_KEY": SECRET})
    try:
        tok = make_jwt({"sub": "cli-user", "exp": int(time.time()) + 600,
                        "pub": ["auth.*"], "subscribe": ["auth.*"]})
        rc, out, err = arq("--url", d.url, "--token", tok, "pub", "auth.x", "secret hello")
        check(rc == 0 and out == "1\n", f"pub with a valid token: {rc} {out!r} {err!r}")
        rc, out, err = arq("--url", d.url, "pub", "auth.x", "no token")
        check(rc != 0 and out == "" and "401" in err, f"pub without token: {rc} {err!r}")
        bad = make_jwt({"sub": "cli-user", "exp": int(time.time()) + 600, "pub": ["*"]},
                       key="wrong")
        rc, out, err = arq("--url", d.url, "--token", bad, "pub", "auth.x", "bad token")
        check(rc != 0 and "401" in err, f"pub with a badly signed token: {rc} {err!r}")
        rc, out, err = arq("--url", d.url, "--token", tok, "pub", "other", "x")
        check(rc == 1 and err.startswith("error: 403 "), f"pub not allowed: {rc} {err!r}")
        rc, out, err = arq("--url", d.url, "--token", tok, "sub", "other", "--count", "1")
        check(rc == 1 and err.startswith("error: 403 "), f"sub not allowed: {rc} {err!r}")

        # --msgid-prefix: a rerun (same producer: the token's subject) is deduplicated
        data = "".join(f"m{i}\n" for i in range(20)).encode()
        rc1, out1, err1 = arq("--url", d.url, "--token", tok, "--msgid-prefix", "run-",
                              "pub", "auth.d", "-", input=data)
        rc2, out2, err2 = arq("--url", d.url, "--token", tok, "--msgid-prefix", "run-",
                              "pub", "auth.d", "-", input=data)
        check(rc1 == 0 and out1.split() == [str(i) for i in range(1, 21)],
              f"msgid run 1: {rc1} {out1!r} {err1!r}")
        check(rc2 == 0 and out2 == out1, f"msgid rerun prints the same offsets: {out2!r}")
        rc, out, err = arq("--url", d.url, "--token", tok, "pub", "auth.d", "after")
        check(rc == 0 and out == "21\n", f"nothing appended by the rerun: {out!r} {err!r}")
        rc, out, err = arq("--url", d.url, "--token", tok, "sub", "auth.d", "--count", "21")
        rows = json_lines(out)
        check(rc == 0 and [r.get("payload") for r in rows] == [f"m{i}" for i in range(20)]
              + ["after"], f"sub with token: {rc} {err!r}")
    finally:
        rc = d.stop()
        check(rc == 0, f"auth arqd stop: {rc}")


def main():
    tmp = tempfile.mkdtemp(prefix="arq-cli-", dir="/var/tmp")
    d = Arqd(os.path.join(tmp, "data"))
    try:
        scenario_anonymous(d)
        rc = d.stop()
        check(rc == 0, f"arqd stop: {rc}")
        scenario_auth(tmp)
        scenario_connection_loss(tmp)
        scenario_url_list(tmp)
    finally:
        if d.proc.poll() is None:
            d.proc.kill()
        shutil.rmtree(tmp, ignore_errors=True)
    if failures:
        print(f"{len(failures)} check(s) failed", flush=True)
        sys.exit(1)
    print("all arq cli checks passed", flush=True)


main()
