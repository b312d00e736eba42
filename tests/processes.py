"""Real processes for tests: a gateway (``python -m gateway serve``) and a private redis-server.

A private Redis can be stopped and started again on the same port (the shared one at 6379 is left
alone); a gateway process receives real signals.

Usage::

    with RedisServer() as redis_server:          # redis://127.0.0.1:<port>/0
        redis_server.stop(); redis_server.start()
    async with GatewayProcess({"public_url": ...}) as gw:   # gw.url == "http://127.0.0.1:<port>"
        gw.terminate()                            # SIGTERM
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """A redis-server of our own on a free 127.0.0.1 port, keeping nothing on disk."""

    def __init__(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed: run scripts/test.sh (it installs it)")
        self.binary = binary
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self._process = subprocess.Popen(
            [self.binary, "--bind", "127.0.0.1", "--port", str(self.port), "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"redis-server did not answer on port {self.port}")

    def stop(self) -> None:
        """Kill it (an outage: every connection drops, every key is lost)."""
        if self._process is not None:
            self._process.kill()
            self._process.wait(5)
            self._process = None

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class GatewayProcess:
    """``python -m gateway serve`` with a config file, on a free port; logs kept for assertions."""

    def __init__(self, config: dict[str, Any], env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._dir = Path(tempfile.mkdtemp(prefix="voxray-gw-"))
        self.config_path = self._dir / "config.json"
        self.config_path.write_text(json.dumps({**config, "host": "127.0.0.1", "port": self.port}))
        self.log_path = self._dir / "gateway.log"
        self._env = {k: v for k, v in os.environ.items() if not k.startswith("VOXRAY_") and k != "OPENAI_API_KEY"}
        self._env.update(env or {})
        self.process: subprocess.Popen[bytes] | None = None

    async def start(self, timeout_s: float = 30.0) -> None:
        self._log = self.log_path.open("ab")
        self.process = subprocess.Popen([sys.executable, "-m", "gateway", "serve", "--config", str(self.config_path)],
                                        cwd=ROOT, env=self._env, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        async with httpx.AsyncClient() as http:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise RuntimeError(f"gateway exited with {self.process.returncode}:\n{self.log()}")
                try:
                    if (await http.get(f"{self.url}/health", timeout=0.5)).status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(0.1)
        raise RuntimeError(f"gateway did not answer /health within {timeout_s} s:\n{self.log()}")

    def terminate(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)

    async def wait(self, timeout_s: float) -> int:
        assert self.process is not None
        deadline = time.monotonic() + timeout_s
        while self.process.poll() is None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"gateway still running after {timeout_s} s")
            await asyncio.sleep(0.05)
        return self.process.returncode

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    async def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        if getattr(self, "_log", None):
            self._log.close()
        shutil.rmtree(self._dir, ignore_errors=True)

    async def __aenter__(self) -> GatewayProcess:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
