"""WebRTC transport: a real gateway (fake OpenAI providers) and a real aiortc client peer on loopback.

The client plays a browser: a microphone track sending real speech (Piper) or a tone at 48 kHz in real
time, an ``events`` data channel, and a reader of the agent's audio. aioice never gathers 127.0.0.1,
so these tests (only) point its host-address discovery at loopback; no STUN server is used.

Pure tests of the signaling pieces come first; they need no peer. The frame conversions and the outbound
track (:mod:`gateway.browser.webrtc_audio`) are tested in ``test_webrtc_audio.py``."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import aioice.ice
import av
import httpx
import numpy as np
import pytest
import pytest_asyncio
from aiortc import MediaStreamTrack, RTCConfiguration, RTCPeerConnection, RTCRtpSender, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError

from gateway.browser.webrtc import OfferRefused, ice_configuration, parse_offer
from gateway.browser.webrtc_audio import frame_to_pcm, pcm_to_frame
from pipeline.audio import rms
from tests.conftest import phone_config, running_gateway
from tests.fakes.openai_server import FakeOpenAI
from tests.speech import speech_pcm

T = TypeVar("T")

TRANSCRIPT = "I would like to book a table"
REPLY = "Sure. For what time?"
LONG_REPLY = ("Let me tell you about tonight's menu. We have fresh pasta with basil. We have a wood fired pizza. "
              "We have a green salad with lemon. We have grilled fish with herbs. We have a chocolate cake.")
KEY = "webrtc-test-key"
MIC_RATE = 48000


# ------------------------------------------------------------------------------------------ pure: signaling
def test_ice_servers_from_config() -> None:
    config = ice_configuration([{"urls": "stun:stun.example.com:3478"},
                                {"urls": ["turn:turn.example.com:3478?transport=udp"], "username": "u",
                                 "credential": "p"}])
    stun, turn = config.iceServers or []
    assert stun.urls == "stun:stun.example.com:3478" and stun.username is None
    assert turn.urls == ["turn:turn.example.com:3478?transport=udp"]
    assert (turn.username, turn.credential) == ("u", "p")
    assert ice_configuration([]).iceServers == []     # never aiortc's implicit public STUN server


@pytest.mark.parametrize(("body", "status", "text"), [
    ([], 400, "JSON object"),
    ({"type": "offer"}, 400, 'missing "sdp"'),
    ({"sdp": "   ", "type": "offer"}, 400, 'missing "sdp"'),
    ({"sdp": "v=0", "type": "answer"}, 400, '"type" must be "offer"'),
    ({"sdp": "v=0"}, 400, '"type" must be "offer"'),
    ({"sdp": "v" * 101, "type": "offer"}, 413, "webrtc_max_sdp_bytes=100"),
    ({"sdp": "v=0", "type": "offer", "codec": "g729"}, 400, '"codec" must be "opus" or "pcmu"'),
])
def test_offer_body_validation(body: Any, status: int, text: str) -> None:
    with pytest.raises(OfferRefused) as refused:
        parse_offer(body, max_sdp_bytes=100)
    assert refused.value.status == status and text in str(refused.value)


# ------------------------------------------------------------------------------------------ the client peer
@pytest.fixture(autouse=True)
def loopback_ice(monkeypatch: pytest.MonkeyPatch) -> None:
    """aioice skips 127.0.0.1 when gathering host candidates: keep test traffic on loopback."""
    monkeypatch.setattr(aioice.ice, "get_host_addresses", lambda use_ipv4, use_ipv6: ["127.0.0.1"])


class Mic(MediaStreamTrack):
    """A microphone: queued PCM (48 kHz mono) in 20 ms frames paced in real time, silence otherwise.
    ``dead=True`` never yields a frame (a peer that sends no audio)."""

    kind = "audio"

    def __init__(self, *, dead: bool = False) -> None:
        super().__init__()
        self.dead = dead
        self._buffer = bytearray()
        self._sent = 0
        self._start: float | None = None
        self._drained = asyncio.Event()

    async def recv(self) -> av.AudioFrame:
        if self.dead:
            await asyncio.Event().wait()
        if self._start is None:
            self._start = time.monotonic()
        due = self._start + self._sent * 0.02
        if due > time.monotonic():
            await asyncio.sleep(due - time.monotonic())
        size = MIC_RATE // 50 * 2
        chunk = bytes(self._buffer[:size])
        del self._buffer[:size]
        if not self._buffer:
            self._drained.set()
        frame = pcm_to_frame(chunk + bytes(size - len(chunk)), MIC_RATE, self._sent * (MIC_RATE // 50))
        self._sent += 1
        return frame

    async def say(self, pcm: bytes) -> float:
        """Play ``pcm`` (then silence); returns when it has been sent."""
        self._drained.clear()
        self._buffer += pcm
        await asyncio.wait_for(self._drained.wait(), len(pcm) / 2 / MIC_RATE + 5)
        return time.monotonic()


def tone(seconds: float = 1.0, rate: int = MIC_RATE, hz: float = 300.0) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    return (0.3 * 32767 * np.sin(2 * np.pi * hz * t)).astype("<i2").tobytes()


class Browser:
    """A browser stand-in: an aiortc peer with a microphone, an ``events`` data channel (events are
    collected with arrival times) and a reader of the agent's audio (decoded, downmixed frames)."""

    def __init__(self, *, codec: str | None = None, mic: Mic | None = None, channel: str | None = "events") -> None:
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.mic = mic or Mic()
        transceiver = self.pc.addTransceiver(self.mic, direction="sendrecv")
        if codec:     # the softphone's "phone codec" mode: prefer G.711 µ-law
            transceiver.setCodecPreferences([c for c in RTCRtpSender.getCapabilities("audio").codecs
                                             if c.mimeType == f"audio/{codec}"])
        self.channel = self.pc.createDataChannel(channel) if channel else None
        self.events: list[tuple[float, dict[str, Any]]] = []
        self.audio: list[tuple[float, bytes, int]] = []
        self._changed = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        if self.channel is not None:
            self.channel.on("message", self._on_message)
        self.pc.on("track", self._on_track)

    def _on_message(self, message: str | bytes) -> None:
        self.events.append((time.monotonic(), json.loads(message)))
        self._changed.set()

    def _on_track(self, track: MediaStreamTrack) -> None:
        self._tasks.append(asyncio.create_task(self._read(track)))

    async def _read(self, track: MediaStreamTrack) -> None:
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                return
            assert isinstance(frame, av.AudioFrame)
            self.audio.append((time.monotonic(), frame_to_pcm(frame), frame.sample_rate))
            self._changed.set()

    async def offer(self) -> str:
        await self.pc.setLocalDescription(await self.pc.createOffer())
        return self.pc.localDescription.sdp

    async def connect(self, http: httpx.AsyncClient, url: str, **body: Any) -> dict[str, Any]:
        """POST the offer to ``url`` (with ``body``'s extra fields) and apply the answer."""
        response = await http.post(url, json={"sdp": await self.offer(), "type": "offer", **body})
        assert response.status_code == 200, response.text
        answer: dict[str, Any] = response.json()
        await self.pc.setRemoteDescription(RTCSessionDescription(sdp=answer["sdp"], type=answer["type"]))
        return answer

    def send(self, message: dict[str, Any]) -> None:
        assert self.channel is not None
        self.channel.send(json.dumps(message))

    async def until(self, predicate: Callable[[], T | None], timeout: float = 5.0) -> T:
        async with asyncio.timeout(timeout):
            while not (found := predicate()):
                self._changed.clear()
                await self._changed.wait()
            return found

    async def event(self, type_: str, after: float = 0.0, timeout: float = 5.0, **fields: Any) -> dict[str, Any]:
        return await self.until(lambda: next((e for t, e in self.events if t >= after and e.get("type") == type_
                                              and all(e.get(k) == v for k, v in fields.items())), None), timeout)

    def pcm(self, after: float = 0.0, before: float = float("inf")) -> bytes:
        return b"".join(p for t, p, _ in self.audio if after <= t < before)

    async def loud_audio_after(self, after: float, timeout: float = 5.0) -> float:
        """When the first clearly audible frame arrived after ``after``."""
        return await self.until(lambda: next((t for t, p, _ in self.audio if t >= after and rms(p) > 0.05), None),
                                timeout)

    async def quiet(self, ms: float = 300, timeout: float = 10.0) -> float:
        """Wait until the agent's audio has been silent for ``ms``; returns the time."""
        async with asyncio.timeout(timeout):
            while True:
                now = time.monotonic()
                recent = [p for t, p, _ in self.audio if t >= now - ms / 1000]
                if self.audio and now - self.audio[0][0] > ms / 1000 and recent and rms(b"".join(recent)) < 0.01:
                    return now
                await asyncio.sleep(0.05)

    async def close(self) -> None:
        await self.pc.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


class browser:  # noqa: N801 - used as ``async with browser(...) as b``
    """A :class:`Browser` that is always closed (the suite turns a leaked peer's warnings into errors)."""

    def __init__(self, **kwargs: Any) -> None:
        self._kwargs = kwargs

    async def __aenter__(self) -> Browser:
        self._browser = Browser(**self._kwargs)
        return self._browser

    async def __aexit__(self, *_exc: object) -> None:
        await self._browser.close()


def config(fake: FakeOpenAI, **overrides: Any) -> Any:
    return phone_config(fake.base_url, "http://127.0.0.1:9", **overrides)


async def gone(http: httpx.AsyncClient, url: str, session_id: str, timeout: float = 5.0, **kw: Any) -> None:
    async with asyncio.timeout(timeout):
        while (await http.get(f"{url}/sessions/{session_id}", **kw)).status_code != 404:
            await asyncio.sleep(0.05)


@pytest_asyncio.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=10) as client:
        yield client


# ------------------------------------------------------------------------------------------ end to end
@pytest.mark.asyncio
async def test_conversation_over_webrtc_then_delete(http: httpx.AsyncClient, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    speech = speech_pcm("I would like to book a table for two please.", MIC_RATE)
    async with FakeOpenAI(transcripts=[TRANSCRIPT], replies=[REPLY], tts_ms_per_char=15) as fake:
        async with running_gateway(config(fake)) as url, browser() as b:
            answer = await b.connect(http, f"{url}/webrtc/offer",
                                     context={"messages": [{"role": "system", "content": "You are Ada."}]})
            assert answer["type"] == "answer" and answer["codec"] == "opus" and answer["persona"] == "context"
            sid = answer["session_id"]
            ready = await b.event("ready")
            assert ready == {"type": "ready", "session_id": sid, "persona": "context", "codec": "opus",
                             "sample_rate": 16000}
            session = (await http.get(f"{url}/sessions/{sid}")).json()
            assert session["carrier"] == "browser" and session["state"] == "active" and session["live"] is True

            # the greeting, then the agent's audio is paced in real time: ~50 frames a second, silence included
            greeting = await b.event("transcript", role="assistant")
            assert greeting["text"] and greeting["final"] is True
            await b.event("bot_speaking", state="started")
            window_start = time.monotonic()
            await asyncio.sleep(2.0)
            window = [p for t, p, rate in b.audio if window_start <= t < window_start + 2.0]
            received_s = sum(len(p) / 2 for p in window) / 48000
            assert 0.85 <= received_s / 2.0 <= 1.15, received_s
            await b.quiet()

            # real speech through Opus: the user's turn, the answer, its audio
            end = await b.mic.say(speech)
            user = await b.event("transcript", role="user", after=end - 3, timeout=8)
            assert user["text"] == TRANSCRIPT
            await b.event("transcript", role="assistant", text=REPLY, timeout=8)
            latency = await b.event("turn_latency")
            assert latency["first_audio_out_ms"] > 0
            first_loud = await b.loud_audio_after(end - 3)
            await b.quiet()
            assert rms(b.pcm(after=first_loud)) > 0.03
            stt = fake.state.stt_requests[0]
            assert stt["sample_rate"] == 16000 and stt["duration_ms"] >= 1500 and stt["rms"] > 0.02
            assert fake.state.llm_requests[0]["messages"][0] == {"role": "system", "content": "You are Ada."}

            # bad control messages are answered on the channel; the session goes on
            b.send({"type": "dance"})
            bad = await b.event("error", code="bad_message")
            assert "unknown message type 'dance'" in bad["message"]

            # DELETE ends it: the channel says end, the session is gone, metrics carry "webrtc"
            deleted = await http.delete(f"{url}/sessions/{sid}")
            assert deleted.status_code == 200
            assert (await b.event("end"))["reason"] == "ended_by_api"
            assert (await http.get(f"{url}/sessions/{sid}")).status_code == 404
            metrics = (await http.get(f"{url}/metrics")).text
            assert 'voxray_calls_started_total{carrier="webrtc"} 1.0' in metrics
            assert 'voxray_calls_ended_total{carrier="webrtc",reason="ended_by_api"} 1.0' in metrics
            assert 'voxray_active_calls{carrier="webrtc"} 0.0' in metrics
    # the session id is the WebRTC session's credential: no line of ours (at debug) carries it whole
    ours = [r for r in caplog.records if r.name.split(".")[0] in ("gateway", "pipeline", "carriers", "aiortc", "aioice")]
    leaked = [r.getMessage() for r in ours if sid in r.getMessage()]
    assert leaked == [] and any(r.name.startswith("gateway.browser.webrtc") for r in caplog.records)


@pytest.mark.asyncio
async def test_interrupt_over_the_data_channel_stops_the_audio(http: httpx.AsyncClient) -> None:
    async with FakeOpenAI(transcripts=[TRANSCRIPT], replies=[LONG_REPLY], tts_ms_per_char=30) as fake:
        async with running_gateway(config(fake)) as url, browser() as b:
            await b.connect(http, f"{url}/webrtc/offer")
            await b.event("ready")
            await b.event("transcript", role="assistant")
            await b.quiet()
            end = await b.mic.say(tone(0.6))
            await b.loud_audio_after(end, timeout=8)
            await asyncio.sleep(1.0)                    # part of the long answer has played
            assert rms(b.pcm(after=time.monotonic() - 0.2)) > 0.05
            mark = time.monotonic()
            b.send({"type": "interrupt"})
            interrupted = await b.event("interrupted", after=mark, timeout=2)
            assert interrupted["heard"] and interrupted["heard"] != LONG_REPLY
            await b.event("bot_speaking", state="stopped", after=mark)
            await asyncio.sleep(0.4)                    # frames already in flight and the jitter buffer
            later = time.monotonic()
            await asyncio.sleep(0.8)
            after = b.pcm(after=later)
            assert len(after) / 2 / 48000 > 0.6       # frames keep coming (silence), in real time
            assert rms(after) < 0.01
            b.send({"type": "end"})
            assert (await b.event("end"))["reason"] == "ended_by_client"


@pytest.mark.asyncio
async def test_start_json_then_offer_claims_the_session_once(http: httpx.AsyncClient) -> None:
    async with FakeOpenAI(transcripts=[TRANSCRIPT], replies=[REPLY], tts_ms_per_char=10) as fake:
        async with running_gateway(config(fake, server_api_key=KEY)) as url:
            auth = {"Authorization": f"Bearer {KEY}"}
            context = {"messages": [{"role": "user", "content": "I called earlier about a booking."}]}
            assert (await http.post(f"{url}/start", json={"context": context})).status_code == 401
            assert (await http.post(f"{url}/start", json={"context": context},
                                    headers={"Authorization": "Bearer wrong"})).status_code == 401
            started = await http.post(f"{url}/start", json={"context": context, "number": "+14155550100"},
                                      headers=auth)
            assert started.status_code == 200, started.text
            body = started.json()
            sid = body["session_id"]
            assert body["persona"] == "default" and body["offer_url"] == f"/sessions/{sid}/offer"
            session = (await http.get(f"{url}/sessions/{sid}", headers=auth)).json()
            assert (session["carrier"], session["state"], session["to"]) == ("browser", "pending", "+14155550100")
            assert session["context"][0]["role"] == "system"          # the persona's, inserted
            assert session["context"][1] == context["messages"][0]

            async with browser() as b:
                offer = {"sdp": await b.offer(), "type": "offer"}
                assert (await http.post(f"{url}/sessions/{sid}/offer", json=offer)).status_code == 401
                answer = await b.connect(http, f"{url}/sessions/{sid}/offer?token={KEY}")
                assert answer["session_id"] == sid
                assert (await b.event("ready"))["session_id"] == sid
                async with browser() as second:     # the session is claimed: a second offer is refused
                    again = await http.post(f"{url}/sessions/{sid}/offer", headers=auth,
                                            json={"sdp": await second.offer(), "type": "offer"})
                    assert again.status_code == 404 and again.json()["error"] == "unknown, used or expired session"
                    unknown = await http.post(f"{url}/sessions/nope/offer", headers=auth,
                                              json={"sdp": await second.offer(), "type": "offer"})
                    assert unknown.status_code == 404
                await b.event("transcript", role="assistant")
                await b.quiet()               # the greeting played out: a tone over it is no speech (Silero)
                end = await b.mic.say(tone(0.8))
                await b.event("transcript", role="user", after=end - 1, timeout=8)
                await b.event("transcript", role="assistant", text=REPLY, timeout=8)
                messages = fake.state.llm_requests[0]["messages"]
                assert messages[0]["role"] == "system" and messages[1] == context["messages"][0]
                # the browser hangs up: the server notices and ends the session
                await b.pc.close()
                await gone(http, url, sid, headers=auth)
            metrics = (await http.get(f"{url}/metrics")).text
            assert ('voxray_calls_ended_total{carrier="webrtc",reason="peer_closed"} 1.0' in metrics
                    or 'voxray_calls_ended_total{carrier="webrtc",reason="client_disconnected"} 1.0' in metrics)


@pytest.mark.asyncio
async def test_start_json_validation_and_carrier_webhooks_still_reach_the_carrier(http: httpx.AsyncClient) -> None:
    async with FakeOpenAI() as fake:
        async with running_gateway(config(fake)) as url:
            for body, text in (({"context": {"messages": [{"role": "robot"}]}}, "context must be"),
                               ({"persona": "nobody"}, "unknown persona 'nobody'"),
                               ({"persona": 7}, "persona and number must be strings")):
                refused = await http.post(f"{url}/start", json=body)
                assert refused.status_code == 400 and text in refused.json()["error"], refused.text
            assert (await http.post(f"{url}/start", json={})).status_code == 200   # all defaults
            # a carrier's JSON webhook (no browser keys) and a form webhook still go to the carrier: unsigned -> 403
            assert (await http.post(f"{url}/start", json={"CallSid": "CA1", "From": "+1"})).status_code == 403
            assert (await http.post(f"{url}/start", data={"CallSid": "CA1"})).status_code == 403
            assert (await http.post(f"{url}/start/twilio", json={"persona": "x"})).status_code == 403


@pytest.mark.asyncio
async def test_phone_codec_pcmu(http: httpx.AsyncClient) -> None:
    async with FakeOpenAI(transcripts=[TRANSCRIPT], replies=[REPLY], tts_ms_per_char=10) as fake:
        async with running_gateway(config(fake)) as url:
            # the browser prefers PCMU (the softphone's "phone codec" toggle)
            async with browser(codec="PCMU") as b:
                answer = await b.connect(http, f"{url}/webrtc/offer")
                assert answer["codec"] == "pcmu" and "PCMU/8000" in answer["sdp"] and "opus" not in answer["sdp"]
                ready = await b.event("ready")
                assert (ready["codec"], ready["sample_rate"]) == ("pcmu", 8000)
                await b.event("transcript", role="assistant")
                first = await b.loud_audio_after(0)
                assert {rate for t, _, rate in b.audio} == {8000}
                await b.quiet()
                assert rms(b.pcm(after=first)) > 0.05
                end = await b.mic.say(tone(0.8))
                assert (await b.event("transcript", role="user", after=end - 1, timeout=8))["text"] == TRANSCRIPT
                assert fake.state.stt_requests[0]["sample_rate"] == 8000      # PCMU's own rate, not upsampled
                b.send({"type": "end"})
                await b.event("end")
            # an Opus-first offer, with the server asked for the phone codec
            async with browser() as b:
                answer = await b.connect(http, f"{url}/webrtc/offer", codec="pcmu")
                assert answer["codec"] == "pcmu"
                await b.event("ready", codec="pcmu")
                await b.loud_audio_after(0)
                assert {rate for t, _, rate in b.audio} == {8000}
                b.send({"type": "end"})
                await b.event("end")


@pytest.mark.asyncio
async def test_connect_and_idle_timeouts(http: httpx.AsyncClient) -> None:
    async with FakeOpenAI() as fake:
        cfg = config(fake, webrtc_connect_timeout_secs=1, webrtc_idle_timeout_secs=1)
        async with running_gateway(cfg) as url:
            # a client that never applies the answer: ICE never completes
            async with browser() as b:
                response = await http.post(f"{url}/webrtc/offer", json={"sdp": await b.offer(), "type": "offer"})
                sid = response.json()["session_id"]
                started = time.monotonic()
                await gone(http, url, sid, timeout=5)
                assert 0.9 <= time.monotonic() - started <= 3.0
            # a connected client that sends no audio
            async with browser(mic=Mic(dead=True)) as b:
                answer = await b.connect(http, f"{url}/webrtc/offer")
                await b.event("ready")
                assert (await b.event("end", timeout=5))["reason"] == "idle_timeout"
                await gone(http, url, answer["session_id"])
            metrics = (await http.get(f"{url}/metrics")).text
            assert 'voxray_calls_ended_total{carrier="webrtc",reason="connect_timeout"} 1.0' in metrics
            assert 'voxray_calls_ended_total{carrier="webrtc",reason="idle_timeout"} 1.0' in metrics
            assert 'voxray_active_calls{carrier="webrtc"} 0.0' in metrics


def _strip_ice(sdp: str) -> str:
    return "".join(line + "\r\n" for line in sdp.splitlines() if not line.startswith(("a=ice-ufrag", "a=ice-pwd")))


def _only_codec(sdp: str, payload: str, rtpmap: str) -> str:
    """The offer with its audio m-line offering just ``payload`` (``rtpmap`` e.g. "G729/8000")."""
    out = []
    for line in sdp.splitlines():
        if line.startswith("m=audio"):
            line = " ".join(line.split()[:3] + [payload])
        elif line.startswith(("a=rtpmap:", "a=fmtp:", "a=rtcp-fb:")):
            continue
        out.append(line)
        if line.startswith("m=audio"):
            out.append(f"a=rtpmap:{payload} {rtpmap}")
    return "\r\n".join(out) + "\r\n"


@pytest.mark.asyncio
async def test_bad_offers_are_refused_and_a_live_session_keeps_working(http: httpx.AsyncClient) -> None:
    async with FakeOpenAI(transcripts=[TRANSCRIPT], replies=[REPLY], tts_ms_per_char=10) as fake:
        async with running_gateway(config(fake, server_api_key=KEY, webrtc_max_sdp_bytes=4096)) as url:
            async with browser() as live, browser() as other:
                await live.connect(http, f"{url}/webrtc/offer?token={KEY}")
                await live.event("ready")
                sdp = await other.offer()
                offer_url = f"{url}/webrtc/offer"
                auth = {"Authorization": f"Bearer {KEY}"}

                async def post(body: Any = None, headers: dict[str, str] | None = None, **kw: Any) -> httpx.Response:
                    if body is not None:
                        kw["json"] = body
                    return await http.post(offer_url, headers=headers if headers is not None else auth, **kw)

                cases: list[tuple[httpx.Response, int, str]] = [
                    (await post({"sdp": sdp, "type": "offer"}, headers={}), 401, "missing or wrong API key"),
                    (await post({"sdp": sdp, "type": "offer"}, headers={"Authorization": "Bearer nope"}), 401,
                     "missing or wrong API key"),
                    (await post(content=b"not json", headers={**auth, "Content-Type": "application/json"}), 400,
                     "not valid JSON"),
                    (await post(content=sdp.encode(), headers={**auth, "Content-Type": "application/sdp"}), 415,
                     "Content-Type must be application/json"),
                    (await post({"type": "offer"}), 400, 'missing "sdp"'),
                    (await post({"sdp": sdp, "type": "answer"}), 400, '"type" must be "offer"'),
                    (await post({"sdp": sdp + "a=x-pad:" + "x" * 4096 + "\r\n", "type": "offer"}), 413,
                     "webrtc_max_sdp_bytes=4096"),
                    (await post({"sdp": "this is not SDP", "type": "offer"}), 400, "no audio m-line"),
                    (await post({"sdp": sdp.replace("m=audio", "m=video"), "type": "offer"}), 400, "no audio m-line"),
                    (await post({"sdp": _strip_ice(sdp), "type": "offer"}), 400,
                     "ICE username fragment or password is missing"),
                    (await post({"sdp": _only_codec(sdp, "18", "G729/8000"), "type": "offer"}), 400,
                     "no audio codec in common"),
                    (await post({"sdp": _only_codec(sdp, "111", "opus/48000/2"), "type": "offer", "codec": "pcmu"}),
                     400, "the offer has no pcmu audio codec"),
                    (await post({"sdp": sdp, "type": "offer", "persona": "nobody"}), 400, "unknown persona"),
                    (await post({"sdp": sdp, "type": "offer", "context": "hi"}), 400, "context must be"),
                ]
                for response, status, text in cases:
                    assert response.status_code == status and text in response.json()["error"], (
                        status, response.status_code, response.text)
                metrics = (await http.get(f"{url}/metrics")).text
                assert 'voxray_calls_started_total{carrier="webrtc"} 1.0' in metrics   # only the live session

                # the live session never noticed
                await live.event("transcript", role="assistant")
                end = await live.mic.say(tone(0.8))
                assert (await live.event("transcript", role="user", after=end - 1, timeout=8))["text"] == TRANSCRIPT
                live.send({"type": "end"})
                assert (await live.event("end"))["reason"] == "ended_by_client"


@pytest.mark.asyncio
async def test_events_before_the_channel_opens_are_queued(http: httpx.AsyncClient) -> None:
    async with FakeOpenAI(tts_ms_per_char=5) as fake:
        async with running_gateway(config(fake)) as url:
            async with browser() as b:
                answer = await b.connect(http, f"{url}/webrtc/offer")
                # ready is sent when the session is created, before ICE, DTLS and SCTP are up: it waited
                await b.event("transcript", role="assistant")
                kinds = [e["type"] for _, e in b.events]
                assert kinds[0] == "ready" and "bot_speaking" in kinds, kinds
                await http.delete(f"{url}/sessions/{answer['session_id']}")
                await b.event("end")
            async with browser(channel=None) as b:          # no data channel at all: audio still flows
                answer = await b.connect(http, f"{url}/webrtc/offer")
                await b.loud_audio_after(0)
                assert not b.events
                assert (await http.delete(f"{url}/sessions/{answer['session_id']}")).status_code == 200


@pytest.mark.asyncio
@pytest.mark.parametrize("transport", ["websocket", "smallwebrtc"])
async def test_transport_setting_mounts_the_routes(transport: str, http: httpx.AsyncClient) -> None:
    async with FakeOpenAI() as fake:
        async with running_gateway(config(fake, transport=transport)) as url:
            offer = await http.post(f"{url}/webrtc/offer", json={"type": "offer"})
            claim = await http.post(f"{url}/sessions/abc/offer", json={"type": "offer"})
            if transport == "websocket":
                assert offer.status_code == 404 and claim.status_code == 404
            else:
                assert offer.status_code == 400 and claim.status_code == 400    # mounted: the body is checked


@pytest.mark.asyncio
async def test_too_many_bad_channel_messages_end_the_session(http: httpx.AsyncClient) -> None:
    async with FakeOpenAI(tts_ms_per_char=5) as fake:
        async with running_gateway(config(fake, media_max_bad_messages=2)) as url, browser() as b:
            answer = await b.connect(http, f"{url}/webrtc/offer")
            await b.event("ready")
            await b.event("transcript", role="assistant")                 # the channel is open
            for kind in ("dance", "sing", "shout"):
                b.send({"type": kind})
            closing = await b.event("error", code="too_many_bad_messages")
            assert "more than 2 bad messages" in closing["message"]
            assert (await b.event("end"))["reason"] == "too_many_bad_messages"
            await gone(http, url, answer["session_id"])
            metrics = (await http.get(f"{url}/metrics")).text
            assert 'voxray_media_messages_rejected_total{carrier="webrtc"} 3.0' in metrics
