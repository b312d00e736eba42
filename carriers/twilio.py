"""Twilio carrier: webhook signatures, ``<Connect><Stream>`` TwiML, Media Streams codec, REST hang-up.

Wire contracts: ``docs/carriers.md`` §2 (Twilio) and §9.2 (test vectors).

Usage::

    carrier = TwilioCarrier(account_sid="AC...", auth_token=token, http=httpx.AsyncClient())
    carrier.verify(request)                     # raises SignatureInvalid("twilio: <reason>")
    call = carrier.parse_call(request)          # CallInfo(carrier="twilio", call_id="CA...", ...)
    body, media_type = carrier.answer(call, "wss://gw.example.com/ws/twilio/3f9c1e", {"session_id": "3f9c1e"})
    body, media_type = carrier.busy(call, "All our lines are busy.")   # <Say> + <Hangup/> at capacity

    stream = carrier.open_stream()              # one per media WebSocket
    for frame in stream.decode(text_message):   # StreamStarted, AudioFrame(PCM16 8 kHz), Dtmf, MarkPlayed, ...
        ...
    for message in stream.encode(AudioFrame(pcm, 8000)):
        await websocket.send_text(message)
    await carrier.hang_up(call)                 # an already-ended call is not a failure

Signatures: classic ``X-Twilio-Signature`` (HMAC-SHA1 with the Auth Token), the JSON-body variant
(``bodySHA256`` in the URL) and the SharedKey variant (``X-Twilio-Webhooks-Signature-Settings:
key=<id>,algorithm=HMAC_SHA256``, secret looked up in ``shared_key_secrets``). The URL is checked
with and without its port, as Twilio's own SDK does.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import logging
import re
from collections.abc import Mapping
from functools import lru_cache
from importlib import resources
from string import Template
from typing import Any, ClassVar
from urllib.parse import parse_qs, parse_qsl, quote, urlsplit
from xml.sax.saxutils import escape

import httpx
from twilio.request_validator import HMAC_SHA1, HMAC_SHA256, RequestValidator, get_signature_algorithm

from carriers._markup import template, xml_text
from carriers._messages import (
    StreamChecks,
    dtmf_frame,
    load_json,
    mark_frame,
    media_payload,
    parse_event,
)
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
from pipeline.frames import AudioFrame, Clear, Frame, Mark, StreamStarted, StreamStopped

__all__ = ["TwilioCarrier", "TwilioMediaStream"]

logger = logging.getLogger(__name__)

SAMPLE_RATE = 8000
ENCODING = "audio/x-mulaw"
_SIGNATURE_HEADER = "x-twilio-signature"
_SETTINGS_HEADER = "x-twilio-webhooks-signature-settings"
# Characters XML 1.0 cannot carry at all (escaping does not help).
_XML_INVALID = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")
_ATTR_ENTITIES = {'"': "&quot;", "\t": "&#9;", "\n": "&#10;", "\r": "&#13;"}


class _MultiParams(dict[str, list[str]]):
    """Form params for ``RequestValidator``: it calls ``getall`` (Flask MultiDict style), so
    repeated names keep all their values (the SDK sorts and deduplicates them)."""

    def getall(self, name: str) -> list[str]:
        return self[name]


@lru_cache(maxsize=1)
def _answer_template() -> Template:
    text = resources.files("twiml").joinpath("twilio_answer.xml").read_text(encoding="utf-8")
    return Template(text.strip())


def _xml_attr(value: str, what: str) -> str:
    """Escape ``value`` for a double-quoted XML attribute."""
    if not isinstance(value, str):
        raise ValueError(f"twilio {what} must be a string (got {type(value).__name__})")
    if _XML_INVALID.search(value):
        raise ValueError(f"twilio {what} contains a character XML cannot carry")
    return escape(value, _ATTR_ENTITIES)


class TwilioCarrier:
    """Twilio Programmable Voice with bidirectional Media Streams."""

    name: ClassVar[str] = "twilio"

    def __init__(
        self,
        *,
        account_sid: str,
        auth_token: str,
        http: httpx.AsyncClient,
        api_base_url: str = "https://api.twilio.com",
        verify_signatures: bool = True,
        shared_key_secrets: Mapping[str, str] = {},  # noqa: B006 - read only, copied below
    ) -> None:
        self.account_sid = account_sid
        self._auth_token = auth_token
        self._http = http
        self.api_base_url = api_base_url.rstrip("/")
        self.verify_signatures = verify_signatures
        self._shared_key_secrets = dict(shared_key_secrets)

    def __repr__(self) -> str:  # never show the token
        return f"TwilioCarrier(account_sid={self.account_sid!r}, api_base_url={self.api_base_url!r})"

    # -- webhook -------------------------------------------------------------------------------

    def verify(self, request: WebhookRequest) -> None:
        if not self.verify_signatures:
            return
        signature = request.headers.get(_SIGNATURE_HEADER)
        if not signature:
            raise SignatureInvalid("twilio: missing X-Twilio-Signature header")
        secret, algorithm = self._signing_secret(request.headers.get(_SETTINGS_HEADER, ""))
        validator = RequestValidator(secret)

        params: _MultiParams | str
        query = parse_qs(urlsplit(request.url).query, keep_blank_values=True)
        if "bodySHA256" in query:
            try:
                body = request.body.decode("utf-8")
            except UnicodeDecodeError:
                raise SignatureInvalid("twilio: body is not valid UTF-8") from None
            if not hmac.compare_digest(validator.compute_hash(body), query["bodySHA256"][0]):
                raise SignatureInvalid("twilio: bodySHA256 does not match body")
            params = body
        elif _is_json(request):  # parse_call reads JSON bodies, so the body must be signed
            raise SignatureInvalid("twilio: JSON body without bodySHA256 in the URL")
        elif request.method.upper() == "GET":
            params = _MultiParams()  # GET params are part of the signed URL
        else:
            params = _MultiParams()
            for key, value in _form_pairs(request):
                params.setdefault(key, []).append(value)

        if not validator.validate(request.url, params, signature, algorithm=algorithm):
            raise SignatureInvalid("twilio: signature does not match")

    def _signing_secret(self, settings: str) -> tuple[str, str]:
        """The secret and algorithm named by ``X-Twilio-Webhooks-Signature-Settings``."""
        if not settings.strip():
            return self._auth_token, HMAC_SHA1
        algorithm = get_signature_algorithm(settings).upper()
        if algorithm not in (HMAC_SHA1, HMAC_SHA256):
            raise SignatureInvalid("twilio: unsupported signature algorithm")
        key_id = ""
        for part in settings.split(","):
            name, sep, value = part.partition("=")
            if sep and name.strip() == "key":
                key_id = value.strip()
        if not key_id:
            raise SignatureInvalid("twilio: signature settings header names no key")
        secret = self._shared_key_secrets.get(key_id)
        if secret is None:
            raise SignatureInvalid("twilio: unknown signature key id")
        return secret, algorithm

    def parse_call(self, request: WebhookRequest) -> CallInfo:
        params: dict[str, str] = {}
        if request.method.upper() == "GET":
            pairs = parse_qsl(urlsplit(request.url).query, keep_blank_values=True)
        elif _is_json(request):
            pairs = _json_pairs(request.body)
        else:
            pairs = _form_pairs(request)
        for key, value in pairs:
            params.setdefault(key, value)  # the first value wins
        call_id = params.get("CallSid", "")
        if not call_id:
            raise CarrierProtocolError("twilio webhook has no CallSid")
        direction = params.get("Direction", "inbound")
        return CallInfo(
            carrier=self.name,
            call_id=call_id,
            from_=params.get("From", ""),
            to=params.get("To", ""),
            account_id=params.get("AccountSid", ""),
            direction="outbound" if direction.startswith("outbound") else "inbound",
            custom={},
        )

    def answer(self, call: CallInfo, stream_url: str, parameters: Mapping[str, str]) -> tuple[str, str]:
        if not stream_url.startswith("wss://"):
            scheme = stream_url.partition("://")[0] if "://" in stream_url else "none"
            raise ValueError(f"twilio Stream url must start with wss:// (scheme is {scheme[:10]!r})")
        if "?" in stream_url:
            raise ValueError("twilio Stream url must not carry a query string (Twilio drops it); use parameters")
        rendered = "".join(
            f'<Parameter name="{_xml_attr(name, "parameter name")}" '
            f'value="{_xml_attr(value, "parameter value")}"/>'
            for name, value in parameters.items()
        )
        body = _answer_template().substitute(
            stream_url=_xml_attr(stream_url, "stream url"), parameters=rendered
        )
        return body, "text/xml"

    def busy(self, call: CallInfo, text: str) -> tuple[str, str]:
        """``<Say>`` the text, then ``<Hangup/>`` (``docs/carriers.md`` §2.11)::

            carrier.busy(call, "All lines are busy.")
            # ('<?xml ...?><Response><Say>All lines are busy.</Say><Hangup/></Response>', 'text/xml')
        """
        return template("twilio_busy.xml").substitute(text=xml_text(self.name, text, "busy text")), "text/xml"

    def open_stream(self) -> TwilioMediaStream:
        return TwilioMediaStream()

    # -- REST ----------------------------------------------------------------------------------

    async def hang_up(self, call: CallInfo) -> None:
        """End the call (``Status=completed``); a call Twilio no longer knows (404/20404) is done."""
        url = (
            f"{self.api_base_url}/2010-04-01/Accounts/{quote(self.account_sid, safe='')}"
            f"/Calls/{quote(call.call_id, safe='')}.json"
        )
        try:
            response = await self._http.post(
                url, data={"Status": "completed"}, auth=(self.account_sid, self._auth_token)
            )
        except httpx.HTTPError as exc:
            raise HangupFailed(f"twilio hang-up of {call.call_id} failed: {type(exc).__name__}") from exc
        if response.is_success:
            logger.info("twilio call %s hung up", call.call_id)
            return
        code, message = _twilio_error(response)
        if response.status_code == 404 and code == 20404:
            logger.info("twilio call %s already ended (20404)", call.call_id)
            return
        raise HangupFailed(
            f"twilio hang-up of {call.call_id} failed: HTTP {response.status_code}"
            f"{f' code {code}' if code is not None else ''}: {message}"
        )


    def verify_websocket(self, headers: Mapping[str, str], url: str) -> None:
        """Media Streams upgrades are not signed reliably (``docs/carriers.md`` §2.3, §8.1 [?]); the single-use
        session id in the path is the credential."""

    def _calls_url(self, call_id: str = "") -> str:
        base = f"{self.api_base_url}/2010-04-01/Accounts/{quote(self.account_sid, safe='')}/Calls"
        return f"{base}/{quote(call_id, safe='')}.json" if call_id else f"{base}.json"

    async def _rest(self, what: str, url: str, data: Mapping[str, str]) -> dict[str, Any]:
        try:
            response = await self._http.post(url, data=dict(data), auth=(self.account_sid, self._auth_token))
        except httpx.HTTPError as exc:
            raise CallControlFailed(f"twilio {what} failed: {type(exc).__name__}") from exc
        if not response.is_success:
            code, message = _twilio_error(response)
            raise CallControlFailed(f"twilio {what} failed: HTTP {response.status_code}"
                                    f"{f' code {code}' if code is not None else ''}: {message}")
        try:
            body = response.json()
        except ValueError:
            body = {}
        return body if isinstance(body, dict) else {}

    async def transfer(self, call: CallInfo, target: str) -> None:
        """Replace the running TwiML with ``<Dial>``: the stream stops and the caller is connected."""
        noun = f"<Sip>{escape(target)}</Sip>" if target.startswith("sip:") else escape(target)
        twiml = f"<Response><Dial>{noun}</Dial></Response>"
        await self._rest(f"transfer of {call.call_id}", self._calls_url(call.call_id), {"Twiml": twiml})
        logger.info("twilio call %s transferred", call.call_id)

    async def dial(self, request: DialRequest) -> CallInfo:
        """``POST Calls.json`` with inline TwiML that streams the answered call to ``stream_url``."""
        twiml, _ = self.answer(CallInfo(self.name, ""), request.stream_url, request.parameters)
        data = {"To": request.to, "From": request.from_, "Twiml": twiml, "StatusCallback": request.events_url,
                "StatusCallbackEvent": "answered completed"}
        if request.machine_detection:
            data.update(MachineDetection="Enable", AsyncAmd="true", AsyncAmdStatusCallback=request.events_url)
        body = await self._rest(f"call to {request.to}", self._calls_url(), data)
        call_id = str(body.get("sid", ""))
        if not call_id:
            raise CallControlFailed("twilio call creation answered without a call sid")
        return CallInfo(self.name, call_id, from_=request.from_, to=request.to, account_id=self.account_sid,
                        direction="outbound")

    async def send_dtmf(self, call: CallInfo, digits: str) -> bool:
        """Twilio cannot send digits into a live ``<Connect><Stream>`` without ending it: play tones."""
        return False

    def parse_event(self, request: WebhookRequest) -> CallEvent:
        params = dict(_form_pairs(request)) if request.method.upper() != "GET" else \
            dict(parse_qsl(urlsplit(request.url).query))
        answered = params.get("AnsweredBy", "")
        kind = "" if not answered else "human" if answered == "human" else \
            "machine" if answered.startswith(("machine", "fax")) else "unknown"
        status = params.get("CallStatus", "")
        return CallEvent(call_id=params.get("CallSid", ""), answered_by=kind, status=status,
                         ended=status in ("completed", "busy", "failed", "no-answer", "canceled"))


def _twilio_error(response: httpx.Response) -> tuple[int | None, str]:
    """Twilio's JSON error body ``{"code", "message", ...}`` -> (code, message)."""
    try:
        data = response.json()
    except ValueError:
        return None, response.reason_phrase or "no error message"
    if not isinstance(data, dict):
        return None, response.reason_phrase or "no error message"
    code = data.get("code")
    message = data.get("message")
    return (
        code if isinstance(code, int) and not isinstance(code, bool) else None,
        str(message)[:300] if message else response.reason_phrase or "no error message",
    )


def _is_json(request: WebhookRequest) -> bool:
    content_type = request.headers.get("content-type", "")
    return content_type.split(";", 1)[0].strip().lower() == "application/json"


def _form_pairs(request: WebhookRequest) -> list[tuple[str, str]]:
    """All form params in order, duplicates kept (parsed from the body if the gateway did not)."""
    if request.form:
        return list(request.form)
    if request.body and not _is_json(request):
        try:
            return parse_qsl(request.body.decode("utf-8"), keep_blank_values=True)
        except UnicodeDecodeError:
            return []
    return []


def _json_pairs(body: bytes) -> list[tuple[str, str]]:
    data = load_json("twilio webhook body", body)
    if not isinstance(data, dict):
        raise CarrierProtocolError("twilio webhook body is not a JSON object")
    return [(k, v) for k, v in data.items() if isinstance(v, str)]


# A media message exactly as Twilio lays it out (docs/carriers.md), up to its payload: these groups are the
# values json.loads gives. When the rest is a payload that strict base64 accepts (no quote, no escape) and
# '"}}', the message is valid JSON with those values. Anything else goes through the parser.
_MEDIA_HEAD = re.compile(
    r'\{"event":"media","sequenceNumber":"[0-9]{1,20}","streamSid":"([A-Za-z0-9]{1,64})",'
    r'"media":\{"track":"(inbound|outbound)","chunk":"[0-9]{1,20}","timestamp":"[0-9]{1,20}",'
    r'"payload":"').match


class TwilioMediaStream(StreamChecks):
    """Sans-I/O codec for one Twilio Media Streams WebSocket (µ-law 8 kHz <-> PCM16 8 kHz)."""
    carrier, id_keys, id_attr, open_hint = "twilio", ("streamSid",), "stream_sid", "no streamSid yet"

    sample_rate: int = SAMPLE_RATE
    frame_ms: int = 20
    max_message_ms: int = 100      # any length plays; 20-100 ms keeps a clear effective (docs/carriers.md)
    marks: bool = True

    def __init__(self) -> None:
        self.started: bool = False
        self.stream_sid: str = ""
        self.call_sid: str = ""
        self._media_prefix = ""  # '{"event":"media","streamSid":"MZ...","media":{"payload":"'

    # -- Twilio -> us --------------------------------------------------------------------------

    def decode(self, message: str | bytes) -> list[Frame]:
        if self.started and isinstance(message, str):
            media = _MEDIA_HEAD(message)
            if media is not None and message.endswith('"}}'):   # 50 a second: Twilio's layout, no JSON parser
                try:
                    ulaw = binascii.a2b_base64(message[media.end():-3], strict_mode=True)
                except (binascii.Error, ValueError):
                    return self.decode_json(message)    # not base64 (or escaped): the parser's answer
                stream_sid, track = media.groups()
                if stream_sid != self.stream_sid:
                    raise self._wrong_stream()
                if track == "outbound":
                    return []
                return [AudioFrame(ulaw_decode(ulaw), SAMPLE_RATE)] if ulaw else []
        return self.decode_json(message)

    def decode_json(self, message: str | bytes) -> list[Frame]:
        """``decode`` through the JSON parser: any message (the same frames and errors for a media message
        in Twilio's layout, which ``decode`` reads without it)."""
        data, event = parse_event("twilio", message)
        if event == "media":
            return self._decode_media(data)
        if event == "start":
            return self._decode_start(data)
        if event == "connected":
            return []
        if event == "stop":
            self._check_stream(data)
            return [StreamStopped("stop")]
        if event == "dtmf":
            self._require_started(event, data)
            return [dtmf_frame("twilio", data)]
        if event == "mark":
            self._require_started(event, data)
            return [mark_frame("twilio", data)]
        return []  # Twilio may add events

    def _decode_media(self, data: dict[str, Any]) -> list[Frame]:
        self._require_started("media", data)
        ulaw = media_payload("twilio", data)   # b"" for our own audio echoed on an outbound track
        if not ulaw:
            return []
        return [AudioFrame(ulaw_decode(ulaw), SAMPLE_RATE)]

    def _decode_start(self, data: dict[str, Any]) -> list[Frame]:
        start, stream_sid, call_sid, media_format = self._start_fields(data, "callSid")
        encoding = media_format.get("encoding", ENCODING)
        rate = media_format.get("sampleRate", SAMPLE_RATE)
        channels = media_format.get("channels", 1)
        if encoding != ENCODING or str(rate) != "8000" or str(channels) != "1":
            raise CarrierProtocolError(
                f"twilio start.mediaFormat {encoding!s:.40} {rate!s:.10} Hz {channels!s:.4} channel(s) "
                f"is not supported (expected {ENCODING} 8000 Hz mono)"
            )
        custom = start.get("customParameters", {})
        if not isinstance(custom, dict) or not all(isinstance(v, str) for v in custom.values()):
            raise CarrierProtocolError("twilio start.customParameters is not an object of strings")
        account_sid = start.get("accountSid", "")
        self.started = True
        self.stream_sid = stream_sid
        self.call_sid = call_sid
        self._media_prefix = '{"event":"media","streamSid":' + json.dumps(stream_sid) + ',"media":{"payload":"'
        return [
            StreamStarted(
                stream_id=stream_sid,
                call_id=call_sid,
                account_id=account_sid if isinstance(account_sid, str) else "",
                custom_parameters=dict(custom),
                sample_rate=SAMPLE_RATE,
                encoding=ENCODING,
            )
        ]

    # -- us -> Twilio --------------------------------------------------------------------------

    def encode(self, frame: Frame) -> list[str | bytes]:
        if isinstance(frame, AudioFrame):
            if frame.sample_rate != SAMPLE_RATE:
                raise ValueError(f"twilio needs 8000 Hz audio (got {frame.sample_rate} Hz); resample first")
            self._require_open()
            if not frame.pcm:
                return []
            return [self._media_prefix + base64.b64encode(ulaw_encode(frame.pcm)).decode("ascii") + '"}}']
        if isinstance(frame, Mark):
            self._require_open()
            return [
                json.dumps(
                    {"event": "mark", "streamSid": self.stream_sid, "mark": {"name": frame.name}},
                    separators=(",", ":"),
                )
            ]
        if isinstance(frame, Clear):
            self._require_open()
            return [json.dumps({"event": "clear", "streamSid": self.stream_sid}, separators=(",", ":"))]
        raise ValueError(f"twilio cannot send {type(frame).__name__} frames")


