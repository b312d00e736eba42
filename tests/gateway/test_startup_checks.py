"""gateway.startup_checks against real servers on 127.0.0.1: SeaweedFS S3, a private PostgreSQL, a TCP
listener standing in for a local provider, closed ports for what is not running, and a server that
accepts and never answers (the checks stay within startup_check_timeout_secs)."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio

from gateway.config import Config
from gateway.startup_checks import StartupCheckError, run_startup_checks
from tests.conftest import running_gateway
from tests.pg_server import PgServer
from tests.s3_server import WeedS3

DB_SECRET = "db-secret-pass-4321"


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def aws(s3server: WeedS3, monkeypatch: pytest.MonkeyPatch) -> WeedS3:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3server.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3server.secret_key)
    return s3server


@pytest.fixture
def no_aws_credentials(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


@pytest.fixture(scope="module")
def pg(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PgServer]:
    server = PgServer()
    server.start()
    yield server
    server.destroy()


@pytest_asyncio.fixture
async def listener() -> AsyncIterator[int]:
    """A TCP server that accepts and never answers: a local provider that is up, or a stalled S3."""
    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()
        writer.close()

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    yield int(server.sockets[0].getsockname()[1])
    server.close()


def config(**raw: Any) -> Config:
    return Config.from_mapping({"startup_check_timeout_secs": 1.0, **raw})   # the local provider: no URL


def recording(s3_url: str, bucket: str, **extra: Any) -> dict[str, Any]:
    return {"recording": {"enable": True, "bucket": bucket, "endpoint_url": s3_url, "region": "us-east-1", **extra}}


# ------------------------------------------------------------------------------ recording

@pytest.mark.asyncio
async def test_a_bucket_that_answers_is_no_problem(aws: WeedS3) -> None:
    assert await run_startup_checks(config(**recording(aws.endpoint_url, aws.bucket))) == []


@pytest.mark.asyncio
async def test_a_missing_bucket_is_one_warning_line(aws: WeedS3, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="gateway.startup_checks"):
        problems = await run_startup_checks(config(**recording(aws.endpoint_url, "no-such-bucket")))
    assert len(problems) == 1 and "\n" not in problems[0]
    assert "'no-such-bucket'" in problems[0] and aws.endpoint_url in problems[0] and "404" in problems[0]
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == problems
    assert aws.secret_key not in caplog.text


@pytest.mark.asyncio
async def test_no_credentials_is_one_warning_line(no_aws_credentials: None, s3server: WeedS3) -> None:
    problems = await run_startup_checks(config(**recording(s3server.endpoint_url, s3server.bucket)))
    assert len(problems) == 1 and "no AWS credentials" in problems[0] and "AWS_ACCESS_KEY_ID" in problems[0]


@pytest.mark.asyncio
async def test_an_unreachable_endpoint_is_one_warning_line(aws: WeedS3) -> None:
    url = f"http://127.0.0.1:{closed_port()}"
    problems = await run_startup_checks(config(**recording(url, aws.bucket)))
    assert len(problems) == 1 and "does not answer" in problems[0] and url in problems[0]


@pytest.mark.asyncio
async def test_require_at_start_makes_it_a_startup_error(aws: WeedS3, caplog: pytest.LogCaptureFixture) -> None:
    url = f"http://127.0.0.1:{closed_port()}"
    with pytest.raises(StartupCheckError, match=url):
        await run_startup_checks(config(**recording(url, aws.bucket, require_at_start=True)))
    assert any(r.levelno == logging.ERROR and "require_at_start" in r.getMessage() for r in caplog.records)
    assert await run_startup_checks(config(**recording(aws.endpoint_url, aws.bucket, require_at_start=True))) == []


@pytest.mark.asyncio
async def test_a_stalled_endpoint_is_bounded_by_the_timeout(aws: WeedS3, listener: int) -> None:
    started = time.monotonic()
    problems = await run_startup_checks(config(**recording(f"http://127.0.0.1:{listener}", aws.bucket),
                                               startup_check_timeout_secs=0.5))
    assert time.monotonic() - started < 1.5
    assert len(problems) == 1 and "recording" in problems[0]


# ------------------------------------------------------------------------------ transcripts

@pytest.mark.asyncio
async def test_a_database_that_answers_is_no_problem(pg: PgServer) -> None:
    assert await run_startup_checks(config(transcripts={"enable": True, "dsn": pg.dsn})) == []


@pytest.mark.asyncio
async def test_an_unreachable_database_is_one_warning_line_without_its_password(
        caplog: pytest.LogCaptureFixture) -> None:
    dsn = f"postgresql://voxray:{DB_SECRET}@127.0.0.1:{closed_port()}/calls"
    with caplog.at_level(logging.WARNING, logger="gateway.startup_checks"):
        problems = await run_startup_checks(config(transcripts={"enable": True, "dsn": dsn}))
    assert len(problems) == 1 and "unreachable" in problems[0] and "transcripts.dsn" in problems[0]
    assert dsn.replace(DB_SECRET, "***") in problems[0]
    assert DB_SECRET not in caplog.text


@pytest.mark.asyncio
async def test_a_sqlite_file_in_a_missing_directory_is_one_warning_line(tmp_path: Path) -> None:
    ok = config(transcripts={"enable": True, "driver": "sqlite", "dsn": str(tmp_path / "t.db")})
    assert await run_startup_checks(ok) == []
    missing = config(transcripts={"enable": True, "driver": "sqlite", "dsn": str(tmp_path / "no" / "t.db")})
    problems = await run_startup_checks(missing)
    assert len(problems) == 1 and str(tmp_path / "no") in problems[0]


# ------------------------------------------------------------------------------ provider URLs

@pytest.mark.asyncio
async def test_provider_urls_that_do_not_answer_are_named(listener: int) -> None:
    down = f"http://127.0.0.1:{closed_port()}"
    c = Config.from_mapping({"stt_provider": "whisper", "llm_provider": "ollama", "tts_provider": "local",
                             "base_urls": {"ollama": f"http://127.0.0.1:{listener}"},
                             "startup_check_timeout_secs": 1.0}, {"WHISPER_BASE_URL": down})
    problems = await run_startup_checks(c)
    assert len(problems) == 1                                      # ollama's listener answers
    assert problems[0].startswith(f"provider whisper (stt) at {down}/v1 does not answer (")
    assert problems[0].endswith("start it or fix base_urls.whisper (or its *_BASE_URL variable)")


@pytest.mark.asyncio
async def test_the_gateway_starts_anyway_and_logs_each_problem_once(caplog: pytest.LogCaptureFixture) -> None:
    down = f"http://127.0.0.1:{closed_port()}"
    c = Config.from_mapping({"llm_provider": "ollama", "base_urls": {"ollama": down}, "host": "127.0.0.1",
                             "startup_check_timeout_secs": 1.0, "allow_unauthenticated": True})
    with caplog.at_level(logging.WARNING, logger="gateway.startup_checks"):
        async with running_gateway(c) as url, httpx.AsyncClient() as client:
            assert (await client.get(f"{url}/ready")).status_code == 200   # /ready: our own dependencies only
    lines = [r.getMessage() for r in caplog.records if r.name == "gateway.startup_checks"]
    assert len(lines) == 1 and f"provider ollama (llm) at {down}/v1 does not answer" in lines[0]
