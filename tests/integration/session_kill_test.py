#!/usr/bin/python3
"""A welcomed session survives SIGKILL at once (docs/protocol.md, 4a).

Usage: session_kill_test.py PATH_TO_ARQD

ROUNDS times: a client sends `hello`, and the moment its `welcome` arrives
the test SIGKILLs arqd, restarts it on the same data directory and port, and
resumes with the `session` and `resume_token` it was given: the `welcome`
must say `resumed: true`. arqd sends a new session's welcome only once the
session is durable; before that rule the welcome went out right after the
session's write was queued, and a kill in between lost the session.
"""
import asyncio
import os
import shutil
import signal
import sys
import tempfile

import msgpack
import websockets

ARQD = sys.argv[1]
ROUNDS = int(os.environ.get("ARQ_SESSION_KILL_ROUNDS", "25"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from harness import check, failures  # noqa: E402


async def hello(url, session=None, token=None, kill=None):
    """Send hello; return the welcome. kill() runs as soon as it arrived."""
    async with websockets.connect(url, subprotocols=["arq.v1"], close_timeout=1) as ws:
        m = {"t": "hello", "client": "session-kill-test"}
        if session:
            m["session"], m["resume_token"] = session, token
        await ws.send(msgpack.packb(m))
        w = msgpack.unpackb(await asyncio.wait_for(ws.recv(), 10), raw=False)
        if kill:
            kill()
        return w


def main():
    tmp = tempfile.mkdtemp(prefix="arq-session-kill-", dir="/var/tmp")
    data = os.path.join(tmp, "data")
    d = harness.Arqd(ARQD, data)
    port = d.port
    resumed = 0
    try:
        for i in range(ROUNDS):
            def kill(proc=d.proc):
                proc.send_signal(signal.SIGKILL)
            try:
                w = asyncio.run(hello(d.url, kill=kill))
            except (OSError, websockets.exceptions.WebSocketException) as e:
                check(False, f"round {i}: hello: {e!r}")
                break
            d.proc.wait()
            if not check(w.get("t") == "welcome" and not w.get("resumed"),
                         f"round {i}: a new session's welcome: {w}"):
                break
            d = harness.Arqd(ARQD, data, port=port)
            w2 = asyncio.run(hello(d.url, w["session"], w["resume_token"]))
            if check(w2.get("t") == "welcome" and w2.get("resumed") is True and
                     w2.get("session") == w["session"],
                     f"round {i}: the session welcomed just before SIGKILL resumes: {w2}"):
                resumed += 1
        print(f"{resumed} of {ROUNDS} sessions resumed after a SIGKILL right after their welcome",
              flush=True)
    finally:
        d.kill_if_running()
        shutil.rmtree(tmp, ignore_errors=True)
    if failures:
        print(f"{len(failures)} check(s) failed", flush=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
