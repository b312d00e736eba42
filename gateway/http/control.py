"""Call-control endpoints: transfer, DTMF, outbound calls, and the carriers' status/AMD callbacks.

Programmatic routes take ``Authorization: Bearer <server_api_key>``; the carrier callback is
protected by the carrier's own signature, like the answer webhook.

Usage::

    GET|DELETE /sessions/{id}                                          -> 200 session / {"ended": id}
    POST /sessions/{id}/transfer  {"to": "+14155550123"}              -> 200 {"transferred": id}
    POST /sessions/{id}/dtmf      {"digits": "1234#"}                  -> 200 {"sent": "in-band"}
    POST /calls  {"carrier": "twilio", "to": "+1...", "from": "+1...", "persona": "concierge",
                  "machine_detection": true}                          -> 201 {"session_id", "call_id"}
    POST /events/{carrier}/{session_id}   (the carrier's signed status / AMD callback)
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from carriers.base import CallControlFailed, CarrierProtocolError, DialRequest, SignatureInvalid
from gateway.admission import turn_away
from gateway.http.auth import requires_key
from gateway.http.errors import error, services_of
from gateway.http.routes import carrier_or_error, webhook_request
from gateway.personas import PersonaError, dialable
from gateway.sessions import Session, SessionStoreUnavailable
from pipeline.jsonutil import loads

if TYPE_CHECKING:
    from gateway.app import Services

__all__ = ["act", "carrier_event", "control", "place_call", "send_dtmf", "session", "transfer"]

logger = logging.getLogger(__name__)

_DIGITS = re.compile(r"[0-9*#A-D]{1,32}")


async def _json_body(request: Request) -> dict[str, Any] | None:
    """The body as a JSON object (an empty body is ``{}``); None when it is not one, or nests too deep."""
    try:
        body = loads(await request.body() or b"{}")
    except ValueError:
        return None
    return body if isinstance(body, dict) else None


async def act(services: Services, op: str, session_id: str, args: Mapping[str, Any]) -> dict[str, Any] | None:
    """Run ``op`` ("end", "transfer", "dtmf") on a call held by this instance: ``{"status", "body"}``,
    or None when this instance does not hold it. The control bus calls this for other instances."""
    call = services.calls.get(session_id)
    if call is None:
        return None
    try:
        if op == "end":
            call.finish("ended_by_api")
            try:   # answer once the call is really over: hung up, socket closed, session removed
                async with asyncio.timeout(services.config.hangup_timeout_secs + 1.0):
                    await call.finalised.wait()
            except TimeoutError:
                return {"status": 202, "body": {"ending": session_id}}
            return {"status": 200, "body": {"ended": session_id}}
        if op == "transfer":
            await call.transfer(str(args["to"]))
            return {"status": 200, "body": {"transferred": session_id}}
        if op == "dtmf":
            return {"status": 200, "body": {"sent": await call.send_dtmf(str(args["digits"]))}}
    except CallControlFailed as exc:
        logger.error("%s refused: %s", op, exc)
        return {"status": 502, "body": {"error": str(exc)}}
    return {"status": 400, "body": {"error": f"unknown operation {op!r}"}}


async def control(services: Services, op: str, session_id: str, args: Mapping[str, Any]) -> Response:
    """Act on the call wherever it runs: here, else on the instance the control bus finds."""
    reply = await act(services, op, session_id, args)
    if reply is None:
        reply = await services.bus.request(op, session_id, args)
    if reply is None:
        found = await _stored(services, session_id)
        if isinstance(found, Response):
            return found
        if found.state != "active":
            if op == "end":                   # answered but its media never connected: just forget it
                await services.sessions.end(session_id)
                return JSONResponse({"ended": session_id})
            return error(409, "the call has not connected its media yet")
        # active, but no instance answered: never drop the session of a call that may still run
        logger.warning("%s: no instance answered for an active session (an outage?)", op)
        return error(503, "the instance holding the call did not answer; try again",
                      retry_after_secs=services.config.session_sync_secs)
    return JSONResponse(reply.get("body") or {}, status_code=int(reply.get("status", 200)))


async def _stored(services: Services, session_id: str) -> Session | Response:
    """The stored session, or the answer to give: 404 unknown, 503 store unreachable."""
    try:
        found = await services.sessions.get(session_id)
    except SessionStoreUnavailable:
        return error(503, "session store unavailable")
    return error(404, "no such session") if found is None else found


@requires_key
async def session(request: Request) -> Response:
    """``GET``/``DELETE /sessions/{id}``: inspect or end a session, on whichever instance holds it."""
    services = services_of(request)
    session_id = request.path_params["session_id"]
    if request.method == "DELETE":
        return await control(services, "end", session_id, {})
    found = await _stored(services, session_id)
    if isinstance(found, Response):
        return found
    body = found.public()
    body["live"] = session_id in services.calls or found.state == "active"   # running on some instance
    body["here"] = session_id in services.calls                               # running on this one
    return Response(json.dumps(body), media_type="application/json")


@requires_key
async def transfer(request: Request) -> Response:
    services = services_of(request)
    body = await _json_body(request)
    target = body.get("to") if body else None
    if not isinstance(target, str) or not dialable(target):
        return error(400, 'body must be {"to": "<E.164 number like +14155550123, or a sip: URI>"}')
    return await control(services, "transfer", request.path_params["session_id"], {"to": target})


@requires_key
async def send_dtmf(request: Request) -> Response:
    services = services_of(request)
    body = await _json_body(request)
    digits = body.get("digits") if body else None
    if not isinstance(digits, str) or not _DIGITS.fullmatch(digits):
        return error(400, 'body must be {"digits": "<1-32 of 0-9 * # A-D>"}')
    return await control(services, "dtmf", request.path_params["session_id"], {"digits": digits})


@requires_key
async def place_call(request: Request) -> Response:
    """``POST /calls``: mint a session, ask the carrier to dial, stream the answered call into it."""
    services = services_of(request)
    config = services.config
    if why := turn_away(services):
        return error(503, why)
    body = await _json_body(request)
    if body is None:
        return error(400, "body must be a JSON object")
    name = body.get("carrier") or config.carrier
    carrier, refused = carrier_or_error(services, str(name))
    if refused is not None:
        return refused
    to, from_ = body.get("to"), body.get("from")
    if not isinstance(to, str) or not dialable(to) or not isinstance(from_, str) or not from_:
        return error(400, '"to" (E.164 or sip: URI) and "from" (your carrier number) are required')
    if not config.public_url:
        return error(503, "public_url is not set: set it (or VOXRAY_PUBLIC_URL) to the https URL carriers reach")
    messages = ((body.get("context") or {}).get("messages") or []) if isinstance(body.get("context"), dict) else []
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        return error(400, '"context" must be {"messages": [{"role": ..., "content": ...}]}')
    persona_name = body.get("persona") if isinstance(body.get("persona"), str) else None
    try:
        persona = services.personas.resolve(to=from_, name=persona_name, context=messages or None)
    except PersonaError as exc:
        return error(500, f"personas file: {exc}")
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
        return error(502, str(exc))
    session = dataclasses.replace(session, call_id=call.call_id)
    await services.sessions.update(session)
    logger.info("outbound call placed carrier=%s call=%s session=%s…", name, call.call_id, session.id[:6])
    return JSONResponse({"session_id": session.id, "call_id": call.call_id}, status_code=201)


async def carrier_event(request: Request) -> Response:
    """``POST /events/{carrier}/{session_id}``: status and answering-machine callbacks."""
    services = services_of(request)
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
        return error(403, "invalid signature")
    except CarrierProtocolError as exc:
        return error(400, str(exc))
    session_id = request.path_params["session_id"]
    session = await services.sessions.get(session_id)
    if session is None or (session.call_id and event.call_id
                           and session.call_id not in (event.call_id, event.request_id)):
        return error(404, "no such session")
    call = services.calls.get(session_id)
    if event.answered_by == "machine" and call is not None:
        call.machine_answered()
    elif event.ended and call is None:
        logger.info("outbound call ended before it was answered: %s", event.status or "ended")
        await services.sessions.end(session_id)
    return Response(status_code=204)
