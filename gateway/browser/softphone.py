"""``GET /``: the browser softphone page, its static files, and ``GET /personas`` for its picker (design §7).

The page (``gateway/browser/static/``: plain HTML, CSS and JavaScript, no build step) talks to the agent over
``/ws`` or WebRTC (``POST /webrtc/offer``), shows live transcripts, each turn's latency and errors, and
can carry the call through the phone codec (8 kHz µ-law) to hear what a caller hears.

The page itself is public (it holds no secret); what it calls (``/ws``, ``/webrtc/offer``,
``/personas``) take the API key (``gateway.http.auth``): the page has a field for it and also reads
``?token=`` from its own URL. The transports the gateway serves (``transport``) and the STUN/TURN
servers a browser should use (``webrtc_ice_servers``) are written into the page as a JSON block;
servers with a username or credential (TURN) are left out when a key is required, so the
public page never hands TURN credentials to someone without the key.

Usage (``gateway.app``)::

    Route("/", softphone.index), Route("/personas", softphone.personas),
    Mount("/static", app=softphone.static_files(), name="static")
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.staticfiles import StaticFiles

from gateway.http.auth import AccessKey, requires_key
from gateway.http.errors import services_of

if TYPE_CHECKING:
    from gateway.config import Config

__all__ = ["STATIC_DIR", "index", "page_config", "personas", "static_files"]

STATIC_DIR = Path(__file__).resolve().parent / "static"
_CONFIG_MARKER = '<script id="voxray-config" type="application/json">{}</script>'
_HOST = re.compile(r"[A-Za-z0-9.\-]+(:[0-9]{1,5})?|\[[0-9A-Fa-f:.]+\](:[0-9]{1,5})?")
_TRANSPORTS = {"websocket": ["websocket"], "smallwebrtc": ["webrtc"], "both": ["websocket", "webrtc"]}


@functools.lru_cache(maxsize=1)
def _template() -> str:
    text = (STATIC_DIR / "index.html").read_text(encoding="utf-8")
    if _CONFIG_MARKER not in text:
        raise RuntimeError(f"{STATIC_DIR / 'index.html'} lost its config block {_CONFIG_MARKER!r}")
    return text


def page_config(config: Config, access: AccessKey) -> dict[str, Any]:
    """What the page needs to know about this gateway: its transports, the ICE servers to use and
    whether it needs the API key (TURN credentials are never given to a page anyone may load)."""
    servers = [dict(s) for s in config.webrtc_ice_servers
               if not (access.required and ("credential" in s or "username" in s))]
    return {"transports": _TRANSPORTS.get(config.transport, ["websocket", "webrtc"]), "iceServers": servers,
            "apiKeyRequired": access.required}


async def index(request: Request) -> Response:
    """``GET /``: the softphone page, with this gateway's settings in its config block."""
    services = services_of(request)
    # "</" cannot end the JSON block early: escape it, as JSON allows
    block = json.dumps(page_config(services.config, services.access), separators=(",", ":")).replace("</", "<\\/")
    body = _template().replace(_CONFIG_MARKER, _CONFIG_MARKER.replace("{}", block))
    host = request.headers.get("host", "")
    # 'self' covers same-host ws:/wss: in CSP3 browsers; the explicit entries help older ones
    connect = "'self'" + (f" ws://{host} wss://{host}" if _HOST.fullmatch(host) else "")
    return HTMLResponse(body, headers={
        "Cache-Control": "no-cache",
        "Content-Security-Policy": (
            f"default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src {connect}; "
            "media-src 'self' blob: mediastream:; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"),
        "Referrer-Policy": "no-referrer",
        "X-Content-Type-Options": "nosniff",
        "Permissions-Policy": "microphone=(self), camera=()",
    })


@requires_key
async def personas(request: Request) -> Response:
    """``GET /personas`` -> ``{"personas": [names...]}`` from the personas file (``server_api_key`` protected)."""
    services = services_of(request)
    return JSONResponse({"personas": services.personas.names()}, headers={"Cache-Control": "no-store"})


def static_files() -> StaticFiles:
    """The page's CSS and JavaScript (shipped as package data: ``gateway/browser/static/*``)."""
    return StaticFiles(directory=STATIC_DIR)
