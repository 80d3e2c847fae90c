"""Where the client keeps the session id and resume token of the last
``welcome``, so that a reconnect (or, with a persistent store, a process
restart) resumes the session: subscriptions continue after their acked
offsets and an anonymous client stays the same producer for msgid
deduplication (docs/protocol.md section 4a). The resume token is a secret."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class SavedSession:
    session: str
    resume_token: str


class SessionStore(Protocol):
    """Any object with these two methods will do (e.g. one backed by the
    application's database)."""

    def load(self) -> SavedSession | None:
        """Called once, before the first connection attempt."""

    def save(self, session: SavedSession) -> None:
        """Called after every welcome with the session it names."""


class MemorySession:
    """Kept in this client only: resumes across reconnects, not restarts."""

    def __init__(self) -> None:
        self._saved: SavedSession | None = None

    def load(self) -> SavedSession | None:
        return self._saved

    def save(self, session: SavedSession) -> None:
        self._saved = session


class FileSession:
    """Kept in a JSON file (mode 0600, replaced atomically): survives a
    restart of the process."""

    def __init__(self, path: str) -> None:
        self.path = path

    def load(self) -> SavedSession | None:
        try:
            with open(self.path, encoding="utf-8") as f:
                v = json.load(f)
            return SavedSession(str(v["session"]), str(v["resume_token"]))
        except (OSError, ValueError, KeyError, TypeError):
            return None  # none yet, or not ours: start a new session

    def save(self, session: SavedSession) -> None:
        tmp = f"{self.path}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump({"session": session.session, "resume_token": session.resume_token}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
