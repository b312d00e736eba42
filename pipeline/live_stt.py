"""One utterance streamed to a streaming STT while the caller speaks, with the one-shot chain behind it.

:class:`LiveTranscription` opens the stream when the caller starts speaking, sends each frame as it
arrives and keeps the vendor's results: finals are the utterance's words, interims are passed to
``on_interim`` (the running text) as they come. When the VAD hears the speech stop, :meth:`text` answers
at once if the vendor has already finalised the speech (its end-of-utterance signal covering the point
our VAD says speech ended); otherwise it asks for finals (``flush``) and waits for them at most
``final_wait_s``. If the stream fails at any point — it cannot open, it closes mid-way, it never answers —
the audio it was fed goes to ``fallback`` (the chain's one-shot ``transcribe``), so the caller never loses
a turn. Audio at 8 or 16 kHz is streamed at its rate; other rates are resampled to 16 kHz.

Usage (``pipeline.turns`` does this)::

    live = calls.live_transcription(sample_rate=8000, on_interim=confirm_barge_in)   # None: no streaming STT
    spawn(live.run())                 # owns the socket until close()
    live.feed(pcm8k)                  # per frame, from the transport's reader
    text = await live.text(silence_s=0.4)     # at the VAD's stop (callable again if speech resumes)
    live.close()
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from pipeline.audio import Resampler
from pipeline.providers.base import ProviderError, StreamingSTTProvider, STTStream, Transcript

__all__ = ["LiveTranscription"]

logger = logging.getLogger(__name__)

STREAM_RATES = (8000, 16000)
FALLBACK_RATE = 16000


class _Flush:
    """Queued after audio: ask for finals of everything before it."""


_FLUSH = _Flush()


class LiveTranscription:
    """See the module docstring. ``fallback(pcm16k, sample_rate=16000)`` is the one-shot chain;
    ``timeout_s`` bounds opening the stream and its wind-down."""

    def __init__(self, provider: StreamingSTTProvider, *, sample_rate: int, language: str | None,
                 fallback: Callable[..., Awaitable[str]], final_wait_s: float, timeout_s: float,
                 on_interim: Callable[[str], None] = lambda _text: None) -> None:
        self.name = provider.name
        self._provider = provider
        self._rate = sample_rate
        self._stream_rate = sample_rate if sample_rate in STREAM_RATES else FALLBACK_RATE
        self._resampler = None if sample_rate in STREAM_RATES else Resampler(sample_rate, FALLBACK_RATE)
        self._language = language
        self._fallback = fallback
        self._final_wait_s = final_wait_s
        self._timeout_s = timeout_s
        self._on_interim = on_interim
        self._audio: list[bytes] = []            # everything fed, at the transport's rate (for the fallback)
        self._fed_s = 0.0
        self._queue: asyncio.Queue[bytes | _Flush | None] = asyncio.Queue()
        self._finals: list[str] = []
        self._pending = ""                       # the latest interim since the last final
        self._eou_end_s: float | None = None     # where the vendor's last end-of-utterance signal ends
        self._heard = False                      # any result at all
        self._flushes = 0                        # flushes asked for / answered (a final after one)
        self._answered = 0
        self._changed = asyncio.Event()
        self.failure: ProviderError | TimeoutError | None = None
        self._closing = False

    # ------------------------------------------------------------------------------ audio in
    def feed(self, pcm: bytes) -> None:
        """One frame of the caller's PCM16 at the transport's rate."""
        self._audio.append(pcm)
        self._fed_s += len(pcm) / 2 / self._rate
        if self.failure is None and not self._closing:
            self._queue.put_nowait(self._resampler.process(pcm) if self._resampler else pcm)

    def close(self) -> None:
        """No more audio: the stream is finished and released by ``run`` (bounded by ``timeout_s``)."""
        if not self._closing:
            self._closing = True
            self._queue.put_nowait(None)

    # ------------------------------------------------------------------------------ the stream
    async def run(self) -> None:
        """Open the stream, send what is fed and read results until :meth:`close`; a failure is kept
        (for :meth:`text`), never raised."""
        stream: STTStream | None = None
        try:
            async with asyncio.timeout(self._timeout_s):
                stream = await self._provider.open_stream(sample_rate=self._stream_rate, language=self._language)
            try:
                async with asyncio.TaskGroup() as tg:
                    tg.create_task(self._send(stream))
                    async for result in stream.results():
                        self._take(result)
            except* (ProviderError, TimeoutError) as group:
                first = group.exceptions[0]
                self._fail(first if isinstance(first, ProviderError | TimeoutError) else TimeoutError())
        except (ProviderError, TimeoutError) as exc:
            self._fail(exc)
        finally:
            if stream is not None:
                await stream.close()
            self._changed.set()

    async def _send(self, stream: STTStream) -> None:
        while True:
            pcm = await self._queue.get()
            if pcm is None:
                await stream.finish()
                return
            if isinstance(pcm, _Flush):
                await stream.flush()
            else:
                await stream.send(pcm)

    def _take(self, result: Transcript) -> None:
        if self._closing:
            return                      # the turn is taken: the stream's last words are not news
        self._heard = True
        if result.final:
            if result.text:
                self._finals.append(result.text)
            self._pending = ""
            if self._answered < self._flushes:
                self._answered = self._flushes
        elif result.text:
            self._pending = result.text
        if result.end_of_utterance:
            self._eou_end_s = result.end_s
        if result.text:
            self._on_interim(self._so_far())
        self._changed.set()

    def _fail(self, exc: ProviderError | TimeoutError) -> None:
        if self.failure is None and not self._closing:
            self.failure = exc
            logger.warning("%s: streaming speech-to-text failed (%s); the one-shot path takes the utterance",
                           self.name, exc if isinstance(exc, ProviderError) else "timed out")

    # ------------------------------------------------------------------------------ the text
    async def text(self, *, silence_s: float = 0.0) -> str:
        """The utterance's words so far; the speech ended ``silence_s`` before the end of the fed audio.
        Through the one-shot ``fallback`` when the stream failed (its ProvidersFailed propagates)."""
        if self.failure is None and not self._finalised(silence_s):
            self._flushes += 1
            self._queue.put_nowait(_FLUSH)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._final_wait_s):
                    while self.failure is None and self._answered < self._flushes:
                        self._changed.clear()
                        await self._changed.wait()
            if self.failure is None and not self._heard:
                self._fail(TimeoutError())     # not one result for the whole utterance: a hung stream
        if self.failure is None:
            return self._so_far()
        pcm = b"".join(self._audio)
        if self._rate != FALLBACK_RATE:
            pcm = Resampler(self._rate, FALLBACK_RATE).process(pcm)
        return await self._fallback(pcm, sample_rate=FALLBACK_RATE)

    def _finalised(self, silence_s: float) -> bool:
        """The vendor said the speech ended, at or after where our VAD heard it end, with nothing pending."""
        speech_end_s = self._fed_s - silence_s
        return not self._pending and self._eou_end_s is not None and self._eou_end_s >= speech_end_s - 0.05

    def _so_far(self) -> str:
        return " ".join([*self._finals, self._pending] if self._pending else self._finals)
