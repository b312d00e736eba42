"""pipeline.jsonutil.loads: json.loads for outside input -- the same values, one error type, a depth limit."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.jsonutil import MAX_DEPTH, JSONInputError, JSONLimitExceeded, loads

FUZZ = settings(max_examples=300, deadline=None, derandomize=True, database=None)

values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
                      lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                      max_leaves=20)


def nested(depth: int) -> str:
    return '{"a":' * (depth // 2) + "[" * (depth - depth // 2) + "1" + "]" * (depth - depth // 2) + "}" * (depth // 2)


@FUZZ
@given(value=values)
def test_it_reads_what_json_loads_reads(value: Any) -> None:
    text = json.dumps(value)
    assert loads(text) == json.loads(text) == loads(text.encode())


@FUZZ
@given(text=st.text() | st.binary())
def test_anything_else_is_a_json_input_error(text: str | bytes) -> None:
    try:
        value = loads(text)
    except JSONInputError as exc:
        assert str(exc).startswith(("not valid JSON (", "nested deeper than"))
    else:
        assert value == json.loads(text)


@pytest.mark.parametrize("depth", [MAX_DEPTH + 1, 1_000, 100_000])
def test_too_deep_is_refused_without_recursion_error(depth: int) -> None:
    for text in (nested(depth), nested(depth).encode()):
        with pytest.raises(JSONLimitExceeded, match=f"^nested deeper than {MAX_DEPTH} levels$"):
            loads(text)
    with pytest.raises(JSONInputError):   # unterminated too: invalid, or too deep to tell
        loads("[" * depth)


def test_the_limit_counts_containers_not_brackets_in_strings() -> None:
    assert loads(nested(MAX_DEPTH)) == json.loads(nested(MAX_DEPTH))
    assert loads(json.dumps({"text": "[{" * 500})) == {"text": "[{" * 500}      # many brackets, depth 1
    assert loads(json.dumps([[0]] * 500)) == [[0]] * 500                       # many brackets, depth 2
    with pytest.raises(JSONLimitExceeded):
        loads("[[1]]", max_depth=1)
    assert loads("[1]", max_depth=1) == [1]


def test_a_size_limit_and_the_error_types() -> None:
    with pytest.raises(JSONLimitExceeded, match="^12 characters long, over the limit of 10$"):
        loads('"0123456789"', max_size=10)
    with pytest.raises(JSONInputError, match=r"^not valid JSON \(Expecting value"):
        loads("")
    with pytest.raises(JSONInputError, match=r"^not valid JSON \('utf-8' codec"):
        loads(b'"\xff"')
    assert issubclass(JSONLimitExceeded, JSONInputError) and issubclass(JSONInputError, ValueError)


@pytest.mark.parametrize("text", [
    '{"event":"media"}', ' \n{"a": [1, 2.5, null, true]} \t', '"x"', "0", "-1e400", "NaN", "12345678901234567890123",
    '{"a": "\\u00e9\\n\\"q\\""}', "", " ", "{", '{"a": 1} x', '{"a": 1}}', "[1,]", "'a'", "\ufeff{}", "[1] [2]",
])
def test_text_reads_exactly_as_json_loads(text: str) -> None:
    """Text goes straight to the C scanner (a third cheaper): same value, same error position."""
    try:
        expected: Any = json.loads(text)
    except json.JSONDecodeError as exc:
        with pytest.raises(JSONInputError) as ours:
            loads(text)
        assert str(ours.value) == f"not valid JSON ({str(exc)[:120]})"
        return
    got = loads(text)
    assert got == expected or (got != got and expected != expected)         # NaN is not equal to itself
    assert type(got) is type(expected)


@settings(max_examples=300, deadline=None)
@given(st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
                    max_leaves=20), st.sampled_from(["", " ", "\n\t "]))
def test_any_document_reads_as_json_loads_does(value: Any, pad: str) -> None:
    text = pad + json.dumps(value, ensure_ascii=False) + pad
    assert loads(text) == json.loads(text)
