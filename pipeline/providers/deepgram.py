"""Deepgram: streaming speech to text (``/v1/listen`` over a WebSocket) and Aura text to speech, over aiohttp
(no SDK).

**Speech to text.** ``GET {base}/v1/listen?model=nova-3&encoding=mulaw&sample_rate=8000&channels=1&
interim_results=true&endpointing=300&utterance_end_ms=1000&smart_format=true&language=en`` upgraded to a
WebSocket with ``Authorization: Token <key>`` (aiohttp upgrades the ``https`` URL: ``wss``). Audio goes up as
binary frames: µ-law at 8 kHz on a phone leg (G.711 round-trips exactly, so nothing is lost or
resampled), else linear16 at the rate given; JSON text frames control the stream: ``{"type": "KeepAlive"}``
when no audio has gone for a few seconds (Deepgram closes an idle stream after 10 s), ``{"type":
"Finalize"}`` to flush, ``{"type": "CloseStream"}`` to end. Down come ``Results`` (``channel.alternatives
[0].transcript``, ``is_final``, ``speech_final``, ``start``, ``duration``, ``from_finalize``),
``UtteranceEnd``, ``SpeechStarted`` and, at the end, ``Metadata``; each becomes a
:class:`~pipeline.providers.base.Transcript`. A refused handshake is an HTTP status (the reason in the
``dg-error`` header): 401/403 name ``DEEPGRAM_API_KEY``, 429 and 5xx are transient; a socket that closes
before the stream was finished is transient. The one-shot ``transcribe`` sends a finished utterance
through the same socket.

**Text to speech.** ``POST {base}/v1/speak?model=aura-asteria-en&encoding=linear16&sample_rate=16000&
container=none`` with the same header and the JSON body ``{"text": ...}``: the answer is headerless 16-bit
little-endian mono PCM (``container=none``), streamed as it is generated. In Aura the model *is* the
voice, so a voice (the persona's ``voice``, else ``tts_voice``: ``aura-2-thalia-en`` ...) is sent as
``model`` and ``tts_model`` (default ``aura-asteria-en``) applies when there is none. 16 kHz for the
reason given in ``pipeline.providers.elevenlabs`` (halved for a phone leg, passed through for a 16 kHz
leg). REST errors come as ``{"err_code": "INVALID_AUTH", "err_msg": "Invalid credentials.", ...}``
(newer endpoints: ``{"category", "message", "details"}``).

Usage::

    stt = DeepgramSTT(ProviderSettings("deepgram", "nova-3", key, "https://api.deepgram.com"), http, timeout_s=5)
    stream = await stt.open_stream(sample_rate=8000, language="en")
    await stream.send(pcm8k); await stream.flush()
    async for result in stream.results(): ...          # Transcript(text, final, end_of_utterance, end_s)
    text = await stt.transcribe(pcm16k, sample_rate=16000)   # a finished utterance, same socket
    tts = DeepgramTTS(ProviderSettings("deepgram", "aura-asteria-en", key, "https://api.deepgram.com"), http,
                      timeout_s=5)
    async for pcm16k in tts.synthesize("Hello!", voice="aura-2-thalia-en"):   # tts.sample_rate == 16000
        ...
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from typing import Any

import aiohttp

from pipeline.audio import ulaw_encode
from pipeline.providers._http import HTTPClient, provider_errors, status_error
from pipeline.providers.base import (
    BuildOptions,
    Probe,
    ProviderError,
    ProviderOption,
    ProviderSettings,
    ProviderSpec,
    Transcript,
)

__all__ = ["SPECS", "DeepgramSTT", "DeepgramStream", "DeepgramTTS", "transcript_of"]

logger = logging.getLogger(__name__)

SAMPLE_RATE = 16000


def error_message(payload: Any) -> str:
    """``err_msg`` (``err_code``) of a Deepgram error, or the newer ``message`` (``category``)."""
    text = payload["err_msg"] if "err_msg" in payload else payload["message"]
    code = payload.get("err_code") or payload.get("category")
    return f"{text} ({code})" if code else str(text)


class DeepgramTTS(HTTPClient):
    """``POST /v1/speak`` as ``linear16`` at 16 kHz without a container: PCM16 chunks as they arrive."""

    sample_rate = SAMPLE_RATE

    @staticmethod
    def auth_headers(api_key: str) -> dict[str, str]:
        return {"Authorization": f"Token {api_key}"}

    def synthesize(self, text: str, *, voice: str | None = None,
                   language: str | None = None) -> AsyncIterator[bytes]:
        params = {"model": voice or self.settings.voice or self.settings.model, "encoding": "linear16",
                  "sample_rate": str(SAMPLE_RATE), "container": "none"}
        return self.post_pcm(f"{self._url}/v1/speak", {"text": text}, params=params, message_of=error_message)


class DeepgramSTT(HTTPClient):
    """Streaming recognition over ``/v1/listen``; ``transcribe`` is the one-shot form over the same socket.

    ``endpointing_ms`` (silence after which Deepgram marks ``speech_final``) and ``utterance_end_ms``
    (a gap between words that sends ``UtteranceEnd``; at least 1000) are Deepgram's query parameters;
    ``keepalive_secs`` how long the stream may go without audio before a ``KeepAlive`` (under Deepgram's
    10 s idle cut-off)."""

    def __init__(self, settings: ProviderSettings, http: aiohttp.ClientSession, *, timeout_s: float,
                 endpointing_ms: int = 300, utterance_end_ms: int = 1000, smart_format: bool = True,
                 keepalive_secs: float = 4.0) -> None:
        super().__init__(settings, http, timeout_s=timeout_s)
        self._timeout_s = timeout_s
        self._options = {"interim_results": "true", "endpointing": str(endpointing_ms),
                         "utterance_end_ms": str(utterance_end_ms), "smart_format": str(smart_format).lower()}
        self._keepalive_secs = keepalive_secs

    @staticmethod
    def auth_headers(api_key: str) -> dict[str, str]:
        return {"Authorization": f"Token {api_key}"}

    async def open_stream(self, *, sample_rate: int, language: str | None = None) -> DeepgramStream:
        """Connect; PCM16 at ``sample_rate`` goes up as µ-law when that is 8000, else as linear16."""
        mulaw = sample_rate == 8000
        params = {"model": self.settings.model, "encoding": "mulaw" if mulaw else "linear16",
                  "sample_rate": str(sample_rate), "channels": "1", **self._options}
        if language:
            params["language"] = language
        try:
            with provider_errors(self.name):
                async with asyncio.timeout(self._timeout_s):
                    ws = await self._http.ws_connect(
                        f"{self._url}/v1/listen", params=params, headers=self._headers, autoping=True,
                        timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=min(self._timeout_s, 2.0)))
        except ProviderError as exc:
            cause = exc.__cause__
            if isinstance(cause, aiohttp.WSServerHandshakeError):
                headers: Mapping[str, str] = cause.headers or {}
                raise status_error(self.settings, cause.status, headers.get("dg-error") or cause.message,
                                   headers) from cause
            raise
        return DeepgramStream(self.name, ws, encode=ulaw_encode if mulaw else _as_is,
                              timeout_s=self._timeout_s, keepalive_secs=self._keepalive_secs)

    async def transcribe(self, pcm: bytes, *, sample_rate: int, language: str | None = None) -> str:
        """The finals of a finished utterance, sent at once in 100 ms frames, then ``CloseStream``."""
        stream = await self.open_stream(sample_rate=sample_rate, language=language)
        try:
            step = sample_rate // 10 * 2
            for offset in range(0, len(pcm), step):
                await stream.send(pcm[offset:offset + step])
            await stream.finish()
            return " ".join([r.text async for r in stream.results() if r.final and r.text])
        finally:
            await stream.close()


class DeepgramStream:
    """One ``/v1/listen`` socket (see :class:`~pipeline.providers.base.STTStream`)."""

    def __init__(self, name: str, ws: aiohttp.ClientWebSocketResponse, *, encode: Callable[[bytes], bytes],
                 timeout_s: float, keepalive_secs: float) -> None:
        self._name = name
        self._ws = ws
        self._encode = encode
        self._timeout_s = timeout_s
        self._keepalive_secs = keepalive_secs
        self._finished = False
        self._last_sent = asyncio.get_running_loop().time()

    async def send(self, pcm: bytes) -> None:
        if pcm:
            with self._errors():
                await self._ws.send_bytes(self._encode(pcm))
            self._last_sent = asyncio.get_running_loop().time()

    async def flush(self) -> None:
        await self._control("Finalize")

    async def finish(self) -> None:
        self._finished = True
        await self._control("CloseStream")

    async def results(self) -> AsyncIterator[Transcript]:
        loop = asyncio.get_running_loop()
        while True:
            wait = self._timeout_s if self._finished else self._keepalive_secs
            try:
                with self._errors():
                    message = await self._ws.receive(timeout=wait)
            except ProviderError as exc:
                if self._finished or not isinstance(exc.__cause__, TimeoutError):
                    raise                 # the last results are late, or the socket broke
                if loop.time() - self._last_sent >= self._keepalive_secs:
                    await self._control("KeepAlive")
                continue
            if message.type is aiohttp.WSMsgType.TEXT:
                result = transcript_of(self._name, message.data)
                if result is not None:
                    yield result
            elif message.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.CLOSED,
                                  aiohttp.WSMsgType.ERROR):
                code = self._ws.close_code
                if self._finished and code == aiohttp.WSCloseCode.OK:
                    return
                reason = message.extra if message.type is aiohttp.WSMsgType.CLOSE and message.extra else ""
                raise ProviderError(self._name, f"the stream closed mid-way (code {code}{': ' if reason else ''}"
                                                f"{reason})", transient=True)

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self._ws.close()

    async def _control(self, kind: str) -> None:
        with self._errors():
            await self._ws.send_str(json.dumps({"type": kind}))
        self._last_sent = asyncio.get_running_loop().time()

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        with provider_errors(self._name):
            try:
                yield
            except (ConnectionError, RuntimeError) as exc:   # writing to a socket that has closed
                raise ProviderError(self._name, f"the stream closed mid-way ({type(exc).__name__})",
                                    transient=True) from exc


def _as_is(pcm: bytes) -> bytes:
    return pcm


def transcript_of(name: str, data: str) -> Transcript | None:
    """The Transcript in one ``/v1/listen`` message (None for ``Metadata``, ``SpeechStarted`` ...); an
    ``Error`` message or a message that is not JSON is a broken stream (transient).

    >>> transcript_of("deepgram", '{"type": "UtteranceEnd", "channel": [0, 1], "last_word_end": 2.4}')
    Transcript(text='', final=True, end_of_utterance=True, end_s=2.4)
    """
    try:
        message = json.loads(data)
        kind = message.get("type")
        if kind == "Results":
            alternatives = message["channel"]["alternatives"]
            return Transcript((alternatives[0]["transcript"] if alternatives else "").strip(),
                              final=bool(message.get("is_final")), end_of_utterance=bool(message.get("speech_final")),
                              end_s=float(message.get("start", 0.0)) + float(message.get("duration", 0.0)))
        if kind == "UtteranceEnd":
            return Transcript("", final=True, end_of_utterance=True, end_s=float(message.get("last_word_end", 0.0)))
        if kind == "Error":
            raise ProviderError(name, f"stream error: {message.get('description') or message.get('message')}",
                                transient=True)
        return None
    except (ValueError, KeyError, TypeError, AttributeError, IndexError) as exc:
        raise ProviderError(name, "a stream message is not a Deepgram result", transient=True) from exc


def build_stt(settings: ProviderSettings, http: aiohttp.ClientSession, options: BuildOptions) -> DeepgramSTT:
    """The registry's STT builder for Deepgram's streaming recognition."""
    return DeepgramSTT(settings, http, timeout_s=options.timeout_s,
                       endpointing_ms=settings.option("endpointing_ms", 300),
                       utterance_end_ms=settings.option("utterance_end_ms", 1000),
                       smart_format=settings.option("smart_format", True),
                       keepalive_secs=settings.option("keepalive_secs", 4.0))


def build_tts(settings: ProviderSettings, http: aiohttp.ClientSession, options: BuildOptions) -> DeepgramTTS:
    """The registry's TTS builder for Deepgram Aura."""
    return DeepgramTTS(settings, http, timeout_s=options.timeout_s)


SPECS = (
    ProviderSpec("deepgram", key_env="DEEPGRAM_API_KEY", base_url_env="DEEPGRAM_BASE_URL",
                 default_base_url="https://api.deepgram.com",
                 default_models={"stt": "nova-3", "tts": "aura-asteria-en"}, api_root="",
                 options="STT streams over a WebSocket (interim results, µ-law on 8 kHz legs), see "
                         "`stt_stream_final_wait_ms`; `endpointing_ms`, `utterance_end_ms`, `smart_format`, "
                         "`keepalive_secs`; TTS: Aura, the voice is the "
                         "model: `tts_voice` / a persona's `voice` (`aura-2-thalia-en` ...) is sent as `model`, "
                         "else `tts_model`; audio is 16 kHz PCM",
                 provider_options=(
                     ProviderOption("endpointing_ms", int, 300, "STT: silence (ms) after which Deepgram marks "
                                    "`speech_final` (`endpointing`)"),
                     ProviderOption("utterance_end_ms", int, 1000, "STT: a gap between words (ms, at least 1000) "
                                    "that sends `UtteranceEnd`"),
                     ProviderOption("smart_format", bool, True, "STT: punctuation and number formatting"),
                     ProviderOption("keepalive_secs", float, 4.0, "STT: a `KeepAlive` after this long without "
                                    "audio (Deepgram closes an idle stream after 10 s)"),
                 ),
                 probe=Probe("/v1/projects"), stt=build_stt, tts=build_tts),
)
