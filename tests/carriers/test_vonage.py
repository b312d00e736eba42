"""Tests for carriers/vonage.py and gateway/simulate/dialects/vonage.py against the §9.4 vectors of
docs/carriers.md and a fake Voice API."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import struct
import time
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

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
from carriers.vonage import VonageCarrier, VonageMediaStream, decode_signed_token
from gateway.simulate.dialects import dialect_for
from gateway.simulate.dialects.base import Inbound
from gateway.simulate.dialects.vonage import VonageDialect
from pipeline.audio import Resampler
from pipeline.frames import AudioFrame, Clear, Dtmf, Mark, MarkPlayed, StreamStarted, StreamStopped
from tests.carriers.busy_vectors import HOSTILE
from tests.fakes.vonage_rest import FakeVonageREST

SECRET = "test-signature-secret-0123456789abcdef"
APP_ID = "aaaaaaaa-bbbb-cccc-dddd-0123456789ab"
CALL = "aaaaaaaa-bbbb-cccc-dddd-0123456789ab"
BODY = (b'{"from":"447700900000","to":"447700900001","uuid":"aaaaaaaa-bbbb-cccc-dddd-0123456789ab",'
        b'"conversation_uuid":"CON-aaaaaaaa-bbbb-cccc-dddd-0123456789ab"}')
PAYLOAD_HASH = "167d8e40bc32025fd79c51fd9e764e314f9ffba608ffa5ff35be9a45f8529d4d"
IAT = 1705314600
TOKEN = (
    "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJpYXQiOjE3MDUzMTQ2MDAsImp0aSI6ImM1YmE4ZjI0LTFhMTQtNGMxMC1iZmRmLTNmYmU4"
    "Y2U1MTFiNSIsImlzcyI6IlZvbmFnZSIsInBheWxvYWRfaGFzaCI6IjE2N2Q4ZTQwYmMzMjAyNWZkNzljNTFmZDllNzY0ZTMxNGY5ZmZiYTYw"
    "OGZmYTVmZjM1YmU5YTQ1Zjg1MjlkNGQiLCJhcGlfa2V5IjoiYTFiMmMzZCIsImFwcGxpY2F0aW9uX2lkIjoiYWFhYWFhYWEtYmJiYi1jY2Nj"
    "LWRkZGQtMDEyMzQ1Njc4OWFiIn0.yHFgSp_Gz1JEJrn40uuoeAF7Ef1wQRLIaDx6efhLxDg")
SDK_TOKEN = (
    "eyJ0eXAiOiJKV1QiLCJhbGciOiJIUzI1NiJ9.eyJpc3MiOiJPbmxpbmUgSldUIEJ1aWxkZXIiLCJpYXQiOjE2OTc2MzQ2ODAsImV4cCI6MzMy"
    "NTQ1NDA4MjgsImF1ZCI6IiIsInN1YiI6IiJ9.88vJc3I2HhuqEDixHXVhc9R30tA6U_HQHZTC29y6CGM")
URL = "https://voice.example.test/start/vonage"
JSON = {"content-type": "application/json"}
WSS = "wss://gw.example.com/ws/vonage/3f9c1e"
TONE8_LE = bytes.fromhex("00001916401f19160000e7e9c0e0e7e9")


def _rsa() -> tuple[str, bytes]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption()).decode()
    public = key.public_key().public_bytes(serialization.Encoding.PEM,
                                           serialization.PublicFormat.SubjectPublicKeyInfo)
    return private, public


PRIVATE_KEY, PUBLIC_KEY = _rsa()
OTHER_PRIVATE_KEY, _ = _rsa()


UNUSED_HTTP = httpx.AsyncClient()   # for carriers that make no REST call (one client: creating one costs ~35 ms)


def carrier(http: httpx.AsyncClient | None = None, **kwargs: Any) -> VonageCarrier:
    kwargs.setdefault("application_id", APP_ID)
    kwargs.setdefault("private_key", PRIVATE_KEY if http is not None else "")  # loading an RSA key costs ~30 ms
    kwargs.setdefault("signature_secret", SECRET)
    return VonageCarrier(http=http or UNUSED_HTTP, **kwargs)


def at(now: float, **kwargs: Any) -> VonageCarrier:
    return carrier(clock=lambda: now, **kwargs)


def post(body: bytes = BODY, token: str | None = TOKEN, url: str = URL, **headers: str) -> WebhookRequest:
    hdrs = dict(JSON)
    if token is not None:
        hdrs["authorization"] = f"Bearer {token}"
    hdrs.update(headers)
    return WebhookRequest("POST", url, hdrs, body)


def sign(claims: dict[str, Any], secret: str = SECRET, body: bytes = BODY) -> str:
    full = {"iat": IAT, "jti": f"jti-{time.monotonic_ns()}", "iss": "Vonage",
            "payload_hash": hashlib.sha256(body).hexdigest(), "api_key": "a1b2c3d", "application_id": APP_ID}
    full.update(claims)
    return jwt.encode({k: v for k, v in full.items() if v is not None}, secret, algorithm="HS256")


def pcm(samples: list[int]) -> bytes:
    return struct.pack(f"<{len(samples)}h", *samples)


def started(rate: int = 16000, **kwargs: Any) -> VonageMediaStream:
    stream = carrier(sample_rate=rate, **kwargs).open_stream()
    stream.decode(json.dumps({"event": "websocket:connected", "content-type": f"audio/l16;rate={rate}",
                              "session_id": "3f9c1e", "call_uuid": CALL}))
    return stream


# ------------------------------------------------------------------------------------ signatures

def test_sdk_jwt_vector() -> None:
    claims = decode_signed_token(SDK_TOKEN, "qwertyuiopasdfghjklzxcvbnm123456")
    assert claims["iss"] == "Online JWT Builder" and claims["iat"] == 1697634680
    with pytest.raises(SignatureInvalid, match=r"^vonage: signature does not match$"):
        decode_signed_token(SDK_TOKEN, "asdf")   # a short secret: no InsecureKeyLengthWarning escapes
    with pytest.raises(SignatureInvalid, match=r"^vonage: malformed token$"):
        decode_signed_token("asdf", "qwertyuiopasdfghjklzxcvbnm123456")


def test_sdk_vector_is_not_a_webhook() -> None:
    request = post(token=SDK_TOKEN)
    with pytest.raises(SignatureInvalid, match="^vonage: signature does not match$"):
        at(1697634690).verify(request)
    c = at(1697634690, signature_secret="qwertyuiopasdfghjklzxcvbnm123456")
    with pytest.raises(SignatureInvalid, match="^vonage: token has no payload_hash$"):
        c.verify(request)


def test_signed_answer_webhook_vector_is_reproducible() -> None:
    claims = {"iat": IAT, "jti": "c5ba8f24-1a14-4c10-bfdf-3fbe8ce511b5", "iss": "Vonage",
              "payload_hash": PAYLOAD_HASH, "api_key": "a1b2c3d", "application_id": APP_ID}

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    signing = b64(b'{"alg":"HS256","typ":"JWT"}') + "." + b64(json.dumps(claims, separators=(",", ":")).encode())
    assert signing + "." + b64(hmac.new(SECRET.encode(), signing.encode(), hashlib.sha256).digest()) == TOKEN
    assert hashlib.sha256(BODY).hexdigest() == PAYLOAD_HASH


def test_signed_answer_webhook_vector_verifies() -> None:
    at(IAT + 5).verify(post())


def test_altered_body_fails_the_hash_but_not_the_signature() -> None:
    forged = BODY.replace(b"447700900000", b"447700900999")
    assert decode_signed_token(TOKEN, SECRET)["payload_hash"] == PAYLOAD_HASH
    with pytest.raises(SignatureInvalid, match=r"^vonage: payload_hash does not match the body$"):
        at(IAT + 5).verify(post(body=forged))


@pytest.mark.parametrize(
    ("headers", "reason"),
    [
        ({}, "missing Authorization: Bearer token"),
        ({"authorization": "Basic YTpi"}, "missing Authorization: Bearer token"),
        ({"authorization": "Bearer "}, "missing Authorization: Bearer token"),
        ({"authorization": "Bearer not.a.jwt"}, "malformed token"),
        ({"authorization": "Bearer " + TOKEN[:-4] + "AAAA"}, "signature does not match"),
    ],
)
def test_missing_or_malformed_token(headers: dict[str, str], reason: str) -> None:
    request = WebhookRequest("POST", URL, {**JSON, **headers}, BODY)
    with pytest.raises(SignatureInvalid, match=f"^vonage: {reason}$"):
        at(IAT + 5).verify(request)


def test_bearer_scheme_is_case_insensitive() -> None:
    at(IAT + 5).verify(post(token=None, authorization=f"bearer {TOKEN}"))


def test_forged_tokens() -> None:
    c = at(IAT + 5)
    with pytest.raises(SignatureInvalid, match="^vonage: signature does not match$"):
        c.verify(post(token=sign({}, secret="another-secret-that-is-long-enough-000")))
    unsigned = jwt.encode({"iat": IAT, "jti": "x", "payload_hash": PAYLOAD_HASH}, None, algorithm="none")
    with pytest.raises(SignatureInvalid, match="^vonage: token is not signed with HS256$"):
        c.verify(post(token=unsigned))
    rs256 = jwt.encode({"iat": IAT, "jti": "y", "payload_hash": PAYLOAD_HASH}, PRIVATE_KEY, algorithm="RS256")
    with pytest.raises(SignatureInvalid, match="^vonage: token is not signed with HS256$"):
        c.verify(post(token=rs256))


@pytest.mark.parametrize(
    ("now", "claims", "reason"),
    [
        (IAT + 311, {}, r"token is stale \(issued 311 s ago\)"),
        (IAT - 11, {}, "token issued 11 s in the future"),
        (IAT + 5, {"iat": None}, "token has no numeric iat"),
        (IAT + 5, {"iat": "1705314600"}, "token has no numeric iat"),
        (IAT + 5, {"iat": True}, "token has no numeric iat"),
        (IAT + 5, {"iat": float("nan")}, "token has no numeric iat"),
        (IAT + 5, {"iat": float("-inf")}, "token has no numeric iat"),
        (IAT + 100, {"exp": IAT + 60}, "token has expired"),
        (IAT + 5, {"exp": "soon"}, "token has expired"),
        (IAT + 5, {"nbf": IAT + 60}, r"token is not valid yet \(nbf\)"),
        (IAT + 5, {"payload_hash": None}, "token has no payload_hash"),
        (IAT + 5, {"payload_hash": ""}, "token has no payload_hash"),
        (IAT + 5, {"payload_hash": "0" * 64}, "payload_hash does not match the body"),
        (IAT + 5, {"payload_hash": "é" * 64}, "payload_hash does not match the body"),
        (IAT + 5, {"payload_hash": PAYLOAD_HASH.upper()[:-1]}, "payload_hash does not match the body"),
        (IAT + 5, {"application_id": "bbbbbbbb-0000-0000-0000-000000000000"}, "token is for another application"),
        (IAT + 5, {"jti": None}, r"token has no jti \(replays cannot be detected\)"),
    ],
)
def test_rejected_claims(now: float, claims: dict[str, Any], reason: str) -> None:
    with pytest.raises(SignatureInvalid, match=f"^vonage: {reason}$"):
        at(now).verify(post(token=sign(claims)))


@pytest.mark.parametrize("now", [IAT - 10, IAT - 1, IAT, IAT + 309, IAT + 310])
def test_clock_leeway(now: float) -> None:
    """A Vonage clock up to clock_skew_s ahead is accepted (PyJWT's default would reject 1 s)."""
    at(now).verify(post(token=sign({})))


def test_leeway_and_age_are_configurable() -> None:
    with pytest.raises(SignatureInvalid, match="in the future"):
        at(IAT - 1, clock_skew_s=0).verify(post(token=sign({})))
    at(IAT + 3000, max_token_age_s=3600).verify(post(token=sign({})))
    at(IAT + 5, max_token_age_s=3600).verify(post(token=sign({"exp": IAT + 10})))


def test_replayed_token_rejected() -> None:
    c = at(IAT + 5)
    c.verify(post())
    with pytest.raises(SignatureInvalid, match=r"^vonage: token replayed \(jti seen before\)$"):
        c.verify(post())
    relaxed = at(IAT + 5, reject_replays=False)
    relaxed.verify(post())
    relaxed.verify(post())
    relaxed.verify(post(token=sign({"jti": None})))


def test_replay_cache_forgets_tokens_too_old_to_verify() -> None:
    now = [float(IAT)]
    c = carrier(clock=lambda: now[0])
    for i in range(5):
        c.verify(post(token=sign({"jti": f"old-{i}"})))
    assert len(c._seen_jti) == 5  # noqa: SLF001 - the replay cache has no public view
    now[0] = IAT + 400
    c.verify(post(token=sign({"iat": IAT + 400, "jti": "new"})))
    assert list(c._seen_jti) == ["new"]  # noqa: SLF001 - the replay cache has no public view


def test_application_id_claim_is_optional() -> None:
    at(IAT + 5).verify(post(token=sign({"application_id": None})))


def test_verification_can_be_disabled_and_needs_a_secret() -> None:
    carrier(verify_signatures=False).verify(post(token=None))
    with pytest.raises(SignatureInvalid, match="^vonage: no signature_secret configured$"):
        at(IAT + 5, signature_secret="").verify(post())


def test_get_webhook_hashes_the_query_as_json() -> None:
    params = {"to": "447700900001", "from": "447700900000", "uuid": CALL, "region_url": "https://api-us-3.vonage.com"}
    query = "&".join(f"{k}={v}" for k, v in params.items())
    for spelling in (json.dumps(params, separators=(",", ":")),
                     json.dumps(params, separators=(",", ":")).replace("/", "\\/")):
        token = sign({}, body=spelling.encode())
        request = WebhookRequest("GET", f"{URL}?{query}", {"authorization": f"Bearer {token}"}, b"")
        at(IAT + 5).verify(request)
        assert at(IAT + 5).parse_call(request).call_id == CALL
    reordered = "&".join(f"{k}={v}" for k, v in reversed(params.items()))
    token = sign({}, body=json.dumps(params, separators=(",", ":")).encode())
    with pytest.raises(SignatureInvalid, match="payload_hash does not match"):
        at(IAT + 5).verify(WebhookRequest("GET", f"{URL}?{reordered}", {"authorization": f"Bearer {token}"}, b""))
    empty = sign({}, body=b"")  # an empty-body hash does not cover query parameters
    with pytest.raises(SignatureInvalid, match="payload_hash does not match"):
        at(IAT + 5).verify(WebhookRequest("GET", f"{URL}?{query}", {"authorization": f"Bearer {empty}"}, b""))
    at(IAT + 5).verify(WebhookRequest("GET", URL, {"authorization": f"Bearer {empty}"}, b""))


def test_secrets_never_leak(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    c = at(IAT + 5, signature_secret="short-secret", ws_auth_value="Bearer ws-secret-value")
    assert "shorter than 32 bytes" in caplog.text
    texts = [repr(c), caplog.text]
    with pytest.warns(jwt.InsecureKeyLengthWarning):
        short = sign({}, secret="short-secret", body=b"{}")
    for request in (post(), post(token=short)):
        with pytest.raises(SignatureInvalid) as info:
            c.verify(request)
        texts.append(str(info.value))
    with pytest.raises(SignatureInvalid) as info:
        c.verify_websocket({"authorization": "Bearer wrong"}, WSS)
    texts.append(str(info.value))
    joined = "\n".join(texts)
    for secret in ("short-secret", "ws-secret-value", "BEGIN PRIVATE KEY", PRIVATE_KEY[40:80]):
        assert secret not in joined


# ------------------------------------------------------------------------------------ websocket auth

def test_verify_websocket() -> None:
    carrier().verify_websocket({}, WSS)                      # no ws_auth_value: nothing to check
    c = carrier(ws_auth_value="Bearer s3cr3t")
    c.verify_websocket({"authorization": "Bearer s3cr3t"}, WSS)
    c.verify_websocket({"Authorization": "Bearer s3cr3t"}, WSS)
    with pytest.raises(SignatureInvalid, match="^vonage: websocket upgrade has no Authorization header$"):
        c.verify_websocket({"host": "gw"}, WSS)
    for wrong in ("Bearer s3cr3", "Bearer s3cr3t2", "s3cr3t", "Bearer sécret"):
        with pytest.raises(SignatureInvalid, match="^vonage: websocket Authorization does not match$"):
            c.verify_websocket({"authorization": wrong}, WSS)
    carrier(ws_auth_value="Bearer s3cr3t", verify_signatures=False)  # still checked: it is not a signature
    with pytest.raises(SignatureInvalid):
        carrier(ws_auth_value="Bearer s3cr3t", verify_signatures=False).verify_websocket({}, WSS)


# ------------------------------------------------------------------------------------ parse_call

def test_parse_call_post() -> None:
    call = carrier().parse_call(post())
    assert call == CallInfo(carrier="vonage", call_id=CALL, from_="447700900000", to="447700900001",
                            direction="inbound", custom={})


def test_parse_call_get_and_extras() -> None:
    query = ("to=447700900001&from_user=jamie&uuid=" + CALL + "&SipHeader_X-UserId=1938ND9"
             "&custom_data=%7B%22crm%22%3A%2242%22%2C%22n%22%3A1%7D&direction=outbound")
    call = carrier().parse_call(WebhookRequest("GET", f"{URL}?{query}", {}, b""))
    assert call.from_ == "jamie" and call.to == "447700900001" and call.direction == "outbound"
    assert call.custom == {"SipHeader_X-UserId": "1938ND9", "crm": "42"}


@pytest.mark.parametrize(
    ("body", "text"),
    [
        (b'{"from":"447700900000"}', "vonage webhook has no uuid"),
        (b'{"uuid":""}', "vonage webhook has no uuid"),
        (b'{"uuid":7}', "vonage webhook has no uuid"),
        (b"{", "vonage webhook body is not valid JSON"),
        (b"[" * 100_000, r"vonage webhook body is not valid JSON \(nested deeper than 64 levels\)"),
        (b"[" * 65 + b"]" * 65, r"vonage webhook body is not valid JSON \(nested deeper than 64 levels\)"),
        (b'["uuid"]', "vonage webhook body is not a JSON object"),
    ],
)
def test_parse_call_errors(body: bytes, text: str) -> None:
    with pytest.raises(CarrierProtocolError, match=f"^{text}$"):
        carrier().parse_call(post(body=body))


def test_parse_call_form_body() -> None:
    request = WebhookRequest("POST", URL, {"content-type": "application/x-www-form-urlencoded"},
                             f"uuid={CALL}&from=447700900000".encode())
    assert carrier().parse_call(request).from_ == "447700900000"


# ------------------------------------------------------------------------------------ NCCO

INBOUND = CallInfo(carrier="vonage", call_id=CALL, from_="447700900000", to="447700900001")
# vonage-voice 1.5.1: Connect(endpoint=[WebsocketEndpoint(uri=WSS, contentType="audio/l16;rate=16000",
#   headers=...)], from_="447700900001").model_dump(by_alias=True, exclude_none=True), checked once by hand
SDK_NCCO = [{"action": "connect", "from": "447700900001", "endpoint": [
    {"type": "websocket", "uri": WSS, "content-type": "audio/l16;rate=16000",
     "headers": {"session_id": "3f9c1e", "from": "447700900000", "call_uuid": CALL}}]}]


def test_answer_matches_documented_ncco() -> None:
    body, media_type = carrier().answer(INBOUND, WSS, {"session_id": "3f9c1e", "from": "447700900000"})
    assert media_type == "application/json"
    assert body.startswith('[{"action":"connect","from":"447700900001","endpoint":[{"type":"websocket","uri":"wss://')
    ncco = json.loads(body)
    assert ncco == SDK_NCCO
    [action] = ncco
    [endpoint] = action["endpoint"]
    assert action["action"] == "connect" and action["from"] == "447700900001"   # our number, the call's `to`
    assert endpoint["type"] == "websocket" and endpoint["uri"] == WSS
    assert endpoint["content-type"] == "audio/l16;rate=16000"
    assert endpoint["headers"] == {"session_id": "3f9c1e", "from": "447700900000", "call_uuid": CALL}
    assert "authorization" not in endpoint


def test_answer_from_number() -> None:
    outbound = CallInfo(carrier="vonage", call_id=CALL, from_="+447700900002", to="447700900003",
                        direction="outbound")
    assert json.loads(carrier().answer(outbound, WSS, {})[0])[0]["from"] == "447700900002"
    assert json.loads(carrier(answer_from="14155550100").answer(INBOUND, WSS, {})[0])[0]["from"] == "14155550100"
    app_user = CallInfo(carrier="vonage", call_id=CALL, to="jamie")
    assert "from" not in json.loads(carrier().answer(app_user, WSS, {})[0])[0]


@pytest.mark.parametrize("rate", [8000, 16000, 24000])
def test_answer_rate_switch(rate: int) -> None:
    endpoint = json.loads(carrier(sample_rate=rate).answer(INBOUND, WSS, {})[0])[0]["endpoint"][0]
    assert endpoint["content-type"] == f"audio/l16;rate={rate}"
    assert carrier(sample_rate=rate).open_stream().sample_rate == rate


def test_bad_constructor_switches() -> None:
    with pytest.raises(ValueError, match="sample_rate"):
        carrier(sample_rate=44100)
    with pytest.raises(ValueError, match="amd"):
        carrier(amd="magic")
    with pytest.raises(ValueError, match="amd_mode"):
        carrier(amd_mode="fast")
    with pytest.raises(ValueError, match="PEM"):
        carrier(private_key="-----BEGIN PRIVATE KEY-----\nnope\n-----END PRIVATE KEY-----\n")


def test_private_key_from_file_or_one_line(tmp_path: Any) -> None:
    path = tmp_path / "private.key"
    path.write_text(PRIVATE_KEY)
    for key in (str(path), PRIVATE_KEY.replace("\n", "\\n"), PRIVATE_KEY.encode()):
        token = carrier(private_key=key)._rest_token(HangupFailed)  # noqa: SLF001 - the REST token itself
        assert jwt.decode(token, PUBLIC_KEY, algorithms=["RS256"])["application_id"] == APP_ID


def test_payload_hash_may_be_upper_case() -> None:
    at(IAT + 5).verify(post(token=sign({"payload_hash": PAYLOAD_HASH.upper()})))


def test_answer_with_ws_authorization() -> None:
    endpoint = json.loads(carrier(ws_auth_value="Bearer s3cr3t").answer(INBOUND, WSS, {})[0])[0]["endpoint"][0]
    assert endpoint["authorization"] == {"type": "custom", "value": "Bearer s3cr3t"}


def test_answer_escapes_hostile_values() -> None:
    hostile = {'n"<&>': '"}]},{"action":"talk","text":"pwned', "tabs": "a\tb\nc\r", "dollar": "$stream_url ${x}",
               "unicode": "Zoë ☎", "slash": "</script>"}
    url = 'wss://gw.example.com/ws/vonage/a"b\\c'
    ncco = json.loads(carrier().answer(INBOUND, url, hostile)[0])
    assert len(ncco) == 1 and [a["action"] for a in ncco] == ["connect"]
    endpoint = ncco[0]["endpoint"][0]
    assert endpoint["uri"] == url
    assert endpoint["headers"] == {**hostile, "call_uuid": CALL}


@pytest.mark.parametrize("name", ["event", "content-type", "call_uuid"])
def test_answer_rejects_reserved_header_names(name: str) -> None:
    with pytest.raises(ValueError, match="reserved"):
        carrier().answer(INBOUND, WSS, {name: "x"})


def test_answer_rejects_oversized_or_invalid_headers() -> None:
    with pytest.raises(ValueError, match="512"):
        carrier().answer(INBOUND, WSS, {"blob": "x" * 480})
    carrier().answer(CallInfo(carrier="vonage", call_id=""), WSS, {"blob": "x" * 499})   # 512 bytes exactly
    with pytest.raises(ValueError, match="not valid Unicode"):
        carrier().answer(INBOUND, WSS, {"a": "\ud800"})
    with pytest.raises(ValueError, match="must be a string"):
        carrier().answer(INBOUND, WSS, {"a": 5})  # type: ignore[dict-item]  # a wrong type on purpose


@pytest.mark.parametrize("url", ["https://gw.example.com/ws", "ws://gw.example.com/ws", "/ws/vonage/x", ""])
def test_answer_rejects_bad_stream_url(url: str) -> None:
    with pytest.raises(ValueError, match="wss://"):
        carrier().answer(INBOUND, url, {})


def test_busy_is_one_talk_action() -> None:
    body, media_type = carrier().busy(CALL_INFO, "All our lines are busy.")
    assert media_type == "application/json"
    assert body == '[{"action":"talk","text":"All our lines are busy."}]'
    body, _ = carrier().busy(CALL_INFO, HOSTILE)
    assert body == '[{"action":"talk","text":"Tom & Jerry\'s <b>\\"busy\\"</b> $text ${x}"}]'
    assert json.loads(body) == [{"action": "talk", "text": HOSTILE}]
    with pytest.raises(ValueError, match="Unicode"):
        carrier().busy(CALL_INFO, "half \ud800 a pair")


# ------------------------------------------------------------------------------------ media stream

CONNECTED = '{"event":"websocket:connected","content-type":"audio/l16;rate=16000","session_id":"3f9c1e"}'
SILENCE16 = bytes(640)
DTMF = '{"event":"websocket:dtmf","digit":"5","duration":260}'


def test_decode_documented_session() -> None:
    stream = carrier().open_stream()
    assert (stream.sample_rate, stream.frame_ms, stream.marks, stream.started) == (16000, 20, True, False)
    assert stream.decode(CONNECTED) == [StreamStarted(
        stream_id="3f9c1e", call_id="", custom_parameters={"session_id": "3f9c1e"}, sample_rate=16000,
        encoding="audio/l16")]
    assert stream.started
    assert stream.decode(SILENCE16) == [AudioFrame(SILENCE16, 16000)]
    assert stream.decode(DTMF) == [Dtmf("5")]
    assert stream.decode('{"event":"websocket:notify","payload":{"name":"utt-7"}}') == [MarkPlayed("utt-7")]
    assert stream.decode('{"event":"websocket:cleared"}') == []
    assert stream.decode('{"event":"websocket:someday-new","x":1}') == []


def test_connected_carries_the_call_uuid_and_flattened_headers() -> None:
    stream = carrier().open_stream()
    [frame] = stream.decode(json.dumps({"event": "websocket:connected", "content-type": "audio/l16;rate=16000",
                                        "session_id": "s1", "persona": "p", "call_uuid": CALL,
                                        "nested": {"a": [1, 2]}, "n": 5}))
    assert frame == StreamStarted(stream_id="s1", call_id=CALL, sample_rate=16000, encoding="audio/l16",
                                  custom_parameters={"session_id": "s1", "persona": "p", "nested": '{"a":[1,2]}',
                                                     "n": "5"})
    assert stream.call_uuid == CALL
    no_session = carrier().open_stream()
    assert no_session.decode('{"event":"websocket:connected","content-type":"audio/l16; rate=16000"}')[0] \
        .stream_id == "vonage-websocket"


def test_binary_is_always_audio_and_text_never_is() -> None:
    stream = started()
    looks_like_json = b'{"event":"websocket:dtmf","digit":"5"}'
    assert stream.decode(looks_like_json) == [AudioFrame(looks_like_json, 16000)]
    assert stream.decode(bytearray(SILENCE16)) == [AudioFrame(SILENCE16, 16000)]
    assert stream.decode(b"") == []
    with pytest.raises(CarrierProtocolError, match="not valid JSON"):
        stream.decode(SILENCE16.decode("latin-1"))


@pytest.mark.parametrize(("message", "digit"), [
    ('{"event":"websocket:dtmf","dtmf":{"digit":"7","duration":100}}', "7"),
    ('{"event":"websocket:dtmf","dtmf":"#"}', "#"),
])
def test_dtmf_fallback_shapes(message: str, digit: str) -> None:
    assert started().decode(message) == [Dtmf(digit)]


@pytest.mark.parametrize("digit", list("0123456789*#ABCD"))
def test_decode_every_dtmf_digit(digit: str) -> None:
    assert started().decode(DTMF.replace('"5"', json.dumps(digit))) == [Dtmf(digit)]


def test_encode_tone8_vector() -> None:
    stream = started()
    [frame] = stream.encode(AudioFrame(TONE8_LE, 16000))
    assert frame == TONE8_LE + bytes(624) and len(frame) == 640
    assert TONE8_LE == pcm([0, 5657, 8000, 5657, 0, -5657, -8000, -5657])
    with pytest.raises(ValueError, match="16000 Hz"):
        stream.encode(AudioFrame(TONE8_LE, 8000))
    upsampled = Resampler(8000, 16000).process(TONE8_LE)     # 8 kHz audio is resampled first
    [frame] = stream.encode(AudioFrame(upsampled, 16000))
    assert len(frame) == 640 and frame[:len(upsampled)] == upsampled and not any(frame[len(upsampled):])


@pytest.mark.parametrize(("rate", "size"), [(8000, 320), (16000, 640), (24000, 960)])
def test_encode_splits_into_exact_20ms_frames(rate: int, size: int) -> None:
    stream = started(rate)
    audio = bytes(range(256)) * (size * 5 // 2 // 256 + 1)
    audio = audio[:size * 5 // 2]                                 # 50 ms
    frames = stream.encode(AudioFrame(audio, rate))
    assert [len(f) for f in frames] == [size, size, size]
    assert all(isinstance(f, bytes) for f in frames)
    assert b"".join(frames) == audio + bytes(size // 2)            # the tail padded with silence
    exact = bytes(size)
    assert stream.encode(AudioFrame(exact, rate))[0] is exact    # the usual case: no copy
    assert stream.encode(AudioFrame(bytes(size * 3), rate)) == [bytes(size)] * 3
    assert stream.encode(AudioFrame(b"", rate)) == []


def test_round_trip_through_encode_and_decode() -> None:
    stream = started()
    audio = pcm([(i * 37) % 65536 - 32768 for i in range(320)])
    [out] = stream.encode(AudioFrame(audio, 16000))
    assert stream.decode(out) == [AudioFrame(audio, 16000)]          # L16 is lossless both ways


def test_encode_mark_and_clear() -> None:
    stream = started()
    assert stream.encode(Mark("utt-7")) == ['{"action":"notify","payload":{"name":"utt-7"}}']
    assert stream.encode(Clear()) == ['{"action":"clear"}']
    assert json.loads(stream.encode(Mark('a"\\b</x>'))[0]) == {"action": "notify", "payload": {"name": 'a"\\b</x>'}}


def test_clear_and_notify_switch_off() -> None:
    c = carrier(clear_and_notify=False)
    stream = c.open_stream()
    assert stream.marks is False
    stream.decode(CONNECTED)
    assert stream.encode(Mark("utt-7")) == [] and stream.encode(Clear()) == []
    assert stream.encode(AudioFrame(SILENCE16, 16000)) == [SILENCE16]


def test_encode_errors() -> None:
    fresh = carrier().open_stream()
    for frame in (AudioFrame(SILENCE16, 16000), Mark("m"), Clear()):
        with pytest.raises(CarrierProtocolError, match=r"^vonage stream has not started \(no websocket:connected yet\)$"):
            fresh.encode(frame)
    stream = started()
    for frame in (Dtmf("1"), MarkPlayed("m"), StreamStopped(), StreamStarted("s", "c")):
        with pytest.raises(ValueError, match="cannot send"):
            stream.encode(frame)


def connected(**fields: Any) -> str:
    message: dict[str, Any] = {"event": "websocket:connected", "content-type": "audio/l16;rate=16000", **fields}
    return json.dumps({k: v for k, v in message.items() if v is not None})


@pytest.mark.parametrize(
    ("is_started", "message", "text"),
    [
        (False, SILENCE16, "vonage audio before websocket:connected"),
        (True, bytes(641), "vonage audio frame of 641 bytes is not whole 16-bit samples"),
        (False, "not json", "vonage text message is not valid JSON"),
        (False, "[" * 100_000, "vonage text message is not valid JSON"),
        (False, '["event"]', "vonage text message has no event"),
        (False, '{"digit":"5"}', "vonage text message has no event"),
        (False, '{"event":5}', "vonage text message has no event"),
        (False, DTMF, "vonage websocket:dtmf before websocket:connected"),
        (False, '{"event":"websocket:notify","payload":{"name":"m"}}',
         "vonage websocket:notify before websocket:connected"),
        (True, CONNECTED, "vonage sent a second websocket:connected"),
        (False, connected(**{"content-type": None}), "vonage websocket:connected has no content-type"),
        (False, connected(**{"content-type": 16000}), "vonage websocket:connected has no content-type"),
        (False, connected(**{"content-type": "audio/l16;rate=8000"}),
         "vonage websocket:connected content-type 'audio/l16;rate=8000' is not supported "
         "(expected audio/l16;rate=16000)"),
        (False, connected(**{"content-type": "audio/pcmu"}), "is not supported"),
        (True, '{"event":"websocket:dtmf","duration":260}', "vonage websocket:dtmf has no digit"),
        (True, '{"event":"websocket:dtmf","digit":""}', "vonage websocket:dtmf has no digit"),
        (True, '{"event":"websocket:dtmf","digit":5}', "vonage websocket:dtmf has no digit"),
        (True, DTMF.replace('"5"', '"55"'), "vonage dtmf digit is not one of 0-9 * # A-D"),
        (True, DTMF.replace('"5"', '"E"'), "vonage dtmf digit is not one of 0-9 * # A-D"),
        (True, '{"event":"websocket:notify"}', "vonage websocket:notify has no payload.name"),
        (True, '{"event":"websocket:notify","payload":{"id":1}}', "vonage websocket:notify has no payload.name"),
        (True, '{"event":"websocket:notify","payload":"utt-7"}', "vonage websocket:notify has no payload.name"),
    ],
)
def test_decode_errors(is_started: bool, message: str | bytes, text: str) -> None:
    stream = started() if is_started else carrier().open_stream()
    with pytest.raises(CarrierProtocolError) as info:
        stream.decode(message)
    assert text in str(info.value)
    assert str(info.value).startswith("vonage ")


# ------------------------------------------------------------------------------------ events

def event(body: dict[str, Any]) -> WebhookRequest:
    return post(body=json.dumps(body).encode(), token=None)


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"status": "answered", "uuid": CALL, "direction": "outbound"}, CallEvent(CALL, "", False, "answered")),
        ({"status": "completed", "uuid": CALL, "duration": "12"}, CallEvent(CALL, "", True, "completed")),
        ({"status": "human", "call_uuid": CALL}, CallEvent(CALL, "human", False, "human")),
        ({"status": "machine", "call_uuid": CALL}, CallEvent(CALL, "machine", False, "machine")),
        ({"status": "machine", "sub_state": "beep_start", "call_uuid": CALL}, CallEvent(CALL, "machine", False, "machine")),
        ({"status": "disconnected", "uuid": CALL}, CallEvent(CALL, "", False, "disconnected")),
    ] + [({"status": s, "uuid": CALL}, CallEvent(CALL, "", True, s))
         for s in ("busy", "cancelled", "failed", "rejected", "timeout", "unanswered")],
)
def test_parse_event(body: dict[str, Any], expected: CallEvent) -> None:
    assert carrier().parse_event(event(body)) == expected


def test_parse_event_errors_and_get() -> None:
    with pytest.raises(CarrierProtocolError, match="^vonage event has no uuid$"):
        carrier().parse_event(event({"status": "answered"}))
    with pytest.raises(CarrierProtocolError, match="not valid JSON"):
        carrier().parse_event(post(body=b"{", token=None))
    request = WebhookRequest("GET", f"{URL}?status=completed&uuid={CALL}", {}, b"")
    assert carrier().parse_event(request) == CallEvent(CALL, "", True, "completed")


def test_signed_event_verifies() -> None:
    body = json.dumps({"status": "completed", "uuid": CALL}).encode()
    c = at(IAT + 5)
    request = post(body=body, token=sign({}, body=body))
    c.verify(request)
    assert c.parse_event(request).ended


# ------------------------------------------------------------------------------------ REST

CALL_INFO = CallInfo(carrier="vonage", call_id=CALL, from_="447700900000", to="447700900001")


@pytest.mark.asyncio
async def test_hang_up_success_and_repeat(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    async with FakeVonageREST(APP_ID, PUBLIC_KEY) as fake, httpx.AsyncClient() as http:
        fake.known_calls = {CALL}
        c = carrier(http, api_base_url=fake.base_url + "/")
        await c.hang_up(CALL_INFO)
        assert fake.ended_calls == [CALL]
        [request] = fake.requests
        assert (request.method, request.path, request.json, request.auth_ok) == (
            "PUT", f"/v1/calls/{CALL}", {"action": "hangup"}, True)
        assert request.claims is not None and request.claims["application_id"] == APP_ID
        assert set(request.claims) == {"application_id", "iat", "jti", "exp"}
        assert request.claims["exp"] - request.claims["iat"] == 900
        await c.hang_up(CALL_INFO)                              # 404 for an ended call: still success
        assert fake.ended_calls == [CALL] and len(fake.requests) == 2
        jtis = [r.claims["jti"] for r in fake.requests if r.claims is not None]
        assert len(jtis) == 2 and jtis[0] != jtis[1]
    assert "already ended (HTTP 404)" in caplog.text


@pytest.mark.asyncio
async def test_hang_up_unknown_call_is_success() -> None:
    async with FakeVonageREST(APP_ID, PUBLIC_KEY) as fake, httpx.AsyncClient() as http:
        await carrier(http, api_base_url=fake.base_url).hang_up(CALL_INFO)
        assert fake.ended_calls == [] and len(fake.requests) == 1


@pytest.mark.asyncio
@pytest.mark.parametrize("error", [
    (400, "invalid-call-state", "Bad Request", "The call is not in progress"),
    (409, "conflict", "Conflict", "Call has already completed"),
    (422, "unprocessable", "Unprocessable Entity", "Call aaaa no longer exists"),
    (410, "gone", "Gone", "Call ended"),
])
async def test_hang_up_on_a_call_in_an_ended_state_is_success(error: tuple[int, str, str, str]) -> None:
    async with FakeVonageREST(APP_ID, PUBLIC_KEY) as fake, httpx.AsyncClient() as http:
        fake.calls = {CALL: "completed"}
        fake.ended_call_error = error
        await carrier(http, api_base_url=fake.base_url).hang_up(CALL_INFO)
        assert fake.ended_calls == []


@pytest.mark.asyncio
async def test_hang_up_wrong_key(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    async with FakeVonageREST(APP_ID, PUBLIC_KEY) as fake, httpx.AsyncClient() as http:
        fake.known_calls = {CALL}
        c = carrier(http, private_key=OTHER_PRIVATE_KEY, api_base_url=fake.base_url)
        with pytest.raises(HangupFailed, match=r"HTTP 401: Unauthorized: You did not provide correct credentials\.$") \
                as info:
            await c.hang_up(CALL_INFO)
        assert fake.ended_calls == [] and fake.requests[0].auth_ok is False
        other_app = carrier(http, application_id="bbbbbbbb-0000-0000-0000-000000000000", api_base_url=fake.base_url)
        with pytest.raises(HangupFailed, match="HTTP 401"):
            await other_app.hang_up(CALL_INFO)
    assert OTHER_PRIVATE_KEY[40:80] not in str(info.value) + caplog.text + repr(c)
    assert "eyJ" not in str(info.value) + caplog.text      # no token either


@pytest.mark.asyncio
async def test_hang_up_failures() -> None:
    async with FakeVonageREST(APP_ID, PUBLIC_KEY) as fake, httpx.AsyncClient() as http:
        fake.known_calls = {CALL}
        fake.force_error = (503, "internal-error", "Service Unavailable", "Please retry")
        with pytest.raises(HangupFailed, match=r"^vonage hang-up of .* failed: HTTP 503: Service Unavailable: Please retry$"):
            await carrier(http, api_base_url=fake.base_url).hang_up(CALL_INFO)
    with pytest.raises(HangupFailed, match="no private_key configured"):
        await carrier(private_key="").hang_up(CALL_INFO)


@pytest.mark.asyncio
@pytest.mark.parametrize(("status", "body", "text"), [
    (404, "nginx: not found", "HTTP 404: Not Found"),                        # not Vonage's JSON: a wrong host
    (400, '{"title":"Bad Request","detail":"action is invalid"}', "HTTP 400: Bad Request: action is invalid"),
    (500, "[]", "HTTP 500: Internal Server Error"),
])
async def test_hang_up_errors_that_are_not_an_ended_call(status: int, body: str, text: str) -> None:
    transport = httpx.MockTransport(lambda request: httpx.Response(status, text=body))
    async with httpx.AsyncClient(transport=transport) as http:
        with pytest.raises(HangupFailed, match=text):
            await carrier(http).hang_up(CALL_INFO)


@pytest.mark.asyncio
async def test_hang_up_transport_error_is_chained() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    async with httpx.AsyncClient(transport=httpx.MockTransport(refuse)) as http:
        with pytest.raises(HangupFailed, match="ConnectError") as info:
            await carrier(http).hang_up(CALL_INFO)
    assert isinstance(info.value.__cause__, httpx.ConnectError)


@pytest.mark.asyncio
async def test_transfer_to_phone_and_sip() -> None:
    async with FakeVonageREST(APP_ID, PUBLIC_KEY) as fake, httpx.AsyncClient() as http:
        fake.known_calls = {CALL}
        c = carrier(http, api_base_url=fake.base_url)
        await c.transfer(CALL_INFO, "+14155550100")
        await c.transfer(CALL_INFO, "sip:agent@pbx.example.com;transport=tls")
        assert fake.transfers == [
            (CALL, {"type": "ncco", "ncco": [{"action": "connect", "from": "447700900001",
                                               "endpoint": [{"type": "phone", "number": "14155550100"}]}]}),
            (CALL, {"type": "ncco", "ncco": [{"action": "connect", "from": "447700900001", "endpoint": [
                {"type": "sip", "uri": "sip:agent@pbx.example.com;transport=tls"}]}]}),
        ]
        assert fake.requests[0].json["action"] == "transfer"
        app_call = CallInfo(carrier="vonage", call_id=CALL, to="jamie")
        await c.transfer(app_call, "14155550100")
        assert fake.transfers[-1][1]["ncco"][0] == {"action": "connect", "randomFromNumber": True,
                                                     "endpoint": [{"type": "phone", "number": "14155550100"}]}


@pytest.mark.asyncio
async def test_transfer_failures() -> None:
    async with FakeVonageREST(APP_ID, PUBLIC_KEY) as fake, httpx.AsyncClient() as http:
        c = carrier(http, api_base_url=fake.base_url)
        for target in ("", "4155", "tel:+14155550100", "+1 415 555 0100", "sip:"):
            with pytest.raises(CallControlFailed, match="E.164 number or a sip: URI"):
                await c.transfer(CALL_INFO, target)
        assert fake.requests == []
        with pytest.raises(CallControlFailed, match=r"^vonage transfer of .* failed: HTTP 404: Not Found"):
            await c.transfer(CALL_INFO, "+14155550100")                       # the call is gone
        fake.known_calls = {CALL}
        with pytest.raises(CallControlFailed, match="HTTP 401"):
            await carrier(http, private_key=OTHER_PRIVATE_KEY, api_base_url=fake.base_url).transfer(
                CALL_INFO, "+14155550100")
        assert fake.transfers == []


def dial_request(**kwargs: Any) -> DialRequest:
    values: dict[str, Any] = dict(
        to="+14155550100", from_="+447700900001", stream_url="wss://voice.example.test/media/vonage/s2",
        answer_url="https://voice.example.test/start/vonage?session=s2",
        events_url="https://voice.example.test/events/vonage", parameters={"session_id": "s2", "persona": "sales"})
    values.update(kwargs)
    return DialRequest(**values)


@pytest.mark.asyncio
async def test_dial_with_inline_ncco() -> None:
    async with FakeVonageREST(APP_ID, PUBLIC_KEY) as fake, httpx.AsyncClient() as http:
        c = carrier(http, api_base_url=fake.base_url)
        call = await c.dial(dial_request())
        [body] = fake.dialed
        assert body == {
            "to": [{"type": "phone", "number": "14155550100"}],
            "from": {"type": "phone", "number": "447700900001"},
            "ncco": [{"action": "connect", "from": "447700900001", "endpoint": [{
                "type": "websocket", "uri": "wss://voice.example.test/media/vonage/s2",
                "content-type": "audio/l16;rate=16000", "headers": {"session_id": "s2", "persona": "sales"}}]}],
            "event_url": ["https://voice.example.test/events/vonage"], "event_method": "POST"}
        assert call == CallInfo(carrier="vonage", call_id=call.call_id, from_="447700900001", to="14155550100",
                                direction="outbound", custom={"session_id": "s2", "persona": "sales"})
        assert fake.calls == {call.call_id: "started"}
        assert (fake.requests[0].method, fake.requests[0].path) == ("POST", "/v1/calls")
        await c.hang_up(call)
        assert fake.ended_calls == [call.call_id]


@pytest.mark.asyncio
async def test_dial_machine_detection() -> None:
    async with FakeVonageREST(APP_ID, PUBLIC_KEY) as fake, httpx.AsyncClient() as http:
        await carrier(http, api_base_url=fake.base_url).dial(dial_request(machine_detection=True))
        await carrier(http, api_base_url=fake.base_url, amd_mode="detect_beep").dial(
            dial_request(machine_detection=True, to="sip:bob@example.com"))
        await carrier(http, api_base_url=fake.base_url, amd="standard").dial(
            dial_request(machine_detection=True, events_url=""))
        first, second, third = fake.dialed
        assert first["advanced_machine_detection"] == {"behavior": "continue", "mode": "default"}
        assert "machine_detection" not in first
        assert second["advanced_machine_detection"]["mode"] == "detect_beep"
        assert second["to"] == [{"type": "sip", "uri": "sip:bob@example.com"}]
        assert third["machine_detection"] == "continue" and "event_url" not in third
        assert "advanced_machine_detection" not in third


@pytest.mark.asyncio
async def test_dial_failures() -> None:
    async with FakeVonageREST(APP_ID, PUBLIC_KEY) as fake, httpx.AsyncClient() as http:
        with pytest.raises(CallControlFailed, match="HTTP 401: Unauthorized"):
            await carrier(http, private_key=OTHER_PRIVATE_KEY, api_base_url=fake.base_url).dial(dial_request())
        with pytest.raises(CallControlFailed, match="from_ must be an E.164 number"):
            await carrier(http, api_base_url=fake.base_url).dial(dial_request(from_="Acme"))
        with pytest.raises(CallControlFailed, match="E.164 number or a sip: URI"):
            await carrier(http, api_base_url=fake.base_url).dial(dial_request(to="bob"))
        with pytest.raises(ValueError, match="wss://"):
            await carrier(http, api_base_url=fake.base_url).dial(dial_request(stream_url="https://x/y"))
        assert fake.dialed == []
    transport = httpx.MockTransport(lambda request: httpx.Response(201, json={"status": "started"}))
    async with httpx.AsyncClient(transport=transport) as http:
        with pytest.raises(CallControlFailed, match="no call uuid"):
            await carrier(http).dial(dial_request())


@pytest.mark.asyncio
async def test_send_dtmf() -> None:
    async with FakeVonageREST(APP_ID, PUBLIC_KEY) as fake, httpx.AsyncClient() as http:
        fake.known_calls = {CALL}
        c = carrier(http, api_base_url=fake.base_url)
        assert await c.send_dtmf(CALL_INFO, "12#p*9") is True
        assert fake.dtmf == [(CALL, "12#p*9")]
        assert (fake.requests[0].method, fake.requests[0].path, fake.requests[0].json) == (
            "PUT", f"/v1/calls/{CALL}/dtmf", {"digits": "12#p*9"})
        for digits in ("", "12a", "1 2", "9" * 65):
            with pytest.raises(CallControlFailed, match="0-9"):
                await c.send_dtmf(CALL_INFO, digits)
        fake.calls[CALL] = "completed"
        with pytest.raises(CallControlFailed, match="HTTP 404"):
            await c.send_dtmf(CALL_INFO, "1")
        assert len(fake.dtmf) == 1


@pytest.mark.asyncio
async def test_fake_rejects_bad_requests() -> None:
    async with FakeVonageREST(APP_ID, PUBLIC_KEY) as fake, httpx.AsyncClient(base_url=fake.base_url) as http:
        fake.known_calls = {CALL}
        c = carrier(http)
        auth = {"Authorization": f"Bearer {c._rest_token(CallControlFailed)}"}  # noqa: SLF001 - a valid token, sent by hand
        no_auth = await http.put(f"/v1/calls/{CALL}", json={"action": "hangup"})
        assert no_auth.status_code == 401 and no_auth.headers["content-type"] == "application/problem+json"
        assert set(no_auth.json()) == {"type", "title", "detail", "instance"}
        assert no_auth.json()["type"] == "https://developer.nexmo.com/api-errors#unauthorized"
        now = int(time.time())
        expired = jwt.encode({"application_id": APP_ID, "iat": now - 120, "jti": "j", "exp": now - 60},
                             PRIVATE_KEY, algorithm="RS256")
        assert (await http.put(f"/v1/calls/{CALL}", json={"action": "hangup"},
                               headers={"Authorization": f"Bearer {expired}"})).status_code == 401
        hs256 = jwt.encode({"application_id": APP_ID, "iat": now, "jti": "j"}, SECRET, algorithm="HS256")
        assert (await http.put(f"/v1/calls/{CALL}", json={"action": "hangup"},
                               headers={"Authorization": f"Bearer {hs256}"})).status_code == 401
        bad_action = await http.put(f"/v1/calls/{CALL}", json={"action": "explode"}, headers=auth)
        assert bad_action.status_code == 400 and bad_action.json()["invalid_parameters"][0]["name"] == "action"
        extra = await http.put(f"/v1/calls/{CALL}", json={"action": "hangup", "x": 1}, headers=auth)
        assert extra.status_code == 400
        not_json = await http.put(f"/v1/calls/{CALL}", content=b"action=hangup", headers=auth)
        assert not_json.status_code == 400
        assert (await http.post(f"/v1/calls/{CALL}", json={"action": "hangup"}, headers=auth)).status_code == 405
        assert (await http.get("/v1/calls", headers=auth)).status_code == 405
        assert (await http.put("/v2/nothing", json={}, headers=auth)).status_code == 404
        bad_transfer = await http.put(f"/v1/calls/{CALL}", headers=auth, json={
            "action": "transfer", "destination": {"type": "ncco", "ncco": [
                {"action": "connect", "endpoint": [{"type": "phone", "number": "+14155550100"}]}]}})
        assert bad_transfer.status_code == 400
        no_from = await http.post("/v1/calls", headers=auth, json={
            "to": [{"type": "phone", "number": "14155550100"}], "ncco": [{"action": "talk", "text": "hi"}]})
        assert no_from.status_code == 400 and "random_from_number" in no_from.json()["detail"]
        both = await http.post("/v1/calls", headers=auth, json={
            "to": [{"type": "phone", "number": "14155550100"}], "random_from_number": True,
            "ncco": [{"action": "talk", "text": "hi"}], "answer_url": ["https://x/answer"]})
        assert both.status_code == 400
        bad_amd = await http.post("/v1/calls", headers=auth, json={
            "to": [{"type": "phone", "number": "14155550100"}], "random_from_number": True,
            "answer_url": ["https://x/answer"], "advanced_machine_detection": {"behavior": "continue",
                                                                               "beep_timeout": 10}})
        assert bad_amd.status_code == 400
        bad_digits = await http.put(f"/v1/calls/{CALL}/dtmf", json={"digits": "12x"}, headers=auth)
        assert bad_digits.status_code == 400
        assert fake.ended_calls == [] and fake.dialed == [] and fake.dtmf == []


# ------------------------------------------------------------------------------------ dialect

PUBLIC = "https://voice.example.test"


def dialect(**credentials: str) -> VonageDialect:
    return VonageDialect(credentials={"signature_secret": SECRET, "application_id": APP_ID, **credentials},
                         from_="+447700900000", to="+447700900001")


def as_request(d: VonageDialect, **kwargs: Any) -> WebhookRequest:
    hook = d.webhook(PUBLIC, {}, **kwargs)
    return WebhookRequest(hook.method, PUBLIC + hook.path, {k.lower(): v for k, v in hook.headers.items()}, hook.body)


def test_dialect_is_registered() -> None:
    assert dialect_for("vonage") is VonageDialect


@pytest.mark.parametrize("method", ["POST", "GET"])
def test_dialect_round_trip_through_the_carrier(method: str) -> None:
    d = dialect(answer_method=method)
    c = carrier(ws_auth_value="Bearer s3cr3t")
    request = as_request(d)
    assert request.method == method
    c.verify(request)
    call = c.parse_call(request)
    assert (call.call_id, call.from_, call.to) == (d.call_id, "447700900000", "447700900001")
    body, _ = c.answer(call, "wss://voice.example.test/media/vonage/sess1", {"session_id": "sess1", "persona": "p"})
    assert d.answer(200, body) == "wss://voice.example.test/media/vonage/sess1"
    assert d.parameters == {"session_id": "sess1", "persona": "p", "call_uuid": d.call_id}
    c.verify_websocket({k.lower(): v for k, v in d.ws_headers().items()}, "wss://voice.example.test/media/vonage/sess1")

    stream = c.open_stream()
    frames = [f for m in d.opening() for f in stream.decode(m)]
    assert frames == [StreamStarted(stream_id="sess1", call_id=d.call_id, sample_rate=16000, encoding="audio/l16",
                                    custom_parameters={"session_id": "sess1", "persona": "p"})]
    speech = pcm([(i * 97) % 20000 - 10000 for i in range(320)])
    assert stream.decode(d.media(speech)) == [AudioFrame(speech, 16000)]
    assert stream.decode(d.dtmf("#")) == [Dtmf("#")]

    [out] = stream.encode(AudioFrame(speech, 16000))
    assert d.parse(out) == [Inbound("media", pcm=speech)]
    [tail] = stream.encode(AudioFrame(speech[:100], 16000))
    assert d.parse(tail) == [Inbound("media", pcm=speech[:100] + bytes(540))]
    [mark] = stream.encode(Mark("r1-c0"))
    assert d.parse(mark) == [Inbound("mark", name="r1-c0")]
    assert stream.decode(d.mark_ack("r1-c0")) == [MarkPlayed("r1-c0")]
    [clear] = stream.encode(Clear())
    assert d.parse(clear) == [Inbound("clear")]
    assert d.stop() == []


def test_dialect_webhook_is_signed_like_vonage() -> None:
    d = dialect()
    request = as_request(d)
    claims = decode_signed_token(request.headers["authorization"].split(" ", 1)[1], SECRET)
    assert claims["payload_hash"] == hashlib.sha256(request.body).hexdigest()
    assert claims["iss"] == "Vonage" and claims["application_id"] == APP_ID and claims["jti"]
    assert json.loads(request.body) == d.webhook_params()
    with pytest.raises(SignatureInvalid, match="signature does not match"):
        carrier().verify(as_request(dialect(signature_secret="another-secret-that-is-long-enough-000")))
    with pytest.raises(SignatureInvalid, match="malformed token"):
        carrier().verify(as_request(d, signature="forged"))
    with pytest.raises(SignatureInvalid, match="stale"):
        stale = d.token(request.body, iat=time.time() - 3600)
        carrier().verify(as_request(d, signature=stale))


def test_dialect_flags_what_vonage_would_reject() -> None:
    d = dialect()
    assert d.parse(bytes(320))[0].kind == "invalid"           # 10 ms at 16 kHz: Vonage needs exactly 640 bytes
    assert d.parse(bytes(641))[0].kind == "invalid"
    assert d.parse('{"event":"media","payload":"AAAA"}')[0].kind == "invalid"
    assert d.parse('{"action":"notify","payload":{"name":"m"},"extra":1}')[0].kind == "invalid"
    assert d.parse('{"action":"clear","now":true}')[0].kind == "invalid"
    assert d.parse("not json")[0].kind == "invalid"
    assert d.parse('{"action":"notify","payload":"m"}')[0].kind == "invalid"
    with pytest.raises(ValueError, match="exactly 640 bytes"):
        d.media(bytes(320))


def test_dialect_rates_and_answer_checks() -> None:
    d8 = dialect(rate="8000")
    assert (d8.rate, d8.frame_ms) == (8000, 20)
    body, _ = carrier(sample_rate=8000).answer(INBOUND, WSS, {})
    assert d8.answer(200, body) == WSS
    assert d8.parse(bytes(320)) == [Inbound("media", pcm=bytes(320))]
    with pytest.raises(AssertionError, match="content-type"):
        dialect().answer(200, body)                                   # a 16 kHz call answered at 8 kHz
    with pytest.raises(AssertionError, match="no connect action"):
        dialect().answer(200, '[{"action":"talk","text":"hi"}]')
    d = dialect()
    payload = {"name": "m1", "extra": [1]}
    d.parse(json.dumps({"action": "notify", "payload": payload}))
    assert json.loads(d.mark_ack("m1")) == {"event": "websocket:notify", "payload": payload}   # echoed as sent
    assert d.ws_headers() == {}


@pytest.mark.asyncio
async def test_emulated_vonage_call_through_the_gateway() -> None:
    """The dialect against a real gateway configured for Vonage: signed JSON webhook, NCCO answer,
    the websocket Authorization value, websocket:connected with the call uuid, 16 kHz binary audio,
    notify markers, clear on barge-in, REST hang-up."""
    import asyncio

    from gateway.simulate.call import SimulatedCall
    from tests.conftest import PUBLIC_URL, phone_config, running_gateway
    from tests.fakes.openai_server import FakeOpenAI
    from tests.speech import speech_pcm

    speech = speech_pcm("I would like to book a table for two people tonight.", 8000)
    long_reply = "Let me tell you about tonight's menu. " + "We have fresh pasta with basil and lemon. " * 6
    async with (FakeOpenAI(transcripts=["book a table", "what is on the menu", "stop"],
                           replies=["Sure. For what time?", long_reply], tts_ms_per_char=20) as fake,
                FakeVonageREST(APP_ID, PUBLIC_KEY) as vonage):
        config = phone_config(fake.base_url, "http://127.0.0.1:9", carriers={"vonage": {
            "application_id": APP_ID, "private_key": PRIVATE_KEY, "signature_secret": SECRET,
            "api_base_url": vonage.base_url, "ws_auth_value": "Bearer s3cr3t"}})
        async with running_gateway(config) as url:
            call = SimulatedCall(gateway=url, public_url=PUBLIC_URL, carrier="vonage",
                                 credentials={"signature_secret": SECRET, "application_id": APP_ID})
            intruder = SimulatedCall(gateway=url, public_url=PUBLIC_URL, carrier="vonage",
                                     credentials={"signature_secret": SECRET, "application_id": APP_ID})
            assert (await intruder.dial()).status_code == 200
            intruder.dialect.ws_authorization = "Bearer guessed"          # the upgrade lacks the NCCO's value
            await intruder.connect(send_start=False)
            await intruder.wait_closed(timeout=5)
            assert intruder.close_code == 1008
            await intruder.close()
            vonage.known_calls = {call.call_sid}
            forged = await call.dial(signature="forged.token.value")
            assert forged.status_code == 403
            answer = await call.dial()
            assert answer.status_code == 200 and answer.headers["content-type"].startswith("application/json")
            assert call.parameters["session_id"] == call.session_id and "persona" in call.parameters
            assert call.parameters["call_uuid"] == call.call_sid
            assert call.dialect.ws_headers() == {"Authorization": "Bearer s3cr3t"}
            await call.connect()
            await call.wait_audio(after=0, timeout=5)                  # the greeting, 640-byte frames
            await call.wait_quiet(400)
            end = await call.speak(speech)
            await call.wait_audio(after=end, timeout=5)
            await call.wait_quiet(400)
            assert {"r2-c0", "r2-c1"} <= {name for _, name in call.received.marks}
            end = await call.speak(speech)
            await call.wait_audio(after=end, timeout=5)
            await asyncio.sleep(1.0)
            assert call.playing()
            barge = asyncio.create_task(call.speak(speech))            # barge-in: {"action":"clear"}
            await call.wait_clear(timeout=3)
            await barge
            fake.state.fail["llm"] = "500"                             # the apology, then a REST hang-up
            await call.wait_closed(timeout=15)
            assert vonage.ended_calls == [call.call_sid]
            assert vonage.requests[-1].path == f"/v1/calls/{call.call_sid}"
            assert vonage.requests[-1].json == {"action": "hangup"}
            assert call.received.invalid == []
            assert {samples for _, samples in call.received.media} == {320}   # exact 20 ms at 16 kHz
            await call.close()
