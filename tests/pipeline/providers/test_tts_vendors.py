"""Every remote TTS vendor against a fake speaking its wire protocol (real HTTP on 127.0.0.1): streamed PCM
at the declared rate in whole samples, the voice and model in the request, a refused key, a rate limit with
retry-after, a server error, a stream cut mid-way, a hang past the timeout; and each one configured through
Config (key variable, base URL, default model and voice)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest

from gateway.config import Config, ConfigError
from pipeline.audio import rms
from pipeline.providers import PROVIDERS, ProviderSettings, build_tts
from pipeline.providers.base import ProviderError, TTSProvider
from pipeline.providers.deepgram import DeepgramTTS
from pipeline.providers.elevenlabs import ElevenLabsTTS
from tests.fakes._tts import TTSFake, expected_bytes
from tests.fakes.deepgram_server import FakeDeepgram
from tests.fakes.elevenlabs_server import FakeElevenLabs

pytestmark = pytest.mark.asyncio

KEY = "vendor-secret-key-123"
TEXT = "Hello there, how can I help you today?"


@dataclass(frozen=True)
class Vendor:
    """How to run one vendor's fake and read what reached it."""

    name: str
    cls: type
    fake: Callable[..., TTSFake]
    voice: str                                   # a voice the vendor knows, other than the default
    sent: Callable[[dict[str, Any]], dict[str, str]]   # request -> {"voice", "model"} as the vendor received them

    @contextlib.asynccontextmanager
    async def running(self, key: str = KEY, voice: str | None = None) -> AsyncIterator[tuple[TTSFake, ProviderSettings]]:
        spec = PROVIDERS[self.name]
        async with self.fake(api_key=KEY) as fake:
            yield fake, ProviderSettings(self.name, spec.default_models["tts"], key, fake.base_url,
                                         voice=voice or spec.default_voice, key_env=spec.key_env)


def _elevenlabs_sent(request: dict[str, Any]) -> dict[str, str]:
    return {"voice": request["path"].split("/")[3], "model": json.loads(request["body"])["model_id"]}


def _deepgram_sent(request: dict[str, Any]) -> dict[str, str]:
    return {"voice": request["query"]["model"], "model": request["query"]["model"]}


VENDORS = {v.name: v for v in (
    Vendor("elevenlabs", ElevenLabsTTS, FakeElevenLabs, "21m00Tcm4TlvDq8ikWAM", _elevenlabs_sent),
    Vendor("deepgram", DeepgramTTS, FakeDeepgram, "aura-2-thalia-en", _deepgram_sent),
)}
vendors = pytest.mark.parametrize("vendor", list(VENDORS.values()), ids=list(VENDORS))


async def failure(vendor: Vendor, mode: str, *, key: str = KEY, timeout_s: float = 5) -> tuple[ProviderError, bytes]:
    """The error ``mode`` causes, and the audio streamed before it."""
    got = b""
    async with vendor.running(key=key) as (fake, settings), aiohttp.ClientSession() as http:
        fake.state.fail = mode or None
        with pytest.raises(ProviderError) as err:
            async for chunk in build_tts(settings, http, timeout_s=timeout_s).synthesize(TEXT):
                got += chunk
    assert KEY not in str(err.value) and "wrong-key" not in str(err.value)
    return err.value, got


async def speak(tts: TTSProvider, voice: str | None = None) -> list[bytes]:
    return [chunk async for chunk in tts.synthesize(TEXT, voice=voice)]


@vendors
async def test_streams_pcm_at_the_declared_rate_in_whole_samples(vendor: Vendor) -> None:
    async with vendor.running() as (fake, settings), aiohttp.ClientSession() as http:
        tts = build_tts(settings, http, timeout_s=5)
        assert isinstance(tts, vendor.cls) and tts.sample_rate == 16000
        chunks = await speak(tts)
    pcm = b"".join(chunks)
    assert len(chunks) > 3 and all(len(c) % 2 == 0 and c for c in chunks)
    assert len(pcm) == expected_bytes(TEXT, tts.sample_rate, fake.ms_per_char) and rms(pcm) > 0.1
    [request] = fake.state.requests
    assert vendor.sent(request)["voice"] == (settings.voice or settings.model)


@vendors
async def test_the_voice_and_model_reach_the_request(vendor: Vendor) -> None:
    model = {"elevenlabs": "eleven_flash_v2_5", "deepgram": "aura-luna-en"}[vendor.name]
    async with vendor.running() as (fake, settings), aiohttp.ClientSession() as http:
        tts = build_tts(dataclasses.replace(settings, model=model), http, timeout_s=5)
        assert await speak(tts, voice=vendor.voice)
        assert await speak(tts)
    with_voice, default = (vendor.sent(r) for r in fake.state.requests)
    assert with_voice["voice"] == vendor.voice
    if vendor.name == "deepgram":        # the voice is the model: without one, tts_model is sent
        assert default["model"] == model
    else:
        assert with_voice["model"] == default["model"] == model
        assert default["voice"] == PROVIDERS[vendor.name].default_voice


@vendors
async def test_a_refused_key_is_permanent_and_names_the_key_variable(vendor: Vendor) -> None:
    error, _ = await failure(vendor, "", key="wrong-key")
    assert error.transient is False and "401" in str(error) and PROVIDERS[vendor.name].key_env in str(error)


@vendors
@pytest.mark.parametrize(("mode", "timeout_s", "says"), [("429", 5, "HTTP 429"), ("500", 5, "HTTP 500"),
                                                         ("cut", 5, "cut off"), ("hang", 0.3, "timed out")])
async def test_transient_failures(vendor: Vendor, mode: str, timeout_s: float, says: str) -> None:
    """A rate limit (with its retry delay), a server error, a stream cut mid-way (after some audio, in whole
    samples) and a hang past the timeout are all transient."""
    error, got = await failure(vendor, mode, timeout_s=timeout_s)
    assert error.transient is True and says in str(error)
    assert error.retry_after == (3.0 if mode == "429" else None)
    assert len(got) % 2 == 0 and (0 < len(got) < expected_bytes(TEXT, 16000, 20) if mode == "cut" else not got)


@vendors
async def test_configured_through_config_with_its_key_and_base_url(vendor: Vendor) -> None:
    spec = PROVIDERS[vendor.name]
    async with vendor.running() as (fake, _settings), aiohttp.ClientSession() as http:
        config = Config.from_mapping({"provider": "local", "tts_provider": vendor.name, "api_keys": {vendor.name: KEY},
                                      "base_urls": {vendor.name: fake.base_url}})
        settings = config.providers.tts
        assert (settings.name, settings.model, settings.voice, settings.api_key, settings.base_url) == \
            (vendor.name, spec.default_models["tts"], spec.default_voice, KEY, fake.base_url)
        assert b"".join(await speak(build_tts(settings, http, timeout_s=5)))
        from_env = Config.from_mapping({"provider": "local", "tts_provider": vendor.name, "tts_voice": vendor.voice},
                                       {spec.key_env: KEY, spec.base_url_env: fake.base_url}).providers.tts
        assert (from_env.api_key, from_env.base_url, from_env.voice) == (KEY, fake.base_url, vendor.voice)
        assert b"".join(await speak(build_tts(from_env, http, timeout_s=5)))
    assert vendor.sent(fake.state.requests[-1])["voice"] == vendor.voice


@vendors
async def test_without_a_key_the_configuration_names_the_variable(vendor: Vendor) -> None:
    with pytest.raises(ConfigError, match=PROVIDERS[vendor.name].key_env or "?"):
        Config.from_mapping({"provider": "local", "tts_provider": vendor.name}, {})


# ------------------------------------------------------------------------------------- vendor details

async def test_elevenlabs_request_shape_and_error_text() -> None:
    async with FakeElevenLabs(api_key=KEY) as fake, aiohttp.ClientSession() as http:
        tts = ElevenLabsTTS(ProviderSettings("elevenlabs", "eleven_turbo_v2", KEY, fake.base_url), http, timeout_s=5)
        assert await speak(tts)
        fake.state.fail = "429"
        with pytest.raises(ProviderError) as err:
            await speak(tts, voice="21m00Tcm4TlvDq8ikWAM")
    request = fake.state.requests[0]
    assert request["path"] == "/v1/text-to-speech/JBFqnCBsd6RMkjVDRZzb/stream"
    assert request["query"] == {"output_format": "pcm_16000"}
    assert request["headers"]["xi-api-key"] == KEY and "authorization" not in request["headers"]
    assert json.loads(request["body"]) == {"text": TEXT, "model_id": "eleven_turbo_v2"}
    assert "too_many_concurrent_requests" in str(err.value) and "{" not in str(err.value)


async def test_elevenlabs_an_unknown_voice_is_a_permanent_error() -> None:
    async with FakeElevenLabs(api_key=KEY) as fake, aiohttp.ClientSession() as http:
        tts = ElevenLabsTTS(ProviderSettings("elevenlabs", "eleven_turbo_v2", KEY, fake.base_url), http, timeout_s=5)
        with pytest.raises(ProviderError) as err:
            await speak(tts, voice="nova")
    assert err.value.transient is False and "voice_not_found" in str(err.value)


async def test_deepgram_request_shape_and_error_text() -> None:
    async with FakeDeepgram(api_key=KEY) as fake, aiohttp.ClientSession() as http:
        tts = DeepgramTTS(ProviderSettings("deepgram", "aura-asteria-en", "wrong-key", fake.base_url,
                                           key_env="DEEPGRAM_API_KEY"), http, timeout_s=5)
        with pytest.raises(ProviderError) as err:
            await speak(tts)
    [request] = fake.state.requests
    assert request["path"] == "/v1/speak" and request["headers"]["authorization"] == "Token wrong-key"
    assert request["query"] == {"model": "aura-asteria-en", "encoding": "linear16", "sample_rate": "16000",
                                "container": "none"}
    assert "Invalid credentials. (INVALID_AUTH)" in str(err.value) and "DEEPGRAM_API_KEY" in str(err.value)
    assert "wrong-key" not in str(err.value)
