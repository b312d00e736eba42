"""HTTP routes of a real gateway on 127.0.0.1: health, readiness, metrics, the carrier webhook (signatures,
unknown/unconfigured carriers, TwiML answer) and the sessions API (inspect, auth, end a live call).

Providers are the fake OpenAI server and hang-ups go to the fake Twilio REST API (design.md §3)."""

from __future__ import annotations

import asyncio
import logging
import re
import xml.etree.ElementTree as ET
from typing import Any

import httpx
import numpy as np
import pytest
import websockets
from prometheus_client.parser import text_string_to_metric_families
from twilio.request_validator import RequestValidator

from gateway.simulate.call import SimulatedCall
from tests.conftest import ACCOUNT_SID, AUTH_TOKEN, PUBLIC_URL, phone_config, running_gateway
from tests.fakes.openai_server import FakeOpenAI
from tests.fakes.twilio_rest import FakeTwilioREST

pytestmark = pytest.mark.asyncio

SESSION_ID = re.compile(r"^[A-Za-z0-9_-]{32,}$")
API_KEY = "server-api-key-for-tests"


# ------------------------------------------------------------------------------------------ helpers
def tone(seconds: float = 0.8, rate: int = 8000, freq: float = 440.0, amp: float = 0.3) -> bytes:
    """A loud sine (PCM16 mono): the energy VAD hears it as speech."""
    t = np.arange(int(seconds * rate)) / rate
    return (amp * 32767 * np.sin(2 * np.pi * freq * t)).astype("<i2").tobytes()


def new_call(url: str, twilio: FakeTwilioREST, **kw: Any) -> SimulatedCall:
    call = SimulatedCall(gateway=url, public_url=PUBLIC_URL, auth_token=AUTH_TOKEN, account_sid=ACCOUNT_SID, **kw)
    twilio.known_calls = twilio.known_calls | {call.call_sid}
    return call


def webhook_params(call_sid: str = "CA" + "a" * 32, **extra: str) -> dict[str, str]:
    return {"CallSid": call_sid, "AccountSid": ACCOUNT_SID, "From": "+14155550199", "To": "+14155550100",
            "CallStatus": "ringing", "Direction": "inbound", "ApiVersion": "2010-04-01", **extra}


def sign(url: str, params: dict[str, str], token: str = AUTH_TOKEN) -> str:
    return RequestValidator(token).compute_signature(url, params)


def metric(text: str, sample: str, **labels: str) -> float | None:
    """The value of one sample in a Prometheus text exposition (None when absent)."""
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return None


async def wait_metric(http: httpx.AsyncClient, url: str, sample: str, at_least: float = 1.0,
                      timeout: float = 5.0, **labels: str) -> float:
    async with asyncio.timeout(timeout):
        while True:
            value = metric((await http.get(f"{url}/metrics")).text, sample, **labels)
            if value is not None and value >= at_least:
                return value
            await asyncio.sleep(0.05)


def parse_twiml(text: str) -> tuple[str, dict[str, str]]:
    root = ET.fromstring(text)
    assert root.tag == "Response"
    stream = root.find("./Connect/Stream")
    assert stream is not None, text
    return stream.attrib["url"], {p.attrib["name"]: p.attrib["value"] for p in stream.findall("Parameter")}


# ------------------------------------------------------------------------------------------ health, ready, metrics
async def test_health_ready_and_metrics_names() -> None:
    async with (FakeOpenAI(tts_ms_per_char=10) as fake, FakeTwilioREST(ACCOUNT_SID, AUTH_TOKEN) as twilio):
        async with running_gateway(phone_config(fake.base_url, twilio.base_url)) as url, httpx.AsyncClient() as http:
            health = await http.get(f"{url}/health")
            assert health.status_code == 200
            assert health.json() == {"status": "ok"}

            ready = await http.get(f"{url}/ready")
            assert ready.status_code == 200
            assert ready.json()["status"] == "ready"

            metrics = await http.get(f"{url}/metrics")
            assert metrics.status_code == 200
            assert metrics.headers["content-type"].startswith("text/plain")
            for name in ("voxray_active_calls", "voxray_calls_ended_total", "voxray_turn_latency_seconds"):
                assert name in metrics.text
            list(text_string_to_metric_families(metrics.text))   # valid exposition format


async def test_metrics_turn_latency_after_one_turn() -> None:
    async with (FakeOpenAI(transcripts=["I would like a table for two."], replies=["Sure."],
                           tts_ms_per_char=10) as fake,
                FakeTwilioREST(ACCOUNT_SID, AUTH_TOKEN) as twilio):
        async with running_gateway(phone_config(fake.base_url, twilio.base_url)) as url, httpx.AsyncClient() as http:
            call = new_call(url, twilio)
            await call.dial()
            await call.connect()
            try:
                await call.wait_audio(after=0, timeout=5)     # the greeting plays out first: a tone over it
                await call.wait_quiet(300, timeout=10)        # is no speech (Silero confirms barge-ins)
                text = (await http.get(f"{url}/metrics")).text
                assert metric(text, "voxray_active_calls", carrier="twilio") == 1.0
                end = await call.speak(tone())
                await call.wait_audio(after=end, timeout=5)
                count = await wait_metric(http, url, "voxray_turn_latency_seconds_count", stage="first_audio_out")
                assert count >= 1
                text = (await http.get(f"{url}/metrics")).text
                for stage in ("stt", "llm_first_token", "tts_first_audio"):
                    assert (metric(text, "voxray_turn_latency_seconds_count", stage=stage) or 0) >= 1
            finally:
                await call.hang_up()
            ended = await wait_metric(http, url, "voxray_calls_ended_total", carrier="twilio", reason="caller_hangup")
            assert ended == 1.0
            text = (await http.get(f"{url}/metrics")).text
            assert metric(text, "voxray_active_calls", carrier="twilio") == 0.0


# ------------------------------------------------------------------------------------------ webhook: signatures
async def test_forged_signature_is_403_logged_and_counted(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="gateway")
    async with (FakeOpenAI(tts_ms_per_char=10) as fake, FakeTwilioREST(ACCOUNT_SID, AUTH_TOKEN) as twilio):
        async with running_gateway(phone_config(fake.base_url, twilio.base_url)) as url, httpx.AsyncClient() as http:
            params = webhook_params()
            forged = sign(f"{PUBLIC_URL}/start/twilio", params, token="not-the-auth-token")
            response = await http.post(f"{url}/start/twilio", data=params, headers={"X-Twilio-Signature": forged})
            assert response.status_code == 403
            assert response.json() == {"error": "invalid signature"}
            warnings = [r for r in caplog.records if r.levelno == logging.WARNING
                        and "webhook rejected carrier=twilio" in r.getMessage()]
            assert len(warnings) == 1
            assert AUTH_TOKEN not in caplog.text
            text = (await http.get(f"{url}/metrics")).text
            assert metric(text, "voxray_webhooks_rejected_total", carrier="twilio", reason="signature") == 1.0


async def test_missing_signature_header_is_403() -> None:
    async with (FakeOpenAI(tts_ms_per_char=10) as fake, FakeTwilioREST(ACCOUNT_SID, AUTH_TOKEN) as twilio):
        async with running_gateway(phone_config(fake.base_url, twilio.base_url)) as url, httpx.AsyncClient() as http:
            response = await http.post(f"{url}/start/twilio", data=webhook_params())
            assert response.status_code == 403
            assert response.json() == {"error": "invalid signature"}


async def test_signature_over_a_different_url_is_403() -> None:
    async with (FakeOpenAI(tts_ms_per_char=10) as fake, FakeTwilioREST(ACCOUNT_SID, AUTH_TOKEN) as twilio):
        async with running_gateway(phone_config(fake.base_url, twilio.base_url)) as url, httpx.AsyncClient() as http:
            params = webhook_params()
            http_url = PUBLIC_URL.replace("https://", "http://") + "/start/twilio"
            for signed_url in (http_url, f"{url}/start/twilio", f"{PUBLIC_URL}/start"):
                response = await http.post(f"{url}/start/twilio", data=params,
                                           headers={"X-Twilio-Signature": sign(signed_url, params)})
                assert response.status_code == 403, signed_url
            # the same params signed over the configured public URL are accepted (the test above is meaningful)
            good = await http.post(f"{url}/start/twilio", data=params,
                                   headers={"X-Twilio-Signature": sign(f"{PUBLIC_URL}/start/twilio", params)})
            assert good.status_code == 200


async def test_param_tampered_after_signing_is_403() -> None:
    async with (FakeOpenAI(tts_ms_per_char=10) as fake, FakeTwilioREST(ACCOUNT_SID, AUTH_TOKEN) as twilio):
        async with running_gateway(phone_config(fake.base_url, twilio.base_url)) as url, httpx.AsyncClient() as http:
            params = webhook_params()
            signature = sign(f"{PUBLIC_URL}/start/twilio", params)
            tampered = {**params, "To": "+19005550123"}
            response = await http.post(f"{url}/start/twilio", data=tampered, headers={"X-Twilio-Signature": signature})
            assert response.status_code == 403
            added = {**params, "Extra": "1"}
            response = await http.post(f"{url}/start/twilio", data=added, headers={"X-Twilio-Signature": signature})
            assert response.status_code == 403


async def test_webhook_without_callsid_is_400() -> None:
    async with (FakeOpenAI(tts_ms_per_char=10) as fake, FakeTwilioREST(ACCOUNT_SID, AUTH_TOKEN) as twilio):
        async with running_gateway(phone_config(fake.base_url, twilio.base_url)) as url, httpx.AsyncClient() as http:
            params = {k: v for k, v in webhook_params().items() if k != "CallSid"}
            response = await http.post(f"{url}/start/twilio", data=params,
                                       headers={"X-Twilio-Signature": sign(f"{PUBLIC_URL}/start/twilio", params)})
            assert response.status_code == 400
            assert "CallSid" in response.json()["error"]
            text = (await http.get(f"{url}/metrics")).text
            assert metric(text, "voxray_webhooks_rejected_total", carrier="twilio", reason="malformed") == 1.0


# ------------------------------------------------------------------------------------------ webhook: carriers, config
async def test_unknown_carrier_is_404_listing_known_carriers() -> None:
    async with (FakeOpenAI(tts_ms_per_char=10) as fake, FakeTwilioREST(ACCOUNT_SID, AUTH_TOKEN) as twilio):
        async with running_gateway(phone_config(fake.base_url, twilio.base_url)) as url, httpx.AsyncClient() as http:
            params = webhook_params()
            response = await http.post(f"{url}/start/nope", data=params,
                                       headers={"X-Twilio-Signature": sign(f"{PUBLIC_URL}/start/nope", params)})
            assert response.status_code == 404
            body = response.json()
            assert body["known"] == ["exotel", "plivo", "telnyx", "twilio", "vonage"]
            assert "nope" in body["error"]


async def test_start_without_carrier_uses_default_twilio() -> None:
    async with (FakeOpenAI(tts_ms_per_char=10) as fake, FakeTwilioREST(ACCOUNT_SID, AUTH_TOKEN) as twilio):
        async with running_gateway(phone_config(fake.base_url, twilio.base_url)) as url:
            call = new_call(url, twilio, path="/start")
            response = await call.dial()
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/xml")
            stream_url, parameters = parse_twiml(response.text)
            assert stream_url.startswith("wss://voice.example.test/media/twilio/")
            assert parameters["session_id"] == stream_url.rsplit("/", 1)[-1]


async def test_no_public_url_is_503_naming_it() -> None:
    async with (FakeOpenAI(tts_ms_per_char=10) as fake, FakeTwilioREST(ACCOUNT_SID, AUTH_TOKEN) as twilio):
        config = phone_config(fake.base_url, twilio.base_url, public_url="")
        async with running_gateway(config) as url, httpx.AsyncClient() as http:
            params = webhook_params()
            response = await http.post(f"{url}/start/twilio", data=params,
                                       headers={"X-Twilio-Signature": sign(f"{PUBLIC_URL}/start/twilio", params)})
            assert response.status_code == 503
            assert "public_url" in response.json()["error"]


async def test_twilio_without_auth_token_is_503_naming_the_variable() -> None:
    async with (FakeOpenAI(tts_ms_per_char=10) as fake, FakeTwilioREST(ACCOUNT_SID, AUTH_TOKEN) as twilio):
        config = phone_config(fake.base_url, twilio.base_url,
                              carriers={"twilio": {"account_sid": ACCOUNT_SID, "auth_token": "",
                                                   "api_base_url": twilio.base_url}})
        async with running_gateway(config) as url, httpx.AsyncClient() as http:
            params = webhook_params()
            response = await http.post(f"{url}/start/twilio", data=params,
                                       headers={"X-Twilio-Signature": sign(f"{PUBLIC_URL}/start/twilio", params, "")})
            assert response.status_code == 503
            assert "TWILIO_AUTH_TOKEN" in response.json()["error"]


async def test_verify_signatures_false_accepts_unsigned_webhook() -> None:
    async with (FakeOpenAI(tts_ms_per_char=10) as fake, FakeTwilioREST(ACCOUNT_SID, AUTH_TOKEN) as twilio):
        config = phone_config(fake.base_url, twilio.base_url,
                              carriers={"twilio": {"account_sid": ACCOUNT_SID, "auth_token": AUTH_TOKEN,
                                                   "api_base_url": twilio.base_url, "verify_signatures": False}})
        async with running_gateway(config) as url, httpx.AsyncClient() as http:
            response = await http.post(f"{url}/start/twilio", data=webhook_params())
            assert response.status_code == 200
            stream_url, parameters = parse_twiml(response.text)
            assert stream_url == f"wss://voice.example.test/media/twilio/{parameters['session_id']}"


# ------------------------------------------------------------------------------------------ TwiML answer
async def test_twiml_answer_opens_a_stream_with_an_unguessable_session_id() -> None:
    async with (FakeOpenAI(tts_ms_per_char=10) as fake, FakeTwilioREST(ACCOUNT_SID, AUTH_TOKEN) as twilio):
        async with running_gateway(phone_config(fake.base_url, twilio.base_url)) as url, httpx.AsyncClient() as http:
            ids = []
            for n in range(2):
                params = webhook_params(call_sid=f"CA{n:032d}")
                response = await http.post(f"{url}/start/twilio", data=params,
                                           headers={"X-Twilio-Signature": sign(f"{PUBLIC_URL}/start/twilio", params)})
                assert response.status_code == 200
                assert response.headers["content-type"].startswith("text/xml")
                stream_url, parameters = parse_twiml(response.text)
                m = re.fullmatch(r"wss://voice\.example\.test/media/twilio/(?P<id>[^/?#]+)", stream_url)
                assert m is not None, stream_url
                assert SESSION_ID.match(m["id"]), m["id"]
                assert parameters["session_id"] == m["id"]
                ids.append(m["id"])
                # the session exists, pending, for that CallSid
                found = await http.get(f"{url}/sessions/{m['id']}")
                assert found.status_code == 200
                assert found.json()["call_id"] == params["CallSid"]
                assert found.json()["state"] == "pending" and found.json()["live"] is False
            assert ids[0] != ids[1]


async def test_a_call_is_answered_once_a_retry_gets_the_same_answer_a_replay_409() -> None:
    async with (FakeOpenAI(tts_ms_per_char=10) as fake, FakeTwilioREST(ACCOUNT_SID, AUTH_TOKEN) as twilio):
        async with running_gateway(phone_config(fake.base_url, twilio.base_url)) as url, httpx.AsyncClient() as http:
            call = new_call(url, twilio)
            first = await call.dial()
            retry = await http.post(f"{url}/start/twilio", data=call.webhook_params(),
                                    headers={"X-Twilio-Signature": sign(f"{PUBLIC_URL}/start/twilio",
                                                                        call.webhook_params())})
            assert retry.status_code == 200 and retry.text == first.text      # not yet claimed: the same session
            await call.connect()
            await call.wait_audio(after=0, timeout=5)
            replay = await http.post(f"{url}/start/twilio", data=call.webhook_params(),
                                     headers={"X-Twilio-Signature": sign(f"{PUBLIC_URL}/start/twilio",
                                                                         call.webhook_params())})
            assert replay.status_code == 409 and replay.json() == {"error": "this call was already answered"}
            await call.hang_up()
            after = await http.post(f"{url}/start/twilio", data=call.webhook_params(),   # ended: still refused
                                    headers={"X-Twilio-Signature": sign(f"{PUBLIC_URL}/start/twilio",
                                                                        call.webhook_params())})
            assert after.status_code == 409
            metrics = (await http.get(f"{url}/metrics")).text
            assert 'voxray_webhooks_rejected_total{carrier="twilio",reason="replay"} 2.0' in metrics
            await call.close()


# ------------------------------------------------------------------------------------------ sessions API
async def test_get_session_of_a_live_call_and_unknown_session() -> None:
    async with (FakeOpenAI(tts_ms_per_char=10) as fake, FakeTwilioREST(ACCOUNT_SID, AUTH_TOKEN) as twilio):
        async with running_gateway(phone_config(fake.base_url, twilio.base_url)) as url, httpx.AsyncClient() as http:
            call = new_call(url, twilio)
            await call.dial()
            await call.connect()
            try:
                await call.wait_audio(after=0, timeout=5)
                response = await http.get(f"{url}/sessions/{call.session_id}")
                assert response.status_code == 200
                body = response.json()
                assert body["carrier"] == "twilio"
                assert body["call_id"] == call.call_sid
                assert body["state"] == "active"
                assert body["live"] is True
                assert body["id"] == call.session_id
                missing = await http.get(f"{url}/sessions/{'x' * 32}")
                assert missing.status_code == 404
                assert "error" in missing.json()
            finally:
                await call.hang_up()


async def test_sessions_api_requires_the_server_api_key() -> None:
    async with (FakeOpenAI(tts_ms_per_char=10) as fake, FakeTwilioREST(ACCOUNT_SID, AUTH_TOKEN) as twilio):
        config = phone_config(fake.base_url, twilio.base_url, server_api_key=API_KEY)
        async with running_gateway(config) as url, httpx.AsyncClient() as http:
            call = new_call(url, twilio)
            assert (await call.dial()).status_code == 200     # carrier routes are not behind the API key
            sid = call.session_id
            assert (await http.get(f"{url}/sessions/{sid}")).status_code == 401
            wrong = await http.get(f"{url}/sessions/{sid}", headers={"Authorization": "Bearer wrong-key"})
            assert wrong.status_code == 401
            assert "error" in wrong.json()
            assert (await http.delete(f"{url}/sessions/{sid}")).status_code == 401
            good = await http.get(f"{url}/sessions/{sid}", headers={"Authorization": f"Bearer {API_KEY}"})
            assert good.status_code == 200
            assert good.json()["call_id"] == call.call_sid
            # an unauthorised DELETE did not end it
            assert good.json()["state"] == "pending"


async def test_delete_session_ends_the_live_call() -> None:
    async with (FakeOpenAI(tts_ms_per_char=10) as fake, FakeTwilioREST(ACCOUNT_SID, AUTH_TOKEN) as twilio):
        async with running_gateway(phone_config(fake.base_url, twilio.base_url)) as url, httpx.AsyncClient() as http:
            call = new_call(url, twilio)
            await call.dial()
            await call.connect()
            try:
                await call.wait_audio(after=0, timeout=5)
                response = await http.delete(f"{url}/sessions/{call.session_id}")
                assert response.status_code == 200
                assert response.json() == {"ended": call.session_id}
                await call.wait_closed(timeout=5)                # the server closed the media socket
                assert call.close_code == 1000
                assert twilio.ended_calls == [call.call_sid]    # hung up through the carrier's REST API
                async with asyncio.timeout(2):
                    while (await http.get(f"{url}/sessions/{call.session_id}")).status_code != 404:
                        await asyncio.sleep(0.02)
                text = await wait_metric(http, url, "voxray_calls_ended_total", carrier="twilio",
                                         reason="ended_by_api")
                assert text == 1.0
            finally:
                await call.close()


async def test_get_right_after_delete_is_404() -> None:
    async with (FakeOpenAI(tts_ms_per_char=10) as fake, FakeTwilioREST(ACCOUNT_SID, AUTH_TOKEN) as twilio):
        async with running_gateway(phone_config(fake.base_url, twilio.base_url)) as url, httpx.AsyncClient() as http:
            call = new_call(url, twilio)
            await call.dial()
            await call.connect()
            try:
                await call.wait_audio(after=0, timeout=5)
                assert (await http.delete(f"{url}/sessions/{call.session_id}")).status_code == 200
                after = await http.get(f"{url}/sessions/{call.session_id}")
                assert after.status_code == 404, after.text
            finally:
                await call.close()


async def test_delete_pending_session_refuses_its_media_socket() -> None:
    async with (FakeOpenAI(tts_ms_per_char=10) as fake, FakeTwilioREST(ACCOUNT_SID, AUTH_TOKEN) as twilio):
        async with running_gateway(phone_config(fake.base_url, twilio.base_url)) as url, httpx.AsyncClient() as http:
            call = new_call(url, twilio)
            await call.dial()
            response = await http.delete(f"{url}/sessions/{call.session_id}")
            assert response.status_code == 200
            assert (await http.get(f"{url}/sessions/{call.session_id}")).status_code == 404
            assert (await http.delete(f"{url}/sessions/{call.session_id}")).status_code == 404
            async with websockets.connect(call.media_url) as ws:
                with pytest.raises(websockets.ConnectionClosed) as closed:
                    async with asyncio.timeout(5):
                        while True:
                            await ws.recv()
            assert closed.value.rcvd is not None
            assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (1008, "unknown, used or expired session")


async def test_a_known_carrier_without_credentials_is_503_naming_its_variables() -> None:
    async with (FakeOpenAI(tts_ms_per_char=10) as fake, FakeTwilioREST(ACCOUNT_SID, AUTH_TOKEN) as twilio):
        async with running_gateway(phone_config(fake.base_url, twilio.base_url)) as url, httpx.AsyncClient() as http:
            for carrier, variable in (("telnyx", "TELNYX_PUBLIC_KEY"), ("vonage", "VONAGE_SIGNATURE_SECRET"),
                                      ("plivo", "PLIVO_AUTH_TOKEN"), ("exotel", "basic_auth_password")):
                response = await http.post(f"{url}/start/{carrier}", data={"CallSid": "x"})
                assert response.status_code == 503 and variable in response.json()["error"], carrier
