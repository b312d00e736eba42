"""``carriers.<name>`` settings: validated against each adapter's constructor, filled from the
carriers' usual environment variables, with attribute access.

Any keyword the adapter's constructor takes may be set (so a new ``[?]`` switch needs no config
code); unknown names and wrong types stop startup naming the key.

Usage::

    carriers = CarriersConfig.build({"telnyx": {"flow": "call_control"}}, environ)
    carriers.telnyx.flow                 # "call_control"
    carriers.telnyx.public_key           # from TELNYX_PUBLIC_KEY when not in config.json
    carriers.missing("vonage")           # ["VONAGE_SIGNATURE_SECRET"] when it is not set
"""

from __future__ import annotations

import difflib
import inspect
import json
import re
from collections.abc import Iterator, Mapping
from typing import Any
from urllib.parse import urlparse

from carriers import CARRIERS

__all__ = ["CarrierSettings", "CarriersConfig"]

# Names of settings that hold credentials (auth tokens, API keys, passwords, private keys, signing secrets).
# Only text (or a mapping of texts) under such a name is masked: numbers and switches such as
# ``max_token_age_s`` or ``stream_auth_header`` are not secrets; account ids and public keys are not either.
_SECRET = re.compile(r"token|secret|password|private_key|api_key|auth_value")


class _ConfigError(ValueError):
    """Raised here and re-raised by gateway.config as ConfigError."""


class CarrierSettings(Mapping[str, Any]):
    """The resolved constructor keywords of one carrier (read-only; attribute access)."""

    def __init__(self, name: str, values: Mapping[str, Any]) -> None:
        self._name = name
        self._values = dict(values)

    def __getitem__(self, key: str) -> Any:
        return self._values[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __getattr__(self, key: str) -> Any:
        try:
            return self._values[key]
        except KeyError:
            raise AttributeError(f"carriers.{self._name} has no setting '{key}'") from None

    def masked(self) -> dict[str, Any]:
        """Values with every secret masked (a mapping of secrets keeps its keys; a URL loses its password).

        Usage::

            CarrierSettings("vonage", {"signature_secret": "s3cr3t", "max_token_age_s": 300.0}).masked()
            # {"signature_secret": "***", "max_token_age_s": 300.0}
        """
        out: dict[str, Any] = {}
        for key, value in self._values.items():
            secret = bool(value) and _SECRET.search(key) is not None
            if isinstance(value, Mapping) and secret:
                out[key] = {k: "***" for k in value}
            elif isinstance(value, str):
                out[key] = "***" if secret else _mask_url(value)
            else:
                out[key] = value
        return out


class CarriersConfig(Mapping[str, CarrierSettings]):
    """Every known carrier's settings (defaults for those not configured)."""

    def __init__(self, entries: Mapping[str, CarrierSettings]) -> None:
        self._entries = dict(entries)

    def __getitem__(self, name: str) -> CarrierSettings:
        return self._entries[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __getattr__(self, name: str) -> CarrierSettings:
        try:
            return self._entries[name]
        except KeyError:
            raise AttributeError(f"no carrier '{name}'") from None

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CarriersConfig) and self._entries == other._entries

    def __hash__(self) -> int:
        return id(self)

    def missing(self, name: str) -> list[str]:
        return CARRIERS[name].missing(self._entries[name])

    @classmethod
    def build(cls, raw: Any, environ: Mapping[str, str]) -> CarriersConfig:
        if not isinstance(raw, Mapping):
            raise _ConfigError("'carriers' must be an object keyed by carrier name, e.g. {\"twilio\": {...}}")
        for name in raw:
            if name not in CARRIERS:
                close = difflib.get_close_matches(name, CARRIERS, n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                raise _ConfigError(f"unknown carrier 'carriers.{name}'{hint}; known: {', '.join(CARRIERS)}")
        entries = {}
        for name, spec in CARRIERS.items():
            given = raw.get(name) or {}
            if not isinstance(given, Mapping):
                raise _ConfigError(f"'carriers.{name}' must be an object of settings")
            options = spec.options()
            values: dict[str, Any] = {}
            for key, param in options.items():
                env = environ.get(f"VOXRAY_CARRIERS_{name.upper()}_{key.upper()}")
                if key in given:
                    values[key] = _coerce(f"carriers.{name}.{key}", given[key], param)
                elif env is not None:
                    values[key] = _coerce(f"carriers.{name}.{key}", env, param)
                elif key in spec.env and environ.get(spec.env[key]):
                    values[key] = environ[spec.env[key]]
                elif param.default is not inspect.Parameter.empty:
                    values[key] = param.default
                else:
                    values[key] = ""
            for key in given:
                if key not in options:
                    close = difflib.get_close_matches(key, options, n=1)
                    hint = f" (did you mean 'carriers.{name}.{close[0]}'?)" if close else ""
                    raise _ConfigError(f"unknown config key 'carriers.{name}.{key}'{hint}; "
                                       f"settings: {', '.join(sorted(options))}")
            entries[name] = CarrierSettings(name, values)
        return cls(entries)

    def plain(self) -> dict[str, dict[str, Any]]:
        return {name: settings.masked() for name, settings in self._entries.items()}


def _mask_url(text: str) -> str:
    """``redis://:pw@host/0`` -> ``redis://:***@host/0``; other text is returned as it is."""
    password = urlparse(text).password if "://" in text else None
    return text.replace(f":{password}@", ":***@") if password else text


def _coerce(name: str, value: Any, param: inspect.Parameter) -> Any:
    """Convert by the constructor default's type (or a Literal in the annotation)."""
    default = param.default
    annotation = str(param.annotation)
    text = isinstance(value, str)
    m = re.search(r"Literal\[(.*?)\]", annotation)
    choices = re.findall(r"['\"]([^'\"]+)['\"]", m.group(1)) if m else []
    try:
        if isinstance(default, bool):
            if isinstance(value, bool):
                return value
            if text and value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
                return value.lower() in ("1", "true", "yes", "on")
            raise ValueError
        if isinstance(default, int) and not isinstance(default, bool):
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if isinstance(default, float):
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if isinstance(default, (tuple, list)) or "Sequence" in annotation:
            if text:
                value = (json.loads(value) if value.strip().startswith("[")
                         else [v.strip() for v in value.split(",") if v.strip()])
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ValueError
            return tuple(value)
        if isinstance(default, Mapping) or "Mapping" in annotation:
            if text:
                value = json.loads(value)
            if not isinstance(value, Mapping) or not all(isinstance(v, str) for v in value.values()):
                raise ValueError
            return dict(value)
        if value is None and "None" in annotation:
            return None
        if not isinstance(value, str):
            raise ValueError
        if choices and value not in choices:
            raise _ConfigError(f"'{name}' must be one of {', '.join(choices)} (got {value!r})")
        return value
    except (ValueError, TypeError) as exc:
        if isinstance(exc, _ConfigError):
            raise
        kind = type(default).__name__ if default is not inspect.Parameter.empty and default is not None else "a string"
        raise _ConfigError(f"'{name}' must be {kind} (got {value!r})") from None
