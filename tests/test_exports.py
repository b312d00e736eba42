"""Public surface: every module under gateway/, carriers/ and pipeline/ that declares ``__all__`` exports
only names it defines or imports (and lists each once)."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("gateway", "carriers", "pipeline")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def declared_all(path: Path) -> list[str] | None:
    """The literal ``__all__`` of a module (None when it has none)."""
    for node in ast.parse(path.read_text(), str(path)).body:
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
            node, ast.AnnAssign) else []
        if any(isinstance(t, ast.Name) and t.id == "__all__" for t in targets):
            value = ast.literal_eval(node.value)
            assert isinstance(value, (list, tuple)), f"{path}: __all__ must be a list or tuple of names"
            return list(value)
    return None


def top_level_names(path: Path) -> set[str]:
    """Names bound at module level: defs, classes, assignments, imports (also inside if/try blocks)."""
    names: set[str] = set()

    def visit(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                for alias in node.names:
                    names.add(alias.asname or alias.name.split(".")[0])
            elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for target in targets:
                    for n in ast.walk(target):
                        if isinstance(n, ast.Name):
                            names.add(n.id)
            elif isinstance(node, ast.If):
                visit(node.body)
                visit(node.orelse)
            elif isinstance(node, ast.Try):
                visit(node.body)
                for handler in node.handlers:
                    visit(handler.body)
                visit(node.orelse)
                visit(node.finalbody)
            elif isinstance(node, (ast.With, ast.For)):
                visit(node.body)
    visit(ast.parse(path.read_text(), str(path)).body)
    return names


def modules_with_all() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py") if declared_all(p) is not None)


def test_there_are_modules_with_all() -> None:
    names = {module_name(p) for p in modules_with_all()}
    assert {"gateway.config", "pipeline.frames", "pipeline.playout", "carriers.base"} <= names


@pytest.mark.parametrize("path", modules_with_all(), ids=lambda p: module_name(p))
def test_all_names_are_defined_or_imported(path: Path) -> None:
    exported = declared_all(path)
    assert exported is not None
    assert all(isinstance(n, str) for n in exported)
    assert len(exported) == len(set(exported)), f"{module_name(path)}: duplicate names in __all__"
    missing = sorted(set(exported) - top_level_names(path))
    assert missing == [], f"{module_name(path)}.__all__ names what it does not define: {missing}"


@pytest.mark.parametrize("path", modules_with_all(), ids=lambda p: module_name(p))
def test_all_names_exist_at_runtime(path: Path) -> None:
    module = importlib.import_module(module_name(path))
    missing = [n for n in module.__all__ if not hasattr(module, n)]
    assert missing == []
    # `from module import *` works
    namespace: dict[str, object] = {}
    exec(f"from {module_name(path)} import *", namespace)
    assert set(module.__all__) <= set(namespace)
