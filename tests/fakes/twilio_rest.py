"""A fake of the Twilio REST call-update endpoint, checking what the real API checks.

Only ``POST /2010-04-01/Accounts/{AccountSid}/Calls/{CallSid}.json`` with ``Status`` is
implemented (that is all ``TwilioCarrier.hang_up`` uses). Errors use Twilio's JSON error shape
``{"code", "message", "more_info", "status"}``.

Usage::

    async with FakeTwilioREST("AC" + "0" * 32, "token") as fake:
        fake.known_calls = {"CA" + "0" * 31 + "2"}
        carrier = TwilioCarrier(account_sid=..., auth_token="token", http=client, api_base_url=fake.base_url)
        await carrier.hang_up(call)
        assert fake.ended_calls == [call.call_id]
        assert fake.requests[-1].form == {"Status": ["completed"]}
"""

from __future__ import annotations

import base64
import binascii
import hmac
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tests.fakes._server import LocalServer

__all__ = ["FakeTwilioREST", "RecordedRequest"]

_CALL_PATH = re.compile(r"^/2010-04-01/Accounts/(?P<account>[^/]+)/Calls/(?P<call>[^/]+)\.json$")
_END_STATUSES = frozenset({"completed", "canceled"})
_CREATE_PATH = re.compile(r"^/2010-04-01/Accounts/(?P<account>[^/]+)/Calls\.json$")


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str
    form: dict[str, list[str]]
    auth_ok: bool


def _error(status: int, code: int, message: str) -> JSONResponse:
    return JSONResponse(
        {
            "code": code,
            "message": message,
            "more_info": f"https://www.twilio.com/docs/errors/{code}",
            "status": status,
        },
        status_code=status,
    )




class FakeTwilioREST(LocalServer):
    """Async context manager serving the fake on 127.0.0.1 (ephemeral port)."""

    def __init__(self, account_sid: str, auth_token: str) -> None:
        self.account_sid = account_sid
        self.auth_token = auth_token
        self.calls: dict[str, str] = {}  # CallSid -> status
        self.requests: list[RecordedRequest] = []
        self.ended_calls: list[str] = []
        self.updates: list[tuple[str, str]] = []     # (CallSid, Twiml) of live-call redirects (transfers)
        self.dialed: list[dict[str, str]] = []       # outbound calls created
        self.force_error: tuple[int, int, str] | None = None  # (HTTP status, Twilio code, message)
        self.app = Starlette(routes=[Route("/{path:path}", self._handle, methods=["GET", "POST", "PUT", "DELETE"])])
        super().__init__("fake twilio REST", self.app)

    @property
    def known_calls(self) -> set[str]:
        """Call SIDs the fake knows (any status)."""
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
        return bool(sep) and hmac.compare_digest(user, self.account_sid) and hmac.compare_digest(
            password, self.auth_token
        )

    async def _handle(self, request: Request) -> Response:
        path = request.url.path
        body = await request.body()
        form: dict[str, list[str]] = {}
        if request.headers.get("content-type", "").startswith("application/x-www-form-urlencoded"):
            form = parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True)
        auth_ok = self._auth_ok(request.headers.get("authorization", ""))
        self.requests.append(RecordedRequest(request.method, path, form, auth_ok))

        if not auth_ok:
            return _error(401, 20003, "Authenticate")
        create = _CREATE_PATH.match(path)
        if create is not None and create["account"] == self.account_sid and request.method == "POST":
            return self._create(form)
        match = _CALL_PATH.match(path)
        if match is None or match["account"] != self.account_sid:
            return _error(404, 20404, f"The requested resource {path} was not found")
        if request.method != "POST":
            return _error(405, 20004, "Method not allowed")
        if self.force_error is not None:
            status, code, message = self.force_error
            return _error(status, code, message)
        call_sid = match["call"]
        if "Twiml" in form and "Status" not in form:       # redirect the live call (a transfer)
            if self.calls.get(call_sid) not in ("queued", "ringing", "in-progress"):
                return _error(404, 20404, f"The requested resource {path} was not found")
            [twiml] = form["Twiml"]
            if len(twiml) > 4000 or not twiml.startswith("<Response>"):
                return _error(400, 21620, "Twiml is not valid TwiML (or longer than 4000 characters)")
            self.updates.append((call_sid, twiml))
            return JSONResponse(self._call_json(call_sid))
        statuses = form.get("Status", [])
        if len(statuses) != 1 or statuses[0] not in _END_STATUSES:
            return _error(400, 20001, "Status must be one of completed, canceled")
        if self.calls.get(call_sid) not in ("queued", "ringing", "in-progress"):
            return _error(404, 20404, f"The requested resource {path} was not found")
        self.calls[call_sid] = statuses[0]
        self.ended_calls.append(call_sid)
        return JSONResponse(self._call_json(call_sid))

    def _create(self, form: dict[str, list[str]]) -> Response:
        """``POST Calls.json``: To, From and Twiml (or Url) are required, as on the real API."""
        for required in ("To", "From"):
            if len(form.get(required, [])) != 1:
                return _error(400, 21201 if required == "To" else 21213, f"No '{required}' number is specified")
        if "Twiml" not in form and "Url" not in form:
            return _error(400, 21205, "Url parameter is required (or Twiml)")
        call_sid = f"CA{len(self.calls) + 1:032x}"
        self.calls[call_sid] = "queued"
        self.dialed.append({k: v[0] for k, v in form.items()})
        return JSONResponse({**self._call_json(call_sid), "direction": "outbound-api"}, status_code=201)

    def _call_json(self, call_sid: str) -> dict[str, Any]:
        return {
            "sid": call_sid,
            "account_sid": self.account_sid,
            "status": self.calls[call_sid],
            "api_version": "2010-04-01",
            "direction": "inbound",
            "uri": f"/2010-04-01/Accounts/{self.account_sid}/Calls/{call_sid}.json",
        }
