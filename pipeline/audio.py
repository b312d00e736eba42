"""Audio helpers: G.711 codecs, a streaming resampler, and small PCM16 utilities.

All audio is mono 16-bit little-endian PCM (``bytes``) unless a name says otherwise.
Numpy only; no event loop; nothing here blocks on I/O.

Usage::

    pcm8k = ulaw_decode(payload)                 # carrier µ-law -> PCM16 @ 8 kHz
    up = Resampler(8000, 16000)                  # one per call direction, reused per frame
    pcm16k = up.process(pcm8k)                   # any chunk size; output tracks input * 2
    down = Resampler(24000, 8000)
    payload = ulaw_encode(down.process(tts_pcm24k))
    down.reset()                                 # barge-in: drop filter history
    wav = pcm_to_wav(pcm16k, 16000)
    pcm, rate = wav_to_pcm(wav)                  # -> (pcm16k, 16000)
    rms(silence(20, 8000))                       # -> 0.0

Run ``python -m pipeline.audio`` for a per-frame timing of each resampler path.
"""

from __future__ import annotations

import math
import struct
import sys
import warnings
from functools import cache
from types import ModuleType

import numpy as np

__all__ = [
    "Resampler",
    "alaw_decode",
    "alaw_encode",
    "dtmf_tones",
    "duration_ms",
    "looks_like_stereo",
    "pcm_to_wav",
    "rms",
    "silence",
    "ulaw_decode",
    "ulaw_encode",
    "wav_to_pcm",
]

# --------------------------------------------------------------------------- G.711
# Tables match CPython's audioop (lin2ulaw / ulaw2lin / lin2alaw / alaw2lin, width 2) bit for bit.


def _load_audioop() -> ModuleType | None:
    """audioop, where it reads our byte order: the codec and ``rms`` in C, one call per 20 ms frame (5-9x
    cheaper than the tables through numpy). It is in the standard library up to 3.12 (deprecated there, so
    its import warning is silenced) and the ``audioop-lts`` package (a dependency on 3.13+) after."""
    if sys.byteorder != "little":      # audioop works in the machine's byte order; our PCM is little-endian
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            import audioop
    except ImportError:
        return None
    return audioop


_audioop = _load_audioop()


def _ulaw_tables() -> tuple[np.ndarray, np.ndarray]:
    u = ~np.arange(256, dtype=np.int32) & 0xFF
    t = (((u & 0x0F) << 3) + 0x84) << ((u & 0x70) >> 4)
    dec = np.where(u & 0x80, 0x84 - t, t - 0x84).astype("<i2")
    lin = np.arange(-32768, 32768, dtype=np.int32)
    x = lin >> 2  # audioop encodes from 14-bit input
    mask = np.where(x < 0, 0x7F, 0xFF)
    x = np.minimum(np.abs(x), 8159) + 0x21
    seg = np.searchsorted(np.array([0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF, 0x1FFF]), x)
    code = np.where(seg >= 8, 0x7F, (seg << 4) | ((x >> (np.minimum(seg, 7) + 1)) & 0xF))
    enc = np.empty(65536, dtype=np.uint8)
    enc[lin.astype(np.int16).view(np.uint16)] = (code ^ mask) & 0xFF
    return dec, enc


def _alaw_tables() -> tuple[np.ndarray, np.ndarray]:
    a = np.arange(256, dtype=np.int32) ^ 0x55
    seg = (a & 0x70) >> 4
    t = ((a & 0x0F) << 4) + np.where(seg == 0, 8, 0x108)
    t = t << np.maximum(seg - 1, 0)
    dec = np.where(a & 0x80, t, -t).astype("<i2")
    lin = np.arange(-32768, 32768, dtype=np.int32)
    x = lin >> 3  # audioop encodes from 13-bit input
    mask = np.where(x >= 0, 0xD5, 0x55)
    x = np.where(x >= 0, x, -x - 1)
    seg = np.searchsorted(np.array([0x1F, 0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF]), x)
    code = (seg << 4) | ((x >> np.maximum(seg, 1)) & 0xF)  # 13-bit input never overflows seg 7
    enc = np.empty(65536, dtype=np.uint8)
    enc[lin.astype(np.int16).view(np.uint16)] = (code ^ mask) & 0xFF
    return dec, enc


_ULAW_DEC, _ULAW_ENC = _ulaw_tables()
_ALAW_DEC, _ALAW_ENC = _alaw_tables()
for _t in (_ULAW_DEC, _ULAW_ENC, _ALAW_DEC, _ALAW_ENC):
    _t.flags.writeable = False


def _byte_tables(dec: np.ndarray) -> tuple[bytes, bytes]:
    """The low and the high byte of each decoded sample, as ``bytes.translate`` tables."""
    pairs = dec.view(np.uint8)
    return pairs[0::2].tobytes(), pairs[1::2].tobytes()


# Decoding a 20 ms frame through two ``bytes.translate`` calls and two slice assignments is about twice
# as fast as a numpy table lookup (no array objects per frame); the output is the same table's.
_ULAW_LO, _ULAW_HI = _byte_tables(_ULAW_DEC)
_ALAW_LO, _ALAW_HI = _byte_tables(_ALAW_DEC)


def _decode(data: bytes, lo: bytes, hi: bytes) -> bytes:
    out = bytearray(2 * len(data))
    out[0::2] = data.translate(lo)
    out[1::2] = data.translate(hi)
    return bytes(out)


def _encode(pcm: bytes, table: np.ndarray) -> bytes:
    return bytes(table.take(np.frombuffer(pcm, "<u2")).tobytes())   # bytes(): typed for mypy, no copy


def ulaw_decode(data: bytes) -> bytes:
    """G.711 µ-law bytes -> PCM16 LE."""
    if _audioop is not None:
        return bytes(_audioop.ulaw2lin(data, 2))
    return _decode(data, _ULAW_LO, _ULAW_HI)


def ulaw_encode(pcm: bytes) -> bytes:
    """PCM16 LE -> G.711 µ-law bytes (one per sample)."""
    if _audioop is not None and not len(pcm) & 1:
        return bytes(_audioop.lin2ulaw(pcm, 2))
    return _encode(pcm, _ULAW_ENC)


def alaw_decode(data: bytes) -> bytes:
    """G.711 A-law bytes -> PCM16 LE."""
    if _audioop is not None:
        return bytes(_audioop.alaw2lin(data, 2))
    return _decode(data, _ALAW_LO, _ALAW_HI)


def alaw_encode(pcm: bytes) -> bytes:
    """PCM16 LE -> G.711 A-law bytes (one per sample)."""
    if _audioop is not None and not len(pcm) & 1:
        return bytes(_audioop.lin2alaw(pcm, 2))
    return _encode(pcm, _ALAW_ENC)


# --------------------------------------------------------------------------- resampling

_ATTEN_DB = 80.0  # stopband attenuation of the Kaiser design
_TRANSITION = 0.25  # transition width as a fraction of the lower Nyquist, centred on it


@cache
def _design(in_rate: int, out_rate: int) -> tuple[int, int, int, np.ndarray, float]:
    """Polyphase filter for in_rate -> out_rate: (L, M, taps per phase, F.T, delay_ms).

    The prototype is a Kaiser-windowed sinc at L*in_rate with cutoff at the lower Nyquist
    (passband to 0.875, stopband from 1.125 of it). Output n sits at prototype index n*M and
    uses inputs x[(n*M)//L - k], k < K, weighted h[(n*M) % L + k*L]. Outputs are grouped in
    blocks of L (which consume M inputs); F maps one window of K+M-1 inputs to one block.
    """
    g = math.gcd(in_rate, out_rate)
    up, down = out_rate // g, in_rate // g
    fp = up * in_rate
    nyq = min(in_rate, out_rate) / 2
    dw = 2 * math.pi * _TRANSITION * nyq / fp
    taps = math.ceil(math.ceil((_ATTEN_DB - 7.95) / (2.285 * dw) + 1) / up)  # Kaiser's estimate
    if up == 1:
        taps |= 1  # odd, so the prototype needs no zero pad
    n = up * taps - (1 - (up * taps) % 2)  # odd length: integer group delay at fp
    i = np.arange(n) - (n - 1) / 2
    h = np.sinc(2 * nyq / fp * i) * np.kaiser(n, 0.1102 * (_ATTEN_DB - 8.7))
    h = np.concatenate((h, np.zeros(up * taps - n)))
    f = np.zeros((up, taps + down - 1))
    k = np.arange(taps)
    for r in range(up):
        base, phase = divmod(r * down, up)
        coef = h[phase + k * up]
        f[r, base - k + taps - 1] = coef / coef.sum()  # unity DC gain in every phase
    ft = np.ascontiguousarray(f.T, dtype=np.float32)
    ft.flags.writeable = False
    return up, down, taps, ft, (n - 1) / 2 / fp * 1000


class Resampler:
    """Streaming anti-aliased rational resampler for PCM16 LE mono (one per stream).

    ``process`` accepts any whole number of samples; over a stream the output length is
    ``ceil(total_in * out_rate / in_rate)`` (no drift). Equal rates pass input through.
    """

    __slots__ = ("in_rate", "out_rate", "_up", "_down", "_taps", "_ft", "_delay", "_hist",
                 "_skip", "_zeros")

    def __init__(self, in_rate: int, out_rate: int) -> None:
        if in_rate <= 0 or out_rate <= 0:
            raise ValueError(f"sample rates must be positive, got {in_rate} -> {out_rate}")
        self.in_rate, self.out_rate = in_rate, out_rate
        if in_rate == out_rate:
            self._ft = None
            self._delay = 0.0
            return
        self._up, self._down, self._taps, self._ft, self._delay = _design(in_rate, out_rate)
        self._zeros = np.zeros(self._down, np.float32)
        self.reset()

    @property
    def delay_ms(self) -> float:
        """Group delay added by the filter, in milliseconds."""
        return self._delay

    def reset(self) -> None:
        """Forget all history (e.g. on barge-in); the next sample starts a fresh stream."""
        if self._ft is not None:
            self._hist = np.zeros(self._taps - 1, np.float32)  # buffer from block start - (K-1)
            self._skip = 0  # outputs of the current (partial) block already emitted

    def process(self, pcm: bytes) -> bytes:
        """Resample one chunk; returns the output samples that became computable."""
        if self._ft is None:
            return bytes(pcm)
        up, down, taps = self._up, self._down, self._taps
        x = np.frombuffer(pcm, "<i2")
        have = self._hist.size + x.size
        full, rem = divmod(have - taps + 1, down)
        stop = full * up + -(-rem * up // down)  # outputs whose newest input has arrived
        if stop <= self._skip:
            self._hist = np.concatenate((self._hist, x))
            return b""
        blocks = full + (rem > 0)
        buf = np.concatenate((self._hist, x, self._zeros[: blocks * down + taps - 1 - have]))
        y = _filter(buf, blocks, taps + down - 1, down, self._ft).ravel()[self._skip : stop]
        self._hist = buf[full * down : have]
        self._skip = stop - full * up
        np.rint(y, out=y)
        np.clip(y, -32768.0, 32767.0, out=y)
        return bytes(y.astype("<i2").tobytes())


_DOT_COPY_BYTES = 384 * 1024     # measured here (2 MB of L2 per core): 256-512 KB is the flat optimum


def _filter(buf: np.ndarray, blocks: int, width: int, down: int, ft: np.ndarray) -> np.ndarray:
    """``blocks`` rows of ``width`` inputs, each ``down`` further into ``buf``, times the filter ``ft``.

    The rows overlap in ``buf`` (a strided view), so the product first copies them out. For a long input
    (a whole utterance, a TTS body) that copy is megabytes; taken about ``_DOT_COPY_BYTES`` at a time it stays
    in the cache: about twice as fast for a 2 s utterance. The result is the same to the last bit or two.
    """
    rows = max(64, _DOT_COPY_BYTES // (4 * width))
    if blocks <= 2 * rows:
        product: np.ndarray = np.dot(np.ndarray((blocks, width), np.float32, buffer=buf, strides=(4 * down, 4)), ft)
        return product
    out = np.empty((blocks, ft.shape[1]), np.float32)
    for start in range(0, blocks, rows):
        n = min(rows, blocks - start)
        win = np.ndarray((n, width), np.float32, buffer=buf, offset=4 * down * start, strides=(4 * down, 4))
        np.dot(win, ft, out=out[start : start + n])
    return out


# --------------------------------------------------------------------------- helpers


def rms(pcm: bytes) -> float:
    """Root-mean-square level, full scale = 1.0 (0.0 for empty input); through audioop, rounded down to a
    whole sample value (1/32768 of full scale)."""
    n = len(pcm)
    if n < 2:
        return 0.0
    if _audioop is not None:
        return int(_audioop.rms(pcm[: n - 1] if n & 1 else pcm, 2)) / 32768.0
    x = np.frombuffer(pcm, "<i2", len(pcm) // 2).astype(np.float32)
    # float32 dot: exact enough, ~3x cheaper; math.sqrt on a float, not np.sqrt on a numpy scalar (per frame)
    return math.sqrt(float(x.dot(x)) / x.size) / 32768.0


def looks_like_stereo(pcm: bytes) -> bool:
    """True when 16-bit PCM declared mono looks like interleaved stereo (L, R, L, R ...).

    Give it a second or so of sound: two channels carrying the same signal make every sample equal
    its neighbour; two different signals make samples two apart (one channel, adjacent in time)
    far more alike than neighbours (two channels). Mono audio's likeness falls with distance.
    A client that doubles every sample to upsample also matches: use the result to warn, not to
    refuse.

    >>> mono = np.sin(np.arange(16000) / 7.0) * 8000
    >>> looks_like_stereo(mono.astype("<i2").tobytes())
    False
    >>> looks_like_stereo(np.repeat(mono, 2).astype("<i2").tobytes())
    True
    """
    x = np.frombuffer(pcm, "<i2", len(pcm) // 4 * 2).astype(np.float64)
    if x.size < 640 or float(np.sqrt(np.mean(x * x))) < 100.0:       # too short or too quiet to tell
        return False
    if float(np.mean(np.abs(x[0::2] - x[1::2]))) <= 0.01 * float(np.mean(np.abs(x))):
        return True

    def likeness(lag: int) -> float:
        a, b = x[:-lag] - x.mean(), x[lag:] - x.mean()
        return float(np.dot(a, b) / (np.sqrt(np.dot(a, a) * np.dot(b, b)) + 1e-9))

    near, far = likeness(1), likeness(2)
    return far > 0.6 and far - near > 0.3


def silence(duration_ms: float, sample_rate: int) -> bytes:
    """PCM16 zeros lasting ``duration_ms`` (rounded to whole samples)."""
    return b"\x00\x00" * max(0, round(duration_ms * sample_rate / 1000))


def duration_ms(pcm: bytes, sample_rate: int) -> float:
    """Duration of PCM16 mono ``pcm`` in milliseconds."""
    return (len(pcm) // 2) * 1000.0 / sample_rate


def pcm_to_wav(pcm: bytes, sample_rate: int) -> bytes:
    """Wrap PCM16 mono in a 44-byte RIFF/WAVE header."""
    n = len(pcm)
    header = struct.pack("<4sI4s4sIHHIIHH4sI", b"RIFF", 36 + n, b"WAVE", b"fmt ", 16, 1, 1,
                         sample_rate, sample_rate * 2, 2, 16, b"data", n)
    return header + pcm


def wav_to_pcm(data: bytes) -> tuple[bytes, int]:
    """Parse a RIFF/WAVE PCM16 file (mono, or stereo downmixed) -> (pcm, sample_rate)."""
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise ValueError("not a RIFF/WAVE file")
    pos, fmt = 12, None
    while pos + 8 <= len(data):
        cid, size = struct.unpack_from("<4sI", data, pos)
        body = data[pos + 8 : pos + 8 + size]
        if cid == b"fmt ":
            if len(body) < 16:
                raise ValueError("WAV fmt chunk is truncated")
            fmt = struct.unpack_from("<HHIIHH", body)
            if fmt[0] == 0xFFFE and len(body) >= 26:  # WAVE_FORMAT_EXTENSIBLE: use subformat
                fmt = (struct.unpack_from("<H", body, 24)[0],) + fmt[1:]
        elif cid == b"data":
            if fmt is None:
                raise ValueError("WAV data chunk precedes fmt chunk")
            tag, channels, rate, _, _, bits = fmt
            if tag != 1 or bits != 16:
                raise ValueError(f"unsupported WAV encoding: format tag {tag:#x}, {bits}-bit "
                                 "(only 16-bit integer PCM is supported)")
            if channels == 1:
                return body[: len(body) // 2 * 2], rate
            if channels == 2:
                s = np.frombuffer(body[: len(body) // 4 * 4], "<i2").astype(np.int32)
                return ((s[0::2] + s[1::2]) >> 1).astype("<i2").tobytes(), rate
            raise ValueError(f"unsupported WAV channel count: {channels} (mono or stereo only)")
        pos += 8 + size + (size & 1)
    raise ValueError("WAV file has no data chunk" if fmt else "WAV file has no fmt chunk")


# --------------------------------------------------------------------------- benchmark

_BENCH_PATHS = ((8000, 16000), (16000, 8000), (24000, 8000), (24000, 16000), (22050, 8000),
                (22050, 16000), (48000, 16000), (16000, 48000), (44100, 16000))


def _bench(frames: int = 5000) -> None:
    """Print µs per 20 ms frame for each resampler path and for the G.711 codecs."""
    import time

    rng = np.random.default_rng(0)
    for src, dst in _BENCH_PATHS:
        r = Resampler(src, dst)
        frame = rng.integers(-8000, 8000, src // 50, dtype=np.int16).tobytes()
        for _ in range(50):
            r.process(frame)
        t = time.perf_counter()
        for _ in range(frames):
            r.process(frame)
        us = (time.perf_counter() - t) / frames * 1e6
        print(f"{src:>6} -> {dst:<6} {us:6.1f} µs/frame   delay {r.delay_ms:.2f} ms   "
              f"{r._taps} taps/phase")
    pcm, codes = rng.integers(-8000, 8000, 160, dtype=np.int16).tobytes(), bytes(range(160))
    for name, fn, arg in (("ulaw_encode", ulaw_encode, pcm), ("ulaw_decode", ulaw_decode, codes)):
        t = time.perf_counter()
        for _ in range(frames):
            fn(arg)
        print(f"{name:>16} {(time.perf_counter() - t) / frames * 1e6:6.1f} µs/frame")


if __name__ == "__main__":
    _bench()


_DTMF_FREQS = {
    "1": (697, 1209), "2": (697, 1336), "3": (697, 1477), "A": (697, 1633),
    "4": (770, 1209), "5": (770, 1336), "6": (770, 1477), "B": (770, 1633),
    "7": (852, 1209), "8": (852, 1336), "9": (852, 1477), "C": (852, 1633),
    "*": (941, 1209), "0": (941, 1336), "#": (941, 1477), "D": (941, 1633),
}


def dtmf_tones(digits: str, sample_rate: int, *, tone_ms: int = 100, gap_ms: int = 60) -> bytes:
    """In-band DTMF (ITU-T Q.23 pairs) for ``digits`` as PCM16, each tone followed by a gap.

    >>> len(dtmf_tones("12", 8000)) == 2 * (800 + 480) * 2
    True
    """
    unknown = set(digits) - set(_DTMF_FREQS)
    if unknown:
        raise ValueError(f"not DTMF digits: {''.join(sorted(unknown))!r} (use 0-9, *, #, A-D)")
    t = np.arange(sample_rate * tone_ms // 1000) / sample_rate
    gap = np.zeros(sample_rate * gap_ms // 1000, dtype=np.int16)
    out: list[np.ndarray] = []
    for digit in digits:
        low, high = _DTMF_FREQS[digit]
        tone = 0.35 * (np.sin(2 * np.pi * low * t) + np.sin(2 * np.pi * high * t))
        out += [np.round(tone * 32767).astype(np.int16), gap]
    return np.concatenate(out).astype("<i2").tobytes() if out else b""
