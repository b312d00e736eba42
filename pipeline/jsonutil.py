"""Parsing JSON that comes from outside: one error type for invalid, too deep or too large text.

``json.loads`` recurses once per nesting level, so a document nested 100,000 deep raises
``RecursionError`` -- not ``ValueError`` -- and a caller that maps ``ValueError`` to a clear answer
crashes instead. :func:`loads` turns every failure into :class:`JSONInputError` (a ``ValueError``)
and refuses documents nested deeper than ``max_depth``.

Usage::

    from pipeline.jsonutil import JSONInputError, JSONLimitExceeded, loads

    try:
        data = loads(message)                      # at most MAX_DEPTH levels of [ and {
    except JSONLimitExceeded as exc:               # f"the body is {exc}": "... nested deeper than 64 levels"
        ...
    except JSONInputError as exc:                  # (also a ValueError) not JSON at all
        ...

The depth check costs two ``str.count`` calls on the usual message (a media message has two ``{``);
only text with more opening brackets than ``max_depth`` has its parsed value walked.

Parsing goes through orjson (about three times faster than ``json.loads`` on a carrier media message)
whenever orjson reads the text exactly as ``json.loads`` does; text it would read differently -- an
integer of 19 digits or more (orjson turns integers past 64 bits into floats) -- and text it refuses
(NaN, lone surrogates, ``1e400``, and every invalid document, for ``json``'s error text) take the
``json.loads`` path, so the value and the error are always ``json.loads``'s.
"""

from __future__ import annotations

import json
import re
from typing import Any

import orjson

__all__ = ["MAX_DEPTH", "JSONInputError", "JSONLimitExceeded", "loads"]

MAX_DEPTH = 64   # deeper than any carrier event or API body we read, far below the interpreter's limit
_LONG_INTEGER = re.compile("[0-9]{19}")   # may be past 64 bits, where orjson's value differs from json's
_LONG_INTEGER_BYTES = re.compile(b"[0-9]{19}")


class JSONInputError(ValueError):
    """The text is not JSON, or is JSON beyond the caller's limits. The message completes "<the
    input> is ...": ``not valid JSON (Expecting value: line 1 column 1 (char 0))``."""


class JSONLimitExceeded(JSONInputError):
    """Valid-looking JSON nested deeper (or longer) than the caller allows."""


def loads(text: str | bytes | bytearray, *, max_depth: int = MAX_DEPTH, max_size: int | None = None) -> Any:
    """``json.loads(text)`` with a nesting limit and an optional length limit (characters or bytes)::

        loads('{"event": "media"}')        # {'event': 'media'}
        loads("[" * 100_000)               # JSONLimitExceeded: nested deeper than 64 levels
        loads("[[1]]", max_depth=1)        # JSONLimitExceeded: nested deeper than 1 levels
        loads(b"\\xff")                     # JSONInputError: not valid JSON ('utf-8' codec can't decode ...)
    """
    if max_size is not None and len(text) > max_size:
        raise JSONLimitExceeded(f"{len(text)} characters long, over the limit of {max_size}")
    try:
        value = _fast(text)
    except ValueError:    # not for orjson: json.loads decides, and words the error
        value = _exact(text, max_depth)
    # A value nests at most as deep as its text has opening brackets (brackets in strings only add).
    brackets = text.count("[") + text.count("{") if isinstance(text, str) else text.count(b"[") + text.count(b"{")
    if brackets > max_depth and _deeper_than(value, max_depth):
        raise JSONLimitExceeded(f"nested deeper than {max_depth} levels")
    return value


def _fast(text: str | bytes | bytearray) -> Any:
    """orjson's value when it is certainly ``json.loads``'s; ValueError otherwise."""
    if (_LONG_INTEGER.search(text) if isinstance(text, str) else _LONG_INTEGER_BYTES.search(text)):
        raise ValueError("long integer")
    return orjson.loads(text)


def _exact(text: str | bytes | bytearray, max_depth: int) -> Any:
    try:
        return json.loads(text)
    except RecursionError:   # the C scanner gave up far past any sane depth
        raise JSONLimitExceeded(f"nested deeper than {max_depth} levels") from None
    except ValueError as exc:   # JSONDecodeError, UnicodeDecodeError, too many integer digits
        raise JSONInputError(f"not valid JSON ({str(exc)[:120]})") from None


def _deeper_than(value: Any, limit: int) -> bool:
    """Whether ``value`` nests more than ``limit`` lists/objects (walked without recursion)."""
    stack = [(value, 1)] if isinstance(value, (dict, list)) else []
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            return True
        children = node.values() if isinstance(node, dict) else node
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return False
