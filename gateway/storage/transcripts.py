"""Transcripts: every utterance of a call, written to a SQL table in batches, through database outages.

Usage::

    writer = TranscriptWriter.from_config(config.transcripts)
    await writer.start()          # never fails because the database is down; connects in the background
    writer.add(TranscriptRow(session_id=session.id, seq=3, carrier="twilio", call_id="CA...",
                             from_number="+15550001", to_number="+15550002", persona="concierge",
                             role="assistant", text="Your table is booked.", started_at=t0, ended_at=t1,
                             latency={"stt_ms": 180.0, "llm_first_token_ms": 420.0}))
    ...
    await writer.close(timeout_s=5)   # writes what it can; spools the rest for the next start

``add()`` never blocks and never raises. A writer task inserts the buffered rows ``batch_size`` at a time
(one statement per batch), at most ``flush_interval_s`` after the first of them was buffered. The table
(``driver="postgres"``: asyncpg; ``driver="sqlite"``: the stdlib module in a worker thread) is created if
absent. ``(session_id, seq)`` is unique and inserts skip rows already present, so a batch retried after an
ambiguous failure (committed, reply lost) or replayed from the spool is stored once.

When the database is unreachable the rows stay buffered, the writer reconnects with exponential backoff
(``retry_base_s``, doubling, at most 30 s), logs the outage once at error level and the recovery at info,
then writes everything. Beyond ``max_buffered_rows`` the oldest rows spill to fsync'd JSONL files in the
spool directory, which are replayed and deleted once the database answers, also by the next process
(``close()`` spools whatever it could not write). A row the database refuses (invalid data) goes to a
``rejected-*.jsonl`` file there, with an error log line. Nothing is dropped silently.

A PostgreSQL role that may not create tables needs the table created beforehand (by a first run as its owner,
or from the same DDL) and, at least::

    GRANT INSERT, SELECT (session_id, seq) ON call_transcripts TO voxray;   -- SELECT: the ON CONFLICT target
    GRANT USAGE ON SEQUENCE call_transcripts_id_seq TO voxray;

The spool directory is ``<spool_dir>/<table>-<hash of driver, DSN without password and table>``, so
instances writing to different databases never replay each other's rows. Metrics: ``backlog``,
``written_total``, ``failures_total``, ``connected``, ``batches_total``, ``spilled_total``,
``rejected_total``. Logs never carry the DSN's password nor transcript text (debug lines give lengths).
Call ``add()`` from the event loop's thread only. The database backends are in ``gateway.storage.transcript_stores``,
the spool files in ``gateway.storage.transcript_spool``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import tempfile
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal, NamedTuple

from gateway.storage.transcript_spool import read_jsonl, scan_spool, set_aside, write_jsonl
from gateway.storage.transcript_stores import (
    Backend,
    PostgresBackend,
    SqliteBackend,
    describe_error,
    in_thread,
    mask_dsn,
    secrets_of,
)

if TYPE_CHECKING:
    from gateway.config import TranscriptsConfig

__all__ = ["LATENCY_KEYS", "MAX_RETRY_S", "TranscriptRow", "TranscriptWriter"]

logger = logging.getLogger(__name__)

LATENCY_KEYS = ("turn_wait_ms", "stt_ms", "llm_first_token_ms", "tts_first_audio_ms", "first_audio_out_ms")
MAX_RETRY_S = 30.0              # the reconnect backoff never waits longer than this

_INT4_MAX = 2**31 - 1
_TEXT_FIELDS = ("session_id", "carrier", "call_id", "from_number", "to_number", "persona", "text")


# ------------------------------------------------------------------------------------------------- the row

@dataclass(frozen=True, slots=True)
class TranscriptRow:
    """One utterance: who said what, when, and how long each stage took to answer it.

    ``seq`` numbers the utterances of a session (1, 2, 3 ...); ``(session_id, seq)`` identifies the row,
    so adding the same row twice stores it once. ``started_at``/``ended_at`` are epoch seconds.
    ``latency`` (agent turns) maps names from ``LATENCY_KEYS`` to milliseconds.

    >>> row = TranscriptRow(session_id="s1", seq=1, carrier="twilio", call_id="CA1", from_number="+1555",
    ...                     to_number="+1666", persona="default", role="user", text="hi",
    ...                     started_at=1.0, ended_at=2.0)
    >>> TranscriptRow.from_json(row.to_json()) == row
    True
    """

    session_id: str
    seq: int
    carrier: str
    call_id: str
    from_number: str
    to_number: str
    persona: str
    role: Literal["user", "assistant"]
    text: str
    started_at: float
    ended_at: float
    latency: Mapping[str, float] | None = None

    def __post_init__(self) -> None:
        for name in _TEXT_FIELDS:
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"TranscriptRow.{name} must be a str (got {type(getattr(self, name)).__name__})")
        if self.role not in ("user", "assistant"):
            raise ValueError(f"TranscriptRow.role must be 'user' or 'assistant' (got {self.role!r})")
        if isinstance(self.seq, bool) or not isinstance(self.seq, int) or not 0 <= self.seq <= _INT4_MAX:
            raise ValueError(f"TranscriptRow.seq must be an int from 0 to {_INT4_MAX} (got {self.seq!r})")
        for name in ("started_at", "ended_at"):
            if not _finite(getattr(self, name)):
                raise ValueError(f"TranscriptRow.{name} must be finite epoch seconds (got {getattr(self, name)!r})")
        if self.latency is not None:
            bad = {k: v for k, v in self.latency.items() if not isinstance(k, str) or not _finite(v)}
            if bad:
                raise ValueError(f"TranscriptRow.latency must map names to finite milliseconds (got {bad!r})")
            object.__setattr__(self, "latency", {k: float(v) for k, v in self.latency.items()})

    def to_json(self) -> str:
        """One line of JSON (the spool's format)."""
        return json.dumps(dataclasses.asdict(self), separators=(",", ":"), allow_nan=False)

    @classmethod
    def from_json(cls, line: str | bytes) -> TranscriptRow:
        """The row ``to_json()`` wrote. Raises ValueError or TypeError on anything else."""
        data = json.loads(line)
        if not isinstance(data, dict):
            raise ValueError("a transcript row must be a JSON object")
        return cls(**data)


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# -------------------------------------------------------------------------------------------------- writer

class _Entry(NamedTuple):
    ordinal: int            # the order of add() calls: flush() waits for the rows added before it
    added_at: float         # time.monotonic() when buffered
    row: TranscriptRow


@dataclass(slots=True)
class _SpoolFile:
    first: int              # smallest ordinal in the file (-1: left by an earlier process)
    rows: int
    done: int = 0           # rows of it already written (a replay resumes here after a failure)


class TranscriptWriter:
    """Buffers transcript rows and writes them in batches; survives database outages (see the module doc).

    Example::

        writer = TranscriptWriter(driver="sqlite", dsn="/var/lib/voxray/transcripts.db",
                                  table_name="call_transcripts", batch_size=100, flush_interval_s=1.0,
                                  retry_base_s=0.5, max_buffered_rows=100_000,
                                  spool_dir=Path("/var/spool/voxray-transcripts"))
        await writer.start()
        writer.add(row)
        assert await writer.flush(timeout_s=5)
        await writer.close(timeout_s=5)
    """

    def __init__(self, *, driver: str, dsn: str, table_name: str,
                 batch_size: int, flush_interval_s: float, retry_base_s: float, max_buffered_rows: int,
                 spool_dir: Path, connect_timeout_s: float = 10.0, command_timeout_s: float = 30.0) -> None:
        if not table_name.isidentifier():
            raise ValueError(f"table_name must be a plain SQL identifier such as call_transcripts "
                             f"(got {table_name!r})")
        if min(batch_size, max_buffered_rows) < 1 or min(flush_interval_s, retry_base_s) <= 0:
            raise ValueError("batch_size, max_buffered_rows, flush_interval_s and retry_base_s must be > 0")
        self._backend: Backend
        if driver == "postgres":
            self._backend = PostgresBackend(dsn, table_name, connect_timeout_s, command_timeout_s)
            self._target = mask_dsn(dsn)
        elif driver == "sqlite":
            self._backend = SqliteBackend(dsn, table_name)
            self._target = f"sqlite:{dsn}"
        else:
            raise ValueError(f"driver must be 'postgres' or 'sqlite' (got {driver!r})")
        self._secrets = secrets_of(dsn)
        key = hashlib.sha256(f"{driver}\n{mask_dsn(dsn)}\n{table_name}".encode()).hexdigest()[:16]
        self._spool_dir = Path(spool_dir) / f"{table_name}-{key}"
        self._batch_size = batch_size
        self._flush_interval_s = flush_interval_s
        self._retry_base_s = retry_base_s
        self._max_rows = max_buffered_rows

        self._buffer: deque[_Entry] = deque()       # sorted by ordinal
        self._inflight: list[_Entry] = []            # the batch being inserted
        self._spilling: list[_Entry] = []            # the rows being written to a spool file
        self._spool: dict[Path, _SpoolFile] = {}     # oldest first
        self._spool_rows = 0
        self._replay_cache: tuple[Path, list[TranscriptRow], list[str]] | None = None
        self._next_ordinal = 0

        self._wake = asyncio.Event()         # rows arrived / a flush wants them now / a spool file appeared
        self._retry_now = asyncio.Event()    # flush(): cut the backoff short once
        self._spill_wake = asyncio.Event()
        self._progress = asyncio.Event()     # something was written: flush() re-checks
        self._flushing = 0
        self._delay = retry_base_s
        self._outage_since: float | None = None
        self._spill_failing = False
        self._spill_warned = False
        self._writer_task: asyncio.Task[None] | None = None
        self._spill_task: asyncio.Task[None] | None = None
        self._closing = False
        self._closed = False

        self._connected = False
        self._written_total = 0
        self._failures_total = 0
        self._batches_total = 0
        self._spilled_total = 0
        self._rejected_total = 0

    @classmethod
    def from_config(cls, config: TranscriptsConfig) -> TranscriptWriter:
        """A writer for ``Config.transcripts`` (``spool_dir=""`` means ``<tmp>/voxray-transcripts``)."""
        spool = Path(config.spool_dir) if config.spool_dir else Path(tempfile.gettempdir()) / "voxray-transcripts"
        return cls(driver=config.driver, dsn=config.dsn, table_name=config.table_name,
                   batch_size=config.batch_size, flush_interval_s=config.flush_interval_secs,
                   retry_base_s=config.retry_base_secs, max_buffered_rows=config.max_buffered_rows,
                   spool_dir=spool)

    # ------------------------------------------------------------------------------------------ metrics

    @property
    def backlog(self) -> int:
        """Rows not yet written: in memory, being inserted, being spilled, and in spool files."""
        return len(self._buffer) + len(self._inflight) + len(self._spilling) + self._spool_rows

    @property
    def connected(self) -> bool:
        return self._connected

    @property
    def written_total(self) -> int:
        """Rows the database acknowledged (including rows it already held)."""
        return self._written_total

    @property
    def failures_total(self) -> int:
        """Failed connection attempts and failed inserts."""
        return self._failures_total

    @property
    def batches_total(self) -> int:
        """Successful INSERT statements (one per batch)."""
        return self._batches_total

    @property
    def spilled_total(self) -> int:
        return self._spilled_total

    @property
    def rejected_total(self) -> int:
        """Rows the database refused as invalid; kept in ``rejected-*.jsonl`` in the spool directory."""
        return self._rejected_total

    @property
    def spool_path(self) -> Path:
        """This writer's spool directory (under the configured ``spool_dir``)."""
        return self._spool_dir

    # ----------------------------------------------------------------------------------------- public API

    async def start(self) -> None:
        """Find spool files left by earlier runs and start writing in the background. Never waits for the
        database, and does not fail when it is down."""
        if self._closed:
            raise RuntimeError("TranscriptWriter.start() after close()")
        if self._writer_task is not None:
            return
        try:
            leftover = await in_thread(scan_spool, self._spool_dir)
        except OSError as exc:
            logger.error("transcripts: cannot read the spool directory %s (%s)", self._spool_dir, exc)
            leftover = []
        for path, rows in leftover:
            self._spool.setdefault(path, _SpoolFile(first=-1, rows=rows))
            self._spool_rows += rows
        if leftover:
            logger.info("transcripts: %d rows in %d spool files from an earlier run will be written to %s",
                        sum(n for _, n in leftover), len(leftover), self._target)
        self._writer_task = asyncio.create_task(self._run_writer(), name="transcripts-writer")
        self._spill_task = asyncio.create_task(self._run_spiller(), name="transcripts-spill")

    def add(self, row: TranscriptRow) -> None:
        """Buffer one row for writing. Never blocks, never raises."""
        try:
            if self._closed:
                self._spool_after_close(row)
                return
            self._buffer.append(_Entry(self._next_ordinal, time.monotonic(), row))
            self._next_ordinal += 1
            if len(self._buffer) == 1 or len(self._buffer) >= self._batch_size:
                self._wake.set()
            if len(self._buffer) > self._max_rows:
                self._spill_wake.set()
        except Exception:       # noqa: BLE001 - a transcript must never break a call
            logger.exception("transcripts: could not buffer a row (session %s)", getattr(row, "session_id", "?"))

    async def flush(self, timeout_s: float = 5.0) -> bool:
        """Wait until every row added before this call is written (or set aside as rejected).

        Returns:
            True when they are, False when ``timeout_s`` passed first (e.g. during an outage).
        """
        target = self._next_ordinal
        if self._min_pending() >= target:
            return True
        if self._writer_task is None or self._writer_task.done():
            return False
        self._flushing += 1
        self._wake.set()
        self._retry_now.set()
        try:
            async with asyncio.timeout(timeout_s):
                while self._min_pending() < target:
                    self._progress.clear()
                    await self._progress.wait()
            return True
        except TimeoutError:
            return False
        finally:
            self._flushing -= 1

    async def close(self, timeout_s: float = 5.0) -> None:
        """Write what can be written within ``timeout_s``; spool the rest for the next start; disconnect."""
        if self._closed or self._closing:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        if self._writer_task is not None:
            await self.flush(timeout_s)
        self._closing = True
        if self._spill_task is not None:
            self._spill_wake.set()
            await self._spill_task           # it finishes the file it is writing, then stops
        if self._writer_task is not None:
            self._writer_task.cancel()       # an insert in flight goes back to the buffer: spooled below
            with contextlib.suppress(asyncio.CancelledError):
                await self._writer_task
        self._closed = True
        if self._buffer:
            entries = list(self._buffer)
            try:
                path = await in_thread(write_jsonl, self._spool_dir, "spool", [e.row.to_json() for e in entries])
            except OSError as exc:
                logger.critical("transcripts: %d rows could neither be written to %s nor spooled to %s (%s); "
                                "they are lost", len(entries), self._target, self._spool_dir, exc)
            else:
                self._spool[path] = _SpoolFile(first=entries[0].ordinal, rows=len(entries))
                self._spool_rows += len(entries)
                self._spilled_total += len(entries)
                logger.warning("transcripts: %d rows not written before shutdown; kept in %s for the next start",
                               len(entries), path)
            self._buffer.clear()
        elif self._spool_rows:
            logger.warning("transcripts: %d spooled rows not written before shutdown; the next start writes "
                           "them", self._spool_rows)
        await self._backend.close(max(0.5, deadline - loop.time()))
        self._connected = False
        self._progress.set()

    # ------------------------------------------------------------------------------------------ the writer

    async def _run_writer(self) -> None:
        while True:
            try:
                if not self._connected:
                    await self._backend.connect()
                    self._connected = True
                    logger.debug("transcripts: connected to %s", self._target)
                    if not self._buffer and not self._spool:
                        self._recovered()
                if self._spool:
                    await self._replay_next()
                    continue
                batch = await self._take_batch()
                if batch:
                    await self._write([e.row for e in batch])
                    self._inflight = []
                    self._recovered()
                    self._progress.set()
            except asyncio.CancelledError:
                self._requeue_inflight()
                raise
            except Exception as exc:        # noqa: BLE001 - any failure: keep the rows, reconnect, retry
                self._requeue_inflight()
                self._failed(exc)
                await self._backoff()

    async def _take_batch(self) -> list[_Entry]:
        """Wait until a batch is due (full, old enough, or a flush wants it) and move it to ``_inflight``."""
        while not self._spool:
            timeout: float | None = None
            if self._buffer:
                waited = time.monotonic() - self._buffer[0].added_at
                if len(self._buffer) >= self._batch_size or self._flushing or waited >= self._flush_interval_s:
                    take = min(self._batch_size, len(self._buffer))
                    self._inflight = [self._buffer.popleft() for _ in range(take)]
                    return self._inflight
                timeout = self._flush_interval_s - waited
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._wake.wait()
        return []

    async def _write(self, rows: Sequence[TranscriptRow]) -> None:
        try:
            stored = await self._backend.insert(rows)
        except Exception as exc:
            if not self._backend.is_data_error(exc):
                raise
            await self._write_one_by_one(rows, exc)
            return
        self._batches_total += 1
        self._written_total += len(rows)
        logger.debug("transcripts: wrote %d rows (%d new, %d text chars)", len(rows), stored,
                     sum(len(r.text) for r in rows))

    async def _write_one_by_one(self, rows: Sequence[TranscriptRow], first: BaseException) -> None:
        """A batch the database refused as invalid: write its rows alone; set aside the ones it refuses."""
        rejected = []
        for row in rows:
            try:
                await self._backend.insert([row])
            except Exception as exc:
                if not self._backend.is_data_error(exc):
                    raise
                rejected.append(row)
            else:
                self._batches_total += 1
                self._written_total += 1
        if rejected:
            path = await in_thread(write_jsonl, self._spool_dir, "rejected", [r.to_json() for r in rejected])
            self._rejected_total += len(rejected)
            logger.error("transcripts: %s refused %d rows as invalid (%s); kept in %s", self._target,
                         len(rejected), describe_error(first, self._secrets, rows_at_fault=True), path)

    async def _replay_next(self) -> None:
        """Write the oldest spool file, batch by batch, then delete it."""
        path, spooled = next(iter(self._spool.items()))
        if self._replay_cache is None or self._replay_cache[0] != path:
            try:
                rows, bad = await in_thread(read_jsonl, path, TranscriptRow.from_json)
            except FileNotFoundError:           # another process sharing the spool replayed it
                self._forget(path)
                return
            except OSError as exc:              # skipped, not retried: it would hold back every later row
                logger.error("transcripts: cannot read spool file %s (%s); leaving it for the next start",
                             path, exc)
                self._forget(path)
                return
            self._replay_cache = (path, rows, bad)
        _, rows, bad = self._replay_cache
        if spooled.rows != len(rows) + len(bad):         # the scan's line count was an estimate
            self._spool_rows += len(rows) + len(bad) - spooled.rows
            spooled.rows = len(rows) + len(bad)
        while spooled.done < len(rows):
            chunk = rows[spooled.done:spooled.done + self._batch_size]
            await self._write(chunk)
            spooled.done += len(chunk)
            self._spool_rows -= len(chunk)
            self._recovered()
        try:
            if bad:
                kept = await in_thread(set_aside, path, bad)
                logger.error("transcripts: %d unreadable lines in spool file %s; kept in %s", len(bad), path.name,
                             kept)
            else:
                await in_thread(path.unlink, True)
        except OSError as exc:                  # written already; replaying it again later stores nothing twice
            logger.error("transcripts: wrote spool file %s but cannot delete it (%s)", path, exc)
        logger.debug("transcripts: replayed %d spooled rows from %s", len(rows), path.name)
        self._forget(path)
        self._progress.set()

    def _forget(self, path: Path) -> None:
        spooled = self._spool.pop(path, None)
        if spooled is not None:
            self._spool_rows -= spooled.rows - spooled.done
        if self._replay_cache is not None and self._replay_cache[0] == path:
            self._replay_cache = None
        self._progress.set()

    def _requeue_inflight(self) -> None:
        if self._inflight:
            self._buffer.extendleft(reversed(self._inflight))
            self._inflight = []
            if len(self._buffer) > self._max_rows:
                self._spill_wake.set()

    def _failed(self, exc: BaseException) -> None:
        self._failures_total += 1
        self._connected = False
        with contextlib.suppress(Exception):
            self._backend.drop()
        if self._outage_since is None:
            self._outage_since = time.monotonic()
            logger.error("transcripts: cannot write to %s (%s); keeping %d rows and retrying with backoff "
                         "(%g s doubling, at most %g s)", self._target, describe_error(exc, self._secrets),
                         self.backlog, self._retry_base_s, MAX_RETRY_S)
        else:
            logger.debug("transcripts: still failing (%s); next attempt in %g s",
                         describe_error(exc, self._secrets), self._delay)

    def _recovered(self) -> None:
        self._delay = self._retry_base_s
        if self._outage_since is not None:
            logger.info("transcripts: writing to %s again after %.1f s; %d rows still to write", self._target,
                        time.monotonic() - self._outage_since, self.backlog)
            self._outage_since = None
            self._spill_warned = False

    async def _backoff(self) -> None:
        delay, self._delay = self._delay, min(self._delay * 2, MAX_RETRY_S)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(delay):
                await self._retry_now.wait()
        self._retry_now.clear()

    def _min_pending(self) -> int:
        firsts = [self._next_ordinal]
        for rows in (self._buffer, self._inflight, self._spilling):
            if rows:
                firsts.append(rows[0].ordinal)
        firsts.extend(f.first for f in self._spool.values())
        return min(firsts)

    # ----------------------------------------------------------------------------------------- spilling

    async def _run_spiller(self) -> None:
        """Move the oldest rows to a spool file whenever more than ``max_buffered_rows`` are in memory."""
        delay = self._retry_base_s
        while not self._closing:
            if len(self._buffer) <= self._max_rows:
                self._spill_wake.clear()
                await self._spill_wake.wait()
                continue
            keep = self._max_rows // 2
            self._spilling = [self._buffer.popleft() for _ in range(len(self._buffer) - keep)]
            entries = self._spilling
            try:
                path = await in_thread(write_jsonl, self._spool_dir, "spool", [e.row.to_json() for e in entries])
            except asyncio.CancelledError:
                self._unspill(entries)
                raise
            except OSError as exc:
                self._unspill(entries)
                if not self._spill_failing:
                    logger.error("transcripts: cannot spill to %s (%s); keeping %d rows in memory",
                                 self._spool_dir, exc, len(self._buffer))
                self._spill_failing = True
                self._spill_wake.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):        # close() cuts this short
                        await self._spill_wake.wait()
                delay = min(delay * 2, MAX_RETRY_S)
                continue
            self._spilling = []
            delay = self._retry_base_s
            self._spill_failing = False
            self._spool[path] = _SpoolFile(first=entries[0].ordinal, rows=len(entries))
            self._spool_rows += len(entries)
            self._spilled_total += len(entries)
            log = logger.debug if self._spill_warned else logger.warning     # once per outage
            self._spill_warned = True
            log("transcripts: more than %d rows buffered; spilled the oldest %d to %s", self._max_rows,
                len(entries), path)
            self._wake.set()

    def _unspill(self, entries: list[_Entry]) -> None:
        self._spilling = []
        self._buffer = deque(sorted([*entries, *self._buffer], key=lambda e: e.ordinal))

    def _spool_after_close(self, row: TranscriptRow) -> None:
        try:
            path = write_jsonl(self._spool_dir, "spool", [row.to_json()])
        except OSError as exc:
            logger.critical("transcripts: a row added after close() could not be spooled (%s); it is lost", exc)
        else:
            logger.error("transcripts: a row was added after close(); kept in %s for the next start", path)
