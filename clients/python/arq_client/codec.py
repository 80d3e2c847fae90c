"""arq.v1 messages (docs/protocol.md sections 5 and 6) to and from msgpack.

Python integers are exact, so epochs (random uint64s) need no special care:
msgpack writes one >= 2**63 as a uint64. Decoding checks the types the
protocol promises and raises ArqError("protocol") otherwise; unknown keys
are ignored and an unknown message type decodes to None."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping, Union

import msgpack

from .errors import ArqError

STREAM_RE = re.compile(r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$")


def valid_stream(s: object) -> bool:
    """docs/protocol.md section 3: 1-200 bytes of A-Z a-z 0-9 . _ -, dot-separated."""
    return isinstance(s, str) and 1 <= len(s) <= 200 and STREAM_RE.match(s) is not None


def encode(m: Mapping[str, Any]) -> bytes:
    """One client message; keys whose value is None are left out."""
    return msgpack.packb({k: v for k, v in m.items() if v is not None}, use_bin_type=True)


@dataclass(frozen=True)
class RestoredSub:
    stream: str
    epoch: int
    acked: int
    next: int


@dataclass(frozen=True)
class Welcome:
    session: str
    resume_token: str
    resumed: bool
    subs: list[RestoredSub]
    max_payload: int
    max_inflight: int


@dataclass(frozen=True)
class SubOk:
    id: int
    stream: str
    epoch: int
    first: int
    next: int


@dataclass(frozen=True)
class UnsubOk:
    id: int


@dataclass(frozen=True)
class PubAckMsg:
    id: int
    offset: int
    dup: bool


@dataclass(frozen=True)
class Refusal:
    """A nack, or an error (id None when not tied to a request)."""

    kind: str
    id: int | None
    code: int
    reason: str


@dataclass(frozen=True)
class Msg:
    stream: str
    offset: int
    ts: int
    payload: bytes
    headers: dict[str, str] | None


@dataclass(frozen=True)
class Gap:
    stream: str
    from_: int
    to: int


ServerMessage = Union[Welcome, SubOk, UnsubOk, PubAckMsg, Refusal, Msg, Gap]


def _bad(what: str) -> ArqError:
    return ArqError("protocol", f"protocol error: {what}")


def _str(m: Mapping[str, Any], k: str) -> str:
    v = m.get(k)
    if not isinstance(v, str):
        raise _bad(f"{m.get('t')}.{k} is not a string")
    return v


def _uint(m: Mapping[str, Any], k: str, default: int | None = None) -> int:
    v = m.get(k)
    if v is None and default is not None:
        return default
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise _bad(f"{m.get('t')}.{k} is not a uint")
    return v


def decode(data: bytes) -> ServerMessage | None:
    try:
        m = msgpack.unpackb(data, raw=False)
    except Exception as e:  # msgpack raises several unrelated types
        raise _bad(f"undecodable msgpack ({e})") from None
    if not isinstance(m, dict):
        raise _bad("message is not a map")
    t = _str(m, "t")
    if t == "welcome":
        subs = m.get("subs") or []
        if not isinstance(subs, list):
            raise _bad("welcome.subs is not an array")
        restored = []
        for e in subs:
            if not isinstance(e, dict):
                raise _bad("welcome.subs entry is not a map")
            restored.append(RestoredSub(_str(e, "stream"), _uint(e, "epoch"), _uint(e, "acked"), _uint(e, "next")))
        return Welcome(_str(m, "session"), _str(m, "resume_token"), m.get("resumed") is True, restored,
                       _uint(m, "max_payload", 1 << 20), _uint(m, "max_inflight", 1024) or 1024)
    if t == "subok":
        return SubOk(_uint(m, "id"), _str(m, "stream"), _uint(m, "epoch"), _uint(m, "first"), _uint(m, "next"))
    if t == "unsubok":
        return UnsubOk(_uint(m, "id"))
    if t == "puback":
        return PubAckMsg(_uint(m, "id"), _uint(m, "offset"), m.get("dup") is True)
    if t in ("nack", "error"):
        rid = None if t == "error" and m.get("id") is None else _uint(m, "id")
        reason = m.get("reason")
        return Refusal(t, rid, _uint(m, "code"), reason if isinstance(reason, str) else "")
    if t == "msg":
        p = m.get("payload")
        if isinstance(p, str):
            p = p.encode()
        if not isinstance(p, bytes):
            raise _bad("msg.payload is not bin")
        h = m.get("headers")
        if h is not None and (not isinstance(h, dict)
                              or not all(isinstance(k, str) and isinstance(v, str) for k, v in h.items())):
            raise _bad("msg.headers is not a map str -> str")
        return Msg(_str(m, "stream"), _uint(m, "offset"), _uint(m, "ts", 0), p, h)
    if t == "gap":
        g = Gap(_str(m, "stream"), _uint(m, "from"), _uint(m, "to"))
        if g.to < g.from_:
            raise _bad("gap.to < gap.from")
        return g
    return None
