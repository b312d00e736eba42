"""End to end with a remote TTS vendor: an emulated Twilio call against a real gateway whose STT and LLM are the
fake OpenAI server and whose TTS is the ElevenLabs or Deepgram fake; the caller hears the agent's audio
(16 kHz PCM from the vendor, resampled to the call's 8 kHz µ-law)."""

from __future__ import annotations

import json

import pytest

from gateway.simulate.call import SimulatedCall
from pipeline.audio import rms
from pipeline.conversation import Persona
from tests.conftest import ACCOUNT_SID, AUTH_TOKEN, PUBLIC_URL, phone_config, running_gateway
from tests.fakes._tts import TTSFake, expected_bytes
from tests.fakes.deepgram_server import FakeDeepgram
from tests.fakes.elevenlabs_server import FakeElevenLabs
from tests.fakes.openai_server import FakeOpenAI
from tests.fakes.twilio_rest import FakeTwilioREST
from tests.speech import speech_pcm

pytestmark = pytest.mark.asyncio

KEY = "tts-vendor-key-123"


def spoken(fake: TTSFake) -> list[str]:
    """The texts the vendor was asked to speak, in order."""
    return [json.loads(r["body"])["text"] for r in fake.state.requests]


@pytest.mark.parametrize("vendor", [FakeElevenLabs, FakeDeepgram], ids=["elevenlabs", "deepgram"])
async def test_the_caller_hears_the_vendors_speech(vendor: type[TTSFake]) -> None:
    speech = speech_pcm("I would like to book a table for two people tonight.", 8000)
    async with (FakeOpenAI(transcripts=["I would like to book a table for two"],
                           replies=["Sure. For what time?"]) as openai,
                vendor(api_key=KEY) as tts,
                FakeTwilioREST(ACCOUNT_SID, AUTH_TOKEN) as twilio):
        name = "elevenlabs" if vendor is FakeElevenLabs else "deepgram"
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
    apology, *texts = spoken(tts)                       # the apology is rendered once, at startup
    assert apology.startswith("I'm sorry") and texts == [Persona().greeting, "Sure.", "For what time?"]
    assert openai.state.calls["tts"] == 0 and openai.state.calls["llm"] == 1
    assert call.received.invalid == []
