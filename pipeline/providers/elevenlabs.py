"""ElevenLabs text to speech over aiohttp (no SDK), streamed as raw PCM, and Scribe speech to text.

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

Speech to text is Scribe: ``POST {base}/v1/speech-to-text`` with ``xi-api-key``, a multipart form of
``model_id`` (``scribe_v1``), ``file`` (the utterance as a WAV) and ``language_code``; the answer's
``text`` is the transcript. ``provider_options.elevenlabs.*`` carry the voice settings (``stability``,
``similarity_boost``, ``style``, ``use_speaker_boost``, ``speed``; sent only when set), ``sample_rate``
and ``language``.

Errors come as ``{"detail": {"status": "invalid_api_key", "message": "..."}}``: 401 is a refused key
(it is also how a spent quota, ``quota_exceeded``, answers: permanent either way), 429
(``too_many_concurrent_requests``, ``system_busy``) and 5xx are transient.

Usage::

    tts = ElevenLabsTTS(ProviderSettings("elevenlabs", "eleven_multilingual_v2", key, "https://api.elevenlabs.io",
                                         voice="JBFqnCBsd6RMkjVDRZzb"), http, timeout_s=5)
    async for pcm16k in tts.synthesize("Hello!"):   # tts.sample_rate == 16000
        ...
    text = await ElevenLabsSTT(ProviderSettings("elevenlabs", "scribe_v1", key, "https://api.elevenlabs.io"), http,
                               timeout_s=10).transcribe(pcm, sample_rate=8000, language="en")
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote

import aiohttp

from pipeline.providers._http import HTTPClient
from pipeline.providers.base import BuildOptions, Probe, ProviderOption, ProviderSettings, ProviderSpec

__all__ = ["SPECS", "DEFAULT_VOICE", "ElevenLabsSTT", "ElevenLabsTTS"]

SAMPLE_RATE = 16000
PCM_RATES = (8000, 16000, 22050, 24000, 44100)
VOICE_SETTINGS = ("stability", "similarity_boost", "style", "use_speaker_boost", "speed")
DEFAULT_VOICE = "JBFqnCBsd6RMkjVDRZzb"   # "George", premade


def error_message(payload: Any) -> str:
    """``detail.message`` (with ``detail.status``) of an ElevenLabs error; a 422's ``detail`` is a list."""
    detail = payload["detail"]
    if isinstance(detail, list):
        return "; ".join(str(item.get("msg", item)) for item in detail)
    status = detail.get("status")
    return f"{detail['message']} ({status})" if status else str(detail["message"])


class _ElevenLabs(HTTPClient):
    @staticmethod
    def auth_headers(api_key: str) -> dict[str, str]:
        return {"xi-api-key": api_key}


class ElevenLabsTTS(_ElevenLabs):
    """``POST /v1/text-to-speech/{voice_id}/stream`` as ``pcm_<sample_rate>`` (16 kHz unless
    ``provider_options.elevenlabs.sample_rate`` says otherwise): PCM16 chunks as they arrive."""

    def __init__(self, settings: ProviderSettings, http: aiohttp.ClientSession, *, timeout_s: float) -> None:
        super().__init__(settings, http, timeout_s=timeout_s)
        self.sample_rate: int = settings.option("sample_rate", SAMPLE_RATE)

    def synthesize(self, text: str, *, voice: str | None = None,
                   language: str | None = None) -> AsyncIterator[bytes]:
        voice_id = quote(voice or self.settings.voice or DEFAULT_VOICE, safe="")
        body: dict[str, Any] = {"text": text, "model_id": self.settings.model}
        voice_settings = {k: v for k in VOICE_SETTINGS if (v := self.settings.option(k)) is not None}
        if voice_settings:
            body["voice_settings"] = voice_settings
        if code := self.settings.option("language"):
            body["language_code"] = code
        return self.post_pcm(f"{self._url}/v1/text-to-speech/{voice_id}/stream", body,
                             params={"output_format": f"pcm_{self.sample_rate}"}, message_of=error_message)


class ElevenLabsSTT(_ElevenLabs):
    """Scribe: ``POST /v1/speech-to-text`` with the utterance as a WAV; one request per finished utterance."""

    async def transcribe(self, pcm: bytes, *, sample_rate: int, language: str | None = None) -> str:
        fields = {"model_id": self.settings.model}
        if code := self.settings.option("language") or (language or "").split("-")[0]:
            fields["language_code"] = code
        return await self.post_wav(f"{self._url}/v1/speech-to-text", pcm, sample_rate, fields,
                                   text_of=lambda answer: answer["text"], message_of=error_message)


def build_tts(settings: ProviderSettings, http: aiohttp.ClientSession, options: BuildOptions) -> ElevenLabsTTS:
    """The registry's TTS builder for ElevenLabs."""
    return ElevenLabsTTS(settings, http, timeout_s=options.timeout_s)


def build_stt(settings: ProviderSettings, http: aiohttp.ClientSession, options: BuildOptions) -> ElevenLabsSTT:
    """The registry's STT builder for ElevenLabs Scribe."""
    return ElevenLabsSTT(settings, http, timeout_s=options.timeout_s)


def _unit(key: str, what: str) -> ProviderOption:
    return ProviderOption(key, float, None, f"voice setting: {what} (sent only when set)")


SPECS = (
    ProviderSpec("elevenlabs", key_env="ELEVENLABS_API_KEY", base_url_env="ELEVENLABS_BASE_URL",
                 default_base_url="https://api.elevenlabs.io",
                 default_models={"stt": "scribe_v1", "tts": "eleven_multilingual_v2"},
                 default_voice=DEFAULT_VOICE, api_root="",
                 options="`tts_voice` / a persona's `voice` is a voice id; `tts_model` `eleven_flash_v2_5` or "
                         "`eleven_turbo_v2` for lower latency; audio is 16 kHz PCM (`pcm_16000`); STT is Scribe",
                 provider_options=(
                     ProviderOption("sample_rate", int, SAMPLE_RATE, "TTS PCM rate (`output_format=pcm_<rate>`)",
                                    choices=PCM_RATES),
                     ProviderOption("language", str, "", "ISO 639-1 code sent as `language_code` (TTS: turbo and "
                                    "flash v2.5 models only); STT: else the persona's language"),
                     _unit("stability", "0 to 1, lower is more expressive"),
                     _unit("similarity_boost", "0 to 1, closeness to the original voice"),
                     _unit("style", "0 to 1, style exaggeration"),
                     ProviderOption("use_speaker_boost", bool, None, "voice setting: speaker boost (sent only "
                                    "when set)"),
                     _unit("speed", "0.7 to 1.2, speaking speed"),
                 ),
                 probe=Probe("/v1/models", lambda answer: [m["model_id"] for m in answer],
                             model_stages=frozenset({"tts"})),
                 stt=build_stt, tts=build_tts),
)
