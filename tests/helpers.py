"""Shared test helpers (bit-identical comparison, repository file snapshots, state dicts)."""

from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch


def repo_files(root: Path) -> dict[str, str]:
    """Every file of a repository and its hash, except LMDB's lock file and the flock file."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and rel != "index/lock.mdb" and not rel.startswith("locks/"):
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def tensor_bytes(t: torch.Tensor) -> bytes:
    """The raw bytes of ``t``'s elements in row-major order (0-dim and empty tensors included)."""
    t = t.detach().resolve_conj().resolve_neg()
    if t.numel() == 0:
        return b""
    # a fresh row-major copy: .contiguous() keeps odd strides of size-1 dims, which .view(uint8) rejects
    flat = torch.empty(t.shape, dtype=t.dtype).copy_(t).reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes()


def float_bits(x: float) -> bytes:
    return struct.pack("<d", x)


def assert_same(a: Any, b: Any, where: str = "<root>") -> None:
    """``b`` is a bit-identical copy of ``a``: same types all the way down, same bytes in every leaf."""
    assert type(a) is type(b), f"{where}: type {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype, f"{where}: dtype {a.dtype} != {b.dtype}"
        assert a.shape == b.shape, f"{where}: shape {tuple(a.shape)} != {tuple(b.shape)}"
        assert a.requires_grad == b.requires_grad, f"{where}: requires_grad differs"
        assert tensor_bytes(a) == tensor_bytes(b), f"{where}: tensor bytes differ"
    elif isinstance(a, np.ndarray):
        assert a.dtype.str == b.dtype.str, f"{where}: dtype {a.dtype.str} != {b.dtype.str}"
        assert a.shape == b.shape, f"{where}: shape {a.shape} != {b.shape}"
        assert a.tobytes() == b.tobytes(), f"{where}: array bytes differ"
    elif isinstance(a, np.generic):
        assert a.dtype.str == b.dtype.str, f"{where}: dtype {a.dtype.str} != {b.dtype.str}"
        assert a.tobytes() == b.tobytes(), f"{where}: scalar bytes differ"
    elif isinstance(a, float):
        assert float_bits(a) == float_bits(b), f"{where}: float {a!r} != {b!r} (bit pattern)"
    elif isinstance(a, complex):
        assert float_bits(a.real) + float_bits(a.imag) == float_bits(b.real) + float_bits(b.imag), (
            f"{where}: complex {a!r} != {b!r} (bit pattern)"
        )
    elif isinstance(a, dict):
        ka, kb = list(a), list(b)
        assert len(ka) == len(kb), f"{where}: keys {ka!r} != {kb!r}"
        for x, y in zip(ka, kb, strict=True):
            assert_same(x, y, f"{where}/key {x!r}")
            assert_same(a[x], b[y], f"{where}/{x}")
        if isinstance(a, OrderedDict):
            assert_same(getattr(a, "_metadata", None), getattr(b, "_metadata", None), f"{where}/_metadata")
    elif isinstance(a, (list, tuple)):  # torch.Size too
        assert len(a) == len(b), f"{where}: length {len(a)} != {len(b)}"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}/{i}")
    else:  # None, bool, int, str, bytes, bytearray, torch.dtype, torch.device
        assert a == b, f"{where}: {a!r} != {b!r}"


def raw_bytes(t: torch.Tensor) -> bytes:
    return tensor_bytes(t)


def make_state(seed: int = 0, n: int = 4, numel: int = 50_000) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    return {f"layer{i}.weight": torch.randn(numel, generator=g) for i in range(n)} | {"step": seed}


def pack_files(root: Path) -> list[Path]:
    """Every pack file of a local repository (data ``.pack`` and manifest ``.meta`` packs)."""
    from cas.pack import iter_pack_files

    return [p for _, p in iter_pack_files(root / "packs")]
