"""Access to the programmatic routes: safe by default, on a real gateway process.

With no ``server_api_key`` a key is generated at startup (printed once with the softphone URL): a
stranger can neither place a call (toll fraud), nor read or end sessions, nor start a browser
conversation — also when the request comes through a proxy on the same host (127.0.0.1 with
``X-Forwarded-For``). ``allow_unauthenticated`` opens them, with a warning line.
"""

from __future__ import annotations

import json
import re

import httpx
import pytest
import websockets

from gateway.config import Config, ConfigError
from gateway.http.auth import AccessKey
from tests.conftest import ACCOUNT_SID, AUTH_TOKEN, PUBLIC_URL
from tests.fakes.twilio_rest import FakeTwilioREST
from tests.processes import GatewayProcess

DIAL = {"carrier": "twilio", "to": "+19005550000", "from": "+14155550100"}
PROXIED = {"X-Forwarded-For": "203.0.113.7", "X-Forwarded-Proto": "https"}


def _gateway_config(twilio_url: str, **extra: object) -> dict[str, object]:
    return {"public_url": PUBLIC_URL, "log_level": "info",
            "carriers": {"twilio": {"account_sid": ACCOUNT_SID, "auth_token": AUTH_TOKEN, "api_base_url": twilio_url}},
            **extra}


async def _refused_everywhere(gw: GatewayProcess, headers: dict[str, str]) -> None:
    async with httpx.AsyncClient(base_url=gw.url, headers=headers) as http:
        assert (await http.post("/calls", json=DIAL)).status_code == 401
        assert (await http.get("/sessions/anything")).status_code == 401
        assert (await http.delete("/sessions/anything")).status_code == 401
        assert (await http.post("/sessions/anything/dtmf", json={"digits": "1"})).status_code == 401
        assert (await http.get("/personas")).status_code == 401
        assert (await http.post("/webrtc/offer", json={"sdp": "v=0", "type": "offer"})).status_code == 401
        assert (await http.post("/start", json={"context": {"messages": []}})).status_code == 401
        wrong = await http.post("/calls", json=DIAL, headers={"Authorization": "Bearer not-the-key"})
        assert wrong.status_code == 401 and "API key" in wrong.json()["error"]
        # the open routes stay open
        assert (await http.get("/health")).status_code == 200
        assert (await http.get("/")).status_code == 200
    with pytest.raises(websockets.ConnectionClosed) as closed:
        async with websockets.connect(gw.url.replace("http", "ws") + "/ws", additional_headers=headers) as ws:
            await ws.send(json.dumps({"type": "start"}))
            await ws.recv()
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008


@pytest.mark.asyncio
async def test_default_configuration_refuses_strangers_and_prints_a_working_key() -> None:
    async with FakeTwilioREST(ACCOUNT_SID, AUTH_TOKEN) as twilio:
        async with GatewayProcess(_gateway_config(twilio.base_url)) as gw:
            await _refused_everywhere(gw, {})
            await _refused_everywhere(gw, PROXIED)        # a TLS proxy on this host: every request is 127.0.0.1
            assert twilio.dialed == []                     # nobody was dialled: no toll fraud
            log = gw.log()
            assert re.search(r"access: .*/calls, /sessions, /personas, /ws.* need an API key generated for this run",
                             log)
            found = re.search(r"http://localhost:\d+/\?token=(\S+)", log.replace(PUBLIC_URL, "http://localhost:0"))
            assert found is not None, log
            key = found.group(1)
            assert len(key) >= 32
            assert sum(line.count(key) for line in log.splitlines() if " INFO " in line or " WARNING " in line) == 0
            async with httpx.AsyncClient(base_url=gw.url, headers={"Authorization": f"Bearer {key}"}) as http:
                assert (await http.get("/personas")).status_code == 200
                assert (await http.get("/sessions/nope")).status_code == 404
            async with websockets.connect(gw.url.replace("http", "ws") + f"/ws?token={key}") as ws:
                await ws.send(json.dumps({"type": "start"}))
                assert json.loads(await ws.recv())["type"] == "ready"


@pytest.mark.asyncio
async def test_allow_unauthenticated_opens_the_routes_and_says_so() -> None:
    async with FakeTwilioREST(ACCOUNT_SID, AUTH_TOKEN) as twilio:
        async with GatewayProcess(_gateway_config(twilio.base_url, allow_unauthenticated=True)) as gw:
            async with httpx.AsyncClient(base_url=gw.url) as http:
                assert (await http.get("/personas")).status_code == 200
            assert re.search(r"WARNING .*access: .* need NOTHING: allow_unauthenticated is set", gw.log())
            assert "?token=" not in gw.log()


def test_the_configured_key_is_used_and_never_printed() -> None:
    access = AccessKey.from_config(Config.from_mapping({"server_api_key": "k" * 32}))
    assert access.source == "server_api_key" and access.allows(["", "k" * 32]) and not access.allows(["k" * 31])
    assert "k" * 32 not in repr(access) and "k" * 32 not in access.describe()
    generated = [AccessKey.from_config(Config.from_mapping({})) for _ in range(2)]
    assert all(a.source == "generated" and a.required for a in generated)
    assert generated[0].value != generated[1].value          # a fresh key per run
    assert AccessKey.from_config(Config.from_mapping({"allow_unauthenticated": True})).allows([])
    with pytest.raises(ConfigError, match="allow_unauthenticated"):
        Config.from_mapping({"server_api_key": "k" * 32, "allow_unauthenticated": True})
