"""HTTP tools against a local API on 127.0.0.1: the URL template and body, headers from environment
variables (through the personas file), arguments that fail the schema never reaching the API, an error
status and a timeout told to the model, a body cut to tool_max_result_bytes."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from gateway.personas import PersonaBook, PersonaError
from pipeline.providers.base import ToolCall
from pipeline.tools import ToolRunner, ToolSettings, http_tools
from tests.fakes._server import LocalServer

pytestmark = pytest.mark.asyncio


class BookingAPI(LocalServer):
    """Records every request; ``/bookings/{ref}`` answers JSON, ``/slow`` waits, ``/big`` is long, ``/missing`` 404s."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.release = asyncio.Event()
        super().__init__("booking API", Starlette(routes=[
            Route("/bookings/{ref}", self.booking, methods=["GET", "POST"]),
            Route("/slow", self.slow), Route("/big", self.big), Route("/missing", self.missing)]))

    async def _record(self, request: Request) -> None:
        self.requests.append({"method": request.method, "path": request.url.path, "query": dict(request.query_params),
                              "headers": dict(request.headers), "body": await request.body()})

    async def booking(self, request: Request) -> Response:
        await self._record(request)
        return JSONResponse({"ref": request.path_params["ref"], "status": "confirmed"})

    async def slow(self, request: Request) -> Response:
        await self._record(request)
        await self.release.wait()
        return PlainTextResponse("late")

    async def big(self, request: Request) -> Response:
        await self._record(request)
        return PlainTextResponse("x" * 100_000)

    async def missing(self, request: Request) -> Response:
        await self._record(request)
        return JSONResponse({"error": "no such booking"}, status_code=404)

    async def __aexit__(self, *exc: object) -> None:
        self.release.set()
        await super().__aexit__(*exc)


def personas_file(tmp_path: Path, base_url: str, **tool: Any) -> Path:
    spec = {"name": "lookup_booking", "description": "Find a booking by reference", "method": "GET",
            "url": f"{base_url}/bookings/{{ref}}", "headers": {"Authorization": "Bearer ${BOOKING_TOKEN}"},
            "parameters": {"type": "object", "properties": {"ref": {"type": "string", "pattern": "^[A-Z]{2}[0-9]{2}$"},
                                                            "lang": {"type": "string"}}, "required": ["ref"]}, **tool}
    path = tmp_path / "personas.json"
    path.write_text(json.dumps({"personas": {"desk": {"system": "You are a front desk.", "tools": [spec]}},
                                "numbers": {"default": "desk"}}))
    return path


async def test_a_call_fills_the_url_sends_env_headers_and_returns_the_body(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BOOKING_TOKEN", "tok-123")
    settings = ToolSettings()
    async with BookingAPI() as api, aiohttp.ClientSession() as http:
        persona = PersonaBook(personas_file(tmp_path, api.base_url)).resolve()
        assert "tok-123" not in repr(persona)                       # secrets never printed
        runner = ToolRunner(http_tools(persona.tools, http, settings), settings)
        assert [t.name for t in runner.tools] == ["lookup_booking"]
        result = await runner(ToolCall("lookup_booking", {"ref": "AB12", "lang": "en gb"}, "c1"))
        bad = await runner(ToolCall("lookup_booking", {"ref": "../admin"}, "c2"))
        missing = await runner(ToolCall("lookup_booking", {"lang": "en"}, "c3"))
    assert json.loads(result or "") == {"ref": "AB12", "status": "confirmed"}
    assert len(api.requests) == 1                                     # the invalid calls never reached the API
    sent = api.requests[0]
    assert (sent["method"], sent["path"], sent["query"]) == ("GET", "/bookings/AB12", {"lang": "en gb"})
    assert sent["headers"]["authorization"] == "Bearer tok-123"
    assert bad is not None and bad.startswith("Error: invalid arguments for lookup_booking (ref:")
    assert missing is not None and "'ref' is a required property" in missing


async def test_post_sends_the_arguments_not_in_the_url_as_json(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BOOKING_TOKEN", "t")
    async with BookingAPI() as api, aiohttp.ClientSession() as http:
        persona = PersonaBook(personas_file(tmp_path, api.base_url, method="POST")).resolve()
        runner = ToolRunner(http_tools(persona.tools, http, ToolSettings()), ToolSettings())
        await runner(ToolCall("lookup_booking", {"ref": "AB12", "lang": "fr"}, "c1"))
    assert api.requests[0]["method"] == "POST" and json.loads(api.requests[0]["body"]) == {"lang": "fr"}


async def test_a_timeout_an_error_status_and_a_long_body_are_told_to_the_model(tmp_path: Path,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BOOKING_TOKEN", "t")
    settings = ToolSettings(tool_max_result_bytes=100)
    async with BookingAPI() as api, aiohttp.ClientSession() as http:
        persona = PersonaBook(personas_file(tmp_path, api.base_url)).resolve()
        spec = persona.tools[0]
        specs = [spec.__class__(name, "", {"type": "object"}, "GET", f"{api.base_url}{path}", {}, timeout)
                 for name, path, timeout in (("slow", "/slow", 0.2), ("big", "/big", None), ("missing", "/missing", None))]
        runner = ToolRunner(http_tools(specs, http, settings), settings)
        slow = await runner(ToolCall("slow", {}, "c1"))
        big = await runner(ToolCall("big", {}, "c2"))
        missing = await runner(ToolCall("missing", {}, "c3"))
    assert slow == "Error: slow did not answer within 0.2 seconds. Tell the caller."
    assert big == "x" * 100 + "… (cut)"
    assert missing is not None and missing.startswith("Error: the API answered HTTP 404") and "no such booking" in missing


async def test_the_personas_file_refuses_broken_tools(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BOOKING_TOKEN", raising=False)
    with pytest.raises(PersonaError, match="BOOKING_TOKEN, which is not set"):
        PersonaBook(personas_file(tmp_path, "http://127.0.0.1:1"))
    monkeypatch.setenv("BOOKING_TOKEN", "t")
    for tool, problem in [({"url": "http://h/{booking}"}, "does not declare"),
                          ({"method": "BREW"}, "'method' one of"),
                          ({"parameters": {"type": "object", "properties": {"ref": {"type": 5}}}}, "not a valid JSON schema"),
                          ({"name": "end_call"}, "not a built-in's name"),
                          ({"timeout_secs": 0}, "timeout_secs")]:
        with pytest.raises(PersonaError, match=problem):
            PersonaBook(personas_file(tmp_path, "http://127.0.0.1:1", **tool))
