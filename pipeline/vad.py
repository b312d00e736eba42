"""Energy voice-activity detection with start/stop hysteresis.

RMS of each chunk (full scale = 1.0) against ``threshold``: speech starts after ``start_ms`` of
chunks above the threshold, and stops after ``stop_ms`` of chunks below ``threshold * stop_ratio``.

Usage::

    vad = EnergyVAD(threshold=0.02, start_ms=60, stop_ms=400)
    event = vad.process(pcm, 8000)     # None, SPEECH_START or SPEECH_STOP
"""

from __future__ import annotations

import enum

from pipeline.audio import rms

__all__ = ["EnergyVAD", "VadEvent"]


class VadEvent(enum.Enum):
    SPEECH_START = "speech_start"
    SPEECH_STOP = "speech_stop"


class EnergyVAD:
    """Stateful per-call detector; feed it chunks of any length in order."""

    def __init__(self, *, threshold: float, start_ms: float, stop_ms: float, stop_ratio: float = 0.6) -> None:
        self.threshold = threshold
        self.stop_threshold = threshold * stop_ratio
        self.start_ms = start_ms
        self.stop_ms = stop_ms
        self.speaking = False
        self._run_ms = 0.0  # speech run while silent / silence run while speaking

    def process(self, pcm: bytes, sample_rate: int) -> VadEvent | None:
        if not pcm:
            return None
        level = rms(pcm)
        ms = len(pcm) * 500.0 / sample_rate
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
