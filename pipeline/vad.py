"""Voice-activity detection with start/stop hysteresis: the energy detector, and the shape every detector has.

A detector turns each chunk of caller audio into a *level* (here the RMS; the Silero detector in
:mod:`pipeline.silero_vad` uses its speech probability). Speech starts after ``start_ms`` of audio whose
level reaches ``threshold``, and stops after ``stop_ms`` of audio whose level is below the (lower) stop
threshold. :class:`~pipeline.turns.TurnTaker` uses any :class:`Vad`.

Usage::

    vad = EnergyVAD(threshold=0.02, start_ms=60, stop_ms=400)
    event = vad.process(pcm, 8000)     # None, SPEECH_START or SPEECH_STOP
    vad.speaking, vad.silence_ms       # in speech now; silence so far within it (ms)
"""

from __future__ import annotations

import enum
from typing import Protocol

from pipeline.audio import rms

__all__ = ["EnergyVAD", "Hysteresis", "Vad", "VadEvent"]


class VadEvent(enum.Enum):
    SPEECH_START = "speech_start"
    SPEECH_STOP = "speech_stop"


class Vad(Protocol):
    """What turn-taking needs of a detector; one per call, fed the caller's frames in order."""

    @property
    def speaking(self) -> bool: ...

    @property
    def silence_ms(self) -> float: ...

    def process(self, pcm: bytes, sample_rate: int) -> VadEvent | None: ...


class Hysteresis:
    """Start/stop hysteresis over levels; the base of each detector. Usage::

        h = Hysteresis(threshold=0.5, stop_threshold=0.35, start_ms=60, stop_ms=400)
        h.step(0.9, 32.0)     # a 32 ms piece of audio at level 0.9 -> None (32 ms of speech so far)
        h.step(0.9, 32.0)     # -> VadEvent.SPEECH_START
    """

    def __init__(self, *, threshold: float, stop_threshold: float, start_ms: float, stop_ms: float) -> None:
        self.threshold = threshold
        self.stop_threshold = stop_threshold
        self.start_ms = start_ms
        self.stop_ms = stop_ms
        self.speaking = False
        self._run_ms = 0.0  # speech run while silent / silence run while speaking

    def step(self, level: float, ms: float) -> VadEvent | None:
        """``ms`` of audio at ``level``: the event it causes, if any."""
        if not self.speaking:
            if level >= self.threshold:
                self._run_ms += ms
                if self._run_ms >= self.start_ms:
                    self.speaking, self._run_ms = True, 0.0
                    return VadEvent.SPEECH_START
            else:
                self._run_ms = 0.0
            return None
        if level < self.stop_threshold:
            self._run_ms += ms
            if self._run_ms >= self.stop_ms:
                self.speaking, self._run_ms = False, 0.0
                return VadEvent.SPEECH_STOP
        else:
            self._run_ms = 0.0
        return None

    @property
    def silence_ms(self) -> float:
        """Silence so far in the current speech segment (0 while not speaking)."""
        return self._run_ms if self.speaking else 0.0


class EnergyVAD(Hysteresis):
    """RMS of each chunk (full scale = 1.0) against ``threshold``; speech goes on down to
    ``threshold * stop_ratio``. Stateful per call; feed it chunks of any length in order."""

    def __init__(self, *, threshold: float, start_ms: float, stop_ms: float, stop_ratio: float = 0.6) -> None:
        super().__init__(threshold=threshold, stop_threshold=threshold * stop_ratio, start_ms=start_ms,
                         stop_ms=stop_ms)

    def process(self, pcm: bytes, sample_rate: int) -> VadEvent | None:
        if not pcm:
            return None
        return self.step(rms(pcm), len(pcm) * 500.0 / sample_rate)
