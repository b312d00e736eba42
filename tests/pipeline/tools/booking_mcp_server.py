"""A small stdio MCP server written with the official SDK, for the tool tests.

Run as ``python -m tests.pipeline.tools.booking_mcp_server`` (the gateway starts it from config ``mcp``).
Tools: ``lookup_booking`` (an answer), ``slow_lookup`` (answers after ``seconds``), ``crash`` (the
process dies mid-call, as a crashed server would) and ``admin_reset`` (left out by ``tools_filter``).
"""

from __future__ import annotations

import asyncio
import os

from mcp.server.mcpserver import MCPServer

server = MCPServer("bookings")


@server.tool()
def lookup_booking(ref: str) -> str:
    """Find a booking by its reference."""
    return f"Booking {ref}: confirmed, two nights from May 3."


@server.tool()
async def slow_lookup(ref: str, seconds: float) -> str:
    """Find a booking, slowly."""
    await asyncio.sleep(seconds)
    return f"Booking {ref}: found after a while."


@server.tool()
def crash() -> str:
    """Stop the server process at once."""
    os._exit(3)


@server.tool()
def admin_reset() -> str:
    """Not for callers."""
    return "reset"


if __name__ == "__main__":
    server.run()
