"""Every remote batch STT vendor other than OpenAI's family against a fake speaking its wire protocol (real HTTP
on 127.0.0.1): the transcript of one utterance uploaded as a WAV with the model and language, a refused key,
a rate limit with retry-after, a server error, an answer cut mid-way, a hang past the timeout."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest

from gateway.config import Config
from pipeline.providers import PROVIDERS, ProviderSettings, build_stt
from pipeline.providers.base import ProviderError
from pipeline.providers.elevenlabs import ElevenLabsSTT
from pipeline.providers.sarvam import SarvamSTT
from tests.fakes._tts import TTSFake
from tests.fakes.elevenlabs_server import FakeElevenLabs
from tests.fakes.sarvam_server import FakeSarvam
from tests.speech import speech_pcm

pytestmark = pytest.mark.asyncio

KEY = "stt-vendor-key-123"
SAID = "I would like to book a table"


@dataclass(frozen=True)
class Vendor:
    name: str
    cls: type
    fake: Callable[..., TTSFake]
    language: Callable[[dict[str, Any]], Any]      # the language code as the vendor received it
    model: str                                     # the model field's name in the form
    refused: int = 401

    @contextlib.asynccontextmanager
    async def running(self, key: str = KEY, **options: Any) -> AsyncIterator[tuple[Any, ProviderSettings]]:
        spec = PROVIDERS[self.name]
        async with self.fake(api_key=KEY, transcripts=(SAID,)) as fake:
            yield fake, ProviderSettings(self.name, spec.default_models["stt"], key, fake.base_url,
                                         key_env=spec.key_env, options=options)


VENDORS = {v.name: v for v in (
    Vendor("elevenlabs", ElevenLabsSTT, FakeElevenLabs, lambda r: r["language_code"], "model_id"),
    Vendor("sarvam", SarvamSTT, FakeSarvam, lambda r: r["language_code"], "model", refused=403),
)}
vendors = pytest.mark.parametrize("vendor", list(VENDORS.values()), ids=list(VENDORS))
PCM = speech_pcm(SAID, 8000)


@vendors
async def test_transcribes_an_utterance_sent_as_a_wav(vendor: Vendor) -> None:
    async with vendor.running() as (fake, settings), aiohttp.ClientSession() as http:
        stt = build_stt(settings, http, timeout_s=5)
        assert isinstance(stt, vendor.cls)
        assert await stt.transcribe(PCM, sample_rate=8000, language="en") == SAID
    [request] = fake.stt_requests
    assert request[vendor.model] == PROVIDERS[vendor.name].default_models["stt"]
    assert request["sample_rate"] == 8000 and request["duration_ms"] == pytest.approx(len(PCM) / 16)
    assert vendor.language(request) == {"elevenlabs": "en", "sarvam": "en-IN"}[vendor.name]


@vendors
async def test_the_language_option_wins_over_the_persona(vendor: Vendor) -> None:
    code = {"elevenlabs": "hi", "sarvam": "hi-IN"}[vendor.name]
    async with vendor.running(language=code) as (fake, settings), aiohttp.ClientSession() as http:
        assert await build_stt(settings, http, timeout_s=5).transcribe(PCM, sample_rate=8000, language="en") == SAID
    assert vendor.language(fake.stt_requests[0]) == code


async def failure(vendor: Vendor, mode: str, *, key: str = KEY, timeout_s: float = 5) -> ProviderError:
    async with vendor.running(key=key) as (fake, settings), aiohttp.ClientSession() as http:
        fake.state.fail = mode or None
        with pytest.raises(ProviderError) as err:
            await build_stt(settings, http, timeout_s=timeout_s).transcribe(PCM, sample_rate=8000)
    assert KEY not in str(err.value) and "wrong-key" not in str(err.value)
    return err.value


@vendors
async def test_a_refused_key_is_permanent_and_names_the_key_variable(vendor: Vendor) -> None:
    error = await failure(vendor, "", key="wrong-key")
    assert error.transient is False and str(vendor.refused) in str(error)
    assert PROVIDERS[vendor.name].key_env in str(error)


@vendors
@pytest.mark.parametrize(("mode", "timeout_s", "says"), [("429", 5, "HTTP 429"), ("500", 5, "HTTP 500"),
                                                         ("cut", 5, "cut off"), ("hang", 0.3, "timed out")])
async def test_transient_failures(vendor: Vendor, mode: str, timeout_s: float, says: str) -> None:
    error = await failure(vendor, mode, timeout_s=timeout_s)
    assert error.transient is True and says in str(error)
    assert error.retry_after == (3.0 if mode == "429" else None)


@vendors
async def test_configured_as_the_stt_stage(vendor: Vendor) -> None:
    async with vendor.running() as (fake, _settings), aiohttp.ClientSession() as http:
        spec = PROVIDERS[vendor.name]
        config = Config.from_mapping({"provider": "local", "stt_provider": vendor.name},
                                     {spec.key_env or "": KEY, spec.base_url_env or "": fake.base_url})
        settings = config.providers.stt
        assert (settings.name, settings.model, settings.base_url) == (vendor.name, spec.default_models["stt"],
                                                                      fake.base_url)
        assert await build_stt(settings, http, timeout_s=5).transcribe(PCM, sample_rate=8000) == SAID
