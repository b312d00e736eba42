"""The JSON events a browser or app receives, and the control messages it sends, shared by ``/ws`` and
the WebRTC data channel (design §3.1).

One function maps a conversation event to the message the client sees; transports add only their own
framing (a WebSocket text frame, a data-channel string). Events with no client form give None.
``parse_control`` reads a client's control message without trusting it.

Usage::

    message = event_message(TranscriptEvent("user", "hello"))
    # {"type": "transcript", "role": "user", "text": "hello", "final": True}
    channel.send(encode(message))
    parse_control('{"type": "interrupt"}')     # "interrupt"; ValueError (the text to send back) if not JSON
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from pipeline.conversation import BargeIn, BotSpeaking, ErrorEvent, Event, TranscriptEvent, TurnLatency
from pipeline.jsonutil import loads

if TYPE_CHECKING:
    from gateway.calls.leg import CallSide

__all__ = ["encode", "event_message", "parse_control", "ready_event"]


def event_message(event: Event) -> dict[str, Any] | None:
    """The client's JSON message for ``event``: ``transcript`` (``role``, ``text``, ``final``),
    ``bot_speaking`` (``state``: ``started``/``stopped``), ``turn_latency`` (per-stage milliseconds,
    rounded to 0.1), ``interrupted`` (``heard``: what the listener heard of the answer) or ``error``
    (``code``, ``message``); None for an event clients do not see."""
    if isinstance(event, TranscriptEvent):
        return {"type": "transcript", "role": event.role, "text": event.text, "final": event.final}
    if isinstance(event, BotSpeaking):
        return {"type": "bot_speaking", "state": "started" if event.started else "stopped"}
    if isinstance(event, TurnLatency):
        return {"type": "turn_latency", **{k: round(v, 1) for k, v in asdict(event).items()}}
    if isinstance(event, BargeIn):
        return {"type": "interrupted", "heard": event.heard}
    if isinstance(event, ErrorEvent):
        return {"type": "error", "code": event.code, "message": event.message}
    return None


def encode(message: Mapping[str, Any]) -> str:
    """Compact JSON text, as both transports send it."""
    return json.dumps(message, separators=(",", ":"))


def parse_control(text: str | bytes) -> object:
    """The ``type`` of a client's control message (``"interrupt"``, ``"end"``, or whatever it sent; None
    when the message is JSON but not an object): the caller decides what it knows. ValueError with the
    text to send back when the message is not JSON (or is nested absurdly deep)."""
    try:
        data = loads(text)
    except ValueError:
        raise ValueError("control messages must be JSON objects like {\"type\": \"interrupt\"}") from None
    return data.get("type") if isinstance(data, dict) else None


def ready_event(call: CallSide, codec: str, sample_rate: int, **extra: Any) -> Mapping[str, Any]:
    """A browser's ``ready`` event: the session's id, persona, codec and the rate of the agent's audio."""
    assert call.persona is not None
    return {"type": "ready", "session_id": call.session.id, "persona": call.persona.name, "codec": codec,
            "sample_rate": sample_rate, **extra}
