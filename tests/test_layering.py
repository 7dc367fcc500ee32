"""The package's layering: the library never reaches up into the tools or the training loop."""

from __future__ import annotations

import ast
from pathlib import Path

import sakd

PACKAGE = Path(sakd.__file__).parent


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _library_modules() -> list[Path]:
    return [
        p for p in PACKAGE.rglob("*.py") if "tools" not in p.relative_to(PACKAGE).parts and p.name != "cli.py"
    ]


def test_no_library_module_imports_a_tool():
    offenders = {
        str(p.relative_to(PACKAGE)): sorted(n for n in _imports(p) if n.startswith("sakd.tools"))
        for p in _library_modules()
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_only_the_training_package_imports_the_loop():
    offenders = [
        str(p.relative_to(PACKAGE))
        for p in _library_modules()
        if "train" not in p.relative_to(PACKAGE).parts
        and any(n.startswith("sakd.train.loop") for n in _imports(p))
    ]
    assert offenders == []


def test_the_checker_sees_imports():
    # The two tests above pass vacuously if the import scan finds nothing; the command line does import both.
    names = _imports(PACKAGE / "cli.py")
    assert "sakd.train.loop" in names and any(n.startswith("sakd.tools") for n in names)
