"""``voxray check-config --probe``: each configured provider's cheapest authenticated request, against fakes of
the vendors (real HTTP on 127.0.0.1): "ok", "key rejected (401)", "unreachable (...)", "model not found", and
the command's exit code."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gateway.__main__ import main
from gateway.config import Config
from gateway.startup_checks import probe_providers
from tests.fakes.cartesia_server import FakeCartesia
from tests.fakes.elevenlabs_server import FakeElevenLabs
from tests.fakes.openai_server import FakeOpenAI
from tests.fakes.xtts_server import FakeXTTS


@pytest.mark.asyncio
async def test_each_stage_is_probed_with_its_own_key_and_model() -> None:
    async with FakeOpenAI(api_key="gsk-good") as groq, FakeElevenLabs(api_key="xi-good") as elevenlabs, \
            FakeCartesia(api_key="ck-good") as cartesia, FakeXTTS() as xtts:
        def config(**raw: object) -> Config:
            base = {"stt_provider": "groq", "llm_provider": "groq", "tts_provider": "elevenlabs",
                    "tts_fallback_provider": "cartesia",
                    "api_keys": {"groq": "gsk-good", "elevenlabs": "xi-good", "cartesia": "ck-good"},
                    "base_urls": {"groq": groq.base_url, "elevenlabs": elevenlabs.base_url,
                                  "cartesia": cartesia.base_url, "xtts": xtts.base_url}}
            return Config.from_mapping({**base, **raw})

        good = await probe_providers(config(), 2)
        assert good == [("stt", "groq", "ok"), ("llm", "groq", "ok"), ("tts", "elevenlabs", "ok"),
                        ("tts fallback", "cartesia", "ok")]
        bad = await probe_providers(config(model="llama-3.1-70b-typo", tts_model="eleven_turbo_v9",
                                           api_keys={"groq": "gsk-good", "elevenlabs": "xi-good", "cartesia": "nope"},
                                           tts_fallback_provider="xtts"), 2)
        assert bad == [("stt", "groq", "ok"), ("llm", "groq", "model not found"),
                       ("tts", "elevenlabs", "model not found"), ("tts fallback", "xtts", "ok")]
        refused = await probe_providers(config(api_keys={"groq": "gsk-bad", "elevenlabs": "xi-bad",
                                                         "cartesia": "ck-bad"}), 2)
        assert [result for _, _, result in refused] == ["key rejected (401)"] * 4
    assert [r["headers"].get("cartesia-version") for r in cartesia.state.requests] == ["2024-11-13"] * 2
    assert all(r["path"] == "/v1/models" for r in elevenlabs.state.requests)


@pytest.mark.asyncio
async def test_a_server_that_is_not_there_is_unreachable() -> None:
    config = Config.from_mapping({"provider": "local", "llm_provider": "ollama",
                                  "base_urls": {"ollama": "http://127.0.0.1:9/v1"}})
    assert ("llm", "ollama", "unreachable (connect)") in await probe_providers(config, 2)


def test_the_command_prints_each_stage_and_fails_on_any_failure(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"provider": "local"}))
    assert main(["check-config", "--probe", str(path)]) == 0
    out = capsys.readouterr().out
    assert "probe: stt: local: not probed (nothing to reach)" in out
    path.write_text(json.dumps({"provider": "local", "llm_provider": "ollama",
                                "base_urls": {"ollama": "http://127.0.0.1:9/v1"}}))
    assert main(["check-config", "--probe", str(path)]) == 1
    assert "probe: llm: ollama: unreachable (connect)" in capsys.readouterr().out
