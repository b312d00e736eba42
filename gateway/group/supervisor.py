"""``voxray serve --workers N``: one port, N worker processes, one supervisor.

The supervisor binds the listening socket once and starts N workers (``python -m gateway serve`` with
the same configuration), each given the socket's descriptor: the kernel hands every new connection
to one of them, and a busy worker (its event loop late) accepts fewer. The supervisor carries no
call; it runs the hub (``gateway.group.hub``) that holds the group's sessions and joins the workers'
``/metrics`` and ``/ready``.

* A worker that dies is logged and started again (after 0.5 s, doubling up to 30 s while it keeps
  dying young); its calls are lost and their sessions removed. ``voxray_worker_restarts_total`` counts it.
* SIGTERM (or SIGINT) to the supervisor drains every worker (``gateway.drain``: ``/ready`` 503, new
  calls refused, live calls run up to ``drain_timeout_secs``, then goodbye); the supervisor exits when
  the last worker has. A second signal is passed on: the workers stop at once.
* Workers run in their own session: a terminal's Ctrl-C reaches the supervisor only, which passes it
  on once. A worker whose supervisor vanished drains and exits by itself.
* ``max_concurrent_calls`` and the load signal stay per worker: the host takes up to
  ``workers × max_concurrent_calls`` calls.

Usage (``gateway.__main__``)::

    return run_group(config, config_path, overrides, environ)      # returns the exit status
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from gateway.config import Config
from gateway.group.hub import Hub

__all__ = ["Supervisor", "run_group"]

logger = logging.getLogger(__name__)

_BACKOFF_FIRST_S = 0.5
_BACKOFF_MAX_S = 30.0
_YOUNG_S = 30.0            # a worker that dies younger than this waits longer before its next start


def run_group(config: Config, path: Path | None, overrides: Mapping[str, Any], environ: Mapping[str, str]) -> int:
    """Serve with ``config.workers`` processes until drained; the exit status."""
    return asyncio.run(Supervisor(config, path, overrides, environ).run())


def bind(host: str, port: int) -> socket.socket:
    """The listening socket every worker accepts on (inherited by them)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


class Supervisor:
    """Starts, restarts and drains the workers; runs the hub."""

    def __init__(self, config: Config, path: Path | None, overrides: Mapping[str, Any],
                 environ: Mapping[str, str]) -> None:
        self.config = config
        self._path = path
        self._overrides = {k: v for k, v in overrides.items() if v is not None}
        self._environ = dict(environ)
        self._procs: dict[int, asyncio.subprocess.Process] = {}
        self._stop = asyncio.Event()
        self._signals = 0
        self.hub = Hub.from_config(config)

    async def run(self) -> int:
        from gateway.app import announce_access
        from gateway.http.auth import AccessKey
        from gateway.startup_checks import run_startup_checks

        config = self.config
        await run_startup_checks(config)
        access = AccessKey.from_config(config)
        if access.source == "generated":         # one key for the whole group, printed once
            self._environ["VOXRAY_SERVER_API_KEY"] = access.value
        try:
            sock = bind(config.host, config.port)
        except OSError as exc:
            logger.error("cannot listen on %s:%d: %s", config.host, config.port, exc.strerror or exc)
            return 1
        workdir = tempfile.mkdtemp(prefix="voxray-group-")
        hub_path = os.path.join(workdir, "hub.sock")
        await self.hub.start(hub_path)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        p = config.providers
        logger.info("voxray ready: %d workers on %s:%d (pid %d) stt=%s llm=%s tts=%s carrier=%s public_url=%s",
                    config.workers, config.host, config.port, os.getpid(), p.stt.name, p.llm.name, p.tts.name,
                    config.carrier, config.public_url or "(not set: carrier webhooks answer 503)")
        announce_access(config, access)
        try:
            await asyncio.gather(*(self._keep(n, sock, hub_path) for n in range(1, config.workers + 1)))
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
            await self.hub.close()
            sock.close()
            shutil.rmtree(workdir, ignore_errors=True)
        logger.info("all workers have exited")
        return 0

    def _command(self, worker: int, fd: int, hub_path: str) -> list[str]:
        argv = [sys.executable, "-m", "gateway", "serve"]
        if self._path is not None:
            argv += ["--config", str(self._path)]
        for key, value in self._overrides.items():
            argv += [f"--{key.replace('_', '-')}", str(value)]
        return argv + ["--worker", str(worker), "--listen-fd", str(fd), "--hub", hub_path]

    async def _keep(self, worker: int, sock: socket.socket, hub_path: str) -> None:
        """Run worker ``worker`` until the group drains, starting it again whenever it dies."""
        backoff = _BACKOFF_FIRST_S
        while not self._stop.is_set():
            started = time.monotonic()
            proc = await asyncio.create_subprocess_exec(
                *self._command(worker, sock.fileno(), hub_path), pass_fds=(sock.fileno(),), env=self._environ,
                stdin=asyncio.subprocess.DEVNULL, start_new_session=True)
            self._procs[worker] = proc
            logger.info("worker %d started (pid %d)", worker, proc.pid)
            status = await proc.wait()
            del self._procs[worker]
            if self._stop.is_set():
                logger.info("worker %d (pid %d) exited: %s", worker, proc.pid, _describe(status))
                return
            self.hub.restarts += 1
            if time.monotonic() - started >= _YOUNG_S:
                backoff = _BACKOFF_FIRST_S
            logger.error("worker %d (pid %d) ended unexpectedly (%s), with any calls it carried; starting it "
                         "again in %.1f s", worker, proc.pid, _describe(status), backoff)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(backoff):
                    await self._stop.wait()
            backoff = min(backoff * 2, _BACKOFF_MAX_S)

    def _on_signal(self, sig: int) -> None:
        """First signal: drain every worker. A second: pass it on (the workers stop at once)."""
        self._signals += 1
        if self._signals == 1:
            self._stop.set()
            self.hub.draining = True
            logger.info("received %s: draining %d worker(s)", signal.Signals(sig).name, len(self._procs))
        else:
            logger.info("received %s again: stopping the workers now", signal.Signals(sig).name)
        for proc in list(self._procs.values()):
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)


def _describe(status: int) -> str:
    return f"killed by {signal.Signals(-status).name}" if status < 0 else f"exit status {status}"
