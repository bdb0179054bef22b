"""The `cas` command line. Errors are one line on stderr with the error class's exit code."""

from __future__ import annotations

import json
import logging
import math
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn, TransferSpeedColumn
from rich.table import Table

from cas.errors import CasError, UsageError
from cas.repository import (
    DEFAULT_CHUNK_SIZE,
    DEFAULT_MAX_CHAIN_COST,
    DEFAULT_MAX_DELTA_DEPTH,
    DEFAULT_PACK_SIZE,
    Repository,
)

console = Console()
err_console = Console(stderr=True)
UNITS = {"": 1, "K": 1 << 10, "KB": 1 << 10, "KIB": 1 << 10, "M": 1 << 20, "MB": 1 << 20, "MIB": 1 << 20,
         "G": 1 << 30, "GB": 1 << 30, "GIB": 1 << 30}


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def parse_size(text: str) -> int:
    t = text.strip().upper().replace(" ", "")
    num = t.rstrip("KMGIB")
    unit = t[len(num):]
    if not num.isdigit() or unit not in UNITS:
        raise UsageError(f"{text!r} is not a size (examples: 1048576, 1M, 4MiB)")
    return int(num) * UNITS[unit]


@contextmanager
def progress_bar(label: str) -> Iterator[Callable[[int, int], None]]:
    """A byte-progress bar on stderr (hidden when stderr is not a terminal)."""
    bar = Progress(
        "[progress.description]{task.description}", BarColumn(), DownloadColumn(), TransferSpeedColumn(),
        TimeRemainingColumn(), console=err_console, transient=True, disable=not err_console.is_terminal,
    )
    task = bar.add_task(label, total=None)

    def update(done: int, total: int) -> None:
        bar.update(task, completed=done, total=total)

    with bar:
        yield update


def emit_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, default=str))


class Context:
    def __init__(self, repo_path: str | None, storage_options: dict[str, Any]) -> None:
        self.repo_path = repo_path
        self.storage_options = storage_options

    def path(self) -> str:
        """The repository: a directory, ``file://...`` or ``s3://BUCKET/PREFIX``."""
        if not self.repo_path:
            raise UsageError("no repository given: pass --repo PATH_OR_URL or set CAS_REPO")
        return self.repo_path

    def open(self) -> Repository:
        return Repository.open(self.path(), storage_options=self.storage_options or None)


pass_ctx = click.make_pass_decorator(Context)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--repo", "repo_path", envvar="CAS_REPO", metavar="PATH|URL",
              help="Repository: a directory or s3://BUCKET/PREFIX (or $CAS_REPO).")
@click.option("--endpoint", default=None, metavar="URL",
              help="S3-compatible endpoint, http:// allowed (default: $AWS_ENDPOINT_URL).")
@click.option("--region", default=None, help="S3 region (default: $AWS_REGION).")
@click.option("--timeout", type=float, default=None, help="Seconds before an unreachable store is an error.")
@click.version_option(package_name="cas")
@click.pass_context
def cli(ctx: click.Context, repo_path: str | None, endpoint: str | None, region: str | None,
        timeout: float | None) -> None:
    """cas: a content-addressed, deduplicating store for training checkpoints."""
    options = {k: v for k, v in {"endpoint": endpoint, "region": region, "timeout": timeout}.items() if v is not None}
    if options and (not repo_path or not repo_path.startswith("s3://")):
        raise UsageError("--endpoint, --region and --timeout apply to s3:// repositories only")
    ctx.obj = Context(repo_path, options)


@cli.command()
@click.option("--chunk-size", default=str(DEFAULT_CHUNK_SIZE), show_default=True, help="Tensor chunk size (e.g. 1M).")
@click.option("--pack-size", default=str(DEFAULT_PACK_SIZE), show_default=True, help="Target pack file size.")
@click.option("--compression", type=click.Choice(["none", "fast", "default", "max"]), default="default",
              show_default=True)
@click.option("--max-delta-depth", type=int, default=DEFAULT_MAX_DELTA_DEPTH, show_default=True,
              help="Most delta links below a chunk (0: no deltas).")
@click.option("--max-chain-cost", type=float, default=DEFAULT_MAX_CHAIN_COST, show_default=True,
              help="Most estimated restore time of a chunk at the end of its delta chain, in keyframe restores.")
@pass_ctx
def init(ctx: Context, chunk_size: str, pack_size: str, compression: str, max_delta_depth: int,
         max_chain_cost: float) -> None:
    """Create a new repository in an empty directory."""
    with Repository.init(ctx.path(), chunk_size=parse_size(chunk_size), pack_size=parse_size(pack_size),
                         compression=compression, max_delta_depth=max_delta_depth,
                         max_chain_cost=max_chain_cost, storage_options=ctx.storage_options or None) as repo:
        click.echo(f"created cas repository at {repo.url} (chunk size {human_bytes(repo.chunk_size)})")


@cli.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--tag", "-t", default=None, help="Tag of the new snapshot.")
@click.option("--compression", type=click.Choice(["none", "fast", "default", "max"]), default=None)
@click.option("--meta", "meta", multiple=True, metavar="KEY=VALUE", help="Metadata (VALUE parsed as JSON if it can).")
@pass_ctx
def save(
    ctx: Context, paths: tuple[Path, ...], tag: str | None, compression: str | None, meta: tuple[str, ...]
) -> None:
    """Import .pt/.pth/.safetensors files (or directories of them) as one snapshot."""
    from cas.importers import import_paths  # noqa: PLC0415 - torch only for commands that need it

    metadata: dict[str, Any] = {}
    for item in meta:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--meta takes KEY=VALUE, got {item!r}")
        try:
            metadata[key] = json.loads(value)
        except json.JSONDecodeError:
            metadata[key] = value
    state, source = import_paths(list(paths))
    metadata.setdefault("source", source)
    with ctx.open() as repo, progress_bar("saving") as update:
        snap = repo.save(state, tag=tag, metadata=metadata, compression=compression, progress=update)
    click.echo(f"saved snapshot {snap.short_id}" + (f" ({snap.tag})" if snap.tag else "")
               + f": {human_bytes(snap.logical_bytes)} logical, {human_bytes(snap.bytes_added)} added")


@cli.command(name="ls")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@pass_ctx
def ls_cmd(ctx: Context, as_json: bool) -> None:
    """List snapshots, oldest first."""
    with ctx.open() as repo:
        snaps = repo.snapshots()
        damaged = repo.damaged_snapshots() if len(snaps) < len(repo.refs()) else []
    if as_json:
        emit_json([s.to_dict() for s in snaps])
        return
    table = Table("id", "tag", "time (UTC)", "logical", "added", "tensors", "metadata")
    for s in snaps:
        meta = {k: v for k, v in s.metadata.items() if k != "source"}
        table.add_row(s.short_id, s.tag or "", s.datetime.strftime("%Y-%m-%d %H:%M:%S"), human_bytes(s.logical_bytes),
                      human_bytes(s.bytes_added), str(s.tensor_count), json.dumps(meta)[:60] if meta else "")
    for name, _why in damaged:
        table.add_row("DAMAGED", name, "", "", "", "", "`cas check` tells more; `cas rm` gives it up")
    console.print(table)


@cli.command()
@click.argument("snapshot")
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
def show(ctx: Context, snapshot: str, as_json: bool) -> None:
    """Show one snapshot: metadata and its tensors."""
    with ctx.open() as repo:
        snap = repo.resolve(snapshot)
        tensors = repo.tensors(snap.id)
    if as_json:
        emit_json({**snap.to_dict(), "tensors": tensors})
        return
    click.echo(f"snapshot {snap.id}\ntag      {snap.tag or '-'}\ntime     {snap.datetime.isoformat()}\n"
               f"parent   {snap.parent or '-'}\nlogical  {human_bytes(snap.logical_bytes)}\n"
               f"added    {human_bytes(snap.bytes_added)}\nmetadata {json.dumps(snap.metadata)}")
    table = Table("path", "dtype", "shape", "bytes")
    for t in tensors:
        table.add_row(t["path"], t["dtype"], "x".join(map(str, t["shape"])) or "()", human_bytes(t["nbytes"]))
    console.print(table)


@cli.command()
@click.argument("a")
@click.argument("b")
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
def diff(ctx: Context, a: str, b: str, as_json: bool) -> None:
    """Tensors added, removed and changed from snapshot A to B."""
    with ctx.open() as repo:
        report = repo.diff(a, b)
    if as_json:
        emit_json(report.to_dict())
        return
    for sign, paths in (("+", report.added), ("-", report.removed), ("M", report.changed),
                        ("~", report.values_changed)):
        for p in paths:
            click.echo(f"{sign} {p}")
    click.echo(f"{len(report.added)} added, {len(report.removed)} removed, {len(report.changed)} changed "
               f"({human_bytes(report.changed_bytes)}), {len(report.unchanged)} unchanged tensors; "
               f"{len(report.values_changed)} other values changed")


@cli.command()
@click.argument("snapshot")
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--force", is_flag=True, help="Overwrite OUT if it exists.")
@click.option("--allow-pickle", is_flag=True, help="Load values that were stored with pickle (trusted data only).")
@pass_ctx
def restore(ctx: Context, snapshot: str, out: Path, force: bool, allow_pickle: bool) -> None:
    """Write a snapshot to OUT as .pt or .safetensors (by extension)."""
    from cas.importers import export_file  # noqa: PLC0415 - torch only for commands that need it

    with ctx.open() as repo:
        snap = repo.resolve(snapshot)
        with progress_bar("restoring") as update:
            state = repo.load(snap.id, allow_pickle=allow_pickle, progress=update)
    export_file(state, out, force=force, metadata=snap.metadata)
    click.echo(f"restored snapshot {snap.short_id} to {out}")


@cli.command()
@click.option("--read-data", is_flag=True, help="Read and re-hash every chunk (slower, complete).")
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
def verify(ctx: Context, read_data: bool, as_json: bool) -> None:
    """Check every snapshot reaches intact chunks; exit 1 on any problem."""
    with ctx.open() as repo, progress_bar("verifying") as update:
        report = repo.verify(read_data=read_data, progress=update)
    if as_json:
        emit_json(report.to_dict())
    else:
        for problem in report.problems:
            click.echo(str(problem))
        status = "ok" if report.ok else f"{len(report.problems)} problem(s)"
        click.echo(f"verify {'--read-data ' if read_data else ''}{status}: {report.snapshots_checked} snapshots, "
                   f"{report.chunks_checked} chunks, {report.packs_checked} packs, "
                   f"{human_bytes(report.bytes_read)} read")
    if not report.ok:
        sys.exit(1)


@cli.command()
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
def stats(ctx: Context, as_json: bool) -> None:
    """Logical vs stored bytes, dedup and compression ratios."""
    with ctx.open() as repo:
        report = repo.stats()
    if as_json:
        emit_json(report.to_dict())
        return
    click.echo(f"snapshots         {report.snapshot_count}\n"
               f"logical bytes     {human_bytes(report.logical_bytes)}\n"
               f"unique bytes      {human_bytes(report.unique_bytes)}  (dedup {report.dedup_ratio:.2f}x)\n"
               f"stored bytes      {human_bytes(report.stored_bytes)}  (compression {report.compression_ratio:.2f}x)\n"
               f"overall ratio     {report.ratio:.2f}x\n"
               f"chunks / packs    {report.chunk_count} / {report.pack_count}\n"
               f"delta chains      deepest {report.deepest_chain} links, "
               f"costliest {report.costliest_chain:.2f} keyframe restores (estimated)")
    if report.codecs:
        codecs = Table("codec", "chunks", "raw", "stored", "stored / raw")
        for name, row in sorted(report.codecs.items(), key=lambda kv: -kv[1]["stored_bytes"]):
            share = row["stored_bytes"] / row["raw_bytes"] if row["raw_bytes"] else 1.0
            codecs.add_row(name, str(row["chunks"]), human_bytes(row["raw_bytes"]),
                           human_bytes(row["stored_bytes"]), f"{share:.3f}")
        console.print(codecs)
    if report.per_snapshot:
        table = Table("snapshot", "tag", "logical", "added")
        for snap_row in report.per_snapshot:
            table.add_row(snap_row["id"][:12], snap_row["tag"] or "", human_bytes(snap_row["logical_bytes"]),
                          human_bytes(snap_row["bytes_added"]))
        console.print(table)


@cli.command(name="rm")
@click.argument("tags", nargs=-1, required=True)
@pass_ctx
def rm_cmd(ctx: Context, tags: tuple[str, ...]) -> None:
    """Drop snapshots by tag or id (space returns after gc)."""
    with ctx.open() as repo:
        for tag in tags:
            snap = repo.delete(tag)
            if snap is None:
                click.echo(f"removed damaged snapshot {tag}")
            else:
                click.echo(f"removed snapshot {snap.short_id}" + (f" ({snap.tag})" if snap.tag else ""))


@cli.command()
@click.option("--keep-last", type=int, default=0, help="Keep the N newest snapshots.")
@click.option("--keep-hourly", type=int, default=0, help="Keep the newest snapshot of each of the last N hours.")
@click.option("--keep-daily", type=int, default=0)
@click.option("--keep-weekly", type=int, default=0)
@click.option("--keep-monthly", type=int, default=0)
@click.option("--keep-yearly", type=int, default=0)
@click.option("--keep-within", default=None, metavar="DURATION", help="Keep all within 36h, 2w, 6mo... of the newest.")
@click.option("--keep-tag", multiple=True, metavar="PATTERN", help="Keep snapshots whose tag matches (glob).")
@click.option("--keep-best", type=int, default=0, help="Keep the N best by --metric.")
@click.option("--metric", default=None, help="Metric name in snapshot metadata (metrics.NAME or NAME).")
@click.option("--mode", type=click.Choice(["min", "max"]), default="min", show_default=True)
@click.option("--keep-every-steps", type=int, default=0, help="Keep snapshots whose metadata step is a multiple of K.")
@click.option("--dry-run", is_flag=True, help="Print what would be kept and removed; change nothing.")
@click.option("--save-policy", is_flag=True, help="Store these rules in the repository config.")
@click.option("--prune", is_flag=True, help="Run gc afterwards.")
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
def forget(ctx: Context, /, dry_run: bool, save_policy: bool, prune: bool, as_json: bool, **rules: Any) -> None:
    """Apply retention rules (union); with no rules, the policy stored in the repository."""
    given = {k: (list(v) if isinstance(v, tuple) else v) for k, v in rules.items()
             if v not in (0, None, ()) and not (k == "mode" and v == "min")}
    with ctx.open() as repo:
        if save_policy:
            if not given:
                raise UsageError("--save-policy needs at least one --keep-* rule")
            repo.set_retention_policy(None, **given)
        report = repo.forget(dry_run=dry_run, **given)
        gc_report = repo.gc() if prune and not dry_run else None
    if as_json:
        emit_json({**report.to_dict(), "gc": gc_report.to_dict() if gc_report else None})
        return
    for snap, reasons in report.kept:
        click.echo(f"keep   {snap.short_id} {snap.tag or '':20} {'; '.join(reasons)}")
    for snap in report.removed:
        click.echo(f"remove {snap.short_id} {snap.tag or ''}")
    verb = "would remove" if dry_run else "removed"
    click.echo(f"{len(report.kept)} kept, {verb} {len(report.removed)}")
    if gc_report:
        click.echo(f"gc freed {human_bytes(gc_report.bytes_freed)}")


@cli.command()
@click.option("--repack-below", type=float, default=0.5, show_default=True,
              help="Repack packs whose live share is under this fraction.")
@click.option("--dry-run", is_flag=True)
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
def gc(ctx: Context, repack_below: float, dry_run: bool, as_json: bool) -> None:
    """Delete chunks no snapshot reaches; repack sparse packs; remove crash leftovers."""
    with ctx.open() as repo:
        report = repo.gc(repack_below=repack_below, dry_run=dry_run)
    if as_json:
        emit_json(report.to_dict())
        return
    click.echo(f"{'would free' if dry_run else 'freed'} {human_bytes(report.bytes_freed)}: "
               f"{report.dead_chunks} dead chunks, {report.packs_deleted} packs deleted, "
               f"{report.packs_repacked} repacked into {report.packs_written}, "
               f"{report.orphan_packs_deleted} orphan packs and {report.temp_files_deleted} temp files removed "
               f"(mark {report.mark_seconds:.2f} s, sweep {report.sweep_seconds:.2f} s)")


@cli.group()
def index() -> None:
    """Index maintenance."""


@index.command(name="rebuild")
@pass_ctx
def index_rebuild(ctx: Context) -> None:
    """Recreate the LMDB index from pack footers and refs."""
    with ctx.open() as repo:
        report = repo.rebuild_index()
    for pack, why in report.unreadable_packs.items():
        click.echo(f"cas: warning: pack {pack[:12]} is damaged ({why}); kept on disk", err=True)
    for name, why in report.unreadable_snapshots.items():
        click.echo(f"cas: warning: snapshot {name} cannot be read ({why})", err=True)
    click.echo(f"index rebuilt: {report.chunks} chunks in {report.packs} packs, {report.snapshots} snapshots"
               + (f"; {report.salvaged_chunks} chunks of damaged packs still verify" if report.salvaged_chunks else ""))
    if not report.ok:
        click.echo("cas: damage found: run `cas check --repair`", err=True)
        sys.exit(1)


@cli.command()
@click.option("--repair", is_flag=True, help="Salvage readable chunks of damaged packs; unindex the lost ones.")
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
def check(ctx: Context, repair: bool, as_json: bool) -> None:
    """Read every pack and chunk; report the snapshots and tensors that lost data. Exit 1 if any."""
    with ctx.open() as repo:
        report = repo.check(repair=repair)
    if as_json:
        emit_json(report.to_dict())
    else:
        for pack in report.damaged_packs:
            click.echo(f"damaged pack {pack[:12]}")
        for item in report.affected:
            click.echo(f"affected: snapshot {item['snapshot']}, tensor {item['tensor']}")
        click.echo(f"{report.packs_checked} packs checked, {len(report.damaged_packs)} damaged, "
                   f"{report.salvaged_chunks} chunks salvaged, {len(report.lost_chunks)} lost"
                   + (" (repaired)" if repair and report.changed else ""))
        if repair and report.damaged_packs and not report.changed:
            click.echo("nothing could be repaired: what is lost is not stored anywhere else", err=True)
    if not report.ok:
        sys.exit(1)


@cli.command(name="validate")
@click.argument("snapshot", default="latest")
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
def validate_cmd(ctx: Context, snapshot: str, as_json: bool) -> None:
    """Checks that need no model: manifest structure, every chunk re-hashed, saved metrics finite."""
    from cas.validation import CheckResult, validate  # noqa: PLC0415 - torch only for commands that need it

    with ctx.open() as repo:
        report = validate(repo, snapshot)
        snap = repo.resolve(snapshot)
        data = repo.verify(read_data=True, snapshots=[snap.id])
        report.checks.append(CheckResult("data", data.ok, f"{data.chunks_checked} chunks re-hashed" if data.ok
                                         else str(data.problems[0])))
        metrics = snap.metadata.get("metrics")
        if isinstance(metrics, dict) and metrics:
            bad = [k for k, v in metrics.items() if isinstance(v, float) and not math.isfinite(v)]
            report.checks.append(CheckResult("metrics", not bad, f"not finite: {', '.join(bad)}" if bad
                                             else f"{len(metrics)} saved metrics are finite"))
    if as_json:
        emit_json(report.to_dict())
    else:
        for c in report.checks:
            click.echo(f"{'ok  ' if c.ok else 'FAIL'} {c.name}: {c.detail}")
        click.echo(report.summary())
    if not report.ok:
        sys.exit(1)


@cli.command()
@click.option("--dir", "directory", type=click.Path(path_type=Path), default=None,
              help="Where to create the demo repository (default: a new temp dir).")
@click.option("--steps", default=40, show_default=True)
@click.option("--every", default=10, show_default=True, help="Checkpoint every N steps.")
def demo(directory: Path | None, steps: int, every: int) -> None:
    """Train a small model, checkpoint into a new repository, verify and restore bit-identically."""
    from cas.demo import run_demo  # noqa: PLC0415 - torch only for commands that need it

    sys.exit(run_demo(directory, steps=steps, every=every))


def _log_to_stderr() -> None:
    """cas's warnings (damaged snapshots left out, an index brought in line) as one line each on stderr."""
    logger = logging.getLogger("cas")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.propagate = False


def main(argv: list[str] | None = None) -> None:
    _log_to_stderr()
    try:
        cli.main(args=argv, prog_name="cas", standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        click.echo("cas: aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        click.echo(f"cas: error: {exc.format_message()}", err=True)
        sys.exit(exc.exit_code)
    except CasError as exc:
        click.echo(f"cas: error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except OSError as exc:
        click.echo(f"cas: error: {exc.strerror or exc} ({exc.filename or ''})", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        click.echo("cas: interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":  # pragma: no cover
    main()
