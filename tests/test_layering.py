"""Lower layers never import higher ones: a checked contract over every module of the package."""

from __future__ import annotations

import ast
from pathlib import Path

import cas

PACKAGE = Path(cas.__file__).parent

#: layer of every module, from the bottom; a module may import its own layer and those below
LAYERS: dict[str, int] = {}
for rank, modules in enumerate([
    ["errors", "arguments", "faults", "ids", "codec", "planes", "_plane_kernels",
     "sources"],  # bytes: pure functions over buffers (sources: reads of mapped files)
    ["backends"],  # dumb byte storage
    ["pack", "packcache", "store", "layout", "topology"],  # packs as bytes; the repository's objects over a backend
    ["index"],  # the LMDB cache
    ["manifest", "tree", "statedict", "staging", "reports", "filebytes"],  # the model
    ["reader", "saver", "fingerprints", "reach", "storeview", "verify", "gc", "check", "retention", "policy",
     "repository", "session", "replication", "regions", "tiering", "dr"],
    ["cli", "cli_dr", "serve", "importers", "files", "demo", "manager", "validation", "integrations",
     "__init__"],  # faces
]):
    for module in modules:
        LAYERS[module] = rank


def layer_of(dotted: str) -> int | None:
    parts = dotted.split(".")
    if parts[0] != "cas":
        return None
    return LAYERS.get(parts[1] if len(parts) > 1 else "__init__")


def imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append(node.module)
    return found


def test_every_module_has_a_layer() -> None:
    for path in PACKAGE.rglob("*.py"):
        name = path.relative_to(PACKAGE).parts[0].removesuffix(".py")
        assert name in LAYERS, f"cas/{path.relative_to(PACKAGE)} has no layer in tests/test_layering.py"


def test_no_module_imports_a_higher_layer() -> None:
    wrong = []
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE)
        own = LAYERS[rel.parts[0].removesuffix(".py")]
        for target in imports(path):
            rank = layer_of(target)
            if rank is not None and rank > own and target != "cas":
                wrong.append(f"cas/{rel} imports {target}")
    assert not wrong, "lower layers import higher ones:\n" + "\n".join(wrong)


def test_only_the_index_imports_lmdb_and_backends_import_no_engine() -> None:
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE)
        found = imports(path)
        if rel.parts[0] != "index.py":
            assert "lmdb" not in found, f"cas/{rel} imports lmdb"
        if rel.parts[0] == "backends":
            assert not {"torch", "numpy", "lmdb"} & set(found), f"cas/{rel}"
