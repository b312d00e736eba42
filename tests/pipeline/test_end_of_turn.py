"""Tests for pipeline.end_of_turn: the sentence rules (the pause cases of issue 15 among them), and the
final pitch measured on Piper speech and on synthetic voiced glides."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.end_of_turn import final_contour, judge
from tests.speech import speech_pcm

RATE = 16000


# ------------------------------------------------------------------------------ words

@pytest.mark.parametrize("text", [
    "I'd like to speak with someone in",          # a preposition after a noun
    "Can you check whether my order",             # a clause with no verb yet
    "My phone number is five five five",          # 3 of a phone number's digits
    "My zip code is nine oh two",
    "Do you know where my package",
    "I want to book a table for two and",
    "I'd like the",
    "my number is",
    "I want",
    "um",
    "Can you tell me about, ",
    "I was thinking...",
    "well it is kind of -",
    "because",
    "I'm",
    "Coffee AND",
    "Send it to my",
])
def test_an_unfinished_thought_waits(text: str) -> None:
    verdict = judge(text)
    assert not verdict.complete, verdict


@pytest.mark.parametrize("text", [
    "I'd like to speak with someone in the billing department",
    "Can you check whether my order has shipped yet",
    "My phone number is five five five one two three four",
    "The last four digits are one two three four",
    "I want to book a table for two.",
    "I'd like a table for four",
    "What is on the menu?",
    "Yes", "No", "Yes it is", "That's all", "I'll take this",
    "Thanks, bye!",
    "Android",          # ends with "and" letters, but is a whole word
    "the Pandas",
    "Let me in",        # a particle after an object pronoun
    "Mm-hmm.", "Uh-huh.",   # backchannels: a held agent must not wait turn_stop_secs for their "end"
    "",
])
def test_a_finished_thought_is_answered_at_once(text: str) -> None:
    verdict = judge(text)
    assert verdict.complete, verdict


def test_other_languages_get_the_punctuation_rule_only() -> None:
    assert judge("Quiero hablar con alguien de", language="es").complete
    assert not judge("Quiero hablar con alguien de,", language="es").complete
    assert not judge("I'd like the", language="en-GB").complete


# ------------------------------------------------------------------------------ pitch

def glide(start_hz: float, end_hz: float, ms: int = 900, *, fade: bool = False) -> bytes:
    """A voiced sound (a pulse train through harmonics) whose pitch moves from start_hz to end_hz."""
    n = RATE * ms // 1000
    f = np.linspace(start_hz, end_hz, n)
    phase = 2 * np.pi * np.cumsum(f) / RATE
    x = sum(np.sin(k * phase) / k for k in range(1, 8))
    amp = np.linspace(1.0, 0.4, n) if fade else np.ones(n)
    return (0.2 * x / np.abs(x).max() * amp * 32767).astype("<i2").tobytes()


def test_the_contour_of_synthetic_voices() -> None:
    silence = b"\x00\x00" * (RATE // 2)
    assert final_contour(glide(180, 110, fade=True) + silence, RATE) == "falling"
    assert final_contour(glide(140, 141), RATE) == "level"
    assert final_contour(glide(120, 190), RATE) == "rising"
    assert final_contour(b"", RATE) == "unknown"
    assert final_contour(silence, RATE) == "unknown"


def test_a_statement_read_by_piper_falls() -> None:
    assert final_contour(speech_pcm("I would like to check in.", RATE), RATE) == "falling"


def test_a_weak_sign_is_decided_by_the_pitch() -> None:
    """"check in" may close a phrasal verb: complete when the pitch falls (Piper reading a statement), not
    when it stays level; the same words without audio wait."""
    text = "I'd like to check in"
    assert judge(text, speech_pcm("I would like to check in.", RATE), RATE).complete
    assert not judge(text, glide(140, 141), RATE).complete
    assert not judge(text).complete
    assert not judge("It is one two", glide(140, 141), RATE).complete
