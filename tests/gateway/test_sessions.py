"""Tests for gateway.sessions: MemorySessionStore create / claim once / expiry / end, with an injected clock."""

from __future__ import annotations

import dataclasses
import time

import pytest

from gateway.sessions import MemorySessionStore, Session, SessionStore

pytestmark = pytest.mark.asyncio

PENDING_TTL = 120.0
TTL = 3600.0


class Clock:
    """A settable clock; starts at the wall time so sessions made by Session.new line up with it."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def new_store(clock: Clock, **kw: float) -> MemorySessionStore:
    return MemorySessionStore(pending_ttl_s=PENDING_TTL, ttl_s=TTL, clock=clock, **kw)


def new_session(clock: Clock, **kw) -> Session:
    fields = {"carrier": "twilio", "call_id": "CA123", "from_": "+15550001", "to": "+15550002"}
    fields.update(kw)
    return dataclasses.replace(Session.new(**fields), created_at=clock())


async def test_create_then_claim_once() -> None:
    clock = Clock()
    store = new_store(clock)
    session = await store.create(new_session(clock))
    assert session.state == "pending"
    clock.advance(1.5)
    claimed = await store.claim(session.id, carrier="twilio")
    assert claimed is not None
    assert claimed.state == "active" and claimed.claimed_at == clock.now
    assert (claimed.id, claimed.call_id, claimed.to) == (session.id, "CA123", "+15550002")
    assert await store.get(session.id) == claimed


async def test_a_session_is_claimed_only_once() -> None:
    clock = Clock()
    store = new_store(clock)
    session = await store.create(new_session(clock))
    assert await store.claim(session.id, carrier="twilio") is not None
    assert await store.claim(session.id, carrier="twilio") is None


async def test_wrong_carrier_cannot_claim_and_does_not_burn_the_session() -> None:
    clock = Clock()
    store = new_store(clock)
    session = await store.create(new_session(clock))
    assert await store.claim(session.id, carrier="telnyx") is None
    assert (await store.get(session.id)).state == "pending"
    assert await store.claim(session.id, carrier="twilio") is not None


async def test_unknown_id_cannot_be_claimed() -> None:
    clock = Clock()
    store = new_store(clock)
    await store.create(new_session(clock))
    assert await store.claim("no-such-session", carrier="twilio") is None
    assert await store.get("no-such-session") is None


async def test_pending_session_expires_when_not_claimed_in_time() -> None:
    clock = Clock()
    store = new_store(clock)
    early = await store.create(new_session(clock))
    late = await store.create(new_session(clock))
    clock.advance(PENDING_TTL - 1)
    assert await store.claim(early.id, carrier="twilio") is not None        # just in time
    clock.advance(2)
    assert await store.claim(late.id, carrier="twilio") is None             # too late
    assert await store.get(late.id) is None
    # a claimed session is not subject to the pending limit
    assert (await store.get(early.id)).state == "active"


async def test_active_session_lives_until_the_ttl() -> None:
    clock = Clock()
    store = new_store(clock)
    session = await store.create(new_session(clock))
    await store.claim(session.id, carrier="twilio")
    clock.advance(TTL - 10)
    assert await store.get(session.id) is not None
    clock.advance(20)
    assert await store.get(session.id) is None


async def test_end_removes_the_session() -> None:
    clock = Clock()
    store = new_store(clock)
    session = await store.create(new_session(clock))
    await store.claim(session.id, carrier="twilio")
    await store.end(session.id)
    assert await store.get(session.id) is None
    assert await store.claim(session.id, carrier="twilio") is None
    assert len(store) == 0
    await store.end(session.id)           # idempotent
    await store.end("never-existed")


async def test_get_does_not_claim() -> None:
    clock = Clock()
    store = new_store(clock)
    session = await store.create(new_session(clock))
    assert (await store.get(session.id)).state == "pending"
    assert await store.claim(session.id, carrier="twilio") is not None


async def test_ids_are_unique_and_long() -> None:
    ids = {Session.new(carrier="twilio").id for _ in range(2000)}
    assert len(ids) == 2000
    assert all(len(i) >= 32 for i in ids)
    assert all(i.replace("-", "").replace("_", "").isalnum() for i in ids)    # URL-safe


async def test_session_new_stamps_creation_time() -> None:
    before = time.time()
    s = Session.new(carrier="twilio")
    assert before <= s.created_at <= time.time()
    assert s.state == "pending" and s.claimed_at == 0.0


async def test_full_store_sweeps_expired_sessions_first() -> None:
    clock = Clock()
    store = new_store(clock, max_sessions=2)
    await store.create(new_session(clock))
    await store.create(new_session(clock))
    with pytest.raises(RuntimeError, match="full"):
        await store.create(new_session(clock))
    clock.advance(PENDING_TTL + 1)
    fresh = await store.create(new_session(clock))                            # the expired two were swept
    assert len(store) == 1 and await store.get(fresh.id) is not None


async def test_ping_and_the_interface() -> None:
    assert await new_store(Clock()).ping() is True
    with pytest.raises(NotImplementedError):
        await SessionStore().get("x")


async def test_public_view_uses_from_and_lists_context() -> None:
    s = Session.new(carrier="twilio", from_="+15550001", to="+15550002",
                    context=({"role": "system", "content": "Be brief."},), parameters={"persona": "vip"})
    view = s.public()
    assert view["from"] == "+15550001" and "from_" not in view
    assert view["context"] == [{"role": "system", "content": "Be brief."}]
    assert view["parameters"] == {"persona": "vip"} and view["id"] == s.id and view["state"] == "pending"


async def test_expiry_follows_the_store_clock() -> None:
    now = [1000.0]
    store = MemorySessionStore(pending_ttl_s=PENDING_TTL, ttl_s=TTL, clock=lambda: now[0])
    session = await store.create(Session.new(carrier="twilio"))
    now[0] += PENDING_TTL + 1
    assert await store.claim(session.id, carrier="twilio") is None
