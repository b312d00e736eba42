"""A carrier emulator: signed webhook, then a real-time media socket, for any carrier dialect.

It behaves like the carrier's side of a call (``gateway/simulate/dialects/<carrier>.py`` speaks its wire
format): sends the opening messages, then one media frame per frame time for the whole call
(silence between utterances), plays what the gateway sends in real time (so marker
acknowledgements come when the audio before them has played, and at once after a flush), and
records when everything arrived. Used by ``voxray simulate``, the end-to-end tests and the load
benchmark.

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
import collections
import contextlib
import json
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

import httpx

from gateway.simulate.ws_link import WsLink

__all__ = ["BusyAnswer", "SimulatedCall", "Received"]


class BusyAnswer(Exception):
    """The gateway answered the webhook with the carrier's busy markup (it says ``busy_text`` and hangs up:
    it is at ``max_concurrent_calls`` or overloaded), not a media stream."""


_BUSY_MARKS = ("<Hangup/>", '"action": "talk"', '"action":"talk"')   # TwiML/TeXML/Plivo XML, a Vonage NCCO


@dataclass(slots=True)
class Received:
    """Everything the gateway sent, with arrival times (``time.monotonic``)."""

    media: list[tuple[float, int]] = field(default_factory=list)     # (arrival, samples)
    marks: list[tuple[float, str]] = field(default_factory=list)      # acknowledgements we sent back
    clears: list[float] = field(default_factory=list)
    underruns: list[float] = field(default_factory=list)              # playback gaps (s) inside an answer
    audio: bytearray = field(default_factory=bytearray)               # PCM16 at the dialect rate, as played
    invalid: list[str] = field(default_factory=list)                  # messages the carrier would reject


class SimulatedCall:
    """One emulated carrier call against a gateway (Twilio unless ``carrier`` says otherwise)."""

    def __init__(self, *, gateway: str, public_url: str | None = None, carrier: str = "twilio",
                 credentials: Mapping[str, str] | None = None, auth_token: str = "", account_sid: str = "",
                 from_: str = "+14155550199", to: str = "+14155550100", path: str | None = None,
                 http: httpx.AsyncClient | None = None, answer_gap_ms: float = 200.0) -> None:
        from gateway.simulate.dialects import dialect_for

        self.gateway = gateway.rstrip("/")
        self.public_url = (public_url or gateway).rstrip("/")
        creds = dict(credentials or {})
        if auth_token:
            creds.setdefault("auth_token", auth_token)
        if account_sid:
            creds.setdefault("account_sid", account_sid)
        self.dialect: Any = dialect_for(carrier)(credentials=creds, from_=from_, to=to)
        self.carrier = carrier
        self.path = path or f"/start/{carrier}"
        self.rate: int = self.dialect.rate
        self._frame_samples = self.rate * self.dialect.frame_ms // 1000
        self._frame_s = self.dialect.frame_ms / 1000.0
        self._silence = b"\x00\x00" * self._frame_samples
        self.received = Received()
        self.session_id = ""
        self.close_code: int | None = None
        self.close_reason = ""
        self._http = http
        self._answer_gap = answer_gap_ms / 1000.0
        self._link: WsLink | None = None
        self._outgoing: collections.deque[bytes] = collections.deque()
        self._pacer: asyncio.Handle | None = None
        self._next_at = 0.0
        self._sent_event = asyncio.Event()
        self._speech_end = 0.0
        self._play_end = 0.0
        self._pending_marks: list[tuple[str, asyncio.TimerHandle]] = []
        self._got_media = asyncio.Event()
        self._got_clear = asyncio.Event()
        self._closed = asyncio.Event()
        self._stream_url = ""
        self._stop_pacing = False

    # ------------------------------------------------------------------------------ identity
    @property
    def call_sid(self) -> str:
        return str(self.dialect.call_id)

    @property
    def parameters(self) -> dict[str, str]:
        return dict(getattr(self.dialect, "parameters", {}))

    def webhook_params(self, **extra: str) -> dict[str, str]:
        return dict(self.dialect.webhook_params(**extra))

    def start_message(self) -> dict[str, Any]:
        return dict(self.dialect.start_message())

    # ------------------------------------------------------------------------------ webhook
    async def dial(self, *, signature: str | None = None, **extra: str) -> httpx.Response:
        """Send the signed webhook; on 200, parse the answer's stream URL and parameters (:class:`BusyAnswer`
        when the answer is the carrier's busy markup instead)."""
        kwargs: dict[str, Any] = {"signature": signature} if signature is not None else {}
        if self.path != f"/start/{self.carrier}":
            kwargs["path"] = self.path
        hook = self.dialect.webhook(self.public_url, extra, **kwargs)
        async with contextlib.AsyncExitStack() as stack:
            http = self._http
            if http is None:
                http = await stack.enter_async_context(httpx.AsyncClient(timeout=10))
            response = await http.request(hook.method, self.gateway + hook.path, content=hook.body,
                                          headers=dict(hook.headers))
        if response.status_code == 200:
            try:
                self._stream_url = self.dialect.answer(response.status_code, response.text)
            except Exception:
                if any(mark in response.text for mark in _BUSY_MARKS):
                    raise BusyAnswer(response.text[:200]) from None
                raise
            self.session_id = urlparse(self._stream_url).path.rstrip("/").rsplit("/", 1)[-1]
        return response

    def adopt(self, answer_text: str, call_id: str) -> None:
        """Take the identity of a call the gateway placed (``POST /calls``): the carrier runs the
        answer markup it was given when the callee picks up."""
        self.dialect.call_id = call_id
        self._stream_url = self.dialect.answer(200, answer_text)
        self.session_id = urlparse(self._stream_url).path.rstrip("/").rsplit("/", 1)[-1]

    @property
    def media_url(self) -> str:
        """The answer's stream URL, pointed at the gateway's real address instead of the public host."""
        parsed = urlparse(self._stream_url)
        gw = urlparse(self.gateway)
        query = f"?{parsed.query}" if parsed.query else ""
        return f"{'wss' if gw.scheme == 'https' else 'ws'}://{gw.netloc}{parsed.path}{query}"

    # ------------------------------------------------------------------------------ media socket
    async def connect(self, *, send_start: bool = True, url: str | None = None,
                      sock: socket.socket | None = None) -> None:
        """Open the media socket (over ``sock`` when given: a connection already made) and start the stream.

        Messages are handled as they are read and media frames are sent from timer callbacks (no task per
        call): a load benchmark's hundreds of calls cost its client little, and arrival times are exact."""
        self._link = await WsLink.open(url or self.media_url, on_message=self._on_message,
                                       on_close=self._link_closed, headers=self.dialect.ws_headers() or None,
                                       sock=sock)
        opening = self.dialect.opening()
        for message in opening if send_start else opening[:-1]:
            await self.send_raw(message)
        if send_start:
            loop = asyncio.get_running_loop()
            self._next_at = loop.time()
            self._pacer = loop.call_soon(self._pace)

    async def send_json(self, message: dict[str, Any]) -> None:
        await self.send_raw(json.dumps(message))

    async def send_raw(self, message: str | bytes) -> None:
        """Send one message (dropped once the socket is closing); waits while the gateway is not reading."""
        if self._link is not None:
            self._link.send(message)
            await self._link.drain()

    def _pace(self) -> None:
        """One media frame per frame time on an absolute schedule, speech when queued, else silence."""
        if self._closed.is_set() or self._stop_pacing or self._link is None:
            return
        outgoing = self._outgoing
        self._link.send(self.dialect.media(outgoing.popleft() if outgoing else self._silence))
        if not outgoing and not self._sent_event.is_set():
            self._speech_end = time.monotonic()     # the last frame of the speech went out
            self._sent_event.set()
        loop = asyncio.get_running_loop()
        self._next_at += self._frame_s
        now = loop.time()
        if self._next_at < now:
            self._next_at = now                     # fell behind: do not burst
        self._pacer = loop.call_at(self._next_at, self._pace)

    async def speak(self, pcm: bytes) -> float:
        """Queue speech (PCM16 at 8 kHz, resampled to the dialect's rate); returns when its last frame went out,
        or when the gateway closed the call first (the rest is never sent)."""
        if self.rate != 8000:
            from pipeline.audio import Resampler

            pcm = Resampler(8000, self.rate).process(pcm)
        step = self._frame_samples * 2
        if not pcm:
            return time.monotonic()
        self._sent_event.clear()
        for i in range(0, len(pcm), step):
            self._outgoing.append(pcm[i:i + step].ljust(step, b"\x00"))
        waits = [asyncio.ensure_future(self._sent_event.wait()), asyncio.ensure_future(self._closed.wait())]
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for wait in waits:
                wait.cancel()
        return self._speech_end if self._sent_event.is_set() else time.monotonic()

    async def dtmf(self, digit: str) -> None:
        await self.send_raw(self.dialect.dtmf(digit))

    def _link_closed(self, code: int, reason: str) -> None:
        self.close_code, self.close_reason = code, reason
        self._closed.set()

    def _on_message(self, message: str | bytes, now: float) -> None:
        r = self.received
        for item in self.dialect.parse(message):
            if item.kind == "media":
                samples = len(item.pcm) // 2
                r.media.append((now, samples))
                r.audio += item.pcm
                gap = now - self._play_end
                if self._play_end and 0 < gap < self._answer_gap:
                    r.underruns.append(gap)         # the buffer ran dry inside an answer
                self._play_end = max(self._play_end, now) + samples / self.rate
                self._got_media.set()
            elif item.kind == "mark":
                loop = asyncio.get_running_loop()
                handle = loop.call_at(loop.time() + max(0.0, self._play_end - now), self._echo_mark, item.name)
                self._pending_marks.append((item.name, handle))
            elif item.kind == "clear":
                r.clears.append(now)
                self._play_end = now
                pending, self._pending_marks = self._pending_marks, []
                for name, handle in pending:         # carriers return buffered marks at once after a clear
                    handle.cancel()
                    self._echo_mark(name, remove=False)
                cleared = getattr(self.dialect, "cleared", None)   # e.g. Plivo's clearedAudio
                if cleared is not None and (ack := cleared()) is not None and self._link is not None:
                    self._link.send(ack)
                self._got_clear.set()
            elif item.kind == "invalid":
                r.invalid.append(item.text)

    def _echo_mark(self, name: str, remove: bool = True) -> None:
        if remove:
            self._pending_marks = [(n, h) for n, h in self._pending_marks if n != name]
        self.received.marks.append((time.monotonic(), name))
        ack = self.dialect.mark_ack(name)
        if ack is not None and self._link is not None:
            self._link.send(ack)

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

    @property
    def closed(self) -> bool:
        """The media socket closed (either side)."""
        return self._closed.is_set()

    async def wait_closed(self, timeout: float = 10.0) -> None:
        async with asyncio.timeout(timeout):
            await self._closed.wait()

    async def hang_up(self) -> None:
        """The caller hangs up: the carrier ends the stream (``stop`` where it has one) and closes."""
        if not self._closed.is_set():
            self._stop_pacing = True
            stop = self.dialect.stop()
            for message in stop:
                await self.send_raw(message)
            if stop:                            # the gateway closes its side once the call is finalised
                with contextlib.suppress(TimeoutError):
                    await self.wait_closed(5.0)
        await self.close()

    async def close(self) -> None:
        self._closed.set()
        if self._pacer is not None:
            self._pacer.cancel()
        for _name, handle in self._pending_marks:
            handle.cancel()
        if self._link is not None:
            await self._link.close()
            if self.close_code is None and self._link.close_code is not None:
                self.close_code, self.close_reason = self._link.close_code, self._link.close_reason

    def pcm_received(self) -> bytes:
        """The agent's audio as PCM16 at the dialect's rate."""
        return bytes(self.received.audio)


# ---------------------------------------------------------------------------------------------- test audio
def synthetic_voice(seconds: float = 1.2, rate: int = 8000) -> bytes:
    """A voiced, syllable-modulated signal well above the VAD threshold that ends exactly at its last sample
    (it opens turns for the energy VAD; the Silero model, which confirms barge-ins, takes it for no speech, and
    no recogniser understands it: ``voxray simulate`` speaks real sentences)."""
    import numpy as np

    t = np.arange(int(seconds * rate)) / rate
    voiced = sum(np.sin(2 * np.pi * 150 * k * t) / k for k in range(1, 8))
    envelope = 0.55 + 0.45 * np.sin(2 * np.pi * 4 * t) ** 2
    signal = 0.25 * voiced / np.max(np.abs(voiced)) * envelope
    return bytes((signal * 32767).astype("<i2").tobytes())
