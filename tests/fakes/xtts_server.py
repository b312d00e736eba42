"""Fake Coqui xtts-streaming-server (``GET /studio_speakers``, ``POST /tts_stream``) on 127.0.0.1.

What it checks, as the server's FastAPI models declare (``StreamingInputs``): a JSON body with
``speaker_embedding`` (a list of numbers), ``gpt_cond_latent`` (a list of lists of numbers), a
non-empty ``text``, a ``language`` it supports, ``add_wav_header`` and ``stream_chunk_size`` (a string of
digits); a missing or mistyped field is 422 with a list ``detail``. The latents must be a listed
speaker's (the fake knows which speaker was meant). With ``add_wav_header`` false it streams raw PCM16
at 24 kHz; true puts a WAV header first (as the real server does). Modes as in tests/fakes/_llm.py.

Usage::

    async with FakeXTTS() as fake:
        fake.base_url                         # "http://127.0.0.1:<port>"
        fake.voices_spoken                    # the speaker names used, in order
"""

from __future__ import annotations

import json
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tests.fakes._tts import TTSFake
from tests.fakes.openai_server import wav_header

__all__ = ["FakeXTTS", "SPEAKERS"]

SPEAKERS = ("Claribel Dervla", "Daisy Studious", "Ana Florence")
LANGUAGES = ("en", "de", "fr", "es", "it", "pl", "pt", "tr", "ru", "nl", "cs", "ar", "zh-cn", "ja", "hu", "ko", "hi")
RATE = 24000


def _latents(index: int) -> dict[str, Any]:
    return {"speaker_embedding": [index + 0.25] * 8, "gpt_cond_latent": [[index + 0.5] * 4] * 3}


def _error(status: int, message: str = "") -> JSONResponse:
    return JSONResponse({"detail": message or {401: "Unauthorized", 429: "Too many requests"}.get(
        status, "Internal Server Error")}, status_code=status)


def _unprocessable(field: str, msg: str) -> JSONResponse:
    return JSONResponse({"detail": [{"loc": ["body", field], "msg": msg, "type": "value_error"}]}, status_code=422)


class FakeXTTS(TTSFake):
    def __init__(self, *, speakers: tuple[str, ...] = SPEAKERS, ms_per_char: float = 20) -> None:
        super().__init__("fake XTTS", [Route("/studio_speakers", self.studio_speakers, methods=["GET"]),
                                       Route("/tts_stream", self.tts_stream, methods=["POST"])],
                         api_key=None, ms_per_char=ms_per_char)
        self.speakers = {name: _latents(i) for i, name in enumerate(speakers)}
        self.voices_spoken: list[str] = []
        self.speaker_lists = 0

    async def studio_speakers(self, request: Request) -> Response:
        self.speaker_lists += 1
        return JSONResponse(self.speakers)

    async def tts_stream(self, request: Request) -> Response:
        if (denied := await self.gate(request, authorized=True, error=_error)) is not None:
            return denied
        try:
            body = json.loads(self.state.requests[-1]["body"])
        except ValueError:
            return _unprocessable("body", "JSON decode error")
        if not isinstance(body, dict):
            return _unprocessable("body", "Input should be a valid dictionary")
        for field, ok in (("text", isinstance(body.get("text"), str) and body["text"].strip()),
                          ("language", body.get("language") in LANGUAGES),
                          ("speaker_embedding", isinstance(body.get("speaker_embedding"), list)),
                          ("gpt_cond_latent", isinstance(body.get("gpt_cond_latent"), list)),
                          ("stream_chunk_size", str(body.get("stream_chunk_size", "20")).isdigit())):
            if not ok:
                return _unprocessable(field, "Field required or invalid")
        voice = next((n for n, v in self.speakers.items()
                      if v == {k: body[k] for k in ("speaker_embedding", "gpt_cond_latent")}), None)
        if voice is None:
            return _error(500, "the latents are no studio speaker's")
        self.voices_spoken.append(voice)
        self.spoken.append(body["text"])
        if body.get("add_wav_header", True):
            pcm = self.pcm(body["text"], RATE)
            return Response(wav_header(len(pcm), RATE) + pcm, media_type="audio/wav")
        return self.speech(body["text"], rate=RATE, media_type="audio/wav")
