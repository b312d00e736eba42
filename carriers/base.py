"""The small interface every carrier adapter implements.

A carrier module holds three things: webhook verification (``verify``), the answer markup
(``answer``, and ``busy`` for a call refused at capacity), a sans-I/O media codec (``open_stream`` ->
:class:`MediaStream`) and REST call control (``hang_up``). Carriers never import ``gateway``; they
receive an ``httpx.AsyncClient``.

Usage (what ``gateway`` does on ``POST /start/twilio``)::

    carrier.verify(request)                       # raises SignatureInvalid -> 403
    call = carrier.parse_call(request)            # CallInfo(call_id="CA...", from_="+1...", to="+1...")
    body, media_type = carrier.answer(call, stream_url, {"session_id": sid})
    refusal = carrier.busy(call, "All our lines are busy.")   # (markup, media type), or None -> 503
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Protocol

from pipeline.frames import Frame

__all__ = [
    "CallEvent",
    "CallControlFailed",
    "CallInfo",
    "Carrier",
    "CarrierError",
    "CarrierProtocolError",
    "DialRequest",
    "HangupFailed",
    "MediaStream",
    "SignatureInvalid",
    "WebhookIgnored",
    "WebhookRequest",
]


class CarrierError(Exception):
    """Base class for carrier failures."""


class SignatureInvalid(CarrierError):
    """The webhook signature is missing or does not match: answer 403 and log the reason."""


class CarrierProtocolError(CarrierError):
    """A media message that does not follow the carrier's protocol (the text says what is wrong)."""


class HangupFailed(CarrierError):
    """The carrier's REST API refused or failed the hang-up (an already-ended call is not a failure)."""


class WebhookIgnored(CarrierError):
    """A verified webhook that needs only an acknowledgement (e.g. a Call Control event other than a
    new call, sent to the same URL): the gateway answers 200 and does nothing else."""


class CallControlFailed(CarrierError):
    """A REST call-control request (transfer, dial, DTMF) was refused or failed; the text says why."""


@dataclass(frozen=True, slots=True)
class WebhookRequest:
    """An inbound webhook as the carrier signed it.

    ``url`` is the public URL the carrier requested (``public_url`` + path + query), never the
    address the proxy forwarded to us. ``headers`` keys are lower-case.
    """

    method: str
    url: str
    headers: Mapping[str, str]
    body: bytes
    form: Sequence[tuple[str, str]] = ()


@dataclass(frozen=True, slots=True)
class CallInfo:
    """What the carrier told us about a call in its webhook."""

    carrier: str
    call_id: str
    from_: str = ""
    to: str = ""
    account_id: str = ""
    direction: str = "inbound"
    custom: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class DialRequest:
    """An outbound call to place: when answered, its audio streams to ``stream_url``.

    ``answer_url`` is our signed webhook (``/start/<carrier>?session=<id>``) for carriers that
    fetch their markup on answer; ``events_url`` receives status and answering-machine results.
    """

    to: str
    from_: str
    stream_url: str
    answer_url: str
    events_url: str
    parameters: Mapping[str, str] = field(default_factory=dict)
    machine_detection: bool = False


@dataclass(frozen=True, slots=True)
class CallEvent:
    """A status or answering-machine callback, normalised.

    ``answered_by`` is ``human``, ``machine`` or ``unknown`` for an AMD result, else ``""``;
    ``ended`` is True when the carrier reports the call over. ``request_id`` is the id ``dial``
    returned when the carrier names the call differently once it exists (Plivo's RequestUUID), so
    the event of a call that was never answered still finds its session.
    """

    call_id: str
    answered_by: str = ""
    ended: bool = False
    status: str = ""
    request_id: str = ""


class MediaStream(Protocol):
    """Sans-I/O codec for one call's media socket.

    ``decode`` turns one WebSocket message into frames (audio as PCM16 at ``sample_rate``);
    ``encode`` turns an outbound frame (``AudioFrame`` at ``sample_rate``, ``Mark``, ``Clear``)
    into the messages to send. Both raise :class:`CarrierProtocolError` with a precise text.
    ``frame_ms`` is the outbound audio frame the carrier needs (the playout cuts audio into it);
    ``max_message_ms`` the most audio one outbound message may carry by the carrier's rules (``encode``
    of a longer frame returns several messages); ``marks`` says whether the carrier acknowledges ``Mark``
    frames.
    """

    sample_rate: int
    frame_ms: int
    max_message_ms: int
    marks: bool
    started: bool

    def decode(self, message: str | bytes) -> list[Frame]: ...

    def encode(self, frame: Frame) -> list[str | bytes]: ...


class Carrier(Protocol):
    """One carrier: ``name`` is also its URL segment (``/start/<name>``, ``/media/<name>/<id>``)."""

    name: ClassVar[str]

    def verify(self, request: WebhookRequest) -> None: ...

    def parse_call(self, request: WebhookRequest) -> CallInfo: ...

    def answer(self, call: CallInfo, stream_url: str, parameters: Mapping[str, str]) -> tuple[str, str]: ...

    def busy(self, call: CallInfo, text: str) -> tuple[str, str] | None:
        """Markup that speaks ``text`` and hangs up (a call refused at capacity), as ``(body,
        media_type)``; None when the carrier has no such answer here: the gateway then answers 503 and
        the carrier's retry or fallback URL takes over. Pure, like ``answer``."""

    def open_stream(self) -> MediaStream: ...

    async def hang_up(self, call: CallInfo) -> None: ...

    def verify_websocket(self, headers: Mapping[str, str], url: str) -> None:
        """Check the carrier's own credential on the media-socket upgrade where it sends one
        (raises SignatureInvalid); the single-use session id in the path is checked by the gateway."""

    async def transfer(self, call: CallInfo, target: str) -> None:
        """Cold-transfer the call to an E.164 number or ``sip:`` URI; the media stream then ends."""

    async def dial(self, request: DialRequest) -> CallInfo:
        """Place an outbound call through the REST API; returns the new call's identity."""

    async def send_dtmf(self, call: CallInfo, digits: str) -> bool:
        """Send digits out of band; False when the carrier has no way (the gateway plays tones)."""

    def parse_event(self, request: WebhookRequest) -> CallEvent:
        """Normalise a status / answering-machine callback (already verified)."""
