"""Fake Cartesia text to speech over its WebSocket (``/tts/websocket``) and ``GET /voices``, on 127.0.0.1.

What it checks, as Cartesia's API reference describes: the key in ``X-API-Key`` (or the ``api_key``
query parameter) and a ``Cartesia-Version`` header (or ``cartesia_version`` query), else the handshake
is refused with 401 / 400; then per generation request a JSON object with ``model_id`` (a ``sonic``
model), a non-empty ``transcript``, ``voice`` ``{"mode": "id", "id": <known voice>}``, a ``context_id``
and ``output_format`` ``{"container": "raw", "encoding": "pcm_s16le", "sample_rate": <rate>}``; a bad
request answers an ``error`` message (``status_code`` 400, ``done`` true). It answers ``chunk`` messages
(base64 PCM16 of whole samples, ``done`` false, ``status_code`` 206) and a closing ``done``.

Modes (``fake.state.fail``, as in tests/fakes/_llm.py): an HTTP status refuses the handshake (429 with
``retry-after``); ``"hang"`` takes the request and says nothing; ``"cut"`` sends half the chunks and
closes the socket without ``done``.

Usage::

    async with FakeCartesia(api_key="ck-test") as fake:
        fake.base_url                     # "http://127.0.0.1:<port>" (the client turns it into ws://)
        fake.state.requests[0]["body"]    # the generation request, as sent
"""

from __future__ import annotations

import asyncio
import base64
import json
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from tests.fakes._tts import TTSFake

__all__ = ["FakeCartesia", "VOICES"]

VOICES = ("a0e99841-438c-4a64-b679-ae501e7d6091", "694f9389-aac1-45b6-b726-9d9369183238")
RATES = (8000, 16000, 22050, 24000, 44100, 48000)
CHUNK_BYTES = 1000          # whole samples, as Cartesia sends them


def _refusal(status: int, message: str = "") -> JSONResponse:
    text = message or {401: "Invalid API key", 429: "Too many requests"}.get(status, "Internal server error")
    return JSONResponse({"error": text}, status_code=status)


def _problem(request: Any) -> str | None:
    """What is wrong with a generation request, as Cartesia would say it; None when it is good."""
    if not isinstance(request, dict):
        return "request must be a JSON object"
    if not str(request.get("model_id", "")).startswith("sonic"):
        return f"Invalid model: {request.get('model_id')!r}"
    if not isinstance(request.get("transcript"), str) or not request["transcript"].strip():
        return "transcript is required"
    if request.get("voice", {}).get("mode") != "id" or request["voice"].get("id") not in VOICES:
        return f"Voice not found: {request.get('voice')!r}"
    fmt = request.get("output_format") or {}
    if fmt.get("container") != "raw" or fmt.get("encoding") != "pcm_s16le" or fmt.get("sample_rate") not in RATES:
        return f"the fake serves raw pcm_s16le only, not {fmt!r}"
    if not request.get("context_id"):
        return "context_id is required"
    return None


class FakeCartesia(TTSFake):
    def __init__(self, *, api_key: str | None = "ck-test", ms_per_char: float = 20) -> None:
        super().__init__("fake Cartesia", [WebSocketRoute("/tts/websocket", self.websocket),
                                           Route("/voices", self.voices, methods=["GET"])],
                         api_key=api_key, ms_per_char=ms_per_char)

    def _authorized(self, headers: Any, query: Any) -> bool:
        return self.state.api_key is None or self.state.api_key in (headers.get("x-api-key"), query.get("api_key"))

    async def voices(self, request: Request) -> Response:
        if (denied := await self.gate(request, authorized=self._authorized(request.headers, request.query_params),
                                      error=_refusal)) is not None:
            return denied
        return JSONResponse([{"id": v, "name": f"voice {i}", "language": "en"} for i, v in enumerate(VOICES)])

    async def websocket(self, ws: WebSocket) -> None:
        record: dict[str, Any] = {"path": ws.url.path, "query": dict(ws.query_params), "headers": dict(ws.headers),
                                  "body": b""}
        self.state.requests.append(record)
        mode = self.state.fail
        refusal: Response | None = None
        if not self._authorized(ws.headers, ws.query_params):
            refusal = _refusal(401)
        elif not (ws.headers.get("cartesia-version") or ws.query_params.get("cartesia_version")):
            refusal = _refusal(400, "Cartesia-Version header is required")
        elif mode and mode.isdigit():
            refusal = _refusal(int(mode))
            if mode == "429":
                refusal.headers["retry-after"] = self.state.retry_after
        if refusal is not None:
            await ws.send_denial_response(refusal)
            return
        await ws.accept()
        try:
            text = await ws.receive_text()
            record["body"] = text.encode()
            request = json.loads(text)
            self.spoken.append(str(request.get("transcript", "")) if isinstance(request, dict) else "")
            if mode == "hang":
                await self.state.release.wait()
                return
            if (problem := _problem(request)) is not None:
                await ws.send_json({"type": "error", "done": True, "status_code": 400, "error": problem,
                                    "context_id": request.get("context_id") if isinstance(request, dict) else None})
                return
            await self._speak(ws, request, cut=mode == "cut")
        except WebSocketDisconnect:
            return
        finally:
            await _close(ws)

    async def _speak(self, ws: WebSocket, request: dict[str, Any], *, cut: bool) -> None:
        pcm = self.pcm(request["transcript"], request["output_format"]["sample_rate"])
        chunks = [pcm[i:i + CHUNK_BYTES] for i in range(0, len(pcm), CHUNK_BYTES)]
        for i, chunk in enumerate(chunks):
            if cut and i == max(1, len(chunks) // 2):
                return
            await ws.send_json({"type": "chunk", "data": base64.b64encode(chunk).decode(), "done": False,
                                "status_code": 206, "step_time": 5, "context_id": request["context_id"]})
            await asyncio.sleep(self.state.token_interval_ms / 1000)
        await ws.send_json({"type": "done", "done": True, "status_code": 206, "context_id": request["context_id"]})


async def _close(ws: WebSocket) -> None:
    try:
        await ws.close()
    except (RuntimeError, WebSocketDisconnect):
        pass
