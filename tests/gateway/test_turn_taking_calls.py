"""Whole calls through a real gateway (the Twilio emulator, the fake OpenAI server, Piper speech as the
caller, the default energy VAD with Silero confirming barge-ins): "uh huh" over the agent leaves it
talking, a real interruption cuts it off with the context kept to what was heard, and a pause in the
middle of a phone number is not answered. (A noise burst: tests/gateway/test_silero_calls.py.)"""

from __future__ import annotations

import asyncio

import pytest

from gateway.simulate.call import SimulatedCall
from pipeline.audio import silence
from pipeline.settings import Persona
from tests.conftest import ACCOUNT_SID, AUTH_TOKEN, phone_config, running_gateway
from tests.fakes.openai_server import FakeOpenAI
from tests.fakes.twilio_rest import FakeTwilioREST
from tests.gateway.test_silero_calls import twilio_call
from tests.speech import speech_pcm

pytestmark = pytest.mark.asyncio

GREETING = Persona().greeting
MS_PER_CHAR = 60            # the fake TTS: the greeting lasts about 2 s


async def greeted(url: str, twilio: FakeTwilioREST) -> SimulatedCall:
    """A call whose greeting has started playing."""
    call = twilio_call(url, twilio)
    await call.dial()
    await call.connect()
    await call.wait_audio(after=0, timeout=5)
    return call


async def test_uh_huh_over_the_greeting_leaves_the_agent_talking() -> None:
    async with (FakeOpenAI(transcripts=["Uh-huh."], replies=["Reply."], tts_ms_per_char=MS_PER_CHAR) as fake,
                FakeTwilioREST(ACCOUNT_SID, AUTH_TOKEN) as twilio):
        async with running_gateway(phone_config(fake.base_url, twilio.base_url)) as url:
            call = await greeted(url, twilio)
            await asyncio.sleep(0.3)
            await call.speak(speech_pcm("uh huh", 8000) + silence(600, 8000))
            await call.wait_quiet(600)
            assert len(fake.state.stt_requests) == 1         # it was heard, and transcribed
            assert fake.state.llm_requests == []             # but it was no turn
            played = sum(n for _, n in call.received.media) / 8000
            assert played >= len(GREETING) * MS_PER_CHAR / 1000 - 0.05     # the whole greeting played
            await call.hang_up()


async def test_a_real_interruption_cuts_the_agent_off() -> None:
    words = "Wait, I need to talk about my bill."
    async with (FakeOpenAI(transcripts=[words], replies=["Sure."], tts_ms_per_char=MS_PER_CHAR) as fake,
                FakeTwilioREST(ACCOUNT_SID, AUTH_TOKEN) as twilio):
        async with running_gateway(phone_config(fake.base_url, twilio.base_url)) as url:
            call = await greeted(url, twilio)
            await asyncio.sleep(0.3)
            speaking = asyncio.create_task(call.speak(speech_pcm(words, 8000) + silence(600, 8000)))
            await call.wait_clear(timeout=3)
            await speaking
            async with asyncio.timeout(5):
                while not fake.state.llm_requests:
                    await asyncio.sleep(0.02)
            messages = fake.state.llm_requests[0]["messages"]
            assert messages[-1] == {"role": "user", "content": words}
            heard = messages[-2]
            assert heard["role"] == "assistant" and GREETING.startswith(heard["content"])
            assert len(heard["content"]) < len(GREETING)      # cut to what the caller heard
            await call.hang_up()


async def test_a_pause_inside_a_phone_number_is_not_answered() -> None:
    first, whole = "My phone number is five five five", "My phone number is five five five one two three four"
    async with (FakeOpenAI(transcripts=[first, whole], replies=["Thanks."], tts_ms_per_char=15) as fake,
                FakeTwilioREST(ACCOUNT_SID, AUTH_TOKEN) as twilio):
        async with running_gateway(phone_config(fake.base_url, twilio.base_url)) as url:
            call = await greeted(url, twilio)
            await call.wait_quiet(400)
            paused_at = await call.speak(speech_pcm("My phone number is five five five.", 8000))
            resumed_at = await call.speak(silence(1200, 8000))
            await call.speak(speech_pcm("one two three four.", 8000) + silence(600, 8000))
            assert len(fake.state.stt_requests) == 2          # the pause was judged on its words...
            assert not [t for t, _ in call.received.media if paused_at < t < resumed_at]   # ...and not answered
            async with asyncio.timeout(5):
                while not fake.state.llm_requests:
                    await asyncio.sleep(0.02)
            [request] = fake.state.llm_requests
            assert request["messages"][-1] == {"role": "user", "content": whole}
            await call.hang_up()
