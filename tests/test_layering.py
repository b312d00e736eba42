"""Layering: the pipeline and the carriers never import the gateway (the gateway composes them)."""

from __future__ import annotations

import ast
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
