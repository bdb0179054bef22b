"""GC benchmark: mark / sweep time and peak memory of ``Repository.gc`` as the index grows.

Run from the repository root::

    .venv/bin/python bench/gc.py [--sizes 1e4,1e5,1e6] [--snapshots 50] [--dir PATH] [--budget 540] [--profile]

For each size N a fresh repository (chunk size 4 KiB, pack size 1 MiB, ``max_delta_depth``
0 unless ``--delta-depth``) gets ``--snapshots`` saves whose chunks add up to about N
index entries. Every 4 KiB chunk is unique but compresses well: an int64 tensor of
zeros with a distinct counter in the first element of every 512-element (4 KiB)
chunk. Snapshot i holds

* ``new``: K chunks no other snapshot has (counters of block i);
* ``carry``: the first K/8 chunks of block i-1 (shared with the previous snapshot);
* ``frozen``: K/8 chunks every snapshot shares.

Then ``forget(keep_last=snapshots // 2)`` and ``gc()``. The GC runs in a fresh child
process that opens the repository, resets its peak-RSS counter (``/proc/self/clear_refs``)
and samples ``/proc/self/status`` while GC runs, so the peak measures GC alone and
not the torch import or the build. Packs and index are in the page cache (they were
just written); no cache is dropped. After GC the live and dead chunk counts are
checked against the counts the layout implies (exact with no delta chunks), the
newest snapshot is loaded back and compared, and ``verify()`` must find every chunk
of every kept snapshot.

The build of a size stops early when what follows it would overrun the time budget
(``--budget`` seconds for the whole run, default 540); the table then says how many
snapshots were built. The markdown report goes to stdout and to ``bench/out/gc.md``;
``--profile`` also runs every GC a second time under cProfile (on a copy of the
repository) and writes ``bench/out/gc_profile_<N>.txt``.
"""

from __future__ import annotations

import argparse
import cProfile
import inspect
import io
import json
import math
import os
import platform
import pstats
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any

OUT_DIR = Path(__file__).resolve().parent / "out"
CHUNK_SIZE = 4096
ELEMS_PER_CHUNK = CHUNK_SIZE // 8  # int64
FROZEN_BASE = 1 << 40  # counters of the shared block, far from the per-snapshot ones
# first guess of what follows a build (GC child, checks, clean-up): fixed seconds + seconds per index entry
AFTER_BUILD_GUESS = (15.0, 4e-4)
BUDGET_MARGIN = 1.2  # on the per-entry part of that model when it is taken from the previous size
MIB = 1 << 20


# --------------------------------------------------------------------------- child: one GC


def _proc_status() -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon, RssFile of this process, in bytes."""
    wanted = ("VmRSS", "VmHWM", "RssAnon", "RssFile")
    out: dict[str, int] = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in wanted:
                out[key] = int(value.split()[0]) * 1024
    return out


def _reset_peak_rss() -> bool:
    """Reset VmHWM (and ru_maxrss) to the current RSS; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


class RssSampler:
    """Highest RssAnon and RssFile seen, sampled every ``interval`` seconds on a thread."""

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval
        self.max_anon = 0
        self.max_file = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        st = _proc_status()
        self.max_anon = max(self.max_anon, st.get("RssAnon", 0))
        self.max_file = max(self.max_file, st.get("RssFile", 0))
        self.samples += 1

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> RssSampler:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


def child_main(repo_path: str, out_path: str, profile_path: str | None) -> None:
    """Open the repository, run one GC, write what was measured as JSON."""
    import cas

    t_open = time.perf_counter()
    repo = cas.Repository.open(repo_path)
    open_seconds = time.perf_counter() - t_open
    entries_before = repo.index.chunk_count()
    packs_before = len(repo.index.packs())
    before = _proc_status()
    reset = _reset_peak_rss()
    profiler = cProfile.Profile() if profile_path else None
    with RssSampler() as sampler:
        cpu0 = os.times()
        t0 = time.perf_counter()
        if profiler is not None:
            profiler.enable()
        report = repo.gc()
        if profiler is not None:
            profiler.disable()
        gc_seconds = time.perf_counter() - t0
        cpu1 = os.times()
    after = _proc_status()
    entries_after = repo.index.chunk_count()
    packs_after = len(repo.index.packs())
    repo.close()
    if profiler is not None and profile_path:
        buf = io.StringIO()
        stats = pstats.Stats(profiler, stream=buf)
        buf.write(f"GC of {repo_path}: {entries_before} index entries, {gc_seconds:.2f} s under cProfile\n\n")
        stats.sort_stats("cumulative").print_stats(30)
        stats.sort_stats("tottime").print_stats(25)
        Path(profile_path).write_text(buf.getvalue())
    result = {
        "report": report.to_dict(),
        "open_seconds": open_seconds,
        "gc_seconds": gc_seconds,
        "gc_cpu_seconds": (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system),
        "entries_before": entries_before,
        "entries_after": entries_after,
        "packs_before": packs_before,
        "packs_after": packs_after,
        "peak_reset": reset,
        "rss_open": before["VmRSS"],
        "anon_open": before.get("RssAnon", 0),
        "file_open": before.get("RssFile", 0),
        "hwm_gc": after["VmHWM"],
        "anon_peak": sampler.max_anon,
        "file_peak": sampler.max_file,
        "samples": sampler.samples,
    }
    Path(out_path).write_text(json.dumps(result))


# --------------------------------------------------------------------------- parent: build and measure


@dataclass
class Layout:
    """How a target index size is spread over the snapshots."""

    target: int
    snapshots: int
    new: int  # K: chunks only snapshot i has
    carry: int  # first chunks of the previous snapshot's block
    frozen: int  # chunks every snapshot has

    @classmethod
    def for_target(cls, target: int, snapshots: int) -> Layout:
        # entries = snapshots * K + carry(block -1) + frozen + 2 nodes per snapshot, carry = frozen = K / 8
        k = max(8, round((target - 2 * snapshots) / (snapshots + 0.25)))
        return cls(target, snapshots, k, max(1, k // 8), max(1, k // 8))

    def block_start(self, i: int) -> int:
        """First counter of block i (block -1 is the carry of snapshot 0)."""
        return 1 + (i + 1) * self.new

    def expected(self, built: int, keep: int) -> tuple[int, int, int]:
        """(entries, live, dead) once ``built`` snapshots were saved and the newest ``keep`` kept."""
        entries = built * (self.new + 2) + self.carry + self.frozen
        live = keep * (self.new + 2) + self.carry + self.frozen
        return entries, live, entries - live


@dataclass
class Result:
    layout: Layout
    built: int = 0
    kept: int = 0
    partial: bool = False
    build_seconds: float = 0.0
    save_seconds: list[float] = field(default_factory=list)
    repo_bytes_before: int = 0
    repo_bytes_after: int = 0
    index_bytes: int = 0
    child: dict[str, Any] = field(default_factory=dict)
    checks: list[str] = field(default_factory=list)
    load_ok: bool = False
    after_build_seconds: float = 0.0  # GC child(ren), checks and clean-up: what the time budget must leave
    child_overhead_seconds: float = 0.0  # child wall time outside gc(): interpreter, imports, open

    @property
    def entries(self) -> int:
        return int(self.child.get("entries_before", 0))

    @property
    def gc(self) -> dict[str, Any]:
        return dict(self.child.get("report", {}))

    @property
    def hwm_delta(self) -> int:
        return int(self.child["hwm_gc"]) - int(self.child["rss_open"])

    @property
    def anon_delta(self) -> int:
        return int(self.child["anon_peak"]) - int(self.child["anon_open"])


def block(start: int, n: int) -> Any:
    import torch

    t = torch.zeros(n * ELEMS_PER_CHUNK, dtype=torch.int64)
    t[::ELEMS_PER_CHUNK] = torch.arange(start, start + n, dtype=torch.int64)
    return t


def tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def state_of(layout: Layout, i: int) -> dict[str, Any]:
    return {
        "frozen": block(FROZEN_BASE, layout.frozen),
        "carry": block(layout.block_start(i - 1), layout.carry),
        "new": block(layout.block_start(i), layout.new),
    }


def _run_child(repo_dir: Path, out_json: Path, profile_path: Path | None = None) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(repo_dir), "--child-out", str(out_json)]
    if profile_path is not None:
        cmd += ["--child-profile", str(profile_path)]
    subprocess.run(cmd, check=True)
    data: dict[str, Any] = json.loads(out_json.read_text())
    out_json.unlink()
    return data


def run_size(
    layout: Layout,
    work: Path,
    args: argparse.Namespace,
    budget_end: float,
    after_model: tuple[float, float],
) -> Result:
    """Build, forget, GC in a child, check. The build stops early when what follows it (``after_model``:
    fixed seconds + seconds per index entry) would no longer fit before ``budget_end``."""
    import torch

    import cas
    from cas.errors import CorruptionError

    res = Result(layout)
    repo_dir = work / f"repo-{layout.target}"
    print(f"[{layout.target:.0e}] building: {layout.snapshots} snapshots x ({layout.new} new + {layout.carry} carried"
          f" + {layout.frozen} frozen) chunks of {CHUNK_SIZE} B", file=sys.stderr, flush=True)
    options: dict[str, Any] = {"chunk_size": CHUNK_SIZE, "pack_size": args.pack_size}
    if "max_delta_depth" in inspect.signature(cas.Repository.init).parameters:
        options["max_delta_depth"] = args.delta_depth
    repo = cas.Repository.init(repo_dir, **options)
    profile = args.profile
    t_build = time.perf_counter()
    try:
        for i in range(layout.snapshots):
            if i >= 2:
                per_save = (time.perf_counter() - t_build) / i
                fixed, per_entry = after_model
                after = (fixed + per_entry * layout.expected(i + 1, 0)[0]) * (2 if profile else 1)
                if time.perf_counter() + per_save + after > budget_end:
                    res.partial = True
                    print(f"[{layout.target:.0e}] time budget: build stops after {i} snapshots",
                          file=sys.stderr, flush=True)
                    break
            t0 = time.perf_counter()
            repo.save(state_of(layout, i), tag=f"step-{i:04d}", metadata={"step": i})
            res.save_seconds.append(time.perf_counter() - t0)
            res.built = i + 1
        res.build_seconds = time.perf_counter() - t_build
        res.kept = res.built // 2
        repo.forget(keep_last=res.kept)
    finally:
        repo.close()
    res.repo_bytes_before = tree_bytes(repo_dir)
    res.index_bytes = tree_bytes(repo_dir / "index")
    print(f"[{layout.target:.0e}] built {res.built} snapshots in {res.build_seconds:.1f} s; gc ...",
          file=sys.stderr, flush=True)
    t_after = time.perf_counter()

    prof_dir = work / f"repo-{layout.target}-profile"
    if profile:
        shutil.copytree(repo_dir, prof_dir)
    t_child = time.perf_counter()
    res.child = _run_child(repo_dir, work / f"gc-{layout.target}.json")
    res.child_overhead_seconds = time.perf_counter() - t_child - float(res.child["gc_seconds"])
    res.repo_bytes_after = tree_bytes(repo_dir)
    if profile:
        OUT_DIR.mkdir(parents=True, exist_ok=True)
        _run_child(prof_dir, work / f"gc-{layout.target}-profile.json", OUT_DIR / f"gc_profile_{layout.target}.txt")
        shutil.rmtree(prof_dir)

    # checks: the counts the layout implies, and the newest snapshot reads back intact
    entries, live, dead = layout.expected(res.built, res.kept)
    rep = res.gc
    for name, want, got in (
        ("index entries before gc", entries, res.entries),
        ("live chunks", live, rep["live_chunks"]),
        ("dead chunks", dead, rep["dead_chunks"]),
        ("index entries after gc", live, res.child["entries_after"]),
    ):
        if want != got:
            res.checks.append(f"{name}: expected {want}, got {got}")
    load_error = ""
    with cas.Repository.open(repo_dir) as repo:
        try:
            loaded = repo.load("latest")
            expected_state = state_of(layout, res.built - 1)
            res.load_ok = all(torch.equal(loaded[k], v) for k, v in expected_state.items())
        except CorruptionError as exc:
            load_error = f": {type(exc).__name__}: {exc}"
        left = len(repo.snapshots())
        verify = repo.verify()  # every chunk a kept snapshot reaches is indexed, in a pack that exists
    if left != res.kept:
        res.checks.append(f"snapshots after gc: expected {res.kept}, got {left}")
    if not res.load_ok:
        res.checks.append(f"newest snapshot does not load back equal after gc{load_error}")
    if not verify.ok:
        hit = {p.snapshot for p in verify.problems}
        res.checks.append(
            f"verify after gc: {len(verify.problems)} problems in {len(hit)} of {left} kept snapshots, "
            f"first: {verify.problems[0].message}"
        )
    shutil.rmtree(repo_dir)
    res.after_build_seconds = time.perf_counter() - t_after
    return res


# --------------------------------------------------------------------------- report


def fmt_bytes(n: float) -> str:
    sign = "-" if n < 0 else ""
    n = abs(n)
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{sign}{n / scale:.1f} {unit}"
    return f"{sign}{n:.0f} B"


def fmt_ratio(a: float, b: float) -> str:
    return f"x{b / a:.1f}" if a > 0 else "n/a"


def exponent(a: float, b: float, na: int, nb: int) -> str:
    """Scaling exponent p in cost ~ entries^p between two sizes."""
    if a <= 0 or b <= 0 or na <= 0 or nb <= na:
        return "n/a"
    return f"{math.log(b / a) / math.log(nb / na):.2f}"


def code_version() -> str:
    """Where ``cas`` was imported from, and its git commit (``-dirty`` with uncommitted changes)."""
    import cas

    root = Path(cas.__file__).resolve().parent.parent
    try:
        out = subprocess.run(["git", "-C", str(root), "describe", "--always", "--dirty"],
                             capture_output=True, text=True, check=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return f"cas from {root}"
    return f"cas from {root} at {out.stdout.strip()}"


def render(results: list[Result], args: argparse.Namespace, wall: float,
           loads: tuple[tuple[float, float, float], tuple[float, float, float]]) -> str:
    import torch

    cpus = os.cpu_count() or 1
    busy = (" (above the CPU count: other work shared the CPUs, so wall times are inflated; compare CPU seconds)"
            if max(loads[0][0], loads[1][0]) > cpus else "")
    lines = [
        "# cas GC benchmark",
        "",
        f"`{' '.join(['.venv/bin/python', 'bench/gc.py', *sys.argv[1:]])}` - "
        f"{time.strftime('%Y-%m-%d %H:%M')}, {platform.machine()} {os.cpu_count()} CPUs, Python "
        f"{platform.python_version()}, torch {torch.__version__}, {code_version()}; whole run {wall:.0f} s; "
        f"1-minute load average {loads[0][0]:.1f} at the start, {loads[1][0]:.1f} at the end{busy}.",
        "",
        f"Chunk size {CHUNK_SIZE} B, pack size {fmt_bytes(args.pack_size)}, compression default, "
        f"max_delta_depth {args.delta_depth}; every "
        "chunk unique but compressible. Snapshot i = K new chunks + the first K/8 chunks of snapshot i-1 + "
        "K/8 chunks shared by all; `forget(keep_last=built // 2)`, then `gc()` in a fresh process. "
        "Packs and index are in the page cache.",
        "",
        "## Repositories",
        "",
        "| target | index entries | snapshots built / kept | chunks per snapshot (new + carried + frozen) "
        "| packs | repo on disk | LMDB index | build s | s per save |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lay = r.layout
        built = f"{r.built} / {r.kept}" + (f" (cut short, {lay.snapshots} planned)" if r.partial else "")
        per_save = r.build_seconds / r.built if r.built else 0.0
        lines.append(
            f"| {lay.target:.0e} | {r.entries:,} | {built} | {lay.new} + {lay.carry} + {lay.frozen} "
            f"| {r.child['packs_before']} | {fmt_bytes(r.repo_bytes_before)} | {fmt_bytes(r.index_bytes)} "
            f"| {r.build_seconds:.1f} | {per_save:.2f} |"
        )
    lines += [
        "",
        "## GC",
        "",
        "RSS after open: the child after `import cas` (torch) and `Repository.open`. Peak: VmHWM during "
        "`gc()` after resetting it at the start (`/proc/self/clear_refs`), so it is GC's own peak. "
        "Δ peak = peak - RSS after open; it includes LMDB pages mapped while scanning the index "
        "(file-backed, RssFile). Δ anon = sampled (5 ms) peak RssAnon - RssAnon after open: the heap GC builds.",
        "",
        "| index entries | live / dead chunks | packs deleted / repacked / written | mark s | sweep s "
        "| gc total s | gc CPU s | µs per entry (wall / CPU) | bytes freed "
        "| RSS after open | peak RSS in gc | Δ peak RSS | Δ anon "
        "| Δ anon per entry |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        g, c = r.gc, r.child
        n = max(1, r.entries)
        lines.append(
            f"| {r.entries:,} | {g['live_chunks']:,} / {g['dead_chunks']:,} "
            f"| {g['packs_deleted']} / {g['packs_repacked']} / {g['packs_written']} "
            f"| {g['mark_seconds']:.2f} | {g['sweep_seconds']:.2f} | {c['gc_seconds']:.2f} "
            f"| {c['gc_cpu_seconds']:.2f} | {c['gc_seconds'] / n * 1e6:.0f} / {c['gc_cpu_seconds'] / n * 1e6:.0f} "
            f"| {fmt_bytes(g['bytes_freed'])} | {fmt_bytes(c['rss_open'])} "
            f"| {fmt_bytes(c['hwm_gc'])} | {fmt_bytes(r.hwm_delta)} | {fmt_bytes(r.anon_delta)} "
            f"| {r.anon_delta / n:.0f} B |"
        )
    if len(results) > 1:
        lines += [
            "",
            "## Growth between sizes",
            "",
            "Ratios of the larger size to the smaller; exponent p in cost ~ entries^p (1.0 = linear).",
            "",
            "| entries | entries x | mark x | sweep x | gc total x | gc CPU x | time exponent (CPU) "
            "| Δ peak RSS x | Δ anon x | memory exponent (anon) |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for a, b in pairwise(results):
            ga, gb = a.gc, b.gc
            lines.append(
                f"| {a.entries:,} → {b.entries:,} | {fmt_ratio(a.entries, b.entries)} "
                f"| {fmt_ratio(ga['mark_seconds'], gb['mark_seconds'])} "
                f"| {fmt_ratio(ga['sweep_seconds'], gb['sweep_seconds'])} "
                f"| {fmt_ratio(a.child['gc_seconds'], b.child['gc_seconds'])} "
                f"| {fmt_ratio(a.child['gc_cpu_seconds'], b.child['gc_cpu_seconds'])} "
                f"| {exponent(a.child['gc_cpu_seconds'], b.child['gc_cpu_seconds'], a.entries, b.entries)} "
                f"| {fmt_ratio(a.hwm_delta, b.hwm_delta)} | {fmt_ratio(a.anon_delta, b.anon_delta)} "
                f"| {exponent(a.anon_delta, b.anon_delta, a.entries, b.entries)} |"
            )
    lines += ["", "## Checks", ""]
    for r in results:
        peak_note = "" if r.child.get("peak_reset") else " (peak counter could not be reset: peak includes startup)"
        if r.checks:
            lines += [f"- {r.layout.target:.0e}: " + "; ".join(r.checks) + peak_note]
        else:
            lines.append(
                f"- {r.layout.target:.0e}: live/dead counts as the layout implies, {r.child['entries_after']:,} "
                f"entries left, newest snapshot loads back equal{peak_note}."
            )
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- main


def parse_sizes(text: str) -> list[int]:
    sizes = [int(float(s)) for s in text.split(",") if s.strip()]
    if not sizes or min(sizes) < 100:
        raise argparse.ArgumentTypeError("sizes must be at least 100 index entries")
    return sizes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=parse_sizes, default=[10_000, 100_000, 1_000_000],
                        help="target index entries, comma separated (default 1e4,1e5,1e6)")
    parser.add_argument("--snapshots", type=int, default=50, help="snapshots per repository (default 50)")
    parser.add_argument("--pack-size", type=int, default=1 * MIB, help="repository pack size in bytes (1 MiB)")
    parser.add_argument("--dir", type=Path, default=None, help="work directory (default: a temp dir in /tmp)")
    parser.add_argument("--budget", type=float, default=540.0,
                        help="seconds for the whole run; the last builds stop early to keep it (default 540)")
    parser.add_argument("--delta-depth", type=int, default=0,
                        help="max_delta_depth of the repositories (default 0: this data never deltas, and trying "
                             "costs the build ~5x)")
    parser.add_argument("--profile", action="store_true", help="also run each GC under cProfile, on a copy")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-out", help=argparse.SUPPRESS)
    parser.add_argument("--child-profile", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child_main(args.child, args.child_out, args.child_profile)
        return 0
    if args.snapshots < 2:
        parser.error("--snapshots must be at least 2")

    t_start = time.perf_counter()
    load_start = os.getloadavg()
    if args.dir is not None:
        args.dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="cas-gc-bench-", dir=args.dir))
    results: list[Result] = []
    failures: list[str] = []
    try:
        after_model = AFTER_BUILD_GUESS
        for target in sorted(args.sizes):
            try:
                res = run_size(Layout.for_target(target, args.snapshots), work, args, t_start + args.budget,
                               after_model)
            except Exception as exc:  # noqa: BLE001 - report the size as failed and keep the others
                failures.append(f"- {target:.0e}: failed: {type(exc).__name__}: {exc}")
                print(failures[-1], file=sys.stderr, flush=True)
                continue
            results.append(res)
            # what GC and checks took per entry here, with a margin, bounds the next build
            fixed = res.child_overhead_seconds + 5
            after = res.after_build_seconds / (2 if args.profile else 1)
            after_model = (fixed, BUDGET_MARGIN * max(0.0, after - fixed) / max(1, res.entries))
            print(f"[{target:.0e}] after the build: {res.after_build_seconds:.1f} s (gc child "
                  f"{res.child['gc_seconds'] + res.child_overhead_seconds:.1f} s)", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    loads = (load_start, os.getloadavg())
    text = render(results, args, time.perf_counter() - t_start, loads) + "".join(f + "\n" for f in failures)
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    (OUT_DIR / "gc.md").write_text(text)
    print(text)
    return 0 if not failures and all(not r.checks for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
