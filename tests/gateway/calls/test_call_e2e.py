"""End to end: an emulated Twilio call (real WebSocket, real-time µ-law speech) against a real gateway
whose providers are the fake OpenAI server and whose hang-ups go to the fake Twilio REST API."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from gateway.simulate.call import SimulatedCall
from pipeline.audio import rms
from pipeline.conversation import ConversationSettings, Persona
from tests.conftest import ACCOUNT_SID, AUTH_TOKEN, PUBLIC_URL, phone_config, running_gateway
from tests.fakes.openai_server import FakeOpenAI
from tests.fakes.twilio_rest import FakeTwilioREST
from tests.speech import speech_pcm

pytestmark = pytest.mark.asyncio

APOLOGY = ConversationSettings().apology_text
LONG_REPLY = ("Let me tell you about tonight's menu. We have fresh pasta with basil. We have a wood fired pizza. "
              "We have a green salad with lemon. We have grilled fish with herbs. We have a chocolate cake. "
              "We also have a very long list of wines from the valley.")


def new_call(url: str, twilio: FakeTwilioREST, **kw: str) -> SimulatedCall:
    call = SimulatedCall(gateway=url, public_url=PUBLIC_URL, auth_token=AUTH_TOKEN, account_sid=ACCOUNT_SID, **kw)
    twilio.known_calls = twilio.known_calls | {call.call_sid}
    return call


async def test_call_greets_answers_is_interrupted_and_stops_cleanly() -> None:
    speech = speech_pcm("I would like to book a table for two people tonight.", 8000)
    async with (FakeOpenAI(transcripts=["I would like to book a table for two", "what is on the menu",
                                        "stop please"],
                           replies=["Sure. For what time?", LONG_REPLY, "Okay."], tts_ms_per_char=30) as fake,
                FakeTwilioREST(ACCOUNT_SID, AUTH_TOKEN) as twilio):
        async with running_gateway(phone_config(fake.base_url, twilio.base_url)) as url:
            call = new_call(url, twilio)
            answer = await call.dial()
            assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/xml")
            assert call.media_url.endswith(f"/media/twilio/{call.session_id}") and len(call.session_id) >= 32
            await call.connect()

            # 1. the greeting plays
            await call.wait_audio(after=0, timeout=5)
            await call.wait_quiet(400)
            # request 0 is the apology rendered once at startup
            assert [r["input"] for r in fake.state.tts_requests[:2]] == [APOLOGY, Persona().greeting]
            assert rms(call.pcm_received()) > 0.05

            # 2. the caller speaks, the agent answers
            end = await call.speak(speech)
            first = await call.wait_audio(after=end, timeout=5)
            assert first - end < 2.0
            [stt] = fake.state.stt_requests
            assert stt["sample_rate"] == 8000 and stt["duration_ms"] >= len(speech) / 16   # the call's own 8 kHz
            assert fake.state.llm_requests[0]["messages"][-1] == {"role": "user",
                                                                  "content": "I would like to book a table for two"}
            await call.wait_quiet(400)
            assert [r["input"] for r in fake.state.tts_requests[2:]] == ["Sure.", "For what time?"]
            marks = [name for _, name in call.received.marks]
            assert "r2-c0" in marks and "r2-c1" in marks

            # 3. the caller asks again, and barges in while the long answer plays
            end = await call.speak(speech)
            await call.wait_audio(after=end, timeout=5)
            while len(fake.state.tts_requests) < 6:
                await asyncio.sleep(0.05)
            await asyncio.sleep(1.2)                      # some of the answer has been heard
            assert call.playing()
            barge_at = time.monotonic()
            barge = asyncio.create_task(call.speak(speech))
            cleared = await call.wait_clear(timeout=3)
            assert cleared - barge_at < 1.0
            end = await barge
            await call.wait_audio(after=end, timeout=5)
            await call.wait_quiet(400)

            # the model's next context holds only what the caller heard of the long answer
            history = fake.state.llm_requests[-1]["messages"]
            assistant = [m["content"] for m in history if m["role"] == "assistant"]
            heard = assistant[-1]
            assert heard and len(heard) < len(LONG_REPLY) and LONG_REPLY.startswith(heard)
            assert history[-1] == {"role": "user", "content": "stop please"}

            # 4. the caller hangs up: the socket closes, the session is gone, no REST hang-up is needed
            await call.hang_up()
            assert call.close_code == 1000
            async with httpx.AsyncClient() as http:
                gone = await http.get(f"{url}/sessions/{call.session_id}")
                metrics = (await http.get(f"{url}/metrics")).text
            assert gone.status_code == 404
            assert 'voxray_calls_ended_total{carrier="twilio",reason="caller_hangup"} 1.0' in metrics
            assert 'voxray_barge_ins_total{carrier="twilio"} 1.0' in metrics
            assert twilio.ended_calls == []
            assert call.received.invalid == []


async def test_llm_error_gives_apology_and_hang_up() -> None:
    speech = speech_pcm("What are your opening hours?", 8000)
    async with (FakeOpenAI(transcripts=["what are your opening hours"], tts_ms_per_char=20) as fake,
                FakeTwilioREST(ACCOUNT_SID, AUTH_TOKEN) as twilio):
        async with running_gateway(phone_config(fake.base_url, twilio.base_url)) as url:
            call = new_call(url, twilio)
            await call.dial()
            await call.connect()
            await call.wait_quiet(300, timeout=10)
            fake.state.fail["llm"] = "500"
            end = await call.speak(speech)
            await call.wait_audio(after=end, timeout=5)
            await call.wait_closed(timeout=15)
            assert fake.state.calls["llm"] == 2                      # one retry of a transient 500
            assert fake.state.tts_requests[-1]["input"].startswith("I'm sorry")
            assert twilio.ended_calls == [call.call_sid]              # hung up through the REST API
            assert call.close_code == 1000
            await call.close()


async def test_llm_hang_times_out_with_apology_and_other_calls_unaffected() -> None:
    speech = speech_pcm("Can you help me?", 8000)
    async with (FakeOpenAI(transcripts=["can you help me"], replies=["Of course."], tts_ms_per_char=20) as fake,
                FakeTwilioREST(ACCOUNT_SID, AUTH_TOKEN) as twilio):
        config = phone_config(fake.base_url, twilio.base_url, llm_timeout_secs=0.5, provider_retries=0)
        async with running_gateway(config) as url:
            stuck, healthy = new_call(url, twilio), new_call(url, twilio)
            for c in (stuck, healthy):
                await c.dial()
                await c.connect()
            await asyncio.gather(stuck.wait_quiet(300, timeout=10), healthy.wait_quiet(300, timeout=10))
            fake.state.fail_once["llm"] = "hang"
            end = await stuck.speak(speech)
            await stuck.wait_closed(timeout=10)
            assert stuck.received.media[-1][0] > end + 0.5            # the apology played after the timeout
            assert twilio.ended_calls == [stuck.call_sid]

            end = await healthy.speak(speech)
            await healthy.wait_audio(after=end, timeout=5)
            await healthy.wait_quiet(300)
            assert fake.state.tts_requests[-1]["input"] == "Of course."
            assert not healthy._closed.is_set()
            await healthy.hang_up()
            await stuck.close()


async def test_tts_outage_plays_the_prerendered_apology() -> None:
    speech = speech_pcm("Hello there.", 8000)
    async with (FakeOpenAI(transcripts=["hello there"], tts_ms_per_char=20) as fake,
                FakeTwilioREST(ACCOUNT_SID, AUTH_TOKEN) as twilio):
        config = phone_config(fake.base_url, twilio.base_url, tts_timeout_secs=0.5, provider_retries=0)
        async with running_gateway(config) as url:
            call = new_call(url, twilio)
            await call.dial()
            await call.connect()
            await call.wait_quiet(300, timeout=10)
            fake.state.fail["tts"] = "hang"
            end = await call.speak(speech)
            await call.wait_closed(timeout=10)
            after = [n for t, n in call.received.media if t > end]
            assert sum(after) >= 8000 * 0.5                            # at least half a second of apology audio
            assert twilio.ended_calls == [call.call_sid]
            await call.close()
