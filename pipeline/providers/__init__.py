"""Provider registry: which provider serves which stage, its key variable, base URL and defaults.

Usage::

    spec = PROVIDERS["groq"]
    spec.key_env          # "GROQ_API_KEY"
    stt = build_stt(ProviderSettings(name="openai", model="whisper-1", api_key="sk-..."), http, timeout_s=10)
    stt = build_stt(ProviderSettings(name="local", model="pocketsphinx-en-us"), http, timeout_s=10,
                    local_processes=2, local_max_pending=8)   # the offline recogniser's worker processes
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import aiohttp

from pipeline.providers.base import LLMProvider, ProviderError, ProviderSettings, STTProvider, TTSProvider

__all__ = [
    "PROVIDERS",
    "ProviderSettings",
    "ProviderSpec",
    "build_llm",
    "build_stt",
    "build_tts",
]


@dataclass(frozen=True, slots=True)
class ProviderSpec:
    """Static facts about one provider."""

    name: str
    stages: frozenset[str]
    key_env: str | None  # None: no key needed
    base_url_env: str | None
    default_base_url: str
    default_models: Mapping[str, str]
    default_voice: str | None = None


def _spec(name: str, stages: str, key_env: str | None, base_env: str | None, base: str,
          models: Mapping[str, str], voice: str | None = None) -> ProviderSpec:
    return ProviderSpec(name, frozenset(stages.split()), key_env, base_env, base, models, voice)


PROVIDERS: Mapping[str, ProviderSpec] = {
    s.name: s
    for s in (
        _spec("openai", "stt llm tts", "OPENAI_API_KEY", "OPENAI_BASE_URL", "https://api.openai.com/v1",
              {"stt": "whisper-1", "llm": "gpt-4o-mini", "tts": "tts-1"}, "alloy"),
        _spec("groq", "stt llm", "GROQ_API_KEY", "GROQ_BASE_URL", "https://api.groq.com/openai/v1",
              {"stt": "whisper-large-v3", "llm": "llama-3.1-8b-instant"}),
        _spec("cerebras", "llm", "CEREBRAS_API_KEY", "CEREBRAS_BASE_URL", "https://api.cerebras.ai/v1",
              {"llm": "llama3.1-8b"}),
        _spec("ollama", "llm", None, "OLLAMA_BASE_URL", "http://localhost:11434/v1", {"llm": "llama3.2"}),
        _spec("deepseek", "llm", "DEEPSEEK_API_KEY", "DEEPSEEK_BASE_URL", "https://api.deepseek.com/v1",
              {"llm": "deepseek-chat"}),
        _spec("mistral", "llm", "MISTRAL_API_KEY", "MISTRAL_BASE_URL", "https://api.mistral.ai/v1",
              {"llm": "mistral-small-latest"}),
        _spec("whisper", "stt", None, "WHISPER_BASE_URL", "http://localhost:9000/v1", {"stt": "whisper-1"}),
        _spec("local", "stt llm tts", None, None, "", {"stt": "pocketsphinx-en-us", "llm": "echo",
                                                      "tts": "piper-joe-medium"}),
    )
}


def build_stt(settings: ProviderSettings, http: aiohttp.ClientSession, *, timeout_s: float,
              local_processes: int = 1, local_max_pending: int = 8) -> STTProvider:
    """Instantiate the STT provider named by ``settings`` (``local_*``: the pocketsphinx pool's size)."""
    if settings.name == "local":
        from pipeline.providers.local import PocketsphinxSTT

        return PocketsphinxSTT(processes=local_processes, max_pending=local_max_pending)
    if "stt" in PROVIDERS[settings.name].stages:
        from pipeline.providers.openai import OpenAISTT

        return OpenAISTT(settings, http, timeout_s=timeout_s)
    raise ProviderError(settings.name, "does not offer speech-to-text")


def build_llm(settings: ProviderSettings, http: aiohttp.ClientSession, *, timeout_s: float,
              max_tokens: int | None = None) -> LLMProvider:
    """Instantiate the LLM provider named by ``settings`` (every remote one speaks OpenAI's chat API)."""
    if settings.name == "local":
        from pipeline.providers.local import EchoLLM

        return EchoLLM()
    if "llm" in PROVIDERS[settings.name].stages:
        from pipeline.providers.openai import OpenAILLM

        return OpenAILLM(settings, http, timeout_s=timeout_s, max_tokens=max_tokens)
    raise ProviderError(settings.name, "does not offer a language model")


def build_tts(settings: ProviderSettings, http: aiohttp.ClientSession, *, timeout_s: float) -> TTSProvider:
    """Instantiate the TTS provider named by ``settings``."""
    if settings.name == "local":
        from pipeline.providers.local import PiperTTS

        return PiperTTS()
    if "tts" in PROVIDERS[settings.name].stages:
        from pipeline.providers.openai import OpenAITTS

        return OpenAITTS(settings, http, timeout_s=timeout_s)
    raise ProviderError(settings.name, "does not offer text-to-speech")
