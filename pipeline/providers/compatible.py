"""Vendors that speak OpenAI's wire protocol: one row each, the OpenAI classes do the talking.

Only the base URL, the key variable and the default models differ; auth is ``Authorization: Bearer``.
Adding such a vendor is one more row below (and its row in docs/providers.md). Usage::

    from pipeline.providers import PROVIDERS, lookup
    PROVIDERS["together"].default_base_url       # "https://api.together.xyz/v1"
    lookup("grok").name                          # "xai"
"""

from __future__ import annotations

from pipeline.providers.base import ProviderSpec
from pipeline.providers.openai import MODELS_PROBE, build_llm, build_stt

__all__ = ["SPECS"]


def _llm(name: str, key_env: str | None, base_url: str, model: str, *, aliases: tuple[str, ...] = (),
         options: str = "") -> ProviderSpec:
    """An OpenAI-compatible chat vendor whose base URL can be overridden with ``<NAME>_BASE_URL``."""
    return ProviderSpec(name, key_env=key_env, base_url_env=f"{name.upper()}_BASE_URL", default_base_url=base_url,
                        default_models={"llm": model}, aliases=aliases, options=options, probe=MODELS_PROBE,
                        llm=build_llm)


SPECS = (
    ProviderSpec("groq", key_env="GROQ_API_KEY", base_url_env="GROQ_BASE_URL",
                 default_base_url="https://api.groq.com/openai/v1",
                 default_models={"stt": "whisper-large-v3", "llm": "llama-3.1-8b-instant"},
                 probe=MODELS_PROBE, stt=build_stt, llm=build_llm),
    _llm("cerebras", "CEREBRAS_API_KEY", "https://api.cerebras.ai/v1", "llama3.1-8b"),
    _llm("ollama", None, "http://localhost:11434/v1", "llama3.2", options="no key; a local Ollama server"),
    _llm("deepseek", "DEEPSEEK_API_KEY", "https://api.deepseek.com/v1", "deepseek-chat"),
    _llm("mistral", "MISTRAL_API_KEY", "https://api.mistral.ai/v1", "mistral-small-latest"),
    _llm("xai", "XAI_API_KEY", "https://api.x.ai/v1", "grok-2", aliases=("grok",)),
    _llm("together", "TOGETHER_API_KEY", "https://api.together.xyz/v1", "meta-llama/Llama-3.3-70B-Instruct-Turbo"),
    _llm("fireworks", "FIREWORKS_API_KEY", "https://api.fireworks.ai/inference/v1",
         "accounts/fireworks/models/llama-v3p1-8b-instruct"),
    _llm("openrouter", "OPENROUTER_API_KEY", "https://openrouter.ai/api/v1", "openai/gpt-4o-mini",
         options="`model` is a vendor-prefixed slug (`anthropic/claude-3.5-sonnet`, `openai/gpt-4o` ...)"),
    ProviderSpec("whisper", key_env=None, base_url_env="WHISPER_BASE_URL", default_base_url="http://localhost:9000/v1",
                 default_models={"stt": "whisper-1"}, stt=build_stt, probe=MODELS_PROBE,
                 options="no key; a local OpenAI-compatible Whisper server (`WHISPER_BASE_URL=http://host:9000`)"),
)
