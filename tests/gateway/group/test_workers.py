"""``voxray serve --workers 2`` (gateway.group): one real supervisor process and its two workers on
127.0.0.1, with the embedded memory session store (no Redis).

A connection is pinned to a worker by opening connections until the kernel hands one to that worker
(``worker_header`` names the worker on every answer), so the webhook and the media socket of a call
land on different workers on purpose.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio

from gateway.simulate.call import SimulatedCall
from tests.conftest import ACCOUNT_SID, AUTH_TOKEN, PUBLIC_URL
from tests.fakes.openai_server import FakeOpenAI
from tests.fakes.twilio_rest import FakeTwilioREST
from tests.processes import GatewayProcess, RedisServer

pytestmark = pytest.mark.asyncio

GOODBYE = "We are closing now. Goodbye."
API_KEY = "workers-test-key-0123456789abcdef"
AUTH = {"authorization": f"Bearer {API_KEY}"}


@pytest_asyncio.fixture
async def fakes() -> AsyncIterator[tuple[FakeOpenAI, FakeTwilioREST]]:
    async with FakeOpenAI(tts_ms_per_char=10) as fake, FakeTwilioREST(ACCOUNT_SID, AUTH_TOKEN) as twilio:
        yield fake, twilio


def group_config(fake: FakeOpenAI, twilio: FakeTwilioREST, **overrides: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "workers": 2, "worker_header": True, "server_api_key": API_KEY,
        "public_url": PUBLIC_URL, "provider": "openai", "api_keys": {"openai": "sk-test"},
        "base_urls": {"openai": fake.base_url}, "vad_stop_ms": 300, "goodbye_text": GOODBYE,
        "carriers": {"twilio": {"account_sid": ACCOUNT_SID, "auth_token": AUTH_TOKEN, "api_base_url": twilio.base_url}},
    }
    raw.update(overrides)
    return raw


@contextlib.asynccontextmanager
async def running_group(config: dict[str, Any]) -> AsyncIterator[GatewayProcess]:
    """The group, once both workers answer; killed (and its files removed) afterwards."""
    gw = GatewayProcess(config)
    try:
        await gw.start()
        async with httpx.AsyncClient(base_url=gw.url) as http:
            deadline = time.monotonic() + 30
            while (ready := await http.get("/ready")).status_code != 200 or ready.json()["workers"] != 2:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the two workers did not come up:\n{gw.log()}")
                await asyncio.sleep(0.1)
        yield gw
    finally:
        await gw.stop()


async def hang_up(calls: list[SimulatedCall]) -> None:
    for call in calls:
        await call.hang_up()
        await call.close()


async def client_on(url: str, worker: int) -> httpx.AsyncClient:
    """An HTTP client whose one keep-alive connection was accepted by ``worker``."""
    for _ in range(300):
        http = httpx.AsyncClient(base_url=url, timeout=10, limits=httpx.Limits(max_connections=1))
        if (await http.get("/health")).headers["x-voxray-worker"] == str(worker):
            return http
        await http.aclose()
    raise AssertionError(f"no connection reached worker {worker}")


def _worker_of(sock: socket.socket) -> str:
    """Send ``GET /health`` on an open connection; the worker that answered (the body is read whole)."""
    sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(4096)
    head, _, body = data.partition(b"\r\n\r\n")
    headers = dict(line.split(b": ", 1) for line in head.split(b"\r\n")[1:])
    while len(body) < int(headers[b"content-length"]):
        body += sock.recv(4096)
    return headers[b"x-voxray-worker"].decode()


async def socket_on(url: str, worker: int) -> socket.socket:
    """A connection accepted by ``worker`` (for a media socket to open over)."""
    port = int(url.rsplit(":", 1)[1])
    for _ in range(300):
        sock = await asyncio.to_thread(socket.create_connection, ("127.0.0.1", port), 5)
        if await asyncio.to_thread(_worker_of, sock) == str(worker):
            return sock
        sock.close()
    raise AssertionError(f"no connection reached worker {worker}")


async def call_across(gw: GatewayProcess, twilio: FakeTwilioREST, *, webhook: int, media: int) -> SimulatedCall:
    """A call whose webhook is answered by worker ``webhook`` and whose media socket lands on ``media``."""
    http = await client_on(gw.url, webhook)
    call = SimulatedCall(gateway=gw.url, public_url=PUBLIC_URL, auth_token=AUTH_TOKEN, account_sid=ACCOUNT_SID,
                         http=http)
    twilio.known_calls = twilio.known_calls | {call.call_sid}
    answer = await call.dial()
    await http.aclose()
    assert answer.status_code == 200 and answer.headers["x-voxray-worker"] == str(webhook)
    await call.connect(sock=await socket_on(gw.url, media))
    await call.wait_audio(after=0, timeout=10)        # the greeting: the call runs
    await call.wait_quiet(timeout=10)
    return call


async def _redial(call: SimulatedCall, http: httpx.AsyncClient) -> httpx.Response:
    """The call's signed webhook sent again (a replay) over ``http``."""
    hook = call.dialect.webhook(call.public_url, {})
    return await http.request(hook.method, hook.path, content=hook.body, headers=dict(hook.headers))


def children(pid: int) -> set[int]:
    return {int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()}


async def test_a_call_answered_by_one_worker_streams_on_the_other_and_is_controlled_from_either(fakes: Any) -> None:
    fake, twilio = fakes
    async with running_group(group_config(fake, twilio)) as gw:
        call = await call_across(gw, twilio, webhook=1, media=2)
        # the session is single-use across the group: a replay of its media socket fails on both workers
        for worker in (1, 2):
            replay = SimulatedCall(gateway=gw.url, public_url=PUBLIC_URL, auth_token=AUTH_TOKEN,
                                   account_sid=ACCOUNT_SID)
            replay.adopt(f'<Response><Connect><Stream url="wss://voice.example.test/media/twilio/{call.session_id}"/>'
                         "</Connect></Response>", call.call_sid)
            await replay.connect(sock=await socket_on(gw.url, worker))
            await replay.wait_closed(timeout=10)
            assert (replay.close_code, replay.close_reason) == (1008, "unknown, used or expired session")
            await replay.close()
        on_2 = await client_on(gw.url, 2)                               # the webhook replayed to the other worker
        assert (await _redial(call, on_2)).status_code == 409
        await on_2.aclose()
        # control requests landing on the worker that does not hold the call reach the one that does
        on_1 = await client_on(gw.url, 1)
        session = await on_1.get(f"/sessions/{call.session_id}", headers=AUTH)
        assert session.status_code == 200 and session.json()["live"] and not session.json()["here"]
        dtmf = await on_1.post(f"/sessions/{call.session_id}/dtmf", json={"digits": "12#"}, headers=AUTH)
        assert dtmf.status_code == 200, dtmf.text
        ended = await on_1.delete(f"/sessions/{call.session_id}", headers=AUTH)
        assert ended.status_code == 200 and ended.json() == {"ended": call.session_id}
        await on_1.aclose()
        await call.wait_closed(timeout=10)
        assert call.call_sid in twilio.ended_calls                     # hung up at the carrier too
        async with httpx.AsyncClient(base_url=gw.url) as http:
            assert (await http.get(f"/sessions/{call.session_id}", headers=AUTH)).status_code == 404
        await call.close()


async def test_metrics_and_ready_show_the_calls_of_both_workers(fakes: Any) -> None:
    fake, twilio = fakes
    async with running_group(group_config(fake, twilio)) as gw:
        calls = [await call_across(gw, twilio, webhook=2, media=1), await call_across(gw, twilio, webhook=1, media=2)]
        for worker in (1, 2):
            http = await client_on(gw.url, worker)
            metrics = (await http.get("/metrics")).text
            assert 'voxray_calls_started_total{carrier="twilio"} 2.0' in metrics
            assert 'voxray_active_calls{carrier="twilio"} 2.0' in metrics
            assert "voxray_workers 2.0" in metrics
            ready = await http.get("/ready")
            assert ready.status_code == 200 and ready.json() == {"status": "ready", "active_calls": 2, "workers": 2}
            await http.aclose()
        await hang_up(calls)


async def test_ready_turns_503_only_when_no_worker_takes_a_call(fakes: Any) -> None:
    fake, twilio = fakes
    async with running_group(group_config(fake, twilio, max_concurrent_calls=1)) as gw:
        first = await call_across(gw, twilio, webhook=1, media=1)
        async with httpx.AsyncClient(base_url=gw.url) as http:
            assert (await http.get("/ready")).status_code == 200        # worker 2 still takes one
        second = await call_across(gw, twilio, webhook=2, media=2)
        async with httpx.AsyncClient(base_url=gw.url) as http:
            ready = await http.get("/ready")
        assert ready.status_code == 503 and ready.json()["active_calls"] == 2
        assert "worker 1: busy" in ready.json()["error"] and "worker 2: busy" in ready.json()["error"]
        await hang_up([first, second])


async def test_sigterm_to_the_supervisor_drains_both_workers(fakes: Any) -> None:
    fake, twilio = fakes
    async with running_group(group_config(fake, twilio, drain_timeout_secs=3, goodbye_timeout_secs=5)) as gw:
        calls = [await call_across(gw, twilio, webhook=1, media=1), await call_across(gw, twilio, webhook=2, media=2)]
        gw.terminate()
        terminated = time.monotonic()
        async with httpx.AsyncClient(base_url=gw.url) as http:
            while (await http.get("/ready")).status_code != 503:
                await asyncio.sleep(0.05)
            late = SimulatedCall(gateway=gw.url, public_url=PUBLIC_URL, auth_token=AUTH_TOKEN, account_sid=ACCOUNT_SID)
            assert (await late.dial()).status_code == 503                 # refused, whichever worker answers
        for call in calls:
            await call.wait_closed(timeout=20)
            assert call.close_code == 1000
        assert time.monotonic() - terminated >= 3.0                     # both ran to the drain deadline
        assert [r["input"] for r in fake.state.tts_requests].count(GOODBYE) == 2
        assert await gw.wait(20) == 0
        log = gw.log()
        assert "received SIGTERM: draining 2 worker(s)" in log
        assert "worker=1 gateway.drain" in log and "worker=2 gateway.drain" in log
        assert "all workers have exited" in log
        for call in calls:
            await call.close()


async def test_a_killed_worker_is_replaced_and_logged(fakes: Any) -> None:
    fake, twilio = fakes
    async with running_group(group_config(fake, twilio)) as gw:
        assert gw.process is not None
        before = children(gw.process.pid)
        assert len(before) == 2
        victim = min(before)
        os.kill(victim, signal.SIGKILL)
        async with httpx.AsyncClient(base_url=gw.url) as http:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                now = children(gw.process.pid)
                ready = await http.get("/ready")
                if len(now) == 2 and victim not in now and ready.status_code == 200 and ready.json()["workers"] == 2:
                    break
                await asyncio.sleep(0.1)
            else:
                raise AssertionError(f"the worker was not replaced:\n{gw.log()}")
            assert "voxray_worker_restarts_total 1.0" in (await http.get("/metrics")).text
        assert f"(pid {victim}) ended unexpectedly (killed by SIGKILL)" in gw.log()
        await (await call_across(gw, twilio, webhook=1, media=2)).hang_up()      # the group serves calls again


async def test_with_redis_the_workers_share_sessions_and_control_through_it(fakes: Any) -> None:
    fake, twilio = fakes
    with RedisServer() as redis_server:
        async with running_group(group_config(fake, twilio, session_store="redis", redis_url=redis_server.url)) as gw:
            call = await call_across(gw, twilio, webhook=2, media=1)
            on_2 = await client_on(gw.url, 2)
            ended = await on_2.delete(f"/sessions/{call.session_id}", headers=AUTH)
            assert ended.status_code == 200 and ended.json() == {"ended": call.session_id}
            await on_2.aclose()
            await call.wait_closed(timeout=10)
            metrics = (await (on_1 := await client_on(gw.url, 1)).get("/metrics")).text
            await on_1.aclose()
            assert 'voxray_calls_ended_total{carrier="twilio",reason="ended_by_api"} 1.0' in metrics
            await call.close()


def _gone(pid: int) -> bool:
    """Exited (a zombie not yet reaped by its new parent counts as exited)."""
    try:
        return "\nState:\tZ" in Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True


async def test_workers_whose_supervisor_vanished_drain_and_exit(fakes: Any) -> None:
    fake, twilio = fakes
    async with running_group(group_config(fake, twilio)) as gw:
        assert gw.process is not None
        workers = children(gw.process.pid)
        gw.process.kill()                                           # SIGKILL: no drain passed on
        deadline = time.monotonic() + 20
        while not all(_gone(pid) for pid in workers):
            assert time.monotonic() < deadline, f"workers still running:\n{gw.log()}"
            await asyncio.sleep(0.1)
        assert gw.log().count("lost the supervisor's hub: draining and exiting") == 2


async def test_a_port_in_use_stops_the_supervisor_in_one_line(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        (tmp_path / "config.json").write_text('{"workers": 2, "allow_unauthenticated": true}')
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway", "serve", "--config", str(tmp_path / "config.json"), "--host",
            "127.0.0.1", "--port", str(port), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            env={k: v for k, v in os.environ.items() if not k.startswith("VOXRAY_")})
        output, _ = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in output.decode()
    assert "worker 1 started" not in output.decode()
