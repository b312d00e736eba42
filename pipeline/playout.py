"""Outbound playout: paces agent audio to a transport in real time with a small lead.

The carrier (or browser) plays what we send at real time; keeping only ``lead_ms`` of audio ahead
of playback means a barge-in ``clear`` drops little and the buffer never runs dry. ``clear()`` drops
queued audio and sends the transport's flush frame before anything else.

The pacer's timed wake-ups fall on a shared grid of ``tick_ms`` (on the event loop's clock): every call
that is due within the same tick wakes in the same loop iteration, so a process carrying many calls
wakes ``1000 / tick_ms`` times a second instead of once per call per frame. A wake-up is then at most
``tick_ms`` late, which the ``lead_ms`` already in the carrier's buffer absorbs (``tick_ms`` must stay
below the lead at which the pacer sends again, below). Audio written to an idle playout is still sent
at once (no timer involved).

Each message carries up to ``message_ms`` of queued audio (whole frames, never across a mark), for
transports that play longer messages: fewer wake-ups, encodes and socket writes per second of speech. The
pacer then wakes when the lead falls to ``lead_ms - (message_ms - frame_ms) / 2``, so the transport holds
``lead_ms + frame_ms / 2`` on average whatever the message size (one frame per message: ``lead_ms`` to
``lead_ms + frame_ms``).

A suspected barge-in pauses the pacer (``pause()``: nothing more is sent, the transport plays out the
lead it holds); ``hold()`` also flushes the transport but keeps the audio it had not played yet, rewound
into the queue; ``resume()`` carries on from exactly where the listener stopped hearing.

Usage (one per call; ``send`` writes one frame to the socket)::

    playout = Playout(sample_rate=8000, lead_ms=100, max_buffer_ms=10000, tick_ms=10, message_ms=60)
    tg.create_task(playout.run(send))
    await playout.write(pcm8k)          # waits while more than max_buffer_ms is queued
    playout.mark("r1-c0")               # acknowledged by the carrier once played
    playout.pause(); playout.hold()     # suspected barge-in: stop sending; flush but keep the audio
    playout.resume()                    # it was not one: carry on where the listener stopped
    playout.clear()                     # barge-in
"""

from __future__ import annotations

import asyncio
import collections
import math
import time
from collections.abc import Awaitable, Callable

from pipeline.frames import AudioFrame, Clear, Frame, Mark

__all__ = ["Playout"]

Send = Callable[[Frame], Awaitable[None]]


class Playout:
    """Bounded, paced outbound audio queue for one call."""

    def __init__(self, *, sample_rate: int, lead_ms: float, max_buffer_ms: float, frame_ms: int = 20,
                 message_ms: int | None = None, tick_ms: float = 0.0,
                 clock: Callable[[], float] = time.monotonic,
                 on_speaking: Callable[[bool, float], None] | None = None) -> None:
        message_ms = frame_ms if message_ms is None else message_ms
        if message_ms < frame_ms:
            raise ValueError(f"message_ms must be at least frame_ms={frame_ms} (got {message_ms})")
        slack_ms = (message_ms - frame_ms) / 2
        if tick_ms < 0 or (tick_ms and tick_ms >= lead_ms - slack_ms):
            raise ValueError(f"tick_ms must be 0 (off) or below lead_ms - (message_ms - frame_ms) / 2 = "
                             f"{lead_ms - slack_ms:g} (got {tick_ms})")
        self.sample_rate = sample_rate
        self._frame_bytes = sample_rate * frame_ms // 1000 * 2
        self._message_bytes = message_ms // frame_ms * self._frame_bytes
        self._bytes_per_ms = sample_rate * 2 / 1000.0
        self._refill_at = (lead_ms - slack_ms) / 1000.0    # the lead at which the pacer sends again
        self._max_bytes = int(max_buffer_ms * self._bytes_per_ms)
        self._tick = tick_ms / 1000.0
        self._clock = clock
        self.on_speaking = on_speaking   # (speaking, at): the transport wires it to the conversation
        self._queue: collections.deque[bytes | Mark] = collections.deque()
        self._queued_bytes = 0
        self._partial = b""
        self._waiter: asyncio.Future[None] | None = None
        self._space = asyncio.Event()
        self._space.set()
        self._drained = asyncio.Event()
        self._drained.set()
        self._clear_pending = False
        self._paused = False
        self._flushed = False       # hold() flushed the transport and nothing was sent since
        self._sent: collections.deque[tuple[float, bytes | Mark]] = collections.deque()  # (played by, item)
        self._play_until = 0.0      # when the transport will have played everything we sent
        self._speaking = False
        self._pacing = False        # waiting for the lead to shrink (queued audio is not news then)
        self.sent_ms = 0.0          # audio sent so far (monotonic position in the outbound stream)
        self.pending_marks: set[str] = set()

    # ------------------------------------------------------------------ producer side
    async def write(self, pcm: bytes) -> None:
        """Queue PCM16 at ``sample_rate``; waits while the queue is over its limit."""
        data = self._partial + pcm
        cut = len(data) - len(data) % self._frame_bytes
        self._partial = data[cut:]
        for i in range(0, cut, self._frame_bytes):
            self._queue.append(data[i:i + self._frame_bytes])
        self._queued_bytes += cut
        if cut:
            self._drained.clear()
            if not self._pacing:        # pacing, the pacer's next send does not depend on what is queued
                self._wake()
        if self._queued_bytes > self._max_bytes:
            self._space.clear()
            await self._space.wait()

    def mark(self, name: str) -> None:
        """Queue a marker after the audio written so far (a short tail is flushed first)."""
        self._flush_partial()
        self._queue.append(Mark(name))
        self._drained.clear()
        self._wake()

    def end_of_audio(self) -> None:
        """Send the short tail that does not fill a whole frame."""
        self._flush_partial()

    def clear(self) -> None:
        """Drop everything queued and flush the transport's buffer (barge-in)."""
        self._queue.clear()
        self._queued_bytes = 0
        self._partial = b""
        self._sent.clear()
        self._paused = False
        self._clear_pending = self._clear_pending or not self._flushed
        self.pending_marks.clear()
        now = self._clock()
        if self._play_until > now:
            self.sent_ms -= (self._play_until - now) * 1000.0   # never played: not part of the stream
        self._play_until = now
        self._space.set()
        self._wake()

    @property
    def paused(self) -> bool:
        return self._paused

    def pause(self) -> None:
        """Stop sending (a suspected barge-in); the transport plays what it holds, at most ``lead_ms``."""
        self._paused = True

    def hold(self) -> None:
        """Paused, and the transport flushed too; the audio it had not played yet goes back to the head
        of the queue (with its marks), so :meth:`resume` loses nothing."""
        self._paused = True
        now = self._clock()
        unplayed: list[bytes | Mark] = []
        for ends_at, item in self._sent:
            if isinstance(item, Mark):
                if ends_at > now:
                    self.pending_marks.discard(item.name)
                    unplayed.append(item)
                continue
            left = ends_at - now
            if left <= 0:
                continue
            keep = min(len(item), int(left * 1000.0 * self._bytes_per_ms) // 2 * 2)
            if keep:
                unplayed.append(item[len(item) - keep:])
        self._sent.clear()
        for item in reversed(unplayed):
            self._queue.appendleft(item)
            if isinstance(item, bytes):
                self._queued_bytes += len(item)
        if self._play_until > now:
            self.sent_ms -= (self._play_until - now) * 1000.0
        self._play_until = now
        if not self._flushed:
            self._clear_pending, self._flushed = True, True
        self._wake()

    def resume(self) -> None:
        """Carry on sending after :meth:`pause` or :meth:`hold`."""
        if self._paused:
            self._paused = False
            self._wake()

    def acknowledge(self, name: str) -> bool:
        """A marker came back; True when it was played (not flushed by a clear)."""
        if name in self.pending_marks:
            self.pending_marks.discard(name)
            return True
        return False

    @property
    def speaking(self) -> bool:
        return bool(self._queue) or self._partial != b"" or self._play_until > self._clock()

    def played_ms(self) -> float:
        """Position in the outbound stream the listener has heard up to (estimate by time)."""
        return self.sent_ms - max(0.0, self._play_until - self._clock()) * 1000.0

    @property
    def queued_ms(self) -> float:
        return (self._queued_bytes + len(self._partial)) / self._bytes_per_ms

    async def drained(self) -> None:
        """Wait until everything queued has been sent and played."""
        self._flush_partial()
        await self._drained.wait()

    def _flush_partial(self) -> None:
        if self._partial:
            self._queue.append(self._partial)
            self._queued_bytes += len(self._partial)
            self._partial = b""
            self._drained.clear()
            self._wake()

    # ------------------------------------------------------------------ pacer
    async def run(self, send: Send) -> None:
        """Send queued frames paced to real time; runs until cancelled."""
        loop = asyncio.get_running_loop()      # once: on 3.11 each lookup costs a getpid() system call
        while True:
            if self._clear_pending:
                self._clear_pending = False
                await send(Clear())
                continue
            if self._paused:
                await self._sleep(loop, None)
                continue
            if not self._queue:
                now = self._clock()
                if self._play_until > now:
                    await self._sleep(loop, self._play_until - now)
                    continue
                self._set_speaking(False)
                self._drained.set()
                await self._sleep(loop, None)
                continue
            now = self._clock()
            while self._sent and self._sent[0][0] <= now:
                self._sent.popleft()
            if self._play_until < now:
                self._play_until = now          # the transport ran dry (or a new utterance starts)
            ahead = self._play_until - now
            if ahead > self._refill_at:
                self._pacing = True
                try:
                    await self._sleep(loop, ahead - self._refill_at)
                finally:
                    self._pacing = False
                continue
            await self._send_due(send)

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def _sleep(self, loop: asyncio.AbstractEventLoop, delay: float | None) -> None:
        """Sleep ``delay`` seconds (forever if None) or until woken; one future, no task per wait."""
        self._waiter = waiter = loop.create_future()
        handle = None
        if delay is not None:
            at = loop.time() + delay
            if self._tick:
                at = math.ceil(at / self._tick) * self._tick     # the shared grid: wake with the other calls
            handle = loop.call_at(at, _resolve, waiter)
        try:
            await waiter
        finally:
            if handle is not None:
                handle.cancel()
            self._waiter = None

    async def _send_due(self, send: Send) -> None:
        """Send one message: the queued frames up to ``message_ms`` (at least one, none past a mark), then
        the marks that follow."""
        audio: list[bytes] = []
        budget = self._message_bytes
        while self._queue:
            item = self._queue[0]
            if isinstance(item, Mark) or (audio and len(item) > budget):
                break
            self._queue.popleft()
            self._queued_bytes -= len(item)
            audio.append(item)
            budget -= len(item)
        if audio:
            pcm = b"".join(audio)
            ms = len(pcm) / self._bytes_per_ms
            self._set_speaking(True)
            self._play_until += ms / 1000.0
            self.sent_ms += ms
            self._sent.append((self._play_until, pcm))
            self._flushed = False
            if self._queued_bytes <= self._max_bytes:
                self._space.set()
            await send(AudioFrame(pcm, self.sample_rate))
        while self._queue and isinstance(self._queue[0], Mark):
            mark = self._queue.popleft()
            assert isinstance(mark, Mark)
            self.pending_marks.add(mark.name)
            self._sent.append((self._play_until, mark))
            await send(mark)

    def _set_speaking(self, speaking: bool) -> None:
        if speaking != self._speaking:
            self._speaking = speaking
            if self.on_speaking is not None:
                self.on_speaking(speaking, self._clock())


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)
