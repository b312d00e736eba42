"""Sessions: what ``/start`` minted and the media socket claims, with expiry.

A session id is unguessable (192 random bits), single-use (a media socket claims it once) and
expires when not claimed within ``session_pending_ttl_secs``; a claimed session lives until the call
ends or ``session_ttl_secs`` passes.

Usage::

    store = MemorySessionStore(pending_ttl_s=120, ttl_s=3600)
    session = await store.create(Session.new(carrier="twilio", call_id="CA...", persona=...))
    claimed = await store.claim(session.id, carrier="twilio")   # None if unknown, used or expired

Several instances share sessions through ``RedisSessionStore`` (``session_store: "redis"``): the webhook
can land on one instance and the media socket on another. A Redis failure raises
``SessionStoreUnavailable`` (the webhook answers 503); ``ping()`` answers False instead of raising.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    import redis.asyncio

__all__ = ["MemorySessionStore", "RedisSessionStore", "Session", "SessionStore", "SessionStoreUnavailable"]

logger = logging.getLogger(__name__)

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


class SessionStoreUnavailable(Exception):
    """The shared session store cannot be reached (or failed); the request cannot be served now."""


class SessionStore:
    """Interface: ``MemorySessionStore`` (one instance) and ``RedisSessionStore`` (shared)."""

    async def create(self, session: Session) -> Session: raise NotImplementedError
    async def claim(self, session_id: str, *, carrier: str) -> Session | None: raise NotImplementedError
    async def get(self, session_id: str) -> Session | None: raise NotImplementedError
    async def update(self, session: Session) -> None: raise NotImplementedError
    async def end(self, session_id: str) -> None: raise NotImplementedError
    async def ping(self) -> bool: raise NotImplementedError
    async def close(self) -> None: return None

    async def resync(self, live: list[Session]) -> int:
        """Write back what an outage lost: the live calls' sessions (if missing) and the removals
        that failed. Returns how many sessions were written back."""
        return 0

    async def bind_call(self, carrier: str, call_id: str, session_id: str) -> str | None:
        """Remember that the carrier's ``call_id`` was answered with ``session_id`` (for
        ``call_ttl_s``); returns the session id it was answered with before, if it was: a webhook
        replayed or retried for the same call."""
        raise NotImplementedError


class MemorySessionStore(SessionStore):
    """In-process store for one instance."""

    def __init__(self, *, pending_ttl_s: float, ttl_s: float, clock: Callable[[], float] = time.time,
                 max_sessions: int = 100_000, call_ttl_s: float = 86400.0) -> None:
        self._sessions: dict[str, Session] = {}
        self._calls: dict[tuple[str, str], tuple[str, float]] = {}    # (carrier, call id) -> (session id, at)
        self._call_ttl = call_ttl_s
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

    async def bind_call(self, carrier: str, call_id: str, session_id: str) -> str | None:
        now = self._clock()
        if len(self._calls) >= self._max:
            self._calls = {k: v for k, v in self._calls.items() if now - v[1] <= self._call_ttl}
        bound = self._calls.get((carrier, call_id))
        if bound is not None and now - bound[1] <= self._call_ttl:
            return bound[0]
        self._calls[(carrier, call_id)] = (session_id, now)
        return None

    def __len__(self) -> int:
        return len(self._sessions)


# ---------------------------------------------------------------------------------------------- Redis

_FIELDS = frozenset(f.name for f in fields(Session))


def session_to_json(s: Session) -> str:
    """Every field, as the dataclass names them (``from_``); context as a list, parameters as an object."""
    data = asdict(s)
    data["context"] = [dict(m) for m in s.context]
    data["parameters"] = dict(s.parameters)
    return json.dumps(data, separators=(",", ":"), sort_keys=True)


def session_from_json(text: str | bytes) -> Session:
    data = json.loads(text)
    data = {k: v for k, v in data.items() if k in _FIELDS}   # tolerate fields a newer release added
    data["context"] = tuple(data.get("context") or ())
    data["parameters"] = dict(data.get("parameters") or {})
    return Session(**data)


# Compare-and-set: replace the value only if it is still exactly what we read, so a claim (or an
# update) made by another instance in between is never overwritten. ARGV[3] is a TTL in seconds, or
# "keepttl" to keep the key's remaining lifetime.
_CAS = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if ARGV[3] == 'keepttl' then
  redis.call('SET', KEYS[1], ARGV[2], 'KEEPTTL')
else
  redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3])
end
return 1
"""


class RedisSessionStore(SessionStore):
    """Sessions shared by every instance through Redis: key ``voxray:session:<id>`` holds the session
    as JSON; a pending one expires after ``pending_ttl_s``, a claimed one ``ttl_s`` after its claim."""

    PREFIX = "voxray:session:"
    CALL_PREFIX = "voxray:call:"
    _CAS_ATTEMPTS = 16

    def __init__(self, url: str, *, pending_ttl_s: float, ttl_s: float, timeout_s: float = 0.5,
                 client: redis.asyncio.Redis | None = None, call_ttl_s: float = 86400.0) -> None:
        import redis.asyncio
        import redis.exceptions
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        self._errors = (redis.exceptions.RedisError, OSError, TimeoutError)

        self._pending_ttl = max(1, int(pending_ttl_s))
        self._ttl = max(1, int(ttl_s))
        self._call_ttl = max(1, int(call_ttl_s))
        self._timeout = timeout_s
        # One retry on a fresh connection (a pooled one may be stale after a Redis restart), no
        # backoff: an outage shows as an error within about two timeouts, not after a long wait.
        self._redis = client or redis.asyncio.Redis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s, retry=Retry(NoBackoff(), 1),
            health_check_interval=30)
        self._cas = self._redis.register_script(_CAS)
        self._unremoved: set[str] = set()     # ends that failed during an outage, replayed by resync

    def _key(self, session_id: str) -> str:
        return self.PREFIX + session_id

    async def create(self, session: Session) -> Session:
        session = replace(session, created_at=time.time())
        try:
            created = await self._redis.set(self._key(session.id), session_to_json(session), nx=True,
                                            ex=self._pending_ttl)
        except self._errors as exc:
            raise _unavailable("create", exc) from exc
        if not created:
            raise RuntimeError(f"session id {session.id[:6]}… already exists")   # 192 random bits: never
        return session

    async def claim(self, session_id: str, *, carrier: str) -> Session | None:
        key = self._key(session_id)
        try:
            for _ in range(self._CAS_ATTEMPTS):
                raw = await self._redis.get(key)
                if raw is None:
                    return None
                s = session_from_json(raw)
                if s.carrier != carrier or s.state != "pending":
                    return None
                claimed = replace(s, state="active", claimed_at=time.time())
                if await self._cas(keys=[key], args=[raw, session_to_json(claimed), self._ttl]):
                    return claimed
                # changed under us: claimed by another instance (the next read says so) or updated
        except self._errors as exc:
            raise _unavailable("claim", exc) from exc
        raise SessionStoreUnavailable(f"session {session_id[:6]}… kept changing during the claim")

    async def get(self, session_id: str) -> Session | None:
        try:
            raw = await self._redis.get(self._key(session_id))
        except self._errors as exc:
            raise _unavailable("get", exc) from exc
        return None if raw is None else session_from_json(raw)

    async def update(self, session: Session) -> None:
        """Replace a live session's fields, keeping its remaining lifetime. Never undoes a claim: a
        pending copy written after another instance claimed the session keeps the claim."""
        key = self._key(session.id)
        try:
            for _ in range(self._CAS_ATTEMPTS):
                raw = await self._redis.get(key)
                if raw is None:
                    return                                   # ended or expired: nothing to update
                stored = session_from_json(raw)
                new = session
                if stored.state != "pending" and session.state == "pending":
                    new = replace(session, state=stored.state, claimed_at=stored.claimed_at)
                if await self._cas(keys=[key], args=[raw, session_to_json(new), "keepttl"]):
                    return
        except self._errors as exc:
            raise _unavailable("update", exc) from exc
        raise SessionStoreUnavailable(f"session {session.id[:6]}… kept changing during the update")

    async def end(self, session_id: str) -> None:
        """Remove the session. Called while a call is torn down: a Redis failure is logged, not
        raised (the key expires with its TTL anyway)."""
        try:
            await self._redis.delete(self._key(session_id))
            self._unremoved.discard(session_id)
        except Exception as exc:  # noqa: BLE001 - any failure: remembered, the removal is retried at resync
            self._unremoved.add(session_id)
            logger.warning("session store: could not remove session %s… (retried when Redis is back): %s",
                           session_id[:6], _describe(exc))

    async def resync(self, live: list[Session]) -> int:
        """One round trip: ``SET NX`` each live session (a Redis restarted empty learns them again;
        an existing key is left alone) and ``DEL`` the sessions whose removal failed."""
        if not live and not self._unremoved:
            return 0
        removals = list(self._unremoved)
        async with self._redis.pipeline(transaction=False) as pipe:
            for session in live:
                pipe.set(self._key(session.id), session_to_json(session), nx=True, ex=self._ttl)
            for session_id in removals:
                pipe.delete(self._key(session_id))
            results = await pipe.execute()
        self._unremoved.difference_update(removals)
        return sum(1 for r in results[:len(live)] if r)

    async def bind_call(self, carrier: str, call_id: str, session_id: str) -> str | None:
        """``SET voxray:call:<carrier>:<call id> <session id> NX EX call_ttl`` (one round trip when new)."""
        key = f"{self.CALL_PREFIX}{carrier}:{call_id}"
        try:
            if await self._redis.set(key, session_id, nx=True, ex=self._call_ttl):
                return None
            bound = await self._redis.get(key)
        except self._errors as exc:
            raise _unavailable("bind_call", exc) from exc
        return bound.decode() if isinstance(bound, bytes) else bound

    async def ping(self) -> bool:
        try:
            async with asyncio.timeout(self._timeout):
                return bool(await self._redis.ping())
        except Exception:  # noqa: BLE001 - any failure means "not ready"
            return False

    async def close(self) -> None:
        await self._redis.aclose()


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _unavailable(op: str, exc: BaseException) -> SessionStoreUnavailable:
    logger.error("session store unavailable during %s: %s", op, _describe(exc))
    return SessionStoreUnavailable(f"session store unavailable ({op}): {_describe(exc)}")
