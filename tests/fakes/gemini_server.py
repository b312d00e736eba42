"""Fake Gemini API (``POST /v1beta/models/{model}:streamGenerateContent?alt=sse``) on 127.0.0.1.

What it checks, as the real API does: the ``alt=sse`` query, the ``x-goog-api-key`` header (a wrong
key is HTTP 400 ``INVALID_ARGUMENT`` with an ``ErrorInfo`` reason ``API_KEY_INVALID``; none is 403
``PERMISSION_DENIED``), ``contents`` of roles ``user`` / ``model`` taking turns from the user, each
with ``parts`` of ``text``, ``systemInstruction.parts``, ``tools[].functionDeclarations`` with a name
and an object schema (``parametersJsonSchema`` or ``parameters``, not both), and
``generationConfig.maxOutputTokens`` when given. It streams ``data:`` events of
``GenerateContentResponse`` (``\\r\\n\\r\\n``-separated): text parts, then ``functionCall`` parts; the
last has ``finishReason: STOP``. A 429 is ``RESOURCE_EXHAUSTED`` with ``RetryInfo.retryDelay``.

Usage::

    async with FakeGemini(api_key="g-test", replies=["Hi there!"]) as fake:
        fake.base_url                      # "http://127.0.0.1:<port>" (the API root)
        fake.state.fail = "500"            # see tests/fakes/_llm.py for the modes
"""

from __future__ import annotations

import json
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tests.fakes._llm import LLMFake, Reply, words

__all__ = ["FakeGemini"]

_STATUS = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "NOT_FOUND",
           429: "RESOURCE_EXHAUSTED", 500: "INTERNAL", 503: "UNAVAILABLE"}


class FakeGemini(LLMFake):
    def __init__(self, *, api_key: str | None = "g-test", replies: tuple[Reply, ...] | list[Reply] = ("Hello!",)) -> None:
        super().__init__("fake Gemini", [Route("/v1beta/models/{call:path}", self.generate, methods=["POST"])],
                         api_key=api_key, replies=replies)

    def _error(self, status: int, message: str = "", details: list[dict[str, Any]] | None = None) -> JSONResponse:
        if status == 429:
            details = [{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": f"{self.state.retry_after}s"}]
        error = {"code": status, "message": message or "An internal error has occurred.",
                 "status": _STATUS.get(status, "UNKNOWN")}
        if details:
            error["details"] = details
        return JSONResponse({"error": error}, status_code=status)

    def _refused(self, status: int) -> JSONResponse:
        if status != 401 or self.state.fail == "401":
            return self._error(status)
        if "x-goog-api-key" not in self._last_headers():
            return self._error(403, "Method doesn't allow unregistered callers (callers without established identity).")
        return self._error(400, "API key not valid. Please pass a valid API key.", [
            {"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "API_KEY_INVALID",
             "domain": "googleapis.com"}])

    def _last_headers(self) -> dict[str, str]:
        return self.state.requests[-1]["headers"]

    async def generate(self, request: Request) -> Response:
        authorized = self.state.api_key is None or request.headers.get("x-goog-api-key") == self.state.api_key
        if (denied := await self.gate(request, authorized=authorized, error=self._refused)) is not None:
            return denied
        model, _, method = request.path_params["call"].partition(":")
        if method != "streamGenerateContent":
            return self._error(404, f"method {method!r}: the fake serves streamGenerateContent only")
        if request.query_params.get("alt") != "sse":
            return self._error(400, "the fake streams alt=sse only")
        try:
            body = json.loads(self.state.requests[-1]["body"])
        except ValueError:
            return self._error(400, "Invalid JSON payload received.")
        if (problem := _invalid(body)) is not None:
            return self._error(400, problem)
        text, tool_calls = self.state.next_reply()
        parts: list[dict[str, Any]] = [{"text": w} for w in words(text)]
        parts += [{"functionCall": {"id": f"fc_{i}_{c['name']}", "name": c["name"], "args": c.get("arguments", {})}}
                  for i, c in enumerate(tool_calls)]
        if not parts:
            parts = [{"text": ""}]
        frames = [_chunk(model, part, finish=i == len(parts) - 1) for i, part in enumerate(parts)]
        return self.sse(frames, closing=1)


def _chunk(model: str, part: dict[str, Any], *, finish: bool) -> bytes:
    candidate: dict[str, Any] = {"content": {"parts": [part], "role": "model"}, "index": 0}
    if finish:
        candidate["finishReason"] = "STOP"
    chunk = {"candidates": [candidate], "usageMetadata": {"promptTokenCount": 12, "totalTokenCount": 20},
             "modelVersion": model, "responseId": "fake"}
    return b"data: " + json.dumps(chunk).encode() + b"\r\n\r\n"


def _invalid(body: Any) -> str | None:
    """Why the real API would refuse this body with a 400, or None."""
    if not isinstance(body, dict) or not isinstance(body.get("contents"), list) or not body["contents"]:
        return "* GenerateContentRequest.contents: contents is not specified"
    for i, content in enumerate(body["contents"]):
        if content.get("role") != ("user" if i % 2 == 0 else "model"):
            return f"* GenerateContentRequest.contents[{i}].role: roles must be user/model taking turns from the user"
        if (problem := _invalid_parts(body["contents"], i)) is not None:
            return problem
    system = body.get("systemInstruction")
    if system is not None and not (isinstance(system.get("parts"), list) and system["parts"]):
        return "* GenerateContentRequest.system_instruction.parts: must not be empty"
    for tool in body.get("tools") or ():
        for declaration in tool.get("functionDeclarations") or ():
            schemas = [k for k in ("parameters", "parametersJsonSchema") if k in declaration]
            if not declaration.get("name") or len(schemas) > 1:
                return "* function_declarations: a name, and parameters or parametersJsonSchema (not both)"
            if schemas and (declaration[schemas[0]] or {}).get("type") not in ("object", "OBJECT"):
                return "* function_declarations.parameters: must be an object schema"
    config = body.get("generationConfig") or {}
    if "maxOutputTokens" in config and not isinstance(config["maxOutputTokens"], int):
        return "* generation_config.max_output_tokens: must be an integer"
    return None


def _invalid_parts(contents: list[dict[str, Any]], i: int) -> str | None:
    """The parts of content ``i``: each one ``text``, a ``functionCall`` (the model's, with a name and
    object ``args``) or a ``functionResponse`` (ours, in the user turn after the calls: one per call,
    naming it, its ``response`` an object, and its ``id`` the call's when the call had one)."""
    parts = contents[i].get("parts")
    if not isinstance(parts, list) or not parts:
        return f"* GenerateContentRequest.contents[{i}].parts: must not be empty"
    role = contents[i].get("role")
    previous = contents[i - 1].get("parts") or [] if i else []
    calls = [p["functionCall"] for p in previous if isinstance(p, dict) and "functionCall" in p]
    responses = []
    for j, part in enumerate(parts):
        where = f"* GenerateContentRequest.contents[{i}].parts[{j}]"
        if not isinstance(part, dict) or len(part) != 1:
            return f"{where}: a part holds exactly one of text, functionCall, functionResponse"
        if "text" in part:
            if not isinstance(part["text"], str):
                return f"{where}.text: must be a string"
        elif "functionCall" in part:
            call = part["functionCall"]
            if role != "model" or not call.get("name") or not isinstance(call.get("args", {}), dict):
                return f"{where}.function_call: the model's, with a name and object args"
        elif "functionResponse" in part:
            response = part["functionResponse"]
            responses.append(response)
            if role != "user" or not response.get("name") or not isinstance(response.get("response"), dict):
                return f"{where}.function_response: ours, with a name and an object response"
        else:
            return f"{where}: unknown part {sorted(part)}"
    if calls or responses:
        asked = sorted((c["name"], c.get("id", "")) for c in calls)
        answered = sorted((r["name"], r.get("id", "")) for r in responses)
        if role == "user" and asked != answered:
            return (f"* GenerateContentRequest.contents[{i}]: please ensure that the number of function response "
                    f"parts is equal to the number of function call parts of the function call turn "
                    f"(calls {asked}, responses {answered})")
    return None
