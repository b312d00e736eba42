"""``WsLink``, the simulated carriers' WebSocket client, against a server from another implementation
(``websockets.asyncio.server``) on 127.0.0.1: messages arrive with their arrival time, in order, reassembled;
pings are answered; the server's close code reaches ``on_close``; a refused upgrade raises what
``websockets.connect`` raises; a peer that stops reading makes ``drain`` wait; a server that never closes is
cut off after ``close_timeout_s``."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
import websockets
from websockets.asyncio.server import ServerConnection, serve
from websockets.http11 import Response
from websockets.utils import accept_key

from gateway.simulate.ws_link import WsLink

Handler = Callable[[ServerConnection], Awaitable[None]]


@asynccontextmanager
async def server(handler: Handler, **kwargs: Any) -> AsyncIterator[str]:
    async with serve(handler, "127.0.0.1", 0, **kwargs) as srv:
        port = next(iter(srv.sockets)).getsockname()[1]
        yield f"ws://127.0.0.1:{port}/media/x"


class Inbox:
    def __init__(self) -> None:
        self.messages: list[tuple[str | bytes, float]] = []
        self.closes: list[tuple[int, str]] = []
        self.got = asyncio.Event()
        self.closed = asyncio.Event()

    def message(self, message: str | bytes, arrived: float) -> None:
        self.messages.append((message, arrived))
        self.got.set()

    def close(self, code: int, reason: str) -> None:
        self.closes.append((code, reason))
        self.closed.set()

    async def wait_for(self, count: int) -> None:
        async with asyncio.timeout(5):
            while len(self.messages) < count:
                self.got.clear()
                await self.got.wait()


async def upgrade_then_ignore(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, done: asyncio.Event, *,
                              then: bytes = b"") -> None:
    """A raw server's side: answer the upgrade (and write ``then``), read and ignore everything until the client
    goes, close, set ``done``."""
    try:
        head = (await reader.readuntil(b"\r\n\r\n")).decode()
        key = next(line.split(":", 1)[1].strip() for line in head.split("\r\n")
                   if line.lower().startswith("sec-websocket-key:"))
        writer.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     b"Sec-WebSocket-Accept: " + accept_key(key).encode() + b"\r\n\r\n" + then)
        while await reader.read(65536):
            pass
    finally:
        writer.close()
        done.set()


@pytest.mark.asyncio
async def test_messages_both_ways_in_order_with_headers_and_arrival_times() -> None:
    seen: dict[str, Any] = {}

    async def echo(conn: ServerConnection) -> None:
        seen["auth"] = conn.request.headers.get("Authorization") if conn.request else None
        seen["path"] = conn.request.path if conn.request else None
        for _ in range(2):
            await conn.send(await conn.recv())
        await conn.send(["frag", "mented"])          # a fragmented text message (two frames)
        await conn.wait_closed()

    inbox = Inbox()
    async with server(echo) as url:
        link = await WsLink.open(url + "?x=1", on_message=inbox.message, on_close=inbox.close,
                                 headers={"Authorization": "Bearer t"})
        before = time.monotonic()
        link.send('{"event": "media"}')
        link.send(b"\x00\x01\xff")
        await inbox.wait_for(3)
        await link.close()
    assert seen == {"auth": "Bearer t", "path": "/media/x?x=1"}
    assert [m for m, _ in inbox.messages] == ['{"event": "media"}', b"\x00\x01\xff", "fragmented"]
    assert all(before <= arrived <= time.monotonic() for _, arrived in inbox.messages)
    assert inbox.closes == [(1000, "")] and (link.close_code, link.closed) == (1000, True)
    link.send("after the close")                       # dropped, no error


@pytest.mark.asyncio
async def test_the_servers_close_code_and_reason_reach_on_close() -> None:
    async def refuse(conn: ServerConnection) -> None:
        await conn.recv()
        await conn.close(1008, "unknown, used or expired session")

    inbox = Inbox()
    async with server(refuse) as url:
        link = await WsLink.open(url, on_message=inbox.message, on_close=inbox.close)
        link.send("start")
        async with asyncio.timeout(5):
            await inbox.closed.wait()
    assert inbox.closes == [(1008, "unknown, used or expired session")]
    assert (link.close_code, link.close_reason) == (1008, "unknown, used or expired session")


@pytest.mark.asyncio
async def test_a_ping_is_answered() -> None:
    latency: list[float] = []

    async def pinger(conn: ServerConnection) -> None:
        pong = await conn.ping()
        latency.append(await asyncio.wait_for(pong, 5))
        await conn.send("pinged")
        await conn.wait_closed()

    inbox = Inbox()
    async with server(pinger, ping_interval=None) as url:
        link = await WsLink.open(url, on_message=inbox.message)
        await inbox.wait_for(1)
        await link.close()
    assert len(latency) == 1 and inbox.messages[0][0] == "pinged"


@pytest.mark.asyncio
async def test_a_refused_upgrade_raises_invalid_status() -> None:
    def forbid(conn: ServerConnection, request: Any) -> Response:
        return conn.respond(403, "no\n")

    async def never(conn: ServerConnection) -> None:
        raise AssertionError("not reached")

    async with server(never, process_request=forbid) as url:
        with pytest.raises(websockets.InvalidStatus) as refused:
            await WsLink.open(url, on_message=Inbox().message)
    assert refused.value.response.status_code == 403


@pytest.mark.asyncio
async def test_nothing_listening_raises_os_error() -> None:
    async with server(lambda conn: conn.wait_closed()) as url:
        pass                                            # the port is free again
    with pytest.raises(OSError):
        await WsLink.open(url, on_message=Inbox().message)


@pytest.mark.asyncio
async def test_drain_waits_while_the_server_does_not_read() -> None:
    release = asyncio.Event()
    received: list[int] = []

    async def slow(conn: ServerConnection) -> None:
        await release.wait()
        async for message in conn:
            received.append(len(message))

    async with server(slow, max_size=None) as url:
        link = await WsLink.open(url, on_message=Inbox().message)
        chunk = b"\x00" * 65536
        waited = False
        for _ in range(400):                            # 26 MB: far past the socket buffers
            link.send(chunk)
            drained = asyncio.ensure_future(link.drain())
            await asyncio.sleep(0)
            if not drained.done():
                waited = True
                release.set()
                async with asyncio.timeout(10):
                    await drained
                break
        assert waited, "drain never waited although the server read nothing"
        await link.close()


@asynccontextmanager
async def raw_server_link(then: bytes = b"") -> AsyncIterator[tuple[WsLink, Inbox, asyncio.Event]]:
    """A link (close_timeout_s 0.3) to a raw server that answers the upgrade, writes ``then`` and then only reads:
    it never answers our close nor closes the connection itself. ``done`` is set once it saw the link go."""
    done = asyncio.Event()
    srv = await asyncio.start_server(lambda r, w: upgrade_then_ignore(r, w, done, then=then), "127.0.0.1", 0)
    async with srv:
        inbox = Inbox()
        link = await WsLink.open(f"ws://127.0.0.1:{srv.sockets[0].getsockname()[1]}/", on_message=inbox.message,
                                 on_close=inbox.close, close_timeout_s=0.3)
        yield link, inbox, done
        async with asyncio.timeout(5):
            await done.wait()                   # the server saw the connection end (and closed its side)


@pytest.mark.asyncio
async def test_a_server_that_never_closes_is_cut_off_after_close_timeout() -> None:
    async with raw_server_link() as (link, inbox, _):
        started = time.monotonic()
        await link.close()
        took = time.monotonic() - started
    assert 0.25 <= took < 2.0 and link.closed
    assert inbox.closes == [(1006, "")] and link.close_code == 1006


@pytest.mark.asyncio
async def test_the_servers_close_frame_ends_the_session_before_its_tcp_close() -> None:
    body = (1008).to_bytes(2, "big") + b"flood"
    async with raw_server_link(then=bytes((0x88, len(body))) + body) as (link, inbox, _):   # then never closes
        async with asyncio.timeout(2):
            await inbox.closed.wait()
        assert link.closed and not link._lost.done()    # noqa: SLF001 - the TCP connection is still up
        assert inbox.closes == [(1008, "flood")] and (link.close_code, link.close_reason) == (1008, "flood")
        link.send("dropped")                           # the session is over: nothing more goes out
        await link.close()                             # the server never closes: cut off after 0.3 s
    assert inbox.closes == [(1008, "flood")]
