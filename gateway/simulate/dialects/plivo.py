"""Plivo's side of a call: V3-signed form webhook, ``<Stream>`` XML answer, Audio Streaming JSON.

Plivo sends ``start`` first (no ``connected``), numeric ``sequenceNumber``/``chunk``, epoch-ms
``timestamp`` strings and the ``extra_headers`` string on ``start``/``media``/``dtmf``; it has no
``stop`` (the socket just closes) and acknowledges a ``checkpoint`` with ``playedStream`` only when
the audio before it played (never after a ``clearAudio``, which it answers with ``clearedAudio``).
The signature is computed here independently of ``carriers.plivo`` (``docs/carriers.md`` §5.2).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import secrets
import time
import uuid
import xml.etree.ElementTree as ET
from array import array
from collections.abc import Mapping
from typing import Any, ClassVar
from urllib.parse import urlencode

from carriers.plivo import decode_extra_headers, signature_v3
from gateway.simulate.dialects.base import Inbound, Webhook
from pipeline.audio import ulaw_decode, ulaw_encode

__all__ = ["PlivoDialect"]

_FORMATS = {"audio/x-mulaw;rate=8000": ("audio/x-mulaw", 8000), "audio/x-l16;rate=8000": ("audio/x-l16", 8000),
            "audio/x-l16;rate=16000": ("audio/x-l16", 16000)}
_EXPECTED = {"playAudio": {"event", "media"}, "checkpoint": {"event", "streamId", "name"},
             "clearAudio": {"event", "streamId"}, "sendDTMF": {"event", "dtmf"}}


def _sign(token: str, url: str, params: Mapping[str, str], nonce: str) -> str:
    """V3 for a POST: ``url + "?" + sorted(name+value) + "." + nonce``, written out independently of
    the adapter for a query-less URL; a URL with a query follows Plivo's query rules (the adapter's)."""
    if "?" in url:
        return signature_v3(token, "POST", url, {k: [v] for k, v in params.items()}, nonce)
    text = url + ("?" + "".join(f"{k}{params[k]}" for k in sorted(params)) if params else "") + "." + nonce
    return base64.b64encode(hmac.new(token.encode(), text.encode(), hashlib.sha256).digest()).decode()


class PlivoDialect:
    name: ClassVar[str] = "plivo"
    frame_ms = 20

    def __init__(self, *, credentials: Mapping[str, str], from_: str, to: str) -> None:
        self.auth_token = credentials.get("auth_token", "")
        self.main_auth_token = credentials.get("main_auth_token") or self.auth_token
        self.auth_id = credentials.get("auth_id") or credentials.get("account_sid") or (
            "MA" + "".join(secrets.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789") for _ in range(18)))
        self.content_type = credentials.get("content_type", "audio/x-mulaw;rate=8000")
        self.encoding, self.rate = _FORMATS[self.content_type]
        self.big_endian = credentials.get("l16_byte_order", "little") == "big"
        self.call_id = str(uuid.uuid4())       # CallUUID: what the REST API knows
        self.stream_id = str(uuid.uuid4())
        self.from_, self.to = from_, to
        self.parameters: dict[str, str] = {}
        self.extra_headers = ""
        self._seq = 0
        self._chunk = 0
        self._epoch_ms = int(time.time() * 1000)
        self._unplayed: set[str] = set()        # checkpoints received and not yet acknowledged
        self._cleared: set[str] = set()         # checkpoints whose audio a clearAudio flushed

    def webhook_params(self, **extra: str) -> dict[str, str]:
        return {"CallUUID": self.call_id, "From": self.from_.lstrip("+"), "To": self.to.lstrip("+"),
                "CallStatus": "ringing", "Direction": "inbound", "Event": "StartApp", "CallerName": self.from_,
                "ALegUUID": self.call_id, "ALegRequestUUID": str(uuid.uuid4()), "RequestUUID": self.call_id,
                "BillRate": "0.0085", **extra}

    def webhook(self, public_url: str, extra: Mapping[str, str], *, path: str = "/start/plivo",
                signature: str | None = None) -> Webhook:
        params = self.webhook_params(**extra)
        nonce = "".join(secrets.choice("0123456789") for _ in range(20))
        url = public_url + path
        headers = {"Content-Type": "application/x-www-form-urlencoded", "X-Plivo-Signature-V3-Nonce": nonce,
                   "X-Plivo-Signature-V3": signature if signature is not None else _sign(self.auth_token, url,
                                                                                          params, nonce)}
        if signature is None:
            headers["X-Plivo-Signature-Ma-V3"] = _sign(self.main_auth_token, url, params, nonce)
        return Webhook("POST", path, headers, urlencode(params).encode())

    def answer(self, status: int, text: str) -> str:
        root = ET.fromstring(text)
        stream = root.find("./Stream")
        if root.tag != "Response" or stream is None:
            raise AssertionError(f"Plivo XML has no <Response><Stream>: {text}")
        if stream.attrib.get("bidirectional") != "true":
            raise AssertionError("Plivo <Stream> is not bidirectional: playAudio would be ignored")
        if stream.attrib.get("audioTrack", "inbound") != "inbound":
            raise AssertionError("Plivo rejects a bidirectional <Stream> whose audioTrack is not inbound")
        content_type = stream.attrib.get("contentType", "audio/x-l16;rate=8000")
        if content_type != self.content_type:
            raise AssertionError(f"gateway asked for {content_type}; this dialect sends {self.content_type}")
        self.extra_headers = stream.attrib.get("extraHeaders", "")
        if len(self.extra_headers) > 512 or not all(c.isascii() and (c.isalnum() or c in "=,")
                                                    for c in self.extra_headers):
            raise AssertionError(f"Plivo rejects extraHeaders {self.extra_headers[:80]!r}: [A-Za-z0-9], 512 bytes")
        self.parameters = decode_extra_headers(self.extra_headers)
        url = (stream.text or "").strip()
        if not url.startswith("wss://"):
            raise AssertionError(f"Plivo <Stream> URL must be wss:// (got {url[:60]!r})")
        return url

    def ws_headers(self) -> dict[str, str]:
        return {}

    def _next(self) -> int:
        self._seq += 1
        return self._seq

    def start_message(self) -> dict[str, Any]:
        return {"event": "start", "sequenceNumber": self._next(),
                "start": {"callId": self.call_id, "streamId": self.stream_id, "accountId": self.auth_id,
                          "tracks": ["inbound"], "mediaFormat": {"encoding": self.encoding, "sampleRate": self.rate}},
                "extra_headers": self.extra_headers}

    def opening(self) -> list[str | bytes]:
        return [json.dumps(self.start_message())]

    def _to_wire(self, pcm: bytes) -> bytes:
        if self.encoding == "audio/x-mulaw":
            return ulaw_encode(pcm)
        return _swap(pcm) if self.big_endian else pcm

    def _from_wire(self, raw: bytes) -> bytes:
        if self.encoding == "audio/x-mulaw":
            return ulaw_decode(raw)
        return _swap(raw) if self.big_endian else raw

    def media(self, pcm: bytes) -> str:
        self._chunk += 1
        return json.dumps({"event": "media", "sequenceNumber": self._next(), "streamId": self.stream_id,
                           "media": {"track": "inbound", "timestamp": str(self._epoch_ms + self._chunk * self.frame_ms),
                                     "chunk": self._chunk, "payload": base64.b64encode(self._to_wire(pcm)).decode()},
                           "extra_headers": self.extra_headers}, separators=(",", ":"))

    def dtmf(self, digit: str) -> str:
        return json.dumps({"event": "dtmf", "sequenceNumber": self._next(), "streamId": self.stream_id,
                           "dtmf": {"digit": digit}, "extra_headers": self.extra_headers})

    def mark_ack(self, name: str) -> str | None:
        """``playedStream`` once the audio before the checkpoint played; nothing for flushed ones."""
        if name in self._cleared:
            self._cleared.discard(name)
            return None
        self._unplayed.discard(name)
        return json.dumps({"event": "playedStream", "sequenceNumber": self._next(), "streamId": self.stream_id,
                           "name": name})

    def cleared(self) -> str:
        """Plivo's answer to ``clearAudio``."""
        return json.dumps({"event": "clearedAudio", "sequenceNumber": self._next(), "streamId": self.stream_id})

    def stop(self) -> list[str | bytes]:
        return []  # Plivo documents no stop event: the socket closes

    def parse(self, message: str | bytes) -> list[Inbound]:
        if isinstance(message, bytes):
            return [Inbound("invalid", text="binary frame")]
        try:
            data = json.loads(message)
        except ValueError:
            return [Inbound("invalid", text=f"not JSON: {message[:200]}")]
        event = data.get("event") if isinstance(data, dict) else None
        expected = _EXPECTED.get(event) if isinstance(event, str) else None
        keys = set(data) - {"streamId"} if event == "playAudio" else set(data) if isinstance(data, dict) else set()
        if expected is None or keys != expected or data.get("streamId", self.stream_id) != self.stream_id:
            return [Inbound("invalid", text=message[:200])]
        if event == "playAudio":
            return [self._play(data["media"], message)]
        if event == "checkpoint":
            if not isinstance(data["name"], str) or not data["name"]:
                return [Inbound("invalid", text=message[:200])]
            self._unplayed.add(data["name"])
            return [Inbound("mark", name=data["name"])]
        if event == "clearAudio":
            self._cleared |= self._unplayed
            self._unplayed.clear()
            return [Inbound("clear")]
        return [Inbound("other", text=message[:200])]

    def _play(self, media: Any, message: str) -> Inbound:
        if not isinstance(media, dict) or set(media) != {"contentType", "sampleRate", "payload"}:
            return Inbound("invalid", text=message[:200])
        if (media["contentType"], media["sampleRate"]) != (self.encoding, self.rate):
            return Inbound("invalid", text=f"playAudio {media['contentType']} {media['sampleRate']} Hz on a "
                                           f"{self.content_type} stream")
        try:
            raw = base64.b64decode(media["payload"], validate=True)
        except (binascii.Error, ValueError, TypeError):
            return Inbound("invalid", text="playAudio payload is not base64")
        if self.encoding == "audio/x-l16" and len(raw) % 2:
            return Inbound("invalid", text="playAudio L16 payload has an odd number of bytes")
        return Inbound("media", pcm=self._from_wire(raw))


def _swap(pcm: bytes) -> bytes:
    samples = array("h", pcm)
    samples.byteswap()
    return samples.tobytes()
