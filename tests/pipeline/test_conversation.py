"""Tests for pipeline.conversation end to end (see tests/pipeline/call_harness.py): the greeting, a turn
answered and timed, the apology and hang-up when every provider failed, close."""

from __future__ import annotations

import asyncio
import time

import pytest

from pipeline.audio import rms
from pipeline.conversation import (
    BargeIn,
    BotSpeaking,
    ErrorEvent,
    Persona,
    TranscriptEvent,
    TurnLatency,
)
from pipeline.engine import Engine
from pipeline.frames import AudioFrame, Mark
from pipeline.providers.base import LLMProvider, STTProvider, TTSProvider
from tests.pipeline.call_harness import (
    FAST,
    HANG,
    IN_RATE,
    LONG,
    MS_PER_CHAR,
    OUT_RATE,
    QUICK_TIMEOUTS,
    SPEECH_FRAME,
    SYSTEM,
    ScriptedLLM,
    ScriptedSTT,
    ToneTTS,
    call,
    permanent,
    tone,
    transcripts,
    transient,
)

pytestmark = pytest.mark.asyncio


async def test_scripted_providers_satisfy_the_protocols() -> None:
    # structural: the Protocols are not runtime-checkable, so check the members they name
    for provider, proto in ((ScriptedSTT(["x"]), STTProvider), (ScriptedLLM(["x"]), LLMProvider),
                            (ToneTTS(), TTSProvider)):
        members = [m for m in vars(proto) if not m.startswith("_")] + list(proto.__annotations__)
        assert members and all(hasattr(provider, m) for m in members)


async def test_greeting_is_spoken_and_recorded() -> None:
    tts = ToneTTS()
    persona = Persona(greeting="Hi there, welcome to the hotel.")
    async with call(stt=[ScriptedSTT(["x"])], tts=[tts], persona=persona) as h:
        await h.until(lambda: BotSpeaking(False) in h.events)
    assert tts.calls == [persona.greeting]
    expected_ms = len(persona.greeting) * MS_PER_CHAR
    assert h.audio_ms() == pytest.approx(expected_ms, abs=25)
    assert all(f.sample_rate == OUT_RATE for f in h.audio())
    assert rms(b"".join(f.pcm for f in h.audio())) > 0.1
    assert h.of(BotSpeaking) == [BotSpeaking(True), BotSpeaking(False)]
    assert transcripts(h, "assistant") == [persona.greeting]
    assert h.of(TurnLatency) == []                             # no caller turn yet
    assert h.convo.messages == [{"role": "system", "content": persona.system},
                                {"role": "assistant", "content": persona.greeting}]
    # the clause's mark follows its audio
    marks = [i for i, f in enumerate(h.frames) if isinstance(f, Mark)]
    assert [h.frames[i] for i in marks] == [Mark("r1-c0")]
    assert all(isinstance(f, AudioFrame) for f in h.frames[:marks[0]])


async def test_no_greeting_means_silence() -> None:
    tts = ToneTTS()
    async with call(stt=[ScriptedSTT(["x"])], tts=[tts]) as h:
        await asyncio.sleep(0.2)
    assert tts.calls == [] and h.frames == [] and h.events == []
    assert h.convo.messages == [SYSTEM]


async def test_speech_then_silence_is_transcribed_answered_and_timed() -> None:
    stt = ScriptedSTT(["What time do you open?"], delay=0.03)
    llm = ScriptedLLM(["We open at nine. We close at five."], first_token_s=0.02)
    tts = ToneTTS()
    async with call(stt=[stt], llm=[llm], tts=[tts]) as h:
        await h.say(400)
        speech_end = time.monotonic()
        await h.until(lambda: BotSpeaking(False) in h.events)
        answered = h.time_of(lambda e: e == TranscriptEvent("user", "What time do you open?"))

    # STT got one utterance at the leg's own 8 kHz (no upsampling) holding the speech (and a little pre-roll
    # and trailing silence)
    [stt_call] = stt.calls
    assert stt_call["sample_rate"] == 8000 and stt_call["language"] == "en"
    audio_ms = stt_call["bytes"] / 16
    assert 400 <= audio_ms <= 400 + 100 + 120 + 100
    assert stt_call["rms"] > 0.1
    # a complete sentence is answered without waiting for turn_stop_secs
    assert answered - speech_end < FAST.turn_stop_secs - 0.1
    # the LLM saw the conversation so far, the TTS got clause by clause
    assert llm.calls == [[SYSTEM, {"role": "user", "content": "What time do you open?"}]]
    assert tts.calls == ["We open at nine.", "We close at five."]
    assert h.convo.messages[-1] == {"role": "assistant", "content": "We open at nine. We close at five."}
    assert h.audio_ms() == pytest.approx(len("We open at nine.We close at five.") * MS_PER_CHAR, abs=40)
    # events, in order
    kinds = [type(e).__name__ for e in h.events]
    assert kinds == ["TranscriptEvent", "BotSpeaking", "TurnLatency", "TranscriptEvent", "BotSpeaking"]
    assert h.events[3] == TranscriptEvent("assistant", "We open at nine. We close at five.")
    assert h.events[1] == BotSpeaking(True) and h.events[4] == BotSpeaking(False)
    # latency breakdown: plausible values
    [lat] = h.of(TurnLatency)
    assert FAST.vad_stop_ms - 30 <= lat.turn_wait_ms <= FAST.vad_stop_ms + 150
    assert 25 <= lat.stt_ms <= 250
    assert 15 <= lat.llm_first_token_ms <= 250
    assert 0 <= lat.tts_first_audio_ms <= 150
    assert lat.first_audio_out_ms >= lat.turn_wait_ms + lat.stt_ms + lat.llm_first_token_ms - 5
    assert lat.first_audio_out_ms <= 1000
    # the first audio went out about first_audio_out_ms after the end of speech
    first_audio = h.frame_times[0]
    assert first_audio - speech_end == pytest.approx(lat.first_audio_out_ms / 1000.0, abs=0.06)


async def test_second_turn_sees_the_first_answer_in_its_context() -> None:
    stt = ScriptedSTT(["Hello.", "And tomorrow?"])
    llm = ScriptedLLM(["Hi! How can I help?", "Tomorrow too."])
    async with call(stt=[stt], llm=[llm]) as h:
        await h.say(200)
        await h.until(lambda: BotSpeaking(False) in h.events)
        await h.say(200)
        await h.until(lambda: h.of(BotSpeaking).count(BotSpeaking(False)) == 2)
    assert llm.calls[1] == [SYSTEM, {"role": "user", "content": "Hello."},
                            {"role": "assistant", "content": "Hi! How can I help?"},
                            {"role": "user", "content": "And tomorrow?"}]
    assert len(h.of(TurnLatency)) == 2


async def test_all_stt_failing_apologises_and_ends_the_call_after_the_audio() -> None:
    stt_a = ScriptedSTT([transient()], name="stt-a")
    stt_b = ScriptedSTT([permanent()], name="stt-b")
    tts = ToneTTS()
    llm = ScriptedLLM(["never"])
    async with call(stt=[stt_a, stt_b], llm=[llm], tts=[tts]) as h:
        await h.say(200)
        await h.until(lambda: h.ended != [])
        await asyncio.sleep(0.1)
        h.convo.on_audio(AudioFrame(SPEECH_FRAME * 10, IN_RATE))     # too late: the call is ending
        await asyncio.sleep(0.1)
    assert len(stt_a.calls) == FAST.provider_retries + 1 and len(stt_b.calls) == 1
    [error] = h.of(ErrorEvent)
    assert error.code == "stt_failed" and "busy" in error.message and "bad key" in error.message
    assert llm.calls == []
    assert tts.calls == [FAST.apology_text]
    assert transcripts(h, "assistant") == [FAST.apology_text]
    assert h.convo.messages[-1] == {"role": "assistant", "content": FAST.apology_text}
    [ended] = h.ended
    assert ended.reason == "stt_failed"
    # end_call came after the apology had been sent and played out
    apology_ms = len(FAST.apology_text) * MS_PER_CHAR
    assert ended.audio_ms_sent == pytest.approx(apology_ms, abs=25)
    assert not ended.speaking and ended.queued_ms == 0
    assert ended.at - h.frame_times[0] >= apology_ms / 1000 - 0.03
    assert len(stt_a.calls) + len(stt_b.calls) == FAST.provider_retries + 2   # nothing new transcribed


async def test_all_llm_failing_apologises_and_ends_the_call() -> None:
    tts = ToneTTS()
    llm_a = ScriptedLLM([transient()], name="llm-a")
    llm_b = ScriptedLLM([permanent()], name="llm-b")
    async with call(stt=[ScriptedSTT(["Hi."])], llm=[llm_a, llm_b], tts=[tts]) as h:
        await h.say(200)
        await h.until(lambda: h.ended != [])
    assert len(llm_a.calls) == FAST.provider_retries + 1 and len(llm_b.calls) == 1
    [error] = h.of(ErrorEvent)
    assert error.code == "provider_failed"
    assert tts.calls == [FAST.apology_text]
    [ended] = h.ended
    assert ended.reason == "provider_failed" and not ended.speaking
    assert ended.audio_ms_sent == pytest.approx(len(FAST.apology_text) * MS_PER_CHAR, abs=25)
    # the failed answer left no empty assistant message behind
    assert h.convo.messages == [SYSTEM, {"role": "user", "content": "Hi."},
                                {"role": "assistant", "content": FAST.apology_text}]


async def test_all_tts_failing_plays_the_prerendered_apology_audio() -> None:
    apology = tone(300, 16000, freq=500)
    tts_a = ToneTTS([transient()], name="tts-a")
    tts_b = ToneTTS([HANG], name="tts-b")
    persona = Persona(greeting="Hello and welcome.")
    async with call(stt=[ScriptedSTT(["x"])], tts=[tts_a, tts_b], persona=persona,
                    apology_audio=(apology, 16000), settings=QUICK_TIMEOUTS) as h:
        await h.until(lambda: h.ended != [], timeout=5)
    # every provider was tried for the greeting, then for the apology text
    assert tts_a.calls.count(persona.greeting) == FAST.provider_retries + 1
    assert FAST.apology_text in tts_a.calls
    assert len(tts_b.calls) >= FAST.provider_retries + 1
    [error] = h.of(ErrorEvent)
    assert error.code == "provider_failed"
    [ended] = h.ended
    assert ended.reason == "provider_failed" and not ended.speaking
    # the pre-rendered apology (16 kHz) went out resampled to the carrier rate
    assert ended.audio_ms_sent == pytest.approx(300, abs=25)
    assert all(f.sample_rate == OUT_RATE for f in h.audio())
    assert rms(b"".join(f.pcm for f in h.audio())) > 0.1


async def test_all_tts_failing_without_apology_audio_still_ends_the_call() -> None:
    persona = Persona(greeting="Hello and welcome.")
    async with call(stt=[ScriptedSTT(["x"])], tts=[ToneTTS([permanent()])], persona=persona) as h:
        await h.until(lambda: h.ended != [], timeout=3)
    assert h.ended[0].reason == "provider_failed"
    assert h.audio() == []


async def test_a_provider_failure_is_not_reported_as_a_barge_in() -> None:
    llm = ScriptedLLM([permanent()])
    async with call(stt=[ScriptedSTT(["Hi."])], llm=[llm]) as h:
        await h.say(200)
        await h.until(lambda: h.ended != [])
    assert h.of(ErrorEvent) != []
    assert h.of(BargeIn) == []


async def test_close_stops_an_apology_in_progress() -> None:
    tts = ToneTTS()
    async with call(stt=[ScriptedSTT(["Hi."])], llm=[ScriptedLLM([permanent()])], tts=[tts]) as h:
        await h.say(200)
        await h.until(lambda: FAST.apology_text in tts.calls and h.playout.speaking)
        await asyncio.sleep(0.05)
        # the caller hangs up: the call closes the conversation and stops the pacer (gateway/calls/call.py)
        h.convo.close()
        for task in h.background:
            task.cancel()
        await asyncio.sleep(0.1)
        pending = [t for t in h.tasks if not t.done()]
        assert pending == []


async def test_close_cancels_an_answer_in_progress() -> None:
    llm = ScriptedLLM([LONG])
    async with call(stt=[ScriptedSTT(["Hi."])], llm=[llm]) as h:
        await h.say(200)
        await h.until(lambda: BotSpeaking(True) in h.events)
        h.convo.close()
        await asyncio.sleep(0.05)
        assert all(t.done() for t in h.tasks)
        n = len(h.convo.messages)
        h.convo.on_audio(AudioFrame(SPEECH_FRAME * 20, IN_RATE))
        h.convo.on_dtmf("1")
        await asyncio.sleep(FAST.dtmf_timeout_ms / 1000 + 0.05)
        assert len(h.convo.messages) == n


async def test_conversation_is_an_engine() -> None:
    async with call(stt=[ScriptedSTT(["x"])]) as h:
        engine: Engine = h.convo                  # the static check; the runtime one names every member
        assert isinstance(engine, Engine)
    assert {m for m in dir(Engine) if not m.startswith("_")} >= {
        "start", "on_audio", "on_dtmf", "on_mark_played", "interrupt", "on_speaking", "end_with", "close"}
    assert not isinstance(object(), Engine)
