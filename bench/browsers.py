"""Browser clients for the load benchmark: ``GET /ws`` (PCM16 over a WebSocket) and WebRTC (an aiortc peer).

Each client stands for one browser tab and has the surface ``bench.load`` uses on a
:class:`gateway.simulate.call.SimulatedCall`: ``open()`` (instead of dial + connect), ``speak(pcm8k)`` (returns when
the last speech frame went out), ``wait_audio(after=...)``, ``hang_up()``, ``close()``, and ``received``
(``media`` = (arrival, samples) of every frame of the agent's audio, ``underruns`` = playback gaps inside an
answer, ``invalid``), ``_play_end`` (the client's real-time playback clock), ``_closed``, ``close_code``,
``close_reason``. The caller's utterance is the phone path's synthetic speech (8 kHz), resampled once to the
browser's rate with the gateway's own resampler (16 kHz for ``/ws``, 48 kHz for the WebRTC microphone).

* ``ws``: ``{"type": "start", "sample_rate": 16000}``, then one 20 ms binary PCM16 frame every 20 ms on an
  absolute schedule (silence outside speech), as a browser's AudioWorklet sends it. The agent's binary PCM
  (16 kHz) is played in real time like the carrier emulator does: ``underruns`` are its playback running dry
  inside an answer. The socket offers permessage-deflate by default, as every browser does
  (``compression=None`` turns it off; uvicorn accepts it when offered).
* ``webrtc``: an ``RTCPeerConnection`` with a paced 48 kHz microphone track and an ``events`` data channel
  created before the offer; ``POST /webrtc/offer``; Opus both ways (aiortc's defaults: 48 kHz stereo,
  96 kb/s). The gateway's outbound track sends 20 ms frames all the time (silence between answers), so the
  agent's audio is the decoded frames louder than ``LOUD_RMS``. Arrival times are those of the RTP packets
  on the client's socket (recorded before aiortc's receive jitter buffer, which holds 4 frames), so the
  client's own jitter buffer is not in the latency; ``jitter_ms`` records what it added. An underrun is a
  silent frame between two loud frames of one answer (the gateway's track ran dry), from RTP timestamps.

``use_loopback_ice()`` makes aioice gather 127.0.0.1 in this (client) process, as the tests do; the gateway
process is not patched and offers its non-loopback host address, which is reachable on the same host.
"""

from __future__ import annotations

import asyncio
import contextlib
import fractions
import json
import time
from collections import deque
from typing import Any

import httpx
import numpy as np

from gateway.simulate.call import Received
from pipeline.audio import Resampler

__all__ = ["LOUD_RMS", "RtcSession", "WsSession", "make_session", "use_loopback_ice"]

FRAME_S = 0.02
ANSWER_GAP_S = 0.2            # silence shorter than this between two frames of audio is a gap inside one answer
LOUD_RMS = 0.01               # a decoded WebRTC frame above this (full scale 1.0) is agent audio, not silence
MIC_RATE = 48000
_speech_cache: dict[tuple[int, int], bytes] = {}


def speech_at(pcm8k: bytes, rate: int) -> bytes:
    """The 8 kHz utterance at ``rate`` (resampled once per rate)."""
    key = (id(pcm8k), rate)
    if key not in _speech_cache:
        _speech_cache[key] = Resampler(8000, rate).process(pcm8k) if rate != 8000 else pcm8k
    return _speech_cache[key]


class _Client:
    """What both browser clients share with SimulatedCall: what arrived, the playback clock, the end."""

    rate = 16000

    def __init__(self, url: str, http: httpx.AsyncClient) -> None:
        self.url = url.rstrip("/")
        self.http = http
        self.received = Received()
        self.close_code: int | None = None
        self.close_reason = ""
        self.session_id = ""
        self.events: dict[str, int] = {}
        self._play_end = 0.0
        self._closed = asyncio.Event()
        self._got_media = asyncio.Event()
        self._tasks: list[asyncio.Task[Any]] = []

    def _event(self, data: Any) -> None:
        kind = data.get("type") if isinstance(data, dict) else None
        self.events[str(kind)] = self.events.get(str(kind), 0) + 1
        if kind == "error":
            self.received.invalid.append(f"error event: {data.get('code')}: {data.get('message')}"[:200])
        elif kind == "ready":
            self.session_id = str(data.get("session_id", ""))

    async def wait_audio(self, *, after: float, timeout: float = 10.0) -> float:
        """The arrival time of the first frame of agent audio at or after ``after``."""
        async with asyncio.timeout(timeout):
            while True:
                media = self.received.media
                if media and media[-1][0] >= after:
                    return next(t for t, _ in media if t >= after)
                if self._closed.is_set():
                    raise ConnectionError(f"closed ({self.close_code} {self.close_reason!r}) while waiting for audio")
                self._got_media.clear()
                await self._got_media.wait()

    async def _cancel_tasks(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


# ---------------------------------------------------------------------------------------------- GET /ws
class WsSession(_Client):
    """A browser on ``GET /ws``: PCM16 at 16 kHz both ways, JSON events."""

    rate = 16000

    def __init__(self, url: str, http: httpx.AsyncClient, *, compression: str | None = "deflate") -> None:
        super().__init__(url, http)
        self.compression = compression
        self._ws: Any = None
        self._frame = self.rate * 20 // 1000 * 2
        self._silence = bytes(self._frame)
        self._outgoing: deque[bytes] = deque()
        self._sent = asyncio.Event()
        self._ready = asyncio.Event()

    async def open(self) -> None:
        import websockets

        ws_url = "ws://" + self.url.split("://", 1)[-1] + "/ws"
        self._ws = await websockets.connect(ws_url, max_size=None, compression=self.compression)
        self._tasks.append(asyncio.create_task(self._receive()))
        await self._ws.send(json.dumps({"type": "start", "sample_rate": self.rate}))
        await asyncio.wait_for(self._ready.wait(), 10)
        self._tasks.append(asyncio.create_task(self._pace()))

    async def _pace(self) -> None:
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while not self._closed.is_set():
            payload = self._outgoing.popleft() if self._outgoing else self._silence
            if not self._outgoing:
                self._sent.set()
            try:
                await self._ws.send(payload)
            except Exception:  # noqa: BLE001 - the socket closed: _receive records how
                return
            next_at += FRAME_S
            delay = next_at - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            else:
                next_at = loop.time()          # fell behind: do not burst

    async def speak(self, pcm8k: bytes) -> float:
        pcm = speech_at(pcm8k, self.rate)
        step = self._frame
        self._sent.clear()
        self._outgoing.extend(pcm[i:i + step].ljust(step, b"\x00") for i in range(0, len(pcm), step))
        await self._sent.wait()
        return time.monotonic()

    async def _receive(self) -> None:
        import websockets

        r = self.received
        try:
            async for message in self._ws:
                now = time.monotonic()
                if isinstance(message, bytes):
                    samples = len(message) // 2
                    r.media.append((now, samples))
                    gap = now - self._play_end
                    if self._play_end and 0 < gap < ANSWER_GAP_S:
                        r.underruns.append(gap)
                    self._play_end = max(self._play_end, now) + samples / self.rate
                    self._got_media.set()
                else:
                    data = json.loads(message)
                    self._event(data)
                    if data.get("type") == "ready":
                        self._ready.set()
        except websockets.ConnectionClosed:
            pass
        finally:
            if self._ws.close_code is not None:
                self.close_code, self.close_reason = self._ws.close_code, self._ws.close_reason or ""
            self._closed.set()
            self._got_media.set()

    async def hang_up(self) -> None:
        """The browser ends the session: ``{"type": "end"}``; the gateway answers ``end`` and closes 1000."""
        if not self._closed.is_set():
            with contextlib.suppress(Exception):
                await self._ws.send(json.dumps({"type": "end"}))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closed.wait(), 5)
        await self.close()

    async def close(self) -> None:
        self._closed.set()
        await self._cancel_tasks()
        if self._ws is not None:
            await self._ws.close()


# ---------------------------------------------------------------------------------------------- WebRTC
_hooked = False


def use_loopback_ice() -> None:
    """aioice skips 127.0.0.1 when it gathers host candidates: this client offers loopback only."""
    import aioice.ice

    aioice.ice.get_host_addresses = lambda use_ipv4, use_ipv6: ["127.0.0.1"]


def _hook_rtp_arrivals() -> None:
    """Record when each RTP packet reached a receiver that asks for it (before aiortc's jitter buffer)."""
    global _hooked
    if _hooked:
        return
    from aiortc.rtcrtpreceiver import RTCRtpReceiver

    original = RTCRtpReceiver._handle_rtp_packet

    async def handle(self: Any, packet: Any, arrival_time_ms: int) -> None:
        sink = getattr(self, "_bench_sink", None)
        if sink is not None:
            sink._on_rtp(packet.timestamp)
        await original(self, packet, arrival_time_ms=arrival_time_ms)

    RTCRtpReceiver._handle_rtp_packet = handle  # type: ignore[method-assign]  # the RTP arrival hook
    _hooked = True


def _mic_track() -> Any:
    import av
    from aiortc import MediaStreamTrack
    from aiortc.mediastreams import MediaStreamError

    samples = MIC_RATE // 50
    time_base = fractions.Fraction(1, MIC_RATE)
    silence = np.zeros((1, samples), np.int16)

    class Mic(MediaStreamTrack):
        """A microphone: queued 48 kHz PCM in 20 ms frames on an absolute real-time schedule, else silence."""

        kind = "audio"

        def __init__(self) -> None:
            super().__init__()
            self.frames: deque[np.ndarray] = deque()
            self.sent = 0
            self.start: float | None = None
            self.spoken = asyncio.Event()
            self.spoken_at = 0.0

        async def recv(self) -> av.AudioFrame:
            if self.readyState != "live":
                raise MediaStreamError
            now = time.monotonic()
            if self.start is None:
                self.start = now
            else:
                due = self.start + self.sent * FRAME_S
                if due > now:
                    await asyncio.sleep(due - now)
                elif now - due > 0.2:
                    self.start = now - self.sent * FRAME_S      # a stall: re-anchor, no burst
            data = self.frames.popleft() if self.frames else silence
            if data is not silence and not self.frames:
                self.spoken_at = time.monotonic()               # the last speech frame goes to the encoder
                self.spoken.set()
            frame = av.AudioFrame.from_ndarray(data, format="s16", layout="mono")
            frame.sample_rate, frame.pts, frame.time_base = MIC_RATE, self.sent * samples, time_base
            self.sent += 1
            return frame

    return Mic()


class RtcSession(_Client):
    """A browser on WebRTC: an aiortc peer, Opus both ways, events on the ``events`` data channel."""

    rate = 48000          # the decoded Opus rate: ``received.media`` counts samples at it

    def __init__(self, url: str, http: httpx.AsyncClient) -> None:
        super().__init__(url, http)
        self.pc: Any = None
        self.channel: Any = None
        self.mic: Any = None
        self.jitter_ms: list[float] = []   # decode time - RTP arrival of loud frames: the client's own buffer
        self._arrivals: dict[int, float] = {}
        self._first_ts: int | None = None
        self._last_loud_pts: int | None = None

    async def open(self) -> None:
        from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription

        _hook_rtp_arrivals()
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.mic = _mic_track()
        transceiver = self.pc.addTransceiver(self.mic, direction="sendrecv")
        transceiver.receiver._bench_sink = self
        self.channel = self.pc.createDataChannel("events")
        self.channel.on("message", self._on_message)
        self.channel.on("close", self._on_gone)
        self.pc.on("track", lambda track: self._tasks.append(asyncio.create_task(self._read(track))))
        self.pc.on("connectionstatechange", self._on_state)
        await self.pc.setLocalDescription(await self.pc.createOffer())
        response = await self.http.post(self.url + "/webrtc/offer",
                                        json={"sdp": self.pc.localDescription.sdp, "type": "offer"})
        if response.status_code != 200:
            raise ConnectionError(f"/webrtc/offer answered HTTP {response.status_code}: {response.text[:200]}")
        answer = response.json()
        self.session_id = answer.get("session_id", "")
        await self.pc.setRemoteDescription(RTCSessionDescription(sdp=answer["sdp"], type=answer["type"]))

    def _on_message(self, message: str | bytes) -> None:
        with contextlib.suppress(ValueError):
            data = json.loads(message)
            self._event(data)
            if isinstance(data, dict) and data.get("type") == "end":
                self.close_reason = str(data.get("reason", ""))
                self._on_gone()

    def _on_state(self) -> None:
        if self.pc.connectionState in ("failed", "closed"):
            self.close_reason = self.close_reason or f"connection {self.pc.connectionState}"
            self._on_gone()

    def _on_gone(self) -> None:
        self._closed.set()
        self._got_media.set()

    def _on_rtp(self, timestamp: int) -> None:
        if self._first_ts is None:
            self._first_ts = timestamp
        self._arrivals[(timestamp - self._first_ts) & 0xFFFFFFFF] = time.monotonic()

    async def _read(self, track: Any) -> None:
        from aiortc.mediastreams import MediaStreamError

        r = self.received
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                return
            now = time.monotonic()
            arrived = self._arrivals.pop(frame.pts, None)
            x = frame.to_ndarray().astype(np.float32).ravel()
            if not x.size or float(np.sqrt(np.dot(x, x) / x.size)) / 32768.0 < LOUD_RMS:
                continue
            samples = frame.samples
            if arrived is None:
                arrived = now
            else:
                self.jitter_ms.append((now - arrived) * 1000.0)
            if self._last_loud_pts is not None:
                gap = (frame.pts - self._last_loud_pts) / MIC_RATE - samples / MIC_RATE
                if 0 < gap < ANSWER_GAP_S:
                    r.underruns.append(gap)           # silent frames inside an answer: the track ran dry
            self._last_loud_pts = frame.pts
            r.media.append((arrived, samples))
            self._play_end = max(self._play_end, arrived) + samples / MIC_RATE
            self._got_media.set()

    async def speak(self, pcm8k: bytes) -> float:
        pcm = np.frombuffer(speech_at(pcm8k, MIC_RATE), np.int16)
        step = MIC_RATE // 50
        pcm = np.concatenate((pcm, np.zeros(-len(pcm) % step, np.int16)))
        self.mic.spoken.clear()
        self.mic.frames.extend(pcm[i:i + step].reshape(1, -1) for i in range(0, len(pcm), step))
        await self.mic.spoken.wait()
        return self.mic.spoken_at

    async def hang_up(self) -> None:
        """The browser ends the session: ``{"type": "end"}`` on the channel; the gateway answers ``end``."""
        if not self._closed.is_set() and self.channel is not None and self.channel.readyState == "open":
            self.channel.send(json.dumps({"type": "end"}))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closed.wait(), 5)
        await self.close()

    async def close(self) -> None:
        self._closed.set()
        if self.pc is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.pc.close(), 5)
        await self._cancel_tasks()


def make_session(transport: str, url: str, http: httpx.AsyncClient, *, ws_compression: str | None = "deflate") -> Any:
    if transport == "ws":
        return WsSession(url, http, compression=ws_compression)
    if transport == "webrtc":
        return RtcSession(url, http)
    raise ValueError(f"unknown browser transport {transport!r}")
