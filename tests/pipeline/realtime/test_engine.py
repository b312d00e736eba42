"""RealtimeEngine in-process against the fake Realtime API on 127.0.0.1: a real Playout whose transport
collects frames (marks acknowledged as they go out), a caller feeding 20 ms frames at 8 kHz in real time,
and the tone TTS of the conversation harness for last words and fillers."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from pipeline.events import BargeIn, ErrorEvent, Event, TranscriptEvent
from pipeline.frames import AudioFrame, Frame, Mark
from pipeline.playout import Playout
from pipeline.provider_chain import ProviderChain
from pipeline.providers._http import open_session
from pipeline.providers.base import ProviderSettings, Tool, ToolCall
from pipeline.realtime.client import PCM24K, RealtimeModel, realtime_url, session_update
from pipeline.realtime.engine import RealtimeEngine, RealtimeOptions
from pipeline.settings import Persona
from tests.fakes.realtime_server import FakeRealtime
from tests.pipeline.call_harness import FAST, SILENCE_FRAME, SPEECH_FRAME, ToneTTS

pytestmark = pytest.mark.asyncio

GREETER = Persona(greeting="Hi.")
SERVER_VAD = RealtimeOptions()
BOOK = Tool("book_table", "Book a table.", {"type": "object", "properties": {"time": {"type": "string"}}})


@dataclass
class Rig:
    engine: RealtimeEngine = None  # type: ignore[assignment]  # set before use
    playout: Playout = None  # type: ignore[assignment]  # set before use
    tts: ToneTTS = field(default_factory=lambda: ToneTTS(["ok"]))
    frames: list[Frame] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    ended: list[str] = field(default_factory=list)
    tool_calls: list[ToolCall] = field(default_factory=list)

    async def speak(self, ms: int, then_silence_ms: int = 700) -> None:
        loop = asyncio.get_running_loop()
        start = loop.time()
        for i, frame in enumerate([SPEECH_FRAME] * (ms // 20) + [SILENCE_FRAME] * (then_silence_ms // 20)):
            self.engine.on_audio(AudioFrame(frame, 8000))
            await asyncio.sleep(max(0.0, start + (i + 1) * 0.02 - loop.time()))

    async def until(self, check: Callable[[], Any], timeout: float = 5.0) -> None:
        async with asyncio.timeout(timeout):
            while not check():
                await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def rig(fake: FakeRealtime, *, key: str = "sk-test", options: RealtimeOptions = SERVER_VAD,
              tool_result: str | None = "Booked for seven.", tools: tuple[Tool, ...] = (BOOK,)) -> AsyncIterator[Rig]:
    r = Rig()
    settings = dataclasses.replace(FAST, barge_in=True)
    async with open_session() as http, asyncio.TaskGroup() as tg:
        model = RealtimeModel(ProviderSettings("realtime", "gpt-realtime", key, fake.base_url + "/v1"), http)
        r.playout = playout = Playout(sample_rate=8000, lead_ms=100, max_buffer_ms=10000)

        async def send(frame: Frame) -> None:
            r.frames.append(frame)
            if isinstance(frame, Mark):
                r.engine.on_mark_played(frame.name)

        async def on_tool(call: ToolCall) -> str | None:
            r.tool_calls.append(call)
            await asyncio.sleep(0.3)
            return tool_result

        r.engine = RealtimeEngine(model=model, options=options, settings=settings, persona=GREETER,
                                  providers=ProviderChain(stt=[], llm=[model], tts=[r.tts]), playout=playout,
                                  spawn=tg.create_task, on_event=r.events.append, end_call=r.ended.append,
                                  tools=tools, on_tool=on_tool)
        playout.on_speaking = r.engine.on_speaking
        pacer = tg.create_task(playout.run(send))
        r.engine.start()
        try:
            yield r
        finally:
            r.engine.close()
            pacer.cancel()


def audio_ms(r: Rig) -> float:
    return sum(f.duration_ms for f in r.frames if isinstance(f, AudioFrame))


async def test_a_tool_result_goes_back_as_function_call_output_and_the_model_answers() -> None:
    async with FakeRealtime(replies=["Hi.", {"tool": "book_table", "arguments": {"time": "7pm"}}, "Done."],
                            transcripts=["a table at seven"]) as fake:
        async with rig(fake) as r:
            await r.until(lambda: audio_ms(r) > 0)
            await r.speak(600)
            await r.until(lambda: r.tool_calls, timeout=5)
            await r.until(lambda: not r.playout.speaking)
            r.engine.filler("One moment.")                  # what the tool registry does while a tool is slow
            await r.until(lambda: fake.state.tool_outputs, timeout=5)
            await r.until(lambda: TranscriptEvent("assistant", "Done.") in r.events)
            assert r.tool_calls == [ToolCall("book_table", {"time": "7pm"}, id=r.tool_calls[0].id)]
            assert r.tool_calls[0].id.startswith("call_")
            [output] = fake.state.tool_outputs
            assert output == {"type": "function_call_output", "call_id": r.tool_calls[0].id,
                              "output": "Booked for seven."}
            assert fake.state.sessions[0]["tools"] == [{"type": "function", "name": "book_table",
                                                        "description": "Book a table.",
                                                        "parameters": dict(BOOK.parameters)}]
            assert TranscriptEvent("user", "a table at seven") in r.events
            assert r.tts.calls == ["One moment."]            # spoken by the TTS stage into the playout
            assert fake.state.problems == []
            assert r.ended == []


async def test_local_turn_detection_commits_and_asks_for_the_answer() -> None:
    async with FakeRealtime(replies=["Hi.", "Sure."], transcripts=["hello"]) as fake:
        async with rig(fake, options=RealtimeOptions(turn_detection="local")) as r:
            await r.until(lambda: TranscriptEvent("assistant", "Hi.") in r.events)
            await r.speak(400)
            await r.until(lambda: TranscriptEvent("assistant", "Sure.") in r.events)
            assert fake.state.sessions[0]["audio"]["input"]["turn_detection"] is None
            assert "input_audio_buffer.commit" in fake.state.events
            assert fake.state.events.count("response.create") == 2      # the greeting, then the answer
            assert fake.state.problems == []


async def test_local_barge_in_cancels_and_truncates() -> None:
    long = "word " * 80
    async with FakeRealtime(replies=[long], ms_per_char=20) as fake:
        async with rig(fake, options=RealtimeOptions(turn_detection="local")) as r:
            await r.until(lambda: audio_ms(r) > 1200)
            await r.speak(200, then_silence_ms=100)
            await r.until(lambda: fake.state.truncates)
            assert any(isinstance(e, BargeIn) for e in r.events)
            assert "response.cancel" in fake.state.events
            [truncate] = fake.state.truncates
            assert 0 < truncate["audio_end_ms"] < truncate["sent_ms"]
            assert fake.state.problems == []


async def test_a_dropped_socket_apologises_and_ends() -> None:
    async with FakeRealtime(replies=["Hi."]) as fake:
        async with rig(fake) as r:
            await r.until(lambda: TranscriptEvent("assistant", "Hi.") in r.events)
            await fake.__aexit__(None, None, None)          # the server goes away mid-call
            await r.until(lambda: r.ended, timeout=10)
            assert r.ended == ["provider_failed"]
            assert any(isinstance(e, ErrorEvent) for e in r.events)
            assert r.tts.calls[-1] == FAST.apology_text


async def test_a_refused_key_apologises_and_ends() -> None:
    async with FakeRealtime(api_key="sk-right") as fake:
        async with rig(fake, key="sk-wrong") as r:
            await r.until(lambda: r.ended, timeout=10)
            assert r.ended == ["provider_failed"]
            assert r.tts.calls == [FAST.apology_text]
            [error] = [e for e in r.events if isinstance(e, ErrorEvent)]
            assert "realtime" in error.message


async def test_url_and_session_shapes() -> None:
    assert realtime_url("http://127.0.0.1:9/v1", "gpt-realtime") == "ws://127.0.0.1:9/v1/realtime?model=gpt-realtime"
    update = session_update(instructions="Be brief.", voice="marin", audio_format=PCM24K, turn_detection="semantic_vad",
                            transcribe_model="", tools=(), interrupt=False)
    assert update == {"type": "session.update", "session": {
        "type": "realtime", "output_modalities": ["audio"], "instructions": "Be brief.",
        "audio": {"input": {"format": {"type": "audio/pcm", "rate": 24000},
                            "turn_detection": {"type": "semantic_vad", "create_response": True,
                                               "interrupt_response": False}},
                  "output": {"format": {"type": "audio/pcm", "rate": 24000}, "voice": "marin"}}}}


async def test_digits_are_told_to_the_model_as_a_user_message() -> None:
    async with FakeRealtime(replies=["Hi.", "Got it."]) as fake:
        async with rig(fake) as r:
            await r.until(lambda: TranscriptEvent("assistant", "Hi.") in r.events)
            for digit in "12#":
                r.engine.on_dtmf(digit)
            await r.until(lambda: TranscriptEvent("assistant", "Got it.") in r.events)
            assert TranscriptEvent("user", "[DTMF] 12") in r.events
            assert fake.state.events.count("conversation.item.create") == 1
            assert fake.state.problems == []


async def test_barge_in_after_the_whole_answer_arrived_still_reports_what_was_heard() -> None:
    long = " ".join(f"word{i}" for i in range(60))
    async with FakeRealtime(replies=[long], ms_per_char=20) as fake:
        async with rig(fake, options=RealtimeOptions(turn_detection="local")) as r:
            await r.until(lambda: TranscriptEvent("assistant", long) in r.events, timeout=10)
            await r.until(lambda: audio_ms(r) > 3000)          # all of it received; about 3 s played
            assert r.playout.speaking
            await r.speak(200, then_silence_ms=100)
            await r.until(lambda: fake.state.truncates)
            [barge] = [e for e in r.events if isinstance(e, BargeIn)]
            assert barge.heard and long.startswith(barge.heard) and barge.heard != long
            [truncate] = fake.state.truncates
            assert 2500 < truncate["audio_end_ms"] < truncate["sent_ms"] == len(long) * 20
            assert [e for e in r.events if isinstance(e, TranscriptEvent) and e.role == "assistant"] == [
                TranscriptEvent("assistant", long)]                 # reported once, not again on the barge-in
            assert "response.cancel" not in fake.state.events      # the response had finished: nothing to cancel
            assert fake.state.problems == []
