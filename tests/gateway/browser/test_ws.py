"""``GET /ws``: the browser/app transport, end to end against a real gateway whose providers are the
fake OpenAI server, with a real ``websockets`` client sending PCM16 in real time (design §3.1)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any, TypeVar

import httpx
import numpy as np
import pytest
import websockets
from websockets.typing import Origin

from gateway.browser.ws import looks_like_float32, parse_start
from pipeline.audio import rms
from tests.conftest import PUBLIC_URL, phone_config, running_gateway
from tests.fakes.openai_server import FakeOpenAI
from tests.speech import speech_pcm

T = TypeVar("T")

pytestmark = pytest.mark.asyncio

TRANSCRIPT = "I would like to book a table"
REPLY = "Sure. For what time?"
LONG_REPLY = ("Let me tell you about tonight's menu. We have fresh pasta with basil. We have a wood fired pizza. "
              "We have a green salad with lemon. We have grilled fish with herbs. We have a chocolate cake.")
KEY = "s3cret-key"


def ws_url(http_url: str, path: str = "/ws") -> str:
    return "ws://" + http_url.removeprefix("http://") + path


def tone(ms: int, rate: int, amplitude: float = 0.3, hz: float = 300.0) -> bytes:
    t = np.arange(rate * ms // 1000) / rate
    return (amplitude * 32767 * np.sin(2 * np.pi * hz * t)).astype("<i2").tobytes()


class Client:
    """A browser stand-in: collects events and binary audio (with arrival times) in the background."""

    def __init__(self, ws: Any, rate: int = 16000) -> None:
        self.ws = ws
        self.rate = rate
        self.events: list[tuple[float, dict[str, Any]]] = []
        self.audio: list[tuple[float, bytes]] = []
        self.closed: tuple[int | None, str] | None = None
        self._changed = asyncio.Event()
        self._task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            async for message in self.ws:
                now = time.monotonic()
                if isinstance(message, bytes):
                    self.audio.append((now, message))
                else:
                    self.events.append((now, json.loads(message)))
                self._changed.set()
        except websockets.ConnectionClosed:
            pass
        rcvd = self.ws.protocol.close_rcvd
        self.closed = (rcvd.code, rcvd.reason) if rcvd is not None else (None, "")
        self._changed.set()

    async def until(self, predicate: Callable[[], T | None], timeout: float = 5.0) -> T:
        async with asyncio.timeout(timeout):
            while True:
                found = predicate()
                if found:
                    return found
                self._changed.clear()
                await self._changed.wait()

    async def event(self, type_: str, after: float = 0.0, timeout: float = 5.0, **fields: Any) -> dict[str, Any]:
        def find() -> dict[str, Any] | None:
            return next((e for t, e in self.events if t >= after and e.get("type") == type_
                         and all(e.get(k) == v for k, v in fields.items())), None)
        return await self.until(find, timeout)

    def of(self, type_: str) -> list[dict[str, Any]]:
        return [e for _, e in self.events if e.get("type") == type_]

    async def audio_after(self, after: float, timeout: float = 5.0) -> float:
        return await self.until(lambda: next((t for t, _ in self.audio if t >= after), None), timeout)

    async def quiet(self, ms: float = 400, timeout: float = 10.0) -> None:
        """Wait until no audio has arrived for ``ms``."""
        async with asyncio.timeout(timeout):
            while not self.audio or time.monotonic() - self.audio[-1][0] < ms / 1000:
                await asyncio.sleep(0.05)

    def pcm(self, after: float = 0.0) -> bytes:
        return b"".join(chunk for t, chunk in self.audio if t >= after)

    async def speak(self, ms: int = 1000, silence_ms: int = 700) -> float:
        """A loud tone in 20 ms frames paced in real time, then silence; returns when speech ended."""
        frame = self.rate * 20 // 1000 * 2
        pcm = tone(ms, self.rate)
        start = time.monotonic()
        for i, offset in enumerate(range(0, len(pcm), frame)):
            await self.ws.send(pcm[offset:offset + frame])
            await asyncio.sleep(max(0.0, start + (i + 1) * 0.02 - time.monotonic()))
        end = time.monotonic()
        quiet = b"\x00" * frame
        for i in range(silence_ms // 20):
            await self.ws.send(quiet)
            await asyncio.sleep(max(0.0, end + (i + 1) * 0.02 - time.monotonic()))
        return end

    async def closed_with(self, timeout: float = 5.0) -> tuple[int | None, str]:
        return await self.until(lambda: self.closed, timeout)


async def open_session(url: str, rate: int = 16000, **start: Any) -> Client:
    ws = await websockets.connect(ws_url(url))
    await ws.send(json.dumps({"type": "start", "sample_rate": rate, **start}))
    return Client(ws, rate)


def config(fake: FakeOpenAI, **overrides: Any) -> Any:
    return phone_config(fake.base_url, "http://127.0.0.1:9", **overrides)


async def test_conversation_over_ws_then_bad_input_then_end() -> None:
    async with FakeOpenAI(transcripts=[TRANSCRIPT], replies=[REPLY], tts_ms_per_char=15) as fake:
        async with running_gateway(config(fake)) as url, httpx.AsyncClient() as http:
            client = await open_session(url, context={"messages": [{"role": "system", "content": "You are Ada."}]})
            ready = await client.event("ready")
            assert ready["sample_rate"] == 16000 and len(ready["session_id"]) >= 32
            sid = ready["session_id"]
            session = (await http.get(f"{url}/sessions/{sid}")).json()
            assert session["carrier"] == "browser" and session["state"] == "active" and session["live"] is True

            # the greeting: binary PCM16 at 16 kHz, with events
            await client.audio_after(0)
            await client.event("bot_speaking", state="started")
            greeting = await client.event("transcript", role="assistant")
            assert greeting["final"] is True and greeting["text"]
            await client.quiet(400)
            await client.event("bot_speaking", state="stopped")
            pcm = client.pcm()
            assert len(pcm) % 2 == 0 and rms(pcm) > 0.05
            # ~ the greeting's duration (fake TTS: 15 ms per character) at 16 kHz, not 24 kHz or 8 kHz
            expected_s = len(greeting["text"]) * 0.015
            assert abs(len(pcm) / 2 / 16000 - expected_s) < 0.15

            # the user speaks; the agent answers
            end = await client.speak()
            user = await client.event("transcript", role="user", after=end)
            assert user["text"] == TRANSCRIPT
            answer = await client.event("transcript", role="assistant", text=REPLY, after=end)
            assert answer["final"] is True
            latency = await client.event("turn_latency", after=end)
            assert set(latency) >= {"turn_wait_ms", "stt_ms", "llm_first_token_ms", "tts_first_audio_ms",
                                    "first_audio_out_ms"} and latency["first_audio_out_ms"] > 0
            await client.audio_after(end)
            await client.quiet(400)
            assert rms(client.pcm(after=end)) > 0.05
            assert fake.state.llm_requests[0]["messages"][0] == {"role": "system", "content": "You are Ada."}

            # bad input is reported and dropped; the session goes on
            mark = time.monotonic()
            await client.ws.send(b"\x01\x02\x03")
            bad = await client.event("error", code="bad_audio", after=mark)
            assert "16-bit little-endian mono PCM at 16000 Hz" in bad["message"]
            floats = (0.3 * np.sin(2 * np.pi * 300 * np.arange(320) / 16000)).astype("<f4").tobytes()
            await client.ws.send(floats)
            [bad] = await client.until(lambda: [e for e in client.of("error") if "float32" in e["message"]])
            assert bad["code"] == "bad_audio" and "send 16-bit integer PCM" in bad["message"]
            await client.ws.send("{not json")
            await client.event("error", code="bad_message", after=mark)
            await client.ws.send(json.dumps({"type": "dance"}))
            await client.until(lambda: len([e for e in client.of("error") if e["code"] == "bad_message"]) == 2)
            assert client.closed is None

            # end: the server says end and closes 1000; the session is gone
            await client.ws.send(json.dumps({"type": "end"}))
            await client.event("end")
            assert await client.closed_with() == (1000, "session ended")
            assert (await http.get(f"{url}/sessions/{sid}")).status_code == 404
            metrics = (await http.get(f"{url}/metrics")).text
            assert 'voxray_calls_ended_total{carrier="browser",reason="ended_by_client"} 1.0' in metrics
            assert 'voxray_active_calls{carrier="browser"} 0.0' in metrics


async def test_48k_client_is_resampled_for_stt() -> None:
    async with FakeOpenAI(transcripts=[TRANSCRIPT], replies=[REPLY], tts_ms_per_char=10) as fake:
        async with running_gateway(config(fake)) as url:
            client = await open_session(url, rate=48000, persona="default")
            ready = await client.event("ready")
            assert ready["sample_rate"] == 16000 and ready["input_sample_rate"] == 48000
            await client.quiet(300)
            await client.speak(ms=1000)
            await client.event("transcript", role="user")
            [stt] = fake.state.stt_requests
            # the tone, plus at most the pre-roll (300 ms) and the VAD's stop window of silence
            assert stt["sample_rate"] == 16000 and 1000 <= stt["duration_ms"] <= 1000 + 300 + 600
            assert stt["rms"] > 0.1
            await client.ws.close()


async def test_interrupt_stops_the_audio() -> None:
    async with FakeOpenAI(transcripts=[TRANSCRIPT], replies=[LONG_REPLY], tts_ms_per_char=30) as fake:
        async with running_gateway(config(fake, max_utterance_secs=30)) as url:
            client = await open_session(url)
            await client.event("ready")
            await client.quiet(300)
            end = await client.speak(ms=600)
            await client.audio_after(end)
            await asyncio.sleep(1.0)          # part of the long answer has played
            assert time.monotonic() - client.audio[-1][0] < 0.2   # still talking
            mark = time.monotonic()
            await client.ws.send(json.dumps({"type": "interrupt"}))
            interrupted = await client.event("interrupted", after=mark, timeout=1)
            assert interrupted["heard"] and interrupted["heard"] != LONG_REPLY
            await asyncio.sleep(0.3)          # frames already in flight
            count = len(client.audio)
            await asyncio.sleep(0.8)
            assert len(client.audio) == count
            await client.event("bot_speaking", state="stopped", after=mark)
            await client.ws.close()


async def test_api_key_is_required_when_set() -> None:
    async with FakeOpenAI() as fake:
        async with running_gateway(config(fake, server_api_key=KEY)) as url:
            start = json.dumps({"type": "start"})
            refused: tuple[dict[str, Any], ...] = (
                {}, {"additional_headers": {"Authorization": "Bearer nope"}}, {"subprotocols": ["bearer.x"]})
            for kwargs in refused:
                async with websockets.connect(ws_url(url), **kwargs) as ws:
                    client = Client(ws)
                    assert await client.closed_with() == (1008, "missing or wrong API key")
            async with websockets.connect(ws_url(url) + "?token=wrong") as ws:
                assert await Client(ws).closed_with() == (1008, "missing or wrong API key")
            for target, kwargs in ((ws_url(url) + f"?token={KEY}", {}),
                                   (ws_url(url), {"additional_headers": {"Authorization": f"Bearer {KEY}"}}),
                                   (ws_url(url), {"subprotocols": ["voxray", f"bearer.{KEY}"]})):
                async with websockets.connect(target, **kwargs) as ws:
                    if "subprotocols" in kwargs:
                        assert ws.subprotocol == "voxray"     # the key is never echoed back
                    await ws.send(start)
                    client = Client(ws)
                    await client.event("ready")
                    await ws.send(json.dumps({"type": "end"}))
                    assert await client.closed_with() == (1000, "session ended")


async def test_bad_start_is_refused() -> None:
    async with FakeOpenAI() as fake:
        async with running_gateway(config(fake)) as url:
            for first in (json.dumps({"type": "interrupt"}), "nope", b"\x00\x00",
                          json.dumps({"type": "start", "sample_rate": 11025}),
                          json.dumps({"type": "start", "context": {"messages": [{"role": "x"}]}}),
                          json.dumps({"type": "start", "persona": "nobody"})):
                async with websockets.connect(ws_url(url)) as ws:
                    await ws.send(first)
                    client = Client(ws)
                    error = await client.event("error")
                    assert error["code"] == "bad_start" and error["message"]
                    assert await client.closed_with() == (1008, "bad start message")
            error = [e for e in client.of("error")][0]
            assert "unknown persona" in error["message"]


async def test_delete_session_ends_it() -> None:
    async with FakeOpenAI() as fake:
        async with running_gateway(config(fake)) as url, httpx.AsyncClient() as http:
            client = await open_session(url)
            sid = (await client.event("ready"))["session_id"]
            response = await http.delete(f"{url}/sessions/{sid}")
            assert response.status_code == 200 and response.json() == {"ended": sid}
            assert (await client.event("end"))["reason"] == "ended_by_api"
            assert await client.closed_with() == (1000, "session ended")
            assert (await http.get(f"{url}/sessions/{sid}")).status_code == 404


async def test_no_ws_route_for_smallwebrtc_transport() -> None:
    async with FakeOpenAI() as fake:
        async with running_gateway(config(fake, transport="smallwebrtc")) as url:
            with pytest.raises(websockets.InvalidStatus) as refused:
                await websockets.connect(ws_url(url))
            assert refused.value.response.status_code in (403, 404)


async def test_parse_start_and_float32_detection() -> None:
    start = parse_start(json.dumps({"type": "start"}))
    assert (start.sample_rate, start.messages, start.persona, start.number) == (16000, [], "", "")
    assert parse_start(json.dumps({"type": "start", "sample_rate": 48000, "number": "+14155550100"})).number
    for bad in ('{"type": "start", "sample_rate": true}', '{"type": "start", "context": []}', "[]"):
        with pytest.raises(ValueError):
            parse_start(bad)
    t = np.arange(320) / 16000
    floats = (0.5 * np.sin(2 * np.pi * 440 * t)).astype("<f4").tobytes()
    assert looks_like_float32(floats)
    assert not looks_like_float32(tone(20, 16000))                 # loud int16
    assert not looks_like_float32(tone(20, 16000, amplitude=0.001))  # quiet int16
    assert not looks_like_float32(b"\x00" * 640)
    noise = (np.random.default_rng(1).normal(0, 3000, 320)).astype("<i2").tobytes()
    assert not looks_like_float32(noise)


async def test_oversized_frame_closes_1009() -> None:
    async with FakeOpenAI() as fake:
        async with running_gateway(config(fake, ws_max_message_bytes=4096)) as url, httpx.AsyncClient() as http:
            client = await open_session(url)
            sid = (await client.event("ready"))["session_id"]
            await client.ws.send(tone(20, 16000))          # 640 bytes: fine
            await client.ws.send(b"\x00\x00" * 4096)        # 8192 bytes: too big
            code, _ = await client.closed_with()
            assert code == 1009
            async with asyncio.timeout(5):
                while (await http.get(f"{url}/sessions/{sid}")).status_code != 404:
                    await asyncio.sleep(0.05)
            metrics = (await http.get(f"{url}/metrics")).text
            assert 'voxray_calls_ended_total{carrier="browser",reason="message_too_big"} 1.0' in metrics


# ------------------------------------------------------------------------------ phone codec, Origin, bad-message limit
async def test_phone_codec_is_mulaw_8k_both_ways() -> None:
    from pipeline.audio import ulaw_decode, ulaw_encode

    async with FakeOpenAI(transcripts=[TRANSCRIPT], replies=[REPLY], tts_ms_per_char=15) as fake:
        async with running_gateway(config(fake)) as url, httpx.AsyncClient() as http:
            client = await open_session(url, rate=8000, codec="pcmu")
            ready = await client.event("ready")
            assert (ready["codec"], ready["sample_rate"], ready["input_sample_rate"]) == ("pcmu", 8000, 8000)
            sid = ready["session_id"]
            assert (await http.get(f"{url}/sessions/{sid}")).json()["parameters"]["codec"] == "pcmu"

            # the greeting: one µ-law byte per sample at 8 kHz, in messages of up to outbound_message_ms (60 ms,
            # 480 bytes) of whole 20 ms (160-byte) frames
            greeting = await client.event("transcript", role="assistant")
            await client.quiet(400)
            sizes = [len(chunk) for _, chunk in client.audio]
            assert max(sizes) == 480 and all(size % 160 == 0 for size in sizes[:-1]), sizes
            ulaw = client.pcm()
            assert abs(len(ulaw) / 8000 - len(greeting["text"]) * 0.015) < 0.15
            assert rms(ulaw_decode(ulaw)) > 0.05

            # µ-law speech in; the STT gets it as 8 kHz PCM (its own rate) of the same loudness
            pcm = tone(1000, 8000) + b"\x00\x00" * (8000 * 700 // 1000)
            mark = time.monotonic()
            for i, offset in enumerate(range(0, len(pcm), 320)):
                await client.ws.send(ulaw_encode(pcm[offset:offset + 320]))
                await asyncio.sleep(max(0.0, mark + (i + 1) * 0.02 - time.monotonic()))
            assert (await client.event("transcript", role="user", after=mark))["text"] == TRANSCRIPT
            await client.event("transcript", role="assistant", text=REPLY, after=mark)
            [stt] = fake.state.stt_requests
            assert stt["sample_rate"] == 8000 and stt["rms"] > 0.1 and 1000 <= stt["duration_ms"] <= 1900
            await client.audio_after(mark)
            await client.ws.send(json.dumps({"type": "end"}))
            assert await client.closed_with() == (1000, "session ended")

    # the default stays PCM16; pcmu is 8 kHz only; unknown codecs are refused
    assert parse_start(json.dumps({"type": "start"})).codec == "pcm16"
    assert parse_start(json.dumps({"type": "start", "codec": "pcmu"})).sample_rate == 8000
    for bad in ({"codec": "pcmu", "sample_rate": 16000}, {"codec": "opus"}, {"codec": None}):
        with pytest.raises(ValueError, match="codec"):
            parse_start(json.dumps({"type": "start", **bad}))


async def test_cross_origin_websocket_is_refused() -> None:
    from gateway.browser.ws import origin_allowed

    allowed = ("https://app.example.test",)
    own = "https://gw.example.test"                                      # public_url: the softphone page's origin
    assert origin_allowed(None, allowed, own=own) and origin_allowed("https://app.example.test/", allowed, own=own)
    assert origin_allowed("https://GW.example.test", allowed, own=own + "/")
    assert not origin_allowed("https://evil.example.test", allowed, own=own)
    assert not origin_allowed("null", allowed, own=own)
    assert not origin_allowed("http://gw.example.test", allowed, own=own)    # another scheme is another origin
    assert origin_allowed("https://evil.example.test", (), own=own) and origin_allowed("https://x", ("*",))

    async with FakeOpenAI() as fake:
        async with running_gateway(config(fake, cors_allowed_origins=list(allowed))) as url:
            own = url.removeprefix("http://")
            async with websockets.connect(ws_url(url), origin=Origin("https://evil.example.test")) as ws:
                assert await Client(ws).closed_with() == (1008, "origin not allowed")
            # a page whose origin equals the request's Host (DNS rebinding sets both) is no longer trusted
            async with websockets.connect(ws_url(url), origin=Origin(f"http://{own}")) as ws:
                assert await Client(ws).closed_with() == (1008, "origin not allowed")
            for origin in (Origin("https://app.example.test"), Origin(PUBLIC_URL), None):   # listed, public_url's, not a browser
                async with websockets.connect(ws_url(url), origin=origin) as ws:
                    await ws.send(json.dumps({"type": "start"}))
                    client = Client(ws)
                    await client.event("ready")
                    await ws.send(json.dumps({"type": "end"}))
                    assert await client.closed_with() == (1000, "session ended")
        async with running_gateway(config(fake)) as url:                   # no list: any origin
            async with websockets.connect(ws_url(url), origin=Origin("https://evil.example.test")) as ws:
                await ws.send(json.dumps({"type": "start"}))
                client = Client(ws)
                await client.event("ready")
                await ws.close()


async def test_too_many_bad_messages_close_the_session() -> None:
    async with FakeOpenAI() as fake:
        async with running_gateway(config(fake, media_max_bad_messages=3)) as url, httpx.AsyncClient() as http:
            client = await open_session(url)
            sid = (await client.event("ready"))["session_id"]
            for bad in (b"\x01\x02\x03", "{not json", json.dumps({"type": "dance"})):   # 3: tolerated
                await client.ws.send(bad)
            await client.until(lambda: len(client.of("error")) == 3)
            await asyncio.sleep(0.2)
            assert client.closed is None
            await client.ws.send(json.dumps({"type": "start"}))                        # the 4th: too many
            error = await client.event("error", code="too_many_bad_messages")
            assert "more than 3 bad messages" in error["message"]
            assert await client.closed_with() == (1008, "too many bad messages")
            assert not client.of("end")
            async with asyncio.timeout(5):
                while (await http.get(f"{url}/sessions/{sid}")).status_code != 404:
                    await asyncio.sleep(0.05)
            metrics = (await http.get(f"{url}/metrics")).text
            assert 'voxray_calls_ended_total{carrier="browser",reason="too_many_bad_messages"} 1.0' in metrics


async def test_interleaved_stereo_gets_one_error_naming_the_format() -> None:
    speech = np.frombuffer(speech_pcm("I would like to book a table for two tonight.", 16000), "<i2")
    stereo = np.repeat(speech, 2).tobytes()                       # L = R, sent as if it were mono
    async with FakeOpenAI() as fake:
        async with running_gateway(config(fake)) as url:
            client = await open_session(url)
            await client.event("ready")
            mono = await open_session(url)
            await mono.event("ready")
            for pcm, who in ((stereo, client), (speech.tobytes(), mono)):
                for offset in range(0, 2 * 16000 * 2, 640):             # two seconds of 20 ms frames
                    await who.ws.send(pcm[offset:offset + 640])
            error = await client.event("error", code="bad_audio")
            assert "interleaved stereo" in error["message"] and "mono PCM at 16000 Hz" in error["message"]
            await asyncio.sleep(0.3)
            assert mono.of("error") == []                                # real mono speech: no false alarm
            assert client.closed is None and len(client.of("error")) == 1
            for who in (client, mono):
                await who.ws.close()
