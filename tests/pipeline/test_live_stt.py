"""Streaming speech to text in the turn logic (pipeline.live_stt through pipeline.turns): the TurnTaker fed
a caller's 8 kHz frames, the chain's first STT the real Deepgram client against the fake ``/v1/listen``
socket, the one-shot fallback the real OpenAI client against the fake OpenAI server."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import aiohttp
import pytest

from pipeline.audio import silence
from pipeline.frames import AudioFrame
from pipeline.provider_chain import ProviderCalls, ProviderChain
from pipeline.providers import ProviderSettings, build_stt
from pipeline.providers.base import STTProvider
from pipeline.settings import ConversationSettings, Persona
from pipeline.turns import Turn, TurnTaker
from tests.fakes.deepgram_server import FakeDeepgram
from tests.fakes.openai_server import FakeOpenAI
from tests.speech import speech_pcm

pytestmark = pytest.mark.asyncio

KEY = "dg-secret-key-123456"
SAID = "I would like to book a table for two people tonight."
RATE = 8000
SETTINGS = ConversationSettings(vad_stop_ms=200, turn_stop_secs=1.0, stt_timeout_secs=2, provider_retries=1,
                                stt_stream_final_wait_ms=1000)


def frames(pcm: bytes, rate: int) -> list[bytes]:
    step = rate // 50 * 2
    return [pcm[i:i + step] for i in range(0, len(pcm), step)]


@dataclasses.dataclass
class Heard:
    turns: list[Turn] = dataclasses.field(default_factory=list)
    failures: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    interims: list[str] = dataclasses.field(default_factory=list)


async def until(condition: Callable[[], Any], timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)


async def a_turn(stts: Sequence[STTProvider], settings: ConversationSettings, *, pause_after_s: float | None = None,
                 before_the_rest: Callable[[Heard], Any] = lambda _heard: True, rate: int = RATE) -> Heard:
    """Say SAID then silence (5 ms a 20 ms frame) into a TurnTaker until it takes a turn or fails. With
    ``pause_after_s``, feeding stops after that much audio until ``before_the_rest(heard)`` holds."""
    heard = Heard()
    pcm = speech_pcm(SAID, rate) + silence(1200, rate)
    async with asyncio.TaskGroup() as tg:
        calls = ProviderCalls(ProviderChain(stt=stts, llm=[], tts=[]), settings=settings, persona=Persona())
        turns = TurnTaker(settings=settings, transcribe=calls.transcribe, spawn=tg.create_task,
                          on_speech_start=lambda: None, on_turn=heard.turns.append,
                          on_failure=lambda code, message: heard.failures.append((code, message)),
                          listen=calls.live_transcription, on_interim=heard.interims.append)
        for i, frame in enumerate(frames(pcm, rate)):
            if pause_after_s is not None and i == int(pause_after_s * 50):
                await until(lambda: before_the_rest(heard))
            turns.on_audio(AudioFrame(frame, rate))
            await asyncio.sleep(0.005)
            if heard.turns or heard.failures:
                break
        await until(lambda: heard.turns or heard.failures)
        turns.close()
    return heard


def deepgram(fake: FakeDeepgram, http: aiohttp.ClientSession, key: str = KEY) -> STTProvider:
    return build_stt(ProviderSettings("deepgram", "nova-3", key, fake.base_url, key_env="DEEPGRAM_API_KEY"), http,
                     timeout_s=SETTINGS.stt_timeout_secs)


def whisper(fake: FakeOpenAI, http: aiohttp.ClientSession) -> STTProvider:
    return build_stt(ProviderSettings("openai", "whisper-1", "sk-test", fake.base_url), http,
                     timeout_s=SETTINGS.stt_timeout_secs)


async def test_the_turn_is_the_streamed_finals_and_interims_reach_the_callback() -> None:
    async with FakeDeepgram(api_key=KEY, transcripts=[SAID]) as fake, aiohttp.ClientSession() as http:
        heard = await a_turn([deepgram(fake, http)], SETTINGS)
    assert [t.text for t in heard.turns] == [SAID] and heard.failures == []
    [conn] = fake.listen.connections
    assert conn["query"]["encoding"] == "mulaw" and conn["query"]["sample_rate"] == "8000"
    assert "Finalize" in conn["controls"]       # the VAD stopped before the vendor's endpointing: flushed
    assert heard.interims and all(SAID.startswith(text) for text in heard.interims)
    assert len(heard.interims[0].split()) < len(SAID.split())     # partial words while the caller spoke


async def test_a_leg_at_another_rate_streams_16k_linear16() -> None:
    async with FakeDeepgram(api_key=KEY, transcripts=[SAID]) as fake, aiohttp.ClientSession() as http:
        heard = await a_turn([deepgram(fake, http)], SETTINGS, rate=24000)
    assert [t.text for t in heard.turns] == [SAID]
    query = fake.listen.connections[0]["query"]
    assert query["encoding"] == "linear16" and query["sample_rate"] == "16000"
    speech_ms = len(speech_pcm(SAID, 24000)) / 2 / 24000 * 1000
    assert speech_ms - 50 <= fake.listen.connections[0]["audio_ms"] <= speech_ms + 1250   # resampled, not relabelled


async def test_the_vendors_end_of_speech_makes_the_text_ready_when_the_vad_stops() -> None:
    """vad_stop_ms 800 > Deepgram's endpointing (300): the final with speech_final is in before our VAD
    stops, so the turn is taken without asking for finals."""
    speech_s = len(speech_pcm(SAID, RATE)) / 2 / RATE
    async with FakeDeepgram(api_key=KEY, transcripts=[SAID]) as fake, aiohttp.ClientSession() as http:
        heard = await a_turn([deepgram(fake, http)], dataclasses.replace(SETTINGS, vad_stop_ms=800),
                             pause_after_s=speech_s + 0.5, before_the_rest=lambda h: SAID in h.interims)
    assert [t.text for t in heard.turns] == [SAID]
    assert "Finalize" not in fake.listen.connections[0]["controls"]


async def test_a_stream_cut_mid_utterance_falls_back_to_the_one_shot_stt_on_the_buffered_audio() -> None:
    async with (FakeDeepgram(api_key=KEY, transcripts=[SAID]) as fake, FakeOpenAI(["from the fallback"]) as openai,
                aiohttp.ClientSession() as http):
        fake.state.fail = "cut"
        heard = await a_turn([deepgram(fake, http), whisper(openai, http)], SETTINGS)
    assert [t.text for t in heard.turns] == ["from the fallback"], heard.failures
    assert all(c["closed_by"] == "cut" for c in fake.listen.connections)
    assert len(fake.listen.connections) == 1 + SETTINGS.provider_retries + 1   # the stream, then one-shot tries
    [request] = openai.state.stt_requests
    assert request["duration_ms"] >= len(speech_pcm(SAID, RATE)) / 2 / RATE * 1000


async def test_a_stream_that_never_answers_falls_back_after_the_final_wait() -> None:
    settings = dataclasses.replace(SETTINGS, stt_stream_final_wait_ms=300, stt_timeout_secs=0.5, provider_retries=0)
    async with (FakeDeepgram(api_key=KEY) as fake, FakeOpenAI(["from the fallback"]) as openai,
                aiohttp.ClientSession() as http):
        fake.state.fail = "hang"
        heard = await a_turn([deepgram(fake, http), whisper(openai, http)], settings)
    assert [t.text for t in heard.turns] == ["from the fallback"] and len(openai.state.stt_requests) == 1


async def test_a_refused_key_with_no_fallback_is_an_stt_failure_naming_the_key() -> None:
    async with FakeDeepgram(api_key=KEY) as fake, aiohttp.ClientSession() as http:
        heard = await a_turn([deepgram(fake, http, key="wrong-key-abcdef")], SETTINGS)
    [(code, message)] = heard.failures
    assert code == "stt_failed" and "DEEPGRAM_API_KEY" in message and "HTTP 401" in message
    assert heard.turns == [] and "wrong-key" not in message
    assert len(fake.listen.connections) == 2        # the stream, then the one-shot form (permanent: no retry)
