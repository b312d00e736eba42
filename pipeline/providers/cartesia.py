"""Cartesia Sonic text to speech over its WebSocket (no SDK), streamed as raw PCM.

Each clause opens ``wss://api.cartesia.ai/tts/websocket`` (``CARTESIA_BASE_URL``'s scheme turned into
``ws``/``wss``) with the key in ``X-API-Key`` and the API version in ``Cartesia-Version``, and sends one
generation request::

    {"model_id": "sonic-2", "transcript": "...", "voice": {"mode": "id", "id": "<voice id>"},
     "language": "en", "context_id": "<uuid>", "continue": false,
     "output_format": {"container": "raw", "encoding": "pcm_s16le", "sample_rate": 16000}}

The server answers with JSON messages carrying that ``context_id``: ``chunk`` (base64 PCM in ``data``),
``timestamps`` (ignored), ``done``, or ``error`` (``{"error": "..."}`` in older API versions, ``title`` /
``message`` / ``error_code`` in newer ones, with ``status_code``). A refused handshake is an HTTP status
(401 a refused key, 429 with ``retry-after``, 5xx transient); a socket that closes before ``done`` is a
cut stream (transient); each wait for a message is bounded by the stage's timeout. 16 kHz for the
reason given in ``pipeline.providers.elevenlabs``; ``provider_options.cartesia.sample_rate`` changes it.

Usage::

    tts = CartesiaTTS(ProviderSettings("cartesia", "sonic-2", key, "https://api.cartesia.ai",
                                       voice="a0e99841-438c-4a64-b679-ae501e7d6091"), http, timeout_s=5)
    async for pcm16k in tts.synthesize("Hello!"): ...
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiohttp

from pipeline.providers._http import HTTPClient, log_timing, provider_errors, status_error
from pipeline.providers.base import (
    BuildOptions,
    Probe,
    ProviderError,
    ProviderOption,
    ProviderSettings,
    ProviderSpec,
)

__all__ = ["SPECS", "CartesiaTTS", "DEFAULT_VOICE"]

SAMPLE_RATE = 16000
API_VERSION = "2024-11-13"
DEFAULT_VOICE = "a0e99841-438c-4a64-b679-ae501e7d6091"   # a premade voice from Cartesia's library


def ws_url(base_url: str) -> str:
    """The TTS WebSocket for an API root: ``https://api.cartesia.ai`` -> ``wss://api.cartesia.ai/tts/websocket``."""
    root = base_url.rstrip("/")
    for plain, secure in (("http://", "ws://"), ("https://", "wss://")):
        if root.startswith(plain):
            root = secure + root.removeprefix(plain)
    return f"{root}/tts/websocket"


def _error_text(message: dict[str, Any]) -> str:
    text = message.get("error") or message.get("message") or message.get("title") or "error"
    code = message.get("error_code")
    return f"{text} ({code})" if code else str(text)


class CartesiaTTS(HTTPClient):
    """One WebSocket generation per clause: PCM16 chunks at ``sample_rate`` as they arrive."""

    def __init__(self, settings: ProviderSettings, http: aiohttp.ClientSession, *, timeout_s: float) -> None:
        super().__init__(settings, http, timeout_s=timeout_s)
        self.sample_rate: int = settings.option("sample_rate", SAMPLE_RATE)
        self._timeout_s = timeout_s
        self._headers["Cartesia-Version"] = settings.option("version", API_VERSION)

    @staticmethod
    def auth_headers(api_key: str) -> dict[str, str]:
        return {"X-API-Key": api_key}

    async def synthesize(self, text: str, *, voice: str | None = None,
                         language: str | None = None) -> AsyncIterator[bytes]:
        context_id = str(uuid.uuid4())
        request = {"model_id": self.settings.model, "transcript": text, "context_id": context_id,
                   "voice": {"mode": "id", "id": voice or self.settings.voice or DEFAULT_VOICE},
                   "language": self.settings.option("language") or (language or "en").split("-")[0],
                   "output_format": {"container": "raw", "encoding": "pcm_s16le", "sample_rate": self.sample_rate},
                   "continue": False}
        started, first = time.perf_counter(), None
        try:
            with provider_errors(self.name):
                async with asyncio.timeout(self._timeout_s):
                    ws = await self._connect()
                async with ws:
                    await ws.send_json(request)
                    while True:
                        message = await self._receive(ws)
                        if message.get("context_id", context_id) != context_id:
                            continue
                        kind = message.get("type")
                        if kind == "error" or (message.get("status_code") or 200) >= 400:
                            raise self._error(message)
                        if kind == "chunk":
                            first = first or time.perf_counter() - started
                            yield self._audio(message)
                        elif kind == "done" or message.get("done"):
                            return
        finally:
            log_timing(self.name, "WS /tts/websocket", 101, first, time.perf_counter() - started)

    async def _connect(self) -> aiohttp.ClientWebSocketResponse:
        try:
            return await self._http.ws_connect(ws_url(self._url), headers=self._headers, heartbeat=None,
                                               max_msg_size=16 * 1024 * 1024)
        except aiohttp.WSServerHandshakeError as exc:
            raise status_error(self.settings, exc.status, exc.message or "handshake refused",
                               exc.headers or {}) from exc

    async def _receive(self, ws: aiohttp.ClientWebSocketResponse) -> dict[str, Any]:
        async with asyncio.timeout(self._timeout_s):
            frame = await ws.receive()
        if frame.type != aiohttp.WSMsgType.TEXT:
            raise ProviderError(self.name, "the stream was cut off before done", transient=True)
        try:
            message = json.loads(frame.data)
        except ValueError as exc:
            raise ProviderError(self.name, "a message is not JSON", transient=True) from exc
        if not isinstance(message, dict):
            raise ProviderError(self.name, "a message is not a JSON object", transient=True)
        return message

    def _audio(self, message: dict[str, Any]) -> bytes:
        try:
            pcm = base64.b64decode(message.get("data") or "", validate=True)
        except binascii.Error as exc:
            raise ProviderError(self.name, "a chunk's audio is not base64", transient=True) from exc
        return pcm[: len(pcm) & ~1]

    def _error(self, message: dict[str, Any]) -> ProviderError:
        status = int(message.get("status_code") or 500)
        return status_error(self.settings, 500 if status < 400 else status, _error_text(message), {})


def build_tts(settings: ProviderSettings, http: aiohttp.ClientSession, options: BuildOptions) -> CartesiaTTS:
    """The registry's TTS builder for Cartesia."""
    return CartesiaTTS(settings, http, timeout_s=options.timeout_s)


SPECS = (
    ProviderSpec("cartesia", key_env="CARTESIA_API_KEY", base_url_env="CARTESIA_BASE_URL",
                 default_base_url="https://api.cartesia.ai", default_models={"tts": "sonic-2"},
                 default_voice=DEFAULT_VOICE, api_root="",
                 options="`tts_voice` / a persona's `voice` is a voice id; streamed over the TTS WebSocket as "
                         "raw `pcm_s16le` at 16 kHz",
                 provider_options=(
                     ProviderOption("language", str, "", "language code (`en`, `de`, `hi` ...); unset: the "
                                    "persona's language"),
                     ProviderOption("sample_rate", int, SAMPLE_RATE, "PCM rate asked for in `output_format`",
                                    choices=(8000, 16000, 22050, 24000, 44100)),
                     ProviderOption("version", str, API_VERSION, "the `Cartesia-Version` header"),
                 ),
                 probe=Probe("/voices"), tts=build_tts),
)
