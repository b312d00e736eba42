"""Call: one live conversation on any transport — its leg, conversation, playout and call log in one
TaskGroup, one finaliser.

The call ends through :meth:`Call.finish` (idempotent; any task, the API, the leg or the carrier may
call it). Its work then gets ``call_stop_timeout_secs`` to stop (``gateway.calls.lifecycle``), and
the finaliser runs exactly once: the leg closes (a carrier leg hangs up through the carrier's REST
API, tolerating "already ended"; a browser leg says ``end``), the call log hands over the recording,
the session is removed, the call is counted. This is the one place that catches broadly: a bug in any
task ends that call cleanly, never another one.

Usage (a carrier media socket; browsers pass their leg and the persona they resolved)::

    leg = CarrierLeg(carrier=carrier, socket=SocketIO(...), session=session, config=config, metrics=metrics)
    await Call(services=services, session=session, leg=leg).run()
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from carriers.base import CallControlFailed
from gateway.browser.events import event_message, parse_control
from gateway.calls.call_log import CallLog
from gateway.calls.leg import Leg
from gateway.calls.lifecycle import MediaGate, run_until_ended
from gateway.logging import call_id
from gateway.personas import PersonaError
from gateway.redaction import short_id
from gateway.sessions import Session
from pipeline.audio import dtmf_tones
from pipeline.conversation import Conversation, Event, Persona
from pipeline.engine import Engine
from pipeline.frames import AudioFrame, Frame
from pipeline.playout import Playout
from pipeline.realtime.client import RealtimeModel
from pipeline.realtime.engine import RealtimeEngine, RealtimeOptions
from pipeline.tools import ToolRunner, builtin_tools, http_tools

if TYPE_CHECKING:
    from gateway.app import Services

__all__ = ["Call"]

logger = logging.getLogger(__name__)

_ERROR_EVERY_S = 1.0          # the same error event at most once a second (a bad stream fails every frame)


class Call:
    """One call. ``persona`` is known up front for browsers; a carrier call resolves it once its stream
    has started (the carrier's custom parameters take part)."""

    def __init__(self, *, services: Services, session: Session, leg: Leg, persona: Persona | None = None) -> None:
        self.services = services
        self.session = session
        self.leg = leg
        self.persona = persona
        self.reason: str | None = None
        self.conversation: Engine | None = None      # the cascade, or a speech-to-speech session
        self.finalised = asyncio.Event()   # set once the finaliser has run (DELETE waits for it)
        self._ended = asyncio.Event()
        self._finalised = False
        self._close_code, self._close_text = 1000, leg.ended_text
        self._playout: Playout | None = None
        self._log: CallLog | None = None
        self._gate = MediaGate(services.config, services.metrics, label=leg.label, finish=self.finish)
        self._last_error: dict[str, float] = {}
        self._bad_messages = 0
        self._started_at = time.monotonic()

    @property
    def ended(self) -> asyncio.Event:
        return self._ended

    def finish(self, reason: str, *, code: int = 1000, text: str | None = None) -> None:
        """Ask the call to end (idempotent; the first reason wins). ``code`` and ``text`` are the close a
        socket leg sends (``text`` defaults to the leg's ``ended_text``)."""
        if self.reason is None:
            self.reason = reason
            self._close_code, self._close_text = code, self.leg.ended_text if text is None else text
        self._ended.set()

    # ------------------------------------------------------------------------------ lifecycle
    async def run(self) -> None:
        """Register the call, serve it until it ends, then finalise it (always, exactly once)."""
        token = call_id.set(self.session.call_id or short_id(self.session.id))
        metrics = self.services.metrics
        metrics.active_calls.labels(carrier=self.leg.label).inc()
        metrics.calls_started.labels(carrier=self.leg.label).inc()
        self.services.calls.add(self)
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
        parameters = await self.leg.open(self)
        if parameters is None or self._ended.is_set():
            return
        if self.persona is None:
            try:
                self.persona = self.services.personas.resolve(
                    to=self.session.to, parameters={**self.session.parameters, **parameters},
                    context=self.session.context or None)
            except PersonaError as exc:     # a broken personas file must not drop a live call
                logger.error("persona lookup failed, using the default: %s", exc)
                self.persona = self.services.personas.resolve()
        logger.info("%s started persona=%s", self.leg.label, self.persona.name)
        await self._converse(self.persona)

    async def _converse(self, persona: Persona) -> None:
        services, config, leg = self.services, self.services.config, self.leg
        self._log = CallLog.for_session(services, self.session, persona=persona.name, carrier=leg.label)
        async with asyncio.TaskGroup() as tg:
            playout = Playout(sample_rate=leg.sample_rate, lead_ms=config.outbound_lead_ms,
                              max_buffer_ms=config.playout_max_buffer_ms, frame_ms=leg.frame_ms,
                              message_ms=leg.message_ms, tick_ms=config.outbound_tick_ms)
            convo = self._new_engine(persona, playout, tg, self._tools(persona))
            playout.on_speaking = convo.on_speaking
            self._playout, self.conversation = playout, convo
            tasks = [tg.create_task(playout.run(self._send)), *leg.tasks(tg, self),
                     tg.create_task(self._limit_duration())]
            convo.start()
            await self._ended.wait()
            convo.close()
            for task in tasks:
                task.cancel()

    def _new_engine(self, persona: Persona, playout: Playout, tg: asyncio.TaskGroup, tools: ToolRunner) -> Engine:
        """The cascade, or the speech-to-speech session when the LLM stage is ``realtime``."""
        services, config = self.services, self.services.config
        model = services.providers.llm[0] if services.providers.llm else None
        if isinstance(model, RealtimeModel):
            options = RealtimeOptions(voice=config.realtime_voice, turn_detection=config.realtime_turn_detection,
                                      transcribe_model=config.realtime_transcribe_model,
                                      connect_timeout_secs=config.llm_timeout_secs)
            return RealtimeEngine(model=model, options=options, settings=services.conversation_settings,
                                  persona=persona, providers=services.providers, playout=playout,
                                  spawn=tg.create_task, on_event=self._observe, end_call=self.finish,
                                  tools=tools.tools, on_tool=tools, context=self.session.context)
        return Conversation(settings=services.conversation_settings, persona=persona, providers=services.providers,
                            playout=playout, spawn=tg.create_task, on_event=self._observe, end_call=self.finish,
                            context=self.session.context, tools=tools.tools, on_tool=tools)

    async def _limit_duration(self) -> None:
        """``max_call_secs``: the goodbye, then the end, even if the goodbye has not finished by
        ``goodbye_timeout_secs``."""
        config = self.services.config
        await asyncio.sleep(config.max_call_secs)
        logger.info("max_call_secs reached; saying goodbye")
        if self.conversation is not None:
            self.conversation.end_with(config.goodbye_text, "max_duration")
        await asyncio.sleep(config.goodbye_timeout_secs)
        self.finish("max_duration")

    # ------------------------------------------------------------------------------ input (from the leg)
    def hear(self, frame: AudioFrame) -> None:
        """Caller audio (at most real time, ``MediaGate``): recorded, then heard by the conversation."""
        if not self._gate.admit(frame) or self.conversation is None:
            return
        if self._log is not None:
            self._log.caller(frame)
        self.conversation.on_audio(frame)

    def dtmf(self, digit: str) -> None:
        logger.info("dtmf digit received")
        if self.conversation is not None:
            self.conversation.on_dtmf(digit)

    def mark_played(self, name: str) -> None:
        if self.conversation is not None:
            self.conversation.on_mark_played(name)

    def control(self, text: str) -> None:
        """A JSON control message from the client: ``interrupt`` or ``end``."""
        try:
            kind = parse_control(text)
        except ValueError as exc:
            self.bad_message("bad_message", str(exc))
            return
        if kind == "interrupt":
            if self.conversation is not None:
                self.conversation.interrupt()
        elif kind == "end":
            self.finish("ended_by_client")
        elif kind == "start":
            self.bad_message("bad_message", "the session has already started")
        else:
            self.bad_message("bad_message", f"unknown message type {kind!r}; expected \"interrupt\" or \"end\"")

    def bad_message(self, code: str, message: str) -> None:
        """A dropped frame or control message: counted in ``media_rejected`` and reported; past
        ``media_max_bad_messages`` the call ends (1008) rather than reading garbage all its life."""
        self.services.metrics.media_rejected.labels(carrier=self.leg.label).inc()
        self._bad_messages += 1
        limit = self.services.config.media_max_bad_messages
        if self._bad_messages <= limit:
            self.error(code, message)
            return
        if self.reason is None:
            logger.warning("%s %d bad messages exceed media_max_bad_messages=%d; closing (last: %s)",
                           self.leg.label, self._bad_messages, limit, message)
            self.leg.emit({"type": "error", "code": "too_many_bad_messages",
                           "message": f"more than {limit} bad messages ({code}: {message})"})
        self.finish("too_many_bad_messages", code=1008, text="too many bad messages")

    def error(self, code: str, message: str) -> None:
        """An ``error`` event for the client (the same one at most once a second: a bad stream fails every
        frame)."""
        now = time.monotonic()
        key = code + message
        if now - self._last_error.get(key, -_ERROR_EVERY_S) < _ERROR_EVERY_S:
            return
        self._last_error[key] = now
        logger.warning("%s %s: %s", self.leg.label, code, message)
        self.leg.emit({"type": "error", "code": code, "message": message})

    # ------------------------------------------------------------------------------ output
    async def _send(self, frame: Frame) -> None:
        """Playout output: audio is recorded and sent; marks and a Clear (barge-in) go to the leg."""
        if isinstance(frame, AudioFrame) and self._log is not None:
            self._log.agent(frame)
        await self.leg.send(frame)

    def _observe(self, event: Event) -> None:
        self.services.metrics.observe(event, carrier=self.leg.label, debug=self.services.debug)
        if self._log is not None:
            self._log.observe(event)
        message = event_message(event)
        if message is not None:
            self.leg.emit(message)

    # ------------------------------------------------------------------------------ call control
    async def transfer(self, target: str) -> None:
        """Cold-transfer the far end; the leg then ends without our hang-up. Raises CallControlFailed
        when the carrier refuses, or the leg cannot be transferred (a browser)."""
        await self.leg.transfer(target)
        logger.info("call transferred")
        self.finish("transferred")

    async def send_dtmf(self, digits: str) -> str:
        """Digits to the far end: out of band where the leg can, else as in-band tones."""
        if await self.leg.send_dtmf(digits):
            return "carrier"
        if self._playout is None:
            raise CallControlFailed(self.leg.not_started)
        await self._playout.write(dtmf_tones(digits, self._playout.sample_rate))
        self._playout.end_of_audio()
        return "in-band"

    def machine_answered(self) -> None:
        """Answering-machine detection says a machine picked up: leave the message or hang up."""
        if not self.leg.detects_machines:
            return
        config = self.services.config
        logger.info("answering machine detected; action=%s", config.amd_action)
        if config.amd_action == "message" and self.conversation is not None:
            self.conversation.end_with(config.voicemail_text or config.goodbye_text, "answering_machine")
        else:
            self.finish("answering_machine")

    # ------------------------------------------------------------------------------ tools
    def _tools(self, persona: Persona) -> ToolRunner:
        """The call's tools: the persona's built-ins (call control here), its HTTP tools, the MCP servers'."""
        services = self.services
        settings = services.tool_settings
        bound = builtin_tools(persona, self, can_transfer=self.leg.can_transfer)
        if services.tool_http is not None:
            bound += http_tools(persona.tools, services.tool_http, settings)
        for server in services.mcp_servers:
            bound += server.bound(settings)
        return ToolRunner(bound, settings, filler=self._filler)

    def _filler(self, text: str) -> None:
        if self.conversation is not None:
            self.conversation.filler(text)

    async def end_call(self) -> None:
        """The model's ``end_call``: its last words play, then the goodbye, then the hang-up."""
        if self._playout is not None:
            await self._playout.drained()
        if self.conversation is not None:
            self.conversation.end_with(self.services.config.goodbye_text, "agent_hangup")

    async def transfer_to(self, target: str) -> None:
        """The model's ``transfer_call``: the caller hears "transferring you" first."""
        if self._playout is not None:
            await self._playout.drained()
        await self.transfer(target)

    async def send_digits(self, digits: str) -> None:
        """The model's ``send_dtmf``."""
        await self.send_dtmf(digits)

    # ------------------------------------------------------------------------------ the finaliser
    async def _finalise(self) -> None:
        if self._finalised:
            return
        self._finalised = True
        reason = self.reason or "unknown"
        await self.leg.close(reason, self._close_code, self._close_text)
        if self._log is not None:
            await self._log.close()            # recording handed to the uploader; rows already queued
        try:
            await self.services.sessions.end(self.session.id)
        except Exception as exc:  # noqa: BLE001 - the store's TTL removes it later
            logger.error("could not remove the session: %s", exc)
        self.services.calls.remove(self)
        metrics = self.services.metrics
        metrics.active_calls.labels(carrier=self.leg.label).dec()
        metrics.calls_ended.labels(carrier=self.leg.label, reason=reason).inc()
        logger.info("%s ended reason=%s after %.1f s", self.leg.label, reason, time.monotonic() - self._started_at)
        self.finalised.set()
