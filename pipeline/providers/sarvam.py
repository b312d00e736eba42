"""Sarvam AI over aiohttp (no SDK): Saarika speech to text and Bulbul text to speech, Indian languages.

Both endpoints take the key in ``api-subscription-key``. Speech to text is ``POST {base}/speech-to-text``,
a multipart form of ``file`` (the utterance as a WAV), ``model`` (``saarika:v2.5``) and ``language_code``;
the answer's ``transcript`` is the text. Text to speech is ``POST {base}/text-to-speech`` with the JSON
``{"text", "target_language_code", "speaker", "model", "speech_sample_rate"}``; the answer is JSON whose
``audios`` holds one base64 WAV per input, so nothing plays until it is whole (Sarvam's REST endpoint
does not stream). The WAV's header is read (its rate must be the one asked for) and the PCM handed on.

The language is ``provider_options.sarvam.language`` (``hi-IN`` ...) or else the persona's (``en`` ->
``en-IN``: Sarvam wants a BCP-47 code with the region). Errors come as ``{"error": {"message", "code",
"request_id"}}``; 401/403 are a refused key, 429 and 5xx transient.

Usage::

    settings = ProviderSettings("sarvam", "bulbul:v2", key, "https://api.sarvam.ai", voice="anushka")
    async for pcm16k in SarvamTTS(settings, http, timeout_s=10).synthesize("Namaste!", language="hi"): ...
    text = await SarvamSTT(dataclasses.replace(settings, model="saarika:v2.5"), http,
                           timeout_s=10).transcribe(pcm, sample_rate=8000, language="en")
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import AsyncIterator

import aiohttp

from pipeline.audio import wav_to_pcm
from pipeline.providers._http import HTTPClient, provider_errors, raise_for_status
from pipeline.providers.base import BuildOptions, ProviderError, ProviderOption, ProviderSettings, ProviderSpec

__all__ = ["SPECS", "SarvamSTT", "SarvamTTS", "language_code"]

SAMPLE_RATE = 16000
DEFAULT_VOICE = "anushka"           # a bulbul:v2 speaker


def language_code(option: str, persona: str | None) -> str:
    """The BCP-47 code Sarvam wants: the option when set, else the persona's language with ``-IN`` added
    to a bare one.

    >>> language_code("", "hi"), language_code("ta-IN", "en"), language_code("", None)
    ('hi-IN', 'ta-IN', 'en-IN')
    """
    code = option or persona or "en"
    return code if "-" in code else f"{code}-IN"


class _Sarvam(HTTPClient):
    @staticmethod
    def auth_headers(api_key: str) -> dict[str, str]:
        return {"api-subscription-key": api_key}


class SarvamSTT(_Sarvam):
    """Saarika: ``POST /speech-to-text`` with the utterance as a WAV; one request per finished utterance."""

    async def transcribe(self, pcm: bytes, *, sample_rate: int, language: str | None = None) -> str:
        fields = {"model": self.settings.model,
                  "language_code": language_code(self.settings.option("language", ""), language)}
        return await self.post_wav(f"{self._url}/speech-to-text", pcm, sample_rate, fields,
                                   text_of=lambda answer: answer["transcript"])


class SarvamTTS(_Sarvam):
    """Bulbul: ``POST /text-to-speech``; the base64 WAV in ``audios`` as PCM16 at ``sample_rate``."""

    def __init__(self, settings: ProviderSettings, http: aiohttp.ClientSession, *, timeout_s: float) -> None:
        super().__init__(settings, http, timeout_s=timeout_s)
        self.sample_rate: int = settings.option("sample_rate", SAMPLE_RATE)

    async def synthesize(self, text: str, *, voice: str | None = None,
                         language: str | None = None) -> AsyncIterator[bytes]:
        body: dict[str, object] = {
            "text": text, "model": self.settings.model, "speaker": voice or self.settings.voice or DEFAULT_VOICE,
            "target_language_code": language_code(self.settings.option("language", ""), language),
            "speech_sample_rate": self.sample_rate}
        if (pace := self.settings.option("pace")) is not None:
            body["pace"] = pace
        with provider_errors(self.name):
            async with self.request("POST", f"{self._url}/text-to-speech", json=body) as response:
                await raise_for_status(self.settings, response)
                answer = await response.read()
        for audio in self._audios(answer):
            yield audio

    def _audios(self, answer: bytes) -> list[bytes]:
        try:
            encoded = json.loads(answer)["audios"]
            clips = [wav_to_pcm(base64.b64decode(item, validate=True)) for item in encoded]
        except (ValueError, KeyError, TypeError, binascii.Error) as exc:
            raise ProviderError(self.name, f"the answer holds no WAV audio ({type(exc).__name__})") from exc
        if any(rate != self.sample_rate for _, rate in clips):
            raise ProviderError(self.name, f"audio came at {[r for _, r in clips]} Hz, not {self.sample_rate}")
        return [pcm[: len(pcm) & ~1] for pcm, _ in clips if pcm]


def build_stt(settings: ProviderSettings, http: aiohttp.ClientSession, options: BuildOptions) -> SarvamSTT:
    """The registry's STT builder for Sarvam (Saarika)."""
    return SarvamSTT(settings, http, timeout_s=options.timeout_s)


def build_tts(settings: ProviderSettings, http: aiohttp.ClientSession, options: BuildOptions) -> SarvamTTS:
    """The registry's TTS builder for Sarvam (Bulbul)."""
    return SarvamTTS(settings, http, timeout_s=options.timeout_s)


SPECS = (
    ProviderSpec("sarvam", key_env="SARVAM_API_KEY", base_url_env="SARVAM_BASE_URL",
                 default_base_url="https://api.sarvam.ai", default_models={"stt": "saarika:v2.5", "tts": "bulbul:v2"},
                 default_voice=DEFAULT_VOICE, api_root="",
                 options="`tts_voice` / a persona's `voice` is a Bulbul speaker (anushka, manisha, abhilash ...); "
                         "the language is the persona's unless set; TTS is not streamed (one WAV per clause)",
                 provider_options=(
                     ProviderOption("language", str, "", "BCP-47 code (`hi-IN`, `ta-IN` ...) for both stages; "
                                    "unset: the persona's language with `-IN`"),
                     ProviderOption("sample_rate", int, SAMPLE_RATE, "TTS `speech_sample_rate`",
                                    choices=(8000, 16000, 22050, 24000)),
                     ProviderOption("pace", float, None, "TTS speaking pace, 0.3 to 3.0 (sent only when set)"),
                 ),
                 stt=build_stt, tts=build_tts),
)
