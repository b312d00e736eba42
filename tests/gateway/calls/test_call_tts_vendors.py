"""End to end with a remote speech vendor: an emulated Twilio call against a real gateway whose LLM is the fake
OpenAI server and whose TTS (or STT) is a vendor's fake; the caller hears the agent's audio (the vendor's PCM,
resampled to the call's 8 kHz µ-law) and the vendor's transcript reaches the LLM."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from gateway.simulate.call import SimulatedCall
from pipeline.audio import rms
from pipeline.conversation import Persona
from tests.conftest import ACCOUNT_SID, AUTH_TOKEN, PUBLIC_URL, carry_a_call, phone_config, running_gateway
from tests.fakes._tts import TTSFake, expected_bytes
from tests.fakes.cartesia_server import FakeCartesia
from tests.fakes.deepgram_server import FakeDeepgram
from tests.fakes.elevenlabs_server import FakeElevenLabs
from tests.fakes.openai_server import FakeOpenAI
from tests.fakes.sarvam_server import FakeSarvam
from tests.fakes.twilio_rest import FakeTwilioREST
from tests.fakes.xtts_server import FakeXTTS
from tests.speech import speech_pcm

pytestmark = pytest.mark.asyncio

KEY = "tts-vendor-key-123"


TTS_VENDORS: dict[str, Callable[..., TTSFake]] = {
    "elevenlabs": FakeElevenLabs, "deepgram": FakeDeepgram, "cartesia": FakeCartesia, "sarvam": FakeSarvam,
    "xtts": lambda api_key: FakeXTTS()}


@pytest.mark.parametrize("name", list(TTS_VENDORS))
async def test_the_caller_hears_the_vendors_speech(name: str) -> None:
    speech = speech_pcm("I would like to book a table for two people tonight.", 8000)
    async with (FakeOpenAI(transcripts=["I would like to book a table for two"],
                           replies=["Sure. For what time?"]) as openai,
                TTS_VENDORS[name](api_key=KEY) as tts,
                FakeTwilioREST(ACCOUNT_SID, AUTH_TOKEN) as twilio):
        config = phone_config(openai.base_url, twilio.base_url, tts_provider=name,
                              api_keys={"openai": "sk-test", name: KEY},
                              base_urls={"openai": openai.base_url, name: tts.base_url})
        async with running_gateway(config) as url:
            call = SimulatedCall(gateway=url, public_url=PUBLIC_URL, auth_token=AUTH_TOKEN, account_sid=ACCOUNT_SID)
            twilio.known_calls = twilio.known_calls | {call.call_sid}
            await call.dial()
            await call.connect()

            await call.wait_audio(after=0, timeout=5)            # the greeting, spoken by the vendor
            await call.wait_quiet(400)
            greeting = call.pcm_received()
            assert rms(greeting) > 0.05

            end = await call.speak(speech)
            await call.wait_audio(after=end, timeout=5)
            await call.wait_quiet(400)
            answer = call.pcm_received()[len(greeting):]
            # the caller hears all of both clauses, resampled to the call's 8 kHz
            heard = sum(expected_bytes(text, 8000, tts.ms_per_char) for text in ("Sure.", "For what time?"))
            assert len(answer) >= 0.95 * heard and rms(answer) > 0.05
            await call.hang_up()
    apology, *texts = tts.spoken                        # the apology is rendered once, at startup
    assert apology.startswith("I'm sorry") and texts == [Persona().greeting, "Sure.", "For what time?"]
    assert openai.state.calls["tts"] == 0 and openai.state.calls["llm"] == 1
    assert call.received.invalid == []


@pytest.mark.parametrize("name", ["elevenlabs", "sarvam"])
async def test_the_vendors_transcript_is_answered(name: str) -> None:
    """Caller audio -> the vendor's STT (a WAV upload) -> the LLM gets its transcript -> the answer is heard."""
    fakes: dict[str, Any] = {"elevenlabs": FakeElevenLabs, "sarvam": FakeSarvam}
    async with (FakeOpenAI(replies=["Sure. For what time?"]) as openai,
                fakes[name](api_key=KEY, transcripts=("a table for two tonight",)) as stt):
        await carry_a_call({"stt_provider": name, "api_keys": {"openai": "sk-test", name: KEY},
                            "base_urls": {"openai": openai.base_url, name: stt.base_url}}, {})
    [request] = stt.stt_requests
    assert request["sample_rate"] == 8000 and request["duration_ms"] > 1000   # the call's own rate, in the WAV
    [chat] = openai.state.llm_requests
    assert chat["messages"][-1] == {"role": "user", "content": "a table for two tonight"}
    assert openai.state.calls["stt"] == 0
