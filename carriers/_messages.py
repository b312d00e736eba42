"""Helpers shared by the JSON media-stream codecs (Twilio, Telnyx, Exotel): parsing one message and
the events whose shape the carriers share (``dtmf.digit``, ``mark.name``). Error texts start with the
carrier's name, so a log line says whose message was wrong.

A stream codec that names its carrier, its id keys and the attribute holding the started id
inherits :class:`StreamChecks` for the "before start" and "wrong stream id" checks.

Usage (inside a MediaStream.decode)::

    data, event = parse_event("twilio", message)        # raises CarrierProtocolError
    if event == "media":
        audio = media_payload("twilio", data)            # its bytes (b"": our own audio echoed back)
    if event == "dtmf":
        return [dtmf_frame("twilio", data)]

    body = load_json("vonage webhook body", request.body)   # any JSON from outside, depth-limited
"""

from __future__ import annotations

import binascii
from typing import Any, ClassVar

from carriers.base import CarrierProtocolError
from pipeline.frames import Dtmf, MarkPlayed
from pipeline.jsonutil import JSONLimitExceeded, loads

DTMF_DIGITS = frozenset("0123456789*#ABCD")


def load_json(what: str, text: str | bytes) -> Any:
    """``text`` parsed as JSON; CarrierProtocolError ``"<what> is not valid JSON"`` (saying why when it
    is nested too deep) for anything else, so a hostile document never escapes as RecursionError."""
    try:
        return loads(text)
    except JSONLimitExceeded as exc:
        raise CarrierProtocolError(f"{what} is not valid JSON ({exc})") from None
    except ValueError:
        raise CarrierProtocolError(f"{what} is not valid JSON") from None


def parse_json(carrier: str, message: str | bytes) -> dict[str, Any]:
    """One text frame as a JSON object (binary frames and invalid JSON are protocol errors).

    This runs on every media message: no layers and no strings built unless something is wrong."""
    if not isinstance(message, str):
        raise CarrierProtocolError(f"{carrier} sends text frames only")
    try:
        data = loads(message)
    except JSONLimitExceeded as exc:
        raise CarrierProtocolError(f"{carrier} message is not valid JSON ({exc})") from None
    except ValueError:
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


def media_payload(carrier: str, data: dict[str, Any], *, alt_key: str = "") -> bytes:
    """The audio of a media event, base64-decoded (strictly); b"" for our own audio echoed back on an
    ``outbound`` track. ``alt_key`` is a carrier's other spelling of ``payload``."""
    media = data.get("media")
    if not isinstance(media, dict):
        raise CarrierProtocolError(f"{carrier} media event has no media.payload")
    payload = media.get("payload", media.get(alt_key)) if alt_key else media.get("payload")
    if not isinstance(payload, str):
        raise CarrierProtocolError(f"{carrier} media event has no media.payload")
    if media.get("track") == "outbound":
        return b""
    return decode_base64(carrier, payload)


def decode_base64(carrier: str, payload: str) -> bytes:
    """A media payload's bytes, strictly decoded; CarrierProtocolError when it is not base64."""
    try:
        return binascii.a2b_base64(payload, strict_mode=True)   # base64.b64decode(validate=True), one layer less
    except (binascii.Error, ValueError):
        raise CarrierProtocolError(f"{carrier} media payload is not valid base64") from None


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


class StreamChecks:
    """The checks every JSON stream codec makes on a message, parametrised by class attributes::

        class TwilioMediaStream(StreamChecks):
            carrier, id_keys, id_attr, open_hint = "twilio", ("streamSid",), "stream_sid", "no streamSid yet"
    """

    carrier: ClassVar[str]
    id_keys: ClassVar[tuple[str, ...]]   # the message keys that may carry the stream id (first one names it)
    id_attr: ClassVar[str]               # the attribute holding the started stream's id
    open_hint: ClassVar[str]             # what is missing before start, for encode's error text
    started: bool

    def _require_started(self, event: str, data: dict[str, Any]) -> None:
        if not self.started:
            raise CarrierProtocolError(f"{self.carrier} {event} before start")
        self._check_stream(data)

    def _check_stream(self, data: dict[str, Any]) -> None:
        """A stream id other than the started one is an error (an absent one is tolerated)."""
        sid = None
        for key in self.id_keys:        # a loop, not a generator: this runs on every media message
            sid = data.get(key)
            if sid is not None:
                break
        if sid is not None and self.started and sid != getattr(self, self.id_attr):
            raise self._wrong_stream()

    def _wrong_stream(self) -> CarrierProtocolError:
        return CarrierProtocolError(f"{self.carrier} {self.id_keys[0]} does not match the stream")

    def _require_open(self) -> None:
        if not self.started:
            raise CarrierProtocolError(f"{self.carrier} stream has not started ({self.open_hint})")

    def _start_fields(self, data: dict[str, Any], call_key: str) -> tuple[dict[str, Any], str, str, dict[str, Any]]:
        """A Twilio-shaped ``start`` (Twilio, Plivo): ``(start, stream id, call id, mediaFormat)``."""
        key = self.id_keys[0]
        if self.started:
            raise CarrierProtocolError(f"{self.carrier} sent a second start event")
        start = data.get("start")
        if not isinstance(start, dict):
            raise CarrierProtocolError(f"{self.carrier} start event has no start object")
        ids = []
        for name in (key, call_key):
            value = start.get(name)
            if not isinstance(value, str) or not value:
                raise CarrierProtocolError(f"{self.carrier} start event has no start.{name}")
            ids.append(value)
        outer = data.get(key)
        if outer is not None and outer != ids[0]:
            raise CarrierProtocolError(f"{self.carrier} {key} does not match start.{key}")
        media_format = start.get("mediaFormat", {})
        if not isinstance(media_format, dict):
            raise CarrierProtocolError(f"{self.carrier} start.mediaFormat is not an object")
        return start, ids[0], ids[1], media_format
