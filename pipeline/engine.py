"""The engine seam: what a transport drives to turn the caller's audio into the agent's audio.

A transport (a carrier's media socket, the browser's ``/ws``, WebRTC) owns the socket and the
:class:`~pipeline.playout.Playout` pacer that carries the agent's audio out; the engine owns everything
between. The cascade :class:`~pipeline.conversation.Conversation` (VAD, STT, LLM, TTS) is one engine; a
speech-to-speech model (OpenAI Realtime) can be another behind the same calls.

Usage::

    engine: Engine = Conversation(settings=..., persona=persona, providers=chain, playout=playout,
                                  spawn=tg.create_task, on_event=observer, end_call=call.finish)
    playout.on_speaking = engine.on_speaking
    engine.start()
    try:
        async for frame in carrier_frames:           # the reader task
            match frame:
                case AudioFrame(): engine.on_audio(frame)
                case Dtmf(digit=d): engine.on_dtmf(d)
                case MarkPlayed(name=n): engine.on_mark_played(n)
    finally:
        engine.close()
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Protocol, runtime_checkable

from pipeline.frames import AudioFrame
from pipeline.providers.base import ToolCall
from pipeline.settings import Persona

__all__ = ["Engine", "OnTool"]

# The tool callback every engine takes: run the model's call and return the result text for the model,
# or None when nothing goes back (the tool ended or transferred the call).
OnTool = Callable[[ToolCall], Awaitable[str | None]]


@runtime_checkable
class Engine(Protocol):
    """One call's agent, as its transport sees it.

    The contract:

    * **One event loop.** Every method is called from the call's event loop, never from another thread,
      and none of them blocks or awaits: work that takes time runs in tasks the engine starts through the
      ``spawn`` callable it was built with (the call's TaskGroup), so ending the call cancels them.
    * **Who calls what.** The call's setup calls :meth:`start` once, after wiring ``playout.on_speaking``
      to :meth:`on_speaking`; the transport's reader task calls :meth:`on_audio`, :meth:`on_dtmf` and
      :meth:`on_mark_played` as messages arrive, and :meth:`interrupt` for a client's explicit barge-in;
      the playout pacer calls :meth:`on_speaking`; the gateway (max call length, drain, answering machine)
      calls :meth:`end_with`; the tool runner (:mod:`pipeline.tools`) calls :meth:`filler` while a tool
      is slow; the call's teardown calls :meth:`close` once, last.
    * **Tools.** An engine is built with the call's ``tools`` (:class:`~pipeline.providers.base.Tool`)
      and an ``on_tool`` callback (:data:`OnTool`): for each call the model makes it awaits
      ``on_tool(call)`` and gives the returned text back to the model as the call's result (its
      ``call.id`` names it); ``None`` means nothing goes back (the tool ended or transferred the call).
    * **What it emits.** Through its ``on_event`` callback: :mod:`pipeline.events` values
      (``TranscriptEvent`` for both sides' final words, ``BotSpeaking``, ``BargeIn`` with what was heard,
      ``TurnLatency``, ``ErrorEvent`` before an apology). Through the playout: the agent's audio, marks
      after each clause and a clear on barge-in. Through its ``end_call(reason)`` callback: its own
      decision to hang up (after last words have played), at most once.
    * **After close** every input is ignored and no callback fires again.

    Attributes the gateway reads: ``persona`` (its ``transfer_targets`` when the model calls a tool).
    """

    persona: Persona

    def start(self) -> None:
        """Begin the call: speak the greeting, start any watchdogs."""

    def on_audio(self, frame: AudioFrame) -> None:
        """One frame of the caller's audio, at the transport's rate, in real time."""

    def on_dtmf(self, digit: str) -> None:
        """A key the caller pressed (``0``-``9``, ``*``, ``#``)."""

    def on_mark_played(self, name: str) -> None:
        """The transport reports that the audio before mark ``name`` has played."""

    def interrupt(self) -> None:
        """Stop speaking now (the client asked): flush audio, keep what was heard."""

    def on_speaking(self, speaking: bool, at: float) -> None:
        """Playout callback: the agent's audio started or stopped going out at clock time ``at``."""

    def filler(self, text: str) -> None:
        """A tool the model called is still running: say ``text`` ("One moment.") now, interruptible,
        instead of leaving the caller in silence (the tool runner calls this; nothing if not answering)."""

    def end_with(self, text: str, reason: str) -> bool:
        """Say ``text`` uninterruptibly, then end the call with ``reason``; False if already ending."""

    def close(self) -> None:
        """Stop everything; the call is over."""
