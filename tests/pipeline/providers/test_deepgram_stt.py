"""Deepgram streaming speech to text against the fake ``/v1/listen`` WebSocket (real sockets on 127.0.0.1):
the handshake's query and auth header, µ-law on 8 kHz and linear16 on 16 kHz as binary frames, interim and
final results derived from the audio, the control messages (``Finalize``, ``KeepAlive``, ``CloseStream``),
the one-shot form over the same socket, a refused key, a rate limit, a server error and a stream cut
mid-way."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator

import aiohttp
import pytest

from pipeline.audio import silence
from pipeline.providers import PROVIDERS, ProviderSettings, build_stt
from pipeline.providers.base import ProviderError, StreamingSTTProvider, Transcript
from pipeline.providers.deepgram import DeepgramSTT, transcript_of
from tests.fakes.deepgram_server import FakeDeepgram
from tests.speech import speech_pcm

pytestmark = pytest.mark.asyncio

KEY = "dg-secret-key-123456"
SAID = "I would like to book a table"


def settings(fake: FakeDeepgram, key: str = KEY) -> ProviderSettings:
    spec = PROVIDERS["deepgram"]
    return ProviderSettings("deepgram", spec.default_models["stt"], key, fake.base_url, key_env=spec.key_env)


def frames(pcm: bytes, rate: int) -> list[bytes]:
    step = rate // 50 * 2      # 20 ms, as a carrier sends them
    return [pcm[i:i + step] for i in range(0, len(pcm), step)]


async def collect(results: AsyncIterator[Transcript], into: list[Transcript]) -> None:
    async for result in results:
        into.append(result)


async def stream_utterance(rate: int, *, flush: bool = False) -> tuple[FakeDeepgram, list[Transcript], list[bytes]]:
    """Speech then 600 ms of silence through a stream at ``rate``; the fake, the results, the frames sent."""
    sent = frames(speech_pcm(SAID, rate) + silence(600, rate), rate)
    got: list[Transcript] = []
    async with FakeDeepgram(api_key=KEY, transcripts=[SAID]) as fake, aiohttp.ClientSession() as http:
        stt = build_stt(settings(fake), http, timeout_s=5)
        assert isinstance(stt, StreamingSTTProvider)
        stream = await stt.open_stream(sample_rate=rate, language="en")
        reader = asyncio.create_task(collect(stream.results(), got))
        for frame in sent:
            await stream.send(frame)
        if flush:
            await stream.flush()
        await stream.finish()
        await asyncio.wait_for(reader, 5)
        await stream.close()
    return fake, got, sent


async def test_a_phone_leg_streams_mulaw_and_gets_interim_then_final_results() -> None:
    fake, got, sent = await stream_utterance(8000)
    [conn] = fake.listen.connections
    assert conn["headers"]["authorization"] == f"Token {KEY}"
    assert conn["query"] == {"model": "nova-3", "encoding": "mulaw", "sample_rate": "8000", "channels": "1",
                             "interim_results": "true", "endpointing": "300", "utterance_end_ms": "1000",
                             "smart_format": "true", "language": "en"}
    assert conn["frames"] == len(sent) and conn["bytes"] == sum(len(f) for f in sent) // 2   # one byte a sample
    assert conn["controls"] == ["CloseStream"]
    interims = [r for r in got if not r.final]
    finals = [r for r in got if r.final and r.text]
    assert interims and all(SAID.startswith(r.text) and r.text != SAID for r in interims)
    assert [r.text for r in finals] == [SAID] and finals[0].end_of_utterance
    speech_s = len(speech_pcm(SAID, 8000)) / 2 / 8000
    assert speech_s <= finals[0].end_s <= speech_s + 0.6


async def test_a_16k_leg_streams_linear16_and_finalize_flushes() -> None:
    fake, got, sent = await stream_utterance(16000, flush=True)
    [conn] = fake.listen.connections
    assert conn["query"]["encoding"] == "linear16" and conn["query"]["sample_rate"] == "16000"
    assert conn["bytes"] == sum(len(f) for f in sent)
    assert conn["controls"] == ["Finalize", "CloseStream"]
    assert [r.text for r in got if r.final and r.text] == [SAID]


async def test_an_idle_stream_sends_keepalive() -> None:
    async with FakeDeepgram(api_key=KEY) as fake, aiohttp.ClientSession() as http:
        stt = DeepgramSTT(settings(fake), http, timeout_s=5, keepalive_secs=0.05)
        stream = await stt.open_stream(sample_rate=8000)
        reader = asyncio.create_task(collect(stream.results(), []))
        async with asyncio.timeout(5):
            while "KeepAlive" not in fake.listen.connections[0]["controls"]:
                await asyncio.sleep(0.02)
        await stream.finish()
        await asyncio.wait_for(reader, 5)
        await stream.close()


async def test_the_one_shot_form_sends_a_finished_utterance_over_the_socket() -> None:
    async with FakeDeepgram(api_key=KEY, transcripts=[SAID]) as fake, aiohttp.ClientSession() as http:
        text = await build_stt(settings(fake), http, timeout_s=5).transcribe(speech_pcm(SAID, 16000),
                                                                            sample_rate=16000, language="en")
    assert text == SAID
    [conn] = fake.listen.connections
    assert conn["controls"] == ["CloseStream"] and conn["query"]["encoding"] == "linear16"


@pytest.mark.parametrize(("mode", "transient", "retry_after"), [("401", False, None), ("429", True, 3.0),
                                                                 ("500", True, None)])
async def test_a_refused_handshake_is_mapped_once(mode: str, transient: bool, retry_after: float | None) -> None:
    async with FakeDeepgram(api_key=KEY) as fake, aiohttp.ClientSession() as http:
        fake.state.fail = mode if mode != "401" else None
        key = "wrong-key-abcdef" if mode == "401" else KEY
        with pytest.raises(ProviderError) as err:
            await build_stt(settings(fake, key), http, timeout_s=5).open_stream(sample_rate=8000)
    assert err.value.transient is transient and err.value.retry_after == retry_after
    assert f"HTTP {mode}" in str(err.value) and KEY not in str(err.value) and "wrong-key" not in str(err.value)
    assert ("DEEPGRAM_API_KEY" in str(err.value)) is (mode == "401")


async def test_a_stream_cut_mid_way_is_transient() -> None:
    async with FakeDeepgram(api_key=KEY, transcripts=[SAID]) as fake, aiohttp.ClientSession() as http:
        fake.state.fail = "cut"
        stream = await build_stt(settings(fake), http, timeout_s=5).open_stream(sample_rate=8000)
        got: list[Transcript] = []
        reader = asyncio.create_task(collect(stream.results(), got))
        for frame in frames(speech_pcm(SAID, 8000), 8000):
            if reader.done():
                break
            await stream.send(frame)
            await asyncio.sleep(0)
        with pytest.raises(ProviderError) as err:
            await asyncio.wait_for(reader, 5)
        await stream.close()
    assert err.value.transient and "1011" in str(err.value)
    assert len(got) == 1 and not got[0].final


async def test_messages_map_to_transcripts() -> None:
    assert transcript_of("deepgram", '{"type": "Metadata", "request_id": "x"}') is None
    assert transcript_of("deepgram", '{"type": "SpeechStarted", "channel": [0], "timestamp": 1.0}') is None
    result = transcript_of("deepgram", '{"type": "Results", "start": 1.0, "duration": 0.5, "is_final": true, '
                                       '"speech_final": false, "channel": {"alternatives": [{"transcript": " hi "}]}}')
    assert result == Transcript("hi", final=True, end_of_utterance=False, end_s=1.5)
    with pytest.raises(ProviderError):
        transcript_of("deepgram", "not json")


async def test_the_fake_refuses_what_deepgram_refuses() -> None:
    """A handshake without ``interim_results`` but with ``utterance_end_ms``, an unknown parameter, or no
    encoding is a 400 with the reason in ``dg-error``; a text frame that is not a control message closes the
    socket with 1008."""
    good = {"model": "nova-3", "encoding": "mulaw", "sample_rate": "8000", "channels": "1"}
    async with FakeDeepgram(api_key=KEY) as fake, aiohttp.ClientSession() as http:
        url, auth = f"{fake.base_url}/v1/listen", {"Authorization": f"Token {KEY}"}
        for bad in ({**good, "utterance_end_ms": "1000"}, {**good, "bogus": "1"}, {"model": "nova-3"}):
            with pytest.raises(aiohttp.WSServerHandshakeError) as err:
                await http.ws_connect(url, params=bad, headers=auth)
            assert err.value.status == 400 and err.value.headers and err.value.headers.get("dg-error")
        async with http.ws_connect(url, params=good, headers=auth) as ws:
            await ws.send_str('{"type": "Flush"}')
            message = await ws.receive(timeout=5)
            assert message.type is aiohttp.WSMsgType.CLOSE and message.data == 1008


async def test_provider_options_reach_the_listen_query() -> None:
    """``provider_options.deepgram.endpointing_ms`` and friends are Deepgram's query parameters."""
    async with FakeDeepgram(api_key=KEY, transcripts=[SAID]) as fake, aiohttp.ClientSession() as http:
        tuned = dataclasses.replace(settings(fake), options={"endpointing_ms": 500, "utterance_end_ms": 1500,
                                                             "smart_format": False})
        stt = build_stt(tuned, http, timeout_s=5)
        assert isinstance(stt, StreamingSTTProvider)
        stream = await stt.open_stream(sample_rate=16000)
        await stream.finish()
        await stream.close()
    [conn] = fake.listen.connections
    assert (conn["query"]["endpointing"], conn["query"]["utterance_end_ms"], conn["query"]["smart_format"]) == \
        ("500", "1500", "false")
