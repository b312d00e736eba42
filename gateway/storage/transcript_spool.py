"""Transcript spool: JSONL files that keep rows safe on disk while the database cannot take them.

Usage (blocking file I/O: call these from a worker thread)::

    path = write_jsonl(spool_dir, "spool", [row.to_json() for row in rows])   # fsync'd, then renamed into place
    for path, count in scan_spool(spool_dir):            # files left by earlier processes, oldest first
        rows, bad = read_jsonl(path, TranscriptRow.from_json)
        ...                                              # write the rows, then
        set_aside(path, bad) if bad else path.unlink()   # keep unreadable lines in a ``.bad`` file

A file is ``<prefix>-<time_ns>-<pid>-<random>.jsonl`` (mode 0600, in a 0700 directory), written as ``.part``
first: a ``.part`` file left by a process that died while writing it is replayed as far as its lines are whole.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

__all__ = ["read_jsonl", "scan_spool", "set_aside", "write_jsonl"]

_PROCESS_STARTED = time.time()
T = TypeVar("T")


def write_jsonl(directory: Path, prefix: str, lines: Sequence[str]) -> Path:
    """Write lines to a new ``<prefix>-<time>-<pid>-<random>.jsonl``: fsync'd, then renamed into place."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    name = f"{prefix}-{time.time_ns():020d}-{os.getpid()}-{secrets.token_hex(4)}"
    part, final = directory / f"{name}.part", directory / f"{name}.jsonl"
    fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.writelines(line + "\n" for line in lines)
            f.flush()
            os.fsync(f.fileno())
        os.replace(part, final)
    except BaseException:
        with contextlib.suppress(OSError):
            part.unlink()
        raise
    _fsync_dir(directory)
    return final


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def scan_spool(directory: Path) -> list[tuple[Path, int]]:
    """Spool files left by earlier processes, oldest first, with their row counts.

    A ``.part`` file whose process is gone (it died while spilling) is taken as it is: its complete lines
    are replayed like any other. (Our own pid on a file older than this process: a container restart.)
    """
    if not directory.is_dir():
        return []
    for part in directory.glob("spool-*.part"):
        stale = False
        fields = part.stem.split("-")
        pid = int(fields[2]) if len(fields) == 4 and fields[2].isdigit() else 0
        with contextlib.suppress(OSError):
            stale = not _alive(pid) or (pid == os.getpid() and part.stat().st_mtime < _PROCESS_STARTED)
        if stale:
            with contextlib.suppress(OSError):
                os.replace(part, part.with_suffix(".jsonl"))
    found = []
    for path in sorted(directory.glob("spool-*.jsonl")):
        with contextlib.suppress(FileNotFoundError):
            data = path.read_bytes()
            found.append((path, len([line for line in data.splitlines() if line.strip()])))
    return found


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_jsonl(path: Path, parse: Callable[[str], T]) -> tuple[list[T], list[str]]:
    """The rows of a spool file, and the lines that are not rows (a torn last line, say): the lines
    ``parse`` raises ValueError or TypeError on."""
    rows: list[T] = []
    bad: list[str] = []
    for line in path.read_text(encoding="utf-8", errors="surrogateescape").splitlines():
        if not line.strip():
            continue
        try:
            rows.append(parse(line))
        except (ValueError, TypeError):
            bad.append(line)
    return rows, bad


def set_aside(path: Path, bad: list[str]) -> Path:
    """Keep a spool file's unreadable lines next to it (``.bad``) and delete the file."""
    keep = path.with_suffix(".bad")
    with open(keep, "a", encoding="utf-8", errors="surrogateescape") as f:
        f.writelines(line + "\n" for line in bad)
        f.flush()
        os.fsync(f.fileno())
    path.unlink(missing_ok=True)
    return keep
