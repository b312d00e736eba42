"""Helpers shared by the markup the carriers answer with (the templates in ``twiml/``): loading a
template once, and escaping words for the text of an XML element.

Usage (what ``TwilioCarrier.busy`` does)::

    body = template("twilio_busy.xml").substitute(text=xml_text("twilio", "Tom & Jerry's", "busy text"))
    # '<?xml ...?><Response><Say>Tom &amp; Jerry&apos;s</Say><Hangup/></Response>'
"""

from __future__ import annotations

import re
from functools import cache
from importlib import resources
from string import Template
from xml.sax.saxutils import escape

__all__ = ["template", "xml_text"]

# Characters XML 1.0 cannot carry at all (escaping does not help).
_XML_INVALID = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")
_QUOTES = {'"': "&quot;", "'": "&apos;"}


@cache
def template(name: str) -> Template:
    """The ``twiml/<name>`` template (read once), surrounding whitespace removed."""
    return Template(resources.files("twiml").joinpath(name).read_text(encoding="utf-8").strip())


def xml_text(carrier: str, value: str, what: str) -> str:
    """``value`` escaped for an element's text (``& < > " '`` as entities); ValueError naming the
    carrier and ``what`` for a non-string or a character XML cannot carry."""
    if not isinstance(value, str):
        raise ValueError(f"{carrier} {what} must be a string (got {type(value).__name__})")
    if _XML_INVALID.search(value):
        raise ValueError(f"{carrier} {what} contains a character XML cannot carry")
    return escape(value, _QUOTES)
