"""MCP servers: started once at app startup, their tools offered on every call.

The configuration's ``mcp`` (the seed's key: ``{"command", "args", "tools_filter"}``) and each entry of
``mcp_servers`` (``command``/``args`` for a stdio server, or ``url`` for a streamable-HTTP one, plus
``tools_filter``) become a :class:`McpServerSpec`. :class:`McpServer` connects with the official
``mcp`` SDK (the ``mcp`` extra; imported only when a server is configured), lists the tools (only those
named in ``tools_filter``, when given) and calls them. The session lives in a task of its own, which
the app's lifespan starts (:meth:`McpServer.start`) and ends (:meth:`McpServer.close`): a server that
dies mid-call ends only that task, and every call to it after that is a tool error the model is told.

Usage::

    server = McpServer(McpServerSpec("mcp", command="python", args=("my_tools.py",)))
    await server.start()                       # McpStartError naming the key when it cannot start
    tools = server.bound(settings)             # BoundTools for a call's ToolRunner
    await server.close()
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pipeline.providers.base import Tool
from pipeline.tools.runner import BoundTool, ToolSettings

__all__ = ["McpServer", "McpServerSpec", "McpStartError", "mcp_specs"]

logger = logging.getLogger(__name__)

_NOT_RUNNING = "the tool server is not running"


class McpStartError(Exception):
    """An MCP server could not be started or listed; the text names its configuration key."""


@dataclass(frozen=True, slots=True)
class McpServerSpec:
    """One configured MCP server; ``key`` is where it was configured (``mcp``, ``mcp_servers[1]``)."""

    key: str
    command: str = ""
    args: tuple[str, ...] = ()
    url: str = ""
    tools_filter: tuple[str, ...] = ()

    def describe(self) -> str:
        return self.url or " ".join((self.command, *self.args))


def mcp_specs(mcp: Mapping[str, Any], servers: Sequence[Mapping[str, Any]]) -> list[McpServerSpec]:
    """The configured servers; ValueError naming the key when an entry is malformed.

    >>> mcp_specs({"command": "python", "args": ["tools.py"]}, [{"url": "http://127.0.0.1:9000/mcp"}])[1].key
    'mcp_servers[0]'
    """
    entries = ([("mcp", mcp)] if mcp else []) + [(f"mcp_servers[{i}]", s) for i, s in enumerate(servers)]
    specs = []
    for key, entry in entries:
        if not isinstance(entry, Mapping):
            raise ValueError(f"'{key}' must be an object such as {{\"command\": \"python\", \"args\": [\"tools.py\"]}}")
        unknown = set(entry) - {"command", "args", "url", "tools_filter"}
        if unknown:
            raise ValueError(f"'{key}' has unknown fields {sorted(unknown)}; allowed: command, args, url, tools_filter")
        command, url = entry.get("command", ""), entry.get("url", "")
        if not isinstance(command, str) or not isinstance(url, str) or bool(command) == bool(url):
            raise ValueError(f"'{key}' needs either 'command' (a stdio server) or 'url' (streamable HTTP), not both")
        if key == "mcp" and url:
            raise ValueError("'mcp' is a stdio server ('command', 'args'); put a 'url' server in 'mcp_servers'")
        if url and not url.startswith(("http://", "https://")):
            raise ValueError(f"'{key}.url' must be an http:// or https:// URL (got {url!r})")
        for name in ("args", "tools_filter"):
            value = entry.get(name, [])
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ValueError(f"'{key}.{name}' must be a list of strings")
        specs.append(McpServerSpec(key, command, tuple(entry.get("args", ())), url,
                                   tuple(entry.get("tools_filter", ()))))
    return specs


class McpServer:
    """One MCP server for the app's life (see the module docstring)."""

    def __init__(self, spec: McpServerSpec) -> None:
        self.spec = spec
        self.tools: list[Tool] = []
        self._client: Any = None
        self._task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()

    async def start(self, timeout_s: float) -> None:
        """Connect and list the tools within ``timeout_s``; McpStartError (naming the key) otherwise."""
        ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._task = asyncio.create_task(self._serve(ready), name=f"mcp {self.spec.key}")
        try:
            async with asyncio.timeout(timeout_s):
                await ready
        except TimeoutError:
            await self.close()
            raise McpStartError(f"'{self.spec.key}': the MCP server ({self.spec.describe()}) did not answer "
                                f"within {timeout_s:g} s") from None
        except Exception as exc:  # noqa: BLE001 - whatever stopped it, startup fails naming the key
            await self.close()
            raise McpStartError(f"'{self.spec.key}': the MCP server ({self.spec.describe()}) could not start: "
                                f"{_reason(exc)}") from None
        logger.info("MCP server %s: %d tools (%s)", self.spec.key, len(self.tools),
                    ", ".join(t.name for t in self.tools))

    async def _serve(self, ready: asyncio.Future[None]) -> None:
        try:
            from mcp import Client, StdioServerParameters
        except ImportError:
            ready.set_exception(RuntimeError("the mcp package is not installed: pip install 'voxray[mcp]'"))
            return
        target: Any = (self.spec.url if self.spec.url
                       else StdioServerParameters(command=self.spec.command, args=list(self.spec.args)))
        try:
            async with Client(target) as client:
                listed = await client.list_tools()
                wanted = set(self.spec.tools_filter)
                self.tools = [Tool(t.name, t.description or t.name, dict(t.input_schema or {"type": "object"}))
                              for t in listed.tools if not wanted or t.name in wanted]
                self._client = client
                ready.set_result(None)
                await self._stop.wait()
        except Exception as exc:  # noqa: BLE001 - at startup it is the start error; later the server is gone
            if not ready.done():
                ready.set_exception(exc)
            else:
                logger.error("MCP server %s stopped: %s", self.spec.key, _reason(exc))
        finally:
            self._client = None

    async def call(self, name: str, arguments: Mapping[str, Any], timeout_s: float) -> str:
        """The tool's text result; raises when the server is gone or the tool reports an error."""
        client = self._client
        if client is None:
            raise RuntimeError(_NOT_RUNNING)
        result = await client.call_tool(name, dict(arguments), read_timeout_seconds=timeout_s)
        text = "\n".join(str(getattr(block, "text", "")) for block in result.content if getattr(block, "text", ""))
        if not text and result.structured_content is not None:
            text = json.dumps(result.structured_content)
        if result.is_error:
            raise RuntimeError(text or "the tool reported an error")
        return text or "Done."

    def bound(self, settings: ToolSettings) -> list[BoundTool]:
        """The server's tools for a call's runner."""
        def runner(name: str) -> Any:
            async def run(arguments: Mapping[str, Any]) -> str:
                return await self.call(name, arguments, settings.tool_timeout_secs)
            return run

        return [BoundTool(tool, runner(tool.name), timeout_s=settings.tool_timeout_secs) for tool in self.tools]

    async def close(self) -> None:
        """End the session (and a stdio server's process)."""
        self._stop.set()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                try:
                    async with asyncio.timeout(5):
                        await self._task
                except TimeoutError:
                    self._task.cancel()
                    await asyncio.gather(self._task, return_exceptions=True)


def _reason(exc: BaseException) -> str:
    """The innermost message of a (grouped) exception."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return str(exc) or type(exc).__name__
