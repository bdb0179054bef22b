"""Disaster-recovery commands of the `cas` CLI: replica, config, replicate, tier, serve.

Registered on the main command group by ``cas.cli`` (imported at its end)."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import click
from rich.table import Table

from cas.cli import Context, cli, console, emit_json, human_bytes, pass_ctx
from cas.errors import UsageError


@cli.group()
def replica() -> None:
    """Replicas: copies of this repository in other regions."""


@replica.command(name="add")
@click.argument("name")
@click.argument("url")
@click.option("--region", "region_name", default=None, help="The region it is in (e.g. us-west-2).")
@click.option("--endpoint", default=None, metavar="URL", help="Its S3-compatible endpoint (http:// allowed).")
@click.option("--weight", type=float, default=0.0, show_default=True, help="Failover preference (higher first).")
@click.option("--inactive", is_flag=True, help="Kept in sync but never failed over to (a cold standby).")
@click.option("--timeout", type=float, default=None, help="Seconds before it counts as unreachable.")
@pass_ctx
def replica_add(ctx: Context, name: str, url: str, region_name: str | None, endpoint: str | None, weight: float,
                inactive: bool, timeout: float | None) -> None:
    """Add replica NAME at URL (an empty location, or a replica of this repository)."""
    options: dict[str, Any] = {k: v for k, v in {"endpoint": endpoint, "timeout": timeout}.items() if v is not None}
    if options and not url.startswith("s3://"):
        raise UsageError("--endpoint and --timeout apply to s3:// replicas only")
    with ctx.open() as repo:
        spec = repo.add_replica(name, url, storage_options=options or None, region=region_name,
                                active=not inactive, weight=weight)
    click.echo(f"added replica {spec.name} at {spec.url}; `cas replicate --once` copies the repository there")


@replica.command(name="ls")
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
def replica_ls(ctx: Context, as_json: bool) -> None:
    """List the regions: the primary and every replica, with lag and health."""
    with ctx.open() as repo:
        regions = repo.topology.regions()
        lag = repo.replication_lag() if repo.topology.replicas else {}
        health = repo.health()
    if as_json:
        emit_json({"regions": [r.to_dict() for r in regions], "lag": lag, "health": health})
        return
    table = Table("name", "region", "url", "weight", "active", "state", "behind")
    for r in regions:
        h = health["regions"].get(r.name, {})
        row = lag.get(r.name, {})
        behind = ("-" if r.name not in lag else row.get("error", f"{row.get('snapshots_behind', 0)} snapshots, "
                                                                   f"{human_bytes(row.get('bytes_behind', 0))}"))
        state = ("serving " if h.get("serving") else "") + str(h.get("state", "unknown"))
        table.add_row(r.name, r.region or "", r.url, f"{r.weight:g}", "yes" if r.active else "no", state, behind)
    console.print(table)


@replica.command(name="rm")
@click.argument("name")
@pass_ctx
def replica_rm(ctx: Context, name: str) -> None:
    """Forget replica NAME (its store is left as it is)."""
    with ctx.open() as repo:
        spec = repo.remove_replica(name)
    click.echo(f"removed replica {spec.name} ({spec.url}); its objects were left in place")


@cli.group(name="config")
def config_group() -> None:
    """The repository's topology: regions, failover, sync and tiers (YAML)."""


@config_group.command(name="apply")
@click.argument("file", type=click.Path(path_type=Path, exists=True, dir_okay=False))
@pass_ctx
def config_apply(ctx: Context, file: Path) -> None:
    """Apply FILE.yaml (any subset of: regions, failover, sync, tiers)."""
    with ctx.open() as repo:
        top = repo.apply_config(file.read_text())
    click.echo(f"applied {file}: {len(top.replicas)} replica(s), "
               f"failover {'on' if top.failover else 'off'}, sync {top.sync.mode}, {len(top.tiers)} tier(s)")


@config_group.command(name="show")
@pass_ctx
def config_show(ctx: Context) -> None:
    """Print the topology as YAML (the shape `cas config apply` reads)."""
    with ctx.open() as repo:
        click.echo(repo.show_config(), nl=False)


@cli.command()
@click.option("--once", is_flag=True, help="Run one round and exit.")
@click.option("--interval", type=float, default=None, help="Seconds between rounds (default: sync.interval).")
@click.option("--batch-size", type=int, default=None, help="Objects per request batch (default: sync.batch_size).")
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
def replicate(ctx: Context, once: bool, interval: float | None, batch_size: int | None, as_json: bool) -> None:
    """Copy what each replica lacks (packs, index, metadata, refs last); report the lag."""
    with ctx.open() as repo:
        if not repo.topology.replicas:
            raise UsageError("this repository has no replicas; add one with `cas replica add NAME URL`")
        every = interval if interval is not None else repo.topology.sync.interval
        while True:
            report = repo.replicate(batch_size)
            if as_json:
                emit_json(report.to_dict())
            else:
                for r in report.rounds:
                    lag = r.lag
                    state = r.error or "ok"
                    click.echo(
                        f"{r.replica}: {r.packs_copied} packs + {r.index_objects_copied} index objects "
                        f"({human_bytes(r.bytes_copied)}) copied, {len(r.refs_created) + len(r.refs_moved)} refs "
                        f"written, {len(r.refs_removed)} removed, {len(r.conflicts)} conflicts; behind: "
                        f"{lag.get('snapshots_behind', '?')} snapshots, {human_bytes(lag.get('bytes_behind', 0))}, "
                        f"oldest {lag.get('oldest_unsynced_age_s', 0):.0f} s; {state}"
                    )
                    for c in r.conflicts:
                        click.echo(f"  conflict: tag {c['tag']} moved on {r.replica}; kept it, the source's "
                                   f"value is kept as {c['theirs_as']}")
            if once:
                if not report.ok:
                    sys.exit(1)
                return
            time.sleep(every)


@cli.group()
def tier() -> None:
    """Storage tiers by age (hot -> warm -> cold -> archive)."""


@tier.command(name="run")
@click.option("--dry-run", is_flag=True, help="Say what would move; move nothing.")
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
def tier_run(ctx: Context, dry_run: bool, as_json: bool) -> None:
    """Move every data pack to the tier its age calls for (copied and checked before the source goes)."""
    with ctx.open() as repo:
        if len(repo.topology.tiers) < 2:
            raise UsageError("this repository has no tiers; set them with `cas config apply` (tiers: ...)")
        report = repo.migrate_tiers(dry_run=dry_run)
    if as_json:
        emit_json(report.to_dict())
    else:
        moves: dict[tuple[str, str], int] = {}
        for m in report.moved:
            moves[(m["from"], m["to"])] = moves.get((m["from"], m["to"]), 0) + 1
        for (a, b), n in sorted(moves.items()):
            click.echo(f"{'would move' if dry_run else 'moved'} {n} pack(s) {a} -> {b}")
        click.echo(f"{len(report.moved)} pack(s) {'to move' if dry_run else 'moved'} "
                   f"({human_bytes(report.bytes_moved)}), {report.kept} in place, {report.unreached} unreached "
                   f"(gc's), {len(report.needs_warmup)} need a restore request first")
        for e in report.errors:
            click.echo(f"error: {e}", err=True)
    if report.errors:
        sys.exit(1)


@tier.command(name="status")
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
def tier_status(ctx: Context, as_json: bool) -> None:
    """Bytes and packs per tier."""
    with ctx.open() as repo:
        status = repo.tier_status()
        specs = {t.name: t for t in repo.topology.tiers}
    if as_json:
        emit_json(status)
        return
    table = Table("tier", "retention", "data packs", "data bytes", "meta packs", "store")
    for name, row in status.items():
        spec = specs.get(name)
        retention = "-" if spec is None else ("indefinite" if spec.retention is None else f"{spec.retention:.0f} s")
        table.add_row(name, retention, str(row["data_packs"]), human_bytes(row["data_bytes"]),
                      str(row["meta_packs"]), row["url"])
    console.print(table)


@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=int, default=9464, show_default=True, help="Port (0: any free one).")
@click.option("--replicate/--no-replicate", "run_replicator", default=False,
              help="Also run a replication round every sync.interval seconds.")
@click.option("--interval", type=float, default=None, help="Seconds between replication rounds.")
@click.option("--refresh", type=float, default=15.0, show_default=True, help="Seconds between metric refreshes.")
@pass_ctx
def serve(ctx: Context, host: str, port: int, run_replicator: bool, interval: float | None, refresh: float) -> None:
    """Serve /health, /ready and /metrics (Prometheus); optionally replicate in the same process."""
    from cas.serve import serve as run  # noqa: PLC0415 - the HTTP server only for this command

    with ctx.open() as repo:
        every = (interval if interval is not None else repo.topology.sync.interval) if run_replicator else None

        def announce(h: str, p: int) -> None:
            click.echo(f"serving http://{h}:{p}/health /ready /metrics", err=True)

        run(repo, host, port, replicate_interval=every, refresh_interval=refresh, ready=announce)
