"""Tests for pipeline.playout: 20 ms framing, real-time pacing with a lead, marks, clear, backpressure,
coalescing and the speaking state. The pacer runs for real in an asyncio task; timing asserts are
deliberately generous (tens of milliseconds)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import numpy as np
import pytest

from pipeline.frames import AudioFrame, Clear, Frame, Mark
from pipeline.playout import Playout

pytestmark = pytest.mark.asyncio

RATE = 8000
FRAME_BYTES = RATE // 50 * 2       # 20 ms of PCM16 at 8 kHz
TOL = 0.04                          # seconds of scheduling slack we accept


def pcm(ms: float, value: int = 1000, rate: int = RATE) -> bytes:
    return np.full(round(ms * rate / 1000), value, dtype="<i2").tobytes()


class Sink:
    """The transport: records every frame with the monotonic time it was sent."""

    def __init__(self, delay: float = 0.0) -> None:
        self.frames: list[Frame] = []
        self.times: list[float] = []
        self.delay = delay

    async def __call__(self, frame: Frame) -> None:
        if self.delay:
            await asyncio.sleep(self.delay)
        self.frames.append(frame)
        self.times.append(time.monotonic())

    def audio(self) -> list[AudioFrame]:
        return [f for f in self.frames if isinstance(f, AudioFrame)]

    def audio_bytes(self) -> bytes:
        return b"".join(f.pcm for f in self.audio())

    def kinds(self) -> list[str]:
        return [type(f).__name__ for f in self.frames]


@contextlib.asynccontextmanager
async def running(playout: Playout, sink: Sink) -> AsyncIterator[Sink]:
    task = asyncio.create_task(playout.run(sink))
    try:
        async with asyncio.timeout(10):
            yield sink
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def wait_for(cond, timeout: float = 3.0) -> None:
    async with asyncio.timeout(timeout):
        while not cond():
            await asyncio.sleep(0.002)


def new(**kw) -> Playout:
    args = {"sample_rate": RATE, "lead_ms": 60, "max_buffer_ms": 10000}
    args.update(kw)
    return Playout(**args)


# ------------------------------------------------------------------------------ framing

@pytest.mark.parametrize("rate", [8000, 16000, 24000])
async def test_audio_goes_out_in_20ms_frames_at_the_sample_rate(rate: int) -> None:
    playout = new(sample_rate=rate, lead_ms=200)
    async with running(playout, Sink()) as sink:
        data = pcm(100, rate=rate)
        await playout.write(data)
        await playout.drained()
    frames = sink.audio()
    assert len(frames) == 5
    assert all(f.sample_rate == rate and f.duration_ms == pytest.approx(20.0) for f in frames)
    assert sink.audio_bytes() == data


async def test_writes_of_any_size_are_reframed_and_the_tail_waits_for_end_of_audio() -> None:
    playout = new(lead_ms=200)
    rng = np.random.default_rng(1)
    data = rng.integers(-2000, 2000, 2330).astype("<i2").tobytes()   # 291.25 ms: 14 frames and a tail
    async with running(playout, Sink()) as sink:
        cuts = [0, 2, 50, 320, 321 * 2, 2000, 4000, len(data) - 100, len(data)]
        for a, b in zip(cuts, cuts[1:], strict=False):
            await playout.write(data[a:b])
        await wait_for(lambda: len(sink.audio()) == 14)
        await asyncio.sleep(0.05)
        assert len(sink.audio()) == 14                       # whole frames only; the 11.25 ms tail is held
        assert all(len(f.pcm) == FRAME_BYTES for f in sink.audio())
        playout.end_of_audio()
        await playout.drained()
    assert sink.audio_bytes() == data
    assert len(sink.audio()) == 15
    assert sink.audio()[-1].duration_ms == pytest.approx(11.25)


async def test_short_tail_is_sent_as_a_short_frame() -> None:
    playout = new(lead_ms=200)
    async with running(playout, Sink()) as sink:
        await playout.write(pcm(30))
        await wait_for(lambda: len(sink.audio()) == 1)
        assert playout.queued_ms == pytest.approx(10.0)
        playout.end_of_audio()
        await playout.drained()
    assert [f.duration_ms for f in sink.audio()] == pytest.approx([20.0, 10.0])


# ------------------------------------------------------------------------------ pacing

@pytest.mark.parametrize("lead_ms", [40, 100])
async def test_pacing_keeps_at_most_lead_plus_one_frame_ahead_of_real_time(lead_ms: int) -> None:
    playout = new(lead_ms=lead_ms)
    total_ms = 400
    async with running(playout, Sink()) as sink:
        t_write = time.monotonic()
        await playout.write(pcm(total_ms))
        await playout.drained()
        t_drained = time.monotonic()
    times = sink.times
    assert len(times) == total_ms // 20
    t0 = times[0]
    assert t0 - t_write < TOL                                # the first frame goes out at once
    # the lead goes out immediately (a burst of lead/20 frames)...
    burst = sum(1 for t in times if t - t0 < 0.01)
    assert burst >= lead_ms // 20
    # ...and then never more than lead + one frame ahead of real time
    for i, t in enumerate(times):
        ahead_ms = (i + 1) * 20 - (t - t0) * 1000.0
        assert ahead_ms <= lead_ms + 20 + TOL * 1000, (i, ahead_ms)
    # sending takes about the audio's duration minus the lead (it is not dumped at once)
    assert times[-1] - t0 >= (total_ms - lead_ms - 20) / 1000.0 - TOL
    assert times[-1] - t0 <= total_ms / 1000.0 + 0.2
    # drained() waits until the listener has heard the end
    assert t_drained - t0 >= total_ms / 1000.0 - TOL


async def test_audio_written_later_restarts_the_clock_with_a_fresh_lead() -> None:
    playout = new(lead_ms=60)
    async with running(playout, Sink()) as sink:
        await playout.write(pcm(100))
        await playout.drained()
        await asyncio.sleep(0.2)                              # the transport ran dry
        n = len(sink.frames)
        t = time.monotonic()
        await playout.write(pcm(100))
        await wait_for(lambda: len(sink.frames) >= n + 3)
        assert time.monotonic() - t < TOL                     # the lead goes out at once again
        await playout.drained()
    assert len(sink.audio()) == 10


# ------------------------------------------------------------------------------ marks

async def test_marks_follow_the_audio_written_before_them() -> None:
    playout = new(lead_ms=40)
    async with running(playout, Sink()) as sink:
        await playout.write(pcm(100, value=1))
        playout.mark("a")
        await playout.write(pcm(40, value=2))
        playout.mark("b")
        await playout.drained()
    assert sink.kinds() == ["AudioFrame"] * 5 + ["Mark"] + ["AudioFrame"] * 2 + ["Mark"]
    assert sink.frames[5] == Mark("a") and sink.frames[8] == Mark("b")
    assert all(f.pcm == pcm(20, value=1) for f in sink.frames[:5])


async def test_a_mark_waits_for_its_audio_to_be_sent_paced() -> None:
    playout = new(lead_ms=40)
    async with running(playout, Sink()) as sink:
        t = time.monotonic()
        await playout.write(pcm(300))
        playout.mark("end")
        await wait_for(lambda: Mark("end") in sink.frames)
        elapsed = time.monotonic() - t
    assert elapsed >= (300 - 40 - 20) / 1000.0 - TOL
    assert sink.frames[-1] == Mark("end")


async def test_mark_flushes_a_short_tail_first() -> None:
    playout = new(lead_ms=200)
    async with running(playout, Sink()) as sink:
        await playout.write(pcm(30))
        playout.mark("m")
        await playout.drained()
    assert sink.kinds() == ["AudioFrame", "AudioFrame", "Mark"]
    assert sink.frames[1].duration_ms == pytest.approx(10.0)


async def test_acknowledge_is_true_once_for_a_sent_mark() -> None:
    playout = new(lead_ms=200)
    async with running(playout, Sink()) as sink:
        await playout.write(pcm(40))
        playout.mark("r1-c0")
        await wait_for(lambda: Mark("r1-c0") in sink.frames)
        assert "r1-c0" in playout.pending_marks
        assert playout.acknowledge("r1-c0") is True
        assert playout.acknowledge("r1-c0") is False
        assert playout.acknowledge("never-sent") is False
        assert not playout.pending_marks


# ------------------------------------------------------------------------------ clear

async def test_clear_drops_queued_audio_and_sends_clear_before_later_audio() -> None:
    playout = new(lead_ms=40)
    async with running(playout, Sink()) as sink:
        await playout.write(pcm(60, value=1))
        playout.mark("early")
        await playout.write(pcm(1000, value=1))
        playout.mark("late")
        await wait_for(lambda: Mark("early") in sink.frames)
        await asyncio.sleep(0.06)
        playout.clear()
        assert playout.queued_ms == 0.0
        await playout.write(pcm(60, value=2))
        playout.mark("new")
        await playout.drained()
        # marks sent before the clear were flushed, not played
        assert playout.acknowledge("early") is False
        assert playout.acknowledge("new") is True
    kinds = sink.kinds()
    assert kinds.count("Clear") == 1
    i = kinds.index("Clear")
    before, after = sink.frames[:i], sink.frames[i + 1:]
    assert all(f.pcm == pcm(20, value=1) for f in before if isinstance(f, AudioFrame))
    assert [f for f in after if isinstance(f, AudioFrame)] == [AudioFrame(pcm(20, value=2), RATE)] * 3
    assert Mark("late") not in sink.frames
    old_ms = sum(f.duration_ms for f in before if isinstance(f, AudioFrame))
    assert old_ms < 400                                       # most of the second of audio was dropped


async def test_clear_is_sent_before_audio_even_with_a_slow_transport() -> None:
    playout = new(lead_ms=100)
    async with running(playout, Sink(delay=0.01)) as sink:
        await playout.write(pcm(500, value=1))
        await wait_for(lambda: len(sink.frames) >= 2)
        playout.clear()
        await playout.write(pcm(40, value=2))
        await playout.drained()
    i = sink.kinds().index("Clear")
    assert all(f.pcm == pcm(20, value=1) for f in sink.audio()[:i])
    assert all(isinstance(f, AudioFrame) and f.pcm == pcm(20, value=2) for f in sink.frames[i + 1:])


async def test_clear_when_idle_still_sends_clear_and_stays_quiet() -> None:
    playout = new()
    async with running(playout, Sink()) as sink:
        playout.clear()
        await wait_for(lambda: sink.frames == [Clear()])
        await playout.drained()
        assert not playout.speaking


async def test_clear_rewinds_sent_ms_to_what_was_played() -> None:
    playout = new(lead_ms=200)
    async with running(playout, Sink()):
        await playout.write(pcm(1000))
        await asyncio.sleep(0.1)
        assert playout.sent_ms >= 200                          # the lead went out ahead
        played = playout.played_ms()
        playout.clear()
        assert playout.sent_ms == pytest.approx(played, abs=TOL * 1000)
        assert playout.played_ms() == pytest.approx(playout.sent_ms, abs=1)
        assert 60 <= playout.sent_ms <= 100 + TOL * 1000 + 20


async def test_clear_releases_a_blocked_writer() -> None:
    playout = new(lead_ms=20, max_buffer_ms=100)
    async with running(playout, Sink()):
        writer = asyncio.create_task(playout.write(pcm(2000)))
        await asyncio.sleep(0.05)
        assert not writer.done()
        playout.clear()
        await asyncio.wait_for(writer, 0.5)


# ------------------------------------------------------------------------------ backpressure

async def test_write_blocks_while_more_than_max_buffer_is_queued() -> None:
    playout = new(lead_ms=20, max_buffer_ms=100)
    async with running(playout, Sink()) as sink:
        t = time.monotonic()
        await playout.write(pcm(500))
        waited = time.monotonic() - t
        assert playout.queued_ms <= 100
        # 500 ms queued, released once at most 100 ms remain: about 400 - lead ms of real time
        assert waited >= 0.3
        assert waited <= 0.5 + TOL * 3
        await playout.drained()
    assert len(sink.audio()) == 25


async def test_small_writes_do_not_block_under_the_limit_and_resume_as_it_drains() -> None:
    playout = new(lead_ms=20, max_buffer_ms=200)
    async with running(playout, Sink()):
        t = time.monotonic()
        for _ in range(8):                                     # 160 ms: under the limit
            await playout.write(pcm(20))
        assert time.monotonic() - t < TOL
        progress: list[tuple[float, float]] = []
        for _ in range(30):                                    # 600 ms more: the writer is paced
            await playout.write(pcm(20))
            progress.append((time.monotonic() - t, playout.queued_ms))
        elapsed = time.monotonic() - t
        assert all(q <= 200 for _, q in progress)
        assert elapsed >= (760 - 200 - 20 - 20) / 1000.0 - TOL
        # it resumed in steps rather than once at the end
        assert progress[5][0] < progress[-1][0] - 0.2


# ------------------------------------------------------------------------------ longer messages

def ahead_after_each_send(sink: Sink) -> list[float]:
    """The audio the transport held right after each message (its clock: real time, from the first send)."""
    play_until, ahead = 0.0, []
    for at, frame in zip(sink.times, sink.frames, strict=True):
        if isinstance(frame, AudioFrame):
            play_until = max(play_until, at) + frame.duration_ms / 1000.0
            ahead.append(play_until - at)
    return ahead


async def test_message_ms_merges_queued_frames_into_messages_of_that_length_still_paced() -> None:
    rng = np.random.default_rng(7)
    data = rng.integers(-3000, 3000, 8000 * 6 // 10).astype("<i2").tobytes()   # 600 ms
    plain, merged = new(lead_ms=100), new(lead_ms=100, message_ms=60)
    async with running(plain, Sink()) as plain_sink:
        await plain.write(data)
        await plain.drained()
    async with running(merged, Sink()) as merged_sink:
        t = time.monotonic()
        await merged.write(data)
        await merged.drained()
        elapsed = time.monotonic() - t
    assert {f.duration_ms for f in plain_sink.audio()} == {20.0}
    frames = merged_sink.audio()
    assert merged_sink.audio_bytes() == data                   # same audio, same order
    assert [f.duration_ms for f in frames] == [60.0] * 10
    assert all(f.sample_rate == RATE for f in frames)
    assert elapsed >= 0.6 - TOL                                 # still paced to real time
    # it sends again once the lead is down to 100 - (60 - 20) / 2 = 80 ms: never more than 140 ms ahead,
    # the most one frame at a time holds (100 + 20) plus half the extra 40 ms
    assert max(ahead_after_each_send(merged_sink)) <= 0.140 + 1e-6
    assert max(ahead_after_each_send(plain_sink)) <= 0.120 + 1e-6


async def test_message_ms_never_holds_audio_back_for_a_fuller_message() -> None:
    playout = new(lead_ms=100, message_ms=100)
    async with running(playout, Sink()) as sink:
        t = time.monotonic()
        await playout.write(pcm(20))
        while not sink.audio():
            await asyncio.sleep(0.001)
    assert sink.times[0] - t < TOL and sink.audio()[0].duration_ms == 20.0


async def test_message_ms_shorter_than_a_frame_or_a_tick_the_lead_cannot_cover_is_refused() -> None:
    with pytest.raises(ValueError, match="message_ms"):
        new(lead_ms=100, message_ms=10)
    with pytest.raises(ValueError, match="tick_ms"):
        new(lead_ms=100, message_ms=180, tick_ms=20)      # it would send again at a 20 ms lead
    new(lead_ms=100, message_ms=160, tick_ms=20)


async def test_message_ms_does_not_merge_across_marks() -> None:
    playout = new(lead_ms=100, message_ms=100)
    async with running(playout, Sink()) as sink:
        await playout.write(pcm(40, value=1))
        playout.mark("a")
        await playout.write(pcm(40, value=2))
        await playout.drained()
    kinds = sink.kinds()
    i = kinds.index("Mark")
    assert sink.frames[i] == Mark("a")
    assert b"".join(f.pcm for f in sink.frames[:i]) == pcm(40, value=1)
    assert b"".join(f.pcm for f in sink.frames[i + 1:]) == pcm(40, value=2)


# ------------------------------------------------------------------------------ the shared wake-up grid

async def test_timed_wake_ups_fall_on_the_tick_grid_and_the_audio_is_unchanged() -> None:
    loop = asyncio.get_running_loop()
    scheduled: list[float] = []
    call_at = loop.call_at

    def recording_call_at(when: float, callback, *args, **kw):   # the loop's timer observed, our code unpatched
        if getattr(callback, "__module__", "") == "pipeline.playout":
            scheduled.append(when)
        return call_at(when, callback, *args, **kw)

    loop.call_at = recording_call_at             # type: ignore[method-assign] - an instance attribute shadows it
    try:
        rng = np.random.default_rng(3)
        data = rng.integers(-3000, 3000, 8000 * 3 // 10).astype("<i2").tobytes()   # 300 ms
        playout = new(lead_ms=40, tick_ms=10)
        async with running(playout, Sink()) as sink:
            await playout.write(data)
            await playout.drained()
    finally:
        del loop.call_at
    assert sink.audio_bytes() == data and len(sink.audio()) == 15
    assert len(scheduled) >= 5                                  # 300 ms at a 40 ms lead: the pacer slept
    assert all(abs(w / 0.01 - round(w / 0.01)) < 1e-6 for w in scheduled)


@pytest.mark.parametrize("tick_ms", [-1, 40, 100])
async def test_a_tick_must_be_below_the_lead(tick_ms: float) -> None:
    with pytest.raises(ValueError, match="tick_ms"):
        new(lead_ms=40, tick_ms=tick_ms)


# ------------------------------------------------------------------------------ speaking state

async def test_speaking_played_ms_and_drained() -> None:
    playout = new(lead_ms=60)
    async with running(playout, Sink()):
        assert not playout.speaking and playout.played_ms() == 0.0
        await playout.drained()                                # nothing queued: returns at once
        await playout.write(pcm(300))
        assert playout.speaking
        await asyncio.sleep(0.15)
        assert playout.speaking
        played = playout.played_ms()
        assert 150 - TOL * 1000 <= played <= 150 + TOL * 1000
        assert played < playout.sent_ms <= played + 60 + 20 + 1
        await playout.drained()
        assert not playout.speaking
        assert playout.sent_ms == pytest.approx(300.0)
        assert playout.played_ms() == pytest.approx(300.0)
        assert playout.queued_ms == 0.0


async def test_drained_flushes_the_tail() -> None:
    playout = new()
    async with running(playout, Sink()) as sink:
        await playout.write(pcm(10))
        await asyncio.wait_for(playout.drained(), 1.0)
    assert sink.audio_bytes() == pcm(10)


async def test_on_speaking_fires_true_then_false_once_per_utterance() -> None:
    calls: list[tuple[bool, float]] = []
    playout = new(lead_ms=60, on_speaking=lambda s, at: calls.append((s, at)))
    async with running(playout, Sink()):
        await playout.write(pcm(100))
        await asyncio.sleep(0.03)
        await playout.write(pcm(100))                           # same utterance: no False in between
        await playout.drained()
        await asyncio.sleep(0.05)
        assert [s for s, _ in calls] == [True, False]
        (_, t_on), (_, t_off) = calls
        assert t_off - t_on >= 0.2 - TOL
        await playout.write(pcm(60))
        await playout.drained()
        await asyncio.sleep(0.02)
    assert [s for s, _ in calls] == [True, False, True, False]


async def test_on_speaking_false_after_a_clear() -> None:
    calls: list[bool] = []
    playout = new(lead_ms=60, on_speaking=lambda s, at: calls.append(s))
    async with running(playout, Sink()):
        await playout.write(pcm(1000))
        await asyncio.sleep(0.05)
        assert calls == [True]
        playout.clear()
        await wait_for(lambda: calls == [True, False], timeout=0.5)
        assert not playout.speaking


# ------------------------------------------------------------------------------ pause, hold, resume

def numbered(frames: int) -> bytes:
    """``frames`` 20 ms frames, frame i filled with the value i + 1."""
    return b"".join(pcm(20, i + 1) for i in range(frames))


async def test_pause_stops_sending_and_resume_goes_on() -> None:
    playout = new()
    async with running(playout, Sink()) as sink:
        await playout.write(numbered(30))
        await wait_for(lambda: len(sink.audio()) >= 5)
        playout.pause()
        sent = len(sink.audio())
        await asyncio.sleep(0.15)
        assert len(sink.audio()) == sent and playout.paused and playout.speaking
        playout.resume()
        await playout.drained()
    assert sink.audio_bytes() == numbered(30) and Clear() not in sink.frames


async def test_hold_flushes_the_transport_and_resends_what_it_had_not_played() -> None:
    """After a hold and a resume the listener hears every frame once: what the transport had not played
    when it was flushed is sent again, and the stream position counts it once."""
    playout = new(lead_ms=100)
    async with running(playout, Sink()) as sink:
        await playout.write(numbered(40))
        playout.mark("m1")
        await wait_for(lambda: len(sink.audio()) >= 12)
        playout.hold()
        await wait_for(lambda: Clear() in sink.frames)
        at_clear = sink.frames.index(Clear())
        before = [f.pcm for f in sink.frames[:at_clear] if isinstance(f, AudioFrame)]
        await asyncio.sleep(0.1)
        assert len(sink.frames) == at_clear + 1             # paused: nothing after the flush
        playout.resume()
        await playout.drained()
    after = b"".join(f.pcm for f in sink.frames[at_clear + 1:] if isinstance(f, AudioFrame))
    stream, sent = numbered(40), b"".join(before)
    assert stream.startswith(sent) and stream.endswith(after)   # the rest of the stream, in order
    resent = len(sent) + len(after) - len(stream)
    assert 1 * FRAME_BYTES <= resent <= 6 * FRAME_BYTES          # from within the flushed lead (100 ms)
    assert sink.frames[-1] == Mark("m1")
    assert playout.sent_ms == pytest.approx(800, abs=20)    # the stream counts each frame once


async def test_a_clear_after_a_hold_sends_no_second_flush() -> None:
    playout = new()
    async with running(playout, Sink()) as sink:
        await playout.write(numbered(20))
        await wait_for(lambda: len(sink.audio()) >= 3)
        playout.hold()
        await wait_for(lambda: Clear() in sink.frames)
        playout.clear()
        await asyncio.sleep(0.05)
        assert not playout.paused and not playout.speaking
        await playout.write(numbered(2))
        await playout.drained()
    assert sink.kinds().count("Clear") == 1


class CountingPlayout(Playout):
    """Counts the pacer's waits (each one a timer or a wake-up, then a task step)."""

    waits = 0

    async def _sleep(self, loop: asyncio.AbstractEventLoop, delay: float | None) -> None:
        self.waits += 1
        await super()._sleep(loop, delay)


async def test_audio_streamed_in_while_pacing_does_not_wake_the_pacer() -> None:
    """A TTS body arrives in many small chunks while the pacer waits for the lead to shrink: the pacer
    wakes once per frame it sends, not once more per chunk."""
    playout = CountingPlayout(sample_rate=RATE, lead_ms=60, max_buffer_ms=10000, tick_ms=10)
    sink = Sink()
    async with running(playout, sink):
        await playout.write(pcm(200))                  # the lead fills; the pacer starts pacing
        for _ in range(40):                            # 1 s more in 25 ms chunks, faster than real time
            await playout.write(pcm(25))
            await asyncio.sleep(0.01)
        playout.end_of_audio()
        await wait_for(lambda: len(sink.audio_bytes()) >= len(pcm(1200)), timeout=5)
    frames = len(sink.audio())
    assert frames == 60
    assert playout.waits <= frames + 5, (playout.waits, frames)     # was about frames + chunks
