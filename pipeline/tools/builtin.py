"""The built-in tools a persona enables: ``end_call``, ``transfer_call``, ``send_dtmf``.

They control the call, which lives in the gateway: the gateway passes a :class:`CallControl` and the
tools only call it. ``transfer_call`` is offered when the persona has ``transfer_targets`` (and the
leg can be transferred: not a browser); the others when listed in the persona's ``builtin_tools``.

Usage::

    tools = builtin_tools(persona, control, can_transfer=leg.can_transfer)
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, Protocol

from pipeline.providers.base import Tool
from pipeline.settings import Persona
from pipeline.tools.runner import BoundTool

__all__ = ["BUILTINS", "CallControl", "builtin_tools"]

logger = logging.getLogger(__name__)

BUILTINS = ("end_call", "send_dtmf", "transfer_call")


class CallControl(Protocol):
    """What the built-ins ask of the call (the gateway's Call implements it)."""

    async def end_call(self) -> None:
        """Let the words already said play, say the goodbye, then hang up."""

    async def transfer_to(self, target: str) -> None:
        """Let the words already said play, then transfer the far end to ``target`` (E.164 or sip:);
        raises when the carrier refuses."""

    async def send_digits(self, digits: str) -> None:
        """Send DTMF ``digits`` to the far end (out of band where the leg can, else as tones)."""


def builtin_tools(persona: Persona, control: CallControl, *, can_transfer: bool) -> list[BoundTool]:
    """The persona's built-ins, bound to ``control``."""
    tools: list[BoundTool] = []
    if "end_call" in persona.builtin_tools:
        async def end_call(_arguments: Mapping[str, Any]) -> None:
            await control.end_call()

        tools.append(BoundTool(Tool(
            "end_call", "Hang up once the conversation is over (the caller said goodbye, or has nothing more to "
            "ask). The caller hears a short goodbye first, so do not say goodbye yourself.",
            {"type": "object", "properties": {}}), end_call, filler=False))
    if persona.transfer_targets and can_transfer:
        targets = persona.transfer_targets

        async def transfer(arguments: Mapping[str, Any]) -> str | None:
            await control.transfer_to(targets[str(arguments["target"])])   # the schema's enum: a known name
            return None

        tools.append(BoundTool(Tool(
            "transfer_call", "Transfer the caller to a person or department when they ask for it or when you "
            "cannot help. Say a short sentence first, e.g. 'Let me transfer you.'",
            {"type": "object", "properties": {"target": {"type": "string", "enum": sorted(targets)}},
             "required": ["target"]}), transfer, filler=False))
    if "send_dtmf" in persona.builtin_tools:
        async def send_dtmf(arguments: Mapping[str, Any]) -> str:
            digits = str(arguments["digits"])
            await control.send_digits(digits)
            return f"Sent the keypad tones {digits}."

        tools.append(BoundTool(Tool(
            "send_dtmf", "Press keys on the phone keypad (DTMF), e.g. to navigate a phone menu or enter an "
            "extension.", {"type": "object", "properties": {"digits": {
                "type": "string", "pattern": "^[0-9*#]{1,32}$", "description": "the keys, e.g. '1' or '2045#'"}},
                "required": ["digits"]}), send_dtmf, filler=False))
    return tools
