"""The worker group's wire: JSON lines over a unix socket, requests and replies multiplexed both ways.

Each side of a connection is a :class:`Peer`: it sends requests (``{"id", "op", "args"}``) and awaits
their replies (``{"re": id, "result"}`` or ``{"re": id, "error"}``), and answers the other side's
requests with its ``handler``. Requests are handled concurrently, so a peer may ask the other side
something while that side is waiting on it.

Usage::

    reader, writer = await asyncio.open_unix_connection(path, limit=LINE_LIMIT)
    peer = Peer(reader, writer, handler)          # handler(op, args) -> JSON value (awaitable)
    task = asyncio.create_task(peer.run())        # until the other side closes
    value = await peer.request("session.get", {"id": sid}, timeout_s=2.0)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

__all__ = ["LINE_LIMIT", "Handler", "Peer", "PeerGone", "RemoteError"]

logger = logging.getLogger(__name__)

LINE_LIMIT = 16 * 1024 * 1024     # one message (a worker's metrics are the largest)

Handler = Callable[[str, Mapping[str, Any]], Awaitable[Any]]


class PeerGone(ConnectionError):
    """The other side closed the connection (or never answered within the timeout)."""


class RemoteError(RuntimeError):
    """The other side's handler failed; the message says how."""


class Peer:
    """One end of a group connection."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, handler: Handler) -> None:
        self._reader = reader
        self._writer = writer
        self._handler = handler
        self._next_id = 0
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._handling: set[asyncio.Task[None]] = set()
        self.closed = asyncio.Event()

    async def request(self, op: str, args: Mapping[str, Any] | None = None, *, timeout_s: float = 5.0) -> Any:
        """Send ``op`` and return the other side's result; :class:`PeerGone` when it is gone or silent,
        :class:`RemoteError` when its handler failed."""
        if self.closed.is_set():
            raise PeerGone("the connection is closed")
        self._next_id += 1
        request_id = self._next_id
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        try:
            await self._send({"id": request_id, "op": op, "args": dict(args or {})})
            async with asyncio.timeout(timeout_s):
                return await future
        except TimeoutError:
            raise PeerGone(f"no answer to {op} within {timeout_s:g} s") from None
        finally:
            self._pending.pop(request_id, None)

    async def run(self) -> None:
        """Read and dispatch messages until the other side closes; then fail what still waits."""
        try:
            while line := await self._reader.readline():
                try:
                    message = json.loads(line)
                except ValueError:
                    logger.warning("group wire: ignored a line that is not JSON")
                    continue
                if "re" in message:
                    future = self._pending.get(message["re"])
                    if future is not None and not future.done():
                        if "error" in message:
                            future.set_exception(RemoteError(str(message["error"])))
                        else:
                            future.set_result(message.get("result"))
                elif "op" in message:
                    task = asyncio.create_task(self._answer(message))
                    self._handling.add(task)
                    task.add_done_callback(self._handling.discard)
        except (ConnectionError, asyncio.IncompleteReadError, ValueError) as exc:   # ValueError: line too long
            logger.warning("group wire: connection lost: %s", type(exc).__name__)
        finally:
            self.closed.set()
            for future in self._pending.values():
                if not future.done():
                    future.set_exception(PeerGone("the other side closed the connection"))
            for task in list(self._handling):
                task.cancel()
            self._writer.close()

    async def _answer(self, message: Mapping[str, Any]) -> None:
        reply: dict[str, Any] = {"re": message.get("id")}
        try:
            reply["result"] = await self._handler(str(message["op"]), message.get("args") or {})
        except Exception as exc:  # noqa: BLE001 - the asker gets the failure instead of waiting
            logger.exception("group wire: handling %s failed", message.get("op"))
            reply["error"] = f"{type(exc).__name__}: {exc}"
        with contextlib.suppress(ConnectionError, PeerGone):
            await self._send(reply)

    async def _send(self, message: Mapping[str, Any]) -> None:
        if self._writer.is_closing():
            raise PeerGone("the connection is closed")
        self._writer.write(json.dumps(message, separators=(",", ":")).encode() + b"\n")
        await self._writer.drain()

    async def close(self) -> None:
        self._writer.close()
        with contextlib.suppress(Exception):
            await self._writer.wait_closed()
