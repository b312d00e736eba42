"""Tests for the ``voxray`` command (gateway.__main__): ``check-config`` run as a real subprocess."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
SECRETS = ["srv-secret-value-123456", "gsk-groq-secret-value-987", "tw-auth-token-secret-abc",
           "dbpass-secret-4321"]


def clean_env() -> dict[str, str]:
    """The test's environment without provider keys, carrier credentials or VOXRAY_* settings."""
    env = {k: v for k, v in os.environ.items()
           if not (k.startswith("VOXRAY_") or k.startswith("TWILIO_") or k.endswith("_API_KEY")
                   or k.endswith("_BASE_URL"))}
    env["PYTHONPATH"] = str(REPO)
    return env


def check_config(path: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway", "check-config", str(path)], cwd=REPO,
                          env=env or clean_env(), capture_output=True, text=True, timeout=60)


def write(tmp_path: Path, data: dict[str, Any]) -> Path:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(data))
    return path


@pytest.fixture(scope="module")
def good_run(tmp_path_factory: pytest.TempPathFactory) -> subprocess.CompletedProcess[str]:
    path = write(tmp_path_factory.mktemp("cfg"), {
        "port": 9123,
        "server_api_key": SECRETS[0],
        "api_keys": {"groq": SECRETS[1]},
        "llm_provider": "groq",
        "carriers": {"twilio": {"account_sid": "AC42", "auth_token": SECRETS[2]}},
        "transcripts": {"dsn": f"postgresql://voxray:{SECRETS[3]}@db:5432/calls"},
    })
    return check_config(path)


def test_check_config_exits_0_and_prints_json(good_run: subprocess.CompletedProcess[str]) -> None:
    assert good_run.returncode == 0, good_run.stderr
    described = json.loads(good_run.stdout)
    assert described["port"] == 9123
    providers = described["providers"]
    assert providers["llm"]["name"] == "groq" and providers["llm"]["model"] == "llama-3.1-8b-instant"
    # no OPENAI_API_KEY and nothing else configured: the offline provider for the other stages
    assert providers["stt"]["name"] == "local" and providers["tts"]["name"] == "local"
    assert len(providers["notes"]) == 2


def test_check_config_masks_secrets(good_run: subprocess.CompletedProcess[str]) -> None:
    for secret in SECRETS:
        assert secret not in good_run.stdout
        assert secret not in good_run.stderr
    described = json.loads(good_run.stdout)
    assert described["server_api_key"] == "***"
    assert described["api_keys"] == {"groq": "***"}
    assert described["carriers"]["twilio"]["auth_token"] == "***"
    assert described["carriers"]["twilio"]["account_sid"] == "AC42"
    assert described["transcripts"]["dsn"] == "postgresql://voxray:***@db:5432/calls"


def test_check_config_prints_notes_on_stderr(good_run: subprocess.CompletedProcess[str]) -> None:
    notes = [line for line in good_run.stderr.splitlines() if line.startswith("note:")]
    assert len(notes) == 2
    assert all("local" in n and "OPENAI_API_KEY" in n for n in notes)
    assert "note:" not in good_run.stdout


def test_check_config_unknown_key_exits_2_naming_it(tmp_path: Path) -> None:
    result = check_config(write(tmp_path, {"vad_treshold": 0.1}))
    assert result.returncode == 2
    assert "'vad_treshold'" in result.stderr and "vad_threshold" in result.stderr
    assert result.stdout == ""


def test_check_config_missing_key_for_an_explicit_provider_exits_2(tmp_path: Path) -> None:
    result = check_config(write(tmp_path, {"provider": "openai"}))
    assert result.returncode == 2
    assert "OPENAI_API_KEY" in result.stderr


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway", *args], cwd=REPO, env=env or clean_env(),
                          capture_output=True, text=True, timeout=60)


def test_check_config_takes_the_path_like_serve(tmp_path: Path) -> None:
    path = write(tmp_path, {"port": 9124})
    for args in (("--config", str(path)), (str(path),)):
        result = run("check-config", *args)
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["port"] == 9124
    result = run("check-config", "--config", str(tmp_path / "missing.json"))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"voxray: configuration error: config file {tmp_path / 'missing.json'} does not exist: give the path of "
        "an existing file (--config PATH or VOXRAY_CONFIG), or none to use the defaults"]


def test_check_config_prints_every_error_one_line_each_naming_its_source(tmp_path: Path) -> None:
    path = write(tmp_path, {"vad_treshold": 0.1, "recording": {"queue_cap": 0}})
    result = run("check-config", "--config", str(path), env={**clean_env(), "VOXRAY_PORT": "abc"})
    assert result.returncode == 2 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert all(line.startswith("voxray: configuration error: ") for line in lines) and len(lines) == 3
    assert "voxray: configuration error: 'port' must be a whole number (got 'abc' from VOXRAY_PORT)" in lines
    assert any("'vad_treshold'" in line and str(path) in line for line in lines)
    assert any("'recording.queue_cap'" in line and str(path) in line for line in lines)


def test_serve_refuses_in_one_line_when_a_required_recording_bucket_does_not_answer(tmp_path: Path) -> None:
    """recording.require_at_start: one line naming the problem and the key, exit 2, no traceback."""
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()                                  # nothing listens there
    path = write(tmp_path, {"port": 9125, "host": "127.0.0.1", "startup_check_timeout_secs": 2,
                            "recording": {"enable": True, "bucket": "calls", "require_at_start": True,
                                          "endpoint_url": f"http://127.0.0.1:{port}"}})
    env = {**clean_env(), "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test-secret"}
    result = subprocess.run([sys.executable, "-m", "gateway", "serve", "--config", str(path)], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("voxray: ") and "recording.require_at_start" in lines[0], lines
    assert "Traceback" not in result.stderr and "test-secret" not in result.stderr
