"""Import direction: the pure layers never import I/O libraries or the layers above them.

``schema/codes.py`` (stdlib only) <- ``domain`` <- ``schema`` <- ``projections`` <- ``gateway``,
``plugins_runtime`` <- ``ops``. Every import statement is found with ``ast``, including the
ones inside functions and ``TYPE_CHECKING`` blocks.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
IO_LIBRARIES = frozenset({"asyncio", "aiohttp", "psycopg", "redis", "aiocache", "opentelemetry"})
"""Top-level packages that do I/O or need an event loop."""
UPPER_LAYERS = frozenset({"gateway", "ops", "projections", "plugins_runtime"})
"""Packages that domain/ and schema/ must never depend on."""


def _modules(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def _imports(path: Path) -> list[tuple[int, str]]:
    """``(line, top-level module)`` of every absolute import in ``path``."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    out: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name.split(".")[0]) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.lineno, node.module.split(".")[0]))
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute | ast.Name)
            and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            out.append((node.lineno, node.args[0].value.split(".")[0]))
    return out


PURE_FILES = _modules("domain") + _modules("schema")


def test_pure_packages_exist() -> None:
    """The scan sees the modules it is meant to check."""
    names = {p.relative_to(ROOT).as_posix() for p in PURE_FILES}
    assert {"domain/ot.py", "domain/document.py", "schema/codes.py", "schema/frames.py"} <= names


@pytest.mark.parametrize("path", PURE_FILES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_pure_layers_import_no_io_library(path: Path) -> None:
    """domain/ and schema/ import none of asyncio, aiohttp, psycopg, redis, aiocache, otel."""
    bad = [
        f"{path.name}:{line} imports {mod}" for line, mod in _imports(path) if mod in IO_LIBRARIES
    ]
    assert not bad, bad


@pytest.mark.parametrize("path", PURE_FILES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_pure_layers_import_no_upper_layer(path: Path) -> None:
    """domain/ and schema/ never import gateway, ops, projections or plugins_runtime."""
    bad = [
        f"{path.name}:{line} imports {mod}" for line, mod in _imports(path) if mod in UPPER_LAYERS
    ]
    assert not bad, bad


@pytest.mark.parametrize("path", _modules("domain"), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_domain_imports_only_codes_from_schema(path: Path) -> None:
    """domain/ may use schema.codes (below it) but no other schema module (above it)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    bad = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "schema":
                bad += [a.name for a in node.names if a.name != "codes"]
            elif node.module.startswith("schema.") and node.module != "schema.codes":
                bad.append(node.module)
        elif isinstance(node, ast.Import):
            bad += [
                a.name
                for a in node.names
                if a.name.startswith("schema") and a.name != "schema.codes"
            ]
    assert not bad, f"{path.name} imports {bad}"


def test_codes_imports_only_the_stdlib() -> None:
    """schema/codes.py depends on nothing but the standard library (every layer imports it)."""
    found = _imports(ROOT / "schema" / "codes.py")
    assert found, "the scan found no imports at all"
    bad = [(line, mod) for line, mod in found if mod not in sys.stdlib_module_names]
    assert not bad, bad
    tree = ast.parse((ROOT / "schema" / "codes.py").read_text(encoding="utf-8"))
    relative = [n.lineno for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level]
    assert not relative, f"relative imports at lines {relative}"


def test_scanner_catches_imports_anywhere(tmp_path: Path) -> None:
    """The scan finds imports in functions, try blocks and TYPE_CHECKING blocks."""
    sample = tmp_path / "sample.py"
    sample.write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    import redis.asyncio\n"
        "def f():\n    from aiohttp import web\n"
        "try:\n    import psycopg\nexcept ImportError:\n    pass\n"
        "import importlib\nimportlib.import_module('opentelemetry.trace')\n"
        "from . import sibling\n"
    )
    mods = {mod for _, mod in _imports(sample)}
    assert {"redis", "aiohttp", "psycopg", "opentelemetry", "typing", "importlib"} <= mods
