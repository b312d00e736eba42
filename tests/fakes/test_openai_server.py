"""Tests for the fake OpenAI server, driven with plain httpx (the real wire protocol)."""

from __future__ import annotations

import asyncio
import io
import json
import math
import os
import subprocess
import sys
import time
import wave
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from tests.fakes.openai_server import TTS_SAMPLE_RATE, FakeOpenAI

KEY = "sk-test"
AUTH = {"Authorization": f"Bearer {KEY}"}
REPO = Path(__file__).resolve().parents[2]


def make_wav(ms: int = 500, rate: int = 16000, amp: float = 0.5, channels: int = 1) -> bytes:
    n = rate * ms // 1000
    x = (amp * 32767 * np.sin(2 * np.pi * 440 * np.arange(n) / rate)).astype("<i2")
    if channels == 2:
        x = np.repeat(x, 2)
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(x.tobytes())
    return buf.getvalue()


async def transcribe(client: httpx.AsyncClient, fake: FakeOpenAI, audio: bytes, **headers: str) -> httpx.Response:
    return await client.post(
        f"{fake.base_url}/audio/transcriptions",
        headers=headers or AUTH,
        files={"file": ("utt.wav", audio, "audio/wav")},
        data={"model": "whisper-1", "language": "en", "response_format": "json"},
    )


async def stream_chat(client: httpx.AsyncClient, fake: FakeOpenAI, **extra: object) -> list[dict | str]:
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "stream": True, **extra}
    events: list[dict | str] = []
    async with client.stream("POST", f"{fake.base_url}/chat/completions", headers=AUTH, json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        async for line in r.aiter_lines():
            if line.startswith("data: "):
                data = line[len("data: "):]
                events.append(data if data == "[DONE]" else json.loads(data))
    return events


def fake(**kw: object) -> FakeOpenAI:
    args: dict = dict(transcripts=["hello there"], replies=["Hi! How can I help you today?"],
                      stt_delay_ms=0, llm_delay_ms=0, tts_delay_ms=0, api_key=KEY)
    args.update(kw)
    return FakeOpenAI(**args)


@pytest.mark.asyncio
async def test_stt_roundtrip_records_audio_stats() -> None:
    async with fake(transcripts=["one", "two"]) as f, httpx.AsyncClient() as c:
        assert f.base_url.startswith("http://127.0.0.1:") and f.base_url.endswith("/v1")
        texts = [(await transcribe(c, f, make_wav())).json()["text"] for _ in range(3)]
        assert texts == ["one", "two", "one"]
        rec = f.state.stt_requests[0]
        assert rec["model"] == "whisper-1" and rec["language"] == "en" and rec["sample_rate"] == 16000
        assert rec["duration_ms"] == pytest.approx(500)
        assert rec["rms"] == pytest.approx(0.5 / math.sqrt(2), rel=0.01)
        assert f.state.calls["stt"] == 3


@pytest.mark.asyncio
async def test_stt_callable_transcript() -> None:
    async with fake(transcripts=lambda rec: f"{rec['duration_ms']:.0f}ms") as f, httpx.AsyncClient() as c:
        assert (await transcribe(c, f, make_wav(ms=250))).json() == {"text": "250ms"}


@pytest.mark.asyncio
@pytest.mark.parametrize("audio", [b"not a wav at all", make_wav(channels=2), b"RIFF\x00\x00\x00\x00WAVE"])
async def test_stt_invalid_wav_is_400(audio: bytes) -> None:
    async with fake() as f, httpx.AsyncClient() as c:
        r = await transcribe(c, f, audio)
        assert r.status_code == 400
        assert r.json()["error"]["type"] == "invalid_request_error"
        assert f.state.stt_requests == []


@pytest.mark.asyncio
async def test_auth() -> None:
    async with fake() as f, httpx.AsyncClient() as c:
        for headers in ({"Authorization": "Bearer wrong"}, {"X-Nothing": "1"}):
            r = await transcribe(c, f, make_wav(), **headers)
            assert r.status_code == 401
            assert r.json()["error"]["code"] == "invalid_api_key"
            assert r.json()["error"]["type"] == "invalid_request_error"
    async with fake(api_key=None) as f, httpx.AsyncClient() as c:  # no key configured: anything goes
        assert (await transcribe(c, f, make_wav(), **{"X-Nothing": "1"})).status_code == 200


@pytest.mark.asyncio
async def test_chat_stream_chunks() -> None:
    async with fake() as f, httpx.AsyncClient() as c:
        events = await stream_chat(c, f)
        assert events[-1] == "[DONE]"
        chunks = [e for e in events[:-1] if isinstance(e, dict)]
        assert all(ch["object"] == "chat.completion.chunk" and ch["model"] == "gpt-4o-mini" for ch in chunks)
        assert chunks[0]["choices"][0]["delta"] == {"role": "assistant"}
        tokens = [ch["choices"][0]["delta"]["content"] for ch in chunks[1:-1]]
        assert tokens == ["Hi! ", "How ", "can ", "I ", "help ", "you ", "today?"]
        assert chunks[-1]["choices"][0] == {"index": 0, "delta": {}, "finish_reason": "stop"}
        assert f.state.llm_requests[0]["messages"] == [{"role": "user", "content": "hi"}]
        usage = await stream_chat(c, f, stream_options={"include_usage": True})
        assert usage[-2]["choices"] == [] and usage[-2]["usage"]["completion_tokens"] == 7


@pytest.mark.asyncio
async def test_chat_non_stream_and_callable_reply() -> None:
    def replies(msgs: list[dict[str, Any]]) -> str:
        return f"echo: {msgs[-1]['content']}"

    async with fake(replies=replies) as f, httpx.AsyncClient() as c:
        body = {"model": "m", "messages": [{"role": "user", "content": "ping"}]}
        r = await c.post(f"{f.base_url}/chat/completions", headers=AUTH, json=body)
        data = r.json()
        assert data["object"] == "chat.completion"
        assert data["choices"][0]["message"] == {"role": "assistant", "content": "echo: ping"}
        assert data["choices"][0]["finish_reason"] == "stop"
        bad = await c.post(f"{f.base_url}/chat/completions", headers=AUTH, content=b"{nope")
        assert bad.status_code == 400


@pytest.mark.asyncio
async def test_tts_pcm_and_wav() -> None:
    text = "Hello there, friend."  # 20 chars -> 1200 ms
    async with fake() as f, httpx.AsyncClient() as c:
        body = {"model": "gpt-4o-mini-tts", "input": text, "voice": "alloy", "response_format": "pcm"}
        pieces: list[bytes] = []
        async with c.stream("POST", f"{f.base_url}/audio/speech", headers=AUTH, json=body) as r:
            assert r.status_code == 200
            async for piece in r.aiter_raw():
                pieces.append(piece)
        pcm = b"".join(pieces)
        assert len(pcm) == 1200 * TTS_SAMPLE_RATE // 1000 * 2
        x = np.frombuffer(pcm, "<i2").astype(np.float64) / 32768
        assert abs(x[0]) < 0.01 and abs(x[-1]) < 0.02  # faded
        assert np.sqrt(np.mean(x**2)) == pytest.approx(0.3 / math.sqrt(2), rel=0.05)
        short = await c.post(f"{f.base_url}/audio/speech", headers=AUTH, json={**body, "input": "Hi"})
        assert len(short.content) == 200 * TTS_SAMPLE_RATE // 1000 * 2  # 200 ms minimum
        w = await c.post(f"{f.base_url}/audio/speech", headers=AUTH, json={**body, "response_format": "wav"})
        with wave.open(io.BytesIO(w.content)) as wf:
            assert (wf.getframerate(), wf.getnchannels(), wf.getsampwidth()) == (TTS_SAMPLE_RATE, 1, 2)
            assert wf.readframes(wf.getnframes()) == pcm
        mp3 = await c.post(f"{f.base_url}/audio/speech", headers=AUTH, json={**body, "response_format": "mp3"})
        assert mp3.status_code == 400 and mp3.json()["error"]["type"] == "invalid_request_error"
        assert [t["input"] for t in f.state.tts_requests][:2] == [text, "Hi"]
        assert f.state.calls["tts"] == 4


@pytest.mark.asyncio
async def test_failure_modes() -> None:
    async with fake() as f, httpx.AsyncClient() as c:
        url, body = f"{f.base_url}/chat/completions", {"model": "m", "messages": []}
        f.state.fail["llm"] = "500"
        for _ in range(2):
            r = await c.post(url, headers=AUTH, json=body)
            assert r.status_code == 500
            assert r.json() == {"error": {"message": "The server had an error", "type": "server_error"}}
        f.state.fail["llm"] = None
        f.state.fail_once["llm"] = "401"
        assert (await c.post(url, headers=AUTH, json=body)).json()["error"]["code"] == "invalid_api_key"
        assert f.state.fail_once["llm"] is None
        assert (await c.post(url, headers=AUTH, json=body)).status_code == 200
        f.state.fail_once["stt"] = "500"
        assert (await transcribe(c, f, make_wav())).status_code == 500
        assert (await transcribe(c, f, make_wav())).status_code == 200
        assert f.state.calls == {"stt": 2, "llm": 4, "tts": 0}


@pytest.mark.asyncio
async def test_hang_times_out_and_server_still_stops() -> None:
    f = fake()
    async with f, httpx.AsyncClient(timeout=0.2) as c:
        f.state.fail["tts"] = "hang"
        body = {"model": "tts-1", "input": "hello", "voice": "alloy", "response_format": "pcm"}
        pending = asyncio.create_task(c.post(f"{f.base_url}/audio/speech", headers=AUTH, json=body))
        with pytest.raises(httpx.ReadTimeout):
            await c.post(f"{f.base_url}/audio/speech", headers=AUTH, json=body)
        await asyncio.sleep(0.05)
        started = time.monotonic()
    assert time.monotonic() - started < 3  # shutdown released the hanging handlers
    with pytest.raises(httpx.HTTPError):
        await pending


@pytest.mark.asyncio
async def test_delays_are_honoured() -> None:
    async with fake(stt_delay_ms=100, llm_delay_ms=150, llm_token_interval_ms=20, tts_delay_ms=80) as f, \
            httpx.AsyncClient() as c:
        t0 = time.perf_counter()
        await transcribe(c, f, make_wav())
        assert time.perf_counter() - t0 >= 0.095
        t0 = time.perf_counter()
        first: float | None = None
        body = {"model": "m", "messages": [], "stream": True}
        async with c.stream("POST", f"{f.base_url}/chat/completions", headers=AUTH, json=body) as r:
            async for line in r.aiter_lines():
                if first is None and '"content"' in line:
                    first = time.perf_counter() - t0
        total = time.perf_counter() - t0
        assert first is not None and first >= 0.145
        assert total >= 0.145 + 6 * 0.02 - 0.01  # 7 tokens
        t0 = time.perf_counter()
        body = {"model": "tts-1", "input": "hey", "voice": "alloy", "response_format": "pcm"}
        async with c.stream("POST", f"{f.base_url}/audio/speech", headers=AUTH, json=body) as r:
            async for _ in r.aiter_raw():
                break
        assert time.perf_counter() - t0 >= 0.075


@pytest.mark.asyncio
async def test_many_concurrent_requests() -> None:
    async with fake(llm_delay_ms=200, llm_token_interval_ms=1) as f, \
            httpx.AsyncClient(limits=httpx.Limits(max_connections=300)) as c:
        t0 = time.perf_counter()
        results = await asyncio.gather(*(stream_chat(c, f) for _ in range(200)))
        assert all(r[-1] == "[DONE]" for r in results)
        assert time.perf_counter() - t0 < 10  # concurrent, not serialised (serial would be >= 40 s)
        assert f.state.calls["llm"] == 200


def test_cli_subprocess_prints_ready_and_serves() -> None:
    cmd = [sys.executable, "-m", "tests.fakes.openai_server", "--port", "0", "--stt-delay-ms", "10",
           "--llm-delay-ms", "10", "--tts-delay-ms", "10", "--transcript", "from cli", "--reply", "ok"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        assert line.startswith("READY http://127.0.0.1:") and line.endswith("/v1")
        base = line.split()[1]
        r = httpx.post(f"{base}/audio/transcriptions", files={"file": ("a.wav", make_wav(), "audio/wav")},
                       data={"model": "whisper-1"})
        assert r.json() == {"text": "from cli"}
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()


@pytest.mark.asyncio
async def test_a_delay_counts_from_the_request_not_from_the_fakes_own_work() -> None:
    """The fake's work before answering (here an 80 ms transcript lookup) is inside the 150 ms delay, not
    added to it: the benchmark's "server-added" latency must not count the fake's CPU."""
    def slow_transcript(_record: dict[str, object]) -> str:
        time.sleep(0.08)
        return "hello"

    async with fake(stt_delay_ms=150) as f, httpx.AsyncClient() as c:
        f.state.next_transcript = slow_transcript
        t0 = time.perf_counter()
        await transcribe(c, f, make_wav())
        elapsed = time.perf_counter() - t0
    assert elapsed >= 0.145                 # the delay still holds
    assert elapsed < 0.215                  # not 150 + 80 ms
