"""Transcript stores: the SQL table a ``TranscriptWriter`` writes to, one backend per driver.

Usage::

    store = PostgresBackend("postgresql://voxray:pw@db/voxray", "call_transcripts", 10.0, 30.0)
    # or: store = SqliteBackend("/var/lib/voxray/transcripts.db", "call_transcripts")
    await store.connect()                 # creates the table if absent
    stored = await store.insert(rows)     # one statement; returns how many rows were new
    await store.close(timeout_s=5)

Both backends implement the ``Backend`` protocol. ``insert()`` skips rows whose ``(session_id, seq)`` the
table already holds, removes NUL characters and replaces invalid UTF-8 in text (neither database takes them).
A backend neither buffers nor retries nor logs: after a failure the caller calls ``drop()`` and, later,
``connect()`` again; ``is_data_error()`` tells rows the database refuses from a database that is unreachable.
``driver="postgres"`` uses an asyncpg pool of one connection; ``driver="sqlite"`` runs the stdlib module in a
worker thread (``in_thread()``). ``mask_dsn()``, ``secrets_of()`` and ``describe_error()`` keep a DSN's
password and the rows' contents out of logs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import sqlite3
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar
from urllib.parse import urlsplit, urlunsplit

import asyncpg

if TYPE_CHECKING:
    from gateway.storage.transcripts import TranscriptRow

__all__ = ["Backend", "PostgresBackend", "SqliteBackend", "describe_error", "in_thread", "mask_dsn",
           "secrets_of"]

_COLUMNS = ("session_id, seq, carrier, call_id, from_number, to_number, persona, role, text, "
            "started_at, ended_at, latency")
T = TypeVar("T")


class Backend(Protocol):
    """A transcript table, as ``TranscriptWriter`` uses it (see the module docstring)."""

    async def connect(self) -> None: ...            # open, and create the table if absent
    async def insert(self, rows: Sequence[TranscriptRow]) -> int: ...   # one statement; rows newly stored
    def is_data_error(self, exc: BaseException) -> bool: ...            # the rows, not the database, are at fault
    def drop(self) -> None: ...                      # forget the connection after a failure, at once
    async def close(self, timeout_s: float) -> None: ...


def _clean(value: str) -> str:
    """Text both databases accept: no NUL characters, valid UTF-8 (lone surrogates become U+FFFD)."""
    if "\x00" in value:
        value = value.replace("\x00", "")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        value = value.encode("utf-8", "replace").decode("utf-8")
    return value


def _latency_json(row: TranscriptRow) -> str | None:
    return None if row.latency is None else json.dumps(row.latency, separators=(",", ":"))


_PG_DDL = """
SELECT pg_advisory_xact_lock(hashtext('voxray.transcripts.{name}'));
CREATE TABLE IF NOT EXISTS {table} (
    id          bigserial PRIMARY KEY,
    session_id  text NOT NULL,
    seq         integer NOT NULL,
    carrier     text NOT NULL,
    call_id     text NOT NULL,
    from_number text NOT NULL,
    to_number   text NOT NULL,
    persona     text NOT NULL,
    role        text NOT NULL,
    text        text NOT NULL,
    started_at  timestamptz NOT NULL,
    ended_at    timestamptz NOT NULL,
    latency     jsonb,
    created_at  timestamptz NOT NULL DEFAULT now(),
    UNIQUE (session_id, seq)
);
"""
# The UNIQUE index leads with session_id, so it also serves "all utterances of this session" lookups.

_PG_INSERT = f"""
INSERT INTO {{table}} ({_COLUMNS})
SELECT s, q, c, ci, fn, tn, p, r, x, to_timestamp(sa), to_timestamp(ea), l::jsonb
FROM unnest($1::text[], $2::int4[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[], $8::text[],
            $9::text[], $10::float8[], $11::float8[], $12::text[]) AS u(s, q, c, ci, fn, tn, p, r, x, sa, ea, l)
ON CONFLICT (session_id, seq) DO NOTHING
"""


class PostgresBackend:
    """asyncpg, one pooled connection; a batch is one ``INSERT ... SELECT FROM unnest(...)``."""

    def __init__(self, dsn: str, table: str, connect_timeout_s: float, command_timeout_s: float) -> None:
        self._dsn = dsn
        self._table = f'"{table}"'
        self._ddl = _PG_DDL.format(name=table, table=self._table)
        self._insert = _PG_INSERT.format(table=f'"{table}"')
        self._connect_timeout_s = connect_timeout_s
        self._command_timeout_s = command_timeout_s
        self._pool: asyncpg.Pool | None = None

    async def connect(self) -> None:
        self.drop()
        # min_size=0: no background "restore the connection floor" task logging every attempt of an outage;
        # the writer reconnects with its own backoff and logs once.
        pool = await asyncpg.create_pool(self._dsn, min_size=0, max_size=1, timeout=self._connect_timeout_s,
                                         command_timeout=self._command_timeout_s)
        try:
            async with pool.acquire() as con:
                # Only when absent: a role with INSERT but no CREATE on the schema gets "permission denied"
                # from CREATE TABLE IF NOT EXISTS even when the table exists.
                if not await con.fetchval("SELECT to_regclass($1) IS NOT NULL", self._table):
                    async with con.transaction():
                        await con.execute(self._ddl)   # the advisory lock: instances starting together don't race
        except BaseException:
            pool.terminate()
            raise
        self._pool = pool

    async def insert(self, rows: Sequence[TranscriptRow]) -> int:
        if self._pool is None:
            raise ConnectionError("not connected")
        columns: tuple[list[Any], ...] = tuple([] for _ in range(12))
        for row in rows:
            for column, value in zip(columns, (
                    _clean(row.session_id), row.seq, _clean(row.carrier), _clean(row.call_id),
                    _clean(row.from_number), _clean(row.to_number), _clean(row.persona), row.role,
                    _clean(row.text), float(row.started_at), float(row.ended_at), _latency_json(row)), strict=True):
                column.append(value)
        status: str = await self._pool.execute(self._insert, *columns)     # "INSERT 0 <rows stored>"
        return int(status.rsplit(" ", 1)[-1])

    def is_data_error(self, exc: BaseException) -> bool:
        return isinstance(exc, (asyncpg.DataError, asyncpg.IntegrityConstraintViolationError,
                                ValueError, TypeError))

    def drop(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.terminate()

    async def close(self, timeout_s: float) -> None:
        pool, self._pool = self._pool, None
        if pool is None:
            return
        try:
            async with asyncio.timeout(timeout_s):
                await pool.close()
        except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
            pool.terminate()


_SQLITE_DDL = """
CREATE TABLE IF NOT EXISTS {table} (
    id          INTEGER PRIMARY KEY,
    session_id  TEXT NOT NULL,
    seq         INTEGER NOT NULL,
    carrier     TEXT NOT NULL,
    call_id     TEXT NOT NULL,
    from_number TEXT NOT NULL,
    to_number   TEXT NOT NULL,
    persona     TEXT NOT NULL,
    role        TEXT NOT NULL,
    text        TEXT NOT NULL,
    started_at  REAL NOT NULL,
    ended_at    REAL NOT NULL,
    latency     TEXT,
    created_at  REAL NOT NULL DEFAULT ((julianday('now') - 2440587.5) * 86400.0),
    UNIQUE (session_id, seq)
);
"""


class SqliteBackend:
    """sqlite3 in worker threads; epoch seconds in REAL columns, latency as JSON text."""

    def __init__(self, path: str, table: str) -> None:
        self._path = Path(path)
        self._ddl = _SQLITE_DDL.format(table=f'"{table}"')
        self._insert = (f'INSERT INTO "{table}" ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) '
                        "ON CONFLICT (session_id, seq) DO NOTHING")
        self._conn: sqlite3.Connection | None = None

    async def connect(self) -> None:
        self.drop()
        await in_thread(self._open)

    def _open(self) -> None:
        self._path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self._path, timeout=5.0, isolation_level=None, check_same_thread=False)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.executescript(self._ddl)
        except BaseException:
            conn.close()
            raise
        self._conn = conn          # set here, so that even a cancelled connect() leaves it for close()

    async def insert(self, rows: Sequence[TranscriptRow]) -> int:
        if self._conn is None:
            raise ConnectionError("not connected")
        params = [(_clean(r.session_id), r.seq, _clean(r.carrier), _clean(r.call_id), _clean(r.from_number),
                   _clean(r.to_number), _clean(r.persona), r.role, _clean(r.text), float(r.started_at),
                   float(r.ended_at), _latency_json(r)) for r in rows]
        return await in_thread(self._insert_many, self._conn, params)

    def _insert_many(self, conn: sqlite3.Connection, params: list[tuple[Any, ...]]) -> int:
        before = conn.total_changes
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.executemany(self._insert, params)
            conn.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            raise
        return conn.total_changes - before

    def is_data_error(self, exc: BaseException) -> bool:
        return isinstance(exc, (sqlite3.IntegrityError, sqlite3.DataError, sqlite3.InterfaceError,
                                ValueError, TypeError))

    def drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    async def close(self, timeout_s: float) -> None:
        self.drop()


async def in_thread(fn: Callable[..., T], *args: Any) -> T:
    """``asyncio.to_thread``, but a cancelled caller still waits for the thread (it may hold a connection)."""
    task = asyncio.ensure_future(asyncio.to_thread(fn, *args))
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        await asyncio.wait([task])
        if not task.cancelled():
            task.exception()                        # retrieved: the caller is cancelled either way
        raise


def mask_dsn(dsn: str) -> str:
    """The DSN with any password replaced by ``***`` (safe to log)."""
    try:
        parts = urlsplit(dsn)
    except ValueError:
        return "<unparseable DSN>"
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, host = netloc.rsplit("@", 1)
        if ":" in userinfo:
            netloc = f"{userinfo.split(':', 1)[0]}:***@{host}"
    query = re.sub(r"(?i)(^|&)(password=)[^&]*", r"\1\2***", parts.query)
    return urlunsplit(parts._replace(netloc=netloc, query=query))


def secrets_of(dsn: str) -> list[str]:
    found = re.findall(r"(?i)(?:^|&)password=([^&]+)", urlsplit(dsn).query) if "://" in dsn else []
    with contextlib.suppress(ValueError):
        if password := urlsplit(dsn).password:
            found.append(password)
    return [s for s in found if s]


def describe_error(exc: BaseException, secrets: Sequence[str], *, rows_at_fault: bool = False) -> str:
    """The error, fit for the log: no password, no row contents (PostgreSQL's DETAIL quotes the row).

    Args:
        exc: what ``connect()`` or ``insert()`` raised.
        secrets: strings to mask (``secrets_of(dsn)``).
        rows_at_fault: the database refused the rows: name the constraint rather than quote the message.
    """
    if isinstance(exc, asyncpg.PostgresError):
        text = f"{type(exc).__name__} (SQLSTATE {exc.sqlstate})"
        if rows_at_fault:
            constraint = getattr(exc, "constraint_name", None)
            text += f" on constraint {constraint}" if constraint else ""
        else:
            text += f": {exc.message}"
    else:
        lines = str(exc).splitlines()
        text = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
    for secret in secrets:
        text = text.replace(secret, "***")
    return text
