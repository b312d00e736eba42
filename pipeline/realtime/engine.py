"""The speech-to-speech :class:`~pipeline.engine.Engine`: one OpenAI Realtime session per call.

The caller's audio goes to the model as it arrives (µ-law untouched on an 8 kHz phone leg, PCM16 at
24 kHz otherwise); the model's audio comes back into the call's :class:`~pipeline.playout.Playout`.
Turn-taking is the server's VAD (``server_vad``, ``semantic_vad``) or ours (``local``: our VAD commits the
buffer and asks for the answer). A barge-in flushes the playout and truncates the model's item at what
the caller heard (``conversation.item.truncate`` with ``audio_end_ms`` from the playout's position and the
item's mark), so the model remembers only that. Function calls go to ``on_tool``; its text goes back as
a ``function_call_output`` and the model answers again.

Last words (the goodbye of max call length, drain, the answering machine; the apology when the session
fails) are spoken by the TTS stage, not the model: they are exact, uninterruptible, and the apology must
not depend on the session that just failed. An error event, a failed response or a dropped socket
apologises and ends the call; a call never reconnects.

Usage::

    engine = RealtimeEngine(model=chain.llm[0], options=RealtimeOptions(voice="alloy"), settings=settings,
                            persona=persona, providers=chain, playout=playout, spawn=tg.create_task,
                            on_event=observer, end_call=call.finish, tools=tools, on_tool=run_tool)
    playout.on_speaking = engine.on_speaking
    engine.start()                    # connects, configures the session, asks for the greeting
    engine.on_audio(AudioFrame(pcm8k, 8000))
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pipeline.audio import Resampler, ulaw_decode, ulaw_encode
from pipeline.events import BargeIn, BotSpeaking, ErrorEvent, Event, TranscriptEvent, TurnLatency
from pipeline.frames import AudioFrame
from pipeline.playout import Playout
from pipeline.provider_chain import ProviderCalls, ProviderChain, ProvidersFailed
from pipeline.providers.base import ProviderError, Tool, ToolCall
from pipeline.realtime.client import (
    PCMU,
    RealtimeModel,
    RealtimeSocket,
    append_audio,
    audio_format_for,
    message_item,
    session_update,
    tool_output,
)
from pipeline.response import Responder
from pipeline.settings import ConversationSettings, Persona
from pipeline.silence import SilenceWatch
from pipeline.text import truncate_words
from pipeline.turns import DigitCollector, new_vad
from pipeline.vad import VadEvent

__all__ = ["RealtimeEngine", "RealtimeOptions"]

logger = logging.getLogger(__name__)

_MAX_QUEUED = 200          # client events waiting for the socket (4 s of 20 ms frames); more audio is dropped


@dataclass(frozen=True, slots=True)
class RealtimeOptions:
    """The session's settings from the configuration (``realtime_*`` keys)."""

    voice: str = "alloy"                             # when the persona names none
    turn_detection: str = "server_vad"               # or "semantic_vad", or "local" (our VAD)
    transcribe_model: str = "gpt-4o-mini-transcribe"  # the caller's words for transcripts ("" = none)
    connect_timeout_secs: float = 10.0


@dataclass(slots=True)
class _Item:
    """One assistant audio item and where it lies in the outbound stream (milliseconds)."""

    id: str
    start_ms: float
    audio_ms: float = 0.0
    transcript: str = ""
    mark: str = ""
    played: bool = False       # its closing mark came back
    cut: bool = False


class RealtimeEngine:
    """One call's realtime session; every method runs on the call's event loop and never blocks."""

    def __init__(self, *, model: RealtimeModel, options: RealtimeOptions, settings: ConversationSettings,
                 persona: Persona, providers: ProviderChain, playout: Playout,
                 spawn: Callable[[Coroutine[Any, Any, None]], asyncio.Task[None]], on_event: Callable[[Event], None],
                 end_call: Callable[[str], None], tools: Sequence[Tool] = (),
                 on_tool: Callable[[ToolCall], Awaitable[str | None]] | None = None,
                 context: Sequence[Mapping[str, str]] = (), clock: Callable[[], float] = time.monotonic) -> None:
        self.persona = persona
        self._context = [dict(m) for m in context]
        self.settings = settings
        self._model = model
        self._options = options
        self._providers = providers
        self._playout = playout
        self._spawn = spawn
        self._emit = on_event
        self._end_call = end_call
        self._tools = tuple(tools)
        self._on_tool = on_tool
        self._clock = clock
        self._format = audio_format_for(playout.sample_rate)
        self._to_model = (None if self._format is PCMU or playout.sample_rate == self._format.sample_rate
                          else Resampler(playout.sample_rate, self._format.sample_rate))
        self._from_model = (None if self._format is PCMU or playout.sample_rate == self._format.sample_rate
                            else Resampler(self._format.sample_rate, playout.sample_rate))
        self._voice = Responder(playout=playout, providers=ProviderCalls(providers, settings=settings, persona=persona),
                                messages=[], spawn=spawn, on_event=on_event, on_failure=lambda _c, _m: None,
                                clock=clock)
        self._vad = new_vad(settings) if options.turn_detection == "local" else None
        self._outbox: asyncio.Queue[Mapping[str, Any]] = asyncio.Queue()
        self._tasks: set[asyncio.Task[None]] = set()
        self._socket: RealtimeSocket | None = None
        self._item: _Item | None = None
        self._cut: set[str] = set()
        self._transcripts: dict[str, str] = {}    # the current item's words so far (or all of them)
        self._reported: set[str] = set()          # items whose whole transcript went out as a TranscriptEvent
        self._active = False                      # a response is in progress at the server
        self._response_id = ""
        self._pending: list[Mapping[str, Any]] = []   # response.create bodies waiting for it to finish
        self._marks = 0
        self._speech_end: float | None = None
        self._first_delta: float | None = None
        self._digits = DigitCollector(timeout_ms=settings.dtmf_timeout_ms, spawn=self._start,
                                      on_digits=self._tell_digits)
        self._configured = False                  # the server accepted our session.update
        self._writing = asyncio.Lock()            # one voice at a time into the playout (model or filler)
        self._filler: asyncio.Task[None] | None = None
        self._closed = False
        self._ending = False
        self._caller_speaking = False             # between the server's speech_started and speech_stopped
        self._silence = SilenceWatch(
            prompt_secs=settings.silence_prompt_secs, hangup_secs=settings.silence_hangup_secs,
            busy=lambda: self._caller_speaking or self._active or playout.speaking,
            prompt=lambda: self._respond({"instructions": "Ask the caller, in exactly these words: "
                                                          f"{settings.silence_prompt_text}"}),
            give_up=lambda: self.end_with(settings.goodbye_text, "silence"), clock=clock)

    # ------------------------------------------------------------------------------ inputs
    def start(self) -> None:
        """Connect, configure the session, and ask the model for the persona's greeting."""
        voice = self.persona.voice or self._options.voice
        system = [m.get("content", "") for m in self._context if m.get("role") == "system"]
        self._outbox.put_nowait(session_update(
            instructions="\n\n".join(system) if system else self.persona.system, voice=voice,
            audio_format=self._format, turn_detection=self._options.turn_detection,
            transcribe_model=self._options.transcribe_model, tools=self._tools, interrupt=self.settings.barge_in))
        for message in self._context:          # a call's context (the /calls or /start body): as the cascade's
            if message.get("role") in ("user", "assistant") and message.get("content"):
                self._outbox.put_nowait(message_item(message["role"], message["content"]))
        if self.persona.greeting:
            self._respond({"instructions": f"Greet the caller with exactly these words: {self.persona.greeting}"})
        self._start(self._run())
        if self.settings.silence_prompt_secs > 0:
            self._start(self._silence.run())

    def on_audio(self, frame: AudioFrame) -> None:
        if self._closed or self._ending:
            return
        if self._vad is not None:
            event = self._vad.process(frame.pcm, frame.sample_rate)
            if event is VadEvent.SPEECH_START:
                self._silence.activity(caller=True)
                if self.settings.barge_in:
                    self._interrupt(cancel=True, barge_in=True)
            elif event is VadEvent.SPEECH_STOP:
                self._silence.activity(caller=True)
                self._speech_end = self._clock()
                self._send({"type": "input_audio_buffer.commit"})
                self._respond({})
        if self._outbox.qsize() >= _MAX_QUEUED:
            return                                     # the socket is stalled: drop audio, not memory
        if self._format is PCMU:
            audio = ulaw_encode(frame.pcm)
        else:
            audio = self._to_model.process(frame.pcm) if self._to_model is not None else frame.pcm
        self._send(append_audio(audio))

    def on_dtmf(self, digit: str) -> None:
        """Digits collected until ``#`` or ``dtmf_timeout_ms``, then told to the model as ``[DTMF] 123``."""
        if self._closed or self._ending:
            return
        self._interrupt(cancel=True, barge_in=False)
        self._digits.press(digit)

    def on_mark_played(self, name: str) -> None:
        if self._playout.acknowledge(name) and self._item is not None and self._item.mark == name:
            self._item.played = True

    def interrupt(self) -> None:
        """The client asked: stop now, keep what was heard."""
        self._interrupt(cancel=True, barge_in=True)

    def on_speaking(self, speaking: bool, at: float) -> None:
        self._silence.activity(at)
        self._emit(BotSpeaking(speaking))
        if speaking and self._speech_end is not None:
            end, self._speech_end = self._speech_end, None
            first = (self._first_delta - end) * 1000.0 if self._first_delta is not None else 0.0
            self._emit(TurnLatency(turn_wait_ms=0.0, stt_ms=0.0, llm_first_token_ms=max(0.0, first),
                                   tts_first_audio_ms=0.0, first_audio_out_ms=(at - end) * 1000.0))

    def filler(self, text: str) -> None:
        """A short filler while a tool runs ("One moment."), spoken by the TTS stage into the playout so
        it never collides with the model's responses; skipped while the agent is speaking."""
        if self._closed or self._ending or self._playout.speaking:
            return
        self._filler = self._start(self._say_filler(text))

    def end_with(self, text: str, reason: str) -> bool:
        if self._closed or self._ending:
            return False
        self._ending = True
        self._interrupt(cancel=True, barge_in=False)
        self._start(self._last_words(text, reason, None))
        return True

    def close(self) -> None:
        self._closed = True
        for task in list(self._tasks):
            task.cancel()

    # ------------------------------------------------------------------------------ the session
    def _start(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = self._spawn(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _send(self, event: Mapping[str, Any]) -> None:
        self._outbox.put_nowait(event)

    def _respond(self, body: Mapping[str, Any]) -> None:
        """``response.create`` now, or once the response in progress is done (one at a time)."""
        if self._active:
            self._pending.append(body)
            return
        self._active = True
        self._send({"type": "response.create", "response": dict(body)} if body else {"type": "response.create"})

    async def _run(self) -> None:
        try:
            self._socket = await self._model.connect(timeout_s=self._options.connect_timeout_secs)
        except ProviderError as exc:
            self._fail("provider_failed", str(exc))
            return
        logger.info("realtime session open model=%s format=%s turn_detection=%s", self._model.settings.model,
                    self._format.wire["type"], self._options.turn_detection)
        writer = self._start(self._write(self._socket))
        try:
            async for event in self._socket.events():
                await self._handle(event)
                if self._closed:
                    return
            if not self._closed:
                self._fail("provider_failed", "the realtime session closed")
        finally:
            writer.cancel()
            try:
                async with asyncio.timeout(1.0):
                    await self._socket.close()
            except TimeoutError:
                pass

    async def _write(self, socket: RealtimeSocket) -> None:
        while True:
            event = await self._outbox.get()
            try:
                await socket.send(event)
            except ProviderError as exc:
                self._fail("provider_failed", str(exc))
                return

    async def _handle(self, event: dict[str, Any]) -> None:
        kind = event.get("type", "")
        if kind == "response.output_audio.delta":
            await self._audio(event)
        elif kind == "response.output_audio.done":
            self._audio_done(str(event.get("item_id", "")))
        elif kind == "response.output_audio_transcript.delta":
            item_id = str(event.get("item_id", ""))
            self._transcripts[item_id] = self._transcripts.get(item_id, "") + str(event.get("delta", ""))
        elif kind == "response.output_audio_transcript.done":
            item_id = str(event.get("item_id", ""))
            text = self._transcripts[item_id] = str(event.get("transcript", "")).strip()
            if text and item_id not in self._cut:
                self._reported.add(item_id)
                self._emit(TranscriptEvent("assistant", text))
        elif kind == "conversation.item.input_audio_transcription.completed":
            text = str(event.get("transcript", "")).strip()
            if text:
                self._emit(TranscriptEvent("user", text))
        elif kind == "input_audio_buffer.speech_started":
            self._caller_speaking = True
            self._silence.activity(caller=True)
            if self.settings.barge_in and not self._ending:
                self._interrupt(cancel=False, barge_in=True)
        elif kind == "input_audio_buffer.speech_stopped":
            self._caller_speaking = False
            self._silence.activity(caller=True)
            self._speech_end, self._first_delta = self._clock(), None
        elif kind == "session.updated":
            self._configured = True
        elif kind == "response.created":
            self._active = True
            self._response_id = str((event.get("response") or {}).get("id", ""))
        elif kind == "response.output_item.done":
            item = event.get("item") or {}
            if item.get("type") == "function_call" and not self._ending:
                self._start(self._call_tool(item))
        elif kind == "response.done":
            self._response_done(event.get("response") or {})
        elif kind == "error":
            self._error(event.get("error") or {})
        elif kind == "rate_limits.updated":
            for limit in event.get("rate_limits") or []:
                if isinstance(limit, dict) and limit.get("remaining") == 0:
                    logger.warning("realtime rate limit %s exhausted; resets in %s s", limit.get("name"),
                                   limit.get("reset_seconds"))

    async def _audio(self, event: Mapping[str, Any]) -> None:
        item_id = str(event.get("item_id", ""))
        if item_id in self._cut or str(event.get("response_id", "")) in self._cut or self._ending:
            return
        if self._item is None or self._item.id != item_id:
            self._item = _Item(item_id, start_ms=self._playout.sent_ms + self._playout.queued_ms)
            self._transcripts = {item_id: self._transcripts.get(item_id, "")}   # older items are done with
            self._reported &= {item_id}
            if self._from_model is not None:
                self._from_model.reset()
        if self._first_delta is None:
            self._first_delta = self._clock()
        raw = base64.b64decode(str(event.get("delta", "")))
        self._item.audio_ms += len(raw) / self._format.bytes_per_ms
        if self._format is PCMU:
            pcm = ulaw_decode(raw)
        else:
            pcm = raw[: len(raw) - len(raw) % 2]
            pcm = self._from_model.process(pcm) if self._from_model is not None else pcm
        async with self._writing:
            await self._playout.write(pcm)

    def _audio_done(self, item_id: str) -> None:
        item = self._item
        if item is None or item.id != item_id or item.cut:
            return
        self._marks += 1
        item.mark = f"rt{self._marks}"
        self._playout.mark(item.mark)

    def _response_done(self, response: Mapping[str, Any]) -> None:
        self._active = False
        if response.get("status") == "failed":
            error = (response.get("status_details") or {}).get("error") or {}
            self._fail("provider_failed", f"realtime response failed: {error.get('type', '')} "
                                          f"{error.get('code', '')} {error.get('message', '')}".strip())
            return
        if self._pending and not self._ending:
            self._respond(self._pending.pop(0))

    def _error(self, error: Mapping[str, Any]) -> None:
        """A request of ours refused mid-call (a truncate racing the end of an item, a cancel after the
        response finished) is logged and the call goes on; anything else, or a refused session, ends it."""
        kind, code = str(error.get("type") or ""), str(error.get("code") or "")
        message = str(error.get("message") or "")
        if kind == "invalid_request_error" and self._configured:
            logger.info("realtime refused a request: %s (%s); the call goes on", code or kind, message)
            return
        self._fail("provider_failed", f"realtime error {kind} {code}: {message}")

    # ------------------------------------------------------------------------------ barge-in
    def _interrupt(self, *, cancel: bool, barge_in: bool) -> None:
        """Stop the agent now: flush the playout and truncate its item at what was heard."""
        item = self._item
        speaking = self._playout.speaking
        filler = self._filler is not None and not self._filler.done()
        if self._filler is not None:
            self._filler.cancel()
        if self._active:
            if cancel:
                self._send({"type": "response.cancel"})
            if self._response_id:
                self._cut.add(self._response_id)    # its audio still in flight is not played
        self._pending.clear()
        if item is None or item.cut or item.played or not speaking:
            if speaking and filler:
                self._playout.clear()         # only the filler was playing: nothing to truncate
            return
        heard_ms = item.audio_ms if item.played else min(item.audio_ms,
                                                         max(0.0, self._playout.played_ms() - item.start_ms))
        item.cut = True
        self._cut.add(item.id)
        self._playout.clear()
        self._send({"type": "conversation.item.truncate", "item_id": item.id, "content_index": 0,
                    "audio_end_ms": int(heard_ms)})
        transcript = self._transcripts.get(item.id, "")
        said = truncate_words(transcript, heard_ms / item.audio_ms) if transcript and item.audio_ms else ""
        if barge_in:
            logger.info("barge-in: caller interrupted after %d ms of the model's %d ms", heard_ms, item.audio_ms)
            self._emit(BargeIn(said))
        if said and item.id not in self._reported:     # the whole answer's words were not reported yet
            self._emit(TranscriptEvent("assistant", said))

    # ------------------------------------------------------------------------------ tools, digits
    async def _call_tool(self, item: Mapping[str, Any]) -> None:
        name, call_id = str(item.get("name", "")), str(item.get("call_id", ""))
        try:
            arguments = json.loads(item.get("arguments") or "{}")
        except ValueError:
            arguments = None
        if not isinstance(arguments, dict):
            result: str | None = "error: the arguments are not a JSON object"
        elif self._on_tool is None or not any(t.name == name for t in self._tools):
            logger.warning("model called unknown tool %r", name)
            result = f"error: there is no tool called {name!r}"
        else:
            logger.info("model called tool %s", name)
            result = await self._on_tool(ToolCall(name, arguments, id=call_id))
        if result is not None and not self._ending and not self._closed:
            self._send(tool_output(call_id, result))
            self._respond({})

    def _tell_digits(self, digits: str) -> None:
        self._emit(TranscriptEvent("user", f"[DTMF] {digits}"))
        self._send(message_item("user", f"[DTMF] {digits}"))
        self._respond({})

    # ------------------------------------------------------------------------------ ending
    def _fail(self, code: str, message: str) -> None:
        """Apologise through the TTS stage (never the session that failed), then end the call."""
        if self._ending or self._closed:
            return
        logger.warning("%s: %s; apologising and ending the call", code, message)
        self._emit(ErrorEvent(code, message))
        self._ending = True
        self._interrupt(cancel=False, barge_in=False)
        self._playout.clear()
        self._start(self._last_words(self.settings.apology_text, code, self._providers.apology_audio))

    async def _last_words(self, text: str, reason: str, fallback: tuple[bytes, int] | None) -> None:
        try:
            await self._voice.last_words(text, fallback)
        finally:
            self._end_call(reason)

    async def _say_filler(self, text: str) -> None:
        try:
            async with self._writing:
                await self._voice.play_text(text)
                self._playout.end_of_audio()
        except ProvidersFailed as exc:
            logger.info("filler not spoken: %s", exc)
