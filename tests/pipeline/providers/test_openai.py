"""The OpenAI-compatible providers against the fake OpenAI server (real HTTP on 127.0.0.1)."""

from __future__ import annotations

import aiohttp
import pytest

from pipeline.audio import rms, silence
from pipeline.providers import ProviderSettings, build_llm, build_stt, build_tts
from pipeline.providers.base import ProviderError
from pipeline.providers.openai import OpenAILLM, OpenAISTT, OpenAITTS
from tests.fakes.openai_server import FakeOpenAI
from tests.speech import speech_pcm

pytestmark = pytest.mark.asyncio


def settings(fake: FakeOpenAI, model: str, key: str = "sk-test", name: str = "openai") -> ProviderSettings:
    return ProviderSettings(name=name, model=model, api_key=key, base_url=fake.base_url, voice="nova")


async def test_stt_uploads_a_wav_and_returns_the_text() -> None:
    pcm = speech_pcm("Good morning.", 16000)
    async with FakeOpenAI(transcripts=[" good morning "], api_key="sk-test") as fake, aiohttp.ClientSession() as http:
        stt = build_stt(settings(fake, "whisper-1"), http, timeout_s=5)
        assert isinstance(stt, OpenAISTT)
        assert await stt.transcribe(pcm, sample_rate=16000, language="en-US") == "good morning"
    [req] = fake.state.stt_requests
    assert req["model"] == "whisper-1" and req["language"] == "en" and req["sample_rate"] == 16000
    assert abs(req["duration_ms"] - len(pcm) / 32) < 1 and req["rms"] > 0.01


async def test_llm_streams_deltas_with_the_whole_context() -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    async with FakeOpenAI(replies=["Hello there, how are you?"], api_key="sk-test") as fake, \
            aiohttp.ClientSession() as http:
        llm = build_llm(settings(fake, "gpt-4o-mini"), http, timeout_s=5, max_tokens=50)
        assert isinstance(llm, OpenAILLM)
        deltas = [d async for d in llm.stream(messages)]
    assert len(deltas) > 3 and "".join(deltas) == "Hello there, how are you?"
    [body] = fake.state.llm_requests
    assert body["messages"] == messages and body["stream"] is True and body["max_tokens"] == 50


async def test_tts_streams_24k_pcm_in_whole_samples_with_the_voice() -> None:
    async with FakeOpenAI(api_key="sk-test", tts_chunk_ms=7, tts_ms_per_char=20) as fake, \
            aiohttp.ClientSession() as http:
        tts = build_tts(settings(fake, "tts-1"), http, timeout_s=5)
        assert isinstance(tts, OpenAITTS) and tts.sample_rate == 24000
        chunks = [c async for c in tts.synthesize("Hello world.", voice="shimmer")]
    assert all(len(c) % 2 == 0 for c in chunks)
    pcm = b"".join(chunks)
    assert len(pcm) == 24000 * 2 * 12 * 20 // 1000 and rms(pcm) > 0.1
    [req] = fake.state.tts_requests
    assert req == {"model": "tts-1", "input": "Hello world.", "voice": "shimmer", "response_format": "pcm"}


@pytest.mark.parametrize(("mode", "transient"), [("500", True), ("401", False)])
async def test_http_errors_map_to_provider_errors(mode: str, transient: bool) -> None:
    async with FakeOpenAI(api_key="sk-test") as fake, aiohttp.ClientSession() as http:
        fake.state.fail.update(stt=mode, llm=mode, tts=mode)
        stt = OpenAISTT(settings(fake, "whisper-1"), http, timeout_s=5)
        llm = OpenAILLM(settings(fake, "m"), http, timeout_s=5)
        tts = OpenAITTS(settings(fake, "tts-1"), http, timeout_s=5)
        for attempt in (stt.transcribe(silence(100, 16000), sample_rate=16000),
                        anext(llm.stream([{"role": "user", "content": "x"}])),
                        anext(tts.synthesize("x"))):
            with pytest.raises(ProviderError) as err:
                await attempt
            assert err.value.transient is transient and f"HTTP {mode}" in str(err.value)
            assert "sk-test" not in str(err.value)


async def test_a_wrong_key_is_refused_and_not_retried() -> None:
    async with FakeOpenAI(api_key="sk-right") as fake, aiohttp.ClientSession() as http:
        stt = OpenAISTT(settings(fake, "whisper-1", key="sk-wrong"), http, timeout_s=5)
        with pytest.raises(ProviderError) as err:
            await stt.transcribe(silence(100, 16000), sample_rate=16000)
    assert err.value.transient is False and "401" in str(err.value)


async def test_a_hanging_server_times_out_as_a_transient_error() -> None:
    async with FakeOpenAI(api_key="sk-test") as fake, aiohttp.ClientSession() as http:
        fake.state.fail["llm"] = "hang"
        llm = OpenAILLM(settings(fake, "m"), http, timeout_s=0.3)
        with pytest.raises(ProviderError) as err:
            await anext(llm.stream([{"role": "user", "content": "x"}]))
    assert err.value.transient is True and "timed out" in str(err.value)


async def test_compatible_llms_use_their_own_base_url_and_key() -> None:
    async with FakeOpenAI(replies=["ok"], api_key="gsk-groq") as fake, aiohttp.ClientSession() as http:
        llm = build_llm(settings(fake, "llama-3.1-8b-instant", key="gsk-groq", name="groq"), http, timeout_s=5)
        assert "".join([d async for d in llm.stream([{"role": "user", "content": "x"}])]) == "ok"
    assert fake.state.llm_requests[0]["model"] == "llama-3.1-8b-instant"


async def test_a_refused_connection_is_a_transient_error() -> None:
    dead = ProviderSettings(name="whisper", model="whisper-1", base_url="http://127.0.0.1:9/v1")
    async with aiohttp.ClientSession() as http:
        with pytest.raises(ProviderError) as err:
            await build_stt(dead, http, timeout_s=2).transcribe(silence(100, 16000), sample_rate=16000)
    assert err.value.transient is True and "connection failed" in str(err.value)


async def test_llm_tool_calls_are_assembled_and_yielded_after_the_text() -> None:
    from pipeline.providers.base import Tool, ToolCall

    tool = Tool("transfer_call", "Transfer the caller", {"type": "object", "properties": {"target": {"type": "string"}}})
    reply = {"content": "Let me transfer you.", "tool_calls": [{"name": "transfer_call", "arguments": {"target": "sales"}}]}
    async with FakeOpenAI(replies=[reply], api_key="sk-test") as fake, aiohttp.ClientSession() as http:
        llm = OpenAILLM(settings(fake, "gpt-4o-mini"), http, timeout_s=5)
        items = [d async for d in llm.stream([{"role": "user", "content": "sales please"}], [tool])]
    assert "".join(i for i in items if isinstance(i, str)) == "Let me transfer you."
    call = items[-1]
    assert isinstance(call, ToolCall) and call.id.startswith("call_")    # the id streamed with the name
    assert call == ToolCall("transfer_call", {"target": "sales"}, call.id)
    sent = fake.state.llm_requests[0]["tools"]
    assert sent == [{"type": "function", "function": {"name": "transfer_call", "description": "Transfer the caller",
                                                      "parameters": dict(tool.parameters)}}]


async def test_streams_are_read_to_the_end_so_one_connection_serves_every_request() -> None:
    created: list[int] = []

    async def on_create(*_: object) -> None:
        created.append(1)

    trace = aiohttp.TraceConfig()
    trace.on_connection_create_end.append(on_create)
    async with FakeOpenAI(replies=["One two three."], api_key="sk-test") as fake, \
            aiohttp.ClientSession(trace_configs=[trace]) as http:
        llm = OpenAILLM(settings(fake, "m"), http, timeout_s=5)
        tts = OpenAITTS(settings(fake, "tts-1"), http, timeout_s=5)
        stt = OpenAISTT(settings(fake, "whisper-1"), http, timeout_s=5)
        for _ in range(3):
            assert [d async for d in llm.stream([{"role": "user", "content": "x"}])]
            assert [c async for c in tts.synthesize("Hi.")]
            await stt.transcribe(silence(100, 16000), sample_rate=16000)
    assert len(created) == 1
