"""The gateway's WebSocket protocol (gateway.http.websocket) served by build_server on 127.0.0.1: a standard
client (the websockets library), raw frames a client must not send, the push path a media leg reads with,
the read queue's bound, keep-alive and closing."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import contextvars
import os
import struct
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio
import websockets
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket
from websockets.typing import Subprotocol

from gateway.calls.socket import socket_io
from gateway.config import Config
from gateway.http.ws_frames import OP_BINARY, OP_CLOSE, OP_PING, OP_PONG, OP_TEXT
from tests.conftest import PUBLIC_URL, running_app
from tests.gateway.http.test_ws_frames import masked

pytestmark = pytest.mark.asyncio

CALL: contextvars.ContextVar[str] = contextvars.ContextVar("call", default="-")


class Probe:
    """What the app saw, per route."""

    def __init__(self) -> None:
        self.messages: list[str | bytes] = []
        self.close_codes: list[int | None] = []
        self.slices: list[int] = []          # messages handed over between two runs of other work
        self.io: Any = None
        self.contexts: set[str] = set()      # the ContextVar value each pushed message was handled under
        self.done = asyncio.Event()


def make_app(probe: Probe) -> Starlette:
    async def echo(websocket: WebSocket) -> None:
        await websocket.accept(subprotocol="audio" if "audio" in websocket.scope["subprotocols"] else None)
        io = probe.io = socket_io(websocket)
        while (message := await io.receive()) is not None:
            probe.messages.append(message)
            await io.send(message)
        probe.close_codes.append(io.peer_close_code())
        probe.done.set()

    async def listen(websocket: WebSocket) -> None:
        await websocket.accept()
        io = socket_io(websocket)
        assert io.listen is not None
        loop = asyncio.get_running_loop()
        count = [0]

        def between() -> None:               # runs whenever the loop gets a turn
            if count[0]:
                probe.slices.append(count[0])
                count[0] = 0
            if not probe.done.is_set():
                loop.call_soon(between)

        def on_message(message: str | bytes) -> None:
            if message == "boom":
                raise ValueError("boom")
            probe.messages.append(message)
            probe.contexts.add(CALL.get())
            count[0] += 1

        loop.call_soon(between)
        CALL.set("CA-listening")               # the call id a leg's task carries into its log lines
        try:
            await io.listen(on_message)
        except ValueError as exc:
            probe.messages.append(f"raised {exc}")
            await io.close(1011, "handler failed")
        probe.close_codes.append(io.peer_close_code())
        probe.done.set()

    async def idle(websocket: WebSocket) -> None:      # accepts, then does not read
        await websocket.accept()
        probe.io = socket_io(websocket)
        await probe.done.wait()

    async def closer(websocket: WebSocket) -> None:
        await websocket.accept()
        io = socket_io(websocket)
        await io.close(4001, "call ended")
        probe.close_codes.append(await io.receive() is None and io.peer_close_code())
        probe.done.set()

    async def refuse(websocket: WebSocket) -> None:
        await websocket.close(1008)

    async def broken(websocket: WebSocket) -> None:    # fails before it accepts
        raise RuntimeError("the app failed")

    async def deny(websocket: WebSocket) -> None:
        await websocket.send_denial_response(PlainTextResponse("no key", status_code=401))

    return Starlette(routes=[WebSocketRoute("/echo", echo), WebSocketRoute("/listen", listen),
                             WebSocketRoute("/idle", idle), WebSocketRoute("/close", closer),
                             WebSocketRoute("/refuse", refuse), WebSocketRoute("/deny", deny),
                             WebSocketRoute("/broken", broken)])


def config(**overrides: Any) -> Config:
    return Config.from_mapping({"public_url": PUBLIC_URL, "allow_unauthenticated": True, "ws_max_message_bytes": 4096,
                                "ws_messages_per_read": 4, "ws_read_queue_messages": 8,
                                "ws_close_timeout_secs": 1.0, **overrides})


@pytest_asyncio.fixture
async def served(request: pytest.FixtureRequest) -> AsyncIterator[tuple[str, Probe]]:
    probe = Probe()
    overrides = getattr(request, "param", {})
    async with running_app(make_app(probe), config(**overrides)) as url:
        yield url.replace("http://", "ws://"), probe
        probe.done.set()
        while RawClient.opened:
            writer = RawClient.opened.pop()
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


class RawClient:
    """A client that writes whatever frames it is given (closed after each test)."""

    opened: list[asyncio.StreamWriter] = []

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, head: bytes) -> None:
        self.reader, self.writer, self.head = reader, writer, head

    @classmethod
    async def open(cls, url: str, path: str, *, key: str | None = None, version: str = "13") -> RawClient:
        host, port = url.removeprefix("ws://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        key = key or base64.b64encode(os.urandom(16)).decode()
        writer.write((f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                      f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: {version}\r\n\r\n").encode())
        cls.opened.append(writer)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        return cls(reader, writer, head)

    async def frame(self) -> tuple[int, bytes]:
        """The next server frame: (opcode, payload); servers never mask."""
        b0, b1 = await asyncio.wait_for(self.reader.readexactly(2), 5)
        assert not b1 & 0x80, "a server frame must not be masked"
        n = b1 & 0x7F
        if n == 126:
            (n,) = struct.unpack("!H", await self.reader.readexactly(2))
        elif n == 127:
            (n,) = struct.unpack("!Q", await self.reader.readexactly(8))
        return b0 & 0x0F, await self.reader.readexactly(n)

    async def close_frame(self) -> tuple[int, str]:
        while True:
            op, payload = await self.frame()
            if op == OP_CLOSE:
                return struct.unpack("!H", payload[:2])[0], payload[2:].decode()


async def test_a_standard_client_round_trips_text_binary_and_fragments(served: tuple[str, Probe]) -> None:
    url, probe = served
    async with websockets.connect(url + "/echo", subprotocols=[Subprotocol("audio")]) as ws:
        assert ws.subprotocol == "audio"
        await ws.send('{"event":"media"}')
        assert await ws.recv() == '{"event":"media"}'
        await ws.send(b"\x00\x01" * 1000)
        assert await ws.recv() == b"\x00\x01" * 1000
        await ws.send(["he", "llo", " é"])                   # one message in three frames
        assert await ws.recv() == "hello é"
        pong = await ws.ping(b"abc")
        await asyncio.wait_for(pong, 5)
        await ws.close(4000, "caller hung up")
    await asyncio.wait_for(probe.done.wait(), 5)
    assert probe.messages == ['{"event":"media"}', b"\x00\x01" * 1000, "hello é"]
    assert probe.close_codes == [4000]


async def test_send_many_writes_several_messages_each_whole_and_in_order(served: tuple[str, Probe]) -> None:
    url, probe = served
    async with websockets.connect(url + "/echo") as ws:
        await ws.send("hello")
        assert await ws.recv() == "hello"
        assert probe.io is not None and probe.io.send_many is not None
        await probe.io.send_many(['{"n":1}', b"\x00" * 320, '{"n":3}'])
        assert [await ws.recv() for _ in range(3)] == ['{"n":1}', b"\x00" * 320, '{"n":3}']


@pytest.mark.parametrize(("frames", "code"), [
    ([bytes([0x81, 0x02]) + b"hi"], 1002),                               # not masked
    ([masked(OP_TEXT, b"\xff\xfe")], 1007),                               # text that is not UTF-8
    ([masked(OP_BINARY, bytes(5000))], 1009),                             # over ws_max_message_bytes
    ([masked(OP_TEXT, bytes(3000), fin=False), masked(0, bytes(3000))], 1009),   # over it in fragments
    ([masked(0, b"x")], 1002),                                            # continuation of nothing
    ([masked(OP_TEXT, b"a", fin=False), masked(OP_TEXT, b"b")], 1002),    # new message inside a message
])
async def test_frames_a_client_must_not_send_close_with_the_rfc_code(served: tuple[str, Probe], frames: list[bytes],
                                                                    code: int) -> None:
    url, probe = served
    client = await RawClient.open(url, "/echo")
    assert client.head.startswith(b"HTTP/1.1 101")
    client.writer.write(b"".join(frames))
    assert (await client.close_frame())[0] == code
    assert await asyncio.wait_for(client.reader.read(), 5) == b""        # then the server closes the TCP connection
    await asyncio.wait_for(probe.done.wait(), 5)
    assert probe.close_codes == [code]                                    # what a call's reader acts on


async def test_ping_is_answered_and_a_close_is_echoed(served: tuple[str, Probe]) -> None:
    url, probe = served
    client = await RawClient.open(url, "/echo")
    client.writer.write(masked(OP_PING, b"p1") + masked(OP_TEXT, b"x"))
    assert await client.frame() == (OP_PONG, b"p1")
    assert await client.frame() == (OP_TEXT, b"x")
    client.writer.write(masked(OP_CLOSE, struct.pack("!H", 1001) + b"going"))
    assert await client.close_frame() == (1001, "going")
    await asyncio.wait_for(probe.done.wait(), 5)
    assert probe.close_codes == [1001]


async def test_the_server_closes_and_waits_for_the_answer(served: tuple[str, Probe]) -> None:
    url, probe = served
    async with websockets.connect(url + "/close") as ws:
        with pytest.raises(websockets.ConnectionClosed):
            await ws.recv()
        assert (ws.close_code, ws.close_reason) == (4001, "call ended")
    await asyncio.wait_for(probe.done.wait(), 5)
    assert probe.close_codes == [4001]


async def test_a_peer_that_never_answers_our_close_is_dropped(served: tuple[str, Probe]) -> None:
    url, _ = served
    client = await RawClient.open(url, "/close")
    assert (await client.close_frame()) == (4001, "call ended")
    # ws_close_timeout_secs = 1: the server closes the connection without our answer
    assert await asyncio.wait_for(client.reader.read(), 3) == b""


async def test_handshakes_that_cannot_open_are_refused(served: tuple[str, Probe]) -> None:
    url, _ = served
    old = await RawClient.open(url, "/echo", version="8")
    assert old.head.startswith(b"HTTP/1.1 426") and b"sec-websocket-version: 13" in old.head.lower()
    bad = await RawClient.open(url, "/echo", key="c2hvcnQ=")
    assert bad.head.startswith(b"HTTP/1.1 400")
    refused = await RawClient.open(url, "/refuse")
    assert refused.head.startswith(b"HTTP/1.1 403")
    broken = await RawClient.open(url, "/broken")             # one 500, then the connection ends
    rest = await asyncio.wait_for(broken.reader.read(), 5)
    assert broken.head.startswith(b"HTTP/1.1 500") and b"HTTP/1.1" not in rest
    with pytest.raises(websockets.InvalidStatus) as denied:
        async with websockets.connect(url + "/deny"):
            pass
    assert denied.value.response.status_code == 401 and denied.value.response.body == b"no key"


async def test_listen_pushes_every_message_in_order_in_slices(served: tuple[str, Probe]) -> None:
    """A media leg reads by push; one TCP read holding many messages is handed over ws_messages_per_read (4) at
    a time, with the event loop's other work in between."""
    url, probe = served
    client = await RawClient.open(url, "/listen")
    client.writer.write(b"".join(masked(OP_TEXT, str(i).encode()) for i in range(40)))
    await client.writer.drain()
    async with asyncio.timeout(5):
        while len(probe.messages) < 40:
            await asyncio.sleep(0.01)
    assert probe.messages == [str(i) for i in range(40)]
    assert probe.slices and max(probe.slices) <= 4
    assert probe.contexts == {"CA-listening"}               # handled in the listening task's context
    client.writer.write(masked(OP_TEXT, b"boom"))               # the handler raises: the listener sees it
    assert (await client.close_frame()) == (1011, "handler failed")
    await asyncio.wait_for(probe.done.wait(), 5)
    assert probe.messages[-1] == "raised boom"


async def test_a_reader_that_does_not_read_stops_the_socket_reading(served: tuple[str, Probe]) -> None:
    """Memory is bounded by ws_read_queue_messages (8): the rest stays in the kernel's buffers, and is read once
    the app reads again."""
    url, probe = served
    client = await RawClient.open(url, "/idle")
    async with asyncio.timeout(5):
        while probe.io is None:
            await asyncio.sleep(0.01)
    client.writer.write(b"".join(masked(OP_TEXT, b"m%d" % i) for i in range(200)))
    await client.writer.drain()
    await asyncio.sleep(0.3)
    media = probe.io.receive.__self__          # the connection behind the adapter
    assert 8 <= media.queued <= 8 + 4           # paused at the bound (a read already parsed may finish its slice)
    got = [await asyncio.wait_for(probe.io.receive(), 5) for _ in range(200)]
    assert got == ["m%d" % i for i in range(200)]


@pytest.mark.parametrize("served", [{"ws_ping_interval_secs": 0.2, "ws_ping_timeout_secs": 0.3}], indirect=True)
async def test_keepalive_closes_a_peer_that_never_answers_pings(served: tuple[str, Probe]) -> None:
    url, probe = served
    client = await RawClient.open(url, "/echo")
    op, payload = await client.frame()
    assert op == OP_PING and len(payload) == 4
    assert (await client.close_frame())[0] == 1011               # no pong within 0.3 s
    await asyncio.wait_for(probe.done.wait(), 5)
    assert probe.close_codes == [1011]
    # a peer that answers stays open past several intervals
    async with websockets.connect(url + "/echo") as ws:
        await asyncio.sleep(1.0)
        await ws.send("still here")
        assert await ws.recv() == "still here"
