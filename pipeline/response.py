"""The agent's answers: spoken clause by clause, interruptible, remembered as far as they were heard.

An answer streams from the LLM into a :class:`~pipeline.text.ClauseSplitter`. The first clause streams
straight from TTS into the playout (fewest hops to first audio); each later clause is synthesised while
the one before it plays. After each clause a mark goes out, so the transport can say when it has played.
A barge-in cancels the answer, flushes the audio and keeps in the context only what the caller heard
(:func:`heard`): whole clauses whose marks came back, and the played share of the clause cut off.

Usage::

    responder = Responder(playout=playout, providers=calls, messages=messages, spawn=tg.create_task,
                          on_event=observer, on_failure=apologise)
    responder.say("Hello! How can I help?")          # the greeting
    responder.answer(speech_end=turn.speech_end)     # the LLM's answer to the context in ``messages``
    responder.on_mark_played("r2-c0")
    responder.interrupt()                            # the caller spoke: BargeIn(heard=...)
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any

from pipeline.audio import Resampler
from pipeline.engine import OnTool
from pipeline.events import BargeIn, BotSpeaking, Event, TranscriptEvent, TurnLatency
from pipeline.playout import Playout
from pipeline.provider_chain import ProviderCalls, ProvidersFailed
from pipeline.providers.base import Message, Tool, ToolCall, ToolExchange, ToolResult, closing
from pipeline.text import ClauseSplitter, truncate_words

__all__ = ["Clause", "Responder", "Response", "heard"]

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class Clause:
    """One clause of an answer and where it lies in the outbound stream (milliseconds)."""

    name: str
    text: str
    start_ms: float = 0.0
    end_ms: float | None = None    # None while it is still being written
    played: bool = False           # its mark came back


@dataclass(slots=True)
class Response:
    """One answer in progress: its context message (grows as the LLM streams), clauses and timings."""

    index: int
    message: dict[str, str]
    clauses: list[Clause] = field(default_factory=list)
    task: asyncio.Task[None] | None = None
    speech_end: float | None = None
    turn_wait_ms: float = 0.0
    stt_ms: float = 0.0
    llm_ms: float = 0.0
    tts_ms: float = 0.0
    reported: bool = False
    step_from: int = 0      # the clauses of the current step (after tool use) start here

    @property
    def running(self) -> bool:
        return self.task is not None and not self.task.done()


def heard(clauses: Sequence[Clause], played_ms: float, written_ms: float) -> str:
    """What the caller heard of clauses once ``played_ms`` of the stream has played (``written_ms`` is
    where the stream ends, for a clause still being written): whole clauses, then the played share of
    the words of the clause that was cut off.

    >>> heard([Clause("r1-c0", "One two.", 0, 800), Clause("r1-c1", "Three four five six.", 800, 1600)], 1200, 1600)
    'One two. Three four'
    """
    words: list[str] = []
    for clause in clauses:
        if clause.played or (clause.end_ms is not None and played_ms >= clause.end_ms):
            words.append(clause.text)
            continue
        end = clause.end_ms if clause.end_ms is not None else written_ms
        span = end - clause.start_ms
        if span > 0 and played_ms > clause.start_ms:
            words.append(truncate_words(clause.text, (played_ms - clause.start_ms) / span))
        break
    return " ".join(w for w in words if w).strip()


Body = Callable[[Response], Coroutine[Any, Any, None]]


class Responder:
    """Starts, speaks and interrupts the call's answers; one at a time, on the call's event loop.

    ``messages`` is the conversation's context, shared: each answer appends its assistant message and
    fills it in as it streams (or removes it when nothing was said). ``on_failure(code, message)`` is
    called when no provider could produce the answer."""

    def __init__(self, *, playout: Playout, providers: ProviderCalls, messages: list[Message],
                 spawn: Callable[[Coroutine[Any, Any, None]], asyncio.Task[None]], on_event: Callable[[Event], None],
                 on_failure: Callable[[str, str], None], clock: Callable[[], float] = time.monotonic,
                 tools: Sequence[Tool] = (), on_tool: OnTool | None = None, max_tool_rounds: int = 3) -> None:
        self._playout = playout
        self._providers = providers
        self._messages = messages
        self._spawn = spawn
        self._emit = on_event
        self._on_failure = on_failure
        self._clock = clock
        self._tools = tuple(tools)
        self._on_tool = on_tool
        self._max_tool_rounds = max_tool_rounds
        self._filler: asyncio.Task[None] | None = None
        self._response: Response | None = None
        self._count = 0

    @property
    def current(self) -> Response | None:
        """The answer being spoken (or last spoken and not interrupted)."""
        return self._response

    @property
    def running(self) -> bool:
        return self._response is not None and self._response.running

    # ------------------------------------------------------------------------------ starting
    def say(self, text: str) -> Response:
        """Speak ``text`` as an answer (interruptible)."""
        return self._begin(self._speak_text(text))

    def answer(self, *, speech_end: float | None = None, turn_wait_ms: float = 0.0, stt_ms: float = 0.0) -> Response:
        """Answer the context with the LLM; the timings of the caller's turn go into its TurnLatency."""
        return self._begin(self._answer(), speech_end=speech_end, turn_wait_ms=turn_wait_ms, stt_ms=stt_ms)

    def _begin(self, body: Body, *, speech_end: float | None = None, turn_wait_ms: float = 0.0,
               stt_ms: float = 0.0) -> Response:
        self.interrupt(barge_in=False)   # a new answer replaces one still running
        self._count += 1
        message = {"role": "assistant", "content": ""}
        response = Response(self._count, message, speech_end=speech_end, turn_wait_ms=turn_wait_ms, stt_ms=stt_ms)
        self._messages.append(message)
        self._response = response
        response.task = self._spawn(self._run(response, body))
        return response

    async def _run(self, response: Response, body: Body) -> None:
        try:
            await body(response)
            self._playout.end_of_audio()
        except ProvidersFailed as exc:
            self._on_failure("provider_failed", str(exc))
        finally:
            if self._response is response and not response.message["content"]:
                self._forget(response)

    def _speak_text(self, text: str) -> Body:
        async def body(response: Response) -> None:
            response.message["content"] = text
            await self._speak_clause(response, text)
            self._emit(TranscriptEvent("assistant", text))
        return body

    def _answer(self) -> Body:
        async def body(response: Response) -> None:
            for step in range(self._max_tool_rounds + 1):
                calls = await self._answer_step(response)
                if not calls or self._on_tool is None:
                    return
                results = await self._run_tools(calls)
                await self._filler_done()
                if results is None:                     # a call-control tool: nothing goes back
                    return
                if step == self._max_tool_rounds:
                    logger.warning("tool_max_rounds (%d) reached; the model's last tool results are dropped",
                                   self._max_tool_rounds)
                    return
                self._next_step(response, ToolExchange(results))
        return body

    async def _answer_step(self, response: Response) -> list[ToolCall]:
        """One LLM request: its words spoken clause by clause; the tool calls it made returned."""
        clauses: asyncio.Queue[str | None] = asyncio.Queue()
        tool_calls: list[ToolCall] = []
        try:
            async with asyncio.TaskGroup() as tg:   # the LLM streams while earlier clauses are spoken
                tg.create_task(self._speak_queue(response, clauses))
                text = await self._generate(response, clauses, tool_calls)
        except ExceptionGroup as group:
            raise _first(group, ProvidersFailed) from None
        if text:
            self._emit(TranscriptEvent("assistant", text))
        return tool_calls

    async def _run_tools(self, calls: Sequence[ToolCall]) -> tuple[ToolResult, ...] | None:
        """Each call through ``on_tool``, in order; None when one of them has nothing to send back (it
        ended or transferred the call)."""
        assert self._on_tool is not None
        self._playout.end_of_audio()          # the words before the call go out in full
        results: list[ToolResult] = []
        for call in calls:
            logger.info("model called tool %s", call.name)
            content = await self._on_tool(call)
            if content is None:
                return None
            results.append(ToolResult(call, content))
        return tuple(results)

    def _next_step(self, response: Response, exchange: ToolExchange) -> None:
        """Put the step's tool exchange into the context after its words, and a fresh assistant message
        for the answer the model gives with the results."""
        if not response.message["content"] and response.message in self._messages:
            self._messages.remove(response.message)
        response.message = {"role": "assistant", "content": ""}
        response.step_from = len(response.clauses)
        self._messages += [exchange, response.message]

    def filler(self, text: str) -> None:
        """Speak ``text`` now as part of the running answer (a tool is slow): interruptible like it; the
        answer's next words wait until it has been written out."""
        response = self._response
        if response is None or not response.running or self._filler is not None:
            return

        async def speak() -> None:
            try:
                await self._speak_clause(response, text)
            except ProvidersFailed as exc:      # silence, as before fillers; the answer goes on
                logger.warning("the filler could not be spoken: %s", exc)
                return
            self._playout.end_of_audio()
            self._emit(TranscriptEvent("assistant", text))

        self._filler = self._spawn(speak())

    async def _filler_done(self) -> None:
        filler, self._filler = self._filler, None
        if filler is not None:
            await filler

    # ------------------------------------------------------------------------------ speaking
    async def _generate(self, response: Response, clauses: asyncio.Queue[str | None],
                        tool_calls: list[ToolCall]) -> str:
        """Stream the LLM answer into clauses; the full text goes into the context as it grows."""
        splitter = ClauseSplitter()
        context = list(self._messages[:-1])
        t0 = self._clock()
        parts: list[str] = []
        async with closing(self._providers.llm_stream(context, self._tools)) as deltas:
            async for delta in deltas:
                if isinstance(delta, ToolCall):
                    tool_calls.append(delta)
                    continue
                if not parts:
                    response.llm_ms = (self._clock() - t0) * 1000.0
                parts.append(delta)
                response.message["content"] = "".join(parts).strip()
                for clause in splitter.feed(delta):
                    clauses.put_nowait(clause)
        for clause in splitter.flush():
            clauses.put_nowait(clause)
        clauses.put_nowait(None)
        return "".join(parts).strip()

    async def _speak_queue(self, response: Response, clauses: asyncio.Queue[str | None]) -> None:
        """Speak clauses in order. The first streams straight from TTS (fewest hops to first audio);
        each later one is synthesised while the one before it plays, so a short clause is never
        followed by a gap the length of a TTS round trip."""
        text = await clauses.get()
        if text is None:
            return
        try:
            async with asyncio.TaskGroup() as tg:
                source: AsyncIterator[tuple[bytes, int]] | None = None
                started: float | None = None
                while text is not None:
                    upcoming = tg.create_task(self._prefetch(clauses, tg))
                    await self._speak_clause(response, text, source, started)
                    following = await upcoming
                    if following is None:
                        break
                    text, chunks, started = following
                    source = _drain(chunks)
        except ExceptionGroup as group:
            raise _first(group, ProvidersFailed) from None

    async def _prefetch(self, clauses: asyncio.Queue[str | None],
                        tg: asyncio.TaskGroup) -> tuple[str, asyncio.Queue[Any], float] | None:
        """Wait for the next clause's text and start synthesising it at once."""
        text = await clauses.get()
        if text is None:
            return None
        chunks: asyncio.Queue[Any] = asyncio.Queue()
        tg.create_task(self._synthesise_into(text, chunks))
        return text, chunks, self._clock()

    async def _synthesise_into(self, text: str, chunks: asyncio.Queue[Any]) -> None:
        """Feed a clause's audio into ``chunks`` as it arrives; then None, or the failure."""
        try:
            async with closing(self._providers.tts_stream(text)) as stream:
                async for chunk in stream:
                    chunks.put_nowait(chunk)
        except ProvidersFailed as exc:
            chunks.put_nowait(exc)
            return
        chunks.put_nowait(None)

    async def _speak_clause(self, response: Response, text: str,
                            chunks: AsyncIterator[tuple[bytes, int]] | None = None,
                            started: float | None = None) -> None:
        clause = Clause(f"r{response.index}-c{len(response.clauses)}", text, start_ms=self._written_ms())
        response.clauses.append(clause)
        t0 = self._clock() if started is None else started

        def first_chunk() -> None:
            if len(response.clauses) == 1:
                response.tts_ms = (self._clock() - t0) * 1000.0

        await self.play_text(text, first_chunk, chunks)
        clause.end_ms = self._written_ms()
        self._playout.mark(clause.name)

    async def play_text(self, text: str, on_first: Callable[[], None] | None = None,
                        source: AsyncIterator[tuple[bytes, int]] | None = None) -> bool:
        """Synthesise ``text`` (or play ``source``) into the playout at its rate; True once audio was queued.
        Raises :class:`ProvidersFailed` when no TTS could speak it."""
        resampler: Resampler | None = None
        spoke = False
        async with closing(source if source is not None else self._providers.tts_stream(text)) as chunks:
            async for pcm, rate in chunks:
                if not spoke and on_first is not None:
                    on_first()
                spoke = True
                if rate != self._playout.sample_rate:
                    resampler = resampler or Resampler(rate, self._playout.sample_rate)
                    pcm = resampler.process(pcm)
                await self._playout.write(pcm)
        return spoke

    async def play_audio(self, pcm: bytes, rate: int) -> None:
        """Queue ready-made audio (say, the pre-rendered apology) at the playout's rate."""
        if rate != self._playout.sample_rate:
            pcm = Resampler(rate, self._playout.sample_rate).process(pcm)
        await self._playout.write(pcm)

    async def last_words(self, text: str, fallback: tuple[bytes, int] | None = None) -> None:
        """Speak ``text`` (or play ``fallback``, audio rendered at startup, when no TTS can), report it, and
        wait until it has played: the goodbye or the apology before a call ends."""
        try:
            await self.play_text(text)
        except ProvidersFailed:
            if fallback is not None:
                await self.play_audio(*fallback)
        self._emit(TranscriptEvent("assistant", text))
        await self._playout.drained()

    def _written_ms(self) -> float:
        return self._playout.sent_ms + self._playout.queued_ms

    # ------------------------------------------------------------------------------ marks, barge-in
    def on_mark_played(self, name: str) -> None:
        """The transport played the audio up to mark ``name``."""
        if not self._playout.acknowledge(name) or self._response is None:
            return
        for clause in self._response.clauses:
            if clause.name == name:
                clause.played = True

    def on_speaking(self, speaking: bool, at: float) -> None:
        """Playout callback: report it, and the turn's latency at an answer's first audio."""
        self._emit(BotSpeaking(speaking))
        response = self._response
        if speaking and response is not None and response.speech_end is not None and not response.reported:
            response.reported = True
            self._emit(TurnLatency(turn_wait_ms=response.turn_wait_ms, stt_ms=response.stt_ms,
                                   llm_first_token_ms=response.llm_ms, tts_first_audio_ms=response.tts_ms,
                                   first_audio_out_ms=(at - response.speech_end) * 1000.0))

    def interrupt(self, *, barge_in: bool = True) -> None:
        """Stop the agent at once: cancel the answer, flush audio, keep only what was heard."""
        response = self._response
        if response is None:
            return
        running = response.running
        if not self._playout.speaking and not running:
            return
        said = heard(response.clauses[response.step_from:], self._playout.played_ms(), self._written_ms())
        if running:
            assert response.task is not None
            response.task.cancel()
        if self._filler is not None:
            self._filler.cancel()
            self._filler = None
        self._playout.clear()
        response.message["content"] = said
        if not said:
            self._forget(response)
        self._response = None
        if barge_in:
            logger.info("barge-in: caller interrupted; heard %d of the answer's characters", len(said))
            self._emit(BargeIn(said))

    def close(self) -> None:
        if self._response is not None and self._response.task is not None:
            self._response.task.cancel()
        if self._filler is not None:
            self._filler.cancel()

    def _forget(self, response: Response) -> None:
        if response.message in self._messages and not response.message["content"]:
            self._messages.remove(response.message)


async def _drain(chunks: asyncio.Queue[Any]) -> AsyncIterator[tuple[bytes, int]]:
    while (item := await chunks.get()) is not None:
        if isinstance(item, BaseException):
            raise item
        yield item


def _first(group: BaseExceptionGroup[Any], kind: type[BaseException]) -> BaseException:
    """The first ``kind`` leaf of a (nested) exception group, else the group itself."""
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            found = _first(exc, kind)
            if isinstance(found, kind):
                return found
        elif isinstance(exc, kind):
            return exc
    return group
