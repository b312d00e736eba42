"""Helpers shared by the JSON media-stream codecs (Twilio, Telnyx, Exotel): parsing one message and
the events whose shape the carriers share (``dtmf.digit``, ``mark.name``). Error texts start with the
carrier's name, so a log line says whose message was wrong.

Usage (inside a MediaStream.decode)::

    data, event = parse_event("twilio", message)        # raises CarrierProtocolError
    if event == "dtmf":
        return [dtmf_frame("twilio", data)]
"""

from __future__ import annotations

import json
from typing import Any

from carriers.base import CarrierProtocolError
from pipeline.frames import Dtmf, MarkPlayed

DTMF_DIGITS = frozenset("0123456789*#ABCD")


def parse_json(carrier: str, message: str | bytes) -> dict[str, Any]:
    """One text frame as a JSON object (binary frames and invalid JSON are protocol errors)."""
    if not isinstance(message, str):
        raise CarrierProtocolError(f"{carrier} sends text frames only")
    try:
        data = json.loads(message)
    except (ValueError, RecursionError):
        raise CarrierProtocolError(f"{carrier} message is not valid JSON") from None
    if not isinstance(data, dict):
        raise CarrierProtocolError(f"{carrier} message has no event")
    return data


def parse_event(carrier: str, message: str | bytes) -> tuple[dict[str, Any], str]:
    """``parse_json`` plus the message's string ``event``."""
    data = parse_json(carrier, message)
    event = data.get("event")
    if not isinstance(event, str):
        raise CarrierProtocolError(f"{carrier} message has no event")
    return data, event


def field(data: dict[str, Any], obj: str, key: str) -> str | None:
    """``data[obj][key]`` if it is a non-empty string."""
    inner = data.get(obj)
    value = inner.get(key) if isinstance(inner, dict) else None
    return value if isinstance(value, str) and value else None


def dtmf_frame(carrier: str, data: dict[str, Any]) -> Dtmf:
    digit = field(data, "dtmf", "digit")
    if digit is None:
        raise CarrierProtocolError(f"{carrier} dtmf event has no dtmf.digit")
    if digit not in DTMF_DIGITS:
        raise CarrierProtocolError(f"{carrier} dtmf digit is not one of 0-9 * # A-D")
    return Dtmf(digit)


def mark_frame(carrier: str, data: dict[str, Any]) -> MarkPlayed:
    name = field(data, "mark", "name")
    if name is None:
        raise CarrierProtocolError(f"{carrier} mark event has no mark.name")
    return MarkPlayed(name)
