"""Secrets out of log lines: query tokens masked, session ids in paths shortened.

uvicorn logs each WebSocket handshake with its path and query (``"WebSocket /ws?token=<key>"
[accepted]``); a media socket's path holds its session id, the socket's only credential. The
:class:`RedactingFilter` rewrites every record that reaches the gateway's log handler (uvicorn's and
websockets' loggers included) the way the gateway's own lines already look: ``session=AbC123…``.

Usage::

    redact("GET /ws?token=s3cret&x=1")                  # 'GET /ws?token=***&x=1'
    redact("WebSocket /media/twilio/AbC123dEf456gHi789")  # 'WebSocket /media/twilio/AbC123…'
    handler.addFilter(RedactingFilter())
"""

from __future__ import annotations

import logging
import re

__all__ = ["RedactingFilter", "is_session_id", "redact", "short_id"]

# query parameters whose values are credentials (any case, also with a prefix: x_api_key, hub.signature)
_SECRET_PARAM = re.compile(
    r"(?i)([?&;](?:[\w.-]*[_.-])?(?:token|key|api_?key|access_?token|auth|signature|sig|secret|password|"
    r"passwd|credential)=)[^&;#\s\"'<>]*")
# session ids: /media/<carrier>/<id>, /events/<carrier>/<id>, /sessions/<id>, ?session=<id>
_SESSION_ID = re.compile(r"(/(?:media|events)/[\w.-]+/|/sessions/|[?&;]session(?:_?id)?=)([\w-]{7,})")
# an Authorization header value and the bearer.<key> WebSocket subprotocol (uvicorn's debug lines)
_AUTH_VALUE = re.compile(r"(?i)(authorization:\s*(?:bearer|basic)\s+|\bbearer\.)[^\s,\"']+")


# gateway.sessions mints ids with secrets.token_urlsafe(24): 32 URL-safe base64 characters. Carrier
# call ids differ (Twilio CA+32 hex, UUIDs, "v3:..."); a 32-hex-digit one (Exotel) is not an id of ours.
_SESSION_ID_SHAPE = re.compile(r"[A-Za-z0-9_-]{32}")
_HEX_32 = re.compile(r"[0-9a-fA-F]{32}")


def is_session_id(text: str) -> bool:
    """Whether ``text`` is shaped like a session id of ours (browser sessions log under theirs)."""
    return _SESSION_ID_SHAPE.fullmatch(text) is not None and _HEX_32.fullmatch(text) is None


def short_id(session_id: str) -> str:
    """How a session id appears in logs: its first 6 characters and an ellipsis."""
    return f"{session_id[:6]}…"


def redact(text: str) -> str:
    """``text`` with query credentials masked and session ids in paths shortened."""
    text = _SECRET_PARAM.sub(r"\1***", text)
    text = _SESSION_ID.sub(lambda m: m.group(1) + short_id(m.group(2)), text)
    return _AUTH_VALUE.sub(r"\1***", text)


class RedactingFilter(logging.Filter):
    """Rewrites each record's message through :func:`redact` (arguments merged in first)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        return True
