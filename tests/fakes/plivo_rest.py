"""A fake of the Plivo Voice REST API (the call endpoints Voxray uses), checking what the real API checks.

Endpoints, all under ``/v1/Account/{auth_id}/`` with HTTP Basic ``auth_id:auth_token`` and a JSON
body (what plivo-python sends): ``POST Call/`` (dial), ``DELETE Call/{uuid}/`` (hang up),
``POST Call/{uuid}/`` (transfer), ``POST Call/{uuid}/DTMF/`` and ``DELETE Request/{uuid}/`` (cancel a
dialled call that was not answered). Errors use Plivo's shape ``{"api_id": ..., "error": ...}``:
401 bad credentials, 404 unknown or already-ended call, 400 bad body; 204 for a hang-up.

Usage::

    async with FakePlivoREST("MA" + "0" * 18, "token") as fake:
        fake.known_calls = {"12345678-1234-1234-1234-123456789abc"}
        carrier = PlivoCarrier(auth_id=..., auth_token="token", http=client, api_base_url=fake.base_url)
        await carrier.hang_up(call)
        assert fake.ended_calls == [call.call_id]
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import re
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tests.fakes._server import LocalServer

__all__ = ["FakePlivoREST", "RecordedRequest"]

_ROUTE = re.compile(r"^/v1/Account/(?P<account>[^/]+)/(?P<rest>.*)$")
_CALL = re.compile(r"^Call/(?P<call>[^/]+)/$")
_DTMF = re.compile(r"^Call/(?P<call>[^/]+)/DTMF/$")
_REQUEST = re.compile(r"^Request/(?P<request>[^/]+)/$")
_DIGITS = re.compile(r"^[0-9*#wWA-D]+$")
_LIVE = frozenset({"ringing", "in-progress"})
_DIAL_FIELDS = frozenset({
    "from", "to", "answer_url", "answer_method", "ring_url", "ring_method", "hangup_url", "hangup_method",
    "fallback_url", "fallback_method", "caller_name", "send_digits", "send_on_preanswer", "time_limit",
    "hangup_on_ring", "machine_detection", "machine_detection_time", "machine_detection_url",
    "machine_detection_method", "sip_headers", "ring_timeout", "parent_call_uuid", "error_if_parent_not_found",
})
_TRANSFER_FIELDS = frozenset({"legs", "aleg_url", "aleg_method", "bleg_url", "bleg_method",
                              "callback_url", "callback_method"})
_DTMF_FIELDS = frozenset({"digits", "leg", "callback_url", "callback_method"})


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str
    body: Any               # the parsed JSON body (None when there was none)
    content_type: str
    auth_ok: bool


def _error(status: int, error: Any) -> JSONResponse:
    return JSONResponse({"api_id": str(uuid.uuid4()), "error": error}, status_code=status)


def _ok(status: int, **fields: Any) -> JSONResponse:
    return JSONResponse({"api_id": str(uuid.uuid4()), **fields}, status_code=status)


def _is_url(value: Any) -> bool:
    return isinstance(value, str) and re.match(r"^https?://[^\s/]+", value) is not None




class FakePlivoREST(LocalServer):
    """Async context manager serving the fake on 127.0.0.1 (ephemeral port)."""

    def __init__(self, auth_id: str, auth_token: str) -> None:
        self.auth_id = auth_id
        self.auth_token = auth_token
        self.calls: dict[str, str] = {}           # CallUUID -> status
        self.queued: set[str] = set()             # request_uuids dialled and not answered
        self.requests: list[RecordedRequest] = []
        self.ended_calls: list[str] = []
        self.canceled_requests: list[str] = []
        self.transfers: list[tuple[str, dict[str, Any]]] = []
        self.dialed: list[dict[str, Any]] = []
        self.dtmf: list[tuple[str, str]] = []
        self.force_error: tuple[int, str] | None = None   # (HTTP status, error text)
        self.app = Starlette(routes=[Route("/{path:path}", self._handle, methods=["GET", "POST", "DELETE", "PUT"])])
        super().__init__("fake plivo REST", self.app)

    @property
    def known_calls(self) -> set[str]:
        return set(self.calls)

    @known_calls.setter
    def known_calls(self, uuids: Iterable[str]) -> None:
        self.calls = {u: "in-progress" for u in uuids}

    def answer(self, request_uuid: str) -> str:
        """The callee picks up a dialled call: it gets a CallUUID and leaves the request queue."""
        self.queued.discard(request_uuid)
        call_uuid = str(uuid.uuid4())
        self.calls[call_uuid] = "in-progress"
        return call_uuid

    def _auth_ok(self, header: str) -> bool:
        scheme, _, encoded = header.partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            user, sep, password = base64.b64decode(encoded, validate=True).decode("utf-8").partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return False
        return bool(sep) and hmac.compare_digest(user, self.auth_id) and hmac.compare_digest(password, self.auth_token)

    async def _handle(self, request: Request) -> Response:
        path = request.url.path
        raw = await request.body()
        content_type = request.headers.get("content-type", "")
        body: Any = None
        if raw:
            try:
                body = json.loads(raw)
            except ValueError:
                body = raw.decode("utf-8", "replace")
        auth_ok = self._auth_ok(request.headers.get("authorization", ""))
        self.requests.append(RecordedRequest(request.method, path, body, content_type, auth_ok))

        match = _ROUTE.match(path)
        if match is None:
            return Response("<h1>Not Found</h1>", status_code=404, media_type="text/html")
        if not auth_ok or match["account"] != self.auth_id:
            return _error(401, "Authentication failed")
        if self.force_error is not None:
            return _error(*self.force_error)
        rest, method = match["rest"], request.method
        if method == "POST":
            if not content_type.startswith("application/json") or not isinstance(body, dict):
                return _error(400, "request body must be a JSON object")
            if rest == "Call/":
                return self._dial(body)
            if (m := _DTMF.match(rest)) is not None:
                return self._send_dtmf(m["call"], body)
            if (m := _CALL.match(rest)) is not None:
                return self._transfer(m["call"], body)
        elif method == "DELETE":
            if (m := _CALL.match(rest)) is not None:
                return self._hang_up(m["call"])
            if (m := _REQUEST.match(rest)) is not None:
                return self._cancel(m["request"])
        if rest == "Call/" or _CALL.match(rest) or _DTMF.match(rest) or _REQUEST.match(rest):
            return _error(405, f'method "{method}" not allowed')
        return Response("<h1>Not Found</h1>", status_code=404, media_type="text/html")

    def _dial(self, body: dict[str, Any]) -> Response:
        unknown = sorted(set(body) - _DIAL_FIELDS)
        if unknown:
            return _error(400, f"unexpected parameter {unknown[0]}")
        for field in ("from", "to", "answer_url"):
            if not isinstance(body.get(field), str) or not body[field]:
                return _error(400, f"{field} parameter is required")
        if body["from"] in body["to"].split("<"):
            return _error(400, "src and destination cannot overlap")
        for field in ("answer_url", "hangup_url", "ring_url", "fallback_url", "machine_detection_url"):
            if field in body and not _is_url(body[field]):
                return _error(400, f"{field} must be a valid URL")
        for field in ("answer_method", "hangup_method", "ring_method", "fallback_method", "machine_detection_method"):
            if field in body and body[field] not in ("GET", "POST"):
                return _error(400, f"{field} must be GET or POST")
        if "machine_detection" in body and body["machine_detection"] not in ("true", "hangup"):
            return _error(400, "machine_detection must be true or hangup")
        if "machine_detection_time" in body:
            value = body["machine_detection_time"]
            if not isinstance(value, int) or isinstance(value, bool) or not 2000 <= value <= 10000:
                return _error(400, "machine_detection_time must be between 2000 and 10000")
        request_uuid = str(uuid.uuid4())
        self.queued.add(request_uuid)
        self.dialed.append(dict(body))
        return _ok(201, message="call fired", request_uuid=request_uuid)

    def _hang_up(self, call_uuid: str) -> Response:
        if self.calls.get(call_uuid) not in _LIVE:
            return _error(404, "not found")
        self.calls[call_uuid] = "completed"
        self.ended_calls.append(call_uuid)
        return Response(status_code=204)

    def _cancel(self, request_uuid: str) -> Response:
        if request_uuid not in self.queued:
            return _error(404, "not found")
        self.queued.discard(request_uuid)
        self.canceled_requests.append(request_uuid)
        return Response(status_code=204)

    def _transfer(self, call_uuid: str, body: dict[str, Any]) -> Response:
        unknown = sorted(set(body) - _TRANSFER_FIELDS)
        if unknown:
            return _error(400, f"unexpected parameter {unknown[0]}")
        legs = body.get("legs")
        if legs not in ("aleg", "bleg", "both"):
            return _error(400, "legs must be aleg, bleg or both")
        for leg in (("aleg",) if legs == "aleg" else ("bleg",) if legs == "bleg" else ("aleg", "bleg")):
            if not _is_url(body.get(f"{leg}_url")):
                return _error(400, f"{leg}_url parameter is required (a valid URL)")
            if body.get(f"{leg}_method", "POST") not in ("GET", "POST"):
                return _error(400, f"{leg}_method must be GET or POST")
        if self.calls.get(call_uuid) not in _LIVE:
            return _error(404, "call not found")
        self.transfers.append((call_uuid, dict(body)))
        return _ok(202, message="call transferred")

    def _send_dtmf(self, call_uuid: str, body: dict[str, Any]) -> Response:
        unknown = sorted(set(body) - _DTMF_FIELDS)
        if unknown:
            return _error(400, f"unexpected parameter {unknown[0]}")
        digits = body.get("digits")
        if not isinstance(digits, str) or not _DIGITS.match(digits):
            return _error(400, "digits parameter is required (0-9, *, #, A-D, w, W)")
        if body.get("leg", "aleg") not in ("aleg", "bleg"):
            return _error(400, "leg must be aleg or bleg")
        if self.calls.get(call_uuid) not in _LIVE:
            return _error(404, "call not found")
        self.dtmf.append((call_uuid, digits))
        return _ok(202, message="digits sent")
