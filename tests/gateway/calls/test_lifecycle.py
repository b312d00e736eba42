"""Bounded sessions: a client streaming audio faster than real time (over /ws or a carrier's media socket)
costs nobody else anything, is closed, can always be ended, and leaves no memory behind.

The gateway runs as its own process with fake providers at fixed delays; a legitimate Twilio call runs
beside each flood; the flood comes from another process (``tests.flood``) so this test's event loop
only measures.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import pytest_asyncio

from gateway.calls.lifecycle import run_until_ended
from gateway.simulate.call import SimulatedCall
from tests.conftest import ACCOUNT_SID, AUTH_TOKEN, PUBLIC_URL, greeted_call
from tests.fakes.openai_server import FakeOpenAI
from tests.fakes.twilio_rest import FakeTwilioREST
from tests.flood import Flood
from tests.processes import GatewayProcess
from tests.speech import speech_pcm

KEY = "lifecycle-test-key-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {KEY}"}


# ----------------------------------------------------------------------------------- run_until_ended
@pytest.mark.asyncio
async def test_work_that_ignores_cancellation_is_abandoned_within_twice_the_timeout(
        caplog: pytest.LogCaptureFixture) -> None:
    release = asyncio.Event()

    async def stubborn() -> None:
        while not release.is_set():
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                continue            # a task that swallows cancellation (the bug class this guards against)

    ended = asyncio.Event()
    ended.set()
    t0 = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="gateway.calls.lifecycle"):
        await run_until_ended(stubborn(), ended, stop_timeout_s=0.2)
    assert 0.35 < time.monotonic() - t0 < 1.0
    assert "abandoning them" in caplog.text and "stubborn" in caplog.text
    release.set()


@pytest.mark.asyncio
async def test_work_that_stops_is_awaited_and_its_failure_comes_out() -> None:
    ended = asyncio.Event()

    async def fails() -> None:
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        await run_until_ended(fails(), ended, stop_timeout_s=1)

    stopped: list[str] = []

    async def winds_down() -> None:
        await ended.wait()
        await asyncio.sleep(0.05)      # its own end takes a moment: not cancelled for that
        stopped.append("clean")

    asyncio.get_running_loop().call_later(0.05, ended.set)
    await run_until_ended(winds_down(), ended, stop_timeout_s=1)
    assert stopped == ["clean"]


# ----------------------------------------------------------------------------------- floods
def _rss_mb(gw: GatewayProcess) -> float:
    assert gw.process is not None, "the gateway process is not running"
    with open(f"/proc/{gw.process.pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


class Probe:
    """``/health`` every 50 ms on a fresh connection; the slowest answer is what a load balancer sees."""

    def __init__(self, url: str) -> None:
        self.url, self.latencies = url, [0.0]
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        async with httpx.AsyncClient(timeout=10) as http:
            while True:
                t0 = time.monotonic()
                assert (await http.get(self.url + "/health", headers={"Connection": "close"})).status_code == 200
                self.latencies.append(time.monotonic() - t0)
                await asyncio.sleep(0.05)

    def __enter__(self) -> Probe:
        self._task = asyncio.create_task(self._run())
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()


@pytest_asyncio.fixture
async def gateway() -> AsyncIterator[tuple[GatewayProcess, FakeOpenAI, FakeTwilioREST]]:
    async with (FakeOpenAI(transcripts=["where is my order"] * 20, replies=["It ships tomorrow."] * 20,
                           stt_delay_ms=50, llm_delay_ms=50, tts_ms_per_char=2) as fake,
                FakeTwilioREST(ACCOUNT_SID, AUTH_TOKEN) as twilio):
        raw: dict[str, Any] = {
            "public_url": PUBLIC_URL, "provider": "openai", "api_keys": {"openai": "sk-test"},
            "base_urls": {"openai": fake.base_url}, "server_api_key": KEY, "vad_stop_ms": 300,
            "carriers": {"twilio": {"account_sid": ACCOUNT_SID, "auth_token": AUTH_TOKEN,
                                    "api_base_url": twilio.base_url}}}
        async with GatewayProcess(raw) as gw:
            yield gw, fake, twilio


async def _legit_call(gw: GatewayProcess, twilio: FakeTwilioREST) -> SimulatedCall:
    return await greeted_call(gw.url, twilio)


async def _answer_s(call: SimulatedCall, speech: bytes) -> float:
    """Seconds from the end of the caller's words to the first audio of the answer."""
    end = await call.speak(speech)
    first = await call.wait_audio(after=end, timeout=10)
    await call.wait_quiet(400, timeout=10)
    return first - end


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", ["ws", "twilio"])
async def test_a_flood_is_dropped_and_closed_while_a_real_call_keeps_its_latency(
        gateway: tuple[GatewayProcess, FakeOpenAI, FakeTwilioREST], kind: str) -> None:
    gw, _, twilio = gateway
    speech = speech_pcm("Where is my order?", 8000)
    call = await _legit_call(gw, twilio)
    normal = await _answer_s(call, speech)
    baseline_mb = _rss_mb(gw)
    options = {"token": KEY} if kind == "ws" else {"public_url": PUBLIC_URL, "auth_token": AUTH_TOKEN,
                                                    "account_sid": ACCOUNT_SID}
    with Probe(gw.url) as probe:
        flood = await Flood.start(kind, url=gw.url, frames=30000, rate=10000, **options)
        await flood.session_id()
        during = await _answer_s(call, speech)
        result = await flood.result(timeout_s=30)
    # closed for flooding, long before 30,000 frames (600 s of audio) went in
    assert (result["close_code"], result["close_reason"]) == (1008, "media arriving faster than real time"), result
    assert result["sent"] < 30000
    assert max(probe.latencies) < 0.1, sorted(probe.latencies)[-5:]
    assert during < normal + 0.3, (normal, during)
    async with httpx.AsyncClient(base_url=gw.url) as http:
        metrics = (await http.get("/metrics")).text
    label = "browser" if kind == "ws" else "twilio"
    dropped = [line for line in metrics.splitlines()
               if line.startswith(f'voxray_media_dropped_total{{carrier="{label}",reason="faster_than_real_time"}}')]
    assert dropped and float(dropped[0].split()[-1]) > 500
    assert 'reason="media_flood"' in metrics
    assert _rss_mb(gw) - baseline_mb < 30
    await call.hang_up()


@pytest.mark.asyncio
async def test_a_flooding_session_ends_on_delete_within_a_second() -> None:
    async with FakeOpenAI(stt_delay_ms=50, llm_delay_ms=50, tts_ms_per_char=2) as fake:
        raw = {"provider": "openai", "api_keys": {"openai": "sk-test"}, "base_urls": {"openai": fake.base_url},
               "server_api_key": KEY, "media_flood_close_ms": 0}     # never closed for flooding: only DELETE ends it
        async with GatewayProcess(raw) as gw, httpx.AsyncClient(base_url=gw.url, headers=AUTH, timeout=10) as http:
            baseline_mb = _rss_mb(gw)
            with Probe(gw.url) as probe:
                flood = await Flood.start("ws", url=gw.url, frames=30000, rate=10000, token=KEY)
                session_id = await flood.session_id()
                await asyncio.sleep(1.5)                # flooding for a while
                t0 = time.monotonic()
                ended = await http.delete(f"/sessions/{session_id}")
                assert ended.status_code == 200
                assert (await http.get(f"/sessions/{session_id}")).status_code == 404
                assert time.monotonic() - t0 < 1.0
                result = await flood.result(timeout_s=30)
            assert result["close_code"] == 1000 and result["sent"] < 30000
            assert max(probe.latencies) < 0.1, sorted(probe.latencies)[-5:]
            assert _rss_mb(gw) - baseline_mb < 30
