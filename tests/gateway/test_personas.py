"""Tests for gateway.personas: resolution order, number normalisation, the default entry, reload on
change without a restart, and malformed files."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import pytest

from gateway.personas import PersonaBook, PersonaError
from pipeline.conversation import Persona

BOOK = {
    "personas": {
        "concierge": {"system": "You are Aria, a hotel concierge.", "greeting": "Hotel Aria, how can I help?",
                      "voice": "nova", "language": "en"},
        "support": {"system": "You are a support agent."},
        "frontdesk": {"system": "You are the front desk.", "greeting": "Front desk.", "language": "fr"},
    },
    "numbers": {"+1 (415) 555-0100": "concierge", "14155550199": "support", "default": "frontdesk"},
}


def write(path: Path, data: Any, *, bump: float = 0.0) -> Path:
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    if bump:
        st = os.stat(path)
        os.utime(path, (st.st_atime + bump, st.st_mtime + bump))
    return path


@pytest.fixture
def book_file(tmp_path: Path) -> Path:
    return write(tmp_path / "personas.json", BOOK)


# ------------------------------------------------------------------------------ resolution

def test_dialed_number_selects_the_persona(book_file: Path) -> None:
    book = PersonaBook(book_file)
    p = book.resolve(to="+14155550100")
    assert p == Persona(name="concierge", system="You are Aria, a hotel concierge.",
                        greeting="Hotel Aria, how can I help?", voice="nova", language="en")


@pytest.mark.parametrize("to", ["+14155550100", "14155550100", "+1 415 555 0100", "+1 (415) 555-0100",
                                "tel:+1-415-555-0100"])
def test_numbers_are_normalised_on_both_sides(book_file: Path, to: str) -> None:
    assert PersonaBook(book_file).resolve(to=to).name == "concierge"


def test_persona_optional_fields_default_when_missing(book_file: Path) -> None:
    p = PersonaBook(book_file).resolve(to="+14155550199")
    assert p.name == "support" and p.system == "You are a support agent."
    assert p.voice is None and p.language == "en"


def test_persona_without_a_greeting_gets_the_default_greeting(book_file: Path) -> None:
    p = PersonaBook(book_file).resolve(to="+14155550199")
    assert isinstance(p.greeting, str)
    assert p.greeting == Persona().greeting


def test_unknown_number_uses_the_default_entry(book_file: Path) -> None:
    book = PersonaBook(book_file)
    assert book.resolve(to="+442071234567").name == "frontdesk"
    assert book.resolve().name == "frontdesk"
    assert book.resolve(to="").language == "fr"


def test_persona_name_beats_the_dialed_number(book_file: Path) -> None:
    book = PersonaBook(book_file)
    assert book.resolve(to="+14155550100", parameters={"persona": "support"}).name == "support"
    assert book.resolve(to="+14155550100", name="frontdesk").name == "frontdesk"
    # the explicit argument beats the custom parameter
    assert book.resolve(name="frontdesk", parameters={"persona": "support"}).name == "frontdesk"


def test_persona_parameter_may_be_a_number(book_file: Path) -> None:
    book = PersonaBook(book_file)
    assert book.resolve(to="+14155550100", parameters={"persona": "+1 415-555-0199"}).name == "support"


def test_unknown_persona_name_falls_back_to_the_number(book_file: Path) -> None:
    book = PersonaBook(book_file)
    assert book.resolve(to="+14155550100", parameters={"persona": "pirate"}).name == "concierge"
    assert book.resolve(parameters={"persona": "pirate"}).name == "frontdesk"


def test_context_system_message_beats_everything(book_file: Path) -> None:
    book = PersonaBook(book_file)
    context = [{"role": "system", "content": "You are a pizza bot."}, {"role": "user", "content": "hi"}]
    p = book.resolve(to="+14155550100", parameters={"persona": "frontdesk"}, context=context)
    assert p.system == "You are a pizza bot." and p.name == "context"
    # the rest comes from the persona the call would otherwise have had
    assert (p.greeting, p.voice, p.language) == ("Front desk.", None, "fr")
    q = book.resolve(to="+14155550100", context=context)
    assert q.system == "You are a pizza bot." and q.greeting == "Hotel Aria, how can I help?" and q.voice == "nova"


def test_context_without_a_system_message_is_ignored(book_file: Path) -> None:
    p = PersonaBook(book_file).resolve(to="+14155550100", context=[{"role": "user", "content": "hi"}])
    assert p.name == "concierge"


def test_parameters_override_greeting_voice_and_language(book_file: Path) -> None:
    p = PersonaBook(book_file).resolve(to="+14155550100", parameters={"greeting": "Yo.", "voice": "echo",
                                                                      "language": "de", "other": "x"})
    assert (p.name, p.system, p.greeting, p.voice, p.language) == \
        ("concierge", "You are Aria, a hotel concierge.", "Yo.", "echo", "de")


def test_without_a_file_the_built_in_default_is_used() -> None:
    book = PersonaBook(None)
    assert book.resolve(to="+14155550100") == Persona()
    assert book.names() == []
    custom = Persona(name="house", system="You are the house agent.")
    assert PersonaBook(None, default=custom).resolve(parameters={"persona": "x"}) == custom


def test_without_a_default_entry_a_persona_named_default_is_used(tmp_path: Path) -> None:
    path = write(tmp_path / "p.json", {"personas": {"default": {"system": "House."}, "vip": {"system": "VIP."}},
                                       "numbers": {"+15550001": "vip"}})
    book = PersonaBook(path)
    assert book.resolve(to="+15550001").name == "vip"
    assert book.resolve(to="+15550002").system == "House."


def test_without_any_default_the_built_in_one_is_used(tmp_path: Path) -> None:
    path = write(tmp_path / "p.json", {"personas": {"vip": {"system": "VIP."}}, "numbers": {"+15550001": "vip"}})
    book = PersonaBook(path)
    assert book.resolve(to="+15550002") == Persona()


def test_names_are_sorted(book_file: Path) -> None:
    assert PersonaBook(book_file).names() == ["concierge", "frontdesk", "support"]


# ------------------------------------------------------------------------------ reload

def test_a_changed_file_is_reloaded_without_a_restart(book_file: Path) -> None:
    book = PersonaBook(book_file)
    assert book.resolve(to="+14155550100").greeting == "Hotel Aria, how can I help?"
    changed = json.loads(json.dumps(BOOK))
    changed["personas"]["concierge"]["greeting"] = "Welcome to Hotel Aria."
    changed["personas"]["spa"] = {"system": "You book spa treatments."}
    changed["numbers"]["+1 415 555 0123"] = "spa"
    write(book_file, changed, bump=10)
    assert book.resolve(to="+14155550100").greeting == "Welcome to Hotel Aria."
    assert book.resolve(to="+14155550123").name == "spa"
    assert "spa" in book.names()


def test_a_broken_rewrite_keeps_the_last_good_file(book_file: Path, caplog: pytest.LogCaptureFixture) -> None:
    book = PersonaBook(book_file)
    with caplog.at_level(logging.ERROR, logger="gateway.personas"):
        write(book_file, "{ this is not json", bump=10)
        assert book.resolve(to="+14155550100").name == "concierge"
        assert book.names() == ["concierge", "frontdesk", "support"]
    assert any("not reloaded" in r.getMessage() for r in caplog.records)
    # a semantically broken file is refused too
    write(book_file, {"personas": {}, "numbers": {"+14155550100": "ghost"}}, bump=20)
    assert book.resolve(to="+14155550100").name == "concierge"
    # and a fixed file is picked up again
    fixed = {"personas": {"solo": {"system": "Solo."}}, "numbers": {"default": "solo"}}
    write(book_file, fixed, bump=30)
    assert book.resolve(to="+14155550100").name == "solo"


def test_a_deleted_file_keeps_the_last_good_one(book_file: Path) -> None:
    book = PersonaBook(book_file)
    book_file.unlink()
    assert book.resolve(to="+14155550100").name == "concierge"


# ------------------------------------------------------------------------------ malformed at startup

@pytest.mark.parametrize(("data", "fragment"), [
    ("{not json", "not valid JSON"),
    ([], "expected an object"),
    ({"personas": []}, "expected an object"),
    ({"personas": {"a": "just a string"}}, "'a'"),
    ({"personas": {"a": {"greeting": "Hi"}}}, "'a' needs a 'system'"),
    ({"personas": {"a": {"system": 5}}}, "'a' needs a 'system'"),
    ({"personas": {"a": {"system": "x", "temperature": 0.2}}}, "temperature"),
    ({"personas": {"a": {"system": "x"}}, "numbers": {"+15550001": "b"}}, "unknown persona 'b'"),
    ({"personas": {"a": {"system": "x"}}, "numbers": {"default": "b"}}, "unknown persona 'b'"),
])
def test_malformed_file_at_startup_raises(tmp_path: Path, data: Any, fragment: str) -> None:
    path = write(tmp_path / "bad.json", data)
    with pytest.raises(PersonaError) as info:
        PersonaBook(path)
    assert fragment in str(info.value)
    assert "bad.json" in str(info.value)


def test_missing_file_at_startup_raises(tmp_path: Path) -> None:
    with pytest.raises(PersonaError, match="does not exist"):
        PersonaBook(tmp_path / "absent.json")


def test_numbers_that_are_not_an_object_are_a_persona_error(book_file: Path) -> None:
    bad = {"personas": {"a": {"system": "x"}}, "numbers": ["+15550001"]}
    book = PersonaBook(book_file)
    write(book_file, bad, bump=10)
    assert book.resolve(to="+14155550100").name == "concierge"     # keeps the last good file
    with pytest.raises(PersonaError):
        PersonaBook(write(book_file.parent / "bad.json", bad))


def test_persona_fields_must_be_strings(tmp_path: Path) -> None:
    with pytest.raises(PersonaError, match="greeting"):
        PersonaBook(write(tmp_path / "p.json", {"personas": {"a": {"system": "x", "greeting": 5}}}))
