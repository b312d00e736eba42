"""The gateway's WebSocket server protocol: RFC 6455 on the raw transport, for uvicorn's ``ws`` slot.

A phone call is one small message every 20 ms each way, so what a message costs below the app matters
more than anything the app does with it. uvicorn's implementations parse frames through generators, pass
every message through an ASGI dict and an ``asyncio.Queue``, and pause and resume the socket's reading
around each message (two system calls). This protocol frames and unframes in a few lines
(:mod:`gateway.http.ws_frames`), keeps up to ``read_queue_messages`` messages for a reader that is busy
before it stops reading, and offers a media leg a push path: :meth:`MediaSocket.listen` hands each
message to a plain function as it is read, with no task switch per message, at most
``messages_per_read`` of them before other work runs.

Every app still sees a standard ASGI WebSocket (Starlette's ``WebSocket`` works unchanged); the fast
path is the ``scope["extensions"]["voxray.media_socket"]`` object, which :func:`gateway.calls.socket.socket_io`
uses when it is there.

Closing: a peer's close is answered with its code and ends the connection; our close waits
``close_timeout_s`` for the peer's answer. An oversized message closes with 1009, a frame RFC 6455
forbids with 1002, text that is not UTF-8 with 1007; the app's next read reports that code. Keep-alive
pings go out every ``ping_interval_s`` and the connection closes (1011) when a pong is ``ping_timeout_s``
late.

Usage::

    uvicorn.Config(app, ws=media_websocket_protocol(read_queue_messages=16, messages_per_read=32,
                                                    close_timeout_s=5.0, ping_interval_s=20.0,
                                                    ping_timeout_s=20.0))
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import logging
import os
from collections.abc import Callable
from http import HTTPStatus
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import unquote

from uvicorn.config import Config as UvicornConfig
from uvicorn.protocols.utils import (
    ClientDisconnected,
    get_client_addr,
    get_local_addr,
    get_path_with_query_string,
    get_remote_addr,
    is_ssl,
)
from uvicorn.server import ServerState

if TYPE_CHECKING:
    from uvicorn._types import WebSocketScope

from gateway.http.ws_frames import (
    OP_BINARY,
    OP_CLOSE,
    OP_CONT,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    FrameError,
    accept_key,
    close_payload,
    encode_frame,
    handshake_problem,
    parse_close,
    parse_frame,
)

__all__ = ["MediaSocket", "media_websocket_protocol"]

logger = logging.getLogger(__name__)

Message = str | bytes
OnMessage = Callable[[Message], None]
_DISCONNECT = object()        # queued after the last message: the connection is over


class MediaSocket(asyncio.Protocol):
    """One WebSocket connection (uvicorn builds one per upgrade and hands it the request head)."""

    read_queue_messages = 16
    messages_per_read = 32
    close_timeout_s = 5.0
    ping_interval_s = 20.0
    ping_timeout_s = 20.0

    def __init__(self, config: UvicornConfig, server_state: ServerState, app_state: dict[str, Any],
                 _loop: asyncio.AbstractEventLoop | None = None) -> None:
        if not config.loaded:
            config.load()  # pragma: no cover - uvicorn loads it before serving
        self._config = config
        self._app = config.loaded_app
        self._loop = _loop or asyncio.get_event_loop()
        self._app_state = app_state
        self._connections: set[Any] = server_state.connections   # uvicorn's set names its own protocols
        self._tasks = server_state.tasks
        self._default_headers = server_state.default_headers
        self._max_size = config.ws_max_size
        self.transport: asyncio.Transport = None  # type: ignore[assignment]  # set in connection_made
        self._head = bytearray()
        self._scope: dict[str, Any] | None = None
        self._key = ""
        # reading
        self._buf = bytearray()
        self._fragments: list[bytes] = []
        self._fragment_op = 0
        self._fragment_bytes = 0
        self._queue: collections.deque[object] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None
        self._listener: OnMessage | None = None
        self._listen_context: contextvars.Context | None = None   # the listening task's (its call id)
        self._listen_done: asyncio.Future[None] | None = None
        self._reading_paused = False
        self._parse_scheduled = False
        # state
        self._connect_delivered = False
        self.accepted = False
        self._denial: tuple[int, list[tuple[bytes, bytes]], bytearray] | None = None
        self._close_sent = False
        self._close_received = False
        self._lost = False
        self.close_code: int | None = None       # what the app's reads report once the connection is over
        self._close_reason = ""
        self._close_timer: asyncio.TimerHandle | None = None
        self._writable = True
        self._writable_waiters: list[asyncio.Future[None]] = []
        self._ping_timer: asyncio.TimerHandle | None = None
        self._pong_timer: asyncio.TimerHandle | None = None
        self._ping_payload: bytes | None = None

    # ------------------------------------------------------------------ asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # a stream transport
        self._connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        self._stop_keepalive()
        if self._close_timer is not None:
            self._close_timer.cancel()
        self._connections.discard(self)
        self._ended(1006 if self.close_code is None else self.close_code)
        for waiter in self._writable_waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._writable_waiters.clear()

    def pause_writing(self) -> None:
        self._writable = False

    def resume_writing(self) -> None:
        self._writable = True
        for waiter in self._writable_waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._writable_waiters.clear()

    def data_received(self, data: bytes) -> None:
        if self._scope is None:
            self._head += data
            if b"\r\n\r\n" in self._head:
                self._open(bytes(self._head))
            return
        if self._lost or self.transport.is_closing():
            return
        self._buf += data
        self._parse()

    def eof_received(self) -> bool | None:
        return None          # the transport closes; connection_lost reports 1006

    def shutdown(self) -> None:
        """The server stops: the app hears 1012 (service restart) and the peer gets the same close."""
        if self.accepted and not self._close_sent and not self._lost:
            self._send_close(1012, "server shutting down")
            self._ended(1012)
        elif not self.accepted and self._denial is None and not self._lost:
            self._write_response(500, b"Internal Server Error")
        self.transport.close()

    # ------------------------------------------------------------------ opening handshake
    def _open(self, head: bytes) -> None:
        request_line, *lines = head.split(b"\r\n\r\n", 1)[0].split(b"\r\n")
        method, _, rest = request_line.decode("latin-1").partition(" ")
        target = rest.rsplit(" ", 1)[0]
        raw_headers: list[tuple[bytes, bytes]] = []
        joined: dict[str, str] = {}
        for line in lines:
            name, _, value = line.partition(b":")
            name, value = name.strip().lower(), value.strip()
            raw_headers.append((name, value))
            key = name.decode("latin-1")
            text = value.decode("latin-1")
            joined[key] = f"{joined[key]}, {text}" if key in joined else text
        problem = handshake_problem(method, joined)
        if problem is not None:
            status, reason = problem
            extra = [(b"sec-websocket-version", b"13")] if status == 426 else []
            self._write_response(status, reason.encode(), extra)
            self._scope = {}
            self.transport.close()
            return
        self._key = joined["sec-websocket-key"].strip()
        raw_path, _, query = target.partition("?")
        root = self._config.root_path
        subprotocols = [t.strip() for t in joined.get("sec-websocket-protocol", "").split(",") if t.strip()]
        self._scope = {
            "type": "websocket",
            "asgi": {"version": self._config.asgi_version, "spec_version": "2.4"},
            "http_version": "1.1",
            "scheme": "wss" if is_ssl(self.transport) else "ws",
            "server": get_local_addr(self.transport),
            "client": get_remote_addr(self.transport),
            "root_path": root,
            "path": root + unquote(raw_path),
            "raw_path": (root + raw_path).encode("latin-1"),
            "query_string": query.encode("latin-1"),
            "headers": raw_headers,
            "subprotocols": subprotocols,
            "state": self._app_state.copy(),
            "extensions": {"websocket.http.response": {}, "voxray.media_socket": self},
        }
        task = self._loop.create_task(self._run_app())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run_app(self) -> None:
        assert self._scope is not None
        try:
            await self._app(self._scope, self._asgi_receive, self._asgi_send)
        except ClientDisconnected:
            pass
        except BaseException:
            logger.exception("WebSocket application failed")
        if not self.accepted and self._denial is None and not self._lost and not self.transport.is_closing():
            self._write_response(500, b"Internal Server Error")
        if self._close_timer is None and not self._lost:
            self.transport.close()

    def _write_response(self, status: int, body: bytes, headers: list[tuple[bytes, bytes]] | None = None) -> None:
        try:
            phrase = HTTPStatus(status).phrase
        except ValueError:
            phrase = ""
        lines = [f"HTTP/1.1 {status} {phrase}".encode()]
        names = set()
        for name, value in (headers or []):
            if name.lower() in (b"content-length", b"connection"):
                continue                        # ours below: the body as written, and the connection ends
            names.add(name.lower())
            lines.append(name + b": " + value)
        if b"content-type" not in names:
            lines.append(b"content-type: text/plain; charset=utf-8")
        lines += [b"content-length: " + str(len(body)).encode(), b"connection: close"]
        self.transport.write(b"\r\n".join(lines) + b"\r\n\r\n" + body)
        self._close_sent = True

    # ------------------------------------------------------------------ ASGI interface
    async def _asgi_receive(self) -> dict[str, Any]:
        if not self._connect_delivered:
            self._connect_delivered = True
            return {"type": "websocket.connect"}
        message = await self.receive()
        if message is None:
            return {"type": "websocket.disconnect", "code": self.close_code, "reason": self._close_reason}
        if isinstance(message, str):
            return {"type": "websocket.receive", "text": message}
        return {"type": "websocket.receive", "bytes": message}

    async def _asgi_send(self, message: dict[str, Any]) -> None:
        kind = message["type"]
        if self._lost and kind != "websocket.http.response.body":
            raise ClientDisconnected()
        if not self.accepted and self._denial is None:
            if kind == "websocket.accept":
                self._accept(message)
            elif kind == "websocket.close":
                self._access_log("403")
                self._write_response(403, b"")
                self._ended(1006)
                self.transport.close()
            elif kind == "websocket.http.response.start":
                self._denial = (int(message["status"]), list(message.get("headers", [])), bytearray())
            else:
                raise RuntimeError(f"expected websocket.accept, websocket.close or websocket.http.response.start, "
                                   f"got {kind!r}")
        elif self._denial is not None:
            if kind != "websocket.http.response.body":
                raise RuntimeError(f"expected websocket.http.response.body, got {kind!r}")
            self._denial[2].extend(message.get("body", b""))
            if not message.get("more_body", False):
                status, headers, body = self._denial
                self._access_log(str(status))
                if not self._lost:
                    self._write_response(status, bytes(body), headers)
                    self.transport.close()
                self._ended(1006)
        elif kind == "websocket.send":
            text = message.get("text")
            await self.send(text if text is not None else message.get("bytes") or b"")
        elif kind == "websocket.close":
            await self.close(int(message.get("code", 1000)), message.get("reason") or "")
        else:
            raise RuntimeError(f"expected websocket.send or websocket.close, got {kind!r}")

    def _accept(self, message: dict[str, Any]) -> None:
        headers = [b"HTTP/1.1 101 Switching Protocols", b"upgrade: websocket", b"connection: Upgrade",
                   b"sec-websocket-accept: " + accept_key(self._key).encode()]
        headers += [name + b": " + value for name, value in self._default_headers if name.lower() != b"date"]
        headers += [name + b": " + value for name, value in message.get("headers", [])]
        if message.get("subprotocol"):
            headers.append(b"sec-websocket-protocol: " + message["subprotocol"].encode())
        self.transport.write(b"\r\n".join(headers) + b"\r\n\r\n")
        self.accepted = True
        self._access_log("[accepted]")
        self._schedule_ping()

    def _access_log(self, outcome: str) -> None:
        """uvicorn's line for a WebSocket (the log filter masks query secrets and shortens session ids)."""
        if logger.isEnabledFor(logging.INFO) and self._scope:
            scope = cast("WebSocketScope", self._scope)     # built as uvicorn's WebSocketScope in _open
            logger.info('%s - "WebSocket %s" %s', get_client_addr(scope), get_path_with_query_string(scope), outcome)

    # ------------------------------------------------------------------ the app's side (fast path)
    @property
    def queued(self) -> int:
        """Messages read and not yet taken by the app (at most about ``read_queue_messages``)."""
        return len(self._queue) - (1 if self.close_code is not None else 0)

    async def receive(self) -> Message | None:
        """The next message, or None once the connection is over (then :attr:`close_code` says why)."""
        while not self._queue:
            if self._waiter is not None:
                raise RuntimeError("two readers on one WebSocket")
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        item = self._queue[0]
        if item is _DISCONNECT:
            return None             # stays queued: every later read says the same
        self._queue.popleft()
        if self._reading_paused and len(self._queue) <= self.read_queue_messages // 2:
            self._resume_reading()
        return cast(Message, item)          # the queue holds messages and the one sentinel (not this one)

    async def listen(self, on_message: OnMessage) -> None:
        """Call ``on_message`` with each message as it is read (queued ones first), until the connection
        is over; an exception from ``on_message`` stops the delivery and is raised here."""
        while self._queue:
            item = self._queue.popleft()
            if item is _DISCONNECT:
                self._queue.appendleft(item)
                return
            on_message(cast(Message, item))
        if self._lost or self.close_code is not None:
            return
        self._listen_done = self._loop.create_future()
        self._listener = on_message
        self._listen_context = contextvars.copy_context()   # messages are handled as if in this task
        if self._reading_paused:
            self._resume_reading()
        try:
            await self._listen_done
        finally:
            self._listener = None
            self._listen_done = None
            self._listen_context = None

    async def send(self, data: Message) -> None:
        """One text (str) or binary (bytes) message; waits while the peer is not reading."""
        if await self._writable_now():
            self.transport.write(_frame(data))

    async def send_many(self, messages: list[Message]) -> None:
        """Several messages in one write (one system call): a carrier's 20 ms frames sent together."""
        if await self._writable_now():
            self.transport.write(b"".join(_frame(m) for m in messages))

    async def _writable_now(self) -> bool:
        """Wait while the peer is not reading; False once the socket is closing or gone."""
        if self._close_sent or self._lost:
            return False
        if not self._writable:
            waiter = self._loop.create_future()
            self._writable_waiters.append(waiter)
            await waiter
        return not (self._close_sent or self._lost)

    async def close(self, code: int = 1000, reason: str = "") -> None:
        """Send our close (once) and wait at most ``close_timeout_s`` for the peer's answer."""
        if self._close_sent or self._lost:
            return
        self._send_close(code, reason)
        self._ended(code, reason)
        self._close_timer = self._loop.call_later(self.close_timeout_s, self.transport.close)

    # ------------------------------------------------------------------ reading
    def _parse(self) -> None:
        buf, at, delivered = self._buf, 0, 0
        try:
            while True:
                if self._reading_paused and self._listener is None:
                    break                       # the reader has enough queued: the rest waits in the buffer
                if delivered >= self.messages_per_read:
                    self._pause_reading()
                    if not self._parse_scheduled:
                        self._parse_scheduled = True
                        self._loop.call_soon(self._parse_later)
                    break
                parsed = parse_frame(buf, at, self._max_size - self._fragment_bytes)
                if parsed is None:
                    break
                fin, opcode, payload, at = parsed
                if opcode == OP_TEXT or opcode == OP_BINARY:
                    if self._fragment_op:
                        raise FrameError(1002, "new message before the previous one ended")
                    if fin:
                        delivered += 1
                        self._message(payload.decode() if opcode == OP_TEXT else payload)
                    else:
                        self._fragment_op, self._fragments, self._fragment_bytes = opcode, [payload], len(payload)
                elif opcode == OP_CONT:
                    if not self._fragment_op:
                        raise FrameError(1002, "continuation without a message")
                    self._fragments.append(payload)
                    self._fragment_bytes += len(payload)
                    if fin:
                        whole = b"".join(self._fragments)
                        op, self._fragment_op, self._fragments, self._fragment_bytes = self._fragment_op, 0, [], 0
                        delivered += 1
                        self._message(whole.decode() if op == OP_TEXT else whole)
                else:
                    self._control(opcode, payload)
                if at == len(buf) or self._close_received or self._close_sent and self._lost:
                    break                       # (all read: the usual case, one message per read)
        except FrameError as exc:
            self._fail(exc.code, exc.reason)
        except UnicodeDecodeError:
            self._fail(1007, "text message is not UTF-8")
        if at:
            del buf[:at]

    def _parse_later(self) -> None:
        self._parse_scheduled = False
        if self._lost or self._close_received:
            return
        if self._listener is None and len(self._queue) >= self.read_queue_messages:
            return                              # the reader resumes us as it takes messages
        self._resume_reading(parse_buffer=False)
        self._parse()

    def _message(self, message: Message) -> None:
        if self._close_sent:
            return                              # past our close: only the peer's answer matters
        listener = self._listener
        if listener is not None and not self._queue:
            try:
                self._listen_context.run(listener, message)  # type: ignore[union-attr]  # set with the listener
            except BaseException as exc:        # noqa: BLE001 - raised in the listening task instead
                self._listener = None
                if self._listen_done is not None and not self._listen_done.done():
                    self._listen_done.set_exception(exc)
            return
        self._queue.append(message)
        self._wake()
        if len(self._queue) >= self.read_queue_messages and self._listener is None:
            self._pause_reading()

    def _control(self, opcode: int, payload: bytes) -> None:
        if opcode == OP_PING:
            if not self._close_sent:
                self.transport.write(encode_frame(OP_PONG, payload))
        elif opcode == OP_PONG:
            if self._ping_payload is not None and payload == self._ping_payload:
                self._ping_payload = None
                if self._pong_timer is not None:
                    self._pong_timer.cancel()
                    self._pong_timer = None
                self._schedule_ping()
        else:
            code, reason = parse_close(payload)
            self._close_received = True
            if not self._close_sent:
                self._send_close(code, reason)
                self._ended(code, reason)
            self.transport.close()

    def _fail(self, code: int, reason: str) -> None:
        logger.info("closing a WebSocket with %d: %s", code, reason)
        if not self._close_sent:
            self._send_close(code, reason)
        self._ended(code, reason)
        self.transport.close()

    def _pause_reading(self) -> None:
        if not self._reading_paused and not self._lost:
            self._reading_paused = True
            self.transport.pause_reading()

    def _resume_reading(self, *, parse_buffer: bool = True) -> None:
        if self._reading_paused:
            self._reading_paused = False
            if not self._lost and not self.transport.is_closing():
                self.transport.resume_reading()
            if parse_buffer and self._buf and not self._parse_scheduled:
                self._parse_scheduled = True
                self._loop.call_soon(self._parse_later)

    # ------------------------------------------------------------------ ending
    def _send_close(self, code: int, reason: str) -> None:
        self._close_sent = True
        self._stop_keepalive()
        if not self._lost:
            self.transport.write(encode_frame(OP_CLOSE, close_payload(code, reason)))

    def _ended(self, code: int, reason: str = "") -> None:
        """The app's reads end here: they report ``code`` (the first one set)."""
        if self.close_code is None:
            self.close_code, self._close_reason = code, reason
            self._queue.append(_DISCONNECT)
            self._wake()
        done = self._listen_done
        if done is not None and not done.done():
            done.set_result(None)

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # ------------------------------------------------------------------ keep-alive
    def _schedule_ping(self) -> None:
        if self.ping_interval_s > 0 and not self._close_sent and not self._lost:
            self._ping_timer = self._loop.call_later(self.ping_interval_s, self._ping)

    def _ping(self) -> None:
        self._ping_timer = None
        if self._close_sent or self._lost:
            return
        self._ping_payload = os.urandom(4)
        self.transport.write(encode_frame(OP_PING, self._ping_payload))
        self._pong_timer = self._loop.call_later(self.ping_timeout_s, self._pong_missing)

    def _pong_missing(self) -> None:
        self._pong_timer = None
        logger.info("closing a WebSocket: no pong within %g s", self.ping_timeout_s)
        self._fail(1011, "keepalive ping timeout")

    def _stop_keepalive(self) -> None:
        for timer in (self._ping_timer, self._pong_timer):
            if timer is not None:
                timer.cancel()
        self._ping_timer = self._pong_timer = None


def media_websocket_protocol(*, read_queue_messages: int, messages_per_read: int, close_timeout_s: float,
                             ping_interval_s: float, ping_timeout_s: float) -> type[MediaSocket]:
    """A protocol class carrying these limits (uvicorn builds one instance per connection)."""
    return type("MediaSocket", (MediaSocket,), {
        "read_queue_messages": read_queue_messages, "messages_per_read": messages_per_read,
        "close_timeout_s": close_timeout_s, "ping_interval_s": ping_interval_s, "ping_timeout_s": ping_timeout_s})


def _frame(message: Message) -> bytes:
    """One unmasked server frame for a text (str) or binary (bytes) message."""
    return encode_frame(OP_TEXT, message.encode()) if isinstance(message, str) else encode_frame(OP_BINARY, message)
