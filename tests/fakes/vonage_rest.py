"""A fake of the Vonage Voice API call endpoints, checking what the real API checks.

Implemented: ``POST /v1/calls`` (create), ``PUT /v1/calls/{uuid}`` (``hangup`` / ``transfer``),
``PUT /v1/calls/{uuid}/dtmf``. Every request needs ``Authorization: Bearer <JWT>`` signed RS256
with the application's private key and carrying ``application_id``, ``iat``, ``jti`` (and an
``exp`` in the future if present). Errors use Vonage's RFC 7807 shape ``{"type", "title",
"detail", "instance"}`` (``application/problem+json``).

Usage::

    async with FakeVonageREST(APP_ID, public_key_pem) as fake:
        fake.known_calls = {CALL_UUID}
        carrier = VonageCarrier(..., api_base_url=fake.base_url)
        await carrier.hang_up(call)
        assert fake.ended_calls == [CALL_UUID]
        assert fake.requests[-1].json == {"action": "hangup"}
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import jwt
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tests.fakes._server import LocalServer

__all__ = ["FakeVonageREST", "RecordedRequest"]

_CALL_PATH = re.compile(r"^/v1/calls/(?P<call>[^/]+)$")
_DTMF_PATH = re.compile(r"^/v1/calls/(?P<call>[^/]+)/dtmf$")
_LIVE = frozenset({"started", "ringing", "answered"})
_NUMBER = re.compile(r"[1-9][0-9]{6,14}")
_DIGITS = re.compile(r"[0-9#*p]+")
_SIP = re.compile(r"(sip|sips):\+?[\w|:.\-@;,=%&]+")
_AMD_MODES = frozenset({"default", "detect", "detect_beep"})


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str
    json: Any
    auth_ok: bool
    claims: dict[str, Any] | None


def _problem(status: int, code: str, title: str, detail: str, **extra: Any) -> JSONResponse:
    return JSONResponse(
        {"type": f"https://developer.nexmo.com/api-errors#{code}", "title": title, "detail": detail,
         "instance": uuid.uuid4().hex, **extra},
        status_code=status, media_type="application/problem+json")


def _bad(detail: str, name: str) -> JSONResponse:
    return _problem(400, "invalid-params", "Bad Request", detail,
                    invalid_parameters=[{"name": name, "reason": detail}])




class FakeVonageREST(LocalServer):
    """Async context manager serving the fake on 127.0.0.1 (ephemeral port)."""

    def __init__(self, application_id: str, public_key_pem: str | bytes) -> None:
        self.application_id = application_id
        self.public_key = public_key_pem
        self.calls: dict[str, str] = {}                     # uuid -> status
        self.requests: list[RecordedRequest] = []
        self.ended_calls: list[str] = []
        self.transfers: list[tuple[str, dict[str, Any]]] = []  # (uuid, destination)
        self.dialed: list[dict[str, Any]] = []              # request bodies of created calls
        self.dtmf: list[tuple[str, str]] = []               # (uuid, digits)
        self.force_error: tuple[int, str, str, str] | None = None   # (status, code, title, detail)
        # how a PUT on a call that has ended is answered: Vonage's generic not-found by default
        self.ended_call_error: tuple[int, str, str, str] = (
            404, "not-found", "Not Found", "The requested resource does not exist, or you do not have access to it")
        self.app = Starlette(routes=[Route("/{path:path}", self._handle, methods=["GET", "POST", "PUT", "DELETE"])])
        super().__init__("fake vonage REST", self.app)

    @property
    def known_calls(self) -> set[str]:
        return set(self.calls)

    @known_calls.setter
    def known_calls(self, uuids: Iterable[str]) -> None:
        self.calls = {u: "answered" for u in uuids}

    def _claims(self, header: str) -> dict[str, Any] | None:
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            return None
        try:
            claims = jwt.decode(token, self.public_key, algorithms=["RS256"],
                                options={"require": ["iat", "jti", "application_id"]}, leeway=5)
        except jwt.PyJWTError:
            return None
        if claims.get("application_id") != self.application_id or claims["iat"] > time.time() + 5:
            return None
        return dict(claims)

    async def _handle(self, request: Request) -> Response:
        path = request.url.path
        raw = await request.body()
        body: Any = None
        is_json = request.headers.get("content-type", "").split(";")[0].strip() == "application/json"
        if is_json:
            try:
                body = await request.json()
            except ValueError:
                body = None
        claims = self._claims(request.headers.get("authorization", ""))
        self.requests.append(RecordedRequest(request.method, path, body, claims is not None, claims))

        if claims is None:
            return _problem(401, "unauthorized", "Unauthorized", "You did not provide correct credentials.")
        if self.force_error is not None:
            status, code, title, detail = self.force_error
            return _problem(status, code, title, detail)
        if path == "/v1/calls":
            if request.method != "POST":
                return _problem(405, "method-not-allowed", "Method Not Allowed", f"{request.method} is not allowed")
            return self._create(body if is_json else raw)
        for pattern, handler in ((_CALL_PATH, self._modify), (_DTMF_PATH, self._dtmf)):
            match = pattern.match(path)
            if match is not None:
                if request.method != "PUT":
                    return _problem(405, "method-not-allowed", "Method Not Allowed",
                                    f"{request.method} is not allowed")
                if not isinstance(body, dict):
                    return _bad("The request body must be a JSON object", "body")
                call = match["call"]
                if self.calls.get(call) not in _LIVE:
                    status, code, title, detail = (
                        self.ended_call_error if call in self.calls else
                        (404, "not-found", "Not Found",
                         "The requested resource does not exist, or you do not have access to it"))
                    return _problem(status, code, title, detail)
                return handler(call, body)
        return _problem(404, "not-found", "Not Found",
                        "The requested resource does not exist, or you do not have access to it")

    def _modify(self, call: str, body: dict[str, Any]) -> Response:
        action = body.get("action")
        if action == "hangup":
            if set(body) != {"action"}:
                return _bad("hangup takes no other fields", "action")
            self.calls[call] = "completed"
            self.ended_calls.append(call)
            return Response(status_code=204)
        if action == "transfer":
            destination = body.get("destination")
            problem = _check_destination(destination)
            if problem:
                return _bad(problem, "destination")
            assert isinstance(destination, dict)
            self.transfers.append((call, destination))
            return Response(status_code=204)
        if action in ("mute", "unmute", "earmuff", "unearmuff"):
            return Response(status_code=204)
        return _bad("action must be one of hangup, transfer, mute, unmute, earmuff, unearmuff", "action")

    def _dtmf(self, call: str, body: dict[str, Any]) -> Response:
        digits = body.get("digits")
        if set(body) != {"digits"} or not isinstance(digits, str) or not _DIGITS.fullmatch(digits):
            return _bad("digits must be a string of 0-9 * # p", "digits")
        self.dtmf.append((call, digits))
        return JSONResponse({"message": "DTMF sent", "uuid": call})

    def _create(self, body: Any) -> Response:
        if not isinstance(body, dict):
            return _bad("The request body did not contain valid JSON", "body")
        problem = _check_create(body)
        if problem:
            return _bad(problem[1], problem[0])
        call = str(uuid.uuid4())
        self.calls[call] = "started"
        self.dialed.append(body)
        return JSONResponse({"uuid": call, "status": "started", "direction": "outbound",
                             "conversation_uuid": f"CON-{uuid.uuid4()}"}, status_code=201)


def _check_endpoint(endpoint: Any, *, websocket_ok: bool) -> str:
    if not isinstance(endpoint, dict):
        return "endpoint must be an object"
    kind = endpoint.get("type")
    if kind == "phone":
        return "" if isinstance(endpoint.get("number"), str) and _NUMBER.fullmatch(endpoint["number"]) else \
            "phone number must be 7-15 digits without +"
    if kind == "sip":
        return "" if isinstance(endpoint.get("uri"), str) and _SIP.match(endpoint["uri"]) else "invalid sip uri"
    if kind == "websocket" and websocket_ok:
        uri = endpoint.get("uri")
        if not isinstance(uri, str) or not uri.startswith(("ws://", "wss://")):
            return "websocket uri must be ws:// or wss://"
        if endpoint.get("content-type") not in ("audio/l16;rate=8000", "audio/l16;rate=16000", "audio/l16;rate=24000"):
            return "content-type must be audio/l16;rate=8000|16000|24000"
        headers = endpoint.get("headers", {})
        return "" if isinstance(headers, dict) else "headers must be an object"
    return f"unsupported endpoint type {kind!r}"


def _check_ncco(ncco: Any) -> str:
    if not isinstance(ncco, list) or not ncco:
        return "ncco must be a non-empty array"
    for action in ncco:
        if not isinstance(action, dict) or not isinstance(action.get("action"), str):
            return "every ncco action needs an action"
        if action["action"] == "connect":
            endpoints = action.get("endpoint")
            if not isinstance(endpoints, list) or len(endpoints) != 1:
                return "connect needs exactly one endpoint"
            problem = _check_endpoint(endpoints[0], websocket_ok=True)
            if problem:
                return problem
            if endpoints[0]["type"] == "phone" and not ("from" in action or action.get("randomFromNumber")):
                return "connect to a phone needs from or randomFromNumber"
            if "from" in action and not (isinstance(action["from"], str) and _NUMBER.fullmatch(action["from"])):
                return "from must be 7-15 digits without +"
    return ""


def _check_destination(destination: Any) -> str:
    if not isinstance(destination, dict) or destination.get("type") != "ncco":
        return "destination.type must be ncco"
    if ("ncco" in destination) == ("url" in destination):
        return "destination needs exactly one of ncco or url"
    if "url" in destination:
        url = destination["url"]
        return "" if isinstance(url, list) and url and all(isinstance(u, str) for u in url) else \
            "destination.url must be an array of URLs"
    return _check_ncco(destination["ncco"])


def _check_create(body: dict[str, Any]) -> tuple[str, str] | None:
    to = body.get("to")
    if not isinstance(to, list) or not to:
        return "to", "to must be a non-empty array of endpoints"
    for endpoint in to:
        problem = _check_endpoint(endpoint, websocket_ok=True)
        if problem:
            return "to", problem
    if ("from" in body) == bool(body.get("random_from_number")):
        return "from", "exactly one of from and random_from_number is required"
    if "from" in body and _check_endpoint(body["from"], websocket_ok=False):
        return "from", "from must be a phone endpoint"
    if ("ncco" in body) == ("answer_url" in body):
        return "ncco", "exactly one of ncco and answer_url is required"
    if "ncco" in body and (problem := _check_ncco(body["ncco"])):
        return "ncco", problem
    for key in ("event_url", "answer_url"):
        if key in body and not (isinstance(body[key], list) and len(body[key]) == 1
                                and isinstance(body[key][0], str) and body[key][0].startswith("https://")):
            return key, f"{key} must be an array with one https URL"
    if body.get("event_method", "POST") not in ("GET", "POST"):
        return "event_method", "event_method must be GET or POST"
    if "machine_detection" in body and body["machine_detection"] not in ("continue", "hangup"):
        return "machine_detection", "machine_detection must be continue or hangup"
    amd = body.get("advanced_machine_detection")
    if amd is not None:
        if not isinstance(amd, dict) or amd.get("behavior") not in ("continue", "hangup") \
                or amd.get("mode", "default") not in _AMD_MODES:
            return "advanced_machine_detection", "behavior must be continue|hangup, mode default|detect|detect_beep"
        timeout = amd.get("beep_timeout", 45)
        if not isinstance(timeout, int) or not 45 <= timeout <= 120:
            return "advanced_machine_detection", "beep_timeout must be 45-120"
    return None
