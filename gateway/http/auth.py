"""Who may use the programmatic routes: one API key, checked in one place.

Carrier webhooks and media sockets are protected by the carrier's own signature (and single-use,
expiring session ids), never by this key. Everything that places calls, reads or ends sessions or
starts a browser conversation — ``/calls``, ``/sessions/*``, ``/personas``, ``/ws``, WebRTC offers and
JSON ``POST /start`` — needs the key. There is no "open" default: without ``server_api_key`` a key is
generated at startup (printed once with the softphone URL that carries it, as notebook servers do);
only ``allow_unauthenticated`` (local development) leaves these routes open. Loopback is no
credential: behind a TLS proxy on the same host every request comes from 127.0.0.1.

Usage::

    access = AccessKey.from_config(config)            # in create_app, once

    @requires_key                                     # an HTTP handler: 401 without the key
    async def place_call(request: Request) -> Response: ...

    refused = refusal_for(request)                    # a handler that decides itself (None: go on)
    access.allows(["<bearer>", "<?token=>"])          # any candidates (a WebSocket's header, query, subprotocol)
"""

from __future__ import annotations

import functools
import hmac
import secrets
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

from starlette.requests import HTTPConnection, Request
from starlette.responses import JSONResponse, Response

from gateway.http.errors import services_of

__all__ = ["AccessKey", "PROTECTED_ROUTES", "refusal_for", "requires_key"]

PROTECTED_ROUTES = "/calls, /sessions, /personas, /ws, WebRTC offers and JSON POST /start"
_GENERATED_BYTES = 24


@dataclass(frozen=True, slots=True, repr=False)
class AccessKey:
    """The key the programmatic routes need; ``value`` empty only when ``allow_unauthenticated``.

    ``source`` says where it came from: ``"server_api_key"``, ``"generated"`` or ``"open"``."""

    value: str
    source: str

    def __repr__(self) -> str:   # never the key itself
        return f"AccessKey(source={self.source!r})"

    @classmethod
    def from_config(cls, config: object) -> AccessKey:
        """``server_api_key`` when set; else open with ``allow_unauthenticated``; else a fresh random key."""
        key = str(getattr(config, "server_api_key", "") or "")
        if key:
            return cls(key, "server_api_key")
        if getattr(config, "allow_unauthenticated", False):
            return cls("", "open")
        return cls(secrets.token_urlsafe(_GENERATED_BYTES), "generated")

    @property
    def required(self) -> bool:
        return bool(self.value)

    def allows(self, candidates: Iterable[str]) -> bool:
        """Whether any candidate is the key. Constant time per candidate, and every candidate is compared."""
        if not self.value:
            return True
        expected = self.value.encode()
        ok = False
        for supplied in candidates:
            ok |= bool(supplied) and hmac.compare_digest(supplied.encode(), expected)
        return ok

    def allows_request(self, conn: HTTPConnection, subprotocols: Iterable[str] = ()) -> bool:
        """The key as ``Authorization: Bearer <key>``, ``?token=<key>`` or a ``bearer.<key>`` subprotocol."""
        header = conn.headers.get("authorization", "")
        bearer = header[7:] if header[:7].lower() == "bearer " else ""
        return self.allows([bearer, conn.query_params.get("token", ""),
                            *(p[7:] for p in subprotocols if p.startswith("bearer."))])

    @staticmethod
    def refusal() -> JSONResponse:
        return JSONResponse({"error": "missing or wrong API key: send Authorization: Bearer <server_api_key> "
                                      "(or ?token=<key>)"}, status_code=401)

    def describe(self) -> str:
        """One startup line: what protects what (never the key)."""
        how = {"server_api_key": "the API key (server_api_key)",
               "generated": "an API key generated for this run (set server_api_key to choose one; printed once "
                            "with the softphone URL)",
               "open": "NOTHING: allow_unauthenticated is set (local development only; never on a public host)"}
        return (f"access: carrier webhooks and media sockets need the carrier's signature; {PROTECTED_ROUTES} need "
                f"{how[self.source]}; /, /static, /health, /ready and /metrics are open")

    def softphone_url(self, base: str) -> str:
        """The softphone page's URL carrying the key (the page reads and hides ``?token=``)."""
        return f"{base.rstrip('/')}/?token={self.value}" if self.value else f"{base.rstrip('/')}/"


def refusal_for(request: HTTPConnection) -> JSONResponse | None:
    """The 401 to answer when ``request`` lacks the app's API key; None when it may go on."""
    access = services_of(request).access
    return None if access.allows_request(request) else access.refusal()


def requires_key(handler: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
    """An HTTP handler that answers 401 before running when the request lacks the API key."""
    @functools.wraps(handler)
    async def guarded(request: Request) -> Response:
        return refusal_for(request) or await handler(request)
    return guarded
