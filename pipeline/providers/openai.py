"""OpenAI over aiohttp (no SDK): transcription, chat streaming, speech; the wire protocol that
``pipeline.providers.compatible`` reuses for every OpenAI-compatible vendor.

Usage::

    async with open_session() as http:
        stt = OpenAISTT(ProviderSettings("openai", "whisper-1", key, "https://api.openai.com/v1"), http,
                        timeout_s=10)
        text = await stt.transcribe(pcm, sample_rate=16000)
        async for delta in OpenAILLM(settings, http, timeout_s=10).stream(messages): ...
        async for pcm24k in OpenAITTS(settings, http, timeout_s=10).synthesize("Hi!"): ...
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Sequence
from typing import Any

import aiohttp

from pipeline.audio import pcm_to_wav
from pipeline.providers._http import (
    HTTPClient,
    json_event,
    open_session,
    provider_errors,
    raise_for_status,
    sse_events,
    tool_call,
)
from pipeline.providers.base import (
    BuildOptions,
    Message,
    ProviderError,
    ProviderSettings,
    ProviderSpec,
    Tool,
    ToolCall,
    ToolExchange,
    closing,
)

__all__ = ["SPECS", "OpenAILLM", "OpenAISTT", "OpenAITTS", "build_llm", "build_stt", "build_tts", "chat_messages",
           "open_session"]

logger = logging.getLogger(__name__)

_TTS_RATE = 24000  # OpenAI's `pcm` response format: 24 kHz, 16-bit LE, mono


class OpenAISTT(HTTPClient):
    """``POST /audio/transcriptions`` with a WAV upload; one request per finished utterance."""

    async def transcribe(self, pcm: bytes, *, sample_rate: int, language: str | None = None) -> str:
        form = aiohttp.FormData()
        form.add_field("model", self.settings.model)
        form.add_field("response_format", "json")
        if language:
            form.add_field("language", language.split("-")[0])
        form.add_field("file", pcm_to_wav(pcm, sample_rate), filename="utterance.wav", content_type="audio/wav")
        with provider_errors(self.name):
            async with self._http.post(f"{self._url}/audio/transcriptions", data=form, headers=self._headers,
                                       timeout=self._timeout) as response:
                await raise_for_status(self.settings, response)
                body = await response.read()
        try:
            return str(json.loads(body)["text"]).strip()
        except (ValueError, KeyError, TypeError) as exc:
            raise ProviderError(self.name, "transcription response has no text") from exc


class OpenAILLM(HTTPClient):
    """``POST /chat/completions`` with ``stream: true``; yields content deltas, then tool calls."""

    def __init__(self, settings: ProviderSettings, http: aiohttp.ClientSession, *, timeout_s: float,
                 max_tokens: int | None = None) -> None:
        super().__init__(settings, http, timeout_s=timeout_s)
        self._max_tokens = max_tokens

    async def stream(self, messages: Sequence[Message], tools: Sequence[Tool] = ()) -> AsyncIterator[str | ToolCall]:
        body: dict[str, object] = {"model": self.settings.model, "messages": chat_messages(messages), "stream": True}
        if self._max_tokens:
            body["max_tokens"] = self._max_tokens
        if tools:
            body["tools"] = [{"type": "function", "function": {"name": t.name, "description": t.description,
                                                               "parameters": dict(t.parameters)}} for t in tools]
        calls: dict[int, list[str]] = {}     # index -> [name, arguments so far, id]
        done = False
        with provider_errors(self.name):
            async with self._http.post(f"{self._url}/chat/completions", json=body, headers=self._headers,
                                       timeout=self._timeout) as response:
                await raise_for_status(self.settings, response)
                async with closing(sse_events(response)) as events:
                    async for _event, data in events:
                        if data == b"[DONE]":
                            done = True
                            await response.read()       # to the end, so the connection is reused
                            break
                        delta = _delta(self.name, data, calls)
                        if delta:
                            yield delta
        if not done:
            raise ProviderError(self.name, "the stream ended before [DONE]", transient=True)
        for name, arguments, call_id in calls.values():
            if (call := tool_call(self.name, name, arguments, call_id)) is not None:
                yield call


def chat_messages(messages: Sequence[Message]) -> list[dict[str, Any]]:
    """Our context as Chat Completions messages. A ToolExchange becomes the assistant's ``tool_calls``
    (joined to the assistant's text message just before it, if any) and one ``role: tool`` message per
    result, naming its ``tool_call_id``::

        [..., {"role": "assistant", "content": "Let me check.", "tool_calls": [{"id": "call_1", "type": "function",
               "function": {"name": "lookup", "arguments": "{\"ref\": \"AB12\"}"}}]},
         {"role": "tool", "tool_call_id": "call_1", "content": "confirmed"}]
    """
    out: list[dict[str, Any]] = []
    for message in messages:
        if not isinstance(message, ToolExchange):
            out.append(dict(message))
            continue
        calls = [{"id": _call_id(r.call), "type": "function",
                  "function": {"name": r.call.name, "arguments": json.dumps(dict(r.call.arguments))}}
                 for r in message.results]
        last = out[-1] if out else None
        if last is not None and last.get("role") == "assistant" and "tool_calls" not in last:
            last["tool_calls"] = calls
        else:
            out.append({"role": "assistant", "content": None, "tool_calls": calls})
        out += [{"role": "tool", "tool_call_id": _call_id(r.call), "content": r.content} for r in message.results]
    return out


def _call_id(call: ToolCall) -> str:
    """The call's id; one made up for a call that came without (a compatible vendor that sends none, or
    another vendor's call after a fallback): the same object is in the call and its result, so they match."""
    return call.id or f"call_{id(call):x}"


def _delta(name: str, data: bytes, calls: dict[int, list[str]]) -> str:
    chunk = json_event(name, data)
    if "error" in chunk:
        raise ProviderError(name, f"stream error: {chunk['error']}", transient=True)
    choices = chunk.get("choices") or []
    if not choices:
        return ""
    delta = choices[0].get("delta") or {}
    for call in delta.get("tool_calls") or ():
        entry = calls.setdefault(int(call.get("index", 0)), ["", "", ""])
        entry[2] = entry[2] or str(call.get("id") or "")
        function = call.get("function") or {}
        entry[0] += function.get("name") or ""
        entry[1] += function.get("arguments") or ""
    return delta.get("content") or ""


class OpenAITTS(HTTPClient):
    """``POST /audio/speech`` with ``response_format: pcm``: 24 kHz PCM16 streamed in chunks."""

    sample_rate = _TTS_RATE

    def synthesize(self, text: str, *, voice: str | None = None) -> AsyncIterator[bytes]:
        body = {"model": self.settings.model, "input": text, "voice": voice or self.settings.voice or "alloy",
                "response_format": "pcm"}
        return self.post_pcm(f"{self._url}/audio/speech", body)


def build_stt(settings: ProviderSettings, http: aiohttp.ClientSession, options: BuildOptions) -> OpenAISTT:
    """The registry's STT builder for OpenAI and every compatible vendor."""
    return OpenAISTT(settings, http, timeout_s=options.timeout_s)


def build_llm(settings: ProviderSettings, http: aiohttp.ClientSession, options: BuildOptions) -> OpenAILLM:
    """The registry's LLM builder for OpenAI and every compatible vendor."""
    return OpenAILLM(settings, http, timeout_s=options.timeout_s, max_tokens=options.max_tokens)


def build_tts(settings: ProviderSettings, http: aiohttp.ClientSession, options: BuildOptions) -> OpenAITTS:
    """The registry's TTS builder for OpenAI."""
    return OpenAITTS(settings, http, timeout_s=options.timeout_s)


SPECS = (
    ProviderSpec("openai", key_env="OPENAI_API_KEY", base_url_env="OPENAI_BASE_URL",
                 default_base_url="https://api.openai.com/v1",
                 default_models={"stt": "whisper-1", "llm": "gpt-4o-mini", "tts": "tts-1"}, default_voice="alloy",
                 options="`tts_voice` (alloy, nova, shimmer ...); TTS audio is 24 kHz PCM",
                 stt=build_stt, llm=build_llm, tts=build_tts),
)
