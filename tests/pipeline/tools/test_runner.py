"""The tool runner: unknown tools, repeated calls refused past tool_max_repeats, the filler while a tool is
slow (and not when it is quick), a failing tool told to the model, and the built-ins bound to call control."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

import pytest

from pipeline.providers.base import Tool, ToolCall
from pipeline.settings import Persona
from pipeline.tools import BoundTool, ToolRunner, ToolSettings, builtin_tools

pytestmark = pytest.mark.asyncio


def tool(name: str, run: Any, **kwargs: Any) -> BoundTool:
    return BoundTool(Tool(name, name, {"type": "object", "properties": {"n": {"type": "integer"}}}), run, **kwargs)


async def echo(arguments: Mapping[str, Any]) -> str:
    return f"n={arguments.get('n')}"


async def test_the_same_call_is_refused_past_tool_max_repeats() -> None:
    runner = ToolRunner([tool("count", echo)], ToolSettings(tool_max_repeats=2))
    results = [await runner(ToolCall("count", {"n": 1})) for _ in range(3)]
    assert results[:2] == ["n=1", "n=1"]
    assert results[2] is not None and "already called 2 times" in results[2] and "Do not call it again" in results[2]
    assert await runner(ToolCall("count", {"n": 2})) == "n=2"         # other arguments: a different call
    unknown = await runner(ToolCall("nope", {}))
    assert unknown is not None and "no tool named 'nope'" in unknown


async def test_the_filler_is_asked_for_while_a_tool_is_slow_only() -> None:
    fillers: list[str] = []
    release = asyncio.Event()

    async def slow(_arguments: Mapping[str, Any]) -> str:
        await release.wait()
        return "done"

    settings = ToolSettings(tool_filler_secs=0.05, tool_filler_text="Un momento.")
    runner = ToolRunner([tool("slow", slow), tool("quick", echo), tool("quiet", slow, filler=False)], settings,
                        filler=fillers.append)
    assert await runner(ToolCall("quick", {})) == "n=None"
    await asyncio.sleep(0.1)
    assert fillers == []
    task = asyncio.ensure_future(runner(ToolCall("slow", {})))
    while not fillers:
        await asyncio.sleep(0.01)
    assert fillers == ["Un momento."] and not task.done()
    release.set()
    assert await task == "done"
    assert await runner(ToolCall("quiet", {})) == "done" and fillers == ["Un momento."]


async def test_a_failing_tool_is_told_to_the_model() -> None:
    async def broken(_arguments: Mapping[str, Any]) -> str:
        raise ConnectionError("connection refused")

    result = await ToolRunner([tool("broken", broken)], ToolSettings())(ToolCall("broken", {}))
    assert result == "Error: broken failed (connection refused). Tell the caller."


class Control:
    def __init__(self) -> None:
        self.done: list[tuple[str, str]] = []

    async def end_call(self) -> None:
        self.done.append(("end", ""))

    async def transfer_to(self, target: str) -> None:
        self.done.append(("transfer", target))

    async def send_digits(self, digits: str) -> None:
        self.done.append(("dtmf", digits))


async def test_builtins_follow_the_persona_and_call_the_control() -> None:
    control = Control()
    persona = Persona(transfer_targets={"sales": "+14155550123"}, builtin_tools=("end_call", "send_dtmf"))
    runner = ToolRunner(builtin_tools(persona, control, can_transfer=True), ToolSettings())
    assert [t.name for t in runner.tools] == ["end_call", "transfer_call", "send_dtmf"]
    assert [b.tool.name for b in builtin_tools(persona, control, can_transfer=False)] == ["end_call", "send_dtmf"]
    assert builtin_tools(Persona(), control, can_transfer=True) == []
    assert await runner(ToolCall("send_dtmf", {"digits": "12#"})) == "Sent the keypad tones 12#."
    bad = await runner(ToolCall("send_dtmf", {"digits": "12x"}))
    assert bad is not None and bad.startswith("Error: invalid arguments")
    ceo = await runner(ToolCall("transfer_call", {"target": "ceo"}))
    assert ceo is not None and "'ceo' is not one of ['sales']" in ceo
    assert await runner(ToolCall("transfer_call", {"target": "sales"})) is None
    assert await runner(ToolCall("end_call", {})) is None
    assert control.done == [("dtmf", "12#"), ("transfer", "+14155550123"), ("end", "")]
