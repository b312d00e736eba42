"""The three socket operations a call's leg needs, and their adapter for a Starlette WebSocket.

Usage::

    io = socket_io(websocket)            # after websocket.accept()
    message = await io.receive()         # str | bytes, or None once the peer closed
    await io.send("{...}")
    await io.send_many([m1, m2]) if io.send_many else ...   # one socket write (the gateway's own server)
    await io.close(1000, "call ended")
    if io.listen is not None:            # the gateway's own server: each message pushed as it is read
        await io.listen(handle)          # handle(message) for every message until the peer closed

Under the gateway's server (``gateway.http.websocket``) the operations go straight to the connection;
under any other ASGI server they go through the raw ASGI channel.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from starlette.websockets import WebSocket, WebSocketDisconnect

from gateway.http.websocket import MediaSocket

__all__ = ["SocketIO", "socket_io"]


@dataclass(slots=True)
class SocketIO:
    """The three socket operations a call needs (a Starlette WebSocket adapts to this)."""

    receive: Callable[[], Awaitable[str | bytes | None]]      # None: the peer closed
    send: Callable[[str | bytes], Awaitable[None]]
    close: Callable[[int, str], Awaitable[None]]
    peer_close_code: Callable[[], int | None] = lambda: None   # why the socket closed, once receive gave None
    # push delivery (the gateway's own server only): calls the function with each message as it is read,
    # returns once the peer closed; an exception from the function stops it and is raised
    listen: Callable[[Callable[[str | bytes], None]], Awaitable[None]] | None = None
    # several messages in one socket write (the gateway's own server only; else they are sent one by one)
    send_many: Callable[[list[str | bytes]], Awaitable[None]] | None = None


def socket_io(websocket: WebSocket) -> SocketIO:
    """The connection's own operations under the gateway's server, else raw ASGI messages (cheaper than
    Starlette's helpers on the per-frame path)."""
    direct = websocket.scope.get("extensions", {}).get("voxray.media_socket")
    if isinstance(direct, MediaSocket):
        return SocketIO(receive=direct.receive, send=direct.send, close=direct.close,
                        peer_close_code=lambda: direct.close_code, listen=direct.listen, send_many=direct.send_many)
    receive, send = websocket._receive, websocket._send  # noqa: SLF001 - Starlette exposes no public raw ASGI channel
    closed = False
    peer_code: int | None = None

    async def recv() -> str | bytes | None:
        nonlocal closed, peer_code
        if closed:
            return None
        message = await receive()
        if message["type"] == "websocket.disconnect":
            closed, peer_code = True, message.get("code")
            return None
        text = message.get("text")
        return text if text is not None else message.get("bytes") or b""

    async def send_message(data: str | bytes) -> None:
        if closed:
            return
        try:
            await send({"type": "websocket.send", "text": data} if isinstance(data, str)
                       else {"type": "websocket.send", "bytes": data})
        except (OSError, RuntimeError, WebSocketDisconnect):
            pass   # the peer went away; the reader sees the disconnect and ends the call

    async def close(code: int, reason: str) -> None:
        nonlocal closed
        if not closed:
            closed = True
            await send({"type": "websocket.close", "code": code, "reason": reason})

    return SocketIO(receive=recv, send=send_message, close=close, peer_close_code=lambda: peer_code)
