"""Admission control: refuse the next call before the calls already up lose their latency.

Two signals: a hard cap (``max_concurrent_calls`` per process) and the event loop's lag — how late a
``load_sample_ms`` timer fires — averaged over ``load_window_secs``. Past ``load_lag_threshold_ms`` the
process is overloaded: new calls are refused and ``/ready`` answers 503 so a load balancer sends them
elsewhere, until the average falls back below half the threshold (hysteresis: no flapping at the edge).
Every refusal is counted in ``voxray_calls_refused_total{reason}``.

Usage::

    admission = Admission.from_config(config, count=lambda: len(calls), metrics=metrics)
    task = asyncio.create_task(admission.watch())        # the app's lifespan owns it
    reason = admission.refusal()                         # None, "max_calls" or "overloaded"
    if reason is not None:
        admission.refused(reason)
        return error(503, admission.explain(reason))
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gateway.app import Services
    from gateway.config import Config
    from gateway.metrics import Metrics

__all__ = ["Admission", "turn_away"]

logger = logging.getLogger(__name__)


class Admission:
    """Whether this process takes one more call."""

    def __init__(self, *, max_calls: int, lag_threshold_ms: float, window_secs: float, sample_ms: float,
                 count: Callable[[], int], metrics: Metrics) -> None:
        self.max_calls = max_calls
        self.lag_threshold_ms = lag_threshold_ms
        self.sample_ms = sample_ms
        self._count = count
        self._metrics = metrics
        self._lags: collections.deque[float] = collections.deque(maxlen=max(1, round(window_secs * 1000 / sample_ms)))
        self.overloaded = False
        metrics.loop_lag.set_function(lambda: self.lag_ms / 1000.0)

    @classmethod
    def from_config(cls, config: Config, *, count: Callable[[], int], metrics: Metrics) -> Admission:
        return cls(max_calls=config.max_concurrent_calls, lag_threshold_ms=config.load_lag_threshold_ms,
                   window_secs=config.load_window_secs, sample_ms=config.load_sample_ms, count=count,
                   metrics=metrics)

    @property
    def lag_ms(self) -> float:
        """The event loop's average lag over the window (ms)."""
        return sum(self._lags) / len(self._lags) if self._lags else 0.0

    def refusal(self) -> str | None:
        """Why the next call would be refused (``"max_calls"``, ``"overloaded"``), or None."""
        if self.max_calls and self._count() >= self.max_calls:
            return "max_calls"
        if self.overloaded:
            return "overloaded"
        return None

    def refused(self, reason: str) -> None:
        """Count one refused call."""
        self._metrics.calls_refused.labels(reason=reason).inc()

    def explain(self, reason: str) -> str:
        if reason == "max_calls":
            return f"busy: this instance carries its maximum of {self.max_calls} calls (max_concurrent_calls)"
        return (f"busy: this instance is overloaded (event loop {self.lag_ms:.0f} ms late on average, "
                f"load_lag_threshold_ms {self.lag_threshold_ms:g})")

    def observe(self, lag_ms: float) -> None:
        """One lag sample (``watch`` feeds these; tests may too)."""
        self._lags.append(max(0.0, lag_ms))
        if len(self._lags) < (self._lags.maxlen or 1):
            return
        average = self.lag_ms
        if not self.overloaded and average > self.lag_threshold_ms:
            self.overloaded = True
            logger.warning("overloaded: the event loop is %.0f ms late on average; refusing new calls", average)
        elif self.overloaded and average < self.lag_threshold_ms / 2:
            self.overloaded = False
            logger.info("load back to normal (event loop %.0f ms late on average); taking new calls", average)

    async def watch(self) -> None:
        """Sample the event loop's lag every ``sample_ms`` until cancelled."""
        loop = asyncio.get_running_loop()
        interval = self.sample_ms / 1000.0
        while True:
            start = loop.time()
            await asyncio.sleep(interval)
            self.observe((loop.time() - start - interval) * 1000.0)


def turn_away(services: Services) -> str | None:
    """Why a new call is refused here now (draining, at capacity, overloaded) — counted in
    ``voxray_calls_refused_total`` — or None to take it."""
    if services.draining:
        services.metrics.calls_refused.labels(reason="draining").inc()
        return "draining: this instance is shutting down"
    reason = services.admission.refusal() if services.admission is not None else None
    if reason is None or services.admission is None:
        return None
    services.admission.refused(reason)
    return services.admission.explain(reason)
