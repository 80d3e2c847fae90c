"""Client: arq.v1 (docs/protocol.md) with the reconnection semantics of libarq
(client/arq.h), on asyncio and python3-websockets.

Two levels of state. A connection (_Conn) is one WebSocket: open -> hello
sent -> welcomed -> gone; its frames go out in order through one writer task
(websockets' send() is a coroutine; the public methods here are not). The
client (State) goes idle -> connecting -> connected and, when a connection
is lost, disconnected -> reconnecting -> recovering -> connected ... until
failed or closed (both final).

What outlives a connection: the subscriptions (_Sub: where the application
is in the stream, its acks, the stream's epoch) and the publishes without a
puback (_Pub, which keeps its encoded frame and re-sends it byte for byte,
same request id and msgid; ids only grow, so it stays unique).

Per subscription three offsets decide what is delivered and acked: pos (the
next offset the application may see; anything below is a redelivery and
dropped), wire_recv (the last offset the server delivered or skipped on this
connection) and wire_acked (what the server holds as acked on this
connection). An ack goes out only up to wire_recv, since the server refuses
acks beyond what it delivered: after a session resume the server redelivers
from its acked offset and our acks catch up as the (dropped) redeliveries
arrive.
"""
from __future__ import annotations

import asyncio
import inspect
import logging
import os
import random as _random
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Literal, Sequence, Union

import websockets
import websockets.exceptions

from . import codec
from .backoff import backoff_delay
from .errors import ArqError
from .session import MemorySession, SavedSession, SessionStore

__all__ = ["Client", "Message", "PubAck", "Subscription", "SubscriptionInfo", "State", "Stats"]

VERSION = "0.1.0"
log = logging.getLogger("arq_client")

State = Literal["idle", "connecting", "connected", "disconnected", "reconnecting", "recovering",
                "failed", "closed"]
_FINAL = ("failed", "closed")
From = Union[Literal["earliest", "latest"], int]
#: A token, or a function (plain or async) called before every connection
#: attempt, so a reconnect presents a fresh token. A token the server refuses
#: (401) ends the client unless the function then returns a different one.
#: The server enforces a token's exp during the connection (close 4002 after
#: it, docs/protocol.md 8a): this client then reconnects and resumes with the
#: function's next token; it does not send `refresh` on a live connection yet.
TokenSource = Union[str, None, Callable[[], Union[str, None, Awaitable[Union[str, None]]]]]


@dataclass(frozen=True)
class Message:
    stream: str
    offset: int
    ts: int  #: when the message became durable, unix microseconds
    payload: bytes
    headers: dict[str, str] | None

    def text(self) -> str:
        return self.payload.decode()


@dataclass(frozen=True)
class PubAck:
    stream: str
    offset: int
    dup: bool  #: the server already had this msgid: offset is the original one
    msgid: str


@dataclass(frozen=True)
class SubscriptionInfo:
    epoch: int
    first: int  #: where delivery starts (a restored subscription: acked + 1)
    next: int


@dataclass(frozen=True)
class Stats:
    connects: int
    reconnects: int
    resumed: int
    redeliveries_dropped: int
    publishes_resent: int
    resubscribes: int
    pending_publishes: int


class _Pub:
    __slots__ = ("id", "stream", "msgid", "frame", "size", "on_wire", "sent", "waiting", "retries", "fut")

    def __init__(self, id: int, stream: str, msgid: str, frame: bytes, size: int, fut: asyncio.Future[PubAck]):
        self.id, self.stream, self.msgid, self.frame, self.size, self.fut = id, stream, msgid, frame, size, fut
        self.on_wire = self.sent = self.waiting = False
        self.retries = 0


class _Sub:
    def __init__(self, stream: str, from_: From, epoch: int | None, on_message: Callable[[Message], None] | None,
                 auto_ack: bool, loop: asyncio.AbstractEventLoop) -> None:
        self.stream, self.from_, self.want_epoch = stream, from_, epoch
        self.on_message, self.auto_ack = on_message, auto_ack
        self.pos = 0  # next offset the application may see (0: unknown)
        self.acked = 0
        self.floor = 0  # offsets up to floor were skipped for the application: acked for it
        self.epoch = 0  # as last told by the server (0: unknown / stream did not exist)
        self.old_epoch = 0  # lost to a history reset, until the application is told
        self.wire: Literal["off", "pending", "active"] = "off"
        self.req_id = 0
        self.sent_epoch = False
        self.wire_recv = 0
        self.wire_acked = 0
        self.confirmed = False
        self.recovering = False
        self.retries = 0
        self.ended = False
        self.info: asyncio.Future[SubscriptionInfo] = loop.create_future()
        # Refusals also reach the iterator and the events: an application that
        # never awaits `ready` must not get "exception was never retrieved".
        self.info.add_done_callback(lambda f: f.cancelled() or f.exception())
        self.queue: deque[Message] = deque()
        self.waiter: asyncio.Future[None] | None = None
        self.end_error: ArqError | None = None
        self.handed_out = 0
        self.iterating = False

    def wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    def end(self, err: ArqError | None) -> None:
        if self.ended:
            return
        self.ended = True
        self.end_error = err
        if err is not None and not self.info.done():
            self.info.set_exception(err)
        self.wake()


class Subscription:
    """The application's handle on a subscription: ``await sub.ready``,
    ``async for m in sub``, ``sub.ack(offset)``, ``await sub.unsubscribe()``.
    Leaving an ``async for`` loop early does not end the subscription; call
    unsubscribe() for that."""

    def __init__(self, client: Client, s: _Sub) -> None:
        self._c = client
        self._s = s

    @property
    def stream(self) -> str:
        return self._s.stream

    @property
    def ready(self) -> asyncio.Future[SubscriptionInfo]:
        """Resolves with the server's answer; raises ArqError if refused (403...)."""
        return self._s.info

    @property
    def epoch(self) -> int:
        return self._s.epoch

    @property
    def position(self) -> int:
        """The next offset this subscription hands to the application (0 before the server answered)."""
        return self._s.pos

    def ack(self, offset: int) -> None:
        """Cumulative ack up to offset, which must not exceed the last offset
        handed out. Recorded at once, sent when the server can take it, and
        again after a reconnect."""
        self._c._ack(self._s, offset)

    async def unsubscribe(self) -> None:
        await self._c._unsubscribe(self._s)

    def __aiter__(self) -> Subscription:
        s = self._s
        if s.on_message is not None:
            raise ArqError("invalid", "subscription has an on_message callback: it cannot be iterated too")
        if s.iterating:
            raise ArqError("busy", "subscription is already being iterated")
        s.iterating = True
        return self

    async def __anext__(self) -> Message:
        s = self._s
        # Asking for the next message means the application is done with the last one.
        if s.handed_out and s.auto_ack and not s.ended:
            self._c._ack(s, s.handed_out)
        s.handed_out = 0
        while not s.queue:
            if s.ended:
                if s.end_error is not None:
                    raise s.end_error
                raise StopAsyncIteration
            s.waiter = asyncio.get_running_loop().create_future()
            await s.waiter
            s.waiter = None
        m = s.queue.popleft()
        s.handed_out = m.offset
        return m


class _Conn:
    def __init__(self, token: str | None) -> None:
        self.ws: Any = None
        self.welcomed = False
        self.dead = False
        self.token = token
        self.hello_error: codec.Refusal | None = None
        self.outbox: deque[bytes | None] = deque()  # None: send our close frame
        self.wake = asyncio.Event()
        self.reader: asyncio.Task[None] | None = None
        self.writer: asyncio.Task[None] | None = None


class Client:
    """An arq.v1 client. Create it inside a running event loop; use it from
    that loop only. ``async with Client(url) as c:`` connects and closes."""

    def __init__(self, url: str | Sequence[str], *, token: TokenSource = None, client_name: str | None = None,
                 reconnect: bool = True, backoff_base: float = 0.1, backoff_cap: float = 10.0,
                 max_retries: int = 0, connect_timeout: float = 10.0, max_pending: int = 10000,
                 ack_delay: float = 0.02, heartbeat_interval: float | None = 20.0,
                 heartbeat_timeout: float | None = 20.0, session: SessionStore | None = None,
                 rand: Callable[[], float] | None = None) -> None:
        """backoff_*: attempt n waits uniform [0, min(cap, base * 2**n)] seconds.
        max_retries: failed attempts in a row before giving up, also bounds
        503 retries (0 = unlimited). max_pending: publishes waiting for a
        puback before publish() fails with "full". heartbeat_*: WebSocket
        pings, and how long a pong may take before the connection is
        declared dead and replaced (None: off). url: one ws:// or wss://
        URL, or several: the client stays on one while it works and, after a
        failed attempt or a lost connection, tries the next (round robin),
        resuming its session there; ``self.url`` is the current one."""
        self._urls = [url] if isinstance(url, str) else list(url)
        if not self._urls:
            raise ArqError("invalid", "no URL")
        for u in self._urls:
            if not isinstance(u, str) or not u.startswith(("ws://", "wss://")):
                raise ArqError("invalid", f"not a ws:// or wss:// URL: {u}")
        self._url_index = 0
        self.url = self._urls[0]
        self._token = token
        self._client_name = client_name or f"arq-py/{VERSION}"
        self._reconnect = reconnect
        self._backoff_base, self._backoff_cap, self._max_retries = backoff_base, backoff_cap, max_retries
        self._connect_timeout, self._max_pending, self._ack_delay = connect_timeout, max_pending, ack_delay
        self._hb_interval, self._hb_timeout = heartbeat_interval, heartbeat_timeout
        self._store: SessionStore = session if session is not None else MemorySession()
        self._rand = rand or _random.random
        self._loop = asyncio.get_running_loop()
        self._state: State = "idle"
        self._conn: _Conn | None = None
        self._saved: SavedSession | None = None
        self._store_loaded = False
        self._next_id = 1
        self._msgid_prefix = os.urandom(8).hex()
        self._msgid_seq = 0
        self._max_payload = 0
        self._max_inflight = 1024
        self._ever_welcomed = False
        self._user_closed = False
        self._attempts = 0
        self._backoff_n = 0
        self._welcomed_at = 0.0
        self._recover_pending = 0
        self._refused_token: str | None | bool = False  # False: none refused
        self._subs: dict[str, _Sub] = {}
        self._pubs: dict[int, _Pub] = {}  # in publish order
        self._unsubs: dict[int, asyncio.Future[None]] = {}
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._attempt_task: asyncio.Task[None] | None = None
        self._connect_fut: asyncio.Future[None] | None = None
        self._closed_fut: asyncio.Future[None] = self._loop.create_future()
        self._listeners: dict[str, list[Callable[[Any], None]]] = {}
        self._stats = dict(connects=0, reconnects=0, resumed=0, redeliveries_dropped=0, publishes_resent=0,
                           resubscribes=0)

    # ---- public API ----

    @property
    def state(self) -> State:
        return self._state

    @property
    def session(self) -> str | None:
        return self._saved.session if self._saved else None

    @property
    def max_payload(self) -> int:
        return self._max_payload

    @property
    def stats(self) -> Stats:
        return Stats(**self._stats, pending_publishes=len(self._pubs))

    def on(self, event: Literal["state", "gap", "epoch", "error"], fn: Callable[[Any], None]) -> Callable[[], None]:
        """Listen to an event; returns a function that removes the listener.
        state: (old, new, ArqError | None); gap: (stream, from, to);
        epoch: (stream, old_epoch, new_epoch), the stream's history was reset
        (new_epoch 0: the stream is gone); error: ArqError, a server error not
        tied to a request (e.g. an ack refused)."""
        self._listeners.setdefault(event, []).append(fn)
        return lambda: self._listeners.get(event, []).remove(fn)

    async def __aenter__(self) -> Client:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def connect(self) -> None:
        """Connect. Returns after the first welcome; with reconnection, raises
        only once the client gave up (failed) or was closed."""
        if self._state != "idle":
            raise ArqError("busy", "connect() was already called")
        self._connect_fut = self._loop.create_future()
        self._set_state("connecting", None)
        self._start_attempt()
        await asyncio.shield(self._connect_fut)

    def publish(self, stream: str, payload: bytes | str, *, msgid: str | None = None,
                headers: dict[str, str] | None = None,
                ack: str | None = None) -> asyncio.Future[PubAck]:
        """Publish; the future resolves once the message is durable, exactly
        once, even if it had to be re-sent after a reconnect (then maybe with
        dup=True: the server had stored it before the connection broke).
        Pipelined; queued while reconnecting. ack: "local" (this arqd's
        journal is fdatasynced), "replicated" (MySQL committed it too: it
        survives the loss of the arqd machine, docs/ha.md) or None (the
        server's wal.ack)."""
        fut: asyncio.Future[PubAck] = self._loop.create_future()
        data = payload.encode() if isinstance(payload, str) else payload
        err = None
        live = self._can_send()
        if not codec.valid_stream(stream):
            err = ArqError("invalid", f"invalid stream name {stream!r}")
        elif not isinstance(data, (bytes, bytearray, memoryview)):
            err = ArqError("invalid", "payload is not bytes or str")
        elif not live and not self._may_queue():
            err = self._not_connected()
        elif self._ever_welcomed and len(data) > self._max_payload:
            err = ArqError("too-big", f"payload of {len(data)} bytes over max_payload {self._max_payload}")
        elif len(self._pubs) >= self._max_pending:
            err = ArqError("full", f"{len(self._pubs)} publishes already wait for a puback")
        elif ack not in (None, "local", "replicated"):
            err = ArqError("invalid", 'ack must be "local" or "replicated"')
        if err is not None:
            fut.set_exception(err)
            return fut
        if msgid is None:
            self._msgid_seq += 1
            msgid = f"{self._msgid_prefix}-{self._msgid_seq}"
        id = self._next_id
        self._next_id += 1
        msg = {"t": "pub", "id": id, "stream": stream, "payload": bytes(data), "msgid": msgid,
               "headers": headers or None}
        if ack is not None:
            msg["ack"] = ack
        frame = codec.encode(msg)
        p = _Pub(id, stream, msgid, frame, len(data), fut)
        self._pubs[id] = p
        if live:
            self._pub_send(p)
        return fut

    def subscribe(self, stream: str, from_: From = "latest", *, epoch: int | None = None,
                  on_message: Callable[[Message], None] | None = None, auto_ack: bool = True) -> Subscription:
        """Subscribe (at most one subscription per stream). Every message is
        handed to the application once, in offset order, across reconnects
        and resumes: to on_message if given, else through ``async for``.
        auto_ack acks a message once on_message returned, or once the
        iterator is asked for the next one. Queued while reconnecting."""
        if not codec.valid_stream(stream):
            raise ArqError("invalid", f"invalid stream name {stream!r}")
        if from_ not in ("earliest", "latest") and not (isinstance(from_, int) and from_ >= 1):
            raise ArqError("invalid", 'from_ must be "earliest", "latest" or an offset >= 1')
        live = self._can_send()
        if not live and not self._may_queue():
            raise self._not_connected()
        if stream in self._subs:
            raise ArqError("busy", f"already subscribed to {stream!r}")
        s = _Sub(stream, from_, epoch, on_message, auto_ack, self._loop)
        self._subs[stream] = s
        if live:
            self._send_sub(s)
        return Subscription(self, s)

    async def close(self) -> None:
        """Close cleanly and stop reconnecting: pending acks, then a close
        frame (1000). Publishes still waiting fail with "closed"; iterators
        end. Returns once closed; a no-op on a final client."""
        if self._state in _FINAL:
            return
        if not self._user_closed:
            self._user_closed = True
            self._cancel_timer("reconnect")
            self._cancel_timer("retry")
            if self._attempt_task is not None:
                self._attempt_task.cancel()
            c = self._conn
            if self._state == "idle":
                self._finish("closed", ArqError("closed", "closed"))
            elif c is not None and c.welcomed and not c.dead:
                self._flush_all_acks()
                self._queue(c, None)
                # A server that never answers the close must not hold us forever.
                self._set_timer("close", self._connect_timeout,
                                lambda: self._drop(c, ArqError("closed", "closed")))
            elif c is not None:
                self._drop(c, ArqError("closed", "closed"))
            else:
                self._finish("closed", ArqError("closed", "closed"))
        await asyncio.shield(self._closed_fut)

    # ---- events, timers ----

    def _emit(self, event: str, *args: Any) -> None:
        for fn in list(self._listeners.get(event, [])):
            try:
                fn(*args)
            except Exception:  # the application's bug must not corrupt our state
                log.exception("arq_client: %s listener raised", event)

    def _set_state(self, to: State, err: ArqError | None) -> None:
        old = self._state
        if old == to:
            return
        self._state = to
        self._emit("state", old, to, err)

    def _set_timer(self, name: str, delay: float, fn: Callable[[], None]) -> None:
        self._cancel_timer(name)

        def run() -> None:
            self._timers.pop(name, None)
            fn()

        self._timers[name] = self._loop.call_later(delay, run)

    def _cancel_timer(self, name: str) -> None:
        t = self._timers.pop(name, None)
        if t is not None:
            t.cancel()

    # ---- connection attempts ----

    def _start_attempt(self) -> None:
        self._attempt_task = self._loop.create_task(self._attempt())

    async def _attempt(self) -> None:
        if self._state == "disconnected":
            self._set_state("reconnecting", None)
        try:
            if not self._store_loaded:
                self._saved = self._store.load()
                self._store_loaded = True
            token = self._token() if callable(self._token) else self._token
            if inspect.isawaitable(token):
                token = await token
        except asyncio.CancelledError:
            raise
        except Exception as e:
            self._lost(ArqError("connection-lost", f"connection attempt failed: {e}"), False)
            return
        if self._refused_token is not False and token == self._refused_token:
            self._finish("failed", ArqError("server", "token refused and the token provider gave no other", 401))
            return
        c = _Conn(token)
        self._conn = c
        self._set_timer("connect", self._connect_timeout,
                        lambda: self._drop(c, ArqError("timeout", f"no welcome within {self._connect_timeout} s")))
        try:
            c.ws = await websockets.connect(  # type: ignore[attr-defined]
                self.url, subprotocols=["arq.v1"], max_size=None, open_timeout=None,
                ping_interval=self._hb_interval, ping_timeout=self._hb_timeout, close_timeout=self._connect_timeout)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            if c.dead:
                return  # timed out meanwhile
            self._teardown(c)
            status = getattr(e, "status_code", None)
            permanent = isinstance(status, int) and 400 <= status < 500
            self._lost(ArqError("connection-lost", f"cannot connect to {self.url}: {e}"), permanent)
            return
        if c.dead:
            c.ws.transport.abort()
            return
        hello: dict[str, Any] = {"t": "hello", "client": self._client_name, "token": token or None}
        if self._saved is not None:
            hello["session"] = self._saved.session
            hello["resume_token"] = self._saved.resume_token
        self._queue(c, codec.encode(hello))
        c.writer = self._loop.create_task(self._writer(c))
        c.reader = self._loop.create_task(self._reader(c))

    async def _writer(self, c: _Conn) -> None:
        try:
            while not c.dead:
                while c.outbox:
                    frame = c.outbox.popleft()
                    if frame is None:
                        await c.ws.close(1000)
                        return
                    await c.ws.send(frame)
                c.wake.clear()
                await c.wake.wait()
        except websockets.exceptions.ConnectionClosed:
            pass  # the reader reports it

    async def _reader(self, c: _Conn) -> None:
        try:
            async for data in c.ws:
                self._on_data(c, data)
                if c.dead:
                    return
        except websockets.exceptions.ConnectionClosed:
            pass
        # The reader ends after the close handshake, so a close frame of ours
        # is out by now; the writer may only be waiting for frames.
        if c.writer is not None:
            c.writer.cancel()
        self._on_close(c, c.ws.close_code or 1006, c.ws.close_reason or "")

    def _on_close(self, c: _Conn, code: int, reason: str) -> None:
        if c.dead:
            return
        permanent = False
        if self._user_closed:
            err = ArqError("closed", "closed")
        elif code == 4001:
            err, permanent = ArqError("session-taken", "the session was resumed by another connection (4001)"), True
        elif c.hello_error is not None:
            h = c.hello_error
            err = ArqError("server", f"hello refused: {h.reason} ({h.code})", h.code)
            if h.code == 401 and callable(self._token):
                self._refused_token = c.token  # perhaps expired: the provider gets a chance to give another
            else:
                permanent = h.code in (400, 401, 403)
        elif code == 1008:
            err, permanent = ArqError("server", f"refused by the server (1008 {reason})", 1008), True
        elif code == 1000:
            self._teardown(c)
            self._finish("closed", ArqError("closed", f"closed by the server (1000 {reason})"))
            return
        else:
            err = ArqError("connection-lost", f"connection lost ({code}{' ' + reason if reason else ''})")
        self._teardown(c)
        if self._user_closed:
            self._finish("closed", err)
        else:
            self._lost(err, permanent)

    def _drop(self, c: _Conn, err: ArqError) -> None:
        """Abandon connection c at once (timeout, protocol error, unanswered close)."""
        if c.dead:
            return
        self._teardown(c)
        if c.ws is not None:
            c.ws.transport.abort()
        elif self._attempt_task is not None and self._attempt_task is not asyncio.current_task():
            self._attempt_task.cancel()  # still opening the socket
        if self._user_closed:
            self._finish("closed", err)
        else:
            self._lost(err, False)

    def _teardown(self, c: _Conn) -> None:
        """Forget connection c: what was on its wire goes again on the next one."""
        c.dead = True
        c.wake.set()
        current = asyncio.current_task()
        for t in (c.reader, c.writer):
            if t is not None and t is not current:
                t.cancel()
        if self._conn is c:
            self._conn = None
        for name in ("connect", "ack", "close"):
            self._cancel_timer(name)
        if c.welcomed and time.monotonic() - self._welcomed_at >= self._backoff_cap:
            self._backoff_n = 0
        for s in self._subs.values():
            s.wire, s.req_id, s.recovering = "off", 0, False
        self._recover_pending = 0
        for p in self._pubs.values():
            p.on_wire = False
        for f in self._unsubs.values():
            if not f.done():
                f.set_result(None)
        self._unsubs.clear()

    def _lost(self, err: ArqError, permanent: bool) -> None:
        """The connection is gone or the attempt failed: reconnect later, or give up."""
        if permanent or not self._reconnect:
            self._finish("failed", err)
            return
        self._attempts += 1
        self._url_index = (self._url_index + 1) % len(self._urls)  # fail over to the next URL
        self.url = self._urls[self._url_index]
        if self._max_retries > 0 and self._attempts > self._max_retries:
            self._finish("failed", ArqError(err.code, f"{err}; gave up after {self._max_retries} attempts",
                                            err.status))
            return
        self._set_state("disconnected", err)
        delay = backoff_delay(self._backoff_n, self._backoff_base, self._backoff_cap, self._rand)
        self._backoff_n += 1
        self._set_timer("reconnect", delay, self._start_attempt)

    def _finish(self, to: Literal["failed", "closed"], err: ArqError) -> None:
        """Enter a final state: everything pending fails with err (iterators just end after a close)."""
        if self._state in _FINAL:
            return
        for name in list(self._timers):
            self._cancel_timer(name)
        if self._conn is not None:
            c = self._conn
            self._teardown(c)
            if c.ws is not None:
                c.ws.transport.abort()
        self._set_state(to, err)
        pub_err = ArqError("closed", "client closed before the puback") if to == "closed" else err
        pubs = list(self._pubs.values())
        self._pubs.clear()
        for p in pubs:
            if not p.fut.done():
                p.fut.set_exception(pub_err)
        subs = list(self._subs.values())
        self._subs.clear()
        for s in subs:
            s.end(None if to == "closed" else err)
        if self._connect_fut is not None and not self._connect_fut.done():
            self._connect_fut.set_exception(err)
        if not self._closed_fut.done():
            self._closed_fut.set_result(None)

    # ---- sending ----

    def _can_send(self) -> bool:
        c = self._conn
        return c is not None and c.welcomed and not c.dead and not self._user_closed

    def _may_queue(self) -> bool:
        return self._reconnect and not self._user_closed and self._state != "idle" and self._state not in _FINAL

    def _not_connected(self) -> ArqError:
        if self._state in _FINAL:
            return ArqError("closed" if self._state == "closed" else "connection-lost", f"client is {self._state}")
        return ArqError("not-connected", f"client is {self._state}")

    @staticmethod
    def _queue(c: _Conn, frame: bytes | None) -> None:
        c.outbox.append(frame)
        c.wake.set()

    def _send(self, m: dict[str, Any]) -> None:
        if self._conn is not None:
            self._queue(self._conn, codec.encode(m))

    def _pub_send(self, p: _Pub) -> None:
        if self._conn is None:
            return
        self._queue(self._conn, p.frame)
        if p.sent:
            self._stats["publishes_resent"] += 1
        p.sent, p.on_wire, p.waiting = True, True, False

    def _take_id(self) -> int:
        id = self._next_id
        self._next_id += 1
        return id

    def _send_sub(self, s: _Sub) -> None:
        """Send s's sub: from its position if it has one, else as the application asked."""
        epoch = (s.epoch or None) if s.pos else s.want_epoch
        s.req_id = self._take_id()
        # Epoch 0 is what the server reports for a stream that did not exist
        # yet: it names no history, so it is never sent.
        self._send({"t": "sub", "id": s.req_id, "stream": s.stream, "from": s.pos or s.from_, "epoch": epoch or None})
        if s.confirmed or s.retries:
            self._stats["resubscribes"] += 1
        s.wire = "pending"
        s.sent_epoch = bool(epoch)

    def _flush_ack(self, s: _Sub) -> None:
        """Send the application's ack as far as the server can take it (up to
        wire_recv). While it cannot take all of it (redeliveries after a
        resume), ack in steps of a quarter window so the server does not pause."""
        if s.wire != "active" or not self._can_send():
            return
        want = max(s.acked, s.floor)
        target = min(want, s.wire_recv)
        if target <= s.wire_acked:
            return
        step = max(1, self._max_inflight // 4)
        if target != want and target - s.wire_acked < step:
            return
        self._send({"t": "ack", "stream": s.stream, "offset": target})
        s.wire_acked = target

    def _flush_all_acks(self) -> None:
        self._cancel_timer("ack")
        for s in self._subs.values():
            self._flush_ack(s)

    def _ack(self, s: _Sub, offset: int) -> None:
        if self._subs.get(s.stream) is not s:
            raise ArqError("invalid", f"not subscribed to {s.stream!r}")
        if not isinstance(offset, int) or offset < 1 or offset >= s.pos:
            raise ArqError("invalid", f"ack {offset} of {s.stream!r} beyond the last offset handed out ({s.pos - 1})")
        if offset <= s.acked:
            return
        s.acked = offset
        # Sent now when a quarter window waits, else within ack_delay with later ones.
        if s.acked - s.wire_acked >= max(1, self._max_inflight // 4):
            self._flush_ack(s)
        elif "ack" not in self._timers:
            self._set_timer("ack", self._ack_delay, self._flush_all_acks)

    async def _unsubscribe(self, s: _Sub) -> None:
        if self._subs.get(s.stream) is not s:
            return
        del self._subs[s.stream]
        self._recover_done(s)
        s.end(None)
        if s.wire == "off" or not self._can_send():
            return
        id = self._take_id()
        fut: asyncio.Future[None] = self._loop.create_future()
        self._unsubs[id] = fut
        self._send({"t": "unsub", "id": id, "stream": s.stream})
        await fut

    # ---- receiving ----

    def _on_data(self, c: _Conn, data: Any) -> None:
        try:
            if isinstance(data, str):
                raise ArqError("protocol", "protocol error: a text message")
            m = codec.decode(data)
        except ArqError as e:
            self._drop(c, e)
            return
        if m is None:
            return  # a type this client does not know: ignored (forward compatibility)
        if not c.welcomed:
            if isinstance(m, codec.Welcome):
                self._on_welcome(c, m)
            elif isinstance(m, codec.Refusal) and m.kind == "error":
                c.hello_error = m
            return  # anything else before welcome: ignored
        if isinstance(m, codec.Msg):
            self._on_msg(m)
        elif isinstance(m, codec.PubAckMsg):
            p = self._pubs.get(m.id)
            if p is not None and p.on_wire:
                del self._pubs[m.id]
                if not p.fut.done():
                    p.fut.set_result(PubAck(p.stream, m.offset, m.dup, p.msgid))
        elif isinstance(m, codec.SubOk):
            s = self._sub_by_req(m.id)
            if s is not None:
                self._on_subok(s, m.epoch, m.first, m.next)
        elif isinstance(m, codec.Refusal):
            if m.id is None or not self._on_refusal(m.id, m.code, m.reason):
                self._emit("error", ArqError("server", m.reason, m.code))
        elif isinstance(m, codec.Gap):
            self._on_gap(m.stream, m.from_, m.to)
        elif isinstance(m, codec.UnsubOk):
            f = self._unsubs.pop(m.id, None)
            if f is not None and not f.done():
                f.set_result(None)
        elif isinstance(m, codec.Welcome):
            self._drop(c, ArqError("protocol", "protocol error: a second welcome"))

    def _on_welcome(self, c: _Conn, w: codec.Welcome) -> None:
        c.welcomed = True
        self._cancel_timer("connect")
        self._saved = SavedSession(w.session, w.resume_token)
        self._refused_token = False
        try:
            self._store.save(self._saved)
        except Exception as e:
            self._emit("error", ArqError("invalid", f"session store: {e}"))
        self._max_payload, self._max_inflight = w.max_payload, w.max_inflight
        self._attempts = 0
        self._welcomed_at = time.monotonic()
        first = not self._ever_welcomed
        self._ever_welcomed = True
        self._stats["connects"] += 1
        if not first:
            self._stats["reconnects"] += 1
        if w.resumed:
            self._stats["resumed"] += 1
            self._restore_subs(w.subs)
        self._resend_all()
        if c.dead:
            return
        if first:
            self._set_state("connected", None)
            if self._connect_fut is not None and not self._connect_fut.done():
                self._connect_fut.set_result(None)
            return
        self._set_state("recovering", None)
        if self._recover_pending == 0 and self._state == "recovering":
            self._set_state("connected", None)

    def _restore_subs(self, restored: list[codec.RestoredSub]) -> None:
        for r in restored:
            s = self._subs.get(r.stream)
            new_epoch = s is not None and s.epoch != 0 and r.epoch != 0 and s.epoch != r.epoch
            if s is None or (not new_epoch and s.pos and s.pos <= r.acked):
                # Not ours (any more), or the server would skip offsets the
                # application has not seen: drop it; _resend_all subscribes
                # ours again and this one's messages are ignored until its subok.
                self._send({"t": "unsub", "id": self._take_id(), "stream": r.stream})
                continue
            s.wire, s.req_id = "active", 0
            s.wire_recv = s.wire_acked = r.acked
            if new_epoch:
                old = s.epoch
                s.epoch, s.pos, s.acked, s.floor = r.epoch, r.acked + 1, r.acked, 0
                self._emit("epoch", s.stream, old, r.epoch)
            else:
                if r.epoch:
                    s.epoch = r.epoch
                if not s.pos and isinstance(s.from_, int) and s.from_ > r.acked + 1:
                    s.pos, s.floor = s.from_, s.from_ - 1  # the application's own position is further
                if not s.pos:
                    s.pos = r.acked + 1
            if not s.confirmed:
                s.confirmed = True
                if not s.info.done():
                    s.info.set_result(SubscriptionInfo(s.epoch, r.acked + 1, r.next))
            self._flush_ack(s)

    def _resend_all(self) -> None:
        """After a welcome: subscribe again what the server did not restore,
        then re-send the publishes without a puback, in their order."""
        for s in self._subs.values():
            if s.wire == "off":
                self._send_sub(s)
                s.recovering = True
                self._recover_pending += 1
        for p in list(self._pubs.values()):
            if p.on_wire:
                continue
            if p.size > self._max_payload:  # queued before we knew the limit
                del self._pubs[p.id]
                p.fut.set_exception(ArqError("too-big", f"payload of {p.size} bytes over max_payload "
                                                        f"{self._max_payload}"))
                continue
            self._pub_send(p)

    def _sub_by_req(self, id: int) -> _Sub | None:
        for s in self._subs.values():
            if s.wire == "pending" and s.req_id == id:
                return s
        return None

    def _recover_done(self, s: _Sub) -> None:
        if not s.recovering:
            return
        s.recovering = False
        self._recover_pending -= 1
        if self._recover_pending == 0 and self._state == "recovering":
            self._set_state("connected", None)

    @staticmethod
    def _sub_restart(s: _Sub) -> None:
        """The stream's history was reset: start over from the new epoch's earliest offset."""
        if not s.old_epoch:
            s.old_epoch = s.epoch
        s.epoch = s.pos = s.acked = s.floor = 0
        s.from_, s.want_epoch = "earliest", None

    def _on_subok(self, s: _Sub, epoch: int, first: int, next: int) -> None:
        if s.pos and s.epoch and epoch != s.epoch:
            # Another epoch than ours (a sub carrying ours is refused with 409,
            # so this one was sent without it): the history was reset.
            self._sub_restart(s)
        # Where the server starts: a `from` beyond its tail waits for that offset.
        if s.pos:
            start = s.pos
        elif s.from_ == "earliest":
            start = first
        elif s.from_ == "latest":
            start = next
        else:
            start = int(s.from_)
        start = start or 1
        s.wire, s.req_id, s.retries = "active", 0, 0
        s.wire_recv = s.wire_acked = start - 1
        if epoch:
            s.epoch = epoch
        if not s.pos:
            s.pos = start
        if s.old_epoch:
            old, s.old_epoch = s.old_epoch, 0
            self._emit("epoch", s.stream, old, epoch)
        if not s.confirmed:
            s.confirmed = True
            if not s.info.done():
                s.info.set_result(SubscriptionInfo(epoch, first, next))
        self._recover_done(s)

    def _on_refusal(self, id: int, code: int, reason: str) -> bool:
        """A nack, or an error with an id. False when the id is not a request of ours."""
        err = ArqError("server", reason or f"refused ({code})", code)
        p = self._pubs.get(id)
        if p is not None and p.on_wire:
            p.on_wire = False
            if code == 503 and (self._max_retries == 0 or p.retries < self._max_retries):
                p.waiting = True
                self._schedule_retry(p.retries)
                p.retries += 1
                return True
            del self._pubs[id]
            p.fut.set_exception(err)
            return True
        s = self._sub_by_req(id)
        if s is None:
            f = self._unsubs.pop(id, None)  # an unsub: the subscription is gone either way
            if f is not None and not f.done():
                f.set_result(None)
            return f is not None
        s.wire, s.req_id = "off", 0
        if code == 503 and self._reconnect and (self._max_retries == 0 or s.retries < self._max_retries):
            self._schedule_retry(s.retries)
            s.retries += 1
            return True
        if code == 409 and s.confirmed and s.sent_epoch:
            # The stream's history was reset: start over in the new epoch from
            # its earliest offset; the subok tells the application.
            self._sub_restart(s)
            self._send_sub(s)
            return True
        del self._subs[s.stream]
        self._recover_done(s)
        s.end(err)
        return True

    def _schedule_retry(self, n: int) -> None:
        if "retry" in self._timers:
            return

        def retry() -> None:
            if not self._can_send():
                return  # the next welcome re-sends everything anyway
            for s in self._subs.values():
                if s.wire == "off":
                    self._send_sub(s)
            for p in list(self._pubs.values()):
                if p.waiting and not p.on_wire:
                    self._pub_send(p)

        self._set_timer("retry", backoff_delay(n, self._backoff_base, self._backoff_cap, self._rand), retry)

    def _on_msg(self, m: codec.Msg) -> None:
        s = self._subs.get(m.stream)
        if s is None or s.wire != "active":
            return  # not (yet) subscribed on this connection
        if m.offset > s.wire_recv:
            s.wire_recv = m.offset
        if m.offset < s.pos:
            self._stats["redeliveries_dropped"] += 1
            self._flush_ack(s)
            return
        s.pos = m.offset + 1
        msg = Message(m.stream, m.offset, m.ts, m.payload, m.headers)
        if s.on_message is not None:
            try:
                s.on_message(msg)
            except Exception:  # the application's bug must not corrupt our state
                log.exception("arq_client: on_message for %r raised", s.stream)
            if s.auto_ack and self._subs.get(s.stream) is s:
                self._ack(s, m.offset)
        else:
            s.queue.append(msg)
            s.wake()

    def _on_gap(self, stream: str, from_: int, to: int) -> None:
        s = self._subs.get(stream)
        if s is None or s.wire != "active":
            return
        # The server counts a gap as delivered and acked.
        s.wire_recv = max(s.wire_recv, to)
        s.wire_acked = max(s.wire_acked, to)
        if to < s.pos:
            return  # reported before
        from_ = max(from_, s.pos)
        s.pos = to + 1
        self._emit("gap", stream, from_, to)
