"""Telnyx carrier: Ed25519 webhooks, TeXML ``<Connect><Stream>`` or Call Control answer, media codec, REST control.

Wire contracts: ``docs/carriers.md`` §3 (Telnyx) and §9.3 (test vectors).

Usage::

    carrier = TelnyxCarrier(api_key=key, public_key="11qYAYKx...", http=httpx.AsyncClient(),
                            account_sid=org_id, connection_id=texml_app_id)
    carrier.verify(request)                     # raises SignatureInvalid("telnyx: <reason>")
    call = carrier.parse_call(request)          # CallInfo(carrier="telnyx", call_id="v3:...", ...)
    body, media_type = carrier.answer(call, "wss://gw.example.com/media/telnyx/3f9c1e", {"persona": "sales"})

    stream = carrier.open_stream()              # one per media WebSocket
    for frame in stream.decode(text_message):   # StreamStarted, AudioFrame(PCM16), Dtmf, MarkPlayed, ...
        ...
    for message in stream.encode(AudioFrame(pcm, stream.sample_rate)):
        await websocket.send_text(message)
    await carrier.hang_up(call)                 # an already-ended call is not a failure

Two control planes (``flow``):

* ``"texml"`` (default): the webhook is a form-encoded TeXML callback and ``answer`` returns TeXML
  ``<Connect><Stream bidirectionalMode="rtp" ...>`` then ``<Hangup/>``; hang-up and transfer update the
  call through the TeXML REST API (``account_sid`` needed).
* ``"call_control"``: the webhook is the JSON ``call.initiated`` event; ``answer`` returns ``("{}",
  "application/json")`` and the stream is requested by REST: ``await carrier.answer_call(call, stream_url,
  parameters)`` (``actions/answer`` with the stream options, or ``actions/answer`` then
  ``actions/streaming_start`` when a stream auth token, a sampling rate other than 8 kHz or ``<Parameter>``-style
  custom parameters are needed). With ``call_control_auto_answer=True`` (default) ``answer`` schedules that
  call itself on the running event loop, so a gateway that only knows the sync ``answer`` still works.

Signatures: ``telnyx-signature-ed25519`` over ``<telnyx-timestamp>|<raw body>`` checked with the SDK's
``telnyx.lib.webhook_verification`` (PyNaCl); 300 s tolerance; with ``reject_replays`` a signature is accepted
once per process. The media socket's own credential is ``stream_auth_token`` (``verify_websocket``).

Switches (``[?]`` = unverified in ``docs/carriers.md`` §8.2; decide by a live call):

* ``stream_parameters="query"``: how ``answer`` passes its parameters: ``"query"`` (URL query, kept by Telnyx
  ``[P]``), ``"element"`` (TeXML ``<Parameter>`` / Call Control ``custom_parameters``, ``[?]``), ``"both"``,
  ``"none"`` (the session id in the URL path is all the gateway needs).
* ``inbound_codec="PCMU"``: ``codec`` / ``stream_codec`` asked for audio to us (``"default"`` = the call's codec);
  decoding always follows ``start.media_format.encoding`` (PCMU, PCMA, L16).
* ``outbound_codec="PCMU"``, ``outbound_sample_rate=8000``: ``bidirectionalCodec`` / sampling rate of our audio.
* ``l16_byte_order="big"``: L16 payload byte order both ways (RFC 3551 / Pipecat say big-endian; ``[?]`` §1.2).
* ``stream_auth_header=True``: with ``stream_auth_token``, require it on the upgrade header (a ``connected``
  frame token is checked when present); False: the header is checked only if sent and the ``connected`` frame
  must carry the token (``[?]`` which of the two Telnyx always sends).
* ``stream_call_id=True``: report ``start.call_control_id`` as ``StreamStarted.call_id`` (the gateway checks it
  against the webhook's ``CallSid``; TeXML ``CallSid`` == ``call_control_id`` is ``[?]``); False reports ``""``.
* ``stop_stream_on_transfer=True``: Call Control transfer first stops the stream (``[?]`` whether needed).
* ``reject_replays=True``, ``call_control_auto_answer=True``: see above.

REST: ``dial`` uses ``POST /v2/calls`` (Call Control, stream options inline, ``connection_id``) or
``POST /v2/texml/Accounts/{account_sid}/Calls`` with inline ``Texml`` (``ApplicationSid`` = ``connection_id``;
the response's call id key is ``[?]``: ``call_sid``, ``sid`` or ``CallSid``). ``send_dtmf`` is Call Control only
(TeXML: False, the gateway plays tones). Already-ended calls: 422 code 90018, or a Telnyx 404.

Media: outbound chunks are whole 20 ms frames (a shorter tail is padded with silence; Telnyx refuses < 20 ms)
of at most 30 s. Inbound frames may arrive out of order (§3.4); they are decoded in arrival order, resampled
to ``sample_rate`` (the outbound rate) when the call's rate differs.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import json
import logging
import re
import time
from collections.abc import Mapping
from functools import lru_cache
from importlib import resources
from string import Template
from typing import Any, ClassVar, Literal
from urllib.parse import parse_qsl, quote, urlencode
from xml.sax.saxutils import escape

import httpx
import numpy as np

from carriers._markup import template, xml_text
from carriers._messages import StreamChecks, dtmf_frame, load_json, mark_frame, media_payload, parse_event
from carriers.base import (
    CallControlFailed,
    CallEvent,
    CallInfo,
    CarrierProtocolError,
    DialRequest,
    HangupFailed,
    SignatureInvalid,
    WebhookIgnored,
    WebhookRequest,
)
from pipeline.audio import Resampler, alaw_decode, alaw_encode, ulaw_decode, ulaw_encode
from pipeline.frames import AudioFrame, Clear, Frame, Mark, StreamStarted, StreamStopped

__all__ = ["TelnyxCarrier", "TelnyxMediaStream"]

logger = logging.getLogger(__name__)

TOLERANCE_SECS = 300
_SIGNATURE_HEADER = "telnyx-signature-ed25519"
_TIMESTAMP_HEADER = "telnyx-timestamp"
_WS_TOKEN = "x-telnyx-streaming-auth-token"  # noqa: S105 - a header name, not a secret
_ALREADY_ENDED = "90018"
_DTMF_OUT = re.compile(r"^[0-9*#A-DwW]{1,64}$")
_TARGET = re.compile(r"^(\+[1-9][0-9]{6,14}|sips?:[^\s<>\"']{3,256})$")
_XML_INVALID = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")
_ATTR_ENTITIES = {'"': "&quot;", "\t": "&#9;", "\n": "&#10;", "\r": "&#13;"}
_ENCODINGS = {"PCMU": "PCMU", "AUDIO/X-MULAW": "PCMU", "PCMA": "PCMA", "AUDIO/X-ALAW": "PCMA",
              "L16": "L16", "AUDIO/X-L16": "L16"}
_ENDED_STATUSES = frozenset({"completed", "busy", "failed", "no-answer", "canceled"})
_ANSWERED_BY = {"human": "human", "human_residence": "human", "human_business": "human",
                "machine": "machine", "machine_start": "machine", "machine_end_beep": "machine",
                "machine_end_silence": "machine", "machine_end_other": "machine", "fax": "machine",
                "fax_detected": "machine"}
_AMD_EVENTS = frozenset({"call.machine.detection.ended", "call.machine.premium.detection.ended"})
_MEDIA_SUFFIX = '"}}'
_MAX_CHUNK_MS = 30_000


@lru_cache(maxsize=1)
def _answer_template() -> Template:
    text = resources.files("twiml").joinpath("telnyx_answer.xml").read_text(encoding="utf-8")
    return Template(text.strip())


@lru_cache(maxsize=1)
def _sdk_verifier() -> tuple[Any, type[Exception]]:
    """The SDK's verifier (imported on first use: importing ``telnyx`` takes about a second)."""
    from telnyx.lib.webhook_verification import WebhookVerificationError, verify_webhook_signature

    return verify_webhook_signature, WebhookVerificationError


def _xml_attr(value: str, what: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"telnyx {what} must be a string (got {type(value).__name__})")
    if _XML_INVALID.search(value):
        raise ValueError(f"telnyx {what} contains a character XML cannot carry")
    return escape(value, _ATTR_ENTITIES)


def _choice(name: str, value: Any, allowed: tuple[Any, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"telnyx {name} must be one of {', '.join(map(str, allowed))} (got {value!r})")


def _segment(value: str) -> str:
    """A call id as one URL path segment (quoted as the SDK does: ``v3:abc`` stays readable)."""
    if not value:
        raise ValueError("the call id is empty")
    quoted = quote(value, safe="!$&'()*+,;=:@")
    return quoted.replace(".", "%2E") if quoted in (".", "..") else quoted


class TelnyxCarrier:
    """Telnyx TeXML or Call Control with bidirectional (``rtp``) media streaming."""

    name: ClassVar[str] = "telnyx"

    def __init__(
        self,
        *,
        api_key: str,
        public_key: str,
        http: httpx.AsyncClient,
        stream_auth_token: str = "",
        connection_id: str = "",
        account_sid: str = "",
        api_base_url: str = "https://api.telnyx.com",
        verify_signatures: bool = True,
        flow: Literal["texml", "call_control"] = "texml",
        stream_parameters: Literal["query", "element", "both", "none"] = "query",
        inbound_codec: Literal["PCMU", "PCMA", "L16", "default"] = "PCMU",
        outbound_codec: Literal["PCMU", "PCMA", "L16"] = "PCMU",
        outbound_sample_rate: int = 8000,
        l16_byte_order: Literal["big", "little"] = "big",
        stream_auth_header: bool = True,
        stream_call_id: bool = True,
        reject_replays: bool = True,
        call_control_auto_answer: bool = True,
        stop_stream_on_transfer: bool = True,
    ) -> None:
        _choice("flow", flow, ("texml", "call_control"))
        _choice("stream_parameters", stream_parameters, ("query", "element", "both", "none"))
        _choice("inbound_codec", inbound_codec, ("PCMU", "PCMA", "default") + (("L16",) if flow != "texml" else ()))
        _choice("outbound_codec", outbound_codec, ("PCMU", "PCMA", "L16"))
        _choice("l16_byte_order", l16_byte_order, ("big", "little"))
        rates = (8000, 16000, 24000) if flow == "texml" else (8000, 16000, 22050, 24000, 48000)
        _choice(f"{outbound_codec} outbound_sample_rate", outbound_sample_rate,
                rates if outbound_codec == "L16" else (8000,))
        if verify_signatures:
            try:
                raw_key = base64.b64decode(public_key, validate=True)
            except (binascii.Error, ValueError):
                raw_key = b""
            if len(raw_key) != 32:
                raise ValueError("telnyx public_key must be the portal's base64 Ed25519 public key (32 bytes)")
            _sdk_verifier()
        self._api_key = api_key
        self._public_key = public_key
        self._stream_auth_token = stream_auth_token
        self._http = http
        self.connection_id = connection_id
        self.account_sid = account_sid
        self.api_base_url = api_base_url.rstrip("/")
        self.verify_signatures = verify_signatures
        self.flow = flow
        self.stream_parameters = stream_parameters
        self.inbound_codec = inbound_codec
        self.outbound_codec = outbound_codec
        self.outbound_sample_rate = outbound_sample_rate
        self.l16_byte_order = l16_byte_order
        self.stream_auth_header = stream_auth_header
        self.stream_call_id = stream_call_id
        self.reject_replays = reject_replays
        self.call_control_auto_answer = call_control_auto_answer
        self.stop_stream_on_transfer = stop_stream_on_transfer
        self._seen: dict[bytes, int] = {}  # signature -> expiry (Unix s), insertion ordered
        self._answer_tasks: set[asyncio.Task[None]] = set()

    def __repr__(self) -> str:  # never show the key or token
        return f"TelnyxCarrier(flow={self.flow!r}, api_base_url={self.api_base_url!r})"

    # -- webhook -------------------------------------------------------------------------------

    def verify(self, request: WebhookRequest) -> None:
        if not self.verify_signatures:
            return
        signature = request.headers.get(_SIGNATURE_HEADER)
        if not signature:
            raise SignatureInvalid("telnyx: missing telnyx-signature-ed25519 header")
        timestamp = request.headers.get(_TIMESTAMP_HEADER)
        if not timestamp:
            raise SignatureInvalid("telnyx: missing telnyx-timestamp header")
        if not (timestamp.isascii() and timestamp.isdigit() and len(timestamp) <= 12):
            raise SignatureInvalid("telnyx: telnyx-timestamp is not a Unix time in seconds")
        now, sent = int(time.time()), int(timestamp)
        if abs(now - sent) > TOLERANCE_SECS:
            raise SignatureInvalid(f"telnyx: timestamp is {abs(now - sent)} s from now "
                                   f"(tolerance {TOLERANCE_SECS} s)")
        try:
            raw = base64.b64decode(signature, validate=True)
        except (binascii.Error, ValueError):
            raise SignatureInvalid("telnyx: signature is not valid base64") from None
        if len(raw) != 64:
            raise SignatureInvalid("telnyx: signature is not 64 bytes")
        try:
            request.body.decode("utf-8")
        except UnicodeDecodeError:
            raise SignatureInvalid("telnyx: body is not valid UTF-8") from None
        verify_webhook_signature, verification_error = _sdk_verifier()
        try:
            verify_webhook_signature(request.body, {_SIGNATURE_HEADER: signature, _TIMESTAMP_HEADER: timestamp},
                                     self._public_key)
        except verification_error as exc:
            text = str(exc)
            if "does not match" in text:
                raise SignatureInvalid("telnyx: signature does not match") from None
            raise SignatureInvalid(f"telnyx: signature check failed: {text[:120]}") from None
        if self.reject_replays:
            self._remember(raw, sent + TOLERANCE_SECS, now)

    def _remember(self, signature: bytes, expires: int, now: int) -> None:
        seen = self._seen
        while seen:  # drop expired entries (roughly in arrival order) and bound the size
            oldest, expiry = next(iter(seen.items()))
            if expiry >= now and len(seen) < 100_000:
                break
            del seen[oldest]
        if signature in seen:
            raise SignatureInvalid("telnyx: replayed webhook (signature already used)")
        seen[signature] = expires

    def verify_websocket(self, headers: Mapping[str, str], url: str) -> None:
        token = self._stream_auth_token
        if not token:
            return
        lower = {k.lower(): v for k, v in headers.items()}
        supplied = lower.get(_WS_TOKEN)
        if supplied is None and lower.get("authorization", "")[:7].lower() == "bearer ":
            supplied = lower["authorization"][7:]
        if supplied is None:
            if self.stream_auth_header:
                raise SignatureInvalid("telnyx: missing x-telnyx-streaming-auth-token header")
            return  # the connected frame must carry it (TelnyxMediaStream checks)
        if not hmac.compare_digest(supplied.encode(), token.encode()):
            raise SignatureInvalid("telnyx: x-telnyx-streaming-auth-token does not match")

    def parse_call(self, request: WebhookRequest) -> CallInfo:
        if _is_json(request):
            if self.flow != "call_control":
                raise CarrierProtocolError("telnyx Call Control webhook, but this carrier answers TeXML (flow='texml')")
            event_type, payload = _event(request.body)
            if event_type != "call.initiated":   # Telnyx sends every event of the call to this URL
                raise WebhookIgnored(f"telnyx {event_type:.40} event acknowledged")
            call_id = payload.get("call_control_id")
            if not isinstance(call_id, str) or not call_id:
                raise CarrierProtocolError("telnyx call.initiated has no payload.call_control_id")
            headers = payload.get("custom_headers")
            custom = {h["name"]: h["value"] for h in headers if isinstance(h, dict)
                      and isinstance(h.get("name"), str) and isinstance(h.get("value"), str)} \
                if isinstance(headers, list) else {}
            return CallInfo(carrier=self.name, call_id=call_id, from_=_str(payload.get("from")),
                            to=_str(payload.get("to")),
                            direction="outbound" if payload.get("direction") == "outgoing" else "inbound",
                            custom=custom)
        if self.flow != "texml":
            raise CarrierProtocolError("telnyx TeXML webhook, but this carrier uses Call Control (flow='call_control')")
        params = _form_params(request)
        call_id = params.get("CallSid", "")
        if not call_id:
            raise CarrierProtocolError("telnyx webhook has no CallSid")
        return CallInfo(carrier=self.name, call_id=call_id, from_=params.get("From", ""), to=params.get("To", ""),
                        account_id=params.get("AccountSid", ""),
                        direction="outbound" if params.get("Direction", "").startswith("outbound") else "inbound")

    def parse_event(self, request: WebhookRequest) -> CallEvent:
        if _is_json(request):
            event_type, payload = _event(request.body)
            call_id = payload.get("call_control_id")
            if not isinstance(call_id, str) or not call_id:
                raise CarrierProtocolError("telnyx event has no payload.call_control_id")
            answered_by = _ANSWERED_BY.get(_str(payload.get("result")), "unknown") if event_type in _AMD_EVENTS else ""
            return CallEvent(call_id=call_id, answered_by=answered_by, ended=event_type == "call.hangup",
                             status=event_type)
        params = _form_params(request)
        call_id = params.get("CallSid", "")
        if not call_id:
            raise CarrierProtocolError("telnyx event has no CallSid")
        status = params.get("CallStatus") or params.get("StreamEvent", "")
        answered_by = params.get("AnsweredBy", "")
        return CallEvent(call_id=call_id, answered_by=_ANSWERED_BY.get(answered_by, "unknown") if answered_by else "",
                         ended=params.get("CallStatus", "") in _ENDED_STATUSES, status=status)

    # -- answer --------------------------------------------------------------------------------

    def _stream_target(self, stream_url: str, parameters: Mapping[str, str]) -> str:
        if not stream_url.startswith("wss://"):
            scheme = stream_url.partition("://")[0] if "://" in stream_url else "none"
            raise ValueError(f"telnyx stream url must start with wss:// (scheme is {scheme[:10]!r})")
        if parameters and self.stream_parameters in ("query", "both"):
            stream_url += ("&" if "?" in stream_url else "?") + urlencode(dict(parameters))
        return stream_url

    def texml(self, stream_url: str, parameters: Mapping[str, str]) -> str:
        """The TeXML document that streams the call to ``stream_url`` (also the inline markup of ``dial``)."""
        url = self._stream_target(stream_url, parameters)
        rendered = "".join(
            f'<Parameter name="{_xml_attr(k, "parameter name")}" value="{_xml_attr(v, "parameter value")}"/>'
            for k, v in parameters.items()) if self.stream_parameters in ("element", "both") else ""
        return _answer_template().substitute(
            stream_url=_xml_attr(url, "stream url"), codec=self.inbound_codec,
            bidirectional_codec=self.outbound_codec, bidirectional_sampling_rate=self.outbound_sample_rate,
            parameters=rendered)

    def answer(self, call: CallInfo, stream_url: str, parameters: Mapping[str, str]) -> tuple[str, str]:
        if self.flow == "texml":
            return self.texml(stream_url, parameters), "text/xml"
        self._stream_target(stream_url, parameters)  # validate now, not in the background
        if self.call_control_auto_answer:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                loop = None
            if loop is not None:
                task = loop.create_task(self._auto_answer(call, stream_url, dict(parameters)))
                self._answer_tasks.add(task)
                task.add_done_callback(self._answer_tasks.discard)
        return "{}", "application/json"

    def busy(self, call: CallInfo, text: str) -> tuple[str, str] | None:
        """TeXML: ``<Say>`` the text, then ``<Hangup/>``. Call Control: None (the gateway answers 503):
        Telnyx ignores the body of a Call Control webhook answer, and a non-2xx one sends the event to
        the connection's failover URL, which may take the call elsewhere; speaking here would mean
        answering the call by REST from an instance that is already full (``docs/carriers.md`` §3.10)::

            carrier.busy(call, "All lines are busy.")
            # ('<?xml ...?><Response><Say>All lines are busy.</Say><Hangup/></Response>', 'text/xml')
        """
        if self.flow != "texml":
            return None
        return template("telnyx_busy.xml").substitute(text=xml_text(self.name, text, "busy text")), "text/xml"

    async def _auto_answer(self, call: CallInfo, stream_url: str, parameters: dict[str, str]) -> None:
        try:
            await self.answer_call(call, stream_url, parameters)
        except CallControlFailed as exc:
            logger.error("%s", exc)
        except Exception:  # a background task: log, never lose it
            logger.exception("telnyx answer of %s failed unexpectedly", call.call_id)

    def _stream_options(self, stream_url: str, parameters: Mapping[str, str]) -> dict[str, Any]:
        options: dict[str, Any] = {"stream_url": self._stream_target(stream_url, parameters),
                                   "stream_track": "inbound_track"}
        if self.inbound_codec != "default":
            options["stream_codec"] = self.inbound_codec
        options["stream_bidirectional_mode"] = "rtp"
        options["stream_bidirectional_codec"] = self.outbound_codec
        return options

    async def answer_call(self, call: CallInfo, stream_url: str, parameters: Mapping[str, str]) -> None:
        """Call Control: answer the parked call and start its bidirectional stream to ``stream_url``."""
        what = f"answer of {call.call_id}"
        options = self._stream_options(stream_url, parameters)
        extra: dict[str, Any] = {}
        if self.outbound_sample_rate != 8000:
            extra["stream_bidirectional_sampling_rate"] = self.outbound_sample_rate
        if self._stream_auth_token:
            extra["stream_auth_token"] = self._stream_auth_token
        if parameters and self.stream_parameters in ("element", "both"):
            extra["custom_parameters"] = [{"name": k, "value": v} for k, v in parameters.items()]
        try:
            base = f"/v2/calls/{_segment(call.call_id)}/actions/"
        except ValueError as exc:
            raise CallControlFailed(f"telnyx {what} failed: {exc}") from None
        if not extra:  # answer carries every option we need (§9.3 vector)
            await self._call_control(base + "answer", options, what)
        else:  # answer has no sampling rate, auth token or custom parameters: start the stream separately
            await self._call_control(base + "answer", {}, what)
            await self._call_control(base + "streaming_start", {**options, **extra},
                                     f"streaming_start of {call.call_id}")
        logger.info("telnyx call %s answered with a stream", call.call_id)

    def open_stream(self) -> TelnyxMediaStream:
        return TelnyxMediaStream(
            outbound_codec=self.outbound_codec, sample_rate=self.outbound_sample_rate,
            l16_byte_order=self.l16_byte_order, stream_auth_token=self._stream_auth_token,
            require_connected_token=bool(self._stream_auth_token) and not self.stream_auth_header,
            report_call_id=self.stream_call_id)

    # -- REST ----------------------------------------------------------------------------------

    async def _post(self, path: str, body: Mapping[str, Any], what: str,
                    failure: type[CallControlFailed] | type[HangupFailed]) -> httpx.Response:
        try:
            return await self._http.post(self.api_base_url + path, json=dict(body),
                                         headers={"Authorization": f"Bearer {self._api_key}",
                                                  "Accept": "application/json"})
        except httpx.HTTPError as exc:
            raise failure(f"telnyx {what} failed: {type(exc).__name__}") from exc

    async def _call_control(self, path: str, body: Mapping[str, Any], what: str) -> dict[str, Any]:
        response = await self._post(path, body, what, CallControlFailed)
        if not response.is_success:
            raise CallControlFailed(_failure(what, response))
        try:
            data = response.json()
        except ValueError:
            return {}
        return data if isinstance(data, dict) else {}

    def _texml_account(self, account_id: str = "") -> str:
        account = self.account_sid or account_id
        if not account:
            raise ValueError("telnyx TeXML REST needs account_sid (the organization id)")
        return quote(account, safe="")

    async def hang_up(self, call: CallInfo) -> None:
        """End the call; Telnyx's "already ended" (422 code 90018) or an unknown call (404) is done."""
        what = f"hang-up of {call.call_id}"
        try:
            if self.flow == "call_control":
                path, body = f"/v2/calls/{_segment(call.call_id)}/actions/hangup", {}
            else:
                path = f"/v2/texml/Accounts/{self._texml_account(call.account_id)}/Calls/{_segment(call.call_id)}"
                body = {"Status": "completed"}
        except ValueError as exc:
            raise HangupFailed(f"telnyx {what} failed: {exc}") from None
        response = await self._post(path, body, what, HangupFailed)
        if response.is_success:
            logger.info("telnyx call %s hung up", call.call_id)
            return
        codes, _ = _telnyx_errors(response)
        if (response.status_code == 422 and _ALREADY_ENDED in codes) or (response.status_code == 404 and codes):
            logger.info("telnyx call %s already ended (%s %s)", call.call_id, response.status_code, codes[0])
            return
        raise HangupFailed(_failure(what, response))

    async def transfer(self, call: CallInfo, target: str) -> None:
        what = f"transfer of {call.call_id}"
        if not isinstance(target, str) or not _TARGET.match(target):
            raise CallControlFailed(f"telnyx {what} failed: target must be an E.164 number or a sip: URI")
        try:
            if self.flow == "call_control":
                base = f"/v2/calls/{_segment(call.call_id)}/actions/"
                if self.stop_stream_on_transfer:
                    try:
                        await self._call_control(base + "streaming_stop", {}, f"streaming_stop of {call.call_id}")
                    except CallControlFailed as exc:
                        logger.warning("%s (transferring anyway)", exc)
                await self._call_control(base + "transfer", {"to": target}, what)
            else:
                dial = f"<Sip>{escape(target)}</Sip>" if target.startswith("sip") else escape(target)
                texml = f'<?xml version="1.0" encoding="UTF-8"?><Response><Dial>{dial}</Dial></Response>'
                path = f"/v2/texml/Accounts/{self._texml_account(call.account_id)}/Calls/{_segment(call.call_id)}"
                await self._call_control(path, {"Texml": texml}, what)
        except ValueError as exc:
            raise CallControlFailed(f"telnyx {what} failed: {exc}") from None
        logger.info("telnyx call %s transferred", call.call_id)

    async def dial(self, request: DialRequest) -> CallInfo:
        what = f"dial to {request.to}"
        if not self.connection_id:
            raise CallControlFailed(f"telnyx {what} failed: connection_id is not set "
                                    "(the Call Control connection or TeXML application id)")
        try:
            if self.flow == "call_control":
                body: dict[str, Any] = {"connection_id": self.connection_id, "to": request.to,
                                        "from": request.from_,
                                        **self._stream_options(request.stream_url, request.parameters),
                                        "stream_bidirectional_sampling_rate": self.outbound_sample_rate,
                                        "webhook_url": request.events_url}
                if self._stream_auth_token:
                    body["stream_auth_token"] = self._stream_auth_token
                if request.machine_detection:
                    body["answering_machine_detection"] = "detect"
                data = await self._call_control("/v2/calls", body, what)
                inner = data.get("data")
                call_id = inner.get("call_control_id") if isinstance(inner, dict) else None
            else:
                body = {"ApplicationSid": self.connection_id, "To": request.to, "From": request.from_,
                        "Texml": self.texml(request.stream_url, request.parameters),
                        "StatusCallback": request.events_url}
                if request.machine_detection:
                    body.update(MachineDetection="Enable", AsyncAmd=True,
                                AsyncAmdStatusCallback=request.events_url)
                path = f"/v2/texml/Accounts/{self._texml_account()}/Calls"
                data = await self._call_control(path, body, what)
                nested = data.get("data")
                inner = nested if isinstance(nested, dict) else data
                call_id = next((inner[k] for k in ("call_sid", "sid", "CallSid") if isinstance(inner.get(k), str)),
                               None)  # [?] the SDK model declares none of them
        except ValueError as exc:
            raise CallControlFailed(f"telnyx {what} failed: {exc}") from None
        if not isinstance(call_id, str) or not call_id:
            raise CallControlFailed(f"telnyx {what} failed: the response has no call id")
        logger.info("telnyx dialed call %s", call_id)
        return CallInfo(carrier=self.name, call_id=call_id, from_=request.from_, to=request.to,
                        account_id=self.account_sid if self.flow == "texml" else "", direction="outbound")

    async def send_dtmf(self, call: CallInfo, digits: str) -> bool:
        """Call Control ``actions/send_dtmf``; TeXML has no out-of-band DTMF (False: play tones)."""
        if self.flow != "call_control":
            return False
        if not isinstance(digits, str) or not _DTMF_OUT.match(digits):
            raise CallControlFailed("telnyx send_dtmf failed: digits must be 0-9 * # A-D w W (1-64 of them)")
        what = f"send_dtmf to {call.call_id}"
        try:
            path = f"/v2/calls/{_segment(call.call_id)}/actions/send_dtmf"
        except ValueError as exc:
            raise CallControlFailed(f"telnyx {what} failed: {exc}") from None
        await self._call_control(path, {"digits": digits}, what)
        return True


def _telnyx_errors(response: httpx.Response) -> tuple[list[str], str]:
    """Telnyx's ``{"errors": [{"code", "title", "detail"}]}`` (or a Twilio-style ``{"code", "message"}``)
    -> (codes, message)."""
    try:
        data = response.json()
    except ValueError:
        return [], response.reason_phrase or "no error message"
    if isinstance(data, dict) and isinstance(data.get("errors"), list):
        errors = [e for e in data["errors"] if isinstance(e, dict)]
        codes = [str(e["code"]) for e in errors if isinstance(e.get("code"), (str, int))]
        texts = [" - ".join(str(e[k]) for k in ("title", "detail") if e.get(k)) for e in errors]
        return codes, "; ".join(t for t in texts if t)[:300] or response.reason_phrase or "no error message"
    if isinstance(data, dict) and isinstance(data.get("code"), (str, int)):
        return [str(data["code"])], str(data.get("message") or response.reason_phrase)[:300]
    return [], response.reason_phrase or "no error message"


def _failure(what: str, response: httpx.Response) -> str:
    codes, message = _telnyx_errors(response)
    code = f" code {codes[0]}" if codes else ""
    return f"telnyx {what} failed: HTTP {response.status_code}{code}: {message}"


def _is_json(request: WebhookRequest) -> bool:
    content_type = request.headers.get("content-type", "")
    return content_type.split(";", 1)[0].strip().lower() == "application/json"


def _str(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _form_params(request: WebhookRequest) -> dict[str, str]:
    """TeXML form params (first value wins), parsed from the body if the gateway did not."""
    pairs: list[tuple[str, str]] = list(request.form)
    if not pairs and request.body:
        try:
            pairs = parse_qsl(request.body.decode("utf-8"), keep_blank_values=True)
        except UnicodeDecodeError:
            raise CarrierProtocolError("telnyx webhook body is not valid UTF-8") from None
    params: dict[str, str] = {}
    for key, value in pairs:
        params.setdefault(key, value)
    return params


def _event(body: bytes) -> tuple[str, dict[str, Any]]:
    """A Call Control webhook -> (``data.event_type``, ``data.payload``)."""
    data = load_json("telnyx webhook body", body)
    event = data.get("data") if isinstance(data, dict) else None
    if not isinstance(event, dict):
        raise CarrierProtocolError("telnyx webhook has no data object")
    event_type = event.get("event_type")
    if not isinstance(event_type, str) or not event_type:
        raise CarrierProtocolError("telnyx webhook has no data.event_type")
    payload = event.get("payload")
    if not isinstance(payload, dict):
        raise CarrierProtocolError("telnyx webhook has no data.payload object")
    return event_type, payload


def _swap16(data: bytes) -> bytes:
    return np.frombuffer(data, ">i2").astype("<i2").tobytes()


class TelnyxMediaStream(StreamChecks):
    carrier, id_keys, id_attr, open_hint = "telnyx", ("stream_id",), "stream_id", "no start event yet"
    """Sans-I/O codec for one Telnyx media WebSocket: PCMU/PCMA/L16 in (per ``start.media_format``),
    PCMU (or PCMA/L16) out, both as PCM16 at ``sample_rate``."""

    frame_ms: int = 20
    max_message_ms: int = 30_000   # a chunk may hold 20 ms to 30 s (docs/carriers.md)
    marks: bool = True

    def __init__(self, *, outbound_codec: str = "PCMU", sample_rate: int = 8000, l16_byte_order: str = "big",
                 stream_auth_token: str = "", require_connected_token: bool = False,
                 report_call_id: bool = True) -> None:
        self.sample_rate = sample_rate
        self.started: bool = False
        self.stream_id: str = ""
        self.call_control_id: str = ""
        self.encoding: str = ""
        self._token = stream_auth_token
        self._require_token = require_connected_token
        self._token_seen = False
        self._report_call_id = report_call_id
        self._big_endian = l16_byte_order == "big"
        self._decode_audio: Any = ulaw_decode
        self._resampler: Resampler | None = None
        self._encode_audio: Any = {"PCMU": ulaw_encode, "PCMA": alaw_encode}.get(outbound_codec) or (
            _swap16 if self._big_endian else bytes)
        self._frame_bytes = sample_rate * self.frame_ms // 1000 * 2
        self._max_bytes = sample_rate * _MAX_CHUNK_MS // 1000 * 2
        self._media_prefix = '{"event":"media","media":{"payload":"'

    # -- Telnyx -> us --------------------------------------------------------------------------

    def decode(self, message: str | bytes) -> list[Frame]:
        data, event = parse_event("telnyx", message)
        if event == "media":
            return self._decode_media(data)
        if event == "start":
            return self._decode_start(data)
        if event == "connected":
            self._check_token(data)
            return []
        if event == "stop":
            self._check_stream(data)
            return [StreamStopped("stop")]
        if event == "dtmf":
            self._require_started(event, data)
            return [dtmf_frame("telnyx", data)]
        if event == "mark":
            self._require_started(event, data)
            return [mark_frame("telnyx", data)]
        if event == "error":
            payload = data.get("payload")
            payload = payload if isinstance(payload, dict) else {}
            logger.warning("telnyx stream error %.20s: %.120s %.200s", payload.get("code"), payload.get("title"),
                           payload.get("detail"))
        return []  # Telnyx may add events

    def _check_token(self, data: dict[str, Any]) -> None:
        if not self._token:
            return
        inner = data.get("connected")
        supplied = inner.get(_WS_TOKEN) if isinstance(inner, dict) else data.get(_WS_TOKEN)
        if supplied is None:
            return
        if not isinstance(supplied, str) or not hmac.compare_digest(supplied.encode(), self._token.encode()):
            raise CarrierProtocolError("telnyx connected frame stream auth token does not match")
        self._token_seen = True

    def _decode_media(self, data: dict[str, Any]) -> list[Frame]:
        self._require_started("media", data)
        raw = media_payload("telnyx", data)   # b"" for our own audio echoed on an outbound track
        if not raw:
            return []
        if self.encoding == "L16" and len(raw) % 2:
            raise CarrierProtocolError("telnyx L16 media payload has an odd number of bytes")
        pcm = self._decode_audio(raw)
        if self._resampler is not None:
            pcm = self._resampler.process(pcm)
            if not pcm:
                return []
        return [AudioFrame(pcm, self.sample_rate)]

    def _decode_start(self, data: dict[str, Any]) -> list[Frame]:
        if self.started:
            raise CarrierProtocolError("telnyx sent a second start event")
        stream_id = data.get("stream_id")
        if not isinstance(stream_id, str) or not stream_id:
            raise CarrierProtocolError("telnyx start event has no stream_id")
        start = data.get("start")
        if not isinstance(start, dict):
            raise CarrierProtocolError("telnyx start event has no start object")
        call_control_id = start.get("call_control_id")
        if not isinstance(call_control_id, str) or not call_control_id:
            raise CarrierProtocolError("telnyx start event has no start.call_control_id")
        if self._require_token and not self._token_seen:
            raise CarrierProtocolError("telnyx start before a connected frame carrying the stream auth token")
        media_format = start.get("media_format", {})
        if not isinstance(media_format, dict):
            raise CarrierProtocolError("telnyx start.media_format is not an object")
        raw_encoding = media_format.get("encoding", "PCMU")
        rate, channels = media_format.get("sample_rate", 8000), media_format.get("channels", 1)
        encoding = _ENCODINGS.get(raw_encoding.upper()) if isinstance(raw_encoding, str) else None
        digits = str(rate) if isinstance(rate, (int, str)) else ""   # "²".isdigit(), yet int() refuses it
        in_rate = int(digits) if digits.isascii() and digits.isdigit() and len(digits) <= 6 else 0
        if encoding is None or str(channels) != "1" or in_rate not in (8000, 16000, 22050, 24000, 48000) or (
                encoding != "L16" and in_rate != 8000):
            raise CarrierProtocolError(
                f"telnyx start.media_format {raw_encoding!s:.40} {rate!s:.10} Hz {channels!s:.4} channel(s) "
                "is not supported (expected PCMU or PCMA at 8000 Hz, or L16, mono)")
        custom = _custom_parameters(start.get("custom_parameters"))
        self.started = True
        self.stream_id, self.call_control_id, self.encoding = stream_id, call_control_id, encoding
        self._decode_audio = {"PCMU": ulaw_decode, "PCMA": alaw_decode}.get(encoding) or (
            _swap16 if self._big_endian else bytes)
        self._resampler = Resampler(in_rate, self.sample_rate) if in_rate != self.sample_rate else None
        user_id = start.get("user_id")
        return [StreamStarted(stream_id=stream_id, call_id=call_control_id if self._report_call_id else "",
                              account_id=user_id if isinstance(user_id, str) else "",
                              custom_parameters=custom, sample_rate=self.sample_rate, encoding=encoding)]

    # -- us -> Telnyx --------------------------------------------------------------------------

    def encode(self, frame: Frame) -> list[str | bytes]:
        if isinstance(frame, AudioFrame):
            if frame.sample_rate != self.sample_rate:
                raise ValueError(f"telnyx needs {self.sample_rate} Hz audio (got {frame.sample_rate} Hz); "
                                 "resample first")
            self._require_open()
            pcm = frame.pcm
            if not pcm:
                return []
            if rem := len(pcm) % self._frame_bytes:  # Telnyx plays chunks of 20 ms or more: pad the tail
                pcm += bytes(self._frame_bytes - rem)
            step = self._max_bytes
            return [self._media_prefix + base64.b64encode(self._encode_audio(pcm[i:i + step])).decode("ascii")
                    + _MEDIA_SUFFIX for i in range(0, len(pcm), step)]
        if isinstance(frame, Mark):
            self._require_open()
            return [json.dumps({"event": "mark", "mark": {"name": frame.name}}, separators=(",", ":"))]
        if isinstance(frame, Clear):
            self._require_open()
            return ['{"event":"clear"}']
        raise ValueError(f"telnyx cannot send {type(frame).__name__} frames")



def _custom_parameters(value: Any) -> dict[str, str]:
    """``start.custom_parameters`` as an object of strings or the ``[{name, value}]`` list we sent ([?])."""
    if value is None:
        return {}
    if isinstance(value, dict) and all(isinstance(v, str) for v in value.values()):
        return dict(value)
    if isinstance(value, list) and all(isinstance(p, dict) and isinstance(p.get("name"), str)
                                       and isinstance(p.get("value"), str) for p in value):
        return {p["name"]: p["value"] for p in value}
    raise CarrierProtocolError("telnyx start.custom_parameters is not an object or name/value list of strings")

