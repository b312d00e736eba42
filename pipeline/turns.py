"""Turn-taking: when the caller has started and finished a turn, and what they said or keyed in.

The VAD marks speech starts and stops; a little audio from before each start (``preroll_ms``) joins the
utterance so its first syllable is kept. At each speech stop the utterance is transcribed at once: words
that end a thought are a turn now, words that do not (:func:`~pipeline.end_of_turn.judge`: the sentence
so far, and the pitch of its last words) wait until ``turn_stop_secs`` after the speech ended, and speech
resuming meanwhile continues the same turn.
Speech longer than ``max_utterance_secs`` is cut into a turn as it goes. DTMF digits are collected until
``#`` or a pause of ``dtmf_timeout_ms`` and become a turn ``[DTMF] 123``.

With a streaming STT (``listen`` gives a :class:`~pipeline.live_stt.LiveTranscription`), each utterance is
streamed from its pre-roll on while the caller speaks; at the speech stop its text is the vendor's finals
(waiting at most ``stt_stream_final_wait_ms`` unless the vendor already heard the speech end), so the
turn needs no request after the caller stops. ``on_interim`` gets the running text as the vendor refines
it (for confirming a barge-in).

Usage::

    turns = TurnTaker(settings=settings, transcribe=calls.transcribe, spawn=tg.create_task,
                      on_speech_start=barge_in, on_turn=answer, on_failure=apologise,
                      listen=calls.live_transcription, on_interim=lambda text: ...)   # both optional
    turns.on_audio(AudioFrame(pcm, 8000))     # per frame, from the transport's reader
    turns.on_dtmf("5")
    turns.close()
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Protocol

from pipeline.audio import Resampler
from pipeline.end_of_turn import judge
from pipeline.frames import AudioFrame
from pipeline.live_stt import LiveTranscription
from pipeline.provider_chain import ProvidersFailed
from pipeline.settings import ConversationSettings
from pipeline.silero_vad import SileroModel, SileroVAD, silero_threshold
from pipeline.vad import EnergyVAD, Vad, VadEvent

__all__ = ["PIPELINE_RATE", "STT_RATES", "DigitCollector", "Turn", "TurnTaker", "new_vad"]

logger = logging.getLogger(__name__)

PIPELINE_RATE = 16000      # the rate an utterance at any other rate is resampled to before it is transcribed
# Rates every speech-to-text provider takes as they are (a WAV upload names its rate; Deepgram is told it; the
# local recogniser resamples in its worker): an utterance at one of them goes up unresampled. Upsampling a phone
# call's 8 kHz to 16 kHz adds no information, doubles the upload and cost a few hundred µs of CPU per turn.
STT_RATES = frozenset((8000, PIPELINE_RATE))


@dataclass(frozen=True, slots=True)
class Turn:
    """What the caller said (or keyed in) in one turn, and when.

    ``speech_end`` is the clock time their speech ended (None for DTMF), ``turn_wait_ms`` how long after
    it the VAD heard the stop, ``stt_ms`` how long the transcription took; ``spoken_s`` and
    ``ended_s_ago`` are as in :class:`~pipeline.events.TranscriptEvent`."""

    text: str
    spoken_s: float = 0.0
    ended_s_ago: float = 0.0
    speech_end: float | None = None
    turn_wait_ms: float = 0.0
    stt_ms: float = 0.0


def new_vad(settings: ConversationSettings) -> Vad:
    """The call's detector of ``settings.vad_type``, over the shared ``settings.silero_model`` for Silero.
    Usage::

        new_vad(ConversationSettings())                                   # EnergyVAD at RMS 0.02
        new_vad(replace(settings, vad_type="silero", silero_model=model))  # SileroVAD at probability 0.5
    """
    if settings.vad_type == "silero":
        return SileroVAD(settings.silero_model or SileroModel(), threshold=silero_threshold(settings.vad_threshold),
                         start_ms=settings.vad_start_ms, stop_ms=settings.vad_stop_ms)
    return EnergyVAD(threshold=settings.vad_threshold, start_ms=settings.vad_start_ms, stop_ms=settings.vad_stop_ms)


class Transcribe(Protocol):
    def __call__(self, pcm: bytes, *, sample_rate: int) -> Awaitable[str]: ...


class Listen(Protocol):
    def __call__(self, *, sample_rate: int, on_interim: Callable[[str], None]) -> LiveTranscription | None: ...


def _ignore(_text: str) -> None:
    pass


class TurnTaker:
    """Caller audio and digits in, :class:`Turn` values out; all methods run on the call's event loop.

    ``on_speech_start`` is called when the VAD hears speech begin (before anything else happens: a
    barge-in goes there), ``on_turn`` with each complete turn, ``on_failure(code, message)`` when no STT
    could transcribe. ``on_speech_stop`` (optional) is asked at each speech stop whether the sound was
    speech (False drops the utterance: no turn), ``on_no_words`` is told when a transcript came back empty.
    ``language`` picks the end-of-turn rules. Tasks are started with ``spawn`` so the call's TaskGroup
    owns them."""

    def __init__(self, *, settings: ConversationSettings, transcribe: Transcribe,
                 spawn: Callable[[Coroutine[Any, Any, None]], asyncio.Task[None]],
                 on_speech_start: Callable[[], None], on_turn: Callable[[Turn], None],
                 on_failure: Callable[[str, str], None], clock: Callable[[], float] = time.monotonic,
                 listen: Listen | None = None, on_interim: Callable[[str], None] = _ignore,
                 on_speech_stop: Callable[[], bool] | None = None, on_no_words: Callable[[], None] | None = None,
                 language: str = "en") -> None:
        self.settings = settings
        self._transcribe = transcribe
        self._spawn = spawn
        self._on_speech_start = on_speech_start
        self._on_turn = on_turn
        self._on_failure = on_failure
        self._on_speech_stop = on_speech_stop
        self._on_no_words = on_no_words
        self._language = language
        self._clock = clock
        self._listen = listen
        self._on_interim = on_interim
        self._live: LiveTranscription | None = None   # the current utterance's stream, with a streaming STT
        self._vad = new_vad(settings)
        self._preroll: collections.deque[tuple[AudioFrame, float]] = collections.deque()   # (frame, its ms)
        self._preroll_ms = 0.0
        self._utterance_rate = PIPELINE_RATE
        self._utterance: list[bytes] | None = None   # PCM of the caller's current turn (transport rate)
        self._utterance_ms = 0.0
        self._last_speech_at = 0.0
        self._speech_at_ms = 0.0       # where in the utterance's audio speech was last heard
        self._turn_task: asyncio.Task[None] | None = None
        self._digits = DigitCollector(timeout_ms=settings.dtmf_timeout_ms, spawn=spawn,
                                      on_digits=lambda digits: on_turn(Turn(f"[DTMF] {digits}")))

    @property
    def preroll(self) -> tuple[AudioFrame, ...]:
        """The audio kept from just before now (the VAD's speech start lags the sound)."""
        return tuple(frame for frame, _ in self._preroll)

    @property
    def busy(self) -> bool:
        """The caller is mid-turn: speaking, or their turn is being transcribed or waited on."""
        return self._utterance is not None or self._turn_task is not None

    def on_audio(self, frame: AudioFrame) -> None:
        event = self._vad.process(frame.pcm, frame.sample_rate)
        if event is VadEvent.SPEECH_START:
            self._speech_started(frame.sample_rate)
        if self._utterance is not None:
            self._append(frame)
            if self._vad.speaking and self._vad.silence_ms == 0.0:
                self._last_speech_at, self._speech_at_ms = self._clock(), self._utterance_ms
            if self._vad.speaking and self._utterance_ms >= self.settings.max_utterance_secs * 1000.0:
                self._cut_utterance()
                return
        else:
            preroll = self._preroll
            ms = len(frame.pcm) * 500.0 / frame.sample_rate     # its duration_ms, inlined (per frame)
            preroll.append((frame, ms))
            self._preroll_ms += ms
            limit = self.settings.preroll_ms
            while preroll and self._preroll_ms - preroll[0][1] >= limit:
                self._preroll_ms -= preroll.popleft()[1]
        if event is VadEvent.SPEECH_STOP and self._utterance is not None:
            if self._on_speech_stop is not None and not self._on_speech_stop():
                self._drop_utterance()
                return
            if self._turn_task is not None:
                self._turn_task.cancel()
            self._turn_task = self._spawn(self._end_of_speech(self._utterance, self._live, self._clock()))

    def on_dtmf(self, digit: str) -> None:
        self._digits.press(digit)

    def close(self) -> None:
        if self._turn_task is not None:
            self._turn_task.cancel()
        self._digits.close()
        if self._live is not None:
            self._live.close()

    # ------------------------------------------------------------------------------ speech
    def _speech_started(self, rate: int) -> None:
        self._on_speech_start()
        if self._turn_task is not None:          # the caller went on speaking: same turn
            self._turn_task.cancel()
            self._turn_task = None
        if self._utterance is None:
            self._utterance, self._utterance_ms = [], 0.0
            self._utterance_rate = rate
            self._live = self._open_live(rate)
            for f, _ in self._preroll:
                self._append(f)
            self._preroll.clear()
            self._preroll_ms = 0.0
        self._last_speech_at, self._speech_at_ms = self._clock(), self._utterance_ms

    def _drop_utterance(self) -> None:
        """The sound was not speech: no turn (a turn it continued is still judged on its own words)."""
        self._utterance, self._utterance_ms = None, 0.0
        self._end_live(self._live)             # and its stream, if a streaming STT was hearing it

    def _append(self, frame: AudioFrame) -> None:
        assert self._utterance is not None
        pcm = frame.pcm       # at the transport's rate; resampled once, when the turn is transcribed
        self._utterance.append(pcm)
        self._utterance_ms += frame.duration_ms
        if self._live is not None:
            self._live.feed(pcm)

    def _open_live(self, rate: int) -> LiveTranscription | None:
        """A new utterance's stream (its task owned by ``spawn``), or None without a streaming STT."""
        live = self._listen(sample_rate=rate, on_interim=self._on_interim) if self._listen else None
        if live is not None:
            self._spawn(live.run())
        return live

    def _cut_utterance(self) -> None:
        """Speech ran past ``max_utterance_secs``: that part becomes a turn, the rest a new utterance."""
        logger.info("utterance reached max_utterance_secs=%.0f; taking the turn", self.settings.max_utterance_secs)
        assert self._utterance is not None
        self._spawn(self._end_of_speech(self._utterance, self._live, self._clock(), complete=True))
        self._utterance, self._utterance_ms = [], 0.0
        self._live = self._open_live(self._utterance_rate)

    async def _end_of_speech(self, utterance: list[bytes], live: LiveTranscription | None, stopped_at: float, *,
                             complete: bool = False) -> None:
        """Transcribe at once (or take the stream's finals); answer now if the words sound complete, else
        wait up to turn_stop_secs."""
        speech_end = self._last_speech_at
        t0 = self._clock()
        try:
            if live is not None:
                silence_ms = 0.0 if complete else self._utterance_ms - self._speech_at_ms
                text = await live.text(silence_s=silence_ms / 1000.0)
            else:
                pcm, rate = b"".join(utterance), self._utterance_rate
                if rate not in STT_RATES:
                    pcm, rate = Resampler(rate, PIPELINE_RATE).process(pcm), PIPELINE_RATE
                text = await self._transcribe(pcm, sample_rate=rate)
        except ProvidersFailed as exc:
            self._end_live(live)
            self._on_failure("stt_failed", str(exc))
            return
        stt_ms = (self._clock() - t0) * 1000.0
        verdict = judge(text, b"".join(utterance), self._utterance_rate, language=self._language)   # its own rate
        if not complete and not verdict.complete:
            logger.debug("turn not over (%s): waiting up to turn_stop_secs", verdict.reason)
            remaining = speech_end + self.settings.turn_stop_secs - self._clock()
            if remaining > 0:
                await asyncio.sleep(remaining)     # cancelled if the caller speaks again
        if self._utterance is utterance:
            self._utterance = None
            self._turn_task = None
        self._end_live(live)                   # this utterance is over (taken, or cut): its stream too
        if not text.strip():
            if self._on_no_words is not None:
                self._on_no_words()
            return
        spoken_s = sum(len(chunk) for chunk in utterance) / 2 / self._utterance_rate
        self._on_turn(Turn(text, spoken_s=spoken_s,
                           ended_s_ago=max(0.0, t0 - speech_end + stt_ms / 1000.0), speech_end=speech_end,
                           turn_wait_ms=(stopped_at - speech_end) * 1000.0, stt_ms=stt_ms))

    def _end_live(self, live: LiveTranscription | None) -> None:
        if live is not None:
            live.close()
            if self._live is live:
                self._live = None


class DigitCollector:
    """Keypresses collected until ``#`` or a pause of ``timeout_ms``, then handed on as one string.

    Usage::

        digits = DigitCollector(timeout_ms=1500, spawn=tg.create_task, on_digits=lambda d: print(d))
        digits.press("1"); digits.press("2"); digits.press("#")      # prints "12"
    """

    def __init__(self, *, timeout_ms: float, spawn: Callable[[Coroutine[Any, Any, None]], asyncio.Task[None]],
                 on_digits: Callable[[str], None]) -> None:
        self._timeout_s = timeout_ms / 1000.0
        self._spawn = spawn
        self._on_digits = on_digits
        self._digits = ""
        self._task: asyncio.Task[None] | None = None

    def press(self, digit: str) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
        if digit == "#":
            self._submit()
            return
        self._digits += digit
        self._task = self._spawn(self._wait())

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def _wait(self) -> None:
        await asyncio.sleep(self._timeout_s)
        self._task = None
        self._submit()

    def _submit(self) -> None:
        digits, self._digits = self._digits, ""
        if digits:
            self._on_digits(digits)
