"""The carrier media socket ``WS /media/{carrier}/{session_id}`` of a real gateway on 127.0.0.1: session claiming,
the start handshake, malformed and oversized messages, isolation between calls, and DTMF.

Clients are real ``websockets`` connections or the Twilio emulator (``SimulatedCall``); providers are the fake
OpenAI server, hang-ups go to the fake Twilio REST API. Timers are shrunk through config, never patched."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from typing import Any

import httpx
import numpy as np
import pytest
import websockets
from prometheus_client.parser import text_string_to_metric_families

from gateway.simulate.call import SimulatedCall
from tests.conftest import ACCOUNT_SID, AUTH_TOKEN, PUBLIC_URL, phone_config, running_gateway
from tests.fakes.openai_server import FakeOpenAI
from tests.fakes.twilio_rest import FakeTwilioREST

pytestmark = pytest.mark.asyncio

UNKNOWN_SESSION = "unknown, used or expired session"
TRANSCRIPT = "I would like a table for two."
REPLY = "Sure."


# ------------------------------------------------------------------------------------------ helpers
def tone(seconds: float = 0.8, rate: int = 8000, freq: float = 440.0, amp: float = 0.3) -> bytes:
    """A loud sine (PCM16 mono): the energy VAD hears it as speech."""
    t = np.arange(int(seconds * rate)) / rate
    return (amp * 32767 * np.sin(2 * np.pi * freq * t)).astype("<i2").tobytes()


def fakes(**kw: Any) -> tuple[FakeOpenAI, FakeTwilioREST]:
    return (FakeOpenAI(transcripts=[TRANSCRIPT], replies=[REPLY], tts_ms_per_char=10, **kw),
            FakeTwilioREST(ACCOUNT_SID, AUTH_TOKEN))


def new_call(url: str, twilio: FakeTwilioREST, **kw: Any) -> SimulatedCall:
    call = SimulatedCall(gateway=url, public_url=PUBLIC_URL, auth_token=AUTH_TOKEN, account_sid=ACCOUNT_SID, **kw)
    twilio.known_calls = twilio.known_calls | {call.call_sid}
    return call


def ws_url(http_url: str, path: str) -> str:
    return "ws://" + http_url.removeprefix("http://") + path


async def close_of(ws: Any, timeout: float = 5.0) -> tuple[int | None, str]:
    """Read (and discard) until the server closes; the close code and reason it sent."""
    async with asyncio.timeout(timeout):
        try:
            while True:
                await ws.recv()
        except websockets.ConnectionClosed as exc:
            return (exc.rcvd.code, exc.rcvd.reason) if exc.rcvd is not None else (None, "")


def metric(text: str, sample: str, **labels: str) -> float | None:
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return None


async def metric_now(http: httpx.AsyncClient, url: str, sample: str, **labels: str) -> float:
    return metric((await http.get(f"{url}/metrics")).text, sample, **labels) or 0.0


async def wait_metric(http: httpx.AsyncClient, url: str, sample: str, at_least: float = 1.0,
                      timeout: float = 5.0, **labels: str) -> float:
    async with asyncio.timeout(timeout):
        while True:
            value = await metric_now(http, url, sample, **labels)
            if value >= at_least:
                return value
            await asyncio.sleep(0.05)


async def wait_session_gone(http: httpx.AsyncClient, url: str, session_id: str, timeout: float = 3.0) -> None:
    async with asyncio.timeout(timeout):
        while (await http.get(f"{url}/sessions/{session_id}")).status_code != 404:
            await asyncio.sleep(0.02)


def media_message(call: SimulatedCall, payload: str) -> str:
    return json.dumps({"event": "media", "streamSid": call.dialect.stream_sid,
                       "media": {"track": "inbound", "chunk": "1", "timestamp": "20", "payload": payload}})


async def assert_answers(call: SimulatedCall, fake: FakeOpenAI) -> None:
    """The caller speaks once; the agent's spoken answer comes back on the socket."""
    before = len(fake.state.llm_requests)
    end = await call.speak(tone())
    await call.wait_audio(after=end, timeout=5)
    assert len(fake.state.llm_requests) == before + 1
    assert fake.state.llm_requests[-1]["messages"][-1] == {"role": "user", "content": TRANSCRIPT}
    assert not call._closed.is_set()


# ------------------------------------------------------------------------------------------ session claiming
async def test_unknown_session_is_closed_1008() -> None:
    openai, twilio_rest = fakes()
    async with openai as fake, twilio_rest as twilio:
        async with running_gateway(phone_config(fake.base_url, twilio.base_url)) as url:
            async with websockets.connect(ws_url(url, "/media/twilio/" + "A" * 32)) as ws:
                assert await close_of(ws) == (1008, UNKNOWN_SESSION)


async def test_session_used_twice_is_refused_on_the_second_socket() -> None:
    openai, twilio_rest = fakes()
    async with openai as fake, twilio_rest as twilio:
        async with running_gateway(phone_config(fake.base_url, twilio.base_url)) as url:
            call = new_call(url, twilio)
            await call.dial()
            await call.connect()
            try:
                await call.wait_audio(after=0, timeout=5)          # the first socket claimed the session
                async with websockets.connect(call.media_url) as second:
                    assert await close_of(second) == (1008, UNKNOWN_SESSION)
                assert not call._closed.is_set()                     # the first call is unaffected
            finally:
                await call.hang_up()
            async with websockets.connect(call.media_url) as third:  # and after the call ended
                assert await close_of(third) == (1008, UNKNOWN_SESSION)


async def test_expired_pending_session_is_refused() -> None:
    openai, twilio_rest = fakes()
    async with openai as fake, twilio_rest as twilio:
        config = phone_config(fake.base_url, twilio.base_url, session_pending_ttl_secs=1)
        async with running_gateway(config) as url, httpx.AsyncClient() as http:
            call = new_call(url, twilio)
            await call.dial()
            assert (await http.get(f"{url}/sessions/{call.session_id}")).status_code == 200
            await asyncio.sleep(1.3)
            async with websockets.connect(call.media_url) as ws:
                assert await close_of(ws) == (1008, UNKNOWN_SESSION)


async def test_socket_for_another_carrier_is_refused() -> None:
    openai, twilio_rest = fakes()
    async with openai as fake, twilio_rest as twilio:
        async with running_gateway(phone_config(fake.base_url, twilio.base_url)) as url:
            call = new_call(url, twilio)
            await call.dial()
            async with websockets.connect(ws_url(url, f"/media/nope/{call.session_id}")) as ws:
                code, reason = await close_of(ws)
            assert code == 1008 and "nope" in reason
            # the session was not consumed by the wrong socket
            await call.connect()
            try:
                await call.wait_audio(after=0, timeout=5)
            finally:
                await call.hang_up()


# ------------------------------------------------------------------------------------------ the start handshake
async def test_media_before_start_closes_1008_and_finalises_the_call() -> None:
    openai, twilio_rest = fakes()
    async with openai as fake, twilio_rest as twilio:
        async with running_gateway(phone_config(fake.base_url, twilio.base_url)) as url, httpx.AsyncClient() as http:
            call = new_call(url, twilio)
            await call.dial()
            async with websockets.connect(call.media_url) as ws:
                await ws.send(json.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"}))
                await ws.send(media_message(call, base64.b64encode(b"\xff" * 160).decode()))
                code, reason = await close_of(ws)
            assert code == 1008
            assert "media before start" in reason
            ended = await wait_metric(http, url, "voxray_calls_ended_total", carrier="twilio", reason="protocol_error")
            assert ended == 1.0
            assert await metric_now(http, url, "voxray_active_calls", carrier="twilio") == 0.0
            await wait_session_gone(http, url, call.session_id)


async def test_no_start_within_timeout_closes_1008() -> None:
    openai, twilio_rest = fakes()
    async with openai as fake, twilio_rest as twilio:
        config = phone_config(fake.base_url, twilio.base_url, media_start_timeout_secs=0.5)
        async with running_gateway(config) as url, httpx.AsyncClient() as http:
            call = new_call(url, twilio)
            await call.dial()
            async with websockets.connect(call.media_url) as ws:
                opened = time.monotonic()
                await ws.send(json.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"}))
                code, reason = await close_of(ws)
                waited = time.monotonic() - opened
            assert (code, reason) == (1008, "no start message")
            assert 0.4 <= waited < 3.0
            assert await wait_metric(http, url, "voxray_calls_ended_total", carrier="twilio",
                                     reason="start_timeout") == 1.0
            await wait_session_gone(http, url, call.session_id)


async def test_start_for_another_call_sid_closes_1008() -> None:
    openai, twilio_rest = fakes()
    async with openai as fake, twilio_rest as twilio:
        async with running_gateway(phone_config(fake.base_url, twilio.base_url)) as url, httpx.AsyncClient() as http:
            call = new_call(url, twilio)
            await call.dial()
            start = call.start_message()
            start["start"]["callSid"] = "CA" + "f" * 32               # not the call the webhook announced
            async with websockets.connect(call.media_url) as ws:
                await ws.send(json.dumps(start))
                code, reason = await close_of(ws)
            assert code == 1008 and "call id" in reason
            assert await wait_metric(http, url, "voxray_calls_ended_total", carrier="twilio",
                                     reason="protocol_error") == 1.0
            assert fake.state.tts_requests[1:] == []                   # no greeting was synthesised for it


# ------------------------------------------------------------------------------------------ malformed messages
async def test_malformed_json_and_bad_base64_are_dropped_and_the_call_goes_on() -> None:
    openai, twilio_rest = fakes()
    async with openai as fake, twilio_rest as twilio:
        async with running_gateway(phone_config(fake.base_url, twilio.base_url)) as url, httpx.AsyncClient() as http:
            call = new_call(url, twilio)
            await call.dial()
            await call.connect()
            try:
                await call.wait_audio(after=0, timeout=5)     # the greeting, then quiet: the tone is a turn,
                await call.wait_quiet(300, timeout=10)        # not a sound over the agent (Silero: no speech)
                await call.send_raw('{"event": "media", "streamSid": ')          # not JSON
                await call.send_raw(media_message(call, "@@ not base64 @@"))       # invalid base64
                rejected = await wait_metric(http, url, "voxray_media_messages_rejected_total", at_least=2,
                                             carrier="twilio")
                assert rejected == 2.0
                await assert_answers(call, fake)
                assert fake.state.tts_requests[-1]["input"] == REPLY
            finally:
                await call.hang_up()
            assert call.close_code == 1000


async def test_too_many_malformed_messages_close_1007() -> None:
    openai, twilio_rest = fakes()
    async with openai as fake, twilio_rest as twilio:
        config = phone_config(fake.base_url, twilio.base_url, media_max_bad_messages=2)
        async with running_gateway(config) as url, httpx.AsyncClient() as http:
            call = new_call(url, twilio)
            await call.dial()
            await call.connect()
            try:
                await call.wait_audio(after=0, timeout=5)
                for _ in range(2):                                   # up to the limit: tolerated
                    await call.send_raw("not json")
                await wait_metric(http, url, "voxray_media_messages_rejected_total", at_least=2, carrier="twilio")
                await asyncio.sleep(0.2)
                assert not call._closed.is_set()
                await call.send_raw("not json")                      # one more: closed
                await call.wait_closed(timeout=5)
                assert call.close_code == 1007
                assert await wait_metric(http, url, "voxray_calls_ended_total", carrier="twilio",
                                         reason="protocol_error") == 1.0
                assert twilio.ended_calls == [call.call_sid]
            finally:
                await call.close()


async def test_binary_frame_is_dropped_as_malformed() -> None:
    openai, twilio_rest = fakes()
    async with openai as fake, twilio_rest as twilio:
        async with running_gateway(phone_config(fake.base_url, twilio.base_url)) as url, httpx.AsyncClient() as http:
            call = new_call(url, twilio)
            await call.dial()
            await call.connect()
            try:
                await call.wait_audio(after=0, timeout=5)     # the greeting, then quiet: the tone is a turn,
                await call.wait_quiet(300, timeout=10)        # not a sound over the agent (Silero: no speech)
                await call.send_raw(b"\xff" * 160)
                assert await wait_metric(http, url, "voxray_media_messages_rejected_total", carrier="twilio") == 1.0
                await assert_answers(call, fake)
            finally:
                await call.hang_up()
            assert call.close_code == 1000


async def test_oversized_message_closes_1009_and_hangs_up() -> None:
    openai, twilio_rest = fakes()
    async with openai as fake, twilio_rest as twilio:
        config = phone_config(fake.base_url, twilio.base_url, ws_max_message_bytes=4096)
        async with running_gateway(config) as url, httpx.AsyncClient() as http:
            call = new_call(url, twilio)
            await call.dial()
            await call.connect()
            try:
                await call.wait_audio(after=0, timeout=5)
                await call.send_raw(media_message(call, "A" * 10000))
                await call.wait_closed(timeout=5)
                assert call.close_code == 1009
                await wait_session_gone(http, url, call.session_id)
                assert await metric_now(http, url, "voxray_active_calls", carrier="twilio") == 0.0
            finally:
                await call.close()


async def test_oversized_message_is_finalised_as_message_too_big_with_rest_hangup() -> None:
    openai, twilio_rest = fakes()
    async with openai as fake, twilio_rest as twilio:
        config = phone_config(fake.base_url, twilio.base_url, ws_max_message_bytes=4096)
        async with running_gateway(config) as url, httpx.AsyncClient() as http:
            call = new_call(url, twilio)
            await call.dial()
            await call.connect()
            try:
                await call.wait_audio(after=0, timeout=5)
                await call.send_raw(media_message(call, "A" * 10000))
                await call.wait_closed(timeout=5)
                await wait_session_gone(http, url, call.session_id)
                assert twilio.ended_calls == [call.call_sid]            # hung up through the REST API
                text = (await http.get(f"{url}/metrics")).text
                assert metric(text, "voxray_calls_ended_total", carrier="twilio", reason="caller_hangup") is None
                assert metric(text, "voxray_calls_ended_total", carrier="twilio", reason="message_too_big") == 1.0
                assert metric(text, "voxray_media_messages_rejected_total", carrier="twilio") == 1.0
            finally:
                await call.close()


async def test_bad_messages_on_one_call_do_not_affect_another() -> None:
    openai, twilio_rest = fakes()
    async with openai as fake, twilio_rest as twilio:
        config = phone_config(fake.base_url, twilio.base_url, media_max_bad_messages=2)
        async with running_gateway(config) as url:
            bad, good = new_call(url, twilio), new_call(url, twilio)
            for c in (bad, good):
                await c.dial()
                await c.connect()
            try:
                await asyncio.gather(bad.wait_quiet(300, timeout=10), good.wait_quiet(300, timeout=10))
                for _ in range(3):
                    await bad.send_raw("{{{ not json")
                await bad.wait_closed(timeout=5)
                assert bad.close_code == 1007
                await assert_answers(good, fake)
                await good.wait_quiet(300)
                assert not good._closed.is_set()
                assert twilio.ended_calls == [bad.call_sid]
            finally:
                await good.hang_up()
                await bad.close()
            assert good.close_code == 1000


# ------------------------------------------------------------------------------------------ DTMF
async def test_dtmf_digits_reach_the_llm() -> None:
    openai, twilio_rest = fakes()
    async with openai as fake, twilio_rest as twilio:
        async with running_gateway(phone_config(fake.base_url, twilio.base_url)) as url:
            call = new_call(url, twilio)
            await call.dial()
            await call.connect()
            try:
                await call.wait_audio(after=0, timeout=5)     # the greeting, then quiet: the tone is a turn,
                await call.wait_quiet(300, timeout=10)        # not a sound over the agent (Silero: no speech)
                started = time.monotonic()
                await call.dtmf("5")
                await call.dtmf("#")
                async with asyncio.timeout(3):
                    while not fake.state.llm_requests:
                        await asyncio.sleep(0.02)
                # "#" submits at once, without waiting for dtmf_timeout_ms (1.5 s)
                assert time.monotonic() - started < 1.2
                [request] = fake.state.llm_requests
                assert request["messages"][-1] == {"role": "user", "content": "[DTMF] 5"}
                await call.wait_audio(after=started, timeout=5)     # and the agent answers
            finally:
                await call.hang_up()
