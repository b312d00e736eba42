"""What the simulated caller says: sentences spoken by the offline voice, or a WAV file, as 8 kHz PCM16 mono.

The default sentences are ones pocketsphinx (the offline recogniser of the no-key ``local`` provider
set) transcribes word for word from Piper's joe voice over a µ-law phone line, so the echoing offline
agent has something real to answer.

Usage::

    utterances = await spoken(["Can you tell me the weather today?"])     # [Utterance(label, pcm8k)]
    utterance = from_wav(Path("hello.wav"))     # any PCM WAV: mono/stereo, 8-32 bit, any rate
    trim_silence(pcm)                           # the speech without its leading and trailing silence

Failures raise :class:`CallerAudioError` with one line that names the cause and the fix.
"""

from __future__ import annotations

import wave
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.audio import Resampler

__all__ = ["DEFAULT_SENTENCES", "RATE", "CallerAudioError", "Utterance", "from_wav", "spoken", "trim_silence"]

RATE = 8000                     # what SimulatedCall.speak takes
DEFAULT_SENTENCES = ("Can you tell me the weather today?", "I would like to pay my bill.", "Thank you very much.",
                     "I want to speak to a person.", "Good morning, I have a question.")


class CallerAudioError(Exception):
    """The caller's audio could not be made: ``str(exc)`` is one line with the cause and the fix."""


@dataclass(frozen=True, slots=True)
class Utterance:
    """One turn's caller audio: ``label`` says what it is (the sentence, or the file), ``pcm`` is PCM16
    mono at 8 kHz."""

    label: str
    pcm: bytes

    @property
    def seconds(self) -> float:
        return len(self.pcm) / 2 / RATE


def trim_silence(pcm: bytes, *, threshold: float = 0.01, keep_ms: int = 20, rate: int = RATE) -> bytes:
    """``pcm`` without the quiet before its first and after its last sample above ``threshold`` (full scale 1.0),
    keeping ``keep_ms`` either side, so "the end of the caller's speech" is when the speech ends.
    All-quiet audio is returned unchanged (it is what a silent caller sends).

    >>> trim_silence(b"\\x00\\x00" * 800 + b"\\xff\\x7f" * 80 + b"\\x00\\x00" * 800) == (
    ...     b"\\x00\\x00" * 160 + b"\\xff\\x7f" * 80 + b"\\x00\\x00" * 160)
    True
    """
    samples = np.frombuffer(pcm, dtype="<i2")
    loud = np.flatnonzero(np.abs(samples.astype(np.int32)) > threshold * 32768)
    if loud.size == 0:
        return pcm
    keep = rate * keep_ms // 1000
    start, end = max(0, int(loud[0]) - keep), min(samples.size, int(loud[-1]) + 1 + keep)
    return samples[start:end].tobytes()


def _resample(pcm: bytes, rate: int) -> bytes:
    return pcm if rate == RATE else Resampler(rate, RATE).process(pcm)


async def spoken(sentences: Sequence[str]) -> list[Utterance]:
    """Each sentence spoken by the offline Piper voice (joe), at 8 kHz.

    Raises CallerAudioError when piper-tts or the voice is not installed."""
    from pipeline.providers.base import ProviderError
    from pipeline.providers.local import PiperTTS

    out = []
    try:
        tts = PiperTTS()
        for sentence in sentences:
            pcm = b"".join([chunk async for chunk in tts.synthesize(sentence)])
            out.append(Utterance(f'"{sentence}"', trim_silence(_resample(pcm, tts.sample_rate))))
    except ProviderError as exc:
        raise CallerAudioError(f"cannot speak the caller's sentences with the offline voice ({exc}); "
                               "or give a recording with --audio FILE.wav") from None
    return out


def from_wav(path: Path) -> Utterance:
    """A WAV file (integer PCM, 8/16/24/32 bit, any channels, any rate) as 8 kHz PCM16 mono (channels averaged).

    Raises CallerAudioError naming the file and what to do."""
    try:
        with wave.open(str(path), "rb") as w:
            channels, width, rate = w.getnchannels(), w.getsampwidth(), w.getframerate()
            raw = w.readframes(w.getnframes())
    except FileNotFoundError:
        raise CallerAudioError(f"--audio {path}: no such file; give the path of a WAV recording") from None
    except IsADirectoryError:
        raise CallerAudioError(f"--audio {path} is a directory; give the path of a WAV recording") from None
    except (wave.Error, EOFError) as exc:
        raise CallerAudioError(f"--audio {path} is not a PCM WAV file ({exc or 'it ends early'}); convert it, e.g. "
                               f"`sox input -b 16 -c 1 -r 8000 output.wav`") from None
    except OSError as exc:
        raise CallerAudioError(f"cannot read --audio {path}: {exc.strerror or exc}") from None
    if width not in (1, 2, 3, 4) or channels < 1 or rate <= 0:
        raise CallerAudioError(f"--audio {path} has {width}-byte samples at {rate} Hz; give 8, 16, 24 or 32-bit PCM")
    frames = len(raw) // (width * channels)
    if frames == 0:
        raise CallerAudioError(f"--audio {path} holds no audio; give a recording of the caller's words")
    data = np.frombuffer(raw[:frames * width * channels], dtype=np.uint8).reshape(frames * channels, width)
    if width == 1:                                           # 8-bit WAV is unsigned
        values = (data[:, 0].astype(np.int32) - 128) << 24
    else:                                                    # little-endian signed: widen to 32 bits
        padded = np.zeros((data.shape[0], 4), dtype=np.uint8)
        padded[:, 4 - width:] = data
        values = padded.view("<i4").reshape(-1)
    mono = values.reshape(frames, channels).astype(np.float64).mean(axis=1)
    pcm = (mono / 65536.0).round().clip(-32768, 32767).astype("<i2").tobytes()
    return Utterance(str(path), trim_silence(_resample(pcm, rate)))
