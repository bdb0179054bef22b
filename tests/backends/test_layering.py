"""Backends are the bottom layer: they import no repository code, torch, lmdb or numpy."""

from __future__ import annotations

import ast
from pathlib import Path

import cas.backends

BACKENDS = Path(cas.backends.__file__).parent
FORBIDDEN_TOP = {"torch", "lmdb", "numpy", "numba", "safetensors"}


def imported_modules(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    out: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against cas.backends
                base = "cas.backends" if node.level == 1 else "cas"
                out.append((node.lineno, f"{base}.{node.module}" if node.module else base))
            elif node.module:
                out.append((node.lineno, node.module))
                if node.module == "cas":
                    out += [(node.lineno, f"cas.{a.name}") for a in node.names]
    return out


def test_backends_import_only_stdlib_errors_and_backends() -> None:
    modules = sorted(BACKENDS.glob("*.py"))
    assert {p.name for p in modules} >= {"__init__.py", "base.py", "local.py", "memory.py", "retry.py", "s3.py"}
    bad = []
    for path in modules:
        for line, mod in imported_modules(path):
            top = mod.split(".")[0]
            if top in FORBIDDEN_TOP:
                bad.append(f"{path.name}:{line} imports {mod}")
            elif top == "cas" and mod != "cas.errors" and not mod.startswith("cas.backends"):
                bad.append(f"{path.name}:{line} imports {mod}")  # also a bare "import cas"
    assert bad == []


def test_the_checker_catches_violations(tmp_path: Path) -> None:
    p = tmp_path / "x.py"
    p.write_text("import torch\nfrom cas.index import Index\nfrom cas import repository\nif True:\n    import numpy\n")
    mods = [m for _, m in imported_modules(p)]
    assert mods == ["torch", "cas.index", "cas", "cas.repository", "numpy"]
