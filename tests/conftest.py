"""Shared test helpers: a real gateway on 127.0.0.1 and the fake provider/carrier servers."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from gateway.app import create_app
from gateway.config import Config
from gateway.server import build_server
from tests.s3_server import WeedS3

ACCOUNT_SID = "AC" + "0" * 31 + "1"
AUTH_TOKEN = "test-auth-token-12345"
PUBLIC_URL = "https://voice.example.test"


@contextlib.asynccontextmanager
async def running_gateway(config: Config) -> AsyncIterator[str]:
    """Serve ``create_app(config)`` on an ephemeral 127.0.0.1 port; yields ``http://127.0.0.1:<port>``."""
    async with running_app(create_app(config), config) as url:
        yield url


@contextlib.asynccontextmanager
async def running_app(app: Any, config: Config) -> AsyncIterator[str]:
    """Serve any ASGI app with the gateway's server (``build_server``: its HTTP and WebSocket protocols)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = build_server(app, config, handle_signals=False)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        async with asyncio.timeout(10):
            while not server.started:
                if task.done():
                    task.result()
                await asyncio.sleep(0.01)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, 15)
        sock.close()


@pytest.fixture(scope="module")
def s3server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WeedS3]:
    """A real S3-compatible server (SeaweedFS ``weed mini`` on 127.0.0.1) for one test module."""
    server = WeedS3(tmp_path_factory.mktemp("s3") / "data")
    try:
        server.start()
    except RuntimeError as exc:
        pytest.fail(f"the S3 test server (SeaweedFS `weed mini`) could not start: {exc}", pytrace=False)
    yield server
    server.stop()


def phone_config(openai_url: str, twilio_url: str, *, environ: dict[str, str] | None = None,
                 **overrides: Any) -> Config:
    """A gateway wired to the fake OpenAI and Twilio servers, with test-sized timers.

    Without ``server_api_key`` in ``overrides`` the programmatic routes are opened with
    ``allow_unauthenticated`` (these tests are about calls, not access; tests/gateway/http/test_auth.py keeps
    the default — a generated key — refusing strangers). ``environ`` stands for the process environment
    (``XTTS_BASE_URL`` ...)."""
    raw: dict[str, Any] = {
        "public_url": PUBLIC_URL,
        "provider": "openai",
        "api_keys": {"openai": "sk-test"},
        "base_urls": {"openai": openai_url},
        "carriers": {"twilio": {"account_sid": ACCOUNT_SID, "auth_token": AUTH_TOKEN, "api_base_url": twilio_url}},
        "vad_stop_ms": 300,
        "stt_timeout_secs": 2,
        "llm_timeout_secs": 2,
        "tts_timeout_secs": 2,
    }
    raw.update(overrides)
    if not raw.get("server_api_key"):
        raw.setdefault("allow_unauthenticated", True)
    return Config.from_mapping(raw, environ)


async def carry_a_call(config_raw: dict[str, Any], environ: dict[str, str]) -> bytes:
    """A Twilio call through a gateway built by ``phone_config(**config_raw)``: dial, hear the greeting (it
    must be audible), say a sentence, hear the answer; returns the answer's audio (asserted audible)."""
    from pipeline.audio import rms
    from tests.fakes.twilio_rest import FakeTwilioREST
    from tests.speech import speech_pcm

    async with FakeTwilioREST(ACCOUNT_SID, AUTH_TOKEN) as twilio:
        config = phone_config("http://127.0.0.1:9/v1", twilio.base_url, environ=environ, **config_raw)
        async with running_gateway(config) as url:
            call = await greeted_call(url, twilio)
            greeting = len(call.pcm_received())
            assert rms(call.pcm_received()) > 0.05
            end = await call.speak(speech_pcm("I would like a table for two people tonight.", 8000))
            await call.wait_audio(after=end, timeout=5)
            await call.wait_quiet(400)
            answer = call.pcm_received()[greeting:]
            await call.hang_up()
            assert call.received.invalid == []
    assert rms(answer) > 0.05
    return answer


# In CI (CI=true) a skipped test is a failure: a suite that silently skips proves nothing.
_skipped: list[str] = []


def pytest_runtest_logreport(report: Any) -> None:
    if report.skipped:
        _skipped.append(report.nodeid)


def pytest_collectreport(report: Any) -> None:
    if report.skipped:
        _skipped.append(report.nodeid)


def pytest_sessionfinish(session: Any, exitstatus: int) -> None:
    import os

    if os.environ.get("CI", "").lower() in ("1", "true", "yes") and _skipped and exitstatus == 0:
        print(f"\nCI=true: {len(_skipped)} skipped test(s) count as failures: {', '.join(_skipped[:10])}")
        session.exitstatus = 1


async def greeted_call(url: str, twilio: Any, *, quiet_ms: float = 400, timeout: float = 10) -> Any:
    """A signed Twilio call to the gateway at ``url`` (the fake REST API ``twilio`` knows its sid), connected,
    that has heard the greeting to its end (``quiet_ms`` of quiet): a :class:`SimulatedCall`."""
    from gateway.simulate.call import SimulatedCall

    call = SimulatedCall(gateway=url, public_url=PUBLIC_URL, auth_token=AUTH_TOKEN, account_sid=ACCOUNT_SID)
    twilio.known_calls = twilio.known_calls | {call.call_sid}
    assert (await call.dial()).status_code == 200
    await call.connect()
    await call.wait_audio(after=0, timeout=timeout)      # the greeting
    await call.wait_quiet(quiet_ms, timeout=timeout)
    return call
