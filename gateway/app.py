"""The application factory: ``create_app(config)`` builds everything a running gateway holds.

No globals: the lifespan opens the HTTP client, carriers, providers, session store and personas,
and puts them on ``app.state.services``. Tests build their own app from their own Config.

Usage::

    app = create_app(Config.from_mapping({"public_url": "https://voice.example.com"}))
    uvicorn.run(app)
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import logging
import os
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import httpx
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.routing import Mount, Route, WebSocketRoute

from carriers import CARRIERS
from carriers.base import Carrier
from gateway.admission import Admission
from gateway.calls.registry import CallRegistry
from gateway.cluster import ControlBus, LocalControlBus, RedisControlBus, keep_sessions
from gateway.config import Config
from gateway.group.member import HubControlBus, HubSessionStore, Member, WorkerHeader
from gateway.http.auth import AccessKey
from gateway.http.limits import BodyLimit
from gateway.http.routes import BrowserStart
from gateway.metrics import Metrics
from gateway.personas import PersonaBook
from gateway.sessions import MemorySessionStore, RedisSessionStore, SessionStore
from gateway.startup_checks import run_startup_checks
from gateway.storage.recording import RecordingUploader, default_spool_dir
from gateway.storage.transcripts import TranscriptWriter
from pipeline.conversation import ConversationSettings, ProviderChain
from pipeline.providers import build_llm, build_stt, build_tts
from pipeline.providers.openai import open_session
from pipeline.silero_vad import SileroModel, SileroUnavailable
from pipeline.tools import McpServer, McpStartError, ToolSettings, mcp_specs

__all__ = ["Services", "announce_access", "create_app"]

# Young-generation collections every 20k net allocations instead of 700: each one is still short
# (the young generation is small), and full collections come far less often under per-frame churn.
GC_THRESHOLDS = (20_000, 20, 50)

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class Services:
    """What the lifespan opened; routes reach it as ``request.app.state.services``."""

    config: Config
    http: httpx.AsyncClient
    carriers: dict[str, Carrier]
    unconfigured: dict[str, str]
    sessions: SessionStore
    personas: PersonaBook
    providers: ProviderChain
    conversation_settings: ConversationSettings
    metrics: Metrics
    access: AccessKey                # the API key of the programmatic routes (gateway.http.auth)
    bus: ControlBus = field(default_factory=LocalControlBus)
    recordings: RecordingUploader | None = None      # recording.enable
    transcripts: TranscriptWriter | None = None      # transcripts.enable
    calls: CallRegistry = field(default_factory=CallRegistry)
    draining: bool = False           # SIGTERM received: /ready 503, new calls refused (gateway.drain)
    admission: Admission | None = None   # max_concurrent_calls and the event loop's lag (gateway.admission)
    group: Member | None = None      # a worker of `voxray serve --workers N`: its link to the others
    debug: bool = False
    tool_http: aiohttp.ClientSession | None = None   # HTTP tools' requests (the providers' pooled session)
    tool_settings: ToolSettings = field(default_factory=ToolSettings)
    mcp_servers: list[McpServer] = field(default_factory=list)   # started by the lifespan, for every call



def build_carriers(c: Config, http: httpx.AsyncClient) -> tuple[dict[str, Carrier], dict[str, str]]:
    """Adapters for every carrier whose credentials are set, and why the others are unavailable."""
    carriers: dict[str, Carrier] = {}
    unconfigured: dict[str, str] = {}
    for name, spec in CARRIERS.items():
        settings = c.carriers[name]
        missing = c.carriers.missing(name)
        if missing:
            unconfigured[name] = f"{name} is not configured: set {', '.join(missing)}"
            continue
        if settings.get("verify_signatures") is False:
            logger.warning("carriers.%s.verify_signatures is false: anyone can forge calls; use only for local "
                           "testing", name)
        kwargs = dict(settings)
        if "transfer_url" in kwargs and not kwargs["transfer_url"] and c.public_url:
            kwargs["transfer_url"] = f"{c.public_url}/transfer/{name}"   # served by routes.transfer_markup
        carriers[name] = spec.load()(http=http, **kwargs)
    return carriers, unconfigured


def build_session_store(c: Config, member: Member | None = None) -> SessionStore:
    """Memory for one instance (kept by the supervisor's hub for a worker of a group); Redis
    (``session_store: "redis"``) to share sessions between instances."""
    if c.session_store == "redis":
        return RedisSessionStore(c.redis_url, pending_ttl_s=c.session_pending_ttl_secs, ttl_s=c.session_ttl_secs,
                                 timeout_s=c.redis_timeout_secs, call_ttl_s=c.call_id_ttl_secs)
    if member is not None:
        return HubSessionStore(member)
    return MemorySessionStore(pending_ttl_s=c.session_pending_ttl_secs, ttl_s=c.session_ttl_secs,
                              call_ttl_s=c.call_id_ttl_secs)


def build_bus(c: Config, member: Member | None = None) -> ControlBus:
    """Redis pub/sub between instances when sessions are shared; else the hub between the workers of
    a group; nobody to ask for a lone process."""
    if c.session_store == "redis":
        return RedisControlBus(c.redis_url, timeout_s=c.cluster_request_timeout_secs,
                               connect_timeout_s=c.redis_timeout_secs)
    return LocalControlBus() if member is None else HubControlBus(member)


def build_storage(c: Config, worker: int | None = None) -> tuple[RecordingUploader | None, TranscriptWriter | None]:
    """The recording uploader and transcript writer, each when enabled (neither needs its server up).

    Worker ``n`` of a group spools into ``<spool_dir>/worker-<n>``: each uploader rescans only its own
    directory, so two workers never upload the same recording or replay the same transcript rows, and a
    restarted worker ``n`` picks up what its predecessor left."""
    recording, transcripts_config = c.recording, c.transcripts
    if worker is not None:
        recording = dataclasses.replace(
            recording, spool_dir=str(Path(recording.spool_dir or default_spool_dir()) / f"worker-{worker}"))
        transcripts_config = dataclasses.replace(transcripts_config, spool_dir=str(
            Path(transcripts_config.spool_dir or Path(tempfile.gettempdir()) / "voxray-transcripts")
            / f"worker-{worker}"))
    recordings = RecordingUploader.from_config(recording) if recording.enable else None
    transcripts = TranscriptWriter.from_config(transcripts_config) if transcripts_config.enable else None
    return recordings, transcripts


def build_providers(c: Config, http: aiohttp.ClientSession) -> ProviderChain:
    p = c.providers
    stt = [build_stt(s, http, timeout_s=c.stt_timeout_secs, local_processes=c.local_stt_processes,
                     local_max_pending=c.local_stt_max_pending) for s in (p.stt, p.stt_fallback) if s]
    llm = [build_llm(s, http, timeout_s=c.llm_timeout_secs, max_tokens=c.llm_max_tokens)
           for s in (p.llm, p.llm_fallback) if s]
    tts = [build_tts(s, http, timeout_s=c.tts_timeout_secs) for s in (p.tts, p.tts_fallback) if s]
    return ProviderChain(stt=stt, llm=llm, tts=tts)


async def _render_apology(c: Config, chain: ProviderChain) -> ProviderChain:
    """Speak the apology once at startup, so a TTS outage later still has something to play."""
    for tts in chain.tts:
        try:
            async with asyncio.timeout(c.tts_timeout_secs):
                pcm = b"".join([chunk async for chunk in tts.synthesize(c.apology_text)])
            if pcm:
                return dataclasses.replace(chain, apology_audio=(pcm, tts.sample_rate))
        except Exception as exc:  # noqa: BLE001 - any provider failure just means no cached apology
            logger.warning("could not pre-render the apology with %s: %s", tts.name, exc or type(exc).__name__)
    return chain


async def conversation_settings(config: Config) -> ConversationSettings:
    """The calls' settings; with vad_type 'silero', or barge-ins confirmed by speech (interruption_strategy
    'speech') when Silero is installed, the one Silero session they share, loaded off the loop."""
    settings = ConversationSettings.from_config(config)
    model = SileroModel()
    if config.vad_type != "silero":
        if not config.barge_in or config.interruption_strategy != "speech":
            return settings
        try:
            model.check()
        except SileroUnavailable as exc:
            logger.warning("barge-ins are confirmed by sustained energy, not speech, so noise can interrupt "
                           "the agent: %s", exc)
            return settings
    await asyncio.to_thread(model.load)
    return dataclasses.replace(settings, silero_model=model)


async def start_mcp_servers(config: Config, servers: list[McpServer]) -> None:
    """Start every configured MCP server into ``servers`` (the lifespan closes them); the first that
    cannot start stops startup with an McpStartError naming its key, after closing the ones started."""
    for spec in mcp_specs(config.mcp, config.mcp_servers):
        server = McpServer(spec)
        try:
            await server.start(config.mcp_start_timeout_secs)
        except McpStartError:
            for started in servers:
                await started.close()
            servers.clear()
            raise
        servers.append(server)


def create_app(config: Config, *, member: Member | None = None) -> Starlette:
    """The app; ``member`` when this process is one worker of ``voxray serve --workers N``."""
    from gateway.browser import softphone
    from gateway.browser import ws as browser_ws
    from gateway.http import control, routes

    access = AccessKey.from_config(config)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if member is None:
            await run_startup_checks(config)   # one warning line per usual first-run mistake (gateway.startup_checks)
        else:
            await member.connect()             # the supervisor ran the startup checks once for the group
        # httpx for the carriers' low-volume REST calls; aiohttp for the per-turn provider requests
        async with (httpx.AsyncClient(timeout=httpx.Timeout(10.0)) as http, open_session() as provider_http):
            chain = await _render_apology(config, build_providers(config, provider_http))
            carriers, unconfigured = build_carriers(config, http)
            services = Services(
                config=config, http=http, carriers=carriers, unconfigured=unconfigured,
                sessions=build_session_store(config, member),
                personas=PersonaBook(Path(config.personas_file) if config.personas_file else None),
                providers=chain, conversation_settings=await conversation_settings(config), metrics=Metrics(),
                access=access, bus=build_bus(config, member), group=member,
                debug=logging.getLogger("gateway").isEnabledFor(logging.DEBUG))
            app.state.services = services
            services.tool_http, services.tool_settings = provider_http, ToolSettings.from_config(config)
            await start_mcp_servers(config, services.mcp_servers)
            services.recordings, services.transcripts = build_storage(config, member.worker if member else None)
            for store in (services.recordings, services.transcripts):
                if store is not None:
                    await store.start()
            services.metrics.bind(services)
            if member is not None:
                member.attach(services)
            await services.bus.start(lambda op, sid, args: control.act(services, op, sid, args))
            sync = asyncio.create_task(keep_sessions(
                services.sessions, services.calls.live_sessions, interval_s=config.session_sync_secs,
                on_state=lambda up: services.metrics.session_store_up.set(1 if up else 0)))
            services.admission = Admission.from_config(config, count=lambda: len(services.calls),
                                                       metrics=services.metrics)
            load = asyncio.create_task(services.admission.watch())
            for note in config.providers.notes:
                logger.info(note)
            p = config.providers
            if member is None:
                logger.info("voxray ready: stt=%s llm=%s tts=%s carrier=%s public_url=%s", p.stt.name, p.llm.name,
                            p.tts.name, config.carrier, config.public_url or "(not set: carrier webhooks answer 503)")
                announce_access(config, access)
            else:
                logger.info("worker %d ready (pid %d)", member.worker, os.getpid())
            # Startup objects (modules, models, tables) never die: keep the cyclic collector from
            # re-scanning them on every full collection, which stalls every call's audio at once.
            gc.collect()
            gc.freeze()
            gc.set_threshold(*GC_THRESHOLDS)
            try:
                yield
            finally:
                sync.cancel()
                load.cancel()
                calls = list(services.calls)
                for call in calls:
                    call.finish("shutdown", code=1001, text="server shutting down")
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(config.hangup_timeout_secs + 1.0):
                        await asyncio.gather(*(call.finalised.wait() for call in calls))
                await services.bus.close()
                if member is not None:
                    await member.close()
                for store in (services.transcripts, services.recordings):   # what is not done stays spooled
                    if store is not None:
                        await store.close(config.storage_flush_secs)
                await services.sessions.close()
                for provider in (*chain.stt, *chain.llm, *chain.tts):   # e.g. the pocketsphinx worker processes
                    close = getattr(provider, "close", None)
                    if close is not None:
                        await close()
                for server in services.mcp_servers:
                    await server.close()

    webrtc_routes, browser_start = _webrtc(config)
    middleware = [Middleware(BodyLimit, max_body_bytes=config.max_request_body_bytes)]   # before anything reads
    if member is not None and config.worker_header:
        middleware.insert(0, Middleware(WorkerHeader, worker=member.worker))
    if config.cors_allowed_origins:
        middleware.append(Middleware(CORSMiddleware, allow_origins=list(config.cors_allowed_origins),
                                     allow_methods=["GET", "POST", "DELETE"],
                                     allow_headers=["Authorization", "Content-Type"]))
    return Starlette(routes=[
        Route("/", softphone.index),
        Route("/personas", softphone.personas),
        Mount("/static", app=softphone.static_files(), name="static"),
        Route("/health", routes.health),
        Route("/ready", routes.ready),
        Route("/metrics", routes.metrics),
        Route("/start", routes.start_route(browser_start), methods=["GET", "POST"]),
        Route("/start/{carrier}", routes.start, methods=["GET", "POST"]),
        WebSocketRoute("/media/{carrier}/{session_id}", routes.media),
        Route("/sessions/{session_id}", control.session, methods=["GET", "DELETE"]),
        Route("/sessions/{session_id}/transfer", control.transfer, methods=["POST"]),
        Route("/sessions/{session_id}/dtmf", control.send_dtmf, methods=["POST"]),
        Route("/calls", control.place_call, methods=["POST"]),
        Route("/events/{carrier}/{session_id}", control.carrier_event, methods=["POST"]),
        Route("/transfer/{carrier}", routes.transfer_markup, methods=["GET", "POST"]),
        *([WebSocketRoute("/ws", browser_ws.ws)] if config.transport in ("websocket", "both") else []),
        *webrtc_routes,
    ], middleware=middleware, lifespan=lifespan)


def announce_access(config: Config, access: AccessKey) -> None:
    """Say in one log line what protects what; a generated key is printed once to the terminal (standard
    output, not the log: log lines never carry a secret) inside the softphone URL, as notebook servers do."""
    if access.source == "open":
        logger.warning("%s", access.describe())
    else:
        logger.info("%s", access.describe())
    if access.source == "generated":
        host = "localhost" if config.host in ("0.0.0.0", "::", "") else config.host  # noqa: S104 - a comparison
        base = config.public_url or f"http://{host}:{config.port}"
        print(f"voxray: no server_api_key is set, so this run's API key was generated. Open the softphone at\n"
              f"    {access.softphone_url(base)}\n"
              f"or send 'Authorization: Bearer {access.value}'. Set server_api_key (VOXRAY_SERVER_API_KEY) to "
              f"choose a stable key.", flush=True)


def _webrtc(config: Config) -> tuple[list[Route], BrowserStart | None]:
    """WebRTC's routes, and its JSON ``POST /start``, when ``transport`` includes it; aiortc and PyAV
    (~40 MB) load only then."""
    if config.transport not in ("smallwebrtc", "both"):
        return [], None
    from gateway.browser import webrtc

    return [Route("/webrtc/offer", webrtc.offer, methods=["POST"]),
            Route("/sessions/{session_id}/offer", webrtc.session_offer, methods=["POST"])], webrtc.start_session
