"""Barge-in that needs evidence: a cough pauses the agent for a moment, "uh-huh" lets it carry on,
a real interruption stops it.

The VAD's speech start while the agent is speaking is only a *suspicion*. :class:`InterruptionGuard`
then

1. without the Silero model, **pauses** the playout at once (nothing more is sent; the transport plays
   out its short lead); with it there is no pause (its verdict comes before a pause would be heard),
2. looks for **speech evidence**: the Silero model run on the frames of the suspicion only (from the
   pre-roll on, so the cost per call stays near the energy VAD's), ``interruption_speech_ms`` of them
   at Silero's speech probability; without the model, that much audio above the VAD's energy threshold;
   or an interim transcript from a streaming STT (:meth:`InterruptionGuard.confirm_with_transcript`),
3. on speech evidence, **holds**: the transport is flushed, the audio it had not played yet goes back to
   the playout's queue; the answer goes on being written,
4. **commits** the interruption (the answer is cancelled, its audio dropped and the context cut to what
   the caller heard, a ``BargeIn``) once the caller's words are neither a backchannel
   (:func:`is_backchannel`, ``backchannels`` per language) nor shorter than ``min_words``; with no
   backchannels and ``min_words`` 0, speech evidence commits at once,
5. **resumes** from where the caller stopped hearing when there was no speech evidence within
   ``false_interruption_secs`` (or the sound ended first), or the words were a backchannel: those go to
   the transcript and the agent keeps talking.

``interruption_strategy`` ``"immediate"`` is the old behaviour: any speech start interrupts at once.

Usage::

    guard = InterruptionGuard(settings=settings, language="en", control=playout, speaking=lambda: busy,
                              interrupt=responder.interrupt, spawn=tg.create_task)
    guard.on_speech_start(preroll)          # the VAD heard speech begin (preroll: the frames before it)
    guard.on_audio(frame)                   # every caller frame after it
    guard.confirm_with_transcript("wait")   # a streaming STT's interim words
    keep = guard.on_speech_stop()           # False: it was noise; drop the utterance
    backchannel = guard.on_turn("uh huh")   # True: not a turn; the agent went on
"""

from __future__ import annotations

import asyncio
import enum
import logging
import re
import time
from collections.abc import Callable, Coroutine, Iterable, Mapping
from typing import Any, Protocol

from pipeline.audio import rms
from pipeline.frames import AudioFrame
from pipeline.settings import ConversationSettings
from pipeline.silero_vad import SileroModel, SileroVAD, silero_threshold

__all__ = ["InterruptionGuard", "backchannel_phrases", "is_backchannel"]

logger = logging.getLogger(__name__)

_WORD = re.compile(r"[^\W_]+(?:'[^\W_]+)*")


class PlayoutControl(Protocol):
    """What the guard needs of the playout (:class:`~pipeline.playout.Playout` has it)."""

    def pause(self) -> None: ...

    def hold(self) -> None: ...

    def resume(self) -> None: ...


class State(enum.Enum):
    IDLE = "idle"            # no suspicion
    SUSPECTED = "suspected"  # paused; looking for speech evidence
    WATCHING = "watching"    # not confirmed in time: the agent resumed; the sound still goes on
    HELD = "held"            # speech confirmed: paused and flushed; waiting for the words


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower().replace("-", " "))


def backchannel_phrases(backchannels: Mapping[str, str], language: str) -> tuple[tuple[str, ...], ...]:
    """The phrases (as word tuples) of ``language`` (``"en-GB"`` falls back to ``"en"``). Usage::

        backchannel_phrases({"en": "uh huh, mm-hmm, yeah"}, "en-US")   # (("uh", "huh"), ("mm", "hmm"), ("yeah",))
    """
    text = backchannels.get(language) or backchannels.get(language.split("-")[0].lower(), "")
    return tuple(words for words in (tuple(_words(p)) for p in text.split(",")) if words)


def is_backchannel(text: str, phrases: Iterable[tuple[str, ...]], *, partial: bool = False) -> bool:
    """True when ``text`` is only backchannel phrases ("Uh-huh.", "yeah, yeah", "okay right"); with
    ``partial`` (interim words), also when its last words may be the start of one ("uh" of "uh huh"). Usage::

        is_backchannel("Mm-hmm.", [("mm", "hmm")])        # True
        is_backchannel("yeah but wait", [("yeah",)])      # False
        is_backchannel("uh", [("uh", "huh")], partial=True)   # True
    """
    words = _words(text)
    options = sorted(set(phrases), key=len, reverse=True)
    if not words or not options:
        return False
    reachable = [True] + [False] * len(words)      # reachable[i]: words[:i] is a run of phrases
    for i in range(len(words)):
        if reachable[i]:
            for phrase in options:
                if tuple(words[i:i + len(phrase)]) == phrase:
                    reachable[i + len(phrase)] = True
                elif partial and i + len(phrase) > len(words) and phrase[:len(words) - i] == tuple(words[i:]):
                    return True
    return reachable[-1]


class InterruptionGuard:
    """One call's barge-in decision; all methods run on the call's event loop.

    ``speaking()`` tells whether the agent is talking, its audio queued or playing (only then is a speech
    start a suspected interruption: a caller who speaks while an answer is still being prepared takes a
    turn as before), ``interrupt()`` commits one (cancel, flush, keep what was heard), ``model`` is the
    Silero session used as speech evidence (None: sustained energy is the evidence), ``vad_is_speech_model``
    that the VAD itself is Silero (its speech start is the evidence)."""

    def __init__(self, *, settings: ConversationSettings, language: str, control: PlayoutControl,
                 speaking: Callable[[], bool], interrupt: Callable[[], None],
                 spawn: Callable[[Coroutine[Any, Any, None]], asyncio.Task[None]],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self._control = control
        self._speaking = speaking
        self._interrupt = interrupt
        self._spawn = spawn
        self._clock = clock
        self._phrases = backchannel_phrases(settings.backchannels, language)
        self._model: SileroModel | None = settings.silero_model
        self._vad_is_speech_model = settings.vad_type == "silero"
        self.state = State.IDLE
        self._since = 0.0
        self._evidence_ms = 0.0
        self._probe: SileroVAD | None = None
        self._timer: asyncio.Task[None] | None = None

    @property
    def suspected(self) -> bool:
        """A suspicion is open (the agent is paused or held)."""
        return self.state in (State.SUSPECTED, State.HELD)

    # ------------------------------------------------------------------------------ inputs
    def on_speech_start(self, preroll: Iterable[AudioFrame] = ()) -> None:
        """The VAD heard speech begin; ``preroll`` is the audio just before (the VAD lags the sound)."""
        if self.settings.interruption_strategy == "immediate":
            self._interrupt()
            return
        if self.state is not State.IDLE or not self._speaking():
            return
        self.state, self._since, self._evidence_ms = State.SUSPECTED, self._clock(), 0.0
        if self._vad_is_speech_model:
            self._speech_confirmed("the speech model's VAD")
            return
        self._timer = self._spawn(self._expire())
        if self._model is None:
            self._probe = None
            self._control.pause()     # the evidence takes interruption_speech_ms more: stop sending meanwhile
            return
        # The model's verdict comes within a few windows, sooner than a pause would silence the transport's
        # lead: no pause, so a cough leaves no gap. The pre-roll gives the model the sound's onset.
        self._probe = SileroVAD(self._model, threshold=silero_threshold(self.settings.vad_threshold),
                                start_ms=self.settings.interruption_speech_ms, stop_ms=1000.0)
        for frame in preroll:
            self.on_audio(frame)

    def on_audio(self, frame: AudioFrame) -> None:
        """A caller frame: speech evidence while a suspicion is open (the energy gate passed it)."""
        if self.state not in (State.SUSPECTED, State.WATCHING):
            return
        if self._probe is not None:
            self._probe.process(frame.pcm, frame.sample_rate)
            confirmed = self._probe.speaking
        else:
            if rms(frame.pcm) >= self.settings.vad_threshold:
                self._evidence_ms += frame.duration_ms
            confirmed = self._evidence_ms >= self.settings.interruption_speech_ms
        if confirmed:
            self._speech_confirmed("Silero" if self._probe is not None else "sustained energy")

    def confirm_with_transcript(self, text: str) -> None:
        """Interim words from a streaming STT: enough of them that are not a backchannel commit at once."""
        if self.state is not State.IDLE and self._interrupts(text, partial=True):
            self._commit("interim transcript")

    def on_speech_stop(self) -> bool:
        """The VAD heard the sound end. False when no speech was found in it: the agent resumed and the
        utterance should be dropped (it is not a turn)."""
        if self.state in (State.SUSPECTED, State.WATCHING):
            logger.info("suspected interruption was not speech; the agent resumes")
            self._release()
            return False
        return True

    def on_turn(self, text: str) -> bool:
        """The caller's words once their utterance ended. True when it was a backchannel (or shorter than
        ``min_words``) over the agent's speech: the agent carried on and the words are no turn."""
        if self.state is State.IDLE:
            return False
        if self._interrupts(text):
            self._commit("the caller's words")
            return False
        logger.info("backchannel while the agent speaks; it carries on")
        self._release()
        return True

    def on_silence(self) -> None:
        """The utterance held no words (the STT heard nothing): the agent carries on."""
        if self.state is not State.IDLE:
            self._release()

    def close(self) -> None:
        self._cancel_timer()

    # ------------------------------------------------------------------------------ decisions
    def _interrupts(self, text: str, *, partial: bool = False) -> bool:
        words = _words(text)
        return (bool(words) and len(words) >= self.settings.min_words
                and not is_backchannel(text, self._phrases, partial=partial))

    def _speech_confirmed(self, by: str) -> None:
        self._probe = None
        self._cancel_timer()
        if not self._phrases and self.settings.min_words == 0:
            self._commit(by)
            return
        logger.info("interruption confirmed by %s after %.0f ms; holding the agent until the words are known",
                    by, (self._clock() - self._since) * 1000.0)
        self.state = State.HELD
        self._control.hold()

    def _commit(self, by: str) -> None:
        logger.info("caller interruption (%s)", by)
        self._reset()
        self._interrupt()

    def _release(self) -> None:
        self._reset()
        self._control.resume()

    def _reset(self) -> None:
        self._cancel_timer()
        self._probe = None
        self.state = State.IDLE

    async def _expire(self) -> None:
        await asyncio.sleep(self.settings.false_interruption_secs)
        self._timer = None
        if self.state is State.SUSPECTED:
            logger.info("no speech within false_interruption_secs=%.2f; the agent resumes",
                        self.settings.false_interruption_secs)
            self.state = State.WATCHING
            self._control.resume()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
