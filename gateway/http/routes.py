"""HTTP and WebSocket endpoints: health, readiness, metrics, carrier webhooks, media sockets, sessions.

Every input gets a clear answer: an unknown carrier 404 (listing the known ones), a bad signature
403 and a log line, an unconfigured carrier 503 naming the setting, an unknown session a close
with a reason.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.websockets import WebSocket

from carriers.base import CallInfo, CarrierProtocolError, SignatureInvalid, WebhookIgnored, WebhookRequest
from gateway.admission import turn_away
from gateway.calls.call import Call
from gateway.calls.carrier_leg import CarrierLeg
from gateway.calls.socket import socket_io
from gateway.http.errors import error, services_of
from gateway.metrics import CONTENT_TYPE_LATEST
from gateway.personas import PersonaError, dialable
from gateway.sessions import Session, SessionStoreUnavailable

if TYPE_CHECKING:
    from gateway.app import Services

logger = logging.getLogger(__name__)


async def health(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def ready(request: Request) -> Response:
    services = services_of(request)
    if services.group is not None:
        return await group_ready(services)
    if services.draining:
        return error(503, "draining: this instance is shutting down", active_calls=len(services.calls))
    admission = services.admission
    if admission is not None and (busy := admission.refusal()) is not None:
        return error(503, admission.explain(busy), active_calls=len(services.calls))
    if not await services.sessions.ping():
        return error(503, "session store unreachable")
    return JSONResponse({"status": "ready", "active_calls": len(services.calls)})


async def group_ready(services: Services) -> Response:
    """``/ready`` of a worker group: 503 while the group drains, or when no worker takes a call (each
    at ``max_concurrent_calls`` or overloaded); the live calls are the whole group's."""
    assert services.group is not None
    group = await services.group.status()
    if group is None:
        return error(503, "the worker group's supervisor does not answer", active_calls=len(services.calls))
    workers = group["workers"]
    calls = sum(int(w["calls"]) for w in workers)
    if group["draining"] or services.draining:
        return error(503, "draining: this instance is shutting down", active_calls=calls)
    refusals = [f"worker {w['worker']}: {w['refusal'] or 'draining'}" for w in workers
                if w["refusal"] or w["draining"]]
    if len(refusals) == len(workers):
        return error(503, "busy: no worker takes a new call (" + "; ".join(refusals) + ")", active_calls=calls)
    if not await services.sessions.ping():
        return error(503, "session store unreachable")
    return JSONResponse({"status": "ready", "active_calls": calls, "workers": len(workers)})


async def metrics(request: Request) -> Response:
    services = services_of(request)
    if services.group is not None:
        body = await services.group.metrics()
        if body is None:
            return error(503, "the worker group's supervisor does not answer")
        return Response(body, media_type=CONTENT_TYPE_LATEST)
    return Response(services.metrics.render(), media_type=CONTENT_TYPE_LATEST)


# ------------------------------------------------------------------------------------------ webhooks
BrowserStart = Callable[[Request], Awaitable[Response | None]]


def start_route(browser_start: BrowserStart | None = None) -> Callable[[Request], Awaitable[Response]]:
    """The ``/start`` handler. With WebRTC mounted, ``POST /start`` (no carrier) with a JSON
    ``{"context"?, "persona"?, "number"?}`` body mints a browser session for ``POST /sessions/{id}/offer``
    (``browser_start``: ``gateway.browser.webrtc.start_session``; it answers None for a carrier's JSON
    webhook, which is then answered as always)."""
    async def start_or_browser(request: Request) -> Response:
        if browser_start is not None and request.method == "POST" and "carrier" not in request.path_params:
            browser = await browser_start(request)
            if browser is not None:
                return browser
        return await start(request)
    return start_or_browser


async def start(request: Request) -> Response:
    """``POST /start`` and ``/start/{carrier}``: verify, pick the persona, mint the session, answer."""
    services = services_of(request)
    config = services.config
    name = request.path_params.get("carrier") or config.carrier
    carrier, refused = carrier_or_error(services, name)
    if refused is not None:
        return refused
    if not config.public_url:
        logger.error("webhook for %s refused: public_url is not set", name)
        return error(503, "public_url is not set: set it (or VOXRAY_PUBLIC_URL) to the https URL carriers reach")
    webhook = await webhook_request(request, services)
    try:
        carrier.verify(webhook)
        call = carrier.parse_call(webhook)
    except SignatureInvalid as exc:
        services.metrics.webhooks_rejected.labels(carrier=name, reason="signature").inc()
        logger.warning("webhook rejected carrier=%s reason=%s from=%s", name, exc,
                       request.client.host if request.client else "-")
        return error(403, "invalid signature")
    except WebhookIgnored as exc:
        logger.info("%s", exc)
        return JSONResponse({})
    except CarrierProtocolError as exc:
        services.metrics.webhooks_rejected.labels(carrier=name, reason="malformed").inc()
        logger.warning("webhook rejected carrier=%s reason=%s", name, exc)
        return error(400, str(exc))
    if "session" not in request.query_params and (why := turn_away(services)):   # (a call we placed may answer)
        return busy_answer(services, carrier, call, why)
    parameters = dict(request.query_params)
    try:
        outbound = await _outbound_session(services, name, parameters.pop("session", ""), call)
        if outbound is not None:     # a carrier fetching the answer of a call we placed (POST /calls)
            session, persona_name = outbound, outbound.persona
        else:
            try:
                persona_name = services.personas.resolve(to=call.to, parameters=parameters).name
            except PersonaError as exc:
                logger.error("persona lookup failed, using the default: %s", exc)
                persona_name = services.personas.resolve().name
            session = Session.new(carrier=name, call_id=call.call_id, from_=call.from_, to=call.to,
                                  account_id=call.account_id, persona=persona_name, parameters=parameters)
            earlier = await services.sessions.bind_call(name, call.call_id, session.id) if call.call_id else None
            if earlier is None:
                session = await services.sessions.create(session)
            else:
                previous = await services.sessions.get(earlier)
                if previous is None or previous.state != "pending":
                    services.metrics.webhooks_rejected.labels(carrier=name, reason="replay").inc()
                    logger.warning("webhook refused carrier=%s call=%s: that call was answered before (a replay?)",
                                   name, call.call_id)
                    return error(409, "this call was already answered")
                session, persona_name = previous, previous.persona      # a retry: the same answer again
    except SessionStoreUnavailable as exc:
        logger.error("webhook for %s refused: %s", name, exc)
        return error(503, "session store unavailable")
    stream_url = "wss://" + config.public_url.split("://", 1)[1] + f"/media/{name}/{session.id}"
    text, media_type = carrier.answer(call, stream_url, {"session_id": session.id, "persona": persona_name})
    logger.info("call answered carrier=%s call=%s persona=%s session=%s…", name, call.call_id, persona_name,
                session.id[:6])
    return Response(text, media_type=media_type)


def busy_answer(services: Services, carrier: Any, call: CallInfo, why: str) -> Response:
    """The answer to a verified webhook refused at capacity (``why``, already counted): the carrier's
    markup speaking ``busy_text`` then hanging up (200) when ``busy_answer`` is "speak" and the carrier
    has such markup, else 503 (the carrier's retry or fallback URL takes over; always while draining).
    No session is made.

        busy_answer(services, twilio, call, "busy: ...")   # 200 <Response><Say>…</Say><Hangup/></Response>
    """
    config = services.config
    # a draining instance says 503 whatever busy_answer is: another instance (the carrier's retry or
    # fallback URL, the load balancer) can still take the call, so the caller must not hear "busy"
    speak = config.busy_answer == "speak" and not services.draining
    spoken = carrier.busy(call, config.busy_text) if speak else None
    logger.warning("webhook refused carrier=%s call=%s answer=%s: %s", carrier.name, call.call_id,
                   "busy markup" if spoken is not None else "503", why)
    if spoken is None:
        return error(503, why)
    text, media_type = spoken
    return Response(text, media_type=media_type)


def carrier_or_error(services: Services, name: str) -> tuple[Any, Response | None]:
    """The adapter for ``name``, or the answer to give: 404 unknown (listing the known), 503 unconfigured."""
    carrier = services.carriers.get(name)
    if carrier is not None:
        return carrier, None
    if name in services.unconfigured:
        logger.error("request for %s refused: %s", name, services.unconfigured[name])
        return None, error(503, services.unconfigured[name])
    return None, error(404, f"unknown carrier '{name}'", known=sorted([*services.carriers, *services.unconfigured]))


async def _outbound_session(services: Services, carrier: str, session_id: str, call: CallInfo) -> Session | None:
    """The session of a call we placed, when its carrier fetches the answer (Plivo). Some carriers
    name the dialled request differently from the answered call: the session learns the call's id."""
    if not session_id:
        return None
    session = await services.sessions.get(session_id)
    if session is None or session.direction != "outbound" or session.carrier != carrier or session.state != "pending":
        return None
    if session.call_id and session.call_id not in (call.call_id, call.custom.get("request_uuid")):
        return None
    if session.call_id != call.call_id:
        session = dataclasses.replace(session, call_id=call.call_id)
        await services.sessions.update(session)
    return session


async def transfer_markup(request: Request) -> Response:
    """``POST /transfer/{carrier}?target=``: the markup a carrier fetches to carry out a transfer
    (Plivo); signed by the carrier like any webhook."""
    services = services_of(request)
    name = request.path_params["carrier"]
    carrier, refused = carrier_or_error(services, name)
    if refused is not None:
        return refused
    markup = getattr(carrier, "transfer_markup", None)
    if markup is None:
        return error(404, f"{name} transfers without fetching markup")
    webhook = await webhook_request(request, services)
    try:
        carrier.verify(webhook)
    except SignatureInvalid as exc:
        services.metrics.webhooks_rejected.labels(carrier=name, reason="signature").inc()
        logger.warning("transfer markup request rejected carrier=%s reason=%s", name, exc)
        return error(403, "invalid signature")
    target = request.query_params.get("target", "")
    if not dialable(target):
        return error(400, "target must be an E.164 number or a sip: URI")
    text, media_type = markup(target)
    return Response(text, media_type=media_type)


async def webhook_request(request: Request, services: Services) -> WebhookRequest:
    """The request as the carrier signed it: ``public_url`` + path + query, never the proxy's address."""
    body = await request.body()
    form: list[tuple[str, str]] = []
    if request.headers.get("content-type", "").startswith("application/x-www-form-urlencoded"):
        form = parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True)
    url = services.config.public_url + request.url.path + (f"?{request.url.query}" if request.url.query else "")
    headers = {k.lower(): v for k, v in request.headers.items()}
    headers["x-voxray-peer"] = request.client.host if request.client else ""   # ours: never the sender's
    return WebhookRequest(method=request.method, url=url, headers=headers, body=body, form=form)


# ------------------------------------------------------------------------------------------ media
async def media(websocket: WebSocket) -> None:
    """``WS /media/{carrier}/{session_id}``: the carrier's media stream for one claimed session."""
    services = services_of(websocket)
    name = websocket.path_params["carrier"]
    carrier = services.carriers.get(name)
    await websocket.accept()
    if carrier is None:
        await websocket.close(1008, f"unknown carrier '{name}'")
        return
    try:
        url = "wss://" + services.config.public_url.split("://", 1)[-1] + websocket.url.path + (
            f"?{websocket.url.query}" if websocket.url.query else "")
        carrier.verify_websocket({k.lower(): v for k, v in websocket.headers.items()}, url)
    except SignatureInvalid as exc:
        services.metrics.webhooks_rejected.labels(carrier=name, reason="websocket_auth").inc()
        logger.warning("media socket refused carrier=%s: %s", name, exc)
        await websocket.close(1008, "media socket authentication failed")
        return
    try:
        session = await services.sessions.claim(websocket.path_params["session_id"], carrier=name)
    except SessionStoreUnavailable as exc:
        logger.error("media socket refused carrier=%s: %s", name, exc)
        await websocket.close(1011, "session store unavailable")
        return
    if session is None:
        logger.warning("media socket refused carrier=%s: unknown, used or expired session", name)
        await websocket.close(1008, "unknown, used or expired session")
        return
    leg = CarrierLeg(carrier=carrier, socket=socket_io(websocket), session=session, config=services.config,
                     metrics=services.metrics)
    await Call(services=services, session=session, leg=leg).run()
