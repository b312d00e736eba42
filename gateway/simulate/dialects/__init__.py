"""Carrier dialects for the call emulator (``voxray simulate``): each speaks one carrier's side."""

from __future__ import annotations

import importlib
from typing import cast

from gateway.simulate.dialects.base import Dialect, Inbound, Webhook

__all__ = ["Dialect", "Inbound", "Webhook", "dialect_for"]

KNOWN = ("twilio", "telnyx", "vonage", "plivo", "exotel")


def dialect_for(carrier: str) -> type[Dialect]:
    """The dialect class for ``carrier`` (module ``gateway.simulate.dialects.<carrier>``, class ``<Name>Dialect``)."""
    if carrier not in KNOWN:
        raise ValueError(f"unknown carrier {carrier!r}; known: {', '.join(KNOWN)}")
    module = importlib.import_module(f"gateway.simulate.dialects.{carrier}")
    # every module of KNOWN defines its <Name>Dialect (tests/gateway/test_simulate.py runs each one)
    return cast(type[Dialect], getattr(module, f"{carrier.capitalize()}Dialect"))
