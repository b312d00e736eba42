"""Tests for pipeline.turns: turn end, long speech and DTMF through a whole conversation (see
tests/pipeline/call_harness.py), and the TurnTaker alone, fed frames on a fake clock."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import Any

import numpy as np
import pytest

from pipeline.conversation import (
    BotSpeaking,
    ConversationSettings,
    TranscriptEvent,
    TurnLatency,
)
from pipeline.frames import AudioFrame
from pipeline.provider_chain import ProvidersFailed
from pipeline.turns import PIPELINE_RATE, Turn, TurnTaker
from tests.pipeline.call_harness import (
    FAST,
    IN_RATE,
    SILENCE_FRAME,
    SPEECH_FRAME,
    SYSTEM,
    ScriptedLLM,
    ScriptedSTT,
    call,
    transcripts,
)

pytestmark = pytest.mark.asyncio


async def test_silence_alone_never_reaches_the_stt() -> None:
    stt = ScriptedSTT(["x"])
    async with call(stt=[stt]) as h:
        await asyncio.sleep(0.3)
    assert stt.calls == [] and h.events == []


async def test_empty_transcript_is_not_a_turn() -> None:
    stt = ScriptedSTT([""])
    llm = ScriptedLLM(["Ok."])
    async with call(stt=[stt], llm=[llm]) as h:
        await h.say(200)
        await h.until(lambda: len(stt.calls) == 1)
        await asyncio.sleep(0.2)
    assert llm.calls == [] and h.events == [] and h.convo.messages == [SYSTEM]


async def test_incomplete_sounding_text_waits_for_turn_stop_secs() -> None:
    stt = ScriptedSTT(["I would like to book a table for"])
    llm = ScriptedLLM(["For how many?"])
    async with call(stt=[stt], llm=[llm]) as h:
        speech_end = await h.say(300)
        await h.until(lambda: len(stt.calls) == 1)
        await asyncio.sleep(FAST.turn_stop_secs / 2)
        assert transcripts(h, "user") == [] and llm.calls == []      # still waiting
        await h.until_event(lambda e: isinstance(e, TranscriptEvent) and e.role == "user")
        waited = h.time_of(lambda e: isinstance(e, TranscriptEvent)) - speech_end
        await h.until(lambda: BotSpeaking(False) in h.events)
    assert FAST.turn_stop_secs - 0.05 <= waited <= FAST.turn_stop_secs + 0.25
    assert len(stt.calls) == 1
    assert llm.calls[0][-1] == {"role": "user", "content": "I would like to book a table for"}
    [lat] = h.of(TurnLatency)
    assert lat.first_audio_out_ms >= FAST.turn_stop_secs * 1000 - 50


async def test_speech_resuming_during_the_wait_continues_the_same_turn() -> None:
    stt = ScriptedSTT(["I would like to book a table for", "I would like to book a table for two people."])
    llm = ScriptedLLM(["Sure."])
    async with call(stt=[stt], llm=[llm]) as h:
        await h.say(300)
        await h.until(lambda: len(stt.calls) == 1)
        await asyncio.sleep(0.1)                                      # inside the turn_stop wait
        await h.say(300)
        await h.until(lambda: BotSpeaking(False) in h.events)
    assert len(stt.calls) == 2
    # the second transcription covers the whole turn: both bursts of speech
    assert stt.calls[1]["bytes"] >= stt.calls[0]["bytes"] + 300 * IN_RATE // 500
    assert transcripts(h, "user") == ["I would like to book a table for two people."]
    assert [m for m in h.convo.messages if m["role"] == "user"] == [
        {"role": "user", "content": "I would like to book a table for two people."}]
    assert len(llm.calls) == 1


async def test_long_speech_is_cut_into_turns_at_max_utterance_secs() -> None:
    settings = dataclasses.replace(FAST, max_utterance_secs=0.5)
    stt = ScriptedSTT(["part one.", "part two.", "part three.", "part four."])
    llm = ScriptedLLM(["Ok."])
    async with call(stt=[stt], llm=[llm], settings=settings) as h:
        t = time.monotonic()
        h.speech.extend([SPEECH_FRAME] * 60)                           # 1.2 s without a pause
        await h.until(lambda: len(stt.calls) >= 1, timeout=2)
        first_cut = time.monotonic() - t
        await h.until(lambda: not h.speech)
        await asyncio.sleep(0.5)
    assert first_cut <= 0.5 + 0.1
    # every part of the speech is transcribed, none of it twice
    assert {c["sample_rate"] for c in stt.calls} == {IN_RATE}
    transcribed_ms = sum(c["bytes"] for c in stt.calls) / (IN_RATE // 500)
    assert 1200 <= transcribed_ms <= 1200 + FAST.preroll_ms + 250
    users = [m["content"] for m in h.convo.messages if m["role"] == "user"]
    assert users == [f"part {n}." for n in ("one", "two", "three")[:len(users)]] and len(users) >= 2


async def test_dtmf_digits_and_hash_become_a_user_message() -> None:
    llm = ScriptedLLM(["Got it."])
    async with call(stt=[ScriptedSTT(["x"])], llm=[llm]) as h:
        for d in "12#":
            h.convo.on_dtmf(d)
        await h.until(lambda: transcripts(h, "assistant") == ["Got it."])
    assert transcripts(h, "user") == ["[DTMF] 12"]
    assert llm.calls == [[SYSTEM, {"role": "user", "content": "[DTMF] 12"}]]
    assert {"role": "user", "content": "[DTMF] 12"} in h.convo.messages


async def test_dtmf_digits_are_submitted_after_the_timeout() -> None:
    llm = ScriptedLLM(["Got it."])
    async with call(stt=[ScriptedSTT(["x"])], llm=[llm]) as h:
        t = time.monotonic()
        h.convo.on_dtmf("3")
        await asyncio.sleep(0.1)
        h.convo.on_dtmf("4")                                           # restarts the timer
        await h.until(lambda: transcripts(h, "user") != [])
        waited = time.monotonic() - t
    assert transcripts(h, "user") == ["[DTMF] 34"]
    assert 0.1 + FAST.dtmf_timeout_ms / 1000 - 0.03 <= waited <= 0.1 + FAST.dtmf_timeout_ms / 1000 + 0.15


async def test_a_lone_hash_is_ignored() -> None:
    llm = ScriptedLLM(["Got it."])
    async with call(stt=[ScriptedSTT(["x"])], llm=[llm]) as h:
        h.convo.on_dtmf("#")
        await asyncio.sleep(FAST.dtmf_timeout_ms / 1000 + 0.1)
    assert llm.calls == [] and h.events == []


# ----------------------------------------------------------------------------------------- TurnTaker alone

UNIT = dataclasses.replace(FAST, vad_start_ms=40, vad_stop_ms=120, preroll_ms=100, turn_stop_secs=0.3,
                           max_utterance_secs=30.0, dtmf_timeout_ms=50)
STT_SECS = 0.05                 # how far a transcription moves the fake clock


class Rig:
    """A TurnTaker fed 20 ms frames at 8 kHz, each advancing a fake clock by 20 ms."""

    def __init__(self, settings: ConversationSettings = UNIT, script: tuple[str | BaseException, ...] = ("Hello.",),
                 stt_secs: float = STT_SECS) -> None:
        self.now = 100.0
        self.script = list(script)
        self.stt_secs = stt_secs
        self.transcribed: list[tuple[int, int]] = []          # (bytes, sample_rate)
        self.turns: list[Turn] = []
        self.failures: list[tuple[str, str]] = []
        self.starts: list[float] = []
        self.tasks: list[asyncio.Task[None]] = []
        self.loud_at = 0.0                                     # clock time of the last loud frame
        self.taker = TurnTaker(settings=settings, transcribe=self.transcribe, spawn=self.spawn,
                               on_speech_start=lambda: self.starts.append(self.now), on_turn=self.turns.append,
                               on_failure=lambda code, message: self.failures.append((code, message)),
                               clock=lambda: self.now)

    async def transcribe(self, pcm: bytes, *, sample_rate: int) -> str:
        self.transcribed.append((len(pcm), sample_rate))
        item = self.script[min(len(self.transcribed), len(self.script)) - 1]
        self.now += self.stt_secs
        if isinstance(item, BaseException):
            raise item
        return item

    def spawn(self, coro: Any) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.append(task)
        return task

    def feed(self, ms: float, *, loud: bool) -> None:
        """Frames in at once (a turn's task runs after them: feed silence only up to the VAD's stop)."""
        for _ in range(round(ms / 20)):
            self.now += 0.02
            if loud:
                self.loud_at = self.now
            self.taker.on_audio(AudioFrame(SPEECH_FRAME if loud else SILENCE_FRAME, IN_RATE))

    async def settle(self, secs: float = 0.0) -> None:
        for _ in range(5):
            await asyncio.sleep(0)
        if secs:
            await asyncio.sleep(secs)


@pytest.mark.parametrize("preroll_ms", [40, 100, 200])
async def test_taker_one_turn_holds_the_preroll_the_speech_and_the_stop(preroll_ms: float) -> None:
    rig = Rig(dataclasses.replace(UNIT, preroll_ms=preroll_ms))
    rig.feed(300, loud=False)
    rig.feed(300, loud=True)
    assert len(rig.starts) == 1 and rig.taker.busy
    rig.feed(UNIT.vad_stop_ms, loud=False)
    await rig.settle()
    # the pre-roll (ending with the speech's first frame: the VAD started on its second), the rest of the
    # speech, then the silence up to the stop
    utterance_ms = preroll_ms + 300 - 20 + UNIT.vad_stop_ms
    assert rig.transcribed == [(round(utterance_ms * IN_RATE // 500), IN_RATE)]     # 8 kHz goes up as it is
    [turn] = rig.turns
    assert turn.text == "Hello." and turn.speech_end == rig.loud_at
    assert turn.spoken_s == pytest.approx(utterance_ms / 1000)
    assert turn.turn_wait_ms == pytest.approx(UNIT.vad_stop_ms)
    assert turn.stt_ms == pytest.approx(STT_SECS * 1000)
    assert turn.ended_s_ago == pytest.approx(UNIT.vad_stop_ms / 1000 + STT_SECS)
    assert not rig.taker.busy and rig.failures == []


@pytest.mark.parametrize(("rate", "sent_rate"), [(8000, 8000), (16000, 16000), (24000, PIPELINE_RATE),
                                                  (48000, PIPELINE_RATE)])
async def test_taker_transcribes_8_and_16_khz_as_they_are_and_other_rates_at_16_khz(rate: int, sent_rate: int) -> None:
    rig = Rig(dataclasses.replace(UNIT, preroll_ms=0))
    loud = np.tile(np.frombuffer(SPEECH_FRAME, "<i2"), rate // IN_RATE + 1)[: rate // 50].tobytes()
    quiet = bytes(rate // 25)
    for pcm, ms in ((loud, 300), (quiet, UNIT.vad_stop_ms)):
        for _ in range(round(ms / 20)):
            rig.now += 0.02
            rig.taker.on_audio(AudioFrame(pcm, rate))
    await rig.settle()
    [(n_bytes, sent)] = rig.transcribed
    assert sent == sent_rate
    assert n_bytes / 2 / sent * 1000 == pytest.approx(300 - 20 + UNIT.vad_stop_ms, abs=2)   # the same audio, in time


async def test_taker_silence_and_short_noise_are_no_turn() -> None:
    rig = Rig()
    rig.feed(500, loud=False)
    rig.feed(20, loud=True)                      # shorter than vad_start_ms
    rig.feed(500, loud=False)
    await rig.settle()
    assert rig.starts == [] and rig.transcribed == [] and rig.turns == []


async def test_taker_blank_transcript_is_no_turn() -> None:
    rig = Rig(script=("  ",))
    rig.feed(200, loud=True)
    rig.feed(UNIT.vad_stop_ms, loud=False)
    await rig.settle()
    assert len(rig.transcribed) == 1 and rig.turns == [] and not rig.taker.busy


async def test_taker_waits_for_turn_stop_secs_after_words_that_trail_off() -> None:
    rig = Rig(script=("I would like a table for",))
    rig.feed(300, loud=True)
    rig.feed(UNIT.vad_stop_ms, loud=False)
    await rig.settle(0.05)
    # still waiting: turn_stop_secs after the speech ended, less the stop and the transcription
    assert rig.turns == [] and rig.taker.busy
    await rig.settle(UNIT.turn_stop_secs - UNIT.vad_stop_ms / 1000 - STT_SECS)
    assert [t.text for t in rig.turns] == ["I would like a table for"] and not rig.taker.busy


async def test_taker_answers_trailing_words_at_once_when_turn_stop_secs_has_passed() -> None:
    rig = Rig(script=("I would like a table for",), stt_secs=UNIT.turn_stop_secs)
    rig.feed(300, loud=True)
    rig.feed(UNIT.vad_stop_ms, loud=False)
    await rig.settle()
    assert [t.text for t in rig.turns] == ["I would like a table for"]


async def test_taker_speech_resuming_during_the_wait_continues_the_turn() -> None:
    rig = Rig(script=("I would like a table for", "I would like a table for two."))
    rig.feed(300, loud=True)
    rig.feed(UNIT.vad_stop_ms, loud=False)
    await rig.settle(0.02)
    assert rig.turns == []
    rig.feed(300, loud=True)                     # inside the wait
    rig.feed(UNIT.vad_stop_ms, loud=False)
    await rig.settle()
    assert len(rig.starts) == 2
    first, second = (n for n, _ in rig.transcribed)
    assert second >= first + 300 * IN_RATE // 500     # both bursts of speech in one transcription
    assert [t.text for t in rig.turns] == ["I would like a table for two."]


async def test_taker_cuts_speech_longer_than_max_utterance_secs() -> None:
    rig = Rig(dataclasses.replace(UNIT, max_utterance_secs=0.2), script=("part one and",))
    rig.feed(700, loud=True)
    await rig.settle()
    # cut turns never wait for turn_stop_secs, even when their words trail off
    assert len(rig.turns) == len(rig.transcribed) >= 3
    assert all(t.text == "part one and" for t in rig.turns)
    rig.feed(UNIT.vad_stop_ms, loud=False)
    await rig.settle()
    total_ms = sum(n for n, _ in rig.transcribed) / (IN_RATE // 500)
    assert total_ms == pytest.approx(700 + UNIT.vad_stop_ms)     # all of it (no pre-roll: it began loud), none twice


async def test_taker_reports_a_failed_transcription() -> None:
    rig = Rig(script=(ProvidersFailed("speech-to-text failed: stt-a: HTTP 503"),))
    rig.feed(200, loud=True)
    rig.feed(UNIT.vad_stop_ms, loud=False)
    await rig.settle()
    assert rig.failures == [("stt_failed", "speech-to-text failed: stt-a: HTTP 503")] and rig.turns == []


async def test_taker_collects_digits_until_hash_or_a_pause() -> None:
    rig = Rig()
    for digit in "12#":
        rig.taker.on_dtmf(digit)
    rig.taker.on_dtmf("#")                       # nothing collected: no turn
    assert rig.turns == [Turn("[DTMF] 12")] and rig.turns[0].speech_end is None
    rig.taker.on_dtmf("7")
    await rig.settle(UNIT.dtmf_timeout_ms / 2000)
    rig.taker.on_dtmf("8")                       # restarts the wait
    await rig.settle(UNIT.dtmf_timeout_ms / 2000)
    assert rig.turns == [Turn("[DTMF] 12")]
    await rig.settle(UNIT.dtmf_timeout_ms / 1000)
    assert rig.turns == [Turn("[DTMF] 12"), Turn("[DTMF] 78")]


async def test_taker_close_cancels_its_waits() -> None:
    rig = Rig(script=("I would like a table for",))
    rig.feed(300, loud=True)
    rig.feed(UNIT.vad_stop_ms, loud=False)
    rig.taker.on_dtmf("5")
    await rig.settle()
    rig.taker.close()
    await rig.settle(UNIT.turn_stop_secs)
    assert rig.turns == [] and all(t.done() for t in rig.tasks)
