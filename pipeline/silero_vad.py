"""Silero VAD through onnxruntime, without torch: the speech probability of each 32 ms window.

The model is the ``silero_vad.onnx`` file shipped in the ``silero-vad`` wheel, found with
:func:`importlib.util.find_spec` so the package's own (torch-importing) ``__init__`` never runs. It runs
natively at 8 kHz (256-sample windows) and 16 kHz (512); other rates are resampled to 16 kHz.

* :class:`SileroModel`: the one ``onnxruntime.InferenceSession`` of the process, loaded on first use (or by
  :meth:`SileroModel.load` at startup) with one thread; ``run`` is thread-safe, so every call shares it.
* :class:`SileroVAD`: one per call. It keeps the model's recurrent state and the 32/64-sample context of
  the previous window, buffers 20 ms frames into whole windows, and applies :class:`~pipeline.vad.Hysteresis`
  to the probabilities: speech starts at ``threshold`` and goes on down to ``threshold - 0.15`` (Silero's own
  ``neg_threshold``), after ``start_ms`` / ``stop_ms`` of windows.

``vad_threshold`` is the energy detector's RMS by default (0.02), which is no probability: :func:`silero_threshold`
maps that default to Silero's recommended 0.5 and takes any other value as the probability itself.

Usage::

    model = SileroModel()                      # one per process (the gateway's lifespan makes it)
    model.check()                              # SileroUnavailable naming the extra when not installed
    vad = SileroVAD(model, threshold=silero_threshold(0.02), start_ms=60, stop_ms=400)
    event = vad.process(pcm, 8000)             # None, SPEECH_START or SPEECH_STOP; any chunk size
    vad.probability                            # the last window's speech probability
"""

from __future__ import annotations

import threading
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.audio import Resampler
from pipeline.vad import Hysteresis, VadEvent

__all__ = ["ENERGY_DEFAULT_THRESHOLD", "INSTALL_HINT", "SILERO_DEFAULT_THRESHOLD", "SileroModel", "SileroUnavailable",
           "SileroVAD", "silero_threshold"]

ENERGY_DEFAULT_THRESHOLD = 0.02     # vad_threshold's default: an RMS, meaningless as a probability
SILERO_DEFAULT_THRESHOLD = 0.5      # Silero's recommended speech probability
STOP_OFFSET = 0.15                  # speech goes on down to threshold - 0.15 (Silero's neg_threshold)
INSTALL_HINT = "pip install 'voxray[silero]' && pip install --no-deps 'silero-vad==6.2.3'"
_WINDOW = {8000: 256, 16000: 512}   # samples per window (32 ms)
_CONTEXT = {8000: 32, 16000: 64}    # samples of the previous window prepended to each
_STATE_SHAPE = (2, 1, 128)


def silero_threshold(vad_threshold: float) -> float:
    """The speech probability that ``vad_threshold`` means for Silero. Usage::

        silero_threshold(0.02)   # -> 0.5: the energy default, so Silero's recommended threshold
        silero_threshold(0.6)    # -> 0.6
    """
    return SILERO_DEFAULT_THRESHOLD if vad_threshold == ENERGY_DEFAULT_THRESHOLD else vad_threshold


class SileroUnavailable(RuntimeError):
    """onnxruntime or the silero-vad wheel (with its model file) is not installed."""


class SileroModel:
    """The process's one Silero ONNX session, shared by every call. Usage::

        model = SileroModel()                     # cheap: nothing is loaded yet
        await asyncio.to_thread(model.load)       # optional warm-up off the event loop (~40-50 ms)
        SileroModel(package="no_such_module").check()   # -> SileroUnavailable naming the extra

    ``package`` and ``runtime`` are the module names of the model's wheel and of onnxruntime.
    """

    def __init__(self, *, package: str = "silero_vad", runtime: str = "onnxruntime",
                 model_file: str = "silero_vad.onnx") -> None:
        self.package = package
        self.runtime = runtime
        self.model_file = model_file
        self._session: Any = None
        self._lock = threading.Lock()
        self._rates = {rate: np.array(rate, dtype=np.int64) for rate in _WINDOW}

    def __deepcopy__(self, memo: dict[int, Any]) -> SileroModel:
        return self     # a shared resource: dataclasses.asdict of the settings holding it keeps it

    def check(self) -> Path:
        """The model file's path; :class:`SileroUnavailable` (naming the extra) when it is not installed."""
        missing = [name for name in (self.runtime, self.package) if find_spec(name) is None]
        if missing:
            raise SileroUnavailable(f"Silero VAD needs {' and '.join(missing)}: install them with {INSTALL_HINT}")
        spec = find_spec(self.package)
        assert spec is not None and spec.submodule_search_locations is not None
        path = Path(next(iter(spec.submodule_search_locations))) / "data" / self.model_file
        if not path.is_file():
            raise SileroUnavailable(f"Silero VAD needs the model file {path}, which the installed "
                                    f"{self.package} lacks: install it with {INSTALL_HINT}")
        return path

    def load(self) -> None:
        """Create the session now (idempotent, thread-safe); otherwise the first window does."""
        with self._lock:
            if self._session is not None:
                return
            path = self.check()
            import onnxruntime as ort

            opts = ort.SessionOptions()
            opts.intra_op_num_threads = 1
            opts.inter_op_num_threads = 1
            opts.log_severity_level = 3
            self._session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])

    def run(self, x: np.ndarray, state: np.ndarray, sample_rate: int) -> tuple[float, np.ndarray]:
        """Speech probability of one window ``x`` (float32 ``[1, context + window]``) and the next state."""
        if self._session is None:
            self.load()
        out, state = self._session.run(None, {"input": x, "state": state, "sr": self._rates[sample_rate]})
        return float(out[0, 0]), state


class SileroVAD(Hysteresis):
    """One call's detector over a shared :class:`SileroModel`; feed it chunks of any length in order."""

    def __init__(self, model: SileroModel, *, threshold: float = SILERO_DEFAULT_THRESHOLD, start_ms: float,
                 stop_ms: float) -> None:
        super().__init__(threshold=threshold, stop_threshold=max(threshold - STOP_OFFSET, 0.01),
                         start_ms=start_ms, stop_ms=stop_ms)
        self.model = model
        self.probability = 0.0
        self._in_rate = 0                        # the rate frames arrive at
        self._rate = 16000                       # the rate the model runs at
        self._resampler: Resampler | None = None
        self._pending = np.zeros(0, np.float32)  # samples not yet in a whole window
        self._context = np.zeros(0, np.float32)
        self._state = np.zeros(_STATE_SHAPE, np.float32)

    def process(self, pcm: bytes, sample_rate: int) -> VadEvent | None:
        """The event of the last window this chunk completed (at most one per chunk of 32 ms or less)."""
        if not pcm:
            return None
        if sample_rate != self._in_rate:
            self._start(sample_rate)
        if self._resampler is not None:
            pcm = self._resampler.process(pcm)
        samples = np.frombuffer(pcm, "<i2").astype(np.float32) * (1.0 / 32768.0)
        pending = np.concatenate((self._pending, samples))
        size = _WINDOW[self._rate]
        window_ms = size * 1000.0 / self._rate
        event = None
        done = 0
        while len(pending) - done >= size:
            x = np.concatenate((self._context, pending[done:done + size]))[np.newaxis, :]
            self.probability, self._state = self.model.run(x, self._state, self._rate)
            self._context = x[0, -_CONTEXT[self._rate]:]
            done += size
            event = self.step(self.probability, window_ms) or event
        self._pending = pending[done:]
        return event

    def _start(self, sample_rate: int) -> None:
        """First frame, or the rate changed: a fresh state at the model rate nearest the input's."""
        self._in_rate = sample_rate
        self._rate = sample_rate if sample_rate in _WINDOW else 16000
        self._resampler = None if sample_rate in _WINDOW else Resampler(sample_rate, 16000)
        self._pending = np.zeros(0, np.float32)
        self._context = np.zeros(_CONTEXT[self._rate], np.float32)
        self._state = np.zeros(_STATE_SHAPE, np.float32)
