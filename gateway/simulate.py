"""A Twilio carrier emulator: signed webhook, then a real-time Media Streams socket.

It behaves like Twilio's side of a call: sends ``connected``/``start``, then one 20 ms µ-law
``media`` frame every 20 ms for the whole call (silence between utterances), plays what the
gateway sends in real time (so ``mark`` echoes come when the audio before them has played, and at
once after a ``clear``), and records when everything arrived. Used by ``voxray simulate``, the
end-to-end tests and the load benchmark.

Usage::

    call = SimulatedCall(gateway="http://127.0.0.1:8000", public_url="https://voice.example.com",
                         auth_token="...", to="+14155550100")
    await call.dial()                    # POST /start/twilio, parse the TwiML
    await call.connect()                 # media socket, connected + start
    await call.wait_quiet(600)           # the greeting has played
    end = await call.speak(pcm8k)        # paced; returns when the last speech frame went out
    first = await call.wait_audio(after=end)
    await call.hang_up()
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import secrets
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

import httpx
import websockets
from twilio.request_validator import RequestValidator

from pipeline.audio import ulaw_decode, ulaw_encode

__all__ = ["SimulatedCall", "Received"]

_FRAME_MS = 20
_FRAME_BYTES = 160            # µ-law bytes per 20 ms at 8 kHz
_SILENCE = b"\xff" * _FRAME_BYTES


@dataclass(slots=True)
class Received:
    """Everything the gateway sent, with arrival times (``time.monotonic``)."""

    media: list[tuple[float, int]] = field(default_factory=list)     # (arrival, µ-law bytes)
    marks: list[tuple[float, str]] = field(default_factory=list)
    clears: list[float] = field(default_factory=list)
    underruns: list[float] = field(default_factory=list)              # playback gaps (s) inside an answer
    audio: bytearray = field(default_factory=bytearray)               # µ-law, as played
    invalid: list[str] = field(default_factory=list)                  # messages Twilio would reject


class SimulatedCall:
    """One emulated Twilio call against a gateway."""

    def __init__(self, *, gateway: str, public_url: str | None = None, auth_token: str = "", account_sid: str = "",
                 from_: str = "+14155550199", to: str = "+14155550100", path: str = "/start/twilio",
                 http: httpx.AsyncClient | None = None, answer_gap_ms: float = 200.0) -> None:
        self.gateway = gateway.rstrip("/")
        self.public_url = (public_url or gateway).rstrip("/")
        self.auth_token = auth_token
        self.account_sid = account_sid or "AC" + secrets.token_hex(16)
        self.call_sid = "CA" + secrets.token_hex(16)
        self.stream_sid = "MZ" + secrets.token_hex(16)
        self.from_, self.to, self.path = from_, to, path
        self.received = Received()
        self.session_id = ""
        self.parameters: dict[str, str] = {}
        self.close_code: int | None = None
        self.close_reason = ""
        self._http = http
        self._answer_gap = answer_gap_ms / 1000.0
        self._ws: Any = None
        self._tasks: list[asyncio.Task[None]] = []
        self._outgoing: asyncio.Queue[bytes] = asyncio.Queue()
        self._sent_event = asyncio.Event()
        self._play_end = 0.0
        self._pending_marks: list[tuple[str, asyncio.TimerHandle]] = []
        self._got_media = asyncio.Event()
        self._got_clear = asyncio.Event()
        self._closed = asyncio.Event()
        self._stream_url = ""
        self._seq = 0
        self._chunk = 0
        self._stop_pacing = False

    # ------------------------------------------------------------------------------ webhook
    def webhook_params(self, **extra: str) -> dict[str, str]:
        return {"CallSid": self.call_sid, "AccountSid": self.account_sid, "From": self.from_, "To": self.to,
                "CallStatus": "ringing", "Direction": "inbound", "ApiVersion": "2010-04-01", **extra}

    async def dial(self, *, signature: str | None = None, **extra: str) -> httpx.Response:
        """POST the signed webhook; on 200, parse the TwiML's stream URL and parameters."""
        params = self.webhook_params(**extra)
        if signature is None:
            signature = RequestValidator(self.auth_token).compute_signature(self.public_url + self.path, params)
        async with contextlib.AsyncExitStack() as stack:
            http = self._http or await stack.enter_async_context(httpx.AsyncClient(timeout=10))
            response = await http.post(self.gateway + self.path, data=params,
                                       headers={"X-Twilio-Signature": signature})
        if response.status_code == 200:
            stream = ET.fromstring(response.text).find("./Connect/Stream")
            if stream is None:
                raise AssertionError(f"TwiML has no <Connect><Stream>: {response.text}")
            self._stream_url = stream.attrib["url"]
            self.parameters = {p.attrib["name"]: p.attrib["value"] for p in stream.findall("Parameter")}
            self.session_id = self._stream_url.rsplit("/", 1)[-1]
        return response

    @property
    def media_url(self) -> str:
        """The TwiML stream URL, pointed at the gateway's real address instead of the public host."""
        path = urlparse(self._stream_url).path
        gw = urlparse(self.gateway)
        return f"{'wss' if gw.scheme == 'https' else 'ws'}://{gw.netloc}{path}"

    # ------------------------------------------------------------------------------ media socket
    async def connect(self, *, send_start: bool = True, url: str | None = None) -> None:
        self._ws = await websockets.connect(url or self.media_url, max_size=None, compression=None)
        self._tasks.append(asyncio.create_task(self._receive()))
        await self.send_json({"event": "connected", "protocol": "Call", "version": "1.0.0"})
        if send_start:
            await self.send_json(self.start_message())
            self._tasks.append(asyncio.create_task(self._pace()))

    def start_message(self) -> dict[str, Any]:
        self._seq += 1
        return {"event": "start", "sequenceNumber": str(self._seq), "streamSid": self.stream_sid,
                "start": {"streamSid": self.stream_sid, "accountSid": self.account_sid, "callSid": self.call_sid,
                          "tracks": ["inbound"], "customParameters": self.parameters,
                          "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}}}

    async def send_json(self, message: dict[str, Any]) -> None:
        await self.send_raw(json.dumps(message))

    async def send_raw(self, message: str | bytes) -> None:
        with contextlib.suppress(websockets.ConnectionClosed):
            await self._ws.send(message)

    async def _pace(self) -> None:
        """One media frame every 20 ms on an absolute schedule, speech when queued, else silence."""
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while not self._closed.is_set() and not self._stop_pacing:
            payload = self._outgoing.get_nowait() if not self._outgoing.empty() else _SILENCE
            if self._outgoing.empty():
                self._sent_event.set()
            self._seq += 1
            self._chunk += 1
            await self.send_raw(
                '{"event":"media","sequenceNumber":"%d","streamSid":"%s","media":{"track":"inbound","chunk":"%d",'
                '"timestamp":"%d","payload":"%s"}}' % (self._seq, self.stream_sid, self._chunk, self._chunk * _FRAME_MS,
                                                         base64.b64encode(payload).decode()))
            next_at += _FRAME_MS / 1000.0
            delay = next_at - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            else:
                next_at = loop.time()       # fell behind: do not burst

    async def speak(self, pcm8k: bytes) -> float:
        """Queue speech (PCM16 at 8 kHz); returns the time its last frame was sent."""
        ulaw = ulaw_encode(pcm8k)
        self._sent_event.clear()
        for i in range(0, len(ulaw), _FRAME_BYTES):
            self._outgoing.put_nowait(ulaw[i:i + _FRAME_BYTES].ljust(_FRAME_BYTES, b"\xff"))
        await self._sent_event.wait()
        return time.monotonic()

    async def dtmf(self, digit: str) -> None:
        self._seq += 1
        await self.send_json({"event": "dtmf", "sequenceNumber": str(self._seq), "streamSid": self.stream_sid,
                              "dtmf": {"track": "inbound_track", "digit": digit}})

    async def _receive(self) -> None:
        try:
            async for message in self._ws:
                self._on_message(message, time.monotonic())
        except websockets.ConnectionClosed:
            pass
        finally:
            if self._ws.close_code is not None:
                self.close_code, self.close_reason = self._ws.close_code, self._ws.close_reason or ""
            self._closed.set()

    def _on_message(self, message: str | bytes, now: float) -> None:
        r = self.received
        if isinstance(message, bytes):
            r.invalid.append("binary frame")
            return
        data = json.loads(message)
        event = data.get("event")
        expected = {"media": {"event", "streamSid", "media"}, "mark": {"event", "streamSid", "mark"},
                    "clear": {"event", "streamSid"}}.get(event)
        if expected is None or set(data) != expected or data.get("streamSid") != self.stream_sid:
            r.invalid.append(message[:200])
            return
        if event == "media":
            audio = base64.b64decode(data["media"]["payload"])
            r.media.append((now, len(audio)))
            r.audio += audio
            gap = now - self._play_end
            if self._play_end and 0 < gap < self._answer_gap:
                r.underruns.append(gap)         # the buffer ran dry inside an answer
            self._play_end = max(self._play_end, now) + len(audio) / 8000.0
            self._got_media.set()
        elif event == "mark":
            name = data["mark"]["name"]
            loop = asyncio.get_running_loop()
            handle = loop.call_at(loop.time() + max(0.0, self._play_end - now), self._echo_mark, name)
            self._pending_marks.append((name, handle))
        elif event == "clear":
            r.clears.append(now)
            self._play_end = now
            pending, self._pending_marks = self._pending_marks, []
            for name, handle in pending:         # Twilio returns buffered marks at once after a clear
                handle.cancel()
                self._echo_mark(name, remove=False)
            self._got_clear.set()

    def _echo_mark(self, name: str, remove: bool = True) -> None:
        if remove:
            self._pending_marks = [(n, h) for n, h in self._pending_marks if n != name]
        self.received.marks.append((time.monotonic(), name))
        self._seq += 1
        asyncio.ensure_future(self.send_json({"event": "mark", "sequenceNumber": str(self._seq),
                                              "streamSid": self.stream_sid, "mark": {"name": name}}))

    # ------------------------------------------------------------------------------ waiting
    def playing(self) -> bool:
        return time.monotonic() < self._play_end

    async def wait_audio(self, *, after: float, timeout: float = 10.0) -> float:
        """The arrival time of the first media frame after ``after``."""
        async with asyncio.timeout(timeout):
            while True:
                first = next((t for t, _ in self.received.media if t >= after), None)
                if first is not None:
                    return first
                self._got_media.clear()
                await self._got_media.wait()

    async def wait_quiet(self, quiet_ms: float = 500.0, timeout: float = 15.0) -> None:
        """Until the gateway's audio has played out and nothing new came for ``quiet_ms``."""
        async with asyncio.timeout(timeout):
            while True:
                last = self.received.media[-1][0] if self.received.media else 0.0
                now = time.monotonic()
                if now >= self._play_end and now - last >= quiet_ms / 1000.0:
                    return
                await asyncio.sleep(0.02)

    async def wait_clear(self, timeout: float = 5.0) -> float:
        async with asyncio.timeout(timeout):
            await self._got_clear.wait()
        return self.received.clears[-1]

    async def wait_closed(self, timeout: float = 10.0) -> None:
        async with asyncio.timeout(timeout):
            await self._closed.wait()

    async def hang_up(self) -> None:
        """The caller hangs up: Twilio sends ``stop`` and closes the socket."""
        if not self._closed.is_set():
            self._stop_pacing = True
            self._seq += 1
            await self.send_json({"event": "stop", "sequenceNumber": str(self._seq), "streamSid": self.stream_sid,
                                  "stop": {"accountSid": self.account_sid, "callSid": self.call_sid}})
            with contextlib.suppress(TimeoutError):
                await self.wait_closed(5.0)     # the gateway closes its side once the call is finalised
        await self.close()

    async def close(self) -> None:
        self._closed.set()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._ws is not None:
            await self._ws.close()
            if self.close_code is None and self._ws.close_code is not None:
                self.close_code, self.close_reason = self._ws.close_code, self._ws.close_reason or ""

    def pcm_received(self) -> bytes:
        """The agent's audio as PCM16 at 8 kHz."""
        return ulaw_decode(bytes(self.received.audio))


# ---------------------------------------------------------------------------------------------- CLI
def synthetic_voice(seconds: float = 1.2, rate: int = 8000) -> bytes:
    """A voiced, syllable-modulated signal well above the VAD threshold that ends exactly at its last sample."""
    import numpy as np

    t = np.arange(int(seconds * rate)) / rate
    voiced = sum(np.sin(2 * np.pi * 150 * k * t) / k for k in range(1, 8))
    envelope = 0.55 + 0.45 * np.sin(2 * np.pi * 4 * t) ** 2
    signal = 0.25 * voiced / np.max(np.abs(voiced)) * envelope
    return (signal * 32767).astype("<i2").tobytes()


async def _simulate(*, url: str, public_url: str | None, calls: int, turns: int, pcm: bytes, to: str,
                    auth_token: str, account_sid: str) -> list[list[float]]:
    async def one(i: int) -> list[float]:
        call = SimulatedCall(gateway=url, public_url=public_url, auth_token=auth_token, account_sid=account_sid,
                             to=to)
        response = await call.dial()
        if response.status_code != 200:
            raise RuntimeError(f"call {i}: webhook answered {response.status_code}: {response.text[:200]}")
        await call.connect()
        latencies = []
        try:
            await call.wait_audio(after=0, timeout=20)
            await call.wait_quiet(600, timeout=60)
            for _ in range(turns):
                end = await call.speak(pcm)
                try:
                    first = await call.wait_audio(after=end, timeout=30)
                except TimeoutError:
                    print(f"call {i + 1}: no answer within 30 s (was the utterance understood?)")
                    continue
                latencies.append((first - end) * 1000.0)
                await call.wait_quiet(600, timeout=60)
        finally:
            await call.hang_up()
        return latencies

    return list(await asyncio.gather(*(one(i) for i in range(calls))))


def run_simulation(*, url: str, public_url: str | None, calls: int, turns: int, audio: Any, to: str,
                   auth_token: str, account_sid: str) -> int:
    """``voxray simulate``: place calls, print each turn's end-of-speech → first-audio latency."""
    from pipeline.audio import Resampler, wav_to_pcm

    if audio is not None:
        pcm, rate = wav_to_pcm(audio.read_bytes())
        pcm = pcm if rate == 8000 else Resampler(rate, 8000).process(pcm)
    else:
        pcm = synthetic_voice()
    results = asyncio.run(_simulate(url=url, public_url=public_url, calls=calls, turns=turns, pcm=pcm, to=to,
                                    auth_token=auth_token, account_sid=account_sid))
    flat = sorted(x for r in results for x in r)
    for i, r in enumerate(results):
        print(f"call {i + 1}: " + ", ".join(f"{x:.0f} ms" for x in r))
    if flat:
        print(f"{len(flat)} turns: p50 {flat[len(flat) // 2]:.0f} ms, max {flat[-1]:.0f} ms "
              "(end of speech -> first agent audio, including the turn wait and the providers)")
    return 0
