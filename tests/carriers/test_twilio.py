"""Tests for carriers/twilio.py against the §9.2 vectors of docs/carriers.md and a fake REST API."""

from __future__ import annotations

import base64
import json
import logging
import struct
import xml.etree.ElementTree as ET
from typing import Any

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twilio.twiml.voice_response import VoiceResponse

from carriers.base import CallInfo, CarrierProtocolError, HangupFailed, SignatureInvalid, WebhookRequest
from carriers.twilio import _MEDIA_HEAD, TwilioCarrier, TwilioMediaStream
from pipeline.audio import ulaw_decode
from pipeline.frames import (
    AudioFrame,
    Clear,
    Dtmf,
    Mark,
    MarkPlayed,
    StreamStarted,
    StreamStopped,
)
from tests.carriers.busy_vectors import HOSTILE, check_xml_busy
from tests.fakes.twilio_rest import FakeTwilioREST

TOKEN = "12345"
URL = "https://mycompany.com/myapp.php?foo=1&bar=2"
DOC_PARAMS = [
    ("CallSid", "CA1234567890ABCDE"),
    ("Caller", "+12349013030"),
    ("Digits", "1234"),
    ("From", "+12349013030"),
    ("To", "+18005551212"),
]
SDK_PARAMS = [
    ("CallSid", "CA1234567890ABCDE"),
    ("Digits", "1234"),
    ("From", "+14158675309"),
    ("To", "+18005551212"),
    ("Caller", "+14158675309"),
]
FORM = {"content-type": "application/x-www-form-urlencoded"}

ACCOUNT = "AC00000000000000000000000000000001"
CALL = "CA00000000000000000000000000000002"
STREAM = "MZ18ad3ab5a668481ce02b83e7395059f0"
TONE8_PCM = [0, 5657, 8000, 5657, 0, -5657, -8000, -5657]
TONE8_ROUND_TRIP = [0, 5628, 7932, 5628, 0, -5628, -7932, -5628]

CONNECTED = '{"event":"connected","protocol":"Call","version":"1.0.0"}'
START = json.dumps({
    "event": "start", "sequenceNumber": "1", "streamSid": STREAM,
    "start": {
        "streamSid": STREAM, "accountSid": ACCOUNT, "callSid": CALL, "tracks": ["inbound"],
        "customParameters": {"session_id": "3f9c1e", "from_number": "+14155550100"},
        "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
    },
})
MEDIA = json.dumps({
    "event": "media", "sequenceNumber": "3", "streamSid": STREAM,
    "media": {"track": "inbound", "chunk": "2", "timestamp": "20", "payload": "/6mgqf8pICk="},
})
DTMF = json.dumps({"event": "dtmf", "sequenceNumber": "40", "streamSid": STREAM,
                   "dtmf": {"track": "inbound_track", "digit": "5"}})
MARK = json.dumps({"event": "mark", "sequenceNumber": "41", "streamSid": STREAM, "mark": {"name": "utt-7"}})
STOP = json.dumps({"event": "stop", "sequenceNumber": "99", "streamSid": STREAM,
                   "stop": {"accountSid": ACCOUNT, "callSid": CALL}})


def pcm(samples: list[int]) -> bytes:
    return struct.pack(f"<{len(samples)}h", *samples)


def carrier(http: httpx.AsyncClient | None = None, **kwargs: Any) -> TwilioCarrier:
    kwargs.setdefault("account_sid", ACCOUNT)
    kwargs.setdefault("auth_token", TOKEN)
    return TwilioCarrier(http=http or httpx.AsyncClient(), **kwargs)


def post(url: str, form: list[tuple[str, str]], signature: str | None, **headers: str) -> WebhookRequest:
    hdrs = dict(FORM)
    if signature is not None:
        hdrs["x-twilio-signature"] = signature
    hdrs.update(headers)
    body = "&".join(f"{k}={v}" for k, v in form).encode()  # only for parse tests; form is authoritative
    return WebhookRequest(method="POST", url=url, headers=hdrs, body=body, form=tuple(form))


def started_stream() -> TwilioMediaStream:
    stream = TwilioCarrier(account_sid=ACCOUNT, auth_token=TOKEN, http=httpx.AsyncClient()).open_stream()
    stream.decode(START)
    return stream


# ------------------------------------------------------------------------------------ signatures

@pytest.mark.parametrize(
    ("url", "params", "signature"),
    [
        pytest.param(URL, DOC_PARAMS, "0/KCTR6DLpKmkAf8muzZqo1nDgQ=", id="documented-example"),
        pytest.param(URL, SDK_PARAMS, "RSOYDt4T1cUTdK1PDd93/VVr8B8=", id="sdk"),
        pytest.param("https://mycompany.com:1234/myapp.php?foo=1&bar=2", SDK_PARAMS,
                     "RSOYDt4T1cUTdK1PDd93/VVr8B8=", id="sdk-port-stripped"),
        pytest.param(URL, SDK_PARAMS, "kvajT1Ptam85bY51eRf/AJRuM3w=", id="signed-with-443"),
        pytest.param("https://mycompany.com:443/myapp.php?foo=1&bar=2", SDK_PARAMS,
                     "kvajT1Ptam85bY51eRf/AJRuM3w=", id="url-with-443"),
        pytest.param("http://mycompany.com/myapp.php?foo=1&bar=2", SDK_PARAMS,
                     "0ZXoZLH/DfblKGATFgpif+LLRf4=", id="http-signed-with-80"),
        pytest.param("http://mycompany.com:80/myapp.php?foo=1&bar=2", SDK_PARAMS,
                     "0ZXoZLH/DfblKGATFgpif+LLRf4=", id="http-url-with-80"),
        pytest.param("http://mycompany.com:1234/myapp.php?foo=1&bar=2", SDK_PARAMS,
                     "Zmvh+3yNM1Phv2jhDCwEM3q5ebU=", id="http-port-1234"),
        pytest.param(URL, [("Sid", "CA123"), ("SidAccount", "AC123"), ("Digits", "5678"),
                           ("Digits", "1234"), ("Digits", "1234")],
                     "IK+Dwps556ElfBT0I3Rgjkr1wJU=", id="duplicate-params"),
    ],
)
def test_signature_vectors_verify(url: str, params: list[tuple[str, str]], signature: str) -> None:
    carrier().verify(post(url, params, signature))


def test_duplicate_params_are_not_collapsed_to_one_value() -> None:
    form = [("Sid", "CA123"), ("SidAccount", "AC123"), ("Digits", "5678")]
    with pytest.raises(SignatureInvalid, match="signature does not match"):
        carrier().verify(post(URL, form, "IK+Dwps556ElfBT0I3Rgjkr1wJU="))  # Digits=1234 missing


def test_form_parsed_from_body_when_gateway_gave_none() -> None:
    body = b"CallSid=CA1234567890ABCDE&Caller=%2B12349013030&Digits=1234&From=%2B12349013030&To=%2B18005551212"
    request = WebhookRequest("POST", URL, {**FORM, "x-twilio-signature": "0/KCTR6DLpKmkAf8muzZqo1nDgQ="}, body)
    carrier().verify(request)
    assert carrier().parse_call(request).from_ == "+12349013030"


def test_json_body_sha256_vector() -> None:
    body = b'{"property": "value", "boolean": true}'
    url = URL + "&bodySHA256=0a1ff7634d9ab3b95db5c9a2dfe9416e41502b283a80c7cf19632632f96e6620"
    headers = {"content-type": "application/json", "x-twilio-signature": "a9nBmqA0ju/hNViExpshrM61xv4="}
    carrier().verify(WebhookRequest("POST", url, headers, body))
    with pytest.raises(SignatureInvalid, match=r"^twilio: bodySHA256 does not match body$"):
        carrier().verify(WebhookRequest("POST", url, headers, body.replace(b"true", b"false")))
    with pytest.raises(SignatureInvalid, match=r"^twilio: signature does not match$"):
        carrier().verify(WebhookRequest("POST", url.replace("foo=1", "foo=9"), headers, body))


def test_json_body_without_body_hash_rejected() -> None:
    from twilio.request_validator import RequestValidator

    sig = RequestValidator(TOKEN).compute_signature(URL, {})  # a URL-only signature (e.g. from a GET)
    headers = {"content-type": "application/json", "x-twilio-signature": sig}
    with pytest.raises(SignatureInvalid, match="^twilio: JSON body without bodySHA256 in the URL$"):
        carrier().verify(WebhookRequest("POST", URL, headers, b'{"CallSid": "CAforged"}'))


SETTINGS = "key=webhooks_sharedkey_x,algorithm=HMAC_SHA256"
SHA256_SIG = "Rmm4Vzj+Ky7JGoWXMCsZDZuHDszLr9xvdbvitrDr4/M="


def test_shared_key_sha256_vector() -> None:
    c = carrier(auth_token="not-the-shared-key", shared_key_secrets={"webhooks_sharedkey_x": TOKEN})
    c.verify(post(URL, DOC_PARAMS, SHA256_SIG, **{"x-twilio-webhooks-signature-settings": SETTINGS}))


def test_sha256_signature_rejected_as_sha1() -> None:
    with pytest.raises(SignatureInvalid, match=r"^twilio: signature does not match$"):
        carrier().verify(post(URL, DOC_PARAMS, SHA256_SIG))  # no settings header -> SHA1 + auth token
    c = carrier(shared_key_secrets={"webhooks_sharedkey_x": TOKEN})
    with pytest.raises(SignatureInvalid, match=r"^twilio: signature does not match$"):
        c.verify(post(URL, DOC_PARAMS, SHA256_SIG,
                      **{"x-twilio-webhooks-signature-settings": "key=webhooks_sharedkey_x,algorithm=HMAC_SHA1"}))


@pytest.mark.parametrize(
    ("settings", "reason"),
    [
        ("key=webhooks_sharedkey_other,algorithm=HMAC_SHA256", "unknown signature key id"),
        ("algorithm=HMAC_SHA256", "signature settings header names no key"),
        ("key=webhooks_sharedkey_x,algorithm=HMAC_MD5", "unsupported signature algorithm"),
    ],
)
def test_shared_key_settings_rejected(settings: str, reason: str) -> None:
    c = carrier(shared_key_secrets={"webhooks_sharedkey_x": TOKEN})
    with pytest.raises(SignatureInvalid, match=f"^twilio: {reason}$"):
        c.verify(post(URL, DOC_PARAMS, SHA256_SIG, **{"x-twilio-webhooks-signature-settings": settings}))


def test_shared_key_does_not_fall_back_to_auth_token() -> None:
    # Settings header present -> only the SharedKey secret may sign, even if the auth token would match.
    c = carrier(shared_key_secrets={"webhooks_sharedkey_x": "other-secret"})
    with pytest.raises(SignatureInvalid, match="signature does not match"):
        c.verify(post(URL, DOC_PARAMS, SHA256_SIG, **{"x-twilio-webhooks-signature-settings": SETTINGS}))


@pytest.mark.parametrize(
    ("url", "form", "signature", "reason"),
    [
        (URL, DOC_PARAMS, None, "missing X-Twilio-Signature header"),
        (URL, DOC_PARAMS, "", "missing X-Twilio-Signature header"),
        (URL, DOC_PARAMS, "1/KCTR6DLpKmkAf8muzZqo1nDgQ=", "signature does not match"),
        (URL, [*DOC_PARAMS[:-1], ("To", "+18005550000")], "0/KCTR6DLpKmkAf8muzZqo1nDgQ=", "signature does not match"),
        (URL, [*DOC_PARAMS, ("Extra", "x")], "0/KCTR6DLpKmkAf8muzZqo1nDgQ=", "signature does not match"),
        (URL.replace("https", "http"), DOC_PARAMS, "0/KCTR6DLpKmkAf8muzZqo1nDgQ=", "signature does not match"),
        (URL.replace("foo=1", "foo=2"), DOC_PARAMS, "0/KCTR6DLpKmkAf8muzZqo1nDgQ=", "signature does not match"),
    ],
)
def test_forged_or_missing_signature(url: str, form: list[tuple[str, str]], signature: str | None,
                                     reason: str) -> None:
    with pytest.raises(SignatureInvalid, match=f"^twilio: {reason}$"):
        carrier().verify(post(url, form, signature))


def test_wrong_auth_token_rejected() -> None:
    with pytest.raises(SignatureInvalid, match="signature does not match"):
        carrier(auth_token="54321").verify(post(URL, DOC_PARAMS, "0/KCTR6DLpKmkAf8muzZqo1nDgQ="))


def test_get_webhook_signs_url_only() -> None:
    from twilio.request_validator import RequestValidator

    url = "https://gw.example.com/start/twilio?CallSid=CA1&From=%2B1555"
    sig = RequestValidator(TOKEN).compute_signature(url, {})
    request = WebhookRequest("GET", url, {"x-twilio-signature": sig}, b"")
    carrier().verify(request)
    call = carrier().parse_call(request)
    assert (call.call_id, call.from_) == ("CA1", "+1555")


def test_verification_disabled() -> None:
    carrier(verify_signatures=False).verify(post(URL, DOC_PARAMS, None))


# ------------------------------------------------------------------------------------ parse_call

def test_parse_call_from_form() -> None:
    form = [("CallSid", CALL), ("AccountSid", ACCOUNT), ("From", "+14155550100"), ("To", "+14155550199"),
            ("Direction", "inbound"), ("CallStatus", "ringing"), ("X-Custom", "no"), ("CustomFoo", "no")]
    assert carrier().parse_call(post(URL, form, None)) == CallInfo(
        carrier="twilio", call_id=CALL, from_="+14155550100", to="+14155550199", account_id=ACCOUNT,
        direction="inbound", custom={},
    )


def test_parse_call_outbound_and_json() -> None:
    body = json.dumps({"CallSid": CALL, "From": "client:alice", "To": "+1", "Direction": "outbound-api"}).encode()
    call = carrier().parse_call(WebhookRequest("POST", URL, {"content-type": "application/json"}, body))
    assert (call.call_id, call.from_, call.direction) == (CALL, "client:alice", "outbound")


@pytest.mark.parametrize("form", [[], [("From", "+1")], [("CallSid", "")]])
def test_parse_call_without_call_sid(form: list[tuple[str, str]]) -> None:
    with pytest.raises(CarrierProtocolError, match="^twilio webhook has no CallSid$"):
        carrier().parse_call(post(URL, form, None))


def test_parse_call_bad_json() -> None:
    headers = {"content-type": "application/json"}
    with pytest.raises(CarrierProtocolError, match="not valid JSON"):
        carrier().parse_call(WebhookRequest("POST", URL, headers, b"{"))
    with pytest.raises(CarrierProtocolError, match="not a JSON object"):
        carrier().parse_call(WebhookRequest("POST", URL, headers, b"[]"))


# ------------------------------------------------------------------------------------ TwiML

def tree(xml: str) -> Any:
    def walk(e: ET.Element) -> Any:
        return (e.tag, dict(e.attrib), (e.text or "").strip(), [walk(c) for c in e])

    return walk(ET.fromstring(xml.encode()))


def sdk_twiml(url: str, params: dict[str, str]) -> str:
    response = VoiceResponse()
    stream = response.connect().stream(url=url)
    for name, value in params.items():
        stream.parameter(name=name, value=value)
    return str(response)


CALL_INFO = CallInfo(carrier="twilio", call_id=CALL, from_="+14155550100")


def test_answer_matches_documented_twiml_and_sdk() -> None:
    url = "wss://gw.example.com/ws/twilio/3f9c1e"
    params = {"session_id": "3f9c1e", "from_number": "+14155550100"}
    body, media_type = carrier().answer(CALL_INFO, url, params)
    assert media_type == "text/xml"
    assert body.startswith('<?xml version="1.0" encoding="UTF-8"?><Response><Connect><Stream url="')
    assert tree(body) == tree(sdk_twiml(url, params))
    documented = """<?xml version="1.0" encoding="UTF-8"?>
        <Response>
          <Connect>
            <Stream url="wss://gw.example.com/ws/twilio/3f9c1e">
              <Parameter name="session_id" value="3f9c1e"/>
              <Parameter name="from_number" value="+14155550100"/>
            </Stream>
          </Connect>
        </Response>"""
    assert tree(body) == tree(documented)
    assert [el.attrib for el in ET.fromstring(body).iter("Parameter")] == [
        {"name": "session_id", "value": "3f9c1e"}, {"name": "from_number", "value": "+14155550100"}]


def test_answer_escapes_hostile_values() -> None:
    url = "wss://gw.example.com/ws/twilio/a&b\"c<d>'"
    params = {'n"<&>': '"/><Hangup/><Parameter name="x', "tabs": "a\tb\nc\r", "dollar": "$stream_url ${x}"}
    body, _ = carrier().answer(CALL_INFO, url, params)
    assert tree(body) == tree(sdk_twiml(url, params))
    root = ET.fromstring(body.encode())
    stream = root.find("Connect/Stream")
    assert stream is not None and stream.attrib["url"] == url
    assert {p.attrib["name"]: p.attrib["value"] for p in root.iter("Parameter")} == params
    assert root.find(".//Hangup") is None


def test_answer_without_parameters() -> None:
    body, _ = carrier().answer(CALL_INFO, "wss://gw.example.com/ws/twilio/x", {})
    assert tree(body) == tree(sdk_twiml("wss://gw.example.com/ws/twilio/x", {}))


@pytest.mark.parametrize("url", ["https://gw.example.com/ws", "ws://gw.example.com/ws", "/ws/twilio/x",
                                 "wss://gw.example.com/ws?token=1"])
def test_answer_rejects_bad_stream_url(url: str) -> None:
    with pytest.raises(ValueError):
        carrier().answer(CALL_INFO, url, {})


def test_answer_rejects_xml_invalid_characters() -> None:
    with pytest.raises(ValueError, match="XML"):
        carrier().answer(CALL_INFO, "wss://gw.example.com/ws", {"a": "bell\x07"})


def test_busy_says_the_text_and_hangs_up() -> None:
    check_xml_busy(carrier().busy, "Say", "text/xml")
    response = VoiceResponse()
    response.say(HOSTILE)
    response.hangup()
    assert tree(carrier().busy(CALL_INFO, HOSTILE)[0]) == tree(str(response))


# ------------------------------------------------------------------------------------ media stream

def test_decode_documented_session() -> None:
    stream = carrier().open_stream()
    assert stream.sample_rate == 8000 and not stream.started
    assert stream.decode(CONNECTED) == []
    assert stream.decode(START) == [StreamStarted(
        stream_id=STREAM, call_id=CALL, account_id=ACCOUNT,
        custom_parameters={"session_id": "3f9c1e", "from_number": "+14155550100"},
        sample_rate=8000, encoding="audio/x-mulaw")]
    assert stream.started and stream.stream_sid == STREAM and stream.call_sid == CALL
    assert stream.decode(MEDIA) == [AudioFrame(pcm(TONE8_ROUND_TRIP), 8000)]
    assert stream.decode(DTMF) == [Dtmf("5")]
    assert stream.decode(MARK) == [MarkPlayed("utt-7")]
    assert stream.decode(STOP) == [StreamStopped("stop")]


def test_decode_ignores_outbound_track_and_unknown_events() -> None:
    stream = started_stream()
    outbound = json.loads(MEDIA)
    outbound["media"]["track"] = "outbound"
    assert stream.decode(json.dumps(outbound)) == []
    assert stream.decode(json.dumps({"event": "someday-new", "streamSid": STREAM})) == []


def test_stop_before_start_still_ends_the_stream() -> None:
    assert carrier().open_stream().decode(STOP) == [StreamStopped("stop")]


def test_decode_silence_frame() -> None:
    stream = started_stream()
    msg = json.dumps({"event": "media", "streamSid": STREAM, "media": {"payload": "/" * 213 + "w=="}})
    assert stream.decode(msg) == [AudioFrame(b"\x00\x00" * 160, 8000)]


def test_encode_tone8_vector() -> None:
    stream = started_stream()
    assert stream.encode(AudioFrame(pcm(TONE8_PCM), 8000)) == [
        '{"event":"media","streamSid":"MZ18ad3ab5a668481ce02b83e7395059f0","media":{"payload":"/6mgqf8pICk="}}']


def test_encode_mark_and_clear() -> None:
    stream = started_stream()
    assert stream.encode(Mark("utt-7")) == [
        '{"event":"mark","streamSid":"MZ18ad3ab5a668481ce02b83e7395059f0","mark":{"name":"utt-7"}}']
    assert stream.encode(Clear()) == ['{"event":"clear","streamSid":"MZ18ad3ab5a668481ce02b83e7395059f0"}']
    assert json.loads(stream.encode(Mark('a"\\b'))[0])["mark"]["name"] == 'a"\\b'


def test_round_trip_through_encode_and_decode() -> None:
    stream = started_stream()
    [out] = stream.encode(AudioFrame(pcm(TONE8_PCM), 8000))
    echoed = json.loads(out)
    echoed["media"]["track"] = "inbound"
    assert stream.decode(json.dumps(echoed)) == [AudioFrame(pcm(TONE8_ROUND_TRIP), 8000)]
    assert stream.encode(AudioFrame(pcm(TONE8_ROUND_TRIP), 8000)) == [out]  # µ-law is idempotent after one pass


def test_encode_errors() -> None:
    fresh = carrier().open_stream()
    for frame in (AudioFrame(pcm(TONE8_PCM), 8000), Mark("m"), Clear()):
        with pytest.raises(CarrierProtocolError, match="not started"):
            fresh.encode(frame)
    stream = started_stream()
    with pytest.raises(ValueError, match="8000 Hz"):
        stream.encode(AudioFrame(pcm(TONE8_PCM), 16000))
    for frame in (Dtmf("1"), MarkPlayed("m"), StreamStopped(), StreamStarted("MZ", "CA")):
        with pytest.raises(ValueError, match="cannot send"):
            stream.encode(frame)
    assert stream.encode(AudioFrame(b"", 8000)) == []


def media(payload: Any = "/6mgqf8pICk=", **top: Any) -> str:
    return json.dumps({"event": "media", "streamSid": STREAM, "media": {"track": "inbound", "payload": payload},
                       **top})


def start(**start_fields: Any) -> str:
    message = json.loads(START)
    message["start"].update(start_fields)
    message["start"] = {k: v for k, v in message["start"].items() if v is not None}
    return json.dumps(message)


@pytest.mark.parametrize(
    ("started", "message", "text"),
    [
        (False, b'{"event":"connected"}', "twilio sends text frames only"),
        (False, "not json", "twilio message is not valid JSON"),
        (False, "[" * 100_000, "twilio message is not valid JSON"),
        (False, '["event"]', "twilio message has no event"),
        (False, '{"protocol":"Call"}', "twilio message has no event"),
        (False, '{"event":5}', "twilio message has no event"),
        (False, media(), "twilio media before start"),
        (False, DTMF, "twilio dtmf before start"),
        (False, MARK, "twilio mark before start"),
        (True, START, "twilio sent a second start event"),
        (False, '{"event":"start"}', "twilio start event has no start object"),
        (False, start(streamSid=None), "twilio start event has no start.streamSid"),
        (False, start(callSid=None), "twilio start event has no start.callSid"),
        (False, start(callSid=7), "twilio start event has no start.callSid"),
        (False, start(streamSid="MZother"), "twilio streamSid does not match start.streamSid"),
        (False, start(mediaFormat={"encoding": "audio/x-l16", "sampleRate": 16000, "channels": 1}),
         "twilio start.mediaFormat audio/x-l16 16000 Hz 1 channel(s) is not supported "
         "(expected audio/x-mulaw 8000 Hz mono)"),
        (False, start(mediaFormat={"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 2}),
         "is not supported"),
        (False, start(mediaFormat="mulaw"), "twilio start.mediaFormat is not an object"),
        (False, start(customParameters=["a"]), "twilio start.customParameters is not an object of strings"),
        (True, '{"event":"media","streamSid":"' + STREAM + '"}', "twilio media event has no media.payload"),
        (True, media(payload=None), "twilio media event has no media.payload"),
        (True, media(payload=123), "twilio media event has no media.payload"),
        (True, media(payload="/6mg qf8pICk="), "twilio media payload is not valid base64"),
        (True, media(payload="/6mgqf8pICk"), "twilio media payload is not valid base64"),
        (True, media(payload="!!!!"), "twilio media payload is not valid base64"),
        (True, media(streamSid="MZother"), "twilio streamSid does not match the stream"),
        (True, DTMF.replace(STREAM, "MZother"), "twilio streamSid does not match the stream"),
        (True, STOP.replace(STREAM, "MZother"), "twilio streamSid does not match the stream"),
        (True, '{"event":"dtmf","streamSid":"' + STREAM + '","dtmf":{}}', "twilio dtmf event has no dtmf.digit"),
        (True, DTMF.replace('"5"', '"55"'), "twilio dtmf digit is not one of 0-9 * # A-D"),
        (True, DTMF.replace('"5"', '"E"'), "twilio dtmf digit is not one of 0-9 * # A-D"),
        (True, '{"event":"mark","streamSid":"' + STREAM + '"}', "twilio mark event has no mark.name"),
    ],
)
def test_decode_errors(started: bool, message: str | bytes, text: str) -> None:
    stream = started_stream() if started else carrier().open_stream()
    with pytest.raises(CarrierProtocolError) as info:
        stream.decode(message)
    assert text in str(info.value)
    assert str(info.value).startswith("twilio ")


@pytest.mark.parametrize("digit", list("0123456789*#ABCD"))
def test_decode_every_dtmf_digit(digit: str) -> None:
    assert started_stream().decode(DTMF.replace('"5"', json.dumps(digit))) == [Dtmf(digit)]


# ------------------------------------------------------------------------------------ hang-up

@pytest.mark.asyncio
async def test_hang_up_success() -> None:
    async with FakeTwilioREST(ACCOUNT, TOKEN) as fake, httpx.AsyncClient() as http:
        fake.known_calls = {CALL}
        c = carrier(http, api_base_url=fake.base_url + "/")
        await c.hang_up(CallInfo(carrier="twilio", call_id=CALL))
        assert fake.ended_calls == [CALL]
        [request] = fake.requests
        assert (request.method, request.path, request.form, request.auth_ok) == (
            "POST", f"/2010-04-01/Accounts/{ACCOUNT}/Calls/{CALL}.json", {"Status": ["completed"]}, True)
        # a second hang-up finds the call gone (404 / 20404): still success
        await c.hang_up(CallInfo(carrier="twilio", call_id=CALL))
        assert fake.ended_calls == [CALL]


@pytest.mark.asyncio
async def test_hang_up_unknown_call_is_success(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    async with FakeTwilioREST(ACCOUNT, TOKEN) as fake, httpx.AsyncClient() as http:
        await carrier(http, api_base_url=fake.base_url).hang_up(CallInfo(carrier="twilio", call_id=CALL))
        assert fake.ended_calls == [] and len(fake.requests) == 1
    assert "already ended" in caplog.text


@pytest.mark.asyncio
async def test_hang_up_wrong_token(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    async with FakeTwilioREST(ACCOUNT, TOKEN) as fake, httpx.AsyncClient() as http:
        fake.known_calls = {CALL}
        c = carrier(http, auth_token="wrong-token-value", api_base_url=fake.base_url)
        with pytest.raises(HangupFailed, match="HTTP 401 code 20003: Authenticate") as info:
            await c.hang_up(CallInfo(carrier="twilio", call_id=CALL))
        assert fake.ended_calls == [] and fake.requests[0].auth_ok is False
    assert "wrong-token-value" not in str(info.value) + caplog.text + repr(c)


@pytest.mark.asyncio
async def test_hang_up_server_error() -> None:
    async with FakeTwilioREST(ACCOUNT, TOKEN) as fake, httpx.AsyncClient() as http:
        fake.known_calls = {CALL}
        fake.force_error = (503, 20503, "Service unavailable")
        with pytest.raises(HangupFailed, match="HTTP 503 code 20503: Service unavailable"):
            await carrier(http, api_base_url=fake.base_url).hang_up(CallInfo(carrier="twilio", call_id=CALL))


@pytest.mark.asyncio
async def test_hang_up_404_that_is_not_twilio_is_a_failure() -> None:
    transport = httpx.MockTransport(lambda request: httpx.Response(404, text="nginx: not found"))
    async with httpx.AsyncClient(transport=transport) as http:
        with pytest.raises(HangupFailed, match="HTTP 404"):
            await carrier(http).hang_up(CallInfo(carrier="twilio", call_id=CALL))


@pytest.mark.asyncio
async def test_hang_up_transport_error_is_chained() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    async with httpx.AsyncClient(transport=httpx.MockTransport(refuse)) as http:
        with pytest.raises(HangupFailed, match="ConnectError") as info:
            await carrier(http).hang_up(CallInfo(carrier="twilio", call_id=CALL))
    assert isinstance(info.value.__cause__, httpx.ConnectError)


@pytest.mark.asyncio
async def test_fake_rejects_bad_requests() -> None:
    async with FakeTwilioREST(ACCOUNT, TOKEN) as fake, httpx.AsyncClient(base_url=fake.base_url) as http:
        fake.known_calls = {CALL}
        path = f"/2010-04-01/Accounts/{ACCOUNT}/Calls/{CALL}.json"
        bad_status = await http.post(path, data={"Status": "ringing"}, auth=(ACCOUNT, TOKEN))
        assert bad_status.status_code == 400 and bad_status.json()["code"] == 20001
        wrong_method = await http.get(path, auth=(ACCOUNT, TOKEN))
        assert wrong_method.status_code == 405
        other_account = await http.post(path.replace(ACCOUNT, "AC" + "9" * 32), data={"Status": "completed"},
                                        auth=(ACCOUNT, TOKEN))
        assert other_account.json() == {
            "code": 20404, "message": f"The requested resource {path.replace(ACCOUNT, 'AC' + '9' * 32)} was not found",
            "more_info": "https://www.twilio.com/docs/errors/20404", "status": 404}
        no_auth = await http.post(path, data={"Status": "completed"})
        assert no_auth.status_code == 401 and no_auth.json()["message"] == "Authenticate"
        canceled = await http.post(path, data={"Status": "canceled"}, auth=(ACCOUNT, TOKEN))
        assert canceled.json()["status"] == "canceled" and fake.ended_calls == [CALL]


# ---------------------------------------------------------------- the media message read without a JSON parser

_SID = "MZ" + "ab" * 16
_FIELDS = {
    "seq": st.one_of(st.from_regex(r"[0-9]{1,5}", fullmatch=True), st.sampled_from(["", "3a", "-1", "1" * 21])),
    "sid": st.sampled_from([_SID, "MZ" + "cd" * 16, "", "MZ-1", "MZ" + "a" * 70]),
    "track": st.sampled_from(["inbound", "outbound", "both", ""]),
    "num": st.one_of(st.from_regex(r"[0-9]{1,5}", fullmatch=True), st.sampled_from(["", "x"])),
    "payload": st.one_of(st.binary(max_size=200).map(lambda b: base64.b64encode(b).decode()),
                         st.from_regex(r"[A-Za-z0-9+/=]{0,12}", fullmatch=True),
                         st.sampled_from(["AAA", "A===", "AA=A", "////", "AA\\u0041A", "AAAA\\n",
                                          'AAAA"},"x":{"y":"AAAA', 'AAAA"}} ', "AAAA\n"])),
}


def _outcome(decode: Any, message: str) -> tuple[str, Any]:
    try:
        return "frames", decode(message)
    except CarrierProtocolError as exc:
        return "error", str(exc)


@settings(max_examples=400, deadline=None)
@given(seq=_FIELDS["seq"], sid=_FIELDS["sid"], track=_FIELDS["track"], chunk=_FIELDS["num"],
       timestamp=_FIELDS["num"], payload=_FIELDS["payload"], spaced=st.booleans())
def test_media_messages_read_without_the_parser_match_the_parser(seq: str, sid: str, track: str, chunk: str,
                                                                  timestamp: str, payload: str, spaced: bool) -> None:
    stream = TwilioMediaStream()
    stream.decode(json.dumps({"event": "start", "streamSid": _SID, "start": {
        "streamSid": _SID, "callSid": "CA" + "0" * 32, "accountSid": "AC" + "0" * 32,
        "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}}}))
    message = ('{"event":"media","sequenceNumber":"%s","streamSid":"%s","media":{"track":"%s","chunk":"%s",'
               '"timestamp":"%s","payload":"%s"}}' % (seq, sid, track, chunk, timestamp, payload))
    if spaced:
        message = message.replace('":"', '": "')         # valid JSON, another layout: the parser reads it
    assert _outcome(stream.decode, message) == _outcome(stream.decode_json, message)


def test_the_fast_media_path_reads_twilios_own_layout() -> None:
    stream = TwilioMediaStream()
    stream.decode(json.dumps({"event": "start", "streamSid": _SID, "start": {
        "streamSid": _SID, "callSid": "CA" + "0" * 32, "mediaFormat": {"encoding": "audio/x-mulaw",
                                                                        "sampleRate": 8000, "channels": 1}}}))
    message = ('{"event":"media","sequenceNumber":"3","streamSid":"%s","media":{"track":"inbound","chunk":"2",'
               '"timestamp":"20","payload":"/6mgqf8pICk="}}' % _SID)
    assert _MEDIA_HEAD(message) is not None          # docs/carriers.md's example takes the fast path
    assert stream.decode(message) == [AudioFrame(ulaw_decode(base64.b64decode("/6mgqf8pICk=")), 8000)]
    other = message.replace(_SID, "MZ" + "ef" * 16)
    with pytest.raises(CarrierProtocolError, match="streamSid does not match"):
        stream.decode(other)
    assert stream.decode(message.replace("inbound", "outbound")) == []
