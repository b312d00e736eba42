"""The README documents every configuration key and every route the app serves; the documentation
stays inside the repository (``docs/carriers.md`` is the carrier reference the code cites by section)."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from starlette.routing import Mount

from carriers import CARRIERS
from gateway.app import create_app
from gateway.config import Config, RecordingConfig, TranscriptsConfig

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
CARRIERS_DOC = ROOT / "docs" / "carriers.md"
_SKIP_DIRS = {".git", ".venv", "venv", "node_modules", "__pycache__", ".mypy_cache", ".pytest_cache", ".ruff_cache"}


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


def _doc_files() -> list[Path]:
    """README.md and every text file under docs/."""
    files = [ROOT / "README.md"]
    for path in sorted((ROOT / "docs").rglob("*")):
        if path.is_file() and path.suffix in (".md", ".txt", ".rst", ".html"):
            files.append(path)
    return files


def _source_files() -> list[Path]:
    """The repository's Python and Markdown files (virtualenvs, caches and node_modules excluded)."""
    out = []
    for path in ROOT.rglob("*"):
        if path.suffix in (".py", ".md") and path.is_file() and not _SKIP_DIRS & set(path.relative_to(ROOT).parts):
            out.append(path)
    return sorted(out)


def test_docs_stay_inside_the_repository() -> None:
    """No link to (or mention of) the shared reference outside the repository; relative links resolve."""
    offenders = []
    for path in _doc_files():
        text = path.read_text(encoding="utf-8")
        for number, line in enumerate(text.splitlines(), 1):
            if re.search(r"\.\./shared|/shared/docs", line):
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()[:100]}")
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:|#", target):          # http(s):, mailto:, in-page anchors
                continue
            resolved = (path.parent / target.split("#", 1)[0]).resolve()
            if not resolved.is_relative_to(ROOT) or not resolved.exists():
                offenders.append(f"{path.relative_to(ROOT)}: link to {target} leaves the repository or is missing")
    assert offenders == [], "documentation must only reference files in the repository:\n" + "\n".join(offenders)


def test_carrier_switches_named_in_the_docs_exist() -> None:
    """Every ``carriers.<name>.<key>`` in README.md and docs/ is a keyword of that carrier's constructor."""
    options = {name: set(spec.options()) for name, spec in CARRIERS.items()}
    named = 0
    unknown = []
    for path in _doc_files():
        for name, key in re.findall(r"\bcarriers\.([a-z]+)\.([a-z_][a-z0-9_]*)", path.read_text(encoding="utf-8")):
            if name == "md":                             # "carriers.md." at the end of a sentence
                continue
            named += 1
            if name not in options:
                unknown.append(f"{path.relative_to(ROOT)}: carriers.{name}.{key} (no carrier '{name}')")
            elif key not in options[name]:
                unknown.append(f"{path.relative_to(ROOT)}: carriers.{name}.{key} (settings: {sorted(options[name])})")
    assert named > 50, "docs/carriers.md should name the carriers' settings"
    assert unknown == [], "switches named in the docs that the adapters do not have:\n" + "\n".join(unknown)


def _sections() -> set[str]:
    return set(re.findall(r"^#{2,4}\s+(\d+(?:\.\d+)?)\.?\s", CARRIERS_DOC.read_text(encoding="utf-8"), re.M))


def test_carrier_reference_has_the_sections_the_code_cites() -> None:
    """Every ``§N`` / ``§N.M`` a carrier module, dialect, carrier test or fake cites (or any file that
    names carriers.md) is a heading of docs/carriers.md; citations of the design document are not ours."""
    sections = _sections()
    assert {"2", "3", "4", "5", "6", "8", "9"} <= sections and {f"9.{i}" for i in range(1, 7)} <= sections
    carrier_dirs = {("carriers",), ("gateway", "dialects"), ("tests", "carriers"), ("tests", "fakes")}
    missing = []
    cited = 0
    for path in _source_files():
        relative = path.relative_to(ROOT)
        text = path.read_text(encoding="utf-8")
        if tuple(relative.parts[:1]) not in carrier_dirs and tuple(relative.parts[:2]) not in carrier_dirs \
                and "carriers.md" not in text:
            continue
        for number, line in enumerate(text.splitlines(), 1):
            for match in re.finditer(r"§\s?(\d+(?:\.\d+)?)", line):
                if "design" in line[max(0, match.start() - 40):match.start()].lower():
                    continue
                cited += 1
                if match[1] not in sections:
                    missing.append(f"{relative}:{number}: §{match[1]}")
    assert cited > 20
    assert missing == [], "sections cited but not in docs/carriers.md:\n" + "\n".join(missing)


# ------------------------------------------------------------------------------------------- providers

PROVIDERS_DOC = ROOT / "docs" / "providers.md"


def _provider_rows() -> dict[str, list[str]]:
    """docs/providers.md's table: provider name -> its cells."""
    rows = {}
    for line in PROVIDERS_DOC.read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| `") and len(cells) == 8:
            rows[re.match(r"`([^`]+)`", cells[0])[1]] = cells
    return rows


def test_the_provider_table_matches_the_registry() -> None:
    """Every registered provider has a row with its stages, key and base-URL variables, defaults and
    aliases; no row names a provider the registry does not have."""
    from pipeline.providers import PROVIDERS

    rows = _provider_rows()
    assert sorted(rows) == sorted(PROVIDERS), "docs/providers.md's rows differ from the registry's providers"
    for name, spec in PROVIDERS.items():
        provider, stages, keys, base_env, base, models, voice, _options = rows[name]
        assert set(re.findall(r"`([^`]+)`", provider)) == {name, *spec.aliases}, name
        assert set(stages.replace(",", " ").split()) == spec.stages, name
        assert re.findall(r"`([^`]+)`", keys) == list(spec.key_envs), name
        assert re.findall(r"`([^`]+)`", base_env) == ([spec.base_url_env] if spec.base_url_env else []), name
        assert re.findall(r"`([^`]+)`", base) == ([spec.default_base_url] if spec.default_base_url else []), name
        assert dict(re.findall(r"(\w+): `([^`]+)`", models)) == dict(spec.default_models), name
        assert re.findall(r"`([^`]+)`", voice) == ([spec.default_voice] if spec.default_voice else []), name


def _option_rows() -> set[tuple[str, str, str, str]]:
    """docs/providers.md's options table: (provider, option, type, default) per row."""
    section = PROVIDERS_DOC.read_text(encoding="utf-8").split("## Provider options", 1)[1].split("\n## ", 1)[0]
    rows = set()
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| `") and len(cells) == 5:
            rows.add((cells[0].strip("`"), cells[1].strip("`"), cells[2], cells[3]))
    return rows


def _shown(default: object) -> str:
    if default is None:
        return "unset"
    return f"`{str(default).lower() if isinstance(default, bool) else default}`" if default != "" else '`""`'


def test_the_provider_options_table_matches_what_the_providers_declare() -> None:
    """Every ``provider_options.<name>.<key>`` a provider module declares has a row with its type and default,
    and every row is declared; the main table's options column names each of them."""
    from pipeline.providers import PROVIDERS

    declared = {(name, o.key, o.type.__name__, _shown(o.default))
                for name, spec in PROVIDERS.items() for o in spec.provider_options}
    assert len(declared) >= 10
    assert _option_rows() == declared
    rows = _provider_rows()
    for name, spec in PROVIDERS.items():
        named = set(re.findall(r"`(\w+)`", rows[name][7]))
        missing = {o.key for o in spec.provider_options} - named - ({"stability", "similarity_boost", "style",
                                                                      "use_speaker_boost", "speed"}
                                                                     if name == "elevenlabs" else set())
        assert not missing, f"docs/providers.md's {name} row does not name its options {missing}"


def test_contributing_names_files_and_interfaces_that_exist() -> None:
    """CONTRIBUTING.md's four steps point at real files, and the names it uses are real interfaces."""
    import pipeline.providers as registry
    import pipeline.providers._http as http
    import pipeline.providers.base as base

    text = (ROOT / "CONTRIBUTING.md").read_text(encoding="utf-8")
    paths = set(re.findall(r"`((?:pipeline|tests|docs|gateway)/[\w/.]+\.(?:py|md))`", text))
    assert len(paths) >= 8 and sorted(p for p in paths if not (ROOT / p).exists()) == []
    for name in ("STTProvider", "LLMProvider", "TTSProvider", "ProviderSpec", "ProviderSettings", "BuildOptions",
                 "ProviderError", "ToolCall"):
        assert name in text and hasattr(base, name), name
    for name in ("HTTPClient", "provider_errors", "raise_for_status", "sse_events"):
        assert name in text and hasattr(http, name), name
    assert "PROVIDERS" in text and hasattr(registry, "PROVIDERS")
    assert {"stream", "synthesize", "transcribe", "retry_after", "transient"} <= set(re.findall(r"\w+", text))
    fields = {f for f in base.ProviderSpec.__dataclass_fields__}
    assert set(re.findall(r"`(\w+)`", text.split("**Register it in that module**")[1].split("3.")[0])) & fields >= \
        {"key_env", "base_url_env", "default_base_url", "default_models", "default_voice", "aliases", "options"}
