"""Coqui XTTS through a local xtts-streaming-server (no key, no SDK), streamed as raw 24 kHz PCM.

The server (``XTTS_BASE_URL``, default ``http://localhost:8000``) lists its built-in voices at
``GET /studio_speakers``: ``{name: {"speaker_embedding": [...], "gpt_cond_latent": [[...]]}}``. We read
it once per provider (the first synthesis; kept afterwards) and send the chosen voice's two arrays with
each ``POST /tts_stream`` ``{"text", "language", "speaker_embedding", "gpt_cond_latent",
"add_wav_header": false, "stream_chunk_size": "20"}``: the answer is headerless PCM16 mono at 24 kHz,
streamed as the model produces it. The voice is the persona's ``voice`` or ``tts_voice`` (a studio
speaker's name), else the first speaker the server lists; a name it does not have is a permanent error
naming a few it has. The text is sent as it is (punctuation shapes the prosody).

The language is ``provider_options.xtts.language`` or else the persona's (``en-US`` -> ``en``).
FastAPI errors come as ``{"detail": ...}``; 5xx and 429 are transient.

Usage::

    tts = XTTSTTS(ProviderSettings("xtts", "xtts_v2", None, "http://localhost:8000"), http, timeout_s=10)
    async for pcm24k in tts.synthesize("Hello!", voice="Ana Florence"): ...   # tts.sample_rate == 24000
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Mapping
from typing import Any

import aiohttp

from pipeline.providers._http import HTTPClient, pcm_chunks, provider_errors, raise_for_status
from pipeline.providers.base import (
    BuildOptions,
    Probe,
    ProviderError,
    ProviderOption,
    ProviderSettings,
    ProviderSpec,
    closing,
)

__all__ = ["SPECS", "XTTSTTS"]

SAMPLE_RATE = 24000           # XTTS v2's output rate


def _detail(payload: Any) -> str:
    detail = payload["detail"]
    return "; ".join(str(d.get("msg", d)) for d in detail) if isinstance(detail, list) else str(detail)


class XTTSTTS(HTTPClient):
    """``POST /tts_stream`` with a studio speaker's latents: 24 kHz PCM16 chunks as they arrive."""

    sample_rate = SAMPLE_RATE

    def __init__(self, settings: ProviderSettings, http: aiohttp.ClientSession, *, timeout_s: float) -> None:
        super().__init__(settings, http, timeout_s=timeout_s)
        self._speakers: Mapping[str, Any] | None = None
        self._lock = asyncio.Lock()

    async def speakers(self) -> Mapping[str, Any]:
        """The server's studio speakers by name (fetched once)."""
        async with self._lock:
            if self._speakers is None:
                with provider_errors(self.name):
                    async with self.request("GET", f"{self._url}/studio_speakers") as response:
                        await raise_for_status(self.settings, response, message_of=_detail)
                        body = await response.read()
                try:
                    speakers = json.loads(body)
                except ValueError as exc:
                    raise ProviderError(self.name, "/studio_speakers is not JSON", transient=True) from exc
                if not isinstance(speakers, dict) or not speakers:
                    raise ProviderError(self.name, "the server lists no studio speakers")
                self._speakers = speakers
            return self._speakers

    async def synthesize(self, text: str, *, voice: str | None = None,
                         language: str | None = None) -> AsyncIterator[bytes]:
        speakers = await self.speakers()
        name = voice or self.settings.voice or next(iter(speakers))
        if name not in speakers:
            raise ProviderError(self.name, f"no studio speaker {name!r}; it has {', '.join(list(speakers)[:5])} ...")
        latents = speakers[name]
        body = {"text": text, "language": self.settings.option("language") or (language or "en").split("-")[0],
                "speaker_embedding": latents.get("speaker_embedding"),
                "gpt_cond_latent": latents.get("gpt_cond_latent"), "add_wav_header": False,
                "stream_chunk_size": str(self.settings.option("stream_chunk_size", 20))}
        with provider_errors(self.name):
            async with self.request("POST", f"{self._url}/tts_stream", json=body) as response:
                await raise_for_status(self.settings, response, message_of=_detail)
                async with closing(pcm_chunks(response)) as chunks:
                    async for chunk in chunks:
                        yield chunk


def build_tts(settings: ProviderSettings, http: aiohttp.ClientSession, options: BuildOptions) -> XTTSTTS:
    """The registry's TTS builder for a local XTTS server."""
    return XTTSTTS(settings, http, timeout_s=options.timeout_s)


SPECS = (
    ProviderSpec("xtts", key_env=None, base_url_env="XTTS_BASE_URL", default_base_url="http://localhost:8000",
                 default_models={"tts": "xtts_v2"}, api_root="",
                 options="no key; a local xtts-streaming-server; `tts_voice` / a persona's `voice` is a studio "
                         "speaker's name (default: the first it lists); audio is 24 kHz PCM",
                 provider_options=(
                     ProviderOption("language", str, "", "XTTS language code (`en`, `de`, `hi` ...); unset: the "
                                    "persona's language"),
                     ProviderOption("stream_chunk_size", int, 20, "tokens per streamed chunk (smaller: sooner "
                                    "first audio, more overhead)"),
                 ),
                 probe=Probe("/studio_speakers"), tts=build_tts),
)
