"""Voxray: a telephony-first voice-agent gateway."""

__version__ = "0.1.0"
