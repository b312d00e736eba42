"""The example configurations in examples/ (the mixing, offline and latency set-ups) each start a real gateway
from the very file and carry a call: an emulated Twilio caller is greeted, speaks, and hears the answer, with
every provider pointed at a local fake of its vendor (by ``base_urls`` or by its base-URL variable, as a user
would) and each vendor receiving the models and voice the file names."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import carry_a_call
from tests.fakes.anthropic_server import FakeAnthropic
from tests.fakes.elevenlabs_server import FakeElevenLabs
from tests.fakes.openai_server import FakeOpenAI
from tests.fakes.xtts_server import SPEAKERS, FakeXTTS

pytestmark = pytest.mark.asyncio

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
SAID = "a table for two tonight"
REPLY = "Sure. For what time?"


def example(name: str) -> dict[str, Any]:
    return json.loads((EXAMPLES / f"{name}.json").read_text())


@contextlib.asynccontextmanager
async def hosted() -> AsyncIterator[tuple[FakeOpenAI, FakeAnthropic, FakeElevenLabs]]:
    async with (FakeOpenAI(transcripts=[SAID], replies=[REPLY], api_key="gsk-test") as groq,
                FakeAnthropic(api_key="sk-ant-test", replies=[REPLY]) as anthropic,
                FakeElevenLabs(api_key="xi-test") as elevenlabs):
        yield groq, anthropic, elevenlabs


def _with_test_keys(raw: dict[str, Any]) -> dict[str, Any]:
    keys = {"groq": "gsk-test", "anthropic": "sk-ant-test", "elevenlabs": "xi-test"}
    assert all(value.startswith("<your") for value in raw["api_keys"].values())   # the file ships placeholders
    return {**raw, "api_keys": {name: keys[name] for name in raw["api_keys"]}}


async def test_the_mixing_example_answers_with_groq_anthropic_and_elevenlabs() -> None:
    raw = example("mixing")
    async with hosted() as (groq, anthropic, elevenlabs):
        await carry_a_call({**_with_test_keys(raw), "base_urls": {"groq": groq.base_url, "anthropic": anthropic.base_url,
                                                                  "elevenlabs": elevenlabs.base_url}}, {})
    assert {r["model"] for r in groq.state.stt_requests} == {"whisper-large-v3"} and groq.state.calls["llm"] == 0
    [chat] = anthropic.state.requests
    body = json.loads(chat["body"])
    assert body["model"] == "claude-3-5-sonnet-20241022" and body["messages"][-1]["content"] == SAID
    texts = elevenlabs.spoken[1:]                          # after the apology, rendered at startup
    assert texts[1:] == ["Sure.", "For what time?"]
    assert {r["path"].split("/")[3] for r in elevenlabs.state.requests} == {raw["tts_voice"]}


async def test_the_latency_example_answers_with_groq_and_elevenlabs_turbo() -> None:
    raw = example("latency")
    async with hosted() as (groq, _anthropic, elevenlabs):
        await carry_a_call(_with_test_keys(raw), {"GROQ_BASE_URL": groq.base_url,
                                                  "ELEVENLABS_BASE_URL": elevenlabs.base_url})
    assert {r["model"] for r in groq.state.stt_requests} == {"whisper-large-v3"}
    assert [r["model"] for r in groq.state.llm_requests] == ["llama-3.1-8b-instant"]
    assert groq.state.llm_requests[0]["messages"][-1] == {"role": "user", "content": SAID}
    assert {json.loads(r["body"])["model_id"] for r in elevenlabs.state.requests} == {"eleven_turbo_v2"}
    assert elevenlabs.spoken[-2:] == ["Sure.", "For what time?"]


async def test_the_offline_example_answers_with_whisper_ollama_and_xtts_from_their_variables() -> None:
    raw = example("offline")
    assert "api_keys" not in raw                            # nothing to pay for, nothing to leak
    async with FakeOpenAI(transcripts=[SAID], replies=[REPLY]) as local, FakeXTTS() as xtts:
        root = local.base_url.removesuffix("/v1")          # as a user sets it: WHISPER_BASE_URL=http://host:9000
        await carry_a_call(raw, {"WHISPER_BASE_URL": root, "OLLAMA_BASE_URL": root, "XTTS_BASE_URL": xtts.base_url})
    assert {r["model"] for r in local.state.stt_requests} == {"whisper-1"}
    assert [r["model"] for r in local.state.llm_requests] == ["llama3.2"]
    assert xtts.spoken[-2:] == ["Sure.", "For what time?"] and set(xtts.voices_spoken) == {SPEAKERS[0]}
    assert xtts.speaker_lists == 1                         # the speakers are read once
