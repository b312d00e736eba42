"""Graceful drain (gateway.drain, gateway.server): SIGTERM to a real gateway process with live calls."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import pytest

from gateway.simulate.call import SimulatedCall
from tests.conftest import ACCOUNT_SID, AUTH_TOKEN, PUBLIC_URL, greeted_call
from tests.fakes.openai_server import FakeOpenAI
from tests.fakes.twilio_rest import FakeTwilioREST
from tests.processes import GatewayProcess
from tests.speech import speech_pcm

pytestmark = pytest.mark.asyncio

GOODBYE = "We are closing now. Goodbye."


def raw_config(fake: FakeOpenAI, twilio: FakeTwilioREST, **overrides: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "public_url": PUBLIC_URL, "provider": "openai", "api_keys": {"openai": "sk-test"},
        "base_urls": {"openai": fake.base_url}, "vad_stop_ms": 300, "goodbye_text": GOODBYE,
        "carriers": {"twilio": {"account_sid": ACCOUNT_SID, "auth_token": AUTH_TOKEN, "api_base_url": twilio.base_url}},
    }
    raw.update(overrides)
    return raw


async def live_call(url: str, twilio: FakeTwilioREST) -> SimulatedCall:
    return await greeted_call(url, twilio, quiet_ms=500)


async def test_sigterm_lets_live_calls_run_until_the_deadline_then_says_goodbye() -> None:
    async with FakeOpenAI(tts_ms_per_char=10) as fake, FakeTwilioREST(ACCOUNT_SID, AUTH_TOKEN) as twilio:
        async with GatewayProcess(raw_config(fake, twilio, drain_timeout_secs=4, goodbye_timeout_secs=5)) as gw:
            calls = [await live_call(gw.url, twilio) for _ in range(2)]
            gw.terminate()
            terminated = time.monotonic()
            async with httpx.AsyncClient(base_url=gw.url) as http:
                while (await http.get("/ready")).status_code != 503:      # not ready at once
                    await asyncio.sleep(0.05)
                assert time.monotonic() - terminated < 2
                late = SimulatedCall(gateway=gw.url, public_url=PUBLIC_URL, auth_token=AUTH_TOKEN,
                                     account_sid=ACCOUNT_SID)
                assert (await late.dial()).status_code == 503               # no new calls
                assert (await http.get("/health")).status_code == 200       # still alive
                metrics = (await http.get("/metrics")).text
            assert "voxray_draining 1.0" in metrics
            # the calls are still served during the drain: a turn is answered
            before = fake.state.calls["llm"]
            spoke_at = await calls[0].speak(speech_pcm("hello there", 8000))
            await calls[0].wait_audio(after=spoke_at, timeout=10)
            assert fake.state.calls["llm"] > before
            for call in calls:
                await call.wait_closed(timeout=15)
                assert call.close_code == 1000
            ended = time.monotonic() - terminated
            assert ended >= 4.0                                           # nobody was cut before the deadline
            assert GOODBYE in [r["input"] for r in fake.state.tts_requests]   # each heard the goodbye
            assert sorted(twilio.ended_calls) == sorted(c.call_sid for c in calls)
            assert await gw.wait(15) in (0, -15)
            assert "drain deadline reached: saying goodbye to 2 call(s)" in gw.log()
            for call in calls:
                await call.close()


async def test_drain_ends_as_soon_as_the_last_call_hangs_up() -> None:
    async with FakeOpenAI(tts_ms_per_char=10) as fake, FakeTwilioREST(ACCOUNT_SID, AUTH_TOKEN) as twilio:
        async with GatewayProcess(raw_config(fake, twilio, drain_timeout_secs=60)) as gw:
            call = await live_call(gw.url, twilio)
            gw.terminate()
            await asyncio.sleep(0.5)
            assert gw.process is not None and gw.process.poll() is None   # waiting for the call
            await call.hang_up()
            hung_up = time.monotonic()
            assert await gw.wait(15) in (0, -15)
            assert time.monotonic() - hung_up < 10                        # not the 60 s deadline
            assert "drained: every call ended on its own" in gw.log()
            assert GOODBYE not in [r["input"] for r in fake.state.tts_requests]
            await call.close()
