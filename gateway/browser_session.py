"""What a browser conversation is, whichever way its audio travels: :class:`BrowserCall`.

``/ws`` (:class:`gateway.browser_ws.BrowserSession`) and WebRTC (:class:`gateway.webrtc.WebRTCSession`)
run the same conversation and differ only in their transport. This base class holds everything else:
the idempotent :meth:`~BrowserCall.finish`, the :meth:`~BrowserCall.run` skeleton (the ``call_id``
context variable, metrics, registration in ``services.calls``), the TaskGroup with its playout and
conversation, the ``max_call_secs`` goodbye, the call-control answers a browser gives (in-band DTMF, no
transfer, no answering machine), rate-limited ``error`` events, control messages (``interrupt``,
``end``), the :class:`~gateway.call_log.CallLog` wiring and the finaliser (session removed, metrics,
one log line).

A transport subclasses it and supplies only its own parts::

    class LoopbackSession(BrowserCall):
        label = "loopback"                          # metrics carrier label, CallLog carrier, log lines
        noun = "a loopback session"                 # "... cannot be transferred"
        log_prefix = "loopback"                     # "loopback bad_message: ..." warnings
        not_started = "the session has not started yet"

        async def _serve(self) -> None:             # announce readiness, then converse until finish()
            self._emit(self._ready())
            await self._converse()

        def _tasks(self, tg, convo):                # what runs beside the playout: the reader, ...
            return [tg.create_task(self._read(convo))]

        def _emit(self, message): ...               # queue one JSON event for the client
        async def _play(self, pcm): ...             # the agent's audio at ``output_rate``
        async def _close_transport(self, reason): ...   # say ``end`` and close (best effort)

    await LoopbackSession(services=services, session=session, persona=persona, codec="pcm16",
                          output_rate=16000).run()

Every instance is shaped like :class:`gateway.call.Call` (``session``, ``reason``, ``finish``,
``finalised``, ``transfer``, ``send_dtmf``, ``machine_answered``), so ``DELETE /sessions/{id}``, the
control bus, drain and shutdown end it like a carrier call.
"""

from __future__ import annotations

import abc
import asyncio
import logging
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

from carriers.base import CallControlFailed
from gateway.browser_events import event_message, parse_control
from gateway.call import limit_duration
from gateway.call_log import CallLog
from gateway.lifecycle import MediaGate, run_until_ended
from gateway.logging import call_id
from gateway.redaction import short_id
from gateway.sessions import Session
from pipeline.audio import dtmf_tones
from pipeline.conversation import Conversation, Event, Persona
from pipeline.frames import AudioFrame, Clear, Frame
from pipeline.playout import Playout

if TYPE_CHECKING:
    from gateway.app import Services

__all__ = ["FRAME_MS", "BrowserCall"]

logger = logging.getLogger(__name__)

FRAME_MS = 20                 # the playout's frame
_ERROR_EVERY_S = 1.0          # the same error event at most once a second (a bad stream fails every frame)


class BrowserCall(abc.ABC):
    """One browser conversation: a transport (the subclass), a conversation and a playout in one TaskGroup.

    Args:
        services: the app's services (config, metrics, session store, providers, ``calls``).
        session: the store's session, already ``active``; removed from the store when the call ends.
        persona: who the agent is.
        codec: the codec the client and server agreed on (announced in ``ready``).
        output_rate: the sample rate of the agent's audio (the playout's rate).
    """

    label: ClassVar[str]          # metrics carrier label, CallLog carrier, "<label> session ..." log lines
    noun: ClassVar[str]           # "a browser session": the subject of refusals
    log_prefix: ClassVar[str]     # the prefix of the error events' warning lines
    not_started: ClassVar[str]    # send_dtmf before the conversation runs

    def __init__(self, *, services: Services, session: Session, persona: Persona, codec: str,
                 output_rate: int) -> None:
        self.services = services
        self.session = session
        self.persona = persona
        self.codec = codec
        self.output_rate = output_rate
        self.reason: str | None = None
        self.conversation: Conversation | None = None
        self.finalised = asyncio.Event()   # set once the finaliser has run (DELETE waits for it)
        self._ended = asyncio.Event()
        self._finalised = False
        self._close_code, self._close_text = 1000, "session ended"
        self._playout: Playout | None = None
        self._log: CallLog | None = None
        self._last_error: dict[str, float] = {}
        self._bad_messages = 0
        self._gate = MediaGate(services.config, services.metrics, label=self.label, finish=self.finish)
        self._started_at = time.monotonic()

    def finish(self, reason: str, *, code: int = 1000, text: str = "session ended") -> None:
        """Ask the session to end (idempotent; the first reason wins). ``code`` and ``text`` are the close
        a socket transport sends; a transport without a close code ignores them."""
        if self.reason is None:
            self.reason = reason
            self._close_code, self._close_text = code, text
        self._ended.set()

    # ------------------------------------------------------------------------------ the transport's part
    @abc.abstractmethod
    async def _serve(self) -> None:
        """Everything between registration and the finaliser: usually ``ready``, then :meth:`_converse`."""

    @abc.abstractmethod
    def _emit(self, message: Mapping[str, Any]) -> None:
        """Queue one JSON event for the client (never blocks)."""

    @abc.abstractmethod
    async def _play(self, pcm: bytes) -> None:
        """Send the agent's 16-bit mono PCM (at ``output_rate``) to the client."""

    @abc.abstractmethod
    async def _close_transport(self, reason: str) -> None:
        """Tell the client the session ended (``end``, ``reason``) and close; must not raise."""

    def _tasks(self, tg: asyncio.TaskGroup, convo: Conversation) -> list[asyncio.Task[None]]:
        """The transport's tasks beside the playout (its reader, ...); cancelled when the call ends."""
        return []

    def _flush(self) -> None:
        """Barge-in: drop audio sent but not yet played. Nothing by default (the client flushes its
        playback on the ``interrupted`` event)."""

    def _coalesce_ms(self) -> float:
        """How long the playout may hold audio to write it in fewer, larger messages."""
        return 0.0

    def _unexpected(self, kind: object) -> str:
        """The ``bad_message`` text for a control message of an unknown ``type``."""
        return f"unknown message type {kind!r}; expected \"interrupt\" or \"end\""

    # ------------------------------------------------------------------------------ lifecycle
    async def run(self) -> None:
        """Register the call, serve it until it ends, then finalise it (always, exactly once)."""
        token = call_id.set(short_id(self.session.id))
        metrics = self.services.metrics
        metrics.active_calls.labels(carrier=self.label).inc()
        metrics.calls_started.labels(carrier=self.label).inc()
        self.services.calls[self.session.id] = self   # type: ignore[assignment]
        try:
            await run_until_ended(self._serve(), self._ended,
                                  stop_timeout_s=self.services.config.call_stop_timeout_secs)
        except asyncio.CancelledError:
            self.finish("shutdown", code=1001, text="server shutting down")
            raise
        except Exception:
            logger.exception("%s session failed unexpectedly; ending it", self.label)
            self.finish("error", code=1011, text="internal error")
        finally:
            await self._finalise()
            call_id.reset(token)

    def _ready(self) -> dict[str, Any]:
        """The ``ready`` event: the session's id, persona, codec and the rate of the agent's audio."""
        return {"type": "ready", "session_id": self.session.id, "persona": self.persona.name, "codec": self.codec,
                "sample_rate": self.output_rate}

    async def _converse(self) -> None:
        """Run the conversation, the playout and the transport's tasks until :meth:`finish`."""
        services, config = self.services, self.services.config
        self._log = CallLog.for_session(services, self.session, persona=self.persona.name, carrier=self.label)
        async with asyncio.TaskGroup() as tg:
            playout = Playout(sample_rate=self.output_rate, lead_ms=config.outbound_lead_ms,
                              max_buffer_ms=config.playout_max_buffer_ms, frame_ms=FRAME_MS,
                              coalesce_ms=self._coalesce_ms())
            convo = Conversation(settings=services.conversation_settings, persona=self.persona,
                                 providers=services.providers, playout=playout, spawn=tg.create_task,
                                 on_event=self._observe, end_call=self.finish, context=self.session.context)
            playout.on_speaking = convo.on_speaking
            self._playout, self.conversation = playout, convo
            tasks = [tg.create_task(playout.run(self._send_frame)), *self._tasks(tg, convo),
                     tg.create_task(limit_duration(self, config))]
            convo.start()
            await self._ended.wait()
            convo.close()
            for task in tasks:
                task.cancel()

    # ------------------------------------------------------------------------------ input
    def _hear(self, frame: AudioFrame, convo: Conversation) -> None:
        """The caller's audio (at most real time, ``gateway.lifecycle.MediaGate``): recorded, then heard."""
        if not self._gate.admit(frame):
            return
        if self._log is not None:
            self._log.caller(frame)
        convo.on_audio(frame)

    def _control(self, text: str) -> None:
        """A JSON control message from the client: ``interrupt`` or ``end``."""
        try:
            kind = parse_control(text)
        except ValueError as exc:
            self._bad_message("bad_message", str(exc))
            return
        if kind == "interrupt":
            if self.conversation is not None:
                self.conversation.interrupt()
        elif kind == "end":
            self.finish("ended_by_client")
        else:
            self._bad_message("bad_message", self._unexpected(kind))

    def _bad_message(self, code: str, message: str) -> None:
        """A dropped frame or control message: counted in ``media_rejected`` and reported; past
        ``media_max_bad_messages`` the session ends (1008) rather than reading garbage all its life."""
        self.services.metrics.media_rejected.labels(carrier=self.label).inc()
        self._bad_messages += 1
        limit = self.services.config.media_max_bad_messages
        if self._bad_messages <= limit:
            self._error(code, message)
            return
        if self.reason is None:
            logger.warning("%s %d bad messages exceed media_max_bad_messages=%d; closing (last: %s)",
                           self.log_prefix, self._bad_messages, limit, message)
            self._emit({"type": "error", "code": "too_many_bad_messages",
                        "message": f"more than {limit} bad messages ({code}: {message})"})
        self.finish("too_many_bad_messages", code=1008, text="too many bad messages")

    def _error(self, code: str, message: str) -> None:
        """An ``error`` event (the same one at most once a second: a bad stream fails every frame)."""
        now = time.monotonic()
        key = code + message
        if now - self._last_error.get(key, -_ERROR_EVERY_S) < _ERROR_EVERY_S:
            return
        self._last_error[key] = now
        logger.warning("%s %s: %s", self.log_prefix, code, message)
        self._emit({"type": "error", "code": code, "message": message})

    # ------------------------------------------------------------------------------ output
    async def _send_frame(self, frame: Frame) -> None:
        """Playout output: audio is recorded and played; a Clear (barge-in) flushes the transport. Marks
        need no acknowledgement: the playout's timing tells what was heard."""
        if isinstance(frame, AudioFrame):
            if self._log is not None:
                self._log.agent(frame)
            await self._play(frame.pcm)
        elif isinstance(frame, Clear):
            self._flush()

    def _observe(self, event: Event) -> None:
        self.services.metrics.observe(event, carrier=self.label, debug=self.services.debug)
        if self._log is not None:
            self._log.observe(event)
        message = event_message(event)
        if message is not None:
            self._emit(message)

    # ------------------------------------------------------------------------------ call control
    async def transfer(self, target: str) -> None:
        """Always refused: a browser has no phone leg to move."""
        raise CallControlFailed(f"{self.noun} cannot be transferred")

    async def send_dtmf(self, digits: str) -> str:
        """Digits as in-band tones (there is no out-of-band DTMF channel to a browser)."""
        if self._playout is None:
            raise CallControlFailed(self.not_started)
        await self._playout.write(dtmf_tones(digits, self._playout.sample_rate))
        self._playout.end_of_audio()
        return "in-band"

    def machine_answered(self) -> None:
        """Answering-machine detection does not apply to a browser."""

    # ------------------------------------------------------------------------------ the finaliser
    async def _finalise(self) -> None:
        if self._finalised:
            return
        self._finalised = True
        reason = self.reason or "unknown"
        await self._close_transport(reason)
        if self._log is not None:
            await self._log.close()
        try:
            await self.services.sessions.end(self.session.id)
        except Exception as exc:  # noqa: BLE001 - the store's TTL removes it later
            logger.error("could not remove the session: %s", exc)
        if self.services.calls.get(self.session.id) is self:
            self.services.calls.pop(self.session.id, None)
        metrics = self.services.metrics
        metrics.active_calls.labels(carrier=self.label).dec()
        metrics.calls_ended.labels(carrier=self.label, reason=reason).inc()
        logger.info("%s session ended reason=%s after %.1f s", self.label, reason, time.monotonic() - self._started_at)
        self.finalised.set()
