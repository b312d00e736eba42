"""Tests for gateway.sessions.RedisSessionStore against a real Redis (``VOXRAY_TEST_REDIS_URL``, default
redis://127.0.0.1:6379/15; that database is flushed before each test), and two real gateways sharing it."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import socket
import time
from collections.abc import AsyncIterator

import httpx
import pytest
import pytest_asyncio
import redis
import redis.asyncio

from gateway.config import Config, ConfigError
from gateway.sessions import RedisSessionStore, Session, SessionStoreUnavailable, session_from_json, session_to_json
from gateway.simulate.call import SimulatedCall
from tests.conftest import ACCOUNT_SID, AUTH_TOKEN, PUBLIC_URL, phone_config, running_gateway
from tests.fakes.openai_server import FakeOpenAI
from tests.fakes.twilio_rest import FakeTwilioREST

REDIS_URL = os.environ.get("VOXRAY_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
PREFIX = RedisSessionStore.PREFIX


def _reachable() -> str:
    try:
        redis.Redis.from_url(REDIS_URL, socket_timeout=1, socket_connect_timeout=1).ping()
        return ""
    except Exception as exc:  # noqa: BLE001 - any failure skips the Redis tests, with its reason
        return f"{type(exc).__name__}: {exc}"


_why = _reachable()
pytestmark = [pytest.mark.asyncio,
              pytest.mark.skipif(bool(_why), reason=f"no Redis at {REDIS_URL} ({_why}); run scripts/test.sh")]


@pytest_asyncio.fixture
async def raw() -> AsyncIterator[redis.asyncio.Redis]:
    client = redis.asyncio.Redis.from_url(REDIS_URL)
    await client.flushdb()
    yield client
    await client.aclose()


@pytest_asyncio.fixture
async def store(raw: redis.asyncio.Redis) -> AsyncIterator[RedisSessionStore]:
    s = RedisSessionStore(REDIS_URL, pending_ttl_s=60, ttl_s=3600)
    yield s
    await s.close()


def new_session(**kw: object) -> Session:
    fields: dict[str, object] = {"carrier": "twilio", "call_id": "CA123", "from_": "+15550001", "to": "+15550002"}
    fields.update(kw)
    return Session.new(**fields)


def closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


# ------------------------------------------------------------------------------------ the store's behaviour

async def test_create_then_claim_once(store: RedisSessionStore, raw: redis.asyncio.Redis) -> None:
    session = await store.create(new_session())
    assert session.state == "pending"
    assert 55 <= await raw.ttl(PREFIX + session.id) <= 60                 # pending TTL
    before = time.time()
    claimed = await store.claim(session.id, carrier="twilio")
    assert claimed is not None and claimed.state == "active" and claimed.claimed_at >= before
    assert (claimed.id, claimed.call_id, claimed.to) == (session.id, "CA123", "+15550002")
    assert await store.get(session.id) == claimed
    assert 3590 <= await raw.ttl(PREFIX + session.id) <= 3600             # re-written with the session TTL
    assert await store.claim(session.id, carrier="twilio") is None        # single use


async def test_wrong_carrier_cannot_claim_and_does_not_burn_the_session(store: RedisSessionStore) -> None:
    session = await store.create(new_session())
    assert await store.claim(session.id, carrier="telnyx") is None
    assert (await store.get(session.id)).state == "pending"
    assert await store.claim(session.id, carrier="twilio") is not None


async def test_unknown_id(store: RedisSessionStore) -> None:
    assert await store.claim("no-such-session", carrier="twilio") is None
    assert await store.get("no-such-session") is None


async def test_get_does_not_claim(store: RedisSessionStore) -> None:
    session = await store.create(new_session())
    assert await store.get(session.id) == session
    assert await store.claim(session.id, carrier="twilio") is not None


async def test_pending_session_expires_when_not_claimed_in_time(raw: redis.asyncio.Redis) -> None:
    store = RedisSessionStore(REDIS_URL, pending_ttl_s=1, ttl_s=3600)
    try:
        early = await store.create(new_session())
        late = await store.create(new_session())
        assert await store.claim(early.id, carrier="twilio") is not None
        await asyncio.sleep(1.3)
        assert await store.claim(late.id, carrier="twilio") is None
        assert await store.get(late.id) is None
        assert (await store.get(early.id)).state == "active"               # a claim is not subject to it
    finally:
        await store.close()


async def test_active_session_lives_until_the_ttl(raw: redis.asyncio.Redis) -> None:
    store = RedisSessionStore(REDIS_URL, pending_ttl_s=60, ttl_s=1)
    try:
        session = await store.create(new_session())
        await store.claim(session.id, carrier="twilio")
        assert 0 < await raw.pttl(PREFIX + session.id) <= 1000
        assert await store.get(session.id) is not None
        await asyncio.sleep(1.3)
        assert await store.get(session.id) is None
    finally:
        await store.close()


async def test_update_keeps_the_remaining_ttl(store: RedisSessionStore, raw: redis.asyncio.Redis) -> None:
    session = await store.create(new_session(call_id=""))
    await raw.expire(PREFIX + session.id, 30)
    await store.update(dataclasses.replace(session, call_id="CA999"))
    assert (await store.get(session.id)).call_id == "CA999"
    assert 25 <= await raw.ttl(PREFIX + session.id) <= 30
    # an update of an ended session does not bring it back
    await store.end(session.id)
    await store.update(dataclasses.replace(session, call_id="CA000"))
    assert await store.get(session.id) is None
    assert await raw.exists(PREFIX + session.id) == 0


async def test_a_late_pending_update_does_not_undo_a_claim(store: RedisSessionStore) -> None:
    session = await store.create(new_session(call_id=""))
    claimed = await store.claim(session.id, carrier="twilio")
    await store.update(dataclasses.replace(session, call_id="CA777"))      # the copy from before the claim
    now = await store.get(session.id)
    assert now.call_id == "CA777" and now.state == "active" and now.claimed_at == claimed.claimed_at
    assert await store.claim(session.id, carrier="twilio") is None


async def test_end_removes_the_session(store: RedisSessionStore, raw: redis.asyncio.Redis) -> None:
    session = await store.create(new_session())
    await store.claim(session.id, carrier="twilio")
    await store.end(session.id)
    assert await store.get(session.id) is None
    assert await store.claim(session.id, carrier="twilio") is None
    assert await raw.keys(PREFIX + "*") == []
    await store.end(session.id)                                              # idempotent
    await store.end("never-existed")


async def test_json_round_trip_keeps_every_field(store: RedisSessionStore, raw: redis.asyncio.Redis) -> None:
    session = Session.new(carrier="telnyx", call_id="v3:abc", from_="+15550001", to="sip:agent@example.com",
                          account_id="acct-1", persona="vip", direction="outbound",
                          context=({"role": "system", "content": "Be brief. ünïcödé ✓"},
                                   {"role": "user", "content": "hi"}),
                          parameters={"persona": "vip", "lang": "de"})
    assert session_from_json(session_to_json(session)) == session
    created = await store.create(session)
    stored = await store.get(created.id)
    assert stored == created
    assert isinstance(stored.context, tuple) and stored.context[0]["content"] == "Be brief. ünïcödé ✓"
    assert dict(stored.parameters) == {"persona": "vip", "lang": "de"}
    assert {f.name for f in dataclasses.fields(Session)} <= set(__import__("json").loads(
        await raw.get(PREFIX + created.id)))
    claimed = await store.claim(created.id, carrier="telnyx")
    assert dataclasses.replace(claimed, state="pending", claimed_at=0.0) == created   # nothing else changed
    assert await store.get(created.id) == claimed
    assert claimed.public()["context"] == [dict(m) for m in session.context]


async def test_concurrent_claims_from_two_clients_have_one_winner(raw: redis.asyncio.Redis) -> None:
    a = RedisSessionStore(REDIS_URL, pending_ttl_s=60, ttl_s=3600)
    b = RedisSessionStore(REDIS_URL, pending_ttl_s=60, ttl_s=3600)
    try:
        # open 20 connections per client first, so the claims really overlap in Redis (a plain
        # GET-then-SET claim lets all 40 win here; with cold pools the connects serialise them)
        await asyncio.gather(*[store._redis.ping() for store in (a, b) for _ in range(20)])
        for _ in range(10):
            session = await a.create(new_session())
            results = await asyncio.gather(*[(a if i % 2 else b).claim(session.id, carrier="twilio")
                                             for i in range(40)])
            winners = [r for r in results if r is not None]
            assert len(winners) == 1
            assert await b.get(session.id) == winners[0]
    finally:
        await a.close()
        await b.close()


async def test_ping(store: RedisSessionStore) -> None:
    assert await store.ping() is True


async def test_unreachable_redis_pings_false_fast_and_raises_a_clear_error() -> None:
    store = RedisSessionStore(f"redis://127.0.0.1:{closed_port()}/0", pending_ttl_s=60, ttl_s=3600, timeout_s=0.5)
    try:
        started = time.monotonic()
        assert await store.ping() is False
        assert time.monotonic() - started < 1.0
        for op in (store.create(new_session()), store.claim("x", carrier="twilio"), store.get("x")):
            with pytest.raises(SessionStoreUnavailable, match="session store unavailable"):
                await op
        await store.end("x")                       # logged, not raised: the call's teardown goes on
    finally:
        await store.close()


# ---------------------------------------------------------------------------------------------- config

async def test_config_accepts_redis_with_a_url_and_names_the_fix_without() -> None:
    c = Config.from_mapping({"session_store": "redis", "redis_url": REDIS_URL}, {"OPENAI_API_KEY": "sk"})
    assert c.session_store == "redis" and c.redis_timeout_secs == 0.5
    with pytest.raises(ConfigError, match=r"set redis_url \(or VOXRAY_REDIS_URL\), e.g. redis://127.0.0.1:6379/0"):
        Config.from_mapping({"session_store": "redis"}, {"OPENAI_API_KEY": "sk"})
    with pytest.raises(ConfigError, match="'redis_url'"):
        Config.from_mapping({"session_store": "redis", "redis_url": "http://x"}, {"OPENAI_API_KEY": "sk"})
    with pytest.raises(ConfigError, match="'redis_timeout_secs'"):
        Config.from_mapping({"redis_timeout_secs": 0}, {"OPENAI_API_KEY": "sk"})
    env = Config.load(None, {"VOXRAY_SESSION_STORE": "redis", "VOXRAY_REDIS_URL": REDIS_URL,
                             "VOXRAY_REDIS_TIMEOUT_SECS": "0.25", "OPENAI_API_KEY": "sk"})
    assert (env.redis_url, env.redis_timeout_secs) == (REDIS_URL, 0.25)


# ----------------------------------------------------------------------------------- two gateways, one Redis

def new_call(url: str, twilio: FakeTwilioREST) -> SimulatedCall:
    call = SimulatedCall(gateway=url, public_url=PUBLIC_URL, auth_token=AUTH_TOKEN, account_sid=ACCOUNT_SID)
    twilio.known_calls = twilio.known_calls | {call.call_sid}
    return call


async def test_webhook_on_one_gateway_media_on_another(raw: redis.asyncio.Redis) -> None:
    async with (FakeOpenAI(tts_ms_per_char=10) as fake, FakeTwilioREST(ACCOUNT_SID, AUTH_TOKEN) as twilio):
        config = phone_config(fake.base_url, twilio.base_url, session_store="redis", redis_url=REDIS_URL)
        async with running_gateway(config) as a, running_gateway(config) as b:
            call = new_call(a, twilio)
            answer = await call.dial()
            assert answer.status_code == 200
            assert (await raw.get(PREFIX + call.session_id)) is not None
            await call.connect(url=b.replace("http://", "ws://") + f"/media/twilio/{call.session_id}")
            await call.wait_audio(after=0, timeout=5)                          # the greeting plays, from B
            async with httpx.AsyncClient() as http:
                on_a = (await http.get(f"{a}/sessions/{call.session_id}")).json()
                on_b = (await http.get(f"{b}/sessions/{call.session_id}")).json()
            assert on_a["state"] == "active" and (on_a["live"], on_a["here"]) == (True, False)  # runs on B
            assert on_b["state"] == "active" and (on_b["live"], on_b["here"]) == (True, True)
            # the media socket cannot claim the session a second time, on either gateway
            again = new_call(a, twilio)
            again.adopt(answer.text, call.call_sid)
            await again.connect(url=a.replace("http://", "ws://") + f"/media/twilio/{call.session_id}")
            await again.wait_closed(timeout=5)
            assert again.close_code == 1008
            await again.close()
            await call.hang_up()
            assert call.close_code == 1000
            async with httpx.AsyncClient() as http:
                gone = await http.get(f"{a}/sessions/{call.session_id}")
            assert gone.status_code == 404                                      # B ended it in Redis


async def test_redis_down_webhook_503_and_not_ready() -> None:
    async with (FakeOpenAI() as fake, FakeTwilioREST(ACCOUNT_SID, AUTH_TOKEN) as twilio):
        config = phone_config(fake.base_url, twilio.base_url, session_store="redis",
                              redis_url=f"redis://127.0.0.1:{closed_port()}/0", redis_timeout_secs=0.3)
        async with running_gateway(config) as url:
            async with httpx.AsyncClient() as http:
                ready = await http.get(f"{url}/ready")
            assert ready.status_code == 503
            call = new_call(url, twilio)
            answer = await call.dial()
            assert answer.status_code == 503 and answer.json() == {"error": "session store unavailable"}
