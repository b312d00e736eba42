"""Each stage's providers in order, and calls through them that survive one provider failing.

A call to a stage (STT, LLM, TTS) goes to the first provider; each item it produces must come within the
stage's timeout. A transient failure (:class:`~pipeline.providers.base.ProviderError` with ``transient``,
or a timeout) before the first item is retried ``provider_retries`` times, then the next provider is
tried; a permanent failure goes straight to the next. A vendor's ``retry-after`` is honoured: the retry
waits that long, unless it is longer than the stage's timeout, when the next provider is tried at once.
A failure after output has been produced is never retried (the caller would hear words twice). A
streaming STT that fails mid-utterance hands the audio it was fed to ``transcribe``
(:mod:`pipeline.live_stt`), so the same vendor's one-shot form is tried, then the fallback. When no
provider is left, :class:`ProvidersFailed` says so: the conversation apologises and ends the call.

Usage::

    calls = ProviderCalls(ProviderChain(stt=[deepgram], llm=[openai, groq], tts=[cartesia]),
                          settings=settings, persona=persona)
    text = await calls.transcribe(pcm, sample_rate=16000)
    live = calls.live_transcription(sample_rate=8000)     # a streaming first STT, else None
    async with closing(calls.llm_stream(messages)) as deltas:
        async for delta in deltas:          # str, or a ToolCall
            ...
    # any of them: except ProvidersFailed as exc -> apologise with str(exc) in the log
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from pipeline.live_stt import LiveTranscription
from pipeline.providers.base import (
    LLMProvider,
    Message,
    ProviderError,
    StreamingSTTProvider,
    STTProvider,
    Tool,
    ToolCall,
    TTSProvider,
    closing,
)
from pipeline.settings import ConversationSettings, Persona

__all__ = ["ItemDeadline", "ProviderCalls", "ProviderChain", "ProvidersFailed", "first_working"]

_P = TypeVar("_P", STTProvider, LLMProvider, TTSProvider)
_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class ProviderChain:
    """Primary providers, optional fallbacks, and audio to play when no TTS can speak the apology."""

    stt: Sequence[STTProvider]
    llm: Sequence[LLMProvider]
    tts: Sequence[TTSProvider]
    apology_audio: tuple[bytes, int] | None = None   # (pcm, rate), rendered once per process


class ProvidersFailed(Exception):
    """Every provider for a stage failed (or one failed mid-answer): apologise and end the call."""


class ProviderCalls:
    """One call's way to its providers: the chain with the call's limits, language and voice."""

    def __init__(self, chain: ProviderChain, *, settings: ConversationSettings, persona: Persona) -> None:
        self.chain = chain
        self._settings = settings
        self._persona = persona

    async def transcribe(self, pcm: bytes, *, sample_rate: int) -> str:
        """The first working STT's transcript of ``pcm`` (16-bit mono)."""
        language = self._persona.language

        async def once(stt: STTProvider) -> AsyncIterator[str]:
            yield await stt.transcribe(pcm, sample_rate=sample_rate, language=language)

        async with closing(self._through("speech-to-text", self.chain.stt, once,
                                                     self._settings.stt_timeout_secs)) as results:
            async for text in results:
                return text
        raise ProvidersFailed("speech-to-text produced nothing")   # no provider returns without a result

    def live_transcription(self, *, sample_rate: int,
                           on_interim: Callable[[str], None] = lambda _text: None) -> LiveTranscription | None:
        """An utterance streamed to the first STT while the caller speaks, when that STT streams (else None);
        if the stream fails, the audio goes through :meth:`transcribe`."""
        first = self.chain.stt[0] if self.chain.stt else None
        if not isinstance(first, StreamingSTTProvider):
            return None
        return LiveTranscription(first, sample_rate=sample_rate, language=self._persona.language,
                                 fallback=self.transcribe, final_wait_s=self._settings.stt_stream_final_wait_ms / 1000,
                                 timeout_s=self._settings.stt_timeout_secs, on_interim=on_interim)

    def llm_stream(self, context: Sequence[Message], tools: Sequence[Tool] = ()) -> AsyncIterator[str | ToolCall]:
        """The answer's text deltas (and tool calls) from the first working LLM."""
        return self._through("language model", self.chain.llm,
                             lambda llm: llm.stream(context, tools) if tools else llm.stream(context),
                             self._settings.llm_timeout_secs)

    def tts_stream(self, text: str) -> AsyncIterator[tuple[bytes, int]]:
        """``(pcm, sample_rate)`` chunks of ``text`` spoken by the first working TTS."""
        voice, language = self._persona.voice, self._persona.language

        async def with_rate(tts: TTSProvider) -> AsyncIterator[tuple[bytes, int]]:
            async with closing(tts.synthesize(text, voice=voice, language=language)) as chunks:
                async for chunk in chunks:
                    yield chunk, tts.sample_rate
        return self._through("text-to-speech", self.chain.tts, with_rate, self._settings.tts_timeout_secs)

    def _through(self, stage: str, providers: Sequence[_P], open_stream: Callable[[_P], AsyncIterator[_T]],
                 timeout_secs: float) -> AsyncIterator[_T]:
        return first_working(stage, providers, open_stream, timeout_secs=timeout_secs,
                             retries=self._settings.provider_retries)


async def first_working(stage: str, providers: Sequence[_P], open_stream: Callable[[_P], AsyncIterator[_T]], *,
                        timeout_secs: float, retries: int) -> AsyncIterator[_T]:
    """Items from the first provider that works: each item within ``timeout_secs``; a transient failure
    before the first item is retried ``retries`` times, then the next provider is tried; a failure after
    output raises :class:`ProvidersFailed` at once, as does running out of providers. Usage::

        chunks = first_working("text-to-speech", [tts_a, tts_b], lambda tts: tts.synthesize("Hi"),
                               timeout_secs=5.0, retries=1)
    """
    errors: list[str] = []
    for provider in providers:
        for _ in range(retries + 1):
            produced = False
            stream = open_stream(provider)
            deadline = ItemDeadline(timeout_secs)
            try:
                while True:
                    item = await deadline.wait(anext(stream, None))
                    if item is None:
                        return
                    produced = True
                    yield item
            except (ProviderError, TimeoutError) as exc:
                errors.append(_describe(provider.name, exc))
                if produced:
                    raise ProvidersFailed(f"{stage} failed mid-answer: {errors[-1]}") from exc
                if isinstance(exc, ProviderError) and not exc.transient:
                    break
                wait = exc.retry_after if isinstance(exc, ProviderError) else None
                if wait is not None:
                    if wait > timeout_secs:
                        break                       # a caller will not wait that long: the next provider
                    await asyncio.sleep(wait)
            finally:
                deadline.close()
                await _aclose(stream)
    raise ProvidersFailed(f"{stage} failed: " + "; ".join(errors))


class ItemDeadline:
    """A time limit on each wait for a stream's next item, with one timer per stream, not one per item.

    ``asyncio.timeout`` around every ``anext`` schedules and cancels a timer per item (about 4.5 µs here,
    for each TTS chunk and each LLM token of every call). This keeps one timer and moves it lazily: when
    it fires before the current wait is due (an item came since), it is set again for that wait's due
    time; while no wait is running it lapses. A wait that outlasts ``timeout_s`` cancels the waiting
    task, and :meth:`wait` turns that cancellation into ``TimeoutError`` (as
    ``asyncio.timeout`` does, leaving any other cancellation alone). Usage::

        deadline = ItemDeadline(5.0)
        try:
            while (item := await deadline.wait(anext(stream, None))) is not None:   # TimeoutError past 5 s
                ...
        finally:
            deadline.close()
    """

    __slots__ = ("_cancelling", "_due", "_expired", "_handle", "_loop", "_task", "_timeout_s")

    def __init__(self, timeout_s: float) -> None:
        self._timeout_s = timeout_s         # fixed: a timer set for one wait is never later than the next's due
        self._loop = asyncio.get_running_loop()
        self._due: float | None = None          # None: no wait is running
        self._handle: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[Any] | None = None
        self._cancelling = 0
        self._expired = False

    async def wait(self, awaitable: Awaitable[_T]) -> _T:
        """``await awaitable``, raising TimeoutError if it takes longer than ``timeout_s``."""
        self._start()
        try:
            return await awaitable
        except asyncio.CancelledError:
            self._raise_if_expired()
            raise
        finally:
            self._due = None                    # no wait: a timer firing now lapses (the next wait moves it)

    def _start(self) -> None:
        """A wait begins (in the current task): it may last ``timeout_s``."""
        task = asyncio.current_task()
        assert task is not None, "ItemDeadline.wait() outside a task"
        self._task, self._cancelling, self._expired = task, task.cancelling(), False
        self._due = due = self._loop.time() + self._timeout_s
        if self._handle is None:
            self._handle = self._loop.call_at(due, self._fire)

    def _raise_if_expired(self) -> None:
        """Inside ``except CancelledError``: raise TimeoutError if this deadline caused the cancellation."""
        if self._expired and self._task is not None:
            self._expired = False
            if self._task.uncancel() <= self._cancelling:
                raise TimeoutError

    def close(self) -> None:
        """Cancel the timer (the stream is done with)."""
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        self._due = None

    def _fire(self) -> None:
        self._handle = None
        due = self._due
        if due is None or self._task is None:
            return                              # between waits: the next wait sets a timer
        if self._loop.time() < due:
            self._handle = self._loop.call_at(due, self._fire)
            return
        self._expired = True
        self._task.cancel()


def _describe(name: str, exc: BaseException) -> str:
    return f"{name} timed out" if isinstance(exc, TimeoutError) else str(exc)


async def _aclose(stream: AsyncIterator[Any]) -> None:
    aclose = getattr(stream, "aclose", None)
    if aclose is not None:
        try:
            await aclose()
        except Exception:  # noqa: BLE001, S110 - a broken stream is already being reported
            pass
