"""Logging: the call id on every line (a ContextVar copied by a Filter), plain or JSON lines.

Every line, uvicorn's and websockets' included, passes :class:`gateway.redaction.RedactingFilter`:
no query token or full session id reaches the log. uvicorn's and websockets' per-frame debug lines
(payloads, handshake headers) stay off at ``log_level`` debug unless ``log_transport_debug`` is set.

Only ``gateway.__main__`` calls :func:`configure_logging`; modules just do
``logger = logging.getLogger(__name__)``. Tasks created inside a call inherit its id.

Usage::

    token = call_id.set("CA123")
    logger.info("call answered")      # ... call=CA123 ... call answered
"""

from __future__ import annotations

import json
import logging
import sys
from contextvars import ContextVar

from gateway.redaction import RedactingFilter, is_session_id, short_id

__all__ = ["CallIdFilter", "call_id", "configure_logging"]

call_id: ContextVar[str] = ContextVar("call_id", default="-")


class CallIdFilter(logging.Filter):
    """Copies the current call id onto every record as ``record.call_id`` (a session id shortened)."""

    def filter(self, record: logging.LogRecord) -> bool:
        current = call_id.get()
        record.call_id = short_id(current) if is_session_id(current) else current
        return True


class _JsonFormatter(logging.Formatter):
    def __init__(self, worker: int = 0) -> None:
        super().__init__()
        self._worker = worker

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {"ts": self.formatTime(record), "level": record.levelname.lower(),
                                    "logger": record.name, "call": getattr(record, "call_id", "-"),
                                    "msg": record.getMessage()}
        if self._worker:
            entry["worker"] = self._worker
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry)


# uvicorn hands its logger to the websockets protocol, which logs every frame there at debug
_TRANSPORT_LOGGERS = ("uvicorn.error", "websockets")


def configure_logging(level: str = "info", *, json_lines: bool = False, transport_debug: bool = False,
                      worker: int = 0) -> None:
    """Log lines to standard error; a worker of a group (``worker`` > 0) says which on every line."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(CallIdFilter())
    handler.addFilter(RedactingFilter())
    where = f" worker={worker}" if worker else ""
    handler.setFormatter(_JsonFormatter(worker) if json_lines else
                         logging.Formatter(f"%(asctime)s %(levelname)s{where} %(name)s call=%(call_id)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("httpx", "httpcore", "uvicorn.access"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
    for transport in _TRANSPORT_LOGGERS:
        logging.getLogger(transport).setLevel(root.level if transport_debug else max(logging.INFO, root.level))
    # aiortc logs whole SDPs (ICE passwords, DTLS fingerprints) at debug, aioice every candidate check at
    # info: secrets and noise, even when the gateway runs at debug (gateway.browser.webrtc logs the states itself)
    for noisy in ("aiortc", "aioice"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
