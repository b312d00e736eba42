"""The JSON events browsers and apps receive, one mapping for ``/ws`` and the WebRTC data channel (§3.1)."""

from __future__ import annotations

import json

from gateway.browser.events import encode, event_message
from pipeline.conversation import BargeIn, BotSpeaking, ErrorEvent, TranscriptEvent, TurnLatency


def test_transcript() -> None:
    assert event_message(TranscriptEvent("user", "book a table")) == {
        "type": "transcript", "role": "user", "text": "book a table", "final": True}
    partial = event_message(TranscriptEvent("assistant", "Sure", final=False))
    assert partial is not None and partial["final"] is False


def test_bot_speaking() -> None:
    assert event_message(BotSpeaking(True)) == {"type": "bot_speaking", "state": "started"}
    assert event_message(BotSpeaking(False)) == {"type": "bot_speaking", "state": "stopped"}


def test_turn_latency_is_rounded_per_stage() -> None:
    latency = TurnLatency(turn_wait_ms=300.04, stt_ms=12.345, llm_first_token_ms=57.0, tts_first_audio_ms=45.66,
                          first_audio_out_ms=430.91)
    assert event_message(latency) == {"type": "turn_latency", "turn_wait_ms": 300.0, "stt_ms": 12.3,
                                      "llm_first_token_ms": 57.0, "tts_first_audio_ms": 45.7,
                                      "first_audio_out_ms": 430.9}


def test_barge_in_and_error() -> None:
    assert event_message(BargeIn("Let me tell")) == {"type": "interrupted", "heard": "Let me tell"}
    assert event_message(ErrorEvent("stt_failed", "speech-to-text failed: openai timed out")) == {
        "type": "error", "code": "stt_failed", "message": "speech-to-text failed: openai timed out"}


def test_events_clients_do_not_see_map_to_none() -> None:
    assert event_message(object()) is None  # type: ignore[arg-type]  # a wrong type on purpose


def test_encode_is_compact_json_with_type_first() -> None:
    text = encode({"type": "end", "reason": "ended_by_client"})
    assert text == '{"type":"end","reason":"ended_by_client"}'
    assert json.loads(encode(event_message(TranscriptEvent("user", "é")) or {}))["text"] == "é"
