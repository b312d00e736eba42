"""The README documents every configuration key and every route the app serves."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from starlette.routing import Mount

from gateway.app import create_app
from gateway.config import Config, RecordingConfig, TranscriptsConfig

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def _documented(name: str) -> bool:
    return re.search(rf"`(?:[a-z_]+\.)?{re.escape(name)}`", README) is not None


def test_every_config_key_is_in_the_readme() -> None:
    sections = {"carriers", "recording", "transcripts"}        # documented key by key (carriers.<name>.<key>)
    keys = [f.name for f in dataclasses.fields(Config) if not f.metadata.get("derived") and f.name not in sections]
    keys += [f.name for f in dataclasses.fields(RecordingConfig)] + [f.name for f in dataclasses.fields(TranscriptsConfig)]
    missing = sorted({k for k in keys if not _documented(k)})
    assert missing == [], f"README.md's configuration table lacks {missing}"


def test_every_route_is_in_the_readme() -> None:
    app = create_app(Config.from_mapping({}))
    paths = {route.path for route in app.routes if not isinstance(route, Mount)}
    missing = sorted(p for p in paths if p not in README and p.replace("{session_id}", "{id}") not in README)
    assert missing == [], f"README.md's routes table lacks {missing}"
