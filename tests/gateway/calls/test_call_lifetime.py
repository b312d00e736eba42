"""Call lifetime limits over a real emulated Twilio call: silence prompt and hang-up, max duration,
and a goodbye that plays to its end before the hang-up."""

from __future__ import annotations

import pytest

from gateway.simulate.call import SimulatedCall
from tests.conftest import ACCOUNT_SID, AUTH_TOKEN, PUBLIC_URL, phone_config, running_gateway
from tests.fakes.openai_server import FakeOpenAI
from tests.fakes.twilio_rest import FakeTwilioREST

pytestmark = pytest.mark.asyncio

MS_PER_CHAR = 20


async def _call(url: str, twilio: FakeTwilioREST) -> SimulatedCall:
    call = SimulatedCall(gateway=url, public_url=PUBLIC_URL, auth_token=AUTH_TOKEN, account_sid=ACCOUNT_SID)
    twilio.known_calls = twilio.known_calls | {call.call_sid}
    await call.dial()
    await call.connect()
    return call


async def test_silence_prompts_then_says_goodbye_and_hangs_up() -> None:
    async with (FakeOpenAI(tts_ms_per_char=MS_PER_CHAR) as fake, FakeTwilioREST(ACCOUNT_SID, AUTH_TOKEN) as twilio):
        config = phone_config(fake.base_url, twilio.base_url, silence_prompt_secs=1.0, silence_hangup_secs=1.0,
                              goodbye_text="Goodbye for now.")
        async with running_gateway(config) as url:
            call = await _call(url, twilio)
            await call.wait_closed(timeout=20)
            said = [r["input"] for r in fake.state.tts_requests[1:]]   # [0]: the apology rendered at startup
            assert said[1:] == ["Are you still there?", "Goodbye for now."]
            assert twilio.ended_calls == [call.call_sid]
            # every sample of the goodbye reached the caller before the hang-up
            goodbye_samples = 8000 * len("Goodbye for now.") * MS_PER_CHAR // 1000
            assert sum(n for _, n in call.received.media) >= goodbye_samples
            await call.close()


async def test_caller_speech_resets_the_silence_timer() -> None:
    from gateway.simulate.call import synthetic_voice

    async with (FakeOpenAI(transcripts=["hello"], replies=["Hi."], tts_ms_per_char=MS_PER_CHAR) as fake,
                FakeTwilioREST(ACCOUNT_SID, AUTH_TOKEN) as twilio):
        config = phone_config(fake.base_url, twilio.base_url, silence_prompt_secs=1.5, silence_hangup_secs=5)
        async with running_gateway(config) as url:
            call = await _call(url, twilio)
            await call.wait_quiet(300, timeout=10)
            for _ in range(3):          # keep talking: never 1.5 s of silence on both sides
                end = await call.speak(synthetic_voice(0.6))
                await call.wait_audio(after=end, timeout=5)
                await call.wait_quiet(300, timeout=10)
            assert "Are you still there?" not in [r["input"] for r in fake.state.tts_requests]
            await call.hang_up()


async def test_max_call_duration_says_goodbye_before_hanging_up() -> None:
    async with (FakeOpenAI(tts_ms_per_char=MS_PER_CHAR) as fake, FakeTwilioREST(ACCOUNT_SID, AUTH_TOKEN) as twilio):
        config = phone_config(fake.base_url, twilio.base_url, max_call_secs=1.5, goodbye_text="Time is up, goodbye.")
        async with running_gateway(config) as url:
            call = await _call(url, twilio)
            await call.wait_closed(timeout=15)
            assert fake.state.tts_requests[-1]["input"] == "Time is up, goodbye."
            assert twilio.ended_calls == [call.call_sid]
            spoken = "Hello! How can I help you today?" + "Time is up, goodbye."   # greeting + goodbye
            assert sum(n for _, n in call.received.media) >= 8000 * len(spoken) * MS_PER_CHAR // 1000
            await call.close()
