"""Plivo carrier: V3 webhook signatures, ``<Stream>`` XML, Audio Streaming codec, REST call control.

Wire contracts: ``docs/carriers.md`` §5 (Plivo) and §9.5 (test vectors).

Usage::

    carrier = PlivoCarrier(auth_id="MA...", auth_token=token, http=httpx.AsyncClient())
    carrier.verify(request)                     # raises SignatureInvalid("plivo: <reason>")
    call = carrier.parse_call(request)          # CallInfo(carrier="plivo", call_id=<CallUUID>, ...)
    body, media_type = carrier.answer(call, "wss://gw.example.com/media/plivo/3f9c1e", {"session_id": "3f9c1e"})

    stream = carrier.open_stream()              # one per media WebSocket; Plivo sends ``start`` first
    for frame in stream.decode(text_message):   # StreamStarted, AudioFrame(PCM16), Dtmf, MarkPlayed, ...
        ...
    for message in stream.encode(AudioFrame(pcm, stream.sample_rate)):
        await websocket.send_text(message)      # playAudio / checkpoint / clearAudio
    await carrier.hang_up(call)                 # DELETE .../Call/{uuid}/; 404 (already ended) is success

Signatures: ``X-Plivo-Signature-V3`` (HMAC-SHA256 with the Auth Token over the URL, the sorted
params and ``"." + X-Plivo-Signature-V3-Nonce``; the header may hold several comma-separated
values) or ``X-Plivo-Signature-Ma-V3`` (the same, keyed with the main account's token). Plivo
sends no timestamp, so a stale request cannot be told apart; a request (content + nonce) seen before is
rejected as a replay (per process, bounded memory). Legacy V2 is off unless asked for.

Custom parameters travel in ``extraHeaders``, which Plivo limits to 512 bytes of ``[A-Za-z0-9]``
(plus ``=`` and the separator): names and values are escaped reversibly (``Z`` + two hex digits
per UTF-8 byte of anything else, ``Z`` itself included), so ``session_id`` goes out as
``sessionZ5Fid`` and comes back as ``session_id`` in ``StreamStarted.custom_parameters``.

Unverified points (``[?]`` in ``docs/carriers.md`` §8.4) and the switches that settle them:

* ``content_type`` (default ``audio/x-mulaw;rate=8000``; also ``audio/x-l16;rate=8000`` and
  ``audio/x-l16;rate=16000``): Plivo's own default is L16 8 kHz, but L16 byte order is unverified.
* ``l16_byte_order`` (default ``"little"``; ``"big"`` = RFC 3551 network order): L16 payload order.
* ``extra_headers`` separator: ``,`` is sent (the XML docs); ``,`` and ``;`` are both accepted.
* ``playedStream`` is the documented checkpoint acknowledgement; ``played`` (a support article) is
  accepted too. ``stop`` is not documented (the socket just closes) but is accepted if it comes.
* ``dtmf`` beyond ``dtmf.digit`` is undocumented: only ``dtmf.digit`` is read.
* AMD results: the ``Machine`` flag (``true``/``false``) on the callback is read.
* ``transfer_url``: Plivo transfers by fetching XML from a URL (``aleg_url``); the gateway must
  serve :meth:`PlivoCarrier.transfer_markup` there (``?target=`` carries the destination).
* ``accept_v2_signatures`` (default False): V2 signs only the URL and nonce, not the body.
* ``escape_extra_headers`` (default True): False sends names/values as they are and refuses any
  that are not alphanumeric.
* ``main_auth_token`` (default: ``auth_token``): the key for ``X-Plivo-Signature-Ma-V3``.

Outbound calls: ``dial`` returns Plivo's ``request_uuid`` as the call id (Plivo names the
``CallUUID`` only when the call is answered). ``hang_up`` of that id cancels the still-queued
request (``DELETE .../Request/{uuid}/``); the answer webhook's ``CallInfo.custom["request_uuid"]``
links the answered call (``call_id`` = its CallUUID) back to it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import re
from array import array
from collections import OrderedDict
from collections.abc import Mapping
from functools import lru_cache
from importlib import resources
from string import Template
from typing import Any, ClassVar, Literal
from urllib.parse import parse_qs, parse_qsl, quote, urlencode, urlparse, urlsplit, urlunparse
from xml.sax.saxutils import escape

import httpx

from carriers._markup import template, xml_text
from carriers._messages import StreamChecks, load_json, media_payload
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
from pipeline.audio import ulaw_decode, ulaw_encode
from pipeline.frames import AudioFrame, Clear, Dtmf, Frame, Mark, MarkPlayed, StreamStarted, StreamStopped

__all__ = ["CONTENT_TYPES", "PlivoCarrier", "PlivoMediaStream", "decode_extra_headers", "encode_extra_headers",
           "signature_string", "signature_v3"]

logger = logging.getLogger(__name__)

MULAW = "audio/x-mulaw"
L16 = "audio/x-l16"
CONTENT_TYPES: Mapping[str, tuple[str, int]] = {
    "audio/x-mulaw;rate=8000": (MULAW, 8000),
    "audio/x-l16;rate=8000": (L16, 8000),
    "audio/x-l16;rate=16000": (L16, 16000),
}
EXTRA_HEADERS_MAX = 512
_DTMF_DIGITS = frozenset("0123456789*#ABCD")
_SEND_DIGITS = re.compile(r"^[0-9*#wW]+$")
_E164 = re.compile(r"^\+[1-9][0-9]{6,14}$")
_ENDED = frozenset({"completed", "busy", "failed", "timeout", "no-answer", "cancel", "canceled", "hangup"})
_XML_INVALID = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")
_ATTR_ENTITIES = {'"': "&quot;", "\t": "&#9;", "\n": "&#10;", "\r": "&#13;"}
_ALNUM = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYabcdefghijklmnopqrstuvwxyz0123456789")  # no "Z": the escape
_UNESCAPE = re.compile(rb"Z([0-9A-F]{2})")
_SEPARATORS = re.compile(r"[,;]")


@lru_cache(maxsize=1)
def _answer_template() -> Template:
    text = resources.files("twiml").joinpath("plivo_answer.xml").read_text(encoding="utf-8")
    return Template(text.strip())


def _xml(value: str, what: str, attribute: bool = True) -> str:
    if not isinstance(value, str):
        raise ValueError(f"plivo {what} must be a string (got {type(value).__name__})")
    if _XML_INVALID.search(value):
        raise ValueError(f"plivo {what} contains a character XML cannot carry")
    return escape(value, _ATTR_ENTITIES) if attribute else escape(value)


# ---------------------------------------------------------------------------------- signatures

def _sorted_query(pairs: Mapping[str, list[str]]) -> str:
    return "&".join(f"{k}={v}" for k in sorted(pairs) for v in sorted(pairs[k]))


def signature_string(method: str, url: str, params: Mapping[str, list[str]]) -> str:
    """What Plivo signs (before ``"." + nonce``), per plivo-python's ``signature_v3`` (``docs/carriers.md`` §5.2)."""
    parts = urlparse(url)
    base = urlunparse((parts.scheme, parts.netloc, parts.path, "", "", ""))
    query = parse_qs(parts.query, keep_blank_values=True)
    if method == "GET":
        merged = {**{k: list(v) for k, v in params.items()}, **query}
        rendered = _sorted_query(merged)
        return base + "?" + rendered if rendered else base
    rendered = _sorted_query(query)
    if rendered or params:
        base += "?" + rendered
    if rendered and params:
        base += "."
    return base + "".join(f"{k}{v}" for k in sorted(params) for v in sorted(params[k]))


def signature_v3(token: str, method: str, url: str, params: Mapping[str, list[str]], nonce: str) -> str:
    """base64(HMAC-SHA256(token, signature_string + "." + nonce))."""
    message = f"{signature_string(method, url, params)}.{nonce}".encode()
    return base64.b64encode(hmac.new(token.encode(), message, hashlib.sha256).digest()).decode()


def _signature_v2(token: str, url: str, nonce: str) -> str:
    parts = urlparse(url)
    base = urlunparse((parts.scheme, parts.netloc, parts.path, "", "", ""))
    return base64.b64encode(hmac.new(token.encode(), (base + nonce).encode(), hashlib.sha256).digest()).decode()


def _matches(expected: str, header: str) -> bool:
    """Plivo's SDK splits the header on ``,`` (no trimming) and accepts any match."""
    return any(hmac.compare_digest(expected.encode(), value.encode()) for value in header.split(","))


# ---------------------------------------------------------------------------------- extraHeaders

def _escape(text: str) -> str:
    if all(c in _ALNUM for c in text):
        return text
    return "".join(c if c in _ALNUM else "".join(f"Z{b:02X}" for b in c.encode()) for c in text)


def _unescape(text: str) -> str:
    if "Z" not in text:
        return text
    return _UNESCAPE.sub(lambda m: bytes([int(m[1], 16)]), text.encode()).decode("utf-8", "replace")


def encode_extra_headers(parameters: Mapping[str, str], *, escape_values: bool = True) -> str:
    """``k=v,k2=v2`` within Plivo's limits (512 bytes, alphanumerics), escaping reversibly when asked."""
    items = []
    for name, value in parameters.items():
        if not isinstance(name, str) or not isinstance(value, str):
            raise ValueError("plivo extraHeaders names and values must be strings")
        if not name:
            raise ValueError("plivo extraHeaders names must not be empty")
        if escape_values:
            name, value = _escape(name), _escape(value)
        elif not all(c.isascii() and c.isalnum() for c in name + value):
            raise ValueError("plivo extraHeaders allows only [A-Za-z0-9] (enable escape_extra_headers)")
        items.append(f"{name}={value}")
    text = ",".join(items)
    if len(text) > EXTRA_HEADERS_MAX:
        raise ValueError(f"plivo extraHeaders is {len(text)} bytes; Plivo allows {EXTRA_HEADERS_MAX}")
    return text


def decode_extra_headers(text: str, *, escape_values: bool = True) -> dict[str, str]:
    """Parse the ``extra_headers`` string Plivo delivers (``,`` or ``;`` separated; first name wins)."""
    out: dict[str, str] = {}
    for part in _SEPARATORS.split(text):
        name, sep, value = part.strip().partition("=")
        if not name or not sep:
            continue
        if escape_values:
            name, value = _unescape(name), _unescape(value)
        out.setdefault(name, value)
    return out


# ---------------------------------------------------------------------------------- carrier

class PlivoCarrier:
    """Plivo Voice with bidirectional Audio Streaming."""

    name: ClassVar[str] = "plivo"

    def __init__(
        self,
        *,
        auth_id: str,
        auth_token: str,
        http: httpx.AsyncClient,
        api_base_url: str = "https://api.plivo.com",
        verify_signatures: bool = True,
        main_auth_token: str | None = None,
        content_type: Literal["audio/x-mulaw;rate=8000", "audio/x-l16;rate=8000",
                              "audio/x-l16;rate=16000"] = "audio/x-mulaw;rate=8000",
        l16_byte_order: Literal["little", "big"] = "little",
        stream_timeout: int = 86400,
        stream_status_url: str = "",
        transfer_url: str = "",
        escape_extra_headers: bool = True,
        accept_v2_signatures: bool = False,
        replay_cache_size: int = 100_000,
        machine_detection_time_ms: int = 5000,
    ) -> None:
        if content_type not in CONTENT_TYPES:
            raise ValueError(f"plivo content_type must be one of {', '.join(CONTENT_TYPES)} (got {content_type!r})")
        if l16_byte_order not in ("little", "big"):
            raise ValueError(f"plivo l16_byte_order must be 'little' or 'big' (got {l16_byte_order!r})")
        if not 2000 <= machine_detection_time_ms <= 10000:
            raise ValueError("plivo machine_detection_time_ms must be 2000-10000")
        self.auth_id = auth_id
        self._auth_token = auth_token
        self._main_auth_token = main_auth_token if main_auth_token is not None else auth_token
        self._http = http
        self.api_base_url = api_base_url.rstrip("/")
        self.verify_signatures = verify_signatures
        self.content_type = content_type
        self.l16_byte_order = l16_byte_order
        self.stream_timeout = int(stream_timeout)
        self.stream_status_url = stream_status_url
        self.transfer_url = transfer_url
        self.escape_extra_headers = escape_extra_headers
        self.accept_v2_signatures = accept_v2_signatures
        self.machine_detection_time_ms = machine_detection_time_ms
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._replay_cache_size = replay_cache_size
        self._dialed: OrderedDict[str, None] = OrderedDict()  # request_uuids from dial()

    def __repr__(self) -> str:  # never show the tokens
        return f"PlivoCarrier(auth_id={self.auth_id!r}, api_base_url={self.api_base_url!r})"

    # -- webhook -------------------------------------------------------------------------------

    def verify(self, request: WebhookRequest) -> None:
        if not self.verify_signatures:
            return
        headers = request.headers
        v3, ma = headers.get("x-plivo-signature-v3", ""), headers.get("x-plivo-signature-ma-v3", "")
        if not v3 and not ma:
            if self.accept_v2_signatures and headers.get("x-plivo-signature-v2"):
                return self._verify_v2(request)
            raise SignatureInvalid("plivo: missing X-Plivo-Signature-V3 header")
        nonce = headers.get("x-plivo-signature-v3-nonce", "")
        if not nonce:
            raise SignatureInvalid("plivo: missing X-Plivo-Signature-V3-Nonce header")
        method = request.method.upper()
        if method not in ("GET", "POST"):
            raise SignatureInvalid(f"plivo: cannot verify a {method[:10]} request")
        params: dict[str, list[str]] = {}
        if method == "POST":
            for key, value in _form_pairs(request):
                params.setdefault(key, []).append(value)
        expected = signature_v3(self._auth_token, method, request.url, params, nonce)
        if not (v3 and _matches(expected, v3)) and not (
                ma and _matches(signature_v3(self._main_auth_token, method, request.url, params, nonce), ma)):
            raise SignatureInvalid("plivo: signature does not match")
        self._remember(expected)  # the request's content + nonce, whichever header vouched for it

    def _verify_v2(self, request: WebhookRequest) -> None:
        nonce = request.headers.get("x-plivo-signature-v2-nonce", "")
        if not nonce:
            raise SignatureInvalid("plivo: missing X-Plivo-Signature-V2-Nonce header")
        signature = request.headers["x-plivo-signature-v2"]
        if not hmac.compare_digest(_signature_v2(self._auth_token, request.url, nonce).encode(), signature.encode()):
            raise SignatureInvalid("plivo: signature does not match")
        self._remember("v2|" + signature)

    def _remember(self, key: str) -> None:
        if key in self._seen:
            raise SignatureInvalid("plivo: replayed request (nonce already used for this request)")
        self._seen[key] = None
        if len(self._seen) > self._replay_cache_size:
            self._seen.popitem(last=False)

    def parse_call(self, request: WebhookRequest) -> CallInfo:
        params = _params(request)
        call_id = params.get("CallUUID", "")
        if not call_id:
            raise CarrierProtocolError("plivo webhook has no CallUUID")
        custom = {k[5:]: v for k, v in params.items() if k.upper().startswith("X-PH-") and len(k) > 5}
        outbound = params.get("Direction", "").startswith("outbound")
        request_uuid = params.get("RequestUUID", "")
        if outbound and request_uuid and request_uuid != call_id:
            custom["request_uuid"] = request_uuid  # the id dial() returned for this call
        return CallInfo(
            carrier=self.name,
            call_id=call_id,
            from_=_e164(params.get("From", "")),
            to=_e164(params.get("To", "")),
            account_id=self.auth_id,
            direction="outbound" if outbound else "inbound",
            custom=custom,
        )

    def answer(self, call: CallInfo, stream_url: str, parameters: Mapping[str, str]) -> tuple[str, str]:
        if not stream_url.startswith("wss://"):
            scheme = stream_url.partition("://")[0] if "://" in stream_url else "none"
            raise ValueError(f"plivo Stream url must start with wss:// (scheme is {scheme[:10]!r})")
        attributes = ""
        if self.stream_status_url:
            attributes += (f' statusCallbackUrl="{_xml(self.stream_status_url, "status callback url")}"'
                           ' statusCallbackMethod="POST"')
        extra = encode_extra_headers(parameters, escape_values=self.escape_extra_headers)
        if extra:
            attributes += f' extraHeaders="{extra}"'
        body = _answer_template().substitute(
            content_type=self.content_type, stream_timeout=self.stream_timeout, attributes=attributes,
            stream_url=_xml(stream_url, "stream url", attribute=False),
        )
        return body, "application/xml"

    def busy(self, call: CallInfo, text: str) -> tuple[str, str]:
        """``<Speak>`` the text, then ``<Hangup/>`` (``docs/carriers.md`` §5.9)::

            carrier.busy(call, "All lines are busy.")
            # ('<?xml ...?><Response><Speak>All lines are busy.</Speak><Hangup/></Response>', 'application/xml')
        """
        return template("plivo_busy.xml").substitute(text=xml_text(self.name, text, "busy text")), "application/xml"

    def transfer_markup(self, target: str) -> tuple[str, str]:
        """The XML ``transfer_url`` must answer with: ``<Dial>`` to the E.164 number or SIP URI."""
        tag = "User" if _check_target(target).startswith("sip:") else "Number"
        body = (f'<?xml version="1.0" encoding="UTF-8"?><Response><Dial><{tag}>{_xml(target, "target", False)}'
                f"</{tag}></Dial></Response>")
        return body, "application/xml"

    def open_stream(self) -> PlivoMediaStream:
        return PlivoMediaStream(content_type=self.content_type, l16_byte_order=self.l16_byte_order,
                                escape_extra_headers=self.escape_extra_headers)

    def verify_websocket(self, headers: Mapping[str, str], url: str) -> None:
        """Plivo documents no credential on the media-socket upgrade: the path token is the gate."""

    def parse_event(self, request: WebhookRequest) -> CallEvent:
        params = _params(request)
        call_id = params.get("CallUUID") or params.get("RequestUUID") or ""
        if not call_id:
            raise CarrierProtocolError("plivo event has no CallUUID")
        status = params.get("CallStatus", "")
        event = params.get("Event", "")
        answered_by = ""
        if "Machine" in params:
            machine = params["Machine"].strip().lower()
            answered_by = {"true": "machine", "false": "human"}.get(machine, "unknown")
        ended = status.lower() in _ENDED or event.lower() == "hangup"
        return CallEvent(call_id=call_id, answered_by=answered_by, ended=ended, status=status or event,
                         request_id=params.get("RequestUUID", ""))

    # -- REST ----------------------------------------------------------------------------------

    def _url(self, *parts: str) -> str:
        return "/".join([self.api_base_url, "v1/Account", quote(self.auth_id, safe=""),
                         *(quote(p, safe="") for p in parts)]) + "/"

    async def _send(self, method: str, url: str, body: dict[str, Any] | None, what: str,
                    error: type[Exception] = CallControlFailed) -> httpx.Response:
        if not self.auth_id:
            raise error(f"plivo {what} failed: no auth_id configured (PLIVO_AUTH_ID)")
        try:
            return await self._http.request(method, url, json=body, auth=(self.auth_id, self._auth_token))
        except httpx.HTTPError as exc:
            raise error(f"plivo {what} failed: {type(exc).__name__}") from exc

    async def hang_up(self, call: CallInfo) -> None:
        """``DELETE .../Call/{uuid}/``; a call Plivo no longer knows (404) has ended. A dialled call
        that was never answered is known by its request_uuid: it is cancelled through ``Request``."""
        what = f"hang-up of {call.call_id}"
        response = await self._send("DELETE", self._url("Call", call.call_id), None, what, HangupFailed)
        if response.status_code == 404 and _plivo_error(response)[0] and call.call_id in self._dialed:
            response = await self._send("DELETE", self._url("Request", call.call_id), None, what, HangupFailed)
        if response.is_success:
            logger.info("plivo call %s hung up", call.call_id)
            return
        is_plivo, message = _plivo_error(response)
        if response.status_code == 404 and is_plivo:
            logger.info("plivo call %s already ended (404)", call.call_id)
            return
        raise HangupFailed(f"plivo {what} failed: HTTP {response.status_code}: {message}")

    async def transfer(self, call: CallInfo, target: str) -> None:
        _check_target(target)
        if not self.transfer_url:
            raise CallControlFailed("plivo transfer needs transfer_url (a URL answering with transfer_markup)")
        aleg_url = self.transfer_url + ("&" if "?" in self.transfer_url else "?") + urlencode({"target": target})
        body = {"legs": "aleg", "aleg_url": aleg_url, "aleg_method": "POST"}
        await self._call_control("POST", self._url("Call", call.call_id), body, f"transfer of {call.call_id}")
        logger.info("plivo call %s transferred", call.call_id)

    async def dial(self, request: DialRequest) -> CallInfo:
        _check_target(request.to)
        if not request.answer_url.startswith(("https://", "http://")):
            raise ValueError("plivo answer_url must be an http(s) URL")
        body: dict[str, Any] = {
            "from": request.from_, "to": request.to,
            "answer_url": request.answer_url, "answer_method": "POST",
            "hangup_url": request.events_url, "hangup_method": "POST",
        }
        if request.machine_detection:
            body.update(machine_detection="true", machine_detection_time=self.machine_detection_time_ms,
                        machine_detection_url=request.events_url, machine_detection_method="POST")
        response = await self._call_control("POST", self._url("Call"), body, f"dial to {request.to}")
        try:
            uuid = response.json().get("request_uuid")
        except (ValueError, AttributeError):
            uuid = None
        if isinstance(uuid, list) and uuid:
            uuid = uuid[0]
        if not isinstance(uuid, str) or not uuid:
            raise CallControlFailed("plivo dial failed: the response has no request_uuid")
        self._dialed[uuid] = None
        if len(self._dialed) > 10_000:
            self._dialed.popitem(last=False)
        logger.info("plivo call %s dialled", uuid)
        return CallInfo(carrier=self.name, call_id=uuid, from_=request.from_, to=request.to,
                        account_id=self.auth_id, direction="outbound", custom=dict(request.parameters))

    async def send_dtmf(self, call: CallInfo, digits: str) -> bool:
        if not _SEND_DIGITS.match(digits):
            raise ValueError("plivo DTMF digits must be 0-9, *, # or w/W (waits)")
        body = {"digits": digits, "leg": "aleg"}
        await self._call_control("POST", self._url("Call", call.call_id, "DTMF"), body, f"DTMF to {call.call_id}")
        return True

    async def _call_control(self, method: str, url: str, body: dict[str, Any], what: str) -> httpx.Response:
        response = await self._send(method, url, body, what)
        if response.is_success:
            return response
        is_plivo, message = _plivo_error(response)
        ended = " (call already ended)" if response.status_code == 404 and is_plivo else ""
        raise CallControlFailed(f"plivo {what} failed{ended}: HTTP {response.status_code}: {message}")


def _e164(number: str) -> str:
    """Plivo sends numbers without the ``+`` (``14155550100``); CallInfo holds E.164."""
    return "+" + number if number.isascii() and number.isdigit() and len(number) >= 7 else number


def _check_target(target: str) -> str:
    if not isinstance(target, str) or not (_E164.match(target) or (target.startswith("sip:") and len(target) > 4
                                                                      and not any(c in target for c in "<> \r\n"))):
        raise ValueError("plivo target must be an E.164 number (+14155550100) or a sip: URI")
    return target


def _plivo_error(response: httpx.Response) -> tuple[bool, str]:
    """Plivo's JSON error body ``{"api_id", "error"}`` -> (is Plivo's shape, message)."""
    fallback = response.reason_phrase or "no error message"
    try:
        data = response.json()
    except ValueError:
        return False, fallback
    if not isinstance(data, dict) or not ("api_id" in data or "error" in data):
        return False, fallback
    error = data.get("error") or data.get("message")
    if error is None:
        return True, fallback
    text = error if isinstance(error, str) else json.dumps(error, separators=(",", ":"))
    return True, text[:300]


def _form_pairs(request: WebhookRequest) -> list[tuple[str, str]]:
    if request.form:
        return list(request.form)
    if request.body and "json" not in request.headers.get("content-type", ""):
        try:
            return parse_qsl(request.body.decode("utf-8"), keep_blank_values=True)
        except UnicodeDecodeError:
            return []
    return []


def _params(request: WebhookRequest) -> dict[str, str]:
    """GET: the URL query; POST: the form (what Plivo signs). The first value of a name wins."""
    if request.method.upper() == "GET":
        pairs = parse_qsl(urlsplit(request.url).query, keep_blank_values=True)
    else:
        pairs = _form_pairs(request)
    params: dict[str, str] = {}
    for key, value in pairs:
        params.setdefault(key, value)
    return params


# ---------------------------------------------------------------------------------- media stream

class PlivoMediaStream(StreamChecks):
    """Sans-I/O codec for one Plivo Audio Streaming WebSocket (µ-law 8 kHz or L16 8/16 kHz <-> PCM16)."""
    carrier, id_keys, id_attr, open_hint = "plivo", ("streamId",), "stream_id", "no streamId yet"

    frame_ms: int = 20
    max_message_ms: int = 200      # no documented limit; 20-200 ms chunks keep a clearAudio effective
    marks: bool = True

    def __init__(self, *, content_type: str = "audio/x-mulaw;rate=8000", l16_byte_order: str = "little",
                 escape_extra_headers: bool = True) -> None:
        if content_type not in CONTENT_TYPES:
            raise ValueError(f"plivo content_type must be one of {', '.join(CONTENT_TYPES)}")
        self.encoding, self.sample_rate = CONTENT_TYPES[content_type]
        self._mulaw = self.encoding == MULAW
        self._swap = not self._mulaw and l16_byte_order == "big"
        self._escape = escape_extra_headers
        self.started: bool = False
        self.stream_id = ""
        self.call_id = ""
        self._play_prefix = ('{"event":"playAudio","media":{"contentType":"%s","sampleRate":%d,"payload":"'
                             % (self.encoding, self.sample_rate))

    # -- Plivo -> us ---------------------------------------------------------------------------

    def decode(self, message: str | bytes) -> list[Frame]:
        if not isinstance(message, str):
            raise CarrierProtocolError("plivo sends text frames only")
        data = load_json("plivo message", message)
        if not isinstance(data, dict) or not isinstance(event := data.get("event"), str):
            raise CarrierProtocolError("plivo message has no event")
        if event == "media":
            return self._decode_media(data)
        if event == "start":
            return self._decode_start(data)
        if event == "dtmf":
            self._require_started(event, data)
            dtmf = data.get("dtmf")
            digit = dtmf.get("digit") if isinstance(dtmf, dict) else None
            if not isinstance(digit, str) or not digit:
                raise CarrierProtocolError("plivo dtmf event has no dtmf.digit")
            if digit not in _DTMF_DIGITS:
                raise CarrierProtocolError("plivo dtmf digit is not one of 0-9 * # A-D")
            return [Dtmf(digit)]
        if event in ("playedStream", "played"):
            self._require_started(event, data)
            name = data.get("name")
            if not isinstance(name, str) or not name:
                raise CarrierProtocolError(f"plivo {event} event has no name")
            return [MarkPlayed(name)]
        if event == "clearedAudio":
            self._require_started(event, data)
            return []
        if event == "stop":  # undocumented; accepted defensively
            self._check_stream(data)
            return [StreamStopped("stop")]
        return []  # Plivo may add events

    def _decode_media(self, data: dict[str, Any]) -> list[Frame]:
        if not self.started:
            raise CarrierProtocolError("plivo media before start")
        self._check_stream(data)
        raw = media_payload("plivo", data)   # b"" for our own audio echoed on an outbound track
        if not raw:
            return []
        if self._mulaw:
            return [AudioFrame(ulaw_decode(raw), self.sample_rate)]
        if len(raw) % 2:
            raise CarrierProtocolError("plivo L16 media payload has an odd number of bytes")
        return [AudioFrame(_swap16(raw) if self._swap else raw, self.sample_rate)]

    def _decode_start(self, data: dict[str, Any]) -> list[Frame]:
        start, stream_id, call_id, media_format = self._start_fields(data, "callId")
        encoding = str(media_format.get("encoding", self.encoding)).split(";", 1)[0].strip()
        rate = media_format.get("sampleRate", self.sample_rate)
        if encoding != self.encoding or str(rate) != str(self.sample_rate):
            raise CarrierProtocolError(
                f"plivo start.mediaFormat {encoding:.40} {rate!s:.10} Hz is not supported "
                f"(expected {self.encoding} {self.sample_rate} Hz, the answer's contentType)"
            )
        extra = data.get("extra_headers", start.get("extra_headers", ""))
        if extra is None:
            extra = ""
        if not isinstance(extra, str):
            raise CarrierProtocolError("plivo extra_headers is not a string")
        account_id = start.get("accountId", "")
        self.started = True
        self.stream_id = stream_id
        self.call_id = call_id
        return [
            StreamStarted(
                stream_id=stream_id,
                call_id=call_id,
                account_id=account_id if isinstance(account_id, str) else "",
                custom_parameters=decode_extra_headers(extra, escape_values=self._escape),
                sample_rate=self.sample_rate,
                encoding=self.encoding,
            )
        ]

    # -- us -> Plivo ---------------------------------------------------------------------------

    def encode(self, frame: Frame) -> list[str | bytes]:
        if isinstance(frame, AudioFrame):
            if frame.sample_rate != self.sample_rate:
                raise ValueError(f"plivo stream needs {self.sample_rate} Hz audio (got {frame.sample_rate} Hz); "
                                 "resample first")
            self._require_open()
            if not frame.pcm:
                return []
            if self._mulaw:
                raw = ulaw_encode(frame.pcm)
            else:
                raw = _swap16(frame.pcm) if self._swap else frame.pcm
            return [self._play_prefix + base64.b64encode(raw).decode("ascii") + '"}}']
        if isinstance(frame, Mark):
            self._require_open()
            return [json.dumps({"event": "checkpoint", "streamId": self.stream_id, "name": frame.name},
                               separators=(",", ":"))]
        if isinstance(frame, Clear):
            self._require_open()
            return [json.dumps({"event": "clearAudio", "streamId": self.stream_id}, separators=(",", ":"))]
        raise ValueError(f"plivo cannot send {type(frame).__name__} frames")



def _swap16(pcm: bytes) -> bytes:
    """Swap the two bytes of every 16-bit sample (little <-> big endian)."""
    samples = array("h", pcm)
    samples.byteswap()
    return samples.tobytes()

