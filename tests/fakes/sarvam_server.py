"""Fake Sarvam AI speech to text (``POST /speech-to-text``) and text to speech (``POST /text-to-speech``).

What it checks, as Sarvam's API reference describes: the key in ``api-subscription-key`` (an
``Authorization`` header does not count; 403 ``invalid_api_key_error`` otherwise); for speech to text a
multipart form with ``file`` (a WAV it can read), a ``saarika`` ``model`` and a BCP-47 ``language_code``
(``xx-IN`` or ``unknown``); for text to speech JSON with ``text``, a ``bulbul`` ``model``, a known
``speaker``, a ``target_language_code`` and a ``speech_sample_rate`` it offers. Speech comes back as
``{"request_id", "audios": [<base64 WAV>]}``, a transcript as ``{"request_id", "transcript",
"language_code"}``. Errors are ``{"error": {"message", "code", "request_id"}}``. Modes as in
tests/fakes/_llm.py (``"cut"`` drops the connection half way through the JSON answer).

Usage::

    async with FakeSarvam(api_key="sv-test", transcripts=["namaste"]) as fake:
        fake.base_url                       # "http://127.0.0.1:<port>" (the API root)
        fake.stt_requests[0]["language_code"]
"""

from __future__ import annotations

import base64
import json
import uuid
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from pipeline.audio import pcm_to_wav
from tests.fakes._tts import TTSFake
from tests.fakes.openai_server import parse_multipart, parse_wav

__all__ = ["FakeSarvam", "SPEAKERS"]

SPEAKERS = ("anushka", "manisha", "vidya", "arya", "abhilash", "karun", "hitesh")
RATES = (8000, 16000, 22050, 24000)
_CODES = {400: "invalid_request_error", 403: "invalid_api_key_error", 429: "rate_limit_exceeded_error",
          500: "internal_server_error"}


def _error(status: int, message: str = "") -> JSONResponse:
    status = 403 if status == 401 else status          # Sarvam answers a bad key with 403
    text = message or {403: "Invalid API key", 429: "Rate limit exceeded"}.get(status, "Internal server error")
    return JSONResponse({"error": {"message": text, "code": _CODES.get(status, "internal_server_error"),
                                   "request_id": uuid.uuid4().hex}}, status_code=status)


def _language_ok(code: Any) -> bool:
    return code == "unknown" or (isinstance(code, str) and code.endswith("-IN") and len(code) == 5)


class FakeSarvam(TTSFake):
    def __init__(self, *, api_key: str | None = "sv-test", transcripts: tuple[str, ...] = ("hello",),
                 ms_per_char: float = 20) -> None:
        super().__init__("fake Sarvam", [Route("/speech-to-text", self.stt, methods=["POST"]),
                                         Route("/text-to-speech", self.tts, methods=["POST"])],
                         api_key=api_key, ms_per_char=ms_per_char)
        self.transcripts = list(transcripts)
        self.stt_requests: list[dict[str, Any]] = []

    async def _denied(self, request: Request) -> Response | None:
        authorized = self.state.api_key is None or request.headers.get("api-subscription-key") == self.state.api_key
        return await self.gate(request, authorized=authorized, error=_error)

    async def stt(self, request: Request) -> Response:
        if (denied := await self._denied(request)) is not None:
            return denied
        try:
            form = parse_multipart(self.state.requests[-1]["body"], request.headers.get("content-type", ""))
            rate, samples = parse_wav(form["file"])
        except (ValueError, KeyError) as exc:
            return _error(400, f"Invalid audio file: {exc}")
        model, code = form.get("model", b"saarika:v2.5").decode(), form.get("language_code", b"unknown").decode()
        if not model.startswith("saarika") or not _language_ok(code):
            return _error(400, f"Invalid model {model!r} or language_code {code!r}")
        self.stt_requests.append({"model": model, "language_code": code, "sample_rate": rate,
                                  "duration_ms": len(samples) * 1000 / rate})
        text = self.transcripts[(len(self.stt_requests) - 1) % len(self.transcripts)]
        answer = json.dumps({"request_id": uuid.uuid4().hex, "transcript": text,
                             "language_code": "en-IN" if code == "unknown" else code}).encode()
        return self.chunked([answer[: len(answer) // 2], answer[len(answer) // 2:]], media_type="application/json")

    async def tts(self, request: Request) -> Response:
        if (denied := await self._denied(request)) is not None:
            return denied
        try:
            body = json.loads(self.state.requests[-1]["body"])
        except ValueError:
            return _error(400, "Invalid JSON")
        if not isinstance(body, dict) or not isinstance(body.get("text"), str) or not body["text"].strip():
            return _error(400, "text is required")
        rate = body.get("speech_sample_rate", 22050)
        if not str(body.get("model", "bulbul:v2")).startswith("bulbul") or body.get("speaker") not in SPEAKERS \
                or not _language_ok(body.get("target_language_code")) or rate not in RATES:
            return _error(400, f"Invalid model, speaker, target_language_code or speech_sample_rate in {body!r}")
        self.spoken.append(body["text"])
        wav = base64.b64encode(pcm_to_wav(self.pcm(body["text"], rate), rate)).decode()
        answer = json.dumps({"request_id": uuid.uuid4().hex, "audios": [wav]}).encode()
        step = max(1, len(answer) // 4)
        return self.chunked([answer[i:i + step] for i in range(0, len(answer), step)], media_type="application/json")
