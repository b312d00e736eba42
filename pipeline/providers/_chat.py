"""Our chat context reshaped for vendors that keep the system prompt apart and want alternating turns.

Not a provider (the registry skips ``_`` modules). Usage::

    system, turns = split_system([{"role": "system", "content": "Be brief."},
                                  {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Hi"}])
    # system == "Be brief."
    # turns == [("user", CALL_STARTED), ("assistant", "Hello!"), ("user", "Hi")]
"""

from __future__ import annotations

from collections.abc import Sequence

from pipeline.providers.base import Message

__all__ = ["CALL_STARTED", "split_system"]

CALL_STARTED = "(the call has started)"   # the user turn put before an opening greeting


def split_system(messages: Sequence[Message]) -> tuple[str, list[tuple[str, str]]]:
    """The system messages joined, and the rest as ``(role, text)`` turns: empty messages dropped,
    consecutive turns of one role merged, a leading assistant turn preceded by :data:`CALL_STARTED`
    (both vendors want the user to speak first)."""
    system: list[str] = []
    turns: list[tuple[str, str]] = []
    for message in messages:
        role, text = message.get("role", "user"), message.get("content") or ""
        if role == "system":
            if text:
                system.append(text)
            continue
        role = "assistant" if role == "assistant" else "user"
        if not text:
            continue
        if turns and turns[-1][0] == role:
            turns[-1] = (role, f"{turns[-1][1]}\n{text}")
        else:
            turns.append((role, text))
    if turns and turns[0][0] == "assistant":
        turns.insert(0, ("user", CALL_STARTED))
    return "\n\n".join(system), turns
