"""Admission control: a full or overloaded instance refuses new calls cleanly and says so on /ready;
the calls already up keep running."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest
import websockets

from gateway.admission import Admission
from gateway.metrics import Metrics
from gateway.simulate.call import SimulatedCall
from tests.conftest import ACCOUNT_SID, AUTH_TOKEN, PUBLIC_URL, phone_config, running_gateway
from tests.fakes.openai_server import FakeOpenAI
from tests.fakes.twilio_rest import FakeTwilioREST


def test_overload_needs_a_full_window_above_the_threshold_and_clears_below_half() -> None:
    calls = [0]
    admission = Admission(max_calls=2, lag_threshold_ms=50, window_secs=0.5, sample_ms=100,
                          count=lambda: calls[0], metrics=Metrics())
    for lag in (200, 200, 200, 200):              # four late samples: the window (5) is not full yet
        admission.observe(lag)
    assert admission.refusal() is None
    admission.observe(200)
    assert admission.overloaded and admission.refusal() == "overloaded"
    for _ in range(5):
        admission.observe(30)                     # 30 ms average: under the threshold, not yet under half
    assert admission.overloaded
    for _ in range(5):
        admission.observe(10)
    assert not admission.overloaded and admission.refusal() is None
    calls[0] = 2
    assert admission.refusal() == "max_calls" and "maximum of 2 calls" in admission.explain("max_calls")


def _refused(metrics: str, reason: str) -> float:
    for line in metrics.splitlines():
        if line.startswith(f'voxray_calls_refused_total{{reason="{reason}"}}'):
            return float(line.split()[-1])
    return 0.0


@pytest.mark.asyncio
async def test_at_max_concurrent_calls_new_calls_are_refused_and_ready_says_busy() -> None:
    async with FakeOpenAI(tts_ms_per_char=5) as fake, FakeTwilioREST(ACCOUNT_SID, AUTH_TOKEN) as twilio:
        config = phone_config(fake.base_url, twilio.base_url, max_concurrent_calls=1)
        async with running_gateway(config) as url, httpx.AsyncClient(base_url=url) as http:
            first = SimulatedCall(gateway=url, public_url=PUBLIC_URL, auth_token=AUTH_TOKEN, account_sid=ACCOUNT_SID)
            twilio.known_calls = {first.call_sid}
            assert (await first.dial()).status_code == 200
            await first.connect()
            await first.wait_audio(after=0, timeout=5)          # the first call is up and speaking

            second = SimulatedCall(gateway=url, public_url=PUBLIC_URL, auth_token=AUTH_TOKEN, account_sid=ACCOUNT_SID)
            refused = await second.dial()
            assert refused.status_code == 503 and "max_concurrent_calls" in refused.json()["error"]
            async with websockets.connect(url.replace("http", "ws") + "/ws") as ws:
                event = json.loads(await ws.recv())
                assert event["code"] == "busy"
                with pytest.raises(websockets.ConnectionClosed):
                    await ws.recv()
                assert ws.close_code == 1013 and ws.close_reason == "busy: try again"
            ready = await http.get("/ready")
            assert ready.status_code == 503 and ready.json()["error"].startswith("busy")
            assert _refused((await http.get("/metrics")).text, "max_calls") == 2.0

            await first.hang_up()
            async with asyncio.timeout(5):
                while (await http.get("/ready")).status_code != 200:
                    await asyncio.sleep(0.05)
            third = SimulatedCall(gateway=url, public_url=PUBLIC_URL, auth_token=AUTH_TOKEN, account_sid=ACCOUNT_SID)
            assert (await third.dial()).status_code == 200      # room again


@pytest.mark.asyncio
async def test_a_lagging_event_loop_refuses_new_calls_until_it_recovers() -> None:
    async with FakeOpenAI() as fake:
        config = phone_config(fake.base_url, "http://127.0.0.1:9", load_sample_ms=20, load_window_secs=0.2,
                              load_lag_threshold_ms=30)
        async with running_gateway(config) as url, httpx.AsyncClient(base_url=url, timeout=10) as http:
            assert (await http.get("/ready")).status_code == 200
            # the gateway runs in this process: block its event loop for 80 ms at a time, for a second
            deadline = time.monotonic() + 1.0
            while time.monotonic() < deadline:
                time.sleep(0.08)
                await asyncio.sleep(0.005)
            ready = await http.get("/ready")
            assert ready.status_code == 503 and "overloaded" in ready.json()["error"], ready.text
            webhook = await SimulatedCall(gateway=url, public_url=PUBLIC_URL, auth_token=AUTH_TOKEN,
                                          account_sid=ACCOUNT_SID).dial()
            assert webhook.status_code == 503 and "overloaded" in webhook.json()["error"]
            metrics = (await http.get("/metrics")).text
            assert _refused(metrics, "overloaded") == 1.0
            assert "voxray_event_loop_lag_seconds" in metrics
            async with asyncio.timeout(5):                   # the loop runs freely again: calls are taken
                while (await http.get("/ready")).status_code != 200:
                    await asyncio.sleep(0.05)
