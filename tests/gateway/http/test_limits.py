"""The HTTP edge of a real gateway on 127.0.0.1: body limit (gateway.http.limits), request-head deadline and
size (gateway.http.protocol), keep-alive timeout and trusted proxies (gateway.server), with real sockets."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from gateway.config import Config
from tests.conftest import PUBLIC_URL, phone_config, running_gateway
from tests.gateway.http.test_routes import sign, webhook_params

pytestmark = pytest.mark.asyncio

MIB = 1024 * 1024
FORM = {"content-type": "application/x-www-form-urlencoded"}


def config(**overrides: Any) -> Config:
    """A gateway with no reachable providers (none is needed); a small body limit shrinks the SDP's too."""
    body = overrides.get("max_request_body_bytes", 262144)
    return phone_config("http://127.0.0.1:9", "http://127.0.0.1:9", webrtc_max_sdp_bytes=min(65536, body), **overrides)


def memory_mib() -> dict[str, int]:
    """This process's resident set now (VmRSS) and at its peak (VmHWM), in MiB."""
    with open("/proc/self/status") as status:
        return {k: int(v.split()[0]) // 1024 for k, v in (line.split(":", 1) for line in status)
                if k in ("VmRSS", "VmHWM")}


def reset_peak_memory() -> None:
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")


async def chunks(total_bytes: int, size: int = 64 * 1024) -> AsyncIterator[bytes]:
    chunk = b"a" * size
    for _ in range(total_bytes // size):
        yield chunk


async def open_socket(url: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, port = url.removeprefix("http://").split(":")
    return await asyncio.open_connection(host, int(port))


async def closed_within(reader: asyncio.StreamReader, timeout_s: float) -> bytes:
    """What the server sent before closing; fails if it is still open after ``timeout_s``."""
    async with asyncio.timeout(timeout_s):
        return await reader.read()


# ------------------------------------------------------------------------------------------ body limit
async def test_100_mb_streamed_webhook_gets_413_and_memory_stays_flat() -> None:
    async with running_gateway(config()) as url, httpx.AsyncClient(timeout=30) as http:
        await http.get(f"{url}/health")
        reset_peak_memory()
        before = memory_mib()
        response = await http.post(f"{url}/start/twilio", content=chunks(100 * MIB), headers=FORM)   # chunked
        after = memory_mib()
        assert response.status_code == 413
        assert response.json() == {"error": "request body larger than 262144 bytes"}
        assert after["VmHWM"] - before["VmRSS"] < 8, (before, after)     # the peak, not just what is left
        assert (await http.get(f"{url}/health")).status_code == 200


async def test_declared_length_over_the_limit_is_refused_before_the_body_is_sent() -> None:
    async with running_gateway(config(max_request_body_bytes=1024)) as url:
        reader, writer = await open_socket(url)
        writer.write(b"POST /start/twilio HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\n"
                     b"Content-Length: 104857600\r\n\r\n")
        async with asyncio.timeout(2):
            status = await reader.readline()
        assert status.startswith(b"HTTP/1.1 413"), status
        writer.close()


async def test_signed_webhook_within_the_limit_is_answered_and_one_over_it_is_413() -> None:
    params = webhook_params()
    signature = {"X-Twilio-Signature": sign(f"{PUBLIC_URL}/start/twilio", params)}
    size = len(httpx.Request("POST", "http://x", data=params).read())
    async with running_gateway(config(max_request_body_bytes=size - 1)) as url, httpx.AsyncClient() as http:
        refused = await http.post(f"{url}/start/twilio", data=params, headers=signature)
        assert refused.status_code == 413
    async with running_gateway(config(max_request_body_bytes=size)) as url, httpx.AsyncClient() as http:
        answered = await http.post(f"{url}/start/twilio", data=params, headers=signature)
        assert answered.status_code == 200 and "<Stream" in answered.text

        async def body() -> AsyncIterator[bytes]:   # the same body chunked, one byte over: cut while read
            yield httpx.Request("POST", "http://x", data=params).read()
            yield b"&"
        cut = await http.post(f"{url}/start/twilio", content=body(), headers={**signature, **FORM})
        assert cut.status_code == 413
        assert (await http.get(f"{url}/health")).status_code == 200


# ------------------------------------------------------------------------------------------ request heads
async def test_a_slow_request_head_is_closed_at_the_deadline() -> None:
    async with running_gateway(config(http_header_timeout_secs=1)) as url:
        reader, writer = await open_socket(url)
        opened = time.monotonic()
        writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n")

        async def drip() -> None:
            for i in range(100):
                await asyncio.sleep(0.3)
                writer.write(b"X-Slow-%d: 1\r\n" % i)

        dripping = asyncio.create_task(drip())
        try:
            assert await closed_within(reader, 3) == b""
        finally:
            dripping.cancel()
        assert 0.9 < time.monotonic() - opened < 2.0
        writer.close()


async def test_keep_alive_connection_gets_a_new_deadline_after_each_response() -> None:
    async with running_gateway(config(http_header_timeout_secs=1, http_keep_alive_timeout_secs=30)) as url:
        reader, writer = await open_socket(url)
        writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await reader.readline()).startswith(b"HTTP/1.1 200")
        await asyncio.sleep(0.7)
        writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")       # within the first deadline: answered
        assert (await reader.readuntil(b"HTTP/1.1 200")).endswith(b"HTTP/1.1 200")
        await reader.readuntil(b'{"status":"ok"}')
        answered = time.monotonic()
        writer.write(b"GET /health HTTP/1.1\r\n")                      # a third head that never completes
        assert await closed_within(reader, 3) == b""
        assert 0.9 < time.monotonic() - answered < 2.0
        writer.close()


async def test_idle_keep_alive_connection_is_closed() -> None:
    async with running_gateway(config(http_keep_alive_timeout_secs=0.5)) as url:
        reader, writer = await open_socket(url)
        writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        await reader.readuntil(b'{"status":"ok"}')
        assert await closed_within(reader, 2) == b""
        writer.close()


async def test_many_slow_connections_do_not_stop_health_and_all_are_closed() -> None:
    async with running_gateway(config(http_header_timeout_secs=1.5)) as url:
        sockets = [await open_socket(url) for _ in range(50)]
        for _, writer in sockets:
            writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n")
        async with httpx.AsyncClient() as http:
            started = time.monotonic()
            assert (await http.get(f"{url}/health", timeout=2)).status_code == 200
            assert time.monotonic() - started < 0.5
        closed = await asyncio.gather(*(closed_within(reader, 4) for reader, _ in sockets))
        assert closed == [b""] * 50
        for _, writer in sockets:
            writer.close()


async def test_an_oversized_request_head_gets_431() -> None:
    async with running_gateway(config(http_max_header_bytes=4096)) as url:
        reader, writer = await open_socket(url)
        writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 8192)    # one header, never ended
        answer = await closed_within(reader, 3)
        assert answer.startswith(b"HTTP/1.1 431"), answer
        writer.close()
        async with httpx.AsyncClient() as http:   # a large but allowed head is fine
            assert (await http.get(f"{url}/health", headers={"X-Big": "a" * 3000})).status_code == 200


# ------------------------------------------------------------------------------------------ proxies
@pytest.mark.parametrize(("allowed", "logged"), [([], "127.0.0.1"), (["127.0.0.1"], "203.0.113.9"),
                                                 (["10.0.0.0/8"], "127.0.0.1")])
async def test_x_forwarded_for_counts_only_from_configured_proxies(
        allowed: list[str], logged: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="gateway.http.routes")
    async with running_gateway(config(forwarded_allow_ips=allowed)) as url, httpx.AsyncClient() as http:
        response = await http.post(f"{url}/start/twilio", data=webhook_params(),
                                   headers={"X-Forwarded-For": "203.0.113.9"})    # unsigned: logged with its client
        assert response.status_code == 403
    [line] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("webhook rejected")]
    assert line.endswith(f"from={logged}"), line
