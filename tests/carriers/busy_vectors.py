"""The spoken-refusal vectors every XML carrier's ``busy`` passes (Twilio, Telnyx TeXML, Plivo).

Usage::

    check_xml_busy(carrier().busy, "Say", "text/xml")
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Callable

import pytest

from carriers.base import CallInfo

HOSTILE = "Tom & Jerry's <b>\"busy\"</b> $text ${x}"
CALL = CallInfo(carrier="any", call_id="c1")


def check_xml_busy(busy: Callable[[CallInfo, str], tuple[str, str] | None], verb: str, media_type: str) -> None:
    """The exact document for plain words; ``& < > " '`` escaped as entities (template markers left as
    they are); ``<verb>`` then ``<Hangup/>`` and nothing else; a character XML cannot carry refused."""
    assert busy(CALL, "All our lines are busy.") == (
        f'<?xml version="1.0" encoding="UTF-8"?><Response><{verb}>All our lines are busy.</{verb}>'
        "<Hangup/></Response>", media_type)
    answer = busy(CALL, HOSTILE)
    assert answer is not None
    body = answer[0]
    assert f"<{verb}>Tom &amp; Jerry&apos;s &lt;b&gt;&quot;busy&quot;&lt;/b&gt; $text ${{x}}</{verb}>" in body
    root = ET.fromstring(body.encode())
    assert [child.tag for child in root] == [verb, "Hangup"] and root[0].text == HOSTILE
    with pytest.raises(ValueError, match="XML"):
        busy(CALL, "bell\x07")
