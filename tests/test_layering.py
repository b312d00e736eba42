"""Layering: the pipeline and the carriers never import the gateway (the gateway composes them)."""

from __future__ import annotations

import ast
import io
import re
import tokenize
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LOWER_LAYERS = ("pipeline", "carriers")


def gateway_imports(source: str, filename: str) -> list[tuple[int, str]]:
    """(line, statement) of every import of ``gateway`` anywhere in the module, including inside
    functions, ``if TYPE_CHECKING:`` blocks and ``importlib.import_module("gateway...")`` calls."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "gateway" or alias.name.startswith("gateway."):
                    found.append((node.lineno, f"import {alias.name}"))
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level == 0 and (module == "gateway" or module.startswith("gateway.")):
                found.append((node.lineno, f"from {module} import ..."))
        elif isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
            if name in ("import_module", "__import__") and node.args:
                arg = node.args[0]
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str) and \
                        (arg.value == "gateway" or arg.value.startswith("gateway.")):
                    found.append((node.lineno, f"{name}({arg.value!r})"))
    return found


def lower_layer_files() -> list[Path]:
    return sorted(p for layer in LOWER_LAYERS for p in (ROOT / layer).rglob("*.py"))


def test_the_layers_exist() -> None:
    files = lower_layer_files()
    assert any(p.parent.name == "pipeline" for p in files)
    assert any(p.parent.name == "carriers" for p in files)
    assert len(files) >= 8


@pytest.mark.parametrize("path", lower_layer_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_gateway_imports(path: Path) -> None:
    found = gateway_imports(path.read_text(), str(path))
    assert found == [], f"{path.relative_to(ROOT)} imports the gateway: {found}"


@pytest.mark.parametrize("source", [
    "import gateway",
    "import gateway.config as c",
    "from gateway import config",
    "from gateway.sessions import Session",
    "def f():\n    from gateway.app import create_app\n",
    "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from gateway.call import Call\n",
    "import importlib\nimportlib.import_module('gateway.metrics')\n",
])
def test_the_checker_catches_every_form(source: str) -> None:
    assert gateway_imports(source, "<test>")


@pytest.mark.parametrize("source", [
    "import gateways", "from pipeline.gateway import x", "from . import gateway", "x = 'gateway'",
])
def test_the_checker_ignores_lookalikes(source: str) -> None:
    assert gateway_imports(source, "<test>") == []


# ------------------------------------------------------------------------------------------ no cycles
def package_imports(source: str, module: str, known: set[str]) -> set[str]:
    """The modules of ``known`` that ``module`` imports at run time (anywhere: in functions too, since a
    function-level import is how a cycle hides), leaving out ``if TYPE_CHECKING:`` blocks."""
    tree = ast.parse(source)
    typing_only = {id(n) for node in ast.walk(tree)
                   if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
                   for n in ast.walk(node)}
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            for alias in node.names:
                child = f"{node.module}.{alias.name}"
                found.add(child if child in known else node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {m for m in found if m in known and m != module}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while (w := stack.pop()) != v:
                component.append(w)
            component.append(v)
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def module_graph(package: str) -> dict[str, set[str]]:
    paths = {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p
             for p in (ROOT / package).rglob("*.py")}
    known = set(paths)
    return {m: package_imports(p.read_text(), m, known) for m, p in paths.items()}


@pytest.mark.parametrize("package", ["gateway", "pipeline", "carriers"])
def test_no_import_cycles(package: str) -> None:
    assert cycles(module_graph(package)) == []


def test_the_cycle_finder_finds_a_hidden_cycle() -> None:
    known = {"gateway.a", "gateway.b", "gateway.c"}
    graph = {"gateway.a": package_imports("from gateway.b import x", "gateway.a", known),
             "gateway.b": package_imports("def f():\n    from gateway import c\n", "gateway.b", known),
             "gateway.c": package_imports("import gateway.a\nfrom typing import TYPE_CHECKING\n"
                                          "if TYPE_CHECKING:\n    from gateway.b import y\n", "gateway.c", known)}
    assert graph["gateway.c"] == {"gateway.a"}
    assert cycles(graph) == [["gateway.a", "gateway.b", "gateway.c"]]


def test_the_server_never_imports_the_simulator() -> None:
    """The emulator is a tool package (``voxray simulate``): nothing the server runs reaches it."""
    graph = module_graph("gateway")
    reachable: set[str] = set()
    todo = ["gateway.app", "gateway.server"]
    while todo:
        m = todo.pop()
        if m not in reachable:
            reachable.add(m)
            todo.extend(graph.get(m, ()))
    assert len(reachable) > 10 and not {m for m in reachable if m.startswith("gateway.simulate.call")}


# ------------------------------------------------------------------------------- suppressions carry reasons
SUPPRESSED_DIRS = ("gateway", "pipeline", "carriers", "twiml", "bench", "tests")
# the markers are assembled so that this module's own source never holds them literally
_NOQA, _IGNORE = "# " + "noqa", "type" + ": ignore"
_REASONED = re.compile(
    "|".join((re.escape(_NOQA) + r": [A-Z]+[0-9]+(?:, ?[A-Z]+[0-9]+)* +(?:[-–]|#) *\S",
              re.escape(_IGNORE) + r"\[[a-z0-9-]+(?:, ?[a-z0-9-]+)*\] +[-#] *\S")))


def unexplained_suppressions(source: str) -> list[tuple[int, str]]:
    """(line, text) of each suppression comment (ruff's noqa, mypy's ignore) without an error code and a reason."""
    found = []
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type != tokenize.COMMENT:
            continue
        text = token.string
        if (_NOQA in text.lower() or _IGNORE in text) and not _REASONED.search(text):
            found.append((token.start[0], text))
    return found


def suppression_files() -> list[Path]:
    return sorted(p for d in SUPPRESSED_DIRS for p in (ROOT / d).rglob("*.py") if "node_modules" not in p.parts)


def test_every_suppression_names_its_code_and_reason() -> None:
    files = suppression_files()
    assert len(files) > 50
    bad = [f"{p.relative_to(ROOT)}:{line}: {text}" for p in files
           for line, text in unexplained_suppressions(p.read_text())]
    assert bad == [], "a suppression comment without a code and a reason:\n" + "\n".join(bad)


@pytest.mark.parametrize("comment", [
    _NOQA, f"{_NOQA}: E402", f"{_NOQA}: BLE001 -", f"{_NOQA}: BLE001 because", f"{_NOQA.upper()}: E402",
    f"# {_IGNORE}", f"# {_IGNORE}[arg-type]", f"# {_IGNORE}[arg-type]  #", f"# {_IGNORE}  # no code",
])
def test_the_suppression_checker_catches_bare_ones(comment: str) -> None:
    assert unexplained_suppressions(f"x = 1  {comment}\n")


@pytest.mark.parametrize("line", [
    f"x = 1  {_NOQA}: BLE001 - any failure means not ready\n",
    f"x = 1  {_NOQA}: BLE001, S110 - the socket may already be gone\n",
    f"x = 1  {_NOQA}: S104  # a server's default\n",
    f"x = 1  # {_IGNORE}[assignment]  # load() sets it\n",
    f"x = 1  # {_IGNORE}[arg-type, misc] - a wrong type on purpose\n",
    f"x = '{_NOQA}'  # a string, not a comment\n",
])
def test_the_suppression_checker_accepts_reasoned_ones(line: str) -> None:
    assert unexplained_suppressions(line) == []
