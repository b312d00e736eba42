"""One conversation: VAD -> turn detection -> STT -> LLM -> TTS -> playout, with barge-in.

The cascade :class:`~pipeline.engine.Engine`. The transport (a carrier media socket, a browser socket)
feeds audio, DTMF and marker acks in, and runs the :class:`~pipeline.playout.Playout` pacer that carries
the agent's audio out. :class:`Conversation` wires the parts and owns the call's ending:

* :class:`~pipeline.turns.TurnTaker` turns audio and digits into turns,
* :class:`~pipeline.response.Responder` speaks answers and keeps what was heard,
* :class:`~pipeline.provider_chain.ProviderCalls` reaches the providers with retries and fallbacks,
* here: the apology when every provider failed, last words (:meth:`Conversation.end_with`) and the
  silence watchdog.

Every task the conversation starts is created through ``spawn`` (the call's TaskGroup), so ending the
call cancels them all.

Usage::

    convo = Conversation(settings=..., persona=persona, providers=chain, playout=playout,
                         spawn=tg.create_task, on_event=observer, end_call=call.finish)
    convo.start()                       # speaks the greeting
    convo.on_audio(AudioFrame(pcm, 8000))
    convo.on_mark_played("r1-c0")
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from typing import Any

from pipeline.engine import OnTool
from pipeline.events import (
    BargeIn,
    BotSpeaking,
    ErrorEvent,
    Event,
    TranscriptEvent,
    TurnLatency,
)
from pipeline.frames import AudioFrame
from pipeline.interruptions import InterruptionGuard
from pipeline.playout import Playout
from pipeline.provider_chain import ProviderCalls, ProviderChain
from pipeline.providers.base import Message, Tool
from pipeline.response import Responder
from pipeline.settings import ConversationSettings, Persona
from pipeline.silence import SilenceWatch
from pipeline.turns import PIPELINE_RATE, Turn, TurnTaker

__all__ = [
    "PIPELINE_RATE",
    "BargeIn",
    "BotSpeaking",
    "Conversation",
    "ConversationSettings",
    "ErrorEvent",
    "Event",
    "Persona",
    "ProviderChain",
    "TranscriptEvent",
    "TurnLatency",
]

logger = logging.getLogger(__name__)


class Conversation:
    """The per-call agent; all methods are called from the call's event loop."""

    def __init__(self, *, settings: ConversationSettings, persona: Persona, providers: ProviderChain,
                 playout: Playout, spawn: Callable[[Coroutine[Any, Any, None]], asyncio.Task[None]],
                 on_event: Callable[[Event], None], end_call: Callable[[str], None],
                 context: Sequence[Mapping[str, str]] = (), clock: Callable[[], float] = time.monotonic,
                 tools: Sequence[Tool] = (), on_tool: OnTool | None = None) -> None:
        self.settings = settings
        self.persona = persona
        self._providers = providers
        self._playout = playout
        self._spawn = spawn
        self._emit = on_event
        self._end_call = end_call
        self._clock = clock
        self.messages: list[Message] = ([dict(m) for m in context]
                                        or [{"role": "system", "content": persona.system}])
        calls = ProviderCalls(providers, settings=settings, persona=persona)
        self._responder = Responder(playout=playout, providers=calls, messages=self.messages, spawn=spawn,
                                    on_event=on_event, on_failure=self._fail, clock=clock, tools=tools,
                                    on_tool=on_tool, max_tool_rounds=settings.tool_max_rounds)
        self.interruptions = InterruptionGuard(settings=settings, language=persona.language, control=playout,
                                               speaking=lambda: playout.speaking, interrupt=self._responder.interrupt,
                                               spawn=spawn, clock=clock)
        self._turns = TurnTaker(settings=settings, transcribe=calls.transcribe, spawn=spawn,
                                on_speech_start=self._speech_started, on_turn=self._take_turn,
                                on_failure=self._fail, clock=clock, on_speech_stop=self.interruptions.on_speech_stop,
                                on_no_words=self.interruptions.on_silence, language=persona.language,
                                listen=calls.live_transcription,
                                on_interim=self.interruptions.confirm_with_transcript)
        self._closed = False
        self._ending = False
        self._apology_task: asyncio.Task[None] | None = None
        self._silence_task: asyncio.Task[None] | None = None
        self._silence = SilenceWatch(
            prompt_secs=settings.silence_prompt_secs, hangup_secs=settings.silence_hangup_secs, busy=self._busy,
            prompt=lambda: self._responder.say(settings.silence_prompt_text),
            give_up=lambda: self.end_with(settings.goodbye_text, "silence"), clock=clock)

    # ------------------------------------------------------------------------------ inputs
    def start(self) -> None:
        """Speak the persona's greeting (interruptible like any answer)."""
        if self.persona.greeting:
            self._responder.say(self.persona.greeting)
        if self.settings.silence_prompt_secs > 0:
            self._silence_task = self._spawn(self._silence.run())

    def on_audio(self, frame: AudioFrame) -> None:
        if self._closed or self._ending:
            return
        self._turns.on_audio(frame)
        self.interruptions.on_audio(frame)

    def on_dtmf(self, digit: str) -> None:
        if self._closed or self._ending:
            return
        self._responder.interrupt()
        self._turns.on_dtmf(digit)

    def on_mark_played(self, name: str) -> None:
        self._responder.on_mark_played(name)

    def interrupt(self) -> None:
        """Barge-in requested by the client (browser ``interrupt`` message)."""
        self._responder.interrupt()

    def filler(self, text: str) -> None:
        """A tool is slow: say ``text`` ("One moment.") now, interruptible, as part of the answer."""
        if not (self._closed or self._ending):
            self._responder.filler(text)

    def on_speaking(self, speaking: bool, at: float) -> None:
        """Playout callback: the first frame of an answer went out, or the agent went quiet."""
        self._silence.activity(at)
        self._responder.on_speaking(speaking, at)

    def close(self) -> None:
        """Stop everything; the tasks are cancelled by their TaskGroup or here."""
        self._closed = True
        self._turns.close()
        self.interruptions.close()
        for task in (self._apology_task, self._silence_task):
            if task is not None:
                task.cancel()
        self._responder.close()

    # ------------------------------------------------------------------------------ turns
    def _speech_started(self) -> None:
        self._silence.activity(caller=True)
        if self.settings.barge_in:
            self.interruptions.on_speech_start(self._turns.preroll)

    def _take_turn(self, turn: Turn) -> None:
        backchannel = self.interruptions.on_turn(turn.text)    # or it commits the interruption now
        self._emit(TranscriptEvent("user", turn.text, spoken_s=turn.spoken_s, ended_s_ago=turn.ended_s_ago))
        if backchannel:                                        # the agent went on talking
            return
        self.messages.append({"role": "user", "content": turn.text})
        self._responder.answer(speech_end=turn.speech_end, turn_wait_ms=turn.turn_wait_ms, stt_ms=turn.stt_ms)

    # ------------------------------------------------------------------------------ ending
    def end_with(self, text: str, reason: str) -> bool:
        """Say ``text`` (uninterruptible), wait until it has played, then end the call with ``reason``.
        False when the call is already ending."""
        if self._ending or self._closed:
            return False
        self._ending = True
        self._responder.interrupt(barge_in=False)
        self._apology_task = self._spawn(self._last_words(text, reason, None))
        return True

    def _fail(self, code: str, message: str) -> None:
        """Apologise (never through a provider known to be down), then end the call."""
        if self._ending:
            return
        logger.warning("%s: %s; apologising and ending the call", code, message)
        self._emit(ErrorEvent(code, message))
        self._ending = True
        self._responder.interrupt(barge_in=False)
        self._apology_task = self._spawn(self._last_words(self.settings.apology_text, code,
                                                          self._providers.apology_audio))

    async def _last_words(self, text: str, reason: str, fallback: tuple[bytes, int] | None) -> None:
        self.messages.append({"role": "assistant", "content": text})
        try:
            await self._responder.last_words(text, fallback)
        finally:
            self._end_call(reason)

    def _busy(self) -> bool:
        return self._turns.busy or self._playout.speaking or self._responder.running
