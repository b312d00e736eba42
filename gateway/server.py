"""Build the uvicorn server for an app and config (used by ``voxray serve``, tests and benchmarks).

Usage::

    server = build_server(create_app(config), config)
    await server.serve(sockets=[sock])        # or server.run() from the command line
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import uvicorn
from starlette.applications import Starlette

from gateway.config import Config

__all__ = ["build_server"]


class _Server(uvicorn.Server):
    """uvicorn's server; embedded servers (tests, benchmarks) leave the process's signals alone."""

    def __init__(self, config: uvicorn.Config, *, handle_signals: bool) -> None:
        super().__init__(config)
        self._handle_signals = handle_signals

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if self._handle_signals:
            with super().capture_signals():
                yield
        else:
            yield


def build_server(app: Starlette, config: Config, *, handle_signals: bool = True,
                 **overrides: object) -> uvicorn.Server:
    options: dict[str, object] = dict(
        host=config.host, port=config.port, log_config=None, lifespan="on", access_log=False,
        # the protocol layer refuses frames past the limit (close 1009); the call checks it too
        ws_max_size=config.ws_max_message_bytes, ws_ping_interval=20.0, ws_ping_timeout=20.0,
        proxy_headers=True, forwarded_allow_ips="*", timeout_graceful_shutdown=5)
    options.update(overrides)
    return _Server(uvicorn.Config(app, **options), handle_signals=handle_signals)  # type: ignore[arg-type]
