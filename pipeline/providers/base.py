"""Provider interfaces: speech-to-text, language model, text-to-speech.

One provider is one module under ``pipeline/providers``. Each maps its vendor's failures once,
at its boundary, to :class:`ProviderError` (``transient`` says whether a retry may help).

Usage::

    text = await stt.transcribe(pcm16k, sample_rate=16000, language="en")
    async for delta in llm.stream([{"role": "user", "content": text}]):
        ...
    async for chunk in tts.synthesize("Hello.", voice=None):   # PCM16 at tts.sample_rate
        ...
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Mapping, Protocol, Sequence

__all__ = ["LLMProvider", "Message", "ProviderError", "ProviderSettings", "STTProvider", "TTSProvider", "Tool", "ToolCall"]

Message = Mapping[str, str]


@dataclass(frozen=True, slots=True)
class Tool:
    """A function the model may call; ``parameters`` is a JSON schema object."""

    name: str
    description: str
    parameters: Mapping[str, Any] = field(default_factory=lambda: {"type": "object", "properties": {}})


@dataclass(frozen=True, slots=True)
class ToolCall:
    """The model asked for ``name`` with ``arguments`` (already parsed from JSON)."""

    name: str
    arguments: Mapping[str, Any] = field(default_factory=dict)


class ProviderError(Exception):
    """A provider call failed.

    Args:
        provider: provider name (``"openai"``, ``"local"`` ...).
        message: what happened, without secrets.
        transient: True when retrying the same request may succeed (timeouts, 429, 5xx).
    """

    def __init__(self, provider: str, message: str, *, transient: bool = False) -> None:
        super().__init__(f"{provider}: {message}")
        self.provider = provider
        self.transient = transient


class STTProvider(Protocol):
    """Speech to text over one finished utterance (PCM16 mono)."""

    name: str

    async def transcribe(self, pcm: bytes, *, sample_rate: int, language: str | None = None) -> str: ...


class LLMProvider(Protocol):
    """Chat completion streamed as text deltas, then any tool calls the model made."""

    name: str

    def stream(self, messages: Sequence[Message], tools: Sequence[Tool] = ()) -> AsyncIterator[str | ToolCall]: ...


class TTSProvider(Protocol):
    """Text to speech streamed as PCM16 mono chunks at ``sample_rate``."""

    name: str
    sample_rate: int

    def synthesize(self, text: str, *, voice: str | None = None) -> AsyncIterator[bytes]: ...


@dataclass(frozen=True, slots=True)
class ProviderSettings:
    """A resolved provider for one stage (the secret is never printed: see ``masked``)."""

    name: str
    model: str
    api_key: str | None = None
    base_url: str = ""
    voice: str | None = None

    def masked(self) -> dict[str, str | None]:
        key = None if not self.api_key else f"{self.api_key[:3]}…{self.api_key[-2:]}" if len(self.api_key) > 8 else "***"
        return {"name": self.name, "model": self.model, "api_key": key, "base_url": self.base_url or None,
                "voice": self.voice}
