"""Property-based fuzzing of what a browser sends: ``/ws``'s first message (``parse_start``) and the control
messages of both transports (``parse_control``). Either parses or raises ValueError with the reason."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.browser.events import parse_control
from gateway.browser.ws import StartRequest, parse_start

FUZZ = settings(max_examples=300, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow])

WORDS = ["start", "interrupt", "end", "pcm16", "pcmu", "system", "user", "assistant", "messages", "context",
         "codec", "sample_rate", "persona", "number", "type", "content", "role"]
scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False, allow_infinity=False),
                    st.text(max_size=12), st.sampled_from(WORDS), st.sampled_from([8000, 16000, 24000, 48000]))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(st.text(max_size=8) | st.sampled_from(WORDS), inner, max_size=5),
                      max_leaves=14)
# start-like objects: the real keys with values of any type
starts = st.fixed_dictionaries({"type": st.just("start")}, optional={
    "codec": values, "sample_rate": values, "persona": values, "number": values,
    "context": values | st.fixed_dictionaries({"messages": st.lists(
        st.fixed_dictionaries({}, optional={"role": values, "content": values}), max_size=3)})})
deep = st.integers(60, 5_000).map(lambda n: '{"type":' * n + '"start"' + "}" * n)
messages = st.one_of(st.text(), st.binary(max_size=200), values.map(json.dumps), starts.map(json.dumps), deep)


@FUZZ
@given(message=messages)
def test_parse_start_returns_a_start_or_raises_value_error(message: str | bytes) -> None:
    try:
        start = parse_start(message)
    except ValueError as exc:
        assert str(exc) and type(exc) is ValueError
        return
    assert isinstance(start, StartRequest)
    assert start.codec in ("pcm16", "pcmu") and isinstance(start.sample_rate, int)
    assert isinstance(start.persona, str) and isinstance(start.number, str)
    assert all(set(m) == {"role", "content"} and all(isinstance(v, str) for v in m.values()) for m in start.messages)


@FUZZ
@given(message=st.one_of(messages, values.map(lambda v: json.dumps({"type": v}))))
def test_parse_control_returns_the_type_or_raises_value_error(message: str | bytes) -> None:
    try:
        kind: Any = parse_control(message)
    except ValueError as exc:
        assert str(exc) == 'control messages must be JSON objects like {"type": "interrupt"}'
        return
    data = json.loads(message)
    assert kind == (data.get("type") if isinstance(data, dict) else None)


def test_parse_control_examples() -> None:
    assert parse_control('{"type": "interrupt"}') == "interrupt"
    assert parse_control('{"type": "end", "why": 1}') == "end"
    assert parse_control("[1]") is None
    for bad in ("not json", "[" * 100_000, '{"type":' * 100 + '"end"' + "}" * 100):
        try:
            parse_control(bad)
        except ValueError:
            continue
        raise AssertionError(f"{bad[:20]!r} was accepted")
