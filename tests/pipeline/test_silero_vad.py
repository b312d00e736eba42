"""Tests for pipeline.silero_vad: real speech (Piper) against silence and noise at 8 and 16 kHz, the
model's state kept across 20 ms frames, one shared session, and the error of an install without it."""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import pytest

from pipeline.audio import rms, silence
from pipeline.settings import ConversationSettings
from pipeline.silero_vad import SileroModel, SileroUnavailable, SileroVAD, silero_threshold
from pipeline.turns import new_vad
from pipeline.vad import EnergyVAD, VadEvent
from tests.speech import speech_pcm

SENTENCE = "I would like to book a table for two people tonight."
RATES = (8000, 16000)


@functools.lru_cache(maxsize=1)
def model() -> SileroModel:
    """One session for the module, as the gateway shares one per process."""
    shared = SileroModel()
    shared.load()
    return shared


def silero(**kw: float) -> SileroVAD:
    args = {"start_ms": 60, "stop_ms": 400, **kw}
    return SileroVAD(model(), **args)


def energy() -> EnergyVAD:
    return EnergyVAD(threshold=0.02, start_ms=60, stop_ms=400)


def noise(ms: float, rate: int, dbfs: float = -20.0, seed: int = 7) -> bytes:
    """White noise at ``dbfs`` RMS (-20 dBFS = 0.1 full scale)."""
    n = round(ms * rate / 1000)
    x = np.random.default_rng(seed).standard_normal(n) * 10 ** (dbfs / 20) * 32768
    return np.clip(x, -32768, 32767).astype("<i2").tobytes()


def feed(vad: SileroVAD | EnergyVAD, pcm: bytes, rate: int, chunk_ms: float = 20) -> list[tuple[float, VadEvent]]:
    """Feed ``pcm`` in ``chunk_ms`` chunks; (audio ms at the end of the chunk, event) pairs."""
    step = round(chunk_ms * rate / 1000) * 2
    events = []
    for i in range(0, len(pcm), step):
        event = vad.process(pcm[i:i + step], rate)
        if event is not None:
            events.append((min(i + step, len(pcm)) / 2 / rate * 1000, event))
    return events


def voiced_span_ms(pcm: bytes, rate: int) -> tuple[float, float]:
    """Where the speech in ``pcm`` starts and ends (first and last 10 ms above RMS 0.01), in ms."""
    step = rate // 100 * 2
    loud = [i for i in range(0, len(pcm), step) if rms(pcm[i:i + step]) > 0.01]
    return loud[0] / 2 / rate * 1000, (loud[-1] + step) / 2 / rate * 1000


@pytest.mark.parametrize("rate", RATES)
def test_speech_starts_and_stops_in_time_and_silence_is_not_speech(rate: int) -> None:
    speech = speech_pcm(SENTENCE, sample_rate=rate)
    audio = silence(1000, rate) + speech + silence(1500, rate)
    began, ended = voiced_span_ms(speech, rate)
    vad = silero()
    events = feed(vad, audio, rate)
    assert [e for _, e in events] == [VadEvent.SPEECH_START, VadEvent.SPEECH_STOP], events
    (start_at, _), (stop_at, _) = events
    # start: 2 windows of 32 ms over the threshold, plus the model's onset; stop: vad_stop_ms of windows below
    assert 1000 + began <= start_at <= 1000 + began + 250
    assert 1000 + ended + 400 - 100 <= stop_at <= 1000 + ended + 400 + 300
    assert feed(silero(), silence(3000, rate), rate) == []


@pytest.mark.parametrize("rate", RATES)
def test_a_noise_burst_is_not_speech_for_silero_but_is_for_the_energy_vad(rate: int) -> None:
    """White noise at -20 dBFS for 250 ms: the energy VAD starts a turn (and would barge in), Silero does not."""
    audio = silence(500, rate) + noise(250, rate) + silence(1000, rate)
    vad = silero()
    probabilities = []
    step = rate // 50 * 2
    for i in range(0, len(audio), step):
        assert vad.process(audio[i:i + step], rate) is None
        probabilities.append(vad.probability)
    assert max(probabilities) < 0.35
    assert [e for _, e in feed(energy(), audio, rate)] == [VadEvent.SPEECH_START, VadEvent.SPEECH_STOP]


@pytest.mark.parametrize("rate", RATES)
def test_state_is_kept_across_frames_of_any_size(rate: int) -> None:
    """20 ms frames are buffered into 32 ms windows: the same probabilities as whole windows, or 7 ms
    chunks; and the recurrent state matters (a detector reset at each window hears something else)."""
    audio = silence(300, rate) + speech_pcm(SENTENCE, sample_rate=rate)[: rate * 2]

    def probabilities(chunk_ms: float) -> list[float]:
        vad, out = silero(), []
        step = round(chunk_ms * rate / 1000) * 2
        for i in range(0, len(audio), step):
            before = vad.probability
            vad.process(audio[i:i + step], rate)
            if vad.probability != before:
                out.append(vad.probability)
        return out

    window_ms = 32.0
    whole = probabilities(window_ms)
    assert len(whole) == len(audio) // 2 // round(rate * window_ms / 1000)
    assert probabilities(20) == pytest.approx(whole, abs=1e-6)
    assert probabilities(7) == pytest.approx(whole, abs=1e-6)
    window = round(rate * window_ms / 1000) * 2
    fresh = [silero() for _ in range(0, len(audio), window)]
    for vad, i in zip(fresh, range(0, len(audio), window), strict=False):
        vad.process(audio[i:i + window], rate)
    assert max(abs(a - v.probability) for a, v in zip(whole, fresh, strict=False)) > 0.2


def test_calls_sharing_the_model_do_not_share_state() -> None:
    speech, quiet = speech_pcm(SENTENCE, sample_rate=8000), silence(2500, 8000)
    alone = feed(silero(), speech, 8000)
    talker, listener = silero(), silero()
    step = 320
    together = []
    for i in range(0, len(speech), step):
        event = talker.process(speech[i:i + step], 8000)
        assert listener.process(quiet[i:i + step], 8000) is None
        if event is not None:
            together.append((min(i + step, len(speech)) / 16, event))
    assert together == alone


def test_other_rates_run_at_16k_and_a_rate_change_starts_afresh() -> None:
    vad = silero()
    events = feed(vad, silence(500, 48000) + speech_pcm(SENTENCE, sample_rate=48000), 48000)
    assert events[0][1] is VadEvent.SPEECH_START and vad._rate == 16000
    vad.process(silence(20, 8000), 8000)
    assert vad._rate == 8000 and len(vad._pending) == 160


def test_the_threshold_mapping() -> None:
    assert silero_threshold(ConversationSettings().vad_threshold) == 0.5     # the energy default: Silero's own
    assert silero_threshold(0.7) == 0.7
    settings = dataclasses.replace(ConversationSettings(), vad_type="silero", silero_model=model())
    vad = new_vad(settings)
    assert isinstance(vad, SileroVAD) and vad.model is model()
    assert (vad.threshold, vad.stop_threshold, vad.start_ms, vad.stop_ms) == (0.5, 0.35, 60, 400)
    vad = new_vad(dataclasses.replace(settings, vad_threshold=0.8, vad_stop_ms=250))
    assert isinstance(vad, SileroVAD) and (vad.threshold, vad.stop_threshold, vad.stop_ms) == (0.8, 0.65, 250)
    assert isinstance(new_vad(ConversationSettings()), EnergyVAD)


def test_without_the_packages_the_error_names_the_extra() -> None:
    assert SileroModel().check().name == "silero_vad.onnx"
    for kw, named in (({"package": "voxray_no_such_silero"}, "voxray_no_such_silero"),
                      ({"runtime": "voxray_no_such_runtime"}, "voxray_no_such_runtime")):
        with pytest.raises(SileroUnavailable, match=named) as raised:
            SileroModel(**kw).check()
        assert "pip install 'voxray[silero]'" in str(raised.value)
        assert "--no-deps 'silero-vad==" in str(raised.value)
    with pytest.raises(SileroUnavailable, match="model file"):
        SileroModel(model_file="voxray_missing.onnx").check()
    vad = SileroVAD(SileroModel(package="voxray_no_such_silero"), start_ms=60, stop_ms=400)
    with pytest.raises(SileroUnavailable, match="voxray\\[silero\\]"):
        vad.process(silence(40, 8000), 8000)


def test_settings_holding_the_model_copy_it_by_reference() -> None:
    settings = dataclasses.replace(ConversationSettings(), vad_type="silero", silero_model=model())
    assert dataclasses.asdict(settings)["silero_model"] is model()
    assert settings == dataclasses.replace(settings, silero_model=None)   # a runtime object, not a setting
