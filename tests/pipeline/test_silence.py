"""The silence watch on its own: prompt once, give up after no answer, busy and caller speech put it off."""

from __future__ import annotations

import asyncio

import pytest

from pipeline.silence import SilenceWatch

pytestmark = pytest.mark.asyncio


def watch(events: list[str], busy: list[bool]) -> SilenceWatch:
    return SilenceWatch(prompt_secs=0.05, hangup_secs=0.05, busy=lambda: busy[0],
                        prompt=lambda: events.append("prompt"), give_up=lambda: events.append("give up"))


async def test_prompts_once_then_gives_up_and_returns() -> None:
    events: list[str] = []
    await asyncio.wait_for(watch(events, [False]).run(), 2)
    assert events == ["prompt", "give up"]


async def test_the_caller_answering_the_prompt_starts_over() -> None:
    events: list[str] = []
    silence = watch(events, [False])
    task = asyncio.create_task(silence.run())
    while not events:
        await asyncio.sleep(0.005)
    silence.activity(caller=True)                  # "yes, I'm here"
    await asyncio.wait_for(task, 2)
    assert events == ["prompt", "prompt", "give up"]


async def test_nothing_is_said_while_busy() -> None:
    events: list[str] = []
    busy = [True]
    task = asyncio.create_task(watch(events, busy).run())
    await asyncio.sleep(0.2)
    assert events == []                            # the agent is talking (or the caller is)
    busy[0] = False
    await asyncio.wait_for(task, 2)
    assert events == ["prompt", "give up"]
