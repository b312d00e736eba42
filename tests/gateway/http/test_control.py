"""Call control over real sockets: transfer (API and LLM tool), DTMF out, outbound calls, AMD callbacks."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import numpy as np
import pytest
from twilio.request_validator import RequestValidator

from gateway.simulate.call import SimulatedCall, synthetic_voice
from tests.conftest import ACCOUNT_SID, AUTH_TOKEN, PUBLIC_URL, greeted_call, phone_config, running_gateway
from tests.fakes.openai_server import FakeOpenAI
from tests.fakes.twilio_rest import FakeTwilioREST

pytestmark = pytest.mark.asyncio

KEY = "server-key-123"
AUTH = {"Authorization": f"Bearer {KEY}"}


async def live_call(url: str, twilio: FakeTwilioREST) -> SimulatedCall:
    return await greeted_call(url, twilio, quiet_ms=300)


def signed_event(path: str, params: dict[str, str]) -> dict[str, str]:
    return {"X-Twilio-Signature": RequestValidator(AUTH_TOKEN).compute_signature(PUBLIC_URL + path, params)}


async def test_transfer_through_the_api_redirects_the_call_without_hanging_up() -> None:
    async with FakeOpenAI(tts_ms_per_char=10) as fake, FakeTwilioREST(ACCOUNT_SID, AUTH_TOKEN) as twilio:
        async with running_gateway(phone_config(fake.base_url, twilio.base_url, server_api_key=KEY)) as url:
            call = await live_call(url, twilio)
            async with httpx.AsyncClient(base_url=url) as http:
                path = f"/sessions/{call.session_id}/transfer"
                assert (await http.post(path, json={"to": "+14155550123"})).status_code == 401
                assert (await http.post(path, json={"to": "call mom"}, headers=AUTH)).status_code == 400
                assert (await http.post("/sessions/nope/transfer", json={"to": "+14155550123"},
                                        headers=AUTH)).status_code == 404
                done = await http.post(path, json={"to": "+14155550123"}, headers=AUTH)
                assert done.status_code == 200 and done.json() == {"transferred": call.session_id}
                await call.wait_closed(5)
                metrics = (await http.get("/metrics")).text
            assert twilio.updates == [(call.call_sid, "<Response><Dial>+14155550123</Dial></Response>")]
            assert twilio.ended_calls == []                      # a transferred call is not hung up
            assert 'reason="transferred"' in metrics
            await call.close()


async def test_the_model_transfers_only_to_the_personas_named_targets(tmp_path: Path) -> None:
    personas = tmp_path / "personas.json"
    personas.write_text(json.dumps({"personas": {"desk": {"system": "You are a front desk.", "greeting": "Hi.",
                                                          "transfer_targets": {"sales": "+14155550123"}}},
                                    "numbers": {"default": "desk"}}))
    replies = [{"content": "Let me transfer you.", "tool_calls": [{"name": "transfer_call",
                                                                   "arguments": {"target": "ceo"}}]},
               "Sorry, I can only transfer you to sales.",     # the model is told "ceo" is not a target
               {"content": "One moment.", "tool_calls": [{"name": "transfer_call", "arguments": {"target": "sales"}}]}]
    async with (FakeOpenAI(transcripts=["the boss please", "sales please"], replies=replies,
                           tts_ms_per_char=10) as fake,
                FakeTwilioREST(ACCOUNT_SID, AUTH_TOKEN) as twilio):
        config = phone_config(fake.base_url, twilio.base_url, personas_file=str(personas))
        async with running_gateway(config) as url:
            call = await live_call(url, twilio)
            end = await call.speak(synthetic_voice(0.8))
            await call.wait_audio(after=end, timeout=5)
            await call.wait_quiet(300)
            assert twilio.updates == []                          # "ceo" is not a target: nothing happens
            end = await call.speak(synthetic_voice(0.8))
            await call.wait_closed(10)
            refusal = fake.state.llm_requests[1]["messages"][-1]
            assert refusal["role"] == "tool" and "invalid arguments" in refusal["content"] and "ceo" in refusal["content"]
            tools = fake.state.llm_requests[0]["tools"]
            assert tools[0]["function"]["parameters"]["properties"]["target"]["enum"] == ["sales"]
            assert twilio.updates == [(call.call_sid, "<Response><Dial>+14155550123</Dial></Response>")]
            assert "One moment." in [r["input"] for r in fake.state.tts_requests]
            # the sentence before the transfer was played to the end first
            assert sum(n for t, n in call.received.media if t > end) >= 8000 * len("One moment.") * 10 // 1000
            await call.close()


async def test_dtmf_out_is_played_in_band_on_twilio() -> None:
    async with FakeOpenAI(tts_ms_per_char=10) as fake, FakeTwilioREST(ACCOUNT_SID, AUTH_TOKEN) as twilio:
        async with running_gateway(phone_config(fake.base_url, twilio.base_url)) as url:
            call = await live_call(url, twilio)
            before = len(call.received.audio)
            async with httpx.AsyncClient(base_url=url) as http:
                bad = await http.post(f"/sessions/{call.session_id}/dtmf", json={"digits": "12x"})
                assert bad.status_code == 400
                sent = await http.post(f"/sessions/{call.session_id}/dtmf", json={"digits": "5"})
            assert sent.json() == {"sent": "in-band"}
            await call.wait_quiet(300)
            tone = np.frombuffer(bytes(call.received.audio[before:before + 1600]), "<i2").astype(float)
            spectrum = np.abs(np.fft.rfft(tone))
            peaks = sorted(np.fft.rfftfreq(len(tone), 1 / 8000)[np.argsort(spectrum)[-2:]])
            assert abs(peaks[0] - 770) < 15 and abs(peaks[1] - 1336) < 15      # the Q.23 pair of "5"
            await call.hang_up()


async def test_outbound_call_streams_into_the_pipeline_and_amd_machine_hangs_up() -> None:
    async with FakeOpenAI(tts_ms_per_char=10) as fake, FakeTwilioREST(ACCOUNT_SID, AUTH_TOKEN) as twilio:
        async with running_gateway(phone_config(fake.base_url, twilio.base_url)) as url:
            async with httpx.AsyncClient(base_url=url) as http:
                bad = await http.post("/calls", json={"carrier": "twilio", "to": "nobody", "from": "+14155550100"})
                assert bad.status_code == 400
                placed = await http.post("/calls", json={"carrier": "twilio", "to": "+14155550123",
                                                         "from": "+14155550100", "machine_detection": True})
                assert placed.status_code == 201
                session_id, call_id = placed.json()["session_id"], placed.json()["call_id"]
                [dialed] = twilio.dialed
                assert (dialed["To"], dialed["From"]) == ("+14155550123", "+14155550100")
                assert (dialed["MachineDetection"], dialed["AsyncAmd"]) == ("Enable", "true")
                events_path = f"/events/twilio/{session_id}"
                assert dialed["AsyncAmdStatusCallback"] == PUBLIC_URL + events_path
                assert f"wss://voice.example.test/media/twilio/{session_id}" in dialed["Twiml"]

                # the callee answers: Twilio runs the inline TwiML and opens the stream
                call = SimulatedCall(gateway=url, public_url=PUBLIC_URL, auth_token=AUTH_TOKEN,
                                     account_sid=ACCOUNT_SID)
                call.adopt(dialed["Twiml"], call_id)
                await call.connect()
                await call.wait_audio(after=0, timeout=5)       # the greeting plays to the callee

                forged = await http.post(events_path, data={"CallSid": call_id, "AnsweredBy": "machine_start"},
                                         headers={"X-Twilio-Signature": "bm9wZQ=="})
                assert forged.status_code == 403
                params = {"CallSid": call_id, "AccountSid": ACCOUNT_SID, "AnsweredBy": "machine_start"}
                amd = await http.post(events_path, data=params, headers=signed_event(events_path, params))
                assert amd.status_code == 204
                await call.wait_closed(5)
            assert twilio.ended_calls == [call_id]               # a machine: hung up through REST
            await call.close()


async def test_amd_message_action_leaves_the_voicemail_before_hanging_up() -> None:
    async with FakeOpenAI(tts_ms_per_char=10) as fake, FakeTwilioREST(ACCOUNT_SID, AUTH_TOKEN) as twilio:
        config = phone_config(fake.base_url, twilio.base_url, amd_action="message",
                              voicemail_text="Please call us back.")
        async with running_gateway(config) as url, httpx.AsyncClient(base_url=url) as http:
            placed = (await http.post("/calls", json={"to": "+14155550123", "from": "+14155550100",
                                                      "machine_detection": True})).json()
            call = SimulatedCall(gateway=url, public_url=PUBLIC_URL, auth_token=AUTH_TOKEN, account_sid=ACCOUNT_SID)
            call.adopt(twilio.dialed[0]["Twiml"], placed["call_id"])
            await call.connect()
            await call.wait_audio(after=0, timeout=5)
            path = f"/events/twilio/{placed['session_id']}"
            params = {"CallSid": placed["call_id"], "AnsweredBy": "machine_end_beep"}
            assert (await http.post(path, data=params, headers=signed_event(path, params))).status_code == 204
            await call.wait_closed(10)
            assert fake.state.tts_requests[-1]["input"] == "Please call us back."
            assert twilio.ended_calls == [placed["call_id"]]
            await call.close()


async def test_an_unanswered_outbound_call_releases_its_session() -> None:
    async with FakeOpenAI() as fake, FakeTwilioREST(ACCOUNT_SID, AUTH_TOKEN) as twilio:
        async with running_gateway(phone_config(fake.base_url, twilio.base_url)) as url, \
                httpx.AsyncClient(base_url=url) as http:
            placed = (await http.post("/calls", json={"to": "+14155550123", "from": "+14155550100"})).json()
            path = f"/events/twilio/{placed['session_id']}"
            params = {"CallSid": placed["call_id"], "CallStatus": "no-answer"}
            assert (await http.post(path, data=params, headers=signed_event(path, params))).status_code == 204
            assert (await http.get(f"/sessions/{placed['session_id']}")).status_code == 404
            await asyncio.sleep(0)
