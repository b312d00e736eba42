"""Telnyx's side of a call (TeXML): Ed25519-signed form webhook, TeXML answer, media-stream JSON (PCMU 8 kHz).

Credentials (all optional): ``signing_key`` (base64 32-byte Ed25519 seed the emulator signs with; a fresh key
is generated otherwise — configure the gateway with ``dialect.public_key``), ``account_sid``,
``connection_id``, ``stream_auth_token`` (sent on the upgrade header and in the ``connected`` frame).
The emulated call is a US PSTN leg: audio to the gateway is PCMU unless the answer asks ``codec="PCMA"``.
"""

from __future__ import annotations

import base64
import binascii
import json
import secrets
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from typing import Any, ClassVar
from urllib.parse import parse_qsl, urlencode, urlsplit

import numpy as np
from nacl.signing import SigningKey

from gateway.simulate.dialects.base import Inbound, Webhook
from pipeline.audio import Resampler, alaw_decode, alaw_encode, ulaw_decode, ulaw_encode

__all__ = ["TelnyxDialect"]

_CODECS = ("PCMU", "PCMA", "L16")
_TOKEN = "x-telnyx-streaming-auth-token"


def _iso(now: float | None = None) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(now))


class TelnyxDialect:
    name: ClassVar[str] = "telnyx"
    rate = 8000
    frame_ms = 20

    def __init__(self, *, credentials: Mapping[str, str], from_: str, to: str) -> None:
        seed = credentials.get("signing_key", "")
        self._key = SigningKey(base64.b64decode(seed)) if seed else SigningKey.generate()
        self.public_key = base64.b64encode(bytes(self._key.verify_key)).decode("ascii")
        self.account_sid = credentials.get("account_sid") or str(uuid.uuid4())
        self.connection_id = credentials.get("connection_id") or str(secrets.randbelow(10**18) + 10**18)
        self.stream_auth_token = credentials.get("stream_auth_token", "")
        self.call_id = "v3:" + secrets.token_urlsafe(32)   # CallSid; the stream's call_control_id is the same
        self.stream_id = str(uuid.uuid4())
        self.from_, self.to = from_, to
        self.parameters: dict[str, str] = {}
        self.element_parameters: dict[str, str] = {}     # <Parameter> children, reported in start [?]
        self.inbound_codec = "PCMU"                      # audio we send (the answer's codec)
        self.outbound_codec, self.outbound_rate, self.mode = "PCMU", 8000, "mp3"
        self._resampler: Resampler | None = None
        self._seq = 0
        self._chunk = 0

    # ------------------------------------------------------------------------------ webhook
    def webhook_params(self, **extra: str) -> dict[str, str]:
        now = _iso()
        return {"AccountSid": self.account_sid, "CallSid": self.call_id, "CallSidLegacy": self.call_id,
                "CallStatus": "ringing", "Direction": "inbound", "From": self.from_, "To": self.to,
                "ConnectionId": self.connection_id, "CallerId": self.from_, "CallInitiatedAt": now,
                "Timestamp": now, "SequenceNumber": "0", **extra}

    def sign(self, timestamp: str, body: bytes) -> str:
        """``telnyx-signature-ed25519``: Ed25519 over ``timestamp|body``, base64."""
        return base64.b64encode(self._key.sign(timestamp.encode() + b"|" + body).signature).decode("ascii")

    def webhook(self, public_url: str, extra: Mapping[str, str], *, path: str = "/start/telnyx",
                signature: str | None = None, timestamp: str | None = None) -> Webhook:
        body = urlencode(self.webhook_params(**extra)).encode()
        stamp = timestamp or str(int(time.time()))
        return Webhook("POST", path, {"telnyx-signature-ed25519": signature if signature is not None
                                      else self.sign(stamp, body), "telnyx-timestamp": stamp,
                                      "Content-Type": "application/x-www-form-urlencoded"}, body)

    def answer(self, status: int, text: str) -> str:
        try:
            stream = ET.fromstring(text).find("./Connect/Stream")
        except ET.ParseError:
            stream = None
        if stream is None:
            raise AssertionError(f"TeXML has no <Connect><Stream> (the emulator speaks the TeXML flow): {text[:200]}")
        url = stream.attrib["url"]
        codec = stream.get("codec", "default")
        self.inbound_codec = codec if codec in ("PCMU", "PCMA") else "PCMU"   # default: the call's codec
        self.mode = stream.get("bidirectionalMode", "mp3")
        self.outbound_codec = stream.get("bidirectionalCodec", "PCMU")
        self.outbound_rate = int(stream.get("bidirectionalSamplingRate", "8000"))
        if self.outbound_rate != self.rate:
            self._resampler = Resampler(self.outbound_rate, self.rate)
        self.element_parameters = {p.attrib["name"]: p.attrib["value"] for p in stream.findall("Parameter")}
        self.parameters = {**dict(parse_qsl(urlsplit(url).query)), **self.element_parameters}
        return url

    # ------------------------------------------------------------------------------ media socket
    def ws_headers(self) -> dict[str, str]:
        return {_TOKEN: self.stream_auth_token} if self.stream_auth_token else {}

    def _next(self) -> str:
        self._seq += 1
        return str(self._seq)

    def connected_message(self) -> dict[str, Any]:
        message: dict[str, Any] = {"event": "connected", "version": "1.0.0"}
        if self.stream_auth_token:
            message["connected"] = {_TOKEN: self.stream_auth_token}
        return message

    def start_message(self) -> dict[str, Any]:
        start: dict[str, Any] = {"user_id": self.account_sid, "call_control_id": self.call_id,
                                 "call_session_id": str(uuid.uuid4()), "client_state": None,
                                 "from": self.from_, "to": self.to,
                                 "media_format": {"encoding": self.inbound_codec, "sample_rate": 8000, "channels": 1}}
        if self.element_parameters:
            start["custom_parameters"] = dict(self.element_parameters)
        return {"event": "start", "sequence_number": self._next(), "stream_id": self.stream_id, "start": start}

    def opening(self) -> list[str | bytes]:
        return [json.dumps(self.connected_message()), json.dumps(self.start_message())]

    def media(self, pcm: bytes) -> str:
        self._chunk += 1
        payload = (alaw_encode if self.inbound_codec == "PCMA" else ulaw_encode)(pcm)
        return ('{"event":"media","sequence_number":"%s","stream_id":"%s","media":{"track":"inbound","chunk":"%d",'
                '"timestamp":"%d","payload":"%s"}}' % (self._next(), self.stream_id, self._chunk,
                                                       self._chunk * self.frame_ms, base64.b64encode(payload).decode()))

    def dtmf(self, digit: str) -> str:
        return json.dumps({"event": "dtmf", "sequence_number": self._next(), "stream_id": self.stream_id,
                           "occurred_at": _iso(), "dtmf": {"digit": digit}})

    def mark_ack(self, name: str) -> str:
        return json.dumps({"event": "mark", "sequence_number": self._next(), "stream_id": self.stream_id,
                           "mark": {"name": name}})

    def stop(self) -> list[str | bytes]:
        return [json.dumps({"event": "stop", "sequence_number": self._next(), "stream_id": self.stream_id,
                            "stop": {"user_id": self.account_sid, "call_control_id": self.call_id}})]

    # ------------------------------------------------------------------------------ gateway -> Telnyx
    def parse(self, message: str | bytes) -> list[Inbound]:
        if isinstance(message, bytes):
            return [Inbound("invalid", text="binary frame (Telnyx takes JSON text frames)")]
        try:
            data = json.loads(message)
        except ValueError:
            return [Inbound("invalid", text="not JSON: " + message[:200])]
        event = data.get("event") if isinstance(data, dict) else None
        keys = set(data) - {"stream_id"} if isinstance(data, dict) else set()
        expected = {"media": {"event", "media"}, "mark": {"event", "mark"}, "clear": {"event"}}.get(str(event))
        if expected is None or keys != expected or data.get("stream_id", self.stream_id) != self.stream_id:
            return [Inbound("invalid", text=message[:200])]
        if event == "clear":
            if self._resampler is not None:
                self._resampler.reset()
            return [Inbound("clear")]
        if event == "mark":
            mark = data["mark"]
            if not isinstance(mark, dict) or set(mark) != {"name"} or not isinstance(mark["name"], str) \
                    or not mark["name"]:
                return [Inbound("invalid", text=message[:200])]
            return [Inbound("mark", name=mark["name"])]
        return [self._media(data["media"], message)]

    def _media(self, media: Any, message: str) -> Inbound:
        if self.mode != "rtp":
            return Inbound("invalid", text=f"raw media with bidirectionalMode={self.mode} (needs rtp)")
        if not isinstance(media, dict) or set(media) != {"payload"} or not isinstance(media["payload"], str):
            return Inbound("invalid", text=message[:200])
        try:
            raw = base64.b64decode(media["payload"], validate=True)
        except (binascii.Error, ValueError):
            return Inbound("invalid", text="payload is not base64")
        width = 2 if self.outbound_codec == "L16" else 1
        per_ms = self.outbound_rate // 1000 * width
        if self.outbound_codec not in _CODECS or len(raw) % width or not 20 * per_ms <= len(raw) <= 30_000 * per_ms:
            return Inbound("invalid", text=f"{self.outbound_codec} chunk of {len(raw)} bytes (20 ms to 30 s)")
        if self.outbound_codec == "L16":  # big-endian, as the carrier module sends it by default [?]
            pcm = np.frombuffer(raw, ">i2").astype("<i2").tobytes()
        else:
            pcm = (alaw_decode if self.outbound_codec == "PCMA" else ulaw_decode)(raw)
        if self._resampler is not None:
            pcm = self._resampler.process(pcm)
        return Inbound("media", pcm=pcm)
