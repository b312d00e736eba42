"""The speech-to-speech keys: ``llm_provider``/``provider`` ``realtime``, its model, key, base URL and choices."""

from __future__ import annotations

import pytest

from gateway.config import Config, ConfigError


def test_llm_provider_realtime_uses_the_openai_key_and_its_own_model() -> None:
    config = Config.from_mapping({"llm_provider": "realtime", "model": "gpt-4o-mini",
                                  "api_keys": {"openai": "sk-test"}})
    llm = config.providers.llm
    assert (llm.name, llm.model, llm.api_key, llm.base_url) == ("realtime", "gpt-realtime", "sk-test",
                                                                "wss://api.openai.com/v1")
    assert config.providers.stt.name == "openai" and config.providers.tts.name == "openai"


def test_provider_realtime_keeps_openai_for_stt_and_tts_and_reads_the_base_url_variable() -> None:
    config = Config.from_mapping({"provider": "realtime", "realtime_model": "gpt-realtime-mini"},
                                 {"OPENAI_API_KEY": "sk-env", "OPENAI_REALTIME_BASE_URL": "http://127.0.0.1:9"})
    p = config.providers
    assert (p.llm.name, p.llm.model, p.llm.base_url) == ("realtime", "gpt-realtime-mini", "http://127.0.0.1:9/v1")
    assert (p.stt.name, p.tts.name) == ("openai", "openai")
    assert any("realtime" in note for note in p.notes)


def test_realtime_choices_and_missing_key_are_named() -> None:
    with pytest.raises(ConfigError) as caught:
        Config.from_mapping({"llm_provider": "realtime", "realtime_turn_detection": "webrtc"})
    text = str(caught.value)
    assert "'realtime_turn_detection' must be one of server_vad, semantic_vad, local" in text
    assert "OPENAI_API_KEY" in text
    with pytest.raises(ConfigError, match="'stt_provider': provider 'realtime' has no STT"):
        Config.from_mapping({"stt_provider": "realtime", "api_keys": {"openai": "sk-test"}})
    with pytest.raises(ConfigError, match="'llm_fallback_provider' cannot pair"):
        Config.from_mapping({"llm_provider": "realtime", "llm_fallback_provider": "openai",
                             "api_keys": {"openai": "sk-test"}})
