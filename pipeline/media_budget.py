"""Caller audio admitted at real time plus a burst allowance: a token bucket measured in milliseconds.

A phone or browser leg delivers 1 s of audio per second; after a network stall it may deliver a
backlog at once. Anything beyond ``burst_ms`` ahead of real time is not audio anyone spoke in this
call's time: it is dropped (and counted), never queued, so a client streaming faster than real time
costs the pipeline no more than an honest one. Past ``close_after_dropped_ms`` of dropped audio the
transport closes the session: the sender is flooding, not lagging.

Usage::

    budget = MediaBudget(burst_ms=2000, close_after_dropped_ms=10000)
    if budget.admit(frame.duration_ms):
        conversation.on_audio(frame)
    elif budget.flooding:
        call.finish("media_flood", code=1008, text="media arriving faster than real time")
"""

from __future__ import annotations

import time
from collections.abc import Callable

__all__ = ["MediaBudget"]

_EPSILON_MS = 1e-3      # clock arithmetic in floats: an exactly real-time sender must never lose a frame


class MediaBudget:
    """Per-session credit of audio milliseconds, refilled at real time up to ``burst_ms``.

    Args:
        burst_ms: how far ahead of real time a sender may get (the bucket starts full).
        close_after_dropped_ms: dropped audio past which :attr:`flooding` turns true (0 = never).
        clock: seconds, monotonic (tests pass their own).
    """

    __slots__ = ("_burst_ms", "_close_ms", "_clock", "_credit_ms", "_last", "dropped_ms", "dropped_frames")

    def __init__(self, *, burst_ms: float, close_after_dropped_ms: float = 0.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if burst_ms <= 0:
            raise ValueError("burst_ms must be greater than 0")
        self._burst_ms = float(burst_ms)
        self._close_ms = float(close_after_dropped_ms)
        self._clock = clock
        self._credit_ms = self._burst_ms
        self._last = clock()
        self.dropped_ms = 0.0
        self.dropped_frames = 0

    def admit(self, duration_ms: float) -> bool:
        """True when ``duration_ms`` of audio fits the budget (and spends it); False when it is dropped."""
        now = self._clock()
        credit = self._credit_ms + (now - self._last) * 1000.0
        self._last = now
        if credit > self._burst_ms:
            credit = self._burst_ms
        if credit + _EPSILON_MS >= duration_ms:
            self._credit_ms = credit - duration_ms
            return True
        self._credit_ms = credit
        self.dropped_ms += duration_ms
        self.dropped_frames += 1
        return False

    @property
    def flooding(self) -> bool:
        """More than ``close_after_dropped_ms`` of audio was dropped: the sender is not a real-time source."""
        return 0.0 < self._close_ms < self.dropped_ms
