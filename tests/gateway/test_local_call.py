"""The embedded default: with no keys, a phone call talks to the offline provider set
(pocketsphinx STT, the EchoLLM stand-in, piper TTS) and the caller hears a spoken answer."""

from __future__ import annotations

import os
from typing import Any

import aiohttp
import pytest

from gateway.app import build_providers
from gateway.config import Config
from gateway.simulate.call import SimulatedCall
from pipeline.audio import Resampler
from pipeline.providers.local import PocketsphinxSTT
from tests.conftest import ACCOUNT_SID, AUTH_TOKEN, PUBLIC_URL, running_gateway
from tests.fakes.twilio_rest import FakeTwilioREST
from tests.speech import speech_pcm

pytestmark = pytest.mark.asyncio


async def test_offline_default_providers_answer_a_call(monkeypatch: pytest.MonkeyPatch) -> None:
    closed_pids: list[int] = []
    real_close = PocketsphinxSTT.close

    async def recording_close(self: PocketsphinxSTT) -> None:      # the app's lifespan stops the STT's workers
        closed_pids.extend(self._executor._processes if self._executor is not None else ())
        await real_close(self)

    monkeypatch.setattr(PocketsphinxSTT, "close", recording_close)
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
    assert closed_pids, "the lifespan did not close the pocketsphinx pool"
    for pid in closed_pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert len(answer) > 16000                # more than a second of speech came back (PCM16 at 8 kHz)
    # what the caller heard, transcribed again: the stand-in LLM repeats what it understood
    pcm16k = Resampler(8000, 16000).process(answer)
    stt = PocketsphinxSTT()
    try:
        heard = await stt.transcribe(pcm16k, sample_rate=16000)
    finally:
        await stt.close()
    words = set(heard.split())
    assert {"said", "order"} & words, heard


async def test_local_stt_pool_size_comes_from_config() -> None:
    config = Config.from_mapping({"local_stt_processes": 3, "local_stt_max_pending": 5}, environ={})
    async with aiohttp.ClientSession() as http:
        stt: Any = build_providers(config, http).stt[0]
    assert isinstance(stt, PocketsphinxSTT) and (stt._processes, stt._max_pending) == (3, 5)
    assert stt._executor is None        # no process until the first transcription
