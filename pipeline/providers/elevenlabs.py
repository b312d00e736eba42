"""ElevenLabs text to speech over aiohttp (no SDK), streamed as raw PCM.

``POST {base}/v1/text-to-speech/{voice_id}/stream?output_format=pcm_16000`` with ``xi-api-key`` and the
JSON body ``{"text", "model_id"}``: the answer is headerless 16-bit little-endian mono PCM, sent in
chunks as it is generated, so there is nothing to decode. The voice id is the persona's ``voice``,
else ``tts_voice``, else George (``JBFqnCBsd6RMkjVDRZzb``, a premade voice every account has); the
model is ``tts_model`` (``eleven_multilingual_v2``, ``eleven_turbo_v2``, ``eleven_flash_v2_5`` ...).

Why 16 kHz (the API also offers ``pcm_8000`` ... ``pcm_48000``): a phone leg plays 8 kHz, a browser or
Vonage leg 16 kHz. From 16 kHz the resampler halves (one output per two inputs, an 84-tap filter) or
passes through; 24 kHz costs a third more taps for 8 kHz and a 2:3 polyphase for 16 kHz, 22.05 kHz a
160:441 polyphase (about 6× the work), and both carry bytes the caller never hears. ``pcm_8000`` would
band-limit the 16 kHz legs, and the provider does not know the leg's rate.

Errors come as ``{"detail": {"status": "invalid_api_key", "message": "..."}}``: 401 is a refused key
(it is also how a spent quota, ``quota_exceeded``, answers: permanent either way), 429
(``too_many_concurrent_requests``, ``system_busy``) and 5xx are transient.

Usage::

    tts = ElevenLabsTTS(ProviderSettings("elevenlabs", "eleven_multilingual_v2", key, "https://api.elevenlabs.io",
                                         voice="JBFqnCBsd6RMkjVDRZzb"), http, timeout_s=5)
    async for pcm16k in tts.synthesize("Hello!"):   # tts.sample_rate == 16000
        ...
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote

import aiohttp

from pipeline.providers._http import HTTPClient
from pipeline.providers.base import BuildOptions, ProviderSettings, ProviderSpec

__all__ = ["SPECS", "DEFAULT_VOICE", "ElevenLabsTTS"]

SAMPLE_RATE = 16000
OUTPUT_FORMAT = f"pcm_{SAMPLE_RATE}"
DEFAULT_VOICE = "JBFqnCBsd6RMkjVDRZzb"   # "George", premade


def error_message(payload: Any) -> str:
    """``detail.message`` (with ``detail.status``) of an ElevenLabs error; a 422's ``detail`` is a list."""
    detail = payload["detail"]
    if isinstance(detail, list):
        return "; ".join(str(item.get("msg", item)) for item in detail)
    status = detail.get("status")
    return f"{detail['message']} ({status})" if status else str(detail["message"])


class ElevenLabsTTS(HTTPClient):
    """``POST /v1/text-to-speech/{voice_id}/stream`` as ``pcm_16000``: 16 kHz PCM16 chunks as they arrive."""

    sample_rate = SAMPLE_RATE

    @staticmethod
    def auth_headers(api_key: str) -> dict[str, str]:
        return {"xi-api-key": api_key}

    def synthesize(self, text: str, *, voice: str | None = None) -> AsyncIterator[bytes]:
        voice_id = quote(voice or self.settings.voice or DEFAULT_VOICE, safe="")
        return self.post_pcm(f"{self._url}/v1/text-to-speech/{voice_id}/stream",
                             {"text": text, "model_id": self.settings.model},
                             params={"output_format": OUTPUT_FORMAT}, message_of=error_message)


def build_tts(settings: ProviderSettings, http: aiohttp.ClientSession, options: BuildOptions) -> ElevenLabsTTS:
    """The registry's TTS builder for ElevenLabs."""
    return ElevenLabsTTS(settings, http, timeout_s=options.timeout_s)


SPECS = (
    ProviderSpec("elevenlabs", key_env="ELEVENLABS_API_KEY", base_url_env="ELEVENLABS_BASE_URL",
                 default_base_url="https://api.elevenlabs.io", default_models={"tts": "eleven_multilingual_v2"},
                 default_voice=DEFAULT_VOICE, api_root="",
                 options="`tts_voice` / a persona's `voice` is a voice id; `tts_model` `eleven_flash_v2_5` or "
                         "`eleven_turbo_v2` for lower latency; audio is 16 kHz PCM (`pcm_16000`)",
                 tts=build_tts),
)
