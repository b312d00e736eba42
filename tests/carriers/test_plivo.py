"""Tests for carriers/plivo.py against the §9.5 vectors of docs/carriers.md, a fake REST API and the
emulator dialect (gateway/simulate/dialects/plivo.py)."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import struct
import xml.etree.ElementTree as ET
from typing import Any
from urllib.parse import parse_qsl, urlencode

import httpx
import pytest

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
from carriers.plivo import (
    PlivoCarrier,
    PlivoMediaStream,
    decode_extra_headers,
    encode_extra_headers,
    signature_string,
    signature_v3,
)
from gateway.simulate.dialects import dialect_for
from gateway.simulate.dialects.base import Inbound
from gateway.simulate.dialects.plivo import PlivoDialect
from pipeline.frames import AudioFrame, Clear, Dtmf, Mark, MarkPlayed, StreamStarted, StreamStopped
from tests.carriers.busy_vectors import HOSTILE, check_xml_busy
from tests.fakes.plivo_rest import FakePlivoREST

TOKEN = "MY_PLIVO_AUTH_TOKEN"
NONCE = "05429567804466091622"
DOC_PARAMS = [
    ("CallUUID", "c9527676-5232-11e1-9e3e-1d8e8ba9c6d6"),
    ("From", "14155550100"),
    ("To", "14155550199"),
    ("Direction", "inbound"),
    ("CallStatus", "ringing"),
    ("Event", "StartApp"),
]
ANSWER = "https://example.com/plivo/answer"
SIG_POST = "7lXZaAkQlazqHEPc32RtpWJoXRju2uMhyCB9s/rsWOY="
SIG_POST_QUERY = "G5hv1PWbtUfSKinLR5CpRh0w5V/WPnEg5pD9IpPLKEY="
SIG_GET = "HEJDqCMCvdf8vHv3JrJRZ3vcQO0TY/ndATVELOMhgDQ="
SIGNED_PARAMS = "CallStatusringingCallUUIDc9527676-5232-11e1-9e3e-1d8e8ba9c6d6DirectioninboundEventStartApp" \
                "From14155550100To14155550199"
GET_QUERY = "CallStatus=ringing&CallUUID=c9527676-5232-11e1-9e3e-1d8e8ba9c6d6&Direction=inbound&Event=StartApp" \
            "&From=14155550100&To=14155550199"

AUTH_ID = "MAXXXXXXXXXXXXXXXXXX"
CALL = "12345678-1234-1234-1234-123456789abc"
STREAM = "87654321-4321-4321-4321-cba987654321"
TONE8_PCM = [0, 5657, 8000, 5657, 0, -5657, -8000, -5657]
TONE8_ROUND_TRIP = [0, 5628, 7932, 5628, 0, -5628, -7932, -5628]
TONE8_LE = "AAAZFkAfGRYAAOfpwODn6Q=="
TONE8_BE = "AAAWGR9AFhkAAOnn4MDp5w=="

START = json.dumps({
    "event": "start", "sequenceNumber": 1,
    "start": {"callId": CALL, "streamId": STREAM, "accountId": AUTH_ID, "tracks": ["inbound"],
              "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000}},
    "extra_headers": "sessionId=3f9c1e,agent=sales",
})
MEDIA = json.dumps({
    "event": "media", "sequenceNumber": 42, "streamId": STREAM,
    "media": {"track": "inbound", "timestamp": "1705312200000", "chunk": 41, "payload": "/6mgqf8pICk="},
    "extra_headers": "sessionId=3f9c1e,agent=sales",
})
DTMF = json.dumps({"event": "dtmf", "streamId": STREAM, "dtmf": {"digit": "5"},
                   "extra_headers": "sessionId=3f9c1e,agent=sales"})
PLAYED = json.dumps({"event": "playedStream", "streamId": STREAM, "name": "utt-7"})
CLEARED = json.dumps({"event": "clearedAudio", "sequenceNumber": 0, "streamId": STREAM})
FORM = {"content-type": "application/x-www-form-urlencoded"}


def pcm(samples: list[int]) -> bytes:
    return struct.pack(f"<{len(samples)}h", *samples)


def carrier(http: httpx.AsyncClient | None = None, **kwargs: Any) -> PlivoCarrier:
    kwargs.setdefault("auth_id", AUTH_ID)
    kwargs.setdefault("auth_token", TOKEN)
    return PlivoCarrier(http=http or httpx.AsyncClient(), **kwargs)


def post(url: str, form: list[tuple[str, str]], signature: str | None = None, nonce: str | None = NONCE,
         **headers: str) -> WebhookRequest:
    hdrs = dict(FORM)
    if signature is not None:
        hdrs["x-plivo-signature-v3"] = signature
    if nonce is not None:
        hdrs["x-plivo-signature-v3-nonce"] = nonce
    hdrs.update(headers)
    return WebhookRequest(method="POST", url=url, headers=hdrs, body=urlencode(form).encode(), form=tuple(form))


def started_stream(**kwargs: Any) -> PlivoMediaStream:
    stream = carrier(**kwargs).open_stream()
    stream.decode(START if not kwargs.get("content_type") else start_message(kwargs["content_type"]))
    return stream


def start_message(content_type: str) -> str:
    encoding, _, rate = content_type.partition(";rate=")
    message = json.loads(START)
    message["start"]["mediaFormat"] = {"encoding": encoding, "sampleRate": int(rate)}
    return json.dumps(message)


# ------------------------------------------------------------------------------------ signatures

def test_v3_signature_strings_match_the_doc() -> None:
    params = {k: [v] for k, v in DOC_PARAMS}
    assert signature_string("POST", ANSWER, params) == f"{ANSWER}?{SIGNED_PARAMS}"
    assert signature_string("POST", ANSWER + "?agent=sales", params) == f"{ANSWER}?agent=sales.{SIGNED_PARAMS}"
    assert signature_string("GET", f"{ANSWER}?{GET_QUERY}", {}) == f"{ANSWER}?{GET_QUERY}"
    # docs/carriers.md §9.5 edge cases: the "." only when there are POST params; GET merges and sorts
    assert signature_string("POST", "https://example.com/a?x=1", {}) == "https://example.com/a?x=1"
    assert signature_string("POST", "https://example.com/a", {}) == "https://example.com/a"
    assert signature_string("GET", "https://example.com/a?z=2&a=1", {"b": ["3"]}) == "https://example.com/a?a=1&b=3&z=2"
    assert signature_string("POST", "https://example.com/a", {"b": ["2", "1"]}) == "https://example.com/a?b1b2"


@pytest.mark.parametrize(
    ("request_", "signature"),
    [
        pytest.param(lambda: post(ANSWER, DOC_PARAMS, SIG_POST), SIG_POST, id="post"),
        pytest.param(lambda: post(ANSWER + "?agent=sales", DOC_PARAMS, SIG_POST_QUERY), SIG_POST_QUERY,
                     id="post-with-query"),
        pytest.param(lambda: WebhookRequest("GET", f"{ANSWER}?{GET_QUERY}", {
            "x-plivo-signature-v3": SIG_GET, "x-plivo-signature-v3-nonce": NONCE}, b""), SIG_GET, id="get"),
        pytest.param(lambda: post(ANSWER, DOC_PARAMS, "AAAA," + SIG_POST), SIG_POST, id="multi-value-header"),
        pytest.param(lambda: post(ANSWER, DOC_PARAMS, SIG_POST + ",AAAA"), SIG_POST, id="multi-value-last"),
    ],
)
def test_v3_vectors_verify(request_: Any, signature: str) -> None:
    carrier().verify(request_())


def test_v3_vectors_computed() -> None:
    params = {k: [v] for k, v in DOC_PARAMS}
    assert signature_v3(TOKEN, "POST", ANSWER, params, NONCE) == SIG_POST
    assert signature_v3(TOKEN, "POST", ANSWER + "?agent=sales", params, NONCE) == SIG_POST_QUERY
    assert signature_v3(TOKEN, "GET", f"{ANSWER}?{GET_QUERY}", {}, NONCE) == SIG_GET


def test_form_parsed_from_body_when_gateway_gave_none() -> None:
    body = urlencode(DOC_PARAMS).encode()
    headers = {**FORM, "x-plivo-signature-v3": SIG_POST, "x-plivo-signature-v3-nonce": NONCE}
    request = WebhookRequest("POST", ANSWER, headers, body)
    c = carrier()
    c.verify(request)
    assert c.parse_call(request).call_id == "c9527676-5232-11e1-9e3e-1d8e8ba9c6d6"


def test_ma_v3_signed_with_the_main_account_token() -> None:
    sub = carrier(auth_token="subaccount-token", main_auth_token=TOKEN)
    sub.verify(post(ANSWER, DOC_PARAMS, None, **{"x-plivo-signature-ma-v3": SIG_POST}))
    # a wrong V3 value does not stop a valid Ma-V3 one
    sub.verify(post(ANSWER, DOC_PARAMS, "AAAA", nonce="1" + NONCE[1:],
                    **{"x-plivo-signature-ma-v3": signature_v3(TOKEN, "POST", ANSWER,
                                                               {k: [v] for k, v in DOC_PARAMS}, "1" + NONCE[1:])}))
    # Ma-V3 is not checked against the subaccount token, nor V3 against the main one
    with pytest.raises(SignatureInvalid, match=r"^plivo: signature does not match$"):
        carrier(main_auth_token="other-main").verify(post(ANSWER, DOC_PARAMS, None,
                                                          **{"x-plivo-signature-ma-v3": SIG_POST}))
    with pytest.raises(SignatureInvalid, match=r"^plivo: signature does not match$"):
        carrier(auth_token="subaccount-token", main_auth_token=TOKEN).verify(post(ANSWER, DOC_PARAMS, SIG_POST))


def test_ma_v3_defaults_to_the_auth_token() -> None:
    carrier().verify(post(ANSWER, DOC_PARAMS, None, **{"x-plivo-signature-ma-v3": SIG_POST}))


@pytest.mark.parametrize(
    ("url", "form", "signature", "nonce", "reason"),
    [
        (ANSWER, DOC_PARAMS, None, NONCE, "missing X-Plivo-Signature-V3 header"),
        (ANSWER, DOC_PARAMS, "", NONCE, "missing X-Plivo-Signature-V3 header"),
        (ANSWER, DOC_PARAMS, SIG_POST, None, "missing X-Plivo-Signature-V3-Nonce header"),
        (ANSWER, DOC_PARAMS, SIG_POST, "", "missing X-Plivo-Signature-V3-Nonce header"),
        (ANSWER, DOC_PARAMS, SIG_POST, "05429567804466091623", "signature does not match"),
        (ANSWER, DOC_PARAMS, "8" + SIG_POST[1:], NONCE, "signature does not match"),
        (ANSWER, DOC_PARAMS, "AAAA, " + SIG_POST, NONCE, "signature does not match"),  # no trimming
        (ANSWER, [*DOC_PARAMS[:-1], ("Event", "Hangup")], SIG_POST, NONCE, "signature does not match"),
        (ANSWER, [*DOC_PARAMS, ("Extra", "x")], SIG_POST, NONCE, "signature does not match"),
        (ANSWER, DOC_PARAMS[1:], SIG_POST, NONCE, "signature does not match"),
        (ANSWER.replace("https", "http"), DOC_PARAMS, SIG_POST, NONCE, "signature does not match"),
        (ANSWER.replace("example.com", "example.com:443"), DOC_PARAMS, SIG_POST, NONCE, "signature does not match"),
        (ANSWER + "?agent=other", DOC_PARAMS, SIG_POST_QUERY, NONCE, "signature does not match"),
        (ANSWER, DOC_PARAMS, SIG_POST_QUERY, NONCE, "signature does not match"),
    ],
)
def test_forged_or_missing_signature(url: str, form: list[tuple[str, str]], signature: str | None,
                                     nonce: str | None, reason: str) -> None:
    with pytest.raises(SignatureInvalid, match=f"^plivo: {reason}$"):
        carrier().verify(post(url, form, signature, nonce))


def test_wrong_auth_token_rejected() -> None:
    with pytest.raises(SignatureInvalid, match=r"^plivo: signature does not match$"):
        carrier(auth_token="NOT_MY_TOKEN").verify(post(ANSWER, DOC_PARAMS, SIG_POST))


def test_get_signature_covers_the_query() -> None:
    tampered = f"{ANSWER}?{GET_QUERY.replace('ringing', 'completed')}"
    with pytest.raises(SignatureInvalid, match="signature does not match"):
        carrier().verify(WebhookRequest("GET", tampered, {"x-plivo-signature-v3": SIG_GET,
                                                          "x-plivo-signature-v3-nonce": NONCE}, b""))


def test_other_methods_cannot_be_verified() -> None:
    with pytest.raises(SignatureInvalid, match=r"^plivo: cannot verify a PUT request$"):
        carrier().verify(WebhookRequest("PUT", ANSWER, {"x-plivo-signature-v3": SIG_POST,
                                                        "x-plivo-signature-v3-nonce": NONCE}, b""))


def test_replayed_request_rejected() -> None:
    c = carrier()
    c.verify(post(ANSWER, DOC_PARAMS, SIG_POST))
    with pytest.raises(SignatureInvalid, match=r"^plivo: replayed request \(nonce already used for this request\)$"):
        c.verify(post(ANSWER, DOC_PARAMS, SIG_POST))
    with pytest.raises(SignatureInvalid, match="replayed"):  # the same signature in a multi-value header
        c.verify(post(ANSWER, DOC_PARAMS, "AAAA," + SIG_POST))
    with pytest.raises(SignatureInvalid, match="replayed"):  # replayed with only the Ma-V3 header
        c.verify(post(ANSWER, DOC_PARAMS, None, **{"x-plivo-signature-ma-v3": SIG_POST}))
    # another carrier instance (another process) has its own memory
    carrier().verify(post(ANSWER, DOC_PARAMS, SIG_POST))


def test_forged_requests_do_not_poison_the_replay_cache() -> None:
    c = carrier()
    with pytest.raises(SignatureInvalid, match="does not match"):
        c.verify(post(ANSWER, [*DOC_PARAMS, ("Extra", "x")], SIG_POST))
    c.verify(post(ANSWER, DOC_PARAMS, SIG_POST))


def test_replay_cache_is_bounded() -> None:
    c = carrier(replay_cache_size=2)
    params = {k: [v] for k, v in DOC_PARAMS}
    for nonce in ("1", "2", "3"):
        c.verify(post(ANSWER, DOC_PARAMS, signature_v3(TOKEN, "POST", ANSWER, params, nonce), nonce))
    assert len(c._seen) == 2
    c.verify(post(ANSWER, DOC_PARAMS, signature_v3(TOKEN, "POST", ANSWER, params, "1"), "1"))  # forgotten


def test_stale_requests_cannot_be_detected_only_replays() -> None:
    # Plivo's V3 signature carries no timestamp: an old, never-seen request still verifies.
    carrier().verify(post(ANSWER, DOC_PARAMS, SIG_POST))


def v2_request(url: str, signature: str, nonce: str) -> WebhookRequest:
    return WebhookRequest("POST", url, {**FORM, "x-plivo-signature-v2": signature,
                                        "x-plivo-signature-v2-nonce": nonce}, b"")


@pytest.mark.parametrize(
    ("url", "nonce", "signature"),
    [
        ("https://answer.url", "12345", "ehV3IKhLysWBxC1sy8INm0qGoQYdYsHwuoKjsX7FsXc="),
        ("https://answer.url:8000", "24725744043720739450", "LDphWoWimP4QM5AoWI1uwP6WmlWtt5ITPZjXIWYvCNU="),
    ],
)
def test_v2_vectors(url: str, nonce: str, signature: str) -> None:
    carrier(auth_token="my_auth_token", accept_v2_signatures=True).verify(v2_request(url, signature, nonce))
    with pytest.raises(SignatureInvalid, match=r"^plivo: signature does not match$"):
        carrier(auth_token="my_auth_tokens", accept_v2_signatures=True).verify(v2_request(url, signature, nonce))
    with pytest.raises(SignatureInvalid, match=r"^plivo: missing X-Plivo-Signature-V3 header$"):
        carrier(auth_token="my_auth_token").verify(v2_request(url, signature, nonce))  # V2 off by default


def test_v2_needs_its_nonce() -> None:
    with pytest.raises(SignatureInvalid, match=r"^plivo: missing X-Plivo-Signature-V2-Nonce header$"):
        carrier(accept_v2_signatures=True).verify(v2_request("https://answer.url", "x", ""))


def test_verification_disabled() -> None:
    carrier(verify_signatures=False).verify(post(ANSWER, DOC_PARAMS, None, None))


SDK_CASES = [
    ("POST", "https://gw.example.com/start/plivo", [("b", "2"), ("a", "x y"), ("a", "1"), ("empty", "")]),
    ("POST", "https://gw.example.com:8443/start/plivo?session=a%20b&z=1", [("CallUUID", "u"), ("From", "+1")]),
    ("POST", "https://gw.example.com/start/plivo?session=x", []),
    ("POST", "https://gw.example.com/start/plivo", []),
    ("GET", "https://gw.example.com/start/plivo?b=2&a=1&a=0&c=%2B1", []),
    ("POST", "https://gw.example.com/start/plivo", [("Name", "Zoë ☎"), ("X-PH-Agent", "a&b=c")]),
]


@pytest.mark.parametrize(("method", "url", "form"), SDK_CASES)
def test_signature_agrees_with_plivo_sdk(method: str, url: str, form: list[tuple[str, str]]) -> None:
    signature_v3_module = pytest.importorskip("plivo.utils.signature_v3")
    params: dict[str, list[str]] = {}
    for key, value in form:
        params.setdefault(key, []).append(value)
    sdk_params: dict[str, Any] = {k: v if len(v) > 1 else v[0] for k, v in params.items()}
    ours = signature_v3("tok", method, url, params, "987")
    assert signature_v3_module.validate_v3_signature(method, url, "987", "tok", ours, dict(sdk_params))
    if method == "POST":
        assert signature_v3_module.construct_post_url(url, dict(sdk_params)).decode() == signature_string(
            method, url, params)
        carrier(auth_token="tok").verify(post(url, form, ours, "987"))
    else:
        carrier(auth_token="tok").verify(WebhookRequest("GET", url, {"x-plivo-signature-v3": ours,
                                                                     "x-plivo-signature-v3-nonce": "987"}, b""))


# ------------------------------------------------------------------------------------ parse_call

def test_parse_call_from_form() -> None:
    form = [("CallUUID", CALL), ("From", "14155550100"), ("To", "14155550199"), ("Direction", "inbound"),
            ("CallStatus", "ringing"), ("Event", "StartApp"), ("X-PH-Agent", "sales"), ("CallerName", "Bob")]
    assert carrier().parse_call(post(ANSWER, form)) == CallInfo(
        carrier="plivo", call_id=CALL, from_="+14155550100", to="+14155550199", account_id=AUTH_ID,
        direction="inbound", custom={"Agent": "sales"},
    )


def test_parse_call_keeps_sip_and_plus_numbers() -> None:
    form = [("CallUUID", CALL), ("From", "sip:alice@phone.plivo.com"), ("To", "+14155550199"),
            ("Direction", "outbound"), ("RequestUUID", "req-1")]
    call = carrier().parse_call(post(ANSWER, form))
    assert (call.from_, call.to, call.direction) == ("sip:alice@phone.plivo.com", "+14155550199", "outbound")
    assert call.custom == {"request_uuid": "req-1"}  # what dial() returned, for matching the session


def test_parse_call_get() -> None:
    request = WebhookRequest("GET", f"{ANSWER}?CallUUID={CALL}&From=14155550100&To=1555", {}, b"")
    call = carrier().parse_call(request)
    assert (call.call_id, call.from_, call.to) == (CALL, "+14155550100", "1555")


@pytest.mark.parametrize("form", [[], [("From", "1")], [("CallUUID", "")], [("CallSid", "CA1")]])
def test_parse_call_without_call_uuid(form: list[tuple[str, str]]) -> None:
    with pytest.raises(CarrierProtocolError, match="^plivo webhook has no CallUUID$"):
        carrier().parse_call(post(ANSWER, form))


def test_parse_call_ignores_json_bodies() -> None:
    request = WebhookRequest("POST", ANSWER, {"content-type": "application/json"}, b'{"CallUUID": "forged"}')
    with pytest.raises(CarrierProtocolError, match="no CallUUID"):
        carrier().parse_call(request)


# ------------------------------------------------------------------------------------ answer XML

CALL_INFO = CallInfo(carrier="plivo", call_id=CALL, from_="+14155550100")
WSS = "wss://gw.example.com/ws/plivo/3f9c1e"


def stream_element(body: str) -> ET.Element:
    root = ET.fromstring(body.encode())
    assert root.tag == "Response" and len(root) == 1
    return root[0]


def test_answer_matches_the_documented_xml() -> None:
    body, media_type = carrier(stream_status_url="https://gw.example.com/plivo/stream-status").answer(
        CALL_INFO, WSS, {"sessionId": "3f9c1e", "agent": "sales"})
    assert media_type == "application/xml"
    assert body.startswith('<?xml version="1.0" encoding="UTF-8"?><Response><Stream ')
    documented = ET.fromstring(b"""<?xml version="1.0" encoding="UTF-8"?>
        <Response>
          <Stream bidirectional="true" keepCallAlive="true"
                  contentType="audio/x-mulaw;rate=8000"
                  streamTimeout="86400"
                  statusCallbackUrl="https://gw.example.com/plivo/stream-status"
                  statusCallbackMethod="POST"
                  extraHeaders="sessionId=3f9c1e,agent=sales">wss://gw.example.com/ws/plivo/3f9c1e</Stream>
        </Response>""")[0]
    stream = stream_element(body)
    assert stream.tag == "Stream" and stream.text == documented.text == WSS
    assert stream.attrib == {**documented.attrib, "audioTrack": "inbound"}
    assert len(stream) == 0


def test_answer_fields() -> None:
    body, _ = carrier().answer(CALL_INFO, WSS, {"session_id": "3f9c1e", "persona": "front-desk"})
    stream = stream_element(body)
    assert stream.attrib == {
        "bidirectional": "true", "audioTrack": "inbound", "keepCallAlive": "true",
        "contentType": "audio/x-mulaw;rate=8000", "streamTimeout": "86400",
        "extraHeaders": "sessionZ5Fid=3f9c1e,persona=frontZ2Ddesk",
    }
    assert decode_extra_headers(stream.attrib["extraHeaders"]) == {"session_id": "3f9c1e", "persona": "front-desk"}


def test_busy_speaks_the_text_and_hangs_up() -> None:
    check_xml_busy(carrier().busy, "Speak", "application/xml")


def test_busy_matches_the_plivo_sdk() -> None:
    plivoxml = pytest.importorskip("plivo").plivoxml
    response = plivoxml.ResponseElement()
    response.add(plivoxml.SpeakElement(HOSTILE))
    response.add(plivoxml.HangupElement())
    sdk = ET.fromstring(response.to_string(False).encode())
    ours = ET.fromstring(carrier().busy(CALL_INFO, HOSTILE)[0].encode())
    assert [(e.tag, e.text) for e in ours] == [(e.tag, e.text) for e in sdk]


def test_answer_matches_the_plivo_sdk() -> None:
    plivoxml = pytest.importorskip("plivo").plivoxml
    body, _ = carrier().answer(CALL_INFO, WSS, {"sessionId": "3f9c1e"})
    response = plivoxml.ResponseElement()
    response.add(plivoxml.StreamElement(WSS, bidirectional=True, audioTrack="inbound", keepCallAlive=True,
                                        contentType="audio/x-mulaw;rate=8000", streamTimeout=86400,
                                        extraHeaders="sessionId=3f9c1e"))
    sdk = ET.fromstring(response.to_string(False).encode())
    ours = ET.fromstring(body.encode())
    assert (ours.tag, ours[0].tag, ours[0].text, ours[0].attrib) == (sdk.tag, sdk[0].tag, sdk[0].text, sdk[0].attrib)


@pytest.mark.parametrize(("content_type", "attr"), [
    ("audio/x-l16;rate=8000", "audio/x-l16;rate=8000"), ("audio/x-l16;rate=16000", "audio/x-l16;rate=16000")])
def test_answer_content_type_switch(content_type: str, attr: str) -> None:
    body, _ = carrier(content_type=content_type, stream_timeout=600).answer(CALL_INFO, WSS, {})
    stream = stream_element(body)
    assert (stream.attrib["contentType"], stream.attrib["streamTimeout"]) == (attr, "600")
    assert "extraHeaders" not in stream.attrib


def test_answer_escapes_hostile_values() -> None:
    url = "wss://gw.example.com/ws/plivo/x?a=1&b=<2>\"'"
    params = {'n"<&>': '"/><Hangup/><Stream x="', "tabs": "a\tb\nc\r", "dollar": "$stream_url ${x}",
              "sep": "a=b,c;d", "Zed": "Zürich Z5F"}
    c = carrier(stream_status_url='https://gw.example.com/s?a=1&b="2"')
    body, _ = c.answer(CALL_INFO, url, params)
    root = ET.fromstring(body.encode())
    stream = root[0]
    assert stream.text == url
    assert stream.attrib["statusCallbackUrl"] == 'https://gw.example.com/s?a=1&b="2"'
    assert root.find(".//Hangup") is None and len(root) == 1 and len(stream) == 0
    extra = stream.attrib["extraHeaders"]
    assert all(c.isascii() and (c.isalnum() or c in "=,") for c in extra)
    assert decode_extra_headers(extra) == params


def test_answer_allows_query_strings_but_not_other_schemes() -> None:
    body, _ = carrier().answer(CALL_INFO, WSS + "?token=1", {})
    assert stream_element(body).text == WSS + "?token=1"  # Plivo keeps query strings
    for url in ("https://gw.example.com/ws", "ws://gw.example.com/ws", "/ws/plivo/x"):
        with pytest.raises(ValueError, match="wss://"):
            carrier().answer(CALL_INFO, url, {})


def test_answer_rejects_xml_invalid_characters_and_oversized_headers() -> None:
    with pytest.raises(ValueError, match="XML"):
        carrier().answer(CALL_INFO, WSS + "\x07", {})
    with pytest.raises(ValueError, match="512"):
        carrier().answer(CALL_INFO, WSS, {"k": "v" * 511})
    carrier().answer(CALL_INFO, WSS, {"k": "v" * 510})  # exactly 512 bytes
    with pytest.raises(ValueError, match="512"):
        carrier().answer(CALL_INFO, WSS, {"k": "_" * 200})  # 600 bytes once escaped


def test_answer_without_escaping_accepts_only_alphanumerics() -> None:
    c = carrier(escape_extra_headers=False)
    body, _ = c.answer(CALL_INFO, WSS, {"sessionId": "3f9c1e"})
    assert stream_element(body).attrib["extraHeaders"] == "sessionId=3f9c1e"
    with pytest.raises(ValueError, match=r"\[A-Za-z0-9\]"):
        c.answer(CALL_INFO, WSS, {"session_id": "3f9c1e"})


def test_extra_headers_codec() -> None:
    assert encode_extra_headers({}) == ""
    assert encode_extra_headers({"a": "", "b": "Z"}) == "a=,b=Z5A"
    assert decode_extra_headers("sessionId=3f9c1e,agent=sales") == {"sessionId": "3f9c1e", "agent": "sales"}
    assert decode_extra_headers("userId=12345;sessionId=abc-xyz") == {"userId": "12345", "sessionId": "abc-xyz"}
    assert decode_extra_headers(" a=1 ;; novalue ,a=2,=x,b=ZZ9,c=Z3") == {"a": "1", "b": "ZZ9", "c": "Z3"}
    with pytest.raises(ValueError, match="strings"):
        encode_extra_headers({"a": 1})  # type: ignore[dict-item]  # a wrong type on purpose
    with pytest.raises(ValueError, match="empty"):
        encode_extra_headers({"": "x"})


def test_transfer_markup() -> None:
    c = carrier()
    body, media_type = c.transfer_markup("+14155550100")
    assert media_type == "application/xml"
    root = ET.fromstring(body.encode())
    assert (root.tag, root[0].tag, root[0][0].tag, root[0][0].text) == ("Response", "Dial", "Number", "+14155550100")
    root = ET.fromstring(c.transfer_markup("sip:agent@example.com;transport=tls")[0].encode())
    assert (root[0][0].tag, root[0][0].text) == ("User", "sip:agent@example.com;transport=tls")
    for bad in ("14155550100", "+1", "sip:", "sip:a<b>@x", "tel:+14155550100", "+14155550100</Number>"):
        with pytest.raises(ValueError, match="E.164"):
            c.transfer_markup(bad)


def test_constructor_validates_switches() -> None:
    with pytest.raises(ValueError, match="content_type"):
        carrier(content_type="audio/x-alaw;rate=8000")
    with pytest.raises(ValueError, match="l16_byte_order"):
        carrier(l16_byte_order="middle")
    with pytest.raises(ValueError, match="machine_detection_time_ms"):
        carrier(machine_detection_time_ms=500)
    assert "MY_PLIVO_AUTH_TOKEN" not in repr(carrier())


# ------------------------------------------------------------------------------------ media stream

def test_decode_documented_session() -> None:
    stream = carrier().open_stream()
    assert (stream.sample_rate, stream.frame_ms, stream.marks, stream.started) == (8000, 20, True, False)
    assert stream.decode(START) == [StreamStarted(
        stream_id=STREAM, call_id=CALL, account_id=AUTH_ID,
        custom_parameters={"sessionId": "3f9c1e", "agent": "sales"}, sample_rate=8000, encoding="audio/x-mulaw")]
    assert stream.started and stream.stream_id == STREAM and stream.call_id == CALL
    assert stream.decode(MEDIA) == [AudioFrame(pcm(TONE8_ROUND_TRIP), 8000)]
    assert stream.decode(DTMF) == [Dtmf("5")]
    assert stream.decode(PLAYED) == [MarkPlayed("utt-7")]
    assert stream.decode(CLEARED) == []


def test_decode_accepts_the_documented_variants() -> None:
    stream = started_stream()
    assert stream.decode(json.dumps({"event": "playedStream", "name": "utt-8"})) == [MarkPlayed("utt-8")]
    assert stream.decode(json.dumps({"event": "played", "streamId": STREAM, "name": "n"})) == [MarkPlayed("n")]
    media = json.loads(MEDIA)
    media["sequenceNumber"], media["media"]["chunk"] = "43", "42"  # strings tolerated too
    del media["streamId"]
    assert stream.decode(json.dumps(media)) == [AudioFrame(pcm(TONE8_ROUND_TRIP), 8000)]
    media["media"]["track"] = "outbound"
    assert stream.decode(json.dumps(media)) == []
    assert stream.decode(json.dumps({"event": "someday-new", "streamId": STREAM})) == []
    assert stream.decode(json.dumps({"event": "stop", "streamId": STREAM})) == [StreamStopped("stop")]


def test_start_variants() -> None:
    message = json.loads(START)
    del message["extra_headers"]
    message["start"]["extra_headers"] = "a=1;b=Z5F"
    message["start"]["mediaFormat"] = {"encoding": "audio/x-mulaw;rate=8000", "sampleRate": "8000"}
    [started] = carrier().open_stream().decode(json.dumps(message))
    assert isinstance(started, StreamStarted) and started.custom_parameters == {"a": "1", "b": "_"}
    del message["start"]["mediaFormat"], message["start"]["extra_headers"], message["start"]["accountId"]
    message["extra_headers"] = None
    [started] = carrier().open_stream().decode(json.dumps(message))
    assert isinstance(started, StreamStarted) and (started.custom_parameters, started.account_id) == ({}, "")
    [raw] = carrier(escape_extra_headers=False).open_stream().decode(START.replace("3f9c1e", "3f9Z5F"))
    assert isinstance(raw, StreamStarted) and raw.custom_parameters["sessionId"] == "3f9Z5F"


def test_stop_before_start_still_ends_the_stream() -> None:
    assert carrier().open_stream().decode('{"event":"stop"}') == [StreamStopped("stop")]


def test_decode_silence_frame() -> None:
    msg = json.dumps({"event": "media", "streamId": STREAM, "media": {"payload": "/" * 213 + "w=="}})
    assert started_stream().decode(msg) == [AudioFrame(b"\x00\x00" * 160, 8000)]


def test_encode_tone8_vector() -> None:
    assert started_stream().encode(AudioFrame(pcm(TONE8_PCM), 8000)) == [
        '{"event":"playAudio","media":{"contentType":"audio/x-mulaw","sampleRate":8000,"payload":"/6mgqf8pICk="}}']


def test_encode_checkpoint_and_clear() -> None:
    stream = started_stream()
    assert stream.encode(Mark("utt-7")) == [
        '{"event":"checkpoint","streamId":"87654321-4321-4321-4321-cba987654321","name":"utt-7"}']
    assert stream.encode(Clear()) == ['{"event":"clearAudio","streamId":"87654321-4321-4321-4321-cba987654321"}']
    assert json.loads(stream.encode(Mark('a"\\b'))[0])["name"] == 'a"\\b'


def test_barge_in_sequence() -> None:
    """Audio, a checkpoint, then a flush: Plivo answers clearedAudio and never playedStream for it."""
    stream = started_stream()
    sent = [m for f in (AudioFrame(pcm(TONE8_PCM) * 20, 8000), Mark("r1-c0"), Clear()) for m in stream.encode(f)]
    assert [json.loads(m)["event"] for m in sent] == ["playAudio", "checkpoint", "clearAudio"]
    assert stream.decode(CLEARED) == []


def test_round_trip_through_encode_and_decode() -> None:
    stream = started_stream()
    [out] = stream.encode(AudioFrame(pcm(TONE8_PCM), 8000))
    echoed = {"event": "media", "streamId": STREAM, "media": {"track": "inbound",
                                                              "payload": json.loads(out)["media"]["payload"]}}
    assert stream.decode(json.dumps(echoed)) == [AudioFrame(pcm(TONE8_ROUND_TRIP), 8000)]
    assert stream.encode(AudioFrame(pcm(TONE8_ROUND_TRIP), 8000)) == [out]


@pytest.mark.parametrize(("byte_order", "payload"), [("little", TONE8_LE), ("big", TONE8_BE)])
def test_l16_8k_byte_order_switch(byte_order: str, payload: str) -> None:
    stream = started_stream(content_type="audio/x-l16;rate=8000", l16_byte_order=byte_order)
    assert (stream.sample_rate, stream.encoding) == (8000, "audio/x-l16")
    media = json.dumps({"event": "media", "streamId": STREAM, "media": {"payload": payload}})
    assert stream.decode(media) == [AudioFrame(pcm(TONE8_PCM), 8000)]  # L16 is lossless
    assert stream.encode(AudioFrame(pcm(TONE8_PCM), 8000)) == [
        '{"event":"playAudio","media":{"contentType":"audio/x-l16","sampleRate":8000,"payload":"%s"}}' % payload]


def test_l16_16k() -> None:
    stream = started_stream(content_type="audio/x-l16;rate=16000")
    assert stream.sample_rate == 16000
    [out] = stream.encode(AudioFrame(b"\x00" * 640, 16000))
    payload = json.loads(out)["media"]["payload"]
    assert (len(payload), payload[-4:], json.loads(out)["media"]["sampleRate"]) == (856, "AA==", 16000)
    assert stream.decode(json.dumps({"event": "media", "media": {"payload": payload}})) == [
        AudioFrame(b"\x00" * 640, 16000)]
    with pytest.raises(ValueError, match="16000 Hz"):
        stream.encode(AudioFrame(b"\x00" * 320, 8000))


@pytest.mark.parametrize(("content_type", "frame", "length", "tail"), [
    ("audio/x-mulaw;rate=8000", AudioFrame(b"\x00\x00" * 160, 8000), 216, "/w=="),
    ("audio/x-l16;rate=8000", AudioFrame(b"\x00" * 320, 8000), 428, "AAA="),
    ("audio/x-l16;rate=16000", AudioFrame(b"\x00" * 640, 16000), 856, "AA=="),
])
def test_encode_silence_frames(content_type: str, frame: AudioFrame, length: int, tail: str) -> None:
    [out] = started_stream(content_type=content_type).encode(frame)
    payload = json.loads(out)["media"]["payload"]
    assert (len(payload), payload[-4:]) == (length, tail)


def test_encode_any_length_in_one_message() -> None:
    stream = started_stream()
    for samples in (1, 7, 160, 8000):
        [out] = stream.encode(AudioFrame(b"\x00\x00" * samples, 8000))
        assert len(base64.b64decode(json.loads(out)["media"]["payload"])) == samples


def test_encode_errors() -> None:
    fresh = carrier().open_stream()
    for frame in (AudioFrame(pcm(TONE8_PCM), 8000), Mark("m"), Clear()):
        with pytest.raises(CarrierProtocolError, match=r"^plivo stream has not started \(no streamId yet\)$"):
            fresh.encode(frame)
    stream = started_stream()
    with pytest.raises(ValueError, match="8000 Hz"):
        stream.encode(AudioFrame(pcm(TONE8_PCM), 16000))
    for frame in (Dtmf("1"), MarkPlayed("m"), StreamStopped(), StreamStarted("s", "c")):
        with pytest.raises(ValueError, match="cannot send"):
            stream.encode(frame)
    assert stream.encode(AudioFrame(b"", 8000)) == []


def media(payload: Any = "/6mgqf8pICk=", **top: Any) -> str:
    return json.dumps({"event": "media", "sequenceNumber": 2, "streamId": STREAM,
                       "media": {"track": "inbound", "payload": payload}, **top})


def start(**start_fields: Any) -> str:
    message = json.loads(START)
    message["start"].update(start_fields)
    message["start"] = {k: v for k, v in message["start"].items() if v is not None}
    return json.dumps(message)


@pytest.mark.parametrize(
    ("started", "message", "text"),
    [
        (False, START.encode(), "plivo sends text frames only"),
        (False, "not json", "plivo message is not valid JSON"),
        (False, "[" * 100_000, "plivo message is not valid JSON"),
        (False, '["event"]', "plivo message has no event"),
        (False, '{"sequenceNumber":1}', "plivo message has no event"),
        (False, '{"event":5}', "plivo message has no event"),
        (False, media(), "plivo media before start"),
        (False, DTMF, "plivo dtmf before start"),
        (False, PLAYED, "plivo playedStream before start"),
        (False, CLEARED, "plivo clearedAudio before start"),
        (True, START, "plivo sent a second start event"),
        (False, '{"event":"start"}', "plivo start event has no start object"),
        (False, '{"event":"start","start":[1]}', "plivo start event has no start object"),
        (False, start(streamId=None), "plivo start event has no start.streamId"),
        (False, start(streamId=""), "plivo start event has no start.streamId"),
        (False, start(callId=None), "plivo start event has no start.callId"),
        (False, start(callId=7), "plivo start event has no start.callId"),
        (False, json.dumps({**json.loads(START), "streamId": "other"}), "plivo streamId does not match start.streamId"),
        (False, start(mediaFormat="mulaw"), "plivo start.mediaFormat is not an object"),
        (False, start(mediaFormat={"encoding": "audio/x-l16", "sampleRate": 16000}),
         "plivo start.mediaFormat audio/x-l16 16000 Hz is not supported (expected audio/x-mulaw 8000 Hz, "
         "the answer's contentType)"),
        (False, start(mediaFormat={"encoding": "audio/x-mulaw", "sampleRate": 16000}), "is not supported"),
        (False, json.dumps({**json.loads(START), "extra_headers": {"a": "1"}}), "plivo extra_headers is not a string"),
        (True, json.dumps({"event": "media", "streamId": STREAM}), "plivo media event has no media.payload"),
        (True, media(payload=None), "plivo media event has no media.payload"),
        (True, media(payload=123), "plivo media event has no media.payload"),
        (True, json.dumps({"event": "media", "media": "abc"}), "plivo media event has no media.payload"),
        (True, media(payload="/6mg qf8pICk="), "plivo media payload is not valid base64"),
        (True, media(payload="/6mgqf8pICk"), "plivo media payload is not valid base64"),
        (True, media(payload="!!!!"), "plivo media payload is not valid base64"),
        (True, media(streamId="other"), "plivo streamId does not match the stream"),
        (True, DTMF.replace(STREAM, "other"), "plivo streamId does not match the stream"),
        (True, PLAYED.replace(STREAM, "other"), "plivo streamId does not match the stream"),
        (True, CLEARED.replace(STREAM, "other"), "plivo streamId does not match the stream"),
        (True, '{"event":"stop","streamId":"other"}', "plivo streamId does not match the stream"),
        (True, '{"event":"dtmf","streamId":"' + STREAM + '","dtmf":{}}', "plivo dtmf event has no dtmf.digit"),
        (True, '{"event":"dtmf","digit":"5"}', "plivo dtmf event has no dtmf.digit"),
        (True, DTMF.replace('"5"', '"55"'), "plivo dtmf digit is not one of 0-9 * # A-D"),
        (True, DTMF.replace('"5"', '"E"'), "plivo dtmf digit is not one of 0-9 * # A-D"),
        (True, '{"event":"playedStream","streamId":"' + STREAM + '"}', "plivo playedStream event has no name"),
        (True, '{"event":"played","name":""}', "plivo played event has no name"),
    ],
)
def test_decode_errors(started: bool, message: str | bytes, text: str) -> None:
    stream = started_stream() if started else carrier().open_stream()
    with pytest.raises(CarrierProtocolError) as info:
        stream.decode(message)
    assert text in str(info.value)
    assert str(info.value).startswith("plivo ")


def test_l16_odd_payload_rejected() -> None:
    stream = started_stream(content_type="audio/x-l16;rate=8000")
    with pytest.raises(CarrierProtocolError, match="^plivo L16 media payload has an odd number of bytes$"):
        stream.decode(media(payload=base64.b64encode(b"\x00\x01\x02").decode()))
    with pytest.raises(CarrierProtocolError, match="not supported"):
        carrier(content_type="audio/x-l16;rate=8000").open_stream().decode(START)  # µ-law start on an L16 stream


@pytest.mark.parametrize("digit", list("0123456789*#ABCD"))
def test_decode_every_dtmf_digit(digit: str) -> None:
    assert started_stream().decode(DTMF.replace('"5"', json.dumps(digit))) == [Dtmf(digit)]


def test_verify_websocket_is_a_no_op() -> None:
    carrier().verify_websocket({}, WSS)


# ------------------------------------------------------------------------------------ events

def event(form: list[tuple[str, str]]) -> WebhookRequest:
    return post("https://gw.example.com/events/plivo", form)


@pytest.mark.parametrize(
    ("form", "expected"),
    [
        ([("CallUUID", CALL), ("CallStatus", "completed"), ("Event", "Hangup"), ("HangupCause", "NORMAL_CLEARING")],
         CallEvent(CALL, "", True, "completed")),
        ([("CallUUID", CALL), ("CallStatus", "ringing"), ("Event", "Ring")], CallEvent(CALL, "", False, "ringing")),
        ([("CallUUID", CALL), ("CallStatus", "in-progress")], CallEvent(CALL, "", False, "in-progress")),
        ([("CallUUID", CALL), ("CallStatus", "no-answer")], CallEvent(CALL, "", True, "no-answer")),
        ([("CallUUID", CALL), ("CallStatus", "busy")], CallEvent(CALL, "", True, "busy")),
        ([("RequestUUID", "req-1"), ("CallStatus", "failed")], CallEvent("req-1", "", True, "failed", "req-1")),
        ([("CallUUID", CALL), ("RequestUUID", "req-1"), ("CallStatus", "no-answer")],   # never answered
         CallEvent(CALL, "", True, "no-answer", "req-1")),
        ([("CallUUID", CALL), ("Event", "Hangup")], CallEvent(CALL, "", True, "Hangup")),
        ([("CallUUID", CALL), ("Machine", "true"), ("CallStatus", "in-progress")],
         CallEvent(CALL, "machine", False, "in-progress")),
        ([("CallUUID", CALL), ("Machine", "false")], CallEvent(CALL, "human", False, "")),
        ([("CallUUID", CALL), ("Machine", "True ")], CallEvent(CALL, "machine", False, "")),
        ([("CallUUID", CALL), ("Machine", "")], CallEvent(CALL, "unknown", False, "")),
        ([("CallUUID", CALL), ("Event", "StopStream"), ("StreamID", STREAM)], CallEvent(CALL, "", False, "StopStream")),
    ],
)
def test_parse_event(form: list[tuple[str, str]], expected: CallEvent) -> None:
    assert carrier().parse_event(event(form)) == expected


def test_parse_event_get_and_missing_id() -> None:
    request = WebhookRequest("GET", f"https://gw.example.com/events/plivo?CallUUID={CALL}&Machine=false", {}, b"")
    assert carrier().parse_event(request) == CallEvent(CALL, "human", False, "")
    with pytest.raises(CarrierProtocolError, match="^plivo event has no CallUUID$"):
        carrier().parse_event(event([("CallStatus", "completed")]))


# ------------------------------------------------------------------------------------ REST

def info(call_id: str = CALL) -> CallInfo:
    return CallInfo(carrier="plivo", call_id=call_id)


@pytest.mark.asyncio
async def test_hang_up_success() -> None:
    async with FakePlivoREST(AUTH_ID, TOKEN) as fake, httpx.AsyncClient() as http:
        fake.known_calls = {CALL}
        c = carrier(http, api_base_url=fake.base_url + "/")
        await c.hang_up(info())
        assert fake.ended_calls == [CALL]
        [request] = fake.requests
        assert (request.method, request.path, request.body, request.auth_ok) == (
            "DELETE", f"/v1/Account/{AUTH_ID}/Call/{CALL}/", None, True)
        await c.hang_up(info())  # the call is gone now (404): still success
        assert fake.ended_calls == [CALL] and len(fake.requests) == 2


@pytest.mark.asyncio
async def test_hang_up_unknown_call_is_success(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    async with FakePlivoREST(AUTH_ID, TOKEN) as fake, httpx.AsyncClient() as http:
        await carrier(http, api_base_url=fake.base_url).hang_up(info())
        assert fake.ended_calls == [] and len(fake.requests) == 1
    assert "already ended" in caplog.text


@pytest.mark.asyncio
async def test_hang_up_wrong_token(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    async with FakePlivoREST(AUTH_ID, TOKEN) as fake, httpx.AsyncClient() as http:
        fake.known_calls = {CALL}
        c = carrier(http, auth_token="wrong-token-value", api_base_url=fake.base_url)
        with pytest.raises(HangupFailed, match=r"^plivo hang-up of .* failed: HTTP 401: Authentication failed$") as exc:
            await c.hang_up(info())
        assert fake.ended_calls == [] and fake.requests[0].auth_ok is False
    assert "wrong-token-value" not in str(exc.value) + caplog.text + repr(c)


@pytest.mark.asyncio
async def test_hang_up_server_error() -> None:
    async with FakePlivoREST(AUTH_ID, TOKEN) as fake, httpx.AsyncClient() as http:
        fake.known_calls = {CALL}
        fake.force_error = (500, "internal server error")
        with pytest.raises(HangupFailed, match="HTTP 500: internal server error"):
            await carrier(http, api_base_url=fake.base_url).hang_up(info())


@pytest.mark.asyncio
async def test_hang_up_404_that_is_not_plivo_is_a_failure() -> None:
    transport = httpx.MockTransport(lambda request: httpx.Response(404, text="<h1>nginx: not found</h1>"))
    async with httpx.AsyncClient(transport=transport) as http:
        with pytest.raises(HangupFailed, match="HTTP 404: Not Found"):
            await carrier(http).hang_up(info())


@pytest.mark.asyncio
async def test_hang_up_transport_error_is_chained() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        assert str(request.url) == f"https://api.plivo.com/v1/Account/{AUTH_ID}/Call/{CALL}/"
        raise httpx.ConnectError("connection refused", request=request)

    async with httpx.AsyncClient(transport=httpx.MockTransport(refuse)) as http:
        with pytest.raises(HangupFailed, match="ConnectError") as exc:
            await carrier(http).hang_up(info())
    assert isinstance(exc.value.__cause__, httpx.ConnectError)


def dial_request(**kwargs: Any) -> DialRequest:
    fields: dict[str, Any] = {
        "to": "+14155550199", "from_": "+14155550100", "stream_url": "wss://gw.example.com/media/plivo/s1",
        "answer_url": "https://gw.example.com/start/plivo?session=s1",
        "events_url": "https://gw.example.com/events/plivo?session=s1", "parameters": {"persona": "sales"},
    }
    fields.update(kwargs)
    return DialRequest(**fields)


@pytest.mark.asyncio
async def test_dial_and_cancel_before_answer() -> None:
    async with FakePlivoREST(AUTH_ID, TOKEN) as fake, httpx.AsyncClient() as http:
        c = carrier(http, api_base_url=fake.base_url)
        call = await c.dial(dial_request())
        assert fake.queued == {call.call_id}
        assert call == CallInfo(carrier="plivo", call_id=call.call_id, from_="+14155550100", to="+14155550199",
                                account_id=AUTH_ID, direction="outbound", custom={"persona": "sales"})
        [request] = fake.requests
        assert (request.method, request.path, request.content_type) == (
            "POST", f"/v1/Account/{AUTH_ID}/Call/", "application/json")
        assert fake.dialed == [{"from": "+14155550100", "to": "+14155550199",
                                "answer_url": "https://gw.example.com/start/plivo?session=s1", "answer_method": "POST",
                                "hangup_url": "https://gw.example.com/events/plivo?session=s1",
                                "hangup_method": "POST"}]
        await c.hang_up(call)  # not answered: the request is cancelled
        assert fake.canceled_requests == [call.call_id] and fake.queued == set()
        assert [r.path for r in fake.requests[1:]] == [f"/v1/Account/{AUTH_ID}/Call/{call.call_id}/",
                                                      f"/v1/Account/{AUTH_ID}/Request/{call.call_id}/"]
        await c.hang_up(call)  # both gone: already ended
        assert fake.canceled_requests == [call.call_id]


@pytest.mark.asyncio
async def test_dial_with_machine_detection() -> None:
    async with FakePlivoREST(AUTH_ID, TOKEN) as fake, httpx.AsyncClient() as http:
        c = carrier(http, api_base_url=fake.base_url, machine_detection_time_ms=3000)
        await c.dial(dial_request(machine_detection=True, to="sip:bob@example.com"))
        [body] = fake.dialed
        assert {k: body[k] for k in body if k.startswith("machine")} == {
            "machine_detection": "true", "machine_detection_time": 3000,
            "machine_detection_url": "https://gw.example.com/events/plivo?session=s1",
            "machine_detection_method": "POST"}
        assert body["to"] == "sip:bob@example.com"


@pytest.mark.asyncio
async def test_dial_failures() -> None:
    async with FakePlivoREST(AUTH_ID, TOKEN) as fake, httpx.AsyncClient() as http:
        with pytest.raises(CallControlFailed, match=r"^plivo dial to \+14155550199 failed: HTTP 401: Authentication"):
            await carrier(http, auth_token="bad", api_base_url=fake.base_url).dial(dial_request())
        c = carrier(http, api_base_url=fake.base_url)
        with pytest.raises(CallControlFailed, match="HTTP 400: src and destination cannot overlap"):
            await c.dial(dial_request(from_="+14155550199"))
        for bad in ({"to": "+14155550199<+14155550198"}, {"to": "4155550199"}, {"answer_url": "ftp://x"}):
            with pytest.raises(ValueError):
                await c.dial(dial_request(**bad))
        assert fake.dialed == []
    weird = httpx.MockTransport(lambda request: httpx.Response(201, json={"api_id": "x", "message": "call fired"}))
    async with httpx.AsyncClient(transport=weird) as http:
        with pytest.raises(CallControlFailed, match="no request_uuid"):
            await carrier(http).dial(dial_request())
    listed = httpx.MockTransport(lambda request: httpx.Response(201, json={"request_uuid": ["r1", "r2"]}))
    async with httpx.AsyncClient(transport=listed) as http:
        assert (await carrier(http).dial(dial_request())).call_id == "r1"


@pytest.mark.asyncio
async def test_answered_dial_hangs_up_by_call_uuid() -> None:
    async with FakePlivoREST(AUTH_ID, TOKEN) as fake, httpx.AsyncClient() as http:
        c = carrier(http, api_base_url=fake.base_url)
        dialed = await c.dial(dial_request())
        call_uuid = fake.answer(dialed.call_id)
        await c.hang_up(info(call_uuid))
        assert fake.ended_calls == [call_uuid] and fake.canceled_requests == []


@pytest.mark.asyncio
async def test_transfer() -> None:
    async with FakePlivoREST(AUTH_ID, TOKEN) as fake, httpx.AsyncClient() as http:
        fake.known_calls = {CALL}
        c = carrier(http, api_base_url=fake.base_url, transfer_url="https://gw.example.com/transfer/plivo?s=1")
        await c.transfer(info(), "+14155550123")
        await c.transfer(info(), "sip:agent@example.com")
        assert fake.transfers == [
            (CALL, {"legs": "aleg", "aleg_url": "https://gw.example.com/transfer/plivo?s=1&target=%2B14155550123",
                    "aleg_method": "POST"}),
            (CALL, {"legs": "aleg", "aleg_url": "https://gw.example.com/transfer/plivo?s=1&target=sip%3Aagent%40"
                                                "example.com", "aleg_method": "POST"})]
        assert {r.path for r in fake.requests} == {f"/v1/Account/{AUTH_ID}/Call/{CALL}/"}
        target = dict(parse_qsl(fake.transfers[0][1]["aleg_url"].partition("?")[2]))["target"]
        assert ET.fromstring(c.transfer_markup(target)[0].encode()).findtext("Dial/Number") == "+14155550123"
        with pytest.raises(CallControlFailed, match=r"^plivo transfer of .* failed \(call already ended\): HTTP 404"):
            await c.transfer(info("gone"), "+14155550123")
        with pytest.raises(ValueError, match="E.164"):
            await c.transfer(info(), "555-0123")
        with pytest.raises(CallControlFailed, match="needs transfer_url"):
            await carrier(http, api_base_url=fake.base_url).transfer(info(), "+14155550123")
        with pytest.raises(CallControlFailed, match="HTTP 401"):
            await carrier(http, api_base_url=fake.base_url, auth_token="x",
                          transfer_url="https://gw.example.com/t").transfer(info(), "+14155550123")
        c2 = carrier(http, api_base_url=fake.base_url, transfer_url="https://gw.example.com/t")
        await c2.transfer(info(), "+14155550123")
        assert fake.transfers[-1][1]["aleg_url"] == "https://gw.example.com/t?target=%2B14155550123"


@pytest.mark.asyncio
async def test_send_dtmf() -> None:
    async with FakePlivoREST(AUTH_ID, TOKEN) as fake, httpx.AsyncClient() as http:
        fake.known_calls = {CALL}
        c = carrier(http, api_base_url=fake.base_url)
        assert await c.send_dtmf(info(), "12w#*") is True
        assert fake.dtmf == [(CALL, "12w#*")]
        assert fake.requests[-1].path == f"/v1/Account/{AUTH_ID}/Call/{CALL}/DTMF/"
        assert fake.requests[-1].body == {"digits": "12w#*", "leg": "aleg"}
        for bad in ("", "12x", "1 2"):
            with pytest.raises(ValueError, match="DTMF"):
                await c.send_dtmf(info(), bad)
        with pytest.raises(CallControlFailed, match=r"call already ended\): HTTP 404: call not found"):
            await c.send_dtmf(info("gone"), "1")
        with pytest.raises(CallControlFailed, match="HTTP 401"):
            await carrier(http, api_base_url=fake.base_url, auth_token="x").send_dtmf(info(), "1")


@pytest.mark.asyncio
async def test_call_control_transport_error() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("slow", request=request)

    async with httpx.AsyncClient(transport=httpx.MockTransport(refuse)) as http:
        with pytest.raises(CallControlFailed, match="ReadTimeout") as exc:
            await carrier(http).send_dtmf(info(), "1")
    assert isinstance(exc.value.__cause__, httpx.ReadTimeout)


@pytest.mark.asyncio
async def test_rest_needs_the_auth_id() -> None:
    with pytest.raises(HangupFailed, match=r"no auth_id configured \(PLIVO_AUTH_ID\)"):
        await carrier(auth_id="").hang_up(info())
    with pytest.raises(CallControlFailed, match="no auth_id configured"):
        await carrier(auth_id="").send_dtmf(info(), "1")


@pytest.mark.asyncio
async def test_error_bodies_are_summarised() -> None:
    transport = httpx.MockTransport(lambda request: httpx.Response(
        400, json={"api_id": "a", "error": {"to": ["This field is required."]}}))
    async with httpx.AsyncClient(transport=transport) as http:
        with pytest.raises(CallControlFailed, match=r'HTTP 400: \{"to":\["This field is required."\]\}'):
            await carrier(http).send_dtmf(info(), "1")


@pytest.mark.asyncio
async def test_fake_rejects_bad_requests() -> None:
    async with FakePlivoREST(AUTH_ID, TOKEN) as fake, httpx.AsyncClient(base_url=fake.base_url) as http:
        fake.known_calls = {CALL}
        auth = (AUTH_ID, TOKEN)
        path = f"/v1/Account/{AUTH_ID}/Call/{CALL}/"
        no_auth = await http.delete(path)
        assert no_auth.status_code == 401 and no_auth.json()["error"] == "Authentication failed"
        other = await http.delete(path.replace(AUTH_ID, "MAYYYYYYYYYYYYYYYYYY"), auth=auth)
        assert other.status_code == 401
        assert (await http.get(path, auth=auth)).status_code == 405
        assert (await http.delete(path.rstrip("/"), auth=auth)).status_code == 404  # no trailing slash
        form = await http.post(path, data={"legs": "aleg"}, auth=auth)
        assert form.status_code == 400 and "JSON" in form.json()["error"]
        assert (await http.post(path, json={"legs": "cleg"}, auth=auth)).status_code == 400
        assert (await http.post(path, json={"legs": "aleg"}, auth=auth)).json()["error"].startswith("aleg_url")
        assert (await http.post(path, json={"legs": "aleg", "aleg_url": "x", "bogus": 1}, auth=auth)).status_code == 400
        assert (await http.post(path + "DTMF/", json={"digits": "1x"}, auth=auth)).status_code == 400
        dial = f"/v1/Account/{AUTH_ID}/Call/"
        assert (await http.post(dial, json={"from": "1", "to": "2"}, auth=auth)).json()["error"] == \
            "answer_url parameter is required"
        assert (await http.post(dial, json={"from": "1", "to": "2", "answer_url": "https://x",
                                            "machine_detection_time": 100}, auth=auth)).status_code == 400
        assert fake.ended_calls == fake.transfers == fake.dtmf == fake.dialed == []
        assert (await http.delete(path, auth=auth)).status_code == 204


# ------------------------------------------------------------------------------------ dialect

def as_request(hook: Any, public_url: str) -> WebhookRequest:
    return WebhookRequest(method=hook.method, url=public_url + hook.path,
                          headers={k.lower(): v for k, v in hook.headers.items()}, body=hook.body)


PUBLIC = "https://voice.example.test"


def dialect(**credentials: str) -> PlivoDialect:
    return PlivoDialect(credentials={"auth_token": TOKEN, "auth_id": AUTH_ID, **credentials},
                        from_="+14155550199", to="+14155550100")


def connect(d: PlivoDialect, c: PlivoCarrier, params: dict[str, str] | None = None) -> PlivoMediaStream:
    request = as_request(d.webhook(PUBLIC, {}), PUBLIC)
    c.verify(request)
    call = c.parse_call(request)
    body, _ = c.answer(call, "wss://voice.example.test/media/plivo/tok-en_1", params or {})
    assert d.answer(200, body) == "wss://voice.example.test/media/plivo/tok-en_1"
    stream = c.open_stream()
    for message in d.opening():
        stream.decode(message)
    return stream


def test_dialect_is_registered() -> None:
    assert dialect_for("plivo") is PlivoDialect


def test_dialect_webhook_verifies_and_parses() -> None:
    d, c = dialect(), carrier()
    request = as_request(d.webhook(PUBLIC, {"X-PH-Agent": "7"}), PUBLIC)
    assert request.headers["content-type"] == "application/x-www-form-urlencoded"
    c.verify(request)
    call = c.parse_call(request)
    assert (call.call_id, call.from_, call.to, call.direction, call.custom) == (
        d.call_id, "+14155550199", "+14155550100", "inbound", {"Agent": "7"})
    with pytest.raises(SignatureInvalid, match="replayed"):
        c.verify(request)
    # V3 alone and Ma-V3 alone both verify (a subaccount with its main account's token)
    headers = dict(request.headers)
    del headers["x-plivo-signature-ma-v3"]
    carrier().verify(WebhookRequest("POST", request.url, headers, request.body))
    sub = PlivoDialect(credentials={"auth_token": "sub-token", "main_auth_token": TOKEN}, from_="+1", to="+2")
    carrier(auth_token="other-sub", main_auth_token=TOKEN).verify(as_request(sub.webhook(PUBLIC, {}), PUBLIC))


def test_dialect_forged_webhook_rejected() -> None:
    d = dialect()
    with pytest.raises(SignatureInvalid, match="signature does not match"):
        carrier().verify(as_request(d.webhook(PUBLIC, {}, signature="AAAA"), PUBLIC))
    with pytest.raises(SignatureInvalid, match="signature does not match"):
        carrier().verify(as_request(d.webhook("https://other.example.test", {}), PUBLIC))
    with pytest.raises(SignatureInvalid, match="signature does not match"):
        carrier().verify(as_request(dialect(auth_token="not-the-token").webhook(PUBLIC, {}), PUBLIC))


def test_dialect_round_trip_mulaw() -> None:
    d, c = dialect(), carrier()
    params = {"session_id": "tok-en_1", "persona": "front desk"}
    stream = connect(d, c, params)
    assert d.parameters == params and d.rate == 8000
    assert stream.started and stream.call_id == d.call_id and stream.stream_id == d.stream_id
    start = json.loads(d.opening()[0])
    assert isinstance(start["sequenceNumber"], int) and "connected" not in d.opening()[0]
    fresh = c.open_stream()
    [started] = fresh.decode(json.dumps(d.start_message()))
    assert isinstance(started, StreamStarted) and started.custom_parameters == params
    assert started.account_id == AUTH_ID
    # inbound media and DTMF
    [frame] = stream.decode(d.media(pcm(TONE8_PCM) * 20))
    assert frame == AudioFrame(pcm(TONE8_ROUND_TRIP) * 20, 8000)
    message = json.loads(d.media(b"\x00\x00" * 160))
    assert isinstance(message["media"]["chunk"], int) and message["media"]["timestamp"].isdigit()
    assert stream.decode(d.dtmf("7")) == [Dtmf("7")]
    # outbound: audio, checkpoint, clear
    [out] = stream.encode(AudioFrame(pcm(TONE8_PCM) * 20, 8000))
    assert d.parse(out) == [Inbound("media", pcm=pcm(TONE8_ROUND_TRIP) * 20)]
    [checkpoint] = stream.encode(Mark("r1-c0"))
    assert d.parse(checkpoint) == [Inbound("mark", name="r1-c0")]
    ack = d.mark_ack("r1-c0")
    assert ack is not None and stream.decode(ack) == [MarkPlayed("r1-c0")]
    # barge-in: a checkpoint still pending when clearAudio arrives is never acknowledged
    [checkpoint] = stream.encode(Mark("r1-c1"))
    assert d.parse(checkpoint) == [Inbound("mark", name="r1-c1")]
    [clear] = stream.encode(Clear())
    assert d.parse(clear) == [Inbound("clear")]
    assert d.mark_ack("r1-c1") is None
    assert stream.decode(d.cleared()) == []
    assert d.stop() == []


@pytest.mark.parametrize(("content_type", "byte_order"), [
    ("audio/x-l16;rate=8000", "little"), ("audio/x-l16;rate=8000", "big"), ("audio/x-l16;rate=16000", "little")])
def test_dialect_round_trip_l16(content_type: str, byte_order: str) -> None:
    d = dialect(content_type=content_type, l16_byte_order=byte_order)
    c = carrier(content_type=content_type, l16_byte_order=byte_order)
    stream = connect(d, c)
    assert d.rate == stream.sample_rate
    samples = pcm(TONE8_PCM) * (d.rate // 400)
    assert stream.decode(d.media(samples)) == [AudioFrame(samples, d.rate)]
    [out] = stream.encode(AudioFrame(samples, d.rate))
    assert d.parse(out) == [Inbound("media", pcm=samples)]


def test_dialect_rejects_mismatched_answers() -> None:
    d = dialect()
    body, _ = carrier(content_type="audio/x-l16;rate=8000").answer(CALL_INFO, WSS, {})
    with pytest.raises(AssertionError, match="asked for audio/x-l16"):
        d.answer(200, body)
    with pytest.raises(AssertionError, match="bidirectional"):
        d.answer(200, f"<Response><Stream>{WSS}</Stream></Response>")
    with pytest.raises(AssertionError, match="no <Response><Stream>"):
        d.answer(200, "<Response><Speak>hi</Speak></Response>")
    with pytest.raises(AssertionError, match="extraHeaders"):
        d.answer(200, f'<Response><Stream bidirectional="true" contentType="audio/x-mulaw;rate=8000" '
                      f'extraHeaders="session_id=1">{WSS}</Stream></Response>')


def test_dialect_flags_what_plivo_would_reject() -> None:
    d, c = dialect(), carrier()
    connect(d, c)
    l16 = carrier(content_type="audio/x-l16;rate=8000").open_stream()
    l16.decode(start_message("audio/x-l16;rate=8000").replace(STREAM, d.stream_id))
    [wrong_codec] = l16.encode(AudioFrame(pcm(TONE8_PCM), 8000))
    bad = [
        b"binary",
        "not json",
        wrong_codec,
        json.dumps({"event": "media", "streamSid": d.stream_id, "media": {"payload": "/w=="}}),  # Twilio's shape
        json.dumps({"event": "checkpoint", "streamId": "other", "name": "m"}),
        json.dumps({"event": "checkpoint", "streamId": d.stream_id, "name": ""}),
        json.dumps({"event": "clearAudio", "streamId": d.stream_id, "extra": 1}),
        json.dumps({"event": "playAudio", "media": {"contentType": "audio/x-mulaw", "sampleRate": 8000,
                                                    "payload": "!!"}}),
        json.dumps({"event": "playAudio", "media": {"contentType": "audio/x-mulaw", "sampleRate": 8000}}),
        json.dumps({"event": "playAudio", "streamId": "other", "media": {"contentType": "audio/x-mulaw",
                                                                         "sampleRate": 8000, "payload": "/w=="}}),
    ]
    for message in bad:
        [item] = d.parse(message)
        assert item.kind == "invalid", message
    ok = json.dumps({"event": "playAudio", "streamId": d.stream_id,
                     "media": {"contentType": "audio/x-mulaw", "sampleRate": 8000, "payload": "/w=="}})
    assert d.parse(ok) == [Inbound("media", pcm=b"\x00\x00")]
    assert d.parse(json.dumps({"event": "sendDTMF", "dtmf": "12"}))[0].kind == "other"


# ------------------------------------------------------------------------------------ through the gateway

def plivo_gateway_config(fake_url: str, plivo_url: str) -> Any:
    from tests.conftest import phone_config

    return phone_config(fake_url, "http://127.0.0.1:9", carrier="plivo", carriers={
        "plivo": {"auth_id": AUTH_ID, "auth_token": TOKEN, "api_base_url": plivo_url}})


@pytest.mark.asyncio
async def test_emulated_plivo_call_through_the_gateway() -> None:
    """The dialect against a real gateway configured for Plivo: signed webhook, <Stream> answer, start,
    speech, checkpoints, barge-in, REST hang-up."""
    from gateway.simulate.call import SimulatedCall
    from tests.conftest import PUBLIC_URL, running_gateway
    from tests.fakes.openai_server import FakeOpenAI
    from tests.speech import speech_pcm

    speech = speech_pcm("I would like to book a table for two people tonight.", 8000)
    long_reply = "Let me tell you about tonight's menu. " + "We have fresh pasta with basil and lemon. " * 6
    async with (FakeOpenAI(transcripts=["book a table", "what is on the menu", "stop"],
                           replies=["Sure. For what time?", long_reply], tts_ms_per_char=20) as fake,
                FakePlivoREST(AUTH_ID, TOKEN) as plivo):
        async with running_gateway(plivo_gateway_config(fake.base_url, plivo.base_url)) as url:
            call = SimulatedCall(gateway=url, public_url=PUBLIC_URL, carrier="plivo",
                                 credentials={"auth_id": AUTH_ID, "auth_token": TOKEN})
            plivo.known_calls = {call.call_sid}
            answer = await call.dial()
            assert answer.status_code == 200 and answer.headers["content-type"].startswith("application/xml")
            assert call.parameters["session_id"] == call.session_id and "persona" in call.parameters
            await call.connect()
            await call.wait_audio(after=0, timeout=5)                  # the greeting
            await call.wait_quiet(400)
            end = await call.speak(speech)
            await call.wait_audio(after=end, timeout=5)
            await call.wait_quiet(400)
            assert {"r2-c0", "r2-c1"} <= {name for _, name in call.received.marks}
            end = await call.speak(speech)
            await call.wait_audio(after=end, timeout=5)
            await asyncio.sleep(1.0)
            assert call.playing()
            barge = asyncio.create_task(call.speak(speech))            # barge-in: clearAudio
            await call.wait_clear(timeout=3)
            await barge
            fake.state.fail["llm"] = "500"                             # the apology, then a REST hang-up
            await call.wait_closed(timeout=15)
            assert plivo.ended_calls == [call.call_sid]
            assert plivo.requests[-1].path == f"/v1/Account/{AUTH_ID}/Call/{call.call_sid}/"
            assert call.received.invalid == []
            await call.close()


@pytest.mark.asyncio
async def test_an_unanswered_outbound_plivo_call_releases_its_session() -> None:
    """dial() returns a RequestUUID; the no-answer callback names a new CallUUID and carries the RequestUUID."""
    from tests.conftest import PUBLIC_URL, running_gateway
    from tests.fakes.openai_server import FakeOpenAI

    async with FakeOpenAI() as fake, FakePlivoREST(AUTH_ID, TOKEN) as plivo:
        async with running_gateway(plivo_gateway_config(fake.base_url, plivo.base_url)) as url, \
                httpx.AsyncClient(base_url=url) as http:
            placed = (await http.post("/calls", json={"to": "+14155550123", "from": "+14155550100"})).json()
            assert placed["call_id"] in plivo.queued
            path = f"/events/plivo/{placed['session_id']}"
            form = {"CallUUID": "c0ffee00-0000-4000-8000-000000000001", "RequestUUID": placed["call_id"],
                    "CallStatus": "no-answer"}
            for n, (request_uuid, status) in enumerate(((("someone-else"), 404), (placed["call_id"], 204))):
                sent = {**form, "RequestUUID": request_uuid}                # first: not this session's call
                nonce = f"1234567890123456789{n}"
                headers = {"X-Plivo-Signature-V3": signature_v3(TOKEN, "POST", PUBLIC_URL + path,
                                                                {k: [v] for k, v in sent.items()}, nonce),
                           "X-Plivo-Signature-V3-Nonce": nonce}
                assert (await http.post(path, data=sent, headers=headers)).status_code == status
                left = (await http.get(f"/sessions/{placed['session_id']}")).status_code
                assert left == (200 if status == 404 else 404)              # kept, then released
