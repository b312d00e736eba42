"""Text helpers for speech: clause splitting of streamed LLM output, truncation.

Usage::

    splitter = ClauseSplitter()
    splitter.feed("Sure, I can")        # []
    splitter.feed(" help. What is")     # ["Sure, I can help."]  (or ["Sure,", ...] past min_chars)
    splitter.flush()                    # ["What is"]
"""

from __future__ import annotations

import re

__all__ = ["ClauseSplitter", "truncate_words"]

_SENTENCE_END = re.compile(r"[.!?]+[\"')\]]*\s")
_CLAUSE_END = re.compile(r"[,;:\u2014]\s")


class ClauseSplitter:
    """Cuts streamed text into speakable pieces as soon as each is complete.

    A piece ends at a sentence end; the first piece of a response may also end at a comma-like
    break once it holds ``first_min_chars`` characters, so speech starts sooner.
    """

    def __init__(self, *, first_min_chars: int = 20, min_chars: int = 60) -> None:
        self._buf = ""
        self._first = True
        self._first_min = first_min_chars
        self._min = min_chars

    def feed(self, delta: str) -> list[str]:
        self._buf += delta
        out: list[str] = []
        while True:
            cut = self._find_cut()
            if cut is None:
                return out
            piece, self._buf = self._buf[:cut].strip(), self._buf[cut:].lstrip()
            if piece:
                out.append(piece)
                self._first = False

    def flush(self) -> list[str]:
        piece, self._buf = self._buf.strip(), ""
        return [piece] if piece else []

    def _find_cut(self) -> int | None:
        m = _SENTENCE_END.search(self._buf)
        clause_min = self._first_min if self._first else self._min
        c = _CLAUSE_END.search(self._buf, clause_min - 1 if clause_min > 0 else 0)
        candidates = [x.end() for x in (m, c) if x is not None]
        return min(candidates) if candidates else None


def truncate_words(text: str, fraction: float) -> str:
    """The first ``fraction`` of ``text``'s words (what a caller heard of an interrupted clause)."""
    if fraction >= 1.0:
        return text
    words = text.split()
    keep = int(len(words) * max(0.0, fraction))
    return " ".join(words[:keep])
