"""Tests for pipeline.vad: EnergyVAD start/stop hysteresis over chunks of any size."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.audio import rms
from pipeline.vad import EnergyVAD, VadEvent

RATE = 8000


def level(value: float, ms: float, rate: int = RATE) -> bytes:
    """PCM16 of alternating +/- samples whose RMS is ``value`` (full scale = 1.0)."""
    n = round(ms * rate / 1000)
    amp = round(value * 32768)
    x = np.full(n, amp, dtype=np.int32)
    x[1::2] *= -1
    return x.astype("<i2").tobytes()


def feed(vad: EnergyVAD, pcm: bytes, chunk_ms: float, rate: int = RATE) -> list[tuple[float, VadEvent]]:
    """Feed ``pcm`` in ``chunk_ms`` chunks; return (audio ms at the end of the chunk, event) pairs."""
    step = round(chunk_ms * rate / 1000) * 2
    events, pos = [], 0.0
    for i in range(0, len(pcm), step):
        chunk = pcm[i:i + step]
        pos += len(chunk) / 2 / rate * 1000
        event = vad.process(chunk, rate)
        if event is not None:
            events.append((round(pos, 6), event))
    return events


def new_vad(**kw: float) -> EnergyVAD:
    args = {"threshold": 0.02, "start_ms": 60, "stop_ms": 400}
    args.update(kw)
    return EnergyVAD(**args)


def test_level_helper_is_exact() -> None:
    assert rms(level(0.1, 20)) == pytest.approx(0.1, rel=1e-3)
    assert rms(level(0.0, 20)) == 0.0


def test_silence_never_starts_speech() -> None:
    vad = new_vad()
    assert feed(vad, level(0.0, 2000), 20) == []
    assert not vad.speaking
    assert vad.silence_ms == 0.0


def test_speech_starts_after_start_ms_above_threshold() -> None:
    vad = new_vad()
    events = feed(vad, level(0.1, 200), 20)
    assert events == [(60.0, VadEvent.SPEECH_START)]
    assert vad.speaking


def test_short_burst_below_start_ms_is_ignored_and_the_run_resets() -> None:
    vad = new_vad()
    # 40 ms loud, 20 ms quiet, 40 ms loud: never 60 ms in a row
    pcm = level(0.1, 40) + level(0.0, 20) + level(0.1, 40) + level(0.0, 20)
    assert feed(vad, pcm, 20) == []
    assert not vad.speaking
    # now 60 ms in a row starts speech
    assert feed(vad, level(0.1, 60), 20) == [(60.0, VadEvent.SPEECH_START)]


def test_level_just_above_threshold_counts_as_speech_and_just_below_does_not() -> None:
    vad = new_vad(threshold=0.05)
    assert feed(vad, level(0.048, 500), 20) == []
    assert feed(vad, level(0.0502, 60), 20) == [(60.0, VadEvent.SPEECH_START)]


def test_speech_stops_after_stop_ms_of_silence() -> None:
    vad = new_vad()
    feed(vad, level(0.1, 100), 20)
    assert vad.speaking
    events = feed(vad, level(0.0, 1000), 20)
    assert events == [(400.0, VadEvent.SPEECH_STOP)]
    assert not vad.speaking


def test_stop_uses_the_lower_hysteresis_threshold() -> None:
    vad = new_vad(threshold=0.1, stop_ratio=0.5)
    assert vad.stop_threshold == pytest.approx(0.05)
    feed(vad, level(0.2, 100), 20)
    assert vad.speaking
    # below the start threshold but above the stop threshold: still speech, forever
    assert feed(vad, level(0.07, 2000), 20) == []
    assert vad.speaking and vad.silence_ms == 0.0
    # below the stop threshold: stops after stop_ms
    assert feed(vad, level(0.03, 600), 20) == [(400.0, VadEvent.SPEECH_STOP)]


def test_default_stop_ratio_is_below_one() -> None:
    vad = new_vad(threshold=0.05)
    assert 0 < vad.stop_threshold < vad.threshold


def test_a_loud_chunk_during_the_silence_run_resets_it() -> None:
    vad = new_vad()
    feed(vad, level(0.1, 100), 20)
    pcm = level(0.0, 300) + level(0.1, 20) + level(0.0, 300)
    assert feed(vad, pcm, 20) == []
    assert vad.speaking
    assert vad.silence_ms == pytest.approx(300.0)
    assert feed(vad, level(0.0, 100), 20) == [(100.0, VadEvent.SPEECH_STOP)]


def test_silence_ms_grows_while_speaking_and_is_zero_otherwise() -> None:
    vad = new_vad()
    assert vad.silence_ms == 0.0
    feed(vad, level(0.1, 60), 20)
    assert vad.silence_ms == 0.0
    for expected in (20.0, 40.0, 60.0):
        vad.process(level(0.0, 20), RATE)
        assert vad.silence_ms == pytest.approx(expected)
    vad.process(level(0.1, 20), RATE)
    assert vad.silence_ms == 0.0
    feed(vad, level(0.0, 400), 20)
    assert not vad.speaking
    assert vad.silence_ms == 0.0
    # a partial speech run before start is not reported as silence either
    vad.process(level(0.1, 20), RATE)
    assert vad.silence_ms == 0.0


@pytest.mark.parametrize("chunk_ms", [5, 10, 20, 30, 60])
def test_timing_is_in_audio_ms_whatever_the_chunk_size(chunk_ms: float) -> None:
    vad = new_vad(start_ms=60, stop_ms=240)
    events = feed(vad, level(0.1, 300) + level(0.0, 600), chunk_ms)
    assert [e for _, e in events] == [VadEvent.SPEECH_START, VadEvent.SPEECH_STOP]
    start, stop = events[0][0], events[1][0]
    # the event fires on the chunk that completes the run
    assert 60 <= start < 60 + chunk_ms
    assert 300 + 240 <= stop < 300 + 240 + chunk_ms


def test_one_large_chunk_starts_speech_at_once() -> None:
    vad = new_vad(start_ms=60)
    assert vad.process(level(0.1, 100), RATE) is VadEvent.SPEECH_START
    assert vad.process(level(0.0, 500), RATE) is VadEvent.SPEECH_STOP


@pytest.mark.parametrize("rate", [8000, 16000, 48000])
def test_durations_follow_the_sample_rate(rate: int) -> None:
    vad = new_vad(start_ms=100, stop_ms=200)
    events = feed(vad, level(0.1, 300, rate) + level(0.0, 400, rate), 20, rate)
    assert events == [(100.0, VadEvent.SPEECH_START), (500.0, VadEvent.SPEECH_STOP)]


def test_empty_chunk_is_ignored() -> None:
    vad = new_vad()
    assert vad.process(b"", RATE) is None
    feed(vad, level(0.1, 40), 20)
    assert vad.process(b"", RATE) is None
    assert vad.process(level(0.1, 20), RATE) is VadEvent.SPEECH_START


def test_restarts_after_a_stop() -> None:
    vad = new_vad(start_ms=40, stop_ms=100)
    turn = level(0.1, 200) + level(0.0, 200)
    events = feed(vad, turn + turn, 20)
    assert events == [(40.0, VadEvent.SPEECH_START), (300.0, VadEvent.SPEECH_STOP),
                      (440.0, VadEvent.SPEECH_START), (700.0, VadEvent.SPEECH_STOP)]


def test_sine_speech_at_typical_levels() -> None:
    t = np.arange(RATE) / RATE
    loud = (0.3 * 32767 * np.sin(2 * np.pi * 440 * t)).astype("<i2").tobytes()
    quiet = (0.005 * 32767 * np.sin(2 * np.pi * 440 * t)).astype("<i2").tobytes()
    vad = new_vad()
    events = feed(vad, quiet[:8000] + loud[:8000] + quiet, 20)
    assert [e for _, e in events] == [VadEvent.SPEECH_START, VadEvent.SPEECH_STOP]
