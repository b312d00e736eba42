"""Call-control endpoints: transfer, DTMF, outbound calls, and the carriers' status/AMD callbacks.

Programmatic routes take ``Authorization: Bearer <server_api_key>``; the carrier callback is
protected by the carrier's own signature, like the answer webhook.

Usage::

    POST /sessions/{id}/transfer  {"to": "+14155550123"}              -> 200 {"transferred": id}
    POST /sessions/{id}/dtmf      {"digits": "1234#"}                  -> 200 {"sent": "in-band"}
    POST /calls  {"carrier": "twilio", "to": "+1...", "from": "+1...", "persona": "concierge",
                  "machine_detection": true}                          -> 201 {"session_id", "call_id"}
    POST /events/{carrier}/{session_id}   (the carrier's signed status / AMD callback)
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from carriers.base import CallControlFailed, CarrierProtocolError, DialRequest, SignatureInvalid
from gateway.personas import PersonaError, dialable
from gateway.routes import _authorised, _error, _services, carrier_or_error, webhook_request
from gateway.sessions import Session

if TYPE_CHECKING:
    from gateway.app import Services

__all__ = ["carrier_event", "place_call", "send_dtmf", "transfer"]

logger = logging.getLogger(__name__)

_DIGITS = re.compile(r"[0-9*#A-D]{1,32}")


async def _json_body(request: Request) -> dict[str, Any] | None:
    try:
        body = json.loads(await request.body() or b"{}")
    except ValueError:
        return None
    return body if isinstance(body, dict) else None


async def _live_call(request: Request) -> tuple[Services, Any, Response | None]:
    services = _services(request)
    if not _authorised(request, services.config.server_api_key):
        return services, None, _error(401, "missing or wrong API key: send Authorization: Bearer <server_api_key>")
    session_id = request.path_params["session_id"]
    call = services.calls.get(session_id)
    if call is None:
        found = await services.sessions.get(session_id)
        return services, None, _error(409 if found else 404, "the call is not live on this instance" if found
                                      else "no such session")
    return services, call, None


async def transfer(request: Request) -> Response:
    services, call, refused = await _live_call(request)
    if refused is not None:
        return refused
    body = await _json_body(request)
    target = body.get("to") if body else None
    if not isinstance(target, str) or not dialable(target):
        return _error(400, 'body must be {"to": "<E.164 number like +14155550123, or a sip: URI>"}')
    try:
        await call.transfer(target)
    except CallControlFailed as exc:
        logger.error("transfer refused: %s", exc)
        return _error(502, str(exc))
    return JSONResponse({"transferred": call.session.id})


async def send_dtmf(request: Request) -> Response:
    services, call, refused = await _live_call(request)
    if refused is not None:
        return refused
    body = await _json_body(request)
    digits = body.get("digits") if body else None
    if not isinstance(digits, str) or not _DIGITS.fullmatch(digits):
        return _error(400, 'body must be {"digits": "<1-32 of 0-9 * # A-D>"}')
    try:
        how = await call.send_dtmf(digits)
    except CallControlFailed as exc:
        return _error(502, str(exc))
    return JSONResponse({"sent": how})


async def place_call(request: Request) -> Response:
    """``POST /calls``: mint a session, ask the carrier to dial, stream the answered call into it."""
    services = _services(request)
    config = services.config
    if not _authorised(request, config.server_api_key):
        return _error(401, "missing or wrong API key: send Authorization: Bearer <server_api_key>")
    body = await _json_body(request)
    if body is None:
        return _error(400, "body must be a JSON object")
    name = body.get("carrier") or config.carrier
    carrier, refused = carrier_or_error(services, str(name))
    if refused is not None:
        return refused
    to, from_ = body.get("to"), body.get("from")
    if not isinstance(to, str) or not dialable(to) or not isinstance(from_, str) or not from_:
        return _error(400, '"to" (E.164 or sip: URI) and "from" (your carrier number) are required')
    if not config.public_url:
        return _error(503, "public_url is not set: set it (or VOXRAY_PUBLIC_URL) to the https URL carriers reach")
    messages = ((body.get("context") or {}).get("messages") or []) if isinstance(body.get("context"), dict) else []
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        return _error(400, '"context" must be {"messages": [{"role": ..., "content": ...}]}')
    persona_name = body.get("persona") if isinstance(body.get("persona"), str) else None
    try:
        persona = services.personas.resolve(to=from_, name=persona_name, context=messages or None)
    except PersonaError as exc:
        return _error(500, f"personas file: {exc}")
    session = await services.sessions.create(Session.new(
        carrier=name, from_=from_, to=to, persona=persona.name, direction="outbound",
        context=tuple(messages), parameters={"persona": persona.name} if persona_name else {}))
    host = config.public_url.split("://", 1)[1]
    request_ = DialRequest(to=to, from_=from_, stream_url=f"wss://{host}/media/{name}/{session.id}",
                           answer_url=f"{config.public_url}/start/{name}?session={session.id}",
                           events_url=f"{config.public_url}/events/{name}/{session.id}",
                           parameters={"session_id": session.id}, machine_detection=bool(body.get("machine_detection")))
    try:
        call = await carrier.dial(request_)
    except CallControlFailed as exc:
        await services.sessions.end(session.id)
        logger.error("outbound call refused by %s: %s", name, exc)
        return _error(502, str(exc))
    session = dataclasses.replace(session, call_id=call.call_id)
    await services.sessions.update(session)
    logger.info("outbound call placed carrier=%s call=%s session=%s…", name, call.call_id, session.id[:6])
    return JSONResponse({"session_id": session.id, "call_id": call.call_id}, status_code=201)


async def carrier_event(request: Request) -> Response:
    """``POST /events/{carrier}/{session_id}``: status and answering-machine callbacks."""
    services = _services(request)
    name = request.path_params["carrier"]
    carrier, refused = carrier_or_error(services, name)
    if refused is not None:
        return refused
    webhook = await webhook_request(request, services)
    try:
        carrier.verify(webhook)
        event = carrier.parse_event(webhook)
    except SignatureInvalid as exc:
        services.metrics.webhooks_rejected.labels(carrier=name, reason="signature").inc()
        logger.warning("event rejected carrier=%s reason=%s", name, exc)
        return _error(403, "invalid signature")
    except CarrierProtocolError as exc:
        return _error(400, str(exc))
    session_id = request.path_params["session_id"]
    session = await services.sessions.get(session_id)
    if session is None or (session.call_id and event.call_id and event.call_id != session.call_id):
        return _error(404, "no such session")
    call = services.calls.get(session_id)
    if event.answered_by == "machine" and call is not None:
        call.machine_answered()
    elif event.ended and call is None:
        logger.info("outbound call ended before it was answered: %s", event.status or "ended")
        await services.sessions.end(session_id)
    return Response(status_code=204)
