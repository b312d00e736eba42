"""Who the agent is on a call (:class:`Persona`) and how it takes turns (:class:`ConversationSettings`).

Every field of :class:`ConversationSettings` is the configuration key of the same name, in the same
unit (``_ms`` milliseconds, ``_secs`` seconds) and with the same default, so the gateway builds it
from its config in one generic step; only the fields in ``INTERNAL`` have no key.

Usage::

    settings = ConversationSettings.from_config(config)          # any object (or mapping) with the keys
    fast = dataclasses.replace(ConversationSettings(), vad_stop_ms=120, turn_stop_secs=0.45)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from pipeline.silero_vad import SileroModel
    from pipeline.tools.http import HttpToolSpec

__all__ = ["DEFAULT_BACKCHANNELS", "ConversationSettings", "Persona"]

# Per language, comma-separated: what a listener says to show they follow, not to take the floor.
DEFAULT_BACKCHANNELS: Mapping[str, str] = {
    "en": "uh huh, mm hmm, mhm, hmm, yeah, yep, yup, okay, ok, right, alright, all right, sure, i see, got it",
    "es": "ajá, sí, vale, claro, ya, ok, okay, mhm",
    "fr": "oui, ouais, d'accord, ok, okay, mhm, je vois",
    "de": "ja, genau, okay, ok, mhm, stimmt, alles klar",
}


@dataclass(frozen=True, slots=True)
class Persona:
    """Who the agent is on this call."""

    name: str = "default"
    system: str = "You are a helpful, friendly voice assistant on a phone call. Keep answers short and conversational."
    greeting: str = "Hello! How can I help you today?"
    voice: str | None = None
    language: str = "en"
    transfer_targets: Mapping[str, str] = field(default_factory=dict)   # name -> E.164 or sip: URI
    builtin_tools: tuple[str, ...] = ()    # "end_call", "send_dtmf" (transfer_call: on with transfer_targets)
    tools: tuple[HttpToolSpec, ...] = ()   # HTTP tools (pipeline.tools.http)


@dataclass(frozen=True, slots=True)
class ConversationSettings:
    """Turn-taking, provider limits and the call's last words; see the README's configuration table."""

    # Fields without a configuration key, and why.
    INTERNAL: ClassVar[Mapping[str, str]] = {
        "preroll_ms": "audio kept from before the VAD's speech start (which lags it by vad_start_ms) so a "
                      "turn's first syllable reaches the STT; tuned with the VAD, not per deployment",
        "silero_model": "the process's one Silero ONNX session, shared by every call: a runtime object the "
                        "gateway's lifespan makes when vad_type is 'silero', not a setting (None: each call loads one)",
    }

    vad_type: str = "energy"             # "silero": pipeline.silero_vad, vad_threshold as its speech probability

    vad_threshold: float = 0.02
    vad_start_ms: float = 60
    vad_stop_ms: float = 400
    turn_stop_secs: float = 3.0
    max_utterance_secs: float = 30.0
    barge_in: bool = True
    interruption_strategy: str = "speech"   # "speech": confirmed by speech evidence; "immediate": any VAD start
    interruption_speech_ms: float = 64      # speech evidence that confirms an interruption
    false_interruption_secs: float = 0.5    # no evidence by then: the agent resumes
    min_words: int = 0                      # words (not backchannels) an interruption needs, 0 = any
    backchannels: Mapping[str, str] = field(default_factory=lambda: dict(DEFAULT_BACKCHANNELS))
    stt_timeout_secs: float = 10.0
    stt_stream_final_wait_ms: float = 500   # a streaming STT: longest wait for its finals after the speech stops
    llm_timeout_secs: float = 10.0
    tts_timeout_secs: float = 10.0
    provider_retries: int = 1
    dtmf_timeout_ms: float = 1500
    apology_text: str = "I'm sorry, I'm having trouble right now. Please call again later. Goodbye."
    preroll_ms: float = 300
    silence_prompt_secs: float = 20.0    # 0 = never ask "are you still there?"
    silence_hangup_secs: float = 10.0    # after the prompt, this much more silence ends the call
    silence_prompt_text: str = "Are you still there?"
    goodbye_text: str = "Thank you for calling. Goodbye."
    tool_max_rounds: int = 3             # LLM requests answering tool results, per caller turn
    silero_model: SileroModel | None = field(default=None, compare=False, repr=False)

    @classmethod
    def from_config(cls, source: Any) -> ConversationSettings:
        """Every field taken by name from ``source`` (attributes, or keys of a mapping); a field
        missing from it is an error, except the ``INTERNAL`` ones, which keep their default. Usage::

            ConversationSettings.from_config(Config.load(path, os.environ))
            ConversationSettings.from_config({**dataclasses.asdict(ConversationSettings()), "barge_in": False})
        """
        def has(name: str) -> bool:
            return name in source if isinstance(source, Mapping) else hasattr(source, name)

        def get(name: str) -> Any:
            return source[name] if isinstance(source, Mapping) else getattr(source, name)

        missing = [f.name for f in dataclasses.fields(cls) if f.name not in cls.INTERNAL and not has(f.name)]
        if missing:
            raise KeyError(f"the configuration lacks {', '.join(missing)}")
        return cls(**{f.name: get(f.name) for f in dataclasses.fields(cls) if has(f.name)})
