"""Tests for carriers/telnyx.py against the §3 / §9.3 vectors of docs/carriers.md, a fake REST API and the
emulator's Telnyx dialect (gateway/simulate/dialects/telnyx.py)."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import struct
import time
import xml.etree.ElementTree as ET
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

import httpx
import pytest
from telnyx.lib.webhook_verification import verify_webhook_signature  # imported at collection: it takes ~1 s

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
from carriers.telnyx import TelnyxCarrier, TelnyxMediaStream
from gateway.simulate.dialects import dialect_for
from gateway.simulate.dialects.base import Inbound
from gateway.simulate.dialects.telnyx import TelnyxDialect
from pipeline.frames import AudioFrame, Clear, Dtmf, Mark, MarkPlayed, StreamStarted, StreamStopped
from tests.carriers.busy_vectors import check_xml_busy
from tests.fakes.telnyx_rest import FakeTelnyxREST

# ------------------------------------------------------------------------------------ §9.3 vectors
SEED = "9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60"
SEED_B64 = base64.b64encode(bytes.fromhex(SEED)).decode()
PUBLIC_KEY = "11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo="
TIMESTAMP = 1705314600
BODY = (b'{"data":{"event_type":"call.initiated","id":"0ccc7b54-4df3-4bca-a65a-3da1ecc777f0",'
        b'"occurred_at":"2024-01-15T10:30:00.000000Z","payload":{"call_control_id":"v3:abc123",'
        b'"call_leg_id":"2dc6fc34-f9e0-11ea-b68e-02420a0f7768","call_session_id":'
        b'"2dc1b3c8-f9e0-11ea-bc5a-02420a0f7768","client_state":null,"connection_id":"1494404757140276705",'
        b'"direction":"incoming","from":"+13125550100","start_time":"2024-01-15T10:30:00.000000Z",'
        b'"state":"parked","to":"+13125550199"},"record_type":"event"},"meta":{"attempt":1,'
        b'"delivered_to":"https://example.com/telnyx/webhook"}}')
SIGNATURE = "Gz01OR7gUoxOSvKvzzcXMEDFE9NHybTLxsbOLiVkLZdc0ZSv4oNAQYIbMZGmWLi49I31VxxkL4fm/0xbFtIJBQ=="
OTHER_KEY = base64.b64encode(bytes(range(32))).decode()  # a well-formed but wrong public key

API_KEY = "KEY0123456789ABCDEF_test"
ACCOUNT = "61bf923e-5e4d-4595-a110-56190ea18a1b"
CONNECTION = "1494404757140276705"
CALL = "v3:abc123"
STREAM = "32de0dea-53cb-4b21-89a4-9e1819c043bc"
USER = "3e6f995f-85f9-4a8c-9a5c-5e5b5d8a1b2c"
WSS = "wss://gw.example.com/ws/telnyx/3f9c1e"
TONE8_PCM = [0, 5657, 8000, 5657, 0, -5657, -8000, -5657]
TONE8_ULAW_TRIP = [0, 5628, 7932, 5628, 0, -5628, -7932, -5628]
TONE8_ALAW_TRIP = [8, 5760, 8064, 5760, 8, -5760, -8064, -5760]
ULAW = bytes.fromhex("ffa9a0a9ff292029")
ALAW = bytes.fromhex("d5838a83d5030a03")

CONNECTED = '{"event":"connected","version":"1.0.0"}'
START = json.dumps({
    "event": "start", "sequence_number": "1", "stream_id": STREAM,
    "start": {"user_id": USER, "call_control_id": CALL, "client_state": "aGF2ZSBhIG5pY2UgZGF5ID1d",
              "from": "+13125550100", "to": "+13125550199",
              "media_format": {"encoding": "PCMU", "sample_rate": 8000, "channels": 1}},
})
MEDIA = json.dumps({"event": "media", "sequence_number": "4", "stream_id": STREAM,
                    "media": {"track": "inbound", "chunk": "2", "timestamp": "40", "payload": "/6mgqf8pICk="}})
DTMF = json.dumps({"event": "dtmf", "sequence_number": "9", "stream_id": STREAM,
                   "occurred_at": "2024-01-15T10:30:05.123Z", "dtmf": {"digit": "1"}})
MARK = json.dumps({"event": "mark", "sequence_number": "10", "stream_id": STREAM, "mark": {"name": "utt-7"}})
STOP = json.dumps({"event": "stop", "sequence_number": "120", "stream_id": STREAM,
                   "stop": {"user_id": USER, "call_control_id": CALL}})


def pcm(samples: list[int]) -> bytes:
    return struct.pack(f"<{len(samples)}h", *samples)


def carrier(http: httpx.AsyncClient | None = None, **kwargs: Any) -> TelnyxCarrier:
    kwargs.setdefault("api_key", API_KEY)
    kwargs.setdefault("public_key", PUBLIC_KEY)
    kwargs.setdefault("account_sid", ACCOUNT)
    kwargs.setdefault("connection_id", CONNECTION)
    return TelnyxCarrier(http=http or httpx.AsyncClient(), **kwargs)


def cc(**kwargs: Any) -> TelnyxCarrier:
    return carrier(flow="call_control", **kwargs)


def signed(body: bytes = BODY, signature: str | None = SIGNATURE, timestamp: str | None = str(TIMESTAMP),
           content_type: str = "application/json") -> WebhookRequest:
    headers = {"content-type": content_type}
    if signature is not None:
        headers["telnyx-signature-ed25519"] = signature
    if timestamp is not None:
        headers["telnyx-timestamp"] = timestamp
    form = tuple(parse_qsl(body.decode())) if content_type.startswith("application/x-www") else ()
    return WebhookRequest("POST", "https://gw.example.com/start/telnyx", headers, body, form)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Any:
    """Freeze ``time.time`` (ours and the SDK's) at the vector's timestamp + 10 s; call to move it."""
    now = [TIMESTAMP + 10.0]
    monkeypatch.setattr(time, "time", lambda: now[0])

    def set_clock(value: float) -> None:
        now[0] = value

    return set_clock


def started_stream(**kwargs: Any) -> TelnyxMediaStream:
    stream = TelnyxMediaStream(**kwargs)
    stream.decode(CONNECTED)
    stream.decode(START)
    return stream


def start(encoding: Any = "PCMU", rate: Any = 8000, channels: Any = 1, **fields: Any) -> str:
    message = json.loads(START)
    message["start"]["media_format"] = {"encoding": encoding, "sample_rate": rate, "channels": channels}
    message["start"].update(fields)
    message["start"] = {k: v for k, v in message["start"].items() if v is not None}
    return json.dumps(message)


def media(payload: Any = "/6mgqf8pICk=", **top: Any) -> str:
    return json.dumps({"event": "media", "stream_id": STREAM, "media": {"track": "inbound", "payload": payload},
                       **top})


# ------------------------------------------------------------------------------------ signatures

def test_signature_vector_verifies(clock: Any) -> None:
    carrier().verify(signed())
    cc().verify(signed())


def test_signature_vector_is_what_the_sdk_and_the_dialect_compute(clock: Any) -> None:
    verify_webhook_signature(BODY, {"Telnyx-Signature-Ed25519": SIGNATURE, "Telnyx-Timestamp": str(TIMESTAMP)},
                             PUBLIC_KEY)
    dialect = TelnyxDialect(credentials={"signing_key": SEED_B64}, from_="+1", to="+2")
    assert dialect.public_key == PUBLIC_KEY
    assert dialect.sign(str(TIMESTAMP), BODY) == SIGNATURE


@pytest.mark.parametrize(
    ("request_", "reason"),
    [
        pytest.param(signed(body=BODY.replace(b"+13125550199", b"+13125550198")), "signature does not match",
                     id="body-byte"),
        pytest.param(signed(body=BODY + b"\n"), "signature does not match", id="trailing-newline"),
        pytest.param(signed(timestamp=str(TIMESTAMP + 1)), "signature does not match", id="timestamp-1705314601"),
        pytest.param(signed(signature=SIGNATURE[:-4] + "AA=="), "signature does not match", id="forged"),
        pytest.param(signed(signature=None), "missing telnyx-signature-ed25519 header", id="no-signature"),
        pytest.param(signed(signature=""), "missing telnyx-signature-ed25519 header", id="empty-signature"),
        pytest.param(signed(timestamp=None), "missing telnyx-timestamp header", id="no-timestamp"),
        pytest.param(signed(timestamp="1705314600.0"), "telnyx-timestamp is not a Unix time in seconds",
                     id="float-timestamp"),
        pytest.param(signed(timestamp="-1705314600"), "telnyx-timestamp is not a Unix time in seconds",
                     id="negative-timestamp"),
        pytest.param(signed(signature="not base64!"), "signature is not valid base64", id="bad-base64"),
        pytest.param(signed(signature=base64.b64encode(b"x" * 63).decode()), "signature is not 64 bytes",
                     id="short-signature"),
        pytest.param(signed(body=b"\xff" + BODY), "body is not valid UTF-8", id="not-utf8"),
    ],
)
def test_forged_or_malformed_signatures(clock: Any, request_: WebhookRequest, reason: str) -> None:
    with pytest.raises(SignatureInvalid, match=f"^telnyx: {reason}$"):
        carrier().verify(request_)


def test_wrong_public_key(clock: Any) -> None:
    with pytest.raises(SignatureInvalid, match="^telnyx: signature does not match$"):
        carrier(public_key=OTHER_KEY).verify(signed())


@pytest.mark.parametrize(("now", "ok"), [(TIMESTAMP + 300, True), (TIMESTAMP - 300, True),
                                         (TIMESTAMP + 301, False), (TIMESTAMP - 301, False),
                                         (TIMESTAMP + 86400, False)])
def test_timestamp_tolerance_is_300_s_inclusive(clock: Any, now: int, ok: bool) -> None:
    clock(now + 0.9)  # whole seconds, as the SDK counts
    if ok:
        carrier().verify(signed())
    else:
        with pytest.raises(SignatureInvalid, match=rf"^telnyx: timestamp is {abs(now - TIMESTAMP)} s from now "
                                                   r"\(tolerance 300 s\)$"):
            carrier().verify(signed())


def test_replayed_webhook_rejected(clock: Any) -> None:
    c = carrier()
    c.verify(signed())
    with pytest.raises(SignatureInvalid, match=r"^telnyx: replayed webhook \(signature already used\)$"):
        c.verify(signed())
    relaxed = carrier(reject_replays=False)
    relaxed.verify(signed())
    relaxed.verify(signed())


def test_replay_memory_forgets_expired_signatures(clock: Any) -> None:
    c = carrier()
    dialect = TelnyxDialect(credentials={"signing_key": SEED_B64}, from_="+1", to="+2")
    c.verify(signed())
    clock(TIMESTAMP + 1000)
    later = str(TIMESTAMP + 1000)
    c.verify(signed(signature=dialect.sign(later, BODY), timestamp=later))
    assert len(c._seen) == 1  # the first signature expired and was dropped


def test_forged_signature_does_not_poison_the_replay_memory(clock: Any) -> None:
    c = carrier()
    with pytest.raises(SignatureInvalid):
        c.verify(signed(body=BODY + b" "))
    c.verify(signed())


def test_verification_disabled_needs_no_key() -> None:
    c = carrier(verify_signatures=False, public_key="")
    c.verify(signed(signature=None, timestamp=None))


@pytest.mark.parametrize("key", ["", "not base64", base64.b64encode(b"short").decode()])
def test_bad_public_key_fails_at_startup(key: str) -> None:
    with pytest.raises(ValueError, match="public_key must be the portal's base64 Ed25519 public key"):
        carrier(public_key=key)


# ------------------------------------------------------------------------------------ parse_call

def test_parse_call_control_initiated() -> None:
    assert cc().parse_call(signed()) == CallInfo(
        carrier="telnyx", call_id=CALL, from_="+13125550100", to="+13125550199", account_id="",
        direction="inbound", custom={})


def test_parse_call_control_outgoing_and_custom_headers() -> None:
    body = json.loads(BODY)
    body["data"]["payload"].update(direction="outgoing", custom_headers=[
        {"name": "X-Account", "value": "42"}, {"name": 5, "value": "x"}, "junk"])
    call = cc().parse_call(signed(json.dumps(body).encode()))
    assert (call.direction, call.custom) == ("outbound", {"X-Account": "42"})


def texml_form(**extra: str) -> bytes:
    params = {"AccountSid": ACCOUNT, "CallSid": CALL, "CallSidLegacy": CALL, "CallStatus": "ringing",
              "Direction": "inbound", "From": "+13125550100", "To": "+13125550199",
              "ConnectionId": CONNECTION, **extra}
    return urlencode(params).encode()


def test_parse_texml_call() -> None:
    request = signed(texml_form(), content_type="application/x-www-form-urlencoded")
    assert carrier().parse_call(request) == CallInfo(
        carrier="telnyx", call_id=CALL, from_="+13125550100", to="+13125550199", account_id=ACCOUNT,
        direction="inbound")
    outbound = signed(texml_form(Direction="outbound-api"), content_type="application/x-www-form-urlencoded")
    assert carrier().parse_call(outbound).direction == "outbound"
    # the gateway gave no parsed form: the body is parsed
    bare = WebhookRequest("POST", "https://x/start/telnyx", {"content-type": "application/x-www-form-urlencoded"},
                          texml_form())
    assert carrier().parse_call(bare).call_id == CALL


@pytest.mark.parametrize(
    ("flow", "body", "content_type", "text"),
    [
        ("texml", BODY, "application/json",
         "telnyx Call Control webhook, but this carrier answers TeXML (flow='texml')"),
        ("call_control", texml_form(), "application/x-www-form-urlencoded",
         "telnyx TeXML webhook, but this carrier uses Call Control (flow='call_control')"),
        ("texml", b"From=%2B1", "application/x-www-form-urlencoded", "telnyx webhook has no CallSid"),
        ("texml", b"CallSid=", "application/x-www-form-urlencoded", "telnyx webhook has no CallSid"),
        ("texml", b"\xffCallSid=1", "application/x-www-form-urlencoded", "telnyx webhook body is not valid UTF-8"),
        ("call_control", b"{", "application/json", "telnyx webhook body is not valid JSON"),
        ("call_control", b"[]", "application/json", "telnyx webhook has no data object"),
        ("call_control", b'{"data":{"payload":{}}}', "application/json", "telnyx webhook has no data.event_type"),
        ("call_control", b'{"data":{"event_type":"call.initiated"}}', "application/json",
         "telnyx webhook has no data.payload object"),
        ("call_control", BODY.replace(b'"call_control_id":"v3:abc123",', b""), "application/json",
         "telnyx call.initiated has no payload.call_control_id"),
    ],
)
def test_parse_call_errors(flow: str, body: bytes, content_type: str, text: str) -> None:
    request = WebhookRequest("POST", "https://x/start/telnyx", {"content-type": content_type}, body)
    with pytest.raises(CarrierProtocolError) as info:
        carrier(flow=flow).parse_call(request)
    assert str(info.value) == text


# ------------------------------------------------------------------------------------ TeXML answer

CALL_INFO = CallInfo(carrier="telnyx", call_id=CALL, from_="+13125550100")
PARAMS = {"session_id": "3f9c1e", "persona": "sales"}


def stream_el(body: str) -> ET.Element:
    root = ET.fromstring(body.encode())
    assert root.tag == "Response"
    assert [child.tag for child in root] == ["Connect", "Hangup"]
    [connect] = root.findall("Connect")
    [stream] = list(connect)
    assert stream.tag == "Stream"
    return stream


def test_texml_answer_field_by_field() -> None:
    body, media_type = carrier().answer(CALL_INFO, WSS, PARAMS)
    assert media_type == "text/xml"
    assert body.startswith('<?xml version="1.0" encoding="UTF-8"?><Response><Connect><Stream url="')
    stream = stream_el(body)
    assert stream.attrib == {"url": WSS + "?session_id=3f9c1e&persona=sales", "track": "inbound_track",
                             "codec": "PCMU", "bidirectionalMode": "rtp", "bidirectionalCodec": "PCMU",
                             "bidirectionalSamplingRate": "8000"}
    assert list(stream) == []
    assert "&amp;persona" in body  # the query's & is escaped inside the attribute


def test_texml_answer_parameter_modes() -> None:
    stream = stream_el(carrier(stream_parameters="element").answer(CALL_INFO, WSS, PARAMS)[0])
    assert stream.attrib["url"] == WSS
    assert [p.attrib for p in stream] == [{"name": "session_id", "value": "3f9c1e"},
                                          {"name": "persona", "value": "sales"}]
    both = stream_el(carrier(stream_parameters="both").answer(CALL_INFO, WSS + "?a=1", PARAMS)[0])
    assert both.attrib["url"] == WSS + "?a=1&session_id=3f9c1e&persona=sales" and len(both) == 2
    none = stream_el(carrier(stream_parameters="none").answer(CALL_INFO, WSS, PARAMS)[0])
    assert none.attrib["url"] == WSS and len(none) == 0
    assert stream_el(carrier().answer(CALL_INFO, WSS, {})[0]).attrib["url"] == WSS


def test_texml_answer_codec_switches() -> None:
    c = carrier(inbound_codec="default", outbound_codec="L16", outbound_sample_rate=16000)
    attrib = stream_el(c.answer(CALL_INFO, WSS, {})[0]).attrib
    assert (attrib["codec"], attrib["bidirectionalCodec"], attrib["bidirectionalSamplingRate"]) == (
        "default", "L16", "16000")
    attrib = stream_el(carrier(inbound_codec="PCMA", outbound_codec="PCMA").answer(CALL_INFO, WSS, {})[0]).attrib
    assert (attrib["codec"], attrib["bidirectionalCodec"]) == ("PCMA", "PCMA")


def test_texml_answer_escapes_hostile_values() -> None:
    url = "wss://gw.example.com/ws/telnyx/a&b\"c<d>'"
    params = {'n"<&>': '"/><Hangup/><Parameter name="x', "tabs": "a\tb\nc\r", "dollar": "$stream_url ${x}"}
    stream = stream_el(carrier(stream_parameters="both").answer(CALL_INFO, url, params)[0])
    assert {p.attrib["name"]: p.attrib["value"] for p in stream} == params
    target = urlsplit(stream.attrib["url"])
    assert target.scheme + "://" + target.netloc + target.path == "wss://gw.example.com/ws/telnyx/a&b\"c<d>'"
    assert dict(parse_qsl(target.query)) == params


@pytest.mark.parametrize("url", ["https://gw.example.com/ws", "ws://gw.example.com/ws", "/ws/telnyx/x", ""])
def test_answer_rejects_non_wss_url(url: str) -> None:
    with pytest.raises(ValueError, match="wss://"):
        carrier().answer(CALL_INFO, url, {})
    with pytest.raises(ValueError, match="wss://"):
        cc(call_control_auto_answer=False).answer(CALL_INFO, url, {})


def test_answer_rejects_xml_invalid_characters() -> None:
    with pytest.raises(ValueError, match="XML"):
        carrier(stream_parameters="element").answer(CALL_INFO, WSS, {"a": "bell\x07"})


@pytest.mark.parametrize(
    "kwargs",
    [{"flow": "sip"}, {"stream_parameters": "path"}, {"inbound_codec": "L16"}, {"inbound_codec": "OPUS"},
     {"outbound_codec": "G722"}, {"outbound_sample_rate": 16000},
     {"outbound_codec": "L16", "outbound_sample_rate": 44100},
     {"outbound_codec": "L16", "outbound_sample_rate": 48000}, {"l16_byte_order": "middle"}],
)
def test_constructor_rejects_impossible_switches(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="^telnyx "):
        carrier(**kwargs)


def test_repr_hides_secrets() -> None:
    c = carrier(stream_auth_token="tok-secret")
    assert API_KEY not in repr(c) and "tok-secret" not in repr(c)


def test_texml_busy_says_the_text_and_hangs_up() -> None:
    check_xml_busy(carrier().busy, "Say", "text/xml")


def test_call_control_has_no_busy_markup() -> None:
    """Telnyx ignores a Call Control webhook's body: None makes the gateway answer 503 (failover URL)."""
    assert cc().busy(CALL_INFO, "All our lines are busy.") is None


# ------------------------------------------------------------------------------------ Call Control answer

def test_call_control_answer_is_an_empty_json_200_body() -> None:
    assert cc(call_control_auto_answer=False).answer(CALL_INFO, WSS, PARAMS) == ("{}", "application/json")
    assert cc().answer(CALL_INFO, WSS, PARAMS) == ("{}", "application/json")  # no loop running: nothing scheduled


@pytest.mark.asyncio
async def test_answer_call_vector_body() -> None:
    async with FakeTelnyxREST(API_KEY) as fake, httpx.AsyncClient() as http:
        fake.calls = {CALL: "parked"}
        c = cc(http=http, api_base_url=fake.base_url, inbound_codec="default", stream_parameters="none")
        await c.answer_call(CALL_INFO, WSS, PARAMS)
        [request] = fake.requests
        assert (request.method, request.path, request.content_type, request.auth_ok) == (
            "POST", "/v2/calls/v3:abc123/actions/answer", "application/json", True)
        assert request.body == {"stream_url": WSS, "stream_track": "inbound_track",
                                "stream_bidirectional_mode": "rtp", "stream_bidirectional_codec": "PCMU"}
        assert fake.calls[CALL] == "active"


@pytest.mark.asyncio
async def test_answer_call_default_asks_pcmu_and_passes_parameters_in_the_query() -> None:
    async with FakeTelnyxREST(API_KEY) as fake, httpx.AsyncClient() as http:
        fake.calls = {CALL: "parked"}
        await cc(http=http, api_base_url=fake.base_url).answer_call(CALL_INFO, WSS, PARAMS)
        [(call_id, body)] = fake.answered
        assert call_id == CALL and body == {
            "stream_url": WSS + "?session_id=3f9c1e&persona=sales", "stream_track": "inbound_track",
            "stream_codec": "PCMU", "stream_bidirectional_mode": "rtp", "stream_bidirectional_codec": "PCMU"}
        assert fake.streaming == []


@pytest.mark.asyncio
async def test_answer_call_with_token_rate_or_elements_uses_streaming_start() -> None:
    async with FakeTelnyxREST(API_KEY) as fake, httpx.AsyncClient() as http:
        fake.calls = {CALL: "parked"}
        c = cc(http=http, api_base_url=fake.base_url, stream_auth_token="tok-1", stream_parameters="element",
               outbound_codec="L16", outbound_sample_rate=16000)
        await c.answer_call(CALL_INFO, WSS, PARAMS)
        assert [r.path for r in fake.requests] == ["/v2/calls/v3:abc123/actions/answer",
                                                   "/v2/calls/v3:abc123/actions/streaming_start"]
        assert fake.answered == [(CALL, {})]
        assert fake.streaming == [(CALL, {
            "stream_url": WSS, "stream_track": "inbound_track", "stream_codec": "PCMU",
            "stream_bidirectional_mode": "rtp", "stream_bidirectional_codec": "L16",
            "stream_bidirectional_sampling_rate": 16000, "stream_auth_token": "tok-1",
            "custom_parameters": [{"name": "session_id", "value": "3f9c1e"}, {"name": "persona", "value": "sales"}]})]


@pytest.mark.asyncio
async def test_answer_schedules_the_rest_answer_on_the_running_loop(caplog: pytest.LogCaptureFixture) -> None:
    async with FakeTelnyxREST(API_KEY) as fake, httpx.AsyncClient() as http:
        fake.calls = {CALL: "parked"}
        c = cc(http=http, api_base_url=fake.base_url)
        assert c.answer(CALL_INFO, WSS, PARAMS) == ("{}", "application/json")
        await asyncio.gather(*c._answer_tasks)
        assert [call_id for call_id, _ in fake.answered] == [CALL]
        # a failing background answer is logged, never raised
        c.answer(CallInfo(carrier="telnyx", call_id="v3:gone"), WSS, {})
        await asyncio.gather(*c._answer_tasks)
    assert "telnyx answer of v3:gone failed: HTTP 404 code 10005" in caplog.text


@pytest.mark.asyncio
async def test_answer_call_of_ended_call_fails() -> None:
    async with FakeTelnyxREST(API_KEY) as fake, httpx.AsyncClient() as http:
        fake.calls = {CALL: "ended"}
        with pytest.raises(CallControlFailed, match="^telnyx answer of v3:abc123 failed: HTTP 422 code 90018: "
                                                    "Call has already ended - "):
            await cc(http=http, api_base_url=fake.base_url).answer_call(CALL_INFO, WSS, {})


# ------------------------------------------------------------------------------------ media stream: decode

def test_decode_documented_session() -> None:
    stream = TelnyxMediaStream()
    assert (stream.sample_rate, stream.frame_ms, stream.marks, stream.started) == (8000, 20, True, False)
    assert stream.decode(CONNECTED) == []
    assert stream.decode(START) == [StreamStarted(
        stream_id=STREAM, call_id=CALL, account_id=USER, custom_parameters={}, sample_rate=8000, encoding="PCMU")]
    assert stream.started and stream.stream_id == STREAM and stream.call_control_id == CALL
    assert stream.decode(MEDIA) == [AudioFrame(pcm(TONE8_ULAW_TRIP), 8000)]
    assert stream.decode(DTMF) == [Dtmf("1")]
    assert stream.decode(MARK) == [MarkPlayed("utt-7")]
    assert stream.decode(STOP) == [StreamStopped("stop")]


@pytest.mark.parametrize(
    ("encoding", "payload", "expected"),
    [
        ("PCMU", "/6mgqf8pICk=", TONE8_ULAW_TRIP),
        ("audio/x-mulaw", "/6mgqf8pICk=", TONE8_ULAW_TRIP),
        ("PCMA", "1YOKg9UDCgM=", TONE8_ALAW_TRIP),
        ("pcma", "1YOKg9UDCgM=", TONE8_ALAW_TRIP),
        ("audio/x-alaw", "1YOKg9UDCgM=", TONE8_ALAW_TRIP),
        ("L16", "AAAWGR9AFhkAAOnn4MDp5w==", TONE8_PCM),  # big-endian by default
    ],
)
def test_decode_follows_start_media_format(encoding: str, payload: str, expected: list[int]) -> None:
    stream = TelnyxMediaStream()
    [started] = stream.decode(start(encoding))
    assert isinstance(started, StreamStarted) and started.encoding == encoding.upper().replace(
        "AUDIO/X-MULAW", "PCMU").replace("AUDIO/X-ALAW", "PCMA")
    assert stream.decode(media(payload)) == [AudioFrame(pcm(expected), 8000)]


def test_decode_l16_little_endian_switch() -> None:
    stream = TelnyxMediaStream(l16_byte_order="little")
    stream.decode(start("L16"))
    assert stream.decode(media("AAAZFkAfGRYAAOfpwODn6Q==")) == [AudioFrame(pcm(TONE8_PCM), 8000)]


def test_decode_l16_16k_is_resampled_to_the_stream_rate() -> None:
    stream = TelnyxMediaStream()
    stream.decode(start("L16", "16000"))
    out = b"".join(f.pcm for _ in range(10) for f in stream.decode(media(base64.b64encode(bytes(640)).decode())))
    assert 0 < len(out) <= 10 * 320 and out == bytes(len(out))  # 8 kHz silence, filter delay aside
    wide = TelnyxMediaStream(outbound_codec="L16", sample_rate=16000)
    wide.decode(start("PCMU"))
    [frame] = wide.decode(media("/" * 213 + "w=="))  # 20 ms µ-law silence -> 16 kHz
    assert frame.sample_rate == 16000


def test_decode_silence_and_ignored_messages(caplog: pytest.LogCaptureFixture) -> None:
    stream = started_stream()
    assert stream.decode(media("/" * 213 + "w==")) == [AudioFrame(b"\x00\x00" * 160, 8000)]
    assert stream.decode(media("")) == []
    outbound = json.loads(MEDIA)
    outbound["media"]["track"] = "outbound"
    assert stream.decode(json.dumps(outbound)) == []
    assert stream.decode(json.dumps({"event": "someday-new", "stream_id": STREAM})) == []
    error = {"event": "error", "sequence_number": "5", "stream_id": STREAM,
             "payload": {"code": 100003, "title": "malformed_frame", "detail": "Frame is malformed"}}
    with caplog.at_level(logging.WARNING):
        assert stream.decode(json.dumps(error)) == []
    assert "telnyx stream error 100003: malformed_frame Frame is malformed" in caplog.text
    assert stream.decode('{"event":"error","payload":"x"}') == []


@pytest.mark.parametrize("custom", [{"session_id": "3f9c1e", "persona": "sales"},
                                    [{"name": "session_id", "value": "3f9c1e"}, {"name": "persona", "value": "sales"}]])
def test_start_custom_parameters_as_object_or_list(custom: Any) -> None:
    [started] = TelnyxMediaStream().decode(start(custom_parameters=custom))
    assert isinstance(started, StreamStarted)
    assert started.custom_parameters == {"session_id": "3f9c1e", "persona": "sales"}


def test_stream_call_id_switch() -> None:
    [started] = TelnyxMediaStream(report_call_id=False).decode(START)
    assert isinstance(started, StreamStarted) and started.call_id == "" and started.stream_id == STREAM
    [started] = carrier(stream_call_id=False).open_stream().decode(START)
    assert isinstance(started, StreamStarted) and started.call_id == ""


def test_stop_before_start_still_ends_the_stream() -> None:
    assert TelnyxMediaStream().decode(STOP) == [StreamStopped("stop")]


@pytest.mark.parametrize("digit", list("0123456789*#ABCD"))
def test_decode_every_dtmf_digit(digit: str) -> None:
    assert started_stream().decode(DTMF.replace('"1"}', json.dumps(digit) + "}")) == [Dtmf(digit)]


@pytest.mark.parametrize(
    ("started", "message", "text"),
    [
        (False, b'{"event":"connected"}', "telnyx sends text frames only"),
        (False, "not json", "telnyx message is not valid JSON"),
        (False, "[" * 100_000, "telnyx message is not valid JSON"),
        (False, '["event"]', "telnyx message has no event"),
        (False, '{"version":"1.0.0"}', "telnyx message has no event"),
        (False, '{"event":5}', "telnyx message has no event"),
        (False, media(), "telnyx media before start"),
        (False, DTMF, "telnyx dtmf before start"),
        (False, MARK, "telnyx mark before start"),
        (True, START, "telnyx sent a second start event"),
        (False, '{"event":"start","start":{"call_control_id":"v3:x"}}', "telnyx start event has no stream_id"),
        (False, '{"event":"start","stream_id":""}', "telnyx start event has no stream_id"),
        (False, '{"event":"start","stream_id":"s"}', "telnyx start event has no start object"),
        (False, start(call_control_id=None), "telnyx start event has no start.call_control_id"),
        (False, start(call_control_id=7), "telnyx start event has no start.call_control_id"),
        (False, start("OPUS", 16000), "telnyx start.media_format OPUS 16000 Hz 1 channel(s) is not supported "
                                      "(expected PCMU or PCMA at 8000 Hz, or L16, mono)"),
        (False, start("G722"), "is not supported"),
        (False, start("PCMU", 16000), "is not supported"),
        (False, start("PCMU", 8000, 2), "is not supported"),
        (False, start("L16", 11025), "is not supported"),
        (False, start("L16", "fast"), "is not supported"),
        (False, start(None), "is not supported"),
        (False, start(media_format="PCMU"), "telnyx start.media_format is not an object"),
        (False, start(custom_parameters=["a"]), "telnyx start.custom_parameters is not an object or name/value list"),
        (False, start(custom_parameters={"a": 1}), "telnyx start.custom_parameters is not an object or name/value"),
        (True, '{"event":"media","stream_id":"' + STREAM + '"}', "telnyx media event has no media.payload"),
        (True, media(payload=None), "telnyx media event has no media.payload"),
        (True, media(payload=123), "telnyx media event has no media.payload"),
        (True, media(payload="/6mg qf8pICk="), "telnyx media payload is not valid base64"),
        (True, media(payload="/6mgqf8pICk"), "telnyx media payload is not valid base64"),
        (True, media(payload="!!!!"), "telnyx media payload is not valid base64"),
        (True, media(stream_id="other"), "telnyx stream_id does not match the stream"),
        (True, DTMF.replace(STREAM, "other"), "telnyx stream_id does not match the stream"),
        (True, STOP.replace(STREAM, "other"), "telnyx stream_id does not match the stream"),
        (True, '{"event":"dtmf","stream_id":"' + STREAM + '","dtmf":{}}', "telnyx dtmf event has no dtmf.digit"),
        (True, DTMF.replace('"1"}', '"11"}'), "telnyx dtmf digit is not one of 0-9 * # A-D"),
        (True, DTMF.replace('"1"}', '"E"}'), "telnyx dtmf digit is not one of 0-9 * # A-D"),
        (True, '{"event":"mark","stream_id":"' + STREAM + '"}', "telnyx mark event has no mark.name"),
    ],
)
def test_decode_errors(started: bool, message: str | bytes, text: str) -> None:
    stream = started_stream() if started else TelnyxMediaStream()
    with pytest.raises(CarrierProtocolError) as info:
        stream.decode(message)
    assert text in str(info.value)
    assert str(info.value).startswith("telnyx ")


def test_decode_l16_odd_payload() -> None:
    stream = TelnyxMediaStream()
    stream.decode(start("L16"))
    with pytest.raises(CarrierProtocolError, match="^telnyx L16 media payload has an odd number of bytes$"):
        stream.decode(media(base64.b64encode(b"\x00\x01\x02").decode()))


# ------------------------------------------------------------------------------------ media stream: encode

def payload_of(message: str | bytes) -> bytes:
    data = json.loads(message)
    assert set(data) == {"event", "media"} and data["event"] == "media" and set(data["media"]) == {"payload"}
    return base64.b64decode(data["media"]["payload"])


def test_encode_tone8_vectors_padded_to_20_ms() -> None:
    [out] = started_stream().encode(AudioFrame(pcm(TONE8_PCM), 8000))
    assert out.startswith('{"event":"media","media":{"payload":"/6mgqf8pIC')  # §9.3 PCMU vector, then padding
    assert payload_of(out) == ULAW + b"\xff" * 152
    [out] = started_stream(outbound_codec="PCMA").encode(AudioFrame(pcm(TONE8_PCM), 8000))
    assert out.startswith('{"event":"media","media":{"payload":"1YOKg9UDCg')  # §9.3 PCMA vector
    assert payload_of(out) == ALAW + b"\xd5" * 152


def test_encode_whole_frames_exactly() -> None:
    tone20 = pcm(TONE8_PCM * 20)  # 20 ms
    assert started_stream().encode(AudioFrame(tone20, 8000)) == [
        '{"event":"media","media":{"payload":"' + base64.b64encode(ULAW * 20).decode() + '"}}']
    [out] = started_stream(outbound_codec="PCMA").encode(AudioFrame(tone20 * 3, 8000))
    assert payload_of(out) == ALAW * 60  # 60 ms in one chunk
    [out] = started_stream(outbound_codec="L16").encode(AudioFrame(tone20, 8000))
    assert payload_of(out) == bytes.fromhex("000016191f4016190000e9e7e0c0e9e7") * 20  # big-endian
    [out] = started_stream(outbound_codec="L16", l16_byte_order="little").encode(AudioFrame(tone20, 8000))
    assert payload_of(out) == pcm(TONE8_PCM) * 20
    wide = started_stream(outbound_codec="L16", sample_rate=16000)
    [out] = wide.encode(AudioFrame(bytes(100), 16000))
    assert payload_of(out) == bytes(640)  # padded to 20 ms at 16 kHz


def test_encode_splits_chunks_longer_than_30_s() -> None:
    messages = started_stream().encode(AudioFrame(bytes(2 * 8000 * 31), 8000))
    assert [len(payload_of(m)) for m in messages] == [240_000, 8000]


def test_encode_mark_and_clear() -> None:
    stream = started_stream()
    assert stream.encode(Mark("utt-7")) == ['{"event":"mark","mark":{"name":"utt-7"}}']
    assert stream.encode(Clear()) == ['{"event":"clear"}']
    assert json.loads(stream.encode(Mark('a"\\b'))[0])["mark"]["name"] == 'a"\\b'


def test_barge_in_clear_then_marks_echoed() -> None:
    stream = started_stream()
    sent = stream.encode(AudioFrame(bytes(320), 8000)) + stream.encode(Mark("utt-1")) + stream.encode(Clear())
    assert [json.loads(m)["event"] for m in sent] == ["media", "mark", "clear"]
    # Telnyx returns the queued marks after a clear: they decode like any echo
    assert stream.decode(MARK.replace("utt-7", "utt-1")) == [MarkPlayed("utt-1")]


def test_round_trip_through_encode_and_decode() -> None:
    stream = started_stream()
    [out] = stream.encode(AudioFrame(pcm(TONE8_PCM * 20), 8000))
    echoed = json.loads(out)
    echoed["media"]["track"] = "inbound"
    assert stream.decode(json.dumps(echoed)) == [AudioFrame(pcm(TONE8_ULAW_TRIP * 20), 8000)]
    assert stream.encode(AudioFrame(pcm(TONE8_ULAW_TRIP * 20), 8000)) == [out]


def test_encode_errors() -> None:
    fresh = TelnyxMediaStream()
    for frame in (AudioFrame(pcm(TONE8_PCM), 8000), Mark("m"), Clear()):
        with pytest.raises(CarrierProtocolError, match="^telnyx stream has not started"):
            fresh.encode(frame)
    stream = started_stream()
    with pytest.raises(ValueError, match="8000 Hz"):
        stream.encode(AudioFrame(pcm(TONE8_PCM), 16000))
    for frame in (Dtmf("1"), MarkPlayed("m"), StreamStopped(), StreamStarted("s", "c")):
        with pytest.raises(ValueError, match="cannot send"):
            stream.encode(frame)
    assert stream.encode(AudioFrame(b"", 8000)) == []


# ------------------------------------------------------------------------------------ media socket auth

def test_verify_websocket() -> None:
    carrier().verify_websocket({}, WSS)  # no token configured: nothing to check
    c = carrier(stream_auth_token="tok-1")
    c.verify_websocket({"X-Telnyx-Streaming-Auth-Token": "tok-1"}, WSS)
    c.verify_websocket({"authorization": "Bearer tok-1"}, WSS)
    with pytest.raises(SignatureInvalid, match="^telnyx: x-telnyx-streaming-auth-token does not match$"):
        c.verify_websocket({"x-telnyx-streaming-auth-token": "tok-2"}, WSS)
    with pytest.raises(SignatureInvalid, match="^telnyx: missing x-telnyx-streaming-auth-token header$"):
        c.verify_websocket({"authorization": "Basic dG9rLTE="}, WSS)
    carrier(stream_auth_token="tok-1", stream_auth_header=False).verify_websocket({}, WSS)


def connected(token: str) -> str:
    return json.dumps({"event": "connected", "version": "1.0.0", "connected": {"x-telnyx-streaming-auth-token": token}})


def test_connected_frame_token() -> None:
    stream = carrier(stream_auth_token="tok-1").open_stream()
    assert stream.decode(connected("tok-1")) == []
    with pytest.raises(CarrierProtocolError, match="^telnyx connected frame stream auth token does not match$"):
        carrier(stream_auth_token="tok-1").open_stream().decode(connected("tok-2"))
    header_checked = carrier(stream_auth_token="tok-1").open_stream()
    header_checked.decode(CONNECTED)  # header mode: a connected frame without the token is fine
    assert header_checked.decode(START)[0] == StreamStarted(STREAM, CALL, USER, {}, 8000, "PCMU")
    frame_checked = carrier(stream_auth_token="tok-1", stream_auth_header=False).open_stream()
    frame_checked.decode(CONNECTED)
    with pytest.raises(CarrierProtocolError, match="^telnyx start before a connected frame carrying the stream"):
        frame_checked.decode(START)
    frame_checked.decode(connected("tok-1"))
    assert frame_checked.decode(START)[0] == StreamStarted(STREAM, CALL, USER, {}, 8000, "PCMU")


# ------------------------------------------------------------------------------------ hang-up

@pytest.mark.asyncio
async def test_hang_up_vector_request() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"data": {"result": "ok"}})

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http:
        await cc(http=http).hang_up(CallInfo(carrier="telnyx", call_id=CALL))
    [request] = seen
    assert (request.method, str(request.url)) == ("POST", "https://api.telnyx.com/v2/calls/v3:abc123/actions/hangup")
    assert request.headers["authorization"] == f"Bearer {API_KEY}" and request.content == b"{}"
    assert request.headers["content-type"] == "application/json"


@pytest.mark.asyncio
async def test_hang_up_call_control_success_then_already_ended(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    async with FakeTelnyxREST(API_KEY) as fake, httpx.AsyncClient() as http:
        fake.known_calls = {CALL}
        c = cc(http=http, api_base_url=fake.base_url + "/")
        await c.hang_up(CallInfo(carrier="telnyx", call_id=CALL))
        assert fake.ended_calls == [CALL]
        [request] = fake.requests
        assert (request.path, request.body, request.auth_ok) == ("/v2/calls/v3:abc123/actions/hangup", {}, True)
        await c.hang_up(CallInfo(carrier="telnyx", call_id=CALL))  # 422 / 90018: success
        await c.hang_up(CallInfo(carrier="telnyx", call_id="v3:never"))  # 404 / 10005: success
        assert fake.ended_calls == [CALL] and len(fake.requests) == 3
    assert "already ended (422 90018)" in caplog.text and "already ended (404 10005)" in caplog.text


@pytest.mark.asyncio
async def test_hang_up_texml() -> None:
    async with FakeTelnyxREST(API_KEY, account_sid=ACCOUNT) as fake, httpx.AsyncClient() as http:
        fake.known_calls = {CALL}
        c = carrier(http, api_base_url=fake.base_url)
        await c.hang_up(CallInfo(carrier="telnyx", call_id=CALL))
        [request] = fake.requests
        assert (request.path, request.body, request.content_type) == (
            f"/v2/texml/Accounts/{ACCOUNT}/Calls/v3:abc123", {"Status": "completed"}, "application/json")
        await c.hang_up(CallInfo(carrier="telnyx", call_id=CALL))  # already ended
        assert fake.ended_calls == [CALL]
        # the webhook's AccountSid serves when account_sid is not configured
        fake.known_calls = {CALL}
        await carrier(http, api_base_url=fake.base_url, account_sid="").hang_up(
            CallInfo(carrier="telnyx", call_id=CALL, account_id=ACCOUNT))
        assert fake.ended_calls == [CALL, CALL]
        with pytest.raises(HangupFailed, match="needs account_sid"):
            await carrier(http, api_base_url=fake.base_url, account_sid="").hang_up(
                CallInfo(carrier="telnyx", call_id=CALL))
        with pytest.raises(HangupFailed, match="the call id is empty"):
            await carrier(http, api_base_url=fake.base_url).hang_up(CallInfo(carrier="telnyx", call_id=""))


@pytest.mark.asyncio
async def test_hang_up_wrong_key(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    async with FakeTelnyxREST(API_KEY) as fake, httpx.AsyncClient() as http:
        fake.known_calls = {CALL}
        c = cc(http=http, api_key="wrong-key-value", api_base_url=fake.base_url)
        with pytest.raises(HangupFailed, match="HTTP 401 code 10009: Authentication failed") as info:
            await c.hang_up(CallInfo(carrier="telnyx", call_id=CALL))
        assert fake.ended_calls == [] and fake.requests[0].auth_ok is False
    assert "wrong-key-value" not in str(info.value) + caplog.text + repr(c)


@pytest.mark.asyncio
async def test_hang_up_server_error_and_foreign_404() -> None:
    async with FakeTelnyxREST(API_KEY) as fake, httpx.AsyncClient() as http:
        fake.known_calls = {CALL}
        fake.force_error = (503, "10007", "Unexpected error")
        with pytest.raises(HangupFailed, match="HTTP 503 code 10007: Unexpected error"):
            await cc(http=http, api_base_url=fake.base_url).hang_up(CallInfo(carrier="telnyx", call_id=CALL))
    transport = httpx.MockTransport(lambda request: httpx.Response(404, text="nginx: not found"))
    async with httpx.AsyncClient(transport=transport) as http:
        with pytest.raises(HangupFailed, match="HTTP 404: Not Found"):
            await cc(http=http).hang_up(CallInfo(carrier="telnyx", call_id=CALL))


@pytest.mark.asyncio
async def test_hang_up_transport_error_is_chained() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    async with httpx.AsyncClient(transport=httpx.MockTransport(refuse)) as http:
        with pytest.raises(HangupFailed, match="ConnectError") as info:
            await cc(http=http).hang_up(CallInfo(carrier="telnyx", call_id=CALL))
    assert isinstance(info.value.__cause__, httpx.ConnectError)


# ------------------------------------------------------------------------------------ transfer, DTMF, dial

@pytest.mark.asyncio
async def test_transfer_call_control() -> None:
    async with FakeTelnyxREST(API_KEY) as fake, httpx.AsyncClient() as http:
        fake.known_calls = {CALL, "v3:two"}
        c = cc(http=http, api_base_url=fake.base_url)
        await c.transfer(CallInfo(carrier="telnyx", call_id=CALL), "+14155550100")
        assert [r.path.rsplit("/", 1)[1] for r in fake.requests] == ["streaming_stop", "transfer"]
        assert fake.requests[1].body == {"to": "+14155550100"}
        assert fake.transfers == [(CALL, "+14155550100")] and fake.streams_stopped == [CALL]
        await cc(http=http, api_base_url=fake.base_url, stop_stream_on_transfer=False).transfer(
            CallInfo(carrier="telnyx", call_id="v3:two"), "sip:agent@pbx.example.com")
        assert fake.transfers[-1] == ("v3:two", "sip:agent@pbx.example.com") and len(fake.requests) == 3
        with pytest.raises(CallControlFailed, match="HTTP 422 code 90018: Call has already ended"):
            await c.transfer(CallInfo(carrier="telnyx", call_id=CALL), "+14155550100")


@pytest.mark.parametrize("target", ["", "4155550100", "+0123", "tel:+14155550100", "sip:a b@x", "+1415555010<"])
@pytest.mark.asyncio
async def test_transfer_rejects_bad_targets(target: str) -> None:
    with pytest.raises(CallControlFailed, match="target must be an E.164 number or a sip: URI"):
        await cc().transfer(CALL_INFO, target)


@pytest.mark.asyncio
async def test_transfer_texml_replaces_the_call_texml() -> None:
    async with FakeTelnyxREST(API_KEY) as fake, httpx.AsyncClient() as http:
        fake.known_calls = {CALL, "v3:two"}
        c = carrier(http, api_base_url=fake.base_url)
        await c.transfer(CallInfo(carrier="telnyx", call_id=CALL), "+14155550100")
        await c.transfer(CallInfo(carrier="telnyx", call_id="v3:two"), "sip:agent@pbx.example.com;x=1&y=2")
        assert [r.path for r in fake.requests] == [f"/v2/texml/Accounts/{ACCOUNT}/Calls/{CALL}",
                                                   f"/v2/texml/Accounts/{ACCOUNT}/Calls/v3:two"]
        first = ET.fromstring(fake.transfers[0][1])
        assert (first.tag, first.findtext("Dial")) == ("Response", "+14155550100")
        second = ET.fromstring(fake.transfers[1][1])
        assert second.findtext("Dial/Sip") == "sip:agent@pbx.example.com;x=1&y=2"


@pytest.mark.asyncio
async def test_send_dtmf() -> None:
    async with FakeTelnyxREST(API_KEY) as fake, httpx.AsyncClient() as http:
        fake.known_calls = {CALL}
        assert await cc(http=http, api_base_url=fake.base_url).send_dtmf(CALL_INFO, "12*#wA") is True
        assert fake.dtmf == [(CALL, "12*#wA")] and fake.requests[0].body == {"digits": "12*#wA"}
        assert await carrier(http, api_base_url=fake.base_url).send_dtmf(CALL_INFO, "1") is False  # TeXML: tones
        assert len(fake.requests) == 1
        with pytest.raises(CallControlFailed, match="digits must be 0-9"):
            await cc(http=http, api_base_url=fake.base_url).send_dtmf(CALL_INFO, "1x")
        with pytest.raises(CallControlFailed, match="HTTP 401 code 10009"):
            await cc(http=http, api_key="nope", api_base_url=fake.base_url).send_dtmf(CALL_INFO, "1")


DIAL = DialRequest(to="+14155550100", from_="+13125550199", stream_url=WSS,
                   answer_url="https://gw.example.com/start/telnyx?session=3f9c1e",
                   events_url="https://gw.example.com/events/telnyx", parameters={"session_id": "3f9c1e"},
                   machine_detection=True)


@pytest.mark.asyncio
async def test_dial_call_control() -> None:
    async with FakeTelnyxREST(API_KEY, connection_id=CONNECTION) as fake, httpx.AsyncClient() as http:
        c = cc(http=http, api_base_url=fake.base_url, stream_auth_token="tok-1")
        call = await c.dial(DIAL)
        [body] = fake.dialed
        assert body == {"connection_id": CONNECTION, "to": "+14155550100", "from": "+13125550199",
                        "stream_url": WSS + "?session_id=3f9c1e", "stream_track": "inbound_track",
                        "stream_codec": "PCMU", "stream_bidirectional_mode": "rtp",
                        "stream_bidirectional_codec": "PCMU", "stream_bidirectional_sampling_rate": 8000,
                        "webhook_url": DIAL.events_url, "stream_auth_token": "tok-1",
                        "answering_machine_detection": "detect"}
        assert call.call_id in fake.calls and call.call_id.startswith("v3:")
        assert (call.carrier, call.direction, call.to, call.from_) == (
            "telnyx", "outbound", "+14155550100", "+13125550199")
        plain = await cc(http=http, api_base_url=fake.base_url).dial(
            DialRequest(to="+1", from_="+2", stream_url=WSS, answer_url="", events_url=DIAL.events_url))
        assert "answering_machine_detection" not in fake.dialed[-1] and plain.call_id != call.call_id
        with pytest.raises(CallControlFailed, match="HTTP 422 code 10015: Invalid value"):
            await cc(http=http, api_base_url=fake.base_url, connection_id="999").dial(DIAL)
        with pytest.raises(CallControlFailed, match="connection_id is not set"):
            await cc(http=http, api_base_url=fake.base_url, connection_id="").dial(DIAL)
        with pytest.raises(CallControlFailed, match="wss://"):
            await c.dial(DialRequest(to="+1", from_="+2", stream_url="https://x", answer_url="", events_url=""))


@pytest.mark.asyncio
async def test_dial_texml_with_inline_texml() -> None:
    async with FakeTelnyxREST(API_KEY, connection_id=CONNECTION, account_sid=ACCOUNT) as fake, \
            httpx.AsyncClient() as http:
        call = await carrier(http, api_base_url=fake.base_url).dial(DIAL)
        [request] = fake.requests
        assert request.path == f"/v2/texml/Accounts/{ACCOUNT}/Calls"
        body = dict(request.body)
        stream = stream_el(body.pop("Texml"))
        assert stream.attrib["url"] == WSS + "?session_id=3f9c1e" and stream.attrib["bidirectionalMode"] == "rtp"
        assert body == {"ApplicationSid": CONNECTION, "To": "+14155550100", "From": "+13125550199",
                        "StatusCallback": DIAL.events_url, "MachineDetection": "Enable", "AsyncAmd": True,
                        "AsyncAmdStatusCallback": DIAL.events_url}
        assert call.call_id in fake.calls and call.account_id == ACCOUNT and call.direction == "outbound"


@pytest.mark.asyncio
async def test_dial_response_without_call_id() -> None:
    transport = httpx.MockTransport(lambda request: httpx.Response(200, json={"status": "queued"}))
    async with httpx.AsyncClient(transport=transport) as http:
        with pytest.raises(CallControlFailed, match="the response has no call id"):
            await carrier(http).dial(DIAL)


# ------------------------------------------------------------------------------------ events

def cc_event(event_type: str, **payload: Any) -> WebhookRequest:
    body = {"data": {"event_type": event_type, "id": "e1", "record_type": "event",
                     "payload": {"call_control_id": CALL, **payload}}}
    return WebhookRequest("POST", "https://x/events", {"content-type": "application/json"},
                          json.dumps(body).encode())


def form_event(**params: str) -> WebhookRequest:
    return WebhookRequest("POST", "https://x/events", {"content-type": "application/x-www-form-urlencoded"},
                          urlencode(params).encode(), tuple(params.items()))


@pytest.mark.parametrize(
    ("request_", "expected"),
    [
        (cc_event("call.machine.detection.ended", result="human"), CallEvent(CALL, "human", False,
                                                                             "call.machine.detection.ended")),
        (cc_event("call.machine.detection.ended", result="machine"), CallEvent(CALL, "machine", False,
                                                                               "call.machine.detection.ended")),
        (cc_event("call.machine.detection.ended", result="not_sure"), CallEvent(CALL, "unknown", False,
                                                                                "call.machine.detection.ended")),
        (cc_event("call.machine.premium.detection.ended", result="human_residence"),
         CallEvent(CALL, "human", False, "call.machine.premium.detection.ended")),
        (cc_event("call.machine.premium.detection.ended", result="fax_detected"),
         CallEvent(CALL, "machine", False, "call.machine.premium.detection.ended")),
        (cc_event("call.machine.premium.detection.ended", result="silence"),
         CallEvent(CALL, "unknown", False, "call.machine.premium.detection.ended")),
        (cc_event("call.machine.greeting.ended", result="beep_detected"),
         CallEvent(CALL, "", False, "call.machine.greeting.ended")),
        (cc_event("call.answered"), CallEvent(CALL, "", False, "call.answered")),
        (cc_event("streaming.stopped", stream_id=STREAM), CallEvent(CALL, "", False, "streaming.stopped")),
        (cc_event("call.hangup", hangup_cause="normal_clearing"), CallEvent(CALL, "", True, "call.hangup")),
        (form_event(CallSid=CALL, CallStatus="in-progress", AnsweredBy="human"),
         CallEvent(CALL, "human", False, "in-progress")),
        (form_event(CallSid=CALL, AnsweredBy="machine_end_beep"), CallEvent(CALL, "machine", False, "")),
        (form_event(CallSid=CALL, AnsweredBy="fax"), CallEvent(CALL, "machine", False, "")),
        (form_event(CallSid=CALL, AnsweredBy="unknown"), CallEvent(CALL, "unknown", False, "")),
        (form_event(CallSid=CALL, CallStatus="completed"), CallEvent(CALL, "", True, "completed")),
        (form_event(CallSid=CALL, CallStatus="no-answer"), CallEvent(CALL, "", True, "no-answer")),
        (form_event(CallSid=CALL, StreamEvent="stream-error", StreamError="x"),
         CallEvent(CALL, "", False, "stream-error")),
    ],
)
def test_parse_event(request_: WebhookRequest, expected: CallEvent) -> None:
    assert carrier().parse_event(request_) == expected
    assert cc().parse_event(request_) == expected


def test_parse_event_errors() -> None:
    with pytest.raises(CarrierProtocolError, match="^telnyx event has no payload.call_control_id$"):
        carrier().parse_event(cc_event("call.hangup", call_control_id=None))
    with pytest.raises(CarrierProtocolError, match="^telnyx event has no CallSid$"):
        carrier().parse_event(form_event(CallStatus="completed"))
    with pytest.raises(CarrierProtocolError, match="^telnyx webhook body is not valid JSON$"):
        carrier().parse_event(WebhookRequest("POST", "https://x", {"content-type": "application/json"}, b"{"))


# ------------------------------------------------------------------------------------ the fake itself

@pytest.mark.asyncio
async def test_fake_rejects_bad_requests() -> None:
    async with FakeTelnyxREST(API_KEY) as fake, httpx.AsyncClient(base_url=fake.base_url) as http:
        fake.known_calls = {CALL}
        auth = {"Authorization": f"Bearer {API_KEY}"}
        hangup = "/v2/calls/v3:abc123/actions/hangup"
        no_auth = await http.post(hangup, json={})
        assert no_auth.status_code == 401 and no_auth.json()["errors"][0]["code"] == "10009"
        basic = await http.post(hangup, json={}, auth=(API_KEY, ""))
        assert basic.status_code == 401
        bad_json = await http.post(hangup, content=b"{", headers={**auth, "content-type": "application/json"})
        assert bad_json.status_code == 400
        form = await http.post(hangup, data={"a": "1"}, headers=auth)
        assert form.status_code == 400
        wrong_method = await http.get(hangup, headers=auth)
        assert wrong_method.status_code == 405
        unknown_action = await http.post("/v2/calls/v3:abc123/actions/explode", json={}, headers=auth)
        assert unknown_action.status_code == 404
        bad_enum = await http.post("/v2/calls/v3:abc123/actions/answer", headers=auth,
                                   json={"stream_url": WSS, "stream_bidirectional_codec": "pcmu"})
        assert bad_enum.status_code == 422 and bad_enum.json()["errors"][0]["source"] == {
            "pointer": "/stream_bidirectional_codec"}
        no_to = await http.post("/v2/calls/v3:abc123/actions/transfer", json={}, headers=auth)
        assert no_to.status_code == 422 and no_to.json()["errors"][0]["code"] == "10004"
        other_account = await http.post("/v2/texml/Accounts/other/Calls/v3:abc123", json={"Status": "completed"},
                                        headers=auth)
        assert other_account.status_code == 404
        bad_status = await http.post(f"/v2/texml/Accounts/{fake.account_sid}/Calls/v3:abc123",
                                     data={"Status": "ringing"}, headers=auth)
        assert bad_status.status_code == 422
        form_hangup = await http.post(f"/v2/texml/Accounts/{fake.account_sid}/Calls/v3:abc123",
                                      data={"Status": "completed"}, headers=auth)
        assert form_hangup.json()["status"] == "completed" and fake.ended_calls == [CALL]
        ended = await http.post(hangup, json={}, headers=auth)
        assert ended.json() == {"errors": [{"code": "90018", "title": "Call has already ended",
                                            "detail": "This call is no longer active and can't receive commands."}]}


# ------------------------------------------------------------------------------------ emulator dialect

def as_request(hook: Any, public_url: str = "https://voice.example.test") -> WebhookRequest:
    headers = {k.lower(): v for k, v in hook.headers.items()}
    return WebhookRequest(hook.method, public_url + hook.path, headers, hook.body,
                          tuple(parse_qsl(hook.body.decode(), keep_blank_values=True)))


def test_dialect_is_registered() -> None:
    assert dialect_for("telnyx") is TelnyxDialect
    assert (TelnyxDialect.name, TelnyxDialect.rate, TelnyxDialect.frame_ms) == ("telnyx", 8000, 20)


@pytest.mark.parametrize("mode", ["query", "element", "both"])
def test_dialect_round_trip_through_the_carrier(mode: str) -> None:
    dialect = TelnyxDialect(credentials={"signing_key": SEED_B64, "account_sid": ACCOUNT}, from_="+13125550100",
                            to="+13125550199")
    c = carrier(stream_parameters=mode)
    request = as_request(dialect.webhook("https://voice.example.test", {"X-Extra": "1"}))
    assert request.headers["content-type"] == "application/x-www-form-urlencoded"
    c.verify(request)
    call = c.parse_call(request)
    assert (call.call_id, call.from_, call.to, call.account_id, call.direction) == (
        dialect.call_id, "+13125550100", "+13125550199", ACCOUNT, "inbound")
    body, _ = c.answer(call, "wss://voice.example.test/media/telnyx/sess1", PARAMS)
    url = dialect.answer(200, body)
    assert urlsplit(url).path == "/media/telnyx/sess1" and dialect.parameters == PARAMS
    assert dialect.mode == "rtp" and (dialect.inbound_codec, dialect.outbound_codec) == ("PCMU", "PCMU")

    stream = c.open_stream()
    frames = [f for m in dialect.opening() for f in stream.decode(m)]
    assert frames == [StreamStarted(stream_id=dialect.stream_id, call_id=call.call_id, account_id=ACCOUNT,
                                    custom_parameters=PARAMS if mode != "query" else {}, sample_rate=8000,
                                    encoding="PCMU")]
    tone = pcm(TONE8_PCM * 20)
    assert stream.decode(dialect.media(tone)) == [AudioFrame(pcm(TONE8_ULAW_TRIP * 20), 8000)]
    assert stream.decode(dialect.dtmf("#")) == [Dtmf("#")]
    assert stream.decode(dialect.mark_ack("utt-7")) == [MarkPlayed("utt-7")]

    sent = [*stream.encode(AudioFrame(tone, 8000)), *stream.encode(Mark("utt-8")), *stream.encode(Clear())]
    parsed = [item for message in sent for item in dialect.parse(message)]
    assert parsed == [Inbound("media", pcm=pcm(TONE8_ULAW_TRIP * 20)), Inbound("mark", name="utt-8"),
                      Inbound("clear")]
    assert [f for m in dialect.stop() for f in stream.decode(m)] == [StreamStopped("stop")]


def test_dialect_pcma_and_wideband_l16() -> None:
    dialect = TelnyxDialect(credentials={}, from_="+1", to="+2")
    c = carrier(public_key=dialect.public_key, inbound_codec="PCMA", outbound_codec="L16", outbound_sample_rate=16000)
    request = as_request(dialect.webhook("https://voice.example.test", {}))
    c.verify(request)
    dialect.answer(200, c.answer(c.parse_call(request), WSS, {})[0])
    assert (dialect.inbound_codec, dialect.outbound_codec, dialect.outbound_rate) == ("PCMA", "L16", 16000)
    stream = c.open_stream()
    [started] = [f for m in dialect.opening() for f in stream.decode(m)]
    assert isinstance(started, StreamStarted) and started.encoding == "PCMA" and started.sample_rate == 16000
    [frame] = stream.decode(dialect.media(pcm(TONE8_PCM * 20)))
    assert frame.sample_rate == 16000 and len(frame.pcm) > 0
    out = [item for _ in range(5) for m in stream.encode(AudioFrame(bytes(640), 16000)) for item in dialect.parse(m)]
    assert all(item.kind == "media" for item in out) and sum(len(i.pcm) for i in out) > 0


def test_dialect_stream_auth_token() -> None:
    dialect = TelnyxDialect(credentials={"stream_auth_token": "tok-1"}, from_="+1", to="+2")
    c = carrier(public_key=dialect.public_key, stream_auth_token="tok-1", stream_auth_header=False)
    c.verify_websocket(dialect.ws_headers(), WSS)
    dialect.answer(200, c.answer(CALL_INFO, WSS, {})[0])
    stream = c.open_stream()
    assert [type(f) for m in dialect.opening() for f in stream.decode(m)] == [StreamStarted]
    with pytest.raises(SignatureInvalid):
        carrier(public_key=dialect.public_key, stream_auth_token="tok-2").verify_websocket(dialect.ws_headers(), WSS)


def test_dialect_signatures_the_carrier_refuses() -> None:
    dialect = TelnyxDialect(credentials={}, from_="+1", to="+2")
    c = carrier(public_key=dialect.public_key)
    with pytest.raises(SignatureInvalid, match="signature does not match"):
        carrier().verify(as_request(dialect.webhook("https://x", {})))  # signed with another key
    stale = str(int(time.time()) - 301)
    with pytest.raises(SignatureInvalid, match="from now"):
        c.verify(as_request(dialect.webhook("https://x", {}, timestamp=stale)))
    with pytest.raises(SignatureInvalid, match="signature is not valid base64"):
        c.verify(as_request(dialect.webhook("https://x", {}, signature="forged")))


def test_dialect_flags_what_telnyx_would_reject() -> None:
    dialect = TelnyxDialect(credentials={}, from_="+1", to="+2")
    assert dialect.parse('{"event":"media","media":{"payload":"' + base64.b64encode(bytes(160)).decode() + '"}}')[0] \
        .kind == "invalid"  # before the answer: bidirectionalMode defaults to mp3
    dialect.answer(200, carrier().answer(CALL_INFO, WSS, {})[0])
    good = '{"event":"media","media":{"payload":"' + base64.b64encode(b"\xff" * 160).decode() + '"}}'
    assert dialect.parse(good) == [Inbound("media", pcm=bytes(320))]
    with_id = good.replace('{"event"', '{"stream_id":"' + dialect.stream_id + '","event"')
    assert dialect.parse(with_id)[0].kind == "media"
    for bad in [b"\x00", "nope", '{"event":"media"}', '{"event":"play"}',
                good.replace('{"event"', '{"streamSid":"x","event"'),
                good.replace('{"event"', '{"stream_id":"other","event"'),
                '{"event":"media","media":{"payload":"' + base64.b64encode(b"\xff" * 80).decode() + '"}}',
                '{"event":"media","media":{"payload":"!!"}}',
                '{"event":"media","media":{"payload":"AA==","track":"outbound"}}',
                '{"event":"mark","mark":{}}', '{"event":"mark","mark":{"name":"a"},"x":1}',
                '{"event":"clear","mark":{}}']:
        [item] = dialect.parse(bad)
        assert item.kind == "invalid", bad


def test_dialect_answer_needs_texml() -> None:
    dialect = TelnyxDialect(credentials={}, from_="+1", to="+2")
    with pytest.raises(AssertionError, match="TeXML flow"):
        dialect.answer(200, "{}")
    with pytest.raises(AssertionError, match="no <Connect><Stream>"):
        dialect.answer(200, "<Response><Hangup/></Response>")


# ------------------------------------------------------------------------------------ through the gateway

@pytest.mark.asyncio
async def test_emulated_telnyx_call_through_the_gateway() -> None:
    """The dialect against a real gateway configured by ``carriers.telnyx``: Ed25519-signed TeXML webhook,
    <Connect><Stream> answer, connected + start, speech, marks, barge-in (clear), TeXML REST hang-up."""
    from gateway.simulate.call import SimulatedCall
    from tests.conftest import PUBLIC_URL, phone_config, running_gateway
    from tests.fakes.openai_server import FakeOpenAI
    from tests.speech import speech_pcm

    speech = speech_pcm("I would like to book a table for two people tonight.", 8000)
    long_reply = "Let me tell you about tonight's menu. " + "We have fresh pasta with basil and lemon. " * 6
    async with (FakeOpenAI(transcripts=["book a table", "what is on the menu", "stop"],
                           replies=["Sure. For what time?", long_reply], tts_ms_per_char=20) as fake,
                FakeTelnyxREST(API_KEY, account_sid=ACCOUNT) as telnyx):
        settings = {"api_key": API_KEY, "public_key": PUBLIC_KEY, "account_sid": ACCOUNT,
                    "api_base_url": telnyx.base_url, "stream_auth_token": "tok-e2e"}
        async with running_gateway(phone_config(fake.base_url, "http://127.0.0.1:9",
                                                carriers={"telnyx": settings})) as url:
            call = SimulatedCall(gateway=url, public_url=PUBLIC_URL, carrier="telnyx",
                                 credentials={"signing_key": SEED_B64, "account_sid": ACCOUNT,
                                              "stream_auth_token": "tok-e2e"})
            telnyx.known_calls = {call.call_sid}
            answer = await call.dial()
            assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/xml")
            assert call.parameters["session_id"] == call.session_id and "persona" in call.parameters
            await call.connect()
            await call.wait_audio(after=0, timeout=5)                  # the greeting
            await call.wait_quiet(400)
            end = await call.speak(speech)
            await call.wait_audio(after=end, timeout=5)
            await call.wait_quiet(400)
            assert call.received.marks                                 # marks were echoed after playback
            end = await call.speak(speech)
            await call.wait_audio(after=end, timeout=5)
            await asyncio.sleep(1.0)
            assert call.playing()
            barge = asyncio.create_task(call.speak(speech))            # barge-in: clear
            await call.wait_clear(timeout=3)
            await barge
            fake.state.fail["llm"] = "500"                             # the apology, then a REST hang-up
            await call.wait_closed(timeout=15)
            assert telnyx.ended_calls == [call.call_sid]
            assert telnyx.requests[-1].path == f"/v2/texml/Accounts/{ACCOUNT}/Calls/{call.call_sid}"
            assert telnyx.requests[-1].body == {"Status": "completed"}
            assert call.received.invalid == []
            await call.close()


@pytest.mark.asyncio
async def test_gateway_refuses_a_forged_webhook_and_a_wrong_stream_token() -> None:
    from gateway.simulate.call import SimulatedCall
    from tests.conftest import PUBLIC_URL, phone_config, running_gateway
    from tests.fakes.openai_server import FakeOpenAI

    async with FakeOpenAI() as fake, FakeTelnyxREST(API_KEY, account_sid=ACCOUNT) as telnyx:
        settings = {"api_key": API_KEY, "public_key": PUBLIC_KEY, "account_sid": ACCOUNT,
                    "api_base_url": telnyx.base_url, "stream_auth_token": "tok-e2e"}
        async with running_gateway(phone_config(fake.base_url, "http://127.0.0.1:9",
                                                carriers={"telnyx": settings})) as url:
            forged = SimulatedCall(gateway=url, public_url=PUBLIC_URL, carrier="telnyx", credentials={})
            assert (await forged.dial()).status_code == 403                     # signed with another key
            call = SimulatedCall(gateway=url, public_url=PUBLIC_URL, carrier="telnyx",
                                 credentials={"signing_key": SEED_B64, "stream_auth_token": "tok-wrong"})
            assert (await call.dial()).status_code == 200
            await call.connect()
            await call.wait_closed(timeout=5)
            assert (call.close_code, call.close_reason) == (1008, "media socket authentication failed")
            await call.close()


@pytest.mark.asyncio
async def test_call_control_flow_through_the_gateway() -> None:
    """flow=call_control: the signed call.initiated JSON is answered 200 "{}", the REST answer carries the
    stream URL, and the media socket then works like the TeXML one; the hang-up is actions/hangup."""
    from gateway.simulate.call import SimulatedCall
    from tests.conftest import PUBLIC_URL, phone_config, running_gateway
    from tests.fakes.openai_server import FakeOpenAI

    async with (FakeOpenAI(transcripts=["stop"], replies=["Bye."]) as fake,
                FakeTelnyxREST(API_KEY) as telnyx):
        settings = {"api_key": API_KEY, "public_key": PUBLIC_KEY, "api_base_url": telnyx.base_url,
                    "flow": "call_control"}
        async with running_gateway(phone_config(fake.base_url, "http://127.0.0.1:9",
                                                carriers={"telnyx": settings})) as url:
            call = SimulatedCall(gateway=url, public_url=PUBLIC_URL, carrier="telnyx",
                                 credentials={"signing_key": SEED_B64})
            body = BODY.replace(b"v3:abc123", call.call_sid.encode())
            telnyx.calls = {call.call_sid: "parked"}
            stamp = str(int(time.time()))
            async with httpx.AsyncClient() as http:
                response = await http.post(url + "/start/telnyx", content=body, headers={
                    "content-type": "application/json", "telnyx-timestamp": stamp,
                    "telnyx-signature-ed25519": call.dialect.sign(stamp, body)})
            assert (response.status_code, response.text) == (200, "{}")
            async with asyncio.timeout(5):
                while not telnyx.answered:
                    await asyncio.sleep(0.02)
            [(answered_id, options)] = telnyx.answered
            assert answered_id == call.call_sid and options["stream_bidirectional_mode"] == "rtp"
            stream_url = options["stream_url"]
            assert stream_url.startswith(f"wss://{PUBLIC_URL.split('://')[1]}/media/telnyx/")
            call.dialect.answer(200, carrier(stream_parameters="none").answer(CALL_INFO, stream_url, {})[0])
            await call.connect(url=url.replace("http://", "ws://") + urlsplit(stream_url).path)
            await call.wait_audio(after=0, timeout=5)                  # the greeting
            async with httpx.AsyncClient() as http:                    # the API ends the call: REST hang-up
                ended = await http.delete(url + "/sessions/" + urlsplit(stream_url).path.rsplit("/", 1)[1])
            assert ended.status_code in (200, 204), ended.text
            await call.wait_closed(timeout=5)
            assert telnyx.ended_calls == [call.call_sid]
            assert telnyx.requests[-1].path == f"/v2/calls/{call.call_sid}/actions/hangup"
            assert call.received.invalid == []
            await call.close()


def test_other_call_control_events_are_acknowledged_not_rejected() -> None:
    from carriers.base import WebhookIgnored

    request = WebhookRequest("POST", "https://x/start/telnyx", {"content-type": "application/json"},
                             BODY.replace(b"call.initiated", b"call.answered"))
    with pytest.raises(WebhookIgnored, match="telnyx call.answered event acknowledged"):
        carrier(flow="call_control").parse_call(request)
