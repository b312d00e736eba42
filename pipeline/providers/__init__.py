"""Provider registry: which provider serves which stage, its key variable, base URL, defaults and builders.

Every module in this package whose name does not start with ``_`` (``base`` aside) is a provider
module: it declares ``SPECS``, a tuple of :class:`ProviderSpec`, and the registry collects them at
import. Provider modules import only core dependencies; a vendor SDK is imported inside a builder,
when that provider is configured. Adding a provider is adding one module (see CONTRIBUTING.md).

Usage::

    spec = PROVIDERS["groq"]
    spec.key_env                      # "GROQ_API_KEY"
    lookup("grok").name               # "xai": aliases resolve to their provider
    stt = build_stt(ProviderSettings(name="openai", model="whisper-1", api_key="sk-..."), http, timeout_s=10)
    stt = build_stt(ProviderSettings(name="local", model="pocketsphinx-en-us"), http, timeout_s=10,
                    local_processes=2, local_max_pending=8)   # the offline recogniser's worker processes
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import TypeVar

import aiohttp

from pipeline.providers.base import (
    BuildOptions,
    LLMProvider,
    ProviderError,
    ProviderOption,
    ProviderSettings,
    ProviderSpec,
    STTProvider,
    TTSProvider,
)

__all__ = [
    "PROVIDERS",
    "ProviderOption",
    "ProviderSettings",
    "ProviderSpec",
    "build_llm",
    "build_stt",
    "build_tts",
    "lookup",
    "probe",
    "provider_modules",
]

_NOT_PROVIDERS = {"base"}
_Builder = TypeVar("_Builder")
_STAGE_NAMES = {"stt": "speech-to-text", "llm": "a language model", "tts": "text-to-speech"}


def provider_modules() -> list[str]:
    """The provider modules' names, sorted (``_``-prefixed helpers and ``base`` are not providers)."""
    return sorted(m.name for m in pkgutil.iter_modules(__path__)
                  if not m.name.startswith("_") and m.name not in _NOT_PROVIDERS)


def _collect() -> Mapping[str, ProviderSpec]:
    specs: dict[str, ProviderSpec] = {}
    for module_name in provider_modules():
        module = importlib.import_module(f"{__name__}.{module_name}")
        declared = getattr(module, "SPECS", None)
        if not declared:
            raise ImportError(f"{module.__name__} is a provider module but declares no SPECS")
        for spec in declared:
            for name in (spec.name, *spec.aliases):
                if name in specs or any(name in s.aliases for s in specs.values()):
                    raise ImportError(f"provider name {name!r} is declared twice ({module.__name__})")
            specs[spec.name] = spec
    return MappingProxyType(dict(sorted(specs.items())))


PROVIDERS: Mapping[str, ProviderSpec] = _collect()   # name -> spec; aliases are in each spec, see lookup()


def lookup(name: str) -> ProviderSpec | None:
    """The provider called ``name`` or known by it as an alias (``grok`` -> ``xai``); None if unknown."""
    return PROVIDERS.get(name) or next((s for s in PROVIDERS.values() if name in s.aliases), None)


def _builder(stage: str, settings: ProviderSettings,
             builder_of: Callable[[ProviderSpec], _Builder | None]) -> tuple[_Builder, ProviderSettings]:
    """The named provider's builder for ``stage`` (``builder_of`` picks it from the spec), and the settings
    to build with (the provider's key variable filled in)."""
    spec = lookup(settings.name)
    if spec is None:
        raise ProviderError(settings.name, f"unknown provider; known: {', '.join(PROVIDERS)}")
    builder = builder_of(spec)
    if builder is None:
        raise ProviderError(settings.name, f"does not offer {_STAGE_NAMES[stage]}")
    if settings.key_env is None and spec.key_env:
        settings = dataclasses.replace(settings, key_env=spec.key_env)
    if set(spec.option_defaults()) - set(settings.options):     # a builder sees every declared option
        settings = dataclasses.replace(settings, options={**spec.option_defaults(), **settings.options})
    return builder, settings


def build_stt(settings: ProviderSettings, http: aiohttp.ClientSession, *, timeout_s: float,
              local_processes: int = 1, local_max_pending: int = 8) -> STTProvider:
    """Instantiate the STT provider named by ``settings`` (``local_*``: the pocketsphinx pool's size)."""
    options = BuildOptions(timeout_s, local_processes=local_processes, local_max_pending=local_max_pending)
    build, settings = _builder("stt", settings, lambda spec: spec.stt)
    return build(settings, http, options)


def build_llm(settings: ProviderSettings, http: aiohttp.ClientSession, *, timeout_s: float,
              max_tokens: int | None = None) -> LLMProvider:
    """Instantiate the LLM provider named by ``settings`` (``max_tokens``: the answer's limit)."""
    build, settings = _builder("llm", settings, lambda spec: spec.llm)
    return build(settings, http, BuildOptions(timeout_s, max_tokens=max_tokens))


def build_tts(settings: ProviderSettings, http: aiohttp.ClientSession, *, timeout_s: float) -> TTSProvider:
    """Instantiate the TTS provider named by ``settings``."""
    build, settings = _builder("tts", settings, lambda spec: spec.tts)
    return build(settings, http, BuildOptions(timeout_s))


async def probe(settings: ProviderSettings, http: aiohttp.ClientSession, stage: str, *, timeout_s: float) -> str:
    """The provider's cheapest authenticated request (its spec's ``probe``) for ``stage``: "ok", "key rejected
    (401)", "unreachable (DNS|connect|timeout)", "model not found", "failed (...)", or "not probed (...)"
    for a provider that declares none. Usage::

        await probe(config.providers.llm, http, "llm", timeout_s=3)     # "ok"
    """
    from pipeline.providers._http import HTTPClient

    spec = lookup(settings.name)
    if spec is None or spec.probe is None:
        return "not probed (nothing to reach)" if spec is not None and spec.name == "local" else \
            "not probed (the vendor has no free authenticated request)"
    builder, settings = _builder(stage, settings, lambda s: getattr(s, stage))
    client = builder(settings, http, BuildOptions(timeout_s))
    if not isinstance(client, HTTPClient):
        return "not probed (not an HTTP client)"
    return await client.probe(spec.probe, stage)
