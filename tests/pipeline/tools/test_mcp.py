"""MCP servers through the official SDK against a real stdio server process (tests/pipeline/tools/booking_mcp_server.py):
tools listed and filtered, called, a server that dies mid-call (the model is told, nothing else breaks), a
failing start naming its key, and the configuration's entries checked."""

from __future__ import annotations

import sys

import pytest

from pipeline.providers.base import ToolCall
from pipeline.tools import McpServer, McpServerSpec, McpStartError, ToolRunner, ToolSettings, mcp_specs

pytestmark = pytest.mark.asyncio

SERVER = McpServerSpec("mcp", command=sys.executable, args=("-m", "tests.pipeline.tools.booking_mcp_server"),
                       tools_filter=("lookup_booking", "slow_lookup", "crash"))


async def test_tools_are_listed_filtered_and_called() -> None:
    server = McpServer(SERVER)
    await server.start(20)
    try:
        assert [t.name for t in server.tools] == ["lookup_booking", "slow_lookup", "crash"]   # admin_reset filtered out
        lookup = server.tools[0]
        assert lookup.parameters["properties"]["ref"]["type"] == "string" and lookup.description
        runner = ToolRunner(server.bound(ToolSettings()), ToolSettings())
        assert await runner(ToolCall("lookup_booking", {"ref": "AB12"}, "c1")) == \
            "Booking AB12: confirmed, two nights from May 3."
        refused = await runner(ToolCall("lookup_booking", {"ref": 12}, "c2"))     # checked before it is sent
        assert refused is not None and refused.startswith("Error: invalid arguments") and "ref" in refused
    finally:
        await server.close()


async def test_a_server_that_dies_mid_call_is_a_tool_error_and_stays_one() -> None:
    server = McpServer(SERVER)
    await server.start(20)
    try:
        settings = ToolSettings(tool_timeout_secs=5)
        runner = ToolRunner(server.bound(settings), settings)
        died = await runner(ToolCall("crash", {}, "c1"))
        assert died is not None and died.startswith("Error: crash failed"), died
        after = await runner(ToolCall("lookup_booking", {"ref": "AB12"}, "c2"))
        assert after is not None and after.startswith("Error: lookup_booking"), after
    finally:
        await server.close()


async def test_a_server_that_cannot_start_is_an_error_naming_its_key() -> None:
    spec = McpServerSpec("mcp_servers[1]", command=sys.executable, args=("-c", "import sys; sys.exit(3)"))
    with pytest.raises(McpStartError, match=r"^'mcp_servers\[1\]': the MCP server .* could not start"):
        await McpServer(spec).start(20)
    missing = McpServerSpec("mcp", command="/nonexistent/voxray-mcp-server")
    with pytest.raises(McpStartError, match=r"^'mcp': .*could not start"):
        await McpServer(missing).start(20)


async def test_configured_entries_are_checked_and_named() -> None:
    specs = mcp_specs({"command": "python", "args": ["t.py"], "tools_filter": ["a"]},
                      [{"url": "http://127.0.0.1:9000/mcp"}])
    assert specs == [McpServerSpec("mcp", "python", ("t.py",), "", ("a",)),
                     McpServerSpec("mcp_servers[0]", url="http://127.0.0.1:9000/mcp")]
    for mcp, servers, problem in [({"command": "python", "url": "http://x"}, [], "'mcp' needs either"),
                                  ({}, [{"command": "x", "args": "t.py"}], "'mcp_servers[0].args' must be a list"),
                                  ({}, [{"cmd": "x"}], "'mcp_servers[0]' has unknown fields ['cmd']"),
                                  ({"url": "http://x/mcp"}, [], "'mcp' is a stdio server"),
                                  ({}, [{"url": "ftp://x"}], "'mcp_servers[0].url' must be an http")]:
        with pytest.raises(ValueError, match=problem.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(")):
            mcp_specs(mcp, servers)
