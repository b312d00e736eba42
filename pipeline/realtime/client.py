"""The OpenAI Realtime API (GA protocol) over one WebSocket: connecting, the session's configuration, events.

Pure helpers build the client events (``session.update``, ``input_audio_buffer.append`` ...) so they can
be checked without a socket; :class:`RealtimeModel` is what the provider registry builds for
``llm_provider: "realtime"`` (the settings plus the shared aiohttp session) and opens one
:class:`RealtimeSocket` per call. Failures leave as :class:`~pipeline.providers.base.ProviderError`.

Usage::

    model = RealtimeModel(ProviderSettings("realtime", "gpt-realtime", key, "wss://api.openai.com/v1"), http)
    socket = await model.connect(timeout_s=10)
    await socket.send(session_update(instructions="Be brief.", voice="alloy", audio_format=PCMU,
                                     turn_detection="server_vad", transcribe_model="gpt-4o-mini-transcribe",
                                     tools=[], interrupt=True))
    await socket.send(append_audio(ulaw_bytes))
    async for event in socket.events():     # dicts; a closed socket ends the iteration
        ...
    await socket.close()
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlparse, urlunparse

import aiohttp

from pipeline.providers.base import Message, ProviderError, ProviderSettings, Tool

__all__ = ["PCM24K", "PCMU", "AudioFormat", "RealtimeModel", "RealtimeSocket", "append_audio", "audio_format_for",
           "message_item", "realtime_url", "session_update", "tool_output"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class AudioFormat:
    """One of the API's audio formats: its wire object, its rate and its bytes per millisecond."""

    wire: Mapping[str, Any]
    sample_rate: int
    bytes_per_ms: float


PCMU = AudioFormat({"type": "audio/pcmu"}, 8000, 8.0)                    # G.711 µ-law, 8 kHz: phone legs
PCM24K = AudioFormat({"type": "audio/pcm", "rate": 24000}, 24000, 48.0)  # PCM16 LE, 24 kHz: everything else


def audio_format_for(leg_rate: int) -> AudioFormat:
    """µ-law straight through on an 8 kHz (phone) leg, else PCM16 at 24 kHz (resampled at our side).

    >>> audio_format_for(8000).wire, audio_format_for(16000).wire["type"]
    ({'type': 'audio/pcmu'}, 'audio/pcm')
    """
    return PCMU if leg_rate == 8000 else PCM24K


def realtime_url(base_url: str, model: str) -> str:
    """The WebSocket URL of ``model`` under ``base_url`` (``https``/``http`` become ``wss``/``ws``).

    >>> realtime_url("https://api.openai.com/v1", "gpt-realtime")
    'wss://api.openai.com/v1/realtime?model=gpt-realtime'
    """
    parts = urlparse(base_url.rstrip("/"))
    scheme = {"https": "wss", "http": "ws"}.get(parts.scheme, parts.scheme)
    return urlunparse(parts._replace(scheme=scheme, path=parts.path + "/realtime", query=f"model={quote(model)}"))


def session_update(*, instructions: str, voice: str, audio_format: AudioFormat, turn_detection: str,
                   transcribe_model: str, tools: Sequence[Tool], interrupt: bool) -> dict[str, Any]:
    """The ``session.update`` that configures a call: audio both ways in ``audio_format``, the persona's
    instructions and voice, turn detection (``server_vad``, ``semantic_vad``, or ``local``: ours, so
    none at the server), the caller's words transcribed by ``transcribe_model`` ("" = not), and tools."""
    detection: dict[str, Any] | None = None
    if turn_detection != "local":
        detection = {"type": turn_detection, "create_response": True, "interrupt_response": interrupt}
    audio_in: dict[str, Any] = {"format": dict(audio_format.wire), "turn_detection": detection}
    if transcribe_model:
        audio_in["transcription"] = {"model": transcribe_model}
    session: dict[str, Any] = {
        "type": "realtime",
        "output_modalities": ["audio"],
        "instructions": instructions,
        "audio": {"input": audio_in, "output": {"format": dict(audio_format.wire), "voice": voice}},
    }
    if tools:
        session["tools"] = [{"type": "function", "name": t.name, "description": t.description,
                             "parameters": dict(t.parameters)} for t in tools]
        session["tool_choice"] = "auto"
    return {"type": "session.update", "session": session}


def append_audio(audio: bytes) -> dict[str, Any]:
    """``input_audio_buffer.append`` of caller audio already in the session's format."""
    return {"type": "input_audio_buffer.append", "audio": base64.b64encode(audio).decode("ascii")}


def message_item(role: str, text: str) -> dict[str, Any]:
    """A ``conversation.item.create`` of a text message: the caller's (``user``, ``input_text``) or the
    agent's (``assistant``, ``output_text``) words.

    >>> message_item("user", "[DTMF] 12")["item"]["content"]
    [{'type': 'input_text', 'text': '[DTMF] 12'}]
    """
    kind = "output_text" if role == "assistant" else "input_text"
    return {"type": "conversation.item.create",
            "item": {"type": "message", "role": role, "content": [{"type": kind, "text": text}]}}


def tool_output(call_id: str, output: str) -> dict[str, Any]:
    """The ``function_call_output`` item that answers the model's function call ``call_id``."""
    return {"type": "conversation.item.create",
            "item": {"type": "function_call_output", "call_id": call_id, "output": output}}


class RealtimeSocket:
    """One call's session socket: ``send`` a client event, iterate ``events()``, ``close``."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self._ws = ws

    @property
    def closed(self) -> bool:
        return self._ws.closed

    async def send(self, event: Mapping[str, Any]) -> None:
        """Send one client event; a socket that has gone away raises ProviderError."""
        try:
            await self._ws.send_str(json.dumps(event, separators=(",", ":")))
        except (aiohttp.ClientError, ConnectionError, RuntimeError) as exc:
            raise ProviderError("realtime", f"the session socket is gone ({type(exc).__name__})",
                                transient=True) from exc

    async def events(self) -> AsyncIterator[dict[str, Any]]:
        """Server events as they arrive; ends when the socket closes (the caller decides what that means)."""
        async for message in self._ws:
            if message.type != aiohttp.WSMsgType.TEXT:
                if message.type == aiohttp.WSMsgType.ERROR:
                    return
                continue
            try:
                event = json.loads(message.data)
            except ValueError:
                logger.warning("realtime: a server message is not JSON; ignored")
                continue
            if isinstance(event, dict):
                yield event

    async def close(self) -> None:
        try:
            await self._ws.close()
        except (aiohttp.ClientError, ConnectionError, RuntimeError):   # already gone
            pass


class RealtimeModel:
    """The registry's object for ``realtime``: the resolved settings and the shared HTTP session.

    It is not a chat model: the gateway sees it in ``providers.llm`` and runs the call through
    :class:`~pipeline.realtime.engine.RealtimeEngine`, which opens a socket per call with :meth:`connect`.
    """

    name = "realtime"

    def __init__(self, settings: ProviderSettings, http: aiohttp.ClientSession) -> None:
        self.settings = settings
        self._http = http

    async def connect(self, *, timeout_s: float) -> RealtimeSocket:
        """Open the session socket (``Authorization: Bearer``; the GA protocol, so no ``OpenAI-Beta``)."""
        url = realtime_url(self.settings.base_url, self.settings.model)
        headers = {"Authorization": f"Bearer {self.settings.api_key or ''}"}
        try:
            async with asyncio.timeout(timeout_s):
                ws = await self._http.ws_connect(url, headers=headers, max_msg_size=0, autoping=True)
        except aiohttp.WSServerHandshakeError as exc:
            refused = exc.status in (401, 403)
            detail = f"; check {self.settings.key_env or 'OPENAI_API_KEY'}" if refused else ""
            raise ProviderError("realtime", f"HTTP {exc.status} opening the session{detail}",
                                transient=exc.status in (408, 429) or exc.status >= 500) from exc
        except TimeoutError as exc:
            raise ProviderError("realtime", "timed out opening the session", transient=True) from exc
        except aiohttp.ClientError as exc:
            raise ProviderError("realtime", f"connection failed ({type(exc).__name__})", transient=True) from exc
        return RealtimeSocket(ws)

    def stream(self, messages: Sequence[Message], tools: Sequence[Tool] = ()) -> AsyncIterator[str]:
        """Not a chat model: the cascade never reaches here (the gateway picks the realtime engine)."""
        raise ProviderError("realtime", "a speech-to-speech model has no chat stream; it runs as the call's engine")

