"""Restore time of a chunk against its delta-chain depth: the measurement behind the chain bounds.

A series is saved with no chain bound, so snapshot k's chunks sit at depth k:
``dense`` (pretraining-like: every weight moves a little each save, dense deltas)
or ``sparse`` (an embedding table where ``--rows`` of its 256-wide rows change
each save: sparse deltas). Each snapshot is then restored with a cold base cache,
interleaved over several rounds; the table gives the median time relative to the
keyframe snapshot (depth 0) next to the saver's estimate (``cas.saver.link_cost``
summed over the chain), the model that bounds chains by ``max_chain_cost``.

    .venv/bin/python bench/delta_depth.py [--mib 64] [--depth 12] [--rounds 3] [--pattern dense|sparse|scattered]
        [--dtype float32|float64|bfloat16|int8] [--files 'DIR/ckpt-*.safetensors']

``--files``: real checkpoints instead (safetensors or torch.save files, in name order, e.g. from
``tools/make_series.py``): checkpoint k is snapshot k, its changed chunks at depth k.
"""

from __future__ import annotations

import argparse
import glob
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

import cas
from cas.codec import needs_base
from cas.reach import reached_chunks
from cas.saver import link_cost


def _estimate(repo: cas.Repository, tag: str, element_size: int) -> float:
    """The saver's estimated restore cost of the snapshot's chunks (mean over its data chunks)."""
    costs = []
    sid = repo.store.read_ref(tag)
    for cid, _tensor in reached_chunks(repo.reader, sid, tag):
        loc = repo.index.get(cid)
        if loc is None or loc.kind != 0:
            continue
        cost = 1.0
        while needs_base(loc.codec) and loc.base_id is not None:
            cost += link_cost(loc.codec, loc.stored_length, loc.raw_length, element_size, repo.codes_zero_runs)
            loc = repo.index.get(loc.base_id)
        costs.append(cost)
    return statistics.mean(costs) if costs else float("nan")


def _tensors(value: Any) -> list[torch.Tensor]:
    """Every tensor in a (nested) checkpoint."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return []


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=64)
    ap.add_argument("--depth", type=int, default=12)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--pattern", choices=("dense", "sparse", "scattered"), default="dense")
    ap.add_argument("--rows", type=float, default=0.02,
                    help="sparse: share of rows changed per save; scattered: share of elements")
    ap.add_argument("--dtype", choices=("float32", "float64", "bfloat16", "int8"), default="float32",
                    help="the saved tensor's dtype (the series itself evolves in float32; int8: w * 2000, rounded)")
    ap.add_argument("--files", help="glob of .safetensors or .pt checkpoints, saved in name order (not --mib, --dtype)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="cas-depth-"))
    try:
        dtype = getattr(torch, args.dtype)
        numel = args.mib * 2**20 // dtype.itemsize
        g = torch.Generator().manual_seed(0)
        w = torch.randn(numel, generator=g) * 0.02
        sizes = []
        estimates = []
        rows = w.view(-1, 256)
        with cas.Repository.init(work / "r", max_delta_depth=args.depth, max_chain_cost=1e9) as repo:
            files = sorted(glob.glob(args.files))[: args.depth + 1] if args.files else []
            if args.files and len(files) < args.depth + 1:
                raise SystemExit(f"--files matches {len(files)} files; --depth {args.depth} needs {args.depth + 1}")
            for k in range(args.depth + 1):
                if files:
                    state = load_file(files[k]) if files[k].endswith(".safetensors") else torch.load(
                        files[k], weights_only=True)
                    tensors = _tensors(state)
                    nbytes = sum(t.numel() * t.element_size() for t in tensors)
                    largest = max(tensors, key=lambda t: t.numel())
                    sizes.append(repo.save(state, tag=f"d{k}").bytes_added / nbytes)
                    estimates.append(_estimate(repo, f"d{k}", largest.element_size()))
                    continue
                if args.pattern == "dense":
                    w = w + torch.randn(numel, generator=g) * 2e-4
                elif args.pattern == "scattered":  # elements changed one by one, anywhere (masked updates)
                    w = w + (torch.rand(numel, generator=g) < args.rows) * torch.randn(numel, generator=g) * 1e-3
                else:
                    w = w.clone()
                    rows = w.view(-1, 256)
                    touched = torch.randperm(len(rows), generator=g)[: max(1, int(args.rows * len(rows)))]
                    rows[touched] += torch.randn(len(touched), 256, generator=g) * 1e-3
                saved = (w * 2000).round().clamp(-127, 127).to(dtype) if dtype == torch.int8 else w.to(dtype)
                sizes.append(repo.save({"w": saved}, tag=f"d{k}").bytes_added / (numel * dtype.itemsize))
                estimates.append(_estimate(repo, f"d{k}", dtype.itemsize))
            times: dict[int, list[float]] = {k: [] for k in range(args.depth + 1)}
            for _ in range(args.rounds):
                for k in range(args.depth + 1):
                    repo.reader.clear_cache()
                    t0 = time.perf_counter()
                    repo.load(f"d{k}")
                    times[k].append(time.perf_counter() - t0)
        key = statistics.median(times[0])
        what = f"{len(files)} files {args.files}" if files else f"{args.pattern}, {args.dtype}, {args.mib} MiB"
        print(f"{what}, {args.rounds} rounds")
        print()
        print("| depth | stored / raw | restore s (median) | vs keyframe | estimated (link_cost) |")
        print("| ---: | ---: | ---: | ---: | ---: |")
        for k in range(args.depth + 1):
            med = statistics.median(times[k])
            print(f"| {k} | {sizes[k]:.3f} | {med:.3f} | {med / key:.2f}x | {estimates[k]:.2f} |")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
