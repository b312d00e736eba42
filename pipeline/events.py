"""What a conversation tells its observers: small immutable values, one per thing that happened.

The gateway maps them to metrics, call logs and the browser's event messages; an engine emits them
through the ``on_event`` callback it was given, from the call's event loop.

Usage::

    def observe(event: Event) -> None:
        match event:
            case TranscriptEvent(role="user", text=text):
                print("caller:", text)
            case BargeIn(heard=heard):
                print("interrupted after:", heard)
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["BargeIn", "BotSpeaking", "ErrorEvent", "Event", "TranscriptEvent", "TurnLatency"]


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
    """The agent's audio started (the first frame of an answer went out) or stopped."""

    started: bool


@dataclass(frozen=True, slots=True)
class BargeIn:
    """The caller interrupted the agent; ``heard`` is what of the answer had played by then."""

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
    """A failure that ends the call (``code`` such as ``stt_failed``), said before the apology."""

    code: str
    message: str


Event = TranscriptEvent | BotSpeaking | BargeIn | TurnLatency | ErrorEvent
