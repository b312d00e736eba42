"""``GET /ws``: the browser/app transport over the same pipeline as a carrier call (design §3.1).

Binary frames carry raw 16-bit little-endian mono PCM: in at the rate the client declared in its
``start`` message, out at 16 kHz (announced in ``ready``). Text frames carry one JSON object each,
``type`` first; audio never travels inside JSON.

Phone codec: ``"codec": "pcmu"`` in ``start`` makes binary frames both ways G.711 µ-law at 8 kHz
(one byte per sample), so a browser hears exactly what a caller hears; ``ready`` then says
``"codec": "pcmu", "sample_rate": 8000``. The default, ``"pcm16"``, is the PCM described above.

Client -> server::

    {"type": "start", "context": {"messages": [...]}, "sample_rate": 16000, "persona": "concierge",
     "number": "+14155550100", "codec": "pcm16"}
    {"type": "interrupt"}          # stop the agent now (barge-in without speaking)
    {"type": "end"}                # end the session: the server answers {"type": "end"} and closes 1000

Server -> client: ``ready`` (``sample_rate``, ``codec``, ``session_id``), ``transcript`` (``role``, ``text``,
``final``), ``bot_speaking`` (``state``: ``started``/``stopped``), ``interrupted`` (flush your playback
buffer), ``turn_latency`` (per-stage milliseconds), ``error`` (``code``, ``message``), ``end``.

Authentication (``gateway.http.auth``: ``server_api_key``, or the key generated at startup): ``?token=<key>``,
``Authorization: Bearer <key>``, or
the WebSocket subprotocol ``bearer.<key>`` (browsers cannot set headers; offer ``["voxray", "bearer.<key>"]``
and the server selects ``voxray``, so the key is never echoed back). A wrong key closes with 1008.

Origin (when ``cors_allowed_origins`` is set and has no ``"*"``): a browser's ``Origin`` must be in the
list or be the origin of ``public_url`` (the softphone page served there); any other closes with 1008
``origin not allowed``. The request's ``Host`` is never trusted for this (a DNS-rebinding page sets
both). No ``Origin`` header (not a browser) is allowed.

Input validation: an odd byte count or float32 samples are refused per frame with an ``error`` event
(``bad_audio``) and the frame is dropped; a frame over ``ws_max_message_bytes`` closes the socket
with 1009. Every rejected frame and every bad control message counts; past
``media_max_bad_messages`` of them the session sends ``error`` ``too_many_bad_messages`` and closes
with 1008. Interleaved stereo passes every per-frame check (it would be heard slowed down): the first
loud second of the stream is checked (``pipeline.audio.looks_like_stereo``) and, if it looks stereo,
one ``bad_audio`` error names the expected format; the audio is still used (a client that doubles
samples to upsample looks the same), so a false alarm costs nothing but the message.

Usage (``gateway.app`` mounts it when ``transport`` is ``websocket`` or ``both``)::

    WebSocketRoute("/ws", browser_ws.ws)
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
from starlette.websockets import WebSocket

from carriers.base import CallControlFailed
from gateway.admission import turn_away
from gateway.browser.events import encode, ready_event
from gateway.calls.call import Call
from gateway.calls.leg import CallSide
from gateway.calls.lifecycle import pause_every
from gateway.calls.socket import SocketIO, socket_io
from gateway.personas import PersonaError
from gateway.sessions import Session, SessionStoreUnavailable
from pipeline.audio import looks_like_stereo, rms, ulaw_decode, ulaw_encode
from pipeline.conversation import Persona
from pipeline.frames import AudioFrame, Frame
from pipeline.jsonutil import loads

if TYPE_CHECKING:
    from gateway.app import Services
    from gateway.config import Config
    from gateway.metrics import Metrics

__all__ = ["WsLeg", "CODECS", "OUTPUT_RATE", "PHONE_RATE", "SAMPLE_RATES", "StartRequest", "looks_like_float32",
           "origin_allowed", "parse_start", "start_persona", "ws"]

logger = logging.getLogger(__name__)

CARRIER = "browser"                   # the metrics label and the session's carrier
OUTPUT_RATE = 16000
PHONE_RATE = 8000                     # "codec": "pcmu": G.711 µ-law at 8 kHz both ways, as a caller hears it
CODECS = ("pcm16", "pcmu")
SAMPLE_RATES = (8000, 16000, 22050, 24000, 44100, 48000)
SUBPROTOCOL = "voxray"
FRAME_MS = 20                         # the playout's frame
_ROLES = ("system", "user", "assistant")
_STEREO_PROBE_S = 10                  # seconds of audio looked at for interleaved stereo, at most
_STEREO_PROBE_RMS = 0.01              # a second quieter than this cannot tell stereo from mono


# ------------------------------------------------------------------------------------------ the route
async def ws(websocket: WebSocket) -> None:
    """``GET /ws``: authenticate, read ``start``, then run one :class:`~gateway.calls.call.Call` on a :class:`WsLeg`."""
    services: Services = websocket.app.state.services
    config = services.config
    offered = [p.strip() for p in websocket.headers.get("sec-websocket-protocol", "").split(",") if p.strip()]
    authorised = services.access.allows_request(websocket, offered)
    # a browser fails the connection when it offered subprotocols and none is selected
    chosen = SUBPROTOCOL if SUBPROTOCOL in offered else (offered[0] if offered else None)
    await websocket.accept(subprotocol=chosen)
    io = socket_io(websocket)
    if why := turn_away(services):
        code = "draining" if services.draining else "busy"
        await io.send(encode({"type": "error", "code": code, "message": why}))
        await io.close(1013, f"{code}: try again")
        return
    origin = websocket.headers.get("origin")
    if not origin_allowed(origin, config.cors_allowed_origins, own=config.public_url):
        logger.warning("/ws refused: origin %r is not in cors_allowed_origins (from %s)", origin,
                       websocket.client.host if websocket.client else "-")
        await io.close(1008, "origin not allowed")
        return
    if not authorised:
        logger.warning("/ws refused: missing or wrong API key from %s",
                       websocket.client.host if websocket.client else "-")
        await io.close(1008, "missing or wrong API key")
        return
    start = await _read_start(io, config.media_start_timeout_secs)
    if start is None:
        return
    try:
        persona, context = start_persona(services, start)
    except ValueError as exc:
        await _refuse(io, str(exc))
        return
    try:
        session = await services.sessions.create(Session.new(
            carrier=CARRIER, to=start.number, persona=persona.name, context=context,
            parameters={"sample_rate": str(start.sample_rate), "codec": start.codec}, state="active",
            claimed_at=time.time()))
    except SessionStoreUnavailable as exc:
        logger.error("/ws refused: %s", exc)
        await io.send(encode({"type": "error", "code": "unavailable", "message": "session store unavailable"}))
        await io.close(1011, "session store unavailable")
        return
    leg = WsLeg(socket=io, config=config, metrics=services.metrics, sample_rate=start.sample_rate, codec=start.codec)
    await Call(services=services, session=session, leg=leg, persona=persona).run()


def origin_allowed(origin: str | None, allowed: tuple[str, ...] | list[str], *, own: str = "") -> bool:
    """Whether a WebSocket from ``origin`` may connect (cross-site WebSocket hijacking guard).

    No list (or ``"*"`` in it) and no ``Origin`` header (a non-browser client) are allowed; otherwise the
    origin must be in the list or be ``own`` (the configured ``public_url``: the softphone page served
    there). Never the request's ``Host``: a DNS-rebinding page controls both headers."""
    if not origin or not allowed or "*" in allowed:
        return True
    accepted = {_origin_of(o) for o in allowed}
    if own:
        accepted.add(_origin_of(own))
    return _origin_of(origin) in accepted


def _origin_of(url: str) -> str:
    """``scheme://host[:port]`` in lower case, without a path or trailing slash."""
    scheme, _, rest = url.strip().partition("://")
    return f"{scheme.lower()}://{rest.split('/', 1)[0].lower()}" if rest else url.strip().rstrip("/").lower()


# ------------------------------------------------------------------------------------------ start
class StartRequest:
    """A validated ``start`` message."""

    __slots__ = ("messages", "sample_rate", "persona", "number", "codec")

    def __init__(self, messages: list[dict[str, str]], sample_rate: int, persona: str, number: str,
                 codec: str = "pcm16") -> None:
        self.messages, self.sample_rate, self.persona, self.number = messages, sample_rate, persona, number
        self.codec = codec


def parse_start(text: str | bytes) -> StartRequest:
    """The first message as a :class:`StartRequest`; ValueError with the reason otherwise."""
    if not isinstance(text, str):
        raise ValueError("the first message must be a JSON text message {\"type\": \"start\", ...}, not audio")
    try:
        data = loads(text)
    except ValueError as exc:
        raise ValueError(f"the first message is {exc}; send {{\"type\": \"start\", ...}}") from None
    if not isinstance(data, dict) or data.get("type") != "start":
        raise ValueError("the first message must be {\"type\": \"start\", ...}")
    codec = data.get("codec", "pcm16")
    if codec not in CODECS:
        raise ValueError(f"codec must be \"pcm16\" or \"pcmu\" (got {codec!r})")
    rate = data.get("sample_rate", PHONE_RATE if codec == "pcmu" else OUTPUT_RATE)
    if isinstance(rate, bool) or rate not in SAMPLE_RATES:
        raise ValueError(f"sample_rate must be one of {', '.join(map(str, SAMPLE_RATES))} (got {rate!r})")
    if codec == "pcmu" and rate != PHONE_RATE:
        raise ValueError(f"codec \"pcmu\" is G.711 µ-law at {PHONE_RATE} Hz; omit sample_rate or send {PHONE_RATE} "
                         f"(got {rate!r})")
    context = data.get("context")
    context = {} if context is None else context
    messages = context.get("messages", []) if isinstance(context, dict) else None
    if not isinstance(messages, list) or not all(
            isinstance(m, dict) and m.get("role") in _ROLES and isinstance(m.get("content"), str) for m in messages):
        raise ValueError('context must be {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}]}')
    persona, number = data.get("persona", ""), data.get("number", "")
    if not isinstance(persona, str) or not isinstance(number, str):
        raise ValueError("persona and number must be strings")
    return StartRequest([{"role": m["role"], "content": m["content"]} for m in messages], int(rate), persona, number,
                        codec)


def start_persona(services: Services, start: StartRequest) -> tuple[Persona, tuple[dict[str, str], ...]]:
    """The persona a browser session asks for (a context's system message > the persona name > the
    dialed number > the default) and its context, with the persona's system message first when the
    client sent none. ValueError naming the known personas for an unknown name; a broken personas
    file falls back to the default (logged)."""
    name = start.persona
    if name and name not in services.personas.names() and name != "default":
        known = ", ".join(services.personas.names()) or "(none)"
        raise ValueError(f"unknown persona {name!r}; known: {known}")
    try:
        persona = services.personas.resolve(name=name or None, to=start.number, context=start.messages or None)
    except PersonaError as exc:
        logger.error("persona lookup failed, using the default: %s", exc)
        persona = services.personas.resolve()
    context = [dict(m) for m in start.messages]
    if context and not any(m["role"] == "system" for m in context):
        context.insert(0, {"role": "system", "content": persona.system})
    return persona, tuple(context)


async def _read_start(io: SocketIO, timeout_s: float) -> StartRequest | None:
    try:
        async with asyncio.timeout(timeout_s):
            message = await io.receive()
    except TimeoutError:
        await _refuse(io, f"no start message within {timeout_s:g} s")
        return None
    if message is None:
        return None
    try:
        return parse_start(message)
    except ValueError as exc:
        await _refuse(io, str(exc))
        return None


async def _refuse(io: SocketIO, message: str) -> None:
    logger.warning("/ws refused: %s", message)
    await io.send(encode({"type": "error", "code": "bad_start", "message": message}))
    await io.close(1008, "bad start message")


# ------------------------------------------------------------------------------------------ audio checks
def looks_like_float32(pcm: bytes) -> bool:
    """True when ``pcm`` is far more plausible as float32 samples than as int16 ones.

    Float32 audio in [-1, 1] has a high 16-bit half near 0x3Cxx/0xBCxx (±15000..17000 as int16)
    and an unrelated low half, so its int16 view jumps by thousands between neighbours; real
    int16 audio whose every second sample lands in that narrow band is vanishingly rare."""
    if len(pcm) < 16 or len(pcm) % 4:
        return False
    with np.errstate(all="ignore"):
        f = np.frombuffer(pcm, "<f4")
        if not np.all(np.isfinite(f)) or float(np.max(np.abs(f))) > 1.5:
            return False
        if float(np.sqrt(np.mean(f.astype(np.float64) ** 2))) < 1e-3:
            return False
        i = np.frombuffer(pcm, "<i2").astype(np.int32)
        return float(np.mean(np.abs(np.diff(i)))) > 8000.0


# ------------------------------------------------------------------------------------------ the leg
class WsLeg:
    """One ``/ws`` socket under a :class:`~gateway.calls.call.Call`: its reader (PCM or µ-law frames, JSON
    control) and its event writer.

    Usage (the route does this once the ``start`` message is valid and the session is stored)::

        leg = WsLeg(socket=io, config=config, metrics=metrics, sample_rate=16000, codec="pcm16")
        await Call(services=services, session=session, leg=leg, persona=persona).run()
    """

    label = CARRIER
    noun = "a browser session"
    not_started = "the session has not started yet"
    ended_text = "session ended"
    can_transfer = False
    detects_machines = False
    frame_ms = FRAME_MS

    def __init__(self, *, socket: SocketIO, config: Config, metrics: Metrics, sample_rate: int,
                 codec: str = "pcm16") -> None:
        self.socket = socket
        self.config = config
        self.metrics = metrics
        self.input_rate = sample_rate
        self.codec = codec
        self.sample_rate = PHONE_RATE if codec == "pcmu" else OUTPUT_RATE
        self.message_ms = max(FRAME_MS, config.outbound_message_ms // FRAME_MS * FRAME_MS)
        self._stereo_probe: bytearray | None = bytearray()   # the first seconds of sound, checked for stereo
        self._stereo_checked = 0
        self._events: asyncio.Queue[str] = asyncio.Queue(config.ws_max_queued_events)
        self._send_lock = asyncio.Lock()
        self._call: CallSide | None = None

    # ------------------------------------------------------------------------------ lifecycle
    async def open(self, call: CallSide) -> Mapping[str, str] | None:
        self._call = call
        ready = ready_event(call, self.codec, self.sample_rate, input_sample_rate=self.input_rate)
        await self._send_text(encode(ready))
        logger.info("browser session input_rate=%d codec=%s", self.input_rate, self.codec)
        return {}

    def tasks(self, tg: asyncio.TaskGroup, call: CallSide) -> list[asyncio.Task[None]]:
        return [tg.create_task(self._write_events()), tg.create_task(self._read(call))]

    # ------------------------------------------------------------------------------ input
    async def _read(self, call: CallSide) -> None:
        limit = self.config.ws_max_message_bytes
        count = 0
        while True:
            count += 1
            await pause_every(count)
            message = await self.socket.receive()
            if message is None:
                self._socket_closed(call)
                return
            if len(message) > limit:
                self.metrics.media_rejected.labels(carrier=CARRIER).inc()
                logger.warning("/ws message of %d bytes exceeds ws_max_message_bytes=%d; closing", len(message), limit)
                call.finish("message_too_big", code=1009, text=f"message exceeds {limit} bytes")
                return
            if isinstance(message, bytes):
                self._audio(message, call)
            else:
                call.control(message)

    def _audio(self, pcm: bytes, call: CallSide) -> None:
        if not pcm:
            return
        if self.codec == "pcmu":             # one µ-law byte per sample: every frame is well formed
            call.hear(AudioFrame(ulaw_decode(pcm), PHONE_RATE))
            return
        expected = f"16-bit little-endian mono PCM at {self.input_rate} Hz"
        if len(pcm) % 2:
            call.bad_message("bad_audio", f"audio frame of {len(pcm)} bytes is not a whole number of samples; "
                                          f"expected {expected}")
            return
        if looks_like_float32(pcm):
            call.bad_message("bad_audio", f"audio frame looks like float32 samples; send 16-bit integer PCM "
                                          f"({expected})")
            return
        if self._stereo_probe is not None:
            self._probe_stereo(pcm, expected, call)
        call.hear(AudioFrame(pcm, self.input_rate))

    def _probe_stereo(self, pcm: bytes, expected: str, call: CallSide) -> None:
        """Interleaved stereo passes every per-frame check (it is heard slowed down): look at each second
        of the stream until one is loud enough to tell (at most ``_STEREO_PROBE_S``), and warn once."""
        assert self._stereo_probe is not None
        self._stereo_probe += pcm
        if len(self._stereo_probe) < 2 * self.input_rate:
            return
        second = bytes(self._stereo_probe)
        self._stereo_checked += 1
        self._stereo_probe = bytearray() if self._stereo_checked < _STEREO_PROBE_S else None
        if rms(second) < _STEREO_PROBE_RMS:
            return
        self._stereo_probe = None
        if looks_like_stereo(second):
            logger.warning("/ws audio looks like interleaved stereo")
            call.error("bad_audio", f"the audio looks like interleaved stereo (left, right, left ...); "
                                    f"send {expected}")

    def _socket_closed(self, call: CallSide) -> None:
        code = self.socket.peer_close_code()
        if code == 1009:
            self.metrics.media_rejected.labels(carrier=CARRIER).inc()
            logger.warning("/ws frame exceeded ws_max_message_bytes=%d; the socket closed with 1009",
                           self.config.ws_max_message_bytes)
            call.finish("message_too_big", code=1009, text="message too big")
        elif code in (1002, 1007):
            call.finish("protocol_error", code=code, text="invalid frame")
        else:
            call.finish("client_disconnected")

    # ------------------------------------------------------------------------------ output
    async def send(self, frame: Frame) -> None:
        """Binary PCM16 at 16 kHz (µ-law at 8 kHz with ``codec: pcmu``). Marks need no acknowledgement (the
        playout's timing tells what was heard) and a Clear has no wire form (the ``interrupted`` event
        tells the browser to flush its playback)."""
        if not isinstance(frame, AudioFrame):
            return
        data = ulaw_encode(frame.pcm) if self.codec == "pcmu" else frame.pcm
        async with self._send_lock:
            await self.socket.send(data)

    async def _send_text(self, text: str) -> None:
        async with self._send_lock:
            await self.socket.send(text)

    def emit(self, message: Mapping[str, Any]) -> None:
        try:
            self._events.put_nowait(encode(message))
        except asyncio.QueueFull:        # the client stopped reading: nothing it would get is current any more
            if self._call is not None and self._call.reason is None:
                logger.warning("/ws client has not read %d events (ws_max_queued_events); closing",
                               self._events.maxsize)
            if self._call is not None:
                self._call.finish("client_not_reading", code=1008, text="client is not reading its events")

    async def _write_events(self) -> None:
        while True:
            await self._send_text(await self._events.get())

    # ------------------------------------------------------------------------------ call control
    async def transfer(self, target: str) -> None:
        raise CallControlFailed(f"{self.noun} cannot be transferred")

    async def send_dtmf(self, digits: str) -> bool:
        return False                     # no out-of-band channel to a browser: the call plays tones

    async def close(self, reason: str, code: int, text: str) -> None:
        try:
            while not self._events.empty():        # events not yet written (the goodbye's transcript)
                await self.socket.send(self._events.get_nowait())
            if code in (1000, 1001):
                await self.socket.send(encode({"type": "end", "reason": reason}))
            await self.socket.close(code, text)
        except Exception:  # noqa: BLE001, S110 - the socket may already be gone
            pass
