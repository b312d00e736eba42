"""JSON nested 100,000 deep, sent to every JSON route of a real gateway: a clear 400, never a 500 (json.loads
raised RecursionError, which the handlers did not catch), and the gateway keeps answering."""

from __future__ import annotations

import httpx
import pytest

from gateway.simulate.dialects.vonage import VonageDialect
from tests.conftest import ACCOUNT_SID, AUTH_TOKEN, phone_config, running_gateway
from tests.fakes.openai_server import FakeOpenAI

pytestmark = pytest.mark.asyncio

API_KEY = "server-api-key-for-tests"
VONAGE = {"application_id": "aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee", "signature_secret": "vonage-secret-" + "x" * 20}
# 100,000 levels, valid JSON, and under max_request_body_bytes (so the parser, not the body limit, refuses it)
DEEP = ('{"a":' * 10_000 + "[" * 90_000 + "1" + "]" * 90_000 + "}" * 10_000).encode()
JSON = {"content-type": "application/json", "authorization": f"Bearer {API_KEY}"}


async def test_deep_json_is_a_400_everywhere_and_the_gateway_lives_on() -> None:
    async with FakeOpenAI() as fake:
        config = phone_config(fake.base_url, "http://127.0.0.1:9", server_api_key=API_KEY, carriers={
            "twilio": {"account_sid": ACCOUNT_SID, "auth_token": AUTH_TOKEN}, "vonage": VONAGE})
        async with running_gateway(config) as url, httpx.AsyncClient(base_url=url, timeout=10) as http:
            browser = await http.post("/start", content=DEEP, headers=JSON)       # a browser session's /start
            assert browser.status_code == 400, browser.text
            assert browser.json() == {"error": "the body is nested deeper than 64 levels"}

            dial = await http.post("/calls", content=DEEP, headers=JSON)
            assert dial.status_code == 400, dial.text
            assert dial.json() == {"error": "body must be a JSON object"}

            # a correctly signed carrier webhook and status callback: the signature holds, the body does not parse
            token = VonageDialect(credentials=VONAGE, from_="", to="").token(DEEP)
            signed = {"content-type": "application/json", "authorization": f"Bearer {token}"}
            hook = await http.post("/start/vonage", content=DEEP, headers=signed)
            assert hook.status_code == 400, hook.text
            assert hook.json() == {"error": "vonage webhook body is not valid JSON (nested deeper than 64 levels)"}
            token = VonageDialect(credentials=VONAGE, from_="", to="").token(DEEP)   # a fresh jti: no replay
            event = await http.post("/events/vonage/s1", content=DEEP,
                                    headers={**signed, "authorization": f"Bearer {token}"})
            assert event.status_code == 400, event.text

            health = await http.get("/health")
            assert health.status_code == 200 and health.json() == {"status": "ok"}
