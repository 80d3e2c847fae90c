"""arq_client: the ARQ broker's asyncio client (arq.v1, docs/protocol.md;
semantics of libarq, client/arq.h; guide: docs/clients.md)."""
from .backoff import backoff_delay
from .client import VERSION, Client, From, Message, PubAck, State, Stats, Subscription, SubscriptionInfo, TokenSource
from .errors import ArqError, ErrorCode
from .session import FileSession, MemorySession, SavedSession, SessionStore

__all__ = ["VERSION", "ArqError", "Client", "ErrorCode", "FileSession", "From", "MemorySession", "Message", "PubAck",
           "SavedSession", "SessionStore", "State", "Stats", "Subscription", "SubscriptionInfo", "TokenSource",
           "backoff_delay"]
