"""Fake OpenAI Realtime API (the GA WebSocket protocol) on 127.0.0.1, validating every client event.

It speaks the documented event protocol: ``session.created``/``session.updated``, server VAD events from
an energy detector over the audio it is sent (``input_audio_buffer.speech_started``/``speech_stopped``/
``committed``, the caller's transcript), responses as ``response.created`` … ``response.output_audio.delta``
… ``response.done``, function calls as ``function_call`` output items, ``conversation.item.truncated``,
``rate_limits.updated``, and ``error`` events. Every client event is checked against the API's shapes
(known type, known fields, the audio format the session declared, a truncate within the audio sent): a
wrong one gets an ``error`` event and lands in ``state.problems``, which a test asserts empty.

Responses are scripted in ``replies`` (taken in order, by the server's VAD and by ``response.create``
alike): a string is spoken (a tone of ``ms_per_char`` per character, with that text as its transcript),
``{"tool": name, "arguments": {...}}`` is a function call, ``{"text": ..., "error_after_ms": n}`` fails
with a ``server_error`` event after ``n`` ms of audio.

Usage::

    async with FakeRealtime(replies=["Hello!", "Sure."], transcripts=["book a table"],
                            audio_format="audio/pcmu") as fake:
        fake.base_url                        # http://127.0.0.1:<port>; the socket is /v1/realtime
        fake.state.truncates                 # [{"item_id", "audio_end_ms", "sent_ms"}]
        assert fake.state.problems == []

Subprocess (benchmarks); prints ``READY http://127.0.0.1:<port>`` once listening (problems go to stdout)::

    python -m tests.fakes.realtime_server --silence-ms 300 --first-audio-ms 250 --reply "Sure." \
        --api-key sk-bench
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import contextlib
import itertools
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from starlette.applications import Starlette
from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from pipeline.audio import ulaw_decode, ulaw_encode
from tests.fakes._server import LocalServer

__all__ = ["FakeRealtime", "RealtimeState"]

_ids = itertools.count(1)

_EVENT_FIELDS: Mapping[str, set[str]] = {
    "session.update": {"session"},
    "input_audio_buffer.append": {"audio"},
    "input_audio_buffer.commit": set(),
    "input_audio_buffer.clear": set(),
    "conversation.item.create": {"item", "previous_item_id"},
    "conversation.item.truncate": {"item_id", "content_index", "audio_end_ms"},
    "conversation.item.delete": {"item_id"},
    "response.create": {"response"},
    "response.cancel": {"response_id"},
    "output_audio_buffer.clear": set(),
}
_SESSION_FIELDS = {"type", "model", "instructions", "output_modalities", "audio", "tools", "tool_choice",
                   "max_output_tokens", "tracing", "truncation", "include", "prompt"}
_RESPONSE_FIELDS = {"conversation", "instructions", "output_modalities", "tools", "tool_choice", "metadata",
                    "input", "audio", "max_output_tokens", "prompt"}
_DETECTION_FIELDS = {"type", "create_response", "interrupt_response", "threshold", "prefix_padding_ms",
                     "silence_duration_ms", "idle_timeout_ms", "eagerness"}
_CHUNK_MS = 100          # audio per delta
_SEND_EVERY_S = 0.025    # four times faster than real time, as the real API sends ahead


def _eid() -> str:
    return f"event_{next(_ids)}"


@dataclass
class RealtimeState:
    replies: list[Any]
    transcripts: list[str]
    audio_format: str
    ms_per_char: float
    silence_ms: float = 500.0          # the server VAD's silence_duration_ms
    first_audio_ms: float = 0.0        # a response waits this long before its first audio (the model's think time)
    default_reply: str = "Okay."       # spoken once the scripted replies run out
    problems: list[str] = field(default_factory=list)
    sessions: list[dict[str, Any]] = field(default_factory=list)        # each session.update's session
    headers: list[dict[str, str]] = field(default_factory=list)
    queries: list[dict[str, str]] = field(default_factory=list)
    events: list[str] = field(default_factory=list)                     # client event types in order
    responses: list[dict[str, Any]] = field(default_factory=list)       # response.create bodies
    truncates: list[dict[str, Any]] = field(default_factory=list)
    tool_outputs: list[dict[str, Any]] = field(default_factory=list)
    messages: list[dict[str, Any]] = field(default_factory=list)       # message items the client created
    input_ms: float = 0.0
    connections: int = 0


class _Session:
    """One connection: the declared format, the VAD, the response in progress."""

    def __init__(self, ws: WebSocket, state: RealtimeState) -> None:
        self.ws = ws
        self.state = state
        self.format: Mapping[str, Any] | None = None
        self.detection: Mapping[str, Any] | None = {"type": "server_vad"}
        self.response: asyncio.Task[None] | None = None
        self.response_id = ""
        self.sent_ms: dict[str, float] = {}              # assistant item -> audio sent
        self.calls: set[str] = set()                     # function call ids issued
        self.speaking = False
        self.loud_ms = 0.0
        self.quiet_ms = 0.0
        self.buffer_ms = 0.0
        self.lock = asyncio.Lock()

    async def send(self, event: dict[str, Any]) -> None:
        with contextlib.suppress(WebSocketDisconnect, RuntimeError):
            await self.ws.send_text(json.dumps({"event_id": _eid(), **event}))

    async def problem(self, message: str, event_id: str | None = None) -> None:
        self.state.problems.append(message)
        await self.send({"type": "error", "error": {"type": "invalid_request_error", "code": "invalid_value",
                                                    "message": message, "param": None, "event_id": event_id}})

    # ------------------------------------------------------------------ client events
    async def handle(self, text: str) -> None:
        try:
            event = json.loads(text)
        except ValueError:
            await self.problem("a client message is not JSON")
            return
        kind = event.get("type") if isinstance(event, dict) else None
        if kind not in _EVENT_FIELDS:
            await self.problem(f"unknown client event type {kind!r}")
            return
        self.state.events.append(kind)
        extra = set(event) - _EVENT_FIELDS[kind] - {"type", "event_id"}
        if extra:
            await self.problem(f"{kind}: unknown fields {sorted(extra)}", event.get("event_id"))
            return
        await getattr(self, "on_" + kind.replace(".", "_"))(event)

    async def on_session_update(self, event: dict[str, Any]) -> None:
        session = event.get("session")
        if not isinstance(session, dict) or session.get("type") != "realtime":
            await self.problem("session.update: session.type must be 'realtime'")
            return
        errors = [f"unknown session field {k!r}" for k in set(session) - _SESSION_FIELDS]
        audio = session.get("audio") or {}
        audio_in, audio_out = audio.get("input") or {}, audio.get("output") or {}
        want = {"type": self.state.audio_format, **({"rate": 24000} if self.state.audio_format == "audio/pcm" else {})}
        for name, part in (("input", audio_in), ("output", audio_out)):
            if part.get("format") != want:
                errors.append(f"audio.{name}.format is {part.get('format')!r}; this test expects {want!r}")
        errors += [f"unknown audio.input field {k!r}" for k in set(audio_in) - {"format", "turn_detection",
                                                                               "transcription", "noise_reduction"}]
        errors += [f"unknown audio.output field {k!r}" for k in set(audio_out) - {"format", "voice", "speed"}]
        detection = audio_in.get("turn_detection", {"type": "server_vad"})
        if detection is not None and (set(detection) - _DETECTION_FIELDS
                                      or detection.get("type") not in ("server_vad", "semantic_vad")):
            errors.append(f"bad turn_detection {detection!r}")
        for tool in session.get("tools") or []:
            if set(tool) != {"type", "name", "description", "parameters"} or tool["type"] != "function" \
                    or tool["parameters"].get("type") != "object":
                errors.append(f"bad tool {tool!r}")
        if session.get("output_modalities") not in (None, ["audio"], ["text"]):
            errors.append("output_modalities must be ['audio'] or ['text']")
        if errors:
            await self.problem("session.update: " + "; ".join(errors))
            return
        self.format, self.detection = want, detection
        self.state.sessions.append(session)
        await self.send({"type": "session.updated", "session": session})

    async def on_input_audio_buffer_append(self, event: dict[str, Any]) -> None:
        if self.format is None:
            await self.problem("input_audio_buffer.append before session.update")
            return
        try:
            raw = base64.b64decode(event.get("audio", ""), validate=True)
        except (binascii.Error, TypeError):
            await self.problem("input_audio_buffer.append: audio is not base64")
            return
        if self.format["type"] == "audio/pcmu":
            pcm, rate = ulaw_decode(raw), 8000
        else:
            if len(raw) % 2:
                await self.problem("input_audio_buffer.append: odd byte count for audio/pcm")
                return
            pcm, rate = raw, 24000
        ms = len(pcm) / 2 / rate * 1000.0
        self.state.input_ms += ms
        self.buffer_ms += ms
        if self.detection is not None and pcm:
            await self._vad(pcm, ms)

    async def _vad(self, pcm: bytes, ms: float) -> None:
        samples = np.frombuffer(pcm, dtype="<i2").astype(np.float32) / 32768.0
        loud = float(np.sqrt(np.mean(samples * samples))) > 0.02
        if loud:
            self.loud_ms, self.quiet_ms = self.loud_ms + ms, 0.0
        else:
            self.quiet_ms += ms
            if not self.speaking:
                self.loud_ms = 0.0
        if not self.speaking and self.loud_ms >= 60:
            self.speaking = True
            await self.send({"type": "input_audio_buffer.speech_started", "audio_start_ms": int(self.buffer_ms),
                             "item_id": f"item_in_{next(_ids)}"})
            assert self.detection is not None
            if self.detection.get("interrupt_response", True) and self.response is not None \
                    and not self.response.done():
                self.response.cancel()
        elif self.speaking and self.quiet_ms >= self.state.silence_ms:
            self.speaking, self.loud_ms = False, 0.0
            item = f"item_in_{next(_ids)}"
            await self.send({"type": "input_audio_buffer.speech_stopped", "audio_end_ms": int(self.buffer_ms),
                             "item_id": item})
            await self._commit(item)
            assert self.detection is not None
            if self.detection.get("create_response", True):
                await self._start_response({})

    async def _commit(self, item: str) -> None:
        await self.send({"type": "input_audio_buffer.committed", "item_id": item, "previous_item_id": None})
        transcript = self.state.transcripts.pop(0) if self.state.transcripts else ""
        await self.send({"type": "conversation.item.input_audio_transcription.completed", "item_id": item,
                         "content_index": 0, "transcript": transcript,
                         "usage": {"type": "duration", "seconds": 1}})
        self.buffer_ms = 0.0

    async def on_input_audio_buffer_commit(self, event: dict[str, Any]) -> None:
        if self.detection is not None:
            await self.problem("input_audio_buffer.commit while the server's VAD is on")
            return
        await self._commit(f"item_in_{next(_ids)}")

    async def on_input_audio_buffer_clear(self, event: dict[str, Any]) -> None:
        self.buffer_ms = 0.0
        await self.send({"type": "input_audio_buffer.cleared"})

    async def on_conversation_item_create(self, event: dict[str, Any]) -> None:
        item = event.get("item") or {}
        kind = item.get("type")
        if kind == "function_call_output":
            if set(item) - {"type", "call_id", "output", "id"} or not isinstance(item.get("output"), str):
                await self.problem(f"bad function_call_output item {item!r}")
                return
            if item.get("call_id") not in self.calls:
                await self.problem(f"function_call_output for unknown call_id {item.get('call_id')!r}")
                return
            self.state.tool_outputs.append(item)
        elif kind == "message":
            content = item.get("content") or []
            if item.get("role") not in ("user", "system", "assistant") or not all(
                    isinstance(c, dict) and c.get("type") in ("input_text", "input_audio", "output_text")
                    for c in content):
                await self.problem(f"bad message item {item!r}")
                return
            self.state.messages.append(item)
        else:
            await self.problem(f"unknown item type {kind!r}")
            return
        await self.send({"type": "conversation.item.added", "previous_item_id": None,
                         "item": {"id": item.get("id") or f"item_{next(_ids)}", **item}})

    async def on_conversation_item_truncate(self, event: dict[str, Any]) -> None:
        item_id, end = event.get("item_id"), event.get("audio_end_ms")
        if event.get("content_index") != 0 or not isinstance(end, int) or isinstance(end, bool) or end < 0:
            await self.problem(f"conversation.item.truncate: bad content_index/audio_end_ms in {event!r}")
            return
        if item_id not in self.sent_ms:
            await self.problem(f"conversation.item.truncate: {item_id!r} is not an assistant audio item")
            return
        if end > self.sent_ms[item_id] + 1:
            await self.problem(f"conversation.item.truncate: audio_end_ms {end} is past the "
                               f"{self.sent_ms[item_id]:.0f} ms of audio sent")
            return
        self.state.truncates.append({"item_id": item_id, "audio_end_ms": end, "sent_ms": self.sent_ms[item_id]})
        await self.send({"type": "conversation.item.truncated", "item_id": item_id, "content_index": 0,
                         "audio_end_ms": end})

    async def on_conversation_item_delete(self, event: dict[str, Any]) -> None:
        await self.send({"type": "conversation.item.deleted", "item_id": event.get("item_id")})

    async def on_response_create(self, event: dict[str, Any]) -> None:
        body = event.get("response") or {}
        if set(body) - _RESPONSE_FIELDS:
            await self.problem(f"response.create: unknown fields {sorted(set(body) - _RESPONSE_FIELDS)}")
            return
        if self.response is not None and not self.response.done():
            await self.send({"type": "error", "error": {
                "type": "invalid_request_error", "code": "conversation_already_has_active_response",
                "message": "Conversation already has an active response in progress", "param": None,
                "event_id": event.get("event_id")}})
            self.state.problems.append("response.create while a response is in progress")
            return
        self.state.responses.append(body)
        await self._start_response(body)

    async def on_response_cancel(self, event: dict[str, Any]) -> None:
        if self.response is None or self.response.done():
            await self.send({"type": "error", "error": {"type": "invalid_request_error",
                                                        "code": "response_cancel_not_active",
                                                        "message": "no active response", "param": None,
                                                        "event_id": event.get("event_id")}})
            return
        self.response.cancel()

    async def on_output_audio_buffer_clear(self, event: dict[str, Any]) -> None:
        await self.problem("output_audio_buffer.clear is for WebRTC and SIP sessions, not WebSocket")

    # ------------------------------------------------------------------ responses
    async def _start_response(self, body: Mapping[str, Any]) -> None:
        if self.response is not None and not self.response.done():
            return
        reply = self.state.replies.pop(0) if self.state.replies else self.state.default_reply
        self.response_id = f"resp_{next(_ids)}"
        self.response = asyncio.create_task(self._respond(self.response_id, reply))

    async def _respond(self, response_id: str, reply: Any) -> None:
        base = {"object": "realtime.response", "id": response_id}
        await self.send({"type": "response.created", "response": {**base, "status": "in_progress", "output": []}})
        status, output = "completed", []
        try:
            if isinstance(reply, dict) and "tool" in reply:
                output.append(await self._function_call(response_id, reply))
            else:
                text = reply if isinstance(reply, str) else reply["text"]
                fail_after = None if isinstance(reply, str) else reply.get("error_after_ms")
                item = await self._speak(response_id, text, fail_after)
                if item is None:
                    return
                output.append(item)
        except asyncio.CancelledError:
            status = "cancelled"
        await self.send({"type": "response.done", "response": {**base, "status": status, "output": output,
                                                                "status_details": None}})
        await self.send({"type": "rate_limits.updated", "rate_limits": [
            {"name": "requests", "limit": 1000, "remaining": 999, "reset_seconds": 0.06},
            {"name": "tokens", "limit": 50000, "remaining": 49000, "reset_seconds": 1.2}]})

    async def _speak(self, response_id: str, text: str, fail_after: float | None) -> dict[str, Any] | None:
        item_id = f"item_{next(_ids)}"
        item = {"id": item_id, "type": "message", "role": "assistant", "status": "in_progress", "content": []}
        where = {"response_id": response_id, "item_id": item_id, "output_index": 0, "content_index": 0}
        await self.send({"type": "response.output_item.added", "response_id": response_id, "output_index": 0,
                         "item": item})
        await self.send({"type": "conversation.item.added", "previous_item_id": None, "item": item})
        self.sent_ms[item_id] = 0.0
        if self.state.first_audio_ms:
            await asyncio.sleep(self.state.first_audio_ms / 1000.0)
        total_ms = max(_CHUNK_MS, len(text) * self.state.ms_per_char)
        words = text.split()
        chunks = max(1, math.ceil(total_ms / _CHUNK_MS))
        said = 0
        for n in range(chunks):
            if fail_after is not None and self.sent_ms[item_id] >= fail_after:
                await self.send({"type": "error", "error": {"type": "server_error", "code": "server_error",
                                                            "message": "The server had an error while processing "
                                                                       "your request.", "param": None,
                                                            "event_id": None}})
                return None
            upto = round(len(words) * (n + 1) / chunks)
            if upto > said:
                await self.send({"type": "response.output_audio_transcript.delta", **where,
                                 "delta": (" " if said else "") + " ".join(words[said:upto])})
                said = upto
            ms = min(_CHUNK_MS, total_ms - n * _CHUNK_MS)
            await self.send({"type": "response.output_audio.delta", **where,
                             "delta": base64.b64encode(self._tone(ms, n)).decode()})
            self.sent_ms[item_id] += ms
            await asyncio.sleep(_SEND_EVERY_S)
        await self.send({"type": "response.output_audio.done", **where})
        await self.send({"type": "response.output_audio_transcript.done", **where, "transcript": text})
        done = {**item, "status": "completed", "content": [{"type": "output_audio", "transcript": text}]}
        await self.send({"type": "response.output_item.done", "response_id": response_id, "output_index": 0,
                         "item": done})
        return done

    def _tone(self, ms: float, n: int) -> bytes:
        assert self.format is not None
        rate = 8000 if self.format["type"] == "audio/pcmu" else 24000
        t = (np.arange(int(rate * ms / 1000)) + n * rate * _CHUNK_MS / 1000) / rate
        pcm = (np.sin(2 * np.pi * 440 * t) * 8000).astype("<i2").tobytes()
        return ulaw_encode(pcm) if self.format["type"] == "audio/pcmu" else pcm

    async def _function_call(self, response_id: str, reply: Mapping[str, Any]) -> dict[str, Any]:
        call_id, item_id = f"call_{next(_ids)}", f"item_{next(_ids)}"
        arguments = json.dumps(reply.get("arguments", {}))
        item = {"id": item_id, "type": "function_call", "status": "in_progress", "name": reply["tool"],
                "call_id": call_id, "arguments": ""}
        await self.send({"type": "response.output_item.added", "response_id": response_id, "output_index": 0,
                         "item": item})
        await self.send({"type": "response.function_call_arguments.delta", "response_id": response_id,
                         "item_id": item_id, "output_index": 0, "call_id": call_id, "delta": arguments})
        await self.send({"type": "response.function_call_arguments.done", "response_id": response_id,
                         "item_id": item_id, "output_index": 0, "call_id": call_id, "name": reply["tool"],
                         "arguments": arguments})
        self.calls.add(call_id)
        done = {**item, "status": "completed", "arguments": arguments}
        await self.send({"type": "response.output_item.done", "response_id": response_id, "output_index": 0,
                         "item": done})
        return done


class FakeRealtime(LocalServer):
    """The Realtime API's WebSocket at ``/v1/realtime`` (``api_key`` is the Bearer token it accepts)."""

    def __init__(self, *, replies: Sequence[Any] = (), transcripts: Sequence[str] = (),
                 audio_format: str = "audio/pcmu", ms_per_char: float = 40.0, api_key: str = "sk-test",
                 silence_ms: float = 500.0, first_audio_ms: float = 0.0, default_reply: str = "Okay.") -> None:
        self.state = RealtimeState(list(replies), list(transcripts), audio_format, ms_per_char, silence_ms=silence_ms,
                                   first_audio_ms=first_audio_ms, default_reply=default_reply)
        self.api_key = api_key
        super().__init__("fake OpenAI Realtime", Starlette(routes=[WebSocketRoute("/v1/realtime", self._socket)]))

    async def _socket(self, ws: WebSocket) -> None:
        state = self.state
        state.headers.append(dict(ws.headers))
        state.queries.append(dict(ws.query_params))
        if ws.headers.get("authorization") != f"Bearer {self.api_key}":
            await ws.close(code=1008)          # the real API refuses the handshake; either way no session
            state.problems.append("missing or wrong Authorization header")
            return
        if "openai-beta" in ws.headers:
            state.problems.append("OpenAI-Beta header sent: the GA protocol has none")
        if not ws.query_params.get("model"):
            state.problems.append("no model in the query")
        await ws.accept()
        state.connections += 1
        session = _Session(ws, state)
        await session.send({"type": "session.created", "session": {
            "type": "realtime", "object": "realtime.session", "id": f"sess_{next(_ids)}",
            "model": ws.query_params.get("model"), "output_modalities": ["audio"]}})
        try:
            while True:
                text = await ws.receive_text()
                async with session.lock:
                    await session.handle(text)
        except (WebSocketDisconnect, RuntimeError):
            pass
        finally:
            if session.response is not None:
                session.response.cancel()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Fake OpenAI Realtime API server")
    p.add_argument("--api-key", default="sk-test")
    p.add_argument("--audio-format", default="audio/pcmu", choices=["audio/pcmu", "audio/pcm"])
    p.add_argument("--silence-ms", type=float, default=500.0)
    p.add_argument("--first-audio-ms", type=float, default=0.0)
    p.add_argument("--ms-per-char", type=float, default=40.0)
    p.add_argument("--reply", default="Okay.", help="every response says this")
    a = p.parse_args(argv)
    fake = FakeRealtime(api_key=a.api_key, audio_format=a.audio_format, silence_ms=a.silence_ms,
                        first_audio_ms=a.first_audio_ms, ms_per_char=a.ms_per_char, default_reply=a.reply)

    async def run() -> None:
        async with fake:
            print(f"READY {fake.base_url}", flush=True)
            try:
                await asyncio.Event().wait()      # until SIGINT
            finally:
                print(f"problems: {fake.state.problems}", flush=True)

    with contextlib.suppress(KeyboardInterrupt), asyncio.Runner() as runner:
        runner.run(run())


if __name__ == "__main__":
    main()
