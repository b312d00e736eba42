"""Tests for carriers/exotel.py and gateway/simulate/dialects/exotel.py against the §6 / §9.6 vectors of
docs/carriers.md and a fake Exotel REST API."""

from __future__ import annotations

import base64
import dataclasses
import json
import logging
import struct
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

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
from carriers.exotel import ExotelCarrier, ExotelMediaStream
from gateway.simulate.dialects import dialect_for
from gateway.simulate.dialects.base import Inbound
from gateway.simulate.dialects.exotel import ExotelDialect
from pipeline.frames import AudioFrame, Clear, Dtmf, Mark, MarkPlayed, StreamStarted, StreamStopped
from tests.fakes.exotel_rest import FakeExotelREST

SID = "acme1"
API_KEY = "exotel-api-key-0001"
API_TOKEN = "exotel-api-token-secret-0002"
USER, PASSWORD = "EXOTEL_API_KEY", "EXOTEL_API_TOKEN"
BASIC = "Basic RVhPVEVMX0FQSV9LRVk6RVhPVEVMX0FQSV9UT0tFTg=="   # §9.6, documented
STREAM = "MZxxxxxxxxxxxxxxxx"
CALL = "CAxxxxxxxxxxxxxxxx"
ACCOUNT = "ACxxxxxxxxxxxxxxxx"
TONE8_PCM = [0, 5657, 8000, 5657, 0, -5657, -8000, -5657]
TONE8_B64 = "AAAZFkAfGRYAAOfpwODn6Q=="                            # §9.1 PCM16 LE
TONE8_ULAW_B64 = "/6mgqf8pICk="
TONE8_ULAW_ROUND_TRIP = [0, 5628, 7932, 5628, 0, -5628, -7932, -5628]
PUBLIC = "https://gw.example.com"

CONNECTED = '{"event":"connected"}'
START = json.dumps({
    "event": "start", "sequence_number": "1", "stream_sid": STREAM,
    "start": {"stream_sid": STREAM, "call_sid": CALL, "account_sid": ACCOUNT, "from": "+919876543210",
              "to": "+918047491899", "custom_parameters": {"session": "3f9c1e"},
              "media_format": {"encoding": "audio/x-raw", "sample_rate": "8000", "bit_rate": "16"}},
})
MEDIA = json.dumps({"event": "media", "sequence_number": "3", "stream_sid": STREAM,
                    "media": {"chunk": "2", "timestamp": "200", "payload": TONE8_B64}})
DTMF = '{"event":"dtmf","sequence_number":"7","stream_sid":"%s","dtmf":{"digit":"5","duration":"100"}}' % STREAM
MARK = '{"event":"mark","sequence_number":"15","stream_sid":"%s","mark":{"name":"utt-7"}}' % STREAM
STOP = json.dumps({"event": "stop", "sequence_number": "99", "stream_sid": STREAM,
                   "stop": {"call_sid": CALL, "account_sid": ACCOUNT, "reason": "callended"}})


def pcm(samples: list[int]) -> bytes:
    return struct.pack(f"<{len(samples)}h", *samples)


def carrier(http: httpx.AsyncClient | None = None, **kwargs: Any) -> ExotelCarrier:
    kwargs.setdefault("basic_auth_user", USER)
    kwargs.setdefault("basic_auth_password", PASSWORD if kwargs["basic_auth_user"] else "")  # user "": no Basic
    kwargs.setdefault("api_key", API_KEY)
    kwargs.setdefault("api_token", API_TOKEN)
    return ExotelCarrier(sid=SID, http=http or httpx.AsyncClient(), **kwargs)


def hook(headers: dict[str, str] | None = None, query: str = "CallSid=c1&CallFrom=09876543210&CallTo=08047491899",
         method: str = "GET", body: bytes = b"", form: tuple[tuple[str, str], ...] = ()) -> WebhookRequest:
    return WebhookRequest(method, f"{PUBLIC}/start/exotel?{query}", headers or {}, body, form)


def started_stream(**kwargs: Any) -> ExotelMediaStream:
    stream = ExotelMediaStream(**kwargs)
    stream.decode(START)
    return stream


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


# ------------------------------------------------------------------------------------ authenticity

def test_basic_auth_vector() -> None:
    assert basic(USER, PASSWORD) == BASIC
    carrier().verify(hook({"authorization": BASIC}))
    carrier().verify_websocket({"authorization": BASIC}, "wss://gw.example.com/ws/exotel/3f9c1e?sample-rate=8000")
    carrier().verify_websocket({"Authorization": BASIC}, "wss://gw.example.com/x")  # any header case


@pytest.mark.parametrize(
    ("headers", "reason"),
    [
        ({}, "missing Authorization header"),
        ({"authorization": ""}, "missing Authorization header"),
        ({"authorization": "Bearer " + BASIC[6:]}, "Authorization is not Basic"),
        ({"authorization": "Basic !!!not-base64"}, "malformed Basic credentials"),
        ({"authorization": "Basic " + base64.b64encode(b"no-colon").decode()}, "malformed Basic credentials"),
        ({"authorization": "Basic " + base64.b64encode(b"\xff\xfe:x").decode()}, "malformed Basic credentials"),
        ({"authorization": basic(USER, "EXOTEL_API_TOKEM")}, "Basic credentials do not match"),
        ({"authorization": basic("EXOTEL_API_KEX", PASSWORD)}, "Basic credentials do not match"),
        ({"authorization": basic(USER, PASSWORD + "x")}, "Basic credentials do not match"),
        ({"authorization": basic(USER, "")}, "Basic credentials do not match"),
    ],
)
def test_forged_or_missing_credentials(headers: dict[str, str], reason: str) -> None:
    with pytest.raises(SignatureInvalid, match=f"^exotel: {reason}$"):
        carrier().verify(hook(headers))
    with pytest.raises(SignatureInvalid, match=f"^exotel: {reason}$"):
        carrier().verify_websocket(headers, "wss://gw.example.com/media/exotel/s1")


def test_nothing_configured_refuses_everything(caplog: pytest.LogCaptureFixture) -> None:
    c = carrier(basic_auth_user="", basic_auth_password="")
    assert "every webhook" in caplog.text
    with pytest.raises(SignatureInvalid, match="^exotel: no basic auth or allowed_ips configured"):
        c.verify(hook({"authorization": BASIC}))
    with pytest.raises(SignatureInvalid, match="^exotel: no basic auth or allowed_ips configured"):
        c.verify_websocket({}, "wss://x/y")


def test_password_only_basic_auth() -> None:
    c = carrier(basic_auth_user="", basic_auth_password="only-a-password")
    c.verify(hook({"authorization": basic("", "only-a-password")}))
    with pytest.raises(SignatureInvalid, match="do not match"):
        c.verify(hook({"authorization": basic("x", "only-a-password")}))
    body, _ = c.answer(CALL_INFO, "wss://h/p", {})
    assert json.loads(body)["url"] == "wss://:only-a-password@h/p?sample-rate=8000"


def test_verification_disabled() -> None:
    c = carrier(basic_auth_user="", verify_signatures=False)
    c.verify(hook({}))
    c.verify_websocket({}, "wss://x/y")


ALLOW = ("203.0.113.0/24", "2001:db8::/32", "198.51.100.7")


@pytest.mark.parametrize("forwarded", ["203.0.113.9", "10.0.0.1, 203.0.113.9", "198.51.100.7",
                                       "203.0.113.9:4431", "[2001:db8::5]:443", "2001:db8::5", "spoof, 198.51.100.7"])
def test_allowed_ips_accept(forwarded: str) -> None:
    carrier(basic_auth_user="", allowed_ips=ALLOW).verify(hook({"x-forwarded-for": forwarded}))


@pytest.mark.parametrize(
    ("headers", "reason"),
    [
        ({}, "no client address in x-forwarded-for"),
        ({"x-forwarded-for": " , "}, "no client address in x-forwarded-for"),
        ({"x-forwarded-for": "203.0.113.9, 192.0.2.1"}, "client address is not in allowed_ips"),  # right-most counts
        ({"x-forwarded-for": "198.51.100.8"}, "client address is not in allowed_ips"),
        ({"x-forwarded-for": "not-an-ip"}, "x-forwarded-for entry is not an IP address"),
    ],
)
def test_allowed_ips_refuse(headers: dict[str, str], reason: str) -> None:
    with pytest.raises(SignatureInvalid, match=f"^exotel: {reason}$"):
        carrier(basic_auth_user="", allowed_ips=ALLOW).verify(hook(headers))


def test_allowed_ips_with_two_proxies_and_own_header() -> None:
    two = carrier(basic_auth_user="", allowed_ips=ALLOW, trusted_proxy_hops=2)
    two.verify(hook({"x-forwarded-for": "1.1.1.1, 203.0.113.9, 10.0.0.2"}))
    with pytest.raises(SignatureInvalid, match="fewer entries than trusted_proxy_hops"):
        two.verify(hook({"x-forwarded-for": "203.0.113.9"}))
    own = carrier(basic_auth_user="", allowed_ips=ALLOW, client_ip_header="X-Voxray-Peer")
    own.verify(hook({"x-voxray-peer": "203.0.113.1", "x-forwarded-for": "192.0.2.1"}))
    with pytest.raises(ValueError):
        carrier(allowed_ips=("not-a-network",))
    with pytest.raises(ValueError):
        carrier(trusted_proxy_hops=0)
    with pytest.raises(ValueError, match="cannot contain ':'"):
        carrier(basic_auth_user="a:b")


def test_basic_and_ip_both_required_when_both_configured() -> None:
    c = carrier(allowed_ips=ALLOW)
    c.verify(hook({"authorization": BASIC, "x-forwarded-for": "203.0.113.9"}))
    with pytest.raises(SignatureInvalid, match="not in allowed_ips"):
        c.verify(hook({"authorization": BASIC, "x-forwarded-for": "192.0.2.1"}))
    with pytest.raises(SignatureInvalid, match="missing Authorization"):
        c.verify(hook({"x-forwarded-for": "203.0.113.9"}))


def test_repr_hides_secrets() -> None:
    text = repr(carrier())
    assert API_TOKEN not in text and PASSWORD not in text and SID in text


# ------------------------------------------------------------------------------------ parse_call

def test_parse_call_dynamic_url_query() -> None:
    query = "CallSid=b6cfaf0b5c0a5a0e9c8f3d2a1e4c2b1a&CallFrom=09876543210&CallTo=08047491899&Direction=incoming"
    assert carrier().parse_call(hook(query=query)) == CallInfo(
        carrier="exotel", call_id="b6cfaf0b5c0a5a0e9c8f3d2a1e4c2b1a", from_="09876543210", to="08047491899",
        account_id=SID, direction="inbound", custom={})


def test_parse_call_variants() -> None:
    c = carrier()
    call = c.parse_call(hook(query="CallSid=c2&From=%2B9199&To=%2B9180&Direction=outbound-api&CustomField=abc"
                                   "&AccountSid=other"))
    assert (call.from_, call.to, call.direction, call.custom, call.account_id) == (
        "+9199", "+9180", "outbound", {"CustomField": "abc"}, "other")
    posted = c.parse_call(hook(method="POST", query="x=1", form=(("CallSid", "c3"), ("CallFrom", "1"))))
    assert (posted.call_id, posted.from_) == ("c3", "1")
    body = b"CallSid=c4&CallTo=2"
    raw = c.parse_call(hook({"content-type": "application/x-www-form-urlencoded"}, "", "POST", body))
    assert (raw.call_id, raw.to) == ("c4", "2")
    as_json = c.parse_call(hook({"content-type": "application/json"}, "", "POST",
                                b'{"CallSid": "c5", "CallFrom": "+91", "Direction": "incoming", "n": 5}'))
    assert (as_json.call_id, as_json.from_, as_json.direction) == ("c5", "+91", "inbound")


@pytest.mark.parametrize("query", ["", "CallFrom=1", "CallSid="])
def test_parse_call_without_call_sid(query: str) -> None:
    with pytest.raises(CarrierProtocolError, match="^exotel webhook has no CallSid$"):
        carrier().parse_call(hook(query=query))


def test_parse_call_bad_json() -> None:
    headers = {"content-type": "application/json"}
    with pytest.raises(CarrierProtocolError, match="^exotel webhook body is not valid JSON$"):
        carrier().parse_call(hook(headers, "", "POST", b"{"))
    with pytest.raises(CarrierProtocolError, match="^exotel webhook body is not a JSON object$"):
        carrier().parse_call(hook(headers, "", "POST", b"[1]"))


# ------------------------------------------------------------------------------------ answer markup

CALL_INFO = CallInfo(carrier="exotel", call_id="c1", from_="09876543210", to="08047491899")


def test_answer_vector() -> None:
    body, media_type = carrier().answer(CALL_INFO, "wss://gw.example.com/ws/exotel/3f9c1e", {"session": "3f9c1e"})
    assert media_type == "application/json"
    assert json.loads(body) == {"url": "wss://EXOTEL_API_KEY:EXOTEL_API_TOKEN@gw.example.com/ws/exotel/3f9c1e"
                                       "?sample-rate=8000&session=3f9c1e"}
    url = urlsplit(json.loads(body)["url"])
    assert (url.scheme, url.hostname, url.path) == ("wss", "gw.example.com", "/ws/exotel/3f9c1e")
    assert (url.username, url.password) == (USER, PASSWORD)
    assert parse_qsl(url.query) == [("sample-rate", "8000"), ("session", "3f9c1e")]


def test_answer_without_basic_auth_or_with_it_kept_out_of_the_url() -> None:
    for c in (carrier(basic_auth_user="", allowed_ips=ALLOW), carrier(credentials_in_urls=False)):
        body, _ = c.answer(CALL_INFO, "wss://gw.example.com/media/exotel/s1", {})
        assert json.loads(body) == {"url": "wss://gw.example.com/media/exotel/s1?sample-rate=8000"}


def test_answer_escapes_hostile_values() -> None:
    user, password = 'u"@/s er%', 'p@ss:w/o"rd}{%'
    c = carrier(basic_auth_user=user, basic_auth_password=password, sample_rate=16000)
    params = {'n"}&=': '"}, "url": "wss://evil/"&x=1#', "e\u00e9": "\\\n\t"}
    body, _ = c.answer(CALL_INFO, "wss://gw.example.com:8443/media/exotel/a%20b?keep=1", params)
    data = json.loads(body)
    assert list(data) == ["url"]
    url = urlsplit(data["url"])
    assert (url.hostname, url.port, url.path) == ("gw.example.com", 8443, "/media/exotel/a%20b")
    assert (unquote(url.username or ""), unquote(url.password or "")) == (user, password)
    assert parse_qsl(url.query, keep_blank_values=True) == [("sample-rate", "16000"), ("keep", "1"), *params.items()]
    assert url.fragment == ""
    # what Exotel sends on the upgrade decodes back to the configured credentials
    dialect = ExotelDialect(credentials={"sample_rate": "16000"}, from_="1", to="2")
    dialect.answer(200, body)
    c.verify_websocket({k.lower(): v for k, v in dialect.ws_headers().items()}, "")


@pytest.mark.parametrize(
    ("url", "params", "match"),
    [
        ("https://gw.example.com/ws", {}, "wss://"),
        ("ws://gw.example.com/ws", {}, "wss://"),
        ("/media/exotel/x", {}, "wss://"),
        ("wss://u:p@gw.example.com/ws", {}, "must not carry credentials"),
        ("wss://gw.example.com/ws#frag", {}, "fragment"),
        ("wss://gw.example.com/ws", {"a": "1", "b": "2", "c": "3", "d": "4"}, "at most 3 custom parameters"),
        ("wss://gw.example.com/ws?a=1&b=2", {"c": "3", "d": "4"}, "at most 3 custom parameters"),
        ("wss://gw.example.com/ws", {"a": "x" * 255}, "exceed 256 characters"),
        ("wss://gw.example.com/ws?sample-rate=16000", {}, "sample-rate=16000"),
        ("wss://gw.example.com/ws", {"": "x"}, "non-empty strings"),
        ("wss://gw.example.com/ws", {"a": 5}, "non-empty strings"),
    ],
)
def test_answer_rejects(url: str, params: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        carrier().answer(CALL_INFO, url, params)


def test_answer_keeps_matching_sample_rate_query() -> None:
    body, _ = carrier().answer(CALL_INFO, "wss://h/p?sample-rate=8000&a=1", {"b": "2"})
    assert json.loads(body)["url"].endswith("@h/p?sample-rate=8000&a=1&b=2")


def test_busy_has_no_markup() -> None:
    """The Voicebot applet takes only a stream URL: None makes the gateway answer 503."""
    assert carrier().busy(CALL_INFO, "All our lines are busy.") is None


def test_answer_template_is_package_data() -> None:
    from importlib import resources

    assert resources.files("twiml").joinpath("exotel_answer.json").read_text().strip() == '{"url": $url}'


# ------------------------------------------------------------------------------------ media: decode

def test_decode_documented_session() -> None:
    stream = carrier().open_stream()
    assert (stream.sample_rate, stream.frame_ms, stream.marks, stream.started) == (8000, 200, True, False)
    assert stream.decode(CONNECTED) == []
    assert stream.decode('{"event":"connected","protocol":"Call","version":"1.0.0"}') == []
    assert stream.decode(START) == [StreamStarted(
        stream_id=STREAM, call_id=CALL, account_id=ACCOUNT, custom_parameters={"session": "3f9c1e"},
        sample_rate=8000, encoding="audio/x-l16")]
    assert stream.started and (stream.stream_sid, stream.call_sid, stream.from_, stream.to) == (
        STREAM, CALL, "+919876543210", "+918047491899")
    assert stream.decode(MEDIA) == [AudioFrame(pcm(TONE8_PCM), 8000)]
    assert stream.decode(DTMF) == [Dtmf("5")]
    assert stream.decode(MARK) == [MarkPlayed("utt-7")]
    assert stream.decode(STOP) == [StreamStopped("callended")]


def start(*, flat: bool = False, drop: tuple[str, ...] = (), top: dict[str, Any] | None = None,
          **fields: Any) -> str:
    inner = json.loads(START)["start"]
    inner.update(fields)
    inner = {k: v for k, v in inner.items() if v is not None and k not in drop}
    message: dict[str, Any] = {"event": "start", "sequence_number": "1",
                               **(top if top is not None else {"stream_sid": STREAM})}
    if flat:
        message.update(inner)
    else:
        message["start"] = inner
    return json.dumps(message)


@pytest.mark.parametrize(
    "message",
    [
        start(),
        start(drop=("stream_sid",)),                                            # top-level stream_sid only
        start(top={}),                                                          # start.stream_sid only
        start(drop=("stream_sid", "call_sid"), streamSid=STREAM, callSid=CALL, top={}),   # start.streamSid
        start(drop=("stream_sid",), top={"streamSid": STREAM}),                 # top-level streamSid
        start(flat=True, top={}),                                               # start fields at the top
    ],
)
def test_start_accepts_every_id_spelling(message: str) -> None:
    stream = ExotelMediaStream()
    [started] = stream.decode(message)
    assert isinstance(started, StreamStarted) and (started.stream_id, started.call_id) == (STREAM, CALL)
    assert stream.decode(MEDIA.replace('"stream_sid"', '"streamSid"')) == [AudioFrame(pcm(TONE8_PCM), 8000)]
    assert stream.decode(json.dumps({"event": "media", "media": {"payload": TONE8_B64}})) == [
        AudioFrame(pcm(TONE8_PCM), 8000)]                                      # id omitted: tolerated


def test_start_lenient_media_format_and_custom_parameters() -> None:
    stream = ExotelMediaStream()
    [s] = stream.decode(start(media_format={"encoding": "raw/slin", "sample_rate": "16000Hz", "bit_rate": "128kbps"},
                              custom_parameters={"session": "3f9c1e", "sample-rate": "16000", "n": 5}))
    assert isinstance(s, StreamStarted)
    assert (s.sample_rate, s.encoding, dict(s.custom_parameters)) == (16000, "audio/x-l16", {"session": "3f9c1e",
                                                                                             "n": "5"})
    assert (stream.sample_rate, stream.frame_ms) == (16000, 100)                # adopted from start
    assert stream.decode(MEDIA) == [AudioFrame(pcm(TONE8_PCM), 16000)]
    bare = ExotelMediaStream(sample_rate=24000)
    [b] = bare.decode(start(drop=("media_format", "custom_parameters", "account_sid")))
    assert isinstance(b, StreamStarted) and (b.sample_rate, b.account_id, dict(b.custom_parameters)) == (24000, "", {})


def test_mulaw_announced_or_switched() -> None:
    media = MEDIA.replace(TONE8_B64, TONE8_ULAW_B64)
    announced = ExotelMediaStream()
    [s] = announced.decode(start(media_format={"encoding": "audio/x-mulaw", "sample_rate": 8000}))
    assert isinstance(s, StreamStarted) and s.encoding == "audio/x-mulaw"
    assert announced.decode(media) == [AudioFrame(pcm(TONE8_ULAW_ROUND_TRIP), 8000)]
    switched = ExotelMediaStream(codec="ulaw")
    switched.decode(start(media_format={"encoding": "base64"}))                 # unstated -> the switch
    assert switched.decode(media) == [AudioFrame(pcm(TONE8_ULAW_ROUND_TRIP), 8000)]
    [out] = switched.encode(AudioFrame(pcm(TONE8_ULAW_ROUND_TRIP), 8000))
    payload = base64.b64decode(json.loads(out)["media"]["payload"])
    assert len(payload) == 1600 and payload[:8] == base64.b64decode(TONE8_ULAW_B64)    # 200 ms of µ-law
    alaw = ExotelMediaStream()
    alaw.decode(start(media_format={"encoding": "audio/x-alaw"}))
    assert alaw.decode(MEDIA.replace(TONE8_B64, "1YOKg9UDCgM=")) == [
        AudioFrame(pcm([8, 5760, 8064, 5760, 8, -5760, -8064, -5760]), 8000)]


def test_decode_ignores_outbound_track_unknown_events_and_empty_payload() -> None:
    stream = started_stream()
    outbound = json.loads(MEDIA)
    outbound["media"]["track"] = "outbound"
    assert stream.decode(json.dumps(outbound)) == []
    assert stream.decode('{"event":"someday-new","stream_sid":"%s"}' % STREAM) == []
    assert stream.decode(MEDIA.replace(TONE8_B64, "")) == []
    assert stream.decode(json.dumps({"Event": "media", "media": {"Payload": TONE8_B64}})) == [
        AudioFrame(pcm(TONE8_PCM), 8000)]


def test_stop_before_start_and_without_reason() -> None:
    assert ExotelMediaStream().decode(STOP) == [StreamStopped("callended")]
    assert started_stream().decode('{"event":"stop","stream_sid":"%s"}' % STREAM) == [StreamStopped("stop")]


@pytest.mark.parametrize("digit", [*"0123456789*#ABCD"])
def test_decode_every_dtmf_digit(digit: str) -> None:
    assert started_stream().decode(DTMF.replace('"5"', json.dumps(digit))) == [Dtmf(digit)]
    assert started_stream().decode(DTMF.replace('"5"', "7")) == [Dtmf("7")]  # a numeric digit


@pytest.mark.parametrize(
    ("started", "message", "text"),
    [
        (False, b'{"event":"connected"}', "exotel sends text frames only"),
        (False, "not json", "exotel message is not valid JSON"),
        (False, "[" * 100_000, "exotel message is not valid JSON"),
        (False, '["event"]', "exotel message has no event"),
        (False, '{"protocol":"Call"}', "exotel message has no event"),
        (False, '{"event":5}', "exotel message has no event"),
        (False, MEDIA, "exotel media before start"),
        (False, DTMF, "exotel dtmf before start"),
        (False, MARK, "exotel mark before start"),
        (True, START, "exotel sent a second start event"),
        (False, '{"event":"start","start":"x"}', "exotel start event has no start object"),
        (False, '{"event":"start","start":null}', "exotel start event has no start object"),
        (False, start(drop=("stream_sid",), top={}), "exotel start event has no stream_sid"),
        (False, start(drop=("call_sid",)), "exotel start event has no call_sid"),
        (False, start(call_sid=7), "exotel start event has no call_sid"),
        (False, start(top={"stream_sid": "MZother"}), "exotel stream_sid does not match start.stream_sid"),
        (False, start(custom_parameters=["a"]), "exotel start.custom_parameters is not an object of strings"),
        (False, start(custom_parameters={"a": {"b": 1}}), "exotel start.custom_parameters is not an object"),
        (False, start(media_format="raw"), "exotel start.media_format is not an object"),
        (False, start(media_format={"encoding": "audio/ogg"}),
         "exotel start.media_format.encoding 'audio/ogg' is not supported (expected PCM16 audio/x-raw or "
         "audio/x-mulaw)"),
        (False, start(media_format={"encoding": "audio/x-raw", "sample_rate": "44100"}),
         "exotel start.media_format.sample_rate 44100 is not supported (8000, 16000 or 24000)"),
        (False, start(media_format={"sample_rate": "fast"}), "sample_rate fast is not supported"),
        (True, '{"event":"media","stream_sid":"%s"}' % STREAM, "exotel media event has no media.payload"),
        (True, MEDIA.replace(f'"{TONE8_B64}"', "null"), "exotel media event has no media.payload"),
        (True, MEDIA.replace(f'"{TONE8_B64}"', "123"), "exotel media event has no media.payload"),
        (True, MEDIA.replace(TONE8_B64, "AAAZ FkAf"), "exotel media payload is not valid base64"),
        (True, MEDIA.replace(TONE8_B64, "AAAZFkAfGRYAAOfpwODn6Q"), "exotel media payload is not valid base64"),
        (True, MEDIA.replace(TONE8_B64, "!!!!"), "exotel media payload is not valid base64"),
        (True, MEDIA.replace(TONE8_B64, "AAAA"), "exotel media payload is not whole 16-bit samples (3 bytes)"),
        (True, MEDIA.replace(STREAM, "MZother"), "exotel stream_sid does not match the stream"),
        (True, MEDIA.replace(f'"stream_sid": "{STREAM}"', '"streamSid": "MZother"'),
         "exotel stream_sid does not match the stream"),
        (True, DTMF.replace(STREAM, "MZother"), "exotel stream_sid does not match the stream"),
        (True, MARK.replace(STREAM, "MZother"), "exotel stream_sid does not match the stream"),
        (True, STOP.replace(STREAM, "MZother"), "exotel stream_sid does not match the stream"),
        (True, '{"event":"dtmf","stream_sid":"%s","dtmf":{}}' % STREAM, "exotel dtmf event has no dtmf.digit"),
        (True, '{"event":"dtmf","stream_sid":"%s"}' % STREAM, "exotel dtmf event has no dtmf.digit"),
        (True, DTMF.replace('"5"', '"55"'), "exotel dtmf digit is not one of 0-9 * # A-D"),
        (True, DTMF.replace('"5"', '"E"'), "exotel dtmf digit is not one of 0-9 * # A-D"),
        (True, DTMF.replace('"5"', "12"), "exotel dtmf digit is not one of 0-9 * # A-D"),
        (True, '{"event":"mark","stream_sid":"%s"}' % STREAM, "exotel mark event has no mark.name"),
        (True, '{"event":"mark","stream_sid":"%s","mark":{"name":""}}' % STREAM, "exotel mark event has no mark.name"),
    ],
)
def test_decode_errors(started: bool, message: str | bytes, text: str) -> None:
    stream = started_stream() if started else ExotelMediaStream()
    with pytest.raises(CarrierProtocolError) as info:
        stream.decode(message)
    assert text in str(info.value)
    assert str(info.value).startswith("exotel ")


# ------------------------------------------------------------------------------------ media: encode

SILENCE_VECTOR = ('{"event":"media","stream_sid":"MZxxxxxxxxxxxxxxxx","media":{"chunk":"1","timestamp":"0",'
                  '"sequenceNumber":"1","payload":"' + "A" * 4267 + '="}}')


def test_encode_silence_vector() -> None:
    stream = started_stream()
    assert stream.encode(AudioFrame(bytes(3200), 8000)) == [SILENCE_VECTOR]    # §9.6: 3200 zero bytes, 4268 chars
    assert len(base64.b64encode(bytes(3200))) == 4268


def test_encode_tone8_is_padded_to_the_minimum_chunk() -> None:
    stream = started_stream()
    [message] = stream.encode(AudioFrame(pcm(TONE8_PCM), 8000))
    data = json.loads(message)
    assert list(data) == ["event", "stream_sid", "media"]
    assert list(data["media"]) == ["chunk", "timestamp", "sequenceNumber", "payload"]
    payload = base64.b64decode(data["media"]["payload"])
    assert payload == pcm(TONE8_PCM) + bytes(3200 - 16)
    assert data["media"]["payload"].startswith(TONE8_B64[:20])


def test_encode_mark_and_clear() -> None:
    stream = started_stream()
    assert stream.encode(Mark("utt-7")) == [
        '{"event":"mark","stream_sid":"MZxxxxxxxxxxxxxxxx","mark":{"name":"utt-7"}}']
    assert stream.encode(Clear()) == ['{"event":"clear","stream_sid":"MZxxxxxxxxxxxxxxxx"}']
    assert json.loads(stream.encode(Mark('a"\\b</'))[0])["mark"]["name"] == 'a"\\b</'


def test_outbound_id_key_switch() -> None:
    stream = started_stream(outbound_id_key="streamSid")
    assert stream.encode(Clear()) == ['{"event":"clear","streamSid":"MZxxxxxxxxxxxxxxxx"}']
    assert stream.encode(Mark("m")) == ['{"event":"mark","streamSid":"MZxxxxxxxxxxxxxxxx","mark":{"name":"m"}}']
    assert json.loads(stream.encode(AudioFrame(bytes(3200), 8000))[0])["streamSid"] == STREAM
    with pytest.raises(ValueError, match="outbound_id_key"):
        ExotelMediaStream(outbound_id_key="sid")


def test_encode_counters_and_timestamps() -> None:
    stream = started_stream()
    media = [json.loads(stream.encode(AudioFrame(bytes(3200), 8000))[0])["media"] for _ in range(3)]
    assert [(m["chunk"], m["timestamp"], m["sequenceNumber"]) for m in media] == [
        ("1", "0", "1"), ("2", "200", "2"), ("3", "400", "3")]


def check_chunks(messages: list[str | bytes], unit: int, minimum: int) -> bytes:
    out = b""
    for message in messages:
        assert isinstance(message, str)
        chunk = base64.b64decode(json.loads(message)["media"]["payload"])
        assert len(chunk) % 320 == 0 and len(chunk) % unit == 0
        assert minimum <= len(chunk) <= 102400
        out += chunk
    return out


@pytest.mark.parametrize("size", [2, 318, 320, 3198, 3200, 3202, 6400, 9602, 102400, 102402, 204800, 250002, 409602])
def test_encode_any_length_meets_the_chunk_rules(size: int) -> None:
    stream = started_stream()
    data = bytes(range(256)) * (size // 256) + bytes(size % 256)
    messages = stream.encode(AudioFrame(data, 8000))
    out = check_chunks(messages, 320, 3200)
    assert out[:size] == data and not any(out[size:])                          # padded with silence only
    assert len(out) - size < max(320, 3200 - size + 320)
    assert len(messages) == max(1, -(-len(out) // 102400))


@pytest.mark.parametrize(("rate", "frame_ms", "frame_bytes", "unit", "minimum"),
                         [(8000, 200, 3200, 320, 3200), (16000, 100, 3200, 640, 3200), (24000, 100, 4800, 960, 3840)])
def test_frame_size_per_rate(rate: int, frame_ms: int, frame_bytes: int, unit: int, minimum: int) -> None:
    stream = ExotelMediaStream(sample_rate=rate)
    stream.decode(start(media_format={"encoding": "audio/x-raw", "sample_rate": str(rate)}))
    assert (stream.sample_rate, stream.frame_ms) == (rate, frame_ms)
    assert frame_bytes == rate * frame_ms // 1000 * 2 and frame_bytes % 320 == 0
    [message] = stream.encode(AudioFrame(bytes(frame_bytes), rate))
    check_chunks([message], unit, minimum)
    check_chunks(stream.encode(AudioFrame(bytes(2), rate)), unit, minimum)
    check_chunks(stream.encode(AudioFrame(bytes(204802), rate)), unit, minimum)


def test_min_chunk_switch() -> None:
    stream = ExotelMediaStream(min_chunk_bytes=1600)
    assert stream.frame_ms == 100
    stream.decode(START)
    check_chunks(stream.encode(AudioFrame(bytes(1600), 8000)), 320, 1600)
    for bad in (0, 1000, 3201, 204800):
        with pytest.raises(ValueError, match="min_chunk_bytes"):
            ExotelMediaStream(min_chunk_bytes=bad)
    with pytest.raises(ValueError, match="sample_rate"):
        ExotelMediaStream(sample_rate=44100)
    with pytest.raises(ValueError, match="codec"):
        ExotelMediaStream(codec="opus")


def test_round_trip_through_encode_and_decode() -> None:
    stream = started_stream()
    audio = pcm(TONE8_PCM) * 200                                                 # 3200 bytes: no padding
    [out] = stream.encode(AudioFrame(audio, 8000))
    echoed = json.loads(out)
    echoed["media"]["track"] = "inbound"
    assert stream.decode(json.dumps(echoed)) == [AudioFrame(audio, 8000)]       # PCM16 is lossless


def test_encode_errors() -> None:
    fresh = ExotelMediaStream()
    for frame in (AudioFrame(pcm(TONE8_PCM), 8000), Mark("m"), Clear()):
        with pytest.raises(CarrierProtocolError, match="^exotel stream has not started"):
            fresh.encode(frame)
    stream = started_stream()
    with pytest.raises(ValueError, match="8000 Hz"):
        stream.encode(AudioFrame(pcm(TONE8_PCM), 16000))
    for frame in (Dtmf("1"), MarkPlayed("m"), StreamStopped(), StreamStarted("MZ", "CA")):
        with pytest.raises(ValueError, match="cannot send"):
            stream.encode(frame)
    assert stream.encode(AudioFrame(b"", 8000)) == []


# ------------------------------------------------------------------------------------ REST

def rest_carrier(http: httpx.AsyncClient, fake: FakeExotelREST, **kwargs: Any) -> ExotelCarrier:
    return carrier(http, api_base_url=fake.base_url + "/", legs_api_base_url=fake.base_url, **kwargs)


DIAL = DialRequest(to="+919876543210", from_="08047491899", stream_url="wss://gw.example.com/media/exotel/s9",
                   answer_url="https://gw.example.com/start/exotel?session=s9",
                   events_url="https://gw.example.com/events/exotel?session=s9",
                   parameters={"session_id": "s9"})


@pytest.mark.asyncio
@pytest.mark.parametrize("json_suffix", [False, True])
async def test_dial(json_suffix: bool) -> None:
    async with FakeExotelREST(SID, API_KEY, API_TOKEN) as fake, httpx.AsyncClient() as http:
        call = await rest_carrier(http, fake, json_suffix=json_suffix).dial(DIAL)
        [fields] = fake.dialed
        assert call == CallInfo(carrier="exotel", call_id=next(iter(fake.calls)),
                                from_="08047491899", to="+919876543210", account_id=SID, direction="outbound",
                                custom={"session_id": "s9"})
        [request] = fake.requests
        assert (request.method, request.path, request.auth_ok) == (
            "POST", f"/v1/Accounts/{SID}/Calls/connect" + (".json" if json_suffix else ""), True)
        assert fields == {
            "From": "+919876543210", "CallerId": "08047491899",
            "StreamUrl": "wss://EXOTEL_API_KEY:EXOTEL_API_TOKEN@gw.example.com/media/exotel/s9"
                         "?sample-rate=8000&session_id=s9",
            "StreamType": "bidirectional",
            "StatusCallback": "https://EXOTEL_API_KEY:EXOTEL_API_TOKEN@gw.example.com/events/exotel?session=s9",
            "StatusCallbackEvents[0]": "answered", "StatusCallbackEvents[1]": "terminal"}
        callback = urlsplit(fields["StatusCallback"])                             # Exotel's callback passes verify
        headers = {"authorization": basic(unquote(callback.username or ""), unquote(callback.password or ""))}
        carrier().verify(WebhookRequest("POST", DIAL.events_url, headers, b""))


@pytest.mark.asyncio
async def test_dial_without_credentials_in_urls() -> None:
    async with FakeExotelREST(SID, API_KEY, API_TOKEN) as fake, httpx.AsyncClient() as http:
        await rest_carrier(http, fake, credentials_in_urls=False).dial(DIAL)
        [fields] = fake.dialed
        assert fields["StatusCallback"] == DIAL.events_url
        assert fields["StreamUrl"] == "wss://gw.example.com/media/exotel/s9?sample-rate=8000&session_id=s9"


@pytest.mark.asyncio
async def test_dial_lowercase_path_switch() -> None:
    async with FakeExotelREST(SID, API_KEY, API_TOKEN) as fake, httpx.AsyncClient() as http:
        c = rest_carrier(http, fake, lowercase_paths=True)
        with pytest.raises(CallControlFailed, match="HTTP 404: The requested resource /v1/accounts/acme1/calls/"):
            await c.dial(DIAL)
        fake.accept_lowercase = True
        await c.dial(DIAL)
        assert fake.requests[-1].path == f"/v1/accounts/{SID}/calls/connect" and len(fake.dialed) == 1


@pytest.mark.asyncio
@pytest.mark.parametrize("json_suffix", [False, True])
async def test_dial_bad_credentials(json_suffix: bool, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    async with FakeExotelREST(SID, API_KEY, API_TOKEN) as fake, httpx.AsyncClient() as http:
        c = rest_carrier(http, fake, json_suffix=json_suffix, api_token="wrong-token-value")
        with pytest.raises(CallControlFailed, match="^exotel dial failed: HTTP 401: Authentication failed") as info:
            await c.dial(DIAL)
        assert fake.dialed == [] and fake.requests[0].auth_ok is False
    assert "wrong-token-value" not in str(info.value) + caplog.text + repr(c)
    assert PASSWORD not in caplog.text


@pytest.mark.asyncio
async def test_dial_refusals() -> None:
    async with FakeExotelREST(SID, API_KEY, API_TOKEN) as fake, httpx.AsyncClient() as http:
        c = rest_carrier(http, fake)
        with pytest.raises(CallControlFailed, match="answering-machine detection"):
            await c.dial(dataclasses.replace(DIAL, machine_detection=True))
        with pytest.raises(CallControlFailed, match="under 600 characters"):
            await c.dial(dataclasses.replace(DIAL, stream_url="wss://gw.example.com/" + "p" * 600))
        with pytest.raises(ValueError, match="wss://"):
            await c.dial(dataclasses.replace(DIAL, stream_url="https://x/y"))
        fake.force_error = (403, "Connect Voice AI is not enabled for this account")
        with pytest.raises(CallControlFailed, match="HTTP 403: Connect Voice AI is not enabled"):
            await c.dial(DIAL)
        fake.force_error = None
        with pytest.raises(CallControlFailed, match="HTTP 400: Missing parameter CallerId"):
            await c.dial(dataclasses.replace(DIAL, from_=""))
        assert fake.dialed == []


@pytest.mark.asyncio
async def test_dial_response_without_sid_and_transport_error() -> None:
    empty = httpx.MockTransport(lambda request: httpx.Response(200, json={"Call": {}}))
    async with httpx.AsyncClient(transport=empty) as http:
        with pytest.raises(CallControlFailed, match="response has no Call Sid"):
            await carrier(http).dial(DIAL)

    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    async with httpx.AsyncClient(transport=httpx.MockTransport(refuse)) as http:
        with pytest.raises(CallControlFailed, match="ConnectError") as info:
            await carrier(http).dial(DIAL)
    assert isinstance(info.value.__cause__, httpx.ConnectError)


@pytest.mark.asyncio
async def test_default_api_host() -> None:
    seen: list[str] = []

    def record(request: httpx.Request) -> httpx.Response:
        seen.append(str(request.url))
        return httpx.Response(200, json={"Call": {"Sid": "abc"}})

    async with httpx.AsyncClient(transport=httpx.MockTransport(record)) as http:
        await carrier(http).dial(DIAL)
        await carrier(http, subdomain="api.in.exotel.com").dial(DIAL)
    assert seen == [f"https://api.exotel.com/v1/Accounts/{SID}/Calls/connect",
                    f"https://api.in.exotel.com/v1/Accounts/{SID}/Calls/connect"]


INBOUND = CallInfo(carrier="exotel", call_id="c1", from_="09876543210", to="08047491899")


@pytest.mark.asyncio
async def test_transfer() -> None:
    async with FakeExotelREST(SID, API_KEY, API_TOKEN) as fake, httpx.AsyncClient() as http:
        c = rest_carrier(http, fake)
        await c.transfer(INBOUND, "+918000000001")
        outbound = CallInfo(carrier="exotel", call_id="c2", from_="08047491899", to="+919876543210",
                            direction="outbound")
        await c.transfer(outbound, "sip:agent@pbx.example.com")
        assert fake.transfers == [
            {"From": "09876543210", "To": "+918000000001", "CallerId": "08047491899", "CallType": "trans"},
            {"From": "+919876543210", "To": "sip:agent@pbx.example.com", "CallerId": "08047491899",
             "CallType": "trans"}]
        assert all(r.path == f"/v1/Accounts/{SID}/Calls/connect" and r.auth_ok for r in fake.requests)


@pytest.mark.asyncio
async def test_transfer_failures() -> None:
    async with FakeExotelREST(SID, API_KEY, API_TOKEN) as fake, httpx.AsyncClient() as http:
        c = rest_carrier(http, fake)
        for target in ("0800", "+0123", "tel:+91", "sip:", "+91 98765"):
            with pytest.raises(CallControlFailed, match="E.164 number or a sip: URI"):
                await c.transfer(INBOUND, target)
        with pytest.raises(CallControlFailed, match="needs the caller's number"):
            await c.transfer(CallInfo(carrier="exotel", call_id="c3"), "+918000000001")
        assert fake.requests == []
        fake.force_error = (500, "Internal error")
        with pytest.raises(CallControlFailed, match="^exotel transfer of c1 failed: HTTP 500: Internal error$"):
            await c.transfer(INBOUND, "+918000000001")
        fake.force_error = None
        bad = rest_carrier(http, fake, api_key="nobody")
        with pytest.raises(CallControlFailed, match="HTTP 401"):
            await bad.transfer(INBOUND, "+918000000001")
        assert fake.transfers == []


@pytest.mark.asyncio
async def test_hang_up_default_is_socket_close_only() -> None:
    async with FakeExotelREST(SID, API_KEY, API_TOKEN) as fake, httpx.AsyncClient() as http:
        await rest_carrier(http, fake).hang_up(INBOUND)
        assert fake.requests == []


@pytest.mark.asyncio
async def test_rest_hang_up(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    async with FakeExotelREST(SID, API_KEY, API_TOKEN) as fake, httpx.AsyncClient() as http:
        fake.known_calls = {"c1"}
        c = rest_carrier(http, fake, rest_hangup=True)
        await c.hang_up(INBOUND)
        assert fake.ended_calls == ["c1"]
        [request] = fake.requests
        assert (request.method, request.path, request.auth_ok) == ("POST", f"/v2/accounts/{SID}/legs/c1/actions", True)
        assert request.json == {"exoml": '<?xml version="1.0" encoding="UTF-8"?><Flow><Hangup/></Flow>'}
        await c.hang_up(INBOUND)                                                 # already ended: 404 is success
        await c.hang_up(CallInfo(carrier="exotel", call_id="never-known"))
        assert fake.ended_calls == ["c1"] and len(fake.requests) == 3
    assert "already ended" in caplog.text


@pytest.mark.asyncio
async def test_rest_hang_up_failures(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    async with FakeExotelREST(SID, API_KEY, API_TOKEN) as fake, httpx.AsyncClient() as http:
        fake.known_calls = {"c1"}
        c = rest_carrier(http, fake, rest_hangup=True, api_token="wrong-token-value")
        with pytest.raises(HangupFailed, match="^exotel hang-up of c1 failed: HTTP 401: Authentication failed$"):
            await c.hang_up(INBOUND)
        good = rest_carrier(http, fake, rest_hangup=True)
        fake.force_error = (503, "Service unavailable")
        with pytest.raises(HangupFailed, match="HTTP 503: Service unavailable"):
            await good.hang_up(INBOUND)
        assert fake.ended_calls == []
    assert "wrong-token-value" not in caplog.text

    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    async with httpx.AsyncClient(transport=httpx.MockTransport(refuse)) as http:
        with pytest.raises(HangupFailed, match="ConnectError") as info:
            await carrier(http, rest_hangup=True).hang_up(INBOUND)
    assert isinstance(info.value.__cause__, httpx.ConnectError)
    proxy_404 = httpx.MockTransport(lambda request: httpx.Response(404, text="<html>nginx: not found</html>"))
    async with httpx.AsyncClient(transport=proxy_404) as http:                  # not Exotel: not "ended"
        with pytest.raises(HangupFailed, match="HTTP 404: Not Found"):
            await carrier(http, rest_hangup=True).hang_up(INBOUND)


@pytest.mark.asyncio
async def test_send_dtmf_is_not_supported() -> None:
    async with FakeExotelREST(SID, API_KEY, API_TOKEN) as fake, httpx.AsyncClient() as http:
        assert await rest_carrier(http, fake).send_dtmf(INBOUND, "123#") is False
        assert fake.requests == [] and fake.dtmf == []


@pytest.mark.asyncio
async def test_fake_rejects_bad_requests() -> None:
    async with FakeExotelREST(SID, API_KEY, API_TOKEN) as fake, httpx.AsyncClient(base_url=fake.base_url) as http:
        auth = (API_KEY, API_TOKEN)
        path = f"/v1/Accounts/{SID}/Calls/connect.json"
        ok = {"From": "+91", "CallerId": "080", "StreamUrl": "wss://x/y", "StreamType": "bidirectional"}
        assert (await http.post(path, data=ok, auth=auth)).json()["Call"]["Status"] == "in-progress"
        no_auth = await http.post(path, data=ok)
        assert no_auth.status_code == 401 and "RestException" in no_auth.json()
        for body, message in [
            ({**ok, "StreamType": "unidirectional"}, "StreamType must be bidirectional"),
            ({**ok, "StreamUrl": "https://x/y"}, "ws:// or wss://"),
            ({**ok, "Url": "https://my.exotel.com/flow"}, "Exactly one of"),
            ({k: v for k, v in ok.items() if k != "From"}, "Missing parameter From"),
            ({**ok, "StatusCallbackEvents[0]": "completed", "StatusCallback": "https://e"}, "StatusCallbackEvents"),
            ({**ok, "CustomField": "x" * 129}, "CustomField"),
        ]:
            response = await http.post(path, data=body, auth=auth)
            assert response.status_code == 400 and message in response.json()["RestException"]["Message"]
        xml = await http.post(path[:-5], data={}, auth=auth)
        assert xml.status_code == 400 and xml.text.startswith("<?xml") and "<RestException>" in xml.text
        other = await http.post(path.replace(SID, "other"), data=ok, auth=auth)
        assert other.status_code == 401
        assert (await http.get(path, auth=auth)).status_code == 405
        legs = f"/v2/accounts/{SID}/legs/zz/actions"
        assert (await http.post(legs, json={"exoml": "<Flow><Hangup/></Flow>"})).status_code == 401
        assert (await http.post(legs, json={}, auth=auth)).status_code == 400
        missing = await http.post(legs, json={"exoml": "<Flow><Hangup/></Flow>"}, auth=auth)
        assert missing.status_code == 404 and missing.json()["response"]["error_data"]["message"] == "Leg not found"
        assert len(fake.dialed) == 1


# ------------------------------------------------------------------------------------ events

def event(query: str = "", **body: str) -> WebhookRequest:
    if body:
        return WebhookRequest("POST", f"{PUBLIC}/events/exotel?{query}",
                              {"content-type": "application/x-www-form-urlencoded"}, b"", tuple(body.items()))
    return WebhookRequest("GET", f"{PUBLIC}/events/exotel?{query}", {}, b"")


@pytest.mark.parametrize(
    ("request_", "expected"),
    [
        (event(CallSid="c1", Status="completed", EventType="terminal"),
         CallEvent(call_id="c1", ended=True, status="completed")),
        (event(CallSid="c1", Status="in-progress", EventType="answered"),
         CallEvent(call_id="c1", ended=False, status="in-progress")),
        (event(CallSid="c1", EventType="answered"), CallEvent(call_id="c1", status="answered")),
        (event("CallSid=c1&Status=busy"), CallEvent(call_id="c1", ended=True, status="busy")),
        (event(CallSid="c1", Status="no-answer", EventType="terminal"),
         CallEvent(call_id="c1", ended=True, status="no-answer")),
        (event(CallSid="c1", EventType="terminal", Status="failed"),
         CallEvent(call_id="c1", ended=True, status="failed")),
        (event(CallSid="c1", Status="in-progress", AnsweredBy="HUMAN"),
         CallEvent(call_id="c1", answered_by="human", status="in-progress")),
        (event(CallSid="c1", AnsweredBy="MACHINE"), CallEvent(call_id="c1", answered_by="machine")),
        (event(CallSid="c1", AnsweredBy="machine_end_beep"), CallEvent(call_id="c1", answered_by="machine")),
        (event(CallSid="c1", AnsweredBy="NOT_SURE"), CallEvent(call_id="c1", answered_by="unknown")),
        (WebhookRequest("POST", f"{PUBLIC}/events/exotel", {"content-type": "application/json; charset=utf-8"},
                        b'{"CallSid": "c9", "EventType": "terminal", "Status": "completed", "Legs": []}'),
         CallEvent(call_id="c9", ended=True, status="completed")),
    ],
)
def test_parse_event(request_: WebhookRequest, expected: CallEvent) -> None:
    assert carrier().parse_event(request_) == expected


def test_parse_event_without_call_sid() -> None:
    with pytest.raises(CarrierProtocolError, match="^exotel event has no CallSid$"):
        carrier().parse_event(event("Status=completed"))


# ------------------------------------------------------------------------------------ dialect

def as_request(dialect: ExotelDialect, public_url: str = PUBLIC, **kwargs: Any) -> WebhookRequest:
    """What the gateway builds from the dialect's webhook (public URL + path + query, lower-case headers)."""
    hook_ = dialect.webhook(public_url, {}, **kwargs)
    return WebhookRequest(hook_.method, public_url + hook_.path, {k.lower(): v for k, v in hook_.headers.items()},
                          hook_.body)


def emulated(**credentials: str) -> ExotelDialect:
    return ExotelDialect(credentials={"basic_auth_user": USER, "basic_auth_password": PASSWORD, **credentials},
                         from_="09876543210", to="08047491899")


def test_dialect_is_registered() -> None:
    assert dialect_for("exotel") is ExotelDialect
    d = emulated()
    assert (d.name, d.rate, d.frame_ms, len(d.call_id)) == ("exotel", 8000, 100, 32)


def test_dialect_round_trip_through_the_carrier() -> None:
    c, d = carrier(), emulated()
    request = as_request(d)
    assert request.method == "GET" and request.body == b"" and request.headers["authorization"] == BASIC
    c.verify(request)
    call = c.parse_call(request)
    assert (call.call_id, call.from_, call.to, call.direction) == (d.call_id, "09876543210", "08047491899", "inbound")
    body, _ = c.answer(call, "wss://gw.example.com/media/exotel/s1", {"session_id": "s1", "persona": "default"})
    url = d.answer(200, body)
    assert url == "wss://gw.example.com/media/exotel/s1?sample-rate=8000&session_id=s1&persona=default"
    assert d.parameters == {"session_id": "s1", "persona": "default"}
    c.verify_websocket({k.lower(): v for k, v in d.ws_headers().items()}, url)

    stream = c.open_stream()
    frames = [f for m in d.opening() for f in stream.decode(m)]
    assert frames == [StreamStarted(stream_id=d.stream_sid, call_id=d.call_id, account_id=d.sid,
                                    custom_parameters={"session_id": "s1", "persona": "default"},
                                    sample_rate=8000, encoding="audio/x-l16")]
    speech = pcm(TONE8_PCM) * 100                                                 # one 100 ms inbound chunk
    assert stream.decode(d.media(speech)) == [AudioFrame(speech, 8000)]
    assert stream.decode(d.dtmf("#")) == [Dtmf("#")]
    assert stream.decode(d.mark_ack("utt-1")) == [MarkPlayed("utt-1")]

    now = [100.0]
    d.clock = lambda: now[0]
    reply = pcm(TONE8_PCM) * 200
    [media] = stream.encode(AudioFrame(reply, stream.sample_rate))
    assert d.parse(media) == [Inbound("media", pcm=reply)]
    assert d.parse(stream.encode(Mark("utt-2"))[0]) == [Inbound("mark", name="utt-2")]
    assert d.parse(stream.encode(Clear())[0]) == [Inbound("clear")]
    [tail] = stream.encode(AudioFrame(pcm(TONE8_PCM), 8000))                     # short tail: padded, still valid
    assert [i.kind for i in d.parse(tail)] == ["media"]
    assert stream.decode(d.stop()[0]) == [StreamStopped("callended")]


def test_dialect_flags_what_exotel_would_reject() -> None:
    d = emulated()
    d.answer(200, carrier().answer(CALL_INFO, "wss://h/media/exotel/s", {})[0])
    sid = d.stream_sid
    now = [0.0]
    d.clock = lambda: now[0]
    ok = '{"event":"media","stream_sid":"%s","media":{"payload":"%s"}}'
    for message, fragment in [
        (b"{}", "binary frame"),
        ("nope", "not JSON"),
        ("[1]", "not a JSON object"),
        ('{"event":"clear","stream_sid":"MZother"}', "stream id does not match"),
        ('{"event":"clear","streamSid":"%s","extra":1}' % sid, "unexpected keys ['extra']"),
        ('{"event":"play","stream_sid":"%s"}' % sid, "unknown event 'play'"),
        ('{"event":"mark","stream_sid":"%s"}' % sid, "mark has no mark object"),
        ('{"event":"mark","stream_sid":"%s","mark":{"name":1}}' % sid, 'mark must be exactly {"name": <string>}'),
        ('{"event":"media","stream_sid":"%s","media":{"payload":"%s","track":"x"}}' % (sid, "A" * 4268),
         "media must hold a payload string and only"),
        ('{"event":"media","stream_sid":"%s","media":{}}' % sid, "media must hold a payload string"),
        (ok % (sid, "!!!!"), "not base64"),
    ]:
        [item] = d.parse(message)
        assert item.kind == "invalid" and fragment in item.text
    small = ExotelMediaStream(min_chunk_bytes=1600)
    small.decode(d.opening()[1])
    kinds = d.parse(small.encode(AudioFrame(bytes(1600), 8000))[0])
    assert [i.kind for i in kinds] == ["media", "invalid"] and "below the 3200-byte minimum" in kinds[1].text
    odd = d.parse(ok % (sid, base64.b64encode(bytes(3300)).decode()))
    assert [i.text for i in odd[1:]] == ["media chunk of 3300 bytes is not a multiple of 320"]
    big = d.parse(ok % (sid, base64.b64encode(bytes(102720)).decode()))
    assert "above the 100 KB maximum" in big[1].text
    now[0] = 100.0
    burst = [d.parse(ok % (sid, base64.b64encode(bytes(3200)).decode())) for _ in range(8)]  # 1.6 s at once
    assert [len(b) for b in burst] == [1] * 6 + [2] * 2 and "ahead of real time" in burst[-1][1].text
    assert d.parse('{"event":"clear","stream_sid":"%s"}' % sid) == [Inbound("clear")]   # a flush resets playback
    assert d.parse(ok % (sid, base64.b64encode(bytes(3200)).decode())) == [Inbound("media", pcm=bytes(3200))]


def test_dialect_streamsid_variant_and_id_less_messages_accepted() -> None:
    d = emulated()
    stream = ExotelMediaStream(outbound_id_key="streamSid")
    stream.decode(d.opening()[1])
    assert d.parse(stream.encode(Clear())[0]) == [Inbound("clear")]
    assert d.parse('{"event":"clear"}') == [Inbound("clear")]


def test_dialect_webhook_variants() -> None:
    c = carrier(allowed_ips=ALLOW)
    d = emulated(webhook_method="POST", client_ip="203.0.113.5")
    request = as_request(d)
    assert request.method == "POST" and request.headers["x-forwarded-for"] == "203.0.113.5"
    c.verify(request)
    assert c.parse_call(request).call_id == d.call_id
    with pytest.raises(SignatureInvalid, match="missing Authorization"):
        c.verify(as_request(d, signature=""))
    with pytest.raises(SignatureInvalid, match="do not match"):
        c.verify(as_request(d, signature=basic(USER, "guess")))
    assert as_request(d, path="/start").url.startswith(PUBLIC + "/start?CallSid=")
    body, _ = carrier(allowed_ips=ALLOW).answer(CALL_INFO, "wss://h/media/exotel/s", {})
    d.answer(200, body)
    assert d.ws_headers() == {"Authorization": BASIC, "X-Forwarded-For": "203.0.113.5"}


def test_dialect_answer_checks() -> None:
    d = emulated()
    for text in ('{"uri": "wss://h/p"}', '{"url": "https://h/p"}', '["wss://h/p"]'):
        with pytest.raises(AssertionError):
            d.answer(200, text)
    with pytest.raises(AssertionError, match="sample-rate=16000"):
        d.answer(200, '{"url": "wss://h/p?sample-rate=16000"}')
    with pytest.raises(AssertionError, match="at most 3"):
        d.answer(200, '{"url": "wss://h/p?a=1&b=2&c=3&d=4"}')


@pytest.mark.parametrize(("rate", "codec"), [(16000, "pcm16"), (24000, "pcm16"), (8000, "ulaw")])
def test_dialect_round_trip_rates_and_codecs(rate: int, codec: str) -> None:
    c = carrier(sample_rate=rate, codec=codec)
    d = emulated(sample_rate=str(rate), codec=codec)
    body, _ = c.answer(c.parse_call(as_request(d)), "wss://h/media/exotel/s", {"session_id": "s"})
    assert urlsplit(d.answer(200, body)).query == f"sample-rate={rate}&session_id=s"
    stream = c.open_stream()
    [started] = [f for m in d.opening() for f in stream.decode(m)]
    assert isinstance(started, StreamStarted) and started.sample_rate == rate
    speech = pcm(TONE8_ULAW_ROUND_TRIP) * (rate // 80)                             # 100 ms
    assert stream.decode(d.media(speech)) == [AudioFrame(speech, rate)]
    d.clock = lambda: 0.0
    reply = pcm(TONE8_ULAW_ROUND_TRIP) * (rate * stream.frame_ms // 8000)
    [media] = stream.encode(AudioFrame(reply, rate))
    assert d.parse(media) == [Inbound("media", pcm=reply)]
