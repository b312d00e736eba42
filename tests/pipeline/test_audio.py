"""Tests for pipeline.audio: G.711 (bit-exact vs audioop), the streaming resampler, helpers."""

from __future__ import annotations

import base64
import math
import struct
import warnings

import numpy as np
import pytest

from pipeline.audio import (
    Resampler,
    alaw_decode,
    alaw_encode,
    duration_ms,
    pcm_to_wav,
    rms,
    silence,
    ulaw_decode,
    ulaw_encode,
    wav_to_pcm,
)

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import audioop  # oracle only; removed from the stdlib in 3.13

PATHS = [(8000, 16000), (16000, 8000), (24000, 8000), (24000, 16000), (22050, 8000),
         (22050, 16000), (48000, 16000), (16000, 48000), (44100, 16000)]

ALL_PCM = np.arange(-32768, 32768, dtype=np.int16).tobytes()
ALL_CODES = bytes(range(256))
TONE8 = [0, 5657, 8000, 5657, 0, -5657, -8000, -5657]


def pcm(samples) -> bytes:
    return np.asarray(samples).astype("<i2").tobytes()


def samples(data: bytes) -> list[int]:
    return np.frombuffer(data, "<i2").tolist()


def as_float(data: bytes) -> np.ndarray:
    return np.frombuffer(data, "<i2").astype(np.float64)


def stream(r: Resampler, x: np.ndarray, chunk_ms: float = 20) -> np.ndarray:
    """Feed ``x`` (int samples) through ``r`` in chunks of ``chunk_ms``; return the output."""
    n = max(1, round(r.in_rate * chunk_ms / 1000))
    data = pcm(x)
    out = b"".join(r.process(data[i : i + 2 * n]) for i in range(0, len(data), 2 * n))
    return as_float(out)


def tone_level(y: np.ndarray, freq: float, rate: int) -> float:
    """Amplitude of the ``freq`` component of ``y`` (Hann-windowed single-bin DFT)."""
    w = np.hanning(len(y))
    t = np.arange(len(y)) / rate
    return float(2 * abs(np.sum(y * w * np.exp(-2j * np.pi * freq * t))) / w.sum())


def db(ratio: float) -> float:
    return 20 * math.log10(max(ratio, 1e-12))


# --------------------------------------------------------------------------- G.711


def test_ulaw_encode_matches_audioop_for_all_inputs():
    assert ulaw_encode(ALL_PCM) == audioop.lin2ulaw(ALL_PCM, 2)


def test_alaw_encode_matches_audioop_for_all_inputs():
    assert alaw_encode(ALL_PCM) == audioop.lin2alaw(ALL_PCM, 2)


def test_ulaw_decode_matches_audioop_for_all_codes():
    assert ulaw_decode(ALL_CODES) == audioop.ulaw2lin(ALL_CODES, 2)


def test_alaw_decode_matches_audioop_for_all_codes():
    assert alaw_decode(ALL_CODES) == audioop.alaw2lin(ALL_CODES, 2)


@pytest.mark.parametrize(
    "value, ulaw, alaw",
    [(0, 0xFF, 0xD5), (100, 0xF2, 0xD3), (-100, 0x72, 0x53), (1000, 0xCE, 0xFA),
     (-1000, 0x4E, 0x7A), (8159, 0x9F, 0x8A), (16000, 0x90, 0xBA), (32767, 0x80, 0xAA),
     (-32768, 0x00, 0x2A)],
)
def test_g711_encode_vectors(value, ulaw, alaw):
    assert ulaw_encode(pcm([value])) == bytes([ulaw])
    assert alaw_encode(pcm([value])) == bytes([alaw])


@pytest.mark.parametrize(
    "decode, code, value",
    [(ulaw_decode, 0xFF, 0), (ulaw_decode, 0x7F, 0), (ulaw_decode, 0x80, 32124),
     (ulaw_decode, 0x00, -32124), (alaw_decode, 0xD5, 8), (alaw_decode, 0x55, -8),
     (alaw_decode, 0x80, 5504)],
)
def test_g711_decode_vectors(decode, code, value):
    assert samples(decode(bytes([code]))) == [value]


def test_tone8_vectors():
    tone = pcm(TONE8)
    assert tone.hex() == "00001916401f19160000e7e9c0e0e7e9"
    assert ulaw_encode(tone).hex() == "ffa9a0a9ff292029"
    assert base64.b64encode(ulaw_encode(tone)) == b"/6mgqf8pICk="
    assert alaw_encode(tone).hex() == "d5838a83d5030a03"
    assert base64.b64encode(alaw_encode(tone)) == b"1YOKg9UDCgM="
    assert samples(ulaw_decode(ulaw_encode(tone))) == [0, 5628, 7932, 5628, 0, -5628, -7932, -5628]
    assert samples(alaw_decode(alaw_encode(tone))) == [8, 5760, 8064, 5760, 8, -5760, -8064, -5760]


def test_ulaw_silence_frame_base64():
    frame = ulaw_encode(silence(20, 8000))
    assert frame == b"\xff" * 160
    b64 = base64.b64encode(frame).decode()
    assert len(b64) == 216 and b64 == "/" * 213 + "w=="


@pytest.mark.parametrize("n", [1, 7, 160, 320, 4001])
def test_g711_fast_paths_match_the_table_lookup_on_random_input(n):
    """The translate-based decoders and the take-based encoders give the plain numpy table lookup's bytes."""
    from pipeline import audio
    rng = np.random.default_rng(n)
    for _ in range(20):
        codes = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        linear = rng.integers(-32768, 32768, n, dtype=np.int16).astype("<i2").tobytes()
        assert ulaw_decode(codes) == audio._ULAW_DEC[np.frombuffer(codes, np.uint8)].tobytes()
        assert alaw_decode(codes) == audio._ALAW_DEC[np.frombuffer(codes, np.uint8)].tobytes()
        assert ulaw_encode(linear) == audio._ULAW_ENC[np.frombuffer(linear, "<u2")].tobytes()
        assert alaw_encode(linear) == audio._ALAW_ENC[np.frombuffer(linear, "<u2")].tobytes()
        assert type(ulaw_decode(codes)) is bytes and type(ulaw_encode(linear)) is bytes


def test_g711_empty_and_odd_length():
    assert ulaw_encode(b"") == b"" and ulaw_decode(b"") == b""
    assert alaw_encode(b"") == b"" and alaw_decode(b"") == b""
    with pytest.raises(ValueError):
        ulaw_encode(b"\x00\x00\x00")


# --------------------------------------------------------------------------- resampler


def test_identity_passes_input_through():
    r = Resampler(16000, 16000)
    data = pcm([1, -2, 3])
    assert r.process(data) == data
    assert r.delay_ms == 0.0


def test_invalid_rates_rejected():
    with pytest.raises(ValueError):
        Resampler(0, 8000)


@pytest.mark.parametrize("src, dst", PATHS)
def test_output_length_tracks_input_without_drift(src, dst):
    r = Resampler(src, dst)
    rng = np.random.default_rng(src + dst)
    total_in = total_out = 0
    for _ in range(400):
        n = int(rng.integers(0, 700))  # includes empty, single-sample and odd chunks
        out = r.process(pcm(rng.integers(-1000, 1000, n)))
        total_in += n
        total_out += len(out) // 2
        assert total_out == -(-total_in * dst // src)


@pytest.mark.parametrize("src, dst", PATHS)
def test_streaming_matches_single_call(src, dst):
    rng = np.random.default_rng(7)
    x = rng.integers(-12000, 12000, src // 2)
    whole = as_float(Resampler(src, dst).process(pcm(x)))
    chunked = stream(Resampler(src, dst), x, 20)
    r = Resampler(src, dst)
    data, pieces, i = pcm(x), [], 0
    for n in rng.integers(1, 500, 200):  # irregular, mostly odd-sized chunks
        pieces.append(r.process(data[2 * i : 2 * (i + n)]))
        i += n
    pieces.append(r.process(data[2 * i :]))
    ragged = as_float(b"".join(pieces))
    assert len(whole) == len(chunked) == len(ragged) == -(-len(x) * dst // src)
    assert np.max(np.abs(whole - chunked)) <= 1
    assert np.max(np.abs(whole - ragged)) <= 1
    assert np.max(np.abs(whole)) > 1000  # not trivially silent


@pytest.mark.parametrize("src, dst", [(8000, 16000), (24000, 8000), (16000, 8000)])
def test_a_long_input_in_one_call_matches_streaming(src, dst):
    """A whole utterance or TTS body in one call is filtered in cache-sized pieces: the same samples."""
    rng = np.random.default_rng(11)
    x = rng.integers(-12000, 12000, src * 3)          # 3 s: long enough to be taken in pieces
    whole = as_float(Resampler(src, dst).process(pcm(x)))
    chunked = stream(Resampler(src, dst), x, 20)
    assert len(whole) == len(chunked) == len(x) * dst // src
    assert np.max(np.abs(whole - chunked)) <= 1 and np.max(np.abs(whole)) > 1000


def measure_delay_ms(src: int, dst: int) -> float:
    """Delay of a band-limited chirp streamed in 20 ms chunks, by cross-correlation."""
    dur, f0, f1 = 0.5, 200.0, 3000.0

    def chirp(rate: int) -> np.ndarray:
        t = np.arange(int(dur * rate)) / rate
        env = np.sin(np.pi * t / dur) ** 2
        return 12000 * env * np.sin(2 * np.pi * (f0 * t + (f1 - f0) * t * t / (2 * dur)))

    r = Resampler(src, dst)
    y = stream(r, np.round(chirp(src)))
    y = np.concatenate((y, as_float(r.process(pcm(np.zeros(src // 50))))))  # flush the filter
    ref = chirp(dst)
    lags = np.arange(0, int(0.01 * dst))
    xc = np.array([np.dot(y[k : k + len(ref)], ref) for k in lags])
    k = int(np.argmax(xc))
    a, b, c = xc[k - 1], xc[k], xc[k + 1]
    frac = 0.5 * (a - c) / (a - 2 * b + c)  # parabolic peak interpolation
    return (k + frac) / dst * 1000


@pytest.mark.parametrize("src, dst", [(8000, 16000), (16000, 8000), (24000, 8000)])
def test_added_delay_at_most_3ms(src, dst):
    measured = measure_delay_ms(src, dst)
    assert measured <= 3.0
    assert abs(measured - Resampler(src, dst).delay_ms) < 0.05


@pytest.mark.parametrize("src, dst", PATHS)
def test_delay_ms_matches_measurement(src, dst):
    assert abs(measure_delay_ms(src, dst) - Resampler(src, dst).delay_ms) < 0.05


def test_round_trip_snr_at_least_80db():
    t = np.arange(16000) / 16000
    x = np.round(16384 * np.sin(2 * np.pi * 1000 * t))
    down, up = Resampler(16000, 8000), Resampler(8000, 16000)
    y = stream(up, stream(down, x))
    d = (down.delay_ms + up.delay_ms) * 16  # in 16 kHz samples
    assert d == round(d)
    d = round(d)
    ref, out = x[: len(y) - d][160:-160], y[d:][160:-160]  # skip first/last 10 ms
    snr = 10 * math.log10(np.sum(ref**2) / np.sum((out - ref) ** 2))
    assert snr >= 80


def test_decimation_alias_rejection_24k_to_8k():
    t = np.arange(24000) / 24000
    x = np.round(16000 * np.sin(2 * np.pi * 5000 * t))
    y = stream(Resampler(24000, 8000), x)[80:]
    assert db(tone_level(y, 3000, 8000) / tone_level(x, 5000, 24000)) <= -60
    # sanity: an in-band tone through the same path keeps its level
    x2 = np.round(16000 * np.sin(2 * np.pi * 1000 * t))
    y2 = stream(Resampler(24000, 8000), x2)[80:]
    assert abs(db(tone_level(y2, 1000, 8000) / tone_level(x2, 1000, 24000))) < 0.01


def test_interpolation_image_rejection_8k_to_16k():
    t = np.arange(8000) / 8000
    x = np.round(16000 * np.sin(2 * np.pi * 3500 * t))
    y = stream(Resampler(8000, 16000), x)[160:]
    level_in = tone_level(x, 3500, 8000)
    assert db(tone_level(y, 4500, 16000) / level_in) <= -60
    assert abs(db(tone_level(y, 3500, 16000) / level_in)) < 0.1


@pytest.mark.parametrize("src, dst", PATHS)
def test_passband_gain_is_unity(src, dst):
    t = np.arange(src // 2) / src
    x = np.round(10000 * np.sin(2 * np.pi * 1000 * t))
    y = stream(Resampler(src, dst), x)[dst // 50 :]
    assert abs(db(tone_level(y, 1000, dst) / tone_level(x, 1000, src))) < 0.01


@pytest.mark.parametrize("src, dst", PATHS)
def test_dc_level_preserved_exactly(src, dst):
    r = Resampler(src, dst)
    for level in (1234, -1234, 32767):
        y = stream(r, np.full(src // 10, level))[dst // 50 :]
        assert np.all(y == level)


@pytest.mark.parametrize("src, dst", [(8000, 16000), (24000, 8000), (22050, 16000)])
def test_no_clicks_at_chunk_boundaries(src, dst):
    f, amp = 440.0, 20000.0
    t = np.arange(src) / src
    y = stream(Resampler(src, dst), np.round(amp * np.sin(2 * np.pi * f * t)))
    steady = np.diff(y[dst // 50 : -dst // 50])
    assert np.max(np.abs(steady)) <= amp * 2 * np.pi * f / dst * 1.01 + 2


def test_reset_drops_history():
    rng = np.random.default_rng(3)
    r = Resampler(24000, 8000)
    r.process(pcm(rng.integers(-20000, 20000, 481)))  # odd count leaves a partial block
    r.reset()
    frame = pcm(rng.integers(-20000, 20000, 480))
    assert r.process(frame) == Resampler(24000, 8000).process(frame)


def test_full_scale_input_clips_without_wrapping():
    x = np.tile(np.repeat([32767, -32768], 40), 20)  # full-scale square wave: filter overshoots
    r = Resampler(8000, 16000)
    y = stream(r, x)
    d = round(r.delay_ms * 16)
    out = y[d:]
    phase = np.arange(len(out)) % 160  # 80 output samples per half period
    assert y.max() == 32767 and y.min() == -32768  # clipping engaged
    assert np.all(out[(phase >= 10) & (phase < 70)] > 16000)  # a wrap would go negative
    assert np.all(out[(phase >= 90) & (phase < 150)] < -16000)


def test_odd_byte_count_rejected():
    with pytest.raises(ValueError):
        Resampler(8000, 16000).process(b"\x00\x00\x00")


# --------------------------------------------------------------------------- helpers


def test_rms():
    assert rms(b"") == 0.0
    assert rms(silence(20, 8000)) == 0.0
    assert rms(pcm([-32768] * 10)) == 1.0
    t = np.arange(8000) / 8000
    tone = pcm(np.round(16384 * np.sin(2 * np.pi * 1000 * t)))
    assert rms(tone) == pytest.approx(0.5 / math.sqrt(2), rel=1e-4)


def test_silence_and_duration():
    assert silence(20, 8000) == b"\x00" * 320
    assert len(silence(10, 22050)) == 2 * 220  # 220.5 rounds to 220 (banker's rounding)
    assert silence(0, 16000) == b""
    assert duration_ms(silence(20, 16000), 16000) == 20.0
    assert duration_ms(b"\x00" * 441 * 2, 22050) == 20.0


def test_pcm_to_wav_header_and_round_trip():
    data = pcm(TONE8)
    wav = pcm_to_wav(data, 8000)
    assert len(wav) == 44 + len(data)
    assert wav[:4] == b"RIFF" and wav[8:16] == b"WAVEfmt "
    assert struct.unpack_from("<IHHIIHH", wav, 16) == (16, 1, 1, 8000, 16000, 2, 16)
    assert struct.unpack_from("<I", wav, 4)[0] == len(wav) - 8
    assert wav[36:40] == b"data" and struct.unpack_from("<I", wav, 40)[0] == len(data)
    assert wav_to_pcm(wav) == (data, 8000)


def _wav(fmt: bytes, data: bytes, extra: bytes = b"") -> bytes:
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + extra
    body += b"data" + struct.pack("<I", len(data)) + data
    return b"RIFF" + struct.pack("<I", len(body)) + body


def test_wav_to_pcm_downmixes_stereo_and_skips_odd_chunks():
    stereo = pcm([100, 300, -100, -301, 32767, 32767])
    fmt = struct.pack("<HHIIHH", 1, 2, 16000, 64000, 4, 16)
    odd_list = b"LIST" + struct.pack("<I", 3) + b"abc" + b"\x00"  # odd size + pad byte
    assert wav_to_pcm(_wav(fmt, stereo, odd_list)) == (pcm([200, -201, 32767]), 16000)


def test_wav_to_pcm_accepts_extensible_pcm():
    fmt = struct.pack("<HHIIHHHHI", 0xFFFE, 1, 24000, 48000, 2, 16, 22, 16, 4)
    fmt += struct.pack("<H", 1) + b"\x00\x00\x00\x00\x10\x00\x80\x00\x00\xaa\x00\x38\x9b\x71"
    assert wav_to_pcm(_wav(fmt, pcm([1, 2, 3]))) == (pcm([1, 2, 3]), 24000)


@pytest.mark.parametrize(
    "wav, message",
    [(_wav(struct.pack("<HHIIHH", 3, 1, 16000, 64000, 4, 32), b"\x00" * 8), "format tag 0x3"),
     (_wav(struct.pack("<HHIIHH", 1, 1, 8000, 8000, 1, 8), b"\x80" * 8), "8-bit"),
     (_wav(struct.pack("<HHIIHH", 1, 6, 8000, 96000, 12, 16), b"\x00" * 12), "channel"),
     (b"OggS" + b"\x00" * 40, "RIFF"),
     (b"RIFF\x04\x00\x00\x00WAVE", "fmt")],
)
def test_wav_to_pcm_rejects_unsupported(wav, message):
    with pytest.raises(ValueError, match=message):
        wav_to_pcm(wav)


def test_dtmf_tones_hold_the_two_q23_frequencies() -> None:
    from pipeline.audio import dtmf_tones

    pcm = dtmf_tones("5#", 8000, tone_ms=100, gap_ms=50)
    assert len(pcm) == 2 * (800 + 400) * 2
    x = np.frombuffer(pcm, "<i2").astype(np.float64)
    spectrum = np.abs(np.fft.rfft(x[:800]))
    freqs = np.fft.rfftfreq(800, 1 / 8000)
    top = sorted(freqs[np.argsort(spectrum)[-2:]])
    assert top == [770.0, 1340.0] or (abs(top[0] - 770) <= 10 and abs(top[1] - 1336) <= 10)
    assert not np.any(x[800:1200])                      # the gap is silent
    with pytest.raises(ValueError, match="not DTMF digits"):
        dtmf_tones("5x", 8000)


# ------------------------------------------------------------------------------------------ stereo detection
def test_interleaved_stereo_is_told_from_mono_speech() -> None:
    from pipeline.audio import looks_like_stereo
    from tests.speech import speech_pcm

    for rate in (16000, 48000):
        speech = np.frombuffer(speech_pcm("Hello, I would like to book a table for two tonight.", rate), "<i2")
        assert not looks_like_stereo(speech.tobytes())                                   # mono speech
        assert looks_like_stereo(np.repeat(speech, 2).tobytes())                         # L = R
        other = np.roll(speech, rate // 3)                                               # a different right side
        stereo = np.empty(2 * speech.size, "<i2")
        stereo[0::2], stereo[1::2] = speech, other
        assert looks_like_stereo(stereo.tobytes())
    rng = np.random.default_rng(1)
    assert not looks_like_stereo((rng.standard_normal(16000) * 3000).astype("<i2").tobytes())   # noise
    assert not looks_like_stereo(b"\x00" * 32000)                                            # silence
    assert not looks_like_stereo(np.repeat(np.int16(9000), 100).tobytes())                   # too short


def test_the_table_codecs_match_audioop_too():
    """Where audioop cannot serve (a big-endian machine) the tables do, bit for bit the same."""
    from pipeline.audio import _ALAW_ENC, _ALAW_HI, _ALAW_LO, _ULAW_ENC, _ULAW_HI, _ULAW_LO, _decode, _encode
    assert _encode(ALL_PCM, _ULAW_ENC) == audioop.lin2ulaw(ALL_PCM, 2)
    assert _encode(ALL_PCM, _ALAW_ENC) == audioop.lin2alaw(ALL_PCM, 2)
    assert _decode(ALL_CODES, _ULAW_LO, _ULAW_HI) == audioop.ulaw2lin(ALL_CODES, 2)
    assert _decode(ALL_CODES, _ALAW_LO, _ALAW_HI) == audioop.alaw2lin(ALL_CODES, 2)


def test_rms_matches_the_exact_value_to_one_sample_step():
    rng = np.random.default_rng(3)
    for n in (1, 2, 160, 161, 320, 8000):
        x = rng.integers(-32768, 32768, n)
        exact = math.sqrt(float(np.mean(x.astype(np.float64) ** 2))) / 32768.0
        assert exact - 1 / 32768 <= rms(pcm(x) + (b"\x01" if n == 161 else b"")) <= exact + 1e-12
