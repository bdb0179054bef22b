"""Plain result objects returned by the Repository API (and printed by the CLI)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any


@dataclass(frozen=True)
class Snapshot:
    id: str  # hex Merkle root
    tag: str | None
    time: float  # seconds since the epoch
    parent: str | None
    metadata: dict[str, Any]
    logical_bytes: int
    bytes_added: int
    tensor_count: int
    ref: str  # the ref name that points to it (tag, or the id for untagged snapshots)

    @property
    def short_id(self) -> str:
        return self.id[:12]

    @property
    def datetime(self) -> datetime:
        return datetime.fromtimestamp(self.time, tz=UTC)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["time_iso"] = self.datetime.isoformat()
        return out


@dataclass(frozen=True)
class Problem:
    kind: str  # missing-chunk, corrupt-chunk, missing-pack, corrupt-pack, corrupt-manifest, damaged-ref, corrupt-file
    message: str
    snapshot: str | None = None
    tensor: str | None = None
    pack: str | None = None
    chunk: str | None = None

    def __str__(self) -> str:
        where = ", ".join(
            f"{k} {v}" for k, v in (("snapshot", self.snapshot), ("tensor", self.tensor), ("pack", self.pack)) if v
        )
        return f"{self.kind}: {self.message}" + (f" [{where}]" if where else "")


@dataclass
class VerifyReport:
    read_data: bool
    snapshots_checked: int = 0
    chunks_checked: int = 0
    packs_checked: int = 0
    bytes_read: int = 0
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["ok"] = self.ok
        return out


@dataclass
class DiffReport:
    a: str
    b: str
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    changed_bytes: int = 0
    values_changed: list[str] = field(default_factory=list)  # non-tensor leaves

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class StatsReport:
    snapshot_count: int
    logical_bytes: int  # sum over snapshots of the bytes each holds
    unique_bytes: int  # raw bytes of distinct data chunks (manifest nodes excluded)
    stored_bytes: int  # bytes of pack files on disk
    chunk_count: int
    pack_count: int
    per_snapshot: list[dict[str, Any]]
    #: codec name -> {"chunks", "raw_bytes", "stored_bytes"} over every indexed chunk
    codecs: dict[str, dict[str, int]] = field(default_factory=dict)
    #: most delta links below a chunk, and the highest estimated restore cost (keyframe restores),
    #: estimated as for 4-byte elements: the index does not record element sizes (the saver, which
    #: knows them, bounds bf16 and 1-byte chains by their own, higher link costs)
    deepest_chain: int = 0
    costliest_chain: float = 1.0

    @property
    def dedup_ratio(self) -> float:
        return self.logical_bytes / self.unique_bytes if self.unique_bytes else 1.0

    @property
    def compression_ratio(self) -> float:
        return self.unique_bytes / self.stored_bytes if self.stored_bytes else 1.0

    @property
    def ratio(self) -> float:
        """logical / stored: how many times smaller the repository is than the checkpoints it holds."""
        return self.logical_bytes / self.stored_bytes if self.stored_bytes else 1.0

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.update(dedup_ratio=self.dedup_ratio, compression_ratio=self.compression_ratio, ratio=self.ratio)
        return out


@dataclass
class RebuildReport:
    """What ``rebuild_index`` found: chunks and packs indexed, and what it could not read."""

    chunks: int = 0
    packs: int = 0
    snapshots: int = 0
    #: pack id -> why its footer does not check (kept on disk; `cas check --repair` salvages it)
    unreadable_packs: dict[str, str] = field(default_factory=dict)
    #: chunks of unreadable packs that still verify and were indexed where they lie
    salvaged_chunks: int = 0
    #: ref name -> why its snapshot node cannot be read
    unreadable_snapshots: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.unreadable_packs and not self.unreadable_snapshots

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["ok"] = self.ok
        return out
