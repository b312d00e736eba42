"""Fake ElevenLabs streaming text to speech (``POST /v1/text-to-speech/{voice_id}/stream``) on 127.0.0.1.

What it checks, as the real API does: ``xi-api-key`` (401 ``{"detail": {"status": "invalid_api_key",
"message": ...}}`` otherwise; an ``Authorization`` header does not count), the voice id in the path
(one of ``voices``, else 400 ``voice_not_found``), the query ``output_format`` (a ``pcm_<rate>``
format: the fake serves raw PCM only, and the API's default is MP3), a JSON body with a non-empty
``text``, a known ``model_id`` and, if present, ``voice_settings`` with only the API's fields (else 422
with a list ``detail``). It answers with raw PCM16 at the requested rate, in chunks.

Scribe (``POST /v1/speech-to-text``): the same key check, a multipart form with ``model_id``
(``scribe_v1`` or ``scribe_v1_experimental``), a ``file`` it can read as a WAV and an optional
``language_code``; it answers ``{"language_code", "language_probability", "text", "words"}`` with the next
of ``transcripts``. ``GET /v1/models`` lists the models (the start-up probe's request). 429 is
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
from tests.fakes.openai_server import parse_multipart, parse_wav

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


STT_MODELS = ("scribe_v1", "scribe_v1_experimental")


class FakeElevenLabs(TTSFake):
    def __init__(self, *, api_key: str | None = "xi-test", voices: tuple[str, ...] = VOICES,
                 ms_per_char: float = 20, transcripts: tuple[str, ...] = ("hello",)) -> None:
        super().__init__("fake ElevenLabs", [Route("/v1/text-to-speech/{voice_id}/stream", self.stream,
                                                   methods=["POST"]),
                                             Route("/v1/speech-to-text", self.transcribe, methods=["POST"]),
                                             Route("/v1/models", self.models, methods=["GET"])],
                         api_key=api_key, ms_per_char=ms_per_char)
        self.voices = voices
        self.transcripts = list(transcripts)
        self.stt_requests: list[dict[str, Any]] = []

    def _authorized(self, request: Request) -> bool:
        return self.state.api_key is None or request.headers.get("xi-api-key") == self.state.api_key

    async def models(self, request: Request) -> Response:
        if (denied := await self.gate(request, authorized=self._authorized(request), error=_error)) is not None:
            return denied
        return JSONResponse([{"model_id": m, "can_do_text_to_speech": True} for m in MODELS])

    async def transcribe(self, request: Request) -> Response:
        if (denied := await self.gate(request, authorized=self._authorized(request), error=_error)) is not None:
            return denied
        try:
            form = parse_multipart(self.state.requests[-1]["body"], request.headers.get("content-type", ""))
            rate, samples = parse_wav(form["file"])
        except (ValueError, KeyError) as exc:
            return _unprocessable("file", f"could not read the audio: {exc}")
        model = form.get("model_id", b"").decode()
        if model not in STT_MODELS:
            return _error(400, f"A model with model ID {model} does not exist", "model_not_found")
        code = form.get("language_code", b"").decode() or None
        self.stt_requests.append({"model_id": model, "language_code": code, "sample_rate": rate,
                                  "duration_ms": len(samples) * 1000 / rate})
        text = self.transcripts[(len(self.stt_requests) - 1) % len(self.transcripts)]
        answer = json.dumps({"language_code": code or "eng", "language_probability": 0.98, "text": text,
                             "words": [{"text": w, "type": "word"} for w in text.split()]}).encode()
        return self.chunked([answer[: len(answer) // 2], answer[len(answer) // 2:]], media_type="application/json")

    async def stream(self, request: Request) -> Response:
        if (denied := await self.gate(request, authorized=self._authorized(request), error=_error)) is not None:
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
        self.spoken.append(body["text"])
        return self.speech(body["text"], rate=rate)
