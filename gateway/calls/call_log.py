"""What a call leaves behind: its recording and its transcript rows, fed by any transport.

A transport (carrier call, ``/ws``, WebRTC) hands every inbound and outbound audio frame and every
conversation event to one :class:`CallLog`; the call's finaliser closes it. Recording and
transcripts are each optional (``recording.enable``, ``transcripts.enable``); with both off a
CallLog does nothing. Neither can fail a call: a disk or database error is logged and counted,
and the audio and rows already taken are kept (spooled) for a later upload or write.

Transcript rows: one per utterance, numbered per session. A caller's row spans the utterance
(``started_at`` = speech start, ``ended_at`` = speech end); an agent's row runs from when the
agent began speaking to when its text was complete, and carries the turn's latency breakdown
(``TurnLatency`` is emitted at the answer's first audio, before its text is complete).

With ``log_transcripts`` on, each utterance's text is also logged at INFO (the call id is on the line,
gateway.logging); it is off by default because caller speech is personal data.

Usage::

    log = CallLog.for_session(services, session, persona="concierge")
    log.caller(frame)          # each decoded inbound AudioFrame, as it arrives
    log.agent(frame)           # each outbound AudioFrame, as it is sent
    log.observe(event)         # each conversation event
    await log.close()          # in the finaliser (idempotent)
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import asdict
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Literal, cast

from gateway.sessions import Session
from gateway.storage.recording import CallRecorder, Channels, RecordingUploader
from gateway.storage.transcripts import TranscriptRow, TranscriptWriter
from pipeline.conversation import BotSpeaking, Event, TranscriptEvent, TurnLatency
from pipeline.frames import AudioFrame

if TYPE_CHECKING:
    from gateway.app import Services

__all__ = ["CallLog"]

logger = logging.getLogger(__name__)


class CallLog:
    def __init__(self, session: Session, *, persona: str, carrier: str, recorder: CallRecorder | None = None,
                 uploader: RecordingUploader | None = None, writer: TranscriptWriter | None = None,
                 clock: Callable[[], float] = time.time, log_transcripts: bool = False) -> None:
        self.session = session
        self.log_transcripts = log_transcripts
        self.persona = persona
        self.carrier = carrier
        self.recorder = recorder
        self._uploader = uploader
        self._writer = writer
        self._clock = clock
        self._seq = 0
        self._speaking_since: float | None = None
        self._latency: TurnLatency | None = None      # the current turn's, for the agent's row
        self._closed = False

    @classmethod
    def for_session(cls, services: Services, session: Session, *, persona: str, carrier: str) -> CallLog:
        """A CallLog wired to the app's recording uploader and transcript writer (either may be off)."""
        recorder = None
        uploader: RecordingUploader | None = getattr(services, "recordings", None)
        if uploader is not None:
            r = services.config.recording
            try:
                recorder = CallRecorder.for_call(
                    uploader.spool_dir, base_path=r.base_path, session_id=session.id, carrier=carrier,
                    call_id=session.call_id, channels=cast(Channels, r.channels),  # Config.load checked it
                    started_at=datetime.now(UTC))
            except OSError as exc:
                logger.error("recording could not start (the call goes on unrecorded): %s", exc)
        return cls(session, persona=persona, carrier=carrier, recorder=recorder, uploader=uploader,
                   writer=getattr(services, "transcripts", None), log_transcripts=services.config.log_transcripts)

    # ------------------------------------------------------------------------------ audio
    def caller(self, frame: AudioFrame) -> None:
        if self.recorder is not None:
            self.recorder.caller(frame.pcm, frame.sample_rate)

    def agent(self, frame: AudioFrame) -> None:
        if self.recorder is not None:
            self.recorder.agent(frame.pcm, frame.sample_rate)

    # ------------------------------------------------------------------------------ transcripts
    def observe(self, event: Event) -> None:
        if self.log_transcripts and isinstance(event, TranscriptEvent) and event.final and event.text:
            logger.info("%s said: %s", "caller" if event.role == "user" else "agent", event.text)
        if self._writer is None or self._closed:
            return
        now = self._clock()
        if isinstance(event, BotSpeaking):
            if event.started and self._speaking_since is None:
                self._speaking_since = now
        elif isinstance(event, TurnLatency):
            self._latency = event          # first audio out: the answer's text completes after it
        elif isinstance(event, TranscriptEvent) and event.final and event.text:
            if event.role == "user":
                ended = now - event.ended_s_ago
                self._write("user", event.text, ended - event.spoken_s, ended, None)
                self._speaking_since, self._latency = None, None
            else:
                self._write("assistant", event.text, self._speaking_since or now, now, self._latency)
                self._speaking_since, self._latency = None, None

    def _write(self, role: Literal["user", "assistant"], text: str, started: float, ended: float,
               latency: TurnLatency | None) -> None:
        assert self._writer is not None
        self._seq += 1
        s = self.session
        self._writer.add(TranscriptRow(
            session_id=s.id, seq=self._seq, carrier=self.carrier, call_id=s.call_id, from_number=s.from_,
            to_number=s.to, persona=self.persona, role=role, text=text,
            started_at=started, ended_at=ended,
            latency={k: float(v) for k, v in asdict(latency).items()} if latency is not None else None))

    # ------------------------------------------------------------------------------ the end
    async def close(self) -> None:
        """Finish the WAV and hand it to the uploader (idempotent; never raises). Rows are already
        with the writer, which flushes them itself (and spools them at shutdown)."""
        if self._closed:
            return
        self._closed = True
        if self.recorder is None:
            return
        try:
            path = await asyncio.to_thread(self.recorder.close)
        except OSError as exc:
            logger.error("recording lost: %s", exc)
            return
        if self._uploader is not None and not self._uploader.submit(path):
            logger.info("recording queued on disk (upload queue full or closing); it is retried later")
