"""Cost of one index look-up (``ChunkLookup.get``), the call a save makes once per piece of its state
dict, on a repository this script makes (a few hundred chunks).

    .venv/bin/python bench/experiments/index_lookup.py

Measured 3.25 µs before commit f7f2320 and 1.6-2.0 µs after it (bench/experiments/README.md, 2026-12-04).
"""

from __future__ import annotations

import tempfile
import timeit
from pathlib import Path

import torch

import cas


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        g = torch.Generator().manual_seed(0)
        state = {f"t{i}": torch.randn(16 * 1024, generator=g) for i in range(600)}  # 64 KiB each: a chunk each
        with cas.Repository.init(Path(tmp) / "r", chunk_size=64 * 1024, compression="none") as repo:
            repo.save(state, tag="s")
            keys = [bytes(cid) for cid, _loc in repo.index.iter_chunks()]
            lookup = repo.index.reader()
            try:
                def run() -> None:
                    for key in keys:
                        lookup.get(key)

                best = min(timeit.repeat(run, number=1, repeat=20))
            finally:
                lookup.close()
        print(f"ChunkLookup.get: {best / len(keys) * 1e6:.2f} µs a look-up ({len(keys)} chunks, best of 20)")


if __name__ == "__main__":
    main()
