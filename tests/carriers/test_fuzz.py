"""Property-based fuzzing of every carrier's parsers of outside input: the media message decoder (before
and after a valid start), webhook verification, ``parse_call``, ``parse_event`` and ``verify_websocket``.

The property: whatever arrives, a parser answers (frames, a CallInfo, a CallEvent) or raises one of our
own errors (``CarrierError`` subclasses) -- never KeyError, TypeError, ValueError, RecursionError, ... --
and with signature checking on, forged input is always refused with ``SignatureInvalid``.

Inputs mix arbitrary text and bytes, arbitrary JSON values, absurdly deep JSON, and the real messages of
each carrier's own tests with fields replaced by values of the wrong type or removed.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import urlencode

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from carriers.base import (
    CallEvent,
    CallInfo,
    CarrierProtocolError,
    MediaStream,
    SignatureInvalid,
    WebhookIgnored,
    WebhookRequest,
)
from pipeline.frames import AudioFrame, Dtmf, MarkPlayed, StreamStarted, StreamStopped
from tests.carriers import test_exotel, test_plivo, test_telnyx, test_twilio, test_vonage

# A fixed, small budget: the whole module runs in seconds, the same examples every run (CI-stable).
FUZZ = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

PUBLIC = "https://voice.example.test"
FRAMES = (AudioFrame, Dtmf, MarkPlayed, StreamStarted, StreamStopped)

# Strings that steer parsers down their interesting paths: event names, formats, digits of every kind.
WORDS = ["media", "start", "stop", "dtmf", "mark", "connected", "error", "playedStream", "played", "clearedAudio",
         "websocket:connected", "websocket:dtmf", "websocket:notify", "outbound", "inbound", "8000", "16000", "1",
         "audio/x-mulaw", "audio/x-l16", "audio/l16;rate=16000", "audio/l16;rate=" + "1" * 5000, "PCMU", "L16",
         "pcm16", "ulaw", "²", "٣", "9" * 5000, " 8000", "AAAA", "/6mg qf8pICk=", "5", "#", "", "null",
         '{"a": "b"}', "[" * 3000, "true", "machine_start", "human", "completed", "call.initiated",
         "call.hangup", "call.machine.detection.ended", "Bearer x", "Basic ZXhvOmV4by1wYXNz", "a=1;b=Z5F,cZ"]

# What a number-like field may hold instead: digits int() refuses, too many digits, other types.
ODD_NUMBERS = ["²", "٣", "9" * 5000, "1e3", " 8000", "8000 ", "-8000", "0x1f40", 8000.5, -1, 0, 10**30, True, None]

scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False, allow_infinity=False),
                    st.text(max_size=20), st.sampled_from(WORDS))
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=10) | st.sampled_from(WORDS), inner, max_size=4),
                           max_leaves=10)
deep_json = st.integers(60, 3_000).flatmap(lambda n: st.sampled_from(["[" * n + "]" * n, '{"a":' * n + "1" + "}" * n,
                                                                        "[" * n]))


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """Every (key or index) path into a JSON value's containers."""
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, child in items:
        yield prefix + (key,)
        yield from _paths(child, prefix + (key,))


@st.composite
def mutated(draw: st.DrawFn, template: str | bytes) -> str:
    """``template`` (a JSON object) with one to three fields replaced by arbitrary values or removed."""
    data = json.loads(template)
    for _ in range(draw(st.integers(1, 3))):
        paths = list(_paths(data))
        if not paths:
            break
        *parents, key = draw(st.sampled_from(paths))
        container = data
        for step in parents:
            container = container[step]
        old = container[key]
        numeric = isinstance(old, (int, float)) or (isinstance(old, str) and old.isdigit())
        choice = draw(st.integers(0, 3))
        if choice == 0 and isinstance(container, dict):
            del container[key]
        elif choice <= 1 and numeric:   # arbitrary values rarely hit the paths that matter: steer
            container[key] = draw(st.sampled_from(ODD_NUMBERS))
        elif choice <= 1 and isinstance(old, str) and re.search("[0-9]", old):   # "audio/l16;rate=16000"
            odd = draw(st.sampled_from([n for n in ODD_NUMBERS if isinstance(n, str)]))
            container[key] = re.sub("[0-9]+", lambda _, odd=odd: odd, old, count=1)
        else:
            container[key] = draw(st.sampled_from(WORDS) if choice == 2 else json_values)
    return json.dumps(data)


def texts(templates: list[str | bytes]) -> st.SearchStrategy[str]:
    """JSON-ish text: arbitrary text or JSON, deep JSON, or a carrier's real message mutated."""
    return st.one_of(st.text(), json_values.map(json.dumps), deep_json,
                     st.sampled_from(templates).flatmap(mutated), st.sampled_from(templates).map(
                         lambda t: t if isinstance(t, str) else t.decode()))


# ------------------------------------------------------------------------------------------ media decoders
def _messages(module: Any, *names: str) -> list[str]:
    return [getattr(module, name) for name in names if hasattr(module, name)]


STANDARD = ("CONNECTED", "START", "MEDIA", "DTMF", "MARK", "STOP", "PLAYED", "CLEARED")
NOTIFY = '{"event":"websocket:notify","payload":{"name":"utt-7"}}'

TOKEN_CONNECTED = '{"event":"connected","connected":{"x-telnyx-streaming-auth-token":"tok"}}'

# carrier -> (a fresh carrier for its stream, the messages that start it, every real message of its tests)
STREAMS: dict[str, tuple[Callable[[], Any], list[str], list[str]]] = {
    "twilio": (test_twilio.carrier, [test_twilio.START], _messages(test_twilio, *STANDARD)),
    "telnyx": (test_telnyx.carrier, [test_telnyx.START], _messages(test_telnyx, *STANDARD)),
    "telnyx-l16-token": (lambda: test_telnyx.carrier(flow="call_control", inbound_codec="L16", outbound_codec="L16",
                                                     outbound_sample_rate=16000, stream_auth_token="tok",
                                                     stream_auth_header=False),
                         [TOKEN_CONNECTED, test_telnyx.start("L16", 16000)],
                         [TOKEN_CONNECTED, *_messages(test_telnyx, *STANDARD)]),
    "vonage": (test_vonage.carrier, [test_vonage.CONNECTED], [test_vonage.CONNECTED, test_vonage.DTMF, NOTIFY]),
    "plivo": (test_plivo.carrier, [test_plivo.START], _messages(test_plivo, *STANDARD)),
    "plivo-l16": (lambda: test_plivo.carrier(content_type="audio/x-l16;rate=16000", l16_byte_order="big"),
                  [test_plivo.start_message("audio/x-l16;rate=16000")], _messages(test_plivo, *STANDARD)),
    "exotel": (test_exotel.carrier, [test_exotel.START], _messages(test_exotel, *STANDARD)),
}


def decoded(stream: MediaStream, message: str | bytes) -> list[Any] | None:
    """``stream.decode(message)``: the frames, or None for our own protocol error (anything else fails)."""
    try:
        frames = stream.decode(message)
    except CarrierProtocolError as exc:
        assert str(exc), "a protocol error must say what is wrong"
        return None
    assert isinstance(frames, list) and all(isinstance(f, FRAMES) for f in frames), frames
    return frames


@pytest.mark.parametrize("name", sorted(STREAMS))
def test_mutated_start_messages_start_or_raise_protocol_errors(name: str) -> None:
    make, start, _ = STREAMS[name]
    carrier = make()

    @settings(FUZZ, max_examples=300)
    @given(opening=st.sampled_from(start).flatmap(mutated))
    def check(opening: str) -> None:
        stream = carrier.open_stream()
        for message in start[:-1]:
            decoded(stream, message)
        decoded(stream, opening)

    check()


@pytest.mark.parametrize("name", sorted(STREAMS))
def test_media_decoders_raise_only_protocol_errors(name: str) -> None:
    make, start, templates = STREAMS[name]
    carrier = make()
    message = st.one_of(texts(templates), st.binary(max_size=400))

    @settings(FUZZ, max_examples=400)
    @given(started=st.booleans(), messages=st.lists(message, min_size=1, max_size=4))
    def check(started: bool, messages: list[str | bytes]) -> None:
        stream = carrier.open_stream()
        if started:
            assert all(decoded(stream, m) is not None for m in start), f"{name}: its own start was refused"
            assert stream.started
        for item in messages:
            decoded(stream, item)

    check()


def _exotel_start(rate: str) -> str:
    message = json.loads(test_exotel.START)
    message["start"]["media_format"]["sample_rate"] = rate
    return json.dumps(message)


@pytest.mark.parametrize(("name", "message", "text"), [   # what the fuzzers found: int() raised ValueError
    ("exotel", _exotel_start("9" * 5000), "exotel start.media_format.sample_rate 999999999999 is not supported"),
    ("telnyx", test_telnyx.start("L16", "²"), "telnyx start.media_format L16 ² Hz 1 channel(s) is not supported"),
    ("vonage", '{"event":"websocket:connected","content-type":"audio/l16;rate=1%s"}' % ("0" * 5000),
     "vonage websocket:connected content-type 'audio/l16;rate=1" + "0" * 24 + "' is not supported"),
])
def test_number_fields_int_refuses_are_protocol_errors(name: str, message: str, text: str) -> None:
    with pytest.raises(CarrierProtocolError) as info:
        STREAMS[name][0]().open_stream().decode(message)
    assert str(info.value).startswith(text)


def test_a_wrongly_typed_payload_is_a_protocol_error() -> None:
    """The example of the brief, for every carrier, started and not."""
    for name, (make, start, _) in STREAMS.items():
        for started in (False, True):
            stream = make().open_stream()
            for opening in start if started else []:
                stream.decode(opening)
            for message in ('{"event":"media","media":{"payload": 5}}', '{"event":"media","media":[]}',
                            '{"event":"start","start":{"mediaFormat":{"sampleRate":"²"}}}'):
                assert decoded(stream, message) in (None, []), (name, message)


# ------------------------------------------------------------------------------------------ webhooks
HEADERS = ["content-type", "x-twilio-signature", "x-twilio-webhooks-signature-settings", "telnyx-signature-ed25519",
           "telnyx-timestamp", "authorization", "x-plivo-signature-v3", "x-plivo-signature-ma-v3",
           "x-plivo-signature-v3-nonce", "x-plivo-signature-v2", "x-plivo-signature-v2-nonce", "x-forwarded-for",
           "x-voxray-peer", "x-telnyx-streaming-auth-token"]
HEADER_VALUES = ["application/json", "application/x-www-form-urlencoded", "application/json; charset=utf-8",
                 "text/xml", "key=k1,algorithm=HMAC_SHA256", "key=,algorithm=nope", "1705314600", "Bearer a.b.c",
                 "Bearer eyJhbGciOiJIUzI1NiJ9.e30.x", "Basic Og==", "Basic ZXhvOmV4by1wYXNz", "203.0.113.9",
                 "[2001:db8::1]:443, 10.0.0.1", "A" * 86 + "==", "c9527676,abc"]
PARAMS = ["CallSid", "CallUUID", "RequestUUID", "uuid", "call_uuid", "From", "To", "Direction", "AccountSid",
          "CallStatus", "AnsweredBy", "Machine", "Event", "EventType", "Status", "StreamEvent", "custom_data",
          "SipHeader_X-Id", "X-PH-crm", "bodySHA256", "CallFrom", "CallTo", "CustomField", "status", "direction",
          "from", "to", "from_user", "data"]

pairs = st.lists(st.tuples(st.sampled_from(PARAMS) | st.text(max_size=8), st.text(max_size=20) | st.sampled_from(WORDS)),
                 max_size=6)
headers = st.dictionaries(st.sampled_from(HEADERS) | st.text(max_size=10).map(str.lower),
                          st.sampled_from(HEADER_VALUES) | st.text(max_size=40), max_size=6)
bodies = st.one_of(st.binary(max_size=300), pairs.map(lambda p: urlencode(p).encode()),
                   texts([test_telnyx.BODY.decode(), test_vonage.BODY.decode(),
                          json.dumps(dict(test_plivo.DOC_PARAMS))]).map(str.encode))


@st.composite
def webhooks(draw: st.DrawFn) -> WebhookRequest:
    """A request as ``gateway.http.routes.webhook_request`` builds it: our public URL with the sender's path and
    query, lower-case headers, the raw body and, for a form, its pairs."""
    path = draw(st.sampled_from(["/start/x", "/events/x/s1", "/transfer/x"]) | st.text(max_size=20).map("/".__add__))
    query = draw(st.none() | pairs.map(urlencode) | st.text(max_size=30))
    form = draw(pairs) if draw(st.booleans()) else []
    return WebhookRequest(method=draw(st.sampled_from(["GET", "POST", "PUT"]) | st.text(max_size=6)),
                          url=PUBLIC + path + (f"?{query}" if query is not None else ""),
                          headers=draw(headers), body=draw(bodies), form=form)


def _exotel(**kwargs: Any) -> Any:
    return test_exotel.carrier(allowed_ips=("203.0.113.0/24",), **kwargs)


# carrier -> a factory taking carrier settings (verification on unless told otherwise)
CARRIERS: dict[str, Callable[..., Any]] = {
    "twilio": lambda **kw: test_twilio.carrier(shared_key_secrets={"k1": "shared"}, **kw),
    "telnyx": test_telnyx.carrier,
    "telnyx-call-control": lambda **kw: test_telnyx.carrier(flow="call_control", **kw),
    "vonage": test_vonage.carrier,
    "plivo": lambda **kw: test_plivo.carrier(accept_v2_signatures=True, **kw),
    "exotel": _exotel,
}


@pytest.mark.parametrize("name", sorted(CARRIERS))
def test_forged_webhooks_are_refused_with_signature_invalid(name: str) -> None:
    carrier = CARRIERS[name]()

    @FUZZ
    @given(request=webhooks())
    def check(request: WebhookRequest) -> None:
        with pytest.raises(SignatureInvalid):
            carrier.verify(request)

    check()


@pytest.mark.parametrize("name", sorted(CARRIERS))
def test_unverified_webhooks_parse_or_raise_only_our_errors(name: str) -> None:
    carrier = CARRIERS[name](verify_signatures=False)

    @FUZZ
    @given(request=webhooks())
    def check(request: WebhookRequest) -> None:
        assert carrier.verify(request) is None
        try:
            call = carrier.parse_call(request)
        except (CarrierProtocolError, WebhookIgnored) as exc:
            assert str(exc)
        else:
            assert isinstance(call, CallInfo) and isinstance(call.call_id, str) and call.call_id
            assert all(isinstance(v, str) for v in (call.from_, call.to, call.account_id, call.direction))
            assert all(isinstance(k, str) and isinstance(v, str) for k, v in call.custom.items()), call.custom
        try:
            event = carrier.parse_event(request)
        except CarrierProtocolError as exc:
            assert str(exc)
        else:
            assert isinstance(event, CallEvent) and isinstance(event.call_id, str) and isinstance(event.status, str)
            assert event.answered_by in ("", "human", "machine", "unknown")

    check()


# carrier -> one with a media-socket credential set, so forged upgrades must be refused
SOCKETS: dict[str, Callable[[], Any]] = {
    "telnyx": lambda: test_telnyx.carrier(stream_auth_token="stream-token"),
    "vonage": lambda: test_vonage.carrier(ws_auth_value="Bearer ws-secret"),
    "exotel": _exotel,
}


@pytest.mark.parametrize("name", sorted(SOCKETS))
def test_forged_media_socket_upgrades_are_refused(name: str) -> None:
    carrier = SOCKETS[name]()

    @FUZZ
    @given(upgrade=headers, path=st.text(max_size=20))
    def check(upgrade: dict[str, str], path: str) -> None:
        with pytest.raises(SignatureInvalid):
            carrier.verify_websocket(upgrade, f"wss://voice.example.test/media/{name}/{path}")

    check()


@pytest.mark.parametrize("name", ["twilio", "plivo"])
def test_carriers_without_a_socket_credential_accept_any_upgrade(name: str) -> None:
    carrier = CARRIERS[name]()

    @FUZZ
    @given(upgrade=headers)
    def check(upgrade: dict[str, str]) -> None:
        assert carrier.verify_websocket(upgrade, "wss://voice.example.test/media/x/s") is None

    check()
