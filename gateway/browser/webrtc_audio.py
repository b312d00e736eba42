"""WebRTC audio: aiortc frames to and from our 16-bit mono PCM, and the agent's paced outbound track.

Pure conversions and one :class:`aiortc.MediaStreamTrack`; nothing here knows about sessions, signaling
or the conversation (:mod:`gateway.browser.webrtc` wires them to a peer connection).

Usage::

    pcm = frame_to_pcm(await remote_track.recv())        # the caller: any layout -> mono s16 at frame.sample_rate
    track = OutboundAudioTrack(OPUS_OUTPUT_RATE)         # the agent: pc.addTransceiver(track, direction="sendrecv")
    track.feed(pcm)                                      # the playout's audio, paced out 20 ms at a time
    track.flush()                                        # barge-in: silence from the next frame
"""

from __future__ import annotations

import asyncio
import fractions
import logging
import time
from collections.abc import Awaitable, Callable

import av
import numpy as np
from aiortc import MediaStreamTrack
from aiortc.mediastreams import MediaStreamError

__all__ = ["FRAME_MS", "OPUS_OUTPUT_RATE", "PHONE_RATE", "OutboundAudioTrack", "frame_to_pcm", "pcm_to_frame"]

logger = logging.getLogger(__name__)

FRAME_MS = 20                  # one outbound frame
OPUS_OUTPUT_RATE = 16000       # the pipeline's rate; aiortc's encoder resamples it to Opus's 48 kHz
PHONE_RATE = 8000              # G.711 (PCMU/PCMA): band-limited by our own resampler, as on a phone leg


def frame_to_pcm(frame: av.AudioFrame) -> bytes:
    """A decoded frame as 16-bit little-endian mono PCM at ``frame.sample_rate`` (channels averaged).

    Handles packed and planar layouts of s16, s32 and float samples (aiortc's decoders give packed s16:
    Opus stereo at 48 kHz, G.711 mono at 8 kHz)."""
    channels = len(frame.layout.channels)
    data = frame.to_ndarray()
    if not frame.format.is_planar:
        data = data.reshape(-1, channels).T            # interleaved L R L R -> one row per channel
    if data.dtype.kind == "f":
        data = np.clip(np.rint(data.astype(np.float64) * 32768.0), -32768, 32767)
    elif data.dtype == np.int32:
        data = data.astype(np.int32) >> 16
    elif data.dtype == np.uint8:
        data = (data.astype(np.int32) - 128) << 8
    if channels > 1:
        data = np.rint(data.astype(np.float64).mean(axis=0))
    else:
        data = data[0]
    return bytes(data.astype("<i2").tobytes())


def pcm_to_frame(pcm: bytes, sample_rate: int, pts: int) -> av.AudioFrame:
    """16-bit mono PCM as an ``av.AudioFrame`` (s16, mono) with ``pts`` in samples (time base 1/rate)."""
    frame = av.AudioFrame.from_ndarray(np.frombuffer(pcm, "<i2").reshape(1, -1), format="s16", layout="mono")
    frame.sample_rate = sample_rate
    frame.pts = pts
    frame.time_base = fractions.Fraction(1, sample_rate)
    return frame


class OutboundAudioTrack(MediaStreamTrack):
    """The agent's audio as an aiortc track: 20 ms frames paced in real time, silence when nothing is queued.

    aiortc pulls ``recv()``; frame *n* is due at ``start + n * 20 ms`` on the monotonic clock, so the pace
    never drifts however long each call takes. After a stall longer than ``max_late_ms`` the schedule is
    re-anchored rather than sending a burst. ``feed`` appends PCM (the playout's frames); ``flush``
    drops what is buffered (barge-in). More than ``max_buffer_ms`` buffered (nobody pulling) drops the
    oldest audio.

    Usage::

        track = OutboundAudioTrack(8000)        # G.711; OPUS_OUTPUT_RATE for Opus
        pc.addTransceiver(track, direction="sendrecv")
        track.feed(pcm)                         # 16-bit mono at 8 kHz, any length
    """

    kind = "audio"

    def __init__(self, sample_rate: int = OPUS_OUTPUT_RATE, *, frame_ms: int = FRAME_MS,
                 max_buffer_ms: float = 2000.0, max_late_ms: float = 200.0,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        super().__init__()
        self._frame_ms = frame_ms
        self._max_buffer_ms = max_buffer_ms
        self._max_late = max_late_ms / 1000.0
        self._clock = clock
        self._sleep = sleep
        self._buffer = bytearray()
        self._start: float | None = None
        self.frames = 0             # frames handed out (the next frame's pts is frames * samples_per_frame)
        self.dropped_ms = 0.0       # audio dropped because the buffer overflowed
        self.set_sample_rate(sample_rate)

    def set_sample_rate(self, sample_rate: int) -> None:
        """Choose the output rate (once the codec is negotiated); only before the first frame."""
        if self.frames:
            raise RuntimeError("the output rate cannot change once frames were sent")
        self.sample_rate = sample_rate
        self._samples = sample_rate * self._frame_ms // 1000
        self._frame_bytes = self._samples * 2
        self._max_bytes = int(self._max_buffer_ms * sample_rate / 1000) * 2
        self._time_base = fractions.Fraction(1, sample_rate)

    def feed(self, pcm: bytes) -> None:
        """Queue 16-bit mono PCM at ``sample_rate``."""
        self._buffer += pcm
        over = len(self._buffer) - self._max_bytes
        if over > 0:
            over += over % 2
            del self._buffer[:over]
            self.dropped_ms += over / 2 / self.sample_rate * 1000.0

    def flush(self) -> None:
        """Drop everything queued (barge-in); silence follows at once."""
        self._buffer.clear()

    @property
    def buffered_ms(self) -> float:
        """Audio queued and not yet sent."""
        return len(self._buffer) / 2 / self.sample_rate * 1000.0

    def next_frame(self) -> av.AudioFrame:
        """The next 20 ms (queued audio, padded with silence), without waiting."""
        chunk = bytes(self._buffer[:self._frame_bytes])
        del self._buffer[:self._frame_bytes]
        if len(chunk) < self._frame_bytes:
            chunk += bytes(self._frame_bytes - len(chunk))
        frame = pcm_to_frame(chunk, self.sample_rate, self.frames * self._samples)
        self.frames += 1
        return frame

    async def recv(self) -> av.AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        now = self._clock()
        if self._start is None:
            self._start = now
        else:
            due = self._start + self.frames * self._frame_ms / 1000.0
            if due > now:
                await self._sleep(due - now)
                if self.readyState != "live":
                    raise MediaStreamError
            elif now - due > self._max_late:
                self._start = now - self.frames * self._frame_ms / 1000.0
        return self.next_frame()
