"""Frames: the small immutable values that travel between a transport and the pipeline.

Imports only the standard library. Frames compare by value, so tests can write::

    assert stream.decode(msg) == [AudioFrame(b"\\x00\\x00" * 160, 8000)]
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

__all__ = [
    "AudioFrame",
    "Clear",
    "Dtmf",
    "Frame",
    "Mark",
    "MarkPlayed",
    "StreamStarted",
    "StreamStopped",
]


@dataclass(frozen=True, slots=True)
class AudioFrame:
    """Mono 16-bit little-endian PCM at ``sample_rate``.

    >>> AudioFrame(b"\\x00\\x00" * 160, 8000).duration_ms
    20.0
    """

    pcm: bytes
    sample_rate: int

    def __post_init__(self) -> None:
        if len(self.pcm) % 2:
            raise ValueError(f"AudioFrame.pcm must hold whole 16-bit samples (got {len(self.pcm)} bytes)")
        if self.sample_rate <= 0:
            raise ValueError(f"AudioFrame.sample_rate must be positive (got {self.sample_rate})")

    @property
    def duration_ms(self) -> float:
        return len(self.pcm) / 2 / self.sample_rate * 1000.0


@dataclass(frozen=True, slots=True)
class Dtmf:
    """A keypad digit pressed by the caller (``0-9``, ``*``, ``#``, ``A-D``)."""

    digit: str


@dataclass(frozen=True, slots=True)
class Mark:
    """Outbound playback marker: the carrier acknowledges it once the audio before it has played."""

    name: str


@dataclass(frozen=True, slots=True)
class MarkPlayed:
    """Inbound acknowledgement of a :class:`Mark` (after playback, or after a flush)."""

    name: str


@dataclass(frozen=True, slots=True)
class Clear:
    """Flush the carrier's playback buffer (barge-in)."""


@dataclass(frozen=True, slots=True)
class StreamStarted:
    """The carrier's media stream is open and identified."""

    stream_id: str
    call_id: str
    account_id: str = ""
    custom_parameters: Mapping[str, str] = field(default_factory=dict)
    sample_rate: int = 8000
    encoding: str = "audio/x-mulaw"


@dataclass(frozen=True, slots=True)
class StreamStopped:
    """The carrier ended the media stream (the call hung up or the stream was stopped)."""

    reason: str = "stop"


Frame = AudioFrame | Dtmf | Mark | MarkPlayed | Clear | StreamStarted | StreamStopped
