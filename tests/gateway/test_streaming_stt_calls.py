"""Whole Twilio calls through a real gateway with ``stt_provider: "deepgram"`` pointed at the fake ``/v1/listen``
socket (LLM and TTS: the fake OpenAI server): the caller's µ-law goes to Deepgram as µ-law at 8 kHz while
they speak and the streamed words are the turn; a stream cut mid-utterance with no fallback provider is
the chain's apology and the call's end."""

from __future__ import annotations

import pytest

from gateway.config import Config
from pipeline.audio import silence
from tests.conftest import ACCOUNT_SID, AUTH_TOKEN, greeted_call, phone_config, running_gateway
from tests.fakes.deepgram_server import FakeDeepgram
from tests.fakes.openai_server import FakeOpenAI
from tests.fakes.twilio_rest import FakeTwilioREST
from tests.speech import speech_pcm

pytestmark = pytest.mark.asyncio

KEY = "dg-secret-key-123456"
SAID = "I would like to book a table for two people tonight."
REPLY = "Sure. For what time?"


def deepgram_config(openai_url: str, twilio_url: str, deepgram_url: str) -> Config:
    return phone_config(openai_url, twilio_url, stt_provider="deepgram", api_keys={"openai": "sk-test", "deepgram": KEY},
                        base_urls={"openai": openai_url, "deepgram": deepgram_url})



async def test_a_twilio_call_streams_the_caller_to_deepgram_and_answers() -> None:
    async with (FakeOpenAI(transcripts=["not used"], replies=[REPLY], tts_ms_per_char=15) as openai,
                FakeDeepgram(api_key=KEY, transcripts=[SAID]) as deepgram,
                FakeTwilioREST(ACCOUNT_SID, AUTH_TOKEN) as twilio):
        async with running_gateway(deepgram_config(openai.base_url, twilio.base_url, deepgram.base_url)) as url:
            call = await greeted_call(url, twilio)
            end = await call.speak(speech_pcm(SAID, 8000) + silence(600, 8000))
            await call.wait_audio(after=end - 0.6, timeout=5)
            assert openai.state.llm_requests[0]["messages"][-1] == {"role": "user", "content": SAID}
            assert openai.state.stt_requests == []            # no one-shot request: the words were streamed
            conn = deepgram.listen.connections[0]
            assert conn["headers"]["authorization"] == f"Token {KEY}"
            assert conn["query"]["model"] == "nova-3" and conn["query"]["encoding"] == "mulaw"
            assert conn["query"]["sample_rate"] == "8000" and conn["query"]["language"] == "en"
            assert conn["audio_ms"] >= len(speech_pcm(SAID, 8000)) / 2 / 8000 * 1000
            await call.hang_up()


async def test_a_stream_cut_mid_utterance_without_a_fallback_is_the_apology() -> None:
    async with (FakeOpenAI(transcripts=["not used"], replies=[REPLY], tts_ms_per_char=15) as openai,
                FakeDeepgram(api_key=KEY, transcripts=[SAID]) as deepgram,
                FakeTwilioREST(ACCOUNT_SID, AUTH_TOKEN) as twilio):
        config = deepgram_config(openai.base_url, twilio.base_url, deepgram.base_url)
        async with running_gateway(config) as url:
            call = await greeted_call(url, twilio)
            deepgram.state.fail = "cut"
            end = await call.speak(speech_pcm(SAID, 8000) + silence(600, 8000))
            await call.wait_audio(after=end - 0.6, timeout=5)
            await call.wait_closed(timeout=15)
        assert openai.state.llm_requests == []
        assert openai.state.tts_requests[-1]["input"] == config.apology_text
        assert twilio.ended_calls == [call.call_sid]
        assert deepgram.listen.connections and all(c["closed_by"] == "cut" for c in deepgram.listen.connections)
