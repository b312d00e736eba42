"""Tests for pipeline.conversation, driven in-process: scripted providers (real classes implementing the
pipeline.providers.base protocols), a real Playout whose transport collects frames, and a fake caller
feeding 20 ms AudioFrames at 8 kHz (speech = a loud tone, silence = zeros) in real time."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Sequence

import numpy as np
import pytest

from pipeline.audio import rms
from pipeline.conversation import (
    BargeIn,
    BotSpeaking,
    Conversation,
    ConversationSettings,
    ErrorEvent,
    Persona,
    ProviderChain,
    TranscriptEvent,
    TurnLatency,
)
from pipeline.frames import AudioFrame, Clear, Frame, Mark
from pipeline.playout import Playout
from pipeline.providers.base import LLMProvider, Message, ProviderError, STTProvider, TTSProvider

pytestmark = pytest.mark.asyncio

IN_RATE = 8000
OUT_RATE = 8000
TTS_RATE = 24000
MS_PER_CHAR = 6.0            # how long the tone TTS speaks per character of text

FAST = ConversationSettings(
    vad_start_ms=40, vad_stop_ms=120, turn_stop_secs=0.45, max_utterance_secs=30.0,
    stt_timeout_secs=0.3, llm_timeout_secs=0.3, tts_timeout_secs=0.3, provider_retries=1,
    dtmf_timeout_ms=200, preroll_ms=100, silence_prompt_secs=0.0,      # no watchdog unless a test asks
    apology_text="Sorry, something broke. Goodbye.",
)
SILENT = Persona(greeting="")
SYSTEM = {"role": "system", "content": SILENT.system}


def tone(ms: float, rate: int, *, freq: float = 440.0, amp: float = 0.3) -> bytes:
    n = round(ms * rate / 1000)
    t = np.arange(n) / rate
    return (amp * 32767 * np.sin(2 * np.pi * freq * t)).astype("<i2").tobytes()


SPEECH_FRAME = tone(20, IN_RATE)
SILENCE_FRAME = b"\x00\x00" * (IN_RATE // 50)


class Hang:
    """Script entry: never answer (the provider hangs)."""


HANG = Hang()
QUICK_TIMEOUTS = dataclasses.replace(FAST, stt_timeout_secs=0.15, llm_timeout_secs=0.15, tts_timeout_secs=0.15)


# ----------------------------------------------------------------------------------------- providers

class ScriptedSTT:
    """Returns (or raises) the next scripted result per call; the last entry repeats."""

    def __init__(self, script: Sequence[Any], *, name: str = "stt-a", delay: float = 0.03) -> None:
        self.name = name
        self.script = list(script)
        self.delay = delay
        self.calls: list[dict[str, Any]] = []

    async def transcribe(self, pcm: bytes, *, sample_rate: int, language: str | None = None) -> str:
        self.calls.append({"bytes": len(pcm), "sample_rate": sample_rate, "language": language,
                           "rms": rms(pcm)})
        item = self.script[min(len(self.calls), len(self.script)) - 1]
        await asyncio.sleep(self.delay)
        if isinstance(item, Hang):
            await asyncio.sleep(3600)
        if isinstance(item, BaseException):
            raise item
        return item


def words(text: str) -> list[str]:
    out, current = [], ""
    for ch in text:
        if ch == " " and current:
            out.append(current)
            current = ""
        current += ch
    return out + ([current] if current else [])


@dataclass
class Partial:
    """Script entry for the LLM: stream ``text`` then fail (or hang when ``error`` is None)."""

    text: str
    error: BaseException | None = None


class ScriptedLLM:
    """Streams the next scripted reply word by word (or raises / hangs); the last entry repeats."""

    def __init__(self, script: Sequence[Any], *, name: str = "llm-a", first_token_s: float = 0.02,
                 token_s: float = 0.003) -> None:
        self.name = name
        self.script = list(script)
        self.first_token_s = first_token_s
        self.token_s = token_s
        self.calls: list[list[dict[str, str]]] = []

    async def stream(self, messages: Sequence[Message]) -> AsyncIterator[str]:
        self.calls.append([dict(m) for m in messages])
        item = self.script[min(len(self.calls), len(self.script)) - 1]
        await asyncio.sleep(self.first_token_s)
        if isinstance(item, Hang):
            await asyncio.sleep(3600)
        if isinstance(item, BaseException):
            raise item
        text = item.text if isinstance(item, Partial) else item
        for i, w in enumerate(words(text)):
            if i:
                await asyncio.sleep(self.token_s)
            yield w
        if isinstance(item, Partial):
            if item.error is None:
                await asyncio.sleep(3600)
            raise item.error


class ToneTTS:
    """Speaks a 600 Hz tone at 24 kHz, MS_PER_CHAR per character, in 40 ms chunks."""

    sample_rate = TTS_RATE

    def __init__(self, script: Sequence[Any] = ("ok",), *, name: str = "tts-a") -> None:
        self.name = name
        self.script = list(script)
        self.calls: list[str] = []

    async def synthesize(self, text: str, *, voice: str | None = None) -> AsyncIterator[bytes]:
        self.calls.append(text)
        item = self.script[min(len(self.calls), len(self.script)) - 1]
        await asyncio.sleep(0.005)
        if isinstance(item, Hang):
            await asyncio.sleep(3600)
        if isinstance(item, BaseException):
            raise item
        pcm = tone(len(text) * MS_PER_CHAR, TTS_RATE, freq=600)
        step = TTS_RATE * 40 // 1000 * 2
        for i in range(0, len(pcm), step):
            yield pcm[i:i + step]
            await asyncio.sleep(0)


def transient(name: str = "x") -> ProviderError:
    return ProviderError(name, "HTTP 503: busy", transient=True)


def permanent(name: str = "x") -> ProviderError:
    return ProviderError(name, "HTTP 401: bad key", transient=False)


async def test_scripted_providers_satisfy_the_protocols() -> None:
    # structural: the Protocols are not runtime-checkable, so check the members they name
    for provider, proto in ((ScriptedSTT(["x"]), STTProvider), (ScriptedLLM(["x"]), LLMProvider),
                            (ToneTTS(), TTSProvider)):
        members = [m for m in vars(proto) if not m.startswith("_")] + list(proto.__annotations__)
        assert members and all(hasattr(provider, m) for m in members)


# ----------------------------------------------------------------------------------------- harness

@dataclass
class Ended:
    reason: str
    at: float
    speaking: bool
    queued_ms: float
    audio_ms_sent: float


@dataclass
class Harness:
    convo: Conversation = None  # type: ignore[assignment]
    playout: Playout = None  # type: ignore[assignment]
    frames: list[Frame] = field(default_factory=list)
    frame_times: list[float] = field(default_factory=list)
    events: list[Any] = field(default_factory=list)
    event_times: list[float] = field(default_factory=list)
    ended: list[Ended] = field(default_factory=list)
    tasks: list[asyncio.Task[Any]] = field(default_factory=list)
    background: list[asyncio.Task[Any]] = field(default_factory=list)
    speech: list[bytes] = field(default_factory=list)     # frames the caller will send before silence
    mark_acks: bool = True
    _mark_timers: dict[str, asyncio.TimerHandle] = field(default_factory=dict)

    # the transport (a carrier that acknowledges marks once the audio before them has played)
    async def send(self, frame: Frame) -> None:
        self.frames.append(frame)
        self.frame_times.append(time.monotonic())
        if not self.mark_acks:
            return
        loop = asyncio.get_running_loop()
        if isinstance(frame, Mark):
            delay = max(0.0, (self.playout.sent_ms - self.playout.played_ms()) / 1000.0)
            self._mark_timers[frame.name] = loop.call_later(delay, self._ack, frame.name)
        elif isinstance(frame, Clear):
            for name, timer in list(self._mark_timers.items()):   # a flush returns every pending mark
                timer.cancel()
                self._ack(name)

    def _ack(self, name: str) -> None:
        self._mark_timers.pop(name, None)
        self.convo.on_mark_played(name)

    def on_event(self, event: Any) -> None:
        self.events.append(event)
        self.event_times.append(time.monotonic())

    def end_call(self, reason: str) -> None:
        self.ended.append(Ended(reason, time.monotonic(), self.playout.speaking, self.playout.queued_ms,
                                self.audio_ms()))

    def spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = self.tg.create_task(coro)
        self.tasks.append(task)
        return task

    # the caller
    async def feed(self) -> None:
        while True:
            pcm = self.speech.pop(0) if self.speech else SILENCE_FRAME
            self.convo.on_audio(AudioFrame(pcm, IN_RATE))
            await asyncio.sleep(0.02)

    async def say(self, ms: float) -> float:
        """Speak a loud tone for ``ms``; returns the time the last loud frame went in."""
        self.speech.extend([SPEECH_FRAME] * round(ms / 20))
        while self.speech:
            await asyncio.sleep(0.005)
        return time.monotonic()

    # observations
    def audio(self, after: float = 0.0) -> list[AudioFrame]:
        return [f for f, t in zip(self.frames, self.frame_times) if isinstance(f, AudioFrame) and t >= after]

    def audio_ms(self, after: float = 0.0) -> float:
        return sum(f.duration_ms for f in self.audio(after))

    def of(self, kind: type) -> list[Any]:
        return [e for e in self.events if isinstance(e, kind)]

    def time_of(self, pred: Callable[[Any], bool]) -> float:
        return next(t for e, t in zip(self.events, self.event_times) if pred(e))

    async def until(self, pred: Callable[[], bool], timeout: float = 3.0) -> None:
        async with asyncio.timeout(timeout):
            while not pred():
                await asyncio.sleep(0.005)

    async def until_event(self, pred: Callable[[Any], bool], timeout: float = 3.0) -> Any:
        await self.until(lambda: any(pred(e) for e in self.events), timeout)
        return next(e for e in self.events if pred(e))


@contextlib.asynccontextmanager
async def call(*, stt: Sequence[STTProvider] = (), llm: Sequence[LLMProvider] = (),
               tts: Sequence[TTSProvider] = (), settings: ConversationSettings = FAST,
               persona: Persona = SILENT, apology_audio: tuple[bytes, int] | None = None,
               lead_ms: float = 60, mark_acks: bool = True, start: bool = True) -> AsyncIterator[Harness]:
    h = Harness(mark_acks=mark_acks)
    try:
        async with asyncio.timeout(15):
            async with asyncio.TaskGroup() as tg:
                h.tg = tg  # type: ignore[attr-defined]
                h.playout = Playout(sample_rate=OUT_RATE, lead_ms=lead_ms, max_buffer_ms=10000,
                                    on_speaking=lambda s, at: h.convo.on_speaking(s, at))
                chain = ProviderChain(stt=list(stt), llm=list(llm) or [ScriptedLLM(["Ok."])],
                                      tts=list(tts) or [ToneTTS()], apology_audio=apology_audio)
                h.convo = Conversation(settings=settings, persona=persona, providers=chain, playout=h.playout,
                                       spawn=h.spawn, on_event=h.on_event, end_call=h.end_call)
                h.background = [tg.create_task(h.playout.run(h.send)), tg.create_task(h.feed())]
                try:
                    if start:
                        h.convo.start()
                    yield h
                finally:
                    h.convo.close()
                    for task in h.background:
                        task.cancel()
                    for timer in h._mark_timers.values():
                        timer.cancel()
                    await asyncio.sleep(0.01)
                    for task in h.tasks:       # harness cleanup (see test_close_stops_an_apology_in_progress)
                        task.cancel()
    except ExceptionGroup as group:            # report a failed assert as itself, not wrapped by the TaskGroup
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise


def transcripts(h: Harness, role: str) -> list[str]:
    return [e.text for e in h.of(TranscriptEvent) if e.role == role]


# ----------------------------------------------------------------------------------------- greeting

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


# ----------------------------------------------------------------------------------------- a turn

async def test_speech_then_silence_is_transcribed_answered_and_timed() -> None:
    stt = ScriptedSTT(["What time do you open?"], delay=0.03)
    llm = ScriptedLLM(["We open at nine. We close at five."], first_token_s=0.02)
    tts = ToneTTS()
    async with call(stt=[stt], llm=[llm], tts=[tts]) as h:
        await h.say(400)
        speech_end = time.monotonic()
        await h.until(lambda: BotSpeaking(False) in h.events)
        answered = h.time_of(lambda e: e == TranscriptEvent("user", "What time do you open?"))

    # STT got one utterance: 16 kHz PCM holding the speech (and a little pre-roll and trailing silence)
    [stt_call] = stt.calls
    assert stt_call["sample_rate"] == 16000 and stt_call["language"] == "en"
    audio_ms = stt_call["bytes"] / 32
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


# ----------------------------------------------------------------------------------------- turn end

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
    assert stt.calls[1]["bytes"] >= stt.calls[0]["bytes"] + 300 * 32
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
    transcribed_ms = sum(c["bytes"] for c in stt.calls) / 32
    assert 1200 <= transcribed_ms <= 1200 + FAST.preroll_ms + 250
    users = [m["content"] for m in h.convo.messages if m["role"] == "user"]
    assert users == [f"part {n}." for n in ("one", "two", "three")[:len(users)]] and len(users) >= 2


# ----------------------------------------------------------------------------------------- barge-in

LONG = ("Our restaurant opens at noon every day. We serve lunch until three in the afternoon. "
        "Dinner starts at six and runs until ten. The bar stays open a little later than that. "
        "We also have a terrace for the summer months.")


async def test_barge_in_clears_audio_and_keeps_only_what_was_heard() -> None:
    stt = ScriptedSTT(["Tell me about the restaurant.", ""])
    llm = ScriptedLLM([LONG])
    tts = ToneTTS()
    async with call(stt=[stt], llm=[llm], tts=[tts]) as h:
        await h.say(200)
        await h.until(lambda: BotSpeaking(True) in h.events)
        speaking_at = time.monotonic()
        await asyncio.sleep(0.5)
        await h.say(200)                                              # the caller talks over the agent
        barge = await h.until_event(lambda e: isinstance(e, BargeIn))
        interrupted_at = h.time_of(lambda e: isinstance(e, BargeIn))
        await h.until(lambda: len(stt.calls) == 2)
        await asyncio.sleep(0.2)
    # the carrier was told to flush, and no answer audio followed the flush
    kinds = [type(f).__name__ for f in h.frames]
    assert kinds.count("Clear") == 1
    clear_at = kinds.index("Clear")
    assert not any(isinstance(f, AudioFrame) for f in h.frames[clear_at + 1:])
    # it happened promptly: vad_start_ms after the caller started (plus scheduling)
    assert interrupted_at - speaking_at <= 0.5 + 0.2 + 0.15
    # what was heard is a non-empty prefix of the answer, about as long as the audio played
    heard = barge.heard
    assert heard and LONG.startswith(heard) and len(heard) < len(LONG) / 2
    heard_ms = (interrupted_at - speaking_at) * 1000
    assert abs(len(heard) * MS_PER_CHAR - heard_ms) <= 400
    assert h.convo.messages[-1] == {"role": "assistant", "content": heard}
    assert [m["content"] for m in h.convo.messages if m["role"] == "assistant"] == [heard]
    assert h.of(BotSpeaking)[-1] == BotSpeaking(False)
    # the LLM was not asked again for the empty second transcript
    assert len(llm.calls) == 1


async def test_barge_in_during_the_greeting() -> None:
    persona = Persona(greeting=LONG)
    stt = ScriptedSTT(["Stop."])
    llm = ScriptedLLM(["Okay."])
    async with call(stt=[stt], llm=[llm], persona=persona) as h:
        await h.until(lambda: BotSpeaking(True) in h.events)
        await asyncio.sleep(0.3)
        await h.say(200)
        await h.until(lambda: "Okay." in transcripts(h, "assistant"))
    [barge] = h.of(BargeIn)
    assert barge.heard and LONG.startswith(barge.heard) and len(barge.heard) < len(LONG) / 2
    assert h.convo.messages[1] == {"role": "assistant", "content": barge.heard}
    assert llm.calls[0][1:] == [{"role": "assistant", "content": barge.heard}, {"role": "user", "content": "Stop."}]


async def test_no_barge_in_when_disabled() -> None:
    settings = dataclasses.replace(FAST, barge_in=False)
    persona = Persona(greeting="A short hello to you all.")
    stt = ScriptedSTT([""])
    async with call(stt=[stt], persona=persona, settings=settings) as h:
        await h.until(lambda: BotSpeaking(True) in h.events)
        await h.say(100)
        await h.until(lambda: BotSpeaking(False) in h.events)
    assert h.of(BargeIn) == [] and Clear() not in h.frames
    assert h.audio_ms() == pytest.approx(len(persona.greeting) * MS_PER_CHAR, abs=25)


# ----------------------------------------------------------------------------------------- DTMF

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


# ----------------------------------------------------------------------------------------- failures

async def test_transient_stt_failure_is_retried_then_the_fallback_is_used() -> None:
    settings = dataclasses.replace(FAST, provider_retries=2)
    bad = ScriptedSTT([transient("stt-a")], name="stt-a")
    good = ScriptedSTT(["Hello there."], name="stt-b")
    async with call(stt=[bad, good], settings=settings) as h:
        await h.say(200)
        await h.until(lambda: transcripts(h, "user") != [])
    assert len(bad.calls) == 3 and len(good.calls) == 1
    assert bad.calls[0]["bytes"] == good.calls[0]["bytes"]           # the same utterance each time
    assert transcripts(h, "user") == ["Hello there."]
    assert h.of(ErrorEvent) == [] and h.ended == []


async def test_transient_failure_then_success_on_the_same_provider() -> None:
    flaky = ScriptedSTT([transient(), "Hello."])
    spare = ScriptedSTT(["never"], name="stt-b")
    async with call(stt=[flaky, spare]) as h:
        await h.say(200)
        await h.until(lambda: transcripts(h, "user") != [])
    assert len(flaky.calls) == 2 and spare.calls == []
    assert transcripts(h, "user") == ["Hello."]


async def test_permanent_stt_failure_is_not_retried() -> None:
    settings = dataclasses.replace(FAST, provider_retries=3)
    bad = ScriptedSTT([permanent()])
    good = ScriptedSTT(["Hello."], name="stt-b")
    async with call(stt=[bad, good], settings=settings) as h:
        await h.say(200)
        await h.until(lambda: transcripts(h, "user") != [])
    assert len(bad.calls) == 1 and len(good.calls) == 1


async def test_llm_failure_retried_then_fallback_answers() -> None:
    bad = ScriptedLLM([transient("llm-a")], name="llm-a")
    good = ScriptedLLM(["From the backup."], name="llm-b")
    async with call(stt=[ScriptedSTT(["Hi."])], llm=[bad, good]) as h:
        await h.say(200)
        await h.until(lambda: BotSpeaking(False) in h.events)
    assert len(bad.calls) == FAST.provider_retries + 1 and len(good.calls) == 1
    assert good.calls[0] == bad.calls[0]
    assert transcripts(h, "assistant") == ["From the backup."]
    assert h.of(ErrorEvent) == [] and h.ended == []


async def test_tts_failure_retried_then_fallback_speaks() -> None:
    bad = ToneTTS([transient("tts-a")], name="tts-a")
    good = ToneTTS(name="tts-b")
    persona = Persona(greeting="Hello from the backup voice.")
    async with call(stt=[ScriptedSTT(["x"])], tts=[bad, good], persona=persona) as h:
        await h.until(lambda: BotSpeaking(False) in h.events)
    assert bad.calls == [persona.greeting] * (FAST.provider_retries + 1)
    assert good.calls == [persona.greeting]
    assert h.audio_ms() == pytest.approx(len(persona.greeting) * MS_PER_CHAR, abs=25)
    assert h.of(ErrorEvent) == []


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


async def test_llm_failing_mid_answer_is_not_retried() -> None:
    tts = ToneTTS()
    llm_a = ScriptedLLM([Partial("We open at nine. And", transient())], name="llm-a")
    llm_b = ScriptedLLM(["never"], name="llm-b")
    async with call(stt=[ScriptedSTT(["Hi."])], llm=[llm_a, llm_b], tts=[tts]) as h:
        await h.say(200)
        await h.until(lambda: h.ended != [])
    assert len(llm_a.calls) == 1 and llm_b.calls == []               # a retry would repeat words
    assert h.of(ErrorEvent)[0].code == "provider_failed"
    assert h.ended[0].reason == "provider_failed"
    assert tts.calls[-1] == FAST.apology_text


async def test_a_hanging_stt_times_out_like_a_failure() -> None:
    hung = ScriptedSTT([HANG], name="stt-a")
    good = ScriptedSTT(["Hello."], name="stt-b")
    settings = QUICK_TIMEOUTS
    async with call(stt=[hung, good], settings=settings) as h:
        speech_end = await h.say(200)
        await h.until_event(lambda e: isinstance(e, TranscriptEvent), timeout=3)
        waited = h.time_of(lambda e: isinstance(e, TranscriptEvent)) - speech_end
    assert len(hung.calls) == settings.provider_retries + 1 and len(good.calls) == 1
    assert waited >= (settings.provider_retries + 1) * settings.stt_timeout_secs - 0.02
    assert waited <= (settings.provider_retries + 1) * settings.stt_timeout_secs + 0.5
    assert h.of(ErrorEvent) == []


async def test_a_hanging_llm_times_out_before_its_first_token() -> None:
    hung = ScriptedLLM([HANG], name="llm-a")
    good = ScriptedLLM(["Backup answer."], name="llm-b")
    settings = QUICK_TIMEOUTS
    async with call(stt=[ScriptedSTT(["Hi."])], llm=[hung, good], settings=settings) as h:
        await h.say(200)
        await h.until(lambda: transcripts(h, "assistant") == ["Backup answer."], timeout=3)
    assert len(hung.calls) == settings.provider_retries + 1 and len(good.calls) == 1
    [lat] = h.of(TurnLatency)
    assert lat.llm_first_token_ms >= (settings.provider_retries + 1) * settings.llm_timeout_secs * 1000 - 20


async def test_an_llm_stalling_between_tokens_fails_the_turn() -> None:
    llm = ScriptedLLM([Partial("We open at nine. And")])
    tts = ToneTTS()
    async with call(stt=[ScriptedSTT(["Hi."])], llm=[llm], tts=[tts], settings=QUICK_TIMEOUTS) as h:
        await h.say(200)
        await h.until(lambda: h.ended != [], timeout=3)
    assert h.of(ErrorEvent)[0].code == "provider_failed"
    assert "timed out" in h.of(ErrorEvent)[0].message
    assert tts.calls[-1] == FAST.apology_text


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
        # the caller hangs up: the call closes the conversation and stops the pacer (gateway/call.py)
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
