"""pocketsphinx decoding inside a worker process of :class:`pipeline.providers.local.PocketsphinxSTT`'s pool.

Kept apart from the provider so a worker imports only this, numpy and pocketsphinx (not aiohttp
and the provider registry: ~20 MB less per process). Nothing here runs in the gateway process.

Usage (what the provider does)::

    pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"),
                               initializer=init_worker, initargs=(grammar_path,))
    decoded = await asyncio.wrap_future(pool.submit(decode, pcm8k, 8000))
    decoded.text      # "check the status of my order"
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from typing import Any

from pipeline.audio import Resampler

__all__ = ["SILENCE_RMS", "STT_RATE", "Decoded", "decode", "init_worker"]

STT_RATE = 16000  # the bundled en-us acoustic model; 8 kHz input fails (upper frequency 6800 Hz)
SILENCE_RMS = 0.001  # ~-60 dBFS: below this an utterance is silence (pocketsphinx may "hear" words in zeros)


@dataclass(frozen=True, slots=True)
class Decoded:
    """One transcription as a pool worker returns it (``*_s``: ``time.monotonic()``, system-wide on Linux)."""

    text: str
    pid: int
    started_s: float
    finished_s: float
    decoders_loaded: int    # by this worker process so far (1 unless a decode failed and it reloaded)


class _WorkerState:
    """A pool process's decoder; created by :func:`init_worker` and used only inside that process."""

    def __init__(self, ps: Any, grammar_path: str | None) -> None:
        self.ps = ps
        self.grammar_path = grammar_path
        self.decoder: Any = None
        self.loads = 0

    def decoder_or_raise(self) -> Any:
        if self.decoder is None:
            kwargs: dict[str, Any] = {"samprate": STT_RATE, "loglevel": "FATAL"}
            if self.grammar_path is not None:
                kwargs["jsgf"] = self.grammar_path
            try:
                self.decoder = self.ps.Decoder(**kwargs)
            except Exception as exc:  # noqa: BLE001 - reported by the decode; the worker stays alive
                raise RuntimeError(f"cannot load the decoder (grammar={self.grammar_path}): {exc}") from None
            self.loads += 1
        return self.decoder


# Set by the pool's initializer, and so only ever inside a worker process: the gateway process
# holds no decoder (the pool itself belongs to its PocketsphinxSTT instance).
_worker: _WorkerState | None = None


def init_worker(grammar_path: str | None) -> None:
    """ProcessPoolExecutor initializer: load the decoder once per worker process.

    A load failure is not raised here (a raising initializer breaks the pool, which would be
    replaced and fail the same way forever): each decode tries again and reports it.
    """
    global _worker
    import pocketsphinx

    _worker = _WorkerState(pocketsphinx, grammar_path)
    try:
        _worker.decoder_or_raise()
    except RuntimeError:
        pass


def decode(pcm: bytes, sample_rate: int) -> Decoded:
    """Resample ``pcm`` (PCM16 mono) to 16 kHz and decode it, in a pool worker process."""
    started = time.monotonic()
    if _worker is None:
        raise RuntimeError("decode runs only in a pool process started with init_worker")
    decoder = _worker.decoder_or_raise()
    if sample_rate != STT_RATE:
        pcm = Resampler(sample_rate, STT_RATE).process(pcm)
    try:
        decoder.start_utt()
        decoder.process_raw(pcm, no_search=False, full_utt=True)
        decoder.end_utt()
        hyp = decoder.hyp()
    except Exception:
        _worker.decoder = None  # state unknown: build a fresh one next time
        raise
    text = hyp.hypstr if hyp is not None else ""
    text = " ".join(re.sub(r"\(\d+\)", "", text).lower().split())
    return Decoded(text, os.getpid(), started, time.monotonic(), _worker.loads)
