"""WebRTC audio: frame conversions and the paced outbound track, with no peer and (mostly) no clock.

The track's pacing is checked against a fake clock that moves only when the track sleeps, then once
against the real event loop."""

from __future__ import annotations

import fractions
import time

import av
import numpy as np
import pytest
from aiortc.mediastreams import MediaStreamError

from gateway.browser.webrtc_audio import OutboundAudioTrack, frame_to_pcm, pcm_to_frame


# ------------------------------------------------------------------------------------------ pure: frames
def test_stereo_s16_is_downmixed_to_mono() -> None:
    left = np.array([1000, -2000, 32767, -32768, 3], dtype=np.int16)
    right = np.array([3000, 2000, 32767, -32768, 0], dtype=np.int16)
    packed = np.stack([left, right], axis=1).reshape(1, -1)          # L R L R ...
    frame = av.AudioFrame.from_ndarray(packed, format="s16", layout="stereo")
    frame.sample_rate = 48000
    mono = np.frombuffer(frame_to_pcm(frame), "<i2")
    assert mono.tolist() == [2000, 0, 32767, -32768, 2]               # (L + R) / 2, rounded to even


def test_planar_and_float_frames_are_converted() -> None:
    planar = av.AudioFrame.from_ndarray(np.array([[100, 200], [300, 400]], dtype=np.int16), format="s16p",
                                        layout="stereo")
    assert np.frombuffer(frame_to_pcm(planar), "<i2").tolist() == [200, 300]
    floats = av.AudioFrame.from_ndarray(np.array([[0.5, -1.0, 2.0]], dtype=np.float32), format="flt", layout="mono")
    assert np.frombuffer(frame_to_pcm(floats), "<i2").tolist() == [16384, -32768, 32767]   # clipped


def test_mono_pcm_round_trips_through_an_av_frame() -> None:
    pcm = (np.sin(np.arange(160) / 5) * 12000).astype("<i2").tobytes()
    frame = pcm_to_frame(pcm, 8000, pts=480)
    assert (frame.sample_rate, frame.samples, frame.pts) == (8000, 160, 480)
    assert frame.time_base == fractions.Fraction(1, 8000)
    assert frame.format.name == "s16" and frame.layout.name == "mono"
    assert frame_to_pcm(frame) == pcm


# ------------------------------------------------------------------------------------------ pure: outbound track
def test_outbound_track_frames_queued_audio_then_silence() -> None:
    track = OutboundAudioTrack(16000)
    track.feed(b"\x01\x00" * 480)                     # 30 ms
    first, second, third = track.next_frame(), track.next_frame(), track.next_frame()
    assert [f.samples for f in (first, second, third)] == [320, 320, 320]
    assert [f.pts for f in (first, second, third)] == [0, 320, 640]
    assert first.time_base == fractions.Fraction(1, 16000) and first.sample_rate == 16000
    assert frame_to_pcm(first) == b"\x01\x00" * 320
    assert frame_to_pcm(second) == b"\x01\x00" * 160 + b"\x00\x00" * 160     # padded with silence
    assert frame_to_pcm(third) == bytes(640)


def test_outbound_track_flush_and_overflow() -> None:
    track = OutboundAudioTrack(8000, max_buffer_ms=100)
    track.feed(b"\x05\x00" * 800)                     # 100 ms
    assert track.buffered_ms == 100.0
    track.flush()                                     # barge-in
    assert track.buffered_ms == 0.0 and frame_to_pcm(track.next_frame()) == bytes(320)
    track.feed(b"\x01\x00" * 800 + b"\x02\x00" * 160)     # 120 ms into a 100 ms buffer: the oldest goes
    assert track.buffered_ms == 100.0 and track.dropped_ms == 20.0
    with pytest.raises(RuntimeError):
        track.set_sample_rate(16000)                  # frames were sent at 8 kHz


class FakeTime:
    """A clock that only moves when the track sleeps or the test says time passed."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.now += seconds


@pytest.mark.asyncio
async def test_outbound_track_schedule_does_not_drift() -> None:
    clock = FakeTime()
    track = OutboundAudioTrack(16000, clock=clock, sleep=clock.sleep)
    returned = []
    for i in range(50):
        await track.recv()
        returned.append(clock.now)
        clock.now += 0.013 if i % 2 else 0.004            # the consumer's own time, uneven
    # frame n leaves at start + n * 20 ms exactly: the consumer's time is absorbed, never added
    assert returned == pytest.approx([100.0 + n * 0.02 for n in range(50)])
    clock.now = returned[-1] + 0.07                      # frame 50 was due 20 ms later: 50 ms late
    late = []
    for _ in range(4):
        await track.recv()
        late.append(clock.now)
    # sent at once while behind (no sleep), then back on the original grid (101.06 = start + 53 * 20 ms)
    assert late == pytest.approx([101.05, 101.05, 101.05, 101.06])
    clock.now += 1.0                                      # a stall: re-anchored, not 50 frames in a burst
    stalled = clock.now
    await track.recv()
    await track.recv()
    assert clock.now == pytest.approx(stalled + 0.02)
    assert track.frames == 56


@pytest.mark.asyncio
async def test_outbound_track_paces_a_real_loop_and_stops() -> None:
    track = OutboundAudioTrack(16000)
    start = time.monotonic()
    for _ in range(21):
        await track.recv()
    assert time.monotonic() - start >= 0.39             # 20 intervals of 20 ms: never a burst
    track.stop()
    with pytest.raises(MediaStreamError):
        await track.recv()
