"""Tests for gateway.storage.transcripts: a private PostgreSQL (tests/pg_server.py) that the tests stop, crash and
restart while rows arrive, and sqlite in a temporary file. They drive gateway.storage.transcript_stores and
gateway.storage.transcript_spool through the writer."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sqlite3
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from gateway.storage.transcripts import TranscriptRow, TranscriptWriter
from tests.pg_server import PgServer

PASSWORD = "s3cret-pw-never-logged"      # trust auth ignores it; the logs must not show it
LATENCY = {"turn_wait_ms": 310.0, "stt_ms": 180.5, "llm_first_token_ms": 420.25, "tts_first_audio_ms": 95.0,
           "first_audio_out_ms": 1005.75}


@pytest.fixture(scope="module")
def pg_server() -> Iterator[PgServer]:
    server = PgServer()                  # raises PgServerError (the test errors, never skips) if it cannot
    try:
        server.start()
        yield server
    finally:
        server.destroy()


@pytest.fixture
def pg(pg_server: PgServer) -> Iterator[PgServer]:
    pg_server.start()                    # a test that failed while the server was stopped left it stopped
    yield pg_server
    pg_server.start()


@pytest.fixture
def table() -> str:
    return f"t_{uuid.uuid4().hex[:12]}"


def dsn_of(pg: PgServer) -> str:
    return pg.dsn.replace("postgres@", f"postgres:{PASSWORD}@")


def make_row(session: str, seq: int, **fields: Any) -> TranscriptRow:
    values: dict[str, Any] = {
        "session_id": session, "seq": seq, "carrier": "twilio", "call_id": f"CA-{session}",
        "from_number": "+15550001", "to_number": "+15550002", "persona": "concierge",
        "role": "user" if seq % 2 else "assistant", "text": f"secret words {session}/{seq}",
        "started_at": 1_700_000_000.125 + seq, "ended_at": 1_700_000_001.5 + seq,
        "latency": None if seq % 2 else LATENCY}
    values.update(fields)
    return TranscriptRow(**values)


def writer_for(dsn: str, table: str, spool: Path, **options: Any) -> TranscriptWriter:
    settings: dict[str, Any] = {"driver": "postgres", "dsn": dsn, "table_name": table, "batch_size": 100,
                                "flush_interval_s": 0.05, "retry_base_s": 0.05, "max_buffered_rows": 100_000,
                                "spool_dir": spool}
    settings.update(options)
    return TranscriptWriter(**settings)


@contextlib.asynccontextmanager
async def running(writer: TranscriptWriter) -> AsyncIterator[TranscriptWriter]:
    await writer.start()
    try:
        yield writer
    finally:
        await writer.close(timeout_s=2)


async def wait_until(predicate: Callable[[], bool], what: str, timeout_s: float = 10.0) -> None:
    try:
        async with asyncio.timeout(timeout_s):
            while not predicate():
                await asyncio.sleep(0.01)
    except TimeoutError:
        pytest.fail(f"timed out after {timeout_s} s waiting for {what}")


async def query(dsn: str, sql: str, *args: Any) -> list[asyncpg.Record]:
    con = await asyncpg.connect(dsn)
    try:
        return list(await con.fetch(sql, *args))
    finally:
        await con.close()


async def execute(dsn: str, sql: str) -> None:
    con = await asyncpg.connect(dsn)
    try:
        await con.execute(sql)
    finally:
        await con.close()


async def keys_in(dsn: str, table: str) -> list[tuple[str, int, int]]:
    rows = await query(dsn, f'SELECT session_id, seq, count(*) AS n FROM "{table}" GROUP BY 1, 2 ORDER BY 1, 2')
    return [(r["session_id"], r["seq"], r["n"]) for r in rows]


def spool_files(writer: TranscriptWriter, pattern: str = "spool-*") -> list[Path]:
    """Spool files, including ``.part`` files being written (``pattern="spool-*.jsonl"``: finished ones)."""
    return sorted(writer.spool_path.glob(pattern)) if writer.spool_path.exists() else []


def spooled_rows(writer: TranscriptWriter) -> list[TranscriptRow]:
    return [TranscriptRow.from_json(line) for path in spool_files(writer, "spool-*.jsonl")
            for line in path.read_text().splitlines()]


def transcript_logs(caplog: pytest.LogCaptureFixture, level: int) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "gateway.storage.transcripts" and r.levelno == level]


# -------------------------------------------------------------------------------------------------- the row

def test_row_json_round_trip_and_validation() -> None:
    row = make_row("s1", 2, text="héllo \U0001f600 \"quoted\"\n")
    assert row.latency == LATENCY
    assert TranscriptRow.from_json(row.to_json()) == row
    assert TranscriptRow.from_json(make_row("s1", 1).to_json()).latency is None
    with pytest.raises(ValueError, match="role must be 'user' or 'assistant'"):
        make_row("s1", 1, role="system")
    with pytest.raises(ValueError, match="seq must be an int"):
        make_row("s1", -1)
    with pytest.raises(ValueError, match="started_at must be finite"):
        make_row("s1", 1, started_at=float("nan"))
    with pytest.raises(ValueError, match="latency must map names to finite milliseconds"):
        make_row("s1", 2, latency={"stt_ms": float("inf")})


# ------------------------------------------------------------------------------------------ PostgreSQL, up

@pytest.mark.asyncio
async def test_creates_the_table_and_writes_every_field(pg: PgServer, table: str, tmp_path: Path) -> None:
    dsn = dsn_of(pg)
    async with running(writer_for(dsn, table, tmp_path)) as writer:
        await wait_until(lambda: writer.connected, "the first connection")
        columns = await query(dsn, "SELECT column_name, data_type, is_nullable FROM information_schema.columns "
                                   "WHERE table_name = $1 ORDER BY ordinal_position", table)
        assert [(c["column_name"], c["data_type"]) for c in columns] == [
            ("id", "bigint"), ("session_id", "text"), ("seq", "integer"), ("carrier", "text"),
            ("call_id", "text"), ("from_number", "text"), ("to_number", "text"), ("persona", "text"),
            ("role", "text"), ("text", "text"), ("started_at", "timestamp with time zone"),
            ("ended_at", "timestamp with time zone"), ("latency", "jsonb"),
            ("created_at", "timestamp with time zone")]
        indexes = [r["indexdef"] for r in await query(dsn, "SELECT indexdef FROM pg_indexes WHERE tablename = $1",
                                                      table)]
        assert any("UNIQUE" in d and "(session_id, seq)" in d for d in indexes), indexes

        user = make_row("call-1", 1, text="I'd like a table\x00 for two, café ☕")
        agent = make_row("call-1", 2)
        writer.add(user)
        writer.add(agent)
        assert await writer.flush(timeout_s=10)
        assert (writer.backlog, writer.written_total, writer.failures_total) == (0, 2, 0)

    stored = await query(dsn, f'SELECT *, extract(epoch FROM started_at)::float8 AS t0, '
                              f'extract(epoch FROM ended_at)::float8 AS t1 FROM "{table}" ORDER BY seq')
    assert len(stored) == 2
    for got, sent in zip(stored, (user, agent), strict=True):
        assert (got["session_id"], got["seq"], got["carrier"], got["call_id"], got["from_number"],
                got["to_number"], got["persona"], got["role"]) == (
            sent.session_id, sent.seq, sent.carrier, sent.call_id, sent.from_number, sent.to_number,
            sent.persona, sent.role)
        assert got["t0"] == pytest.approx(sent.started_at, abs=1e-6)
        assert got["t1"] == pytest.approx(sent.ended_at, abs=1e-6)
        assert got["created_at"] is not None
    assert stored[0]["text"] == "I'd like a table for two, café ☕"        # NUL removed: PostgreSQL refuses it
    assert stored[0]["latency"] is None
    assert stored[1]["text"] == agent.text
    assert json.loads(stored[1]["latency"]) == LATENCY


@pytest.mark.asyncio
async def test_inserts_in_batches_of_batch_size(pg: PgServer, table: str, tmp_path: Path) -> None:
    dsn = dsn_of(pg)
    async with running(writer_for(dsn, table, tmp_path, batch_size=100, flush_interval_s=30)) as writer:
        for seq in range(1, 251):
            writer.add(make_row("call-b", seq))
        assert await writer.flush(timeout_s=10)             # the last 50 go at once: flush() doesn't wait 30 s
        assert writer.batches_total == 3 and writer.written_total == 250
    # One statement per batch, each its own transaction: the rows carry exactly three distinct xmin values.
    [stats] = await query(dsn, f'SELECT count(*) AS n, count(DISTINCT xmin::text) AS transactions FROM "{table}"')
    assert (stats["n"], stats["transactions"]) == (250, 3)


@pytest.mark.asyncio
async def test_a_partial_batch_waits_for_flush_interval(pg: PgServer, table: str, tmp_path: Path) -> None:
    dsn = dsn_of(pg)
    async with running(writer_for(dsn, table, tmp_path, flush_interval_s=1.0)) as writer:
        await wait_until(lambda: writer.connected, "the first connection")
        writer.add(make_row("call-i", 1))
        await asyncio.sleep(0.3)
        assert await keys_in(dsn, table) == [] and writer.backlog == 1
        await wait_until(lambda: writer.backlog == 0, "the interval to pass", timeout_s=5)
        assert await keys_in(dsn, table) == [("call-i", 1, 1)]


@pytest.mark.asyncio
async def test_rows_written_twice_are_stored_once(pg: PgServer, table: str, tmp_path: Path) -> None:
    dsn = dsn_of(pg)
    async with running(writer_for(dsn, table, tmp_path)) as first:
        for seq in range(1, 6):
            first.add(make_row("call-d", seq))
        assert await first.flush(timeout_s=10)
    async with running(writer_for(dsn, table, tmp_path)) as second:    # e.g. a batch retried after a lost reply
        for seq in [*range(3, 9), 8]:                                    # overlaps, and a repeat in one batch
            second.add(make_row("call-d", seq, text="retried"))
        assert await second.flush(timeout_s=10)
        assert second.batches_total == 1
    assert await keys_in(dsn, table) == [("call-d", seq, 1) for seq in range(1, 9)]
    texts = await query(dsn, f'SELECT seq, text FROM "{table}" WHERE seq IN (3, 8) ORDER BY seq')
    assert [t["text"] for t in texts] == [make_row("call-d", 3).text, "retried"]       # the first write stays


@pytest.mark.asyncio
async def test_a_role_without_create_privilege_can_write(pg: PgServer, table: str, tmp_path: Path) -> None:
    async with running(writer_for(pg.dsn, table, tmp_path)) as owner:        # an operator creates the table
        await wait_until(lambda: owner.connected, "the table to be created")
    role = f"ins_{table}"
    await execute(pg.dsn, f'CREATE ROLE "{role}" LOGIN; '      # the least the module docstring documents
                          f'GRANT INSERT, SELECT (session_id, seq) ON "{table}" TO "{role}"; '
                          f'GRANT USAGE ON SEQUENCE "{table}_id_seq" TO "{role}"')
    dsn = pg.dsn.replace("postgres@", f"{role}@")
    async with running(writer_for(dsn, table, tmp_path)) as writer:          # no CREATE on the schema
        writer.add(make_row("call-p", 1))
        assert await writer.flush(timeout_s=10)
        assert writer.failures_total == 0
    assert await keys_in(pg.dsn, table) == [("call-p", 1, 1)]


# --------------------------------------------------------------------------------------- PostgreSQL, down

@pytest.mark.asyncio
async def test_survives_a_restart_mid_stream(pg: PgServer, table: str, tmp_path: Path,
                                             caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="gateway.storage.transcripts")
    dsn = dsn_of(pg)
    added: list[TranscriptRow] = []
    async with running(writer_for(dsn, table, tmp_path, batch_size=20)) as writer:
        stop_adding = asyncio.Event()

        async def caller() -> None:                     # a call producing utterances all along
            while not stop_adding.is_set():
                added.append(make_row("call-r", len(added) + 1))
                writer.add(added[-1])
                await asyncio.sleep(0.004)

        async with asyncio.TaskGroup() as tg:
            tg.create_task(caller())
            await wait_until(lambda: writer.written_total >= 40, "rows written before the outage")
            await asyncio.to_thread(pg.stop, "fast")
            await wait_until(lambda: not writer.connected, "the writer to notice the outage")
            during = len(added)
            await wait_until(lambda: len(added) >= during + 50, "rows added during the outage")
            assert writer.backlog >= 50
            await asyncio.sleep(0.3)                    # several reconnect attempts fail
            assert writer.failures_total >= 2
            await asyncio.to_thread(pg.start)
            await wait_until(lambda: writer.connected, "the writer to reconnect")
            await asyncio.sleep(0.1)
            stop_adding.set()
        assert await writer.flush(timeout_s=20)
        assert writer.backlog == 0 and writer.written_total >= len(added)

    assert await keys_in(dsn, table) == [("call-r", seq, 1) for seq in range(1, len(added) + 1)]
    assert len(transcript_logs(caplog, logging.ERROR)) == 1                 # once per outage, not per attempt
    assert any("again after" in r.getMessage() for r in transcript_logs(caplog, logging.INFO))
    assert PASSWORD not in caplog.text and "secret words" not in caplog.text
    assert ":***@" in transcript_logs(caplog, logging.ERROR)[0].getMessage()


@pytest.mark.asyncio
async def test_spills_to_the_spool_during_a_crash_then_replays(pg: PgServer, table: str, tmp_path: Path) -> None:
    dsn = dsn_of(pg)
    async with running(writer_for(dsn, table, tmp_path, batch_size=5, max_buffered_rows=10)) as writer:
        for seq in range(1, 6):
            writer.add(make_row("call-s", seq))
        assert await writer.flush(timeout_s=10)
        await asyncio.to_thread(pg.stop, "immediate")          # a crash, not a clean shutdown
        for seq in range(6, 66):
            writer.add(make_row("call-s", seq))
            await asyncio.sleep(0.002)
        # In memory: at most max_buffered_rows, plus one batch being retried; the rest is on disk.
        await wait_until(lambda: writer.backlog == 60 and writer.spilled_total >= 60 - 10 - 5, "rows to spill")
        finished = spool_files(writer, "spool-*.jsonl")
        assert finished and all(p.stat().st_mode & 0o777 == 0o600 for p in finished)      # user data: owner only
        assert {r.seq for r in spooled_rows(writer)} <= set(range(6, 66))
        assert not writer.connected

        await asyncio.to_thread(pg.start)
        assert await writer.flush(timeout_s=20)
        assert writer.backlog == 0 and spool_files(writer) == []
    assert await keys_in(dsn, table) == [("call-s", seq, 1) for seq in range(1, 66)]


@pytest.mark.asyncio
async def test_close_during_an_outage_spools_and_the_next_process_replays(pg: PgServer, table: str,
                                                                        tmp_path: Path) -> None:
    dsn = dsn_of(pg)
    first = writer_for(dsn, table, tmp_path)
    await first.start()
    for seq in range(1, 4):
        first.add(make_row("call-c", seq))
    assert await first.flush(timeout_s=10)
    await asyncio.to_thread(pg.stop, "fast")
    for seq in range(4, 24):
        first.add(make_row("call-c", seq))
    await first.close(timeout_s=0.5)
    assert sorted(r.seq for r in spooled_rows(first)) == list(range(4, 24))
    first.add(make_row("call-c", 24))                      # too late: spooled, with an error line
    assert sorted(r.seq for r in spooled_rows(first)) == list(range(4, 25))

    async with running(writer_for(dsn, table, tmp_path)) as second:      # the next process, DB still down
        assert second.backlog == 21 and not second.connected
        assert not await second.flush(timeout_s=0.3)
        await asyncio.to_thread(pg.start)
        assert await second.flush(timeout_s=20)
        assert second.backlog == 0 and spool_files(second) == []
    assert await keys_in(dsn, table) == [("call-c", seq, 1) for seq in range(1, 25)]


# ---------------------------------------------------------------------------------------------------- sqlite

@pytest.mark.asyncio
async def test_sqlite_writes_reads_and_is_idempotent(tmp_path: Path, table: str) -> None:
    path = tmp_path / "db" / "transcripts.db"
    options: dict[str, Any] = {"driver": "sqlite", "dsn": str(path), "table_name": table, "batch_size": 100,
                               "flush_interval_s": 30, "retry_base_s": 0.05, "max_buffered_rows": 1000,
                               "spool_dir": tmp_path / "spool"}
    async with running(TranscriptWriter(**options)) as writer:
        for seq in range(1, 251):
            writer.add(make_row("call-q", seq))
        assert await writer.flush(timeout_s=10)
        assert writer.batches_total == 3 and writer.backlog == 0
    async with running(TranscriptWriter(**options)) as again:
        for seq in [*range(240, 261), 260]:
            again.add(make_row("call-q", seq))
        assert await again.flush(timeout_s=10)

    with contextlib.closing(sqlite3.connect(path)) as db:
        db.row_factory = sqlite3.Row
        columns = [c["name"] for c in db.execute(f'PRAGMA table_info("{table}")')]
        assert columns == ["id", "session_id", "seq", "carrier", "call_id", "from_number", "to_number", "persona",
                           "role", "text", "started_at", "ended_at", "latency", "created_at"]
        counts = db.execute(f'SELECT seq, count(*) AS n FROM "{table}" GROUP BY seq ORDER BY seq').fetchall()
        assert [(c["seq"], c["n"]) for c in counts] == [(seq, 1) for seq in range(1, 261)]
        got = db.execute(f'SELECT * FROM "{table}" WHERE seq = 2').fetchone()
    sent = make_row("call-q", 2)
    assert dict(got) | {"id": 0, "created_at": 0} == {
        "id": 0, "session_id": "call-q", "seq": 2, "carrier": "twilio", "call_id": "CA-call-q",
        "from_number": "+15550001", "to_number": "+15550002", "persona": "concierge", "role": "assistant",
        "text": sent.text, "started_at": sent.started_at, "ended_at": sent.ended_at,
        "latency": json.dumps(LATENCY, separators=(",", ":")), "created_at": 0}
    assert json.loads(got["latency"]) == LATENCY and got["created_at"] > 1.7e9


@pytest.mark.asyncio
async def test_rows_the_database_refuses_are_set_aside_not_retried_forever(
        tmp_path: Path, table: str, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "transcripts.db"
    with contextlib.closing(sqlite3.connect(path)) as db:       # an operator's table with a stricter rule
        db.execute(f'CREATE TABLE "{table}" (id INTEGER PRIMARY KEY, session_id TEXT NOT NULL, seq INTEGER NOT NULL, '
                   "carrier TEXT, call_id TEXT, from_number TEXT, to_number TEXT, persona TEXT, role TEXT, "
                   "text TEXT CHECK (length(text) < 40), started_at REAL, ended_at REAL, latency TEXT, "
                   "created_at REAL, UNIQUE (session_id, seq))")
        db.commit()
    writer = TranscriptWriter(driver="sqlite", dsn=str(path), table_name=table, batch_size=10, flush_interval_s=30,
                              retry_base_s=0.05, max_buffered_rows=1000, spool_dir=tmp_path / "spool")
    async with running(writer):
        for seq in range(1, 6):
            writer.add(make_row("call-x", seq, text="x" * 50 if seq == 3 else "ok"))
        assert await writer.flush(timeout_s=10)
        assert (writer.written_total, writer.rejected_total, writer.backlog) == (4, 1, 0)
    [rejected] = writer.spool_path.glob("rejected-*.jsonl")
    assert [TranscriptRow.from_json(line).seq for line in rejected.read_text().splitlines()] == [3]
    assert any("refused 1 rows" in r.getMessage() for r in transcript_logs(caplog, logging.ERROR))
    assert "x" * 50 not in caplog.text
    with contextlib.closing(sqlite3.connect(path)) as db:
        assert [s for (s,) in db.execute(f'SELECT seq FROM "{table}" ORDER BY seq')] == [1, 2, 4, 5]


@pytest.mark.asyncio
async def test_a_spool_file_torn_by_a_crash_is_replayed_and_its_torn_line_kept(
        tmp_path: Path, table: str, caplog: pytest.LogCaptureFixture) -> None:
    options: dict[str, Any] = {"driver": "sqlite", "dsn": str(tmp_path / "t.db"), "table_name": table,
                               "batch_size": 10, "flush_interval_s": 0.05, "retry_base_s": 0.05,
                               "max_buffered_rows": 1000, "spool_dir": tmp_path / "spool"}
    writer = TranscriptWriter(**options)
    dead = await asyncio.create_subprocess_exec("true")
    await dead.wait()                                          # a pid no process has any more
    writer.spool_path.mkdir(parents=True)
    torn = writer.spool_path / f"spool-{1:020d}-{dead.pid}-0badc0de.part"      # the spill it was writing
    good = [make_row("call-t", 1).to_json(), make_row("call-t", 2).to_json()]
    torn.write_text("\n".join(good) + "\n" + make_row("call-t", 3).to_json()[:40])
    async with running(writer):
        assert writer.backlog == 3
        assert await writer.flush(timeout_s=10)
        assert writer.backlog == 0 and writer.written_total == 2
    assert sorted(p.name for p in writer.spool_path.iterdir()) == [torn.with_suffix(".bad").name]
    assert torn.with_suffix(".bad").read_text() == make_row("call-t", 3).to_json()[:40] + "\n"
    assert any("1 unreadable lines" in r.getMessage() for r in transcript_logs(caplog, logging.ERROR))
    with contextlib.closing(sqlite3.connect(tmp_path / "t.db")) as db:
        assert [s for (s,) in db.execute(f'SELECT seq FROM "{table}" ORDER BY seq')] == [1, 2]
