"""The state dicts of the golden version-1 repository under tests/golden/v1 (deterministic).

``python -m tests.golden_states OUT`` writes the repository anew (only when the format changes
on purpose: the golden one is what every future version must still open, load and verify).
"""

from __future__ import annotations

import shutil
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch

GOLDEN = Path(__file__).parent / "golden" / "v1"


def golden_states() -> list[tuple[str, dict[str, Any]]]:
    g = torch.Generator().manual_seed(2026)
    emb = torch.randn(256, 64, generator=g)
    w = torch.randn(32_768, generator=g)
    base: dict[str, Any] = {
        "model": OrderedDict(emb=emb, w=w, bf16=w[:8192].to(torch.bfloat16), half=w[:4096].half(),
                             i8=torch.arange(-128, 128, dtype=torch.int8), flag=torch.tensor(True)),
        "tied": {"a": emb, "b": emb},  # one storage, shared
        "np": np.arange(12, dtype=np.float64).reshape(3, 4),
        "meta": {"step": 0, "name": "golden", "lr": 3e-4, "big": 2**70, "blob": b"\x00\x01" * 10, "none": None,
                 "tup": (1, 2.5, "x")},
    }
    out = [("s0", base)]
    for step in (1, 2, 3):
        emb2 = out[-1][1]["model"]["emb"].clone()
        emb2[[step, 100 + step]] += 0.5  # sparse: a few rows
        w2 = out[-1][1]["model"]["w"] + 1e-3 * torch.randn(32_768, generator=g)  # dense: every element
        model = OrderedDict(out[-1][1]["model"])
        model["emb"], model["w"] = emb2, w2
        state = {**out[-1][1], "model": model, "tied": {"a": emb2, "b": emb2},
                 "meta": {**out[-1][1]["meta"], "step": step}}
        out.append((f"s{step}", state))
    return out


def write(target: Path) -> None:
    import cas

    if target.exists():
        shutil.rmtree(target)
    with cas.Repository.init(target, chunk_size=16 * 1024, pack_size=256 * 1024) as repo:
        for tag, state in golden_states():
            repo.save(state, tag=tag, metadata={"step": state["meta"]["step"]})
    for leftover in ("index", "tmp", "locks", ".cas-backend"):
        shutil.rmtree(target / leftover, ignore_errors=True)


if __name__ == "__main__":
    write(Path(sys.argv[1]) if len(sys.argv) > 1 else GOLDEN)
