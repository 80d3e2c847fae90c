#!/usr/bin/python3
"""The Python client under the shared conformance suite (tests/clients/):
reads commands as JSON lines on stdin, writes what the client reports as JSON
lines on stdout (protocol: tests/clients/README.md). clients/js/test/agent.mjs
is the same agent for the JS client."""
import asyncio
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from arq_client import ArqError, Client, SavedSession  # noqa: E402


def out(ev):
    sys.stdout.write(json.dumps(ev) + "\n")
    sys.stdout.flush()


def err_ev(e):
    if isinstance(e, ArqError):
        return {"code": e.code, "status": e.status, "message": str(e)}
    return {"code": "exception", "status": None, "message": repr(e)}


class Store:
    """The application's own store: the suite reads the session from it (takeover)."""

    def load(self):
        return None

    def save(self, s: SavedSession):
        out({"ev": "session", "session": s.session, "resume_token": s.resume_token})


class Agent:
    def __init__(self):
        self.client = None
        self.subs = {}
        self.tasks = set()

    def spawn(self, coro):
        t = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(t)
        t.add_done_callback(self.tasks.discard)

    def connect(self, cmd):
        token = cmd.get("token")
        tokens = list(cmd["tokens"]) if cmd.get("tokens") else None
        calls = 0

        async def provider():
            # the next token for each attempt (the last one repeats)
            nonlocal calls
            calls += 1
            out({"ev": "token", "n": calls})
            return tokens.pop(0) if len(tokens) > 1 else tokens[0]

        backoff = cmd.get("backoff") or [10, 300]
        c = Client(cmd["url"], token=provider if tokens else token, reconnect=cmd.get("reconnect", True),
                   backoff_base=backoff[0] / 1000, backoff_cap=backoff[1] / 1000,
                   max_retries=cmd.get("max_retries", 0), max_pending=cmd.get("max_pending", 10000),
                   session=Store())
        self.client = c
        c.on("state", lambda a, b, e: out({"ev": "state", "from": a, "to": b, **({"error": err_ev(e)} if e else {})}))
        c.on("gap", lambda s, f, t: out({"ev": "gap", "stream": s, "from": f, "to": t}))
        c.on("epoch", lambda s, o, n: out({"ev": "epoch", "stream": s, "old": str(o), "new": str(n)}))
        c.on("error", lambda e: out({"ev": "error", **err_ev(e)}))

        async def run():
            try:
                await c.connect()
                out({"ev": "connected"})
            except ArqError as e:
                out({"ev": "connect_failed", **err_ev(e)})

        self.spawn(run())

    def subscribe(self, cmd):
        stream = cmd["stream"]
        try:
            sub = self.client.subscribe(
                stream, cmd.get("from", "earliest"),
                epoch=int(cmd["epoch"]) if cmd.get("epoch") is not None else None,
                auto_ack=cmd.get("ack") != "none",
                on_message=lambda m: out({"ev": "msg", "stream": m.stream, "offset": m.offset,
                                          "payload": m.text()}))
        except ArqError as e:
            out({"ev": "subfail", "stream": stream, **err_ev(e)})
            return
        self.subs[stream] = sub

        async def ready():
            try:
                i = await sub.ready
                out({"ev": "subok", "stream": stream, "epoch": str(i.epoch), "first": i.first, "next": i.next})
            except ArqError as e:
                out({"ev": "subfail", "stream": stream, **err_ev(e)})

        self.spawn(ready())

    def publish(self, stream, payload, msgid, tag):
        fut = self.client.publish(stream, payload, msgid=msgid)

        def done(f):
            e = f.exception()
            if e is not None:
                out({"ev": "puberr", "tag": tag, **err_ev(e)})
            else:
                a = f.result()
                out({"ev": "puback", "tag": tag, "stream": a.stream, "offset": a.offset, "dup": a.dup,
                     "msgid": a.msgid})
        fut.add_done_callback(done)
        return fut

    async def publish_many(self, cmd):
        """Publisher p of a chaos run: message j to stream prefix.(j % n),
        payload "run:p:j", msgid "run-p-j", at most depth in flight, at most
        rate per second."""
        window = asyncio.Semaphore(cmd["depth"])
        pending = []
        for j in range(cmd["count"]):
            await window.acquire()
            if cmd.get("rate"):
                await asyncio.sleep(1 / cmd["rate"])
            f = self.publish(f"{cmd['prefix']}.{j % cmd['streams']}", f"{cmd['run']}:{cmd['p']}:{j}",
                             f"{cmd['run']}-{cmd['p']}-{j}", j)
            f.add_done_callback(lambda _f: window.release())
            pending.append(f)
        await asyncio.gather(*pending, return_exceptions=True)
        out({"ev": "published"})

    def handle(self, cmd):
        name = cmd["cmd"]
        if name == "connect":
            self.connect(cmd)
        elif name == "subscribe":
            self.subscribe(cmd)
        elif name == "ack":
            try:
                self.subs[cmd["stream"]].ack(cmd["offset"])
            except ArqError as e:
                out({"ev": "error", **err_ev(e)})
        elif name == "publish":
            self.publish(cmd["stream"], cmd["payload"], cmd.get("msgid"), cmd.get("tag"))
        elif name == "publish_many":
            self.spawn(self.publish_many(cmd))
        elif name == "stats":
            s = self.client.stats
            out({"ev": "stats", "state": self.client.state, "connects": s.connects, "reconnects": s.reconnects,
                 "resumed": s.resumed, "redeliveries_dropped": s.redeliveries_dropped,
                 "publishes_resent": s.publishes_resent, "resubscribes": s.resubscribes,
                 "pending_publishes": s.pending_publishes})
        elif name == "close":
            async def close():
                await self.client.close()
                out({"ev": "closed"})
            self.spawn(close())
        else:
            out({"ev": "error", "code": "agent", "message": f"unknown command {name}"})


async def main():
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    agent = Agent()
    out({"ev": "ready", "client": "python"})
    while True:
        line = await reader.readline()
        if not line:
            # The suite is done with us: exit at once, as the JS agent does,
            # rather than wait for close handshakes.
            sys.stdout.flush()
            os._exit(0)
        if line.strip():
            agent.handle(json.loads(line))


if __name__ == "__main__":
    asyncio.run(main())
