"""Whole calls with ``vad_type: "silero"`` through a real gateway (providers: the fake OpenAI server): a
Twilio leg at 8 kHz, where a noise burst is not a turn but Piper speech is, and a ``/ws`` leg at 16 kHz."""

from __future__ import annotations

import asyncio
import json
import time

import numpy as np
import pytest
import websockets

from gateway.simulate.call import SimulatedCall
from pipeline.audio import silence
from tests.conftest import ACCOUNT_SID, AUTH_TOKEN, PUBLIC_URL, phone_config, running_gateway
from tests.fakes.openai_server import FakeOpenAI
from tests.fakes.twilio_rest import FakeTwilioREST
from tests.gateway.browser.test_ws import Client, ws_url
from tests.speech import speech_pcm

pytestmark = pytest.mark.asyncio

TRANSCRIPT = "I would like to book a table for two"
REPLY = "Sure. For what time?"
SENTENCE = "I would like to book a table for two people tonight."


def noise_burst(rate: int, ms: int = 250, dbfs: float = -20.0) -> bytes:
    x = np.random.default_rng(3).standard_normal(rate * ms // 1000) * 10 ** (dbfs / 20) * 32768
    return np.clip(x, -32768, 32767).astype("<i2").tobytes()


def twilio_call(url: str, twilio: FakeTwilioREST) -> SimulatedCall:
    call = SimulatedCall(gateway=url, public_url=PUBLIC_URL, auth_token=AUTH_TOKEN, account_sid=ACCOUNT_SID)
    twilio.known_calls = twilio.known_calls | {call.call_sid}
    return call


@pytest.mark.parametrize(("vad_type", "strategy", "barges_in"),
                         [("silero", "speech", False), ("energy", "speech", False), ("energy", "immediate", True)])
async def test_a_noise_burst_interrupts_the_greeting_only_without_speech_evidence(vad_type: str, strategy: str,
                                                                                  barges_in: bool) -> None:
    """-20 dBFS of white noise for 250 ms while the greeting plays: nothing with the Silero VAD, nor with the
    energy VAD when Silero must confirm a barge-in (the greeting plays to its end, the noise is no turn);
    a barge-in and an STT request with ``interruption_strategy: "immediate"`` (the old behaviour)."""
    async with (FakeOpenAI(transcripts=[TRANSCRIPT], replies=[REPLY], tts_ms_per_char=60) as fake,
                FakeTwilioREST(ACCOUNT_SID, AUTH_TOKEN) as twilio):
        config = phone_config(fake.base_url, twilio.base_url, vad_type=vad_type, interruption_strategy=strategy)
        async with running_gateway(config) as url:
            call = twilio_call(url, twilio)
            await call.dial()
            await call.connect()
            await call.wait_audio(after=0, timeout=5)
            await call.speak(noise_burst(8000) + silence(800, 8000))
            assert bool(call.received.clears) is barges_in
            assert bool(fake.state.stt_requests) is barges_in
            await call.hang_up()


async def test_twilio_call_at_8k_answers_the_caller() -> None:
    async with (FakeOpenAI(transcripts=[TRANSCRIPT], replies=[REPLY], tts_ms_per_char=15) as fake,
                FakeTwilioREST(ACCOUNT_SID, AUTH_TOKEN) as twilio):
        async with running_gateway(phone_config(fake.base_url, twilio.base_url, vad_type="silero")) as url:
            call = twilio_call(url, twilio)
            await call.dial()
            await call.connect()
            await call.wait_audio(after=0, timeout=5)
            await call.wait_quiet(400)
            end = await call.speak(speech_pcm(SENTENCE, 8000))
            first = await call.wait_audio(after=end, timeout=5)
            assert first - end < 2.0
            [stt] = fake.state.stt_requests
            assert stt["sample_rate"] == 8000 and stt["duration_ms"] >= 2000     # the call's own rate
            assert fake.state.llm_requests[0]["messages"][-1] == {"role": "user", "content": TRANSCRIPT}
            await call.hang_up()


async def test_ws_call_at_16k_answers_the_caller() -> None:
    async with FakeOpenAI(transcripts=[TRANSCRIPT], replies=[REPLY], tts_ms_per_char=15) as fake:
        config = phone_config(fake.base_url, "http://127.0.0.1:9", vad_type="silero")
        async with running_gateway(config) as url:
            ws = await websockets.connect(ws_url(url))
            await ws.send(json.dumps({"type": "start", "sample_rate": 16000}))
            client = Client(ws, 16000)
            await client.event("ready")
            await client.audio_after(0)
            await client.quiet(400)

            pcm = speech_pcm(SENTENCE, 16000) + silence(1200, 16000)
            started, spoken_until = time.monotonic(), len(speech_pcm(SENTENCE, 16000)) / 2 / 16000
            for i, offset in enumerate(range(0, len(pcm), 640)):     # 20 ms frames in real time
                await ws.send(pcm[offset:offset + 640])
                await asyncio.sleep(max(0.0, started + (i + 1) * 0.02 - time.monotonic()))
            end = started + spoken_until
            user = await client.event("transcript", role="user", after=end - 1.0)
            assert user["text"] == TRANSCRIPT
            await client.event("transcript", role="assistant", text=REPLY, after=end - 1.0)
            await client.audio_after(end)
            [stt] = fake.state.stt_requests
            assert stt["sample_rate"] == 16000 and stt["duration_ms"] >= 2000
            await ws.close()
