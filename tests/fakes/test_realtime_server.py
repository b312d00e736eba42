"""The fake Realtime API refuses what the real one would: each wrong client event gets an ``error`` event
and lands in ``state.problems`` (so a whole-call test that sends one fails)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from pipeline.providers._http import open_session
from pipeline.providers.base import ProviderError, ProviderSettings
from pipeline.realtime.client import PCM24K, PCMU, RealtimeModel, RealtimeSocket, append_audio, session_update
from tests.fakes.realtime_server import FakeRealtime

pytestmark = pytest.mark.asyncio


async def next_of(socket: RealtimeSocket, kind: str) -> dict[str, Any]:
    async with asyncio.timeout(3):
        async for event in socket.events():
            if event["type"] == kind:
                return event
    raise AssertionError(f"no {kind}")


def update(**kw: Any) -> dict[str, Any]:
    return session_update(**{"instructions": "Hi.", "voice": "alloy", "audio_format": PCMU,
                             "turn_detection": "server_vad", "transcribe_model": "", "tools": (), "interrupt": True,
                             **kw})


@pytest.mark.parametrize("event, problem", [
    ({"type": "input_audio_buffer.push", "audio": ""}, "unknown client event type"),
    ({"type": "input_audio_buffer.append", "audio": "AAAA", "format": "pcmu"}, "unknown fields"),
    ({"type": "conversation.item.truncate", "item_id": "item_x", "content_index": 0, "audio_end_ms": 10},
     "not an assistant audio item"),
    ({"type": "response.create", "response": {"modalities": ["audio"]}}, "unknown fields"),
    ({"type": "conversation.item.create", "item": {"type": "function_call_output", "call_id": "c1", "output": "x"}},
     "unknown call_id"),
])
async def test_wrong_events_get_an_error_and_are_recorded(event: dict[str, Any], problem: str) -> None:
    async with FakeRealtime() as fake, open_session() as http:
        socket = await RealtimeModel(ProviderSettings("realtime", "gpt-realtime", "sk-test", fake.base_url + "/v1"),
                                     http).connect(timeout_s=3)
        await socket.send(update())
        await next_of(socket, "session.updated")
        await socket.send(event)
        error = await next_of(socket, "error")
        assert problem in error["error"]["message"]
        assert len(fake.state.problems) == 1 and problem in fake.state.problems[0]
        await socket.close()


async def test_the_declared_audio_format_is_checked() -> None:
    async with FakeRealtime(audio_format="audio/pcmu") as fake, open_session() as http:
        socket = await RealtimeModel(ProviderSettings("realtime", "gpt-realtime", "sk-test", fake.base_url + "/v1"),
                                     http).connect(timeout_s=3)
        await socket.send(update(audio_format=PCM24K))
        assert "audio.input.format" in (await next_of(socket, "error"))["error"]["message"]
        await socket.send(append_audio(b"\xff" * 160))          # audio before a session was accepted
        await next_of(socket, "error")
        assert len(fake.state.problems) == 2
        await socket.close()


async def test_a_wrong_key_is_refused_at_the_handshake() -> None:
    async with FakeRealtime(api_key="sk-right") as fake, open_session() as http:
        model = RealtimeModel(ProviderSettings("realtime", "gpt-realtime", "sk-wrong", fake.base_url + "/v1",
                                               key_env="OPENAI_API_KEY"), http)
        with pytest.raises(ProviderError, match="HTTP 403 opening the session; check OPENAI_API_KEY") as caught:
            await model.connect(timeout_s=3)
        assert not caught.value.transient
