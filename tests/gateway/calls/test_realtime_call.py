"""Whole calls through a real gateway whose LLM stage is ``realtime``: the fake Realtime API on 127.0.0.1
(validating every client event), a Twilio leg (µ-law straight through) and the browser's ``/ws`` (PCM16,
24 kHz at the model). The fake OpenAI HTTP server only speaks the last words (the apology) by TTS."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.simulate.call import SimulatedCall
from pipeline.conversation import ConversationSettings, Persona
from tests.conftest import ACCOUNT_SID, AUTH_TOKEN, PUBLIC_URL, phone_config, running_gateway
from tests.fakes.openai_server import FakeOpenAI
from tests.fakes.realtime_server import FakeRealtime
from tests.fakes.twilio_rest import FakeTwilioREST
from tests.gateway.browser.test_ws import open_session
from tests.gateway.calls.test_call_lifetime import _call as dial
from tests.speech import speech_pcm

pytestmark = pytest.mark.asyncio

APOLOGY = ConversationSettings().apology_text
GREETING = Persona().greeting
LONG = ("Let me tell you about tonight's menu. We have fresh pasta with basil, a wood fired pizza, a green salad "
        "with lemon, grilled fish with herbs and a chocolate cake.")


def realtime_config(openai: FakeOpenAI, realtime: FakeRealtime, twilio_url: str, **overrides: Any) -> Any:
    return phone_config(openai.base_url, twilio_url, llm_provider="realtime",
                        base_urls={"openai": openai.base_url, "realtime": realtime.base_url}, **overrides)


def heard_ms_at(media: list[tuple[float, int]], start: float, clear: float, rate: int = 8000) -> float:
    """What a carrier playing in real time had played at ``clear`` of the audio that began at ``start``."""
    play_end, received = 0.0, 0
    for at, samples in media:
        if at < start or at >= clear:
            continue
        play_end = max(play_end, at) + samples / rate
        received += samples
    return received / rate * 1000.0 - max(0.0, play_end - clear) * 1000.0


async def test_twilio_call_greets_answers_and_truncates_at_what_was_heard() -> None:
    speech = speech_pcm("I would like to book a table for two people tonight.", 8000)
    async with (FakeOpenAI() as openai,
                FakeRealtime(replies=[GREETING, "Sure. For what time?", LONG, "Okay."],
                             transcripts=["book a table", "what is on the menu", "stop please"]) as fake,
                FakeTwilioREST(ACCOUNT_SID, AUTH_TOKEN) as twilio):
        async with running_gateway(realtime_config(openai, fake, twilio.base_url)) as url:
            call = await dial(url, twilio)
            await call.wait_audio(after=0, timeout=5)              # 1. the greeting, in the model's voice
            await call.wait_quiet(300)
            [session] = fake.state.sessions
            assert session["instructions"] == Persona().system
            assert session["audio"]["input"]["format"] == {"type": "audio/pcmu"}
            assert session["audio"]["output"] == {"format": {"type": "audio/pcmu"}, "voice": "alloy"}
            assert session["audio"]["input"]["turn_detection"]["type"] == "server_vad"
            assert GREETING in fake.state.responses[0]["instructions"]
            assert fake.state.headers[0]["authorization"] == "Bearer sk-test"
            assert fake.state.queries[0] == {"model": "gpt-realtime"}

            end = await call.speak(speech)                         # 2. an answer
            first = await call.wait_audio(after=end, timeout=5)
            assert first - end < 2.0
            await call.wait_quiet(300)

            end = await call.speak(speech)                         # 3. barge-in during the long answer
            started = await call.wait_audio(after=end, timeout=5)
            await asyncio.sleep(1.5)
            assert call.playing()
            barge = asyncio.create_task(call.speak(speech))
            cleared = await call.wait_clear(timeout=3)
            await barge
            await call.wait_quiet(300)
            [truncate] = fake.state.truncates
            heard = heard_ms_at(call.received.media, started, cleared)
            assert 1000 < heard < truncate["sent_ms"]
            assert abs(truncate["audio_end_ms"] - heard) <= 60, (truncate, heard)   # within a frame or three

            await call.hang_up()
            async with httpx.AsyncClient() as http:
                metrics = (await http.get(f"{url}/metrics")).text
            assert 'voxray_barge_ins_total{carrier="twilio"} 1.0' in metrics
            assert 'reason="caller_hangup"' in metrics
            assert fake.state.input_ms > 5000                      # the caller's audio went to the model
            assert fake.state.problems == []
            assert call.received.invalid == []


def one_persona(tmp_path: Path, **persona: Any) -> str:
    """A personas file whose only persona (greeting "Hi.") answers every number."""
    path = tmp_path / "personas.json"
    path.write_text(json.dumps({"personas": {"agent": {"system": "You answer the phone.", "greeting": "Hi.",
                                                       **persona}}, "numbers": {"default": "agent"}}))
    return str(path)


async def test_model_transfers_through_a_tool(tmp_path: Path) -> None:
    personas = one_persona(tmp_path, voice="verse", transfer_targets={"sales": "+14155550123"})
    async with (FakeOpenAI() as openai,
                FakeRealtime(replies=["Hi.", {"tool": "transfer_call", "arguments": {"target": "sales"}}],
                             transcripts=["sales please"]) as fake,
                FakeTwilioREST(ACCOUNT_SID, AUTH_TOKEN) as twilio):
        async with running_gateway(realtime_config(openai, fake, twilio.base_url, personas_file=personas)) as url:
            call = await dial(url, twilio)
            await call.wait_quiet(300, timeout=10)
            await call.speak(speech_pcm("Sales please.", 8000))
            await call.wait_closed(10)
            [session] = fake.state.sessions
            assert session["audio"]["output"]["voice"] == "verse"
            assert [t["name"] for t in session["tools"]] == ["transfer_call"]
            assert session["tools"][0]["parameters"]["properties"]["target"]["enum"] == ["sales"]
            assert twilio.updates == [(call.call_sid, "<Response><Dial>+14155550123</Dial></Response>")]
            assert fake.state.problems == []
            await call.close()


@pytest.mark.parametrize(("tool", "arguments", "output"), [
    ("send_dtmf", {"digits": "5"}, "Sent the keypad tones 5."),                         # a built-in
    ("lookup_booking", {"ref": "AB12"}, "Booking AB12: confirmed, two nights from May 3."),   # a real MCP server's
])
async def test_a_tool_result_goes_back_to_the_model(tmp_path: Path, tool: str, arguments: dict[str, Any],
                                                    output: str) -> None:
    """The same tool registry as the cascade's: offered as session tools, run by the tool runner, the
    result sent back as the function call's output and answered."""
    from tests.gateway.calls.test_call_tools import MCP

    setup = ({"personas_file": one_persona(tmp_path, builtin_tools=["send_dtmf"])} if tool == "send_dtmf"
             else {"mcp": MCP})
    async with (FakeOpenAI() as openai,
                FakeRealtime(replies=["Hi.", {"tool": tool, "arguments": arguments}, "Done."],
                             transcripts=["press five for sales"]) as fake,
                FakeTwilioREST(ACCOUNT_SID, AUTH_TOKEN) as twilio):
        async with running_gateway(realtime_config(openai, fake, twilio.base_url, **setup)) as url:
            call = await dial(url, twilio)
            await call.wait_quiet(300, timeout=10)
            end = await call.speak(speech_pcm("Press five for sales.", 8000))
            await call.wait_audio(after=end, timeout=5)
            async with asyncio.timeout(10):
                while fake.state.events.count("response.create") < 2 or not fake.state.tool_outputs:
                    await asyncio.sleep(0.05)
            assert tool in [t["name"] for t in fake.state.sessions[0]["tools"]]
            assert [o["output"] for o in fake.state.tool_outputs] == [output]
            await call.wait_quiet(300)
            assert fake.state.problems == []
            await call.hang_up()


async def test_provider_error_mid_response_apologises_and_ends() -> None:
    async with (FakeOpenAI(tts_ms_per_char=10) as openai,
                FakeRealtime(replies=[GREETING, {"text": LONG, "error_after_ms": 500}],
                             transcripts=["what is on the menu"]) as fake,
                FakeTwilioREST(ACCOUNT_SID, AUTH_TOKEN) as twilio):
        async with running_gateway(realtime_config(openai, fake, twilio.base_url)) as url:
            call = await dial(url, twilio)
            await call.wait_quiet(300, timeout=10)
            end = await call.speak(speech_pcm("What is on the menu?", 8000))
            await call.wait_closed(timeout=15)
            assert openai.state.tts_requests[-1]["input"] == APOLOGY        # said by TTS, not the failed session
            assert sum(n for t, n in call.received.media if t > end) >= 8000 * 0.5
            assert twilio.ended_calls == [call.call_sid]                   # hung up through the REST API
            async with httpx.AsyncClient() as http:
                metrics = (await http.get(f"{url}/metrics")).text
            assert 'reason="provider_failed"' in metrics
            assert fake.state.problems == []
            await call.close()


async def test_browser_ws_call_uses_pcm24k_and_reports_transcripts() -> None:
    async with (FakeOpenAI() as openai,
                FakeRealtime(replies=[GREETING, LONG], transcripts=["what is on the menu"],
                             audio_format="audio/pcm") as fake):
        async with running_gateway(realtime_config(openai, fake, "http://127.0.0.1:9")) as url:
            client = await open_session(url)
            await client.event("ready")
            await client.event("transcript", role="assistant", text=GREETING)
            await client.quiet(300)
            assert fake.state.sessions[0]["audio"]["input"]["format"] == {"type": "audio/pcm", "rate": 24000}
            end = await client.speak(ms=800)
            await client.event("transcript", role="user", text="what is on the menu")
            await client.audio_after(end)
            await asyncio.sleep(1.0)
            mark = time.monotonic()
            await client.ws.send(json.dumps({"type": "interrupt"}))
            interrupted = await client.event("interrupted", after=mark, timeout=2)
            assert interrupted["heard"] and LONG.startswith(interrupted["heard"]) and interrupted["heard"] != LONG
            await asyncio.sleep(0.5)
            [truncate] = fake.state.truncates
            assert 700 < truncate["audio_end_ms"] < truncate["sent_ms"]
            assert "response.cancel" in fake.state.events
            await client.ws.send(json.dumps({"type": "end"}))
            await client.closed_with()
            assert fake.state.problems == []


@pytest.mark.parametrize("carrier", ["telnyx", "vonage", "plivo", "exotel"])
async def test_every_carriers_codec_reaches_the_model_and_back(carrier: str) -> None:
    """µ-law legs (Telnyx, Plivo) go to the model as ``audio/pcmu`` untouched; Exotel's 8 kHz PCM is
    encoded to µ-law; Vonage's 16 kHz PCM is resampled to the model's 24 kHz PCM."""
    from tests.carriers.test_conformance import CARRIERS

    gateway_creds, caller_creds = CARRIERS[carrier]
    async with (FakeOpenAI() as openai,
                FakeRealtime(replies=[GREETING, "Sure. For what time?"], transcripts=["book a table"],
                             audio_format="audio/pcm" if carrier == "vonage" else "audio/pcmu") as fake):
        config = phone_config(openai.base_url, "http://127.0.0.1:9", llm_provider="realtime", carrier=carrier,
                              base_urls={"openai": openai.base_url, "realtime": fake.base_url},
                              carriers={carrier: gateway_creds})
        async with running_gateway(config) as url:
            call = SimulatedCall(gateway=url, public_url=PUBLIC_URL, carrier=carrier, credentials=caller_creds)
            assert (await call.dial()).status_code == 200
            await call.connect()
            await call.wait_audio(after=0, timeout=5)              # the greeting, in the model's voice
            await call.wait_quiet(300, timeout=10)
            before = fake.state.input_ms
            end = await call.speak(speech_pcm("I would like to book a table for two.", 8000))
            await call.wait_audio(after=end, timeout=5)            # the answer
            wanted = {"type": "audio/pcm", "rate": 24000} if carrier == "vonage" else {"type": "audio/pcmu"}
            assert fake.state.sessions[0]["audio"]["input"]["format"] == wanted
            assert fake.state.input_ms - before > 1000             # the caller's speech reached the model
            assert fake.state.problems == [] and call.received.invalid == []
            await call.hang_up()


async def test_a_sessions_context_becomes_the_instructions_and_the_first_items() -> None:
    """A browser's (or ``/calls``') context: its system message is the session's instructions, the earlier
    turns are conversation items before the greeting, as the cascade keeps them in its messages."""
    context = {"messages": [{"role": "system", "content": "You are Ada, who books tables."},
                            {"role": "user", "content": "My name is Sam."},
                            {"role": "assistant", "content": "Hello Sam."}]}
    async with (FakeOpenAI() as openai,
                FakeRealtime(replies=[GREETING], transcripts=[], audio_format="audio/pcm") as fake):
        async with running_gateway(realtime_config(openai, fake, "http://127.0.0.1:9")) as url:
            client = await open_session(url, context=context)
            await client.event("ready")
            await client.event("transcript", role="assistant", text=GREETING)
            assert fake.state.sessions[0]["instructions"] == "You are Ada, who books tables."
            assert [(m["role"], m["content"]) for m in fake.state.messages] == [
                ("user", [{"type": "input_text", "text": "My name is Sam."}]),
                ("assistant", [{"type": "output_text", "text": "Hello Sam."}])]
            assert fake.state.events.index("conversation.item.create") < fake.state.events.index("response.create")
            await client.ws.send(json.dumps({"type": "end"}))
            await client.closed_with()
            assert fake.state.problems == []


async def test_silence_prompts_in_the_models_voice_then_says_goodbye_and_hangs_up() -> None:
    prompt = ConversationSettings().silence_prompt_text
    async with (FakeOpenAI() as openai,
                FakeRealtime(replies=[GREETING, prompt], transcripts=[]) as fake,
                FakeTwilioREST(ACCOUNT_SID, AUTH_TOKEN) as twilio):
        config = realtime_config(openai, fake, twilio.base_url, silence_prompt_secs=1.0, silence_hangup_secs=1.0,
                                 goodbye_text="Goodbye for now.")
        async with running_gateway(config) as url:
            call = await dial(url, twilio)
            await call.wait_closed(timeout=20)
            assert [r.get("instructions", "") for r in fake.state.responses][1].endswith(prompt)
            assert openai.state.tts_requests[-1]["input"] == "Goodbye for now."     # last words by TTS
            async with httpx.AsyncClient() as http:
                metrics = (await http.get(f"{url}/metrics")).text
            assert 'reason="silence"' in metrics
            assert fake.state.problems == []
            await call.close()
