"""Tools in whole calls through a real gateway (fake OpenAI, fake Twilio, a simulated caller on 127.0.0.1):
a real stdio MCP server's tool called by the model, its result in the follow-up request and the answer
spoken; the server dying mid-call told to the model while the call goes on; the filler while a tool is
slow; the model ending the call; a server that cannot start stopping startup with its key."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from gateway.app import create_app
from gateway.simulate.call import SimulatedCall, synthetic_voice
from pipeline.tools import McpStartError
from tests.conftest import ACCOUNT_SID, AUTH_TOKEN, greeted_call, phone_config, running_gateway
from tests.fakes.openai_server import FakeOpenAI
from tests.fakes.twilio_rest import FakeTwilioREST

pytestmark = pytest.mark.asyncio

MCP = {"command": sys.executable, "args": ["-m", "tests.pipeline.tools.booking_mcp_server"],
       "tools_filter": ["lookup_booking", "slow_lookup", "crash"]}
CALLS = {"where is my booking": ("lookup_booking", {"ref": "AB12"}), "take your time": ("slow_lookup", {"ref": "CD34", "seconds": 1.5}),
         "break it": ("crash", {}), "again please": ("lookup_booking", {"ref": "AB12"}), "bye now": ("end_call", {})}


def model(messages: list[dict[str, Any]]) -> Any:
    """The fake model: a tool call for the caller's words, then an answer that reads the tool's result out."""
    last = messages[-1]
    if last["role"] == "tool":
        return f"Here is what I found. {last['content']}"
    name, arguments = CALLS.get(last["content"], ("", {}))
    return {"content": "Let me check.", "tool_calls": [{"name": name, "arguments": arguments}]} if name else "Okay."


async def live_call(url: str, twilio: FakeTwilioREST) -> SimulatedCall:
    return await greeted_call(url, twilio, quiet_ms=300)


async def turn(call: SimulatedCall) -> None:
    end = await call.speak(synthetic_voice(0.8))
    await call.wait_audio(after=end, timeout=10)
    await call.wait_quiet(400, timeout=15)


def tool_messages(fake: FakeOpenAI) -> list[dict[str, Any]]:
    return [m for m in fake.state.llm_requests[-1]["messages"] if m["role"] == "tool"]


async def test_an_mcp_tool_answers_then_its_server_dies_and_the_call_goes_on() -> None:
    transcripts = ["where is my booking", "break it", "again please"]
    async with (FakeOpenAI(transcripts=transcripts, replies=model, tts_ms_per_char=5) as fake,
                FakeTwilioREST(ACCOUNT_SID, AUTH_TOKEN) as twilio):
        async with running_gateway(phone_config(fake.base_url, twilio.base_url, mcp=MCP)) as url:
            call = await live_call(url, twilio)
            await turn(call)
            offered = [t["function"]["name"] for t in fake.state.llm_requests[0]["tools"]]
            assert offered == ["lookup_booking", "slow_lookup", "crash"]
            follow_up = fake.state.llm_requests[1]["messages"]
            asked = follow_up[-2]
            assert asked["role"] == "assistant" and asked["tool_calls"][0]["function"]["name"] == "lookup_booking"
            assert follow_up[-1] == {"role": "tool", "tool_call_id": asked["tool_calls"][0]["id"],
                                     "content": "Booking AB12: confirmed, two nights from May 3."}
            spoken = [r["input"] for r in fake.state.tts_requests]
            assert any("confirmed, two nights from May 3." in text for text in spoken)
            await turn(call)                                      # the server process dies mid-call
            died = tool_messages(fake)[-1]["content"]
            assert died.startswith("Error: crash failed")
            await turn(call)                                      # and stays gone: the model is told again
            assert tool_messages(fake)[-1]["content"].startswith("Error: lookup_booking failed")
            assert not call.closed and twilio.ended_calls == []   # the call went on
            await call.hang_up()


async def test_a_slow_tool_gets_the_filler_and_the_model_can_hang_up(tmp_path: Path) -> None:
    personas = tmp_path / "personas.json"
    personas.write_text(json.dumps({"personas": {"desk": {"system": "You are a front desk.", "greeting": "Hi.",
                                                          "builtin_tools": ["end_call"]}},
                                    "numbers": {"default": "desk"}}))
    async with (FakeOpenAI(transcripts=["take your time", "bye now"], replies=model, tts_ms_per_char=5) as fake,
                FakeTwilioREST(ACCOUNT_SID, AUTH_TOKEN) as twilio):
        config = phone_config(fake.base_url, twilio.base_url, mcp=MCP, personas_file=str(personas),
                              tool_filler_secs=0.3, tool_filler_text="One moment please.")
        async with running_gateway(config) as url:
            call = await live_call(url, twilio)
            await turn(call)
            async with asyncio.timeout(10):
                while not any("found after a while" in r["input"] for r in fake.state.tts_requests):
                    await asyncio.sleep(0.05)
            await call.wait_quiet(400, timeout=10)
            spoken = [r["input"] for r in fake.state.tts_requests]
            assert spoken.index("One moment please.") < next(i for i, t in enumerate(spoken) if "found after a while" in t)
            end = await call.speak(synthetic_voice(0.8))
            await call.wait_closed(15)
            assert "end_call" in [t["function"]["name"] for t in fake.state.llm_requests[0]["tools"]]
            assert fake.state.tts_requests[-1]["input"] == config.goodbye_text   # the goodbye, then the hang-up
            assert call.call_sid in twilio.ended_calls
            assert sum(n for t, n in call.received.media if t > end) > 0
            await call.close()


async def test_an_mcp_server_that_cannot_start_stops_startup_naming_its_key() -> None:
    config = phone_config("http://127.0.0.1:1/v1", "http://127.0.0.1:1",
                          mcp_servers=[{"command": sys.executable, "args": ["-c", "raise SystemExit(2)"]}])
    app = create_app(config)
    with pytest.raises(McpStartError, match=r"^'mcp_servers\[0\]': the MCP server .* could not start"):
        async with app.router.lifespan_context(app):
            pass


async def test_the_model_presses_keys_on_the_line(tmp_path: Path) -> None:
    personas = tmp_path / "personas.json"
    personas.write_text(json.dumps({"personas": {"ivr": {"system": "You navigate phone menus.", "greeting": "Hi.",
                                                         "builtin_tools": ["send_dtmf"]}},
                                    "numbers": {"default": "ivr"}}))

    def ivr(messages: list[dict[str, Any]]) -> Any:
        if messages[-1]["role"] == "tool":
            return "Done."
        return {"content": "", "tool_calls": [{"name": "send_dtmf", "arguments": {"digits": "5"}}]}

    async with (FakeOpenAI(transcripts=["press five for sales"], replies=ivr, tts_ms_per_char=5) as fake,
                FakeTwilioREST(ACCOUNT_SID, AUTH_TOKEN) as twilio):
        async with running_gateway(phone_config(fake.base_url, twilio.base_url, personas_file=str(personas))) as url:
            call = await live_call(url, twilio)
            before = len(call.received.audio)
            await turn(call)
            assert tool_messages(fake)[-1]["content"] == "Sent the keypad tones 5."
            tone = np.frombuffer(bytes(call.received.audio[before:before + 1600]), "<i2").astype(float)
            peaks = sorted(np.fft.rfftfreq(len(tone), 1 / 8000)[np.argsort(np.abs(np.fft.rfft(tone)))[-2:]])
            assert abs(peaks[0] - 770) < 15 and abs(peaks[1] - 1336) < 15      # the keypad pair of "5", in band
            await call.hang_up()
