"""The `cas` command line. Errors are one line on stderr with the error class's exit code."""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn, TransferSpeedColumn
from rich.table import Table

from cas.errors import (
    CasError,
    KeyNotFoundError,
    NotARepositoryError,
    OutputExistsError,
    SnapshotNotFoundError,
    UsageError,
)
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

    def open(self, check_index: bool = False) -> Repository:
        path = self.path()
        if "://" not in path and Path(path).is_file():
            raise NotARepositoryError(f"{path} is a regular file, not a repository directory; "
                                      "--repo takes the directory `cas init` created")
        return Repository.open(path, storage_options=self.storage_options or None, check_index=check_index)


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


def _parse_meta(meta: tuple[str, ...]) -> dict[str, Any]:
    metadata: dict[str, Any] = {}
    for item in meta:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--meta takes KEY=VALUE, got {item!r}")
        try:
            metadata[key] = json.loads(value)
        except json.JSONDecodeError:
            metadata[key] = value
    return metadata


def check_cli_tag(tag: str | None) -> None:
    """Tags made on the command line are never all hex digits: they would read as id prefixes."""
    if tag is not None and len(tag) >= 4 and all(c in "0123456789abcdefABCDEF" for c in tag):
        raise UsageError(f"tag {tag!r} is all hex digits and would read as a snapshot id prefix; pick another "
                         "(e.g. add a letter: step-{tag})".replace("{tag}", tag))


@cli.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--tag", "-t", default=None, help="Tag of the new snapshot.")
@click.option("--compression", type=click.Choice(["none", "fast", "default", "max"]), default=None)
@click.option("--meta", "meta", multiple=True, metavar="KEY=VALUE", help="Metadata (VALUE parsed as JSON if it can).")
@click.option("--state", "as_state", is_flag=True,
              help="Import the checkpoint's contents (the state dict `load` returns) instead of its files byte for "
                   "byte; .pt files load with weights_only=True.")
@click.option("--allow-pickle", is_flag=True,
              help="Implies --state: unpickle what weights_only refuses (Lightning hparams...) and store it "
                   "pickled. Trusted files only.")
@pass_ctx
def save(
    ctx: Context, paths: tuple[Path, ...], tag: str | None, compression: str | None, meta: tuple[str, ...],
    as_state: bool, allow_pickle: bool,
) -> None:
    """Back up files or directories byte for byte (tensor files dedup as tensors); see --state."""
    metadata = _parse_meta(meta)
    check_cli_tag(tag)
    if as_state or allow_pickle:
        from cas.importers import import_paths  # noqa: PLC0415 - torch only for commands that need it

        state, source = import_paths(list(paths), allow_pickle=allow_pickle)
        metadata.setdefault("source", source)
        snap = _interruptible_save(ctx, state, tag, metadata, compression, allow_pickle)
    else:
        from cas.files import build_state  # noqa: PLC0415 - torch only for commands that need it

        repo_dir = ctx.path()
        files = build_state(list(paths), exclude=[Path(repo_dir)] if "://" not in repo_dir else [])
        metadata["source"] = files.source
        try:
            snap = _interruptible_save(ctx, files.state, tag, metadata, compression, False,
                                       before_commit=files.check_unchanged)
        finally:
            files.close()
    what = ""
    if not (as_state or allow_pickle):
        src = metadata["source"]
        what = f" from {src['files']} file{'s' if src['files'] != 1 else ''} ({human_bytes(src['bytes'])})"
    click.echo(f"saved snapshot {snap.short_id}" + (f" ({snap.tag})" if snap.tag else "") + what
               + f": {human_bytes(snap.logical_bytes)} logical, {human_bytes(snap.bytes_added)} added")


def _interruptible_save(ctx: Context, state: Any, tag: str | None, metadata: dict[str, Any],
                        compression: str | None, allow_pickle: bool,
                        before_commit: Callable[[], None] | None = None) -> Any:
    """``repo.save``; Ctrl-C stops it: a save that had committed still counts (exit 0), else nothing is
    visible and what it wrote is left for `cas gc`, which the message says."""
    with ctx.open() as repo:
        before = {sid for _name, sid in repo.refs()}
        started = time.time()
        try:
            with progress_bar("saving") as update:
                return repo.save(state, tag=tag, metadata=metadata, compression=compression,
                                 allow_pickle=allow_pickle, progress=update, before_commit=before_commit)
        except KeyboardInterrupt:
            for name, sid in repo.refs():
                if sid in before or (tag is not None and name != tag):
                    continue
                try:
                    snap = repo.resolve(name)
                except CasError:
                    continue
                if snap.time >= started - 1 and snap.metadata.get("source") == metadata.get("source"):
                    click.echo("cas: interrupted after the save committed", err=True)
                    return snap
            raise SaveInterrupted(
                "interrupted: nothing was committed and every snapshot is as it was; packs the save had "
                "written stay until `cas gc` removes them"
            ) from None


class SaveInterrupted(CasError):
    exit_code = 130


def _width() -> int:
    return max(40, shutil.get_terminal_size((80, 24)).columns)


def _clip(text: str, width: int, middle: bool = False) -> str:
    if len(text) <= width:
        return text
    if width <= 1:
        return text[:width]
    if middle:
        head = (width - 1) // 2
        return text[:head] + "…" + text[len(text) - (width - 1 - head):]
    return text[: width - 1] + "…"


def print_table(headers: list[str], rows: list[list[str]], flex: int | tuple[int, ...],
                right: frozenset[int] = frozenset(), middle: bool = False) -> None:
    """Plain columns that fit the terminal (80 columns when not one): the ``flex`` columns are cut to
    fit, the first one first, each down to its header's width (at least 8)."""
    cut = (flex,) if isinstance(flex, int) else flex
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]
    over = sum(widths) + 2 * (len(headers) - 1) - _width()
    for i in cut:
        if over <= 0:
            break
        floor = max(len(headers[i]), 8)
        take = min(over, max(0, widths[i] - floor))
        widths[i] -= take
        over -= take

    def line(cells: list[str]) -> str:
        out = []
        for i, text in enumerate(cells):
            cell = _clip(text, widths[i], middle and i in cut)
            out.append(cell.rjust(widths[i]) if i in right else cell.ljust(widths[i]))
        return "  ".join(out).rstrip()

    click.echo(line(headers))
    for row in rows:
        click.echo(line(row))


@cli.command(name="ls")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@pass_ctx
def ls_cmd(ctx: Context, as_json: bool) -> None:
    """List snapshots, oldest first."""
    with ctx.open() as repo:
        snaps = repo.snapshots()
        damaged = repo.damaged_snapshots() if len(snaps) < len(repo.refs()) else []
        rotted = repo.store.damage_records()
        pending = sum(1 for cid, copies in rotted.items()
                      if (loc := repo.index.get(cid)) is not None and (loc.pack_id, loc.offset) in copies)
    if pending:
        click.echo(f"warning: reads found {pending} stored chunk{'s' if pending != 1 else ''} damaged; "
                   "the next save that holds their bytes writes them again, and `cas check` names the "
                   "snapshots they harm", err=True)
    if len(rotted) > pending:
        superseded = len(rotted) - pending
        click.echo(f"note: {superseded} damaged chunk cop{'ies are' if superseded != 1 else 'y is'} superseded by "
                   "a fresh copy; `cas check --repair` takes the damaged packs out", err=True)
    if as_json:
        emit_json([s.to_dict() for s in snaps])
        return
    rows = []
    for s in snaps:
        meta = {k: v for k, v in s.metadata.items() if k != "source"}
        rows.append([s.short_id[:8], s.tag or "", s.datetime.strftime("%Y-%m-%d %H:%M"), human_bytes(s.logical_bytes),
                     human_bytes(s.bytes_added), json.dumps(meta, separators=(",", ":")) if meta else ""])
    for name, _why in damaged:
        rows.append(["DAMAGED", name, "", "", "", "`cas check` tells more; `cas rm` gives it up"])
    print_table(["id", "tag", "time (UTC)", "logical", "added", "metadata"], rows, flex=(5, 1),
                right=frozenset({3, 4}))


@cli.command()
@click.argument("snapshot")
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
def show(ctx: Context, snapshot: str, as_json: bool) -> None:
    """Show one snapshot: metadata, its files (for a file backup) and its tensors."""
    with ctx.open() as repo:
        snap = repo.resolve(snapshot)
        tensors = repo.tensors(snap.id)
        tensors = _dcp_rows(repo, snap, tensors)  # a DCP snapshot: one row per FQN
        files = repo.files(snap.id)
    if as_json:
        emit_json({**snap.to_dict(), "tensors": tensors, **({"files": files} if files is not None else {})})
        return
    width = _width()
    click.echo(f"snapshot {snap.id}\ntag      {snap.tag or '-'}\ntime     {snap.datetime.isoformat()}\n"
               f"parent   {snap.parent or '-'}\nlogical  {human_bytes(snap.logical_bytes)}\n"
               f"added    {human_bytes(snap.bytes_added)}")
    click.echo(_clip(f"metadata {json.dumps(snap.metadata, separators=(',', ':'))}", width))
    if files is not None:
        click.echo("")
        print_table(["file", "format", "tensors", "bytes"],
                    [[f["path"], f["format"] or "", str(f["tensors"]), human_bytes(f["size"] or 0)]
                     for f in files if f["kind"] == "file"],
                    flex=0, right=frozenset({2, 3}), middle=True)
    click.echo("")
    print_table(["path", "dtype", "shape", "bytes"],
                [[t["path"], t["dtype"], "x".join(map(str, t["shape"])) or "()", human_bytes(t["nbytes"])]
                 for t in tensors], flex=0, right=frozenset({3}), middle=True)


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
@click.option("--force", is_flag=True, help="Overwrite OUT (a file), or write into OUT (a non-empty directory).")
@click.option("--allow-pickle", is_flag=True, help="Load values that were stored with pickle (trusted data only).")
@click.option("--format", "fmt", type=click.Choice(["pt", "safetensors"]), default=None,
              help="Re-serialize into one file of this format instead of giving back the stored files.")
@click.option("--include", multiple=True, metavar="PATTERN",
              help="Only these files (glob on the path or file name, or a directory) or, for a state snapshot, "
                   "these keys (key path, prefix or glob). Repeatable.")
@click.option("--warmup", is_flag=True,
              help="First request a restore of the snapshot's packs in an archive storage class, and wait for them.")
@click.option("--sparse", is_flag=True,
              help="A file backup's runs of zero bytes (64 KiB blocks) become holes: sparse files, same bytes.")
@pass_ctx
def restore(ctx: Context, snapshot: str, out: Path, force: bool, allow_pickle: bool, fmt: str | None,
            include: tuple[str, ...], warmup: bool, sparse: bool) -> None:
    """Give back a snapshot: a file backup as its files, byte for byte, under directory OUT (or, for one
    file, at OUT with its suffix); a state snapshot as OUT, .pt or .safetensors (by extension or --format)."""
    from cas.filebytes import PartLoader  # noqa: PLC0415 - torch only for commands that need it
    from cas.files import (  # noqa: PLC0415 - torch only for commands that need it
        prepare_target,
        reread_states,
        restore_file,
        restore_files,
        selects,
    )
    from cas.importers import CHECKPOINT_SUFFIXES, export_file  # noqa: PLC0415 - torch only when needed
    from cas.store import fsync_dir  # noqa: PLC0415 - with the restore imports above

    patterns: list[Any] | None = list(include) or None
    with ctx.open() as repo:
        snap = repo.resolve(snapshot)
        if warmup:
            requested = repo.warmup(snap.id, wait=True, poll=float(os.environ.get("CAS_WARMUP_POLL", "30")))
            if requested:
                click.echo(f"{len(requested)} archived pack(s) of snapshot {snap.short_id} restored for reading",
                           err=True)
        listing = None if _is_dcp(snap) else repo.files(snap.id)
        if sparse and listing is None:
            raise UsageError("--sparse restores a file backup's files as they were stored; this restore "
                             "re-serializes tensors (leave --sparse out)")
        if _is_dcp(snap):  # a torch.distributed.checkpoint snapshot: its whole, unsharded state
            _restore_dcp(repo, snap, out, force=force, allow_pickle=allow_pickle)
            return
        name = f"snapshot {snap.short_id}"

        if listing is None:
            with progress_bar("restoring") as update:
                state = repo.load(snap.id, keys=patterns, allow_pickle=allow_pickle, progress=update)
            export_file(state, out, force=force, metadata=snap.metadata, fmt=fmt)
            click.echo(f"restored snapshot {snap.short_id} to {out}")
            return
        chosen = [f for f in listing if f["kind"] == "file" and selects(f["path"], patterns)]
        load_part = PartLoader(repo, snap.id, allow_pickle)
        if not chosen:
            raise KeyNotFoundError(f"{name} holds no file that {', '.join(include)} selects "
                                   f"(it holds {len(listing)}: `cas show {snap.short_id}` lists them)")
        suffix = out.suffix.lower()
        single = (len(chosen) == 1 and not out.is_dir() and suffix != ""
                  and suffix == Path(chosen[0]["path"]).suffix.lower())
        if fmt is None and not single and not out.is_dir() and suffix in CHECKPOINT_SUFFIXES:
            fmt = "safetensors" if suffix == ".safetensors" else "pt"  # a file name of another format: convert
        if fmt is not None:
            if sparse:
                raise UsageError(f"--sparse restores files as they were stored; {out.name} re-serializes them as "
                                 f".{fmt} (leave --sparse out)")
            import tempfile  # noqa: PLC0415

            if not out.parent.is_dir():
                raise UsageError(f"directory {out.parent} does not exist")
            if os.path.lexists(out) and not force:
                raise OutputExistsError(f"{out} exists; pass --force to overwrite it")
            try:
                with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as temp:
                    restore_files(load_part, listing, name, Path(temp), include=patterns)
                    state = reread_states(Path(temp))
                    export_file(state, out, force=force, fmt=fmt)
            except OSError as exc:  # name the file asked for, not the temp directory beside it
                raise UsageError(f"cannot write {out}: {exc.strerror or exc}") from None
            click.echo(f"restored snapshot {snap.short_id} to {out} (re-serialized as .{fmt})")
            return
        if single:
            if os.path.lexists(out) and not force:
                raise OutputExistsError(f"{out} exists; pass --force to overwrite it")
            if not out.parent.is_dir():
                raise UsageError(f"directory {out.parent} does not exist")
            rel = chosen[0]["path"]
            written = restore_file(load_part, rel, out, f"{name}, file {rel}", sparse=sparse)
            fsync_dir(out.parent)  # the rename
            click.echo(f"restored {rel} of snapshot {snap.short_id} to {out} ({human_bytes(written)}, "
                       "sha256 checked)")
            return
        made = prepare_target(out, force)
        with progress_bar("restoring") as update:
            report = restore_files(load_part, listing, name, out, include=patterns, progress=update, sparse=sparse,
                                   made_target=made)
    skipped = f"; {report.skipped} left out by --include" if report.skipped else ""
    click.echo(f"restored {report.files} file{'s' if report.files != 1 else ''} of snapshot {snap.short_id} to "
               f"{out} ({human_bytes(report.bytes)}, every sha256 checked){skipped}")


@cli.command()
@click.argument("snapshot")
@click.argument("key")
@click.option("--raw", is_flag=True, help="Write the tensor's bytes (row-major, little-endian) instead of a summary.")
@click.option("-o", "--output", type=click.Path(path_type=Path), default=None, help="With --raw: write to FILE.")
@pass_ctx
def cat(ctx: Context, snapshot: str, key: str, raw: bool, output: Path | None) -> None:
    """Print one tensor's dtype, shape and a summary (only its chunks are read); --raw writes its bytes."""
    with ctx.open() as repo:
        snap = repo.resolve(snapshot)
        paths = [t["path"] for t in repo.tensors(snap.id)]
        if key not in paths:
            ends = [p for p in paths if p.endswith("/" + key)]
            if len(ends) != 1:
                import difflib  # noqa: PLC0415

                close = difflib.get_close_matches(key, paths, n=3)
                more = (f"; it matches {len(ends)} paths: {', '.join(ends[:3])}" if ends
                        else f"; did you mean {', '.join(close)}?" if close else "; `cas show` lists them")
                raise KeyNotFoundError(f"snapshot {snap.short_id} has no tensor {key!r}{more}")
            key = ends[0]
        from cas.files import flat_tensors  # noqa: PLC0415 - torch only for commands that need it

        value = next(v for p, v in flat_tensors(repo.load(snap.id, keys=[key])) if p == key)
    if raw:
        from cas.files import raw_bytes  # noqa: PLC0415

        data = raw_bytes(value)
        if output is not None:
            output.write_bytes(data)
        elif sys.stdout.isatty():
            raise UsageError("refusing to write binary to a terminal: redirect the output or pass -o FILE")
        else:
            sys.stdout.buffer.write(data)
            sys.stdout.flush()
        return
    from cas.files import summary  # noqa: PLC0415

    for line in summary(key, value):
        click.echo(_clip(line, _width()))


@cli.command()
@click.option("--read-data", is_flag=True, help="Read and re-hash every chunk (slower, complete).")
@click.option("--record", is_flag=True, help="Keep the outcome in the store (for `cas serve`'s metrics).")
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
def verify(ctx: Context, read_data: bool, record: bool, as_json: bool) -> None:
    """Check every snapshot reaches intact chunks; exit 1 on any problem."""
    with ctx.open(check_index=True) as repo, progress_bar("verifying") as update:
        report = repo.verify(read_data=read_data, progress=update, record=record)
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
               f"costliest {report.costliest_chain:.2f} keyframe restores (estimated as for 4-byte elements)")
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
    """Drop snapshots by tag or id (space returns after gc). Every name is checked before any is removed."""
    with ctx.open() as repo:
        for tag in tags:
            if tag == "latest":
                raise UsageError("refusing to delete 'latest': name the snapshot by its tag or id; nothing was removed")
            if "/" not in tag and tag not in (".", "..") and repo.store.has_ref(tag):
                continue
            try:
                repo.resolve(tag)
            except SnapshotNotFoundError as exc:
                raise type(exc)(f"{exc}; nothing was removed") from None
        for tag in dict.fromkeys(tags):
            snap = repo.delete(tag)
            if snap is None:
                click.echo(f"removed damaged snapshot {tag}")
            else:
                click.echo(f"removed snapshot {snap.short_id}" + (f" ({snap.tag})" if snap.tag else ""))


@cli.command(name="tag")
@click.argument("snapshot")
@click.argument("new_tag")
@pass_ctx
def tag_cmd(ctx: Context, snapshot: str, new_tag: str) -> None:
    """Rename a snapshot's tag (or tag an untagged snapshot): `cas tag OLD NEW`."""
    check_cli_tag(new_tag)
    with ctx.open() as repo:
        old = repo.resolve(snapshot)
        snap = repo.retag(snapshot, new_tag)
    click.echo(f"snapshot {snap.short_id}: {old.tag or 'untagged'} -> {snap.tag}")


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
        if save_policy and not given:
            raise UsageError("--save-policy needs at least one --keep-* rule")
        report = repo.forget(dry_run=dry_run, **given)
        if save_policy and not dry_run:  # a dry run changes nothing, the stored policy included
            repo.set_retention_policy(None, **given)
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
    with ctx.open(check_index=True) as repo:
        if _lock_is_held(repo):
            click.echo("cas: waiting for the save or restore in flight to finish (gc runs alone)...", err=True)
        report = repo.gc(repack_below=repack_below, dry_run=dry_run)
    if as_json:
        emit_json(report.to_dict())
        return
    click.echo(f"{'would free' if dry_run else 'freed'} {human_bytes(report.bytes_freed)}: "
               f"{report.dead_chunks} dead chunks, {report.packs_deleted} packs deleted, "
               f"{report.packs_repacked} repacked into {report.packs_written}, "
               f"{report.orphan_packs_deleted} orphan packs and {report.temp_files_deleted} temp files removed "
               f"(mark {report.mark_seconds:.2f} s, sweep {report.sweep_seconds:.2f} s)")


def _lock_is_held(repo: Repository) -> bool:
    """Whether another process holds the local repository lock now (gc will wait for it)."""
    if not repo.store.is_local:
        return False
    import fcntl  # noqa: PLC0415

    lock = repo.store.locks_dir / "repo.lock"
    try:
        with open(lock, "a+b") as f:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
    except OSError:
        return False
    return False


@cli.group()
def index() -> None:
    """Index maintenance."""


@index.command(name="rebuild")
@pass_ctx
def index_rebuild(ctx: Context) -> None:
    """Recreate the LMDB index from pack footers and refs."""
    with ctx.open(check_index=True) as repo:
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
    with ctx.open(check_index=True) as repo:
        report = repo.check(repair=repair)
        recorded = sum(len(c) for c in repo.store.damage_records().values()) if not repair and not report.ok else 0
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
        if recorded:
            click.echo(f"{recorded} damaged chunk cop{'ies are' if recorded != 1 else 'y is'} recorded: the next save "
                       "that still holds their bytes writes them again, which heals the snapshots above; "
                       "`cas check --repair` salvages the rest")
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
    except Exception as exc:  # a bug or an error nobody mapped: still one line (CAS_DEBUG=1 for the traceback)
        if os.environ.get("CAS_DEBUG"):
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        click.echo(f"cas: error: {type(exc).__name__}: {first} (an unexpected error; CAS_DEBUG=1 shows where)",
                   err=True)
        sys.exit(1)


def _is_dcp(snap: Any) -> bool:
    return isinstance(snap.metadata.get("dcp"), dict)


def _dcp_rows(repo: Any, snap: Any, tensors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """For a snapshot written by ``cas.integrations.dcp``: one row per fully qualified name (its
    global dtype and shape), not one per stored shard."""
    if not _is_dcp(snap):
        return tensors
    from cas.integrations.dcp import dcp_info  # noqa: PLC0415 - torch only for DCP snapshots

    return [{"path": t["fqn"], "kind": "tensor", "dtype": t["dtype"], "shape": t["shape"], "nbytes": t["nbytes"],
             "shared_storage": False, "shards": t["shards"]} for t in dcp_info(repo, snap.id)["tensors"]]


def _restore_dcp(repo: Any, snap: Any, out: Path, *, force: bool, allow_pickle: bool) -> None:
    from cas.importers import export_file  # noqa: PLC0415 - torch only for commands that need it
    from cas.integrations.dcp import load_unsharded  # noqa: PLC0415

    flat = out.suffix.lower() == ".safetensors"  # named tensors only; .pt keeps the nesting and the objects
    state = load_unsharded(repo, snap.id, allow_pickle=allow_pickle, nested=not flat)
    left = []
    if flat:
        import torch  # noqa: PLC0415

        left = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
        state = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    export_file(state, out, force=force)
    note = f"; {len(left)} non-tensor values left out (restore to .pt for them)" if left else ""
    click.echo(f"restored snapshot {snap.short_id} (unsharded) to {out}{note}")


from cas import cli_dr as _cli_dr  # noqa: E402, F401 - registers replica, config, replicate, tier, serve

if __name__ == "__main__":  # pragma: no cover
    # run as `python -m cas.cli`: the commands are registered on the importable module's group
    from cas.cli import main as _main

    _main()
