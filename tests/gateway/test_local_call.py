"""The embedded default: with no keys, a phone call talks to the offline provider set
(pocketsphinx STT, the EchoLLM stand-in, piper TTS) and the caller hears a spoken answer."""

from __future__ import annotations

import pytest

from gateway.config import Config
from gateway.simulate import SimulatedCall
from pipeline.audio import Resampler
from pipeline.providers.local import PocketsphinxSTT
from tests.conftest import ACCOUNT_SID, AUTH_TOKEN, PUBLIC_URL, running_gateway
from tests.fakes.twilio_rest import FakeTwilioREST
from tests.speech import speech_pcm

pytestmark = pytest.mark.asyncio


async def test_offline_default_providers_answer_a_call() -> None:
    async with FakeTwilioREST(ACCOUNT_SID, AUTH_TOKEN) as twilio:
        config = Config.from_mapping({
            "public_url": PUBLIC_URL, "vad_stop_ms": 400,
            "carriers": {"twilio": {"account_sid": ACCOUNT_SID, "auth_token": AUTH_TOKEN,
                                    "api_base_url": twilio.base_url}}}, environ={})
        assert (config.providers.stt.name, config.providers.llm.name, config.providers.tts.name) == ("local",) * 3
        async with running_gateway(config) as url:
            call = SimulatedCall(gateway=url, public_url=PUBLIC_URL, auth_token=AUTH_TOKEN, account_sid=ACCOUNT_SID)
            twilio.known_calls = {call.call_sid}
            await call.dial()
            await call.connect()
            await call.wait_audio(after=0, timeout=10)
            await call.wait_quiet(600, timeout=20)
            greeting_bytes = len(call.received.audio)
            end = await call.speak(speech_pcm("Please check the status of my order.", 8000))
            await call.wait_audio(after=end, timeout=15)
            await call.wait_quiet(800, timeout=30)
            answer = bytes(call.received.audio[greeting_bytes:])
            await call.hang_up()
    assert len(answer) > 16000                # more than a second of speech came back (PCM16 at 8 kHz)
    # what the caller heard, transcribed again: the stand-in LLM repeats what it understood
    pcm16k = Resampler(8000, 16000).process(answer)
    heard = await PocketsphinxSTT().transcribe(pcm16k, sample_rate=16000)
    words = set(heard.split())
    assert {"said", "order"} & words, heard
