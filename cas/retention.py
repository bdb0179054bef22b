"""Retention rules (`forget`): which snapshots to keep, each with the reasons it is kept.

Pure policy over snapshot summaries: no I/O. Rules combine by union, as in restic:
a snapshot is kept when any rule keeps it.
"""

from __future__ import annotations

import fnmatch
import math
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from cas.errors import UsageError
from cas.reports import Snapshot

DURATION_UNITS = {"s": 1, "min": 60, "h": 3600, "d": 86400, "w": 7 * 86400, "mo": 30 * 86400, "y": 365 * 86400}
DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(s|min|h|d|w|mo|y)")


def parse_duration(text: str) -> float:
    """'36h', '1d12h', '2w', '6mo', '1y' -> seconds. 'm' is refused as ambiguous (minutes or months)."""
    compact = text.strip().replace(" ", "")
    pos, total = 0, 0.0
    while pos < len(compact):
        m = DURATION_PART.match(compact, pos)
        if not m:
            hint = " ('m' is ambiguous: write 'min' or 'mo')" if re.search(r"\dm(?!in|o)", compact) else ""
            raise UsageError(f"{text!r} is not a duration (examples: 36h, 1d12h, 2w, 6mo, 1y){hint}")
        total += float(m.group(1)) * DURATION_UNITS[m.group(2)]
        pos = m.end()
    if not compact:
        raise UsageError("empty duration")
    return total


@dataclass
class RetentionPolicy:
    keep_last: int = 0
    keep_hourly: int = 0
    keep_daily: int = 0
    keep_weekly: int = 0
    keep_monthly: int = 0
    keep_yearly: int = 0
    keep_within: str | None = None
    keep_tag: list[str] = field(default_factory=list)
    keep_best: int = 0
    metric: str | None = None
    mode: str = "min"
    keep_every_steps: int = 0

    def __post_init__(self) -> None:
        for name in ("keep_last", "keep_hourly", "keep_daily", "keep_weekly", "keep_monthly", "keep_yearly",
                     "keep_best", "keep_every_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise UsageError(f"{name} must be a non-negative integer, got {value!r}")
        if isinstance(self.keep_tag, str):
            self.keep_tag = [self.keep_tag]
        if self.keep_within is not None:
            parse_duration(self.keep_within)
        if self.mode not in ("min", "max"):
            raise UsageError(f"mode must be 'min' or 'max', got {self.mode!r}")
        if self.keep_best and not self.metric:
            raise UsageError("keep_best needs metric=NAME (a metric saved in snapshot metadata)")

    @property
    def empty(self) -> bool:
        return not any((self.keep_last, self.keep_hourly, self.keep_daily, self.keep_weekly, self.keep_monthly,
                        self.keep_yearly, self.keep_within, self.keep_tag, self.keep_best, self.keep_every_steps))

    def to_dict(self) -> dict[str, Any]:
        defaults = asdict(RetentionPolicy())
        return {k: v for k, v in asdict(self).items() if v != defaults[k]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RetentionPolicy:
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise UsageError(f"unknown retention rule(s): {', '.join(sorted(unknown))}")
        return cls(**data)


@dataclass
class ForgetReport:
    dry_run: bool
    kept: list[tuple[Snapshot, list[str]]] = field(default_factory=list)
    removed: list[Snapshot] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "dry_run": self.dry_run,
            "kept": [{"id": s.id, "tag": s.tag, "reasons": reasons} for s, reasons in self.kept],
            "removed": [{"id": s.id, "tag": s.tag} for s in self.removed],
        }


def metric_of(snap: Snapshot, name: str) -> float | None:
    """A metric from snapshot metadata: metadata['metrics'][name], else metadata[name]."""
    metrics = snap.metadata.get("metrics")
    value = metrics.get(name) if isinstance(metrics, dict) else None
    if value is None:
        value = snap.metadata.get(name)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        return None
    return float(value)


def step_of(snap: Snapshot) -> int | None:
    step = snap.metadata.get("step")
    return step if isinstance(step, int) and not isinstance(step, bool) else None


def _bucket(fmt: Callable[[datetime], Any]) -> Callable[[Snapshot], Any]:
    return lambda s: fmt(datetime.fromtimestamp(s.time, tz=UTC))


BUCKETS: list[tuple[str, str, Callable[[Snapshot], Any]]] = [
    ("keep_hourly", "hourly", _bucket(lambda d: (d.year, d.month, d.day, d.hour))),
    ("keep_daily", "daily", _bucket(lambda d: (d.year, d.month, d.day))),
    ("keep_weekly", "weekly", _bucket(lambda d: d.isocalendar()[:2])),
    ("keep_monthly", "monthly", _bucket(lambda d: (d.year, d.month))),
    ("keep_yearly", "yearly", _bucket(lambda d: d.year)),
]


def apply_policy(snapshots: list[Snapshot], policy: RetentionPolicy) -> tuple[dict[str, list[str]], list[Snapshot]]:
    """Reasons per kept snapshot id, and the snapshots to remove (oldest first)."""
    if policy.empty:
        raise UsageError("no retention rule given (and none stored in the repository): refusing to remove everything")
    newest_first = sorted(snapshots, key=lambda s: (s.time, s.id), reverse=True)
    reasons: dict[str, list[str]] = {}

    def keep(snap: Snapshot, why: str) -> None:
        reasons.setdefault(snap.id, []).append(why)

    for i, snap in enumerate(newest_first[: policy.keep_last]):
        keep(snap, f"last {i + 1} of {policy.keep_last}")
    for attr, label, bucket_of in BUCKETS:
        limit = getattr(policy, attr)
        seen: list[Any] = []
        for snap in newest_first:
            if len(seen) >= limit:
                break
            bucket = bucket_of(snap)
            if bucket not in seen:
                seen.append(bucket)
                keep(snap, f"{label} {len(seen)} of {limit}")
    if policy.keep_within and newest_first:
        horizon = newest_first[0].time - parse_duration(policy.keep_within)
        for snap in newest_first:
            if snap.time >= horizon:
                keep(snap, f"within {policy.keep_within} of the newest")
    for pattern in policy.keep_tag:
        for snap in newest_first:
            if snap.tag is not None and fnmatch.fnmatchcase(snap.tag, pattern):
                keep(snap, f"tag matches {pattern!r}")
    if policy.keep_best and policy.metric:
        scored = [(metric_of(s, policy.metric), s) for s in newest_first]
        ranked = [(v, s) for v, s in scored if v is not None]
        sign = 1.0 if policy.mode == "min" else -1.0
        # stable sort on newest-first order: among equal values the newer snapshot ranks first
        ranked.sort(key=lambda vs: sign * vs[0])
        for rank, (value, snap) in enumerate(ranked[: policy.keep_best], 1):
            keep(snap, f"best {rank} of {policy.keep_best} by {policy.metric} ({policy.mode}) = {value:g}")
    if policy.keep_every_steps:
        for snap in newest_first:
            step = step_of(snap)
            if step is not None and step % policy.keep_every_steps == 0:
                keep(snap, f"step {step} is a multiple of {policy.keep_every_steps}")
    removed = [s for s in sorted(snapshots, key=lambda s: (s.time, s.id)) if s.id not in reasons]
    return reasons, removed
