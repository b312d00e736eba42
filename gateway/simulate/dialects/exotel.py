"""Exotel's side of a call: Voicebot dynamic-URL request (Basic auth), ``{"url": ...}`` answer,
AgentStream JSON (PCM16 LE, ~100 ms inbound chunks) and the outbound chunk rules Exotel states.

Credentials (all optional): ``sid``, ``basic_auth_user``/``basic_auth_password`` (sent as
``Authorization: Basic`` on the webhook; on the WebSocket the credentials come from the answer URL,
as Exotel does), ``sample_rate`` (8000), ``codec`` (``pcm16`` | ``ulaw``), ``webhook_method``
(``GET``, as Exotel's dynamic URLs are fetched; ``POST`` sends the same query with an empty body),
``client_ip`` (sent as ``X-Forwarded-For``), ``min_chunk_bytes`` (3200) and ``max_ahead_ms`` (1000:
outbound audio further ahead of real time is flagged, Exotel asks for real-time pacing).
"""

from __future__ import annotations

import base64
import binascii
import json
import secrets
import time
from collections.abc import Callable, Mapping
from typing import Any, ClassVar
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

from gateway.simulate.dialects.base import Inbound, Webhook
from pipeline.audio import ulaw_decode, ulaw_encode

__all__ = ["ExotelDialect"]

_MAX_CHUNK = 102400
_TOP = frozenset({"event", "stream_sid", "streamSid", "sequence_number"})
_MEDIA_KEYS = frozenset({"payload", "chunk", "timestamp", "sequenceNumber"})


class ExotelDialect:
    name: ClassVar[str] = "exotel"
    frame_ms = 100

    def __init__(self, *, credentials: Mapping[str, str], from_: str, to: str) -> None:
        self.sid = credentials.get("sid") or "acct" + secrets.token_hex(4)
        self.basic_user = credentials.get("basic_auth_user", "")
        self.basic_password = credentials.get("basic_auth_password", "")
        self.rate = int(credentials.get("sample_rate", 8000))
        self.codec = credentials.get("codec", "pcm16")
        self.method = credentials.get("webhook_method", "GET").upper()
        self.client_ip = credentials.get("client_ip", "")
        self.min_chunk_bytes = int(credentials.get("min_chunk_bytes", 3200))
        self.max_ahead_ms = float(credentials.get("max_ahead_ms", 1000))
        self.call_id = secrets.token_hex(16)           # Exotel CallSids are 32 hex characters
        self.stream_sid = "MZ" + secrets.token_hex(16)
        self.from_, self.to = from_, to
        self.parameters: dict[str, str] = {}
        self.clock: Callable[[], float] = time.monotonic
        self._ws_auth = ""
        self._seq = 0
        self._chunk = 0
        self._play_end = 0.0

    # -- webhook and answer ----------------------------------------------------------------

    def webhook_params(self, **extra: str) -> dict[str, str]:
        return {"CallSid": self.call_id, "CallFrom": self.from_, "CallTo": self.to, "Direction": "incoming",
                **extra}

    def webhook(self, public_url: str, extra: Mapping[str, str], *, path: str = "/start/exotel",
                signature: str | None = None) -> Webhook:
        """``signature`` replaces the ``Authorization`` value ('' sends none)."""
        headers: dict[str, str] = {}
        if signature is None and (self.basic_user or self.basic_password):
            signature = _basic(self.basic_user, self.basic_password)
        if signature:
            headers["Authorization"] = signature
        if self.client_ip:
            headers["X-Forwarded-For"] = self.client_ip
        joiner = "&" if "?" in path else "?"
        return Webhook(self.method, f"{path}{joiner}{urlencode(self.webhook_params(**extra))}", headers, b"")

    def answer(self, status: int, text: str) -> str:
        data = json.loads(text)
        url = data.get("url") if isinstance(data, dict) else None
        if not isinstance(url, str) or not url.startswith("wss://"):
            raise AssertionError(f"answer is not {{\"url\": \"wss://...\"}}: {text[:200]}")
        parts = urlsplit(url)
        if parts.username is not None:             # Exotel moves URL credentials into the upgrade header
            self._ws_auth = _basic(unquote(parts.username), unquote(parts.password or ""))
        query = parse_qsl(parts.query, keep_blank_values=True)
        rate = next((v for k, v in query if k == "sample-rate"), "8000")
        if rate != str(self.rate):
            raise AssertionError(f"answer asks for sample-rate={rate}, the emulator runs at {self.rate}")
        custom = [(k, v) for k, v in query if k != "sample-rate"]
        if len(custom) > 3 or len(urlencode(custom)) > 256:
            raise AssertionError(f"Exotel passes at most 3 custom parameters in 256 characters: {custom}")
        self.parameters = dict(custom)
        return urlunsplit(("wss", parts.netloc.rpartition("@")[2], parts.path, parts.query, ""))

    def ws_headers(self) -> dict[str, str]:
        headers = {"Authorization": self._ws_auth} if self._ws_auth else {}
        if self.client_ip:
            headers["X-Forwarded-For"] = self.client_ip
        return headers

    # -- Exotel -> gateway -----------------------------------------------------------------

    def _next(self) -> str:
        self._seq += 1
        return str(self._seq)

    def start_message(self) -> dict[str, Any]:
        encoding = "audio/x-mulaw" if self.codec == "ulaw" else "audio/x-raw"
        return {"event": "start", "sequence_number": self._next(), "stream_sid": self.stream_sid,
                "start": {"stream_sid": self.stream_sid, "call_sid": self.call_id, "account_sid": self.sid,
                          "from": self.from_, "to": self.to, "custom_parameters": self.parameters,
                          "media_format": {"encoding": encoding, "sample_rate": str(self.rate), "bit_rate": "16"}}}

    def opening(self) -> list[str | bytes]:
        return [json.dumps({"event": "connected"}), json.dumps(self.start_message())]

    def media(self, pcm: bytes) -> str:
        self._chunk += 1
        payload = base64.b64encode(ulaw_encode(pcm) if self.codec == "ulaw" else pcm).decode()
        return ('{"event":"media","sequence_number":"%s","stream_sid":"%s","media":{"chunk":"%d","timestamp":"%d",'
                '"payload":"%s"}}' % (self._next(), self.stream_sid, self._chunk, self._chunk * self.frame_ms, payload))

    def dtmf(self, digit: str) -> str:
        return json.dumps({"event": "dtmf", "sequence_number": self._next(), "stream_sid": self.stream_sid,
                           "dtmf": {"digit": digit, "duration": "100"}})

    def mark_ack(self, name: str) -> str:
        return json.dumps({"event": "mark", "sequence_number": self._next(), "stream_sid": self.stream_sid,
                           "mark": {"name": name}})

    def stop(self) -> list[str | bytes]:
        return [json.dumps({"event": "stop", "sequence_number": self._next(), "stream_sid": self.stream_sid,
                            "stop": {"call_sid": self.call_id, "account_sid": self.sid, "reason": "callended"}})]

    # -- gateway -> Exotel -----------------------------------------------------------------

    def parse(self, message: str | bytes) -> list[Inbound]:
        if isinstance(message, bytes):
            return [Inbound("invalid", text="binary frame (Exotel takes JSON text only)")]
        try:
            data = json.loads(message)
        except ValueError:
            return [Inbound("invalid", text="not JSON: " + message[:120])]
        problem = _shape_problem(data, self.stream_sid)
        if problem:
            return [Inbound("invalid", text=f"{problem}: {message[:160]}")]
        if data["event"] == "clear":
            self._play_end = self.clock()
            return [Inbound("clear")]
        if data["event"] == "mark":
            return [Inbound("mark", name=data["mark"]["name"])]
        try:
            raw = base64.b64decode(data["media"]["payload"], validate=True)
        except (binascii.Error, ValueError):
            return [Inbound("invalid", text="media payload is not base64")]
        pcm = ulaw_decode(raw) if self.codec == "ulaw" else raw
        return [Inbound("media", pcm=pcm[: len(pcm) // 2 * 2]), *self._check_chunk(len(pcm))]

    def _check_chunk(self, size: int) -> list[Inbound]:
        """Exotel's rules: a multiple of 320 bytes, 3.2 KB .. 100 KB, paced in real time."""
        problems = []
        if size % 320:
            problems.append(f"media chunk of {size} bytes is not a multiple of 320")
        if size < self.min_chunk_bytes:
            problems.append(f"media chunk of {size} bytes is below the {self.min_chunk_bytes}-byte minimum")
        if size > _MAX_CHUNK:
            problems.append(f"media chunk of {size} bytes is above the 100 KB maximum")
        now = self.clock()
        self._play_end = max(self._play_end, now)
        ahead_ms = (self._play_end - now) * 1000.0
        if ahead_ms > self.max_ahead_ms + 1.0:   # 1 ms of float slack
            problems.append(f"media sent {ahead_ms:.0f} ms ahead of real time (pace it)")
        self._play_end += size / 2 / self.rate
        return [Inbound("invalid", text=p) for p in problems]


def _shape_problem(data: Any, stream_sid: str) -> str:
    """Why Exotel would not accept this message as media / mark / clear ('' if it would)."""
    if not isinstance(data, dict):
        return "not a JSON object"
    event = data.get("event")
    if event not in ("media", "mark", "clear"):
        return f"unknown event {str(event)[:20]!r}"
    body = "" if event == "clear" else event
    extra = set(data) - _TOP - {body}
    if extra:
        return f"unexpected keys {sorted(extra)}"
    if any(data[k] != stream_sid for k in ("stream_sid", "streamSid") if k in data):
        return "stream id does not match"
    if body and not isinstance(data.get(body), dict):
        return f"{event} has no {body} object"
    if event == "mark" and (set(data["mark"]) != {"name"} or not isinstance(data["mark"]["name"], str)):
        return "mark must be exactly {\"name\": <string>}"
    if event == "media" and (set(data["media"]) - _MEDIA_KEYS or not isinstance(data["media"].get("payload"), str)):
        return f"media must hold a payload string and only {sorted(_MEDIA_KEYS)}"
    return ""


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
