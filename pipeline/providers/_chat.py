"""Our chat context reshaped for vendors that keep the system prompt apart and want alternating turns.

Not a provider (the registry skips ``_`` modules). A turn is a role and its parts: text, the model's
tool calls (:class:`ToolCall`, in assistant turns) and their results (:class:`ToolResult`, in the user
turn after them), which each vendor writes as its own content blocks. Usage::

    system, turns = split_system([{"role": "system", "content": "Be brief."},
                                  {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Hi"}])
    # system == "Be brief."
    # turns == [("user", (CALL_STARTED,)), ("assistant", ("Hello!",)), ("user", ("Hi",))]
"""

from __future__ import annotations

from collections.abc import Sequence

from pipeline.providers.base import Message, ToolCall, ToolExchange, ToolResult

__all__ = ["CALL_STARTED", "Part", "Turn", "split_system"]

CALL_STARTED = "(the call has started)"   # the user turn put before an opening greeting

Part = str | ToolCall | ToolResult
Turn = tuple[str, tuple[Part, ...]]


def split_system(messages: Sequence[Message]) -> tuple[str, list[Turn]]:
    """The system messages joined, and the rest as ``(role, parts)`` turns: empty messages dropped,
    consecutive turns of one role merged (adjacent texts joined by a newline; results stay first in
    their turn, as vendors require), a ToolExchange split into the assistant's calls and the user's
    results, and a leading assistant turn preceded by :data:`CALL_STARTED` (both vendors want the
    user to speak first)."""
    system: list[str] = []
    turns: list[Turn] = []

    def add(role: str, parts: tuple[Part, ...]) -> None:
        if not parts:
            return
        if not turns or turns[-1][0] != role:
            turns.append((role, parts))
            return
        before = turns[-1][1]
        if isinstance(before[-1], str) and isinstance(parts[0], str):
            parts = (f"{before[-1]}\n{parts[0]}", *parts[1:])
            before = before[:-1]
        turns[-1] = (role, before + parts)

    for message in messages:
        if isinstance(message, ToolExchange):
            add("assistant", tuple(result.call for result in message.results))
            add("user", message.results)
            continue
        role, text = message.get("role", "user"), message.get("content") or ""
        if role == "system":
            if text:
                system.append(text)
            continue
        if text:
            add("assistant" if role == "assistant" else "user", (text,))
    if turns and turns[0][0] == "assistant":
        turns.insert(0, ("user", (CALL_STARTED,)))
    return "\n\n".join(system), turns
