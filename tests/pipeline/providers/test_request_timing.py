"""VOXRAY_LOG_LEVEL=debug: every provider request logs its time to first byte and its total, with the call id
(the gateway's log filter adds it), and never its query string or key."""

from __future__ import annotations

import logging
import re

import aiohttp
import pytest

from gateway.logging import CallIdFilter, call_id
from pipeline.providers import ProviderSettings, build_llm, build_tts
from tests.fakes.cartesia_server import FakeCartesia
from tests.fakes.openai_server import FakeOpenAI

pytestmark = pytest.mark.asyncio

LINE = re.compile(r"^(\w+) (POST|GET|WS) (\S+): status (\d+), first byte (\d+) ms, total (\d+) ms$")


async def test_each_request_logs_first_byte_and_total_with_the_call_id(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="pipeline.providers._http")
    caplog.handler.addFilter(CallIdFilter())
    token = call_id.set("CA-timing-test")
    try:
        async with FakeOpenAI(api_key="sk-secret-key", replies=["Hello there."]) as openai, \
                FakeCartesia(api_key="ck-secret-key") as cartesia, aiohttp.ClientSession() as http:
            llm = build_llm(ProviderSettings("openai", "gpt-4o-mini", "sk-secret-key", openai.base_url), http,
                            timeout_s=5)
            assert [d async for d in llm.stream([{"role": "user", "content": "hi"}])]
            tts = build_tts(ProviderSettings("cartesia", "sonic-2", "ck-secret-key", cartesia.base_url), http,
                            timeout_s=5)
            assert [c async for c in tts.synthesize("Hello there.")]
    finally:
        call_id.reset(token)
    lines = [(r.getMessage(), getattr(r, "call_id", None)) for r in caplog.records
             if r.name == "pipeline.providers._http"]
    parsed = [LINE.match(message) for message, _ in lines]
    assert len(lines) == 2 and all(parsed), lines
    (chat, chat_call), (speech, speech_call) = zip(parsed, (c for _, c in lines), strict=True)
    assert chat is not None and speech is not None
    assert chat.group(1, 2, 3, 4) == ("openai", "POST", "/v1/chat/completions", "200")
    assert speech.group(1, 2, 3) == ("cartesia", "WS", "/tts/websocket")
    assert chat_call == speech_call == "CA-timing-test"
    for match in (chat, speech):
        assert int(match.group(5)) <= int(match.group(6))       # first byte before the end
    assert not any("secret" in message for message, _ in lines)


async def test_at_info_nothing_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="pipeline.providers._http")
    async with FakeOpenAI(api_key="sk-test") as openai, aiohttp.ClientSession() as http:
        llm = build_llm(ProviderSettings("openai", "gpt-4o-mini", "sk-test", openai.base_url), http, timeout_s=5)
        assert [d async for d in llm.stream([{"role": "user", "content": "hi"}])]
    assert not [r for r in caplog.records if r.name == "pipeline.providers._http"]
