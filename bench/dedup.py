"""Dedup + compression benchmark: cas against restic, borg, zstd and ZipNN on checkpoint series.

Run from the repository root::

    .venv/bin/python bench/dedup.py [--series pretrain,lora] [--scale 0.5] [--count 8] [--slow]
        [--large-scale 1] [--series-cache DIR] [--tools cas,ZipNN]

The series come from ``tools/make_series.py`` (see its docstring: ``pretrain``,
``finetune``, ``bf16-revisions``, ``embedding``, ``lora``, and the realistic-size
``bf16-revisions-large`` and ``lora-large``, 126 MB checkpoints of a 63 M-parameter
model at ``--large-scale 1``, sized by that flag rather than ``--scale``). Generating
the large series takes a few minutes on two cores: ``--series-cache DIR`` keeps the
files and reuses them on later runs with the same scale and count. Each series'
files are stored, oldest first, by:

* cas, compression ``default`` and ``max`` (the repository's default chunk size and
  delta depth unless ``--cas-chunk-sizes`` says otherwise): each file is loaded
  (``torch.load(weights_only=True)`` / ``safetensors.torch.load_file``) and saved as
  one snapshot through the Python API; stored bytes are ``stats().stored_bytes``
  (pack files; the repository directory with its LMDB index is in the notes) after
  each save; the last checkpoint's cost is the growth of the pack files, like the
  peers' (``snapshots()[-1].bytes_added``, which leaves out pack headers and
  footers, is in the notes). Wall time includes loading the file. The last snapshot
  is loaded back and compared bit for bit with its file (an ``error`` row if not).
* restic (repository v2, ``--compression auto`` and ``max``) and borg2
  (``-e none``, ``-C zstd,3``; with ``--slow`` also ``zstd,19``): one backup / archive per file;
  stored bytes are the repository directory's size after each.
* zstd ``-3`` and ``-19`` of each file (``-T0``): the sum of the compressed files.
* ``tar`` of the first k files piped to ``zstd -3 --long=27 -T0`` (with ``--slow`` also
  ``-19``), for every k (so the curve is exact) while the series is small enough
  (``--tar-curve-limit``), else for the whole series and all but its last file; the
  wall time is the run over the whole series.
* ZipNN (``zipnn`` on PyPI) per file, the file's bytes as its dominant dtype, in
  streaming mode (as ZipNN's ``zipnn_compress_file.py``), and in its delta mode
  (``delta_compressed_type="byte"``: XOR with the previous file, as
  ``zipnn_compress_file_delta.py``; a file whose length differs from the previous
  one is compressed without delta, and the notes count those). Every ZipNN row
  checks that the last file round-trips.

A tool that is not installed gets a ``missing`` row; one that fails gets an
``error`` row: nothing is skipped silently.

Below the tools, three order-0 entropy floors of the tensor data (the bytes of
non-tensor values and file headers are left out), each with one byte histogram per
(checkpoint, dtype, byte plane), where a tensor's bytes are split into planes by
element size (plane j = byte j of every element):

* ``floor: planes, every checkpoint``: all tensors of every checkpoint: the best a
  per-file byte-plane order-0 coder (ZipNN's model) can do, no dedup;
* ``floor: planes, changed tensors``: only tensors whose bytes differ from the
  same key in the previous checkpoint (exact tensor-level dedup first);
* ``floor: XOR-delta planes``: changed tensors XORed with the same key in the
  previous checkpoint (the floor for an order-0 delta coder); new keys raw.

These are floors for order-0 (per-plane, context-free) coders only: an LZ coder beats
them on runs and repeats (the all-zero moment rows of never-touched embedding rows,
for instance).

Each cas row also gets a ``floor: what cas (...) encodes`` row, computed from the
repository that row just built: the floor of cas's own entropy stage on the byte
planes cas actually hands to it (after its byte grouping, delta and sparse-delta
transforms; ``cas.codec.coded_planes``), so ``stored / floor`` measures that stage
alone and not the transforms. Snapshots are walked in save order and a chunk (data or
manifest node; ``cas.reach.reached_chunks``) belongs to the first checkpoint that
reaches it. A checkpoint's floor is the bytes it added to the pack files (the cas
row's per-checkpoint number) minus the stored bytes of every coded plane of its new
chunks, plus the order-0 entropy of those planes with one histogram per (checkpoint,
plane key ``codec/flags/k/plane``, or ``.../runs`` for a sparse delta's run table; a
codec-1 chunk is one ``zstd`` plane of its raw bytes, a raw chunk one ``raw``
plane): what is stored verbatim (payload headers and tails, pack record headers and
footers) counts at its size. The summary gives ``cas (default)``'s stored bytes
against this floor in percent (the target is within 3 %). zstd's LZ stage can go
below an order-0 floor (runs of zeros in sparse deltas' planes, for instance), so a
row slightly under 1.00x is not an error.

Output: a markdown table per series on stdout and in ``bench/out/dedup.md``,
cumulative stored bytes per checkpoint per tool in ``bench/out/dedup.png`` (one
subplot per series) and raw numbers in ``bench/out/dedup.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import itertools
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import cas  # noqa: E402
from cas.codec import coded_planes  # noqa: E402
from cas.ids import ChunkId, SnapshotId  # noqa: E402
from cas.reach import reached_chunks  # noqa: E402
from tools.make_series import DEFAULT_COUNT, SERIES, generate  # noqa: E402

OUT_DIR = ROOT / "bench" / "out"
MIB = 1 << 20
#: Half the generator's default size: the zstd -19 rows (cas max, zstd -19, borg) run at about
#: 1 MB/s on two cores, and the whole run should stay within about ten minutes there.
DEFAULT_SCALE = 0.5


@dataclass
class Row:
    tool: str
    status: str = "ok"  # ok | missing | error | floor
    stored: int | None = None
    cumulative: list[int] = field(default_factory=list)
    last_added: int | None = None
    wall_s: float | None = None
    note: str = ""


class Missing(Exception):
    """The tool is not installed."""


# --------------------------------------------------------------------------- helpers


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def run(cmd: list[str], *, env: dict[str, str] | None = None, cwd: Path | None = None) -> None:
    proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        msg = (proc.stderr or proc.stdout).strip().splitlines()
        raise RuntimeError(f"{' '.join(cmd[:3])}... exited {proc.returncode}: {msg[-1] if msg else ''}")


def need(*names: str) -> str:
    for name in names:
        path = shutil.which(name)
        if path:
            return path
    raise Missing(f"{' / '.join(names)} not on PATH")


def load_checkpoint(path: Path) -> Any:
    if path.suffix == ".safetensors":
        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "—"
    if n >= 10 * MIB:
        return f"{n / MIB:,.1f} MiB"
    if n >= 10 * 1024:
        return f"{n / 1024:,.1f} KiB"
    return f"{int(n):,} B"


# --------------------------------------------------------------------------- tools


def cas_label(compression: str, chunk_size: int | None) -> str:
    return f"cas ({compression}" + (f", {chunk_size // 1024}K chunks" if chunk_size else "") + ")"


def bench_cas(files: list[Path], work: Path, compression: str, chunk_size: int | None) -> list[Row]:
    """The cas row and its ``floor: what cas (...) encodes`` row (see the module docstring)."""
    row = Row(cas_label(compression, chunk_size))
    kwargs: dict[str, Any] = {"compression": compression}
    if chunk_size:
        kwargs["chunk_size"] = chunk_size
    repo_dir = work / f"cas-{compression}-{chunk_size or 'dflt'}"
    wall = 0.0
    sids: list[SnapshotId] = []
    with cas.Repository.init(repo_dir, **kwargs) as repo:
        for i, path in enumerate(files):
            t0 = time.perf_counter()
            obj = load_checkpoint(path)
            snap = repo.save(obj, tag=f"ckpt-{i:03d}")
            wall += time.perf_counter() - t0
            del obj
            sids.append(SnapshotId(bytes.fromhex(snap.id)))
            row.cumulative.append(repo.stats().stored_bytes)
        # the last snapshot must come back bit-identical to the file it was saved from
        expect = dict(_tensors(load_checkpoint(files[-1])))
        got = dict(_tensors(repo.load("latest")))
        if expect.keys() != got.keys() or not all(_same_bytes(expect[k], got[k]) for k in expect):
            row.status = "error"
            row.note = "LAST SNAPSHOT DID NOT ROUND-TRIP; "
        snaps = repo.snapshots()
        stats = repo.stats()
        # Growth of the pack files, like the peers' rows; Snapshot.bytes_added (chunk records only,
        # without pack headers and footers) goes in the notes.
        row.last_added = row.cumulative[-1] - (row.cumulative[-2] if len(files) > 1 else 0)
        added_sum = sum(s.bytes_added for s in snaps)
        row.note += (
            f"repo dir {fmt_bytes(dir_bytes(repo_dir))}; dedup {stats.dedup_ratio:.2f}x, "
            f"codecs {stats.compression_ratio:.2f}x; chunk {repo.chunk_size // 1024}K; "
            f"max delta depth {getattr(repo, 'max_delta_depth', 'n/a')}; "
            f"last snapshot.bytes_added {fmt_bytes(snaps[-1].bytes_added)}"
        )
        if added_sum != stats.stored_bytes:
            row.note += f"; Σ bytes_added = {added_sum / stats.stored_bytes:.1%} of stored"
        floor = cas_floor_row(repo, sids, row)
    row.stored = row.cumulative[-1]
    row.wall_s = wall
    return [row, floor]


def cas_floor_row(repo: cas.Repository, sids: list[SnapshotId], row: Row) -> Row:
    """``floor: what <row> encodes``: order-0 floor of the planes cas's entropy stage coded (module docstring)."""
    label = f"floor: what {row.tool} encodes"
    t0 = time.perf_counter()
    try:
        added = [b - a for a, b in itertools.pairwise([0, *row.cumulative])]
        seen: set[ChunkId] = set()
        vals: list[float] = []
        coded_total = verbatim_total = 0
        names: set[str] = set()
        for i, sid in enumerate(sids):
            hists: dict[str, np.ndarray] = {}
            coded = 0
            for cid, _tensor in reached_chunks(repo.reader, sid, f"ckpt-{i:03d}"):
                if cid in seen:
                    continue
                seen.add(cid)
                loc = repo.index.get(cid)
                if loc is None:
                    raise RuntimeError(f"chunk {cid.hex()[:12]} of ckpt-{i:03d} is not in the index")
                for name, stored, plane in coded_planes(loc.codec, repo.reader.payload(loc), loc.raw_length):
                    coded += stored
                    names.add(name)
                    h = np.bincount(plane, minlength=256)
                    hists[name] = hists[name] + h if name in hists else h
            verbatim = added[i] - coded
            if verbatim < 0:
                raise RuntimeError(f"ckpt-{i:03d}: coded planes ({coded:,} B) exceed the pack growth ({added[i]:,} B)")
            coded_total += coded
            verbatim_total += verbatim
            vals.append(verbatim + sum(_entropy_bytes(h) for h in hists.values()))
        unreached = repo.index.chunk_count() - len(seen)
    except Exception as exc:  # noqa: BLE001 - a failing floor is an error row, the cas row stands
        return Row(label, status="error", note=f"{type(exc).__name__}: {exc}")
    cum = list(np.cumsum(vals).round().astype(int).tolist())
    stored = row.cumulative[-1]
    note = (f"{row.tool} stores {stored / cum[-1]:.3f}x this floor; order-0, one histogram per (checkpoint, "
            f"coded plane key), {len(names)} keys; coded planes {fmt_bytes(coded_total)} stored, verbatim "
            f"(headers, tails, pack framing) {fmt_bytes(verbatim_total)}; computed in {time.perf_counter() - t0:.1f} s")
    if unreached:
        note += f"; {unreached} indexed chunk(s) reached by no snapshot (counted as verbatim)"
    return Row(label, status="floor", stored=cum[-1], cumulative=cum, last_added=round(vals[-1]), note=note)


def bench_restic(files: list[Path], work: Path, mode: str) -> Row:
    row = Row(f"restic ({mode})")
    exe = need("restic")
    repo = work / f"restic-{mode}"
    env = dict(os.environ, RESTIC_PASSWORD="bench", RESTIC_CACHE_DIR=str(work / f"restic-cache-{mode}"))
    run([exe, "-r", str(repo), "init", "--repository-version", "2", "-q"], env=env)
    base = dir_bytes(repo)
    wall = 0.0
    for path in files:
        t0 = time.perf_counter()
        run([exe, "-r", str(repo), "backup", "-q", "--compression", mode, "--host", "bench", path.name],
            env=env, cwd=path.parent)
        wall += time.perf_counter() - t0
        row.cumulative.append(dir_bytes(repo))
    row.stored = row.cumulative[-1]
    row.last_added = row.cumulative[-1] - (row.cumulative[-2] if len(files) > 1 else base)
    row.wall_s = wall
    row.note = f"repo dir (empty repo {fmt_bytes(base)}); {_version([exe, 'version']).split(' compiled')[0]}"
    return row


def bench_borg(files: list[Path], work: Path, compression: str) -> Row:
    row = Row(f"borg2 ({compression})")
    exe = need("borg2", "borg")
    repo = work / f"borg-{compression.replace(',', '')}"
    env = dict(
        os.environ,
        BORG_BASE_DIR=str(work / f"borg-base-{compression.replace(',', '')}"),
        BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK="yes",
        BORG_RELOCATED_REPO_ACCESS_IS_OK="yes",
        BORG_PASSPHRASE="",
    )
    version = _version([exe, "--version"])
    if version.split()[-1].startswith("1."):
        run([exe, "init", "-e", "none", str(repo)], env=env)
        create = [exe, "create", "-C", compression]
        target = lambda name: [f"{repo}::{name}"]  # noqa: E731
    else:
        run([exe, "-r", str(repo), "rcreate", "-e", "none"], env=env)
        create = [exe, "-r", str(repo), "create", "-C", compression]
        target = lambda name: [name]  # noqa: E731
    base = dir_bytes(repo)
    wall = 0.0
    for i, path in enumerate(files):
        t0 = time.perf_counter()
        run([*create, *target(f"ckpt-{i:03d}"), path.name], env=env, cwd=path.parent)
        wall += time.perf_counter() - t0
        row.cumulative.append(dir_bytes(repo))
    row.stored = row.cumulative[-1]
    row.last_added = row.cumulative[-1] - (row.cumulative[-2] if len(files) > 1 else base)
    row.wall_s = wall
    row.note = f"repo dir (empty repo {fmt_bytes(base)}); {version}"
    return row


def bench_zstd_files(files: list[Path], work: Path, level: int) -> Row:
    row = Row(f"zstd -{level} per file")
    exe = need("zstd")
    out = work / f"zstd{level}"
    out.mkdir()
    total, wall = 0, 0.0
    for path in files:
        dst = out / (path.name + ".zst")
        t0 = time.perf_counter()
        run([exe, "-q", "-f", f"-{level}", "-T0", str(path), "-o", str(dst)])
        wall += time.perf_counter() - t0
        total += dst.stat().st_size
        row.cumulative.append(total)
        row.last_added = dst.stat().st_size
    row.stored, row.wall_s = total, wall
    row.note = "-T0"
    return row


def bench_tar_zstd_long(files: list[Path], work: Path, all_prefixes: bool, level: int = 3) -> Row:
    row = Row(f"tar + zstd -{level} --long=27")
    tar, zstd = need("tar"), need("zstd")
    dst = work / "series.tar.zst"
    ks = range(1, len(files) + 1) if all_prefixes else [len(files) - 1, len(files)]
    sizes: dict[int, int] = {}
    for k in ks:
        if k == 0:
            sizes[0] = 0
            continue
        t0 = time.perf_counter()
        with open(dst, "wb") as out:
            tar_p = subprocess.Popen([tar, "-cf", "-", "-C", str(files[0].parent), *(p.name for p in files[:k])],
                                     stdout=subprocess.PIPE)
            z = subprocess.run([zstd, "-q", f"-{level}", "--long=27", "-T0", "-c"], stdin=tar_p.stdout, stdout=out,
                               check=False)
            assert tar_p.stdout is not None
            tar_p.stdout.close()
            if tar_p.wait() != 0 or z.returncode != 0:
                raise RuntimeError(f"tar | zstd failed (tar {tar_p.returncode}, zstd {z.returncode})")
        sizes[k] = dst.stat().st_size
        row.wall_s = time.perf_counter() - t0
    row.stored = sizes[len(files)]
    row.last_added = sizes[len(files)] - sizes[len(files) - 1]
    row.cumulative = [sizes[k] for k in range(1, len(files) + 1)] if all_prefixes else []
    row.note = "one archive of the whole series; last = size(all) - size(all but last); wall = whole series"
    if not all_prefixes:
        row.note += "; curve skipped (series too large)"
    return row


def _zipnn() -> Any:
    try:
        import zipnn
    except ImportError as exc:
        raise Missing(f"python package zipnn not importable ({exc}); pip install zipnn") from exc
    return zipnn


def _zipnn_dtype(series: str) -> str:
    return {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}[SERIES[series].dtype]


def bench_zipnn(files: list[Path], series: str, delta: bool) -> Row:
    row = Row("ZipNN delta (XOR prev file)" if delta else "ZipNN per file")
    zipnn = _zipnn()
    dtype = _zipnn_dtype(series)
    plain = zipnn.ZipNN(bytearray_dtype=dtype, is_streaming=True)
    xor = zipnn.ZipNN(bytearray_dtype=dtype, is_streaming=True, delta_compressed_type="byte")
    total, wall, fallbacks = 0, 0.0, 0
    prev: bytes | None = None
    comp = b""
    for i, path in enumerate(files):
        t0 = time.perf_counter()
        data = path.read_bytes()
        # ZipNN reorders bits of its input buffer in place (even of an immutable bytes object): give it a copy.
        if delta and prev is not None and len(prev) == len(data):
            comp = bytes(xor.compress(bytearray(data), delta_second_data=prev))
        else:
            if delta and i:
                fallbacks += 1
            comp = bytes(plain.compress(bytearray(data)))
        wall += time.perf_counter() - t0
        total += len(comp)
        row.cumulative.append(total)
        row.last_added = len(comp)
        prev = data
    last = files[-1].read_bytes()
    used_delta = delta and len(files) > 1 and fallbacks < len(files) - 1 and len(files[-2].read_bytes()) == len(last)
    back = xor.decompress(comp, delta_second_data=files[-2].read_bytes()) if used_delta else plain.decompress(comp)
    row.stored, row.wall_s = total, wall
    row.note = f"file bytes as {dtype}; zipnn {importlib.metadata.version('zipnn')}"
    if delta:
        row.note += f"; {fallbacks} file(s) compressed without delta (length changed)" if fallbacks else ""
    if bytes(back) != last:
        row.status = "error"
        row.note += "; LAST FILE DID NOT ROUND-TRIP"
    return row


def _git_rev() -> str:
    proc = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"], capture_output=True, text=True,
                          check=False)
    return proc.stdout.strip() or "?"


def _version(cmd: list[str]) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    return (proc.stdout or proc.stderr).strip().splitlines()[0] if (proc.stdout or proc.stderr) else "?"


# --------------------------------------------------------------------------- entropy floors


def _tensors(obj: Any, path: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    if isinstance(obj, torch.Tensor):
        yield path, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _tensors(v, f"{path}/{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _tensors(v, f"{path}/{i}")


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))


def _planes(raw: np.ndarray, esize: int) -> list[np.ndarray]:
    mat = raw.reshape(-1, esize)
    return [np.bincount(mat[:, j], minlength=256) for j in range(esize)]


def _entropy_bytes(hist: np.ndarray) -> float:
    n = hist.sum()
    if n == 0:
        return 0.0
    p = hist[hist > 0] / n
    return float(-(p * np.log2(p)).sum() * n / 8)


def entropy_floors(files: list[Path]) -> tuple[list[float], list[float], list[float]]:
    """Per-checkpoint floors: (all tensors raw planes, changed tensors raw planes, changed tensors XOR planes)."""
    every, changed, xor = [], [], []
    prev: dict[str, np.ndarray] = {}
    for path in files:
        obj = load_checkpoint(path)
        seen: set[tuple[int, int]] = set()
        h_all: dict[tuple[str, int], np.ndarray] = {}
        h_chg: dict[tuple[str, int], np.ndarray] = {}
        h_xor: dict[tuple[str, str, int], np.ndarray] = {}
        cur: dict[str, np.ndarray] = {}
        for key, t in _tensors(obj):
            if t.numel() == 0:
                continue
            ident = (t.untyped_storage().data_ptr() + t.storage_offset() * t.element_size(), t.numel())
            if ident in seen:  # tied / shared tensors are stored once
                continue
            seen.add(ident)
            esize = t.element_size()
            raw = t.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
            dkey = f"{t.dtype}".removeprefix("torch.")
            ukey = f"{key}|{dkey}|{tuple(t.shape)}"
            cur[ukey] = raw
            planes = _planes(raw, esize)
            for j, h in enumerate(planes):
                h_all[(dkey, j)] = h_all.get((dkey, j), 0) + h
            old = prev.get(ukey)
            if old is not None and np.array_equal(old, raw):
                continue
            for j, h in enumerate(planes):
                h_chg[(dkey, j)] = h_chg.get((dkey, j), 0) + h
            if old is None:
                for j, h in enumerate(planes):
                    h_xor[("raw", dkey, j)] = h_xor.get(("raw", dkey, j), 0) + h
            else:
                for j, h in enumerate(_planes(np.bitwise_xor(old, raw), esize)):
                    h_xor[("xor", dkey, j)] = h_xor.get(("xor", dkey, j), 0) + h
        every.append(sum(_entropy_bytes(h) for h in h_all.values()))
        changed.append(sum(_entropy_bytes(h) for h in h_chg.values()))
        xor.append(sum(_entropy_bytes(h) for h in h_xor.values()))
        prev = cur
    return every, changed, xor


def floor_rows(files: list[Path]) -> list[Row]:
    t0 = time.perf_counter()
    names = ("floor: planes, every checkpoint", "floor: planes, changed tensors", "floor: XOR-delta planes")
    rows = []
    per = entropy_floors(files)
    wall = time.perf_counter() - t0
    for name, vals in zip(names, per, strict=True):
        cum = list(np.cumsum(vals).round().astype(int).tolist())
        rows.append(Row(name, status="floor", stored=cum[-1], cumulative=cum, last_added=round(vals[-1]),
                        note="order-0, one histogram per (checkpoint, dtype, byte plane); tensor bytes only"))
    rows[0].note += f"; floors computed in {wall:.1f} s"
    return rows


# --------------------------------------------------------------------------- driver


def series_scale(name: str, args: argparse.Namespace) -> float:
    return args.large_scale if SERIES[name].large else args.scale


def series_files(name: str, args: argparse.Namespace, work: Path) -> tuple[list[Path], float, bool]:
    """The series' files, generated (or, with ``--series-cache``, reused); (files, seconds, reused)."""
    scale = series_scale(name, args)
    if args.series_cache is None:
        sdir = work / "files" / name
    else:
        sdir = args.series_cache / f"{name}-scale{scale:g}-count{args.count}"
        done = sdir / "done.json"
        if done.exists():
            names = json.loads(done.read_text())
            if all((sdir / n).exists() for n in names):
                return [sdir / n for n in names], 0.0, True
    t0 = time.perf_counter()
    files = generate(name, sdir, scale=scale, count=args.count)
    if args.series_cache is not None:
        (sdir / "done.json").write_text(json.dumps([p.name for p in files]))
    return files, time.perf_counter() - t0, False


def bench_series(name: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    files, gen_s, reused = series_files(name, args, work)
    raw_sizes = [p.stat().st_size for p in files]
    raw = sum(raw_sizes)
    print(f"\n## {name}: {len(files)} x {fmt_bytes(raw_sizes[-1])} = {fmt_bytes(raw)} raw "
          f"({'reused from --series-cache' if reused else f'generated in {gen_s:.1f} s'})", file=sys.stderr)
    tw = work / "tools" / name
    tw.mkdir(parents=True)
    tar_curve = raw * len(files) / 2 < args.tar_curve_limit
    jobs: list[tuple[str, Callable[[], Row | list[Row]]]] = []
    for chunk in args.cas_chunk_sizes:
        for comp in ("default", "max"):
            jobs.append((cas_label(comp, chunk), lambda c=comp, k=chunk: bench_cas(files, tw, c, k)))
    jobs += [
        ("restic (auto)", lambda: bench_restic(files, tw, "auto")),
        ("restic (max)", lambda: bench_restic(files, tw, "max")),
        ("borg2 (zstd,3)", lambda: bench_borg(files, tw, "zstd,3")),
        *([("borg2 (zstd,19)", lambda: bench_borg(files, tw, "zstd,19"))] if args.slow else []),
        ("zstd -3 per file", lambda: bench_zstd_files(files, tw, 3)),
        ("zstd -19 per file", lambda: bench_zstd_files(files, tw, 19)),
        ("tar + zstd -3 --long=27", lambda: bench_tar_zstd_long(files, tw, tar_curve)),
        *([("tar + zstd -19 --long=27", lambda: bench_tar_zstd_long(files, tw, tar_curve, 19))] if args.slow else []),
        ("ZipNN per file", lambda: bench_zipnn(files, name, delta=False)),
        ("ZipNN delta (XOR prev file)", lambda: bench_zipnn(files, name, delta=True)),
    ]
    rows: list[Row] = []
    cas_floors: list[Row] = []  # below the tensor floors, with them
    for label, job in jobs:
        if args.tools and not any(t in label for t in args.tools):
            continue
        print(f"  {label} ...", end="", flush=True, file=sys.stderr)
        extra: list[Row] = []
        try:
            got = job()
            row, *extra = got if isinstance(got, list) else [got]
        except Missing as exc:
            row = Row(label, status="missing", note=str(exc))
        except Exception as exc:  # noqa: BLE001 - a failing peer is a row, not a crashed benchmark
            row = Row(label, status="error", note=f"{type(exc).__name__}: {exc}")
        print(f" {row.status} {fmt_bytes(row.stored)} {row.wall_s or 0:.1f} s", file=sys.stderr)
        for r in extra:
            print(f"    {r.tool}: {r.status} {fmt_bytes(r.stored)}", file=sys.stderr)
        rows.append(row)
        cas_floors += extra
    rows += floor_rows(files)
    rows += cas_floors
    shutil.rmtree(tw, ignore_errors=True)
    return {
        "series": name, "summary": SERIES[name].summary, "files": [p.name for p in files],
        "raw_sizes": raw_sizes, "raw": raw, "gen_s": gen_s, "rows": [asdict(r) for r in rows],
    }


def table(res: dict[str, Any]) -> str:
    raw = res["raw"]
    last_raw = res["raw_sizes"][-1]
    lines = [
        f"### {res['series']}: {res['summary']}",
        "",
        f"{len(res['files'])} checkpoints, {fmt_bytes(last_raw)} each (last), {fmt_bytes(raw)} raw in all; "
        f"generated in {res['gen_s']:.1f} s.",
        "",
        "| tool | stored | raw / stored | added by last ckpt | last / raw last | wall s | notes |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in res["rows"]:
        if r["status"] in ("missing", "error"):
            lines.append(f"| {r['tool']} | {r['status']} | — | — | — | — | {r['note']} |")
            continue
        ratio = f"{raw / r['stored']:.2f}x" if r["stored"] else "—"
        last = f"{100 * r['last_added'] / last_raw:.1f} %" if r["last_added"] is not None else "—"
        wall = f"{r['wall_s']:.2f}" if r["wall_s"] is not None else "—"
        lines.append(f"| {r['tool']} | {fmt_bytes(r['stored'])} | {ratio} | {fmt_bytes(r['last_added'])} | {last} "
                     f"| {wall} | {r['note']} |")
    lines.append(f"| raw files | {fmt_bytes(raw)} | 1.00x | {fmt_bytes(last_raw)} | 100.0 % | — | |")
    ok = [r for r in res["rows"] if r["status"] == "ok" and len(r["cumulative"]) == len(res["files"])]
    peers = [r for r in ok if not r["tool"].startswith("cas")]
    own_floors = [r for r in res["rows"] if r["tool"].startswith("floor: what ") and r["status"] == "floor"
                  and len(r["cumulative"]) == len(res["files"])]
    shown = [r for r in ok if r["tool"].startswith("cas")] + own_floors
    shown += [min(peers, key=lambda r: r["stored"])] if peers else []
    if shown:
        lines += ["", "Bytes each checkpoint added (KiB), cas rows, the floors of what they encode and the best peer:",
                  ""]
        for r in shown:
            cum = r["cumulative"]
            steps = [cum[0]] + [b - a for a, b in itertools.pairwise(cum)]
            lines.append(f"- {r['tool']}: " + ", ".join(f"{x / 1024:,.0f}" for x in steps))
    return "\n".join(lines)


def _vs_peers(res: dict[str, Any]) -> list[str]:
    ok = [r for r in res["rows"] if r["status"] == "ok" and r["stored"]]
    cas_rows = [r for r in ok if r["tool"].startswith("cas")]
    if not cas_rows:
        return [f"- **{res['series']}**: no cas row succeeded."]
    best = min(cas_rows, key=lambda r: r["stored"])
    peers = [r for r in ok if not r["tool"].startswith("cas")]
    worse = sorted((r for r in peers if r["stored"] * 1.005 < best["stored"]), key=lambda r: r["stored"])
    ties = [r["tool"] for r in peers if r not in worse and r["stored"] < best["stored"] * 1.005]
    tie_text = f" Within 0.5 %: {', '.join(ties)}." if ties else ""
    if not worse:
        return [f"- **{res['series']}**: {best['tool']} ({fmt_bytes(best['stored'])}) stores the least, "
                f"or ties.{tie_text}"]
    beaten = ", ".join(f"{r['tool']} {fmt_bytes(r['stored'])} ({best['stored'] / r['stored']:.2f}x less)"
                       for r in worse)
    lines = [f"- **{res['series']}**: {best['tool']} stores {fmt_bytes(best['stored'])}; beaten by {beaten}."
             f"{tie_text}"]
    last_worse = [r for r in peers if r["last_added"] is not None and r["last_added"] * 1.005 < best["last_added"]]
    if last_worse:
        b = min(last_worse, key=lambda r: r["last_added"])
        lines.append(f"  Last checkpoint: cas adds {fmt_bytes(best['last_added'])}, {b['tool']} "
                     f"{fmt_bytes(b['last_added'])} ({best['last_added'] / max(1, b['last_added']):.2f}x less).")
    return lines


def _vs_own_floor(res: dict[str, Any]) -> list[str]:
    """Each cas row's stored bytes against the order-0 floor of what it encodes (target: within 3 %)."""
    by_tool = {r["tool"]: r for r in res["rows"]}
    parts = []
    for r in res["rows"]:
        if not r["tool"].startswith("cas") or r["status"] != "ok" or not r["stored"]:
            continue
        f = by_tool.get(f"floor: what {r['tool']} encodes")
        if f is None:
            continue
        if f["status"] != "floor" or not f["stored"]:
            parts.append(f"{r['tool']}: floor {f['status']} ({f['note']})")
            continue
        over = 100 * (r["stored"] / f["stored"] - 1)
        verdict = ("within 3 %" if 0 <= over <= 3 else "MORE THAN 3 % over" if over > 3
                   else "below it: zstd's LZ stage beats order-0 there")
        parts.append(f"{r['tool']} stores {fmt_bytes(r['stored'])}, {over:+.1f} % against the floor of what it "
                     f"encodes ({fmt_bytes(f['stored'])}; {verdict})")
    return [f"  Entropy stage: {'; '.join(parts)}."] if parts else []


def cas_vs_peers(results: list[dict[str, Any]]) -> str:
    lines = ["### Where cas loses", "",
             "Best cas row (smallest stored) against every peer row that stores at least 0.5 % less, per series; "
             "then each cas row against the order-0 floor of the planes its entropy stage coded "
             "(`floor: what cas (...) encodes`; target: within 3 %).", ""]
    for res in results:
        lines += _vs_peers(res) + _vs_own_floor(res)
    return "\n".join(lines)


def chart(results: list[dict[str, Any]], path: Path) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib missing: no chart (pip install matplotlib)"
    n = len(results)
    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6.5 * cols, 4.6 * rows), squeeze=False)
    tools: list[str] = []
    for res in results:
        tools += [r["tool"] for r in res["rows"] if r["tool"] not in tools]
    # cas in blues, floors in greys, peers in tab10 minus its blue
    blues = iter(["#08306b", "#4292c6", "#6baed6", "#9ecae1", "#2171b5", "#c6dbef"])
    greys = iter(["0.25", "0.45", "0.65", "0.8"])
    tab = plt.get_cmap("tab10")
    others = iter(tab(i) for i in [1, 2, 3, 4, 5, 6, 8, 9, 7] * 3)
    color = {}
    for t in tools:
        if t.startswith("floor: what "):  # a cas row's own floor: dotted, in that row's colour
            continue
        group = blues if t.startswith("cas") else greys if t.startswith("floor") else others
        color[t] = next(group, "0.5")
    for t in tools:
        if t.startswith("floor: what "):
            color[t] = color.get(t.removeprefix("floor: what ").removesuffix(" encodes"), "0.5")
    for ax, res in zip(axes.flat, results, strict=False):
        x = list(range(1, len(res["files"]) + 1))
        ax.plot(x, np.cumsum(res["raw_sizes"]) / MIB, color="black", lw=2, label="raw files")
        for r in res["rows"]:
            if r["status"] not in ("ok", "floor") or len(r["cumulative"]) != len(x):
                continue
            is_cas = r["tool"].startswith("cas")
            style = ":" if r["status"] == "floor" else ("-" if is_cas else "--")
            ax.plot(x, np.asarray(r["cumulative"]) / MIB, style, color=color[r["tool"]], lw=2.4 if is_cas else 1.3,
                    marker="o" if is_cas else None, ms=3, label=r["tool"])
        ax.set_title(f"{res['series']} ({fmt_bytes(res['raw'])} raw)")
        ax.set_xlabel("checkpoint")
        ax.set_ylabel("cumulative stored (MiB)")
        ax.set_xticks(x)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    handles: dict[str, Any] = {}
    for ax in list(axes.flat)[:n]:
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(lab, h)
    if n % cols:  # an empty cell: put the legend there
        spare = list(axes.flat)[n]
        spare.legend(handles.values(), handles.keys(), loc="center", fontsize=9)
    else:
        fig.legend(handles.values(), handles.keys(), loc="lower center", ncol=5, fontsize=8)
    fig.tight_layout(rect=(0, 0 if n % cols else 0.12, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"chart: {path}"


def parse_size(text: str) -> int:
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--series", default=",".join(SERIES), help=f"comma-separated subset of: {', '.join(SERIES)}")
    ap.add_argument("--scale", type=float, default=DEFAULT_SCALE,
                    help=f"series size multiplier (tools/make_series.py; default {DEFAULT_SCALE})")
    ap.add_argument("--large-scale", type=float, default=1.0,
                    help="size multiplier of the *-large series (default 1: 126 MB checkpoints)")
    ap.add_argument("--series-cache", type=Path, default=None,
                    help="keep generated series here and reuse them on later runs (same scale and count)")
    ap.add_argument("--slow", action="store_true",
                    help="also run borg2 with zstd,19 and tar + zstd -19 --long (slow)")
    ap.add_argument("--count", type=int, default=DEFAULT_COUNT, help="checkpoints per series")
    ap.add_argument("--cas-chunk-sizes", default="default",
                    help="comma-separated cas chunk sizes to run (e.g. default,64K); default: the repository default")
    ap.add_argument("--tools", default="", help="only rows whose label contains one of these (comma-separated)")
    ap.add_argument("--tar-curve-limit", type=parse_size, default=parse_size("2G"),
                    help="compress every tar prefix only while n/2 x the series' raw size is below this")
    ap.add_argument("--work", type=Path, default=None, help="scratch directory (default: a temp dir, removed)")
    ap.add_argument("--out", type=Path, default=OUT_DIR)
    args = ap.parse_args(argv)
    names = [s.strip() for s in args.series.split(",") if s.strip()]
    bad = [n for n in names if n not in SERIES]
    if bad:
        ap.error(f"unknown series {', '.join(bad)}; choose from {', '.join(SERIES)}")
    args.cas_chunk_sizes = [None if c.strip() == "default" else parse_size(c)
                            for c in args.cas_chunk_sizes.split(",") if c.strip()]
    args.tools = [t.strip() for t in args.tools.split(",") if t.strip()]
    args.out.mkdir(parents=True, exist_ok=True)

    t_all = time.perf_counter()
    results = []
    with contextlib.ExitStack() as stack:
        if args.work is None:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="cas-dedup-")))
        else:
            work = args.work
            work.mkdir(parents=True, exist_ok=True)
        for name in names:
            res = bench_series(name, args, work)
            results.append(res)
            print("\n" + table(res) + "\n", flush=True)
            if args.series_cache is None:
                shutil.rmtree(work / "files" / name, ignore_errors=True)

    header = (
        f"## Dedup benchmark\n\n`bench/dedup.py --series {','.join(names)} --scale {args.scale} "
        f"--large-scale {args.large_scale} --count {args.count}"
        f"{' --slow' if args.slow else ''}`"
        f" at cas commit {_git_rev()}, on {platform.machine()}, {os.cpu_count()} CPUs, Python "
        f"{platform.python_version()}, torch "
        f"{torch.__version__}; total {time.perf_counter() - t_all:.0f} s. Stored bytes are bytes on disk "
        "(cas: pack files; restic/borg: repository directory); `last / raw last` is what the last checkpoint "
        "added, as a share of its file size. Floors: order-0 entropy of tensor byte planes, and "
        "(`floor: what cas (...) encodes`) of the planes cas's entropy stage coded (see the docstring)."
    )
    summary = cas_vs_peers(results)
    print(summary)
    note = chart(results, args.out / "dedup.png")
    print(note, file=sys.stderr)
    md = "\n\n".join([header, *(table(r) for r in results), summary]) + "\n"
    (args.out / "dedup.md").write_text(md)
    (args.out / "dedup.json").write_text(json.dumps(results, indent=1))
    print(f"tables: {args.out / 'dedup.md'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
