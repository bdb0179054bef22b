"""Throughput benchmark: cas against torch.save / torch.load and safetensors.

Run from the repository root::

    .venv/bin/python bench/throughput.py [--sizes 64M,256M,1G,2G] [--rounds N] [--dir PATH]

Every writer makes its data durable: torch.save and safetensors' save_file are
followed by an fsync of the file and of its directory; cas fsyncs packs, index
and refs itself. All implementations see the same synthetic transformer-like
state dict (float32 weights of varied shapes plus small tensors, fixed seed).

Measured, per size, in ``--rounds`` interleaved rounds (the order of the
implementations rotates from round to round) and reported as the median:

* first save into a fresh repository / file (cas with compression "none" and
  "default");
* incremental saves after 0 %, 10 % and 100 % of the weight bytes changed (a
  small random delta added to every element of the changed tensors), cas
  against a full torch.save of the same dict;
* verified load, each in a FRESH process (the resume case: no recycled pages,
  nothing cached), after the incremental saves: cas ``Repository.open`` +
  ``load`` of the keyframe-only first snapshot ("load keyframes") and of the
  10 % incremental snapshot, whose changed chunks are delta links on it ("load
  with deltas"), against torch.load (weights_only=True, mmap=False) of the
  same bytes and safetensors load_file. Only the load is timed (after the
  imports and the kernels' warm-up). The page cache cannot be dropped here, so
  every read is served from it. The same child then loads the snapshot again
  into the tensors it just made (``load_into``: read + decode + BLAKE3, no
  allocation, no page faults): the "limit" column;
* the saver's peak RSS above the state dict, at the largest size, each save
  in a fresh child process.

The markdown report goes to stdout and to ``bench/out/throughput.md``; raw
timings go to ``bench/out/throughput.json``.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

import cas
import cas.planes

MIB = 1 << 20
SEED = 20240611
DELTA_STD = 1e-3
CHANGE_LEVELS = (0.0, 0.10, 1.0)
OUT_DIR = Path(__file__).resolve().parent / "out"

StateDict = dict[str, torch.Tensor]


# --------------------------------------------------------------------------- sizes and data


def parse_size(text: str) -> int:
    """``64M``, ``1G``, ``512K`` or a plain byte count (binary units)."""
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def format_size(n: int) -> str:
    for unit, scale in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n >= scale and n % scale == 0:
            return f"{n // scale}{unit}"
    return f"{n / MIB:.0f}M"


@dataclass(frozen=True)
class ModelShape:
    d_model: int
    d_ff: int
    vocab: int
    layers: int


def plan_shape(target: int) -> ModelShape:
    """A llama-like shape (SwiGLU MLP, q/k/v biases) whose weights add up to about ``target`` bytes."""
    best: ModelShape | None = None
    for d in (256, 512, 768, 1024, 1536, 2048, 2560, 3072, 4096):
        d_ff = 256 * math.ceil(8 * d / 3 / 256)
        vocab = max(1024, min(32000, int(0.2 * target / (2 * 4 * d))) // 64 * 64)
        layer_bytes = 4 * (4 * d * d + 3 * d * d_ff + 5 * d)
        layers = round((target - 2 * 4 * vocab * d) / layer_bytes)
        if layers >= 8 or best is None:
            best = ModelShape(d, d_ff, vocab, max(1, layers))
    assert best is not None
    return best


def build_state_dict(target: int, seed: int = SEED) -> StateDict:
    """The synthetic state dict: big float32 matrices, float32 vectors, a few small tensors.

    Tensors are filled in place (no temporaries), so the peak RSS of building
    equals the final size of the dict.
    """
    shape = plan_shape(target)
    d, ff = shape.d_model, shape.d_ff
    gen = torch.Generator().manual_seed(seed)
    sd: StateDict = {}

    def add(name: str, *dims: int, std: float = 0.02) -> None:
        t = torch.empty(dims, dtype=torch.float32)
        t.normal_(0.0, std, generator=gen)
        sd[name] = t

    add("tok_embeddings.weight", shape.vocab, d)
    for i in range(shape.layers):
        p = f"layers.{i}."
        add(p + "attention_norm.weight", d, std=1.0)
        for proj in ("wq", "wk", "wv"):
            add(p + f"attention.{proj}.weight", d, d)
            add(p + f"attention.{proj}.bias", d)
        add(p + "attention.wo.weight", d, d)
        add(p + "ffn_norm.weight", d, std=1.0)
        add(p + "feed_forward.w1.weight", ff, d)
        add(p + "feed_forward.w2.weight", d, ff)
        add(p + "feed_forward.w3.weight", ff, d)
    add("norm.weight", d, std=1.0)
    add("output.weight", shape.vocab, d)
    sd["rope.inv_freq"] = 1.0 / (10000.0 ** (torch.arange(0, 64, 2, dtype=torch.float32) / 64))
    sd["step"] = torch.tensor(123456, dtype=torch.int64)
    sd["loss_scale"] = torch.tensor(65536.0, dtype=torch.float32)
    return sd


def nbytes_of(sd: StateDict) -> int:
    return sum(t.numel() * t.element_size() for t in sd.values())


def pick_changed(sd: StateDict, fraction: float, seed: int) -> list[str]:
    """Float tensors, in a seeded random order, until ``fraction`` of the float bytes is covered."""
    names = [k for k, t in sd.items() if t.is_floating_point()]
    if fraction >= 1.0:
        return names
    if fraction <= 0.0:
        return []
    total = sum(sd[k].numel() * sd[k].element_size() for k in names)
    order = random.Random(seed).sample(names, len(names))
    picked: list[str] = []
    covered = 0
    for name in order:
        if covered >= fraction * total:
            break
        picked.append(name)
        covered += sd[name].numel() * sd[name].element_size()
    return picked


def mutate(sd: StateDict, names: list[str], seed: int) -> None:
    """Add a small random delta to every element of the named tensors (in place)."""
    gen = torch.Generator().manual_seed(seed)
    for name in names:
        t = sd[name]
        t.add_(torch.empty_like(t).normal_(0.0, DELTA_STD, generator=gen))


# --------------------------------------------------------------------------- writers and readers


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def torch_save(sd: StateDict, path: Path) -> None:
    torch.save(sd, path)
    fsync_path(path)


def safetensors_save(sd: StateDict, path: Path) -> None:
    save_file(sd, path)
    fsync_path(path)


def torch_load(path: Path) -> StateDict:
    loaded: StateDict = torch.load(path, weights_only=True, mmap=False)
    return loaded


def touch_pages(sd: StateDict) -> None:
    """Fault in every page of lazily mapped tensors (one element per 4 KiB)."""
    for t in sd.values():
        flat = t.reshape(-1)
        if flat.numel():
            step = max(1, 4096 // t.element_size())
            flat[::step].sum()


def safetensors_load_mmap(path: Path) -> StateDict:
    sd = load_file(path)
    touch_pages(sd)
    return sd


def safetensors_load_pread(path: Path) -> StateDict:
    return load_file(path, backend="pread")


def cas_load(path: Path, tag: str) -> StateDict:
    with cas.Repository.open(path) as repo:
        loaded: StateDict = repo.load(tag)
    return loaded


def child_load(impl: str, path: str, tag: str) -> None:
    """In a fresh process: time one load (imports and kernel warm-up not counted); print JSON."""
    cas.planes.warm_up()
    gc.collect()
    out: dict[str, Any] = {}
    start = time.perf_counter()
    if impl == "torch.load":
        sd = torch_load(Path(path))
    elif impl == "safetensors (pread)":
        sd = safetensors_load_pread(Path(path))
    else:
        with cas.Repository.open(path) as repo:
            sd = repo.load(tag)
            out["seconds"] = time.perf_counter() - start
            start = time.perf_counter()
            repo.load_into(sd, tag)  # the same work into tensors that exist: read + decode + hash only
            out["limit"] = time.perf_counter() - start
    out.setdefault("seconds", time.perf_counter() - start)
    out["digest"] = state_digest(sd)
    print(json.dumps(out))


def state_digest(sd: StateDict) -> str:
    import hashlib

    h = hashlib.blake2b(digest_size=16)
    for k in sorted(sd):
        h.update(k.encode())
        h.update(sd[k].contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if sd[k].numel() else b"")
    return h.hexdigest()


def fresh_load(impl: str, path: Path, tag: str = "") -> dict[str, Any]:
    os.sync()
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--child-load", impl, "--child-path", str(path),
         "--child-tag", tag],
        capture_output=True, text=True, check=False,
    )
    if proc.returncode != 0:
        raise SystemExit(f"load child {impl} failed:\n{proc.stderr[-3000:]}")
    got: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return got


def same_state(a: StateDict, b: StateDict) -> bool:
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and torch.equal(a[k], b[k]) for k in a
    )


def remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """Wall time of ``fn()``, after flushing other dirty data (so no run pays for the one before)."""
    os.sync()
    gc.collect()
    start = time.perf_counter()
    value = fn()
    return time.perf_counter() - start, value


def rotate(items: list[str], k: int) -> list[str]:
    k %= len(items)
    return items[k:] + items[:k]


# --------------------------------------------------------------------------- results


@dataclass
class Results:
    times: dict[tuple[int, str, str], list[float]] = field(default_factory=dict)
    extra: dict[tuple[int, str, str], list[int]] = field(default_factory=dict)  # cas bytes added
    notes: dict[str, Any] = field(default_factory=dict)

    def add(self, size: int, bench: str, impl: str, seconds: float, added: int | None = None) -> None:
        self.times.setdefault((size, bench, impl), []).append(seconds)
        if added is not None:
            self.extra.setdefault((size, bench, impl), []).append(added)

    def median(self, size: int, bench: str, impl: str) -> float | None:
        ts = self.times.get((size, bench, impl))
        return statistics.median(ts) if ts else None


def cas_revision() -> str:
    """The git revision of the checkout being measured (``-dirty`` if cas/ has local changes)."""
    root = Path(__file__).resolve().parent.parent
    try:
        rev = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--", "cas"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return rev + ("-dirty" if dirty else "")


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def memory_note() -> str:
    """A warning when this VM hands freed memory back to its host (virtio free page reporting): the
    first touch of such a page then faults in the host too (~11 µs instead of ~0.3 measured), and
    whichever tool happens to get those pages runs up to ~10x slower that round."""
    try:
        cmdline = Path("/proc/cmdline").read_text()
    except OSError:
        return ""
    if "page_reporting" not in cmdline:
        return ""
    return ("This VM reports freed memory to its host (`page_reporting` on the kernel command line): a tool that "
            "gets such pages pays a host fault on each first touch, so single rounds swing by up to ~10x; read "
            "min-max beside the medians.")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


@contextmanager
def workdir(base: Path, name: str) -> Iterator[Path]:
    path = base / name
    path.mkdir(parents=True, exist_ok=False)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


# --------------------------------------------------------------------------- the rounds


def run_round(sd: StateDict, size: int, rnd: int, base: Path, res: Results, check: bool) -> None:
    nbytes = nbytes_of(sd)
    with workdir(base, f"round-{size}-{rnd}") as wd:
        t_file, s_file = wd / "model.pt", wd / "model.safetensors"
        t_file_base = wd / "model-base.pt"
        repo_paths = {"cas none": wd / "repo-none", "cas default": wd / "repo-default"}
        repos = {
            name: cas.Repository.init(path, compression=name.removeprefix("cas ")) for name, path in repo_paths.items()
        }
        try:
            # first save ------------------------------------------------------------
            for impl in rotate(["torch.save", "safetensors", "cas none", "cas default"], rnd):
                if impl == "torch.save":
                    secs, _ = timed(lambda: torch_save(sd, t_file))
                    res.add(size, "first save", impl, secs)
                    shutil.copyfile(t_file, t_file_base)
                elif impl == "safetensors":
                    secs, _ = timed(lambda: safetensors_save(sd, s_file))
                    res.add(size, "first save", impl, secs)
                else:
                    repo = repos[impl]
                    secs, snap = timed(lambda repo=repo: repo.save(sd, tag="base"))
                    res.add(size, "first save", impl, secs, snap.bytes_added)
            log(f"  {format_size(size)} round {rnd + 1}: first saves done")

            base_digest = state_digest(sd) if check else None

            # incremental saves (in the process that made the previous save) ----------
            for level in CHANGE_LEVELS:
                bench = f"incremental {level:.0%} changed"
                names = pick_changed(sd, level, SEED + rnd)
                mutate(sd, names, SEED + 1000 * rnd + int(level * 100))
                changed = sum(sd[n].numel() * sd[n].element_size() for n in names)
                res.notes.setdefault("changed", {})[f"{format_size(size)} {bench}"] = (
                    f"{len(names)}/{len(sd)} tensors, {changed / nbytes:.1%} of bytes"
                )
                remove(t_file)
                for impl in rotate(["torch.save", "cas none", "cas default"], rnd):
                    if impl == "torch.save":
                        secs, _ = timed(lambda: torch_save(sd, t_file))
                        res.add(size, bench, impl, secs)
                        if level == 0.10:
                            os.replace(t_file, wd / "model-inc10.pt")  # what the delta loads are set against
                            save_file(sd, wd / "model-inc10.safetensors")
                        remove(t_file)
                    else:
                        repo = repos[impl]
                        tag = f"inc{int(level * 100)}"
                        secs, snap = timed(lambda repo=repo, tag=tag: repo.save(sd, tag=tag))
                        res.add(size, bench, impl, secs, snap.bytes_added)
                if level == 0.10:
                    inc10_digest = state_digest(sd) if check else None
            log(f"  {format_size(size)} round {rnd + 1}: incremental saves done")

            # incremental 10 % after a reopen (a resumed trainer's first save) ------------
            for repo in repos.values():
                repo.close()
            names = pick_changed(sd, 0.10, SEED + 7 + rnd)
            mutate(sd, names, SEED + 5000 + rnd)
            for impl in rotate(["torch.save", "cas none", "cas default"], rnd):
                if impl == "torch.save":
                    secs, _ = timed(lambda: torch_save(sd, t_file))
                    res.add(size, "incremental 10% after reopen", impl, secs)
                    remove(t_file)
                else:
                    def reopen_save(impl: str = impl) -> Any:
                        with cas.Repository.open(repo_paths[impl]) as repo:
                            return repo.save(sd, tag="reopen10")
                    secs, snap = timed(reopen_save)
                    res.add(size, "incremental 10% after reopen", impl, secs, snap.bytes_added)
            log(f"  {format_size(size)} round {rnd + 1}: saves after a reopen done")

            # verified loads, each in a fresh process -------------------------------------
            jobs = [
                ("load keyframes", "torch.load", t_file_base, "", base_digest),
                ("load keyframes", "safetensors (pread)", s_file, "", base_digest),
                ("load keyframes", "cas none", repo_paths["cas none"], "base", base_digest),
                ("load keyframes", "cas default", repo_paths["cas default"], "base", base_digest),
                ("load with deltas", "torch.load", wd / "model-inc10.pt", "", inc10_digest),
                ("load with deltas", "safetensors (pread)", wd / "model-inc10.safetensors", "", inc10_digest),
                ("load with deltas", "cas none", repo_paths["cas none"], "inc10", inc10_digest),
                ("load with deltas", "cas default", repo_paths["cas default"], "inc10", inc10_digest),
            ]
            for k in rotate(list(range(len(jobs))), rnd):
                bench, impl, path, tag, want = jobs[k]
                got = fresh_load(impl, path, tag)
                res.add(size, bench, impl, got["seconds"])
                if "limit" in got:
                    res.add(size, bench, f"{impl} (limit: load_into)", got["limit"])
                if want is not None and got["digest"] != want:
                    raise SystemExit(f"{bench}: {impl} loaded a state dict that differs from the one saved")
            log(f"  {format_size(size)} round {rnd + 1}: fresh-process loads done")
        finally:
            for repo in repos.values():
                repo.close()


# --------------------------------------------------------------------------- peak RSS (child processes)


def proc_status() -> dict[str, int]:
    """VmRSS / VmHWM of this process, in bytes."""
    out: dict[str, int] = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) * 1024
    return out


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0: write 5 to clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def child_rss(impl: str, size: int, directory: Path) -> None:
    """Run in a fresh process: build the dict, then save it once; print the RSS figures as JSON."""
    sd = build_state_dict(size)
    gc.collect()
    built = proc_status()
    reset = reset_peak_rss()
    before = proc_status()
    start = time.perf_counter()
    if impl == "torch.save":
        torch_save(sd, directory / "model.pt")
    elif impl == "safetensors":
        safetensors_save(sd, directory / "model.safetensors")
    else:
        with cas.Repository.init(directory / "repo", compression=impl.removeprefix("cas ")) as repo:
            repo.save(sd, tag="base")
    seconds = time.perf_counter() - start
    after = proc_status()
    baseline = before["VmHWM"] if reset else max(built["VmHWM"], built["VmRSS"])
    print(
        json.dumps(
            {
                "impl": impl,
                "state_bytes": nbytes_of(sd),
                "rss_built": built["VmRSS"],
                "hwm_built": built["VmHWM"],
                "baseline": baseline,
                "hwm_after": after["VmHWM"],
                "increase": after["VmHWM"] - baseline,
                "hwm_reset": reset,
                "seconds": seconds,
            }
        )
    )


def measure_rss(size: int, base: Path, impls: list[str]) -> list[dict[str, Any]]:
    rows = []
    for impl in impls:
        with workdir(base, f"rss-{impl.replace(' ', '-').replace('.', '')}") as wd:
            proc = subprocess.run(
                [
                    sys.executable,
                    str(Path(__file__).resolve()),
                    "--child-rss",
                    impl,
                    "--child-size",
                    str(size),
                    "--dir",
                    str(wd),
                ],
                capture_output=True,
                text=True,
                check=False,
            )
        if proc.returncode != 0:
            raise SystemExit(f"RSS child for {impl} failed:\n{proc.stderr}")
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        log(f"  peak RSS {impl}: +{rows[-1]['increase'] / MIB:.0f} MiB")
    return rows


# --------------------------------------------------------------------------- report


TARGETS: dict[tuple[str, str], tuple[str, float]] = {
    # (bench, impl): (peer, minimum speed of cas relative to the peer)
    ("first save", "cas none"): ("torch.save", 1.0),
    ("first save", "cas default"): ("torch.save", 1.5),
    ("incremental 0% changed", "cas none"): ("torch.save", 5.0),
    ("incremental 0% changed", "cas default"): ("torch.save", 5.0),
    ("incremental 10% changed", "cas none"): ("torch.save", 10.0),
    ("incremental 10% changed", "cas default"): ("torch.save", 10.0),
    ("incremental 10% after reopen", "cas none"): ("torch.save", 5.0),
    ("incremental 10% after reopen", "cas default"): ("torch.save", 5.0),
    ("load keyframes", "cas none"): ("torch.load", 1.3),
    ("load keyframes", "cas default"): ("torch.load", 1.3),
    ("load with deltas", "cas none"): ("torch.load", 1.3),
    ("load with deltas", "cas default"): ("torch.load", 1.3),
}


def report(res: Results, sizes: list[int], actual: dict[int, int], rss: list[dict[str, Any]], args: Any) -> str:
    lines = [
        "# cas throughput",
        "",
        f"{platform.node()} · {os.cpu_count()} CPUs · Python {platform.python_version()} · torch {torch.__version__}"
        f" · cas {res.notes.get('revision')} · {args.rounds} interleaved rounds, median"
        f" · data in {args.dir or tempfile.gettempdir()}",
        f"Load average at start / end: {res.notes.get('loadavg_start')} / {res.notes.get('loadavg_end')} "
        "(other processes on the machine add noise, mostly to the disk-bound saves).",
        *([memory_note()] if memory_note() else []),
        "",
        "GB/s = 1e9 bytes of state dict per second. `vs torch` / `vs st` = speed of the row relative to torch "
        "(torch.save or torch.load) / safetensors (save_file; for loads load_file with the pread backend) in the "
        "same benchmark (>1 = faster). All writers fsync. "
        "Loads read from the page cache (it cannot be dropped here); cas loads verify every chunk's BLAKE3. "
        "Incremental: the dict is changed in place, then saved again into the repo that holds the previous "
        "snapshot; torch.save writes it whole.",
        "",
        "| size | benchmark | impl | median s | min-max s | GB/s | vs torch | vs st | cas stored MiB | target | ok |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    benches = ["first save", *(f"incremental {lv:.0%} changed" for lv in CHANGE_LEVELS),
               "incremental 10% after reopen", "load keyframes", "load with deltas"]
    for size in sizes:
        n = actual[size]
        for bench in benches:
            impls = [impl for (sz, b, impl) in res.times if sz == size and b == bench]
            is_load = bench.startswith("load")
            torch_peer = "torch.load" if is_load else "torch.save"
            st_peer = "safetensors (pread)" if is_load else "safetensors"
            t_torch = res.median(size, bench, torch_peer)
            t_st = res.median(size, bench, st_peer)
            for impl in impls:
                t = res.median(size, bench, impl)
                assert t is not None
                vs_torch = f"{t_torch / t:.2f}" if t_torch else "—"
                vs_st = f"{t_st / t:.2f}" if t_st else "—"
                added = res.extra.get((size, bench, impl))
                stored = f"{statistics.median(added) / MIB:.1f}" if added else ""
                target, ok = "", ""
                if (bench, impl) in TARGETS:
                    peer, minimum = TARGETS[(bench, impl)]
                    t_peer = res.median(size, bench, peer)
                    target = f"≥{minimum:g}x {peer}"
                    ok = "yes" if t_peer and t_peer / t >= minimum else "**no**"
                ts = res.times[(size, bench, impl)]
                lines.append(
                    f"| {format_size(size)} ({n / MIB:.0f} MiB) | {bench} | {impl} | {t:.3f} "
                    f"| {min(ts):.2f}-{max(ts):.2f} | {n / t / 1e9:.2f} "
                    f"| {vs_torch} | {vs_st} | {stored} | {target} | {ok} |"
                )
    changed = res.notes.get("changed", {})
    if changed:
        lines += [
            "",
            "Changed per incremental benchmark (last round): " + "; ".join(f"{k}: {v}" for k, v in changed.items()),
        ]
    if rss:
        n = rss[0]["state_bytes"]
        limit = 256 * MIB + 64 * MIB
        lines += [
            "",
            f"## Saver peak RSS above the state dict ({n / MIB:.0f} MiB dict, one fresh process per save)",
            "",
            "Increase = VmHWM after the save - RSS after building the dict"
            + (" (VmHWM reset via /proc/self/clear_refs)." if all(r["hwm_reset"] for r in rss) else "."),
            "",
            "| impl | RSS after build MiB | peak during save MiB | increase MiB | save s | target | ok |",
            "|---|---:|---:|---:|---:|---|---|",
        ]
        for r in rss:
            is_cas = r["impl"].startswith("cas")
            target = "≤ 320 MiB (256 MiB + one 64 MiB pack)" if is_cas else ""
            ok = ("yes" if r["increase"] <= limit else "**no**") if is_cas else ""
            lines.append(
                f"| {r['impl']} | {r['baseline'] / MIB:.0f} | {r['hwm_after'] / MIB:.0f} | "
                f"{r['increase'] / MIB:.0f} | {r['seconds']:.2f} | {target} | {ok} |"
            )
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="64M,256M,1G", help="comma-separated state dict sizes (K/M/G suffixes)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per size (median reported)")
    parser.add_argument("--dir", default=None, help="directory for files and repos (default: a temp dir)")
    parser.add_argument("--no-rss", action="store_true", help="skip the peak-RSS child processes")
    parser.add_argument(
        "--rss-peers", action="store_true", help="also measure the peak RSS of torch.save and safetensors"
    )
    parser.add_argument("--child-rss", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-size", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--child-load", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-path", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-tag", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child_load:
        child_load(args.child_load, args.child_path, args.child_tag)
        return 0

    if args.child_rss:
        child_rss(args.child_rss, args.child_size, Path(args.dir))
        return 0

    sizes = [parse_size(s) for s in args.sizes.split(",") if s.strip()]
    if not sizes or args.rounds < 1:
        parser.error("need at least one size and one round")
    parent = Path(args.dir) if args.dir else Path(tempfile.gettempdir())
    parent.mkdir(parents=True, exist_ok=True)
    base = Path(tempfile.mkdtemp(prefix="cas-bench-", dir=parent))
    res = Results()
    actual: dict[int, int] = {}
    rss: list[dict[str, Any]] = []
    started = time.perf_counter()
    res.notes["loadavg_start"] = loadavg()
    res.notes["revision"] = cas_revision()
    res.notes["kernels"] = "numba" if cas.planes.warm_up() else "numpy fallback"  # not inside the first save
    try:
        for size in sizes:
            log(f"size {format_size(size)}: building the state dict")
            sd = build_state_dict(size)
            actual[size] = nbytes_of(sd)
            shape = plan_shape(size)
            res.notes.setdefault("shapes", {})[format_size(size)] = (
                f"{len(sd)} tensors, d={shape.d_model}, ff={shape.d_ff}, vocab={shape.vocab}, layers={shape.layers}"
            )
            for rnd in range(args.rounds):
                run_round(sd, size, rnd, base, res, check=rnd == 0)
            del sd
            gc.collect()
        if not args.no_rss:
            largest = max(sizes)
            log(f"peak RSS at {format_size(largest)}")
            peers = ["torch.save", "safetensors"] if args.rss_peers else []
            rss = measure_rss(largest, base, [*peers, "cas none", "cas default"])
    finally:
        shutil.rmtree(base, ignore_errors=True)

    res.notes["loadavg_end"] = loadavg()
    text = report(res, sizes, actual, rss, args)
    shapes = res.notes.get("shapes", {})
    text += "\nState dicts: " + "; ".join(f"{k}: {v}" for k, v in shapes.items()) + "\n"
    text += f"\nTotal wall time {time.perf_counter() - started:.0f} s.\n"
    print(text, end="")
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    (OUT_DIR / "throughput.md").write_text(text)
    raw = {
        "times": [{"size": s, "bench": b, "impl": i, "seconds": ts} for (s, b, i), ts in res.times.items()],
        "stored": [{"size": s, "bench": b, "impl": i, "bytes": v} for (s, b, i), v in res.extra.items()],
        "actual_bytes": {str(k): v for k, v in actual.items()},
        "rss": rss,
        "notes": res.notes,
    }
    (OUT_DIR / "throughput.json").write_text(json.dumps(raw, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
