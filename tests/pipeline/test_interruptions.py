"""Tests for pipeline.interruptions: the guard fed real Piper speech and synthetic noise through the
energy VAD (as a call's TurnTaker feeds it), with the real Silero model as speech evidence; the
playout it controls and the interruption it commits are recorders."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Iterator

import numpy as np
import pytest

from pipeline.frames import AudioFrame
from pipeline.interruptions import InterruptionGuard, State, backchannel_phrases, is_backchannel
from pipeline.settings import ConversationSettings
from pipeline.silero_vad import SileroModel
from pipeline.vad import EnergyVAD, VadEvent
from tests.speech import speech_pcm

pytestmark = pytest.mark.asyncio

RATE = 8000
FRAME = RATE // 50 * 2      # 20 ms
MODEL = SileroModel()
SETTINGS = ConversationSettings(silero_model=MODEL, false_interruption_secs=5.0)   # no timer unless a test asks


def noise(ms: int, dbfs: float, seed: int = 3) -> bytes:
    x = np.random.default_rng(seed).standard_normal(RATE * ms // 1000) * 10 ** (dbfs / 20) * 32768
    return np.clip(x, -32768, 32767).astype("<i2").tobytes()


def frames(pcm: bytes) -> Iterator[AudioFrame]:
    for i in range(0, len(pcm), FRAME):
        yield AudioFrame(pcm[i:i + FRAME].ljust(FRAME, b"\x00"), RATE)


class Agent:
    """The playout control and the committed interruption, recorded; ``speaking`` as the guard asks."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.speaking = True

    def pause(self) -> None:
        self.calls.append("pause")

    def hold(self) -> None:
        self.calls.append("hold")

    def resume(self) -> None:
        self.calls.append("resume")

    def interrupt(self) -> None:
        self.calls.append("interrupt")


class Caller:
    """Feeds audio frame by frame through an energy VAD into the guard, like a call's TurnTaker."""

    def __init__(self, settings: ConversationSettings = SETTINGS, language: str = "en") -> None:
        self.agent = Agent()
        self.guard = InterruptionGuard(settings=settings, language=language, control=self.agent,
                                       speaking=lambda: self.agent.speaking, interrupt=self.agent.interrupt,
                                       spawn=asyncio.ensure_future)
        self.vad = EnergyVAD(threshold=settings.vad_threshold, start_ms=settings.vad_start_ms, stop_ms=300)
        self.preroll: list[AudioFrame] = []
        self.ms = 0.0
        self.started_ms: float | None = None     # when the VAD heard the sound start
        self.decided_ms: dict[str, float] = {}   # first time each control call happened
        self.kept: bool | None = None            # what on_speech_stop answered

    def feed(self, pcm: bytes) -> None:
        for frame in frames(pcm):
            event = self.vad.process(frame.pcm, RATE)
            if event is VadEvent.SPEECH_START:
                self.started_ms = self.ms
                self.guard.on_speech_start(self.preroll[-15:])
            self.guard.on_audio(frame)
            if event is VadEvent.SPEECH_STOP:
                self.kept = self.guard.on_speech_stop()
            self.preroll.append(frame)
            self.ms += 20.0
            for call in self.agent.calls:
                self.decided_ms.setdefault(call, self.ms)


SILENCE = b"\x00\x00" * (RATE // 2)


@pytest.mark.parametrize(("ms", "dbfs"), [(250, -20.0), (400, -20.0), (400, -10.0), (150, -30.0)])
async def test_a_noise_burst_never_interrupts(ms: int, dbfs: float) -> None:
    caller = Caller()
    caller.feed(SILENCE + noise(ms, dbfs) + SILENCE)
    assert caller.started_ms is not None                  # the energy VAD took it for speech...
    assert "interrupt" not in caller.agent.calls and "hold" not in caller.agent.calls   # ...Silero did not
    assert caller.kept is False                            # the noise is no turn
    assert caller.guard.state is State.IDLE


async def test_a_real_interruption_is_confirmed_quickly_and_committed_by_its_words() -> None:
    caller = Caller()
    caller.feed(SILENCE + speech_pcm("Wait, stop. I need to change my booking.", RATE) + SILENCE)
    assert caller.started_ms is not None
    assert caller.agent.calls[:1] == ["hold"]              # flushed, the answer kept until the words are known
    assert caller.decided_ms["hold"] - caller.started_ms <= 200
    assert caller.kept is True
    assert caller.guard.on_turn("Wait, stop. I need to change my booking.") is False
    assert caller.agent.calls == ["hold", "interrupt"]


@pytest.mark.parametrize("text", ["uh huh", "mm-hmm", "okay"])
async def test_a_backchannel_holds_the_agent_then_lets_it_go_on(text: str) -> None:
    caller = Caller()
    caller.feed(SILENCE + speech_pcm(text, RATE) + SILENCE)
    assert caller.agent.calls == ["hold"]
    assert caller.guard.on_turn(text.capitalize() + ".") is True
    assert caller.agent.calls == ["hold", "resume"]


async def test_with_no_backchannels_speech_commits_at_once() -> None:
    caller = Caller(dataclasses.replace(SETTINGS, backchannels={}))
    caller.feed(SILENCE + speech_pcm("uh huh", RATE))
    assert caller.agent.calls == ["interrupt"]
    assert caller.guard.on_turn("Uh-huh.") is False


async def test_the_backchannels_are_those_of_the_persona_language() -> None:
    caller = Caller(language="de-DE")
    caller.feed(SILENCE + speech_pcm("uh huh", RATE) + SILENCE)
    assert caller.guard.on_turn("Uh-huh.") is False        # not a German backchannel
    assert caller.agent.calls == ["hold", "interrupt"]


async def test_min_words_lets_short_words_through() -> None:
    caller = Caller(dataclasses.replace(SETTINGS, min_words=3))
    caller.feed(SILENCE + speech_pcm("Stop.", RATE) + SILENCE)
    assert caller.guard.on_turn("Stop.") is True
    assert caller.agent.calls == ["hold", "resume"]


async def test_no_speech_in_the_utterance_resumes() -> None:
    caller = Caller()
    caller.feed(SILENCE + speech_pcm("uh huh", RATE) + SILENCE)
    caller.guard.on_silence()                                # the STT heard no words
    assert caller.agent.calls == ["hold", "resume"]


async def test_an_interim_transcript_confirms() -> None:
    caller = Caller()
    caller.feed(SILENCE + speech_pcm("I need", RATE)[: RATE // 5])    # the first 100 ms of speech
    caller.guard.confirm_with_transcript("uh")                          # a backchannel so far: nothing
    assert "interrupt" not in caller.agent.calls
    caller.guard.confirm_with_transcript("I need")
    assert caller.agent.calls[-1] == "interrupt"
    assert caller.guard.state is State.IDLE


async def test_the_silent_agent_is_never_interrupted() -> None:
    caller = Caller()
    caller.agent.speaking = False
    caller.feed(SILENCE + speech_pcm("Wait, stop.", RATE) + SILENCE)
    assert caller.agent.calls == [] and caller.kept is True
    assert caller.guard.on_turn("Wait, stop.") is False


async def test_immediate_strategy_interrupts_on_any_sound() -> None:
    caller = Caller(dataclasses.replace(SETTINGS, interruption_strategy="immediate"))
    caller.feed(SILENCE + noise(250, -20.0))
    assert caller.agent.calls == ["interrupt"]


async def test_without_the_model_sustained_energy_is_the_evidence_and_the_agent_pauses() -> None:
    settings = dataclasses.replace(SETTINGS, silero_model=None, interruption_speech_ms=100)
    caller = Caller(settings)
    caller.feed(SILENCE + noise(60, -20.0) + SILENCE)            # just enough to start the VAD
    assert caller.agent.calls == ["pause", "resume"] and caller.kept is False
    caller = Caller(settings)
    caller.feed(SILENCE + noise(300, -20.0))
    assert caller.agent.calls == ["pause", "hold"]
    assert caller.decided_ms["hold"] - caller.started_ms == pytest.approx(120, abs=20)


async def test_no_evidence_within_false_interruption_secs_resumes_then_speech_still_counts() -> None:
    settings = dataclasses.replace(SETTINGS, silero_model=None, interruption_speech_ms=10_000,
                                   false_interruption_secs=0.05)
    caller = Caller(settings)
    caller.feed(SILENCE + noise(100, -20.0))
    assert caller.agent.calls == ["pause"]
    await asyncio.sleep(0.1)
    assert caller.agent.calls == ["pause", "resume"] and caller.guard.state is State.WATCHING
    caller.feed(SILENCE)
    assert caller.kept is False and caller.guard.state is State.IDLE


async def test_backchannel_phrases() -> None:
    phrases = backchannel_phrases({"en": "uh huh, mm-hmm, yeah, okay, right, i see"}, "en-US")
    assert ("uh", "huh") in phrases and ("mm", "hmm") in phrases
    for text in ("Uh-huh.", "uh huh", "Mm-hmm", "yeah yeah", "Okay, right.", "I see."):
        assert is_backchannel(text, phrases), text
    for text in ("", "yeah but wait", "uh", "no", "right now please"):
        assert not is_backchannel(text, phrases), text
    assert backchannel_phrases({"en": "yeah"}, "fr") == ()
    assert is_backchannel("okay uh", phrases, partial=True) and not is_backchannel("okay uh", phrases)
    assert not is_backchannel("uh what", phrases, partial=True)
