"""Tests for gateway.config: design.md §4 defaults, file -> VOXRAY_* -> flags precedence, validation
messages that name the key, provider resolution, and secret masking in describe()."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest

from gateway.config import Config, ConfigError

OPENAI = {"OPENAI_API_KEY": "sk-env-openai-key-0001"}


def write(tmp_path: Path, data: Any, name: str = "config.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(data) if not isinstance(data, str) else data)
    return path


def error(raw: dict[str, Any], environ: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        Config.from_mapping(raw, environ or {})
    return str(info.value)


# ------------------------------------------------------------------------------ defaults (design.md §4)

def test_defaults_match_the_documented_contract() -> None:
    c = Config.from_mapping({}, OPENAI)
    assert c.vad_threshold == 0.02
    assert c.turn_stop_secs == 3
    assert c.session_store == "memory"
    assert c.session_ttl_secs == 3600
    assert c.outbound_message_ms == 60
    assert c.outbound_tick_ms == 10 and c.outbound_tick_ms < c.outbound_lead_ms
    assert c.transport == "both"
    assert c.vad_type == "energy"
    assert c.webrtc_ice_servers == ()
    assert dict(c.api_keys) == {} and c.redis_url == ""
    assert (c.local_stt_processes, c.local_stt_max_pending) == (1, 8)
    r = c.recording
    assert (r.enable, r.bucket, r.base_path, r.format, r.worker_count, r.queue_cap, r.max_retries) == \
        (False, "", "recordings/", "wav", 4, 32, 3)
    t = c.transcripts
    assert (t.enable, t.driver, t.dsn, t.table_name) == (False, "postgres", "", "call_transcripts")
    for key in ("provider", "stt_provider", "llm_provider", "tts_provider", "model", "stt_model", "tts_model",
                "tts_voice"):
        assert getattr(c, key) == ""


def test_vad_type_silero_is_accepted_when_installed() -> None:
    """Its refusal without onnxruntime or silero-vad: tests/pipeline/test_silero_vad.py (the check it runs)."""
    assert Config.from_mapping({"vad_type": "silero", "vad_threshold": 0.6}).vad_type == "silero"


def test_http_edge_defaults_and_proxies_from_the_environment() -> None:
    c = Config.from_mapping({}, OPENAI)
    assert (c.max_request_body_bytes, c.http_header_timeout_secs, c.http_max_header_bytes,
            c.http_keep_alive_timeout_secs, c.forwarded_allow_ips) == (262144, 10.0, 65536, 5.0, ())
    c = Config.load(None, {**OPENAI, "VOXRAY_FORWARDED_ALLOW_IPS": "10.0.0.7, 172.30.0.0/24"})
    assert c.forwarded_allow_ips == ("10.0.0.7", "172.30.0.0/24")


def test_config_is_immutable() -> None:
    c = Config.from_mapping({}, OPENAI)
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.port = 1  # type: ignore[misc]  # the frozen dataclass must refuse it


def test_load_without_a_file_uses_defaults() -> None:
    c = Config.load(None, OPENAI)
    assert c == Config.from_mapping({}, OPENAI)


# ------------------------------------------------------------------------------ precedence

def test_file_then_environment_then_flags(tmp_path: Path) -> None:
    path = write(tmp_path, {"port": 8100, "host": "127.0.0.1", "vad_threshold": 0.05, "log_level": "debug"})
    from_file = Config.load(path, OPENAI)
    assert (from_file.port, from_file.host, from_file.vad_threshold, from_file.log_level) == \
        (8100, "127.0.0.1", 0.05, "debug")

    env = {**OPENAI, "VOXRAY_PORT": "8200", "VOXRAY_VAD_THRESHOLD": "0.07"}
    from_env = Config.load(path, env)
    assert (from_env.port, from_env.host, from_env.vad_threshold, from_env.log_level) == \
        (8200, "127.0.0.1", 0.07, "debug")

    from_flags = Config.load(path, env, overrides={"port": 8300, "host": None})
    assert from_flags.port == 8300
    assert from_flags.host == "127.0.0.1"          # a flag left unset (None) does not override
    assert from_flags.vad_threshold == 0.07


def test_environment_scalars_are_coerced() -> None:
    env = {**OPENAI, "VOXRAY_BARGE_IN": "false", "VOXRAY_LOG_JSON": "yes", "VOXRAY_TURN_STOP_SECS": "1.5",
           "VOXRAY_CORS_ALLOWED_ORIGINS": "https://a.example, https://b.example",
           "VOXRAY_BASE_URLS": '{"groq": "https://proxy.example/groq/v1"}', "VOXRAY_TRANSPORT": "websocket"}
    c = Config.load(None, env)
    assert c.barge_in is False and c.log_json is True
    assert c.turn_stop_secs == 1.5
    assert c.cors_allowed_origins == ("https://a.example", "https://b.example")
    assert dict(c.base_urls) == {"groq": "https://proxy.example/groq/v1"}
    assert c.transport == "websocket"


def test_nested_environment_keys_merge_into_the_file_section(tmp_path: Path) -> None:
    path = write(tmp_path, {"recording": {"base_path": "calls/", "bucket": "file-bucket"},
                            "transcripts": {"table_name": "file_table", "driver": "postgres"}})
    c = Config.load(path, {**OPENAI, "VOXRAY_RECORDING_BUCKET": "env-bucket",
                           "VOXRAY_RECORDING_WORKER_COUNT": "8", "VOXRAY_TRANSCRIPTS_DSN": "postgresql://db/x"})
    assert c.recording.bucket == "env-bucket"
    assert c.recording.base_path == "calls/"        # untouched keys of the file's section survive
    assert c.recording.worker_count == 8
    assert c.transcripts.table_name == "file_table"
    assert c.transcripts.dsn == "postgresql://db/x"


def test_transcripts_table_alias_and_full_name(tmp_path: Path) -> None:
    path = write(tmp_path, {"transcripts": {"table_name": "file_table"}})
    assert Config.load(path, {**OPENAI, "VOXRAY_TRANSCRIPTS_TABLE": "alias_table"}).transcripts.table_name == \
        "alias_table"
    assert Config.load(path, {**OPENAI, "VOXRAY_TRANSCRIPTS_TABLE_NAME": "full_table"}).transcripts.table_name == \
        "full_table"
    assert Config.load(None, {**OPENAI, "VOXRAY_TRANSCRIPTS_TABLE": "t2"}).transcripts.table_name == "t2"


def test_public_url_from_environment_loses_its_trailing_slash() -> None:
    c = Config.load(None, {**OPENAI, "VOXRAY_PUBLIC_URL": "https://voice.example.com/"})
    assert c.public_url == "https://voice.example.com"


def test_recording_endpoint_and_region_default_to_the_aws_variables() -> None:
    env = {"AWS_ENDPOINT_URL": "http://s3.test:9000", "AWS_REGION": "eu-west-1"}
    r = Config.load(None, env).recording
    assert (r.endpoint_url, r.region) == ("http://s3.test:9000", "eu-west-1")
    r = Config.load(None, {"AWS_ENDPOINT_URL_S3": "http://s3-only:1", "AWS_ENDPOINT_URL": "http://other:2",
                           "AWS_DEFAULT_REGION": "us-east-2"}).recording
    assert (r.endpoint_url, r.region) == ("http://s3-only:1", "us-east-2")
    set_here = {"recording": {"endpoint_url": "http://x:1", "region": "us-west-2"}}
    r = Config.from_mapping(set_here, {"AWS_ENDPOINT_URL": "http://ignored", "AWS_REGION": "ignored"}).recording
    assert (r.endpoint_url, r.region) == ("http://x:1", "us-west-2")
    assert (Config.load(None, {}).recording.endpoint_url, Config.load(None, {}).recording.region) == ("", "")


def test_environment_value_with_a_bad_type_names_the_key() -> None:
    with pytest.raises(ConfigError, match="'port'.*whole number"):
        Config.load(None, {**OPENAI, "VOXRAY_PORT": "eighty"})
    with pytest.raises(ConfigError, match="'recording.queue_cap'"):
        Config.load(None, {**OPENAI, "VOXRAY_RECORDING_QUEUE_CAP": "lots"})


# ------------------------------------------------------------------------------ file errors

def test_missing_file_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope.json"
    with pytest.raises(ConfigError, match="nope.json"):
        Config.load(missing, OPENAI)


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", '"a string"'])
def test_file_must_be_a_json_object(tmp_path: Path, text: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match="config.json"):
        Config.load(path, OPENAI)


# ------------------------------------------------------------------------------ unknown keys

def test_unknown_key_is_named_with_a_suggestion(tmp_path: Path) -> None:
    path = write(tmp_path, {"vad_treshold": 0.1})
    with pytest.raises(ConfigError) as info:
        Config.load(path, OPENAI)
    message = str(info.value)
    assert "'vad_treshold'" in message
    assert "did you mean 'vad_threshold'" in message


def test_unknown_nested_key_is_named_with_its_section() -> None:
    message = error({"recording": {"bukket": "x"}}, OPENAI)
    assert "'recording.bukket'" in message and "did you mean 'recording.bucket'" in message


def test_unknown_key_without_a_close_match_has_no_suggestion() -> None:
    message = error({"zzzzqqq": 1}, OPENAI)
    assert "'zzzzqqq'" in message and "did you mean" not in message


def test_derived_providers_is_not_a_config_key() -> None:
    assert "'providers'" in error({"providers": {}}, OPENAI)


# ------------------------------------------------------------------------------ bad types and values

@pytest.mark.parametrize(("raw", "key"), [
    ({"port": "abc"}, "'port'"),
    ({"port": 80.5}, "'port'"),
    ({"port": True}, "'port'"),
    ({"port": 0}, "'port'"),
    ({"port": 70000}, "'port'"),
    ({"barge_in": "maybe"}, "'barge_in'"),
    ({"barge_in": 1}, "'barge_in'"),
    ({"vad_threshold": "loud"}, "'vad_threshold'"),
    ({"vad_threshold": 1.5}, "'vad_threshold'"),
    ({"vad_threshold": 0}, "'vad_threshold'"),
    ({"host": 5}, "'host'"),
    ({"transport": "carrier-pigeon"}, "'transport'"),
    ({"session_store": "mongo"}, "'session_store'"),
    ({"log_level": "loud"}, "'log_level'"),
    ({"recording": 5}, "'recording'"),
    ({"recording": {"worker_count": "four"}}, "'recording.worker_count'"),
    ({"transcripts": {"enable": "perhaps"}}, "'transcripts.enable'"),
    ({"api_keys": {"openai": 5}}, "'api_keys'"),
    ({"api_keys": ["sk"]}, "'api_keys'"),
    ({"cors_allowed_origins": 5}, "'cors_allowed_origins'"),
    ({"turn_stop_secs": 0}, "'turn_stop_secs'"),
    ({"stt_timeout_secs": -1}, "'stt_timeout_secs'"),
    ({"outbound_message_ms": 0}, "'outbound_message_ms'"),
    ({"outbound_message_ms": 50}, "'outbound_message_ms'"),                 # not whole 20 ms frames
    ({"outbound_message_ms": 220}, "'outbound_message_ms'"),
    ({"outbound_lead_ms": 80, "outbound_message_ms": 160}, "'outbound_tick_ms'"),   # sends again at a 10 ms lead
    ({"outbound_tick_ms": -1}, "'outbound_tick_ms'"),
    ({"outbound_tick_ms": 100}, "'outbound_tick_ms'"),                       # not below outbound_lead_ms
    ({"outbound_lead_ms": 10}, "'outbound_tick_ms'"),                        # the default tick no longer fits
    ({"provider_retries": -1}, "'provider_retries'"),
    ({"local_stt_processes": 0}, "'local_stt_processes'"),
    ({"local_stt_max_pending": 0}, "'local_stt_max_pending'"),
    ({"vad_stop_ms": 5000}, "'vad_stop_ms'"),
    ({"public_url": "voice.example.com"}, "'public_url'"),
    ({"webrtc_ice_servers": [{"username": "u"}]}, "'webrtc_ice_servers'"),
    ({"max_request_body_bytes": 0}, "'max_request_body_bytes'"),
    ({"max_request_body_bytes": 1000}, "'max_request_body_bytes'"),           # below webrtc_max_sdp_bytes
    ({"http_header_timeout_secs": 0}, "'http_header_timeout_secs'"),
    ({"http_keep_alive_timeout_secs": -1}, "'http_keep_alive_timeout_secs'"),
    ({"http_max_header_bytes": 512}, "'http_max_header_bytes'"),
    ({"forwarded_allow_ips": ["proxy.internal"]}, "'forwarded_allow_ips'"),
    ({"forwarded_allow_ips": "*"}, "'forwarded_allow_ips'"),
    ({"interruption_strategy": "keyword"}, "'interruption_strategy'"),
    ({"interruption_speech_ms": 0}, "'interruption_speech_ms'"),
    ({"false_interruption_secs": 0}, "'false_interruption_secs'"),
    ({"interruption_speech_ms": 600, "false_interruption_secs": 0.5}, "'interruption_speech_ms'"),
    ({"min_words": -1}, "'min_words'"),
    ({"backchannels": {"en": ["yeah"]}}, "'backchannels'"),
    ({"backchannels": {"en": "yeah,,okay"}}, "'backchannels.en'"),
    ({"allow_interruptions": False, "barge_in": True}, "'allow_interruptions'"),
])
def test_bad_values_name_the_key(raw: dict[str, Any], key: str) -> None:
    assert key in error(raw, OPENAI)


def test_type_error_says_what_was_expected_and_what_was_given() -> None:
    message = error({"port": "abc"}, OPENAI)
    assert "whole number" in message and "'abc'" in message


@pytest.mark.parametrize("key", ["turn_stop_secs", "stt_timeout_secs", "max_call_secs"])
def test_non_finite_numbers_are_rejected(key: str) -> None:
    assert f"'{key}'" in error({key: "nan"}, OPENAI)


# ------------------------------------------------------------------------------ provider resolution

def test_openai_key_in_the_environment_selects_openai_everywhere() -> None:
    p = Config.from_mapping({}, OPENAI).providers
    assert (p.stt.name, p.llm.name, p.tts.name) == ("openai", "openai", "openai")
    assert p.llm.api_key == OPENAI["OPENAI_API_KEY"]
    assert p.llm.base_url == "https://api.openai.com/v1"
    assert (p.stt.model, p.llm.model, p.tts.model) == ("whisper-1", "gpt-4o-mini", "tts-1")
    assert p.tts.voice == "alloy" and p.llm.voice is None
    assert p.notes == ()
    assert (p.stt_fallback, p.llm_fallback, p.tts_fallback) == (None, None, None)


def test_stage_key_beats_provider_beats_openai() -> None:
    env = {**OPENAI, "GROQ_API_KEY": "gsk-1234567890", "CEREBRAS_API_KEY": "csk-1234567890"}
    p = Config.from_mapping({"provider": "groq", "llm_provider": "cerebras", "tts_provider": "openai"}, env).providers
    assert (p.stt.name, p.llm.name, p.tts.name) == ("groq", "cerebras", "openai")
    assert p.stt.api_key == "gsk-1234567890" and p.llm.api_key == "csk-1234567890"
    assert p.stt.model == "whisper-large-v3" and p.llm.model == "llama3.1-8b"
    q = Config.from_mapping({"stt_provider": "groq"}, env).providers
    assert (q.stt.name, q.llm.name, q.tts.name) == ("groq", "openai", "openai")


def test_nothing_configured_and_no_keys_uses_local_with_a_note() -> None:
    p = Config.from_mapping({}, {}).providers
    assert (p.stt.name, p.llm.name, p.tts.name) == ("local", "local", "local")
    assert p.stt.api_key is None
    assert len(p.notes) == 3
    for stage, note in zip(("stt", "llm", "tts"), p.notes, strict=True):
        assert note.startswith(f"{stage}:") and "local" in note and "OPENAI_API_KEY" in note


def test_only_unconfigured_stages_fall_back_to_local() -> None:
    p = Config.from_mapping({"llm_provider": "ollama"}, {}).providers
    assert (p.stt.name, p.llm.name, p.tts.name) == ("local", "ollama", "local")
    assert p.llm.api_key is None and p.llm.base_url == "http://localhost:11434/v1"
    assert len(p.notes) == 2 and not any(n.startswith("llm") for n in p.notes)


@pytest.mark.parametrize(("raw", "key", "var"), [
    ({"provider": "groq"}, "'provider'", "GROQ_API_KEY"),
    ({"llm_provider": "groq"}, "'llm_provider'", "GROQ_API_KEY"),
    ({"provider": "openai"}, "'provider'", "OPENAI_API_KEY"),
    ({"tts_provider": "openai"}, "'tts_provider'", "OPENAI_API_KEY"),
    ({"llm_provider": "deepseek"}, "'llm_provider'", "DEEPSEEK_API_KEY"),
    ({"llm_fallback_provider": "mistral", "provider": "local"}, "'llm_fallback_provider'", "MISTRAL_API_KEY"),
])
def test_explicit_provider_without_its_key_names_the_variable(raw: dict[str, Any], key: str, var: str) -> None:
    message = error(raw, {})
    assert key in message and var in message


def test_provider_that_lacks_the_stage_is_an_error() -> None:
    message = error({"tts_provider": "groq"}, {**OPENAI, "GROQ_API_KEY": "gsk-1234567890"})
    assert "'tts_provider'" in message and "openai" in message
    message = error({"provider": "groq"}, {"GROQ_API_KEY": "gsk-1234567890"})   # groq has no TTS
    assert "'provider'" in message and "tts" in message.lower()


def test_unknown_provider_is_named() -> None:
    message = error({"llm_provider": "skynet"}, OPENAI)
    assert "'llm_provider'" in message and "skynet" in message and "openai" in message


def test_api_keys_beat_environment_variables() -> None:
    p = Config.from_mapping({"api_keys": {"openai": "sk-from-config-123"}}, OPENAI).providers
    assert p.llm.api_key == "sk-from-config-123" and p.llm.name == "openai"
    q = Config.from_mapping({"provider": "groq", "tts_provider": "openai",
                             "api_keys": {"groq": "gsk-from-config"}}, {**OPENAI, "GROQ_API_KEY": "gsk-env"}).providers
    assert q.stt.api_key == "gsk-from-config" and q.tts.api_key == OPENAI["OPENAI_API_KEY"]


def test_api_keys_alone_avoid_the_local_fallback() -> None:
    p = Config.from_mapping({"api_keys": {"openai": "sk-from-config-123"}}, {}).providers
    assert (p.stt.name, p.llm.name, p.tts.name) == ("openai", "openai", "openai") and p.notes == ()


def test_base_url_from_environment_and_from_config() -> None:
    env = {**OPENAI, "OPENAI_BASE_URL": "http://proxy.internal/openai/v1"}
    assert Config.from_mapping({}, env).providers.llm.base_url == "http://proxy.internal/openai/v1"
    c = Config.from_mapping({"base_urls": {"openai": "https://gw.example/v2"}}, env)
    assert c.providers.llm.base_url == "https://gw.example/v2"          # config beats the variable


@pytest.mark.parametrize(("root", "expected"), [
    ("http://localhost:9000", "http://localhost:9000/v1"),
    ("http://localhost:9000/", "http://localhost:9000/v1"),
    ("http://localhost:9000/v1", "http://localhost:9000/v1"),
    ("http://localhost:9000/asr/v1", "http://localhost:9000/asr/v1"),
])
def test_root_base_url_gets_v1(root: str, expected: str) -> None:
    p = Config.from_mapping({"stt_provider": "whisper"}, {**OPENAI, "WHISPER_BASE_URL": root}).providers
    assert p.stt.name == "whisper" and p.stt.base_url == expected
    q = Config.from_mapping({"llm_provider": "ollama", "base_urls": {"ollama": root}}, OPENAI).providers
    assert q.llm.base_url == expected


def test_models_voice_and_fallbacks() -> None:
    env = {**OPENAI, "GROQ_API_KEY": "gsk-1234567890"}
    c = Config.from_mapping({"model": "gpt-4.1", "stt_model": "whisper-x", "tts_model": "tts-hd",
                             "tts_voice": "nova", "llm_fallback_provider": "groq",
                             "stt_fallback_provider": "groq"}, env)
    p = c.providers
    assert (p.stt.model, p.llm.model, p.tts.model, p.tts.voice) == ("whisper-x", "gpt-4.1", "tts-hd", "nova")
    assert p.llm_fallback is not None and p.llm_fallback.name == "groq"
    assert p.llm_fallback.api_key == "gsk-1234567890"
    assert p.stt_fallback is not None and p.stt_fallback.name == "groq"
    assert p.tts_fallback is None


# ------------------------------------------------------------------------------ describe()

SECRETS = {
    "server": "srv-secret-value-123456",
    "openai": "sk-proj-supersecretvalue-abcdef",
    "groq": "gsk-another-secret-value-9876",
    "twilio": "tw-auth-token-secret-abcdef",
    "shared": "shared-key-secret-xyz-777",
    "db": "dbpass-secret-4321",
    "redis": "redispass-secret-8765",
}


def secret_config() -> Config:
    return Config.from_mapping({
        "server_api_key": SECRETS["server"],
        "api_keys": {"openai": SECRETS["openai"], "groq": SECRETS["groq"]},
        "carriers": {"twilio": {"account_sid": "AC123", "auth_token": SECRETS["twilio"],
                                "shared_key_secrets": {"key-1": SECRETS["shared"]}}},
        "transcripts": {"dsn": f"postgresql://voxray:{SECRETS['db']}@db.internal:5432/calls"},
        "redis_url": f"redis://:{SECRETS['redis']}@redis.internal:6379/0",
        "llm_fallback_provider": "groq",
    }, {})


def test_describe_masks_every_secret() -> None:
    described = secret_config().describe()
    text = json.dumps(described)
    for name, secret in SECRETS.items():
        assert secret not in text, name
    assert described["server_api_key"] == "***"
    assert described["api_keys"] == {"openai": "***", "groq": "***"}
    assert described["carriers"]["twilio"]["auth_token"] == "***"
    assert described["carriers"]["twilio"]["account_sid"] == "AC123"          # not a secret
    assert described["carriers"]["twilio"]["shared_key_secrets"] == {"key-1": "***"}
    assert described["transcripts"]["dsn"] == "postgresql://voxray:***@db.internal:5432/calls"
    assert described["redis_url"] == "redis://:***@redis.internal:6379/0"
    providers = described["providers"]
    assert providers["llm"]["name"] == "openai" and providers["llm_fallback"]["name"] == "groq"
    assert providers["llm"]["api_key"] != SECRETS["openai"] and "…" in providers["llm"]["api_key"]
    assert providers["notes"] == []


def test_describe_masks_secrets_taken_from_the_environment() -> None:
    c = Config.load(None, {"OPENAI_API_KEY": SECRETS["openai"], "TWILIO_AUTH_TOKEN": SECRETS["twilio"],
                           "TWILIO_ACCOUNT_SID": "AC999", "VOXRAY_SERVER_API_KEY": SECRETS["server"]})
    assert c.carriers.twilio.auth_token == SECRETS["twilio"] and c.server_api_key == SECRETS["server"]
    text = json.dumps(c.describe())
    for secret in (SECRETS["openai"], SECRETS["twilio"], SECRETS["server"]):
        assert secret not in text
    assert "AC999" in text


def test_describe_is_plain_json_and_lists_every_key() -> None:
    c = Config.from_mapping({}, {})
    described = c.describe()
    json.dumps(described)                      # serialisable
    keys = {f.name for f in dataclasses.fields(Config)}
    assert keys <= set(described)
    assert len(described["providers"]["notes"]) == 3
    assert described["server_api_key"] == "" and described["api_keys"] == {}


def test_describe_masks_turn_credentials() -> None:
    c = Config.from_mapping({"webrtc_ice_servers": [{"urls": "turn:turn.example.com:3478", "username": "voxray",
                                                     "credential": "turn-secret-password-42"}]}, OPENAI)
    text = json.dumps(c.describe())
    assert "turn:turn.example.com:3478" in text
    assert "turn-secret-password-42" not in text


def test_describe_masks_only_secrets_never_numbers_switches_or_ids() -> None:
    c = Config.from_mapping({"carriers": {
        "vonage": {"application_id": "app-1", "signature_secret": "vonage-signing-secret-1234",
                   "ws_auth_value": "Bearer ws-secret-value-5678", "max_token_age_s": 120.0, "rest_token_ttl_s": 600},
        "telnyx": {"api_key": "KEYtelnyx-secret-0001", "public_key": "cHVibGljLWtleQ==", "stream_auth_header": False},
        "plivo": {"auth_id": "MA123", "auth_token": "plivo-secret-token-0001",
                  "api_base_url": "https://user:url-secret-0001@api.plivo.test"}},
        "base_urls": {"openai": "https://proxy:base-url-secret-0001@gw.example/v1"}}, OPENAI)
    described = c.describe()
    text = json.dumps(described)
    for secret in ("vonage-signing-secret-1234", "ws-secret-value-5678", "KEYtelnyx-secret-0001",
                   "plivo-secret-token-0001", "url-secret-0001", "base-url-secret-0001"):
        assert secret not in text, secret
    vonage, telnyx, plivo = (described["carriers"][n] for n in ("vonage", "telnyx", "plivo"))
    assert (vonage["max_token_age_s"], vonage["rest_token_ttl_s"], vonage["application_id"]) == (120.0, 600, "app-1")
    assert (vonage["signature_secret"], vonage["ws_auth_value"]) == ("***", "***")
    assert (telnyx["stream_auth_header"], telnyx["public_key"], telnyx["api_key"]) == (False, "cHVibGljLWtleQ==", "***")
    assert (plivo["auth_id"], plivo["api_base_url"]) == ("MA123", "https://user:***@api.plivo.test")
    assert plivo["main_auth_token"] is None and telnyx["stream_auth_token"] == ""   # unset: nothing to mask
    assert described["base_urls"] == {"openai": "https://proxy:***@gw.example/v1"}
    assert described["providers"]["llm"]["base_url"] == "https://proxy:***@gw.example/v1"
    assert described["carriers"]["twilio"]["api_base_url"] == "https://api.twilio.com"   # plain URLs stay


# ------------------------------------------------------------------------------ every error at once, and its source

def test_every_problem_is_reported_at_once_one_line_each() -> None:
    with pytest.raises(ConfigError) as info:
        Config.from_mapping({"port": "abc", "vad_treshold": 0.1, "turn_stop_secs": 0, "transport": "pigeon",
                             "recording": {"worker_count": "four"}, "provider": "groq"}, {})
    lines = info.value.problems
    assert str(info.value).splitlines() == list(lines)
    for key in ("'port'", "'vad_treshold'", "'turn_stop_secs'", "'transport'", "'recording.worker_count'",
                "GROQ_API_KEY"):
        assert sum(key in line for line in lines) >= 1, (key, lines)
    assert len(lines) == len(set(lines))                # groq for stt and llm: said once


def test_errors_name_the_environment_variable_the_file_or_the_flag(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        Config.load(None, {**OPENAI, "VOXRAY_PORT": "abc"})
    assert str(info.value) == "'port' must be a whole number (got 'abc' from VOXRAY_PORT)"
    path = write(tmp_path, {"port": 70000, "recording": {"queue_cap": "lots"}, "vad_treshold": 1})
    with pytest.raises(ConfigError) as info:
        Config.load(path, {**OPENAI, "VOXRAY_RECORDING_WORKER_COUNT": "0"})
    assert set(info.value.problems) == {
        f"'port' must be at most 65535 (got 70000 from {path})",
        f"'recording.queue_cap' must be a whole number (got 'lots' from {path})",
        "'recording.worker_count' must be greater than 0 (got 0 from VOXRAY_RECORDING_WORKER_COUNT)",
        f"unknown config key 'vad_treshold' (did you mean 'vad_threshold'?); remove it or fix its name (in {path})"}
    with pytest.raises(ConfigError, match=r"\(got 0 from --port\)"):
        Config.load(path, OPENAI, overrides={"port": 0})


def test_missing_file_message_fits_serve_and_check_config(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        Config.load(tmp_path / "nope.json", OPENAI)
    assert "--config PATH" in str(info.value) and "VOXRAY_CONFIG" in str(info.value)
    assert "omit --config" not in str(info.value)


def test_new_keys_are_validated_naming_the_key() -> None:
    assert "'startup_check_timeout_secs'" in error({"startup_check_timeout_secs": 0}, OPENAI)
    assert "'log_transcripts'" in error({"log_transcripts": "sometimes"}, OPENAI)
    message = error({"recording": {"require_at_start": True}}, OPENAI)
    assert "'recording.require_at_start'" in message and "recording.enable" in message
    c = Config.from_mapping({"log_transcripts": True, "recording": {"enable": True, "bucket": "b",
                                                                    "require_at_start": True}}, OPENAI)
    assert c.log_transcripts and c.recording.require_at_start and c.startup_check_timeout_secs == 3.0


def test_tool_keys_are_validated_naming_the_key(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"mcp": {"command": "python", "url": "http://127.0.0.1:9000/mcp"},
                                "mcp_servers": [{"url": "http://127.0.0.1:9000/mcp", "tools_filter": "lookup"}],
                                "tool_max_repeats": 0, "tool_filler_secs": -1}))
    with pytest.raises(ConfigError) as err:
        Config.load(path, {})
    text = str(err.value)
    assert "'mcp' needs either 'command'" in text and str(path) in text
    with pytest.raises(ConfigError, match=r"'mcp_servers\[0\].tools_filter' must be a list"):
        Config.from_mapping({"mcp_servers": [{"url": "http://127.0.0.1:9000/mcp", "tools_filter": "lookup"}]})
    assert "'tool_max_repeats' must be greater than 0" in text and "'tool_filler_secs' must be 0 or more" in text
    good = Config.from_mapping({"mcp": {"command": "python", "args": ["tools.py"], "tools_filter": ["lookup"]}})
    assert good.mcp == {"command": "python", "args": ["tools.py"], "tools_filter": ["lookup"]}


# ------------------------------------------------------------------------------------- provider_options

def test_provider_options_reach_the_stage_settings_with_the_declared_defaults_filled_in() -> None:
    config = Config.from_mapping({"provider": "local", "tts_provider": "elevenlabs", "api_keys": {"elevenlabs": "k"},
                                  "provider_options": {"elevenlabs": {"stability": "0.4", "sample_rate": 8000},
                                                       "sarvam": {"language": "hi-IN"}}})
    options = config.providers.tts.options
    assert options["stability"] == 0.4 and options["sample_rate"] == 8000       # coerced to the declared type
    assert options["similarity_boost"] is None and options["language"] == ""   # declared defaults
    assert config.provider_options["sarvam"] == {"language": "hi-IN"}
    assert config.describe()["providers"]["tts"]["options"]["stability"] == 0.4


def test_provider_options_from_the_environment_as_json() -> None:
    config = Config.load(None, {"VOXRAY_TTS_PROVIDER": "cartesia", "VOXRAY_PROVIDER": "local",
                                "CARTESIA_API_KEY": "k",
                                "VOXRAY_PROVIDER_OPTIONS": '{"cartesia": {"language": "de"}}'})
    assert config.providers.tts.options["language"] == "de"


def test_unknown_providers_and_options_and_bad_values_name_the_key_path_and_source(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"provider": "local", "provider_options": {
        "acme": {"x": 1}, "cartesia": {"langauge": "de", "sample_rate": 12345},
        "grok": {"speed": 1.0}, "elevenlabs": {"stability": "high"}}}))
    with pytest.raises(ConfigError) as err:
        Config.load(path, {})
    problems = "\n".join(err.value.problems)
    assert "'provider_options.acme': no provider 'acme'" in problems
    assert "'provider_options.cartesia.langauge': cartesia takes language, sample_rate, version" in problems
    assert "'provider_options.cartesia.sample_rate' must be one of 8000, 16000" in problems
    assert "'provider_options.grok.speed': xai takes none" in problems
    assert "'provider_options.elevenlabs.stability' must be a finite number" in problems
    assert all(f"{path}" in line for line in err.value.problems), problems


def test_workers_take_a_number_or_auto_for_one_per_core() -> None:
    import os

    assert Config.from_mapping({}).workers == 1
    assert Config.load(None, {"VOXRAY_WORKERS": "3"}).workers == 3
    assert Config.load(None, {}, {"workers": "auto"}).workers == len(os.sched_getaffinity(0))
    with pytest.raises(ConfigError) as info:
        Config.load(None, {"VOXRAY_WORKERS": "many"})
    assert str(info.value) == "'workers' must be a whole number or \"auto\" (one per core) (got 'many' from VOXRAY_WORKERS)"
    with pytest.raises(ConfigError) as info:
        Config.load(None, {}, {"workers": "0"})
    assert str(info.value) == "'workers' must be greater than 0 (got 0 from --workers)"


def test_turn_taking_keys_and_the_seed_name_of_barge_in() -> None:
    c = Config.from_mapping({"allow_interruptions": False, "min_words": 2, "interruption_strategy": "immediate",
                             "backchannels": {"en": "yeah, okay"}}, OPENAI)
    assert c.barge_in is False and c.min_words == 2 and c.interruption_strategy == "immediate"
    assert c.backchannels == {"en": "yeah, okay"}
    assert Config.from_mapping({}, OPENAI).backchannels["en"].startswith("uh huh")
