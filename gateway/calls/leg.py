"""The seam between a call and its transport: :class:`Leg` (what a transport does) and
:class:`CallSide` (what a transport may ask of its call).

A leg opens (the carrier's ``start``, the browser's ``ready``, the WebRTC connection), runs its reader
tasks, sends the agent's frames (audio, marks, a ``Clear`` on barge-in) and, for browsers, JSON events;
it closes with a reason; it may hang up, transfer and send DTMF where its far end allows.

Usage (a minimal in-memory leg)::

    class LoopbackLeg:
        label, noun, not_started = "loopback", "a loopback session", "the loopback session has not started yet"
        ended_text = "session ended"
        sample_rate, frame_ms, message_ms = 16000, 20, 20
        can_transfer = detects_machines = False

        async def open(self, call): return {}
        def tasks(self, tg, call): return []
        async def send(self, frame): ...
        def emit(self, message): ...
        async def close(self, reason, code, text): ...
        async def transfer(self, target): raise CallControlFailed("a loopback session cannot be transferred")
        async def send_dtmf(self, digits): return False      # False: the call plays them in band

    await Call(services=services, session=session, leg=LoopbackLeg(), persona=Persona()).run()
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol

from pipeline.frames import AudioFrame, Frame

if TYPE_CHECKING:
    from gateway.sessions import Session
    from pipeline.conversation import Persona

__all__ = ["CallSide", "Leg"]


class CallSide(Protocol):
    """What a leg may ask of the call it carries (all from the call's event loop)."""

    session: Session
    persona: Persona | None       # None until a carrier call's stream has started

    @property
    def ended(self) -> asyncio.Event:
        """Set once the call was asked to end."""

    @property
    def reason(self) -> str | None:
        """Why the call ends (None while it runs)."""

    def finish(self, reason: str, *, code: int = 1000, text: str | None = None) -> None:
        """End the call (idempotent; the first reason wins); ``code``/``text`` are a socket's close."""

    def hear(self, frame: AudioFrame) -> None:
        """Caller audio (admitted at real time, recorded, heard by the conversation)."""

    def dtmf(self, digit: str) -> None:
        """A keypress from the caller."""

    def mark_played(self, name: str) -> None:
        """The far end played the agent's audio up to the mark ``name``."""

    def control(self, text: str) -> None:
        """A JSON control message from a browser (``interrupt``, ``end``)."""

    def bad_message(self, code: str, message: str) -> None:
        """A dropped frame or control message (counted, reported; too many end the call)."""

    def error(self, code: str, message: str) -> None:
        """An ``error`` event for a browser client (rate-limited), without counting a bad message."""


class Leg(Protocol):
    """One transport under a call."""

    label: str            # the metrics ``carrier`` label and the call log's carrier ("twilio", "browser", "webrtc")
    noun: str             # the subject of refusals: "a browser session cannot be transferred"
    not_started: str      # DTMF asked before the media flows
    ended_text: str       # the close reason a socket leg sends when nothing more specific was given
    sample_rate: int      # the agent's audio at this leg (the playout's rate)
    frame_ms: int         # the playout's frame
    message_ms: int       # the most audio the playout puts in one message (whole frames; frame_ms: one each)
    can_transfer: bool    # the far end is a phone call the carrier can move (the model gets a transfer tool)
    detects_machines: bool   # answering-machine detection applies

    async def open(self, call: CallSide) -> Mapping[str, str] | None:
        """Wait until media flows; the parameters it brought (carrier custom parameters), or None when
        the call ended before (the reason is then set)."""

    def tasks(self, tg: asyncio.TaskGroup, call: CallSide) -> list[asyncio.Task[None]]:
        """The leg's tasks beside the playout (its reader, ...); cancelled when the call ends."""

    async def send(self, frame: Frame) -> None:
        """The agent's audio, a playback mark, or a ``Clear`` (barge-in: flush what the far end holds)."""

    def emit(self, message: Mapping[str, Any]) -> None:
        """A JSON event for a browser client (never blocks); a phone leg has nowhere to put it."""

    async def close(self, reason: str, code: int, text: str) -> None:
        """End the leg: tell the far end (``end`` event, a carrier hang-up) and close; must not raise."""

    async def transfer(self, target: str) -> None:
        """Move the far end to ``target``; raises CallControlFailed where that is impossible."""

    async def send_dtmf(self, digits: str) -> bool:
        """Send digits out of band; False when the leg has no such channel (the call plays tones)."""
