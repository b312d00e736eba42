"""Fake Deepgram streaming speech to text: the ``/v1/listen`` WebSocket, as ``FakeDeepgram`` serves it.

What it checks, as the real API does: ``Authorization: Token <key>`` at the handshake (else an HTTP 401
with a ``dg-error`` header and the JSON error body), only documented query parameters, an ``encoding``
the fake decodes (``linear16``, ``mulaw``) with its ``sample_rate``, ``channels=1``, booleans spelt
``true``/``false``, ``endpointing`` a number of ms or ``false``, ``utterance_end_ms`` at least 1000 and
only with ``interim_results=true``. Audio must come as binary frames; text frames must be one of the
control messages (``KeepAlive``, ``Finalize``, ``CloseStream``), anything else closes the socket with
1008 as a protocol error.

What it answers is derived from the audio it received, in audio time (no clocks): a frame whose RMS is
above 0.01 is speech. Every ``interim_ms`` of speech sends an interim ``Results`` with one more word of
the segment's transcript; ``endpointing`` ms of silence after speech sends the segment's final with
``speech_final: true``; ``utterance_end_ms`` of silence after the last word sends ``UtteranceEnd``;
``Finalize`` sends the final of any audio not yet finalised (``from_finalize: true``); ``CloseStream``
does the same, sends ``Metadata`` and closes with 1000. A segment's transcript is the next of the
fake's transcripts (shared by all connections, cycled). ``result_delay_ms`` delays every message (the
vendor's processing time).

Failure modes (``fake.state.fail``): a status (``"401"``, ``"429"`` with ``retry-after``, ``"500"``) refuses
the handshake; ``"cut"`` closes the socket with 1011 after the first interim result; ``"hang"`` accepts
and never answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from starlette.responses import JSONResponse
from starlette.websockets import WebSocket, WebSocketDisconnect

from pipeline.audio import rms, ulaw_decode

__all__ = ["ListenState", "listen"]

PARAMS = {"callback", "callback_method", "channels", "detect_entities", "diarize", "dictation", "encoding",
          "endpointing", "extra", "interim_results", "keyterm", "keywords", "language", "mip_opt_out", "model",
          "multichannel", "numerals", "profanity_filter", "punctuate", "redact", "replace", "sample_rate", "search",
          "smart_format", "tag", "utterance_end_ms", "vad_events", "version"}
BOOLEANS = {"interim_results", "smart_format", "punctuate", "diarize", "multichannel", "numerals", "vad_events",
            "profanity_filter", "dictation", "detect_entities", "mip_opt_out"}
CONTROLS = {"KeepAlive", "Finalize", "CloseStream"}
SPEECH_RMS = 0.01


@dataclass
class ListenState:
    """The fake's script and what reached it: one dict per connection in ``connections``
    (``query``, ``headers``, ``frames``, ``bytes``, ``audio_ms``, ``controls``: the control messages' types)."""

    transcripts: Iterator[str] = field(default_factory=lambda: itertools.cycle(["hello"]))
    interim_ms: float = 300
    result_delay_ms: float = 0
    connections: list[dict[str, Any]] = field(default_factory=list)

    def set_transcripts(self, transcripts: Sequence[str]) -> None:
        self.transcripts = itertools.cycle(list(transcripts))


def _refusal(status: int, message: str, retry_after: str | None = None) -> JSONResponse:
    headers = {"dg-error": message, "dg-request-id": str(uuid.uuid4())}
    if retry_after:
        headers["retry-after"] = retry_after
    code = {401: "INVALID_AUTH", 429: "TOO_MANY_REQUESTS", 400: "Bad Request"}.get(status, "INTERNAL_SERVER_ERROR")
    return JSONResponse({"err_code": code, "err_msg": message, "request_id": headers["dg-request-id"]},
                        status_code=status, headers=headers)


def check_query(query: dict[str, str]) -> str | None:
    """What is wrong with the handshake's query parameters, or None."""
    if unknown := sorted(set(query) - PARAMS):
        return f"Unknown query parameter(s): {', '.join(unknown)}"
    if bad := sorted(k for k in BOOLEANS & set(query) if query[k] not in ("true", "false")):
        return f"Not a boolean: {', '.join(bad)}"
    if query.get("encoding") not in ("linear16", "mulaw"):
        return "the fake decodes encoding=linear16 or encoding=mulaw only"
    if not query.get("sample_rate", "").isdigit():
        return "sample_rate is required with encoding"
    if query.get("channels", "1") != "1":
        return "the fake takes channels=1 only"
    if not query.get("model"):
        return "model is required"
    endpointing = query.get("endpointing", "10")
    if not (endpointing.isdigit() or endpointing == "false"):
        return f"endpointing must be a number of milliseconds or false (got {endpointing})"
    if "utterance_end_ms" in query:
        if query.get("interim_results") != "true":
            return "utterance_end_ms requires interim_results=true"
        if not query["utterance_end_ms"].isdigit() or int(query["utterance_end_ms"]) < 1000:
            return "utterance_end_ms must be at least 1000"
    return None


class _Session:
    """One connection's audio clock and segment, and the messages it has to send."""

    def __init__(self, state: ListenState, query: dict[str, str], record: dict[str, Any]) -> None:
        self.state = state
        self.record = record
        self.rate = int(query["sample_rate"])
        self.mulaw = query["encoding"] == "mulaw"
        self.interim = query.get("interim_results") == "true"
        endpointing = query.get("endpointing", "10")
        self.endpointing_s = int(endpointing) / 1000 if endpointing.isdigit() else None
        self.utterance_end_s = int(query["utterance_end_ms"]) / 1000 if "utterance_end_ms" in query else None
        self.request_id = str(uuid.uuid4())
        self.t = 0.0                  # audio received, in seconds
        self.final_until = 0.0        # audio covered by finals so far
        self.words: list[str] | None = None   # the current segment's transcript, once it has speech
        self.speech_s = 0.0
        self.silence_s = 0.0
        self.interims = 0
        self.last_word_end: float | None = None   # for UtteranceEnd, once a final had words

    def audio(self, data: bytes) -> list[dict[str, Any]]:
        pcm = ulaw_decode(data) if self.mulaw else data
        seconds = len(pcm) / 2 / self.rate
        self.t += seconds
        self.record["frames"] += 1
        self.record["bytes"] += len(data)
        self.record["audio_ms"] = round(self.t * 1000)
        out: list[dict[str, Any]] = []
        if rms(pcm) >= SPEECH_RMS:
            if self.words is None:
                self.words = next(self.state.transcripts).split()
            self.speech_s += seconds
            self.silence_s = 0.0
            due = int(self.speech_s * 1000 // self.state.interim_ms)
            if self.interim and due > self.interims:
                self.interims = due
                shown = self.words[:min(due, max(1, len(self.words) - 1))]
                out.append(self._results(" ".join(shown), final=False))
            return out
        self.silence_s += seconds
        if self.words is not None and self.endpointing_s is not None and self.silence_s >= self.endpointing_s:
            out.append(self._final(speech_final=True))
        if (self.last_word_end is not None and self.utterance_end_s is not None
                and self.t - self.last_word_end >= self.utterance_end_s and self.words is None):
            out.append({"type": "UtteranceEnd", "channel": [0, 1], "last_word_end": round(self.last_word_end, 3)})
            self.last_word_end = None
        return out

    def flush(self, *, from_finalize: bool) -> list[dict[str, Any]]:
        if self.t <= self.final_until:
            return []
        message = self._final(speech_final=False)
        if from_finalize:
            message["from_finalize"] = True
        return [message]

    def metadata(self) -> dict[str, Any]:
        return {"type": "Metadata", "transaction_key": "deprecated", "request_id": self.request_id,
                "sha256": "0" * 64, "created": "2026-01-01T00:00:00.000Z", "duration": round(self.t, 3), "channels": 1}

    def _final(self, *, speech_final: bool) -> dict[str, Any]:
        text = " ".join(self.words or [])
        message = self._results(text, final=True, speech_final=speech_final)
        if text:
            self.last_word_end = self.t - self.silence_s
        self.final_until = self.t
        self.words, self.speech_s, self.interims = None, 0.0, 0
        return message

    def _results(self, text: str, *, final: bool, speech_final: bool = False) -> dict[str, Any]:
        start = self.final_until
        return {"type": "Results", "channel_index": [0, 1], "duration": round(self.t - start, 3),
                "start": round(start, 3), "is_final": final, "speech_final": speech_final,
                "channel": {"alternatives": [{"transcript": text, "confidence": 0.98 if text else 0.0,
                                              "words": [{"word": w.lower().strip(".,?!"), "punctuated_word": w,
                                                         "start": start, "end": self.t, "confidence": 0.98}
                                                        for w in text.split()]}]},
                "metadata": {"request_id": self.request_id, "model_info": {"name": "fake", "version": "0",
                                                                           "arch": "fake"},
                             "model_uuid": str(uuid.uuid4())},
                "from_finalize": False}


async def listen(websocket: WebSocket, state: ListenState, *, api_key: str | None, fail: str | None,
                 retry_after: str, release: asyncio.Event) -> None:
    """Serve one ``/v1/listen`` connection."""
    query = dict(websocket.query_params)
    record: dict[str, Any] = {"query": query, "headers": dict(websocket.headers), "frames": 0, "bytes": 0,
                              "audio_ms": 0, "controls": [], "closed_by": None}
    state.connections.append(record)
    if api_key is not None and websocket.headers.get("authorization") != f"Token {api_key}":
        await websocket.send_denial_response(_refusal(401, "Invalid credentials."))
        return
    if fail and fail.isdigit():
        await websocket.send_denial_response(_refusal(int(fail), "fake failure", retry_after if fail == "429" else None))
        return
    if problem := check_query(query):
        await websocket.send_denial_response(_refusal(400, problem))
        return
    await websocket.accept()
    session = _Session(state, query, record)
    outbox: asyncio.Queue[tuple[float, dict[str, Any] | None]] = asyncio.Queue()
    loop = asyncio.get_running_loop()

    async def post() -> None:
        while True:
            due, message = await outbox.get()
            if fail == "hang":
                continue
            await asyncio.sleep(max(0.0, due - loop.time()))
            if message is None:
                await websocket.close(1000)
                return
            await websocket.send_text(json.dumps(message))
            if fail == "cut" and message.get("type") == "Results":
                await websocket.close(1011, "NET-0000: the fake dropped the stream")
                record["closed_by"] = "cut"
                return

    poster = asyncio.create_task(post())
    try:
        while not poster.done():
            receive = asyncio.ensure_future(websocket.receive())
            await asyncio.wait({receive, poster}, return_when=asyncio.FIRST_COMPLETED)
            if not receive.done():
                receive.cancel()
                break
            frame = receive.result()
            if frame["type"] == "websocket.disconnect":
                break
            due = loop.time() + state.result_delay_ms / 1000
            if frame.get("bytes") is not None:
                for message in session.audio(frame["bytes"]):
                    outbox.put_nowait((due, message))
                continue
            try:
                kind = json.loads(frame.get("text") or "").get("type")
            except (ValueError, AttributeError):
                kind = None
            if kind not in CONTROLS:
                record["closed_by"] = f"bad control message: {frame.get('text')!r}"
                await websocket.close(1008, "DATA-0000: unknown control message")
                break
            record["controls"].append(kind)
            if kind == "Finalize":
                for message in session.flush(from_finalize=True):
                    outbox.put_nowait((due, message))
            elif kind == "CloseStream":
                for last in [*session.flush(from_finalize=False), session.metadata(), None]:
                    outbox.put_nowait((due, last))
        if fail == "hang":
            await release.wait()
    except (WebSocketDisconnect, RuntimeError):
        pass
    finally:
        poster.cancel()
        with contextlib.suppress(BaseException):
            await poster
