"""Logging: the call id on every line (a ContextVar copied by a Filter), plain or JSON lines.

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

__all__ = ["CallIdFilter", "call_id", "configure_logging"]

call_id: ContextVar[str] = ContextVar("call_id", default="-")


class CallIdFilter(logging.Filter):
    """Copies the current call id onto every record as ``record.call_id``."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.call_id = call_id.get()
        return True


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {"ts": self.formatTime(record), "level": record.levelname.lower(), "logger": record.name,
                 "call": getattr(record, "call_id", "-"), "msg": record.getMessage()}
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def configure_logging(level: str = "info", *, json_lines: bool = False) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(CallIdFilter())
    handler.setFormatter(_JsonFormatter() if json_lines else
                         logging.Formatter("%(asctime)s %(levelname)s %(name)s call=%(call_id)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("httpx", "httpcore", "uvicorn.access"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
    # aiortc logs whole SDPs (ICE passwords, DTLS fingerprints) at debug, aioice every candidate check at
    # info: secrets and noise, even when the gateway runs at debug (gateway.webrtc logs the states itself)
    for noisy in ("aiortc", "aioice"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
