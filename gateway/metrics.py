"""Prometheus metrics, one registry per app (no globals).

Usage::

    metrics = Metrics()
    metrics.calls_started.labels(carrier="twilio").inc()
    body = metrics.render()          # text exposition format for GET /metrics

With several worker processes (``voxray serve --workers N``) each worker has its registry;
``/metrics`` on any of them shows the group: every worker's ``samples()``, merged by
:func:`render_group` (counters and histograms summed; gauges summed, except the event loop's lag and
``voxray_draining`` (the worst worker) and ``voxray_session_store_up`` (the worst worker)).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from pipeline.conversation import BargeIn, BotSpeaking, ErrorEvent, Event, TranscriptEvent, TurnLatency

__all__ = ["CONTENT_TYPE_LATEST", "Metrics", "render_group"]

logger = logging.getLogger(__name__)

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
        self.media_dropped = Counter("voxray_media_dropped", "Caller audio frames dropped, by reason "
                                     "(faster_than_real_time: past media_burst_ms ahead of real time)",
                                     ["carrier", "reason"], registry=r)
        self.calls_refused = Counter("voxray_calls_refused", "New calls refused, by reason (draining, max_calls, "
                                     "overloaded)", ["reason"], registry=r)
        self.loop_lag = Gauge("voxray_event_loop_lag_seconds", "How late the event loop runs a timer, averaged over "
                              "load_window_secs", registry=r)
        self.sessions = Gauge("voxray_sessions", "Live sessions held by this instance, by session store",
                              ["store"], registry=r)
        self.session_store_up = Gauge("voxray_session_store_up", "1 when the session store answered the last "
                                      "check, else 0", registry=r)
        self.draining = Gauge("voxray_draining", "1 while this instance drains (SIGTERM received)", registry=r)
        self.recording_backlog = Gauge("voxray_recording_backlog", "Recordings waiting on disk for upload",
                                       registry=r)
        self.recording_retries = Gauge("voxray_recording_upload_retries", "Recording upload attempts retried "
                                       "since start", registry=r)
        self.recording_uploaded = Gauge("voxray_recordings_uploaded", "Recordings uploaded since start", registry=r)
        self.transcript_backlog = Gauge("voxray_transcript_backlog", "Transcript rows not yet written",
                                        registry=r)
        self.session_store_up.set(1)

    def bind(self, services: Any) -> None:
        """Gauges read from the running services at scrape time (nothing to keep in step)."""
        store = services.config.session_store
        self.sessions.labels(store=store).set_function(lambda: len(services.calls))
        self.draining.set_function(lambda: 1 if services.draining else 0)
        for gauge, name, attr in ((self.recording_backlog, "recordings", "backlog"),
                                  (self.recording_retries, "recordings", "retries_total"),
                                  (self.recording_uploaded, "recordings", "uploaded_total"),
                                  (self.transcript_backlog, "transcripts", "backlog")):
            gauge.set_function(functools.partial(_read, services, name, attr))

    def observe(self, event: Event, *, carrier: str, debug: bool = False) -> None:
        """Count one conversation event (any transport); at debug level, log each turn's timing."""
        if isinstance(event, TurnLatency):
            for stage, ms in (("turn_wait", event.turn_wait_ms), ("stt", event.stt_ms),
                              ("llm_first_token", event.llm_first_token_ms),
                              ("tts_first_audio", event.tts_first_audio_ms),
                              ("first_audio_out", event.first_audio_out_ms)):
                self.turn_latency.labels(stage=stage).observe(ms / 1000.0)
            if debug:
                logger.debug("turn timing: turn_wait=%.0fms stt=%.0fms llm_first_token=%.0fms "
                             "tts_first_chunk=%.0fms first_audio_out=%.0fms", event.turn_wait_ms, event.stt_ms,
                             event.llm_first_token_ms, event.tts_first_audio_ms, event.first_audio_out_ms)
        elif isinstance(event, BargeIn):
            self.barge_ins.labels(carrier=carrier).inc()
        elif isinstance(event, ErrorEvent):
            self.provider_errors.labels(code=event.code).inc()
        elif debug and isinstance(event, TranscriptEvent):
            logger.debug("%s said %d characters", event.role, len(event.text))
        elif debug and isinstance(event, BotSpeaking):
            logger.debug("agent %s speaking", "started" if event.started else "stopped")

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def samples(self) -> list[dict[str, Any]]:
        """This registry's families as plain values (sent to the worker answering ``/metrics``)."""
        return [{"name": m.name, "type": m.type, "help": m.documentation,
                 "samples": [[s.name, s.labels, s.value] for s in m.samples]} for m in self.registry.collect()]


_GAUGE_MAX = frozenset({"voxray_event_loop_lag_seconds", "voxray_draining"})
_GAUGE_MIN = frozenset({"voxray_session_store_up"})


def render_group(workers: Sequence[Iterable[dict[str, Any]]], *, restarts: int) -> bytes:
    """One exposition over every worker's :meth:`Metrics.samples`, plus ``voxray_workers`` (connected
    workers) and ``voxray_worker_restarts_total``.

        render_group([a.samples(), b.samples()], restarts=0)   # voxray_calls_started_total{...} = a + b
    """
    families: dict[str, Metric] = {}
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for worker in workers:
        for family in worker:
            name = family["name"]
            if name not in families:
                families[name] = Metric(name, family["help"], family["type"])
                values[name] = {}
            combine = _combiner(name, family["type"])
            merged = values[name]
            for sample, labels, value in family["samples"]:
                key = (sample, tuple(sorted(labels.items())))
                merged[key] = value if key not in merged else combine(merged[key], value, sample)
    for name, metric in families.items():
        for (sample, labels), value in values[name].items():
            metric.add_sample(sample, dict(labels), value)
    group = [GaugeMetricFamily("voxray_workers", "Worker processes serving this port now", value=len(workers)),
             CounterMetricFamily("voxray_worker_restarts", "Workers restarted after they died", value=restarts)]
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Fixed([*families.values(), *group]))
    return generate_latest(registry)


def _combiner(name: str, kind: str) -> Any:
    if kind == "gauge" and name in _GAUGE_MAX:
        return lambda a, b, sample: max(a, b)
    if kind == "gauge" and name in _GAUGE_MIN:
        return lambda a, b, sample: min(a, b)
    # a counter's _created is a start time: the group's is the earliest
    return lambda a, b, sample: min(a, b) if sample.endswith("_created") else a + b


class _Fixed:
    """A collector yielding families built elsewhere."""

    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self._families)


def _read(services: Any, name: str, attr: str) -> float:
    """``services.<name>.<attr>`` as a gauge value (0 while that store is off)."""
    return float(getattr(getattr(services, name, None), attr, 0))
