"""Carrier registry: which adapter serves ``/start/<name>``, its credentials and their variables.

Usage::

    spec = CARRIERS["telnyx"]
    spec.env["public_key"]            # "TELNYX_PUBLIC_KEY"
    cls = spec.load()                 # carriers.telnyx.TelnyxCarrier (imported on first use)
    spec.options()                    # constructor keywords and their defaults (what config may set)
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["CARRIERS", "CarrierSpec"]


@dataclass(frozen=True, slots=True)
class CarrierSpec:
    name: str
    target: str                       # "module:Class"
    env: Mapping[str, str]            # constructor keyword -> the carrier's usual environment variable
    required: tuple[str, ...]         # keywords without which webhooks cannot be verified ("a|b": either)

    def load(self) -> type:
        module, _, cls = self.target.partition(":")
        loaded = getattr(importlib.import_module(module), cls)
        if not isinstance(loaded, type):
            raise TypeError(f"{self.target} is not a class")
        return loaded

    def options(self) -> dict[str, inspect.Parameter]:
        """The constructor's keyword settings (``http`` and injected callables such as clocks excluded)."""
        params = inspect.signature(self.load()).parameters
        return {k: p for k, p in params.items()
                if k != "http" and p.kind is inspect.Parameter.KEYWORD_ONLY
                and (p.default is p.empty or not callable(p.default))}

    def missing(self, values: Mapping[str, Any]) -> list[str]:
        """Required settings that are empty (named by their environment variable)."""
        if values.get("verify_signatures", True) is False:
            return []
        missing = []
        for need in self.required:           # "a|b": either one will do
            options = need.split("|")
            if not any(values.get(k) for k in options):
                missing.append(" or ".join(self.env.get(k, f"carriers.{self.name}.{k}") for k in options))
        return missing


CARRIERS: Mapping[str, CarrierSpec] = {
    s.name: s
    for s in (
        CarrierSpec("twilio", "carriers.twilio:TwilioCarrier",
                    {"account_sid": "TWILIO_ACCOUNT_SID", "auth_token": "TWILIO_AUTH_TOKEN"}, ("auth_token",)),
        CarrierSpec("telnyx", "carriers.telnyx:TelnyxCarrier",
                    {"api_key": "TELNYX_API_KEY", "public_key": "TELNYX_PUBLIC_KEY"}, ("public_key",)),
        CarrierSpec("vonage", "carriers.vonage:VonageCarrier",
                    {"application_id": "VONAGE_APPLICATION_ID", "private_key": "VONAGE_PRIVATE_KEY",
                     "signature_secret": "VONAGE_SIGNATURE_SECRET"}, ("signature_secret",)),
        CarrierSpec("plivo", "carriers.plivo:PlivoCarrier",
                    {"auth_id": "PLIVO_AUTH_ID", "auth_token": "PLIVO_AUTH_TOKEN",
                     "main_auth_token": "PLIVO_MAIN_AUTH_TOKEN"}, ("auth_token",)),
        CarrierSpec("exotel", "carriers.exotel:ExotelCarrier",
                    {"sid": "EXOTEL_SID", "api_key": "EXOTEL_API_KEY", "api_token": "EXOTEL_API_TOKEN"},
                    ("basic_auth_password|allowed_ips",)),
    )
}
