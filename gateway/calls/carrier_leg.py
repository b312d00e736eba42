"""CarrierLeg: a phone call's media socket (Twilio, Telnyx, Vonage, Plivo, Exotel) under a :class:`Call`.

The carrier's sans-I/O :class:`~carriers.base.MediaStream` turns socket messages into frames and the
agent's frames (audio, marks, ``Clear``) into socket messages; this leg reads the socket, checks the
``start`` against the session, and carries call control through the carrier's REST API (hang-up at the
end unless the carrier ended the call or it was transferred; transfer; out-of-band DTMF).

Usage (the media socket route)::

    leg = CarrierLeg(carrier=carrier, socket=socket_io(websocket), session=session, config=config,
                     metrics=metrics)
    await Call(services=services, session=session, leg=leg).run()
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING

from carriers.base import CallInfo, Carrier, CarrierProtocolError, HangupFailed, MediaStream
from gateway.calls.leg import CallSide
from gateway.calls.lifecycle import pause_every
from gateway.calls.socket import SocketIO
from gateway.sessions import Session
from pipeline.frames import AudioFrame, Dtmf, Frame, MarkPlayed, StreamStarted, StreamStopped

if TYPE_CHECKING:
    from gateway.config import Config
    from gateway.metrics import Metrics

__all__ = ["CarrierLeg"]

logger = logging.getLogger(__name__)


class CarrierLeg:
    """One carrier media socket. ``label`` is the carrier's name."""

    noun = "the call"
    not_started = "the media stream has not started yet"
    ended_text = "call ended"
    can_transfer = True
    detects_machines = True

    def __init__(self, *, carrier: Carrier, socket: SocketIO, session: Session, config: Config,
                 metrics: Metrics) -> None:
        self.carrier = carrier
        self.socket = socket
        self.session = session
        self.config = config
        self.metrics = metrics
        self.label = carrier.name
        self._stream: MediaStream = carrier.open_stream()
        self.sample_rate = self._stream.sample_rate
        self.frame_ms = self._stream.frame_ms
        longest = min(config.outbound_message_ms, self._stream.max_message_ms)
        self.message_ms = max(self.frame_ms, longest // self.frame_ms * self.frame_ms)
        self._carrier_stopped = False
        self._transferred = False
        self._bad_messages = 0
        self._call_info = CallInfo(carrier=carrier.name, call_id=session.call_id, from_=session.from_,
                                   to=session.to, account_id=session.account_id)

    # ------------------------------------------------------------------------------ opening
    async def open(self, call: CallSide) -> Mapping[str, str] | None:
        """Read until the carrier's ``start`` (bounded by ``media_start_timeout_secs``); its custom
        parameters, or None when the stream ended or was refused first."""
        started = await self._handshake(call)
        if started is None:
            return None
        if started.call_id and self.session.call_id and started.call_id != self.session.call_id:
            logger.warning("start callSid %s does not match the session's call; closing", started.call_id)
            call.finish("protocol_error", code=1008, text="call id does not match the session")
            return None
        logger.info("media started carrier=%s stream=%s", self.label, started.stream_id)
        return dict(started.custom_parameters)

    async def _handshake(self, call: CallSide) -> StreamStarted | None:
        timeout = self.config.media_start_timeout_secs
        try:
            async with asyncio.timeout(timeout):
                while True:
                    message = await self.socket.receive()
                    if message is None:
                        self._socket_closed(call)
                        return None
                    for frame in self._decode(message, call):
                        if isinstance(frame, StreamStarted):
                            return frame
                        if isinstance(frame, StreamStopped):
                            self._carrier_stopped = True
                            call.finish("stopped_before_start")
                            return None
                    if call.ended.is_set():
                        return None
        except CarrierProtocolError as exc:   # media before start and the like: the stream is unusable
            logger.warning("closing media socket: %s", exc)
            call.finish("protocol_error", code=1008, text=str(exc)[:120])
            return None
        except TimeoutError:
            logger.warning("no start message within %.1f s; closing", timeout)
            call.finish("start_timeout", code=1008, text="no start message")
            return None

    # ------------------------------------------------------------------------------ input
    def tasks(self, tg: asyncio.TaskGroup, call: CallSide) -> list[asyncio.Task[None]]:
        return [tg.create_task(self._read(call))]

    async def _read(self, call: CallSide) -> None:
        def on_message(message: str | bytes) -> None:
            for frame in self._decode(message, call):
                self._dispatch(frame, call)

        if self.socket.listen is not None:      # pushed as read: no task switch per 20 ms message
            await self.socket.listen(on_message)
            self._socket_closed(call)
            return
        count = 0
        while True:
            message = await self.socket.receive()
            if message is None:
                self._socket_closed(call)
                return
            on_message(message)
            count += 1
            await pause_every(count)

    def _dispatch(self, frame: Frame, call: CallSide) -> None:
        if isinstance(frame, AudioFrame):
            call.hear(frame)
        elif isinstance(frame, MarkPlayed):
            call.mark_played(frame.name)
        elif isinstance(frame, Dtmf):
            call.dtmf(frame.digit)
        elif isinstance(frame, StreamStopped):
            self._carrier_stopped = True
            call.finish("caller_hangup")

    def _socket_closed(self, call: CallSide) -> None:
        """The socket went away: a protocol-level refusal (oversized or invalid frame) is our close,
        and the call is still up at the carrier; anything else means the caller's side ended."""
        code = self.socket.peer_close_code()
        if code == 1009:
            self.metrics.media_rejected.labels(carrier=self.label).inc()
            logger.warning("media frame exceeded ws_max_message_bytes=%d; the socket closed with 1009",
                           self.config.ws_max_message_bytes)
            call.finish("message_too_big", code=1009, text="message too big")
        elif code in (1002, 1007):
            logger.warning("media socket failed with close code %d (invalid frame)", code)
            call.finish("protocol_error", code=code, text="invalid frame")
        else:
            self._carrier_stopped = True
            call.finish("caller_hangup")

    def _decode(self, message: str | bytes, call: CallSide) -> list[Frame]:
        limit = self.config.ws_max_message_bytes
        if len(message) > limit:
            self.metrics.media_rejected.labels(carrier=self.label).inc()
            logger.warning("media message of %d bytes exceeds ws_max_message_bytes=%d; closing", len(message), limit)
            call.finish("message_too_big", code=1009, text=f"message exceeds {limit} bytes")
            return []
        try:
            return self._stream.decode(message)
        except CarrierProtocolError as exc:
            if not self._stream.started:
                raise
            self._bad_messages += 1
            self.metrics.media_rejected.labels(carrier=self.label).inc()
            logger.warning("dropped malformed media message (%d so far): %s", self._bad_messages, exc)
            if self._bad_messages > self.config.media_max_bad_messages:
                call.finish("protocol_error", code=1007, text=str(exc)[:120])
            return []

    # ------------------------------------------------------------------------------ output
    async def send(self, frame: Frame) -> None:
        """Encode and send; when the carrier's rules make several messages of one frame, they go in one
        socket write."""
        messages = self._stream.encode(frame)
        if len(messages) > 1 and self.socket.send_many:
            await self.socket.send_many(messages)
            return
        for message in messages:
            await self.socket.send(message)

    def emit(self, message: Mapping[str, object]) -> None:
        """A phone has no event channel."""

    # ------------------------------------------------------------------------------ call control
    async def transfer(self, target: str) -> None:
        """Cold-transfer through the carrier (raises CallControlFailed when it refuses); the stream then
        ends without our hang-up."""
        await self.carrier.transfer(self._call_info, target)
        self._transferred = True

    async def send_dtmf(self, digits: str) -> bool:
        return await self.carrier.send_dtmf(self._call_info, digits)

    async def close(self, reason: str, code: int, text: str) -> None:
        """Hang up through the carrier (unless it ended the call or it was transferred), then close."""
        if not self._carrier_stopped and not self._transferred and self.session.call_id:
            try:
                async with asyncio.timeout(self.config.hangup_timeout_secs):
                    await self.carrier.hang_up(self._call_info)
            except (HangupFailed, TimeoutError) as exc:
                logger.error("hang-up through the carrier failed: %s", exc or "timed out")
        try:
            await self.socket.close(code, text)
        except Exception:  # noqa: BLE001, S110 - the socket may already be gone
            pass
