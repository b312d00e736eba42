"""One conformance suite every carrier adapter passes: an emulated carrier speaking that carrier's
real protocol (gateway/simulate/dialects/<carrier>.py) performs signed webhook -> answer parse -> media
socket handshake -> audio both ways -> barge-in flush -> marker acknowledgement -> DTMF -> stop
against a real gateway on 127.0.0.1 whose providers are the fake OpenAI server."""

from __future__ import annotations

import asyncio
import base64
import time
from typing import Any

import httpx
import pytest
from nacl.signing import SigningKey

from gateway.config import Config
from gateway.simulate.call import SimulatedCall, synthetic_voice
from pipeline.audio import rms
from tests.conftest import PUBLIC_URL, running_gateway
from tests.fakes.openai_server import FakeOpenAI
from tests.speech import speech_pcm

pytestmark = pytest.mark.asyncio

TELNYX_SEED = base64.b64encode(bytes(range(32))).decode()
TELNYX_PUBLIC = base64.b64encode(bytes(SigningKey(bytes(range(32))).verify_key)).decode()

# (gateway carriers.<name> settings, the emulated carrier's credentials)
CARRIERS: dict[str, tuple[dict[str, Any], dict[str, str]]] = {
    "twilio": ({"account_sid": "AC" + "1" * 32, "auth_token": "tw-token"},
               {"account_sid": "AC" + "1" * 32, "auth_token": "tw-token"}),
    "telnyx": ({"api_key": "KEY-telnyx", "public_key": TELNYX_PUBLIC},
               {"signing_key": TELNYX_SEED}),
    "vonage": ({"application_id": "aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee", "signature_secret": "vonage-secret"},
               {"application_id": "aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee", "signature_secret": "vonage-secret"}),
    "plivo": ({"auth_id": "MAXXXXXXXXXXXXXXXXXX", "auth_token": "plivo-token"},
              {"auth_id": "MAXXXXXXXXXXXXXXXXXX", "auth_token": "plivo-token"}),
    "exotel": ({"sid": "voxray1", "api_key": "k", "api_token": "t", "basic_auth_user": "exo",
                "basic_auth_password": "exo-pass"},
               {"sid": "voxray1", "basic_auth_user": "exo", "basic_auth_password": "exo-pass"}),
}

LONG = ("Here is the whole story of our opening hours. We open at nine. We close at six. "
        "On Saturdays we open at ten. On Sundays we stay closed all day long.")


API_KEY = "conformance-test-key-0123456789"
AUTH = {"Authorization": f"Bearer {API_KEY}"}


def config_for(carrier: str, openai_url: str) -> Config:
    return Config.from_mapping({
        "public_url": PUBLIC_URL, "carrier": carrier, "provider": "openai", "api_keys": {"openai": "sk-test"},
        "base_urls": {"openai": openai_url}, "carriers": {carrier: CARRIERS[carrier][0]}, "vad_stop_ms": 300,
        "stt_timeout_secs": 3, "llm_timeout_secs": 3, "tts_timeout_secs": 3, "server_api_key": API_KEY}, environ={})


@pytest.mark.parametrize("carrier", sorted(CARRIERS))
async def test_a_whole_call(carrier: str) -> None:
    async with FakeOpenAI(transcripts=["when are you open", "thanks"], replies=[LONG, "You are welcome."],
                          tts_ms_per_char=25) as fake:
        async with running_gateway(config_for(carrier, fake.base_url)) as url:
            call = SimulatedCall(gateway=url, public_url=PUBLIC_URL, carrier=carrier,
                                 credentials=CARRIERS[carrier][1], to="+14155550100")
            # a forged webhook is refused before anything else happens
            async with httpx.AsyncClient(headers=AUTH) as http:
                forged = await http.post(f"{url}/start/{carrier}", content=b"CallSid=CA1&From=%2B1&To=%2B1",
                                         headers={"content-type": "application/x-www-form-urlencoded"})
            assert forged.status_code == 403, forged.text

            answer = await call.dial()
            assert answer.status_code == 200, answer.text
            assert call.media_url.split("?")[0].endswith(f"/media/{carrier}/{call.session_id}")
            await call.connect()

            # audio out: the greeting
            await call.wait_audio(after=0, timeout=10)
            await call.wait_quiet(400, timeout=10)
            assert fake.state.tts_requests[1]["input"] == "Hello! How can I help you today?"

            # audio in -> answer out; barge-in flushes the carrier's buffer
            end = await call.speak(synthetic_voice(1.0))
            await call.wait_audio(after=end, timeout=10)
            await asyncio.sleep(1.5)
            assert call.playing()
            barge_at = time.monotonic()
            barge = asyncio.create_task(call.speak(speech_pcm("Thanks, that is all.", 8000)))  # speech: Silero confirms
            assert await call.wait_clear(timeout=5) - barge_at < 1.0
            end = await barge
            await call.wait_audio(after=end, timeout=10)
            await call.wait_quiet(400, timeout=10)

            # markers: played clauses were acknowledged, and the context holds only what was heard
            assert call.received.marks, "the carrier acknowledged no marker"
            heard = [m["content"] for m in fake.state.llm_requests[-1]["messages"] if m["role"] == "assistant"][-1]
            assert heard and LONG.startswith(heard) and len(heard) < len(LONG)

            # DTMF reaches the model as the caller's input
            await call.dtmf("7")
            await call.dtmf("#")
            async with asyncio.timeout(5):
                while fake.state.llm_requests[-1]["messages"][-1]["content"] != "[DTMF] 7":
                    await asyncio.sleep(0.05)
            await call.wait_audio(after=time.monotonic() - 0.01, timeout=10)

            # the carrier ends the stream: the gateway finalises and forgets the session
            await call.hang_up()
            async with httpx.AsyncClient(headers=AUTH) as http:
                async with asyncio.timeout(5):
                    while (await http.get(f"{url}/sessions/{call.session_id}")).status_code != 404:
                        await asyncio.sleep(0.05)
                metrics = (await http.get(f"{url}/metrics")).text
            assert f'voxray_calls_ended_total{{carrier="{carrier}",reason="caller_hangup"}} 1.0' in metrics
            assert call.received.invalid == [], call.received.invalid[:3]


@pytest.mark.parametrize("carrier", sorted(CARRIERS))
async def test_the_persona_follows_the_dialed_number_and_the_webhook_parameters(carrier: str, tmp_path: Any) -> None:
    import json

    personas = tmp_path / "personas.json"
    personas.write_text(json.dumps({
        "personas": {"desk": {"system": "You are the front desk.", "greeting": "Front desk, hello."},
                     "sales": {"system": "You sell.", "greeting": "Sales team here."}},
        "numbers": {"+14155550100": "desk"}}))
    async with FakeOpenAI(tts_ms_per_char=10) as fake:
        config = config_for(carrier, fake.base_url)
        config = Config.from_mapping({**_raw(config, carrier), "personas_file": str(personas)}, environ={})
        async with running_gateway(config) as url:
            for to, path, greeting in (("+14155550100", f"/start/{carrier}", "Front desk, hello."),
                                       ("+14155550999", f"/start/{carrier}?persona=sales", "Sales team here.")):
                call = SimulatedCall(gateway=url, public_url=PUBLIC_URL, carrier=carrier,
                                     credentials=CARRIERS[carrier][1], to=to, path=path)
                assert (await call.dial()).status_code == 200
                await call.connect()
                await call.wait_audio(after=0, timeout=10)
                assert fake.state.tts_requests[-1]["input"] == greeting, (carrier, path)
                await call.hang_up()


def _raw(config: Config, carrier: str) -> dict[str, Any]:
    return {"public_url": config.public_url, "carrier": carrier, "provider": "openai",
            "api_keys": {"openai": "sk-test"}, "base_urls": dict(config.base_urls),
            "carriers": {carrier: CARRIERS[carrier][0]}, "vad_stop_ms": 300}


# The most audio one message carries at the default outbound_message_ms (60): as much where the carrier plays
# longer messages, one 20 ms frame for Vonage, Exotel's own 200 ms chunk (8 kHz) paced one by one.
LONGEST_MESSAGE_MS = {"twilio": 60, "telnyx": 60, "plivo": 60, "vonage": 20, "exotel": 200}


@pytest.mark.parametrize("carrier", sorted(CARRIERS))
async def test_the_agents_audio_goes_in_messages_as_long_as_the_carriers_rules_allow(carrier: str) -> None:
    """The playout merges queued frames into messages of up to ``outbound_message_ms`` where the carrier plays
    longer ones, and keeps each carrier's own frame where it does not; the greeting plays whole and valid."""
    async with FakeOpenAI(transcripts=["x"], replies=["y"], tts_ms_per_char=25) as fake:
        config = config_for(carrier, fake.base_url)
        async with running_gateway(config) as url:
            call = SimulatedCall(gateway=url, public_url=PUBLIC_URL, carrier=carrier,
                                 credentials=CARRIERS[carrier][1], to="+14155550100")
            assert (await call.dial()).status_code == 200
            await call.connect()
            try:
                await call.wait_audio(after=0, timeout=10)      # the greeting
                await call.wait_quiet(400, timeout=10)
            finally:
                await call.close()
    media = call.received.media
    frame = call.rate * call.dialect.frame_ms // 1000
    longest = call.rate * LONGEST_MESSAGE_MS[carrier] // 1000
    sizes = [samples for _, samples in media]
    assert sum(sizes) >= call.rate // 2                        # the whole greeting (0.8 s)
    assert max(sizes) == longest and sizes.count(longest) >= len(sizes) // 2, sizes[:20]
    assert all(s % frame == 0 for s in sizes[:-1])            # whole frames (all but a tail Twilio plays as is)
    assert call.received.invalid == [] and rms(bytes(call.received.audio)) > 0.05
