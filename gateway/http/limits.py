"""Request body limit: bodies over ``max_request_body_bytes`` get 413 while they are being read.

A pure ASGI middleware in front of every route. A declared ``Content-Length`` over the limit is
refused before a byte of the body is read; otherwise (chunked bodies too) the chunks are counted as
they arrive and the read stops at the limit with 413. The app is called only with a complete body
of at most the limit, replayed as one message, so it never buffers more, and a cut body never
reaches it (no half-read request to turn into a 500 or a hang). After the 413 the server discards
the rest of the upload as it arrives, never storing it, for at most ``http_header_timeout_secs``
(``gateway.http.protocol``): the client reads the answer instead of a connection reset.

Usage::

    Starlette(routes=..., middleware=[Middleware(BodyLimit, max_body_bytes=262144)])
"""

from __future__ import annotations

import json
import logging

from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["BodyLimit"]

logger = logging.getLogger(__name__)


class BodyLimit:
    """Answers 413 for an HTTP request body over ``max_body_bytes``, having read at most that much."""

    def __init__(self, app: ASGIApp, *, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_body_bytes:
            await self._refuse(scope, send, f"Content-Length {declared}")
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return                       # the client left mid-body: nobody to answer
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                await self._refuse(scope, send, f"more than {self.max_body_bytes} bytes read")
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        await self.app(scope, _replay(b"".join(chunks), receive), send)

    async def _refuse(self, scope: Scope, send: Send, seen: str) -> None:
        client = scope.get("client")
        logger.warning("request body too large: %s %s (%s, limit %d) from %s", scope["method"], scope["path"], seen,
                       self.max_body_bytes, client[0] if client else "-")
        body = json.dumps({"error": f"request body larger than {self.max_body_bytes} bytes"}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


def _content_length(scope: Scope) -> int | None:
    """The declared body size, or None (chunked, absent, or malformed: the server's parser judges those)."""
    for name, value in scope["headers"]:
        if name == b"content-length":
            return int(value) if value.isdigit() else None
    return None


def _replay(body: bytes, receive: Receive) -> Receive:
    """The whole body as one message, then the server's own ``receive`` (for the disconnect)."""
    pending: list[Message] = [{"type": "http.request", "body": body, "more_body": False}]

    async def replay() -> Message:
        return pending.pop() if pending else await receive()

    return replay
