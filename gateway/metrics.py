"""Prometheus metrics, one registry per app (no globals).

Usage::

    metrics = Metrics()
    metrics.calls_started.labels(carrier="twilio").inc()
    body = metrics.render()          # text exposition format for GET /metrics
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

__all__ = ["CONTENT_TYPE_LATEST", "Metrics"]

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.active_calls = Gauge("voxray_active_calls", "Calls in progress", ["carrier"], registry=r)
        self.calls_started = Counter("voxray_calls_started", "Calls started", ["carrier"], registry=r)
        self.calls_ended = Counter("voxray_calls_ended", "Calls ended, by reason", ["carrier", "reason"], registry=r)
        self.turn_latency = Histogram("voxray_turn_latency_seconds", "Per-stage turn latency", ["stage"],
                                      buckets=_LATENCY_BUCKETS, registry=r)
        self.provider_errors = Counter("voxray_provider_errors", "Provider failures", ["code"], registry=r)
        self.barge_ins = Counter("voxray_barge_ins", "Caller interruptions of the agent", ["carrier"], registry=r)
        self.webhooks_rejected = Counter("voxray_webhooks_rejected", "Webhooks refused", ["carrier", "reason"],
                                         registry=r)
        self.media_rejected = Counter("voxray_media_messages_rejected", "Malformed media messages dropped",
                                      ["carrier"], registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
