"""A gateway in this process for ``voxray simulate`` without ``--url``: the user's configuration plus
throw-away development settings, on a free 127.0.0.1 port, with its transcripts tapped.

The emulated carrier and the gateway share a credential generated for this run (nothing real is
needed or used); ``public_url`` names the local gateway (``https://127.0.0.1:<port>``), the URL both
sides sign; ``log_transcripts`` is on; the carrier's REST base URL points at a closed local port, so
nothing is ever sent to the real carrier. The throw-away API key keeps the gateway from printing a
softphone link.

Usage::

    credentials = DevCredentials.generate("telnyx")
    async with LocalGateway(config, credentials, start_timeout_s=30) as gateway:
        gateway.url            # "http://127.0.0.1:54321"
        gateway.public_url     # "https://127.0.0.1:54321"
        gateway.config         # the Config it runs
    with TranscriptTap(on_line) as tap:     # on_line(call_id, "caller" | "agent", text)
        ...
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import logging
import re
import secrets
import socket
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from gateway.carrier_config import CarriersConfig
from gateway.config import Config

__all__ = ["DevCredentials", "GatewayStartError", "LocalGateway", "TranscriptTap", "dev_config"]

CALL_LOG_LOGGER = "gateway.calls.call_log"     # where the gateway logs "caller said: ..." / "agent said: ..."
_SAID = re.compile(r"^(caller|agent) said: (.*)$", re.DOTALL)
_NO_CARRIER_API = "http://127.0.0.1:9"         # the discard port: a REST call fails at once, locally


class GatewayStartError(Exception):
    """The in-process gateway did not start: ``str(exc)`` is one line with the cause."""


@dataclass(frozen=True, slots=True)
class DevCredentials:
    """One run's throw-away carrier credential: ``gateway`` are the carrier's settings on the gateway
    (``carriers.<carrier>``), ``emulator`` what the emulated carrier signs with."""

    carrier: str
    gateway: Mapping[str, str]
    emulator: Mapping[str, str]

    @classmethod
    def generate(cls, carrier: str) -> DevCredentials:
        """Fresh random credentials for ``carrier`` (twilio, telnyx, vonage, plivo or exotel).

        >>> creds = DevCredentials.generate("twilio")
        >>> creds.gateway["auth_token"] == creds.emulator["auth_token"]
        True
        """
        token = secrets.token_hex(16)
        if carrier == "twilio":
            both = {"account_sid": "AC" + secrets.token_hex(16), "auth_token": token}
            return cls(carrier, both, both)
        if carrier == "telnyx":
            from nacl.signing import SigningKey

            seed = secrets.token_bytes(32)
            public = base64.b64encode(bytes(SigningKey(seed).verify_key)).decode()
            return cls(carrier, {"api_key": "KEY" + token, "public_key": public},
                       {"signing_key": base64.b64encode(seed).decode()})
        if carrier == "vonage":
            both = {"application_id": str(uuid.uuid4()), "signature_secret": token}
            return cls(carrier, both, both)
        if carrier == "plivo":
            alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
            both = {"auth_id": "MA" + "".join(secrets.choice(alphabet) for _ in range(18)), "auth_token": token}
            return cls(carrier, both, both)
        if carrier == "exotel":
            sid, user = "voxray" + secrets.token_hex(4), "sim-" + secrets.token_hex(4)
            return cls(carrier, {"sid": sid, "api_key": "key-" + token[:8], "api_token": secrets.token_hex(16),
                                 "basic_auth_user": user, "basic_auth_password": token},
                       {"sid": sid, "basic_auth_user": user, "basic_auth_password": token})
        raise ValueError(f"unknown carrier {carrier!r}")


def dev_config(config: Config, credentials: DevCredentials, *, port: int) -> Config:
    """``config`` with the development overrides for a simulated call on ``127.0.0.1:port``.

    The carrier keeps the user's switches (e.g. ``carriers.telnyx.flow``) but gets the throw-away
    credential, and its REST API is pointed at a closed local port."""
    name = credentials.carrier
    raw = {carrier: {key: list(value) if isinstance(value, tuple) else value for key, value in values.items()}
           for carrier, values in config.carriers.items()}        # resolved values, as config.json would give them
    raw[name].update(credentials.gateway, api_base_url=_NO_CARRIER_API)
    if name == "exotel":
        raw[name]["allowed_ips"] = []          # the emulator calls from 127.0.0.1, not Exotel's addresses
    return dataclasses.replace(
        config, host="127.0.0.1", port=port, public_url=f"https://127.0.0.1:{port}", log_transcripts=True,
        carriers=CarriersConfig.build(raw, {}),
        server_api_key=config.server_api_key or ("" if config.allow_unauthenticated else secrets.token_urlsafe(24)))


class LocalGateway:
    """Runs ``create_app(dev_config(config, credentials, port=<free port>))`` on this event loop."""

    def __init__(self, config: Config, credentials: DevCredentials, *, start_timeout_s: float = 60.0,
                 stop_timeout_s: float = 15.0) -> None:
        self._base = config
        self._credentials = credentials
        self._start_timeout = start_timeout_s
        self._stop_timeout = stop_timeout_s
        self._sock: socket.socket | None = None
        self._server: Any = None
        self._task: asyncio.Task[None] | None = None
        self.config = config
        self.url = ""
        self.public_url = ""

    async def __aenter__(self) -> LocalGateway:
        from gateway.app import create_app
        from gateway.server import build_server

        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        port = self._sock.getsockname()[1]
        self.config = dev_config(self._base, self._credentials, port=port)
        self.url, self.public_url = f"http://127.0.0.1:{port}", self.config.public_url
        self._server = build_server(create_app(self.config), self.config, handle_signals=False)
        self._task = asyncio.create_task(self._server.serve(sockets=[self._sock]))
        try:
            async with asyncio.timeout(self._start_timeout):
                while not self._server.started:
                    if self._task.done():
                        break
                    await asyncio.sleep(0.02)
        except TimeoutError:
            await self._stop()
            raise GatewayStartError(
                f"the in-process gateway did not start within {self._start_timeout:.0f} s") from None
        if not self._server.started:
            problem = self._task.exception() if not self._task.cancelled() else None
            await self._stop()
            raise GatewayStartError(f"the in-process gateway did not start: {problem or 'its startup failed'}"
                                    " (run with --verbose to see its log)")
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._stop()

    async def _stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError, TimeoutError, Exception):
                await asyncio.wait_for(self._task, self._stop_timeout)
        if self._sock is not None:
            self._sock.close()


class TranscriptTap(logging.Handler):
    """Hands each ``caller said: …`` / ``agent said: …`` line of the gateway's call log to
    ``on_line(call_id, role, text)`` (``call_id``: the id on the gateway's log line, the carrier's call id).

    While installed, the call log logger is enabled at INFO and, unless ``propagate``, its lines reach
    only the tap (the gateway's other logging is untouched); both are restored on exit."""

    def __init__(self, on_line: Callable[[str, str, str], None], *, propagate: bool = False) -> None:
        super().__init__(logging.INFO)
        self._on_line = on_line
        self._propagate = propagate
        self._logger = logging.getLogger(CALL_LOG_LOGGER)
        self._saved: tuple[int, bool] = (logging.NOTSET, True)

    def emit(self, record: logging.LogRecord) -> None:
        from gateway.logging import call_id

        said = _SAID.match(record.getMessage())
        if said is not None:
            self._on_line(call_id.get(), said.group(1), said.group(2))

    def __enter__(self) -> TranscriptTap:
        self._saved = (self._logger.level, self._logger.propagate)
        if not self._logger.isEnabledFor(logging.INFO):
            self._logger.setLevel(logging.INFO)
        self._logger.propagate = self._propagate
        self._logger.addHandler(self)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._logger.removeHandler(self)
        self._logger.setLevel(self._saved[0])
        self._logger.propagate = self._saved[1]
