"""Fake ElevenLabs streaming text to speech (``POST /v1/text-to-speech/{voice_id}/stream``) on 127.0.0.1.

What it checks, as the real API does: ``xi-api-key`` (401 ``{"detail": {"status": "invalid_api_key",
"message": ...}}`` otherwise; an ``Authorization`` header does not count), the voice id in the path
(one of ``voices``, else 400 ``voice_not_found``), the query ``output_format`` (a ``pcm_<rate>``
format: the fake serves raw PCM only, and the API's default is MP3), a JSON body with a non-empty
``text``, a known ``model_id`` and, if present, ``voice_settings`` with only the API's fields (else 422
with a list ``detail``). It answers with raw PCM16 at the requested rate, in chunks. 429 is
``too_many_concurrent_requests`` with ``retry-after``, 5xx ``internal_error``.

Usage::

    async with FakeElevenLabs(api_key="xi-test") as fake:
        fake.base_url                      # "http://127.0.0.1:<port>" (the API root)
        fake.state.fail = "429"            # see tests/fakes/_llm.py for the modes
        fake.state.requests[0]["query"]    # {"output_format": "pcm_16000"}
"""

from __future__ import annotations

import json
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tests.fakes._tts import TTSFake

__all__ = ["FakeElevenLabs", "MODELS", "VOICES"]

MODELS = ("eleven_multilingual_v2", "eleven_turbo_v2", "eleven_turbo_v2_5", "eleven_flash_v2", "eleven_flash_v2_5",
          "eleven_v3")
VOICES = ("JBFqnCBsd6RMkjVDRZzb", "21m00Tcm4TlvDq8ikWAM", "EXAVITQu4vr4xnJW60CF")
PCM_RATES = (8000, 16000, 22050, 24000, 32000, 44100, 48000)
_VOICE_SETTINGS = {"stability", "similarity_boost", "style", "use_speaker_boost", "speed"}
_STATUS = {401: "invalid_api_key", 429: "too_many_concurrent_requests", 400: "invalid_request"}
_MESSAGES = {401: "Invalid API key", 429: "Too many concurrent requests for your subscription. Please wait.",
             400: "Invalid request"}


def _error(status: int, message: str = "", kind: str = "") -> JSONResponse:
    detail = {"status": kind or _STATUS.get(status, "internal_error"),
              "message": message or _MESSAGES.get(status, "An internal server error occurred.")}
    return JSONResponse({"detail": detail}, status_code=status)


def _unprocessable(field: str, msg: str) -> JSONResponse:
    return JSONResponse({"detail": [{"loc": ["body", field], "msg": msg, "type": "value_error"}]}, status_code=422)


def _invalid(body: Any) -> Response | None:
    """The 422 the real API would answer this body with, or None."""
    if not isinstance(body, dict):
        return _unprocessable("body", "Input should be a valid dictionary")
    if not isinstance(body.get("text"), str) or not body["text"].strip():
        return _unprocessable("text", "Field required")
    if body.get("model_id", MODELS[0]) not in MODELS:
        return _error(400, f"A model with model ID {body.get('model_id')} does not exist", "model_not_found")
    settings = body.get("voice_settings")
    if settings is not None and (not isinstance(settings, dict) or set(settings) - _VOICE_SETTINGS):
        return _unprocessable("voice_settings", "Extra inputs are not permitted")
    return None


class FakeElevenLabs(TTSFake):
    def __init__(self, *, api_key: str | None = "xi-test", voices: tuple[str, ...] = VOICES,
                 ms_per_char: float = 20) -> None:
        super().__init__("fake ElevenLabs", [Route("/v1/text-to-speech/{voice_id}/stream", self.stream,
                                                   methods=["POST"])], api_key=api_key, ms_per_char=ms_per_char)
        self.voices = voices

    async def stream(self, request: Request) -> Response:
        authorized = self.state.api_key is None or request.headers.get("xi-api-key") == self.state.api_key
        if (denied := await self.gate(request, authorized=authorized, error=_error)) is not None:
            return denied
        voice_id = request.path_params["voice_id"]
        if voice_id not in self.voices:
            return _error(400, f"A voice with voice_id {voice_id} does not exist.", "voice_not_found")
        fmt = request.query_params.get("output_format", "mp3_44100_128")
        rate = int(fmt.removeprefix("pcm_")) if fmt.removeprefix("pcm_").isdigit() else 0
        if rate not in PCM_RATES:
            return _error(400, f"the fake serves raw PCM only (pcm_<rate>), not {fmt!r}", "invalid_output_format")
        try:
            body = json.loads(self.state.requests[-1]["body"])
        except ValueError:
            return _unprocessable("body", "JSON decode error")
        if (problem := _invalid(body)) is not None:
            return problem
        return self.speech(body["text"], rate=rate)
