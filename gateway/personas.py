"""Personas: chosen per call from the client's context, the dialed number, or a default.

The personas file (``personas_file``) is JSON, re-read when it changes (no restart)::

    {
      "personas": {
        "concierge": {"system": "You are Aria, a hotel concierge.", "greeting": "Hotel Aria, how can I help?",
                      "voice": "nova", "language": "en"}
      },
      "numbers": {"+14155550100": "concierge", "default": "concierge"}
    }

Usage::

    book = PersonaBook(Path("personas.json"))
    persona = book.resolve(to="+14155550100", parameters={"persona": "concierge"}, context=None)
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jsonschema

from pipeline.conversation import Persona
from pipeline.tools import BUILTINS
from pipeline.tools.http import METHODS, HttpToolSpec, placeholders

__all__ = ["PersonaBook", "PersonaError", "dialable"]

logger = logging.getLogger(__name__)

_FIELDS = ("system", "greeting", "voice", "language")
_OPTIONAL = ("transfer_targets", "builtin_tools", "tools")
_TOOL_FIELDS = {"name", "description", "parameters", "method", "url", "headers", "timeout_secs"}
_DEFAULT = Persona()


class PersonaError(ValueError):
    """The personas file or a context is malformed (the text says where)."""


class PersonaBook:
    """Lookup of personas by name and dialed number, reloaded when the file's mtime changes."""

    def __init__(self, path: Path | None, *, default: Persona | None = None) -> None:
        self._path = path
        self._default = default if default is not None else Persona()
        self._mtime: float | None = None
        self._personas: dict[str, Persona] = {}
        self._numbers: dict[str, str] = {}
        if path is not None:
            self._load()   # a broken file stops startup with the reason

    def _load(self) -> None:
        assert self._path is not None
        try:
            mtime = os.stat(self._path).st_mtime
            if mtime == self._mtime:
                return
            data = json.loads(self._path.read_text())
        except FileNotFoundError:
            raise PersonaError(f"personas_file {self._path} does not exist") from None
        except json.JSONDecodeError as exc:
            raise PersonaError(f"personas_file {self._path} is not valid JSON: {exc}") from None
        personas, numbers = _parse(data, str(self._path))
        self._personas, self._numbers, self._mtime = personas, numbers, mtime
        logger.info("personas loaded from %s: %d personas, %d numbers", self._path, len(personas), len(numbers))

    def _refresh(self) -> None:
        if self._path is None:
            return
        try:
            self._load()
        except (PersonaError, OSError) as exc:   # keep serving the last good file
            logger.error("personas file not reloaded, keeping the previous one: %s", exc)

    def names(self) -> list[str]:
        self._refresh()
        return sorted(self._personas)

    def resolve(self, *, to: str = "", parameters: Mapping[str, str] | None = None,
                context: Sequence[Mapping[str, str]] | None = None, name: str | None = None) -> Persona:
        """Order: explicit context (system message) > persona name (argument or custom parameter)
        > dialed number > the file's default number entry > the built-in default."""
        self._refresh()
        parameters = parameters or {}
        name = name or parameters.get("persona")
        base = self._lookup_name(name) if name else None
        if base is None:
            number = _normalise(to)
            key = self._numbers.get(number) or self._numbers.get("default")
            base = self._personas.get(key) if key else None
        base = base or self._personas.get("default") or self._default
        if context:
            system = next((m.get("content", "") for m in context if m.get("role") == "system"), "")
            if system:
                base = dataclasses.replace(base, name="context", system=system)
        overrides: dict[str, Any] = {k: parameters[k] for k in ("greeting", "voice", "language") if parameters.get(k)}
        if overrides:
            base = dataclasses.replace(base, **overrides)
        return base

    def _lookup_name(self, name: str) -> Persona | None:
        if name in self._personas:
            return self._personas[name]
        key = self._numbers.get(_normalise(name))
        return self._personas.get(key) if key else None


def _http_tools(specs: Any, where: str) -> tuple[HttpToolSpec, ...]:
    """A persona's ``tools``: each checked here, so a mistake stops startup (or a reload) with its place.
    Header values may name environment variables as ``${NAME}``, read now."""
    if not isinstance(specs, list):
        raise PersonaError(f"{where}: 'tools' must be a list of HTTP tools")
    tools: list[HttpToolSpec] = []
    for i, spec in enumerate(specs):
        at = f"{where} tools[{i}]"
        if not isinstance(spec, dict) or not _TOOL_FIELDS >= set(spec) or not {"name", "url"} <= set(spec):
            raise PersonaError(f"{at}: an object with 'name', 'url' and any of {sorted(_TOOL_FIELDS)}")
        name, url, method = spec["name"], spec["url"], str(spec.get("method", "GET")).upper()
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", name) or name in BUILTINS:
            raise PersonaError(f"{at}: 'name' must be 1-64 letters, digits, '_' or '-', not a built-in's name")
        if name in {t.name for t in tools}:
            raise PersonaError(f"{at}: a second tool named {name!r}")
        if not isinstance(url, str) or not url.startswith(("http://", "https://")) or method not in METHODS:
            raise PersonaError(f"{at}: 'url' must be an http(s) URL template and 'method' one of {', '.join(METHODS)}")
        parameters = spec.get("parameters", {"type": "object", "properties": {}})
        try:
            jsonschema.validators.validator_for(parameters).check_schema(parameters)
        except jsonschema.SchemaError as exc:
            raise PersonaError(f"{at}: 'parameters' is not a valid JSON schema: {exc.message}") from None
        if not isinstance(parameters, dict) or parameters.get("type") != "object":
            raise PersonaError(f"{at}: 'parameters' must be a JSON schema of type 'object'")
        unknown = set(placeholders(url)) - set(parameters.get("properties", {}))
        if unknown:
            raise PersonaError(f"{at}: the url names {sorted(unknown)}, which 'parameters' does not declare")
        timeout = spec.get("timeout_secs")
        if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0):
            raise PersonaError(f"{at}: 'timeout_secs' must be a number of seconds greater than 0")
        tools.append(HttpToolSpec(name, str(spec.get("description", name)), parameters, method, url,
                                  _headers(spec.get("headers", {}), at), float(timeout) if timeout else None))
    return tuple(tools)


def _headers(headers: Any, at: str) -> dict[str, str]:
    """Header values with each ``${NAME}`` replaced by the environment variable's value."""
    if not isinstance(headers, dict) or not all(isinstance(v, str) for v in headers.values()):
        raise PersonaError(f"{at}: 'headers' must map header names to strings (use ${{NAME}} for a secret)")

    def variable(match: re.Match[str]) -> str:
        value = os.environ.get(match.group(1))
        if value is None:
            raise PersonaError(f"{at}: header uses the environment variable {match.group(1)}, which is not set")
        return value

    return {k: re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", variable, v) for k, v in headers.items()}


def dialable(target: str) -> bool:
    """An E.164 number or a sip: URI (what a transfer may reach)."""
    return bool(re.fullmatch(r"\+[1-9]\d{6,14}", target)) or (target.startswith("sip:") and "@" in target)


def _normalise(number: str) -> str:
    digits = "".join(ch for ch in number if ch.isdigit())
    return f"+{digits}" if digits else number


def _parse(data: Any, where: str) -> tuple[dict[str, Persona], dict[str, str]]:
    if not isinstance(data, dict) or not isinstance(data.get("personas", {}), dict):
        raise PersonaError(f"{where}: expected an object with 'personas' and 'numbers'")
    personas: dict[str, Persona] = {}
    for name, spec in data.get("personas", {}).items():
        if not isinstance(spec, dict) or not isinstance(spec.get("system"), str):
            raise PersonaError(f"{where}: persona '{name}' needs a 'system' string")
        unknown = set(spec) - set(_FIELDS) - set(_OPTIONAL)
        if unknown:
            raise PersonaError(f"{where}: persona '{name}' has unknown fields {sorted(unknown)}; "
                               f"allowed: {_FIELDS + _OPTIONAL}")
        targets = spec.get("transfer_targets", {})
        if not isinstance(targets, dict) or not all(isinstance(v, str) and dialable(v) for v in targets.values()):
            raise PersonaError(f"{where}: persona '{name}' transfer_targets must map names to E.164 numbers "
                               "(+14155550100) or sip: URIs")
        wrong = [k for k in _FIELDS if k in spec and not isinstance(spec[k], str)]
        if wrong:
            raise PersonaError(f"{where}: persona '{name}' fields {wrong} must be strings")
        builtins = spec.get("builtin_tools", [])
        if not isinstance(builtins, list) or not set(builtins) <= set(BUILTINS) - {"transfer_call"}:
            raise PersonaError(f"{where}: persona '{name}' builtin_tools must list some of \"end_call\", "
                               "\"send_dtmf\" (transfer_call is on when transfer_targets are set)")
        personas[name] = Persona(name=name, system=spec["system"], greeting=spec.get("greeting", _DEFAULT.greeting),
                                 voice=spec.get("voice"), language=spec.get("language", _DEFAULT.language),
                                 transfer_targets=dict(targets), builtin_tools=tuple(builtins),
                                 tools=_http_tools(spec.get("tools", []), f"{where}: persona '{name}'"))
    numbers_spec = data.get("numbers") or {}
    if not isinstance(numbers_spec, dict):
        raise PersonaError(f"{where}: 'numbers' must be an object mapping E.164 numbers to persona names")
    numbers: dict[str, str] = {}
    for number, name in numbers_spec.items():
        if name not in personas:
            raise PersonaError(f"{where}: number {number} names unknown persona '{name}'")
        numbers[number if number == "default" else _normalise(number)] = name
    return personas, numbers
