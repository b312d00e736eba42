"""OpenAI and OpenAI-compatible providers over httpx (no SDK): transcription, chat streaming, speech.

Groq, Cerebras, Ollama, DeepSeek, Mistral and local Whisper servers speak the same wire protocol;
only the base URL, key and model differ (see ``pipeline.providers.PROVIDERS``).

Usage::

    stt = OpenAISTT(ProviderSettings("openai", "whisper-1", key, "https://api.openai.com/v1"), http, timeout_s=10)
    text = await stt.transcribe(pcm, sample_rate=16000)
    async for delta in OpenAILLM(settings, http, timeout_s=10).stream(messages): ...
    async for pcm24k in OpenAITTS(settings, http, timeout_s=10).synthesize("Hi!"): ...
"""

from __future__ import annotations

import contextlib
import json
import logging
from typing import AsyncIterator, Iterator, Sequence

import httpx

from pipeline.audio import pcm_to_wav
from pipeline.providers import ProviderSettings
from pipeline.providers.base import Message, ProviderError, Tool, ToolCall

__all__ = ["OpenAILLM", "OpenAISTT", "OpenAITTS"]

logger = logging.getLogger(__name__)

_TTS_RATE = 24000  # OpenAI's `pcm` response format: 24 kHz, 16-bit LE, mono


@contextlib.contextmanager
def _provider_errors(name: str) -> Iterator[None]:
    """Map httpx failures to ProviderError once, at this boundary."""
    try:
        yield
    except httpx.TimeoutException as exc:
        raise ProviderError(name, f"timed out ({type(exc).__name__})", transient=True) from exc
    except httpx.TransportError as exc:
        raise ProviderError(name, f"connection failed ({type(exc).__name__})", transient=True) from exc


async def _raise_for_status(name: str, response: httpx.Response) -> None:
    if response.status_code < 400:
        return
    body = (await response.aread())[:500]
    try:
        message = json.loads(body)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = body.decode("utf-8", "replace")
    transient = response.status_code == 429 or response.status_code >= 500
    raise ProviderError(name, f"HTTP {response.status_code}: {message}", transient=transient)


class _Client:
    def __init__(self, settings: ProviderSettings, http: httpx.AsyncClient, *, timeout_s: float) -> None:
        self.name = settings.name
        self.settings = settings
        self._http = http
        self._url = settings.base_url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {settings.api_key}"} if settings.api_key else {}
        self._timeout = httpx.Timeout(timeout_s, connect=min(timeout_s, 5.0))


class OpenAISTT(_Client):
    """``POST /audio/transcriptions`` with a WAV upload; one request per finished utterance."""

    async def transcribe(self, pcm: bytes, *, sample_rate: int, language: str | None = None) -> str:
        data = {"model": self.settings.model, "response_format": "json"}
        if language:
            data["language"] = language.split("-")[0]
        files = {"file": ("utterance.wav", pcm_to_wav(pcm, sample_rate), "audio/wav")}
        with _provider_errors(self.name):
            response = await self._http.post(f"{self._url}/audio/transcriptions", data=data, files=files,
                                             headers=self._headers, timeout=self._timeout)
            await _raise_for_status(self.name, response)
        try:
            return str(response.json()["text"]).strip()
        except (ValueError, KeyError, TypeError) as exc:
            raise ProviderError(self.name, "transcription response has no text") from exc


class OpenAILLM(_Client):
    """``POST /chat/completions`` with ``stream: true``; yields content deltas as they arrive."""

    def __init__(self, settings: ProviderSettings, http: httpx.AsyncClient, *, timeout_s: float,
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
            async with self._http.stream("POST", f"{self._url}/chat/completions", json=body,
                                         headers=self._headers, timeout=self._timeout) as response:
                await _raise_for_status(self.name, response)
                async for line in response.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    delta = _delta(self.name, data, calls)
                    if delta:
                        yield delta
        for name, arguments in calls.values():
            try:
                parsed = json.loads(arguments or "{}")
            except ValueError:
                logger.warning("%s: tool call %s has arguments that are not JSON; ignored", self.name, name)
                continue
            yield ToolCall(name, parsed if isinstance(parsed, dict) else {})


def _delta(name: str, data: str, calls: dict[int, list[str]]) -> str:
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
            async with self._http.stream("POST", f"{self._url}/audio/speech", json=body,
                                         headers=self._headers, timeout=self._timeout) as response:
                await _raise_for_status(self.name, response)
                async for chunk in response.aiter_bytes():
                    chunk = odd + chunk
                    cut = len(chunk) & ~1
                    odd = chunk[cut:]
                    if cut:
                        yield chunk[:cut]
