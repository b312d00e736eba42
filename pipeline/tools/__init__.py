"""Tools the model may call mid-call, one registry for every engine.

A :class:`~pipeline.tools.runner.BoundTool` is a tool's declaration and how to run it. Three kinds:

* built-ins the persona enables (:mod:`pipeline.tools.builtin`): ``end_call``, ``transfer_call``,
  ``send_dtmf``, run through the :class:`~pipeline.tools.builtin.CallControl` the gateway passes;
* HTTP tools from the personas file (:mod:`pipeline.tools.http`);
* the tools of MCP servers started at app startup (:mod:`pipeline.tools.mcp`).

A call's :class:`~pipeline.tools.runner.ToolRunner` is the engine's ``on_tool`` callback: it checks
the arguments against the tool's schema, refuses a call repeated too often, asks the engine for a
filler while a tool is slow, bounds its time and turns every failure into text the model is told.

Usage::

    runner = ToolRunner([*builtin_tools(persona, control, can_transfer=True), *http_tools(persona, http, settings),
                         *server.bound(settings)], settings, filler=lambda text: engine.filler(text))
    engine = Conversation(..., tools=runner.tools, on_tool=runner)
"""

from pipeline.tools.builtin import BUILTINS, CallControl, builtin_tools
from pipeline.tools.http import HttpToolSpec, http_tools
from pipeline.tools.mcp import McpServer, McpServerSpec, McpStartError, mcp_specs
from pipeline.tools.runner import BoundTool, ToolRunner, ToolSettings

__all__ = ["BUILTINS", "BoundTool", "CallControl", "HttpToolSpec", "McpServer", "McpServerSpec", "McpStartError",
           "ToolRunner", "ToolSettings", "builtin_tools", "http_tools", "mcp_specs"]
