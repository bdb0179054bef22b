"""Shared test helpers (bit-identical comparison, repository file snapshots, state dicts)."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Any

import torch


def repo_files(root: Path) -> dict[str, str]:
    """Every file of a repository and its hash, except LMDB's lock file and the flock file."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and rel != "index/lock.mdb" and not rel.startswith("locks/"):
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def raw_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().contiguous().reshape(-1)
    return t.view(torch.uint8).numpy().tobytes() if t.numel() else b""


def assert_same(a: Any, b: Any, path: str = "") -> None:
    """Bit-identical comparison of nested state dicts (types, keys in order, tensor bytes)."""
    assert type(a) is type(b), f"{path}: {type(a)} != {type(b)}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, f"{path}: {a.dtype}{a.shape} != {b.dtype}{b.shape}"
        assert raw_bytes(a) == raw_bytes(b), f"{path}: bytes differ"
    elif isinstance(a, dict):
        assert list(a) == list(b), f"{path}: keys differ"
        for k in a:
            assert_same(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{path}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{path}/{i}")
    elif isinstance(a, float):
        assert a == b or (math.isnan(a) and math.isnan(b)), f"{path}: {a} != {b}"
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def make_state(seed: int = 0, n: int = 4, numel: int = 50_000) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    return {f"layer{i}.weight": torch.randn(numel, generator=g) for i in range(n)} | {"step": seed}
