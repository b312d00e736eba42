"""Deepgram Aura text to speech over aiohttp (no SDK), streamed as raw PCM.

``POST {base}/v1/speak?model=aura-asteria-en&encoding=linear16&sample_rate=16000&container=none`` with
``Authorization: Token <key>`` and the JSON body ``{"text": ...}``: the answer is headerless 16-bit
little-endian mono PCM (``container=none``), streamed as it is generated. In Aura the model *is* the
voice, so a voice (the persona's ``voice``, else ``tts_voice``: ``aura-2-thalia-en`` ...) is sent as
``model`` and ``tts_model`` (default ``aura-asteria-en``) applies when there is none. 16 kHz for the
reason given in ``pipeline.providers.elevenlabs`` (halved for a phone leg, passed through for a 16 kHz
leg). Deepgram's streaming speech-to-text is not here.

Errors come as ``{"err_code": "INVALID_AUTH", "err_msg": "Invalid credentials.", "request_id": ...}``
(newer endpoints: ``{"category", "message", "details"}``); 401/403 are a refused key, 429 and 5xx
transient.

Usage::

    tts = DeepgramTTS(ProviderSettings("deepgram", "aura-asteria-en", key, "https://api.deepgram.com"), http,
                      timeout_s=5)
    async for pcm16k in tts.synthesize("Hello!", voice="aura-2-thalia-en"):   # tts.sample_rate == 16000
        ...
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp

from pipeline.providers._http import HTTPClient
from pipeline.providers.base import BuildOptions, Probe, ProviderSettings, ProviderSpec

__all__ = ["SPECS", "DeepgramTTS"]

SAMPLE_RATE = 16000


def error_message(payload: Any) -> str:
    """``err_msg`` (``err_code``) of a Deepgram error, or the newer ``message`` (``category``)."""
    text = payload["err_msg"] if "err_msg" in payload else payload["message"]
    code = payload.get("err_code") or payload.get("category")
    return f"{text} ({code})" if code else str(text)


class DeepgramTTS(HTTPClient):
    """``POST /v1/speak`` as ``linear16`` at 16 kHz without a container: PCM16 chunks as they arrive."""

    sample_rate = SAMPLE_RATE

    @staticmethod
    def auth_headers(api_key: str) -> dict[str, str]:
        return {"Authorization": f"Token {api_key}"}

    def synthesize(self, text: str, *, voice: str | None = None,
                   language: str | None = None) -> AsyncIterator[bytes]:
        params = {"model": voice or self.settings.voice or self.settings.model, "encoding": "linear16",
                  "sample_rate": str(SAMPLE_RATE), "container": "none"}
        return self.post_pcm(f"{self._url}/v1/speak", {"text": text}, params=params, message_of=error_message)


def build_tts(settings: ProviderSettings, http: aiohttp.ClientSession, options: BuildOptions) -> DeepgramTTS:
    """The registry's TTS builder for Deepgram Aura."""
    return DeepgramTTS(settings, http, timeout_s=options.timeout_s)


SPECS = (
    ProviderSpec("deepgram", key_env="DEEPGRAM_API_KEY", base_url_env="DEEPGRAM_BASE_URL",
                 default_base_url="https://api.deepgram.com", default_models={"tts": "aura-asteria-en"},
                 api_root="",
                 options="Aura TTS only; the voice is the model: `tts_voice` / a persona's `voice` "
                         "(`aura-2-thalia-en` ...) is sent as `model`, else `tts_model`; audio is 16 kHz PCM",
                 probe=Probe("/v1/projects"), tts=build_tts),
)
