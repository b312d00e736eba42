"""What every HTTP handler shares: the running services of a request and the JSON error answer.

Usage::

    services = services_of(request)                      # request.app.state.services
    return error(404, "no such session")                 # {"error": "no such session"}, status 404
    return error(503, "draining", active_calls=3)        # extra fields beside the error
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from starlette.requests import HTTPConnection
from starlette.responses import JSONResponse

if TYPE_CHECKING:
    from gateway.app import Services

__all__ = ["error", "services_of"]


def services_of(conn: HTTPConnection) -> Services:
    """The services the app's lifespan opened (HTTP requests and WebSockets alike)."""
    return conn.app.state.services  # type: ignore[no-any-return]  # starlette's State is untyped


def error(status: int, message: str, **extra: Any) -> JSONResponse:
    """``{"error": message, **extra}`` with ``status``: the one shape every refusal takes."""
    return JSONResponse({"error": message, **extra}, status_code=status)
