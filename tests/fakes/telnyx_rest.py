"""A fake of the Telnyx REST API (Call Control v2 and TeXML), checking what the real API checks.

Implemented: ``POST /v2/calls`` (dial), ``POST /v2/calls/{call_control_id}/actions/{answer,hangup,transfer,
send_dtmf,streaming_start,streaming_stop}``, ``POST /v2/texml/Accounts/{account_sid}/Calls`` (create) and
``.../Calls/{call_sid}`` (update: ``Status``, ``Texml``, ``Url``). Auth is ``Authorization: Bearer <API key>``.
Errors use Telnyx's shape ``{"errors": [{"code", "title", "detail", "source"}]}`` with codes as strings:
``10009`` (401 bad auth), ``10005`` (404 unknown resource), ``90018`` (422 call already ended); the codes for
malformed (``10015``, 400/422) and missing (``10004``, 422) fields are representative, not confirmed.

Usage::

    async with FakeTelnyxREST("KEY0123", connection_id="1494404757140276705") as fake:
        fake.known_calls = {"v3:abc123"}
        carrier = TelnyxCarrier(api_key="KEY0123", ..., api_base_url=fake.base_url)
        await carrier.hang_up(call)
        assert fake.ended_calls == ["v3:abc123"]
        assert fake.requests[-1].body == {}
"""

from __future__ import annotations

import hmac
import json
import re
import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, unquote

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tests.fakes._server import LocalServer

__all__ = ["FakeTelnyxREST", "RecordedRequest"]

_ACTION = re.compile(r"^/v2/calls/(?P<call>[^/]+)/actions/(?P<action>[a-z_]+)$")
_TEXML_CALLS = re.compile(r"^/v2/texml/Accounts/(?P<account>[^/]+)/Calls(?:/(?P<call>[^/]+))?$")
_CODECS = frozenset({"PCMU", "PCMA", "G722", "OPUS", "AMR-WB", "L16"})
_STREAM_ENUMS: dict[str, frozenset[Any]] = {
    "stream_track": frozenset({"inbound_track", "outbound_track", "both_tracks"}),
    "stream_codec": _CODECS | {"default"},
    "stream_bidirectional_mode": frozenset({"mp3", "rtp"}),
    "stream_bidirectional_codec": _CODECS,
    "stream_bidirectional_sampling_rate": frozenset({8000, 16000, 22050, 24000, 48000}),
    "stream_bidirectional_target_legs": frozenset({"both", "self", "opposite"}),
    "answering_machine_detection": frozenset({"premium", "detect", "detect_beep", "detect_words",
                                              "greeting_end", "disabled"}),
}
_DIGITS = re.compile(r"^[0-9*#A-DwW]+$")


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str                  # decoded (``/v2/calls/v3:abc/actions/hangup``)
    body: dict[str, Any]       # the JSON object, or the form with single values
    content_type: str
    auth_ok: bool


def _error(status: int, code: str, title: str, detail: str = "", pointer: str = "") -> JSONResponse:
    error: dict[str, Any] = {"code": code, "title": title, "detail": detail or title}
    if pointer:
        error["source"] = {"pointer": pointer}
    return JSONResponse({"errors": [error]}, status_code=status)


def _invalid(field: str, detail: str) -> JSONResponse:
    return _error(422, "10015", "Invalid value", detail, f"/{field}")


def _missing(field: str) -> JSONResponse:
    return _error(422, "10004", "Missing required parameter", f"The '{field}' parameter is required.", f"/{field}")




class FakeTelnyxREST(LocalServer):
    """Async context manager serving the fake on 127.0.0.1 (ephemeral port)."""

    def __init__(self, api_key: str, *, connection_id: str = "1494404757140276705",
                 account_sid: str = "61bf923e-5e4d-4595-a110-56190ea18a1b") -> None:
        self.api_key = api_key
        self.connection_id = connection_id
        self.account_sid = account_sid
        self.calls: dict[str, str] = {}  # call id -> "parked" | "active" | "ended"
        self.requests: list[RecordedRequest] = []
        self.ended_calls: list[str] = []
        self.answered: list[tuple[str, dict[str, Any]]] = []
        self.streaming: list[tuple[str, dict[str, Any]]] = []     # streaming_start bodies
        self.streams_stopped: list[str] = []
        self.transfers: list[tuple[str, str]] = []                # (call id, target or TeXML)
        self.dialed: list[dict[str, Any]] = []
        self.dtmf: list[tuple[str, str]] = []
        self.force_error: tuple[int, str, str] | None = None     # (HTTP status, code, title)
        self.app = Starlette(routes=[Route("/{path:path}", self._handle, methods=["GET", "POST", "PUT", "DELETE"])])
        super().__init__("fake telnyx REST", self.app)

    @property
    def known_calls(self) -> set[str]:
        return set(self.calls)

    @known_calls.setter
    def known_calls(self, ids: Iterable[str]) -> None:
        self.calls = {call_id: "active" for call_id in ids}

    # ------------------------------------------------------------------------------ dispatch
    async def _handle(self, request: Request) -> Response:
        path = unquote(request.url.path)
        raw = await request.body()
        content_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
        auth = request.headers.get("authorization", "")
        auth_ok = auth[:7].lower() == "bearer " and hmac.compare_digest(auth[7:].encode(), self.api_key.encode())
        body: Any = {}
        bad_body = False
        if content_type == "application/json":
            try:
                body = json.loads(raw) if raw else {}
            except ValueError:
                bad_body = True
        elif content_type == "application/x-www-form-urlencoded":
            body = dict(parse_qsl(raw.decode("utf-8", "replace"), keep_blank_values=True))
        elif raw:
            bad_body = True
        self.requests.append(RecordedRequest(request.method, path, body if isinstance(body, dict) else {},
                                             content_type, auth_ok))

        if not auth_ok:
            return _error(401, "10009", "Authentication failed", "Could not understand the provided credentials.")
        action, texml = _ACTION.match(path), _TEXML_CALLS.match(path)
        if path == "/v2/calls" or action or texml:
            if request.method != "POST":
                return _error(405, "10015", "Method not allowed", f"{request.method} is not allowed on {path}")
            if bad_body or not isinstance(body, dict) or (not texml and content_type not in ("application/json", "")):
                return _error(400, "10015", "Bad Request", "The request body is not a JSON object.")
            if self.force_error is not None:
                status, code, title = self.force_error
                return _error(status, code, title)
        if path == "/v2/calls":
            return self._dial(body)
        if action:
            return self._action(action["call"], action["action"], body)
        if texml:
            if texml["account"] != self.account_sid:
                return _error(404, "10005", "Resource not found", f"Account {texml['account']} was not found.")
            if texml["call"] is None:
                return self._texml_create(body)
            return self._texml_update(texml["call"], body)
        return _error(404, "10005", "Resource not found", f"The requested resource {path} was not found.")

    def _known(self, call_id: str) -> Response | None:
        state = self.calls.get(call_id)
        if state is None:
            return _error(404, "10005", "Resource not found", f"Call {call_id} was not found.")
        if state == "ended":
            return _error(422, "90018", "Call has already ended",
                          "This call is no longer active and can't receive commands.")
        return None

    # ------------------------------------------------------------------------------ Call Control
    def _check_stream(self, body: dict[str, Any]) -> Response | None:
        url = body.get("stream_url")
        if url is not None and (not isinstance(url, str) or not url.startswith(("wss://", "ws://"))):
            return _invalid("stream_url", "stream_url must be a WebSocket URL.")
        for field, allowed in _STREAM_ENUMS.items():
            if field in body and body[field] not in allowed:
                return _invalid(field, f"{field} must be one of {sorted(map(str, allowed))}.")
        token = body.get("stream_auth_token")
        if token is not None and (not isinstance(token, str) or len(token) > 4000):
            return _invalid("stream_auth_token", "stream_auth_token must be a string of at most 4000 characters.")
        params = body.get("custom_parameters")
        if params is not None and not (isinstance(params, list) and all(
                isinstance(p, dict) and set(p) == {"name", "value"} and all(isinstance(v, str) for v in p.values())
                for p in params)):
            return _invalid("custom_parameters", "custom_parameters must be a list of {name, value} strings.")
        return None

    def _action(self, call_id: str, action: str, body: dict[str, Any]) -> Response:
        if action not in ("answer", "hangup", "transfer", "send_dtmf", "streaming_start", "streaming_stop"):
            return _error(404, "10005", "Resource not found", f"Unknown call action {action}.")
        if (refused := self._known(call_id)) is not None:
            return refused
        if action == "answer":
            if (refused := self._check_stream(body)) is not None:
                return refused
            for field in ("stream_bidirectional_sampling_rate", "stream_auth_token", "custom_parameters"):
                if field in body:  # not answer parameters (the SDK has none): refuse so a test notices
                    return _invalid(field, f"{field} is not an answer parameter; use streaming_start.")
            self.calls[call_id] = "active"
            self.answered.append((call_id, body))
        elif action == "streaming_start":
            if not isinstance(body.get("stream_url"), str):
                return _missing("stream_url")
            if (refused := self._check_stream(body)) is not None:
                return refused
            self.streaming.append((call_id, body))
        elif action == "streaming_stop":
            self.streams_stopped.append(call_id)
        elif action == "hangup":
            self.calls[call_id] = "ended"
            self.ended_calls.append(call_id)
        elif action == "transfer":
            if not isinstance(body.get("to"), str) or not body["to"]:
                return _missing("to")
            self.calls[call_id] = "ended"  # our leg leaves the call
            self.transfers.append((call_id, body["to"]))
        elif action == "send_dtmf":
            digits = body.get("digits")
            if not isinstance(digits, str) or not digits:
                return _missing("digits")
            if not _DIGITS.match(digits):
                return _invalid("digits", "digits may only contain 0-9, A-D, *, #, w and W.")
            self.dtmf.append((call_id, digits))
        return JSONResponse({"data": {"result": "ok"}})

    def _dial(self, body: dict[str, Any]) -> Response:
        for field in ("connection_id", "from", "to"):
            if not isinstance(body.get(field), str) or not body[field]:
                return _missing(field)
        if body["connection_id"] != self.connection_id:
            return _invalid("connection_id", "The connection_id is not a Call Control connection of this account.")
        if (refused := self._check_stream(body)) is not None:
            return refused
        call_id = "v3:" + secrets.token_urlsafe(24)
        self.calls[call_id] = "active"
        self.dialed.append(body)
        return JSONResponse({"data": {"call_control_id": call_id, "call_leg_id": secrets.token_hex(8),
                                      "call_session_id": secrets.token_hex(8), "is_alive": False,
                                      "record_type": "call", "start_time": time.strftime("%Y-%m-%dT%H:%M:%SZ")}})

    # ------------------------------------------------------------------------------ TeXML
    def _texml_create(self, body: dict[str, Any]) -> Response:
        for field in ("ApplicationSid", "To", "From"):
            if not isinstance(body.get(field), str) or not body[field]:
                return _missing(field)
        if body["ApplicationSid"] != self.connection_id:
            return _invalid("ApplicationSid", "The ApplicationSid is not a TeXML application of this account.")
        if not body.get("Url") and not body.get("Texml"):
            return _missing("Url")
        if "MachineDetection" in body and body["MachineDetection"] not in ("Enable", "Disable", "DetectMessageEnd"):
            return _invalid("MachineDetection", "MachineDetection must be Enable, Disable or DetectMessageEnd.")
        call_id = "v3:" + secrets.token_urlsafe(24)
        self.calls[call_id] = "active"
        self.dialed.append(body)
        return JSONResponse({"call_sid": call_id, "from": body["From"], "to": body["To"], "status": "queued"})

    def _texml_update(self, call_id: str, body: dict[str, Any]) -> Response:
        if (refused := self._known(call_id)) is not None:
            return refused
        status = body.get("Status")
        if status is not None:
            if status not in ("completed", "canceled"):
                return _invalid("Status", "Status must be completed or canceled.")
            self.calls[call_id] = "ended"
            self.ended_calls.append(call_id)
        elif isinstance(body.get("Texml"), str) or isinstance(body.get("Url"), str):
            self.calls[call_id] = "ended"
            self.transfers.append((call_id, body.get("Texml") or body["Url"]))
        else:
            return _missing("Status")
        return JSONResponse({"account_sid": self.account_sid, "sid": call_id,
                             "status": "completed" if status else "in-progress", "direction": "inbound",
                             "uri": f"/v2/texml/Accounts/{self.account_sid}/Calls/{call_id}.json"})

    # ------------------------------------------------------------------------------ lifecycle
