"""gateway.http.ws_frames against RFC 6455's own examples (section 5.7 and 1.3) and what the RFC forbids."""

from __future__ import annotations

import os
import struct

import pytest

from gateway.http.ws_frames import (
    OP_BINARY,
    OP_CLOSE,
    OP_PING,
    OP_TEXT,
    FrameError,
    accept_key,
    close_payload,
    encode_frame,
    handshake_problem,
    parse_close,
    parse_frame,
)


def masked(opcode: int, payload: bytes, *, fin: bool = True, mask: bytes = b"\x37\xfa\x21\x3d",
           rsv: int = 0) -> bytes:
    """A client frame as a browser or carrier sends it."""
    first = (0x80 if fin else 0) | rsv | opcode
    n = len(payload)
    head = bytes((first, 0x80 | n)) if n < 126 else (
        struct.pack("!BBH", first, 0xFE, n) if n < 65536 else struct.pack("!BBQ", first, 0xFF, n))
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def test_rfc_masked_hello() -> None:
    wire = bytes([0x81, 0x85, 0x37, 0xFA, 0x21, 0x3D, 0x7F, 0x9F, 0x4D, 0x51, 0x58])   # RFC 6455 5.7
    assert parse_frame(wire, 0, 125) == (True, OP_TEXT, b"Hello", 11)


def test_rfc_fragmented_hello_and_server_frames() -> None:
    first = masked(OP_TEXT, b"Hel", fin=False)
    rest = masked(0, b"lo")
    buf = first + rest
    parsed = parse_frame(buf, 0, 125)
    assert parsed is not None
    fin, op, payload, end = parsed
    assert (fin, op, payload) == (False, OP_TEXT, b"Hel")
    assert parse_frame(buf, end, 125) == (True, 0, b"lo", len(buf))
    # the RFC's unmasked examples are what a server writes
    assert encode_frame(OP_TEXT, b"Hello") == bytes([0x81, 0x05, 0x48, 0x65, 0x6C, 0x6C, 0x6F])
    assert encode_frame(OP_PING, b"Hello") == bytes([0x89, 0x05]) + b"Hello"
    assert encode_frame(OP_BINARY, bytes(256))[:4] == bytes([0x82, 0x7E, 0x01, 0x00])
    assert encode_frame(OP_BINARY, bytes(65536))[:10] == bytes([0x82, 0x7F, 0, 0, 0, 0, 0, 1, 0, 0])
    assert encode_frame(OP_TEXT, b"Hel", fin=False)[0] == 0x01


@pytest.mark.parametrize("size", [0, 125, 126, 65535, 65536, 70000])
def test_lengths_round_trip_and_incomplete(size: int) -> None:
    payload = os.urandom(size)
    wire = masked(OP_BINARY, payload)
    assert parse_frame(wire, 0, 1 << 20) == (True, OP_BINARY, payload, len(wire))
    for cut in (1, 2, 3, 9, len(wire) - 1):
        if cut < len(wire):
            assert parse_frame(wire[:cut], 0, 1 << 20) is None


def test_two_frames_in_one_read() -> None:
    buf = bytearray(b"xx" + masked(OP_TEXT, b"a") + masked(OP_TEXT, b"bc"))
    one = parse_frame(buf, 2, 100)
    assert one is not None and one[2] == b"a"
    two = parse_frame(buf, one[3], 100)
    assert two is not None and two[2] == b"bc" and two[3] == len(buf)


@pytest.mark.parametrize(("wire", "code"), [
    (bytes([0x81, 0x05]) + b"Hello", 1002),                       # not masked
    (masked(OP_TEXT, b"x", rsv=0x40), 1002),                       # RSV1 without an extension
    (masked(0x3, b"x"), 1002),                                     # reserved opcode
    (masked(OP_PING, b"x", fin=False), 1002),                      # fragmented control frame
    (masked(OP_PING, bytes(126)), 1002),                           # control frame over 125 bytes
    (masked(OP_BINARY, bytes(101)), 1009),                         # over the limit
    (bytes([0x82, 0xFF]) + struct.pack("!Q", 1 << 63), 1002),      # 64-bit length with its top bit set
])
def test_refused_frames(wire: bytes, code: int) -> None:
    with pytest.raises(FrameError) as exc:
        parse_frame(wire, 0, 100)
    assert exc.value.code == code


def test_too_big_is_refused_from_the_header_alone() -> None:
    header = bytes([0x82, 0xFF]) + struct.pack("!Q", 10**9) + b"\0\0\0\0"   # no payload buffered yet
    with pytest.raises(FrameError) as exc:
        parse_frame(header, 0, 65536)
    assert exc.value.code == 1009


def test_close_bodies() -> None:
    assert parse_close(b"") == (1005, "")
    assert parse_close(close_payload(1000, "bye")) == (1000, "bye")
    assert parse_close(close_payload(4001, "x")) == (4001, "x")
    assert close_payload(1005, "ignored") == b""
    assert len(close_payload(1000, "é" * 200)) <= 125
    for bad in (b"\x03", struct.pack("!H", 999), struct.pack("!H", 1005), struct.pack("!H", 1006),
                struct.pack("!H", 2000), struct.pack("!H", 5000)):
        with pytest.raises(FrameError) as exc:
            parse_close(bad)
        assert exc.value.code == 1002
    with pytest.raises(FrameError) as exc:
        parse_close(struct.pack("!H", 1000) + b"\xff\xfe")
    assert exc.value.code == 1007


def status(problem: tuple[int, str] | None) -> int | None:
    return None if problem is None else problem[0]


def test_handshake() -> None:
    assert accept_key("dGhlIHNhbXBsZSBub25jZQ==") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="   # RFC 6455 1.3
    good = {"upgrade": "websocket", "connection": "keep-alive, Upgrade", "sec-websocket-version": "13",
            "sec-websocket-key": "dGhlIHNhbXBsZSBub25jZQ=="}
    assert handshake_problem("GET", good) is None
    assert handshake_problem("POST", good) == (405, "a WebSocket opens with GET")
    assert status(handshake_problem("GET", {**good, "sec-websocket-version": "8"})) == 426
    assert status(handshake_problem("GET", {**good, "sec-websocket-key": "c2hvcnQ="})) == 400
    assert status(handshake_problem("GET", {**good, "sec-websocket-key": "not base64!"})) == 400
    assert status(handshake_problem("GET", {**good, "upgrade": "h2c"})) == 400
    assert status(handshake_problem("GET", {k: v for k, v in good.items() if k != "connection"})) == 400
    assert OP_CLOSE == 8
