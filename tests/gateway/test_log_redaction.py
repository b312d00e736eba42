"""No secret in the logs (gateway.redaction, gateway.logging): the redaction rules, the transport loggers'
levels, and a real gateway process at debug whose every log line is searched after a phone call and
browser sessions that carry the API key in each way a client can send it."""

from __future__ import annotations

import json
import logging
import re
import secrets
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import websockets

from gateway.config import Config
from gateway.logging import configure_logging
from gateway.redaction import is_session_id, redact
from gateway.simulate.call import SimulatedCall
from tests.conftest import ACCOUNT_SID, AUTH_TOKEN, PUBLIC_URL
from tests.fakes.openai_server import FakeOpenAI
from tests.fakes.twilio_rest import FakeTwilioREST
from tests.gateway.browser.test_ws import ws_url
from tests.processes import GatewayProcess
from tests.speech import speech_pcm

API_KEY = "srv-key-that-must-not-be-logged-42"
SESSION = secrets.token_urlsafe(24)


# ------------------------------------------------------------------------------------------ rules
@pytest.mark.parametrize(("line", "expected"), [
    ('127.0.0.1:5 - "WebSocket /ws?token=abc123" [accepted]', '127.0.0.1:5 - "WebSocket /ws?token=***" [accepted]'),
    ("GET /ws?persona=ada&api_key=k1&Access_Token=k2&x=1", "GET /ws?persona=ada&api_key=***&Access_Token=***&x=1"),
    ("/hook?hub.signature=s&sig=t&key=u&secret=v", "/hook?hub.signature=***&sig=***&key=***&secret=***"),
    (f'"WebSocket /media/twilio/{SESSION}" 403', f'"WebSocket /media/twilio/{SESSION[:6]}…" 403'),
    (f"DELETE /sessions/{SESSION}/transfer", f"DELETE /sessions/{SESSION[:6]}…/transfer"),
    (f"POST /events/plivo/{SESSION}?x=1", f"POST /events/plivo/{SESSION[:6]}…?x=1"),
    (f"/start/plivo?session={SESSION}", f"/start/plivo?session={SESSION[:6]}…"),
    ("< Authorization: Bearer abc.def", "< Authorization: Bearer ***"),
    ("< Sec-WebSocket-Protocol: voxray, bearer.abc", "< Sec-WebSocket-Protocol: voxray, bearer.***"),
    ("session=abc123… answered; tokens=3 keys: 2", "session=abc123… answered; tokens=3 keys: 2"),   # left alone
    ("route /sessions/{session_id}", "route /sessions/{session_id}"),
])
def test_redact(line: str, expected: str) -> None:
    assert redact(line) == expected


def test_session_ids_are_told_from_carrier_call_ids() -> None:
    assert is_session_id(SESSION)
    for call_id in ("CA" + "a" * 32, "0f" * 16, "v3:" + "x" * 40, "123e4567-e89b-12d3-a456-426614174000", "-"):
        assert not is_session_id(call_id), call_id


@pytest.fixture
def restore_logging() -> Iterator[None]:
    names = ("", "uvicorn.error", "websockets", "httpx", "httpcore", "uvicorn.access", "aiortc", "aioice")
    saved = {name: (logging.getLogger(name).level, logging.getLogger(name).handlers[:]) for name in names}
    yield
    for name, (level, handlers) in saved.items():
        logging.getLogger(name).setLevel(level)
        logging.getLogger(name).handlers[:] = handlers


@pytest.mark.parametrize(("transport_debug", "frames"), [(False, logging.INFO), (True, logging.DEBUG)])
def test_transport_frames_stay_out_of_debug_logs_unless_asked(
        restore_logging: None, transport_debug: bool, frames: int) -> None:
    assert Config.from_mapping({}).log_transport_debug is False
    configure_logging("debug", transport_debug=transport_debug)
    assert logging.getLogger("gateway").getEffectiveLevel() == logging.DEBUG
    for name in ("uvicorn.error", "websockets"):
        assert logging.getLogger(name).level == frames


# ------------------------------------------------------------------------------------------ a real process
async def browser_session(url: str, query: str = "", **kwargs: Any) -> str:
    """One /ws session (start, ready, end); returns its session id."""
    async with websockets.connect(ws_url(url, "/ws" + query), **kwargs) as ws:
        await ws.send(json.dumps({"type": "start", "sample_rate": 16000}))
        while (event := json.loads(await ws.recv())).get("type") != "ready":
            pass
        await ws.send(json.dumps({"type": "end"}))
        async for _ in ws:
            pass
    return str(event["session_id"])


@pytest.mark.asyncio
async def test_a_debug_gateway_logs_no_key_token_or_session_id() -> None:
    async with FakeOpenAI(tts_ms_per_char=5) as fake, FakeTwilioREST(ACCOUNT_SID, AUTH_TOKEN) as twilio:
        raw = {"public_url": PUBLIC_URL, "provider": "openai", "api_keys": {"openai": "sk-test"},
               "base_urls": {"openai": fake.base_url}, "vad_stop_ms": 300, "log_level": "debug",
               "server_api_key": API_KEY,
               "carriers": {"twilio": {"account_sid": ACCOUNT_SID, "auth_token": AUTH_TOKEN,
                                       "api_base_url": twilio.base_url}}}
        async with GatewayProcess(raw) as gw:
            call = SimulatedCall(gateway=gw.url, public_url=PUBLIC_URL, auth_token=AUTH_TOKEN, account_sid=ACCOUNT_SID)
            twilio.known_calls = twilio.known_calls | {call.call_sid}
            assert (await call.dial()).status_code == 200
            await call.connect()
            await call.wait_audio(after=0, timeout=10)
            spoke = await call.speak(speech_pcm("hello there", 8000))
            await call.wait_audio(after=spoke, timeout=10)
            async with httpx.AsyncClient(base_url=gw.url) as http:
                bearer = {"Authorization": f"Bearer {API_KEY}"}
                assert (await http.get(f"/sessions/{call.session_id}", headers=bearer)).status_code == 200
                assert (await http.get(f"/sessions/{call.session_id}?token={API_KEY}")).status_code == 200
                assert (await http.get(f"/sessions/{call.session_id}")).status_code == 401
            await call.hang_up()
            browser = [await browser_session(gw.url, f"?token={API_KEY}"),
                       await browser_session(gw.url, additional_headers={"Authorization": f"Bearer {API_KEY}"}),
                       await browser_session(gw.url, subprotocols=["voxray", f"bearer.{API_KEY}"])]
            gw.terminate()
            await gw.wait(30)
            log = gw.log()
    assert "DEBUG" in log and f"/media/twilio/{call.session_id[:6]}…" in log and "/ws?token=***" in log, log
    secrets_ = {"the API key": API_KEY, "the carrier's auth token": AUTH_TOKEN, "the call's session id": call.session_id,
                **{f"browser session id {i}": sid for i, sid in enumerate(browser)}}
    for line in log.splitlines():
        for what, secret in secrets_.items():
            assert secret not in line, f"{what} is in the log: {line}"
    assert not re.search(r"\bbearer\.(?!\*\*\*)", log, re.IGNORECASE)
