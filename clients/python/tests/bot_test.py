#!/usr/bin/python3
"""The example bot of docs/clients.md (clients/python/examples/inbox_bot.py)
against a real arqd: questions published through POST /api/publish, the bot
SIGKILLed and restarted mid-way and arqd SIGKILLed and restarted on the same
port and data directory; afterwards every question has exactly one answer in
its user's inbox, in order, read back independently.

Usage: bot_test.py PATH_TO_ARQD
"""
import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(HERE)))
sys.path.insert(0, os.path.join(ROOT, "tests", "integration"))
import harness  # noqa: E402

ARQD = sys.argv[1]
KEY = "bot-test-api-key"
SECRET = "bot-test-secret-0123456789abcdefgh"
N = 30


def check(cond, what):
    return harness.check(cond, what, verbose=True)


def post(d, stream, text, user):
    body = json.dumps({"stream": stream, "payload": text, "headers": {"user": user}}).encode()
    st, out = d.http("POST", "/api/publish", body, {"Authorization": f"Bearer {KEY}",
                                                   "Content-Type": "application/json",
                                                   "Content-Length": str(len(body))})
    if st != 200:
        raise SystemExit(f"publish failed: {st} {out!r}")


def main():
    tmp = tempfile.mkdtemp(prefix="arq-bot-")
    data = os.path.join(tmp, "data")
    env = {"ARQ_API_KEY": KEY, "SECRET_KEY": SECRET}
    log = open(os.path.join(tmp, "arqd.log"), "a")
    d = harness.Arqd(ARQD, data, env=env, log=log)
    port = d.port
    token = harness.make_jwt({"sub": "inbox-bot", "exp": int(time.time()) + 3600, "pub": ["user.*"],
                              "subscribe": ["assistant.*"]}, SECRET)
    reader = harness.make_jwt({"sub": "reader", "exp": int(time.time()) + 3600, "subscribe": ["*"]}, SECRET)
    bot = None
    try:
        def start_bot():
            return subprocess.Popen(
                ["/usr/bin/python3", os.path.join(ROOT, "clients", "python", "examples", "inbox_bot.py"), d.url,
                 "--state", os.path.join(tmp, "bot.json"), "--token", token],
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

        bot = start_bot()
        users = [str(i % 3) for i in range(N)]
        for i in range(N // 3):
            post(d, "assistant.questions", f"q{i}", users[i])
        time.sleep(0.5)
        bot.send_signal(signal.SIGKILL)  # the bot dies mid-way ...
        bot.wait()
        for i in range(N // 3, 2 * N // 3):
            post(d, "assistant.questions", f"q{i}", users[i])
        bot = start_bot()  # ... and resumes its session from the state file
        time.sleep(0.5)
        d.proc.send_signal(signal.SIGKILL)  # then arqd dies
        d.proc.wait()
        d = harness.Arqd(ARQD, data, env=env, port=port, log=log)
        for i in range(2 * N // 3, N):
            post(d, "assistant.questions", f"q{i}", users[i])
        streams = [f"user.{u}.inbox" for u in sorted(set(users))]
        deadline = time.time() + 60
        want = {s: [f"you asked: q{i}" for i in range(N) if f"user.{users[i]}.inbox" == s] for s in streams}
        got = {}
        while time.time() < deadline:
            got = asyncio.run(read_all(d.url, streams, reader))
            if all(len(got[s]) >= len(want[s]) for s in streams):
                break
            time.sleep(0.3)
        for s in streams:
            check(got.get(s) == want[s], f"bot: {s} holds each answer once, in order ({got.get(s)})")
    finally:
        if bot is not None and bot.poll() is None:
            bot.kill()
            bot.wait()
        d.kill_if_running()
        shutil.rmtree(tmp, ignore_errors=True)
    if harness.failures:
        sys.exit(1)
    print("1 passed, 0 failed")


async def read_all(url, streams, token):
    """The inboxes, read with python-websockets + msgpack (not arq_client)."""
    import msgpack
    import websockets
    rows = {s: [] for s in streams}
    async with websockets.connect(url, subprotocols=["arq.v1"]) as ws:
        await ws.send(msgpack.packb({"t": "hello", "token": token}))
        msgpack.unpackb(await ws.recv())
        for i, s in enumerate(streams):
            await ws.send(msgpack.packb({"t": "sub", "id": i + 1, "stream": s, "from": "earliest"}))
        nexts = {}
        while len(nexts) < len(streams) or sum(len(v) for v in rows.values()) < sum(n - 1 for n in nexts.values()):
            m = msgpack.unpackb(await asyncio.wait_for(ws.recv(), 10), raw=False)
            if m["t"] == "subok":
                nexts[m["stream"]] = m["next"]
            elif m["t"] == "msg":
                rows[m["stream"]].append(m["payload"].decode())
    return rows


if __name__ == "__main__":
    main()
