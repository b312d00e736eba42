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
from pipeline.providers.cartesia import CartesiaTTS
from pipeline.providers.deepgram import DeepgramTTS
from pipeline.providers.elevenlabs import ElevenLabsTTS
from pipeline.providers.sarvam import SarvamTTS
from pipeline.providers.xtts import XTTSTTS
from tests.fakes._tts import TTSFake, expected_bytes
from tests.fakes.cartesia_server import FakeCartesia
from tests.fakes.deepgram_server import FakeDeepgram
from tests.fakes.elevenlabs_server import FakeElevenLabs
from tests.fakes.sarvam_server import FakeSarvam
from tests.fakes.xtts_server import SPEAKERS, FakeXTTS

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
    model: str | None                            # another model it has (None: the model is not sent)
    rate: int = 16000                            # the PCM rate it answers with by default
    refused: int = 401                           # its status for a refused key
    streams: bool = True                         # False: the audio comes whole, so a cut stream yields none

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


def _json_sent(voice: Callable[[dict[str, Any]], str], model: str | None) -> Callable[[dict[str, Any]], dict[str, str]]:
    """A vendor whose request is one JSON body: ``voice(body)`` and ``body[model]``."""
    def sent(request: dict[str, Any]) -> dict[str, str]:
        body = json.loads(request["body"])
        return {"voice": voice(body), "model": body[model] if model else ""}
    return sent


VENDORS = {v.name: v for v in (
    Vendor("elevenlabs", ElevenLabsTTS, FakeElevenLabs, "21m00Tcm4TlvDq8ikWAM", _elevenlabs_sent, "eleven_flash_v2_5"),
    Vendor("deepgram", DeepgramTTS, FakeDeepgram, "aura-2-thalia-en", _deepgram_sent, "aura-luna-en"),
    Vendor("cartesia", CartesiaTTS, FakeCartesia, "694f9389-aac1-45b6-b726-9d9369183238",
           _json_sent(lambda body: body["voice"]["id"], "model_id"), "sonic-turbo"),
    Vendor("sarvam", SarvamTTS, FakeSarvam, "abhilash", _json_sent(lambda body: body["speaker"], "model"),
           "bulbul:v1", refused=403, streams=False),
    Vendor("xtts", XTTSTTS, lambda api_key: FakeXTTS(), "Ana Florence",
           _json_sent(lambda body: SPEAKERS[int(body["speaker_embedding"][0])], None), None, rate=24000),
)}
vendors = pytest.mark.parametrize("vendor", list(VENDORS.values()), ids=list(VENDORS))
keyed = pytest.mark.parametrize("vendor", [v for v in VENDORS.values() if PROVIDERS[v.name].key_env],
                                ids=[n for n in VENDORS if PROVIDERS[n].key_env])


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
        assert isinstance(tts, vendor.cls) and tts.sample_rate == vendor.rate
        chunks = await speak(tts)
    pcm = b"".join(chunks)
    assert (len(chunks) > 1 or not vendor.streams) and all(len(c) % 2 == 0 and c for c in chunks)
    assert len(pcm) == expected_bytes(TEXT, tts.sample_rate, fake.ms_per_char) and rms(pcm) > 0.1
    [request] = [r for r in fake.state.requests if r["body"]]
    assert vendor.sent(request)["voice"] == (settings.voice or {"deepgram": settings.model}.get(vendor.name, SPEAKERS[0]))


@vendors
async def test_the_voice_and_model_reach_the_request(vendor: Vendor) -> None:
    model = vendor.model or "xtts_v2"
    async with vendor.running() as (fake, settings), aiohttp.ClientSession() as http:
        tts = build_tts(dataclasses.replace(settings, model=model), http, timeout_s=5)
        assert await speak(tts, voice=vendor.voice)
        assert await speak(tts)
    with_voice, default = (vendor.sent(r) for r in fake.state.requests)
    assert with_voice["voice"] == vendor.voice
    if vendor.name == "deepgram":        # the voice is the model: without one, tts_model is sent
        assert default["model"] == model
    else:
        assert with_voice["model"] == default["model"] == (vendor.model or "")
        assert default["voice"] == (PROVIDERS[vendor.name].default_voice or SPEAKERS[0])


@keyed
async def test_a_refused_key_is_permanent_and_names_the_key_variable(vendor: Vendor) -> None:
    error, _ = await failure(vendor, "", key="wrong-key")
    assert error.transient is False and str(vendor.refused) in str(error)
    assert PROVIDERS[vendor.name].key_env in str(error)


@vendors
@pytest.mark.parametrize(("mode", "timeout_s", "says"), [("429", 5, "HTTP 429"), ("500", 5, "HTTP 500"),
                                                         ("cut", 5, "cut off"), ("hang", 0.3, "timed out")])
async def test_transient_failures(vendor: Vendor, mode: str, timeout_s: float, says: str) -> None:
    """A rate limit (with its retry delay), a server error, a stream cut mid-way (after some audio, in whole
    samples) and a hang past the timeout are all transient."""
    error, got = await failure(vendor, mode, timeout_s=timeout_s)
    assert error.transient is True and says in str(error)
    assert error.retry_after == (3.0 if mode == "429" else None)
    streamed = mode == "cut" and vendor.streams
    assert len(got) % 2 == 0 and (0 < len(got) < expected_bytes(TEXT, vendor.rate, 20) if streamed else not got)


@keyed
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


@keyed
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


@pytest.mark.parametrize("model", ["eleven_turbo_v2", "eleven_flash_v2_5", "eleven_multilingual_v2"])
async def test_elevenlabs_models_voice_settings_rate_and_language_from_provider_options(model: str) -> None:
    options = {"stability": 0.4, "similarity_boost": 0.8, "use_speaker_boost": True, "sample_rate": 8000,
               "language": "de"}
    async with FakeElevenLabs(api_key=KEY) as fake, aiohttp.ClientSession() as http:
        tts = build_tts(ProviderSettings("elevenlabs", model, KEY, fake.base_url, options=options), http, timeout_s=5)
        assert tts.sample_rate == 8000
        pcm = b"".join(await speak(tts))
    assert len(pcm) == expected_bytes(TEXT, 8000, fake.ms_per_char)
    [request] = fake.state.requests
    assert request["query"] == {"output_format": "pcm_8000"}
    assert json.loads(request["body"]) == {"text": TEXT, "model_id": model, "language_code": "de", "voice_settings": {
        "stability": 0.4, "similarity_boost": 0.8, "use_speaker_boost": True}}


async def test_the_persona_language_reaches_the_vendors_that_take_one() -> None:
    async with FakeSarvam(api_key=KEY) as sarvam, FakeCartesia(api_key=KEY) as cartesia, FakeXTTS() as xtts, \
            aiohttp.ClientSession() as http:
        for name, fake in (("sarvam", sarvam), ("cartesia", cartesia), ("xtts", xtts)):
            spec = PROVIDERS[name]
            tts = build_tts(ProviderSettings(name, spec.default_models["tts"], KEY, fake.base_url,
                                             voice=spec.default_voice), http, timeout_s=5)
            assert b"".join([c async for c in tts.synthesize(TEXT, language="hi")])
    assert json.loads(sarvam.state.requests[0]["body"])["target_language_code"] == "hi-IN"
    assert json.loads(cartesia.state.requests[0]["body"])["language"] == "hi"
    assert json.loads(xtts.state.requests[0]["body"])["language"] == "hi"
    assert xtts.speaker_lists == 1
