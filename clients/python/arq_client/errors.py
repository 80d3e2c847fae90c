"""Errors of the client. Local failures have a ``code`` naming what went
wrong; a server ``nack`` or ``error`` has code ``"server"`` and the protocol's
numeric code in ``status`` (docs/protocol.md section 7)."""
from __future__ import annotations

from typing import Literal

ErrorCode = Literal[
    "invalid",  # bad argument (stream name, offset, options)
    "not-connected",  # not connected and not allowed to queue (idle, or a final state)
    "too-big",  # payload over the server's max_payload
    "full",  # max_pending publishes already wait for a puback
    "busy",  # already connecting, or already subscribed to that stream
    "connection-lost",  # the connection ended and reconnection is off, or gave up
    "closed",  # closed by close()
    "session-taken",  # the session was resumed by another connection (close 4001)
    "timeout",  # no welcome within connect_timeout
    "protocol",  # the server broke the protocol
    "server",  # a nack or error from the server: see status
]


class ArqError(Exception):
    def __init__(self, code: ErrorCode, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.code: ErrorCode = code
        self.status: int | None = status

    def __repr__(self) -> str:
        return f"ArqError({self.code!r}, {str(self)!r}, status={self.status!r})"
