"""Call: one live carrier call — its media socket, conversation and playout in one TaskGroup.

The call ends through :meth:`Call.finish` (idempotent; any task, the API or the carrier may call it),
after which one finaliser hangs up through the carrier's REST API (tolerating "already ended"),
closes the socket, removes the session and counts the call. This is the one place that catches
broadly: a bug in any task ends that call cleanly, never another one.

Usage (from the media socket route)::

    call = Call(services=services, session=session, carrier=carrier, socket=SocketIO(websocket))
    await call.run()
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Awaitable, Callable

from carriers.base import CallControlFailed, CallInfo, Carrier, CarrierProtocolError, HangupFailed, MediaStream
from gateway.call_log import CallLog
from gateway.lifecycle import MediaGate, pause_every, run_until_ended
from gateway.logging import call_id
from gateway.redaction import short_id
from gateway.sessions import Session
from pipeline.conversation import Conversation, Event, Persona
from pipeline.frames import AudioFrame, Dtmf, Frame, MarkPlayed, StreamStarted, StreamStopped
from pipeline.audio import dtmf_tones
from pipeline.playout import Playout
from pipeline.providers.base import Tool, ToolCall

if TYPE_CHECKING:
    from gateway.app import Services
    from gateway.config import Config

__all__ = ["Call", "SocketIO", "limit_duration"]

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class SocketIO:
    """The three socket operations a call needs (a Starlette WebSocket adapts to this)."""

    receive: Callable[[], Awaitable[str | bytes | None]]      # None: the peer closed
    send: Callable[[str | bytes], Awaitable[None]]
    close: Callable[[int, str], Awaitable[None]]
    peer_close_code: Callable[[], int | None] = lambda: None   # why the socket closed, once receive gave None


class Call:
    def __init__(self, *, services: Services, session: Session, carrier: Carrier, socket: SocketIO) -> None:
        self.services = services
        self.session = session
        self.carrier = carrier
        self.socket = socket
        self.reason: str | None = None
        self.conversation: Conversation | None = None
        self._ended = asyncio.Event()
        self.finalised = asyncio.Event()   # set once the finaliser has run (DELETE waits for it)
        self._finalised = False
        self._carrier_stopped = False
        self._transferred = False
        self._playout: Playout | None = None
        self._close_code, self._close_text = 1000, "call ended"
        self._stream: MediaStream = carrier.open_stream()
        self._bad_messages = 0
        self._gate = MediaGate(services.config, services.metrics, label=carrier.name, finish=self.finish)
        self._log: CallLog | None = None
        self._started_at = time.monotonic()
        self._call_info = CallInfo(carrier=carrier.name, call_id=session.call_id, from_=session.from_,
                                   to=session.to, account_id=session.account_id)

    def finish(self, reason: str, *, code: int = 1000, text: str = "call ended") -> None:
        """Ask the call to end (idempotent; the first reason wins)."""
        if self.reason is None:
            self.reason = reason
            self._close_code, self._close_text = code, text
        self._ended.set()

    # ------------------------------------------------------------------------------ lifecycle
    async def run(self) -> None:
        token = call_id.set(self.session.call_id or short_id(self.session.id))
        metrics = self.services.metrics
        metrics.active_calls.labels(carrier=self.carrier.name).inc()
        metrics.calls_started.labels(carrier=self.carrier.name).inc()
        self.services.calls[self.session.id] = self
        try:
            await run_until_ended(self._serve(), self._ended,
                                  stop_timeout_s=self.services.config.call_stop_timeout_secs)
        except asyncio.CancelledError:
            self.finish("shutdown", code=1001, text="server shutting down")
            raise
        except Exception:
            logger.exception("call failed unexpectedly; ending it")
            self.finish("error", code=1011, text="internal error")
        finally:
            await self._finalise()
            call_id.reset(token)

    async def _serve(self) -> None:
        started = await self._handshake()
        if started is not None:
            await self._converse(started)

    async def _handshake(self) -> StreamStarted | None:
        """Read until the carrier's ``start`` (bounded by ``media_start_timeout_secs``)."""
        try:
            async with asyncio.timeout(self.services.config.media_start_timeout_secs):
                while True:
                    message = await self.socket.receive()
                    if message is None:
                        self._socket_closed()
                        return None
                    for frame in self._decode(message):
                        if isinstance(frame, StreamStarted):
                            return frame
                        if isinstance(frame, StreamStopped):
                            self._carrier_stopped = True
                            self.finish("stopped_before_start")
                            return None
                    if self._ended.is_set():
                        return None
        except CarrierProtocolError as exc:   # media before start and the like: the stream is unusable
            logger.warning("closing media socket: %s", exc)
            self.finish("protocol_error", code=1008, text=str(exc)[:120])
            return None
        except TimeoutError:
            logger.warning("no start message within %.1f s; closing", self.services.config.media_start_timeout_secs)
            self.finish("start_timeout", code=1008, text="no start message")
            return None

    async def _converse(self, started: StreamStarted) -> None:
        services, config = self.services, self.services.config
        if started.call_id and self.session.call_id and started.call_id != self.session.call_id:
            logger.warning("start callSid %s does not match the session's call; closing", started.call_id)
            self.finish("protocol_error", code=1008, text="call id does not match the session")
            return
        parameters = {**self.session.parameters, **started.custom_parameters}
        persona = services.personas.resolve(to=self.session.to, parameters=parameters,
                                            context=self.session.context or None)
        logger.info("media started carrier=%s stream=%s persona=%s", self.carrier.name, started.stream_id,
                    persona.name)
        self._log = log = CallLog.for_session(services, self.session, persona=persona.name, carrier=self.carrier.name)
        async with asyncio.TaskGroup() as tg:
            playout = Playout(sample_rate=self._stream.sample_rate, lead_ms=config.outbound_lead_ms,
                              max_buffer_ms=config.playout_max_buffer_ms, frame_ms=self._stream.frame_ms,
                              coalesce_ms=config.ws_write_coalesce_ms)
            convo = Conversation(settings=services.conversation_settings, persona=persona,
                                 providers=services.providers, playout=playout, spawn=tg.create_task,
                                 on_event=self._observe, end_call=self.finish, context=self.session.context,
                                 tools=_tools(persona), on_tool=self._run_tool)
            self._playout = playout
            playout.on_speaking = convo.on_speaking
            self.conversation = convo
            tasks = [tg.create_task(playout.run(self._send)), tg.create_task(self._read(convo, log)),
                     tg.create_task(limit_duration(self, config))]
            convo.start()
            await self._ended.wait()
            convo.close()
            for task in tasks:
                task.cancel()

    async def _read(self, convo: Conversation, log: CallLog) -> None:
        count = 0
        while True:
            message = await self.socket.receive()
            if message is None:
                self._socket_closed()
                return
            for frame in self._decode(message):
                self._dispatch(frame, convo, log)
            count += 1
            await pause_every(count)

    def _socket_closed(self) -> None:
        """The socket went away: a protocol-level refusal (oversized or invalid frame) is our close,
        and the call is still up at the carrier; anything else means the caller's side ended."""
        code = self.socket.peer_close_code()
        if code == 1009:
            self.services.metrics.media_rejected.labels(carrier=self.carrier.name).inc()
            logger.warning("media frame exceeded ws_max_message_bytes=%d; the socket closed with 1009",
                           self.services.config.ws_max_message_bytes)
            self.finish("message_too_big", code=1009, text="message too big")
        elif code in (1002, 1007):
            logger.warning("media socket failed with close code %d (invalid frame)", code)
            self.finish("protocol_error", code=code, text="invalid frame")
        else:
            self._carrier_stopped = True
            self.finish("caller_hangup")

    def _decode(self, message: str | bytes) -> list[Frame]:
        limit = self.services.config.ws_max_message_bytes
        if len(message) > limit:
            self.services.metrics.media_rejected.labels(carrier=self.carrier.name).inc()
            logger.warning("media message of %d bytes exceeds ws_max_message_bytes=%d; closing", len(message), limit)
            self.finish("message_too_big", code=1009, text=f"message exceeds {limit} bytes")
            return []
        try:
            return self._stream.decode(message)
        except CarrierProtocolError as exc:
            if not self._stream.started:
                raise
            self._bad_messages += 1
            self.services.metrics.media_rejected.labels(carrier=self.carrier.name).inc()
            logger.warning("dropped malformed media message (%d so far): %s", self._bad_messages, exc)
            if self._bad_messages > self.services.config.media_max_bad_messages:
                self.finish("protocol_error", code=1007, text=str(exc)[:120])
            return []

    def _dispatch(self, frame: Frame, convo: Conversation, log: CallLog) -> None:
        if isinstance(frame, AudioFrame):
            if self._gate.admit(frame):
                log.caller(frame)
                convo.on_audio(frame)
        elif isinstance(frame, MarkPlayed):
            convo.on_mark_played(frame.name)
        elif isinstance(frame, Dtmf):
            logger.info("dtmf digit received")
            convo.on_dtmf(frame.digit)
        elif isinstance(frame, StreamStopped):
            self._carrier_stopped = True
            self.finish("caller_hangup")

    async def _send(self, frame: Frame) -> None:
        if isinstance(frame, AudioFrame) and self._log is not None:
            self._log.agent(frame)
        for message in self._stream.encode(frame):
            await self.socket.send(message)

    # ------------------------------------------------------------------------------ call control
    async def transfer(self, target: str) -> None:
        """Cold-transfer through the carrier; the stream then ends without our hang-up.
        Raises CallControlFailed when the carrier refuses."""
        await self.carrier.transfer(self._call_info, target)
        self._transferred = True
        logger.info("call transferred")
        self.finish("transferred")

    async def send_dtmf(self, digits: str) -> str:
        """Digits to the far end: out of band where the carrier can, else as in-band tones."""
        if await self.carrier.send_dtmf(self._call_info, digits):
            return "carrier"
        if self._playout is None:
            raise CallControlFailed("the media stream has not started yet")
        await self._playout.write(dtmf_tones(digits, self._playout.sample_rate))
        self._playout.end_of_audio()
        return "in-band"

    def machine_answered(self) -> None:
        """Answering-machine detection says a machine picked up: leave the message or hang up."""
        config = self.services.config
        logger.info("answering machine detected; action=%s", config.amd_action)
        if config.amd_action == "message" and self.conversation is not None:
            self.conversation.end_with(config.voicemail_text or config.goodbye_text, "answering_machine")
        else:
            self.finish("answering_machine")

    async def _run_tool(self, call: ToolCall) -> None:
        if call.name != "transfer_call" or self.conversation is None:
            return
        targets = self.conversation.persona.transfer_targets
        target = targets.get(str(call.arguments.get("target", "")))
        if target is None:
            logger.warning("model asked to transfer to an unknown target; ignored")
            return
        if self._playout is not None:
            await self._playout.drained()      # the caller hears "transferring you" first
        try:
            await self.transfer(target)
        except CallControlFailed as exc:
            logger.error("transfer failed: %s", exc)

    def _observe(self, event: Event) -> None:
        self.services.metrics.observe(event, carrier=self.carrier.name, debug=self.services.debug)
        if self._log is not None:
            self._log.observe(event)

    # ------------------------------------------------------------------------------ the finaliser
    async def _finalise(self) -> None:
        if self._finalised:
            return
        self._finalised = True
        reason = self.reason or "unknown"
        config = self.services.config
        if not self._carrier_stopped and not self._transferred and self.session.call_id:
            try:
                async with asyncio.timeout(config.hangup_timeout_secs):
                    await self.carrier.hang_up(self._call_info)
            except (HangupFailed, TimeoutError) as exc:
                logger.error("hang-up through the carrier failed: %s", exc or "timed out")
        try:
            await self.socket.close(self._close_code, self._close_text)
        except Exception:  # noqa: BLE001 - the socket may already be gone
            pass
        if self._log is not None:
            await self._log.close()            # recording handed to the uploader; rows already queued
        await self.services.sessions.end(self.session.id)
        self.services.calls.pop(self.session.id, None)
        metrics = self.services.metrics
        metrics.active_calls.labels(carrier=self.carrier.name).dec()
        metrics.calls_ended.labels(carrier=self.carrier.name, reason=reason).inc()
        logger.info("call ended reason=%s after %.1f s", reason, time.monotonic() - self._started_at)
        self.finalised.set()


async def limit_duration(call: Any, config: Config) -> None:
    """``max_call_secs`` for any call (carrier or browser): the goodbye, then the end, even if the
    goodbye has not finished by ``goodbye_timeout_secs``."""
    await asyncio.sleep(config.max_call_secs)
    logger.info("max_call_secs reached; saying goodbye")
    if call.conversation is not None:
        call.conversation.end_with(config.goodbye_text, "max_duration")
    await asyncio.sleep(config.goodbye_timeout_secs)
    call.finish("max_duration")


def _tools(persona: Persona) -> list[Tool]:
    """The model may transfer only to the persona's named targets (never to a number it makes up)."""
    if not persona.transfer_targets:
        return []
    return [Tool("transfer_call", "Transfer the caller to a person or department when they ask for it or "
                 "when you cannot help. Say a short sentence first, e.g. 'Let me transfer you.'",
                 {"type": "object", "properties": {"target": {"type": "string", "enum": sorted(persona.transfer_targets)}},
                  "required": ["target"]})]
