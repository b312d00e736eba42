"""Run a fake's Starlette app on 127.0.0.1 (ephemeral port) for the length of an ``async with``.

Usage (a fake subclasses it and sets ``self.app`` and ``self.name``)::

    class FakeThing(LocalServer):
        def __init__(self) -> None:
            super().__init__("fake Thing REST", Starlette(routes=[...]))

    async with FakeThing() as fake:
        fake.base_url            # "http://127.0.0.1:<port>"
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from typing import Any, TypeVar

import uvicorn

__all__ = ["LocalServer"]

_S = TypeVar("_S", bound="LocalServer")


class _Server(uvicorn.Server):
    def capture_signals(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()  # leave Ctrl-C to pytest


class LocalServer:
    def __init__(self, name: str, app: Any) -> None:
        self.name = name
        self.app = app
        self.base_url = ""
        self._server: _Server | None = None
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self: _S) -> _S:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        config = uvicorn.Config(self.app, log_config=None, lifespan="off", access_log=False,
                                timeout_graceful_shutdown=2)
        self._server = server = _Server(config)
        self._task = asyncio.create_task(self._serve(server, sock))
        deadline = time.monotonic() + 5
        while not server.started:
            if self._task.done() or time.monotonic() > deadline:
                await self.__aexit__(None, None, None)
                raise RuntimeError(f"{self.name} failed to start within 5 s")
            await asyncio.sleep(0.01)
        self.base_url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        return self

    @staticmethod
    async def _serve(server: _Server, sock: socket.socket) -> None:
        try:
            await server.serve(sockets=[sock])
        finally:
            sock.close()

    async def __aexit__(self, *_exc: object) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._task is not None:
            with contextlib.suppress(Exception):
                await self._task
            self._task = None
