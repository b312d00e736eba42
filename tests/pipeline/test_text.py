"""Tests for pipeline.text: streamed clause splitting, turn completeness and truncation."""

from __future__ import annotations

import re

import pytest

from pipeline.text import ClauseSplitter, truncate_words


def tokens(text: str) -> list[str]:
    """Split like an LLM stream: words with their leading space, punctuation as its own token."""
    return re.findall(r"\s*[\w']+|\s*[^\w\s]", text)


def stream(splitter: ClauseSplitter, text: str) -> list[tuple[int, str]]:
    """Feed ``text`` token by token; return (index of the token that produced it, piece)."""
    out = []
    for i, tok in enumerate(tokens(text)):
        out.extend((i, piece) for piece in splitter.feed(tok))
    return out


def test_tokens_helper_round_trips() -> None:
    text = "Sure, it costs 3.5 dollars. Anything else?"
    assert "".join(tokens(text)) == text
    assert len(tokens(text)) > 8


# ------------------------------------------------------------------------------ ClauseSplitter

def test_docstring_example() -> None:
    s = ClauseSplitter()
    assert s.feed("Sure, I can") == []
    assert s.feed(" help. What is") == ["Sure, I can help."]
    assert s.flush() == ["What is"]
    assert s.flush() == []


def test_sentences_are_emitted_as_soon_as_the_following_space_arrives() -> None:
    s = ClauseSplitter()
    text = "Hello there. How are you today? I am fine! Bye"
    toks = tokens(text)
    got = stream(s, text)
    assert [p for _, p in got] == ["Hello there.", "How are you today?", "I am fine!"]
    # each piece is cut on the token right after its end punctuation (the one carrying the space)
    for index, piece in got:
        assert toks[index - 1].strip() == piece[-1]
        assert toks[index].startswith(" ")
    assert s.flush() == ["Bye"]


def test_a_sentence_end_without_a_following_space_waits_for_flush() -> None:
    s = ClauseSplitter()
    assert s.feed("All done.") == []
    assert s.flush() == ["All done."]


def test_pieces_are_stripped_and_concatenate_back_to_the_text() -> None:
    s = ClauseSplitter()
    text = "  First one.   Second one!\nThird, and a rather long clause that goes on, and on. Last bit "
    pieces = [p for _, p in stream(s, text)] + s.flush()
    assert all(p == p.strip() and p for p in pieces)
    assert " ".join(pieces).split() == text.split()


def test_closing_quotes_and_brackets_stay_with_their_sentence() -> None:
    s = ClauseSplitter()
    assert s.feed('He said "stop." Then (quietly.) We left') == ['He said "stop."', "Then (quietly.)"]
    assert s.flush() == ["We left"]


def test_several_end_marks_are_one_cut() -> None:
    s = ClauseSplitter()
    assert s.feed("Really?! Yes... ok") == ["Really?!", "Yes..."]


def test_decimals_are_not_cut() -> None:
    s = ClauseSplitter()
    text = "The room costs 3.5 thousand, or 2.75 per night. Version 1.2.3 is out. Done"
    pieces = [p for _, p in stream(s, text)]
    assert pieces == ["The room costs 3.5 thousand,", "or 2.75 per night.", "Version 1.2.3 is out."]
    assert s.flush() == ["Done"]


def test_decimal_split_across_tokens_is_not_cut() -> None:
    s = ClauseSplitter()
    for tok in ["It", " is", " 3", ".", "5", " degrees", " outside", "."]:
        assert s.feed(tok) == []
    assert s.flush() == ["It is 3.5 degrees outside."]


def test_first_clause_may_end_at_a_comma_once_long_enough() -> None:
    s = ClauseSplitter(first_min_chars=20)
    text = "Well, let me check the calendar for you, it will take a moment. Okay"
    got = [p for _, p in stream(s, text)]
    # "Well," is too short; the comma after 20+ characters cuts
    assert got == ["Well, let me check the calendar for you,", "it will take a moment."]


def test_first_clause_comma_boundary_is_first_min_chars() -> None:
    # the piece up to and including the comma must hold first_min_chars characters
    short = "a" * 18 + ", tail"      # 19 characters up to the comma
    exact = "a" * 19 + ", tail"      # 20 characters up to the comma
    assert ClauseSplitter(first_min_chars=20).feed(short) == []
    assert ClauseSplitter(first_min_chars=20).feed(exact) == ["a" * 19 + ","]


@pytest.mark.parametrize("mark", [",", ";", ":", "\u2014"])
def test_comma_like_breaks(mark: str) -> None:
    s = ClauseSplitter(first_min_chars=10)
    assert s.feed(f"Let me think about it{mark} sure") == [f"Let me think about it{mark}"]


def test_a_comma_needs_a_following_space() -> None:
    s = ClauseSplitter(first_min_chars=5)
    assert s.feed("It costs 1,000,000 dollars") == []
    assert s.feed(", really") == ["It costs 1,000,000 dollars,"]


def test_later_clauses_only_cut_at_commas_after_min_chars() -> None:
    s = ClauseSplitter(first_min_chars=10, min_chars=60)
    out = s.feed("Hello there friend, how are you. Then, a short clause, and more ")
    # first piece: the comma is past first_min_chars
    assert out == ["Hello there friend,", "how are you."]
    # second-and-later pieces need min_chars before a comma cut
    assert s.feed("and more words until we pass the limit, finally") == [
        "Then, a short clause, and more and more words until we pass the limit,"]
    assert s.flush() == ["finally"]


def test_sentence_end_wins_when_it_comes_first() -> None:
    s = ClauseSplitter(first_min_chars=5)
    assert s.feed("Yes. Of course, I can do that, ") == ["Yes."]   # later pieces need min_chars


def test_comma_wins_when_it_comes_first() -> None:
    s = ClauseSplitter(first_min_chars=5)
    assert s.feed("Okay then, yes. More") == ["Okay then,", "yes."]


def test_token_by_token_equals_all_at_once() -> None:
    text = ("Sure thing, I can book that table for two people tonight. It will be 7.30 at the corner, "
            "by the window; would that suit you? Great! See you then")
    whole = ClauseSplitter()
    pieces_whole = whole.feed(text) + whole.flush()
    streamed = ClauseSplitter()
    pieces_streamed = [p for _, p in stream(streamed, text)] + streamed.flush()
    assert pieces_streamed == pieces_whole
    assert len(pieces_whole) >= 4


def test_flush_on_empty_or_blank() -> None:
    s = ClauseSplitter()
    assert s.flush() == []
    assert s.feed("   ") == []
    assert s.flush() == []


# ------------------------------------------------------------------------------ truncate_words

def test_truncate_words_keeps_the_first_fraction() -> None:
    text = "one two three four five six seven eight nine ten"
    assert truncate_words(text, 0.5) == "one two three four five"
    assert truncate_words(text, 0.25) == "one two"          # floor: 2.5 words -> 2
    assert truncate_words(text, 0.99) == "one two three four five six seven eight nine"
    assert truncate_words(text, 0.0) == ""


def test_truncate_words_limits() -> None:
    text = "keep  this   exact spacing"
    assert truncate_words(text, 1.0) == text
    assert truncate_words(text, 1.5) == text
    assert truncate_words(text, -0.3) == ""
    assert truncate_words("", 0.5) == ""


def test_truncate_words_result_is_a_prefix_of_single_spaced_text() -> None:
    text = "Sure, I can help you with that booking tonight."
    for i in range(0, 11):
        part = truncate_words(text, i / 10)
        assert text.startswith(part)
