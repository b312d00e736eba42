"""A client WebSocket for simulated carriers: websockets' sans-I/O ``ClientProtocol`` under an asyncio transport,
driven by callbacks.

``websockets.connect`` hands every message through a queue to a reading task and takes a lock for every send.
A load benchmark that carries a hundred calls, each with a message every 20 ms in each direction, spent more CPU
in that layer than the gateway spent on the calls, and the client loop's lateness went into the latency it
measured. Here each message reaches ``on_message`` as soon as it is read, with the time it arrived, and
:meth:`WsLink.send` writes at once. The framing is still websockets' own: an implementation of RFC 6455 that
shares nothing with the gateway's. Pings are answered and a close is completed by that protocol.

Usage::

    def heard(message: str | bytes, arrived: float) -> None: ...

    link = await WsLink.open("ws://127.0.0.1:8000/media/twilio/abc", on_message=heard,
                             on_close=lambda code, reason: ...)
    link.send('{"event": "media", ...}')
    await link.drain()                      # waits while the peer is not reading
    await link.close()                      # our close frame, then the server's TCP close
    link.close_code, link.close_reason      # what the server sent (1006: the connection just dropped)

``on_close`` is called once, as soon as the server's close frame arrives (or the connection ends without
one): a server that stops reading may take its time over the TCP close, and the session is over already.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import time
from collections.abc import Callable, Mapping

from websockets.client import ClientProtocol
from websockets.frames import Frame, Opcode
from websockets.http11 import Response
from websockets.protocol import State
from websockets.uri import parse_uri

__all__ = ["WsLink"]

OnMessage = Callable[[str | bytes, float], None]
OnClose = Callable[[int, str], None]


class WsLink(asyncio.Protocol):
    """One client connection; build it with :meth:`open`."""

    def __init__(self, protocol: ClientProtocol, on_message: OnMessage, on_close: OnClose | None,
                 close_timeout_s: float) -> None:
        self._ws = protocol
        self._on_message = on_message
        self._on_close = on_close
        self._close_timeout_s = close_timeout_s
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._opened: asyncio.Future[None] = self._loop.create_future()
        self._lost: asyncio.Future[None] = self._loop.create_future()
        self._writable = asyncio.Event()
        self._writable.set()
        self._fragments: list[bytes] = []
        self._fragment_op: Opcode | None = None
        self._close_timer: asyncio.TimerHandle | None = None
        self._ended = False                     # on_close was called

    @classmethod
    async def open(cls, url: str, *, on_message: OnMessage, on_close: OnClose | None = None,
                   headers: Mapping[str, str] | None = None, sock: socket.socket | None = None,
                   max_size: int | None = None, open_timeout_s: float = 10.0,
                   close_timeout_s: float = 5.0) -> WsLink:
        """Connect (over ``sock`` when given: a connection already made) and complete the opening handshake.

        Raises what ``websockets.connect`` raises: ``OSError`` when the connection fails,
        ``websockets.InvalidStatus`` when the server answers the upgrade with another status,
        ``websockets.InvalidHandshake`` for any other bad answer, ``TimeoutError`` after ``open_timeout_s``.
        """
        uri = parse_uri(url)
        link = cls(ClientProtocol(uri, max_size=max_size), on_message, on_close, close_timeout_s)
        tls = ssl.create_default_context() if uri.secure else None
        async with asyncio.timeout(open_timeout_s):
            if sock is not None:
                await link._loop.create_connection(lambda: link, sock=sock, ssl=tls,
                                                   server_hostname=uri.host if tls else None)
            else:
                await link._loop.create_connection(lambda: link, uri.host, uri.port, ssl=tls)
            request = link._ws.connect()
            for name, value in (headers or {}).items():
                request.headers[name] = value
            link._ws.send_request(request)
            link._flush()
            try:
                await link._opened
            except BaseException:
                if link._transport is not None:
                    link._transport.abort()
                raise
        return link

    # ------------------------------------------------------------------ sending
    def send(self, message: str | bytes) -> None:
        """One text (str) or binary (bytes) message, written now; dropped once the connection is closing."""
        if self._ws.state is not State.OPEN:
            return
        if isinstance(message, str):
            self._ws.send_text(message.encode())
        else:
            self._ws.send_binary(message)
        self._flush()

    async def drain(self) -> None:
        """Wait while the transport's buffer is over its high-water mark (the peer is not reading)."""
        if not self._writable.is_set():
            await self._writable.wait()

    async def close(self, code: int = 1000, reason: str = "") -> None:
        """Send our close (once), then wait at most ``close_timeout_s`` for the server to close the connection."""
        if self._ws.state is State.OPEN:
            self._ws.send_close(code, reason)
            self._flush()
        if self._transport is not None and not self._lost.done():
            self._expect_close()                # its timer aborts the connection: _lost is bounded
            await asyncio.shield(self._lost)

    @property
    def closed(self) -> bool:
        """The server sent its close frame, or the connection ended: the session is over either way."""
        return self._ended

    @property
    def close_code(self) -> int | None:
        """The close code the server sent; 1006 when the connection ended without one; None while open."""
        if self._ws.close_rcvd is not None:
            return self._ws.close_rcvd.code
        return 1006 if self._lost.done() else None

    @property
    def close_reason(self) -> str:
        return self._ws.close_rcvd.reason if self._ws.close_rcvd is not None else ""

    # ------------------------------------------------------------------ asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]  # a stream transport: create_connection

    def data_received(self, data: bytes) -> None:
        arrived = time.monotonic()
        ws = self._ws
        ws.receive_data(data)
        for event in ws.events_received():
            if isinstance(event, Frame):
                self._frame(event, arrived)
            elif isinstance(event, Response) and not self._opened.done():
                if ws.handshake_exc is not None:
                    self._opened.set_exception(ws.handshake_exc)
                else:
                    self._opened.set_result(None)
        self._flush()
        if ws.close_expected():
            self._expect_close()
        if ws.close_rcvd is not None:
            self._end()                         # at once: the TCP close may come much later (or never)

    def eof_received(self) -> bool | None:
        self._ws.receive_eof()
        self._flush()
        return None                             # the transport closes itself

    def connection_lost(self, exc: Exception | None) -> None:
        self._ws.receive_eof()                  # CLOSED: close_code and close_reason are final
        if self._close_timer is not None:
            self._close_timer.cancel()
        if not self._opened.done():
            self._opened.set_exception(exc or ConnectionError("the connection closed during the handshake"))
        self._writable.set()
        if not self._lost.done():
            self._lost.set_result(None)
        self._end()

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    # ------------------------------------------------------------------ internals
    def _frame(self, frame: Frame, arrived: float) -> None:
        opcode = frame.opcode
        if opcode is Opcode.TEXT or opcode is Opcode.BINARY:
            self._fragment_op, self._fragments = opcode, []
        elif opcode is not Opcode.CONT or self._fragment_op is None:
            return          # PING, PONG and CLOSE: the protocol answered them (a pong, our close) in data_to_send()
        self._fragments.append(bytes(frame.data))
        if frame.fin:
            whole = self._fragments[0] if len(self._fragments) == 1 else b"".join(self._fragments)
            op, self._fragment_op, self._fragments = self._fragment_op, None, []
            self._on_message(whole.decode() if op is Opcode.TEXT else whole, arrived)

    def _flush(self) -> None:
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        for data in self._ws.data_to_send():
            if data:
                transport.write(data)
            elif transport.can_write_eof():
                transport.write_eof()

    def _end(self) -> None:
        if not self._ended:
            self._ended = True
            if self._on_close is not None:
                self._on_close(self.close_code or 1006, self.close_reason)

    def _expect_close(self) -> None:
        """The server closes the TCP connection after the close handshake; abort it if it does not in time."""
        if self._close_timer is None and self._transport is not None:
            self._close_timer = self._loop.call_later(self._close_timeout_s, self._transport.abort)
