"""Provider interfaces: speech-to-text, language model, text-to-speech.

One provider is one module under ``pipeline/providers``: it implements the stage interfaces below and
declares ``SPECS``, a tuple of :class:`ProviderSpec` (name, key variable, base URL, defaults and one
builder per stage it offers); ``pipeline.providers`` discovers the modules and registers their specs.
Each provider maps its vendor's failures once, at its boundary, to :class:`ProviderError`
(``transient`` says whether a retry may help; ``retry_after`` how long the vendor asked us to wait).

Usage::

    text = await stt.transcribe(pcm16k, sample_rate=16000, language="en")
    async for delta in llm.stream([{"role": "user", "content": text}]):
        ...
    async for chunk in tts.synthesize("Hello.", voice=None):   # PCM16 at tts.sample_rate
        ...
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

if TYPE_CHECKING:
    import aiohttp

_T = TypeVar("_T")

__all__ = ["BuildOptions", "closing", "LLMProvider", "Message", "ProviderError", "ProviderSettings",
           "ProviderSpec", "STTProvider", "Tool", "ToolCall", "ToolExchange", "ToolResult", "TTSProvider"]


@dataclass(frozen=True, slots=True)
class Tool:
    """A function the model may call; ``parameters`` is a JSON schema object."""

    name: str
    description: str
    parameters: Mapping[str, Any] = field(default_factory=lambda: {"type": "object", "properties": {}})


@dataclass(frozen=True, slots=True)
class ToolCall:
    """The model asked for ``name`` with ``arguments`` (already parsed from JSON); ``id`` is the vendor's
    id of the call (OpenAI ``call_...``, Anthropic ``toolu_...``, Gemini's optional one), which its
    result must name when it goes back."""

    name: str
    arguments: Mapping[str, Any] = field(default_factory=dict)
    id: str = ""


@dataclass(frozen=True, slots=True)
class ToolResult:
    """What running ``call`` gave, as text for the model (an error is text too: the model is told)."""

    call: ToolCall
    content: str


@dataclass(frozen=True, slots=True)
class ToolExchange:
    """One step of tool use in the context: the calls the model made and their results, in its order.

    It follows the assistant's text message of the same step (if any) and precedes the answer the
    model gives once it has the results. Each LLM provider writes it in its vendor's shape: OpenAI an
    assistant message with ``tool_calls`` and one ``tool`` message per result; Anthropic ``tool_use``
    blocks and a user message of ``tool_result`` blocks; Gemini ``functionCall`` and
    ``functionResponse`` parts. Usage::

        call = ToolCall("lookup_booking", {"ref": "AB12"}, id="call_1")
        messages.append(ToolExchange((ToolResult(call, '{"status": "confirmed"}'),)))
    """

    results: tuple[ToolResult, ...]


# The conversation's context: plain ``{"role": "system" | "user" | "assistant", "content": text}`` messages,
# and a ToolExchange for each step of tool use.
Message = Mapping[str, str] | ToolExchange


class ProviderError(Exception):
    """A provider call failed.

    Args:
        provider: provider name (``"openai"``, ``"local"`` ...).
        message: what happened, without secrets.
        transient: True when retrying the same request may succeed (timeouts, 429, 5xx).
        retry_after: seconds the vendor asked us to wait before retrying (``retry-after``), if it said.

    Usage::

        raise ProviderError("anthropic", "HTTP 429: rate limited", transient=True, retry_after=2.0)
    """

    def __init__(self, provider: str, message: str, *, transient: bool = False,
                 retry_after: float | None = None) -> None:
        super().__init__(f"{provider}: {message}")
        self.provider = provider
        self.transient = transient
        self.retry_after = retry_after


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
    key_env: str | None = None    # named in a refused-key error (the registry's builders fill it in)

    def masked(self) -> dict[str, str | None]:
        key = (None if not self.api_key
               else f"{self.api_key[:3]}…{self.api_key[-2:]}" if len(self.api_key) > 8 else "***")
        return {"name": self.name, "model": self.model, "api_key": key, "base_url": self.base_url or None,
                "voice": self.voice}


@dataclass(frozen=True, slots=True)
class BuildOptions:
    """What a builder needs besides the settings: the stage's timeout and the app's limits."""

    timeout_s: float
    max_tokens: int | None = None        # LLM answer limit
    local_processes: int = 1             # the offline recogniser's worker processes
    local_max_pending: int = 8


if TYPE_CHECKING:
    STTBuilder = Callable[[ProviderSettings, aiohttp.ClientSession, BuildOptions], STTProvider]
    LLMBuilder = Callable[[ProviderSettings, aiohttp.ClientSession, BuildOptions], LLMProvider]
    TTSBuilder = Callable[[ProviderSettings, aiohttp.ClientSession, BuildOptions], TTSProvider]


@dataclass(frozen=True, slots=True)
class ProviderSpec:
    """Static facts about one provider, and how to build it for each stage it offers.

    A provider module declares these in ``SPECS``; a builder imports any vendor SDK inside itself, so
    the module stays importable with the core dependencies alone. Usage::

        SPECS = (ProviderSpec("acme", key_env="ACME_API_KEY", base_url_env="ACME_BASE_URL",
                              default_base_url="https://api.acme.example/v1", default_models={"llm": "acme-1"},
                              llm=lambda settings, http, options: AcmeLLM(settings, http,
                                                                          timeout_s=options.timeout_s)),)
    """

    name: str
    key_env: str | None                     # None: no key needed
    base_url_env: str | None
    default_base_url: str
    default_models: Mapping[str, str]
    default_voice: str | None = None
    aliases: tuple[str, ...] = ()           # other names config accepts for it (``grok`` for ``xai``)
    key_env_fallbacks: tuple[str, ...] = ()  # read in order when ``key_env`` is unset (``GEMINI_API_KEY``)
    api_root: str = "/v1"                   # appended to a configured base URL that has no path ("": none)
    options: str = ""                       # what else the provider reads, for docs/providers.md
    stt: STTBuilder | None = None
    llm: LLMBuilder | None = None
    tts: TTSBuilder | None = None

    @property
    def stages(self) -> frozenset[str]:
        """The stages this provider offers: those it has a builder for."""
        return frozenset(stage for stage in ("stt", "llm", "tts") if getattr(self, stage) is not None)

    @property
    def key_envs(self) -> tuple[str, ...]:
        """Every variable the key is read from, in order."""
        return ((self.key_env,) if self.key_env else ()) + self.key_env_fallbacks


@contextlib.asynccontextmanager
async def closing(stream: AsyncIterator[_T]) -> AsyncGenerator[AsyncIterator[_T], None]:
    """``contextlib.aclosing`` for any async iterator: a provider's stream is closed (its HTTP response
    released, its worker told to stop) when the consumer leaves early — an interruption, a timeout.

    Usage::

        async with closing(llm.stream(messages)) as deltas:
            async for delta in deltas: ...
    """
    try:
        yield stream
    finally:
        aclose = getattr(stream, "aclose", None)
        if aclose is not None:
            await aclose()
