"""Several instances as one (gateway.cluster): real gateway processes sharing a private real Redis,
the control bus between them, and live calls surviving a Redis outage."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import pytest_asyncio
import redis.asyncio

from gateway.cluster import RedisControlBus
from gateway.sessions import RedisSessionStore
from gateway.simulate.call import SimulatedCall
from tests.conftest import ACCOUNT_SID, AUTH_TOKEN, PUBLIC_URL, phone_config, running_gateway
from tests.fakes.openai_server import FakeOpenAI
from tests.fakes.twilio_rest import FakeTwilioREST
from tests.processes import GatewayProcess, RedisServer
from tests.speech import speech_pcm

pytestmark = pytest.mark.asyncio


@pytest.fixture
def redis_server() -> Any:
    with RedisServer() as server:
        yield server


@pytest_asyncio.fixture
async def fakes() -> AsyncIterator[tuple[FakeOpenAI, FakeTwilioREST]]:
    async with FakeOpenAI(tts_ms_per_char=10) as fake, FakeTwilioREST(ACCOUNT_SID, AUTH_TOKEN) as twilio:
        yield fake, twilio


API_KEY = "cluster-test-key-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {API_KEY}"}


def raw_config(fake: FakeOpenAI, twilio: FakeTwilioREST, redis_url: str, **overrides: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "public_url": PUBLIC_URL, "provider": "openai", "api_keys": {"openai": "sk-test"},
        "base_urls": {"openai": fake.base_url},
        "carriers": {"twilio": {"account_sid": ACCOUNT_SID, "auth_token": AUTH_TOKEN, "api_base_url": twilio.base_url}},
        "vad_stop_ms": 300, "session_store": "redis", "redis_url": redis_url, "redis_timeout_secs": 0.3,
        "session_sync_secs": 0.2, "cluster_request_timeout_secs": 2.0,
        "server_api_key": API_KEY,      # one key for every instance (a generated one would differ per process)
    }
    raw.update(overrides)
    return raw


def new_call(url: str, twilio: FakeTwilioREST) -> SimulatedCall:
    call = SimulatedCall(gateway=url, public_url=PUBLIC_URL, auth_token=AUTH_TOKEN, account_sid=ACCOUNT_SID)
    twilio.known_calls = twilio.known_calls | {call.call_sid}
    return call


def ws(url: str) -> str:
    return url.replace("http://", "ws://")


async def until(predicate: Any, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not await predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.05)


# ----------------------------------------------------------------------------------- two processes
async def test_webhook_on_a_media_on_b_and_any_instance_controls_the_call(redis_server: RedisServer, fakes: Any) -> None:
    fake, twilio = fakes
    raw = raw_config(fake, twilio, redis_server.url)
    async with GatewayProcess(raw) as a, GatewayProcess(raw) as b:
        call = new_call(a.url, twilio)
        assert (await call.dial()).status_code == 200                          # webhook answered by A
        await call.connect(url=ws(b.url) + f"/media/twilio/{call.session_id}")  # media on B
        await call.wait_audio(after=0, timeout=10)
        call.gateway = b.url                                                  # the same webhook, replayed to B
        assert (await call.dial()).status_code == 409                         # A's answer is known to B
        async with httpx.AsyncClient(base_url=a.url, headers=AUTH) as http:
            seen = (await http.get(f"/sessions/{call.session_id}")).json()
            assert (seen["state"], seen["live"], seen["here"]) == ("active", True, False)
            # DTMF and transfer asked of A are carried out by B, which holds the call
            dtmf = await http.post(f"/sessions/{call.session_id}/dtmf", json={"digits": "1"})
            assert dtmf.status_code == 200 and dtmf.json() == {"sent": "in-band"}
            # DELETE on A ends the call running on B: hung up through the carrier, socket closed
            ended = await http.delete(f"/sessions/{call.session_id}")
            assert ended.status_code == 200 and ended.json() == {"ended": call.session_id}
            await call.wait_closed(timeout=5)
            assert call.close_code == 1000
            assert twilio.ended_calls == [call.call_sid]
            assert (await http.get(f"/sessions/{call.session_id}")).status_code == 404
            assert (await http.delete("/sessions/no-such-session")).status_code == 404
        await call.close()
        # a transfer asked of B for a call on A
        second = new_call(b.url, twilio)
        assert (await second.dial()).status_code == 200
        await second.connect(url=ws(a.url) + f"/media/twilio/{second.session_id}")
        await second.wait_audio(after=0, timeout=10)
        async with httpx.AsyncClient(base_url=b.url, headers=AUTH) as http:
            moved = await http.post(f"/sessions/{second.session_id}/transfer", json={"to": "+14155550123"})
        assert moved.status_code == 200 and moved.json() == {"transferred": second.session_id}
        assert [sid for sid, _ in twilio.updates] == [second.call_sid]
        await second.close()
        assert "Traceback" not in a.log() + b.log()


# ----------------------------------------------------------------------------------- Redis outage
async def test_a_live_call_survives_a_redis_restart_and_its_session_is_written_back(
        redis_server: RedisServer, fakes: Any) -> None:
    fake, twilio = fakes
    config = phone_config(fake.base_url, twilio.base_url, session_store="redis", redis_url=redis_server.url,
                          redis_timeout_secs=0.3, session_sync_secs=0.2, server_api_key=API_KEY)
    async with running_gateway(config) as a, running_gateway(config) as b, httpx.AsyncClient(headers=AUTH) as http:
        call = new_call(a, twilio)
        assert (await call.dial()).status_code == 200
        await call.connect(url=ws(a) + f"/media/twilio/{call.session_id}")
        await call.wait_audio(after=0, timeout=5)
        await call.wait_quiet(timeout=10)

        redis_server.stop()
        await until(lambda: _status(http, f"{a}/ready", 503))
        refused = await new_call(a, twilio).dial()                            # no new calls meanwhile
        assert refused.status_code == 503
        # the caller speaks during the outage and is answered: the call does not need Redis
        before = fake.state.calls["llm"]
        spoke_at = await call.speak(speech_pcm("hello there", 8000))
        await call.wait_audio(after=spoke_at, timeout=10)
        assert fake.state.calls["llm"] > before
        metrics = (await http.get(f"{a}/metrics")).text
        assert "voxray_session_store_up 0.0" in metrics

        redis_server.start()                                                  # back, and empty
        await until(lambda: _status(http, f"{a}/ready", 200))
        # written back by A's session sync: visible and controllable from B again
        await until(lambda: _status(http, f"{b}/sessions/{call.session_id}", 200))
        # B asks A over the bus once both listen again; until then it says "try again", never
        # drops the session of a running call
        while (ended := await http.delete(f"{b}/sessions/{call.session_id}")).status_code == 503:
            assert call.close_code is None                               # still up
            await asyncio.sleep(0.1)
        assert ended.status_code == 200 and ended.json() == {"ended": call.session_id}
        await call.wait_closed(timeout=5)
        assert call.close_code == 1000
        raw = redis.asyncio.Redis.from_url(redis_server.url)
        try:
            assert await raw.exists(RedisSessionStore.PREFIX + call.session_id) == 0
        finally:
            await raw.aclose()
        await call.close()


async def test_a_removal_that_failed_during_the_outage_is_replayed(redis_server: RedisServer) -> None:
    store = RedisSessionStore(redis_server.url, pending_ttl_s=60, ttl_s=60, timeout_s=0.3)
    try:
        from gateway.sessions import Session

        s = await store.create(Session.new(carrier="twilio", call_id="CA1"))
        redis_server.stop()
        await store.end(s.id)                                  # logged, remembered, not raised
        redis_server.start()
        raw = redis.asyncio.Redis.from_url(redis_server.url)
        try:
            await raw.set(RedisSessionStore.PREFIX + s.id, "stale")   # as if the key had survived
            assert await store.resync([]) == 0
            assert await raw.exists(RedisSessionStore.PREFIX + s.id) == 0
        finally:
            await raw.aclose()
    finally:
        await store.close()


async def _status(http: httpx.AsyncClient, url: str, status: int) -> bool:
    try:
        return (await http.get(url, timeout=2)).status_code == status
    except httpx.HTTPError:
        return False


# ----------------------------------------------------------------------------------- the bus alone
async def test_bus_answers_none_when_no_instance_holds_the_call_and_relays_replies(redis_server: RedisServer) -> None:
    asker = RedisControlBus(redis_server.url, timeout_s=0.5)
    holder = RedisControlBus(redis_server.url, timeout_s=0.5)
    seen: list[tuple[str, str, dict[str, Any]]] = []

    async def nobody(op: str, sid: str, args: Any) -> None:
        return None

    async def holds_s1(op: str, sid: str, args: Any) -> dict[str, Any] | None:
        seen.append((op, sid, dict(args)))
        if sid == "boom":
            raise RuntimeError("bug")
        return {"status": 200, "body": {"done": sid}} if sid == "s1" else None

    await asker.start(nobody)
    assert await asker.request("end", "s1", {}) is None               # nobody else listening: at once
    await holder.start(holds_s1)
    try:
        assert await asker.request("dtmf", "s1", {"digits": "5"}) == {"status": 200, "body": {"done": "s1"}}
        started = time.monotonic()
        assert await asker.request("end", "s2", {}) is None             # listened to, nobody holds it
        assert time.monotonic() - started >= 0.4
        failed = await asker.request("end", "boom", {})
        assert failed is not None and failed["status"] == 500
        assert seen[0] == ("dtmf", "s1", {"digits": "5"})
    finally:
        await asker.close()
        await holder.close()
