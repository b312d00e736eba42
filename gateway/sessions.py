"""Sessions: what ``/start`` minted and the media socket claims, with expiry.

A session id is unguessable (192 random bits), single-use (a media socket claims it once) and
expires when not claimed within ``session_pending_ttl_secs``; a claimed session lives until the call
ends or ``session_ttl_secs`` passes.

Usage::

    store = MemorySessionStore(pending_ttl_s=120, ttl_s=3600)
    session = await store.create(Session.new(carrier="twilio", call_id="CA...", persona=...))
    claimed = await store.claim(session.id, carrier="twilio")   # None if unknown, used or expired
"""

from __future__ import annotations

import secrets
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable, Literal, Mapping

__all__ = ["MemorySessionStore", "Session", "SessionStore"]

State = Literal["pending", "active", "ended"]


@dataclass(frozen=True, slots=True)
class Session:
    id: str
    carrier: str
    call_id: str = ""
    from_: str = ""
    to: str = ""
    account_id: str = ""
    persona: str = "default"
    context: tuple[Mapping[str, str], ...] = ()
    parameters: Mapping[str, str] = field(default_factory=dict)
    direction: str = "inbound"
    state: State = "pending"
    created_at: float = 0.0
    claimed_at: float = 0.0

    @classmethod
    def new(cls, **fields: Any) -> Session:
        return cls(id=secrets.token_urlsafe(24), created_at=time.time(), **fields)

    def public(self) -> dict[str, Any]:
        """JSON view for ``GET /sessions/{id}``."""
        data = asdict(self)
        data["from"] = data.pop("from_")
        data["context"] = list(self.context)
        return data


class SessionStore:
    """Interface (the Redis store of a later release implements the same methods)."""

    async def create(self, session: Session) -> Session: raise NotImplementedError
    async def claim(self, session_id: str, *, carrier: str) -> Session | None: raise NotImplementedError
    async def get(self, session_id: str) -> Session | None: raise NotImplementedError
    async def update(self, session: Session) -> None: raise NotImplementedError
    async def end(self, session_id: str) -> None: raise NotImplementedError
    async def ping(self) -> bool: raise NotImplementedError


class MemorySessionStore(SessionStore):
    """In-process store for one instance."""

    def __init__(self, *, pending_ttl_s: float, ttl_s: float, clock: Callable[[], float] = time.time,
                 max_sessions: int = 100_000) -> None:
        self._sessions: dict[str, Session] = {}
        self._pending_ttl = pending_ttl_s
        self._ttl = ttl_s
        self._clock = clock
        self._max = max_sessions

    def _expired(self, s: Session, now: float) -> bool:
        if s.state == "pending":
            return now - s.created_at > self._pending_ttl
        return now - s.created_at > self._ttl

    def _sweep(self) -> None:
        now = self._clock()
        for sid in [sid for sid, s in self._sessions.items() if self._expired(s, now)]:
            del self._sessions[sid]

    async def create(self, session: Session) -> Session:
        session = replace(session, created_at=self._clock())   # expiry runs on this store's clock
        if len(self._sessions) >= self._max:
            self._sweep()
        if len(self._sessions) >= self._max:
            raise RuntimeError(f"session store is full ({self._max} sessions)")
        self._sessions[session.id] = session
        return session

    async def claim(self, session_id: str, *, carrier: str) -> Session | None:
        s = self._sessions.get(session_id)
        if s is None or s.carrier != carrier or s.state != "pending" or self._expired(s, self._clock()):
            return None
        s = replace(s, state="active", claimed_at=self._clock())
        self._sessions[session_id] = s
        return s

    async def get(self, session_id: str) -> Session | None:
        s = self._sessions.get(session_id)
        if s is None or self._expired(s, self._clock()):
            return None
        return s

    async def update(self, session: Session) -> None:
        """Replace a live session's fields (e.g. the carrier call id learned after dialling)."""
        if session.id in self._sessions:
            self._sessions[session.id] = session

    async def end(self, session_id: str) -> None:
        self._sessions.pop(session_id, None)

    async def ping(self) -> bool:
        return True

    def __len__(self) -> int:
        return len(self._sessions)
