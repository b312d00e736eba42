"""HTTP tools: a persona's calls to a team's API, declared in the personas file.

A tool is a name, a description, a JSON schema of its parameters, a method, a URL template whose
``{placeholders}`` are filled from the arguments (URL-quoted), headers (their values resolved from
environment variables by the personas file's loader) and a timeout. Arguments not in the URL go in
the query string (GET, DELETE) or as a JSON body (POST, PUT, PATCH). The runner has checked them
against the schema before the request goes out. The answer's body (at most ``tool_max_result_bytes``
of it) is the result; an HTTP error status is told to the model as an error.

Usage::

    spec = HttpToolSpec("lookup_booking", "Find a booking by reference",
                        {"type": "object", "properties": {"ref": {"type": "string"}}, "required": ["ref"]},
                        method="GET", url="https://api.example.com/bookings/{ref}",
                        headers={"Authorization": "Bearer ..."}, timeout_secs=5)
    tools = http_tools((spec,), http, settings)
"""

from __future__ import annotations

import json
import logging
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import aiohttp

from pipeline.providers.base import Tool
from pipeline.tools.runner import BoundTool, ToolSettings, cut

__all__ = ["METHODS", "HttpToolSpec", "http_tools", "placeholders"]

logger = logging.getLogger(__name__)

METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")
_QUERY_METHODS = ("GET", "DELETE")


@dataclass(frozen=True, slots=True)
class HttpToolSpec:
    """One HTTP tool as the personas file declares it (headers hold secrets: never printed)."""

    name: str
    description: str
    parameters: Mapping[str, Any]
    method: str
    url: str
    headers: Mapping[str, str] = field(default_factory=dict, repr=False)
    timeout_secs: float | None = None     # None: tool_timeout_secs


def placeholders(url: str) -> list[str]:
    """The ``{names}`` in a URL template.

    >>> placeholders("https://api.example.com/bookings/{ref}?lang={language}")
    ['ref', 'language']
    """
    return [name for _text, name, _spec, _conv in string.Formatter().parse(url) if name]


def http_tools(specs: Sequence[HttpToolSpec], http: aiohttp.ClientSession, settings: ToolSettings) -> list[BoundTool]:
    """The persona's HTTP tools, sending through ``http``."""
    return [BoundTool(Tool(spec.name, spec.description, spec.parameters), _runner(spec, http, settings),
                      timeout_s=spec.timeout_secs or settings.tool_timeout_secs) for spec in specs]


def _runner(spec: HttpToolSpec, http: aiohttp.ClientSession, settings: ToolSettings) -> Any:
    in_url = set(placeholders(spec.url))

    async def run(arguments: Mapping[str, Any]) -> str:
        url = spec.url.format_map({name: quote(str(arguments.get(name, "")), safe="") for name in in_url})
        rest = {k: v for k, v in arguments.items() if k not in in_url}
        query = {k: v if isinstance(v, str) else _json_text(v) for k, v in rest.items()} \
            if spec.method in _QUERY_METHODS else None
        body = rest if spec.method not in _QUERY_METHODS else None
        async with http.request(spec.method, url, params=query, json=body, headers=dict(spec.headers)) as response:
            data = await response.content.read(settings.tool_max_result_bytes + 1)
            text = cut(data.decode(errors="replace"), settings.tool_max_result_bytes)
            if response.status >= 400:
                logger.warning("HTTP tool %s: the API answered %d", spec.name, response.status)
                return f"Error: the API answered HTTP {response.status}: {cut(text, 300)}"
        return text or f"Done (HTTP {response.status}, no content)."

    return run


def _json_text(value: Any) -> str:
    return json.dumps(value)
