"""Twilio's side of a call: signed form webhook, TwiML answer, Media Streams JSON (µ-law 8 kHz)."""

from __future__ import annotations

import base64
import json
import secrets
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from typing import ClassVar
from urllib.parse import urlencode

from twilio.request_validator import RequestValidator

from gateway.simulate.dialects.base import Inbound, Webhook
from pipeline.audio import ulaw_decode, ulaw_encode

__all__ = ["TwilioDialect"]

_EXPECTED = {"media": {"event", "streamSid", "media"}, "mark": {"event", "streamSid", "mark"},
             "clear": {"event", "streamSid"}}


class TwilioDialect:
    name: ClassVar[str] = "twilio"
    rate = 8000
    frame_ms = 20

    def __init__(self, *, credentials: Mapping[str, str], from_: str, to: str) -> None:
        self.auth_token = credentials.get("auth_token", "")
        self.account_sid = credentials.get("account_sid") or "AC" + secrets.token_hex(16)
        self.call_id = "CA" + secrets.token_hex(16)
        self.stream_sid = "MZ" + secrets.token_hex(16)
        self.from_, self.to = from_, to
        self.parameters: dict[str, str] = {}
        self._seq = 0
        self._chunk = 0

    def webhook_params(self, **extra: str) -> dict[str, str]:
        return {"CallSid": self.call_id, "AccountSid": self.account_sid, "From": self.from_, "To": self.to,
                "CallStatus": "ringing", "Direction": "inbound", "ApiVersion": "2010-04-01", **extra}

    def webhook(self, public_url: str, extra: Mapping[str, str], *, path: str = "/start/twilio",
                signature: str | None = None) -> Webhook:
        params = self.webhook_params(**extra)
        if signature is None:
            signature = RequestValidator(self.auth_token).compute_signature(public_url + path, params)
        return Webhook("POST", path, {"X-Twilio-Signature": signature,
                                      "Content-Type": "application/x-www-form-urlencoded"},
                       urlencode(params).encode())

    def answer(self, status: int, text: str) -> str:
        stream = ET.fromstring(text).find("./Connect/Stream")
        if stream is None:
            raise AssertionError(f"TwiML has no <Connect><Stream>: {text}")
        self.parameters = {p.attrib["name"]: p.attrib["value"] for p in stream.findall("Parameter")}
        return stream.attrib["url"]

    def ws_headers(self) -> dict[str, str]:
        return {}

    def _next(self) -> str:
        self._seq += 1
        return str(self._seq)

    def start_message(self) -> dict[str, object]:
        return {"event": "start", "sequenceNumber": self._next(), "streamSid": self.stream_sid,
                "start": {"streamSid": self.stream_sid, "accountSid": self.account_sid, "callSid": self.call_id,
                          "tracks": ["inbound"], "customParameters": self.parameters,
                          "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}}}

    def opening(self) -> list[str | bytes]:
        return [json.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"}),
                json.dumps(self.start_message())]

    def media(self, pcm: bytes) -> str:
        self._chunk += 1
        return ('{"event":"media","sequenceNumber":"%s","streamSid":"%s","media":{"track":"inbound","chunk":"%d",'
                '"timestamp":"%d","payload":"%s"}}' % (self._next(), self.stream_sid, self._chunk,
                                                         self._chunk * self.frame_ms,
                                                         base64.b64encode(ulaw_encode(pcm)).decode()))

    def dtmf(self, digit: str) -> str:
        return json.dumps({"event": "dtmf", "sequenceNumber": self._next(), "streamSid": self.stream_sid,
                           "dtmf": {"track": "inbound_track", "digit": digit}})

    def mark_ack(self, name: str) -> str:
        return json.dumps({"event": "mark", "sequenceNumber": self._next(), "streamSid": self.stream_sid,
                           "mark": {"name": name}})

    def stop(self) -> list[str | bytes]:
        return [json.dumps({"event": "stop", "sequenceNumber": self._next(), "streamSid": self.stream_sid,
                            "stop": {"accountSid": self.account_sid, "callSid": self.call_id}})]

    def parse(self, message: str | bytes) -> list[Inbound]:
        if isinstance(message, bytes):
            return [Inbound("invalid", text="binary frame")]
        data = json.loads(message)
        event = data.get("event")
        if set(data) != _EXPECTED.get(event) or data.get("streamSid") != self.stream_sid:
            return [Inbound("invalid", text=message[:200])]
        if event == "media":
            return [Inbound("media", pcm=ulaw_decode(base64.b64decode(data["media"]["payload"])))]
        if event == "mark":
            return [Inbound("mark", name=data["mark"]["name"])]
        return [Inbound("clear")]
