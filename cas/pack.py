"""Pack files: immutable files of chunk records with a self-describing footer.

Layout (all integers little-endian; see FORMAT.md for the normative text)::

    header   16 B   b"CASPACK\\x00" | u16 version | 6 reserved zero bytes
    record*         88 B record header | payload
    footer          96 B per entry, one per record, in record order
    trailer  64 B   u64 footer offset | u64 entry count | 32 B BLAKE3(footer)
                    | u16 version | 6 reserved | b"CASPEND\\x00"

A pack is named by the BLAKE3 of its footer, which lists every record's chunk id
(the BLAKE3 of its decoded bytes), offset, lengths, codec and base: the name checks
the footer, and each chunk id checks its payload.
"""

from __future__ import annotations

import os
import re
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import Protocol

import blake3

from cas.codec import Codec
from cas.errors import CasError, FormatVersionError, PackCorruptError
from cas.faults import crash_point
from cas.ids import ZERO_DIGEST, ChunkId, PackId

PACK_VERSION = 1
HEADER_MAGIC = b"CASPACK\x00"
TRAILER_MAGIC = b"CASPEND\x00"
RECORD_MAGIC = b"CREC"

HEADER = struct.Struct("<8sH6x")  # magic, version
# magic, codec, kind, flags, raw length, stored length, chunk id, base id
RECORD_HEADER = struct.Struct("<4sBBBxQQ32s32s")
# chunk id, base id, payload offset, stored length, raw length, codec, kind, flags
FOOTER_ENTRY = struct.Struct("<32s32sQQQBBB5x")
TRAILER = struct.Struct("<QQ32sH6x8s")

FLAG_HAS_BASE = 0x01
#: the largest raw length a record may claim: a data chunk is at most the largest chunk size, a
#: manifest node (a tree of a huge model) at most 1 GiB. A larger claim is damage, refused before
#: anything that size is allocated.
MAX_DATA_RAW_LENGTH = 256 << 20
MAX_NODE_RAW_LENGTH = 1 << 30


def raw_length_ok(kind: int, raw_length: int) -> bool:
    return raw_length <= (MAX_NODE_RAW_LENGTH if kind == 1 else MAX_DATA_RAW_LENGTH)
HEX64 = re.compile(r"[0-9a-f]{64}")


class ChunkKind(IntEnum):
    DATA = 0  # tensor bytes, array bytes, bytes values, pickled values
    NODE = 1  # manifest node (tree or snapshot)


@dataclass(frozen=True, slots=True)
class PackEntry:
    """Where one chunk lives inside a pack."""

    chunk_id: ChunkId
    offset: int  # of the payload, from the start of the pack file
    stored_length: int
    raw_length: int
    codec: int
    kind: int
    base_id: ChunkId | None = None

    def footer_bytes(self) -> bytes:
        flags = FLAG_HAS_BASE if self.base_id is not None else 0
        return FOOTER_ENTRY.pack(
            self.chunk_id, self.base_id or ZERO_DIGEST, self.offset, self.stored_length,
            self.raw_length, self.codec, self.kind, flags,
        )


class PackWriter:
    """Appends records to a temp file; ``seal`` makes it a durable, immutable pack."""

    def __init__(self, temp_path: Path) -> None:
        self.temp_path = temp_path
        self._file = open(temp_path, "xb", buffering=0)  # noqa: SIM115 - closed in seal/abort
        self._entries: list[PackEntry] = []
        self._size = 0
        try:
            self._write(HEADER.pack(HEADER_MAGIC, PACK_VERSION))
        except BaseException:  # a full disk refuses even the header: leave no file and no descriptor
            self.abort()
            raise

    def _write(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        while view:
            written = self._file.write(view)
            assert written is not None
            view = view[written:]
        self._size += len(data)

    @property
    def size(self) -> int:
        return self._size

    @property
    def entries(self) -> list[PackEntry]:
        return list(self._entries)

    def add(
        self,
        chunk_id: ChunkId,
        kind: ChunkKind,
        codec: int,
        payload: bytes | memoryview,
        raw_length: int,
        base_id: ChunkId | None = None,
    ) -> PackEntry:
        flags = FLAG_HAS_BASE if base_id is not None else 0
        stored_length = len(payload)
        self._write(RECORD_HEADER.pack(
            RECORD_MAGIC, codec, kind, flags, raw_length, stored_length,
            chunk_id, base_id or ZERO_DIGEST,
        ))
        entry = PackEntry(chunk_id, self._size, stored_length, raw_length, codec, int(kind), base_id)
        self._write(payload)
        self._entries.append(entry)
        crash_point("chunk_written")
        return entry

    def finish(self) -> PackId:
        """Write footer and trailer and close the file (not yet durable: see ``publish``)."""
        footer_offset = self._size
        footer = b"".join(e.footer_bytes() for e in self._entries)
        digest = blake3.blake3(footer).digest()
        self._write(footer)
        self._write(TRAILER.pack(footer_offset, len(self._entries), digest, PACK_VERSION, TRAILER_MAGIC))
        self._file.close()
        return PackId(digest)

    def publish(self, pack_id: PackId, store: Callable[[Path, PackId], None]) -> None:
        """fsync, re-read the footer, then hand the file to ``store`` (which moves it into the
        repository, or uploads it): the pack is durable when this returns."""
        fd = os.open(self.temp_path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        # Re-read what reached the disk before calling it done (catches a torn write now).
        if read_footer(self.temp_path, pack_id) != self._entries:
            raise PackCorruptError(f"pack {pack_id.short()} does not read back as written")
        crash_point("pack_before_rename")
        store(self.temp_path, pack_id)
        crash_point("pack_sealed")

    def seal(self, target: Path | Callable[[Path, PackId], None]) -> tuple[PackId, Path | None]:
        """``finish`` then ``publish``: into a local ``packs/`` directory (tools and tests that build
        packs by hand), or through a store's publish function."""
        pack_id = self.finish()
        if callable(target):
            self.publish(pack_id, target)
            return pack_id, None
        final = pack_path(target, pack_id)

        def move(temp: Path, _pid: PackId) -> None:
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(temp, final)

        self.publish(pack_id, move)
        return pack_id, final

    def abort(self) -> None:
        if not self._file.closed:
            self._file.close()
        self.temp_path.unlink(missing_ok=True)


def pack_path(packs_dir: Path, pack_id: PackId) -> Path:
    """The file of a pack in a local ``packs/`` directory (for tools and tests: the engine reads
    packs through the store): ``<id>.pack`` for data, ``<id>.meta`` for manifest nodes."""
    name = pack_id.hex()
    data = packs_dir / name[:2] / f"{name}.pack"
    meta = data.with_suffix(".meta")
    return meta if not data.exists() and meta.exists() else data


class PackSource(Protocol):
    """Where a sealed pack's bytes are read from: a local file, or an object in a backend."""

    name: str

    def size(self) -> int: ...

    def read(self, offset: int, length: int) -> bytes: ...

    def read_all(self) -> bytes: ...


class FileSource:
    """A pack file on local disk."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.name = path.name

    def size(self) -> int:
        try:
            return os.stat(self.path).st_size
        except FileNotFoundError:
            raise PackCorruptError(f"pack {self.name} is missing") from None

    def read(self, offset: int, length: int) -> bytes:
        try:
            with open(self.path, "rb") as f:
                return os.pread(f.fileno(), length, offset)
        except FileNotFoundError:
            raise PackCorruptError(f"pack {self.name} is missing") from None

    def read_all(self) -> bytes:
        try:
            return self.path.read_bytes()
        except FileNotFoundError:
            raise PackCorruptError(f"pack {self.name} is missing") from None


class MemorySource:
    """A pack held in memory (checked before it is stored or sent elsewhere)."""

    def __init__(self, name: str, data: bytes) -> None:
        self.name = name
        self._data = data

    def size(self) -> int:
        return len(self._data)

    def read(self, offset: int, length: int) -> bytes:
        return self._data[offset:offset + length]

    def read_all(self) -> bytes:
        return self._data


def as_source(pack: Path | PackSource) -> PackSource:
    return FileSource(pack) if isinstance(pack, Path) else pack


def read_footer(pack: Path | PackSource, expect_id: PackId | None = None) -> list[PackEntry]:
    """Parse and check a pack's header, trailer and footer (not the payloads); with ``expect_id``
    the footer must also hash to that name. Three small reads: header, trailer, footer."""
    source = as_source(pack)
    name = source.name
    size = source.size()
    if size < HEADER.size + TRAILER.size:
        raise PackCorruptError(f"pack {name} is truncated ({size} bytes)")
    magic, version = HEADER.unpack(source.read(0, HEADER.size))
    if magic != HEADER_MAGIC:
        raise PackCorruptError(f"{name} is not a cas pack (bad header magic)")
    if version != PACK_VERSION:
        raise FormatVersionError(f"pack {name} has format version {version}; this cas reads {PACK_VERSION}")
    trailer = source.read(size - TRAILER.size, TRAILER.size)
    if len(trailer) != TRAILER.size:
        raise PackCorruptError(f"pack {name} is truncated (short trailer)")
    footer_offset, count, footer_hash, t_version, t_magic = TRAILER.unpack(trailer)
    if t_magic != TRAILER_MAGIC or t_version != version:
        raise PackCorruptError(f"pack {name} is truncated or damaged (bad trailer)")
    if footer_offset + count * FOOTER_ENTRY.size + TRAILER.size != size or footer_offset < HEADER.size:
        raise PackCorruptError(f"pack {name} footer does not fit the file (truncated or damaged)")
    footer = source.read(footer_offset, count * FOOTER_ENTRY.size)
    digest = blake3.blake3(footer).digest()
    if digest != footer_hash:
        raise PackCorruptError(f"pack {name} footer checksum mismatch")
    return parse_footer(footer, size, name, expect_id)


def parse_footer(footer: bytes, size: int, name: str, expect_id: PackId | None = None) -> list[PackEntry]:
    """The entries of a pack's footer bytes, for a pack of ``size`` bytes; with ``expect_id`` the
    footer must hash to that name (a pack's name is the hash of its footer, so a footer kept
    elsewhere, in an index object, proves itself)."""
    if len(footer) % FOOTER_ENTRY.size:
        raise PackCorruptError(f"pack {name} footer has a partial entry")
    count = len(footer) // FOOTER_ENTRY.size
    footer_offset = size - TRAILER.size - len(footer)
    if footer_offset < HEADER.size:
        raise PackCorruptError(f"pack {name} footer does not fit the file (truncated or damaged)")
    if expect_id is not None:
        digest = blake3.blake3(footer).digest()
        if digest != expect_id:
            raise PackCorruptError(f"pack {name} is not the pack its name says (footer hash {digest.hex()[:12]})")
    entries = []
    for i in range(count):
        cid, base, offset, stored, raw, codec, kind, flags = FOOTER_ENTRY.unpack_from(footer, i * FOOTER_ENTRY.size)
        if offset < HEADER.size + RECORD_HEADER.size or offset + stored > footer_offset:
            raise PackCorruptError(f"pack {name} entry {i} points outside the records")
        if not raw_length_ok(kind, raw):
            raise PackCorruptError(f"pack {name} entry {i} claims an impossible raw length ({raw} bytes)")
        entries.append(PackEntry(
            ChunkId(cid), offset, stored, raw, codec, kind, ChunkId(base) if flags & FLAG_HAS_BASE else None,
        ))
    return entries


def iter_pack_files(packs_dir: Path) -> Iterator[tuple[PackId, Path]]:
    """Every sealed pack under ``packs_dir``; files whose names are not pack ids are skipped."""
    if not packs_dir.is_dir():
        return
    for sub in sorted(packs_dir.iterdir()):
        if not sub.is_dir():
            continue
        for path in sorted([*sub.glob("*.pack"), *sub.glob("*.meta")]):
            if HEX64.fullmatch(path.stem):  # a stray file is not a pack
                yield PackId(bytes.fromhex(path.stem)), path


def scan_records(pack: Path | PackSource) -> list[PackEntry]:
    """Salvage: walk the record headers from the front (for a pack whose footer is damaged).

    The file header is not trusted (damage there must not hide intact records): the walk
    starts right after it whatever it holds. Where a record header does not parse or does not
    fit the file, the walk resumes at the next record magic, so one damaged header hides only
    its own record. Every entry found is only a candidate: callers verify each payload
    against its chunk id before trusting it.
    """
    entries: list[PackEntry] = []
    try:
        data = as_source(pack).read_all()
    except (OSError, CasError):
        return entries
    size = len(data)
    pos = HEADER.size
    while pos + RECORD_HEADER.size <= size:
        magic, codec, kind, flags, raw_length, stored, cid, base = RECORD_HEADER.unpack_from(data, pos)
        offset = pos + RECORD_HEADER.size
        if (magic == RECORD_MAGIC and offset + stored <= size and raw_length_ok(kind, raw_length)
                and codec in KNOWN_CODECS and kind in KNOWN_KINDS and not flags & ~FLAG_HAS_BASE):
            entries.append(PackEntry(
                ChunkId(cid), offset, stored, raw_length, codec, kind,
                ChunkId(base) if flags & FLAG_HAS_BASE else None,
            ))
            pos = offset + stored
            continue
        found = data.find(RECORD_MAGIC, pos + 1)
        if found < 0:
            break
        pos = found
    return entries


def read_footer_lenient(pack: Path | PackSource) -> list[PackEntry]:
    """The footer's entries from the trailer alone (the file header is not checked): candidates
    for salvage when only the header is damaged. Empty if the trailer or footer does not check."""
    source = as_source(pack)
    try:
        size = source.size()
        if size < HEADER.size + TRAILER.size:
            return []
        footer_offset, count, footer_hash, _version, t_magic = TRAILER.unpack(source.read(size - TRAILER.size,
                                                                                           TRAILER.size))
        if t_magic != TRAILER_MAGIC or footer_offset + count * FOOTER_ENTRY.size + TRAILER.size != size:
            return []
        footer = source.read(footer_offset, count * FOOTER_ENTRY.size)
    except (OSError, CasError, struct.error):
        return []
    if blake3.blake3(footer).digest() != footer_hash:
        return []
    entries = []
    for i in range(count):
        cid, base, offset, stored, raw, codec, kind, flags = FOOTER_ENTRY.unpack_from(footer, i * FOOTER_ENTRY.size)
        if HEADER.size + RECORD_HEADER.size <= offset and offset + stored <= footer_offset and raw_length_ok(kind, raw):
            entries.append(PackEntry(
                ChunkId(cid), offset, stored, raw, codec, kind, ChunkId(base) if flags & FLAG_HAS_BASE else None,
            ))
    return entries


def salvage_candidates(pack: Path | PackSource) -> list[PackEntry]:
    """Every place a chunk may sit in a damaged pack: the footer (read from the trailer, even with
    a damaged header) and a forward scan of the record headers, without duplicates."""
    seen: set[tuple[bytes, int]] = set()
    out: list[PackEntry] = []
    source = as_source(pack)
    for entry in (*read_footer_lenient(source), *scan_records(source)):
        key = (bytes(entry.chunk_id), entry.offset)
        if key not in seen:
            seen.add(key)
            out.append(entry)
    return out


KNOWN_KINDS = frozenset(int(k) for k in ChunkKind)
KNOWN_CODECS = frozenset(int(c) for c in Codec)


def check_structure(pack: Path | PackSource, pack_id: PackId) -> list[PackEntry]:
    """Everything about a pack but its payloads: ``read_footer`` (magics, versions, footer hash
    against the name) plus the reserved zero bytes of header, trailer and footer entries, and
    every record header, which must sit right before its payload, agree with its footer entry
    field for field, and leave no gap: records are contiguous from the header to the footer.

    Record headers matter although readers go by the footer: salvage of a pack whose footer
    is damaged depends on them. Raises :class:`PackCorruptError` naming the first problem.
    """
    source = as_source(pack)
    entries = read_footer(source, pack_id)
    name = source.name
    data = source.read_all()
    size = len(data)
    if data[10:16] != bytes(6):
        raise PackCorruptError(f"pack {name} header has non-zero reserved bytes")
    trailer = data[size - TRAILER.size:]
    if trailer[50:56] != bytes(6):
        raise PackCorruptError(f"pack {name} trailer has non-zero reserved bytes")
    footer_offset = int.from_bytes(trailer[0:8], "little")
    footer = data[footer_offset:footer_offset + len(entries) * FOOTER_ENTRY.size]
    pos = HEADER.size
    for i, entry in enumerate(entries):
        raw_entry = footer[i * FOOTER_ENTRY.size:(i + 1) * FOOTER_ENTRY.size]
        if raw_entry[91:96] != bytes(5):
            raise PackCorruptError(f"pack {name} footer entry {i} has non-zero reserved bytes")
        flags = raw_entry[90]
        if flags & ~FLAG_HAS_BASE or entry.kind not in KNOWN_KINDS:
            raise PackCorruptError(f"pack {name} footer entry {i} has unknown flags or kind")
        if not flags & FLAG_HAS_BASE and raw_entry[32:64] != ZERO_DIGEST:
            raise PackCorruptError(f"pack {name} footer entry {i} names a base without its flag")
        if entry.offset != pos + RECORD_HEADER.size:
            raise PackCorruptError(f"pack {name} record {i} is not where the previous one ends")
        expected = RECORD_HEADER.pack(
            RECORD_MAGIC, entry.codec, entry.kind, flags, entry.raw_length, entry.stored_length,
            entry.chunk_id, entry.base_id or ZERO_DIGEST,
        )
        if data[pos:pos + RECORD_HEADER.size] != expected:
            raise PackCorruptError(f"pack {name} record header {i} does not match its footer entry")
        pos = entry.offset + entry.stored_length
    if pos != footer_offset:
        raise PackCorruptError(f"pack {name} has {footer_offset - pos} unaccounted bytes before its footer")
    return entries
