#!/usr/bin/python3
"""arq_client against a scripted in-process server on a loopback port: what
the client sends, when, and what the application sees. Standard library
unittest; run directly or through meson (clients_python_unit)."""
import asyncio
import os
import sys
import tempfile
import unittest

import msgpack
import websockets

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from arq_client import ArqError, Client, FileSession, SavedSession, backoff_delay  # noqa: E402
from arq_client import codec  # noqa: E402

STEP = 10


class Server:
    """Each accepted connection is a Conn the test plays the server side of."""

    def __init__(self):
        self.conns = asyncio.Queue()

    async def start(self):
        async def handler(ws, *_):
            c = Conn(ws)
            await self.conns.put(c)
            await ws.wait_closed()
        self.srv = await websockets.serve(handler, "127.0.0.1", 0, subprotocols=["arq.v1"])
        self.url = f"ws://127.0.0.1:{self.srv.sockets[0].getsockname()[1]}/ws"
        return self

    async def accept(self, **welcome):
        c = await asyncio.wait_for(self.conns.get(), STEP)
        hello = await c.recv()
        await c.send(**{"t": "welcome", "session": "s1", "resume_token": "rt1", "resumed": False,
                        "session_ttl": 60, "server": "t", "max_payload": 1024, "max_inflight": 8, **welcome})
        return c, hello

    async def stop(self):
        self.srv.close()
        await self.srv.wait_closed()


class Conn:
    def __init__(self, ws):
        self.ws = ws

    async def recv(self, t=None):
        while True:
            raw = await asyncio.wait_for(self.ws.recv(), STEP)
            m = msgpack.unpackb(raw, raw=False)
            m["raw"] = raw
            if t is None or m["t"] == t:
                return m

    async def send(self, **m):
        await self.ws.send(msgpack.packb(m))

    def cut(self):
        self.ws.transport.abort()


class ClientTest(unittest.IsolatedAsyncioTestCase):
    async def asyncSetUp(self):
        self.srv = await Server().start()

    async def asyncTearDown(self):
        await self.srv.stop()

    def client(self, **kw):
        return Client(self.srv.url, backoff_base=0.001, backoff_cap=0.002, heartbeat_interval=None, **kw)

    async def test_queue_full_and_pubacks(self):
        c = self.client(max_pending=2)
        connecting = asyncio.ensure_future(c.connect())
        await asyncio.sleep(0)
        p1 = c.publish("chat.a", "one")
        p2 = c.publish("chat.a", b"\x01\x02", msgid="m-2", headers={"k": "v"})
        with self.assertRaises(ArqError) as e:
            await c.publish("chat.a", "three")
        self.assertEqual(e.exception.code, "full")
        conn, hello = await self.srv.accept()
        await connecting
        a, b = await conn.recv("pub"), await conn.recv("pub")
        self.assertEqual((a["payload"], b["msgid"], b["headers"]), (b"one", "m-2", {"k": "v"}))
        await conn.send(t="puback", id=b["id"], stream="chat.a", offset=2, dup=False)
        await conn.send(t="puback", id=a["id"], stream="chat.a", offset=1, dup=False)
        self.assertEqual(((await p1).offset, (await p2).offset), (1, 2))
        with self.assertRaises(ArqError) as e:
            await c.publish("chat.a", b"x" * 2000)
        self.assertEqual(e.exception.code, "too-big")
        await c.close()
        self.assertEqual(c.state, "closed")

    async def test_several_urls_fail_over(self):
        with self.assertRaises(ArqError):
            Client([], heartbeat_interval=None)
        with self.assertRaises(ArqError):
            Client(["ws://a/ws", "http://b"], heartbeat_interval=None)
        dead = Server()
        await dead.start()
        dead_url = dead.url
        await dead.stop()  # nothing listens there any more: node a is down
        c = Client([dead_url, self.srv.url], backoff_base=0.001, backoff_cap=0.002,
                   heartbeat_interval=None)
        connecting = asyncio.ensure_future(c.connect())
        conn, _ = await self.srv.accept()
        await connecting
        self.assertEqual(c.url, self.srv.url)
        conn.cut()  # lost after the welcome: a is tried, then b again, resuming
        conn2, hello = await self.srv.accept()
        self.assertEqual(hello.get("session"), "s1")
        await c.close()

    async def test_publish_ack_level(self):
        c = self.client()
        connecting = asyncio.ensure_future(c.connect())
        conn, _ = await self.srv.accept()
        await connecting
        with self.assertRaises(ArqError) as e:
            await c.publish("s", "x", ack="quorum")
        self.assertEqual(e.exception.code, "invalid")
        p1 = c.publish("s", "r", ack="replicated")
        p2 = c.publish("s", "d")
        a, b = await conn.recv("pub"), await conn.recv("pub")
        self.assertEqual(a["ack"], "replicated")
        self.assertNotIn("ack", b)  # absent: the server's wal.ack
        await conn.send(t="puback", id=a["id"], stream="s", offset=1, dup=False)
        await conn.send(t="puback", id=b["id"], stream="s", offset=2, dup=False)
        self.assertEqual(((await p1).offset, (await p2).offset), (1, 2))
        await c.close()

    async def test_resume_resend_redelivery_acks(self):
        c = self.client()
        states = []
        c.on("state", lambda a, b, e: states.append(b))
        connecting = asyncio.ensure_future(c.connect())
        conn, _ = await self.srv.accept()
        await connecting
        seen = []
        sub = c.subscribe("chat.a", "earliest", on_message=lambda m: seen.append(m.offset))
        s = await conn.recv("sub")
        big = 2**63 + 1
        await conn.send(t="subok", id=s["id"], stream="chat.a", epoch=big, first=1, next=1)
        self.assertEqual((await sub.ready).epoch, big)
        for o in (1, 2, 3):
            await conn.send(t="msg", stream="chat.a", offset=o, ts=1, payload=bytes([o]))
        pub = c.publish("chat.a", "lost")
        first = await conn.recv("pub")
        conn.cut()
        conn2, hello2 = await self.srv.accept(resumed=True, subs=[{"stream": "chat.a", "epoch": big, "acked": 1,
                                                                   "next": 5}])
        self.assertEqual((hello2["session"], hello2["resume_token"]), ("s1", "rt1"))
        again = await conn2.recv("pub")
        self.assertEqual(again["raw"], first["raw"], "the same frame: same id and msgid")
        await conn2.send(t="puback", id=again["id"], stream="chat.a", offset=4, dup=True)
        ack = await pub
        self.assertEqual((ack.offset, ack.dup, ack.msgid), (4, True, first["msgid"]))
        for o in (2, 3, 4):
            await conn2.send(t="msg", stream="chat.a", offset=o, ts=1, payload=bytes([o]))
        acks = []
        while not acks or acks[-1] != 4:
            acks.append((await conn2.recv("ack"))["offset"])
        self.assertEqual(seen, [1, 2, 3, 4])
        self.assertTrue(all(x <= 4 for x in acks) and acks == sorted(acks))
        self.assertEqual((c.stats.redeliveries_dropped, c.stats.publishes_resent), (2, 1))
        self.assertEqual(states, ["connecting", "connected", "disconnected", "reconnecting", "recovering",
                                  "connected"])
        await c.close()

    async def test_resubscribe_with_epoch_then_409(self):
        c = self.client()
        connecting = asyncio.ensure_future(c.connect())
        conn, _ = await self.srv.accept()
        await connecting
        epochs = []
        c.on("epoch", lambda s, o, n: epochs.append((o, n)))
        c.subscribe("chat.a", 1, on_message=lambda m: None)
        s = await conn.recv("sub")
        await conn.send(t="subok", id=s["id"], stream="chat.a", epoch=2**64 - 1, first=1, next=3)
        for o in (1, 2):
            await conn.send(t="msg", stream="chat.a", offset=o, ts=1, payload=b"")
        await asyncio.sleep(0.05)
        conn.cut()
        conn2, _ = await self.srv.accept(session="s2")
        re = await conn2.recv("sub")
        self.assertEqual((re["from"], re["epoch"]), (3, 2**64 - 1))
        self.assertIn(b"\xcf\xff\xff\xff\xff\xff\xff\xff\xff", re["raw"], "the epoch as a msgpack uint64")
        await conn2.send(t="nack", id=re["id"], code=409, reason="epoch mismatch")
        fresh = await conn2.recv("sub")
        self.assertEqual((fresh["from"], fresh.get("epoch")), ("earliest", None))
        await conn2.send(t="subok", id=fresh["id"], stream="chat.a", epoch=5, first=1, next=1)
        await asyncio.sleep(0.05)
        self.assertEqual(epochs, [(2**64 - 1, 5)])
        await c.close()

    async def test_4001_and_refused_token(self):
        c = self.client()
        connecting = asyncio.ensure_future(c.connect())
        conn, _ = await self.srv.accept()
        await connecting
        pending = c.publish("chat.a", "x")
        await conn.ws.close(4001, "taken")
        with self.assertRaises(ArqError) as e:
            await pending
        self.assertEqual((e.exception.code, c.state), ("session-taken", "failed"))
        await asyncio.sleep(0.05)
        self.assertTrue(self.srv.conns.empty(), "no reconnection")

        asked = []
        c2 = self.client(token=lambda: asked.append(1) or "t1")
        connecting = asyncio.ensure_future(c2.connect())
        conn = await asyncio.wait_for(self.srv.conns.get(), STEP)
        self.assertEqual((await conn.recv())["token"], "t1")
        await conn.send(t="error", code=401, reason="expired")
        await conn.ws.close(1008, "auth")
        with self.assertRaises(ArqError) as e:
            await connecting
        self.assertEqual((e.exception.status, len(asked)), (401, 2))
        self.assertTrue(self.srv.conns.empty(), "the same refused token again: no second attempt")

    async def test_iterator_acks_what_was_consumed(self):
        c = self.client(ack_delay=0.001)
        connecting = asyncio.ensure_future(c.connect())
        conn, _ = await self.srv.accept()
        await connecting
        sub = c.subscribe("chat.a")
        s = await conn.recv("sub")
        await conn.send(t="subok", id=s["id"], stream="chat.a", epoch=1, first=1, next=10)
        for o in (10, 11, 12):
            await conn.send(t="msg", stream="chat.a", offset=o, ts=1, payload=b"")
        got = []
        async for m in sub:
            got.append(m.offset)
            if m.offset == 11:
                self.assertEqual((await conn.recv("ack"))["offset"], 10)
                break
        self.assertEqual(got, [10, 11])
        with self.assertRaises(ArqError):
            sub.ack(13)  # beyond what reached the subscription
        await c.close()


class PureTest(unittest.TestCase):
    def test_backoff_full_jitter(self):
        self.assertEqual(backoff_delay(0, 0.1, 10, lambda: 0), 0)
        self.assertAlmostEqual(backoff_delay(3, 0.1, 10, lambda: 1), 0.8)
        self.assertEqual(backoff_delay(5000, 0.1, 10, lambda: 1), 10)

    def test_codec_strict(self):
        with self.assertRaises(ArqError):
            codec.decode(msgpack.packb({"t": "puback", "id": -1, "offset": 1}))
        with self.assertRaises(ArqError):
            codec.decode(msgpack.packb({"t": "gap", "stream": "a", "from": 5, "to": 4}))
        self.assertIsNone(codec.decode(msgpack.packb({"t": "future"})))
        self.assertTrue(codec.valid_stream("user.17.inbox"))
        for bad in ("", ".a", "a..b", "a b", "x" * 201):
            self.assertFalse(codec.valid_stream(bad), bad)

    def test_file_session(self):
        with tempfile.TemporaryDirectory() as d:
            st = FileSession(os.path.join(d, "s.json"))
            self.assertIsNone(st.load())
            st.save(SavedSession("a", "b"))
            self.assertEqual(st.load(), SavedSession("a", "b"))
            self.assertEqual(os.stat(st.path).st_mode & 0o777, 0o600)


if __name__ == "__main__":
    unittest.main(verbosity=2)
