"""Tests for pipeline.response: barge-in through a whole conversation (see tests/pipeline/call_harness.py),
and what was heard of an answer."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import Any

import pytest

from pipeline.conversation import (
    BargeIn,
    BotSpeaking,
    Persona,
    ProviderChain,
)
from pipeline.frames import AudioFrame, Clear
from pipeline.provider_chain import ProviderCalls
from pipeline.providers.base import Tool, ToolCall, ToolExchange, ToolResult
from pipeline.response import Clause, Responder, heard
from tests.pipeline.call_harness import (
    FAST,
    LONG,
    MS_PER_CHAR,
    SYSTEM,
    ScriptedLLM,
    ScriptedSTT,
    ToneTTS,
    call,
    transcripts,
)


@pytest.mark.asyncio
async def test_barge_in_clears_audio_and_keeps_only_what_was_heard() -> None:
    stt = ScriptedSTT(["Tell me about the restaurant.", ""])
    llm = ScriptedLLM([LONG])
    tts = ToneTTS()
    async with call(stt=[stt], llm=[llm], tts=[tts]) as h:
        await h.say(200)
        await h.until(lambda: BotSpeaking(True) in h.events)
        speaking_at = time.monotonic()
        await asyncio.sleep(0.5)
        await h.say(200)                                              # the caller talks over the agent
        barge = await h.until_event(lambda e: isinstance(e, BargeIn))
        interrupted_at = h.time_of(lambda e: isinstance(e, BargeIn))
        await h.until(lambda: len(stt.calls) == 2)
        await asyncio.sleep(0.2)
    # the carrier was told to flush, and no answer audio followed the flush
    kinds = [type(f).__name__ for f in h.frames]
    assert kinds.count("Clear") == 1
    clear_at = kinds.index("Clear")
    assert not any(isinstance(f, AudioFrame) for f in h.frames[clear_at + 1:])
    # it happened promptly: vad_start_ms after the caller started (plus scheduling)
    assert interrupted_at - speaking_at <= 0.5 + 0.2 + 0.15
    # what was heard is a non-empty prefix of the answer, about as long as the audio played
    heard = barge.heard
    assert heard and LONG.startswith(heard) and len(heard) < len(LONG) / 2
    heard_ms = (interrupted_at - speaking_at) * 1000
    assert abs(len(heard) * MS_PER_CHAR - heard_ms) <= 400
    assert h.convo.messages[-1] == {"role": "assistant", "content": heard}
    assert [m["content"] for m in h.convo.messages if m["role"] == "assistant"] == [heard]
    assert h.of(BotSpeaking)[-1] == BotSpeaking(False)
    # the LLM was not asked again for the empty second transcript
    assert len(llm.calls) == 1


@pytest.mark.asyncio
async def test_barge_in_during_the_greeting() -> None:
    persona = Persona(greeting=LONG)
    stt = ScriptedSTT(["Stop."])
    llm = ScriptedLLM(["Okay."])
    async with call(stt=[stt], llm=[llm], persona=persona) as h:
        await h.until(lambda: BotSpeaking(True) in h.events)
        await asyncio.sleep(0.3)
        await h.say(200)
        await h.until(lambda: "Okay." in transcripts(h, "assistant"))
    [barge] = h.of(BargeIn)
    assert barge.heard and LONG.startswith(barge.heard) and len(barge.heard) < len(LONG) / 2
    assert h.convo.messages[1] == {"role": "assistant", "content": barge.heard}
    assert llm.calls[0][1:] == [{"role": "assistant", "content": barge.heard}, {"role": "user", "content": "Stop."}]


@pytest.mark.asyncio
async def test_no_barge_in_when_disabled() -> None:
    settings = dataclasses.replace(FAST, barge_in=False)
    persona = Persona(greeting="A short hello to you all.")
    stt = ScriptedSTT([""])
    async with call(stt=[stt], persona=persona, settings=settings) as h:
        await h.until(lambda: BotSpeaking(True) in h.events)
        await h.say(100)
        await h.until(lambda: BotSpeaking(False) in h.events)
    assert h.of(BargeIn) == [] and Clear() not in h.frames
    assert h.audio_ms() == pytest.approx(len(persona.greeting) * MS_PER_CHAR, abs=25)


# ----------------------------------------------------------------------------------------- what was heard

def two_clauses(second_end: float | None = 1600.0) -> list[Clause]:
    return [Clause("r1-c0", "One two.", 0.0, 800.0), Clause("r1-c1", "Three four five six.", 800.0, second_end)]


@pytest.mark.parametrize(("played_ms", "expected"), [
    (0.0, ""),                                   # nothing played yet
    (400.0, "One"),                              # half of the first clause: its first word
    (800.0, "One two."),                         # the first clause whole
    (1200.0, "One two. Three four"),             # and half of the second
    (1600.0, "One two. Three four five six."),
])
def test_heard_keeps_whole_clauses_and_the_played_share_of_the_cut_one(played_ms: float, expected: str) -> None:
    assert heard(two_clauses(), played_ms, written_ms=1600.0) == expected


def test_heard_trusts_a_returned_mark_over_the_clock() -> None:
    clauses = two_clauses()
    clauses[0].played = True
    assert heard(clauses, 0.0, written_ms=1600.0) == "One two."


def test_heard_measures_a_clause_still_being_written_against_what_was_written() -> None:
    assert heard(two_clauses(second_end=None), 1000.0, written_ms=1200.0) == "One two. Three four"


class FakePlayout:
    """What the Responder uses of a Playout: audio written counts as sent, ``played`` is set by the test."""

    sample_rate = 8000

    def __init__(self) -> None:
        self.sent_ms = 0.0
        self.queued_ms = 0.0
        self.played = 0.0
        self.marks: list[str] = []
        self.cleared = 0

    async def write(self, pcm: bytes) -> None:
        self.sent_ms += len(pcm) / 16

    def mark(self, name: str) -> None:
        self.marks.append(name)

    def acknowledge(self, name: str) -> bool:
        return name in self.marks

    def end_of_audio(self) -> None:
        pass

    def clear(self) -> None:
        self.cleared += 1

    @property
    def speaking(self) -> bool:
        return self.played < self.sent_ms

    def played_ms(self) -> float:
        return self.played


@pytest.mark.asyncio
async def test_responder_barge_in_keeps_what_was_heard_in_the_context() -> None:
    playout = FakePlayout()
    events: list[Any] = []
    messages = [dict(SYSTEM)]
    tts = ToneTTS()
    calls = ProviderCalls(ProviderChain(stt=[], llm=[], tts=[tts]), settings=FAST, persona=Persona())
    responder = Responder(playout=playout, providers=calls, messages=messages,  # type: ignore[arg-type]  # FakePlayout
                          spawn=asyncio.ensure_future, on_event=events.append, on_failure=lambda c, m: None)
    response = responder.say("One two. Three four five six.")
    assert response.task is not None
    await response.task
    assert playout.marks == ["r1-c0"] and messages[-1]["content"] == "One two. Three four five six."
    playout.played = playout.sent_ms / 2
    responder.interrupt()
    [barge] = [e for e in events if isinstance(e, BargeIn)]
    assert barge.heard and "One two. Three four five six.".startswith(barge.heard)
    assert messages[-1] == {"role": "assistant", "content": barge.heard} and playout.cleared == 1
    assert responder.current is None
    responder.interrupt()                        # nothing left to interrupt
    assert playout.cleared == 1 and len([e for e in events if isinstance(e, BargeIn)]) == 1


class ToolLLM:
    """An LLM that answers every request with a sentence and a tool call; records the contexts it got."""

    name = "tool-llm"

    def __init__(self) -> None:
        self.contexts: list[list[Any]] = []

    async def stream(self, messages: Any, tools: Any = ()) -> Any:
        self.contexts.append(list(messages))
        n = len(self.contexts)
        yield f"Step {n}. "
        yield ToolCall("lookup", {"n": n}, f"call_{n}")


@pytest.mark.asyncio
async def test_tool_results_go_back_to_the_model_until_tool_max_rounds() -> None:
    playout = FakePlayout()
    messages: list[Any] = [dict(SYSTEM), {"role": "user", "content": "Look it up."}]
    llm, asked = ToolLLM(), []

    async def on_tool(call: ToolCall) -> str:
        asked.append(call)
        return f"result {call.arguments['n']}"

    calls = ProviderCalls(ProviderChain(stt=[], llm=[llm], tts=[ToneTTS()]), settings=FAST, persona=Persona())
    responder = Responder(playout=playout, providers=calls, messages=messages,  # type: ignore[arg-type]  # FakePlayout
                          spawn=asyncio.ensure_future, on_event=lambda e: None, on_failure=lambda c, m: None,
                          tools=[Tool("lookup", "Look up")], on_tool=on_tool, max_tool_rounds=1)
    response = responder.answer()
    assert response.task is not None
    await response.task
    assert [c.id for c in asked] == ["call_1", "call_2"] and len(llm.contexts) == 2   # one follow-up, no more
    exchange = ToolExchange((ToolResult(asked[0], "result 1"),))
    assert llm.contexts[1][2:] == [{"role": "assistant", "content": "Step 1."}, exchange]
    assert messages[2:] == [{"role": "assistant", "content": "Step 1."}, exchange,
                            {"role": "assistant", "content": "Step 2."}]       # the last results are dropped
