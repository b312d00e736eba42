"""A fake of the Exotel REST endpoints ``ExotelCarrier`` uses, checking what the real API checks.

* ``POST /v1/Accounts/{sid}/Calls/connect[.json]`` — Connect Voice AI (``From``, ``CallerId``,
  ``StreamUrl``, ``StreamType=bidirectional``) or Connect-two-numbers (``From``, ``To``, ``CallerId``),
  form-encoded (the real API also takes multipart, which the carrier does not use). Answers XML
  (``<TwilioResponse><Call>``) without ``.json`` and JSON (``{"Call": {...}}``) with it, as the
  classic v1 API does; errors are ``RestException`` in the same format. The lowercase path (``/v1/accounts/{sid}/calls/connect``) answers only when
  ``accept_lowercase`` is set.
* ``POST /v2/accounts/{sid}/legs/{leg_sid}/actions`` with ``{"exoml": "...<Hangup/>..."}`` — the
  Legs API hang-up (202; 404 for an unknown or ended leg, in the v2 error shape).

All need HTTP Basic ``api_key:api_token``.

Usage::

    async with FakeExotelREST("acme1", "key", "token") as fake:
        carrier = ExotelCarrier(sid="acme1", api_key="key", api_token="token", http=client,
                                api_base_url=fake.base_url, legs_api_base_url=fake.base_url)
        call = await carrier.dial(request)
        assert fake.dialed[0]["StreamUrl"].startswith("wss://")
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hmac
import itertools
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs
from xml.sax.saxutils import escape

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tests.fakes._server import LocalServer

__all__ = ["FakeExotelREST", "RecordedRequest"]

_CONNECT = re.compile(r"^/v1/(?P<a>Accounts|accounts)/(?P<sid>[^/]+)/(?P<c>Calls|calls)/connect(?P<json>\.json)?$")
_LEG_ACTIONS = re.compile(r"^/v2/accounts/(?P<sid>[^/]+)/legs/(?P<leg>[^/]+)/actions$")
_EVENTS = frozenset({"answered", "terminal", "ringing"})


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str
    form: dict[str, list[str]]
    json: Any
    auth_ok: bool




class FakeExotelREST(LocalServer):
    """Async context manager serving the fake on 127.0.0.1 (ephemeral port)."""

    def __init__(self, sid: str, api_key: str, api_token: str) -> None:
        self.sid = sid
        self.api_key = api_key
        self.api_token = api_token
        self.calls: dict[str, str] = {}  # CallSid / leg sid -> status
        self.requests: list[RecordedRequest] = []
        self.ended_calls: list[str] = []
        self.transfers: list[dict[str, str]] = []
        self.dialed: list[dict[str, str]] = []
        self.dtmf: list[tuple[str, str]] = []  # Exotel has no DTMF endpoint: stays empty
        self.accept_lowercase = False
        self.force_error: tuple[int, str] | None = None  # (HTTP status, message)
        self._ids = itertools.count(1)
        self.app = Starlette(routes=[Route("/{path:path}", self._handle, methods=["GET", "POST", "PUT", "DELETE"])])
        super().__init__("fake exotel REST", self.app)

    @property
    def known_calls(self) -> set[str]:
        return set(self.calls)

    @known_calls.setter
    def known_calls(self, sids: Iterable[str]) -> None:
        self.calls = {sid: "in-progress" for sid in sids}

    def _auth_ok(self, header: str) -> bool:
        scheme, _, encoded = header.partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            user, sep, password = base64.b64decode(encoded, validate=True).decode("utf-8").partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return False
        return bool(sep) and hmac.compare_digest(user, self.api_key) and hmac.compare_digest(password, self.api_token)

    async def _handle(self, request: Request) -> Response:
        path = request.url.path
        body = await request.body()
        content_type = request.headers.get("content-type", "")
        form: dict[str, list[str]] = {}
        data: Any = None
        if content_type.startswith("application/x-www-form-urlencoded"):
            form = parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True)
        elif content_type.startswith("application/json"):
            with contextlib.suppress(ValueError):
                data = json.loads(body)
        auth_ok = self._auth_ok(request.headers.get("authorization", ""))
        self.requests.append(RecordedRequest(request.method, path, form, data, auth_ok))

        if match := _LEG_ACTIONS.match(path):
            return self._leg_action(request.method, match, data, auth_ok)
        match = _CONNECT.match(path)
        as_json = bool(match and match["json"])
        if not auth_ok:
            return _rest_error(401, "Authentication failed. Invalid API Key or Token.", as_json)
        if match is None or (match["a"] == "accounts" or match["c"] == "calls") and not self.accept_lowercase:
            return _rest_error(404, f"The requested resource {path} was not found", as_json)
        if match["sid"] != self.sid:
            return _rest_error(401, "Account SID is invalid or does not match credentials.", as_json)
        if request.method != "POST":
            return _rest_error(405, "Method not allowed", as_json)
        if self.force_error is not None:
            return _rest_error(*self.force_error, as_json)
        fields = {k: v[0] for k, v in form.items()}
        problem = _check_connect(fields)
        if problem:
            return _rest_error(400, problem, as_json)
        call_sid = f"{next(self._ids):08x}" + "c0ffee" * 4
        self.calls[call_sid] = "in-progress"
        (self.dialed if "StreamUrl" in fields else self.transfers).append(fields)
        call = {"Sid": call_sid, "ParentCallSid": None, "AccountSid": self.sid, "To": fields.get("To", ""),
                "From": fields["From"], "PhoneNumberSid": fields["CallerId"], "Status": "in-progress",
                "Direction": "outbound-api", "DateCreated": "2026-08-01 10:00:00", "RecordingUrl": None,
                "Uri": f"/v1/Accounts/{self.sid}/Calls/{call_sid}"}
        if as_json:
            return JSONResponse({"Call": call})
        inner = "".join(f"<{k}>{escape(v or '')}</{k}>" for k, v in call.items())
        xml = f'<?xml version="1.0" encoding="UTF-8"?>\n<TwilioResponse><Call>{inner}</Call></TwilioResponse>'
        return Response(xml, media_type="application/xml")

    def _leg_action(self, method: str, match: re.Match[str], data: Any, auth_ok: bool) -> Response:
        if not auth_ok:
            return _v2_error(401, 1010, "Authentication failed")
        if match["sid"] != self.sid:
            return _v2_error(403, 1003, "Not authorized for this account")
        if method != "POST":
            return _v2_error(405, 1005, "Method not allowed")
        if self.force_error is not None:
            return _v2_error(self.force_error[0], 1500, self.force_error[1])
        exoml = data.get("exoml") if isinstance(data, dict) else None
        if not isinstance(exoml, str) or "<Flow>" not in exoml:
            return _v2_error(400, 1000, "Invalid exoml or parameters")
        leg = match["leg"]
        if self.calls.get(leg) not in ("queued", "ringing", "in-progress"):
            return _v2_error(404, 1002, "Leg not found")
        if "<Hangup/>" in exoml:
            self.calls[leg] = "completed"
            self.ended_calls.append(leg)
        return JSONResponse({"request_id": "req" + leg[:8], "http_code": 202,
                             "response": {"data": {"leg_sid": leg}}}, status_code=202)


def _check_connect(fields: dict[str, str]) -> str:
    """What the real API refuses in a Calls/connect body ('' when it is acceptable)."""
    for name in ("From", "CallerId"):
        if not fields.get(name):
            return f"Missing parameter {name}"
    stream, flow, to = fields.get("StreamUrl"), fields.get("Url"), fields.get("To")
    if sum(bool(x) for x in (stream, flow, to)) != 1:
        return "Exactly one of StreamUrl, Url or To is required"
    if stream is not None:
        if not stream.startswith(("ws://", "wss://")):
            return "StreamUrl must be a ws:// or wss:// URL"
        if len(stream) >= 600:
            return "StreamUrl must be under 600 characters"
        if fields.get("StreamType") != "bidirectional":
            return "StreamType must be bidirectional"
    elif "StreamType" in fields:
        return "StreamType is only valid with StreamUrl"
    events = [v for k, v in fields.items() if k.startswith("StatusCallbackEvents")]
    if any(e not in _EVENTS for e in events):
        return "StatusCallbackEvents must be answered, terminal or ringing"
    if events and not fields.get("StatusCallback"):
        return "StatusCallbackEvents needs StatusCallback"
    if len(fields.get("CustomField", "")) > 128:
        return "CustomField must be at most 128 characters"
    if "TimeLimit" in fields and not (fields["TimeLimit"].isdigit() and 1 <= int(fields["TimeLimit"]) <= 14400):
        return "TimeLimit must be 1..14400"
    return ""


def _rest_error(status: int, message: str, as_json: bool) -> Response:
    if as_json:
        return JSONResponse({"RestException": {"Status": status, "Message": message, "Code": status}},
                            status_code=status)
    return Response(f'<?xml version="1.0" encoding="UTF-8"?>\n<TwilioResponse><RestException><Status>{status}'
                    f'</Status><Message>{escape(message)}</Message></RestException></TwilioResponse>',
                    status_code=status, media_type="application/xml")


def _v2_error(status: int, code: int, message: str) -> JSONResponse:
    return JSONResponse({"request_id": "req-error", "method": "POST", "http_code": status,
                         "response": {"code": status, "status": "failure", "data": None,
                                      "error_data": {"code": code, "message": message, "description": message}}},
                        status_code=status)
