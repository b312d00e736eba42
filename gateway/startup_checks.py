"""Startup checks: what the first call will need, checked once before it, one warning line per problem.

The usual first-run mistakes are found here instead of on the first call: the recording bucket
without credentials or not answering, the transcripts database unreachable, a provider's base URL
with nothing listening (a local Whisper or Ollama server that was not started). The checks run
together, each bounded by ``startup_check_timeout_secs``, so startup waits at most that long. They
never block startup, except that ``recording.require_at_start`` makes a bucket that does not answer
a startup error. No line carries a secret (URLs lose their passwords), and nothing is sent to a
provider: its URL gets a TCP connect only. ``/ready`` is not affected: it reports the gateway's own
dependencies, not these.

Usage::

    problems = await run_startup_checks(config)   # logs each problem as one warning line; returns them
    # recording.require_at_start and the bucket does not answer: StartupCheckError (logged as one error line)
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable
from pathlib import Path
from urllib.parse import urlparse

import aioboto3
import aiohttp
import asyncpg
from aiobotocore.config import AioConfig
from botocore.exceptions import BotoCoreError, ClientError

from gateway.carrier_config import _mask_url
from gateway.config import Config, RecordingConfig, TranscriptsConfig
from pipeline.providers import ProviderSettings

__all__ = ["PROBE_FAILED", "StartupCheckError", "check_provider_urls", "check_recording", "check_transcripts",
           "probe_providers", "run_startup_checks"]

logger = logging.getLogger(__name__)


class StartupCheckError(RuntimeError):
    """A check that ``recording.require_at_start`` turns from a warning into a startup error failed."""


async def run_startup_checks(config: Config) -> list[str]:
    """Run every check that applies, concurrently, within ``startup_check_timeout_secs``; log one warning
    line per problem and return the lines. Raises StartupCheckError for the bucket when
    ``recording.require_at_start`` is set."""
    timeout_s = config.startup_check_timeout_secs
    checks: list[tuple[str, Awaitable[list[str]]]] = []
    if config.recording.enable:
        checks.append(("recording", _one(check_recording(config.recording, timeout_s))))
    if config.transcripts.enable:
        checks.append(("transcripts", _one(check_transcripts(config.transcripts, timeout_s))))
    checks.append(("providers", check_provider_urls(config, timeout_s)))
    results = await asyncio.gather(*(_bounded(name, check, timeout_s) for name, check in checks))
    problems: list[str] = []
    for (name, _), found in zip(checks, results, strict=True):
        for line in found:
            if name == "recording" and config.recording.require_at_start:
                logger.error("%s (recording.require_at_start is true: not starting)", line)
                raise StartupCheckError(line)
            logger.warning("%s", line)
            problems.append(line)
    return problems


async def check_recording(r: RecordingConfig, timeout_s: float) -> str | None:
    """``head_bucket`` with the credentials aioboto3 finds (AWS_ACCESS_KEY_ID ...): None when it answers."""
    where = f"bucket '{r.bucket}' at {_mask_url(r.endpoint_url) if r.endpoint_url else 'AWS S3'}"
    session = aioboto3.Session()
    if await session.get_credentials() is None:
        return (f"recording: no AWS credentials for {where}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                "(or a profile or role); recordings stay in the spool until then")
    config = AioConfig(retries={"total_max_attempts": 1}, connect_timeout=timeout_s, read_timeout=timeout_s)
    try:
        async with session.client("s3", endpoint_url=r.endpoint_url or None, region_name=r.region or None,
                                  config=config) as s3:
            await s3.head_bucket(Bucket=r.bucket)
    except ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", "?"))
        fix = {"404": "create it or fix recording.bucket", "NoSuchBucket": "create it or fix recording.bucket",
               "403": "check the credentials and the bucket's policy"}.get(
                   code, "check recording.* and the credentials")
        return f"recording: {where} answered {code}: {fix}; recordings stay in the spool until then"
    except (BotoCoreError, OSError) as exc:
        return (f"recording: {where} does not answer ({_one_line(exc)}): check recording.endpoint_url "
                "(or AWS_ENDPOINT_URL); recordings stay in the spool until then")
    return None


async def check_transcripts(t: TranscriptsConfig, timeout_s: float) -> str | None:
    """PostgreSQL: one connection opened and closed; SQLite: the file's directory exists and is writable."""
    if t.driver == "sqlite":
        folder = Path(t.dsn).parent
        if not os.access(folder, os.W_OK):
            return (f"transcripts: the directory {folder} of transcripts.dsn does not exist or is not writable: "
                    "create it or fix transcripts.dsn; rows are spooled until then")
        return None
    try:
        connection = await asyncpg.connect(t.dsn, timeout=timeout_s)
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        return (f"transcripts: the database at {_mask_url(t.dsn)} is unreachable ({_one_line(exc)}): "
                "check transcripts.dsn and that the server runs; rows are spooled until it answers")
    await connection.close(timeout=timeout_s)
    return None


async def check_provider_urls(config: Config, timeout_s: float) -> list[str]:
    """A TCP connect to each provider base URL (nothing is sent, so no key goes anywhere)."""
    p = config.providers
    stages: dict[str, list[str]] = {}
    names: dict[str, str] = {}
    for stage, s in (("stt", p.stt), ("llm", p.llm), ("tts", p.tts), ("stt fallback", p.stt_fallback),
                     ("llm fallback", p.llm_fallback), ("tts fallback", p.tts_fallback)):
        if s is not None and s.base_url:
            stages.setdefault(s.base_url, []).append(stage)
            names[s.base_url] = s.name
    found = await asyncio.gather(*(_connect(url, timeout_s) for url in stages))
    return [f"provider {names[url]} ({', '.join(stages[url])}) at {_mask_url(url)} does not answer ({error}): "
            f"start it or fix base_urls.{names[url]} (or its *_BASE_URL variable)"
            for url, error in zip(stages, found, strict=True) if error is not None]


PROBE_FAILED = ("key rejected", "unreachable", "model not found", "failed")   # results that fail --probe


async def probe_providers(config: Config, timeout_s: float) -> list[tuple[str, str, str]]:
    """``voxray check-config --probe``: each configured stage's provider asked its cheapest authenticated
    request (declared in its spec), concurrently; ``(stage, provider, result)`` per stage, result one of "ok",
    "key rejected (401)", "unreachable (DNS|connect|timeout)", "model not found", "failed (...)", "not
    probed (...)". Keys travel only to their own vendor, as on a call.

    Usage::

        for stage, name, result in await probe_providers(config, 3.0):
            print(f"{stage:13} {name:12} {result}")
    """
    from pipeline.providers import probe
    from pipeline.providers._http import open_session

    p = config.providers
    roles = [(role, s) for role, s in (("stt", p.stt), ("llm", p.llm), ("tts", p.tts), ("stt fallback", p.stt_fallback),
                                       ("llm fallback", p.llm_fallback), ("tts fallback", p.tts_fallback)) if s]

    async def one(role: str, settings: ProviderSettings, http: aiohttp.ClientSession) -> str:
        try:
            async with asyncio.timeout(timeout_s * 2):
                return await probe(settings, http, role.split()[0], timeout_s=timeout_s)
        except TimeoutError:
            return "unreachable (timeout)"

    async with open_session() as http:
        results = await asyncio.gather(*(one(role, s, http) for role, s in roles))
    return [(role, s.name, result) for (role, s), result in zip(roles, results, strict=True)]


async def _connect(url: str, timeout_s: float) -> str | None:
    """None when something accepts a TCP connection at ``url``'s host and port, else why not."""
    parsed = urlparse(url)
    try:
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
    except ValueError:
        return "not a valid URL"
    try:
        async with asyncio.timeout(timeout_s):
            _, writer = await asyncio.open_connection(parsed.hostname, port)
    except TimeoutError:
        return f"no connection within {timeout_s:g} s"
    except OSError as exc:
        return _one_line(exc)
    writer.close()
    await writer.wait_closed()
    return None


async def _one(check: Awaitable[str | None]) -> list[str]:
    line = await check
    return [] if line is None else [line]


async def _bounded(name: str, check: Awaitable[list[str]], timeout_s: float) -> list[str]:
    """The check's lines, or one line saying it did not finish within ``timeout_s``."""
    try:
        async with asyncio.timeout(timeout_s):
            return await check
    except TimeoutError:
        return [f"{name}: the startup check did not finish within startup_check_timeout_secs "
                f"({timeout_s:g} s): is the server reachable from here?"]


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__
