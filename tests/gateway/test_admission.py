"""Admission control: a full or overloaded instance refuses new calls cleanly and says so on /ready;
the calls already up keep running."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import websockets

from gateway.admission import Admission
from gateway.config import Config, ConfigError
from gateway.metrics import Metrics
from gateway.simulate.call import SimulatedCall
from tests.carriers.test_conformance import CARRIERS
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


# the other carriers' gateway settings and the emulated carriers' credentials
OTHERS = {name: CARRIERS[name] for name in ("vonage", "plivo", "exotel")}


def twilio_call(url: str) -> SimulatedCall:
    return SimulatedCall(gateway=url, public_url=PUBLIC_URL, auth_token=AUTH_TOKEN, account_sid=ACCOUNT_SID)


@contextlib.asynccontextmanager
async def full_gateway(*, others: bool = False, **overrides: Any
                       ) -> AsyncIterator[tuple[str, httpx.AsyncClient, SimulatedCall]]:
    """A gateway taking one call (``max_concurrent_calls=1``) with a live Twilio call up (with ``others``:
    Vonage, Plivo and Exotel configured too)."""
    async with FakeOpenAI(tts_ms_per_char=5) as fake, FakeTwilioREST(ACCOUNT_SID, AUTH_TOKEN) as twilio:
        carriers = {"twilio": {"account_sid": ACCOUNT_SID, "auth_token": AUTH_TOKEN, "api_base_url": twilio.base_url},
                    **({name: settings for name, (settings, _) in OTHERS.items()} if others else {})}
        config = phone_config(fake.base_url, twilio.base_url, max_concurrent_calls=1, carriers=carriers, **overrides)
        async with running_gateway(config) as url, httpx.AsyncClient(base_url=url) as http:
            first = twilio_call(url)
            twilio.known_calls = {first.call_sid}
            assert (await first.dial()).status_code == 200
            await first.connect()
            await first.wait_audio(after=0, timeout=5)          # the first call is up and speaking
            yield url, http, first


async def webhook(http: httpx.AsyncClient, call: SimulatedCall, **kwargs: str) -> httpx.Response:
    """Send ``call``'s signed webhook (``signature=`` forges it) without reading the answer as a stream."""
    hook = call.dialect.webhook(PUBLIC_URL, {}, **kwargs)
    return await http.request(hook.method, hook.path, content=hook.body, headers=dict(hook.headers))


@pytest.mark.asyncio
async def test_at_max_concurrent_calls_new_calls_are_refused_and_ready_says_busy() -> None:
    async with full_gateway() as (url, http, first):
        second = twilio_call(url)
        forged = await webhook(http, second, signature="forged")
        assert forged.status_code == 403                        # never speak to an unsigned request
        refused = await webhook(http, second)
        assert refused.status_code == 200 and refused.headers["content-type"].startswith("text/xml")
        root = ET.fromstring(refused.text)
        assert [(child.tag, child.text) for child in root] == [("Say", Config.from_mapping({}).busy_text), ("Hangup", None)]
        assert _refused((await http.get("/metrics")).text, "max_calls") == 1.0
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
        # the refused call left nothing behind: the carrier's retry of that very webhook is a new call
        assert (await second.dial()).status_code == 200 and second.session_id
        await second.connect()
        await second.wait_audio(after=0, timeout=5)
        await second.hang_up()


@pytest.mark.asyncio
async def test_busy_answer_503_leaves_the_call_to_the_carriers_fallback_url() -> None:
    async with full_gateway(busy_answer="503") as (url, http, _):
        refused = await webhook(http, twilio_call(url))
        assert refused.status_code == 503 and "max_concurrent_calls" in refused.json()["error"]
        assert (await webhook(http, twilio_call(url), signature="forged")).status_code == 403
        assert _refused((await http.get("/metrics")).text, "max_calls") == 1.0


@pytest.mark.asyncio
async def test_each_carrier_at_capacity_gets_its_busy_answer() -> None:
    async with full_gateway(others=True, busy_text="Busy & full, <sorry>.") as (url, http, _):
        def call(name: str) -> SimulatedCall:
            return SimulatedCall(gateway=url, public_url=PUBLIC_URL, carrier=name, credentials=OTHERS[name][1])

        vonage = await webhook(http, call("vonage"))
        assert vonage.status_code == 200 and vonage.headers["content-type"] == "application/json"
        assert vonage.json() == [{"action": "talk", "text": "Busy & full, <sorry>."}]
        plivo = await webhook(http, call("plivo"))
        assert plivo.status_code == 200 and plivo.headers["content-type"].startswith("application/xml")
        assert "<Speak>Busy &amp; full, &lt;sorry&gt;.</Speak><Hangup/>" in plivo.text
        assert [(c.tag, c.text) for c in ET.fromstring(plivo.text)] == [("Speak", "Busy & full, <sorry>."),
                                                                       ("Hangup", None)]
        exotel = await webhook(http, call("exotel"))             # no markup to speak with: 503
        assert exotel.status_code == 503 and "max_concurrent_calls" in exotel.json()["error"]
        assert (await webhook(http, call("plivo"), signature="forged")).status_code == 403
        assert _refused((await http.get("/metrics")).text, "max_calls") == 3.0


def test_busy_settings_are_validated() -> None:
    assert Config.from_mapping({}).busy_answer == "speak"
    for raw, words in (({"busy_answer": "ring"}, "'busy_answer' must be one of speak, 503"),
                       ({"busy_text": " "}, "'busy_text' must be 1 to 1500 characters"),
                       ({"busy_text": "x" * 1501}, "'busy_text' must be 1 to 1500 characters"),
                       ({"busy_text": "bell\x07"}, "without control characters")):
        with pytest.raises(ConfigError, match=words):
            Config.from_mapping(raw)


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
            refused = await webhook(http, twilio_call(url))
            assert refused.status_code == 200 and "<Say>All our lines are busy" in refused.text
            metrics = (await http.get("/metrics")).text
            assert _refused(metrics, "overloaded") == 1.0
            assert "voxray_event_loop_lag_seconds" in metrics
            async with asyncio.timeout(5):                   # the loop runs freely again: calls are taken
                while (await http.get("/ready")).status_code != 200:
                    await asyncio.sleep(0.05)
