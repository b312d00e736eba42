"""A private, throwaway PostgreSQL server for tests that stop and restart their database.

Usage::

    server = PgServer()
    server.start()            # initdb on the first start, then pg_ctl start on 127.0.0.1:<free port>
    server.dsn                # postgresql://postgres@127.0.0.1:<port>/postgres (trust auth)
    server.stop()             # fast shutdown; stop(mode="immediate") simulates a crash
    server.start()            # the same port and data directory again
    server.destroy()          # stop it and delete its directory

The shared server on 5432 is never touched. Run as root, the cluster's directory is owned by the ``postgres``
OS user and every PostgreSQL binary runs as that user (PostgreSQL refuses to run as root) through
``runuser`` (or ``su``). The binaries come from ``VOXRAY_TEST_PG_BIN`` if set, else the newest
``/usr/lib/postgresql/*/bin`` (Debian's packages), else ``PATH``; the directory is made under
``VOXRAY_TEST_PG_DIR`` if set (as root: else /tmp, which the postgres user can reach). Anything that fails
raises ``PgServerError`` with the command, its output and the server log's tail: tests fail, never skip.
"""

from __future__ import annotations

import os
import pwd
import re
import shlex
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

__all__ = ["PgServer", "PgServerError", "find_bin_dir"]

OS_USER = "postgres"            # who owns and runs the cluster when the tests run as root
_INSTALL_HINT = "install PostgreSQL's server (Debian: apt-get install postgresql) or set VOXRAY_TEST_PG_BIN"


class PgServerError(RuntimeError):
    """The private PostgreSQL server could not be created, started or stopped; the message says why."""


def find_bin_dir() -> Path:
    """The directory holding ``initdb`` and ``pg_ctl``."""
    if configured := os.environ.get("VOXRAY_TEST_PG_BIN"):
        candidates = [Path(configured)]
    else:
        def version(p: Path) -> tuple[int, ...]:
            return tuple(int(n) for n in re.findall(r"\d+", p.parent.name)) or (0,)
        candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=version, reverse=True)
        if on_path := shutil.which("initdb"):
            candidates.append(Path(on_path).parent)
    for directory in candidates:
        if (directory / "initdb").is_file() and (directory / "pg_ctl").is_file():
            return directory
    looked = ", ".join(str(c) for c in candidates) or "/usr/lib/postgresql/*/bin and PATH"
    raise PgServerError(f"no initdb/pg_ctl found (looked in {looked}); {_INSTALL_HINT}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PgServer:
    """One private PostgreSQL cluster in a temporary directory, listening only on 127.0.0.1."""

    def __init__(self, *, bin_dir: Path | None = None, port: int | None = None) -> None:
        self.bin_dir = bin_dir or find_bin_dir()
        self.port = port or _free_port()
        self.running = False
        self._as_root = os.geteuid() == 0
        parent = os.environ.get("VOXRAY_TEST_PG_DIR") or ("/tmp" if self._as_root else None)
        self.base = Path(tempfile.mkdtemp(prefix="voxray-pg-", dir=parent))
        self.data = self.base / "data"
        self.log = self.base / "server.log"
        if self._as_root:
            try:
                owner = pwd.getpwnam(OS_USER)
            except KeyError:
                shutil.rmtree(self.base, ignore_errors=True)
                raise PgServerError(f"running as root, but there is no {OS_USER!r} OS user to run PostgreSQL as "
                                    f"(PostgreSQL refuses to run as root); {_INSTALL_HINT}") from None
            os.chown(self.base, owner.pw_uid, owner.pw_gid)
            os.chmod(self.base, 0o700)
        self._initialized = False
        self._started_once = False

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def start(self) -> None:
        """Start the server (creating the cluster on the first call); returns once it accepts connections."""
        if self.running:
            return
        if not self._initialized:
            self._initdb()
        try:
            self._pg_ctl("start", "-l", str(self.log), "-w", "-t", "60")
        except PgServerError:
            if "Address already in use" not in self._log_tail() or self._started_once:
                raise
            self.port = _free_port()        # someone took the port between choosing it and listening: once more
            self._write_settings()
            self._pg_ctl("start", "-l", str(self.log), "-w", "-t", "60")
        self.running = True
        self._started_once = True

    def stop(self, mode: str = "fast") -> None:
        """Stop the server: ``fast`` (clean shutdown) or ``immediate`` (as if it crashed)."""
        if not self.running:
            return
        self._pg_ctl("stop", "-m", mode, "-w", "-t", "60")
        self.running = False

    def destroy(self) -> None:
        """Stop the server if it runs and delete its directory."""
        try:
            if self.running:
                self.stop("immediate")
        finally:
            shutil.rmtree(self.base, ignore_errors=True)

    # ------------------------------------------------------------------------------------------- internals

    def _initdb(self) -> None:
        self._run(["initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "-E", "UTF8",
                   "--locale=C", "--no-sync"])
        self._write_settings()
        self._initialized = True

    def _write_settings(self) -> None:
        # Appended as root or as the owner: the file keeps its owner (postgres) and mode.
        settings = {
            "listen_addresses": "'127.0.0.1'",
            "port": str(self.port),
            "unix_socket_directories": f"'{self.base}'",
            "max_connections": "40",
            "fsync": "off",                 # survives a server crash (the OS keeps the pages), not an OS crash
            "full_page_writes": "off",
            "logging_collector": "off",
        }
        with open(self.data / "postgresql.conf", "a", encoding="utf-8") as conf:
            conf.write("\n# tests/pg_server.py\n")
            conf.writelines(f"{key} = {value}\n" for key, value in settings.items())

    def _pg_ctl(self, action: str, *args: str) -> None:
        self._run(["pg_ctl", action, "-D", str(self.data), "-s", *args])

    def _run(self, argv: list[str], timeout_s: float = 120.0) -> None:
        cmd = [str(self.bin_dir / argv[0]), *argv[1:]]
        if self._as_root:
            if shutil.which("runuser"):
                cmd = ["runuser", "-u", OS_USER, "--", *cmd]
            else:
                cmd = ["su", OS_USER, "-s", "/bin/sh", "-c", shlex.join(cmd)]
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C", "LANG": "C", "TZ": "UTC"}
        # Output goes to a file, not a pipe: the postmaster must not inherit a pipe we wait on.
        with tempfile.TemporaryFile() as out:
            try:
                proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                      cwd=self.base, env=env, timeout=timeout_s, check=False)
            except (OSError, subprocess.TimeoutExpired) as exc:
                raise PgServerError(f"{shlex.join(cmd)} did not run: {exc}\n{self._log_tail()}") from None
            if proc.returncode != 0:
                out.seek(0)
                output = out.read().decode(errors="replace").strip()
                raise PgServerError(f"{shlex.join(cmd)} failed (exit code {proc.returncode}):\n{output}\n"
                                    f"server log {self.log}:\n{self._log_tail()}")

    def _log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no server log)"
