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
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from json.scanner import make_scanner
from typing import Any, cast

__all__ = ["MAX_DEPTH", "JSONInputError", "JSONLimitExceeded", "loads"]

MAX_DEPTH = 64   # deeper than any carrier event or API body we read, far below the interpreter's limit


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
        value = _loads_text(text) if isinstance(text, str) else json.loads(text)
    except RecursionError:   # the C scanner gave up far past any sane depth
        raise JSONLimitExceeded(f"nested deeper than {max_depth} levels") from None
    except ValueError as exc:   # JSONDecodeError, UnicodeDecodeError, too many integer digits
        raise JSONInputError(f"not valid JSON ({str(exc)[:120]})") from None
    # A value nests at most as deep as its text has opening brackets (brackets in strings only add).
    brackets = text.count("[") + text.count("{") if isinstance(text, str) else text.count(b"[") + text.count(b"{")
    if brackets > max_depth and _deeper_than(value, max_depth):
        raise JSONLimitExceeded(f"nested deeper than {max_depth} levels")
    return value


# the C scanner json.loads ends in, without its two Python layers (typeshed types make_scanner oddly)
_scan_once = cast(Callable[[str, int], tuple[Any, int]], cast(Any, make_scanner)(json.JSONDecoder()))
# json.decoder.WHITESPACE; it matches (maybe nothing) at every position, so its match is never None
_space = cast(Callable[[str, int], "re.Match[str]"],
              re.compile(r"[ \t\n\r]*", re.VERBOSE | re.MULTILINE | re.DOTALL).match)


def _loads_text(text: str) -> Any:
    """``json.loads(text)`` for a str, the same value and errors, a third cheaper (carrier messages arrive 50
    times a second per call)."""
    if text.startswith("\ufeff"):
        raise json.JSONDecodeError("Unexpected UTF-8 BOM (decode using utf-8-sig)", text, 0)
    start = _space(text, 0).end() if text[:1].isspace() else 0
    try:
        value, end = _scan_once(text, start)
    except StopIteration as err:
        raise json.JSONDecodeError("Expecting value", text, err.value) from None
    if end != len(text):
        end = _space(text, end).end()
        if end != len(text):
            raise json.JSONDecodeError("Extra data", text, end)
    return value


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
