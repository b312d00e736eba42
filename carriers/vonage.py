"""Vonage carrier (Voice API): signed-webhook JWTs, NCCO ``connect`` to a websocket, raw L16 media, REST.

Wire contracts: ``docs/carriers.md`` §4 (Vonage Voice API, not the Video API Audio Connector) and
§9.4 (test vectors).

Usage::

    carrier = VonageCarrier(application_id="aaaaaaaa-...", private_key=pem, signature_secret=secret,
                            http=httpx.AsyncClient())
    carrier.verify(request)                     # raises SignatureInvalid("vonage: <reason>")
    call = carrier.parse_call(request)          # CallInfo(carrier="vonage", call_id=<call leg uuid>, ...)
    body, media_type = carrier.answer(call, "wss://gw.example.com/media/vonage/3f9c1e", {"session_id": "3f9c1e"})
    carrier.verify_websocket(headers, url)      # the NCCO's authorization value, when ws_auth_value is set

    stream = carrier.open_stream()              # one per media WebSocket
    for frame in stream.decode(message):        # text: websocket:connected/dtmf/notify; bytes: L16 audio
        ...
    for message in stream.encode(AudioFrame(pcm16k, 16000)):   # exact 20 ms binary frames
        await websocket.send(message)
    await carrier.hang_up(call)                 # PUT /v1/calls/{uuid} {"action":"hangup"}; gone = success

Webhooks: Vonage signs answer and event webhooks with an HS256 JWT in ``Authorization: Bearer``
(the account's signature secret). ``verify`` checks the signature, the ``payload_hash`` claim
(SHA-256 of the raw body), ``iat`` (at most ``max_token_age_s`` old and at most ``clock_skew_s``
ahead of our clock), ``exp``/``nbf`` when present (same leeway), ``application_id`` when present,
and refuses a ``jti`` seen before (``reject_replays``; an in-process cache, so per gateway process;
a Vonage retry that reused its token would be refused too). ``verify_signatures=False`` skips all of
it (local testing only); ``ws_auth_value`` is checked regardless. A secret under 32 bytes is logged.
REST calls carry an RS256 JWT signed with the application's private key (``PyJWT[crypto]``).
The media socket is the NCCO's websocket leg: it has its own uuid, which Vonage does not tell the
socket, so ``answer`` adds the caller's leg uuid as the ``call_uuid`` header (``StreamStarted.call_id``).
There is no ``stop`` message: the socket simply closes.

Switches for what ``docs/carriers.md`` §8.3 marks ``[?]`` (constructor arguments, defaults in brackets):

* ``clear_and_notify`` [True]: barge-in sends ``{"action":"clear"}`` and a marker is sent as
  ``{"action":"notify","payload":{"name":...}}``, acknowledged by ``websocket:notify``; the
  stream's ``marks`` follows it. False: neither is sent (``marks`` is False; playback is timed).
* ``sample_rate`` [16000]: ``audio/l16;rate=`` 8000, 16000 or 24000 (24 kHz: current SDK enums only).
* ``ws_auth_value`` [""]: when set, the NCCO endpoint carries ``"authorization": {"type":"custom",
  "value": ...}`` and ``verify_websocket`` requires that exact ``Authorization`` header on the upgrade.
* GET answer webhooks: the ``payload_hash`` of a GET is the SHA-256 of the query parameters as a
  compact JSON object in their original order (a Vonage support article); the usual JSON spellings
  are accepted. Prefer ``answer_method=POST``.
* DTMF in: ``digit`` at top level, else ``dtmf.digit`` or a string ``dtmf``.
* ``amd`` ["advanced"]: ``advanced_machine_detection`` ``{"behavior":"continue","mode":amd_mode}``
  (``amd_mode`` ["default"]: asynchronous, with beep detection; "detect"/"detect_beep" hold the
  NCCO ~4-5 s) or "standard": ``machine_detection: "continue"``. Results (``human``/``machine``,
  ``sub_state`` beep events) reach ``DialRequest.events_url``; ``parse_event`` normalises them.
* The NCCO ``from`` (required by Vonage's SDK models): our number (the call's ``to`` inbound, its
  ``from`` outbound) or ``answer_from``; omitted when that is not a 7-15 digit number.
* Hang-up of a call Vonage no longer has: a 404 with a JSON body is success, and so is a
  400/409/410/422 whose text says the call is not in progress or already completed.
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import json
import logging
import math
import os
import re
import time
import uuid
import warnings
from collections.abc import Callable, Mapping
from functools import lru_cache
from importlib import resources
from string import Template
from typing import Any, ClassVar, Literal, TypeGuard
from urllib.parse import parse_qsl, quote, urlsplit

import httpx
import jwt
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from carriers._messages import load_json
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
from pipeline.frames import AudioFrame, Clear, Dtmf, Frame, Mark, MarkPlayed, StreamStarted
from pipeline.jsonutil import loads

__all__ = ["VonageCarrier", "VonageMediaStream", "decode_signed_token"]

logger = logging.getLogger(__name__)

RATES = (8000, 16000, 24000)
ENCODING = "audio/l16"
FRAME_MS = 20
_DTMF_DIGITS = frozenset("0123456789*#ABCD")
_SEND_DIGITS = re.compile(r"[0-9*#p]{1,64}")          # p = 500 ms pause
_NUMBER = re.compile(r"\+?[1-9][0-9]{6,14}")            # Vonage: 7-15 digits, no +
_SIP_URI = re.compile(r"sips?:[^\s\"<>]+", re.IGNORECASE)
_CONTENT_TYPE = re.compile(r"audio/l16;rate=([0-9]{1,6})")   # int() refuses over 4300 digits
_RESERVED_HEADERS = frozenset({"event", "content-type", "call_uuid"})
_MAX_HEADERS_BYTES = 512
_ENDED = frozenset({"completed", "busy", "cancelled", "failed", "rejected", "timeout", "unanswered"})
_GONE_TEXT = re.compile(r"not (?:in progress|active|found)|already|completed|ended|no longer|does not exist", re.I)
_SHORT_KEY_WARNING: type[Warning] = getattr(jwt, "InsecureKeyLengthWarning", UserWarning)
_REPLAY_CACHE_MAX = 100_000


@lru_cache(maxsize=1)
def _answer_template() -> Any:
    return json.loads(resources.files("twiml").joinpath("vonage_answer.json").read_text(encoding="utf-8"))


@lru_cache(maxsize=1)
def _busy_template() -> Any:
    return json.loads(resources.files("twiml").joinpath("vonage_busy.json").read_text(encoding="utf-8"))


def _render(node: Any, values: Mapping[str, Any]) -> Any:
    """Fill the template: ``"$name"`` becomes the value itself (keys whose value is None are
    dropped), ``$name`` inside a longer string is substituted; json.dumps escapes everything."""
    if isinstance(node, list):
        return [_render(item, values) for item in node]
    if isinstance(node, dict):
        out = {}
        for key, item in node.items():
            rendered = _render(item, values)
            if rendered is not None:
                out[key] = rendered
        return out
    if isinstance(node, str) and node.startswith("$") and node[1:] in values:
        return values[node[1:]]
    if isinstance(node, str):
        return Template(node).substitute(values)
    return node


def decode_signed_token(token: str, secret: str) -> dict[str, Any]:
    """Verify an HS256 webhook JWT's signature and return its claims (the caller checks the times).

    Raises :class:`SignatureInvalid` for a wrong signature, another algorithm or a malformed token.
    """
    try:
        with warnings.catch_warnings():  # a short secret is logged once by VonageCarrier, not per call
            warnings.simplefilter("ignore", _SHORT_KEY_WARNING)
            claims = jwt.decode(token, secret, algorithms=["HS256"], options={
                "verify_exp": False, "verify_iat": False, "verify_nbf": False, "verify_aud": False,
                "verify_iss": False})
    except jwt.InvalidSignatureError:
        raise SignatureInvalid("vonage: signature does not match") from None
    except jwt.InvalidAlgorithmError:
        raise SignatureInvalid("vonage: token is not signed with HS256") from None
    except jwt.DecodeError:
        raise SignatureInvalid("vonage: malformed token") from None
    except jwt.PyJWTError as exc:
        raise SignatureInvalid(f"vonage: invalid token ({type(exc).__name__})") from None
    if not isinstance(claims, dict):
        raise SignatureInvalid("vonage: token claims are not an object")
    return claims


def _load_private_key(private_key: str | bytes) -> RSAPrivateKey | None:
    """The application's RSA key from PEM text (or the path of a PEM file, as Vonage's SDKs accept)."""
    if not private_key:
        return None
    data = private_key.encode() if isinstance(private_key, str) else private_key
    if not data.lstrip().startswith(b"-----BEGIN") and os.path.isfile(data):
        with open(data, "rb") as handle:
            data = handle.read()
    if b"\\n" in data and b"\n" not in data.strip():  # a PEM squeezed into one env-var line
        data = data.replace(b"\\n", b"\n")
    try:
        key = load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        raise ValueError("vonage private_key is not an unencrypted PEM private key") from None
    if not isinstance(key, RSAPrivateKey):
        raise ValueError("vonage private_key must be an RSA key (RS256)")
    return key


class VonageCarrier:
    """Vonage Voice API with an NCCO websocket endpoint (binary L16 + JSON text events)."""

    name: ClassVar[str] = "vonage"

    def __init__(
        self,
        *,
        application_id: str,
        private_key: str | bytes,
        signature_secret: str,
        http: httpx.AsyncClient,
        api_base_url: str = "https://api.nexmo.com",
        verify_signatures: bool = True,
        ws_auth_value: str = "",
        sample_rate: int = 16000,
        clear_and_notify: bool = True,
        answer_from: str = "",
        max_token_age_s: float = 300.0,
        clock_skew_s: float = 10.0,
        reject_replays: bool = True,
        amd: Literal["advanced", "standard"] = "advanced",
        amd_mode: Literal["default", "detect", "detect_beep"] = "default",
        rest_token_ttl_s: int = 900,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if sample_rate not in RATES:
            raise ValueError(f"vonage sample_rate must be one of {', '.join(map(str, RATES))} (got {sample_rate})")
        if amd not in ("advanced", "standard"):
            raise ValueError(f"vonage amd must be 'advanced' or 'standard' (got {amd!r})")
        if amd_mode not in ("default", "detect", "detect_beep"):
            raise ValueError(f"vonage amd_mode must be default, detect or detect_beep (got {amd_mode!r})")
        self.application_id = application_id
        self._private_key = _load_private_key(private_key)
        self._signature_secret = signature_secret
        self._http = http
        self.api_base_url = api_base_url.rstrip("/")
        self.verify_signatures = verify_signatures
        self._ws_auth_value = ws_auth_value
        self.sample_rate = sample_rate
        self.clear_and_notify = clear_and_notify
        self.answer_from = answer_from
        self.max_token_age_s = max_token_age_s
        self.clock_skew_s = clock_skew_s
        self.reject_replays = reject_replays
        self.amd, self.amd_mode = amd, amd_mode
        self.rest_token_ttl_s = rest_token_ttl_s
        self._clock = clock
        self._seen_jti: collections.OrderedDict[str, float] = collections.OrderedDict()
        if verify_signatures and signature_secret and len(signature_secret.encode()) < 32:
            logger.warning("vonage signature_secret is shorter than 32 bytes: HS256 webhook signatures are weak")

    def __repr__(self) -> str:  # never show the key or the secrets
        return f"VonageCarrier(application_id={self.application_id!r}, api_base_url={self.api_base_url!r})"

    # -- webhooks ------------------------------------------------------------------------------

    def verify(self, request: WebhookRequest) -> None:
        if not self.verify_signatures:
            return
        if not self._signature_secret:
            raise SignatureInvalid("vonage: no signature_secret configured")
        scheme, _, token = request.headers.get("authorization", "").strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise SignatureInvalid("vonage: missing Authorization: Bearer token")
        claims = decode_signed_token(token.strip(), self._signature_secret)
        now = self._clock()
        self._check_times(claims, now)
        app = claims.get("application_id")
        if app is not None and self.application_id and app != self.application_id:
            raise SignatureInvalid("vonage: token is for another application")
        claimed = claims.get("payload_hash")
        if not isinstance(claimed, str) or not claimed:
            raise SignatureInvalid("vonage: token has no payload_hash")
        if not any(hmac.compare_digest(claimed.lower().encode(), h.encode()) for h in _payload_hashes(request)):
            raise SignatureInvalid("vonage: payload_hash does not match the body")
        if self.reject_replays:
            self._check_replay(claims, now)

    def _check_times(self, claims: Mapping[str, Any], now: float) -> None:
        skew = self.clock_skew_s
        iat = claims.get("iat")
        if not _is_number(iat):
            raise SignatureInvalid("vonage: token has no numeric iat")
        if iat > now + skew:
            raise SignatureInvalid(f"vonage: token issued {iat - now:.0f} s in the future")
        if now - iat > self.max_token_age_s + skew:
            raise SignatureInvalid(f"vonage: token is stale (issued {now - iat:.0f} s ago)")
        exp, nbf = claims.get("exp"), claims.get("nbf")
        if exp is not None and (not _is_number(exp) or now > exp + skew):
            raise SignatureInvalid("vonage: token has expired")
        if nbf is not None and (not _is_number(nbf) or nbf > now + skew):
            raise SignatureInvalid("vonage: token is not valid yet (nbf)")

    def _check_replay(self, claims: Mapping[str, Any], now: float) -> None:
        jti = claims.get("jti")
        if not isinstance(jti, str) or not jti:
            raise SignatureInvalid("vonage: token has no jti (replays cannot be detected)")
        seen = self._seen_jti
        while seen and (next(iter(seen.values())) < now or len(seen) >= _REPLAY_CACHE_MAX):
            seen.popitem(last=False)
        if jti in seen:
            raise SignatureInvalid("vonage: token replayed (jti seen before)")
        seen[jti] = max(now, float(claims["iat"]) + self.max_token_age_s + 2 * self.clock_skew_s)

    def verify_websocket(self, headers: Mapping[str, str], url: str) -> None:
        """With ``ws_auth_value`` set, the upgrade must carry it as ``Authorization`` (checked even
        when ``verify_signatures`` is off: it is a shared secret, not a signature)."""
        expected = self._ws_auth_value
        if not expected:
            return
        supplied = next((v for k, v in headers.items() if k.lower() == "authorization"), None)
        if supplied is None:
            raise SignatureInvalid("vonage: websocket upgrade has no Authorization header")
        if not hmac.compare_digest(supplied.strip().encode(), expected.encode()):
            raise SignatureInvalid("vonage: websocket Authorization does not match")

    def parse_call(self, request: WebhookRequest) -> CallInfo:
        params = _webhook_params(request)
        call_id = params.get("uuid")
        if not isinstance(call_id, str) or not call_id:
            raise CarrierProtocolError("vonage webhook has no uuid")
        custom = {k: v for k, v in params.items() if k.startswith("SipHeader_") and isinstance(v, str)}
        data = params.get("custom_data")
        if isinstance(data, str):
            try:
                data = loads(data)
            except ValueError:
                data = None
        if isinstance(data, dict):
            custom.update({k: v for k, v in data.items() if isinstance(k, str) and isinstance(v, str)})
        from_ = params.get("from") or params.get("from_user") or ""
        direction = params.get("direction", "inbound")
        return CallInfo(
            carrier=self.name,
            call_id=call_id,
            from_=from_ if isinstance(from_, str) else "",
            to=_str(params.get("to")),
            direction="outbound" if direction == "outbound" else "inbound",
            custom=custom,
        )

    def answer(self, call: CallInfo, stream_url: str, parameters: Mapping[str, str]) -> tuple[str, str]:
        if "call_uuid" in parameters:
            raise ValueError("vonage websocket header name 'call_uuid' is reserved")
        headers = {**parameters, "call_uuid": call.call_id} if call.call_id else dict(parameters)
        our_number = call.to if call.direction == "inbound" else call.from_
        ncco = self._ncco(stream_url, headers, self.answer_from or our_number)
        return json.dumps(ncco, separators=(",", ":")), "application/json"

    def busy(self, call: CallInfo, text: str) -> tuple[str, str]:
        """An NCCO with one ``talk`` action: the call ends after its last action (``docs/carriers.md``
        §4.8)::

            carrier.busy(call, "All lines are busy.")
            # ('[{"action":"talk","text":"All lines are busy."}]', 'application/json')
        """
        if not isinstance(text, str) or re.search("[\ud800-\udfff]", text):
            raise ValueError("vonage busy text must be a string of valid Unicode")
        ncco = _render(_busy_template(), {"text": text})
        return json.dumps(ncco, separators=(",", ":")), "application/json"

    def _ncco(self, stream_url: str, headers: Mapping[str, str], from_: str) -> list[dict[str, Any]]:
        if not isinstance(stream_url, str) or not stream_url.startswith("wss://"):
            scheme = stream_url.partition("://")[0] if "://" in str(stream_url) else "none"
            raise ValueError(f"vonage websocket uri must start with wss:// (scheme is {scheme[:10]!r})")
        for name, value in headers.items():
            if name in _RESERVED_HEADERS and name != "call_uuid":
                raise ValueError(f"vonage websocket header name {name!r} is reserved")
            for what, text in (("name", name), ("value", value)):
                if not isinstance(text, str):
                    raise ValueError(f"vonage websocket header {what} must be a string (got {type(text).__name__})")
                if re.search("[\ud800-\udfff]", text):
                    raise ValueError(f"vonage websocket header {what} is not valid Unicode")
        size = len(json.dumps(headers, separators=(",", ":"), ensure_ascii=False).encode())
        if size > _MAX_HEADERS_BYTES:
            raise ValueError(f"vonage websocket headers are {size} bytes; Vonage allows {_MAX_HEADERS_BYTES}")
        auth = {"type": "custom", "value": self._ws_auth_value} if self._ws_auth_value else None
        number = from_.lstrip("+") if _NUMBER.fullmatch(from_ or "") else None
        ncco: list[dict[str, Any]] = _render(_answer_template(), {
            "from": number, "stream_url": stream_url, "rate": str(self.sample_rate), "headers": dict(headers),
            "authorization": auth})
        return ncco

    def open_stream(self) -> VonageMediaStream:
        return VonageMediaStream(sample_rate=self.sample_rate, clear_and_notify=self.clear_and_notify)

    def parse_event(self, request: WebhookRequest) -> CallEvent:
        """Status events (``status``: started ... completed) and AMD results (``human``/``machine``,
        ``call_uuid`` instead of ``uuid``; ``sub_state`` beep_start/beep_timeout)."""
        params = _webhook_params(request)
        call_id = _str(params.get("uuid")) or _str(params.get("call_uuid"))
        status = _str(params.get("status"))
        if not call_id:
            raise CarrierProtocolError("vonage event has no uuid")
        answered_by = status if status in ("human", "machine") else ""
        return CallEvent(call_id=call_id, answered_by=answered_by, ended=status in _ENDED, status=status)

    # -- REST ----------------------------------------------------------------------------------

    def _rest_token(self, failure: type[Exception]) -> str:
        if self._private_key is None:
            raise failure("vonage: no private_key configured for the REST API")
        now = int(self._clock())
        claims = {"application_id": self.application_id, "iat": now, "jti": str(uuid.uuid4()),
                  "exp": now + self.rest_token_ttl_s}  # the claims Vonage's own JwtClient sends
        return jwt.encode(claims, self._private_key, algorithm="RS256")

    async def _call(self, method: str, path: str, body: Mapping[str, Any], what: str,
                    failure: type[Exception] = CallControlFailed) -> httpx.Response:
        headers = {"Authorization": f"Bearer {self._rest_token(failure)}", "Accept": "application/json"}
        try:
            return await self._http.request(method, self.api_base_url + path, json=body, headers=headers)
        except httpx.HTTPError as exc:
            raise failure(f"vonage {what} failed: {type(exc).__name__}") from exc

    async def hang_up(self, call: CallInfo) -> None:
        """``PUT /v1/calls/{uuid}`` hangup; a call Vonage no longer has counts as hung up."""
        what = f"hang-up of {call.call_id}"
        response = await self._call("PUT", f"/v1/calls/{quote(call.call_id, safe='')}", {"action": "hangup"},
                                    what, HangupFailed)
        if response.is_success:
            logger.info("vonage call %s hung up", call.call_id)
            return
        if _already_gone(response):
            logger.info("vonage call %s already ended (HTTP %d)", call.call_id, response.status_code)
            return
        raise HangupFailed(f"vonage {what} failed: {_vonage_error(response)}")

    async def transfer(self, call: CallInfo, target: str) -> None:
        """Move the caller's leg to a new NCCO that connects it to ``target`` (E.164 or sip: URI);
        the websocket leg then hears nothing, so the gateway closes the media socket."""
        endpoint = _endpoint(target)
        our_number = self.answer_from or (call.to if call.direction == "inbound" else call.from_)
        connect: dict[str, Any] = {"action": "connect", "endpoint": [endpoint]}
        if _NUMBER.fullmatch(our_number or ""):
            connect["from"] = our_number.lstrip("+")
        elif endpoint["type"] == "phone":
            connect["randomFromNumber"] = True
        what = f"transfer of {call.call_id}"
        response = await self._call("PUT", f"/v1/calls/{quote(call.call_id, safe='')}",
                                    {"action": "transfer", "destination": {"type": "ncco", "ncco": [connect]}}, what)
        if not response.is_success:
            raise CallControlFailed(f"vonage {what} failed: {_vonage_error(response)}")
        logger.info("vonage call %s transferred to a %s endpoint", call.call_id, endpoint["type"])

    async def dial(self, request: DialRequest) -> CallInfo:
        """``POST /v1/calls`` with an inline NCCO that connects the answered call to ``stream_url``."""
        from_ = request.from_.lstrip("+")
        if not _NUMBER.fullmatch(request.from_ or ""):
            raise CallControlFailed("vonage dial: from_ must be an E.164 number")
        body: dict[str, Any] = {
            "to": [_endpoint(request.to)],
            "from": {"type": "phone", "number": from_},
            "ncco": self._ncco(request.stream_url, request.parameters, from_),
        }
        if request.events_url:
            body["event_url"] = [request.events_url]
            body["event_method"] = "POST"
        if request.machine_detection:
            if self.amd == "advanced":
                body["advanced_machine_detection"] = {"behavior": "continue", "mode": self.amd_mode}
            else:
                body["machine_detection"] = "continue"
        response = await self._call("POST", "/v1/calls", body, "dial")
        if not response.is_success:
            raise CallControlFailed(f"vonage dial failed: {_vonage_error(response)}")
        try:
            data = response.json()
        except ValueError:
            data = None
        if not isinstance(data, dict) or not isinstance(data.get("uuid"), str) or not data["uuid"]:
            raise CallControlFailed("vonage dial failed: the response has no call uuid")
        logger.info("vonage outbound call %s created", data["uuid"])
        return CallInfo(carrier=self.name, call_id=data["uuid"], from_=from_, to=request.to.lstrip("+"),
                        direction="outbound", custom=dict(request.parameters))

    async def send_dtmf(self, call: CallInfo, digits: str) -> bool:
        """``PUT /v1/calls/{uuid}/dtmf`` (digits 0-9 * # and p for a pause)."""
        if not _SEND_DIGITS.fullmatch(digits):
            raise CallControlFailed("vonage dtmf digits must be 1-64 of 0-9 * # p")
        what = f"dtmf to {call.call_id}"
        response = await self._call("PUT", f"/v1/calls/{quote(call.call_id, safe='')}/dtmf", {"digits": digits}, what)
        if not response.is_success:
            raise CallControlFailed(f"vonage {what} failed: {_vonage_error(response)}")
        return True


def _endpoint(target: str) -> dict[str, str]:
    if _NUMBER.fullmatch(target or ""):
        return {"type": "phone", "number": target.lstrip("+")}
    if _SIP_URI.fullmatch(target or ""):
        return {"type": "sip", "uri": target}
    raise CallControlFailed("vonage: target must be an E.164 number or a sip: URI")


def _vonage_error(response: httpx.Response) -> str:
    """Vonage's RFC 7807 body ``{"type","title","detail","instance"}`` -> "HTTP 401: title: detail"."""
    title = detail = ""
    try:
        data = response.json()
    except ValueError:
        data = None
    if isinstance(data, dict):
        title = _str(data.get("title")) or _str(data.get("error_title"))
        detail = _str(data.get("detail")) or _str(data.get("error_text"))
    parts = ([p for p in (title, detail if detail != title else "") if p]
             or [response.reason_phrase or "no error message"])
    return f"HTTP {response.status_code}: " + ": ".join(parts)[:300]


def _already_gone(response: httpx.Response) -> bool:
    """404 with a JSON body (not a proxy's page), or a 4xx whose text says the call has ended."""
    try:
        data = response.json()
    except ValueError:
        return False
    if not isinstance(data, dict):
        return False
    if response.status_code == 404:
        return True
    text = " ".join(_str(data.get(k)) for k in ("type", "title", "detail", "error_title"))
    return response.status_code in (400, 409, 410, 422) and bool(_GONE_TEXT.search(text))


def _payload_hashes(request: WebhookRequest) -> list[str]:
    """The SHA-256 hex digests a genuine ``payload_hash`` may have for this request."""
    if request.method.upper() != "GET":
        return [hashlib.sha256(request.body).hexdigest()]
    params = dict(parse_qsl(urlsplit(request.url).query, keep_blank_values=True))
    hashes = [] if params else [hashlib.sha256(b"").hexdigest()]
    for ascii_only in (False, True):
        text = json.dumps(params, separators=(",", ":"), ensure_ascii=ascii_only)
        hashes.append(hashlib.sha256(text.encode()).hexdigest())
        hashes.append(hashlib.sha256(text.replace("/", "\\/").encode()).hexdigest())
    return hashes


def _webhook_params(request: WebhookRequest) -> dict[str, Any]:
    """GET: the query; POST: the JSON body (form bodies are accepted too)."""
    if request.method.upper() == "GET" or not request.body.strip():
        return dict(parse_qsl(urlsplit(request.url).query, keep_blank_values=True))
    content_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if content_type == "application/x-www-form-urlencoded":
        return dict(request.form) if request.form else dict(
            parse_qsl(request.body.decode("utf-8", "replace"), keep_blank_values=True))
    data = load_json("vonage webhook body", request.body)
    if not isinstance(data, dict):
        raise CarrierProtocolError("vonage webhook body is not a JSON object")
    return data


def _is_number(value: object) -> TypeGuard[float]:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _str(value: object) -> str:
    return value if isinstance(value, str) else ""


class VonageMediaStream:
    """Sans-I/O codec for one Vonage websocket leg: binary L16 (little-endian, mono) both ways,
    JSON text events from Vonage, JSON text commands to it."""

    frame_ms: int = FRAME_MS
    max_message_ms: int = FRAME_MS   # every binary message is exactly one 20 ms frame

    def __init__(self, *, sample_rate: int = 16000, clear_and_notify: bool = True) -> None:
        if sample_rate not in RATES:
            raise ValueError(f"vonage sample_rate must be one of {', '.join(map(str, RATES))} (got {sample_rate})")
        self.sample_rate = sample_rate
        self.marks = clear_and_notify
        self.started = False
        self.call_uuid = ""
        self.headers: dict[str, str] = {}
        self._frame_bytes = sample_rate * FRAME_MS // 1000 * 2
        self._content_type = f"{ENCODING};rate={sample_rate}"

    # -- Vonage -> us --------------------------------------------------------------------------

    def decode(self, message: str | bytes) -> list[Frame]:
        if not isinstance(message, str):  # a binary frame: audio, never JSON
            if not self.started:
                raise CarrierProtocolError("vonage audio before websocket:connected")
            if len(message) % 2:
                raise CarrierProtocolError(f"vonage audio frame of {len(message)} bytes is not whole 16-bit samples")
            return [AudioFrame(bytes(message), self.sample_rate)] if message else []
        data = load_json("vonage text message", message)
        if not isinstance(data, dict) or not isinstance(event := data.get("event"), str):
            raise CarrierProtocolError("vonage text message has no event")
        if event == "websocket:connected":
            return self._decode_connected(data)
        if event == "websocket:dtmf":
            self._require_started(event)
            return [Dtmf(_digit(data))]
        if event == "websocket:notify":
            self._require_started(event)
            payload = data.get("payload")
            name = payload.get("name") if isinstance(payload, dict) else None
            if not isinstance(name, str) or not name:
                raise CarrierProtocolError("vonage websocket:notify has no payload.name")
            return [MarkPlayed(name)]
        return []  # websocket:cleared and anything Vonage adds

    def _decode_connected(self, data: dict[str, Any]) -> list[Frame]:
        if self.started:
            raise CarrierProtocolError("vonage sent a second websocket:connected")
        content_type = data.get("content-type")
        if not isinstance(content_type, str):
            raise CarrierProtocolError("vonage websocket:connected has no content-type")
        match = _CONTENT_TYPE.fullmatch(content_type.replace(" ", "").lower())
        if match is None or int(match[1]) != self.sample_rate:
            raise CarrierProtocolError(
                f"vonage websocket:connected content-type {content_type[:40]!r} is not supported "
                f"(expected {self._content_type})")
        headers: dict[str, str] = {}
        for key, value in data.items():
            if key not in ("event", "content-type"):
                headers[key] = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
        self.call_uuid = headers.pop("call_uuid", "")
        self.headers = headers
        self.started = True
        return [StreamStarted(stream_id=headers.get("session_id") or self.call_uuid or "vonage-websocket",
                              call_id=self.call_uuid, custom_parameters=dict(headers),
                              sample_rate=self.sample_rate, encoding=ENCODING)]

    def _require_started(self, event: str) -> None:
        if not self.started:
            raise CarrierProtocolError(f"vonage {event} before websocket:connected")

    # -- us -> Vonage --------------------------------------------------------------------------

    def encode(self, frame: Frame) -> list[str | bytes]:
        if isinstance(frame, AudioFrame):
            if frame.sample_rate != self.sample_rate:
                raise ValueError(f"vonage needs {self.sample_rate} Hz audio (got {frame.sample_rate} Hz); "
                                 "resample first")
            self._require_open()
            pcm, size = frame.pcm, self._frame_bytes
            if len(pcm) == size:  # the playout's usual case
                return [pcm]
            frames = [pcm[i:i + size] for i in range(0, len(pcm), size)]
            if frames and len(frames[-1]) < size:
                frames[-1] += bytes(size - len(frames[-1]))  # pad the tail with silence
            return [*frames]
        if isinstance(frame, Mark):
            self._require_open()
            if not self.marks:
                return []
            return [json.dumps({"action": "notify", "payload": {"name": frame.name}}, separators=(",", ":"))]
        if isinstance(frame, Clear):
            self._require_open()
            return ['{"action":"clear"}'] if self.marks else []
        raise ValueError(f"vonage cannot send {type(frame).__name__} frames")

    def _require_open(self) -> None:
        if not self.started:
            raise CarrierProtocolError("vonage stream has not started (no websocket:connected yet)")


def _digit(data: dict[str, Any]) -> str:
    digit = data.get("digit")
    if digit is None:
        nested = data.get("dtmf")
        digit = nested.get("digit") if isinstance(nested, dict) else nested
    if not isinstance(digit, str) or not digit:
        raise CarrierProtocolError("vonage websocket:dtmf has no digit")
    if digit not in _DTMF_DIGITS:
        raise CarrierProtocolError("vonage dtmf digit is not one of 0-9 * # A-D")
    return digit
