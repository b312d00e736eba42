"""Tests for pipeline.provider_chain: retries, fallbacks and timeouts through a whole conversation (see
tests/pipeline/call_harness.py), and first_working/ProviderCalls alone with fake providers."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import pytest

from pipeline.conversation import (
    BotSpeaking,
    ErrorEvent,
    Persona,
    ProviderChain,
    TranscriptEvent,
    TurnLatency,
)
from pipeline.provider_chain import ItemDeadline, ProviderCalls, ProvidersFailed, first_working
from tests.pipeline.call_harness import (
    FAST,
    HANG,
    MS_PER_CHAR,
    QUICK_TIMEOUTS,
    SYSTEM,
    Partial,
    ScriptedLLM,
    ScriptedSTT,
    ToneTTS,
    call,
    permanent,
    transcripts,
    transient,
)

pytestmark = pytest.mark.asyncio


async def test_transient_stt_failure_is_retried_then_the_fallback_is_used() -> None:
    settings = dataclasses.replace(FAST, provider_retries=2)
    bad = ScriptedSTT([transient("stt-a")], name="stt-a")
    good = ScriptedSTT(["Hello there."], name="stt-b")
    async with call(stt=[bad, good], settings=settings) as h:
        await h.say(200)
        await h.until(lambda: transcripts(h, "user") != [])
    assert len(bad.calls) == 3 and len(good.calls) == 1
    assert bad.calls[0]["bytes"] == good.calls[0]["bytes"]           # the same utterance each time
    assert transcripts(h, "user") == ["Hello there."]
    assert h.of(ErrorEvent) == [] and h.ended == []


async def test_transient_failure_then_success_on_the_same_provider() -> None:
    flaky = ScriptedSTT([transient(), "Hello."])
    spare = ScriptedSTT(["never"], name="stt-b")
    async with call(stt=[flaky, spare]) as h:
        await h.say(200)
        await h.until(lambda: transcripts(h, "user") != [])
    assert len(flaky.calls) == 2 and spare.calls == []
    assert transcripts(h, "user") == ["Hello."]


async def test_permanent_stt_failure_is_not_retried() -> None:
    settings = dataclasses.replace(FAST, provider_retries=3)
    bad = ScriptedSTT([permanent()])
    good = ScriptedSTT(["Hello."], name="stt-b")
    async with call(stt=[bad, good], settings=settings) as h:
        await h.say(200)
        await h.until(lambda: transcripts(h, "user") != [])
    assert len(bad.calls) == 1 and len(good.calls) == 1


async def test_llm_failure_retried_then_fallback_answers() -> None:
    bad = ScriptedLLM([transient("llm-a")], name="llm-a")
    good = ScriptedLLM(["From the backup."], name="llm-b")
    async with call(stt=[ScriptedSTT(["Hi."])], llm=[bad, good]) as h:
        await h.say(200)
        await h.until(lambda: BotSpeaking(False) in h.events)
    assert len(bad.calls) == FAST.provider_retries + 1 and len(good.calls) == 1
    assert good.calls[0] == bad.calls[0]
    assert transcripts(h, "assistant") == ["From the backup."]
    assert h.of(ErrorEvent) == [] and h.ended == []


async def test_tts_failure_retried_then_fallback_speaks() -> None:
    bad = ToneTTS([transient("tts-a")], name="tts-a")
    good = ToneTTS(name="tts-b")
    persona = Persona(greeting="Hello from the backup voice.")
    async with call(stt=[ScriptedSTT(["x"])], tts=[bad, good], persona=persona) as h:
        await h.until(lambda: BotSpeaking(False) in h.events)
    assert bad.calls == [persona.greeting] * (FAST.provider_retries + 1)
    assert good.calls == [persona.greeting]
    assert h.audio_ms() == pytest.approx(len(persona.greeting) * MS_PER_CHAR, abs=25)
    assert h.of(ErrorEvent) == []


async def test_llm_failing_mid_answer_is_not_retried() -> None:
    tts = ToneTTS()
    llm_a = ScriptedLLM([Partial("We open at nine. And", transient())], name="llm-a")
    llm_b = ScriptedLLM(["never"], name="llm-b")
    async with call(stt=[ScriptedSTT(["Hi."])], llm=[llm_a, llm_b], tts=[tts]) as h:
        await h.say(200)
        await h.until(lambda: h.ended != [])
    assert len(llm_a.calls) == 1 and llm_b.calls == []               # a retry would repeat words
    assert h.of(ErrorEvent)[0].code == "provider_failed"
    assert h.ended[0].reason == "provider_failed"
    assert tts.calls[-1] == FAST.apology_text


async def test_a_hanging_stt_times_out_like_a_failure() -> None:
    hung = ScriptedSTT([HANG], name="stt-a")
    good = ScriptedSTT(["Hello."], name="stt-b")
    settings = QUICK_TIMEOUTS
    async with call(stt=[hung, good], settings=settings) as h:
        speech_end = await h.say(200)
        await h.until_event(lambda e: isinstance(e, TranscriptEvent), timeout=3)
        waited = h.time_of(lambda e: isinstance(e, TranscriptEvent)) - speech_end
    assert len(hung.calls) == settings.provider_retries + 1 and len(good.calls) == 1
    assert waited >= (settings.provider_retries + 1) * settings.stt_timeout_secs - 0.02
    assert waited <= (settings.provider_retries + 1) * settings.stt_timeout_secs + 0.5
    assert h.of(ErrorEvent) == []


async def test_a_hanging_llm_times_out_before_its_first_token() -> None:
    hung = ScriptedLLM([HANG], name="llm-a")
    good = ScriptedLLM(["Backup answer."], name="llm-b")
    settings = QUICK_TIMEOUTS
    async with call(stt=[ScriptedSTT(["Hi."])], llm=[hung, good], settings=settings) as h:
        await h.say(200)
        await h.until(lambda: transcripts(h, "assistant") == ["Backup answer."], timeout=3)
    assert len(hung.calls) == settings.provider_retries + 1 and len(good.calls) == 1
    [lat] = h.of(TurnLatency)
    assert lat.llm_first_token_ms >= (settings.provider_retries + 1) * settings.llm_timeout_secs * 1000 - 20


async def test_an_llm_stalling_between_tokens_fails_the_turn() -> None:
    llm = ScriptedLLM([Partial("We open at nine. And")])
    tts = ToneTTS()
    async with call(stt=[ScriptedSTT(["Hi."])], llm=[llm], tts=[tts], settings=QUICK_TIMEOUTS) as h:
        await h.say(200)
        await h.until(lambda: h.ended != [], timeout=3)
    assert h.of(ErrorEvent)[0].code == "provider_failed"
    assert "timed out" in h.of(ErrorEvent)[0].message
    assert tts.calls[-1] == FAST.apology_text


# ----------------------------------------------------------------------------------------- first_working alone

class Source:
    """A provider whose streams follow a script per attempt: a list of items, then maybe an error or a hang."""

    def __init__(self, name: str, *attempts: list[Any]) -> None:
        self.name = name
        self.attempts = list(attempts)
        self.opened = 0
        self.closed = 0

    async def items(self) -> AsyncIterator[Any]:
        script = self.attempts[min(self.opened, len(self.attempts)) - 1]
        try:
            for item in script:
                if isinstance(item, BaseException):
                    raise item
                if item is HANG:
                    await asyncio.sleep(3600)
                yield item
        finally:
            self.closed += 1

    def open(self) -> AsyncIterator[Any]:
        self.opened += 1
        return self.items()


async def collect(providers: Sequence[Source], *, retries: int = 1, timeout_secs: float = 0.1) -> list[Any]:
    stream = first_working("language model", providers, Source.open, timeout_secs=timeout_secs, retries=retries)
    async with contextlib.aclosing(stream) as items:
        return [item async for item in items]


async def test_chain_retries_a_transient_failure_then_succeeds() -> None:
    a = Source("a", [transient("a")], ["x", "y"])
    assert await collect([a]) == ["x", "y"]
    assert a.opened == 2 and a.closed == 2


async def test_chain_falls_back_after_the_retries_and_names_every_failure() -> None:
    a, b = Source("a", [transient("a")]), Source("b", [permanent("b")])
    with pytest.raises(ProvidersFailed) as failed:
        await collect([a, b], retries=2)
    assert (a.opened, b.opened) == (3, 1)                          # a permanent failure is not retried
    assert str(failed.value) == ("language model failed: a: HTTP 503: busy; a: HTTP 503: busy; "
                                 "a: HTTP 503: busy; b: HTTP 401: bad key")
    c = Source("c", ["z"])
    assert await collect([Source("a", [permanent("a")]), c], retries=2) == ["z"] and c.opened == 1


async def test_chain_waits_the_vendors_retry_after_unless_it_is_longer_than_the_timeout() -> None:
    from pipeline.providers.base import ProviderError

    limited = ProviderError("a", "HTTP 429: slow down", transient=True, retry_after=0.05)
    a = Source("a", [limited], ["x"])
    started = time.monotonic()
    assert await collect([a]) == ["x"] and a.opened == 2
    assert time.monotonic() - started >= 0.05
    too_long = ProviderError("a", "HTTP 429: slow down", transient=True, retry_after=30)
    a, b = Source("a", [too_long], ["x"]), Source("b", ["y"])
    assert await collect([a, b]) == ["y"] and a.opened == 1         # the caller is not kept waiting 30 s


async def test_chain_never_retries_after_output() -> None:
    a, b = Source("a", ["x", transient("a")]), Source("b", ["never"])
    got: list[Any] = []
    with pytest.raises(ProvidersFailed, match="language model failed mid-answer: a: HTTP 503: busy"):
        async with contextlib.aclosing(first_working("language model", [a, b], Source.open, timeout_secs=0.1,
                                                     retries=3)) as items:
            async for item in items:
                got.append(item)
    assert got == ["x"] and a.opened == 1 and b.opened == 0 and a.closed == 1


async def test_chain_times_out_before_the_first_item_and_between_items() -> None:
    t0 = time.monotonic()
    assert await collect([Source("a", [HANG]), Source("b", ["ok"])], timeout_secs=0.05) == ["ok"]
    assert 0.1 - 0.01 <= time.monotonic() - t0 <= 0.1 + 0.2      # two attempts of 50 ms on a
    with pytest.raises(ProvidersFailed, match="mid-answer: a timed out"):
        await collect([Source("a", ["x", HANG])], timeout_secs=0.05)
    with pytest.raises(ProvidersFailed, match="^language model failed: $"):
        await collect([])


async def test_chain_closes_the_stream_when_the_caller_stops_early() -> None:
    a = Source("a", ["x", "y", "z"])
    async with contextlib.aclosing(first_working("tts", [a], Source.open, timeout_secs=0.1, retries=0)) as items:
        assert await anext(items) == "x"
    assert a.closed == 1


async def test_chain_sets_one_timer_per_stream_not_one_per_item(monkeypatch: pytest.MonkeyPatch) -> None:
    """A TTS body or an LLM answer is hundreds of items per turn on every call: the per-item time limit
    must not schedule (and cancel) a timer for each of them."""
    loop = asyncio.get_running_loop()
    scheduled: list[float] = []
    call_at = loop.call_at

    def counting_call_at(when: float, callback: Any, *args: Any, **kwargs: Any) -> asyncio.TimerHandle:
        scheduled.append(when)
        return call_at(when, callback, *args, **kwargs)

    monkeypatch.setattr(loop, "call_at", counting_call_at)
    items = [f"chunk {i}" for i in range(200)]
    assert await collect([Source("a", items)], timeout_secs=5.0) == items
    assert len(scheduled) <= 2


async def test_item_deadline_limits_each_wait_and_not_the_time_between_waits() -> None:
    deadline = ItemDeadline(0.05)
    try:
        for _ in range(3):                      # quick waits, with longer pauses between them
            await deadline.wait(asyncio.sleep(0.01))
            await asyncio.sleep(0.08)           # the consumer's own time is not limited
        t0 = time.monotonic()
        with pytest.raises(TimeoutError):
            await deadline.wait(asyncio.sleep(1))
        assert 0.04 <= time.monotonic() - t0 < 0.5
    finally:
        deadline.close()
    task = asyncio.current_task()
    assert task is not None and task.cancelling() == 0      # the timeout's cancellation was taken back


async def test_item_deadline_leaves_a_cancellation_from_elsewhere_alone() -> None:
    async def wait_forever() -> None:
        deadline = ItemDeadline(5.0)
        try:
            await deadline.wait(asyncio.sleep(10))
        finally:
            deadline.close()

    task = asyncio.create_task(wait_forever())
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


# ----------------------------------------------------------------------------------------- ProviderCalls

async def test_calls_pass_the_persona_and_the_stage_limits() -> None:
    stt_a, stt_b = ScriptedSTT([HANG], name="stt-a"), ScriptedSTT(["Hola."], name="stt-b", delay=0.0)
    llm = ScriptedLLM(["Hi there."], first_token_s=0.0)
    tts = ToneTTS()
    persona = Persona(language="es", voice="alloy")
    calls = ProviderCalls(ProviderChain(stt=[stt_a, stt_b], llm=[llm], tts=[tts]),
                          settings=dataclasses.replace(FAST, stt_timeout_secs=0.05, provider_retries=0), persona=persona)
    assert await calls.transcribe(b"\x00\x00" * 160, sample_rate=16000) == "Hola."
    assert [c["language"] for c in stt_a.calls + stt_b.calls] == ["es", "es"]
    assert stt_b.calls[0]["sample_rate"] == 16000 and stt_b.calls[0]["bytes"] == 320
    async with contextlib.aclosing(calls.llm_stream([SYSTEM])) as deltas:
        assert "".join([d async for d in deltas]) == "Hi there."
    async with contextlib.aclosing(calls.tts_stream("Hi.")) as chunks:
        rates = {rate async for _, rate in chunks}
    assert rates == {ToneTTS.sample_rate} and tts.calls == ["Hi."]
