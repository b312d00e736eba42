"""WebRTC: the browser/app transport over aiortc (ICE, DTLS, SRTP, Opus/G.711), mirroring ``/ws``.

Signaling is one HTTP round trip (no trickle ICE: the answer carries the server's candidates)::

    POST /webrtc/offer          {"sdp": "...", "type": "offer", "context": {"messages": [...]},
                                 "persona": "concierge", "number": "+14155550100", "codec": "opus"|"pcmu"}
      -> 200 {"sdp": "...", "type": "answer", "session_id": "...", "persona": "...", "codec": "opus"}
    POST /start                 {"context": {...}, "persona": "...", "number": "..."}   (Content-Type: application/json)
      -> 200 {"session_id": "...", "persona": "...", "offer_url": "/sessions/<id>/offer", "expires_in_secs": 120}
    POST /sessions/{id}/offer   {"sdp": "...", "type": "offer", "codec"?}      (claims that session once)
      -> 200 {"sdp": "...", "type": "answer", "session_id": "...", "persona": "...", "codec": "..."}

Errors are JSON ``{"error": "..."}``: 401 (``server_api_key`` set and no ``Authorization: Bearer <key>`` /
``?token=<key>``), 415 (not ``application/json``), 400 (not JSON, no ``sdp``, ``type`` not ``"offer"``,
an SDP aiortc cannot parse, no audio m-line, no audio codec in common, a bad context/persona/number/codec),
413 (SDP over ``webrtc_max_sdp_bytes``), 404 (``/sessions/{id}/offer``: unknown, used or expired session),
503 (session store down, or the instance is draining). A refused offer never touches another session.
Requiring ``application/json`` makes a cross-site page's request need a CORS preflight, which only the
``cors_allowed_origins`` pass. ``POST /start`` takes the JSON branch only for an empty object or one with
``context``/``persona``/``number`` keys; any other body (a carrier's form or JSON webhook) is the
carrier's, exactly as before.

Media: the peer's first audio m-line. Its audio (Opus at 48 kHz, or PCMU at 8 kHz when the browser
prefers it or the offer says ``"codec": "pcmu"``, the softphone's "phone codec" mode) is decoded by
aiortc, downmixed to 16-bit mono and fed to the conversation at the decoded rate. The agent's audio goes
out through :class:`gateway.browser.webrtc_audio.OutboundAudioTrack` (16 kHz for Opus, 8 kHz for G.711, so the
phone mode is band-limited by our own anti-aliased resampler exactly as on a phone leg), paced in real
time; a barge-in flushes it.

Events: over the first data channel the browser creates (label ``"events"`` recommended), the same JSON
as ``/ws`` (see :mod:`gateway.browser.events`): ``ready`` (``session_id``, ``persona``, ``codec``,
``sample_rate``), ``transcript``, ``bot_speaking``, ``turn_latency``, ``interrupted``, ``error``, ``end``
(``reason``). Events before the channel opens are queued. The browser sends ``{"type": "interrupt"}`` and
``{"type": "end"}``.

Lifetime (one :class:`gateway.calls.call.Call` on a :class:`WebRTCLeg`, as for every transport): it runs in the
offer's request task after the answer is sent (no stray task), is registered in ``services.calls``
(``DELETE /sessions/{id}``, drain and shutdown end it; metrics carry the carrier label ``webrtc``; the
store's carrier is ``browser``) and ends through one idempotent finaliser (``end`` on the channel, peer
connection closed, session removed). Limits: ``webrtc_connect_timeout_secs`` (the peer never connects:
``connect_timeout``), ``webrtc_idle_timeout_secs`` (a connected peer sends no audio: ``idle_timeout``),
``max_call_secs`` (goodbye, then ``max_duration``); the connection failing or closing ends it too. ICE
servers come from ``webrtc_ice_servers`` (none by default: host candidates only, right for a server with
a public address; add STUN/TURN behind NAT).

Usage (``gateway.app`` mounts it when ``transport`` is ``smallwebrtc`` or ``both``)::

    Route("/webrtc/offer", webrtc.offer, methods=["POST"])
    Route("/sessions/{session_id}/offer", webrtc.session_offer, methods=["POST"])
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import av
from aiortc import (
    MediaStreamTrack,
    RTCConfiguration,
    RTCDataChannel,
    RTCIceServer,
    RTCPeerConnection,
    RTCRtpSender,
    RTCRtpTransceiver,
    RTCSessionDescription,
    sdp,
)
from aiortc.mediastreams import MediaStreamError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import Receive, Scope, Send

from carriers.base import CallControlFailed
from gateway.admission import turn_away
from gateway.browser.events import encode, ready_event
from gateway.browser.webrtc_audio import OPUS_OUTPUT_RATE, PHONE_RATE, OutboundAudioTrack, frame_to_pcm
from gateway.browser.ws import FRAME_MS, StartRequest, parse_start, start_persona
from gateway.calls.call import Call
from gateway.calls.leg import CallSide
from gateway.http.auth import refusal_for
from gateway.http.errors import error, services_of
from gateway.logging import call_id
from gateway.personas import PersonaError
from gateway.redaction import short_id
from gateway.sessions import Session, SessionStoreUnavailable
from pipeline.conversation import Persona
from pipeline.frames import AudioFrame, Clear, Frame
from pipeline.jsonutil import JSONLimitExceeded, loads

if TYPE_CHECKING:
    from gateway.app import Services
    from gateway.config import Config

__all__ = ["OfferRefused", "OfferRequest", "WebRTCLeg", "ice_configuration", "offer", "parse_offer", "session_offer",
           "start_session"]

logger = logging.getLogger(__name__)

# aiortc logs whole SDPs (ICE passwords, DTLS fingerprints) and per-packet detail at DEBUG, aioice every
# candidate-pair check at INFO: keep both at WARNING, even when the gateway runs at debug (this module logs
# the connection's states itself), unless an operator set these loggers' levels deliberately.
for _name in ("aiortc", "aioice"):
    if logging.getLogger(_name).level == logging.NOTSET:
        logging.getLogger(_name).setLevel(logging.WARNING)

CARRIER = "browser"            # the session's carrier in the store (a /start JSON session is claimed as this)
METRICS_LABEL = "webrtc"       # the carrier label of this transport's metrics
CODECS = {"opus": "audio/opus", "pcmu": "audio/PCMU"}     # what an offer's "codec" may ask for
PHONE_CODECS = ("pcmu", "pcma")
START_KEYS = frozenset({"context", "persona", "number"})
_MAX_PENDING_EVENTS = 256      # events queued before the data channel opens (older ones are dropped)
_CLOSE_TIMEOUT_S = 5.0
_DRAIN_TIMEOUT_S = 0.5


# ------------------------------------------------------------------------------------------ configuration
def ice_configuration(servers: Sequence[Mapping[str, Any]]) -> RTCConfiguration:
    """``webrtc_ice_servers`` (``[{"urls": "stun:..."}, {"urls": ["turn:..."], "username", "credential"}]``)
    as aiortc's configuration. An empty list means host candidates only (aiortc's default public STUN
    server is never used implicitly)."""
    return RTCConfiguration(iceServers=[
        RTCIceServer(urls=s["urls"], username=s.get("username"), credential=s.get("credential")) for s in servers])


# ------------------------------------------------------------------------------------------ requests
class OfferRefused(Exception):
    """A signaling request answered with a 4xx/5xx JSON error (``status``; the text says what to fix)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class OfferRequest:
    """A validated offer body."""

    __slots__ = ("codec", "sdp")

    def __init__(self, sdp_text: str, codec: str) -> None:
        self.sdp, self.codec = sdp_text, codec


def parse_offer(data: Any, max_sdp_bytes: int) -> OfferRequest:
    """``{"sdp": "...", "type": "offer", "codec"?}``; raises OfferRefused naming what is wrong."""
    if not isinstance(data, dict):
        raise OfferRefused(400, 'the body must be a JSON object {"sdp": "...", "type": "offer"}')
    text = data.get("sdp")
    if not isinstance(text, str) or not text.strip():
        raise OfferRefused(400, 'missing "sdp": send the browser\'s offer as {"sdp": pc.localDescription.sdp, '
                            '"type": "offer"}')
    if data.get("type") != "offer":
        raise OfferRefused(400, f'"type" must be "offer" (got {data.get("type")!r})')
    size = len(text.encode())
    if size > max_sdp_bytes:
        raise OfferRefused(413, f"the SDP is {size} bytes, over webrtc_max_sdp_bytes={max_sdp_bytes}")
    codec = data.get("codec", "")
    if codec not in ("", *CODECS):
        raise OfferRefused(400, f'"codec" must be "opus" or "pcmu" (got {codec!r})')
    return OfferRequest(text, codec)


def parse_session_fields(data: Mapping[str, Any]) -> StartRequest:
    """``context``, ``persona`` and ``number`` validated exactly as ``/ws`` validates its ``start``."""
    fields = {k: data[k] for k in START_KEYS if k in data}
    try:
        return parse_start(json.dumps({"type": "start", **fields}))
    except ValueError as exc:
        raise OfferRefused(400, str(exc)) from None


def _start_persona(services: Services, start: StartRequest) -> tuple[Persona, tuple[dict[str, str], ...]]:
    """``browser_ws.start_persona``, refusing an unknown persona with 400."""
    try:
        return start_persona(services, start)
    except ValueError as exc:
        raise OfferRefused(400, str(exc)) from None


async def _read_json(request: Request, limit: int, what: str) -> Any:
    """The JSON body, at most ``limit`` bytes (413), of type application/json (415)."""
    content_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if content_type != "application/json":
        raise OfferRefused(415, f"Content-Type must be application/json (got {content_type or 'none'!r})")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise OfferRefused(413, f"the request body is {declared} bytes, over {limit} ({what})")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise OfferRefused(413, f"the request body is over {limit} bytes ({what})")
    try:
        return loads(body)
    except ValueError as exc:
        raise OfferRefused(400, f"the body is {exc}") from None


def _admit(request: Request, services: Services) -> Response | None:
    """401 without the API key (when ``server_api_key`` is set); 503 while the instance drains (SIGTERM:
    new sessions go to another instance); None when the request may go on."""
    refused = refusal_for(request)
    if refused is not None:
        return refused
    if why := turn_away(services):
        logger.warning("browser session refused: %s", why)
        return error(503, why)
    return None


async def _store_down(exc: SessionStoreUnavailable, peer: _Peer | None = None) -> Response:
    """503 for an offer the session store could not take (the negotiated peer, if any, is closed)."""
    if peer is not None:
        await peer.close()
    logger.error("webrtc offer refused: %s", exc)
    return error(503, "session store unavailable")


# ------------------------------------------------------------------------------------------ POST /start (JSON)
async def start_session(request: Request) -> Response | None:
    """``POST /start`` with a JSON body ``{"context"?, "persona"?, "number"?}`` and no carrier path: mint a
    pending browser session for ``POST /sessions/{id}/offer``. None when the body is not such a request
    (a carrier's JSON webhook), so the carrier path answers it as before."""
    if request.headers.get("content-type", "").split(";", 1)[0].strip().lower() != "application/json":
        return None
    try:
        data = loads(await request.body())
    except JSONLimitExceeded as exc:     # not a carrier's webhook either: refuse it here, clearly
        return error(400, f"the body is {exc}")
    except ValueError:
        return None
    if not isinstance(data, dict) or (data and not START_KEYS & data.keys()):
        return None          # a carrier's JSON webhook (CallSid, data, uuid, ...): never ours
    services = services_of(request)
    if (refused := _admit(request, services)) is not None:
        return refused
    config = services.config
    size = len(await request.body())
    if size > config.ws_max_message_bytes:
        return error(413, f"the request body is {size} bytes, over ws_max_message_bytes={config.ws_max_message_bytes}")
    try:
        start = parse_session_fields(data)
        persona, context = _start_persona(services, start)
    except OfferRefused as exc:
        return error(exc.status, str(exc))
    try:
        session = await services.sessions.create(Session.new(
            carrier=CARRIER, to=start.number, persona=persona.name, context=context,
            parameters={"transport": "webrtc", **({"persona": start.persona} if start.persona else {})}))
    except SessionStoreUnavailable as exc:
        logger.error("browser session refused: %s", exc)
        return error(503, "session store unavailable")
    logger.info("browser session minted session=%s… persona=%s", session.id[:6], persona.name)
    return JSONResponse({"session_id": session.id, "persona": persona.name,
                         "offer_url": f"/sessions/{session.id}/offer",
                         "expires_in_secs": config.session_pending_ttl_secs})


# ------------------------------------------------------------------------------------------ the offer routes
async def offer(request: Request) -> Response:
    """``POST /webrtc/offer``: a new session from the offer, its context and persona."""
    services = services_of(request)
    if (refused := _admit(request, services)) is not None:
        return refused
    config = services.config
    try:
        data = await _read_json(request, 2 * config.webrtc_max_sdp_bytes + config.ws_max_message_bytes,
                                "2 x webrtc_max_sdp_bytes for the JSON-escaped SDP plus ws_max_message_bytes "
                                "for the context")
        request_offer = parse_offer(data, config.webrtc_max_sdp_bytes)
        start = parse_session_fields(data)
        persona, context = _start_persona(services, start)
        peer = await _Peer.negotiate(config.webrtc_ice_servers, request_offer)
    except OfferRefused as exc:
        return _refuse(exc)
    try:
        session = await services.sessions.create(Session.new(
            carrier=CARRIER, to=start.number, persona=persona.name, context=context,
            parameters={"transport": "webrtc", "codec": peer.codec,
                        **({"persona": start.persona} if start.persona else {})},
            state="active", claimed_at=time.time()))
    except SessionStoreUnavailable as exc:
        return await _store_down(exc, peer)
    return await _answer(services, session, persona, peer)


async def session_offer(request: Request) -> Response:
    """``POST /sessions/{id}/offer``: claim a session minted by ``POST /start`` (JSON) with an offer."""
    services = services_of(request)
    if (refused := _admit(request, services)) is not None:
        return refused
    config = services.config
    session_id = request.path_params["session_id"]
    try:
        data = await _read_json(request, 2 * config.webrtc_max_sdp_bytes + 1024,
                                "2 x webrtc_max_sdp_bytes for the JSON-escaped SDP")
        request_offer = parse_offer(data, config.webrtc_max_sdp_bytes)
        found = await services.sessions.get(session_id)
        if found is None or found.carrier != CARRIER or found.state != "pending":
            raise OfferRefused(404, "unknown, used or expired session")
        peer = await _Peer.negotiate(config.webrtc_ice_servers, request_offer)
    except OfferRefused as exc:
        return _refuse(exc)
    except SessionStoreUnavailable as exc:
        return await _store_down(exc)
    try:
        session = await services.sessions.claim(session_id, carrier=CARRIER)
    except SessionStoreUnavailable as exc:
        return await _store_down(exc, peer)
    if session is None:      # claimed by a concurrent offer, or expired meanwhile
        await peer.close()
        return _refuse(OfferRefused(404, "unknown, used or expired session"))
    try:
        persona = services.personas.resolve(to=session.to, parameters=session.parameters,
                                            context=session.context or None)
    except PersonaError as exc:
        logger.error("persona lookup failed, using the default: %s", exc)
        persona = services.personas.resolve()
    return await _answer(services, session, persona, peer)


def _refuse(exc: OfferRefused) -> Response:
    logger.warning("webrtc offer refused (%d): %s", exc.status, exc)
    return error(exc.status, str(exc))


async def _answer(services: Services, session: Session, persona: Persona, peer: _Peer) -> Response:
    """Finish the negotiation (gathers our ICE candidates) and answer; the session then runs after the
    response in the same request task (:class:`_AnswerThenRun`)."""
    token = call_id.set(short_id(session.id))
    try:
        leg = WebRTCLeg(peer=peer, config=services.config, session=session)
        call = Call(services=services, session=session, leg=leg, persona=persona)
        leg.bind(call)
        try:
            answer_sdp = await peer.answer()
        except Exception as exc:  # noqa: BLE001 - ICE gathering (a bad STUN/TURN URL) or DTLS setup failed
            logger.error("could not complete the WebRTC answer: %s", exc)
            call.finish("negotiation_failed")
            await call.run()
            return error(500, f"could not complete the WebRTC answer: {exc}")
        logger.info("webrtc offer answered codec=%s persona=%s", peer.codec, persona.name)
        return _AnswerThenRun({"sdp": answer_sdp, "type": "answer", "session_id": session.id,
                               "persona": persona.name, "codec": peer.codec}, call=call)
    finally:
        call_id.reset(token)


class _AnswerThenRun(JSONResponse):
    """Send the answer, then run the session in this request's task until it ends (it is not a
    fire-and-forget task: uvicorn waits for it at shutdown, and the lifespan's shutdown ends it)."""

    def __init__(self, content: Any, *, call: Call) -> None:
        super().__init__(content)
        self._call = call

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        except BaseException:
            self._call.finish("signaling_failed")     # the client never got its answer
            raise
        finally:
            await self._call.run()


# ------------------------------------------------------------------------------------------ the peer
class _Peer:
    """An RTCPeerConnection with the offer applied and our audio track attached, before its answer."""

    def __init__(self, pc: RTCPeerConnection, transceiver: RTCRtpTransceiver, track: OutboundAudioTrack,
                 answer: RTCSessionDescription, codec: str) -> None:
        self.pc, self.transceiver, self.track, self._answer, self.codec = pc, transceiver, track, answer, codec

    @classmethod
    async def negotiate(cls, ice_servers: Sequence[Mapping[str, Any]], request: OfferRequest) -> _Peer:
        """Apply the offer (nothing is bound yet: no sockets until :meth:`answer`); OfferRefused (400) when
        aiortc cannot use it."""
        try:
            parsed = sdp.SessionDescription.parse(request.sdp)
        except Exception as exc:  # noqa: BLE001 - the SDP parser fails with assorted errors on garbage
            raise OfferRefused(400, f"the SDP offer cannot be parsed ({type(exc).__name__}: {exc})"
                           if str(exc) else "the SDP offer cannot be parsed") from None
        if not any(m.kind == "audio" for m in parsed.media):
            raise OfferRefused(400, "the SDP offer has no audio m-line: add a microphone track or "
                                "pc.addTransceiver('audio') before createOffer()")
        pc = RTCPeerConnection(ice_configuration(ice_servers))
        try:
            track = OutboundAudioTrack()
            transceiver = pc.addTransceiver(track, direction="sendrecv")
            if request.codec:
                transceiver.setCodecPreferences([c for c in RTCRtpSender.getCapabilities("audio").codecs
                                                 if c.mimeType.lower() == CODECS[request.codec].lower()])
            await pc.setRemoteDescription(RTCSessionDescription(sdp=request.sdp, type="offer"))
            answer = await pc.createAnswer()
            codec = _answer_codec(answer.sdp, transceiver)
        except Exception as exc:  # noqa: BLE001 - aiortc refuses an unusable offer with assorted errors
            await pc.close()
            raise OfferRefused(400, _offer_problem(exc, request.codec)) from None
        track.set_sample_rate(PHONE_RATE if codec in PHONE_CODECS else OPUS_OUTPUT_RATE)
        return cls(pc, transceiver, track, answer, codec)

    async def answer(self) -> str:
        """Set the answer (gathers our candidates, starts ICE) and return its SDP."""
        await self.pc.setLocalDescription(self._answer)
        return str(self.pc.localDescription.sdp)

    @property
    def remote_track(self) -> MediaStreamTrack | None:
        return self.transceiver.receiver.track

    async def close(self) -> None:
        self.track.stop()
        await self.pc.close()


def _answer_codec(answer_sdp: str, transceiver: RTCRtpTransceiver) -> str:
    """The codec the answer settled on for our audio m-line ("opus", "pcmu", "pcma", "g722")."""
    for media in sdp.SessionDescription.parse(answer_sdp).media:
        if media.kind == "audio" and media.rtp.muxId == transceiver.mid and media.rtp.codecs:
            return str(media.rtp.codecs[0].mimeType.split("/", 1)[-1].lower())
    raise ValueError("the answer has no audio codec")


def _offer_problem(exc: Exception, codec: str) -> str:
    text = str(exc) or type(exc).__name__
    if "audio description send parameters" in text:     # aiortc: no audio codec in common
        if codec:
            return f'the offer has no {codec} audio codec ("codec": "{codec}" asks for it)'
        return "the offer has no audio codec in common with the server (opus, PCMU, PCMA, G722)"
    return f"the SDP offer was refused: {text}"


# ------------------------------------------------------------------------------------------ the leg
class WebRTCLeg:
    """One WebRTC peer under a :class:`~gateway.calls.call.Call`: its audio track in and out, events on
    the data channel, connect and idle timeouts.

    Usage (:func:`_answer` does this once the offer is negotiated and the session stored)::

        leg = WebRTCLeg(peer=peer, config=config, session=session)
        call = Call(services=services, session=session, leg=leg, persona=persona)
        answer_sdp = await peer.answer()
        await call.run()        # waits for the peer to connect, converses, finalises
    """

    label = METRICS_LABEL
    noun = "a WebRTC session"
    not_started = "the session has not connected yet"
    ended_text = "session ended"
    can_transfer = False
    detects_machines = False
    frame_ms = FRAME_MS
    message_ms = FRAME_MS

    def __init__(self, *, peer: _Peer, config: Config, session: Session) -> None:
        self.peer = peer
        self.track = peer.track
        self.config = config
        self.session = session
        self.codec = peer.codec
        self.sample_rate = peer.track.sample_rate
        self._call: CallSide | None = None
        self._connected = asyncio.Event()
        self._channel: RTCDataChannel | None = None
        self._pending: list[str] = []
        self._last_audio_at = time.monotonic()
        peer.pc.on("connectionstatechange", self._on_state)
        peer.pc.on("datachannel", self._on_datachannel)

    def bind(self, call: CallSide) -> None:
        """The call this leg carries (before the answer is sent: peer events may come at once)."""
        self._call = call
        self.emit(ready_event(call, self.codec, self.sample_rate))

    # ------------------------------------------------------------------------------ lifecycle
    async def open(self, call: CallSide) -> Mapping[str, str] | None:
        timeout = self.config.webrtc_connect_timeout_secs
        connected = asyncio.ensure_future(self._connected.wait())
        ended = asyncio.ensure_future(call.ended.wait())
        try:
            done, _ = await asyncio.wait({connected, ended}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            connected.cancel()
            ended.cancel()
        if call.ended.is_set():
            return None
        if not done:
            logger.warning("peer did not connect within webrtc_connect_timeout_secs=%g; closing", timeout)
            call.finish("connect_timeout")
            return None
        logger.info("webrtc session codec=%s", self.codec)
        return {}

    def tasks(self, tg: asyncio.TaskGroup, call: CallSide) -> list[asyncio.Task[None]]:
        tasks = [tg.create_task(self._watch_idle(call))]
        remote = self.peer.remote_track
        if remote is not None:
            tasks.append(tg.create_task(self._read(remote, call)))
        return tasks

    async def _read(self, track: MediaStreamTrack, call: CallSide) -> None:
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                return          # the peer stopped sending; the idle timeout or the connection state ends us
            self._last_audio_at = time.monotonic()
            assert isinstance(frame, av.AudioFrame)
            pcm = frame_to_pcm(frame)
            if pcm:
                call.hear(AudioFrame(pcm, frame.sample_rate))

    async def _watch_idle(self, call: CallSide) -> None:
        idle = self.config.webrtc_idle_timeout_secs
        if idle <= 0:
            return
        self._last_audio_at = time.monotonic()
        while True:
            remaining = self._last_audio_at + idle - time.monotonic()
            if remaining <= 0:
                logger.warning("no audio from the peer for webrtc_idle_timeout_secs=%g; closing", idle)
                call.finish("idle_timeout")
                return
            await asyncio.sleep(remaining)

    # ------------------------------------------------------------------------------ peer events
    @contextlib.contextmanager
    def _as_session(self) -> Iterator[None]:
        """aiortc calls back from its own tasks: log those lines with this session's id too."""
        token = call_id.set(short_id(self.session.id))
        try:
            yield
        finally:
            call_id.reset(token)

    def _finish(self, reason: str) -> None:
        if self._call is not None:
            self._call.finish(reason)

    def _on_state(self) -> None:
        with self._as_session():
            state = self.peer.pc.connectionState
            logger.info("peer connection %s", state)
            if state == "connected":
                self._connected.set()
            elif state == "failed":
                self._finish("connection_failed")
            elif state == "closed":
                self._finish("peer_closed")

    def _on_datachannel(self, channel: RTCDataChannel) -> None:
        with self._as_session():
            channel.on("message", self._on_message)
            if self._channel is not None:
                logger.info("data channel %r: control messages accepted, events go to %r", channel.label,
                            self._channel.label)
                return
            logger.info("data channel %r is the events channel", channel.label)
            self._channel = channel
            channel.on("open", self._flush_events)
            channel.on("close", self._on_channel_closed)
            self._flush_events()

    def _on_channel_closed(self) -> None:
        with self._as_session():
            self._finish("client_disconnected")

    def _on_message(self, message: str | bytes) -> None:
        call = self._call
        if call is None:
            return
        with self._as_session():
            limit = self.config.ws_max_message_bytes
            if isinstance(message, bytes):
                call.bad_message("bad_message", "data channel messages must be JSON text; audio travels on the "
                                                "media track")
            elif len(message) > limit:
                call.bad_message("bad_message", f"control message over ws_max_message_bytes={limit}")
            else:
                call.control(message)

    # ------------------------------------------------------------------------------ output
    def emit(self, message: Mapping[str, Any]) -> None:
        """Send an event on the data channel, or queue it until the channel opens."""
        self._pending.append(encode(message))
        if len(self._pending) > _MAX_PENDING_EVENTS:
            del self._pending[0]
        self._flush_events()

    def _flush_events(self) -> None:
        channel = self._channel
        if channel is None or channel.readyState != "open":
            return
        while self._pending:
            text = self._pending.pop(0)
            try:
                channel.send(text)
            except Exception as exc:  # noqa: BLE001 - the channel closed under us, or the peer's size limit
                logger.warning("event not delivered on the data channel: %s", exc)
                return

    async def send(self, frame: Frame) -> None:
        """Audio to the outbound track; a Clear (barge-in) flushes it; marks need no acknowledgement."""
        if isinstance(frame, AudioFrame):
            self.track.feed(frame.pcm)
        elif isinstance(frame, Clear):
            self.track.flush()

    # ------------------------------------------------------------------------------ call control
    async def transfer(self, target: str) -> None:
        raise CallControlFailed(f"{self.noun} cannot be transferred")

    async def send_dtmf(self, digits: str) -> bool:
        return False                     # in-band tones on the audio track

    async def close(self, reason: str, code: int, text: str) -> None:
        """``end`` on the data channel (given a moment to leave), then the peer connection closed."""
        try:
            self.emit({"type": "end", "reason": reason})
            await self._drain_channel()
        except Exception:  # noqa: BLE001, S110 - the channel may already be gone
            pass
        try:
            async with asyncio.timeout(_CLOSE_TIMEOUT_S):
                await self.peer.close()
        except Exception as exc:  # noqa: BLE001 - closing is best effort; the sockets close with the process
            logger.error("could not close the peer connection cleanly: %s", exc or type(exc).__name__)

    async def _drain_channel(self) -> None:
        """Give queued events (the last transcript, ``end``) a moment to leave before the close."""
        channel = self._channel
        if channel is None or channel.readyState != "open":
            return
        deadline = time.monotonic() + _DRAIN_TIMEOUT_S
        while channel.bufferedAmount > 0 and time.monotonic() < deadline:  # noqa: ASYNC110 - aiortc has no drained event
            await asyncio.sleep(0.01)
