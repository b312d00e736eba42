"""Fake Anthropic Messages API (``POST /v1/messages``, streaming) on 127.0.0.1.

What it checks, as the real API does: ``x-api-key`` (401 ``authentication_error`` otherwise),
``anthropic-version: 2023-06-01``, a JSON body with ``model``, an integer ``max_tokens``, ``messages``
of roles ``user`` / ``assistant`` only (a ``system`` role is a 400: the system prompt is the
top-level ``system`` field), the first turn the user's, and ``tools`` with ``name`` and an object
``input_schema``. It answers ``stream: true`` with the documented event sequence: ``message_start``,
``ping``, per block ``content_block_start`` / ``content_block_delta`` (``text_delta`` or
``input_json_delta`` in pieces) / ``content_block_stop``, ``message_delta``, ``message_stop``.
Extra mode ``"overloaded"``: an ``error`` event (``overloaded_error``) after ``message_start``.

Usage::

    async with FakeAnthropic(api_key="sk-ant-test", replies=["Hi there!"]) as fake:
        fake.base_url                      # "http://127.0.0.1:<port>" (the API root; requests go to /v1/messages)
        fake.state.fail = "429"            # see tests/fakes/_llm.py for the modes
        fake.state.requests[0]["body"]
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tests.fakes._llm import LLMFake, Reply, words

__all__ = ["FakeAnthropic"]

_ERRORS = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
           404: "not_found_error", 429: "rate_limit_error", 500: "api_error", 503: "api_error", 529: "overloaded_error"}


def _error(status: int, message: str = "") -> JSONResponse:
    kind = _ERRORS.get(status, "api_error")
    text = message or {"authentication_error": "invalid x-api-key", "rate_limit_error": "Number of requests has "
                       "exceeded your rate limit", "overloaded_error": "Overloaded"}.get(kind, "Internal server error")
    return JSONResponse({"type": "error", "error": {"type": kind, "message": text}}, status_code=status)


def _event(kind: str, **data: Any) -> bytes:
    return f"event: {kind}\ndata: {json.dumps({'type': kind, **data})}\n\n".encode()


def _invalid(body: Any) -> str | None:
    """Why the real API would refuse this body with a 400, or None."""
    if not isinstance(body, dict):
        return "body: expected a JSON object"
    if not isinstance(body.get("model"), str) or not body["model"]:
        return "model: Field required"
    if not isinstance(body.get("max_tokens"), int) or isinstance(body.get("max_tokens"), bool):
        return "max_tokens: Field required"
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return "messages: Field required"
    for i, message in enumerate(messages):
        if message.get("role") not in ("user", "assistant"):
            return f"messages.{i}.role: Input should be 'user' or 'assistant'"
        if not message.get("content"):
            return f"messages.{i}: all messages must have non-empty content"
        if (problem := _invalid_blocks(messages, i)) is not None:
            return problem
    if messages[0]["role"] != "user":
        return "messages: first message must use the \"user\" role"
    if "system" in body and not isinstance(body["system"], (str, list)):
        return "system: Input should be a valid string"
    for i, tool in enumerate(body.get("tools") or ()):
        if not tool.get("name") or (tool.get("input_schema") or {}).get("type") != "object":
            return f"tools.{i}.input_schema: Input should be an object schema"
    return None


def _blocks(message: dict[str, Any]) -> list[dict[str, Any]]:
    content = message.get("content")
    return [{"type": "text", "text": content}] if isinstance(content, str) else list(content or ())


def _invalid_blocks(messages: list[dict[str, Any]], i: int) -> str | None:
    """The content blocks of message ``i`` as the API checks them: text blocks non-empty; ``tool_use``
    (with ``id``, ``name`` and an object ``input``) only from the assistant, each answered by a
    ``tool_result`` naming its ``tool_use_id`` in the user message right after it, where the results
    come first; a ``tool_result`` only for a tool_use of the message before."""
    message = messages[i]
    if not isinstance(message.get("content"), (str, list)):
        return f"messages.{i}.content: Input should be a valid string or list"
    blocks = _blocks(message)
    previous = _blocks(messages[i - 1]) if i else []
    asked = [b.get("id") for b in previous if b.get("type") == "tool_use"]
    results = [b for b in blocks if b.get("type") == "tool_result"]
    for j, block in enumerate(blocks):
        kind = block.get("type")
        if kind == "text" and (not isinstance(block.get("text"), str) or not block["text"]):
            return f"messages.{i}.content.{j}.text: text content blocks must be non-empty"
        if kind == "tool_use" and (message["role"] != "assistant" or not block.get("id") or not block.get("name")
                                   or not isinstance(block.get("input"), dict)):
            return f"messages.{i}.content.{j}: tool_use blocks need id, name and an object input, from the assistant"
        if kind == "tool_result" and (message["role"] != "user" or block.get("tool_use_id") not in asked
                                      or not isinstance(block.get("content"), (str, list))):
            return (f"messages.{i}.content.{j}: unexpected `tool_use_id` found in `tool_result` blocks: "
                    f"{block.get('tool_use_id')}. Each `tool_result` block must have a corresponding `tool_use` "
                    "block in the previous message.")
        if kind not in ("text", "tool_use", "tool_result"):
            return f"messages.{i}.content.{j}.type: unsupported block type {kind!r}"
    if results and any(b.get("type") != "tool_result" for b in blocks[:len(results)]):
        return f"messages.{i}: tool_result blocks must come first in the user message's content"
    if i == len(messages) - 1 and any(b.get("type") == "tool_use" for b in blocks):
        return f"messages.{i}: the last message has `tool_use` blocks without a `tool_result` after them"
    unanswered = set(asked) - {b.get("tool_use_id") for b in results}
    if asked and unanswered:
        return (f"messages.{i}: `tool_use` ids were found without `tool_result` blocks immediately after: "
                f"{sorted(unanswered)}. Each `tool_use` block must have a corresponding `tool_result` block in the "
                "next message.")
    return None


class FakeAnthropic(LLMFake):
    def __init__(self, *, api_key: str | None = "sk-ant-test", replies: tuple[Reply, ...] | list[Reply] = ("Hello!",)) -> None:
        super().__init__("fake Anthropic", [Route("/v1/messages", self.messages, methods=["POST"])],
                         api_key=api_key, replies=replies)

    async def messages(self, request: Request) -> Response:
        authorized = self.state.api_key is None or request.headers.get("x-api-key") == self.state.api_key
        if (denied := await self.gate(request, authorized=authorized, error=_error)) is not None:
            return denied
        if request.headers.get("anthropic-version") != "2023-06-01":
            return _error(400, "anthropic-version: header is required")
        try:
            body = json.loads(self.state.requests[-1]["body"])
        except ValueError:
            return _error(400, "body: invalid JSON")
        if (problem := _invalid(body)) is not None:
            return _error(400, problem)
        if body.get("stream") is not True:
            return _error(400, "the fake answers stream: true only")
        text, tool_calls = self.state.next_reply()
        message = {"id": f"msg_{uuid.uuid4().hex[:24]}", "type": "message", "role": "assistant", "content": [],
                   "model": body["model"], "stop_reason": None, "stop_sequence": None,
                   "usage": {"input_tokens": 12, "output_tokens": 1}}
        frames = [_event("message_start", message=message), _event("ping")]
        if self.state.fail == "overloaded":
            return self.sse(frames + [_event("error", error={"type": "overloaded_error", "message": "Overloaded"})],
                            closing=1)
        index = 0
        if text:
            frames.append(_event("content_block_start", index=0, content_block={"type": "text", "text": ""}))
            frames += [_event("content_block_delta", index=0, delta={"type": "text_delta", "text": w})
                       for w in words(text)]
            frames.append(_event("content_block_stop", index=0))
            index = 1
        for index, call in enumerate(tool_calls, index):  # noqa: B020 - numbering continues after the text block
            arguments = json.dumps(call.get("arguments", {}))
            frames.append(_event("content_block_start", index=index, content_block={
                "type": "tool_use", "id": f"toolu_{uuid.uuid4().hex[:20]}", "name": call["name"], "input": {}}))
            frames += [_event("content_block_delta", index=index, delta={"type": "input_json_delta", "partial_json": p})
                       for p in ("", arguments[: len(arguments) // 2], arguments[len(arguments) // 2:])]
            frames.append(_event("content_block_stop", index=index))
        stop = "tool_use" if tool_calls else "end_turn"
        frames += [_event("message_delta", delta={"stop_reason": stop, "stop_sequence": None},
                          usage={"output_tokens": len(words(text)) + 1}),
                   _event("message_stop")]
        return self.sse(frames, closing=1)
