"""Build the uvicorn server for an app and config (used by ``voxray serve``, tests and benchmarks).

The first SIGTERM (or SIGINT) drains before the server stops (``gateway.drain``): uvicorn's own
shutdown would close every media socket at once. A second signal stops at once.

The HTTP edge comes from the config: a request head must arrive within ``http_header_timeout_secs``
and ``http_max_header_bytes`` (``gateway.http.protocol``), idle keep-alive connections close after
``http_keep_alive_timeout_secs``, and ``X-Forwarded-For``/``-Proto`` count only from the proxies in
``forwarded_allow_ips`` (none by default: the peer's own address is the client's).

Usage::

    server = build_server(create_app(config), config)
    await server.serve(sockets=[sock])        # or server.run() from the command line
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
from collections.abc import Iterator
from types import FrameType
from typing import TYPE_CHECKING, Any

import uvicorn
from starlette.applications import Starlette

from gateway.config import Config
from gateway.http.protocol import guarded_http_protocol
from gateway.http.websocket import media_websocket_protocol

if TYPE_CHECKING:
    from gateway.app import Services

__all__ = ["build_server"]

logger = logging.getLogger(__name__)


class _Server(uvicorn.Server):
    """uvicorn's server; embedded servers (tests, benchmarks) leave the process's signals alone."""

    def __init__(self, config: uvicorn.Config, *, handle_signals: bool, app: Starlette) -> None:
        super().__init__(config)
        self._handle_signals = handle_signals
        self._app = app
        self._drain_requested = False
        self._drain_task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets=sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        """First SIGTERM/SIGINT: drain, then exit. A second one: exit now (uvicorn's behaviour)."""
        services = getattr(self._app.state, "services", None)
        if self._drain_requested or services is None or self._loop is None or self.should_exit:
            super().handle_exit(sig, frame)
            return
        self._drain_requested = True
        self._captured_signals.append(sig)
        logger.info("received %s: draining", signal.Signals(sig).name)
        self._loop.call_soon_threadsafe(self._start_drain, services)

    def _start_drain(self, services: Services) -> None:
        from gateway.drain import drain

        async def drain_then_exit() -> None:
            try:
                await drain(services)
            finally:
                self.should_exit = True

        self._drain_task = asyncio.ensure_future(drain_then_exit())

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if self._handle_signals:
            with super().capture_signals():
                yield
        else:
            yield


def build_server(app: Starlette, config: Config, *, handle_signals: bool = True,
                 **overrides: object) -> uvicorn.Server:
    options: dict[str, Any] = dict(        # Any: uvicorn.Config's keywords each have their own type
        host=config.host, port=config.port, log_config=None, lifespan="on", access_log=False,
        # the protocol layer refuses frames past the limit (close 1009); the call checks it too
        ws_max_size=config.ws_max_message_bytes,
        # our own WebSocket protocol (gateway.http.websocket): a media message costs a third of uvicorn's path.
        # It offers no permessage-deflate: a client that asked would have every 20 ms media message inflated and
        # deflated (base64 µ-law barely compresses); carriers do not need it
        ws=media_websocket_protocol(read_queue_messages=config.ws_read_queue_messages,
                                    messages_per_read=config.ws_messages_per_read,
                                    close_timeout_s=config.ws_close_timeout_secs,
                                    ping_interval_s=config.ws_ping_interval_secs,
                                    ping_timeout_s=config.ws_ping_timeout_secs),
        ws_per_message_deflate=False,
        http=guarded_http_protocol(header_timeout_s=config.http_header_timeout_secs,
                                   max_header_bytes=config.http_max_header_bytes),
        timeout_keep_alive=config.http_keep_alive_timeout_secs,
        # never uvicorn's default (FORWARDED_ALLOW_IPS, else 127.0.0.1): only the configured proxies
        proxy_headers=bool(config.forwarded_allow_ips), forwarded_allow_ips=list(config.forwarded_allow_ips),
        timeout_graceful_shutdown=5)
    options.update(overrides)
    return _Server(uvicorn.Config(app, **options), handle_signals=handle_signals, app=app)
