"""MediaBudget: real time plus a burst allowance, measured on a clock the test moves."""

from __future__ import annotations

import pytest

from pipeline.media_budget import MediaBudget


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_real_time_audio_is_always_admitted_and_a_burst_up_to_the_allowance() -> None:
    clock = Clock()
    budget = MediaBudget(burst_ms=200, close_after_dropped_ms=1000, clock=clock)
    for _ in range(500):                       # 10 s at exactly real time
        clock.now += 0.020
        assert budget.admit(20)
    clock.now += 0.020                         # the next frame's time: a 200 ms backlog arrives at once
    assert [budget.admit(20) for _ in range(11)] == [True] * 10 + [False]   # the allowance, no more
    assert budget.dropped_ms == 20 and budget.dropped_frames == 1 and not budget.flooding


def test_credit_never_grows_past_the_allowance_during_silence() -> None:
    clock = Clock()
    budget = MediaBudget(burst_ms=100, clock=clock)
    clock.now += 60.0                          # a minute with no audio (a muted client) banks only 100 ms
    assert sum(budget.admit(20) for _ in range(20)) == 5


def test_a_flood_is_flooding_once_enough_audio_was_dropped() -> None:
    clock = Clock()
    budget = MediaBudget(burst_ms=100, close_after_dropped_ms=1000, clock=clock)
    admitted = 0
    for _ in range(200):                       # 4 s of audio in 0.2 s (20x real time)
        clock.now += 0.001
        admitted += budget.admit(20)
        if budget.flooding:
            break
    assert budget.flooding and budget.dropped_ms > 1000
    assert admitted <= 5 + 2 * 10 // 20 + 1   # the allowance plus what real time refilled meanwhile
    never = MediaBudget(burst_ms=100, close_after_dropped_ms=0, clock=clock)
    for _ in range(1000):
        never.admit(20)
    assert never.dropped_ms > 1000 and not never.flooding


def test_burst_must_be_positive() -> None:
    with pytest.raises(ValueError, match="burst_ms"):
        MediaBudget(burst_ms=0)
