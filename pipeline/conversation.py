"""One conversation: VAD -> turn detection -> STT -> LLM -> TTS -> playout, with barge-in.

The transport (a carrier media socket, a browser socket) feeds audio, DTMF and marker acks in,
and runs the :class:`~pipeline.playout.Playout` pacer that carries the agent's audio out. Every task
the conversation starts is created through ``spawn`` (the call's TaskGroup), so ending the call
cancels them all.

Usage::

    convo = Conversation(settings=..., persona=persona, providers=chain, playout=playout,
                         spawn=tg.create_task, on_event=observer, end_call=call.finish)
    convo.start()                       # speaks the greeting
    convo.on_audio(AudioFrame(pcm, 8000))
    convo.on_mark_played("r1-c0")
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Awaitable, Callable, Coroutine, Mapping, Sequence, TypeVar

from pipeline.audio import Resampler
from pipeline.frames import AudioFrame
from pipeline.playout import Playout
from pipeline.providers.base import LLMProvider, ProviderError, STTProvider, Tool, ToolCall, TTSProvider
from pipeline.text import ClauseSplitter, looks_incomplete, truncate_words
from pipeline.vad import EnergyVAD, VadEvent

__all__ = ["BotSpeaking", "ConversationSettings", "Conversation", "ErrorEvent", "Event", "Persona",
           "ProviderChain", "TranscriptEvent", "TurnLatency", "BargeIn"]

logger = logging.getLogger(__name__)

PIPELINE_RATE = 16000

_P = TypeVar("_P", LLMProvider, TTSProvider)
_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class Persona:
    """Who the agent is on this call."""

    name: str = "default"
    system: str = "You are a helpful, friendly voice assistant on a phone call. Keep answers short and conversational."
    greeting: str = "Hello! How can I help you today?"
    voice: str | None = None
    language: str = "en"
    transfer_targets: Mapping[str, str] = field(default_factory=dict)   # name -> E.164 or sip: URI


@dataclass(frozen=True, slots=True)
class ConversationSettings:
    vad_threshold: float = 0.02
    vad_start_ms: float = 60
    vad_stop_ms: float = 400
    turn_stop_secs: float = 3.0
    max_utterance_secs: float = 30.0
    barge_in: bool = True
    stt_timeout_s: float = 10.0
    llm_timeout_s: float = 10.0
    tts_timeout_s: float = 10.0
    provider_retries: int = 1
    dtmf_timeout_ms: float = 1500
    apology_text: str = "I'm sorry, I'm having trouble right now. Please call again later. Goodbye."
    preroll_ms: float = 300
    silence_prompt_secs: float = 0.0     # 0 = never ask "are you still there?"
    silence_hangup_secs: float = 10.0    # after the prompt, this much more silence ends the call
    silence_prompt_text: str = "Are you still there?"
    goodbye_text: str = "Thank you for calling. Goodbye."


@dataclass(frozen=True, slots=True)
class ProviderChain:
    """Primary providers, optional fallbacks, and audio to play when no TTS can speak the apology."""

    stt: Sequence[STTProvider]
    llm: Sequence[LLMProvider]
    tts: Sequence[TTSProvider]
    apology_audio: tuple[bytes, int] | None = None   # (pcm, rate), rendered once per process


# ----------------------------------------------------------------------------------------- events
@dataclass(frozen=True, slots=True)
class TranscriptEvent:
    """What was said. For the caller's words: ``spoken_s`` is how long the utterance lasted and
    ``ended_s_ago`` how long before this event its speech ended (STT and the turn wait)."""

    role: str
    text: str
    final: bool = True
    spoken_s: float = field(default=0.0, compare=False)       # timing metadata: not part of what was said
    ended_s_ago: float = field(default=0.0, compare=False)


@dataclass(frozen=True, slots=True)
class BotSpeaking:
    started: bool


@dataclass(frozen=True, slots=True)
class BargeIn:
    heard: str


@dataclass(frozen=True, slots=True)
class TurnLatency:
    """Milliseconds from the end of the caller's speech (``first_audio_out_ms``) and per stage."""

    turn_wait_ms: float
    stt_ms: float
    llm_first_token_ms: float
    tts_first_audio_ms: float
    first_audio_out_ms: float


@dataclass(frozen=True, slots=True)
class ErrorEvent:
    code: str
    message: str


Event = TranscriptEvent | BotSpeaking | BargeIn | TurnLatency | ErrorEvent


@dataclass(slots=True)
class _Clause:
    name: str
    text: str
    start_ms: float = 0.0          # position in the outbound stream
    end_ms: float | None = None
    played: bool = False


@dataclass(slots=True)
class _Response:
    index: int
    message: dict[str, str]
    clauses: list[_Clause] = field(default_factory=list)
    task: asyncio.Task[None] | None = None
    speech_end: float | None = None
    turn_wait_ms: float = 0.0
    stt_ms: float = 0.0
    llm_ms: float = 0.0
    tts_ms: float = 0.0
    reported: bool = False


class _Fatal(Exception):
    """Every provider for a stage failed: apologise and end the call."""


class Conversation:
    """The per-call agent; all methods are called from the call's event loop."""

    def __init__(self, *, settings: ConversationSettings, persona: Persona, providers: ProviderChain,
                 playout: Playout, spawn: Callable[[Coroutine[Any, Any, None]], asyncio.Task[None]],
                 on_event: Callable[[Event], None], end_call: Callable[[str], None],
                 context: Sequence[dict[str, str]] = (), clock: Callable[[], float] = time.monotonic,
                 tools: Sequence[Tool] = (), on_tool: Callable[[ToolCall], Awaitable[None]] | None = None) -> None:
        self.settings = settings
        self.persona = persona
        self._providers = providers
        self._playout = playout
        self._spawn = spawn
        self._emit = on_event
        self._end_call = end_call
        self._clock = clock
        self._tools = tuple(tools)
        self._on_tool = on_tool
        self.messages: list[dict[str, str]] = [dict(m) for m in context] or [{"role": "system", "content": persona.system}]
        self._vad = EnergyVAD(threshold=settings.vad_threshold, start_ms=settings.vad_start_ms,
                              stop_ms=settings.vad_stop_ms)
        self._preroll: collections.deque[AudioFrame] = collections.deque()
        self._preroll_ms = 0.0
        self._utterance_rate = PIPELINE_RATE
        self._utterance: list[bytes] | None = None   # PCM of the caller's current turn (transport rate)
        self._utterance_ms = 0.0
        self._last_speech_at = 0.0
        self._turn_task: asyncio.Task[None] | None = None
        self._response: _Response | None = None
        self._responses = 0
        self._digits = ""
        self._dtmf_task: asyncio.Task[None] | None = None
        self._closed = False
        self._ending = False
        self._apology_task: asyncio.Task[None] | None = None
        self._silence_task: asyncio.Task[None] | None = None
        self._last_activity = clock()
        self._prompted = False

    # ------------------------------------------------------------------------------ inputs
    def start(self) -> None:
        """Speak the persona's greeting (interruptible like any answer)."""
        if self.persona.greeting:
            self._begin_response(self._speak_text(self.persona.greeting))
        if self.settings.silence_prompt_secs > 0:
            self._silence_task = self._spawn(self._watch_silence())

    def on_audio(self, frame: AudioFrame) -> None:
        if self._closed or self._ending:
            return
        event = self._vad.process(frame.pcm, frame.sample_rate)
        if event is VadEvent.SPEECH_START:
            self._speech_started(frame.sample_rate)
        if self._utterance is not None:
            self._append(frame)
            if self._vad.speaking and self._vad.silence_ms == 0.0:
                self._last_speech_at = self._clock()
            if self._vad.speaking and self._utterance_ms >= self.settings.max_utterance_secs * 1000.0:
                self._cut_utterance()
                return
        else:
            self._preroll.append(frame)
            self._preroll_ms += frame.duration_ms
            while self._preroll_ms - self._preroll[0].duration_ms >= self.settings.preroll_ms:
                self._preroll_ms -= self._preroll.popleft().duration_ms
        if event is VadEvent.SPEECH_STOP and self._utterance is not None:
            if self._turn_task is not None:
                self._turn_task.cancel()
            self._turn_task = self._spawn(self._end_of_speech(self._utterance, self._clock()))

    def on_dtmf(self, digit: str) -> None:
        if self._closed or self._ending:
            return
        self._interrupt()
        if self._dtmf_task is not None:
            self._dtmf_task.cancel()
        if digit == "#":
            self._submit_digits()
            return
        self._digits += digit
        self._dtmf_task = self._spawn(self._dtmf_wait())

    def on_mark_played(self, name: str) -> None:
        if not self._playout.acknowledge(name) or self._response is None:
            return
        for clause in self._response.clauses:
            if clause.name == name:
                clause.played = True

    def interrupt(self) -> None:
        """Barge-in requested by the client (browser ``interrupt`` message)."""
        self._interrupt()

    def close(self) -> None:
        """Stop everything; the tasks are cancelled by their TaskGroup or here."""
        self._closed = True
        for task in (self._turn_task, self._dtmf_task, self._apology_task, self._silence_task,
                     self._response.task if self._response else None):
            if task is not None:
                task.cancel()

    # ------------------------------------------------------------------------------ speech
    def _speech_started(self, rate: int) -> None:
        self._last_activity, self._prompted = self._clock(), False
        if self.settings.barge_in:
            self._interrupt()
        if self._turn_task is not None:          # the caller went on speaking: same turn
            self._turn_task.cancel()
            self._turn_task = None
        if self._utterance is None:
            self._utterance, self._utterance_ms = [], 0.0
            self._utterance_rate = rate
            for f in self._preroll:
                self._append(f)
            self._preroll.clear()
            self._preroll_ms = 0.0
        self._last_speech_at = self._clock()

    def _append(self, frame: AudioFrame) -> None:
        assert self._utterance is not None
        pcm = frame.pcm       # at the transport's rate; resampled once, when the turn is transcribed
        self._utterance.append(pcm)
        self._utterance_ms += frame.duration_ms

    def _cut_utterance(self) -> None:
        """Speech ran past ``max_utterance_secs``: that part becomes a turn, the rest a new utterance."""
        logger.info("utterance reached max_utterance_secs=%.0f; taking the turn", self.settings.max_utterance_secs)
        assert self._utterance is not None
        self._spawn(self._end_of_speech(self._utterance, self._clock(), complete=True))
        self._utterance, self._utterance_ms = [], 0.0

    async def _end_of_speech(self, utterance: list[bytes], stopped_at: float, *, complete: bool = False) -> None:
        """Transcribe at once; answer now if the words sound complete, else wait up to turn_stop_secs."""
        pcm = b"".join(utterance)
        if self._utterance_rate != PIPELINE_RATE:
            pcm = Resampler(self._utterance_rate, PIPELINE_RATE).process(pcm)
        speech_end = self._last_speech_at
        t0 = self._clock()
        try:
            text = await self._transcribe(pcm)
        except _Fatal as exc:
            self._fail("stt_failed", str(exc))
            return
        stt_ms = (self._clock() - t0) * 1000.0
        if not complete and looks_incomplete(text):
            remaining = speech_end + self.settings.turn_stop_secs - self._clock()
            if remaining > 0:
                await asyncio.sleep(remaining)     # cancelled if the caller speaks again
        if self._utterance is utterance:
            self._utterance = None
            self._turn_task = None
        if not text.strip():
            return
        self._emit(TranscriptEvent("user", text, spoken_s=len(pcm) / 2 / PIPELINE_RATE,
                                   ended_s_ago=max(0.0, t0 - speech_end + stt_ms / 1000.0)))
        self.messages.append({"role": "user", "content": text})
        response = self._begin_response(self._answer(), speech_end=speech_end)
        response.turn_wait_ms = (stopped_at - speech_end) * 1000.0
        response.stt_ms = stt_ms

    def _dtmf_wait(self) -> Coroutine[Any, Any, None]:
        async def wait() -> None:
            await asyncio.sleep(self.settings.dtmf_timeout_ms / 1000.0)
            self._dtmf_task = None
            self._submit_digits()
        return wait()

    def _submit_digits(self) -> None:
        digits, self._digits = self._digits, ""
        if not digits:
            return
        text = f"[DTMF] {digits}"
        self._emit(TranscriptEvent("user", text))
        self.messages.append({"role": "user", "content": text})
        self._begin_response(self._answer())

    # ------------------------------------------------------------------------------ responses
    def _begin_response(self, body: Callable[[_Response], Coroutine[Any, Any, None]],
                        speech_end: float | None = None) -> _Response:
        self._interrupt(barge_in=False)   # a new answer replaces one still running
        self._responses += 1
        message = {"role": "assistant", "content": ""}
        response = _Response(self._responses, message, speech_end=speech_end)
        self.messages.append(message)
        self._response = response
        response.task = self._spawn(self._run_response(response, body))
        return response

    async def _run_response(self, response: _Response, body: Callable[[_Response], Coroutine[Any, Any, None]]) -> None:
        try:
            await body(response)
            self._playout.end_of_audio()
        except _Fatal as exc:
            self._fail("provider_failed", str(exc))
        finally:
            if self._response is response and not response.message["content"]:
                self._forget(response)

    def _speak_text(self, text: str) -> Callable[[_Response], Coroutine[Any, Any, None]]:
        async def body(response: _Response) -> None:
            response.message["content"] = text
            await self._speak_clause(response, text)
            self._emit(TranscriptEvent("assistant", text))
        return body

    def _answer(self) -> Callable[[_Response], Coroutine[Any, Any, None]]:
        async def body(response: _Response) -> None:
            clauses: asyncio.Queue[str | None] = asyncio.Queue()
            tool_calls: list[ToolCall] = []
            try:
                async with asyncio.TaskGroup() as tg:   # the LLM streams while earlier clauses are spoken
                    tg.create_task(self._speak_queue(response, clauses))
                    text = await self._generate(response, clauses, tool_calls)
            except ExceptionGroup as group:
                raise _first(group, _Fatal) from None
            if text:
                self._emit(TranscriptEvent("assistant", text))
            for call in tool_calls:
                if self._on_tool is not None and any(t.name == call.name for t in self._tools):
                    logger.info("model called tool %s", call.name)
                    self._playout.end_of_audio()
                    await self._on_tool(call)
                else:
                    logger.warning("model called unknown tool %r; ignored", call.name)
        return body

    async def _generate(self, response: _Response, clauses: asyncio.Queue[str | None],
                        tool_calls: list[ToolCall]) -> str:
        """Stream the LLM answer into clauses; the full text goes into the context as it grows."""
        splitter = ClauseSplitter()
        context = list(self.messages[:-1])
        t0 = self._clock()
        parts: list[str] = []
        async with contextlib.aclosing(self._llm_stream(context)) as deltas:
            async for delta in deltas:
                if isinstance(delta, ToolCall):
                    tool_calls.append(delta)
                    continue
                if not parts:
                    response.llm_ms = (self._clock() - t0) * 1000.0
                parts.append(delta)
                response.message["content"] = "".join(parts).strip()
                for clause in splitter.feed(delta):
                    clauses.put_nowait(clause)
        for clause in splitter.flush():
            clauses.put_nowait(clause)
        clauses.put_nowait(None)
        return "".join(parts).strip()

    async def _speak_queue(self, response: _Response, clauses: asyncio.Queue[str | None]) -> None:
        """Speak clauses in order. The first streams straight from TTS (fewest hops to first audio);
        each later one is synthesised while the one before it plays, so a short clause is never
        followed by a gap the length of a TTS round trip."""
        text = await clauses.get()
        if text is None:
            return
        try:
            async with asyncio.TaskGroup() as tg:
                source: AsyncIterator[tuple[bytes, int]] | None = None
                started: float | None = None
                while text is not None:
                    upcoming = tg.create_task(self._prefetch(clauses, tg))
                    await self._speak_clause(response, text, source, started)
                    following = await upcoming
                    if following is None:
                        break
                    text, chunks, started = following
                    source = _drain(chunks)
        except ExceptionGroup as group:
            raise _first(group, _Fatal) from None

    async def _prefetch(self, clauses: asyncio.Queue[str | None],
                        tg: asyncio.TaskGroup) -> tuple[str, asyncio.Queue[Any], float] | None:
        """Wait for the next clause's text and start synthesising it at once."""
        text = await clauses.get()
        if text is None:
            return None
        chunks: asyncio.Queue[Any] = asyncio.Queue()
        tg.create_task(self._synthesise_into(text, chunks))
        return text, chunks, self._clock()

    async def _synthesise_into(self, text: str, chunks: asyncio.Queue[Any]) -> None:
        """Feed a clause's audio into ``chunks`` as it arrives; then None, or the failure."""
        try:
            async with contextlib.aclosing(self._tts_stream(text)) as stream:
                async for chunk in stream:
                    chunks.put_nowait(chunk)
        except _Fatal as exc:
            chunks.put_nowait(exc)
            return
        chunks.put_nowait(None)

    async def _speak_clause(self, response: _Response, text: str,
                            chunks: AsyncIterator[tuple[bytes, int]] | None = None, started: float | None = None) -> None:
        clause = _Clause(f"r{response.index}-c{len(response.clauses)}", text,
                         start_ms=self._playout.sent_ms + self._playout.queued_ms)
        response.clauses.append(clause)
        t0 = self._clock() if started is None else started

        def first_chunk() -> None:
            if len(response.clauses) == 1:
                response.tts_ms = (self._clock() - t0) * 1000.0

        await self._play_tts(text, first_chunk, chunks)
        clause.end_ms = self._playout.sent_ms + self._playout.queued_ms
        self._playout.mark(clause.name)

    async def _play_tts(self, text: str, on_first: Callable[[], None] | None = None,
                        source: AsyncIterator[tuple[bytes, int]] | None = None) -> bool:
        """Synthesise ``text`` (or play ``source``) into the playout at its rate; True once audio was queued."""
        resampler: Resampler | None = None
        spoke = False
        async with contextlib.aclosing(source if source is not None else self._tts_stream(text)) as chunks:
            async for pcm, rate in chunks:
                if not spoke and on_first is not None:
                    on_first()
                spoke = True
                if rate != self._playout.sample_rate:
                    resampler = resampler or Resampler(rate, self._playout.sample_rate)
                    pcm = resampler.process(pcm)
                await self._playout.write(pcm)
        return spoke

    # ------------------------------------------------------------------------------ barge-in
    def _interrupt(self, *, barge_in: bool = True) -> None:
        """Stop the agent at once: cancel the answer, flush audio, keep only what was heard."""
        response = self._response
        if response is None:
            return
        speaking = self._playout.speaking
        running = response.task is not None and not response.task.done()
        if not speaking and not running:
            return
        heard = self._heard(response)
        if running:
            assert response.task is not None
            response.task.cancel()
        self._playout.clear()
        response.message["content"] = heard
        if not heard:
            self._forget(response)
        self._response = None
        if barge_in:
            logger.info("barge-in: caller interrupted; heard %d of the answer's characters", len(heard))
            self._emit(BargeIn(heard))

    def _heard(self, response: _Response) -> str:
        played_ms = self._playout.played_ms()
        words: list[str] = []
        for clause in response.clauses:
            if clause.played or (clause.end_ms is not None and played_ms >= clause.end_ms):
                words.append(clause.text)
                continue
            end = clause.end_ms if clause.end_ms is not None else self._playout.sent_ms + self._playout.queued_ms
            span = end - clause.start_ms
            if span > 0 and played_ms > clause.start_ms:
                words.append(truncate_words(clause.text, (played_ms - clause.start_ms) / span))
            break
        return " ".join(w for w in words if w).strip()

    def _forget(self, response: _Response) -> None:
        if response.message in self.messages and not response.message["content"]:
            self.messages.remove(response.message)

    def on_speaking(self, speaking: bool, at: float) -> None:
        """Playout callback: the first frame of an answer went out, or the agent went quiet."""
        self._last_activity = at
        self._emit(BotSpeaking(speaking))
        response = self._response
        if speaking and response is not None and response.speech_end is not None and not response.reported:
            response.reported = True
            self._emit(TurnLatency(turn_wait_ms=response.turn_wait_ms, stt_ms=response.stt_ms,
                                   llm_first_token_ms=response.llm_ms, tts_first_audio_ms=response.tts_ms,
                                   first_audio_out_ms=(at - response.speech_end) * 1000.0))

    # ------------------------------------------------------------------------------ providers
    async def _transcribe(self, pcm: bytes) -> str:
        errors: list[str] = []
        for stt in self._providers.stt:
            for _ in range(self.settings.provider_retries + 1):
                try:
                    async with asyncio.timeout(self.settings.stt_timeout_s):
                        return await stt.transcribe(pcm, sample_rate=PIPELINE_RATE, language=self.persona.language)
                except (ProviderError, TimeoutError) as exc:
                    errors.append(_describe(stt.name, exc))
                    if isinstance(exc, ProviderError) and not exc.transient:
                        break
        raise _Fatal("speech-to-text failed: " + "; ".join(errors))

    def _llm_stream(self, context: Sequence[dict[str, str]]) -> AsyncIterator[str | ToolCall]:
        tools = self._tools
        return self._stream("language model", self._providers.llm,
                            lambda llm: llm.stream(context, tools) if tools else llm.stream(context),
                            self.settings.llm_timeout_s)

    def _tts_stream(self, text: str) -> AsyncIterator[tuple[bytes, int]]:
        async def with_rate(tts: TTSProvider) -> AsyncIterator[tuple[bytes, int]]:
            async with contextlib.aclosing(tts.synthesize(text, voice=self.persona.voice)) as chunks:
                async for chunk in chunks:
                    yield chunk, tts.sample_rate
        return self._stream("text-to-speech", self._providers.tts, with_rate, self.settings.tts_timeout_s)

    async def _stream(self, stage: str, providers: Sequence[_P], open_stream: Callable[[_P], AsyncIterator[_T]],
                      timeout_s: float) -> AsyncIterator[_T]:
        """Items from the first provider that works: each item within ``timeout_s``; a transient failure
        before the first item is retried, then the next provider is tried; a failure after output is fatal."""
        errors: list[str] = []
        for provider in providers:
            for _ in range(self.settings.provider_retries + 1):
                produced = False
                stream = open_stream(provider)
                try:
                    while True:
                        async with asyncio.timeout(timeout_s):
                            item = await anext(stream, None)
                        if item is None:
                            return
                        produced = True
                        yield item
                except (ProviderError, TimeoutError) as exc:
                    errors.append(_describe(provider.name, exc))
                    if produced:
                        raise _Fatal(f"{stage} failed mid-answer: {errors[-1]}") from exc
                    if isinstance(exc, ProviderError) and not exc.transient:
                        break
                finally:
                    await _aclose(stream)
        raise _Fatal(f"{stage} failed: " + "; ".join(errors))

    # ------------------------------------------------------------------------------ failure
    def end_with(self, text: str, reason: str) -> bool:
        """Say ``text`` (uninterruptible), wait until it has played, then end the call with ``reason``.
        False when the call is already ending."""
        if self._ending or self._closed:
            return False
        self._ending = True
        self._interrupt(barge_in=False)
        self._apology_task = self._spawn(self._last_words(text, reason, None))
        return True

    def _fail(self, code: str, message: str) -> None:
        """Apologise (never through a provider known to be down), then end the call."""
        if self._ending:
            return
        logger.warning("%s: %s; apologising and ending the call", code, message)
        self._emit(ErrorEvent(code, message))
        self._ending = True
        self._interrupt(barge_in=False)
        self._apology_task = self._spawn(self._last_words(self.settings.apology_text, code,
                                                          self._providers.apology_audio))

    async def _last_words(self, text: str, reason: str, fallback: tuple[bytes, int] | None) -> None:
        self.messages.append({"role": "assistant", "content": text})
        try:
            try:
                await self._play_tts(text)
            except _Fatal:
                # TTS is down: play the audio rendered once at startup (or nothing).
                if fallback is not None:
                    pcm, rate = fallback
                    if rate != self._playout.sample_rate:
                        pcm = Resampler(rate, self._playout.sample_rate).process(pcm)
                    await self._playout.write(pcm)
            self._emit(TranscriptEvent("assistant", text))
            await self._playout.drained()
        finally:
            self._end_call(reason)

    async def _watch_silence(self) -> None:
        """Ask "are you still there?" after ``silence_prompt_secs`` of silence on both sides, and
        say goodbye after ``silence_hangup_secs`` more."""
        while True:
            wait = self.settings.silence_hangup_secs if self._prompted else self.settings.silence_prompt_secs
            delay = self._last_activity + wait - self._clock()
            if delay > 0:
                await asyncio.sleep(delay)
                continue
            if self._busy():
                self._last_activity = self._clock()
                continue
            if self._prompted:
                logger.info("no answer to the silence prompt; ending the call")
                self.end_with(self.settings.goodbye_text, "silence")
                return
            self._prompted = True
            self._last_activity = self._clock()
            self._begin_response(self._speak_text(self.settings.silence_prompt_text))

    def _busy(self) -> bool:
        response = self._response
        return (self._utterance is not None or self._playout.speaking or self._turn_task is not None
                or (response is not None and response.task is not None and not response.task.done()))


async def _drain(chunks: asyncio.Queue[Any]) -> AsyncIterator[tuple[bytes, int]]:
    while (item := await chunks.get()) is not None:
        if isinstance(item, BaseException):
            raise item
        yield item


def _first(group: BaseExceptionGroup[Any], kind: type[BaseException]) -> BaseException:
    """The first ``kind`` leaf of a (nested) exception group, else the group itself."""
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            found = _first(exc, kind)
            if isinstance(found, kind):
                return found
        elif isinstance(exc, kind):
            return exc
    return group


def _describe(name: str, exc: BaseException) -> str:
    return f"{name} timed out" if isinstance(exc, TimeoutError) else str(exc)


async def _aclose(stream: AsyncIterator[Any]) -> None:
    aclose = getattr(stream, "aclose", None)
    if aclose is not None:
        try:
            await aclose()
        except Exception:  # noqa: BLE001 - a broken stream is already being reported
            pass
