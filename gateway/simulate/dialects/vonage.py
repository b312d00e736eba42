"""Vonage's side of a call: JWT-signed JSON answer webhook, NCCO answer, websocket leg with binary
L16 audio (exactly 20 ms per frame) and JSON text events.

Credentials: ``signature_secret`` (signs the webhook), optional ``application_id``, ``api_key``,
``rate`` ("8000" / "16000" / "24000", default 16000: must match the gateway's NCCO) and
``answer_method`` ("POST", default, or "GET" with the parameters in the query).
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
import warnings
from collections.abc import Mapping
from typing import Any, ClassVar
from urllib.parse import urlencode

import jwt

from gateway.simulate.dialects.base import Inbound, Webhook

__all__ = ["VonageDialect"]


class VonageDialect:
    name: ClassVar[str] = "vonage"
    frame_ms = 20

    def __init__(self, *, credentials: Mapping[str, str], from_: str, to: str) -> None:
        self.signature_secret = credentials.get("signature_secret", "")
        self.application_id = credentials.get("application_id") or str(uuid.uuid4())
        self.api_key = credentials.get("api_key", "a1b2c3d4")
        self.method = credentials.get("answer_method", "POST").upper()
        self.rate = int(credentials.get("rate", "16000"))
        self.call_id = str(uuid.uuid4())                   # the caller's leg: what PUT /v1/calls/{uuid} takes
        self.conversation_uuid = f"CON-{uuid.uuid4()}"
        self.from_, self.to = from_.lstrip("+"), to.lstrip("+")   # Vonage sends numbers without +
        self.parameters: dict[str, str] = {}               # the NCCO websocket headers
        self.ws_authorization = ""
        self._frame_bytes = self.rate * self.frame_ms // 1000 * 2
        self._notify: dict[str, dict[str, Any]] = {}      # marker name -> the payload to echo

    def webhook_params(self, **extra: str) -> dict[str, str]:
        return {"from": self.from_, "to": self.to, "uuid": self.call_id,
                "conversation_uuid": self.conversation_uuid, "region_url": "https://api-us-3.vonage.com", **extra}

    def token(self, payload: bytes, *, iat: float | None = None, **claims: Any) -> str:
        """The HS256 JWT Vonage puts in ``Authorization: Bearer`` for ``payload``."""
        body = {"iat": int(time.time() if iat is None else iat), "jti": str(uuid.uuid4()), "iss": "Vonage",
                "payload_hash": hashlib.sha256(payload).hexdigest(), "api_key": self.api_key,
                "application_id": self.application_id, **claims}
        with warnings.catch_warnings():   # Vonage's secrets are what they are; the gateway warns about short ones
            warnings.simplefilter("ignore", getattr(jwt, "InsecureKeyLengthWarning", UserWarning))
            token = str(jwt.encode(body, self.signature_secret, algorithm="HS256"))
        return token

    def webhook(self, public_url: str, extra: Mapping[str, str], *, path: str = "/start/vonage",
                signature: str | None = None) -> Webhook:
        params = self.webhook_params(**extra)
        if self.method == "GET":
            payload = json.dumps(params, separators=(",", ":")).encode()
            token = signature if signature is not None else self.token(payload)
            sep = "&" if "?" in path else "?"
            return Webhook("GET", f"{path}{sep}{urlencode(params)}", {"Authorization": f"Bearer {token}"})
        body = json.dumps(params, separators=(",", ":")).encode()
        token = signature if signature is not None else self.token(body)
        return Webhook("POST", path, {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}, body)

    def answer(self, status: int, text: str) -> str:
        ncco = json.loads(text)
        if not isinstance(ncco, list):
            raise AssertionError(f"NCCO is not a JSON array: {text[:200]}")
        for action in ncco:
            if not isinstance(action, dict) or action.get("action") != "connect":
                continue
            for endpoint in action.get("endpoint", []):
                if endpoint.get("type") != "websocket":
                    continue
                uri = endpoint.get("uri")
                if not isinstance(uri, str) or not uri.startswith(("ws://", "wss://")):
                    raise AssertionError(f"NCCO websocket uri is not ws(s)://: {uri!r}")
                if endpoint.get("content-type") != f"audio/l16;rate={self.rate}":
                    raise AssertionError(f"NCCO content-type {endpoint.get('content-type')!r} does not match "
                                         f"this call's rate {self.rate}")
                headers = endpoint.get("headers", {})
                if len(json.dumps(headers, separators=(",", ":")).encode()) > 512:
                    raise AssertionError("NCCO websocket headers exceed Vonage's 512 bytes")
                self.parameters = dict(headers)
                auth = endpoint.get("authorization")
                self.ws_authorization = auth.get("value", "") if isinstance(auth, dict) and \
                    auth.get("type") == "custom" else ""
                return uri
        raise AssertionError(f"NCCO has no connect action with a websocket endpoint: {text[:200]}")

    def ws_headers(self) -> dict[str, str]:
        return {"Authorization": self.ws_authorization} if self.ws_authorization else {}

    def start_message(self) -> dict[str, Any]:
        """``websocket:connected``: the NCCO headers flattened to the top level."""
        return {"event": "websocket:connected", "content-type": f"audio/l16;rate={self.rate}", **self.parameters}

    def opening(self) -> list[str | bytes]:
        return [json.dumps(self.start_message())]

    def media(self, pcm: bytes) -> bytes:
        if len(pcm) != self._frame_bytes:
            raise ValueError(f"Vonage sends exactly {self._frame_bytes} bytes per frame (got {len(pcm)})")
        return pcm

    def dtmf(self, digit: str) -> str:
        return json.dumps({"event": "websocket:dtmf", "digit": digit, "duration": 260})

    def mark_ack(self, name: str) -> str:
        payload = self._notify.pop(name, {"name": name})
        return json.dumps({"event": "websocket:notify", "payload": payload})

    def stop(self) -> list[str | bytes]:
        return []   # Vonage has no stop message: the socket simply closes

    def parse(self, message: str | bytes) -> list[Inbound]:
        if isinstance(message, (bytes, bytearray)):
            if len(message) != self._frame_bytes:
                return [Inbound("invalid", text=f"binary frame of {len(message)} bytes "
                                                f"(Vonage needs exactly {self._frame_bytes})")]
            return [Inbound("media", pcm=bytes(message))]
        try:
            data = json.loads(message)
        except ValueError:
            return [Inbound("invalid", text=message[:200])]
        if data == {"action": "clear"}:
            return [Inbound("clear")]
        if isinstance(data, dict) and data.get("action") == "notify" and set(data) == {"action", "payload"} \
                and isinstance(data["payload"], dict):
            name = str(data["payload"].get("name", ""))
            self._notify[name] = data["payload"]
            return [Inbound("mark", name=name)]
        return [Inbound("invalid", text=message[:200])]
