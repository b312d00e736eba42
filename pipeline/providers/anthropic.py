"""Anthropic's Messages API over aiohttp (no SDK): streamed text and tool use.

``POST {base}/v1/messages`` with ``x-api-key`` and ``anthropic-version: 2023-06-01``, ``stream: true``:
server-sent events ``message_start``, per content block ``content_block_start`` /
``content_block_delta`` (``text_delta``, ``input_json_delta``) / ``content_block_stop``, then
``message_delta`` and ``message_stop``; ``ping`` may come at any time and ``error`` ends the stream.
Our context's system messages become the top-level ``system`` field; ``max_tokens`` is required
(config ``llm_max_tokens``, else 1024). ``ANTHROPIC_BASE_URL`` is the API's root, as in the SDK.

Usage::

    llm = AnthropicLLM(ProviderSettings("anthropic", "claude-3-5-sonnet-20241022", key, "https://api.anthropic.com"),
                       http, timeout_s=10, max_tokens=300)
    async for item in llm.stream(messages, tools):   # str deltas, then ToolCall for each tool_use block
        ...
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Sequence
from typing import Any

import aiohttp

from pipeline.providers._chat import Part, split_system
from pipeline.providers._http import HTTPClient, json_event, provider_errors, raise_for_status, sse_events, tool_call
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

__all__ = ["SPECS", "AnthropicLLM"]

logger = logging.getLogger(__name__)

API_VERSION = "2023-06-01"
DEFAULT_MAX_TOKENS = 1024
_TRANSIENT_ERRORS = {"overloaded_error", "api_error", "rate_limit_error", "timeout_error"}


class AnthropicLLM(HTTPClient):
    """Streams a Messages API answer: text deltas as they come, then each ``tool_use`` block as a ToolCall."""

    def __init__(self, settings: ProviderSettings, http: aiohttp.ClientSession, *, timeout_s: float,
                 max_tokens: int | None = None) -> None:
        super().__init__(settings, http, timeout_s=timeout_s)
        self._headers["anthropic-version"] = API_VERSION
        self._max_tokens = max_tokens or DEFAULT_MAX_TOKENS

    @staticmethod
    def auth_headers(api_key: str) -> dict[str, str]:
        return {"x-api-key": api_key}

    def _body(self, messages: Sequence[Message], tools: Sequence[Tool]) -> dict[str, Any]:
        system, turns = split_system(messages)
        body: dict[str, Any] = {"model": self.settings.model, "max_tokens": self._max_tokens, "stream": True,
                                "messages": [{"role": role, "content": _content(parts)} for role, parts in turns]}
        if system:
            body["system"] = system
        if tools:
            body["tools"] = [{"name": t.name, "description": t.description, "input_schema": dict(t.parameters)}
                             for t in tools]
        return body

    async def stream(self, messages: Sequence[Message], tools: Sequence[Tool] = ()) -> AsyncIterator[str | ToolCall]:
        calls: dict[int, list[str]] = {}     # content block index -> [tool name, input JSON so far, id]
        stopped = False
        with provider_errors(self.name):
            async with self._http.post(f"{self._url}/v1/messages", json=self._body(messages, tools),
                                       headers=self._headers, timeout=self._timeout) as response:
                await raise_for_status(self.settings, response)
                async with closing(sse_events(response)) as events:
                    async for event, data in events:
                        payload = json_event(self.name, data)
                        kind = event or payload.get("type", "")
                        if kind == "content_block_start":
                            block = payload.get("content_block") or {}
                            if block.get("type") == "tool_use":
                                calls[int(payload.get("index", 0))] = [str(block.get("name", "")), "",
                                                                       str(block.get("id", ""))]
                        elif kind == "content_block_delta":
                            delta = payload.get("delta") or {}
                            if delta.get("type") == "text_delta" and delta.get("text"):
                                yield str(delta["text"])
                            elif delta.get("type") == "input_json_delta":
                                call = calls.setdefault(int(payload.get("index", 0)), ["", "", ""])
                                call[1] += delta.get("partial_json", "")
                        elif kind == "error":
                            raise _stream_error(self.name, payload)
                        elif kind == "message_stop":
                            stopped = True
                            await response.read()       # to the end, so the connection is reused
                            break
        if not stopped:
            raise ProviderError(self.name, "the stream ended before message_stop", transient=True)
        for name, arguments, call_id in calls.values():
            if (found := tool_call(self.name, name, arguments, call_id)) is not None:
                yield found


def _content(parts: Sequence[Part]) -> str | list[dict[str, Any]]:
    """A turn's content: plain text, or blocks when it holds tool use (``tool_use`` in the assistant's
    turn; ``tool_result`` blocks first in the user's turn after it, each naming its ``tool_use_id``)."""
    if len(parts) == 1 and isinstance(parts[0], str):
        return parts[0]
    blocks: list[dict[str, Any]] = []
    for part in parts:
        if isinstance(part, str):
            blocks.append({"type": "text", "text": part})
        elif isinstance(part, ToolCall):
            blocks.append({"type": "tool_use", "id": _id(part), "name": part.name, "input": dict(part.arguments)})
        else:
            blocks.append({"type": "tool_result", "tool_use_id": _id(part.call), "content": part.content})
    return blocks


def _id(call: ToolCall) -> str:
    """The call's id; one made up for a call that came without (another vendor's, after a fallback):
    the same ToolCall object sits in the tool_use and its tool_result, so the pair still matches."""
    return call.id or f"toolu_{id(call):x}"


def _stream_error(name: str, payload: dict[str, Any]) -> ProviderError:
    """An ``error`` event (e.g. ``overloaded_error``, HTTP 529's in-stream form)."""
    error = payload.get("error") or {}
    kind = str(error.get("type", "error"))
    return ProviderError(name, f"stream error {kind}: {error.get('message', '')}", transient=kind in _TRANSIENT_ERRORS)


def _build_llm(settings: ProviderSettings, http: aiohttp.ClientSession, options: BuildOptions) -> AnthropicLLM:
    return AnthropicLLM(settings, http, timeout_s=options.timeout_s, max_tokens=options.max_tokens)


SPECS = (
    ProviderSpec("anthropic", key_env="ANTHROPIC_API_KEY", base_url_env="ANTHROPIC_BASE_URL",
                 default_base_url="https://api.anthropic.com", default_models={"llm": "claude-3-5-sonnet-20241022"},
                 api_root="", options="`llm_max_tokens` is sent as the required `max_tokens`; tools as `tool_use`",
                 llm=_build_llm),
)
