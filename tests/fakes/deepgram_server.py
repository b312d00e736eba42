"""Fake Deepgram on 127.0.0.1: Aura text to speech (``POST /v1/speak``) and streaming speech to text (the
``/v1/listen`` WebSocket, described in ``tests/fakes/_deepgram_listen.py``).

What it checks, as the real API does: ``Authorization: Token <key>`` (401 ``{"err_code": "INVALID_AUTH",
"err_msg": "Invalid credentials.", "request_id": ...}`` otherwise; a ``Bearer`` token is not the key),
the query parameters (only the documented ones; ``model`` an Aura voice, ``encoding=linear16``,
``container=none`` and a ``sample_rate`` linear16 allows: the fake serves raw PCM only), and a JSON
body ``{"text": ...}`` with non-empty text. It answers with raw PCM16 at ``sample_rate`` (the API's
default, 24000, when absent), in chunks. 429 is ``TOO_MANY_REQUESTS`` with ``retry-after``, 5xx
``INTERNAL_SERVER_ERROR``.

Usage::

    async with FakeDeepgram(api_key="dg-test") as fake:
        fake.base_url                      # "http://127.0.0.1:<port>" (the API root)
        fake.state.fail = "500"            # see tests/fakes/_llm.py for the modes
        fake.state.requests[0]["query"]    # {"model": "aura-asteria-en", "encoding": "linear16", ...}
        fake.listen.connections[0]         # {"query", "headers", "frames", "bytes", "audio_ms", "controls"}
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

from tests.fakes._deepgram_listen import ListenState, listen
from tests.fakes._tts import TTSFake

__all__ = ["FakeDeepgram"]

_PARAMS = {"model", "encoding", "sample_rate", "container", "bit_rate", "callback", "callback_method", "mip_opt_out",
           "tag", "speed"}
LINEAR16_RATES = (8000, 16000, 24000, 32000, 48000)
_CODES = {400: "Bad Request", 401: "INVALID_AUTH", 403: "INSUFFICIENT_PERMISSIONS", 429: "TOO_MANY_REQUESTS"}
_MESSAGES = {401: "Invalid credentials.", 403: "Project does not have access to the requested model.",
             429: "Too many requests. Please try again later"}


def _error(status: int, message: str = "") -> JSONResponse:
    return JSONResponse({"err_code": _CODES.get(status, "INTERNAL_SERVER_ERROR"),
                         "err_msg": message or _MESSAGES.get(status, "An internal server error occurred."),
                         "request_id": str(uuid.uuid4())}, status_code=status)


class FakeDeepgram(TTSFake):
    def __init__(self, *, api_key: str | None = "dg-test", ms_per_char: float = 20,
                 transcripts: Sequence[str] = ("hello",), result_delay_ms: float = 0) -> None:
        super().__init__("fake Deepgram", [Route("/v1/speak", self.speak, methods=["POST"]),
                                           WebSocketRoute("/v1/listen", self.listen_socket)],
                         api_key=api_key, ms_per_char=ms_per_char)
        self.listen = ListenState(result_delay_ms=result_delay_ms)
        self.listen.set_transcripts(transcripts)

    async def listen_socket(self, websocket: WebSocket) -> None:
        await listen(websocket, self.listen, api_key=self.state.api_key, fail=self.state.fail,
                     retry_after=self.state.retry_after, release=self.state.release)

    async def speak(self, request: Request) -> Response:
        authorized = self.state.api_key is None or request.headers.get("authorization") == f"Token {self.state.api_key}"
        if (denied := await self.gate(request, authorized=authorized, error=_error)) is not None:
            return denied
        query = request.query_params
        if unknown := sorted(set(query) - _PARAMS):
            return _error(400, f"Unknown query parameter(s): {', '.join(unknown)}")
        if not query.get("model", "aura-asteria-en").startswith("aura-"):
            return _error(400, f"No such model/voice: {query.get('model')}")
        if query.get("encoding") != "linear16" or query.get("container", "wav") != "none":
            return _error(400, "the fake serves raw PCM only (encoding=linear16, container=none)")
        rate = int(query.get("sample_rate", "24000")) if query.get("sample_rate", "24000").isdigit() else 0
        if rate not in LINEAR16_RATES:
            return _error(400, f"Unsupported sample_rate for linear16: {query.get('sample_rate')}")
        try:
            body = json.loads(self.state.requests[-1]["body"])
        except ValueError:
            return _error(400, "Content-type was application/json, but we could not process the JSON payload.")
        if not isinstance(body, dict) or set(body) != {"text"} or not isinstance(body["text"], str) \
                or not body["text"].strip():
            return _error(400, "Request body must be {\"text\": <non-empty string>}")
        self.spoken.append(body["text"])
        return self.speech(body["text"], rate=rate)
