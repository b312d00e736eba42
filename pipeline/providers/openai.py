"""OpenAI and OpenAI-compatible providers over aiohttp (no SDK): transcription, chat streaming, speech.

Groq, Cerebras, Ollama, DeepSeek, Mistral and local Whisper servers speak the same wire protocol;
only the base URL, key and model differ (see ``pipeline.providers.PROVIDERS``).

aiohttp rather than httpx on this path: under hundreds of concurrent calls httpcore's pool hands
one idle connection to several waiting requests and requeues the losers (encode/httpcore#822),
which the load benchmark measured as 270–900 ms p99 waits; aiohttp's pool and C parser keep each
request at a few hundred microseconds of CPU. Every response is read to its end so its connection
is reused.

Usage::

    async with aiohttp.ClientSession() as http:
        stt = OpenAISTT(ProviderSettings("openai", "whisper-1", key, "https://api.openai.com/v1"), http,
                        timeout_s=10)
        text = await stt.transcribe(pcm, sample_rate=16000)
        async for delta in OpenAILLM(settings, http, timeout_s=10).stream(messages): ...
        async for pcm24k in OpenAITTS(settings, http, timeout_s=10).synthesize("Hi!"): ...
"""

from __future__ import annotations

import contextlib
import json
import logging
from typing import AsyncIterator, Iterator, Sequence

import aiohttp

from pipeline.audio import pcm_to_wav
from pipeline.jsonutil import loads
from pipeline.providers.base import ProviderSettings, Message, ProviderError, Tool, ToolCall

__all__ = ["OpenAILLM", "OpenAISTT", "OpenAITTS", "open_session"]

logger = logging.getLogger(__name__)

_TTS_RATE = 24000  # OpenAI's `pcm` response format: 24 kHz, 16-bit LE, mono


def open_session(*, max_connections: int = 1000) -> aiohttp.ClientSession:
    """The shared client session for provider requests (one per app)."""
    connector = aiohttp.TCPConnector(limit=max_connections, limit_per_host=0, keepalive_timeout=60,
                                     ttl_dns_cache=300)
    return aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None))


@contextlib.contextmanager
def _provider_errors(name: str) -> Iterator[None]:
    """Map aiohttp failures to ProviderError once, at this boundary."""
    try:
        yield
    except TimeoutError as exc:
        raise ProviderError(name, "timed out", transient=True) from exc
    except aiohttp.ClientError as exc:
        raise ProviderError(name, f"connection failed ({type(exc).__name__})", transient=True) from exc


async def _raise_for_status(name: str, response: aiohttp.ClientResponse) -> None:
    if response.status < 400:
        return
    body = (await response.read())[:500]
    try:
        message = json.loads(body)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = body.decode("utf-8", "replace")
    transient = response.status == 429 or response.status >= 500
    raise ProviderError(name, f"HTTP {response.status}: {message}", transient=transient)


class _Client:
    def __init__(self, settings: ProviderSettings, http: aiohttp.ClientSession, *, timeout_s: float) -> None:
        self.name = settings.name
        self.settings = settings
        self._http = http
        self._url = settings.base_url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {settings.api_key}"} if settings.api_key else {}
        # sock_read bounds each wait for bytes: the time to the first byte and between chunks
        self._timeout = aiohttp.ClientTimeout(total=None, sock_connect=min(timeout_s, 5.0), sock_read=timeout_s)


class OpenAISTT(_Client):
    """``POST /audio/transcriptions`` with a WAV upload; one request per finished utterance."""

    async def transcribe(self, pcm: bytes, *, sample_rate: int, language: str | None = None) -> str:
        form = aiohttp.FormData()
        form.add_field("model", self.settings.model)
        form.add_field("response_format", "json")
        if language:
            form.add_field("language", language.split("-")[0])
        form.add_field("file", pcm_to_wav(pcm, sample_rate), filename="utterance.wav", content_type="audio/wav")
        with _provider_errors(self.name):
            async with self._http.post(f"{self._url}/audio/transcriptions", data=form, headers=self._headers,
                                       timeout=self._timeout) as response:
                await _raise_for_status(self.name, response)
                body = await response.read()
        try:
            return str(json.loads(body)["text"]).strip()
        except (ValueError, KeyError, TypeError) as exc:
            raise ProviderError(self.name, "transcription response has no text") from exc


class OpenAILLM(_Client):
    """``POST /chat/completions`` with ``stream: true``; yields content deltas, then tool calls."""

    def __init__(self, settings: ProviderSettings, http: aiohttp.ClientSession, *, timeout_s: float,
                 max_tokens: int | None = None) -> None:
        super().__init__(settings, http, timeout_s=timeout_s)
        self._max_tokens = max_tokens

    async def stream(self, messages: Sequence[Message], tools: Sequence[Tool] = ()) -> AsyncIterator[str | ToolCall]:
        body: dict[str, object] = {"model": self.settings.model, "messages": list(messages), "stream": True}
        if self._max_tokens:
            body["max_tokens"] = self._max_tokens
        if tools:
            body["tools"] = [{"type": "function", "function": {"name": t.name, "description": t.description,
                                                               "parameters": dict(t.parameters)}} for t in tools]
        calls: dict[int, list[str]] = {}     # index -> [name, arguments so far]
        with _provider_errors(self.name):
            async with self._http.post(f"{self._url}/chat/completions", json=body, headers=self._headers,
                                       timeout=self._timeout) as response:
                await _raise_for_status(self.name, response)
                async for raw in response.content:
                    line = raw.strip()
                    if not line.startswith(b"data:"):
                        continue
                    data = line[5:].strip()
                    if data == b"[DONE]":
                        await response.read()       # to the end, so the connection is reused
                        break
                    delta = _delta(self.name, data, calls)
                    if delta:
                        yield delta
        for name, arguments in calls.values():
            try:   # the model writes these, steered by what the caller says: never trust their shape
                parsed = loads(arguments or "{}")
            except ValueError:
                logger.warning("%s: tool call %s has arguments that are not JSON; ignored", self.name, name)
                continue
            yield ToolCall(name, parsed if isinstance(parsed, dict) else {})


def _delta(name: str, data: bytes, calls: dict[int, list[str]]) -> str:
    try:
        chunk = json.loads(data)
    except ValueError as exc:
        raise ProviderError(name, "stream chunk is not JSON") from exc
    if "error" in chunk:
        raise ProviderError(name, f"stream error: {chunk['error']}", transient=True)
    choices = chunk.get("choices") or []
    if not choices:
        return ""
    delta = choices[0].get("delta") or {}
    for call in delta.get("tool_calls") or ():
        entry = calls.setdefault(int(call.get("index", 0)), ["", ""])
        function = call.get("function") or {}
        entry[0] += function.get("name") or ""
        entry[1] += function.get("arguments") or ""
    return delta.get("content") or ""


class OpenAITTS(_Client):
    """``POST /audio/speech`` with ``response_format: pcm``: 24 kHz PCM16 streamed in chunks."""

    sample_rate = _TTS_RATE

    async def synthesize(self, text: str, *, voice: str | None = None) -> AsyncIterator[bytes]:
        body = {"model": self.settings.model, "input": text, "voice": voice or self.settings.voice or "alloy",
                "response_format": "pcm"}
        odd = b""
        with _provider_errors(self.name):
            async with self._http.post(f"{self._url}/audio/speech", json=body, headers=self._headers,
                                       timeout=self._timeout) as response:
                await _raise_for_status(self.name, response)
                async for chunk in response.content.iter_any():
                    chunk = odd + chunk
                    cut = len(chunk) & ~1
                    odd = chunk[cut:]
                    if cut:
                        yield chunk[:cut]
