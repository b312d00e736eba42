"""Call recording: a streaming WAV writer per call, and a spool-and-upload worker pool for S3.

``CallRecorder`` writes the call's audio to ``<spool>/<name>.wav.part`` as the call runs (at most
a couple of seconds per side are held in memory), places each side at its wall-clock position,
and on ``close()`` finalises the RIFF header, writes a JSON sidecar ``<name>.wav.json`` (the S3
key and the call's metadata) and renames the ``.part`` to ``<name>.wav`` atomically.

``RecordingUploader`` uploads finished recordings from the spool directory to
``s3://bucket/<key>`` with a bounded queue, ``worker_count`` workers and exponential-backoff
retries. Nothing is dropped: a file that cannot be queued or uploaded stays in the spool
directory, and a periodic scan (also run at startup, so after a restart) queues it again. A file
is deleted only after S3 has acknowledged it.

Usage::

    uploader = RecordingUploader.from_config(config.recording)
    await uploader.start()                          # scans the spool, starts workers + scanner

    rec = CallRecorder.for_call(uploader.spool_dir, base_path=config.recording.base_path,
                                session_id=sid, carrier="twilio", call_id=call_sid,
                                channels=config.recording.channels)
    rec.caller(pcm8k, 8000)                         # every inbound frame, as it arrives
    rec.agent(pcm16k, 16000)                        # every outbound frame, as it is sent
    path = await asyncio.to_thread(rec.close)       # header, sidecar, atomic rename
    uploader.submit(path)                           # never blocks; False = left for the scanner

    await uploader.close(timeout_s=10)              # unfinished uploads stay spooled

Credentials come from the standard AWS environment variables (read by botocore itself) and are
never logged; neither is audio.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import struct
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO, Literal

import aioboto3
import numpy as np
from aiobotocore.config import AioConfig

from gateway.config import RecordingConfig
from pipeline.audio import Resampler

__all__ = ["CallRecorder", "RecordingUploader", "default_spool_dir", "recording_key"]

logger = logging.getLogger(__name__)

Channels = Literal["stereo", "mono"]

PART_SUFFIX = ".part"
SIDECAR_SUFFIX = ".json"
MIN_PART_BYTES = 5 * 1024 * 1024  # S3's smallest multipart part (all but the last)
_HEADER_BYTES = 44
_ORPHAN_AGE_S = 60.0  # a sidecar with neither .wav nor .part this old is removed by the scan
_MAX_WRITE_FRAMES = 16000 * 10  # a long silent stretch is written in pieces of this many frames
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")
_NOT_HEADER_SAFE = re.compile(r"[^\x20-\x7e]")  # S3 metadata travels as HTTP headers: printable ASCII
_S3_METADATA = ("session_id", "carrier", "call_id", "started_at", "channels", "sample_rate", "duration_s")


def default_spool_dir() -> Path:
    """``<tempfile.gettempdir()>/voxray-recordings``: where recordings wait when no spool_dir is set."""
    return Path(tempfile.gettempdir()) / "voxray-recordings"


def _safe(name: str) -> str:
    return _UNSAFE.sub("_", name) or "_"


def recording_key(base_path: str, session_id: str, started_at: datetime) -> str:
    """S3 key of a call's recording: ``<base_path>/YYYY/MM/DD/<session_id>.wav`` (UTC date).

    >>> recording_key("recordings/", "abc", datetime(2026, 12, 2, 23, 0, tzinfo=UTC))
    'recordings/2026/12/02/abc.wav'
    """
    base = base_path.strip("/")
    day = (started_at.astimezone(UTC) if started_at.tzinfo else started_at).strftime("%Y/%m/%d")
    return f"{base + '/' if base else ''}{day}/{_safe(session_id)}.wav"


def _wav_header(channels: int, sample_rate: int, data_bytes: int) -> bytes:
    data_bytes = min(data_bytes, 0xFFFFFFFF - 36)
    return struct.pack("<4sI4s4sIHHIIHH4sI", b"RIFF", 36 + data_bytes, b"WAVE", b"fmt ", 16, 1, channels,
                       sample_rate, sample_rate * 2 * channels, 2 * channels, 16, b"data", data_bytes)


class _Side:
    """One direction of the call: its resampler, its cursor and its not-yet-written samples.

    ``buf`` holds the side's samples from the recorder's ``flushed`` position on (silence where
    the side sent nothing), so it always covers ``[flushed, max(cursor, flushed))``.
    """

    __slots__ = ("buf", "cursor", "resampler")

    def __init__(self) -> None:
        self.resampler: Resampler | None = None
        self.cursor = 0  # absolute frame index where this side's next sample goes
        self.buf = bytearray()

    def resample(self, pcm: bytes, rate: int, out_rate: int) -> bytes:
        if self.resampler is None or self.resampler.in_rate != rate:
            self.resampler = Resampler(rate, out_rate)  # a rate change mid-call starts a fresh stream
        return self.resampler.process(pcm)


class CallRecorder:
    """Streaming two-sided WAV writer for one call (no event loop; inject ``clock`` in tests).

    Each side is placed at its wall-clock position since construction: a chunk starts at
    ``max(side cursor, (now - t0) * sample_rate)``, so a side that is ahead of real time (the
    agent's playout runs ~100 ms ahead) stays contiguous, and a side that was quiet gets silence.
    A side that is behind real time by no more than ``jitter_s`` also stays contiguous, so
    network jitter does not punch tiny gaps into speech. Stereo puts the caller left and the
    agent right; mono sums them with int16 saturation.

    Frames up to a point are written once both sides have reached it, or once it is ``hold_s``
    in the past, in blocks of at least ``block_s``; a side more than ``max_ahead_s`` ahead of the
    other is written anyway. So memory per side stays around ``hold_s + block_s``.

    Blocking file I/O happens in ``caller``/``agent`` (small writes) and ``close`` (fsync): call
    ``close`` via ``asyncio.to_thread`` from async code. A disk error never reaches the caller of
    ``caller``/``agent``: it is logged once, the recorder stops, and ``close`` re-raises it.
    """

    def __init__(self, path: Path, *, channels: Channels = "stereo", sample_rate: int = 16000,
                 clock: Callable[[], float] = time.monotonic, key: str | None = None,
                 metadata: Mapping[str, str] | None = None, hold_s: float = 1.0, block_s: float = 0.5,
                 jitter_s: float = 0.06, max_ahead_s: float = 30.0) -> None:
        if channels not in ("stereo", "mono"):
            raise ValueError(f"recording channels must be 'stereo' or 'mono', got {channels!r}")
        if sample_rate <= 0:
            raise ValueError(f"recording sample_rate must be positive, got {sample_rate}")
        self.path = Path(path)
        self.part_path = self.path.with_name(self.path.name + PART_SUFFIX)
        self.sidecar_path = self.path.with_name(self.path.name + SIDECAR_SUFFIX)
        self.channels: Channels = channels
        self.sample_rate = sample_rate
        self.key = key
        self.metadata = dict(metadata or {})
        self._clock = clock
        self._t0 = clock()
        self._hold = round(hold_s * sample_rate)
        self._block = max(1, round(block_s * sample_rate))
        self._jitter = round(jitter_s * sample_rate)
        self._max_ahead = round(max_ahead_s * sample_rate)
        self._nch = 2 if channels == "stereo" else 1
        self._caller = _Side()
        self._agent = _Side()
        self._flushed = 0  # frames written to the file
        self._closed = False
        self._error: OSError | None = None
        self._lock = threading.Lock()  # close() may run in a worker thread while frames still arrive
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file: BinaryIO | None = self.part_path.open("wb")
        self._file.write(_wav_header(self._nch, sample_rate, 0))

    @classmethod
    def for_call(cls, spool_dir: Path, *, base_path: str, session_id: str, carrier: str = "",
                 call_id: str = "", channels: Channels = "stereo", sample_rate: int = 16000,
                 started_at: datetime | None = None, clock: Callable[[], float] = time.monotonic) -> CallRecorder:
        """A recorder writing ``<spool_dir>/<session_id>.wav`` whose sidecar names the S3 key."""
        started = started_at or datetime.now(UTC)
        return cls(Path(spool_dir) / f"{_safe(session_id)}.wav", channels=channels, sample_rate=sample_rate,
                   clock=clock, key=recording_key(base_path, session_id, started),
                   metadata={"session_id": session_id, "carrier": carrier, "call_id": call_id,
                             "started_at": started.isoformat()})

    # ------------------------------------------------------------------ feeding

    def caller(self, pcm: bytes, rate: int) -> None:
        """Caller audio (PCM16 LE mono at ``rate``), as it arrives."""
        self._feed(self._caller, pcm, rate)

    def agent(self, pcm: bytes, rate: int) -> None:
        """Agent audio (PCM16 LE mono at ``rate``), as it is sent to the caller."""
        self._feed(self._agent, pcm, rate)

    @property
    def frames_written(self) -> int:
        """Frames (samples per channel) already on disk."""
        return self._flushed

    @property
    def frames_buffered(self) -> int:
        """Frames held in memory, not yet written (the furthest side's lead over the file)."""
        return max(0, self._caller.cursor - self._flushed, self._agent.cursor - self._flushed)

    def _now_frame(self) -> int:
        return max(0, int((self._clock() - self._t0) * self.sample_rate))

    def _feed(self, side: _Side, pcm: bytes, rate: int) -> None:
        with self._lock:
            if not self._closed and self._error is None:
                self._place(side, pcm, rate)

    def _place(self, side: _Side, pcm: bytes, rate: int) -> None:
        if len(pcm) % 2:
            pcm = pcm[:-1]
        data = side.resample(pcm, rate, self.sample_rate)
        now = self._now_frame()
        self._commit(now)  # after a long quiet spell, write the silence before padding up to now
        if data and self._error is None:
            pos = side.cursor if side.cursor >= now - self._jitter else now
            pos = max(pos, self._flushed)
            end = self._flushed + len(side.buf) // 2
            side.buf += bytes(2 * (pos - end))
            side.buf += data
            side.cursor = pos + len(data) // 2
        self._commit(now)

    def _commit(self, now: int, *, final: bool = False) -> None:
        if self._error is not None:
            return
        a, b = self._caller.cursor, self._agent.cursor
        if final:
            upto = max(a, b)
        else:
            upto = max(min(a, b), now - self._hold, max(a, b) - self._max_ahead)
            if upto - self._flushed < self._block:
                return
        try:
            while self._flushed < upto:
                self._write(min(upto - self._flushed, _MAX_WRITE_FRAMES))
        except OSError as exc:
            self._fail(exc)

    def _take(self, side: _Side, frames: int) -> np.ndarray:
        chunk = bytes(side.buf[: 2 * frames])
        del side.buf[: 2 * frames]
        x = np.frombuffer(chunk, "<i2")
        return x if x.size == frames else np.concatenate((x, np.zeros(frames - x.size, "<i2")))

    def _write(self, frames: int) -> None:
        left, right = self._take(self._caller, frames), self._take(self._agent, frames)
        if self._nch == 2:
            out = np.empty(2 * frames, "<i2")
            out[0::2], out[1::2] = left, right
        else:
            out = np.clip(left.astype(np.int32) + right, -32768, 32767).astype("<i2")
        assert self._file is not None
        self._file.write(out.tobytes())
        self._flushed += frames

    def _fail(self, exc: OSError) -> None:
        self._error = exc
        logger.error("recording %s stopped: cannot write %s (%s)", self.path.name, self.part_path, exc)
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
            self._file = None

    # ------------------------------------------------------------------ closing

    def close(self) -> Path:
        """Write what is left, finalise the header, write the sidecar, rename ``.part`` -> final.

        Idempotent, and safe to call from another thread while frames arrive (they are dropped
        from then on). Raises the ``OSError`` that stopped the recording, if one did.
        """
        with self._lock:
            return self._close()

    def _close(self) -> Path:
        if self._closed:
            if self._error is not None:
                raise self._error
            return self.path
        self._closed = True
        if self._error is None:
            self._commit(self._now_frame(), final=True)
        if self._error is not None:
            with contextlib.suppress(OSError):
                self.part_path.unlink()
            raise self._error
        f, self._file = self._file, None
        assert f is not None
        try:
            with f:
                f.flush()
                f.seek(0)
                f.write(_wav_header(self._nch, self.sample_rate, self._flushed * 2 * self._nch))
                f.flush()
                os.fsync(f.fileno())
            if self.key is not None:
                self._write_sidecar()
            os.replace(self.part_path, self.path)
        except OSError as exc:
            self._error = exc
            logger.error("recording %s could not be finalised (%s)", self.path.name, exc)
            raise
        logger.info("recording %s finished: %.1f s %s", self.path.name, self.duration_s, self.channels)
        return self.path

    @property
    def duration_s(self) -> float:
        return self._flushed / self.sample_rate

    def _write_sidecar(self) -> None:
        body = {"key": self.key, **self.metadata, "channels": self.channels, "sample_rate": self.sample_rate,
                "duration_s": round(self.duration_s, 3)}
        tmp = self.sidecar_path.with_name(self.sidecar_path.name + ".tmp")
        with tmp.open("w") as f:
            json.dump(body, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.sidecar_path)


# ---------------------------------------------------------------------------------------- upload


class RecordingUploader:
    """Uploads finished recordings from ``spool_dir`` to S3; owns its worker and scanner tasks.

    Counters for metrics: ``backlog`` (recordings on disk waiting, queued or in flight),
    ``uploaded_total``, ``retries_total`` and ``failures_total`` (uploads that exhausted their
    retries and were left for the scanner).
    """

    def __init__(self, *, bucket: str, base_path: str, spool_dir: Path, worker_count: int = 4,
                 queue_cap: int = 32, max_retries: int = 3, retry_base_s: float = 1.0,
                 respool_interval_s: float = 60.0, multipart_threshold: int = 8 * 1024 * 1024,
                 endpoint_url: str | None = None, region: str | None = None,
                 session: aioboto3.Session | None = None) -> None:
        if not bucket:
            raise ValueError("recording.bucket is empty: set it to the S3 bucket recordings go to")
        if worker_count < 1 or queue_cap < 1 or max_retries < 0:
            raise ValueError(f"recording uploader needs worker_count >= 1, queue_cap >= 1, max_retries >= 0 "
                             f"(got {worker_count}, {queue_cap}, {max_retries})")
        self.bucket = bucket
        self.base_path = base_path
        self.spool_dir = Path(spool_dir)
        self.worker_count = worker_count
        self.max_retries = max_retries
        self.retry_base_s = retry_base_s
        self.respool_interval_s = respool_interval_s
        self.multipart_threshold = multipart_threshold
        self.part_bytes = max(multipart_threshold, MIN_PART_BYTES)
        self.endpoint_url = endpoint_url or None
        self.region = region or None
        self.uploaded_total = 0
        self.retries_total = 0
        self.failures_total = 0
        self._session = session or aioboto3.Session()
        self._queue: asyncio.Queue[Path] = asyncio.Queue(maxsize=queue_cap)
        self._pending: set[str] = set()  # names queued or in flight
        self._waiting: set[str] = set()  # names known to be on disk, not yet uploaded
        self._busy: dict[asyncio.Task[None], bool] = {}
        self._scanner: asyncio.Task[None] | None = None
        self._stack = contextlib.AsyncExitStack()
        self._client: Any = None
        self._closing = asyncio.Event()
        self._started = False

    @classmethod
    def from_config(cls, config: RecordingConfig) -> RecordingUploader:
        """Build from ``config.recording`` (``Config`` already filled endpoint and region from
        AWS_ENDPOINT_URL / AWS_REGION when they were not set)."""
        return cls(bucket=config.bucket, base_path=config.base_path,
                   spool_dir=Path(config.spool_dir) if config.spool_dir else default_spool_dir(),
                   worker_count=config.worker_count, queue_cap=config.queue_cap, max_retries=config.max_retries,
                   retry_base_s=config.retry_base_secs, respool_interval_s=config.respool_interval_secs,
                   multipart_threshold=config.multipart_threshold_bytes,
                   endpoint_url=config.endpoint_url or None, region=config.region or None)

    @property
    def backlog(self) -> int:
        """Recordings waiting on disk, queued or being uploaded."""
        return len(self._waiting)

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Create the spool dir, queue what an earlier process left there, start workers and scanner."""
        if self._started:
            return
        self._started = True
        await asyncio.to_thread(self.spool_dir.mkdir, parents=True, exist_ok=True)
        self._client = await self._stack.enter_async_context(self._session.client(
            "s3", endpoint_url=self.endpoint_url, region_name=self.region,
            config=AioConfig(retries={"total_max_attempts": 1}, connect_timeout=5, read_timeout=60)))
        found, parts = await asyncio.to_thread(self._scan)
        if parts:
            logger.warning("recording spool %s holds %d unfinished recording(s) (.part, left alone): %s",
                           self.spool_dir, len(parts), ", ".join(sorted(parts)[:10]))
        queued = self._enqueue(found)
        if found:
            logger.info("recording spool %s: %d recording(s) waiting, %d queued now, the rest by the scanner",
                        self.spool_dir, len(found), queued)
        for i in range(self.worker_count):
            task = asyncio.create_task(self._worker(), name=f"recording-upload-{i}")
            self._busy[task] = False
        self._scanner = asyncio.create_task(self._rescan_forever(), name="recording-respool")

    async def close(self, timeout_s: float = 10.0) -> None:
        """Stop accepting, let in-flight uploads finish for up to ``timeout_s``, cancel the rest.

        Whatever was not uploaded stays in the spool directory for the next process.
        """
        if self._closing.is_set():
            return
        self._closing.set()
        while not self._queue.empty():  # queued but not started: stays on disk
            self._pending.discard(self._queue.get_nowait().name)
        tasks = list(self._busy)
        for task in tasks:
            if not self._busy[task]:
                task.cancel()
        if self._scanner is not None:
            self._scanner.cancel()
            tasks.append(self._scanner)
        if tasks:
            _, late = await asyncio.wait(tasks, timeout=timeout_s)
            for task in late:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        self._busy.clear()
        await self._stack.aclose()
        self._client = None
        if self._waiting:
            logger.info("recording uploader closed; %d recording(s) stay in %s", len(self._waiting), self.spool_dir)

    async def __aenter__(self) -> RecordingUploader:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ------------------------------------------------------------------ queueing

    def submit(self, path: Path) -> bool:
        """Queue a finished recording (in ``spool_dir``) for upload without blocking.

        Returns False when it was not queued now (queue full, or closing): it stays on disk and
        the scanner queues it later. Submitting a file already queued or in flight returns True.
        """
        path = Path(path)
        if path.parent.resolve() != self.spool_dir.resolve():
            raise ValueError(f"recording {path} is not in the spool directory {self.spool_dir}; "
                             "create it with CallRecorder.for_call(uploader.spool_dir, ...)")
        self._waiting.add(path.name)
        if self._closing.is_set():
            logger.warning("recording %s not queued: the uploader is closing; it stays in %s",
                           path.name, self.spool_dir)
            return False
        if path.name in self._pending:
            return True
        try:
            self._queue.put_nowait(path)
        except asyncio.QueueFull:
            logger.warning("recording upload queue full (%d); %s stays in %s for the next scan",
                           self._queue.maxsize, path.name, self.spool_dir)
            return False
        self._pending.add(path.name)
        return True

    def _enqueue(self, names: list[str]) -> int:
        """Queue spooled names until the queue is full (quietly: the rest wait for the next scan)."""
        queued = 0
        for name in names:
            self._waiting.add(name)
            if name in self._pending or self._closing.is_set():
                continue
            try:
                self._queue.put_nowait(self.spool_dir / name)
            except asyncio.QueueFull:
                continue
            self._pending.add(name)
            queued += 1
        return queued

    def _scan(self) -> tuple[list[str], list[str]]:
        """(finished recordings oldest first, unfinished .part names); removes orphaned sidecars."""
        try:
            entries = list(os.scandir(self.spool_dir))
        except FileNotFoundError:
            return [], []
        names = {e.name for e in entries}
        finished, parts = [], []
        for e in entries:
            if e.name.endswith(".wav" + PART_SUFFIX):
                parts.append(e.name)
            elif e.name.endswith(".wav") and e.is_file():
                with contextlib.suppress(OSError):
                    finished.append((e.stat().st_mtime, e.name))
            elif e.name.endswith(".wav" + SIDECAR_SUFFIX):
                wav = self.spool_dir / e.name[: -len(SIDECAR_SUFFIX)]
                # an upload finished but the process stopped before removing its sidecar; check the
                # .part before the .wav, as a recorder renames one to the other during the scan
                if (wav.name not in names and wav.name + PART_SUFFIX not in names
                        and not wav.with_name(wav.name + PART_SUFFIX).exists() and not wav.exists()):
                    with contextlib.suppress(OSError):
                        if time.time() - e.stat().st_mtime > _ORPHAN_AGE_S:
                            os.unlink(e.path)
        return [n for _, n in sorted(finished)], parts

    async def _rescan_forever(self) -> None:
        while True:
            await asyncio.sleep(self.respool_interval_s)
            try:
                found, _ = await asyncio.to_thread(self._scan)
            except OSError as exc:
                logger.error("recording spool %s cannot be scanned (%s)", self.spool_dir, exc)
                continue
            self._waiting.intersection_update(set(found) | self._pending)
            queued = self._enqueue(found)
            if queued:
                logger.info("recording spool: queued %d waiting recording(s) again", queued)

    # ------------------------------------------------------------------ uploading

    async def _worker(self) -> None:
        me = asyncio.current_task()
        assert me is not None
        while not self._closing.is_set():
            path = await self._queue.get()
            self._busy[me] = True
            try:
                await self._upload_with_retries(path)
            finally:
                self._busy[me] = False
                self._pending.discard(path.name)
                self._queue.task_done()

    async def _upload_with_retries(self, path: Path) -> None:
        for attempt in range(self.max_retries + 1):
            try:
                key, size, multipart = await self._upload(path)
            except FileNotFoundError:
                logger.info("recording %s is no longer in the spool (already uploaded?)", path.name)
                self._waiting.discard(path.name)
                return
            except Exception as exc:  # noqa: BLE001 - botocore ClientError, connection errors, timeouts, OSError
                if attempt == self.max_retries or self._closing.is_set():
                    self.failures_total += 1
                    logger.error("recording %s upload failed after %d attempt(s) (%s: %s); it stays in %s "
                                 "and is retried by the next scan", path.name, attempt + 1,
                                 type(exc).__name__, exc, self.spool_dir)
                    return
                delay = self.retry_base_s * 2 ** attempt
                self.retries_total += 1
                logger.warning("recording %s upload attempt %d failed (%s: %s); retrying in %.2f s",
                               path.name, attempt + 1, type(exc).__name__, exc, delay)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._closing.wait(), delay)
                if self._closing.is_set():
                    return  # closing: the file stays spooled for the next process
                continue
            self.uploaded_total += 1
            self._waiting.discard(path.name)
            await asyncio.to_thread(self._remove, path)
            logger.info("recording %s uploaded to s3://%s/%s (%d bytes%s)", path.name, self.bucket, key,
                        size, ", multipart" if multipart else "")
            return

    @staticmethod
    def _remove(path: Path) -> None:
        path.unlink(missing_ok=True)
        path.with_name(path.name + SIDECAR_SUFFIX).unlink(missing_ok=True)

    def _describe(self, path: Path) -> tuple[str, dict[str, str]]:
        """(S3 key, S3 metadata) from the sidecar; without one, ``base_path`` + the file name."""
        sidecar = path.with_name(path.name + SIDECAR_SUFFIX)
        fallback = f"{self.base_path.strip('/')}/{path.name}".lstrip("/")
        try:
            info = json.loads(sidecar.read_text())
        except FileNotFoundError:
            logger.warning("recording %s has no sidecar; uploading it as %s", path.name, fallback)
            return fallback, {}
        except ValueError as exc:
            logger.warning("recording sidecar %s is not valid JSON (%s); uploading as %s", sidecar.name, exc, fallback)
            return fallback, {}
        key = info.get("key") if isinstance(info, dict) else None
        if not isinstance(key, str) or not key:
            logger.warning("recording sidecar %s names no key; uploading as %s", sidecar.name, fallback)
            return fallback, {}
        meta = {k.replace("_", "-"): _NOT_HEADER_SAFE.sub("_", str(v)) for k, v in info.items()
                if k in _S3_METADATA and v != ""}
        return key, meta

    async def _upload(self, path: Path) -> tuple[str, int, bool]:
        size = (await asyncio.to_thread(path.stat)).st_size
        key, meta = await asyncio.to_thread(self._describe, path)
        s3, extra = self._client, {"ContentType": "audio/wav", "Metadata": meta}
        if s3 is None:
            raise RuntimeError("recording uploader is not started")
        if size < self.multipart_threshold:
            body = await asyncio.to_thread(path.read_bytes)
            await s3.put_object(Bucket=self.bucket, Key=key, Body=body, **extra)
            return key, size, False
        upload_id = (await s3.create_multipart_upload(Bucket=self.bucket, Key=key, **extra))["UploadId"]
        try:
            parts = []
            with path.open("rb") as f:
                number = 1
                while chunk := await asyncio.to_thread(f.read, self.part_bytes):
                    done = await s3.upload_part(Bucket=self.bucket, Key=key, UploadId=upload_id,
                                                PartNumber=number, Body=chunk)
                    parts.append({"ETag": done["ETag"], "PartNumber": number})
                    number += 1
            await s3.complete_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id,
                                               MultipartUpload={"Parts": parts})
        except Exception:  # on cancellation the parts are left to the bucket's lifecycle rules
            with contextlib.suppress(Exception):
                async with asyncio.timeout(5):
                    await s3.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
            raise
        return key, size, True
