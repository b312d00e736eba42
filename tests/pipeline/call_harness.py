"""The harness of the conversation tests, driven in-process: scripted providers (real classes implementing
the pipeline.providers.base protocols), a real Playout whose transport collects frames, and a fake caller
feeding 20 ms AudioFrames at 8 kHz (speech = a loud tone, silence = zeros) in real time.

Usage::

    async with call(stt=[ScriptedSTT(["Hi."])], llm=[ScriptedLLM(["Hello!"])]) as h:
        await h.say(200)
        await h.until(lambda: BotSpeaking(False) in h.events)
    assert transcripts(h, "assistant") == ["Hello!"]
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline.audio import rms
from pipeline.conversation import (
    Conversation,
    ConversationSettings,
    Persona,
    ProviderChain,
    TranscriptEvent,
)
from pipeline.frames import AudioFrame, Clear, Frame, Mark
from pipeline.playout import Playout
from pipeline.providers.base import (
    LLMProvider,
    Message,
    ProviderError,
    STTProvider,
    TTSProvider,
)

IN_RATE = 8000
OUT_RATE = 8000
TTS_RATE = 24000
MS_PER_CHAR = 6.0            # how long the tone TTS speaks per character of text

FAST = ConversationSettings(
    vad_start_ms=40, vad_stop_ms=120, turn_stop_secs=0.45, max_utterance_secs=30.0,
    stt_timeout_secs=0.3, llm_timeout_secs=0.3, tts_timeout_secs=0.3, provider_retries=1,
    dtmf_timeout_ms=200, preroll_ms=100, silence_prompt_secs=0.0,      # no watchdog unless a test asks
    apology_text="Sorry, something broke. Goodbye.",
    interruption_strategy="immediate",      # the caller's "speech" is a tone; tests/pipeline/test_interruptions.py
)                                            # covers the speech-evidence strategy with real speech
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

    async def synthesize(self, text: str, *, voice: str | None = None,
                         language: str | None = None) -> AsyncIterator[bytes]:
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
    convo: Conversation = None  # type: ignore[assignment]  # set by call() before the call starts
    playout: Playout = None  # type: ignore[assignment]  # set by call() before the call starts
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
    tg: asyncio.TaskGroup = None  # type: ignore[assignment]  # set by call() before the call starts

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
        return [f for f, t in zip(self.frames, self.frame_times, strict=False) if isinstance(f, AudioFrame) and t >= after]

    def audio_ms(self, after: float = 0.0) -> float:
        return sum(f.duration_ms for f in self.audio(after))

    def of(self, kind: type) -> list[Any]:
        return [e for e in self.events if isinstance(e, kind)]

    def time_of(self, pred: Callable[[Any], bool]) -> float:
        return next(t for e, t in zip(self.events, self.event_times, strict=False) if pred(e))

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
                h.tg = tg
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


# a long answer, to be interrupted
LONG = ("Our restaurant opens at noon every day. We serve lunch until three in the afternoon. "
        "Dinner starts at six and runs until ten. The bar stays open a little later than that. "
        "We also have a terrace for the summer months.")

