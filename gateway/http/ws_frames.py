"""RFC 6455 frames as a server reads and writes them: pure functions over bytes, no I/O.

A client's frames are masked; a server's are not. :func:`parse_frame` reads one client frame from a
buffer (or says it is not complete yet) and refuses what RFC 6455 forbids with :class:`FrameError`,
whose ``code`` is the close code to answer with (1002 protocol error, 1009 too big). :func:`encode_frame`
builds one unmasked server frame. :func:`accept_key` and :func:`handshake_problem` are the opening
handshake's arithmetic and checks.

Usage::

    parsed = parse_frame(buffer, 0, max_payload=65536)   # None: wait for more bytes
    if parsed is not None:
        fin, opcode, payload, end = parsed                   # the frame's payload is unmasked
    wire = encode_frame(OP_TEXT, b'{"event":"media"}')
    accept_key("dGhlIHNhbXBsZSBub25jZQ==")                 # 's3pPLMBiTxaQ9kYGzzhZRbK+xOo='
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import struct
from collections.abc import Mapping

try:                                        # websockets' C helper: XOR with the 4-byte mask
    from websockets.speedups import apply_mask
except ImportError:  # pragma: no cover - the wheel without its extension
    from websockets.utils import apply_mask

__all__ = ["OP_BINARY", "OP_CLOSE", "OP_CONT", "OP_PING", "OP_PONG", "OP_TEXT", "FrameError", "accept_key",
           "close_payload", "encode_frame", "handshake_problem", "parse_close", "parse_frame"]

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
_DATA_OPS = frozenset((OP_CONT, OP_TEXT, OP_BINARY))
_CONTROL_OPS = frozenset((OP_CLOSE, OP_PING, OP_PONG))
_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_U16 = struct.Struct("!H")
_U64 = struct.Struct("!Q")
_HEAD16 = struct.Struct("!BBH")
_HEAD64 = struct.Struct("!BBQ")


class FrameError(Exception):
    """A frame the peer must not send; ``code`` is the close code to answer with."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


def parse_frame(buf: bytes | bytearray, start: int,
                max_payload: int) -> tuple[bool, int, bytes, int] | None:
    """One masked client frame from ``buf[start:]``: ``(fin, opcode, payload, end)`` or None if incomplete.

    ``end`` is the offset just past the frame. A frame announcing more than ``max_payload`` bytes raises
    ``FrameError(1009)`` as soon as its header is read, before its payload is buffered.

    >>> parse_frame(bytes([0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58]), 0, 125)
    (True, 1, b'Hello', 11)
    """
    available = len(buf) - start
    if available < 2:
        return None
    b0, b1 = buf[start], buf[start + 1]
    if b0 & 0x70:
        raise FrameError(1002, "reserved bits set without an extension")
    opcode = b0 & 0x0F
    if opcode not in _DATA_OPS and opcode not in _CONTROL_OPS:
        raise FrameError(1002, f"unknown opcode {opcode}")
    if not b1 & 0x80:
        raise FrameError(1002, "client frame not masked")
    fin = bool(b0 & 0x80)
    length = b1 & 0x7F
    head = 2
    if length == 126:
        if available < 4:
            return None
        (length,) = _U16.unpack_from(buf, start + 2)
        head = 4
    elif length == 127:
        if available < 10:
            return None
        (length,) = _U64.unpack_from(buf, start + 2)
        if length >> 63:
            raise FrameError(1002, "payload length with its top bit set")
        head = 10
    if opcode in _CONTROL_OPS and (length > 125 or not fin):
        raise FrameError(1002, "control frame fragmented or longer than 125 bytes")
    if length > max_payload:
        raise FrameError(1009, f"frame of {length} bytes exceeds {max_payload}")
    end = start + head + 4 + length
    if len(buf) < end:
        return None
    mask_at = start + head
    payload = apply_mask(buf[mask_at + 4:end], buf[mask_at:mask_at + 4])
    return fin, opcode, payload, end


def encode_frame(opcode: int, payload: bytes, *, fin: bool = True) -> bytes:
    """One unmasked server frame.

    >>> encode_frame(OP_TEXT, b"Hello")
    b'\\x81\\x05Hello'
    """
    first = (0x80 if fin else 0) | opcode
    n = len(payload)
    if n < 126:
        return bytes((first, n)) + payload
    if n < 65536:
        return _HEAD16.pack(first, 126, n) + payload
    return _HEAD64.pack(first, 127, n) + payload


def close_payload(code: int, reason: str = "") -> bytes:
    """A close frame's body: the code, then the reason cut to fit 125 bytes (1005: no body at all)."""
    if code == 1005:
        return b""
    return _U16.pack(code) + reason.encode()[:123]


def parse_close(payload: bytes) -> tuple[int, str]:
    """The code and reason of a received close frame (1005 when it has none).

    >>> parse_close(b"\\x03\\xe8bye")
    (1000, 'bye')
    """
    if not payload:
        return 1005, ""
    if len(payload) == 1:
        raise FrameError(1002, "close frame with a one-byte body")
    (code,) = _U16.unpack_from(payload)
    if not (1000 <= code <= 1014 and code not in (1004, 1005, 1006)) and not 3000 <= code <= 4999:
        raise FrameError(1002, f"invalid close code {code}")
    try:
        reason = payload[2:].decode()
    except UnicodeDecodeError:
        raise FrameError(1007, "close reason is not UTF-8") from None
    return code, reason


def accept_key(key: str) -> str:
    """``Sec-WebSocket-Accept`` for a client's ``Sec-WebSocket-Key`` (RFC 6455, 4.2.2)."""
    return base64.b64encode(hashlib.sha1(key.encode() + _GUID).digest()).decode()  # noqa: S324 - the RFC's hash


def handshake_problem(method: str, headers: Mapping[str, str]) -> tuple[int, str] | None:
    """Why an upgrade request cannot open a WebSocket, as ``(status, reason)``; None when it can.

    ``headers`` maps lower-case names to values (repeated headers joined with ``", "``).
    """
    if method != "GET":
        return 405, "a WebSocket opens with GET"
    if "websocket" not in _tokens(headers.get("upgrade", "")):
        return 400, "missing 'Upgrade: websocket'"
    if "upgrade" not in _tokens(headers.get("connection", "")):
        return 400, "missing 'Connection: Upgrade'"
    if headers.get("sec-websocket-version", "").strip() != "13":
        return 426, "Sec-WebSocket-Version must be 13"
    try:
        raw = base64.b64decode(headers.get("sec-websocket-key", "").strip(), validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != 16:
        return 400, "Sec-WebSocket-Key must be 16 bytes in base64"
    return None


def _tokens(value: str) -> set[str]:
    return {token.strip().lower() for token in value.split(",")}
