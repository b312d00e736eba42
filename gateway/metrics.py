"""Prometheus metrics, one registry per app (no globals).

Usage::

    metrics = Metrics()
    metrics.calls_started.labels(carrier="twilio").inc()
    body = metrics.render()          # text exposition format for GET /metrics
"""

from __future__ import annotations

import functools
import logging
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from pipeline.conversation import BargeIn, BotSpeaking, ErrorEvent, Event, TranscriptEvent, TurnLatency

__all__ = ["CONTENT_TYPE_LATEST", "Metrics"]

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


def _read(services: Any, name: str, attr: str) -> float:
    """``services.<name>.<attr>`` as a gauge value (0 while that store is off)."""
    return float(getattr(getattr(services, name, None), attr, 0))
