"""gateway.metrics: one exposition over the registries of several worker processes."""

from __future__ import annotations

from gateway.metrics import Metrics, render_group


def test_render_group_sums_counters_and_histograms_and_keeps_the_worst_lag() -> None:
    a, b = Metrics(), Metrics()
    a.calls_ended.labels(carrier="twilio", reason="hangup").inc(2)
    b.calls_ended.labels(carrier="twilio", reason="hangup").inc(3)
    b.calls_ended.labels(carrier="vonage", reason="drain").inc()
    a.turn_latency.labels(stage="stt").observe(0.02)
    b.turn_latency.labels(stage="stt").observe(0.4)
    a.loop_lag.set(0.002)
    b.loop_lag.set(0.030)
    b.draining.set(1)
    body = render_group([a.samples(), b.samples()], restarts=0).decode()
    assert 'voxray_calls_ended_total{carrier="twilio",reason="hangup"} 5.0' in body
    assert 'voxray_calls_ended_total{carrier="vonage",reason="drain"} 1.0' in body
    assert 'voxray_turn_latency_seconds_count{stage="stt"} 2.0' in body
    assert 'voxray_turn_latency_seconds_bucket{le="0.025",stage="stt"} 1.0' in body
    assert "voxray_event_loop_lag_seconds 0.03" in body
    assert "voxray_draining 1.0" in body
    assert "voxray_session_store_up 1.0" in body                          # the lowest, not the sum
