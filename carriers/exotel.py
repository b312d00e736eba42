"""Exotel carrier: Voicebot-applet dynamic URL, AgentStream codec, Connect Voice AI REST calls.

Wire contracts: ``docs/carriers.md`` §6 (Exotel) and §9.6 (test vectors).

Usage::

    carrier = ExotelCarrier(sid="acme1", api_key=key, api_token=token, http=httpx.AsyncClient(),
                            subdomain="api.in.exotel.com",             # Mumbai; default api.exotel.com
                            basic_auth_user="vx", basic_auth_password=secret)
    carrier.verify(request)                     # raises SignatureInvalid("exotel: <reason>")
    call = carrier.parse_call(request)          # CallInfo(carrier="exotel", call_id=CallSid, ...)
    body, media_type = carrier.answer(call, "wss://gw.example.com/media/exotel/3f9c1e", {"session_id": "3f9c1e"})
    # -> '{"url": "wss://vx:...@gw.example.com/media/exotel/3f9c1e?sample-rate=8000&session_id=3f9c1e"}'

    stream = carrier.open_stream()              # one per media WebSocket
    for frame in stream.decode(text_message):   # StreamStarted, AudioFrame(PCM16), Dtmf, MarkPlayed, ...
        ...
    for message in stream.encode(AudioFrame(pcm, stream.sample_rate)):   # 320-byte-aligned chunks >= 3.2 KB
        await websocket.send_text(message)

How a call arrives: the App Bazaar flow's Voicebot applet has our HTTPS URL (``/start/exotel``) as its
dynamic URL; Exotel requests it (GET, call details ``CallSid``/``CallFrom``/``CallTo``/``Direction`` in
the query) and expects ``{"url": "wss://..."}``. Our custom parameters ride on that URL's query (at
most 3, 256 characters) and come back in ``start.custom_parameters``; ``sample-rate`` is set there too.

Authenticity: Exotel does not sign requests. ``verify`` (webhooks and status callbacks) and
``verify_websocket`` check HTTP Basic credentials (``basic_auth_user``/``basic_auth_password``: put
them in the applet URL as ``https://user:pass@host/start/exotel``; the answer, ``StreamUrl`` and
``StatusCallback`` carry them too, and Exotel sends URL credentials as ``Authorization: Basic``)
and/or an IP allow-list (``allowed_ips``, CIDRs). ``verify`` only sees headers, so the client address
is read from ``client_ip_header`` (default ``x-forwarded-for``), taking the entry
``trusted_proxy_hops`` from the right, i.e. the one your own proxy appended; never rely on it when
the gateway is reachable without that proxy. With ``verify_signatures`` on and neither configured,
every request is refused. There are no timestamps: replays are bounded by the single-use session id.

Hang-up: closing the WebSocket ends the stream and the flow continues (add a Hangup applet), so
``hang_up`` is a no-op unless ``rest_hangup=True`` (then the Legs API ``<Hangup/>`` action with the
call id as the leg sid [?]). ``transfer`` and ``dial`` use ``/v1/Accounts/{sid}/Calls/connect``.
Exotel has no out-of-band DTMF for these calls: ``send_dtmf`` returns False.

Switches for what ``docs/carriers.md`` marks ``[?]`` (§8.5; defaults first):

* ``outbound_id_key``: ``"stream_sid"`` (docs, Pipecat) | ``"streamSid"`` (Exotel's samples). Inbound,
  all four spellings (``stream_sid``/``streamSid``, top level or under ``start``) are accepted.
* ``codec``: ``"pcm16"`` | ``"ulaw"`` — used only when ``start.media_format.encoding`` does not say
  (``audio/x-raw``/``raw/slin``/L16 -> PCM16, ``mulaw``/``ulaw`` -> µ-law, ``alaw`` -> A-law).
* ``sample_rate``: 8000 | 16000 | 24000 (``?sample-rate=``); a different rate in ``start`` is adopted.
* ``min_chunk_bytes``: 3200. Exotel's rule is "multiple of 320 bytes, 3.2 KB .. 100 KB", labelled
  "100 ms" — but 3200 bytes of PCM16 at 8 kHz is 200 ms (Exotel's own bridge uses 3200 B at 8 kHz).
  We keep the byte rule, so ``frame_ms`` is 200 at 8 kHz and 100 at 16/24 kHz; ``min_chunk_bytes=1600``
  gives 100 ms frames at 8 kHz. Every chunk is a whole number of 20 ms (a multiple of 320 bytes at
  any rate); short tails are padded with silence. With µ-law the same durations apply.
* ``credentials_in_urls``: True — embed the Basic credentials in the URLs we hand Exotel (the wss
  answer URL, ``StreamUrl`` and ``StatusCallback``), for it to send as ``Authorization: Basic``.
* ``lowercase_paths``: False — ``/v1/accounts/{sid}/calls/connect`` (developer guide) instead of CamelCase.
* ``json_suffix``: False — append ``.json`` to REST paths; XML and JSON responses are both parsed.
* ``rest_hangup``: False (see above); ``legs_api_base_url`` is where that call goes.
* ``StatusCallbackEvents[0]``/``[1]`` (answered, terminal) is our reading of the array field.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import ipaddress
import json
import logging
import math
import re
import xml.etree.ElementTree as ET
from collections.abc import Callable, Mapping, Sequence
from functools import lru_cache
from importlib import resources
from string import Template
from typing import Any, ClassVar
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

import httpx

from carriers._messages import DTMF_DIGITS, StreamChecks, field, load_json, mark_frame, media_payload, parse_json
from carriers.base import (
    CallControlFailed,
    CallEvent,
    CallInfo,
    CarrierProtocolError,
    DialRequest,
    HangupFailed,
    SignatureInvalid,
    WebhookRequest,
)
from pipeline.audio import alaw_decode, alaw_encode, ulaw_decode, ulaw_encode
from pipeline.frames import AudioFrame, Clear, Dtmf, Frame, Mark, StreamStarted, StreamStopped

__all__ = ["ExotelCarrier", "ExotelMediaStream"]

logger = logging.getLogger(__name__)

SAMPLE_RATES = (8000, 16000, 24000)
MAX_CHUNK_BYTES = 102400            # "100k" (Exotel's own bridge uses 102400)
MAX_CUSTOM_PARAMETERS = 3
MAX_CUSTOM_CHARS = 256
MAX_STREAM_URL_CHARS = 600
_E164 = re.compile(r"^\+[1-9][0-9]{6,14}$")
_END_STATUSES = frozenset({"completed", "failed", "busy", "no-answer", "canceled"})
_ENCODINGS = {"pcm16": "audio/x-l16", "ulaw": "audio/x-mulaw", "alaw": "audio/x-alaw"}
_HANGUP_EXOML = '<?xml version="1.0" encoding="UTF-8"?><Flow><Hangup/></Flow>'


@lru_cache(maxsize=1)
def _answer_template() -> Template:
    text = resources.files("twiml").joinpath("exotel_answer.json").read_text(encoding="utf-8")
    return Template(text.strip())


class ExotelCarrier:
    """Exotel AgentStream (Voicebot applet / Connect Voice AI) with the classic v1 REST API."""

    name: ClassVar[str] = "exotel"

    def __init__(
        self,
        *,
        sid: str,
        api_key: str,
        api_token: str,
        http: httpx.AsyncClient,
        subdomain: str = "api.exotel.com",
        api_base_url: str = "",
        verify_signatures: bool = True,
        basic_auth_user: str = "",
        basic_auth_password: str = "",
        allowed_ips: Sequence[str] = (),
        client_ip_header: str = "x-forwarded-for",
        trusted_proxy_hops: int = 1,
        sample_rate: int = 8000,
        codec: str = "pcm16",
        outbound_id_key: str = "stream_sid",
        min_chunk_bytes: int = 3200,
        credentials_in_urls: bool = True,
        lowercase_paths: bool = False,
        json_suffix: bool = False,
        rest_hangup: bool = False,
        legs_api_base_url: str = "https://cpaas-api.in.exotel.com",
    ) -> None:
        ExotelMediaStream(sample_rate=sample_rate, codec=codec, outbound_id_key=outbound_id_key,
                          min_chunk_bytes=min_chunk_bytes)  # validates the media switches early
        if trusted_proxy_hops < 1:
            raise ValueError("exotel trusted_proxy_hops must be at least 1")
        if ":" in basic_auth_user:
            raise ValueError("exotel basic_auth_user cannot contain ':' (HTTP Basic forbids it)")
        self.sid = sid
        self._api_key = api_key
        self._api_token = api_token
        self._http = http
        self.api_base_url = (api_base_url or f"https://{subdomain}").rstrip("/")
        self.legs_api_base_url = legs_api_base_url.rstrip("/")
        self.verify_signatures = verify_signatures
        self._basic_user = basic_auth_user
        self._basic_password = basic_auth_password
        self._basic = bool(basic_auth_user or basic_auth_password)
        self.allowed_ips = tuple(ipaddress.ip_network(n.strip(), strict=False) for n in allowed_ips)
        self.client_ip_header = client_ip_header.lower()
        self.trusted_proxy_hops = trusted_proxy_hops
        self.sample_rate = sample_rate
        self.codec = codec
        self.outbound_id_key = outbound_id_key
        self.min_chunk_bytes = min_chunk_bytes
        self.credentials_in_urls = credentials_in_urls
        self.lowercase_paths = lowercase_paths
        self.json_suffix = json_suffix
        self.rest_hangup = rest_hangup
        if verify_signatures and not self._basic and not self.allowed_ips:
            logger.warning("exotel: neither basic auth nor allowed_ips is set; every webhook and media "
                           "socket will be refused (set one, or verify_signatures=False for local tests)")

    def __repr__(self) -> str:  # never show the token or the Basic password
        return f"ExotelCarrier(sid={self.sid!r}, api_base_url={self.api_base_url!r})"

    # -- authenticity --------------------------------------------------------------------------

    def verify(self, request: WebhookRequest) -> None:
        self._authenticate(request.headers)

    def verify_websocket(self, headers: Mapping[str, str], url: str) -> None:
        self._authenticate(headers)

    def _authenticate(self, headers: Mapping[str, str]) -> None:
        if not self.verify_signatures:
            return
        if not self._basic and not self.allowed_ips:
            raise SignatureInvalid("exotel: no basic auth or allowed_ips configured to check the request")
        if self.allowed_ips:
            address = self._client_address(headers)
            if not any(address in network for network in self.allowed_ips):
                raise SignatureInvalid("exotel: client address is not in allowed_ips")
        if self._basic:
            self._check_basic(_header(headers, "authorization"))

    def _client_address(self, headers: Mapping[str, str]) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
        raw = _header(headers, self.client_ip_header)
        entries = [entry.strip() for entry in raw.split(",") if entry.strip()]
        if not entries:
            raise SignatureInvalid(f"exotel: no client address in {self.client_ip_header}")
        if len(entries) < self.trusted_proxy_hops:
            raise SignatureInvalid(f"exotel: {self.client_ip_header} has fewer entries than trusted_proxy_hops")
        entry = entries[-self.trusted_proxy_hops]
        if entry.startswith("["):                                   # [v6]:port
            entry = entry[1:].partition("]")[0]
        elif entry.count(":") == 1:                                 # v4:port
            entry = entry.partition(":")[0]
        try:
            return ipaddress.ip_address(entry)
        except ValueError:
            raise SignatureInvalid(f"exotel: {self.client_ip_header} entry is not an IP address") from None

    def _check_basic(self, header: str) -> None:
        if not header:
            raise SignatureInvalid("exotel: missing Authorization header")
        scheme, _, encoded = header.strip().partition(" ")
        if scheme.lower() != "basic":
            raise SignatureInvalid("exotel: Authorization is not Basic")
        try:
            user, sep, password = base64.b64decode(encoded.strip(), validate=True).decode("utf-8").partition(":")
        except (binascii.Error, UnicodeDecodeError, ValueError):
            raise SignatureInvalid("exotel: malformed Basic credentials") from None
        if not sep:
            raise SignatureInvalid("exotel: malformed Basic credentials")
        user_ok = hmac.compare_digest(user.encode(), self._basic_user.encode())
        password_ok = hmac.compare_digest(password.encode(), self._basic_password.encode())
        if not (user_ok and password_ok):
            raise SignatureInvalid("exotel: Basic credentials do not match")

    # -- webhook -------------------------------------------------------------------------------

    def parse_call(self, request: WebhookRequest) -> CallInfo:
        params = _params(request)
        call_id = params.get("CallSid", "")
        if not call_id:
            raise CarrierProtocolError("exotel webhook has no CallSid")
        direction = params.get("Direction", "incoming").lower()
        custom = {"CustomField": params["CustomField"]} if params.get("CustomField") else {}
        return CallInfo(
            carrier=self.name,
            call_id=call_id,
            from_=params.get("CallFrom") or params.get("From", ""),
            to=params.get("CallTo") or params.get("To", ""),
            account_id=params.get("AccountSid") or self.sid,
            direction="outbound" if direction.startswith("outbound") else "inbound",
            custom=custom,
        )

    def answer(self, call: CallInfo, stream_url: str, parameters: Mapping[str, str]) -> tuple[str, str]:
        url = self._stream_url(stream_url, parameters)
        return _answer_template().substitute(url=json.dumps(url)), "application/json"

    def busy(self, call: CallInfo, text: str) -> None:
        """None: the Voicebot applet's dynamic URL takes only ``{"url": "wss://..."}``, no words to say,
        so the gateway answers 503 and the flow goes on as Exotel handles a failed applet
        (``docs/carriers.md`` §6.9)."""
        return None

    def _stream_url(self, stream_url: str, parameters: Mapping[str, str]) -> str:
        """``stream_url`` + ``?sample-rate=`` + our parameters (+ Basic credentials in the authority)."""
        if not isinstance(stream_url, str) or not stream_url.startswith("wss://"):
            scheme = stream_url.partition("://")[0] if isinstance(stream_url, str) and "://" in stream_url else "none"
            raise ValueError(f"exotel stream url must start with wss:// (scheme is {scheme[:10]!r})")
        parts = urlsplit(stream_url)
        if parts.username is not None or parts.password is not None:
            raise ValueError("exotel stream url must not carry credentials; set basic_auth_user/_password instead")
        if parts.fragment:
            raise ValueError("exotel stream url must not carry a fragment")
        custom: list[tuple[str, str]] = []
        for key, value in parse_qsl(parts.query, keep_blank_values=True):
            if key == "sample-rate":
                if value != str(self.sample_rate):
                    raise ValueError(f"exotel stream url asks for sample-rate={value[:8]} but the carrier is "
                                     f"configured for {self.sample_rate}")
            else:
                custom.append((key, value))
        for key, value in parameters.items():
            if not isinstance(key, str) or not isinstance(value, str) or not key:
                raise ValueError("exotel custom parameter names and values must be non-empty strings")
            custom.append((key, value))
        if len(custom) > MAX_CUSTOM_PARAMETERS:
            raise ValueError(f"exotel carries at most {MAX_CUSTOM_PARAMETERS} custom parameters (got {len(custom)})")
        encoded = urlencode(custom)
        if len(encoded) > MAX_CUSTOM_CHARS:
            raise ValueError(f"exotel custom parameters exceed {MAX_CUSTOM_CHARS} characters ({len(encoded)})")
        query = urlencode([("sample-rate", str(self.sample_rate))]) + (f"&{encoded}" if encoded else "")
        return self._with_credentials(urlunsplit(("wss", parts.netloc, parts.path, query, "")))

    def _with_credentials(self, url: str) -> str:
        """``url`` with our Basic credentials in its authority (Exotel sends them as ``Authorization``)."""
        if not (self._basic and self.credentials_in_urls) or not url:
            return url
        scheme, netloc, path, query, fragment = urlsplit(url)
        userinfo = f"{quote(self._basic_user, safe='')}:{quote(self._basic_password, safe='')}"
        return urlunsplit((scheme, f"{userinfo}@{netloc.rpartition('@')[2]}", path, query, fragment))

    def open_stream(self) -> ExotelMediaStream:
        return ExotelMediaStream(sample_rate=self.sample_rate, codec=self.codec,
                                 outbound_id_key=self.outbound_id_key, min_chunk_bytes=self.min_chunk_bytes)

    def parse_event(self, request: WebhookRequest) -> CallEvent:
        """A StatusCallback (form or JSON): ``CallSid``, ``Status``, ``EventType`` (answered/terminal)."""
        params = _params(request)
        call_id = params.get("CallSid", "")
        if not call_id:
            raise CarrierProtocolError("exotel event has no CallSid")
        status = (params.get("Status") or params.get("CallStatus") or "").lower()
        event_type = params.get("EventType", "").lower()
        answered_by = params.get("AnsweredBy", "").strip().lower()
        if answered_by:
            answered_by = answered_by if answered_by in ("human", "machine") else \
                "machine" if answered_by.startswith("machine") else "unknown"
        return CallEvent(call_id=call_id, answered_by=answered_by,
                         ended=event_type == "terminal" or status in _END_STATUSES,
                         status=status or event_type)

    # -- REST ----------------------------------------------------------------------------------

    async def hang_up(self, call: CallInfo) -> None:
        """Closing the media socket ends the stream; with ``rest_hangup`` also end the leg over REST."""
        if not self.rest_hangup:
            logger.debug("exotel call %s ends when its media socket closes", call.call_id)
            return
        url = (f"{self.legs_api_base_url}/v2/accounts/{quote(self.sid, safe='')}"
               f"/legs/{quote(call.call_id, safe='')}/actions")
        try:
            response = await self._http.post(url, json={"exoml": _HANGUP_EXOML}, auth=self._auth())
        except httpx.HTTPError as exc:
            raise HangupFailed(f"exotel hang-up of {call.call_id} failed: {type(exc).__name__}") from exc
        if response.is_success:
            logger.info("exotel call %s hung up", call.call_id)
            return
        if response.status_code == 404 and _is_exotel_body(response):  # "leg not found": ended already
            logger.info("exotel call %s already ended (404)", call.call_id)
            return
        raise HangupFailed(f"exotel hang-up of {call.call_id} failed: HTTP {response.status_code}: "
                           f"{_exotel_error(response)}")

    async def transfer(self, call: CallInfo, target: str) -> None:
        """Bridge the caller to ``target`` with Connect-two-numbers: Exotel rings the caller (From)
        from the ExoPhone and connects ``target``; close the media socket afterwards [?]."""
        if not (_E164.match(target) or target.startswith("sip:") and len(target) > 4):
            raise CallControlFailed("exotel transfer target must be an E.164 number or a sip: URI")
        caller, exophone = (call.to, call.from_) if call.direction == "outbound" else (call.from_, call.to)
        if not caller or not exophone:
            raise CallControlFailed(f"exotel transfer of {call.call_id} needs the caller's number and the "
                                    "ExoPhone (CallInfo.from_ and .to)")
        fields = {"From": caller, "To": target, "CallerId": exophone, "CallType": "trans"}
        await self._connect(fields, f"transfer of {call.call_id}")
        logger.info("exotel call %s transferred", call.call_id)

    async def dial(self, request: DialRequest) -> CallInfo:
        """Connect Voice AI: Exotel dials ``request.to`` and streams straight to ``stream_url``."""
        if request.machine_detection:
            raise CallControlFailed("exotel has no answering-machine detection for Connect Voice AI stream "
                                    "calls; dial without machine_detection")
        stream_url = self._stream_url(request.stream_url, request.parameters)
        if len(stream_url) >= MAX_STREAM_URL_CHARS:
            raise CallControlFailed(f"exotel StreamUrl must be under {MAX_STREAM_URL_CHARS} characters")
        fields = {"From": request.to, "CallerId": request.from_, "StreamUrl": stream_url,
                  "StreamType": "bidirectional", "StatusCallback": self._with_credentials(request.events_url),
                  "StatusCallbackEvents[0]": "answered", "StatusCallbackEvents[1]": "terminal"}
        result = await self._connect(fields, "dial")
        call_id = result.get("Sid", "")
        if not call_id:
            raise CallControlFailed("exotel dial failed: the response has no Call Sid")
        logger.info("exotel dialled call %s", call_id)
        return CallInfo(carrier=self.name, call_id=call_id, from_=request.from_, to=request.to,
                        account_id=self.sid, direction="outbound", custom=dict(request.parameters))

    async def send_dtmf(self, call: CallInfo, digits: str) -> bool:
        return False  # no out-of-band DTMF for stream calls: the gateway plays in-band tones

    async def _connect(self, fields: dict[str, str], what: str) -> dict[str, str]:
        path = (f"/v1/accounts/{quote(self.sid, safe='')}/calls/connect" if self.lowercase_paths
                else f"/v1/Accounts/{quote(self.sid, safe='')}/Calls/connect")
        url = self.api_base_url + path + (".json" if self.json_suffix else "")
        try:
            response = await self._http.post(url, data=fields, auth=self._auth(),
                                             headers={"Accept": "application/json"})
        except httpx.HTTPError as exc:
            raise CallControlFailed(f"exotel {what} failed: {type(exc).__name__}") from exc
        if not response.is_success:
            raise CallControlFailed(f"exotel {what} failed: HTTP {response.status_code}: {_exotel_error(response)}")
        return _call_fields(response)

    def _auth(self) -> tuple[str, str]:
        return (self._api_key, self._api_token)


# ------------------------------------------------------------------------------------ helpers

def _header(headers: Mapping[str, str], name: str) -> str:
    value = headers.get(name)
    if value is None:
        value = next((v for k, v in headers.items() if k.lower() == name), "")
    return value


def _params(request: WebhookRequest) -> dict[str, str]:
    """Body params (form or JSON) first, then the URL query; the first value of a name wins."""
    content_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    pairs: list[tuple[str, str]] = []
    if content_type == "application/json" and request.body:
        data = load_json("exotel webhook body", request.body)
        if not isinstance(data, dict):
            raise CarrierProtocolError("exotel webhook body is not a JSON object")
        pairs = [(k, v if isinstance(v, str) else str(v)) for k, v in data.items()
                 if isinstance(v, (str, int, float)) and not isinstance(v, bool)]
    elif request.form:
        pairs = list(request.form)
    elif request.body and content_type == "application/x-www-form-urlencoded":
        pairs = parse_qsl(request.body.decode("utf-8", "replace"), keep_blank_values=True)
    pairs += parse_qsl(urlsplit(request.url).query, keep_blank_values=True)
    params: dict[str, str] = {}
    for key, value in pairs:
        params.setdefault(key, value)
    return params


def _call_fields(response: httpx.Response) -> dict[str, str]:
    """The ``Call`` object of a v1 response, JSON (``{"Call": {...}}``) or XML (``<Call>...</Call>``)."""
    try:
        data = response.json()
    except ValueError:
        data = None
    if isinstance(data, dict) and isinstance(call := data.get("Call"), dict):
        return {k: str(v) for k, v in call.items() if v is not None}
    try:
        # expat (>= 2.4) never fetches external entities and limits entity expansion
        node = ET.fromstring(response.content).find(".//Call")  # noqa: S314 - Exotel's own REST answer
    except ET.ParseError:
        node = None
    if node is None:
        return {}
    return {child.tag: (child.text or "").strip() for child in node}


def _is_exotel_body(response: httpx.Response) -> bool:
    """An Exotel API answer (v2 envelope or v1 ``RestException``), not a proxy's error page."""
    try:
        data = response.json()
    except ValueError:
        return False
    return isinstance(data, dict) and ("http_code" in data or "RestException" in data)


def _exotel_error(response: httpx.Response) -> str:
    """Exotel's error message: ``RestException.Message`` (JSON or XML) or the v2 ``error_data``."""
    fallback = response.reason_phrase or "no error message"
    try:
        data = response.json()
    except ValueError:
        data = None
    message: Any = None
    if isinstance(data, dict):
        rest = data.get("RestException")
        if isinstance(rest, dict):
            message = rest.get("Message")
        inner = data.get("response")
        if message is None and isinstance(inner, dict) and isinstance(err := inner.get("error_data"), dict):
            message = err.get("description") or err.get("message")
    elif data is None:
        try:
            node = ET.fromstring(response.content).find(".//RestException/Message")  # noqa: S314 - as above
            message = node.text if node is not None else None
        except ET.ParseError:
            pass
    return str(message)[:300] if message else fallback


def _sample_rate(value: Any) -> int | None:
    digits = re.match(r"\s*([0-9]{1,9})(?![0-9])", str(value))   # int() refuses over 4300 digits
    return int(digits.group(1)) if digits else None


class ExotelMediaStream(StreamChecks):
    """Sans-I/O codec for one AgentStream WebSocket (PCM16 LE by default; µ-law/A-law when announced)."""
    carrier, id_keys, id_attr, open_hint = "exotel", ("stream_sid", "streamSid"), "stream_sid", "no stream_sid yet"

    marks: bool = True

    def __init__(self, *, sample_rate: int = 8000, codec: str = "pcm16", outbound_id_key: str = "stream_sid",
                 min_chunk_bytes: int = 3200) -> None:
        if sample_rate not in SAMPLE_RATES:
            raise ValueError(f"exotel sample_rate must be one of 8000, 16000, 24000 (got {sample_rate})")
        if codec not in ("pcm16", "ulaw"):
            raise ValueError(f"exotel codec must be 'pcm16' or 'ulaw' (got {codec!r})")
        if outbound_id_key not in ("stream_sid", "streamSid"):
            raise ValueError(f"exotel outbound_id_key must be 'stream_sid' or 'streamSid' (got {outbound_id_key!r})")
        if not 320 <= min_chunk_bytes <= MAX_CHUNK_BYTES or min_chunk_bytes % 320:
            raise ValueError(f"exotel min_chunk_bytes must be a multiple of 320 up to {MAX_CHUNK_BYTES}")
        self.default_codec = codec
        self.outbound_id_key = outbound_id_key
        self.min_chunk_bytes = min_chunk_bytes
        self.started: bool = False
        self.stream_sid = ""
        self.call_sid = ""
        self.account_sid = ""
        self.from_ = ""
        self.to = ""
        self._configure(sample_rate, codec)
        self._chunk = 0
        self._sent_samples = 0
        self._media_prefix = ""

    def _configure(self, rate: int, codec: str) -> None:
        self.sample_rate = rate
        self.codec = codec
        self._decoder: Callable[[bytes], bytes] | None = {"ulaw": ulaw_decode, "alaw": alaw_decode}.get(codec)
        self._encoder: Callable[[bytes], bytes] | None = {"ulaw": ulaw_encode, "alaw": alaw_encode}.get(codec)
        self._unit = rate // 50 * 2                                        # 20 ms of PCM16: 320 B at 8 kHz
        self._min = math.ceil(self.min_chunk_bytes / self._unit) * self._unit
        self._max = MAX_CHUNK_BYTES // self._unit * self._unit
        self.frame_ms = max(100, self._min // self._unit * 20)
        self.max_message_ms = self.frame_ms     # paced chunk by chunk, as Exotel's own sample does
        self._frame_bytes = rate * self.frame_ms // 1000 * 2

    # -- Exotel -> us --------------------------------------------------------------------------

    def decode(self, message: str | bytes) -> list[Frame]:
        data = parse_json("exotel", message)
        event = data.get("event")
        if event is None:
            event = data.get("Event")
        if not isinstance(event, str):
            raise CarrierProtocolError("exotel message has no event")
        if event == "media":
            return self._decode_media(data)
        if event == "start":
            return self._decode_start(data)
        if event == "connected":
            return []
        if event == "stop":
            self._check_stream(data)
            reason = field(data, "stop", "reason")
            return [StreamStopped(reason or "stop")]
        if event == "dtmf":
            self._require_started(event, data)
            inner = data.get("dtmf")
            digit = inner.get("digit") if isinstance(inner, dict) else None
            if isinstance(digit, int) and not isinstance(digit, bool):
                digit = str(digit)
            if not isinstance(digit, str) or not digit:
                raise CarrierProtocolError("exotel dtmf event has no dtmf.digit")
            if digit not in DTMF_DIGITS:
                raise CarrierProtocolError("exotel dtmf digit is not one of 0-9 * # A-D")
            return [Dtmf(digit)]
        if event == "mark":
            self._require_started(event, data)
            return [mark_frame("exotel", data)]
        return []  # Exotel may add events

    def _decode_media(self, data: dict[str, Any]) -> list[Frame]:
        self._require_started("media", data)
        raw = media_payload("exotel", data, alt_key="Payload")   # b"" for our own audio echoed on an outbound track
        if not raw:
            return []
        if self._decoder is not None:
            return [AudioFrame(self._decoder(raw), self.sample_rate)]
        if len(raw) & 1:
            raise CarrierProtocolError(f"exotel media payload is not whole 16-bit samples ({len(raw)} bytes)")
        return [AudioFrame(raw, self.sample_rate)]

    def _decode_start(self, data: dict[str, Any]) -> list[Frame]:
        if self.started:
            raise CarrierProtocolError("exotel sent a second start event")
        start = data.get("start", data)  # some paths send the start fields flat
        if not isinstance(start, dict):
            raise CarrierProtocolError("exotel start event has no start object")
        inner_sid = _first_str(start, "stream_sid", "streamSid")
        outer_sid = _first_str(data, "stream_sid", "streamSid")
        stream_sid = inner_sid or outer_sid
        if not stream_sid:
            raise CarrierProtocolError("exotel start event has no stream_sid")
        if inner_sid and outer_sid and inner_sid != outer_sid:
            raise CarrierProtocolError("exotel stream_sid does not match start.stream_sid")
        call_sid = _first_str(start, "call_sid", "callSid") or _first_str(data, "call_sid", "callSid")
        if not call_sid:
            raise CarrierProtocolError("exotel start event has no call_sid")
        custom = start.get("custom_parameters", start.get("customParameters", {}))
        if custom is None:
            custom = {}
        if not isinstance(custom, dict) or not all(
                isinstance(v, (str, int, float)) and not isinstance(v, bool) for v in custom.values()):
            raise CarrierProtocolError("exotel start.custom_parameters is not an object of strings")
        media_format = start.get("media_format", start.get("mediaFormat", {}))
        if media_format is None:
            media_format = {}
        if not isinstance(media_format, dict):
            raise CarrierProtocolError("exotel start.media_format is not an object")
        codec = self._codec_of(media_format.get("encoding"))
        rate = self.sample_rate
        if media_format.get("sample_rate") is not None:
            rate = _sample_rate(media_format["sample_rate"]) or 0
            if rate not in SAMPLE_RATES:
                raise CarrierProtocolError(f"exotel start.media_format.sample_rate {media_format['sample_rate']!s:.12} "
                                           "is not supported (8000, 16000 or 24000)")
        self._configure(rate, codec)
        self.started = True
        self.stream_sid, self.call_sid = stream_sid, call_sid
        self.account_sid = _first_str(start, "account_sid", "accountSid") or ""
        self.from_ = _first_str(start, "from") or ""
        self.to = _first_str(start, "to") or ""
        self._media_prefix = ('{"event":"media",' + json.dumps(self.outbound_id_key) + ":" + json.dumps(stream_sid)
                              + ',"media":{"chunk":"')
        return [StreamStarted(
            stream_id=stream_sid, call_id=call_sid, account_id=self.account_sid,
            custom_parameters={k: str(v) for k, v in custom.items() if k != "sample-rate"},
            sample_rate=rate, encoding=_ENCODINGS[codec])]

    def _codec_of(self, encoding: Any) -> str:
        if encoding is None or encoding == "" or encoding == "base64":  # unstated (or the old "base64")
            return self.default_codec
        text = str(encoding).lower()
        if "mulaw" in text or "ulaw" in text or "pcmu" in text:
            return "ulaw"
        if "alaw" in text or "pcma" in text:
            return "alaw"
        if any(word in text for word in ("raw", "slin", "l16", "pcm", "linear")):
            return "pcm16"
        raise CarrierProtocolError(f"exotel start.media_format.encoding {str(encoding)[:40]!r} is not supported "
                                   "(expected PCM16 audio/x-raw or audio/x-mulaw)")

    # -- us -> Exotel --------------------------------------------------------------------------

    def encode(self, frame: Frame) -> list[str | bytes]:
        if isinstance(frame, AudioFrame):
            if frame.sample_rate != self.sample_rate:
                raise ValueError(f"exotel stream is {self.sample_rate} Hz (got {frame.sample_rate} Hz); "
                                 "resample first")
            self._require_open()
            pcm = frame.pcm
            if len(pcm) == self._frame_bytes:  # the playout's normal frame: one compliant chunk
                return [self._media(pcm)]
            return self._chunks(pcm) if pcm else []
        if isinstance(frame, Mark):
            self._require_open()
            return [json.dumps({"event": "mark", self.outbound_id_key: self.stream_sid, "mark": {"name": frame.name}},
                               separators=(",", ":"))]
        if isinstance(frame, Clear):
            self._require_open()
            return [json.dumps({"event": "clear", self.outbound_id_key: self.stream_sid}, separators=(",", ":"))]
        raise ValueError(f"exotel cannot send {type(frame).__name__} frames")

    def _chunks(self, pcm: bytes) -> list[str | bytes]:
        """Pad to whole 20 ms units and the minimum chunk, then split evenly under the maximum."""
        size = max(self._min, -(-len(pcm) // self._unit) * self._unit)
        if size > len(pcm):
            pcm += bytes(size - len(pcm))
        if size <= self._max:
            return [self._media(pcm)]
        count = -(-size // self._max)
        base, extra = divmod(size // self._unit, count)
        out: list[str | bytes] = []
        pos = 0
        for i in range(count):
            end = pos + (base + (i < extra)) * self._unit
            out.append(self._media(pcm[pos:end]))
            pos = end
        return out

    def _media(self, pcm: bytes) -> str:
        self._chunk += 1
        timestamp = self._sent_samples * 1000 // self.sample_rate
        self._sent_samples += len(pcm) >> 1
        payload = base64.b64encode(pcm if self._encoder is None else self._encoder(pcm)).decode("ascii")
        return (f'{self._media_prefix}{self._chunk}","timestamp":"{timestamp}","sequenceNumber":"{self._chunk}",'
                f'"payload":"{payload}"}}}}')



def _first_str(data: dict[str, Any], *keys: str) -> str | None:
    for key in keys:
        value = data.get(key)
        if isinstance(value, str) and value:
            return value
    return None

