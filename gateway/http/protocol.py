"""uvicorn's httptools protocol with a deadline and a size cap on each request head.

uvicorn closes idle keep-alive connections but has no limit on how long a client may take to send
its request line and headers, nor (with httptools) on their size: a client sending one header line
every few seconds held its connection forever (slowloris). Here a timer starts when a connection
opens and again after each response; the request head must be complete before it fires, or the
connection is closed. A head growing past ``max_header_bytes`` gets 431 and the connection closes.
Once the head is complete the request (and a WebSocket upgrade) is the app's business.

After a response the rest of an unread request body (a 413 from ``gateway.http.limits``) is discarded as
it arrives, as uvicorn does, so the client finishes sending and reads the answer instead of a reset;
the head timer bounds that too.

Usage::

    protocol = guarded_http_protocol(header_timeout_s=10.0, max_header_bytes=65536)
    uvicorn.Config(app, http=protocol)
"""

from __future__ import annotations

import asyncio
import logging

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

__all__ = ["GuardedHttpProtocol", "guarded_http_protocol"]

logger = logging.getLogger(__name__)


class GuardedHttpProtocol(HttpToolsProtocol):
    """Closes a connection whose request head is not complete within ``header_timeout_s``."""

    header_timeout_s: float = 10.0
    max_header_bytes: int = 65536
    _head_timer: asyncio.TimerHandle | None = None
    _head_bytes: int | None = None           # bytes read since a request began, until its head is complete

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]  # narrows BaseTransport as uvicorn does
        super().connection_made(transport)
        self._await_head()

    def connection_lost(self, exc: Exception | None) -> None:
        self._head_complete()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)          # the parser begins and ends heads (the callbacks below) inside
        if self._head_bytes is not None and not self.transport.is_closing():
            self._head_bytes += len(data)    # (counts the whole read the head began in: a generous cap)
            if self._head_bytes > self.max_header_bytes:
                self._refuse_head()

    def on_message_begin(self) -> None:
        self._head_bytes = 0
        super().on_message_begin()

    def on_headers_complete(self) -> None:
        self._head_complete()
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        """Idle again (an unread rest of the request body is discarded meanwhile): the next head has
        ``header_timeout_s`` to arrive, which also bounds how long that discarding may go on."""
        super().on_response_complete()
        if self.timeout_keep_alive_task is not None:   # not pipelined, not closing
            self._await_head()

    def _await_head(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
        self._head_timer = self.loop.call_later(self.header_timeout_s, self._head_timed_out)

    def _head_complete(self) -> None:
        self._head_bytes = None
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if not self.transport.is_closing():
            logger.info("closing a connection from %s: no complete request head within %g s",
                        self.client[0] if self.client else "-", self.header_timeout_s)
            self.transport.close()

    def _refuse_head(self) -> None:
        self._head_complete()
        logger.warning("closing a connection from %s: request head over %d bytes",
                       self.client[0] if self.client else "-", self.max_header_bytes)
        self.transport.write(b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\n"
                             b"connection: close\r\n\r\n")
        self.transport.close()


def guarded_http_protocol(*, header_timeout_s: float, max_header_bytes: int) -> type[GuardedHttpProtocol]:
    """A protocol class carrying these limits (uvicorn builds one instance per connection)."""
    return type("GuardedHttpProtocol", (GuardedHttpProtocol,),
                {"header_timeout_s": header_timeout_s, "max_header_bytes": max_header_bytes})
