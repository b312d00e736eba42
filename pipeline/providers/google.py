"""Google's Gemini API with an API key, over aiohttp (no SDK): streamed text and function calls.

``POST {base}/v1beta/models/{model}:streamGenerateContent?alt=sse`` with ``x-goog-api-key``; the body
has ``contents`` (roles ``user`` / ``model``, ``parts`` of ``text``), ``systemInstruction``, ``tools``
(``functionDeclarations`` with ``parametersJsonSchema``) and ``generationConfig.maxOutputTokens``.
Each SSE ``data:`` is a ``GenerateContentResponse``: its first candidate's parts carry ``text`` or a
``functionCall`` (``name``, ``args``); the last one has a ``finishReason``, and a stream without it
was cut. A refused key is HTTP 400 ``API_KEY_INVALID`` (or 401/403); a 429 says how long to wait
in ``RetryInfo.retryDelay``. The key is read from ``GOOGLE_API_KEY``, else ``GEMINI_API_KEY``.

Usage::

    llm = GeminiLLM(ProviderSettings("google", "gemini-2.5-flash", key, "https://generativelanguage.googleapis.com"),
                    http, timeout_s=10, max_tokens=300)
    async for item in llm.stream(messages, tools):   # str deltas, then a ToolCall per functionCall
        ...
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Sequence
from typing import Any
from urllib.parse import quote

import aiohttp

from pipeline.providers._chat import Part, split_system
from pipeline.providers._http import HTTPClient, json_event, provider_errors, raise_for_status, sse_events
from pipeline.providers.base import (
    BuildOptions,
    Message,
    ProviderError,
    ProviderSettings,
    ProviderSpec,
    Tool,
    ToolCall,
    closing,
)

__all__ = ["SPECS", "GeminiLLM"]

logger = logging.getLogger(__name__)

API_VERSION = "v1beta"


class GeminiLLM(HTTPClient):
    """Streams ``streamGenerateContent``: text parts as they come, then each ``functionCall`` as a ToolCall."""

    def __init__(self, settings: ProviderSettings, http: aiohttp.ClientSession, *, timeout_s: float,
                 max_tokens: int | None = None) -> None:
        super().__init__(settings, http, timeout_s=timeout_s)
        self._max_tokens = max_tokens

    @staticmethod
    def auth_headers(api_key: str) -> dict[str, str]:
        return {"x-goog-api-key": api_key}

    def _body(self, messages: Sequence[Message], tools: Sequence[Tool]) -> dict[str, Any]:
        system, turns = split_system(messages)
        body: dict[str, Any] = {"contents": [{"role": "model" if role == "assistant" else "user",
                                              "parts": [_part(part) for part in parts]} for role, parts in turns]}
        if system:
            body["systemInstruction"] = {"parts": [{"text": system}]}
        if tools:
            body["tools"] = [{"functionDeclarations": [
                {"name": t.name, "description": t.description, "parametersJsonSchema": dict(t.parameters)}
                for t in tools]}]
        if self._max_tokens:
            body["generationConfig"] = {"maxOutputTokens": self._max_tokens}
        return body

    async def stream(self, messages: Sequence[Message], tools: Sequence[Tool] = ()) -> AsyncIterator[str | ToolCall]:
        model = quote(self.settings.model.removeprefix("models/"), safe="")
        url = f"{self._url}/{API_VERSION}/models/{model}:streamGenerateContent?alt=sse"
        calls: list[ToolCall] = []
        finished = False
        with provider_errors(self.name):
            async with self._http.post(url, json=self._body(messages, tools), headers=self._headers,
                                       timeout=self._timeout) as response:
                await raise_for_status(self.settings, response, refused_key=_refused_key, delay=_retry_delay)
                async with closing(sse_events(response)) as events:
                    async for _event, data in events:
                        chunk = json_event(self.name, data)
                        for text in _parts(self.name, chunk, calls):
                            yield text
                        finished = finished or any(c.get("finishReason") for c in chunk.get("candidates") or ())
        if not finished:
            raise ProviderError(self.name, "the stream ended before a finishReason", transient=True)
        for call in calls:
            yield call


def _parts(name: str, chunk: dict[str, Any], calls: list[ToolCall]) -> list[str]:
    """The chunk's text parts; its function calls are added to ``calls``."""
    if "error" in chunk:
        raise ProviderError(name, f"stream error: {chunk['error'].get('message', chunk['error'])}", transient=True)
    candidates = chunk.get("candidates") or []
    if not candidates:
        blocked = (chunk.get("promptFeedback") or {}).get("blockReason")
        if blocked:
            raise ProviderError(name, f"the prompt was blocked ({blocked})")
        return []
    texts = []
    for part in (candidates[0].get("content") or {}).get("parts") or ():
        if part.get("thought"):
            continue
        if part.get("text"):
            texts.append(str(part["text"]))
        elif isinstance(part.get("functionCall"), dict):
            call = part["functionCall"]
            args = call.get("args")
            calls.append(ToolCall(str(call.get("name", "")), args if isinstance(args, dict) else {},
                                  str(call.get("id") or "")))
    return texts


def _part(part: Part) -> dict[str, Any]:
    """One part of a turn: ``text``, the model's ``functionCall``, or our ``functionResponse`` (its
    ``response`` must be an object: the result text goes in as ``{"result": ...}``)."""
    if isinstance(part, str):
        return {"text": part}
    if isinstance(part, ToolCall):
        call: dict[str, Any] = {"name": part.name, "args": dict(part.arguments)}
        if part.id:
            call["id"] = part.id
        return {"functionCall": call}
    response: dict[str, Any] = {"name": part.call.name, "response": {"result": part.content}}
    if part.call.id:
        response["id"] = part.call.id
    return {"functionResponse": response}


def _details(payload: Any) -> list[dict[str, Any]]:
    try:
        return [d for d in payload["error"].get("details") or () if isinstance(d, dict)]
    except (KeyError, TypeError, AttributeError):
        return []


def _refused_key(payload: Any) -> bool:
    """Gemini answers a bad key with HTTP 400 and an ``ErrorInfo`` whose reason is ``API_KEY_INVALID``."""
    return any(d.get("reason") == "API_KEY_INVALID" for d in _details(payload))


def _retry_delay(payload: Any) -> float | None:
    """``RetryInfo.retryDelay`` (a protobuf Duration such as ``"17s"``) of a 429, in seconds."""
    for detail in _details(payload):
        delay = str(detail.get("retryDelay", ""))
        if delay.endswith("s"):
            with contextlib.suppress(ValueError):
                return max(0.0, float(delay[:-1]))
    return None


def _build_llm(settings: ProviderSettings, http: aiohttp.ClientSession, options: BuildOptions) -> GeminiLLM:
    return GeminiLLM(settings, http, timeout_s=options.timeout_s, max_tokens=options.max_tokens)


SPECS = (
    ProviderSpec("google", key_env="GOOGLE_API_KEY", key_env_fallbacks=("GEMINI_API_KEY",), aliases=("gemini",),
                 base_url_env="GOOGLE_GEMINI_BASE_URL", default_base_url="https://generativelanguage.googleapis.com",
                 default_models={"llm": "gemini-2.5-flash"}, api_root="",
                 options="`llm_max_tokens` is sent as `maxOutputTokens`; tools as `functionDeclarations`",
                 llm=_build_llm),
)
