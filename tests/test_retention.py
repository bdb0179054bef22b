from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

import cas
from cas.reports import Snapshot
from cas.retention import RetentionPolicy, apply_policy, parse_duration
from tests.helpers import repo_files

T0 = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)  # a Monday


def snap(name: str, at: datetime, step: int | None = None, loss: float | None = None) -> Snapshot:
    meta: dict[str, object] = {}
    if step is not None:
        meta["step"] = step
    if loss is not None:
        meta["metrics"] = {"loss": loss}
    return Snapshot(id=name.ljust(64, "0"), tag=name, time=at.timestamp(), parent=None, metadata=meta,
                    logical_bytes=0, bytes_added=0, tensor_count=0, ref=name)


def kept(snaps: list[Snapshot], **rules: object) -> list[str]:
    reasons, removed = apply_policy(snaps, RetentionPolicy(**rules))  # type: ignore[arg-type]
    assert {s.id for s in removed} | set(reasons) == {s.id for s in snaps}
    return sorted(s.tag for s in snaps if s.id in reasons)  # type: ignore[misc]


# every 6 hours over 10 days: 40 snapshots
TIMELINE = [snap(f"s{i:02d}", T0 + timedelta(hours=6 * i), step=100 * i, loss=float((i * 7) % 11)) for i in range(40)]


def test_keep_last() -> None:
    assert kept(TIMELINE, keep_last=3) == ["s37", "s38", "s39"]


def test_keep_hourly_daily_weekly_monthly() -> None:
    # snapshots at 09, 15, 21, 03 h: the newest of day d >= 1 is i = 4d + 2; s39 is alone on day 10
    assert kept(TIMELINE, keep_daily=3) == ["s34", "s38", "s39"]
    assert kept(TIMELINE, keep_hourly=2) == ["s38", "s39"]
    # ISO weeks: Mon 2 - Sun 8 March is week 10 (newest s26 on the 8th), the rest week 11
    assert kept(TIMELINE, keep_weekly=5) == ["s26", "s39"]
    assert kept(TIMELINE, keep_monthly=1) == ["s39"]
    assert kept(TIMELINE, keep_yearly=2) == ["s39"]


def test_keep_within() -> None:
    assert kept(TIMELINE, keep_within="1d") == ["s35", "s36", "s37", "s38", "s39"]
    assert kept(TIMELINE, keep_within="12h") == ["s37", "s38", "s39"]
    assert parse_duration("1d12h") == 36 * 3600
    assert parse_duration("2w") == 14 * 86400
    with pytest.raises(cas.UsageError, match="ambiguous"):
        parse_duration("3m")
    with pytest.raises(cas.UsageError, match="not a duration"):
        parse_duration("soon")


def test_keep_tag_globs() -> None:
    assert kept(TIMELINE, keep_tag=["s0*"]) == [f"s0{i}" for i in range(10)]
    assert kept(TIMELINE, keep_tag=["s15", "s2?"]) == ["s15"] + [f"s2{i}" for i in range(10)]


def test_keep_best_min_max_and_ties() -> None:
    # loss = (7 i) % 11; 0 at i = 0, 11, 22, 33 → the 2 best (ties) are the newest of them
    assert kept(TIMELINE, keep_best=2, metric="loss", mode="min") == ["s22", "s33"]
    # max 10 at i = 3, 14, 25, 36
    assert kept(TIMELINE, keep_best=1, metric="loss", mode="max") == ["s36"]
    reasons, _ = apply_policy(TIMELINE, RetentionPolicy(keep_best=1, metric="loss", mode="max"))
    assert reasons["s36".ljust(64, "0")] == ["best 1 of 1 by loss (max) = 10"]
    # snapshots without the metric are never "best"
    odd = [*TIMELINE[:3], snap("nometric", T0 + timedelta(days=30))]
    assert "nometric" not in kept(odd, keep_best=4, metric="loss")
    with pytest.raises(cas.UsageError, match="needs metric"):
        RetentionPolicy(keep_best=2)


def test_keep_every_steps() -> None:
    assert kept(TIMELINE, keep_every_steps=1000) == ["s00", "s10", "s20", "s30"]


def test_union_of_rules_and_reasons() -> None:
    reasons, removed = apply_policy(TIMELINE, RetentionPolicy(keep_last=1, keep_every_steps=1900, keep_tag=["s39"]))
    assert reasons["s39".ljust(64, "0")] == ["last 1 of 1", "tag matches 's39'"]
    assert reasons["s19".ljust(64, "0")] == ["step 1900 is a multiple of 1900"]
    assert sorted(reasons) == sorted([f"s{i}".ljust(64, "0") for i in ("00", "19", "38", "39")])
    assert len(removed) == 36 and removed == sorted(removed, key=lambda s: s.time)


def test_empty_policy_and_bad_values_are_refused() -> None:
    with pytest.raises(cas.UsageError, match="refusing to remove everything"):
        apply_policy(TIMELINE, RetentionPolicy())
    with pytest.raises(cas.UsageError, match="non-negative"):
        RetentionPolicy(keep_last=-1)
    with pytest.raises(cas.UsageError, match="mode"):
        RetentionPolicy(keep_best=1, metric="x", mode="median")


def test_forget_on_a_repository(tmp_path: Path) -> None:
    with cas.Repository.init(tmp_path / "r", chunk_size=4096) as repo:
        for i, acc in enumerate([0.1, 0.9, 0.5, 0.2, 0.3, 0.4]):
            repo.save({"x": i}, tag=f"step-{i}", metadata={"step": i, "metrics": {"acc": acc}})
        before = repo_files(repo.path)
        report = repo.forget(keep_last=2, keep_best=1, metric="acc", mode="max", dry_run=True)
        assert repo_files(repo.path) == before  # dry run changes nothing
        assert [s.tag for s, _ in report.kept] == ["step-1", "step-4", "step-5"]
        assert [s.tag for s in report.removed] == ["step-0", "step-2", "step-3"]
        report = repo.forget(keep_last=2, keep_best=1, metric="acc", mode="max")
        assert [s.tag for s in repo.snapshots()] == ["step-1", "step-4", "step-5"]
        assert repo.load("step-1") == {"x": 1}
        with pytest.raises(cas.UsageError, match="no retention rule"):
            repo.forget()
        repo.set_retention_policy(keep_last=1)
    with cas.Repository.open(tmp_path / "r") as repo:
        assert repo.retention_policy() == RetentionPolicy(keep_last=1)
        repo.forget()
        assert [s.tag for s in repo.snapshots()] == ["step-5"]


def test_a_misspelt_metric_or_rule_removes_nothing(tmp_path: Path) -> None:
    with cas.Repository.init(tmp_path / "r", chunk_size=4096) as repo:
        for i, loss in enumerate([0.9, 0.5, 0.7]):
            repo.save({"x": i}, tag=f"step-{i}", metadata={"metrics": {"loss": loss}})
        with pytest.raises(cas.UsageError, match=r"no snapshot has a metric 'los'.*metrics saved: loss"):
            repo.forget(keep_best=2, metric="los")
        with pytest.raises(cas.ArgumentError, match="did you mean 'keep_last'"):
            repo.forget(keep_lst=1)
        with pytest.raises(cas.ArgumentError, match="keep_lst"):
            repo.set_retention_policy(keep_lst=1)
        assert [s.tag for s in repo.snapshots()] == ["step-0", "step-1", "step-2"]
        assert repo.retention_policy() is None


def test_cli_forget_dry_run_does_not_store_the_policy(tmp_path: Path) -> None:
    from tests.test_cli import run

    root = tmp_path / "r"
    with cas.Repository.init(root, chunk_size=4096) as repo:
        for i in range(3):
            repo.save({"x": i}, tag=f"step-{i}")
    run("forget", "--keep-last", "1", "--save-policy", "--dry-run", repo=root)
    with cas.Repository.open(root) as repo:
        assert repo.retention_policy() is None
        assert len(repo.snapshots()) == 3
    run("forget", "--keep-last", "1", "--save-policy", repo=root)
    with cas.Repository.open(root) as repo:
        assert repo.retention_policy() == RetentionPolicy(keep_last=1)
        assert [s.tag for s in repo.snapshots()] == ["step-2"]
