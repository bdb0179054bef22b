"""The bytes of one file of a file backup (FORMAT.md §7a), rebuilt from its layout in order.

Shared by restore (which writes them) and ``verify --read-data`` (which hashes them against the
stored SHA-256): a file backup verifies only if every file comes back as it was read. Tensors
are loaded in batches of about ``RESTORE_BATCH_BYTES`` (or the largest tensor), so memory stays
bounded whatever the size of the file.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from cas.errors import ManifestCorruptError
from cas.statedict import byte_view
from cas.tree import format_path

RESTORE_BATCH_BYTES = 256 << 20


class PartLoader:
    """Loads parts of one snapshot by exact key path (only their chunks are read); knows each
    tensor's size from the manifest, so a restore can bound what it holds in memory."""

    def __init__(self, repo: Any, snapshot: str, allow_pickle: bool = False) -> None:
        self.repo, self.snapshot, self.allow_pickle = repo, snapshot, allow_pickle
        self.sizes = {t["path"]: int(t["nbytes"]) for t in repo.tensors(snapshot)}

    def __call__(self, paths: list[tuple[Any, ...]]) -> list[Any]:
        value = self.repo.load(self.snapshot, keys=list(paths), allow_pickle=self.allow_pickle)
        out = []
        for path in paths:
            here = value
            for key in path:
                here = here[key]
            out.append(here)
        return out

    def nbytes(self, path: tuple[Any, ...]) -> int:
        return self.sizes.get(format_path(path), 0)


@dataclass
class StoredFile:
    mode: int
    mtime_ns: int
    size: int
    sha256: bytes
    layout: list[Any]
    refs: list[tuple[Any, ...]]


def stored_file(load: PartLoader, rel: str, where: str) -> StoredFile:
    """A file's small fields (one read), checked."""
    fields = ("mode", "mtime_ns", "size", "sha256", "layout")
    try:
        mode, mtime_ns, size, digest, layout = load([("files", rel, f) for f in fields])
    except (KeyError, TypeError, IndexError) as exc:
        raise ManifestCorruptError(f"{where} is malformed: {type(exc).__name__}: {exc}") from None
    if not all(isinstance(v, int) for v in (mode, mtime_ns, size)) or not isinstance(layout, list):
        raise ManifestCorruptError(f"{where} is malformed: mode, mtime and size must be integers")
    refs: list[tuple[Any, ...]] = []
    for item in layout:
        if isinstance(item, bytes):
            continue
        if not isinstance(item, tuple) or len(item) != 2 or item[0] not in ("t", "r"):
            raise ManifestCorruptError(f"{where} is malformed: a layout item is {item!r}")
        refs.append(("files", rel, "tensors" if item[0] == "t" else "raw", item[1]))
    return StoredFile(mode, mtime_ns, size, bytes(digest), layout, refs)


def part_bytes(part: Any) -> memoryview:
    if isinstance(part, torch.Tensor):
        return byte_view(part.contiguous())
    return memoryview(part)


def file_parts(load: PartLoader, stored: StoredFile, where: str) -> Iterator[memoryview]:
    """The file's bytes, part after part, in layout order."""
    pending = iter(stored.refs)
    loaded: list[Any] = []
    for item in stored.layout:
        if isinstance(item, bytes):
            yield memoryview(item)
            continue
        if not loaded:
            batch, total = [], 0
            for ref in pending:
                batch.append(ref)
                total += load.nbytes(ref)
                if total >= RESTORE_BATCH_BYTES:
                    break
            try:
                loaded = load(batch)
            except (KeyError, TypeError, IndexError) as exc:
                raise ManifestCorruptError(f"{where} is malformed: {type(exc).__name__}: {exc}") from None
            loaded.reverse()
        yield part_bytes(loaded.pop())


def file_problem(load: PartLoader, rel: str, where: str) -> str | None:
    """Why the stored file would not restore as it was read (size or SHA-256), or None."""
    stored = stored_file(load, rel, where)
    h = hashlib.sha256()
    size = 0
    for data in file_parts(load, stored, where):
        h.update(data)
        size += data.nbytes
    if size != stored.size or h.digest() != stored.sha256:
        return (f"{where}: the rebuilt file is {size} bytes with another sha256 than the {stored.size} bytes "
                "stored; it would not restore")
    return None
