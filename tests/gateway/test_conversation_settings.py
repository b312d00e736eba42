"""The conversation's settings come from the config by name: same keys, same units, same defaults."""

from __future__ import annotations

import dataclasses

import pytest

from gateway.config import Config
from pipeline.conversation import ConversationSettings

SETTINGS = {f.name: f for f in dataclasses.fields(ConversationSettings)}
CONFIG = {f.name: f for f in dataclasses.fields(Config)}


def test_every_setting_is_a_config_key_unless_listed_as_internal() -> None:
    missing = sorted(name for name in SETTINGS if name not in CONFIG and name not in ConversationSettings.INTERNAL)
    assert missing == [], f"ConversationSettings fields without a Config key: {missing}"
    assert set(ConversationSettings.INTERNAL) <= set(SETTINGS)
    assert not set(ConversationSettings.INTERNAL) & set(CONFIG), "an internal field became a key: take it off the list"
    assert all(reason for reason in ConversationSettings.INTERNAL.values())


def test_units_are_in_the_names() -> None:
    odd = [n for n in SETTINGS if n.endswith("_s") or n.endswith("_sec") or n.endswith("_seconds")]
    assert odd == []


def test_the_defaults_agree() -> None:
    config, settings = Config(), ConversationSettings()
    differ = {n: (getattr(settings, n), getattr(config, n)) for n in SETTINGS
              if n in CONFIG and getattr(settings, n) != getattr(config, n)}
    assert differ == {}


def test_from_config_takes_every_key() -> None:
    config = Config.from_mapping({"silence_prompt_secs": 5, "stt_timeout_secs": 2.5, "barge_in": False,
                                  "goodbye_text": "Bye."})
    settings = ConversationSettings.from_config(config)
    assert settings == dataclasses.replace(ConversationSettings(), silence_prompt_secs=5, stt_timeout_secs=2.5,
                                           barge_in=False, goodbye_text="Bye.")


def test_from_config_refuses_a_source_without_a_key() -> None:
    values = {n: getattr(Config(), n) for n in SETTINGS if n in CONFIG}
    assert ConversationSettings.from_config(values) == ConversationSettings()
    assert ConversationSettings.from_config({**values, "preroll_ms": 120}).preroll_ms == 120   # internal: optional
    del values["vad_stop_ms"]
    with pytest.raises(KeyError, match="vad_stop_ms"):
        ConversationSettings.from_config(values)
