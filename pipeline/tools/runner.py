"""Running the model's tool calls: schema check, repeat limit, filler, time limit, errors as text.

Usage::

    runner = ToolRunner(bound_tools, ToolSettings(tool_filler_secs=1.5), filler=engine.filler)
    result = await runner(ToolCall("lookup_booking", {"ref": "AB12"}, id="call_1"))   # text, or None
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import jsonschema

from pipeline.providers.base import Tool, ToolCall

__all__ = ["BoundTool", "ToolRunner", "ToolSettings", "cut"]

logger = logging.getLogger(__name__)

Run = Callable[[Mapping[str, Any]], Awaitable[str | None]]


@dataclass(frozen=True, slots=True)
class ToolSettings:
    """The tool limits; each field is the configuration key of the same name (see the README)."""

    tool_filler_secs: float = 2.0        # a tool still running after this: the caller hears tool_filler_text
    tool_filler_text: str = "One moment."
    tool_max_repeats: int = 3            # the same tool with the same arguments, per call; more are refused
    tool_timeout_secs: float = 10.0      # an MCP call, and an HTTP tool without its own timeout_secs
    tool_max_result_bytes: int = 8000    # a longer result (an HTTP body, MCP text) is cut to this

    @classmethod
    def from_config(cls, source: Any) -> ToolSettings:
        """Every field read by name from ``source`` (the gateway's Config)."""
        return cls(**{f.name: getattr(source, f.name) for f in dataclasses.fields(cls)})


@dataclass(frozen=True, slots=True)
class BoundTool:
    """A tool's declaration and how to run it. ``run`` gets the (schema-checked) arguments and returns
    the result text, or None when nothing goes back to the model (the call ends). ``timeout_s`` None:
    no limit (call control, bounded by its own timeouts); ``filler`` False: no "One moment." (a
    built-in that speaks or hangs up itself)."""

    tool: Tool
    run: Run
    timeout_s: float | None = None
    filler: bool = True


def cut(text: str, max_bytes: int) -> str:
    """``text`` in at most ``max_bytes`` of UTF-8, marked when it was cut.

    >>> cut("abcdef", 3)
    'abc… (cut)'
    """
    data = text.encode()
    if len(data) <= max_bytes:
        return text
    return data[:max_bytes].decode(errors="ignore") + "… (cut)"


class ToolRunner:
    """One call's tools; awaitable as the engine's ``on_tool`` callback. Names are unique: a later tool
    with a name already taken is left out (and logged)."""

    def __init__(self, tools: Sequence[BoundTool], settings: ToolSettings,
                 filler: Callable[[str], None] | None = None) -> None:
        self._settings = settings
        self._filler = filler
        self._tools: dict[str, BoundTool] = {}
        self._validators: dict[str, Any] = {}
        for bound in tools:
            name = bound.tool.name
            if name in self._tools:
                logger.warning("tool %s is offered twice; the second one is left out", name)
                continue
            self._tools[name] = bound
            try:
                validator = jsonschema.validators.validator_for(dict(bound.tool.parameters))
                validator.check_schema(dict(bound.tool.parameters))
                self._validators[name] = validator(dict(bound.tool.parameters))
            except jsonschema.SchemaError as exc:
                logger.warning("tool %s has an invalid parameters schema; its arguments go unchecked: %s",
                               name, exc.message)
        self._calls: Counter[tuple[str, str]] = Counter()

    @property
    def tools(self) -> list[Tool]:
        """The declarations to offer the model."""
        return [bound.tool for bound in self._tools.values()]

    async def __call__(self, call: ToolCall) -> str | None:
        """Run ``call``; the result text for the model (an error is text too), or None."""
        bound = self._tools.get(call.name)
        if bound is None:
            return f"Error: there is no tool named {call.name!r}. Use only the tools you were given."
        validator = self._validators.get(call.name)
        if validator is not None:
            error = jsonschema.exceptions.best_match(validator.iter_errors(dict(call.arguments)))
            if error is not None:
                where = "/".join(str(p) for p in error.absolute_path) or "arguments"
                logger.info("tool %s called with invalid arguments", call.name)
                return f"Error: invalid arguments for {call.name} ({where}: {error.message}). Fix them and try again."
        key = (call.name, json.dumps(call.arguments, sort_keys=True, default=str))
        self._calls[key] += 1
        limit = self._settings.tool_max_repeats
        if self._calls[key] > limit:
            logger.warning("tool %s called again with the same arguments past tool_max_repeats=%d; refused",
                           call.name, limit)
            return (f"Error: {call.name} was already called {limit} times with these arguments in this call. "
                    "Do not call it again; answer the caller with what you know.")
        return await self._run(bound, call)

    async def _run(self, bound: BoundTool, call: ToolCall) -> str | None:
        loop = asyncio.get_running_loop()
        filler = (loop.call_later(self._settings.tool_filler_secs, self._filler, self._settings.tool_filler_text)
                  if bound.filler and self._filler is not None else None)
        try:
            async with asyncio.timeout(bound.timeout_s):
                result = await bound.run(call.arguments)
        except TimeoutError:
            logger.warning("tool %s did not answer within %.1f s", call.name, bound.timeout_s)
            return f"Error: {call.name} did not answer within {bound.timeout_s:g} seconds. Tell the caller."
        except Exception as exc:  # noqa: BLE001 - any failure of a tool is told to the model; the call goes on
            logger.warning("tool %s failed: %s", call.name, exc or type(exc).__name__)
            return f"Error: {call.name} failed ({exc or type(exc).__name__}). Tell the caller."
        finally:
            if filler is not None:
                filler.cancel()
        return None if result is None else cut(result, self._settings.tool_max_result_bytes)
