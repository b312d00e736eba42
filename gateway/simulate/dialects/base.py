"""The carrier side of a call, sans-I/O: what the emulator sends and how it reads the gateway.

A dialect holds one emulated call's carrier state (ids, sequence numbers) and turns emulator
actions into that carrier's wire messages. ``SimulatedCall`` does the I/O, pacing and playback.

Usage (what SimulatedCall does)::

    d = TwilioDialect(credentials={"auth_token": "..."}, from_="+1...", to="+1...")
    hook = d.webhook(public_url, extra={})          # method, path, headers, body: signed
    stream_url = d.answer(response_text)            # parses TwiML / NCCO / XML / JSON
    for m in d.opening(): send(m)                   # connected + start
    send(d.media(pcm_20ms))                         # one inbound frame
    for item in d.parse(message): ...               # Inbound("media", pcm=...) / ("mark", name=...) / ("clear")
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import ClassVar, Protocol

__all__ = ["Dialect", "Inbound", "Webhook"]


@dataclass(frozen=True, slots=True)
class Webhook:
    """One HTTP request the carrier makes to the gateway (already signed)."""

    method: str
    path: str                                   # e.g. "/start/twilio" (+ "?query")
    headers: Mapping[str, str] = field(default_factory=dict)
    body: bytes = b""


@dataclass(frozen=True, slots=True)
class Inbound:
    """What one gateway message meant: ``media`` (PCM16 at the dialect rate), ``mark`` (a marker to
    acknowledge after playback), ``clear`` (flush playback), ``invalid`` (the real carrier would
    reject it: ``text`` says why) or ``other``."""

    kind: str
    pcm: bytes = b""
    name: str = ""
    text: str = ""


class Dialect(Protocol):
    name: ClassVar[str]
    rate: int                 # PCM sample rate of the media audio
    frame_ms: int             # duration of one inbound media message the carrier sends
    call_id: str              # the carrier's id of this call (as its REST API knows it)

    def __init__(self, *, credentials: Mapping[str, str], from_: str, to: str) -> None: ...

    def webhook(self, public_url: str, extra: Mapping[str, str]) -> Webhook: ...

    def answer(self, status: int, text: str) -> str:
        """Parse the gateway's answer; return the media socket URL (wss://public-host/...)."""

    def ws_headers(self) -> dict[str, str]: ...

    def opening(self) -> list[str | bytes]: ...

    def media(self, pcm: bytes) -> str | bytes: ...

    def dtmf(self, digit: str) -> str | bytes: ...

    def mark_ack(self, name: str) -> str | bytes | None:
        """The acknowledgement the carrier sends once a marker's audio has played (or was flushed)."""

    def stop(self) -> list[str | bytes]: ...

    def parse(self, message: str | bytes) -> list[Inbound]: ...
