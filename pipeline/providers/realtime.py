"""``realtime``: the OpenAI Realtime API as the call's speech-to-speech engine (``llm_provider: "realtime"``).

It takes the ``llm`` stage's place in the registry, but is not a chat model: what it builds
(:class:`~pipeline.realtime.client.RealtimeModel`) holds the settings and the shared HTTP session, and the
gateway runs such calls through :class:`~pipeline.realtime.engine.RealtimeEngine`. The key is the OpenAI
key; the base URL ``OPENAI_REALTIME_BASE_URL`` (``https``/``wss`` both work: the socket is ``wss``).

Usage::

    model = build_llm(ProviderSettings("realtime", "gpt-realtime", key, "wss://api.openai.com/v1"), http,
                      timeout_s=10)
    socket = await model.connect(timeout_s=10)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pipeline.providers.base import BuildOptions, ProviderSettings, ProviderSpec

if TYPE_CHECKING:
    import aiohttp

    from pipeline.realtime.client import RealtimeModel

__all__ = ["SPECS", "build_llm"]


def build_llm(settings: ProviderSettings, http: aiohttp.ClientSession, options: BuildOptions) -> RealtimeModel:
    """The session opener (imported here: the realtime package imports the provider base)."""
    from pipeline.realtime.client import RealtimeModel

    return RealtimeModel(settings, http)


SPECS = (
    ProviderSpec("realtime", key_env="OPENAI_API_KEY", base_url_env="OPENAI_REALTIME_BASE_URL",
                 default_base_url="wss://api.openai.com/v1", default_models={"llm": "gpt-realtime"},
                 options="speech-to-speech: only as `llm_provider` (or `provider`, when STT and TTS become "
                         "`openai`); `realtime_model`, `realtime_voice`, `realtime_turn_detection`, "
                         "`realtime_transcribe_model`; see the README's Speech-to-speech section",
                 llm=build_llm),
)
