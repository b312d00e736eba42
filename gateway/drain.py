"""Graceful drain: on SIGTERM stop taking calls, let live ones finish, then end the rest politely.

Order: ``/ready`` answers 503 and new calls are refused (webhooks 503, browser sessions refused) at
once; live calls run on for up to ``drain_timeout_secs``; calls still up then hear
``goodbye_text`` and end through their finaliser (hang-up, recording and transcript flush, session
removal), bounded by ``goodbye_timeout_secs``; only then does the server close its sockets.

Usage (``gateway.server`` runs it on the first SIGTERM)::

    await drain(services)           # returns when no call is left (or the last deadline passed)
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gateway.app import Services

__all__ = ["drain"]

logger = logging.getLogger(__name__)

_POLL_S = 0.1


async def drain(services: Services) -> None:
    """Drain this instance (idempotent: a second call waits like the first)."""
    config = services.config
    if not services.draining:
        services.draining = True
        logger.info("draining: refusing new calls; %d live call(s) may run for up to %.0f s",
                    len(services.calls), config.drain_timeout_secs)
    started = time.monotonic()
    if await _until_idle(services, config.drain_timeout_secs):
        logger.info("drained: every call ended on its own after %.1f s", time.monotonic() - started)
        return
    remaining = list(services.calls)
    logger.info("drain deadline reached: saying goodbye to %d call(s)", len(remaining))
    for call in remaining:
        _say_goodbye(call, config.goodbye_text)
    if await _until_idle(services, config.goodbye_timeout_secs):
        return
    for call in list(services.calls):
        call.finish("drain")
    await _until_idle(services, config.hangup_timeout_secs + 1.0)
    if services.calls:
        logger.error("drain: %d call(s) did not finish; the server cancels them", len(services.calls))


def _say_goodbye(call: Any, text: str) -> None:
    conversation = getattr(call, "conversation", None)
    if conversation is None or not conversation.end_with(text, "drain"):
        call.finish("drain")


async def _until_idle(services: Services, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while services.calls:
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(_POLL_S)
    return True
