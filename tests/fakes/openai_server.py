"""Fake OpenAI HTTP API (STT / chat / TTS) speaking the real wire protocol.

Only the base URL differs from api.openai.com, so the gateway's real httpx clients run unchanged.

In-process (tests)::

    async with FakeOpenAI(transcripts=["hello there"], replies=["Hi! How can I help you today?"],
                          stt_delay_ms=0, llm_delay_ms=0, tts_delay_ms=0, api_key="sk-test") as fake:
        fake.base_url                   # "http://127.0.0.1:<port>/v1"
        fake.state.fail["llm"] = "500"  # "500" | "hang" | "401" | any HTTP status (429: with retry-after) | None
        fake.state.fail["llm"] = "cut"  # LLM only: half the deltas, then the connection drops ("truncate": no [DONE])
        fake.state.fail_once["stt"] = "hang"
        fake.state.calls["tts"], fake.state.stt_requests[0]["rms"]

A delay (``stt_delay_ms`` ...) is the time from the handler taking a request to its answer (the first
token, the first audio): the fake's own parsing and synthesis happen inside it, not after it.

Subprocess (benchmarks); prints ``READY http://127.0.0.1:<port>/v1`` once listening::

    python -m tests.fakes.openai_server --port 0 --stt-delay-ms 100 --llm-delay-ms 150 \\
        --tts-delay-ms 80 --transcript "..." --reply "..."
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import gc
import itertools
import json
import re
import socket
import struct
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import uvicorn
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

__all__ = ["FakeOpenAI", "FakeState", "TTS_SAMPLE_RATE", "speech_pcm"]

TTS_SAMPLE_RATE = 24000
TTS_MODELS = ("tts-1", "tts-1-hd", "gpt-4o-mini-tts")
MODELS = ("gpt-4o-mini", "gpt-4o", "whisper-1", "gpt-4o-transcribe", "whisper-large-v3", "llama-3.1-8b-instant",
          "llama3.2")                           # what GET /v1/models lists (OpenAI's and the compatible vendors')
TTS_VOICES = ("alloy", "ash", "ballad", "coral", "echo", "fable", "nova", "onyx", "sage", "shimmer", "verse")
STAGES = ("stt", "llm", "tts")
Transcripts = Sequence[str] | Callable[[dict[str, Any]], str]  # callable gets the STT record
Replies = Sequence[Any] | Callable[[list[dict[str, Any]]], Any]  # str, or {"content", "tool_calls"}; callable gets the messages


@functools.lru_cache(maxsize=8)
def _tone(rate: int, seconds: int = 60) -> np.ndarray:
    # 220 Hz at 24 kHz (or 16 kHz: 800 samples) repeats exactly every 1200 samples, so the buffer tiles seamlessly.
    t = np.arange(seconds * rate, dtype=np.float64) / rate
    return (0.3 * 32767 * np.sin(2 * np.pi * 220.0 * t)).astype("<i2")


@functools.lru_cache(maxsize=512)
def speech_pcm(n_samples: int, rate: int = TTS_SAMPLE_RATE) -> bytes:
    """PCM16 LE mono 220 Hz tone (0.3 FS) at ``rate`` (24 kHz unless told) with 10 ms fades; cached per length."""
    tone = _tone(rate)
    out = tone[:n_samples].copy() if n_samples <= len(tone) else np.resize(tone, n_samples)
    ramp = np.linspace(0.0, 1.0, min(rate // 100, n_samples // 2))
    if len(ramp):
        out[: len(ramp)] = (out[: len(ramp)] * ramp).astype("<i2")
        out[-len(ramp) :] = (out[-len(ramp) :] * ramp[::-1]).astype("<i2")
    return out.tobytes()


def wav_header(n_bytes: int, rate: int = TTS_SAMPLE_RATE) -> bytes:
    return (b"RIFF" + struct.pack("<I", 36 + n_bytes) + b"WAVEfmt "
            + struct.pack("<IHHIIHH", 16, 1, 1, rate, rate * 2, 2, 16)
            + b"data" + struct.pack("<I", n_bytes))


def parse_wav(data: bytes) -> tuple[int, np.ndarray]:
    """Return (sample_rate, int16 samples) of a RIFF PCM16 mono WAV; ValueError otherwise."""
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise ValueError("not a RIFF/WAVE file")
    pos, fmt, pcm = 12, None, None
    while pos + 8 <= len(data):
        cid, size = data[pos : pos + 4], struct.unpack("<I", data[pos + 4 : pos + 8])[0]
        body = data[pos + 8 : pos + 8 + size]
        if cid == b"fmt " and len(body) >= 16:
            fmt = struct.unpack("<HHIIHH", body[:16])
        elif cid == b"data":
            pcm = body
            break
        pos += 8 + size + (size & 1)
    if fmt is None or pcm is None:
        raise ValueError("WAV is missing its fmt or data chunk")
    audio_format, channels, rate, _, _, bits = fmt
    if audio_format not in (1, 0xFFFE) or channels != 1 or bits != 16 or rate <= 0:
        raise ValueError(f"expected PCM16 mono, got format={audio_format} channels={channels} bits={bits}")
    return rate, np.frombuffer(pcm[: len(pcm) // 2 * 2], dtype="<i2")


def parse_multipart(body: bytes, content_type: str) -> dict[str, bytes]:
    """Minimal multipart/form-data parser: field name -> raw bytes."""
    m = re.search(r'boundary="?([^";]+)"?', content_type)
    if not content_type.startswith("multipart/form-data") or not m:
        raise ValueError("expected multipart/form-data")
    fields: dict[str, bytes] = {}
    for part in body.split(b"--" + m.group(1).encode())[1:]:
        if part.startswith(b"--"):
            break
        head, sep, data = part.removeprefix(b"\r\n").partition(b"\r\n\r\n")
        name = re.search(rb'[;\s]name="([^"]*)"', head)
        if sep and name:
            fields[name.group(1).decode()] = data.removesuffix(b"\r\n")
    return fields


def _err(status: int, message: str, type_: str, code: str | None = None) -> JSONResponse:
    error: dict[str, Any] = {"message": message, "type": type_}
    if code is not None:
        error["code"] = code
    return JSONResponse({"error": error}, status_code=status)


def _bad(message: str) -> JSONResponse:
    return _err(400, message, "invalid_request_error")


def _invalid_messages(messages: list[Any]) -> str | None:
    """Why Chat Completions would refuse these messages with a 400, or None: the roles, and tool use as
    documented (an assistant's ``tool_calls``, each with an ``id`` and JSON ``function.arguments``, answered
    by one ``role: tool`` message per id, naming it in ``tool_call_id``, before any other message)."""
    pending: set[str] = set()
    for i, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        if role not in ("system", "developer", "user", "assistant", "tool"):
            return f"Invalid value: '{role}'. Supported values are: 'system', 'assistant', 'user', 'tool'."
        if role == "tool":
            if message.get("tool_call_id") not in pending or not isinstance(message.get("content"), str):
                return (f"Invalid parameter: messages[{i}]: messages with role 'tool' must be a response to a "
                        "preceeding message with 'tool_calls'.")
            pending.discard(message["tool_call_id"])
            continue
        if pending:
            return ("An assistant message with 'tool_calls' must be followed by tool messages responding to each "
                    f"'tool_call_id'. The following tool_call_ids did not have response messages: {sorted(pending)}")
        for call in message.get("tool_calls") or () if role == "assistant" else ():
            function = call.get("function") or {}
            try:
                json.loads(function.get("arguments"))
            except (TypeError, ValueError):
                return f"messages[{i}].tool_calls: function.arguments must be a JSON string"
            if not call.get("id") or call.get("type") != "function" or not function.get("name"):
                return f"messages[{i}].tool_calls: each needs an id, type 'function' and function.name"
            pending.add(call["id"])
        if role != "assistant" and "tool_calls" in message:
            return f"messages[{i}]: only assistant messages carry tool_calls"
        content = message.get("content")
        if not (isinstance(content, str) or (content is None and message.get("tool_calls"))):
            return f"messages[{i}].content: a string (null only beside tool_calls)"
    if pending:
        return f"tool_call_ids without response messages: {sorted(pending)}"
    return None


def _cycle(items: Transcripts | Replies) -> Callable[[Any], str]:
    if callable(items):
        return items
    it: Iterator[str] = itertools.cycle(list(items) or [""])
    return lambda _arg: next(it)


async def _sleep_ms(ms: float) -> None:
    if ms > 0:
        await asyncio.sleep(ms / 1000)


async def _answer_at(arrived: float, ms: float) -> None:
    """Wait until ``ms`` after ``arrived`` (``time.monotonic()`` when the handler took the request): a fixed
    delay is the provider's response time, so the fake's own work (reading the body, parsing it, making the
    audio) comes out of it instead of being added to it. Under load the benchmark's "server-added"
    latency would otherwise count this process's CPU as the gateway's."""
    remaining = arrived + ms / 1000 - time.monotonic()
    if remaining > 0:
        await asyncio.sleep(remaining)


@dataclass
class FakeState:
    """Mutable at runtime from tests: delays, failure modes, content; inspect records/counters."""

    api_key: str | None = None
    stt_delay_ms: float = 0
    llm_delay_ms: float = 0
    llm_token_interval_ms: float = 5
    tts_delay_ms: float = 0
    tts_chunk_ms: float = 40
    tts_ms_per_char: float = 60
    next_transcript: Callable[[dict[str, Any]], str] = field(default=lambda _r: "")
    next_reply: Callable[[list[dict[str, Any]]], str] = field(default=lambda _m: "")
    fail: dict[str, str | None] = field(default_factory=lambda: dict.fromkeys(STAGES))
    fail_once: dict[str, str | None] = field(default_factory=lambda: dict.fromkeys(STAGES))
    calls: dict[str, int] = field(default_factory=lambda: dict.fromkeys(STAGES, 0))
    stt_requests: list[dict[str, Any]] = field(default_factory=list)
    llm_requests: list[dict[str, Any]] = field(default_factory=list)
    tts_requests: list[dict[str, Any]] = field(default_factory=list)
    release: asyncio.Event = field(default_factory=asyncio.Event)  # set on shutdown: frees "hang"

    def set_transcripts(self, transcripts: Transcripts) -> None:
        self.next_transcript = _cycle(transcripts)

    def set_replies(self, replies: Replies) -> None:
        self.next_reply = _cycle(replies)


class _App:
    def __init__(self, state: FakeState) -> None:
        self.state = state
        self.asgi = Starlette(routes=[
            Route("/v1/audio/transcriptions", self.stt, methods=["POST"]),
            Route("/v1/chat/completions", self.llm, methods=["POST"]),
            Route("/v1/audio/speech", self.tts, methods=["POST"]),
            Route("/v1/models", self.models, methods=["GET"]),
        ])

    async def models(self, request: Request) -> Response:
        """``GET /v1/models``: the models this fake serves (the start-up probe's request)."""
        if self.state.api_key and request.headers.get("authorization") != f"Bearer {self.state.api_key}":
            return _err(401, "Incorrect API key provided.", "invalid_request_error", "invalid_api_key")
        return JSONResponse({"object": "list", "data": [{"id": m, "object": "model", "owned_by": "system"} for m in (
            *MODELS, *TTS_MODELS)]})

    async def _gate(self, stage: str, request: Request) -> Response | None:
        """Count the call, apply the failure mode and the key check; a Response means stop."""
        st = self.state
        st.calls[stage] += 1
        mode = st.fail_once.get(stage) or st.fail.get(stage)
        if st.fail_once.get(stage):
            st.fail_once[stage] = None
        if mode == "hang":
            await st.release.wait()
            return _err(503, "The server is shutting down", "server_error")
        if mode == "401" or (st.api_key and request.headers.get("authorization") != f"Bearer {st.api_key}"):
            return _err(401, "Incorrect API key provided.", "invalid_request_error", "invalid_api_key")
        if mode in ("cut", "truncate"):
            request.state.stream_fault = mode
            return None
        if mode == "429":
            response = _err(429, "Rate limit reached for requests", "requests", "rate_limit_exceeded")
            response.headers["retry-after"] = "3"
            return response
        if mode:
            status = int(mode) if str(mode).isdigit() else 500
            return _err(status, "The server had an error", "server_error")
        return None

    async def _json(self, request: Request) -> dict[str, Any] | None:
        try:
            body = json.loads(await request.body())
        except (ValueError, ClientDisconnect):
            return None
        return body if isinstance(body, dict) else None

    async def stt(self, request: Request) -> Response:
        arrived = time.monotonic()
        if (denied := await self._gate("stt", request)) is not None:
            return denied
        try:
            form = parse_multipart(await request.body(), request.headers.get("content-type", ""))
            if "file" not in form:
                return _bad("Missing required parameter: 'file'.")
            rate, samples = parse_wav(form["file"])
        except ValueError as exc:
            return _bad(f"Invalid file format: {exc}")
        except ClientDisconnect:
            return Response(status_code=499)
        x = samples.astype(np.float32) / 32768.0
        record = {
            "model": form.get("model", b"").decode(), "language": form.get("language", b"").decode() or None,
            "response_format": form.get("response_format", b"json").decode(), "sample_rate": rate,
            "duration_ms": len(samples) * 1000.0 / rate,
            "rms": float(np.sqrt(np.mean(x * x))) if len(x) else 0.0,
        }
        self.state.stt_requests.append(record)
        text = self.state.next_transcript(record)
        await _answer_at(arrived, self.state.stt_delay_ms)
        if record["response_format"] == "text":
            return Response(text, media_type="text/plain")
        return JSONResponse({"text": text})

    async def llm(self, request: Request) -> Response:
        arrived = time.monotonic()
        if (denied := await self._gate("llm", request)) is not None:
            return denied
        body = await self._json(request)
        if body is None or not isinstance(body.get("messages"), list):
            return _bad("Missing required parameter: 'messages'.")
        if (problem := _invalid_messages(body["messages"])) is not None:
            return _bad(problem)
        self.state.llm_requests.append(body)
        reply: Any = self.state.next_reply(body["messages"])
        # a reply may be {"content": "...", "tool_calls": [{"name": ..., "arguments": {...}}]}
        tool_calls = reply.get("tool_calls", []) if isinstance(reply, dict) else []
        text = reply.get("content", "") if isinstance(reply, dict) else reply
        model, created, cid = body.get("model", ""), int(time.time()), f"chatcmpl-{uuid.uuid4().hex[:24]}"
        usage = {"prompt_tokens": 10, "completion_tokens": len(re.findall(r"\S+\s*", text))}
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        await _answer_at(arrived, self.state.llm_delay_ms)
        if not body.get("stream"):
            return JSONResponse({
                "id": cid, "object": "chat.completion", "created": created, "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "finish_reason": "stop"}], "usage": usage})

        def chunk(delta: dict[str, Any] | None, finish: str | None = None, **extra: Any) -> bytes:
            choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish}]
            obj = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                   "choices": choices, **extra}
            return b"data: " + json.dumps(obj).encode() + b"\n\n"

        fault = getattr(request.state, "stream_fault", None)

        async def events() -> AsyncIterator[bytes]:
            yield chunk({"role": "assistant"})
            tokens = re.findall(r"\S+\s*", text)
            for i, token in enumerate(tokens):
                if i:
                    await _sleep_ms(self.state.llm_token_interval_ms)
                if fault == "cut" and i == max(1, len(tokens) // 2):
                    raise ConnectionResetError("fake: the connection dropped mid-stream")
                yield chunk({"content": token})
            for index, call in enumerate(tool_calls):   # streamed as OpenAI does: name first, arguments in pieces
                arguments = json.dumps(call.get("arguments", {}))
                half = len(arguments) // 2
                yield chunk({"tool_calls": [{"index": index, "id": f"call_{uuid.uuid4().hex[:16]}", "type": "function",
                                             "function": {"name": call["name"], "arguments": arguments[:half]}}]})
                yield chunk({"tool_calls": [{"index": index, "function": {"arguments": arguments[half:]}}]})
            yield chunk({}, "tool_calls" if tool_calls else "stop")
            if (body.get("stream_options") or {}).get("include_usage"):
                yield chunk(None, usage=usage)
            if fault != "truncate":
                yield b"data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream", headers={"cache-control": "no-cache"})

    async def tts(self, request: Request) -> Response:
        arrived = time.monotonic()
        if (denied := await self._gate("tts", request)) is not None:
            return denied
        body = await self._json(request)
        if body is None or not isinstance(body.get("input"), str) or not body["input"]:
            return _bad("Missing required parameter: 'input'.")
        self.state.tts_requests.append(body)
        if body.get("model") not in TTS_MODELS:
            return _bad(f"Invalid value for 'model': {body.get('model')!r}.")
        if body.get("voice") not in TTS_VOICES:
            return _bad(f"Invalid value for 'voice': {body.get('voice')!r}.")
        if not 0.25 <= float(body.get("speed", 1.0)) <= 4.0:
            return _bad("Invalid value for 'speed': must be between 0.25 and 4.0.")
        fmt = body.get("response_format", "mp3")
        if fmt not in ("pcm", "wav"):
            return _bad(f"Unsupported response_format {fmt!r} (fake supports 'pcm' and 'wav').")
        ms = max(200.0, len(body["input"]) * self.state.tts_ms_per_char)
        pcm = speech_pcm(int(ms * TTS_SAMPLE_RATE / 1000))
        step = max(2, int(self.state.tts_chunk_ms * TTS_SAMPLE_RATE / 1000) * 2)
        await _answer_at(arrived, self.state.tts_delay_ms)

        async def audio() -> AsyncIterator[bytes]:
            if fmt == "wav":
                yield wav_header(len(pcm))
            for i in range(0, len(pcm), step):
                yield pcm[i : i + step]

        media = "audio/wav" if fmt == "wav" else "audio/pcm"
        return StreamingResponse(audio(), media_type=media)


class _Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, signals: bool) -> None:
        super().__init__(config)
        self._signals = signals

    def capture_signals(self) -> contextlib.AbstractContextManager[None]:
        return super().capture_signals() if self._signals else contextlib.nullcontext()


class FakeOpenAI:
    """Async context manager running the fake on 127.0.0.1 (ephemeral port by default)."""

    def __init__(self, transcripts: Transcripts = ("hello",), replies: Replies = ("Hello!",), *,
                 api_key: str | None = None, stt_delay_ms: float = 0, llm_delay_ms: float = 0,
                 llm_token_interval_ms: float = 5, tts_delay_ms: float = 0, tts_chunk_ms: float = 40,
                 tts_ms_per_char: float = 60, host: str = "127.0.0.1", port: int = 0,
                 handle_signals: bool = False) -> None:
        self.state = FakeState(api_key=api_key, stt_delay_ms=stt_delay_ms, llm_delay_ms=llm_delay_ms,
                               llm_token_interval_ms=llm_token_interval_ms, tts_delay_ms=tts_delay_ms,
                               tts_chunk_ms=tts_chunk_ms, tts_ms_per_char=tts_ms_per_char)
        self.state.set_transcripts(transcripts)
        self.state.set_replies(replies)
        self.app = _App(self.state).asgi
        self._host, self._port, self._signals = host, port, handle_signals
        self._server: _Server | None = None
        self._task: asyncio.Task[None] | None = None
        self.base_url = ""

    async def __aenter__(self) -> FakeOpenAI:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self._host, self._port))
        config = uvicorn.Config(self.app, log_config=None, lifespan="off", access_log=False,
                                backlog=4096, timeout_graceful_shutdown=5, timeout_keep_alive=120)
        self._server = server = _Server(config, self._signals)
        self._task = asyncio.create_task(self._serve(server, sock))
        deadline = time.monotonic() + 5
        while not server.started:
            if self._task.done() or time.monotonic() > deadline:
                await self.__aexit__(None, None, None)
                raise RuntimeError("fake OpenAI server failed to start within 5 s")
            await asyncio.sleep(0.01)
        self.base_url = f"http://{self._host}:{sock.getsockname()[1]}/v1"
        return self

    async def _serve(self, server: _Server, sock: socket.socket) -> None:
        async def release_on_exit() -> None:  # also covers signal-triggered exits (CLI)
            while not server.should_exit:
                await asyncio.sleep(0.05)
            self.state.release.set()

        watcher = asyncio.create_task(release_on_exit())
        try:
            await server.serve(sockets=[sock])
        finally:
            watcher.cancel()
            self.state.release.set()
            sock.close()

    async def wait_closed(self) -> None:
        if self._task is not None:
            await asyncio.shield(self._task)

    async def __aexit__(self, *_exc: object) -> None:
        if self._server is not None:
            self._server.should_exit = True
        self.state.release.set()
        if self._task is not None:
            with contextlib.suppress(Exception):
                await self._task


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Fake OpenAI API server")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--api-key", default=None)
    for name, default in [("stt-delay-ms", 0), ("llm-delay-ms", 0), ("llm-token-interval-ms", 5),
                          ("tts-delay-ms", 0), ("tts-chunk-ms", 40), ("tts-ms-per-char", 60)]:
        p.add_argument(f"--{name}", type=float, default=default)
    p.add_argument("--transcript", action="append", help="repeatable; cycled")
    p.add_argument("--reply", action="append", help="repeatable; cycled")
    a = p.parse_args(argv)

    kw = {k: v for k, v in vars(a).items() if k not in ("transcript", "reply")}

    async def run() -> None:
        async with FakeOpenAI(a.transcript or ["hello"], a.reply or ["Hello!"], handle_signals=True, **kw) as fake:
            print(f"READY {fake.base_url}", flush=True)
            # a benchmark's fake: its start-up objects out of the collector's way, or a full collection
            # (17 ms measured under load) delays every answer in flight and counts as the gateway's latency
            gc.collect()
            gc.freeze()
            await fake.wait_closed()

    try:
        import uvloop

        factory: Callable[[], asyncio.AbstractEventLoop] | None = uvloop.new_event_loop
    except ImportError:
        factory = None
    with contextlib.suppress(KeyboardInterrupt), asyncio.Runner(loop_factory=factory) as runner:
        runner.run(run())


if __name__ == "__main__":
    main()
