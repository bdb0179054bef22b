from __future__ import annotations

import struct
from pathlib import Path

import blake3
import pytest

from cas.errors import FormatVersionError, PackCorruptError
from cas.ids import PackId, chunk_id_of
from cas.pack import (
    FOOTER_ENTRY,
    HEADER,
    RECORD_HEADER,
    TRAILER,
    ChunkKind,
    PackWriter,
    iter_pack_files,
    read_footer,
)


def write_pack(tmp_path: Path, payloads: list[bytes]) -> Path:
    packs = tmp_path / "packs"
    packs.mkdir(exist_ok=True)
    w = PackWriter(tmp_path / "p.tmp")
    for data in payloads:
        w.add(chunk_id_of(data), ChunkKind.DATA, 0, data, len(data))
    _pack_id, path = w.seal(packs)
    return path


def test_layout_sizes_are_the_documented_ones() -> None:
    assert (HEADER.size, RECORD_HEADER.size, FOOTER_ENTRY.size, TRAILER.size) == (16, 88, 96, 64)


def test_pack_round_trip_and_bytes_on_disk(tmp_path: Path) -> None:
    payloads = [b"alpha" * 10, b"", bytes(range(256))]
    path = write_pack(tmp_path, payloads)
    raw = path.read_bytes()
    assert raw[:8] == b"CASPACK\x00" and struct.unpack_from("<H", raw, 8)[0] == 1
    assert raw[-8:] == b"CASPEND\x00"
    entries = read_footer(path)
    assert [e.chunk_id for e in entries] == [chunk_id_of(p) for p in payloads]
    for entry, data in zip(entries, payloads, strict=True):
        assert raw[entry.offset:entry.offset + entry.stored_length] == data
        assert raw[entry.offset - RECORD_HEADER.size:entry.offset - RECORD_HEADER.size + 4] == b"CREC"
    # the pack's name is the BLAKE3 of its footer (which lists every chunk id)
    footer_offset, count = struct.unpack_from("<QQ", raw, len(raw) - TRAILER.size)
    footer = raw[footer_offset:footer_offset + count * FOOTER_ENTRY.size]
    assert blake3.blake3(footer).hexdigest() == path.stem
    read_footer(path, PackId.from_hex(path.stem))
    with pytest.raises(PackCorruptError, match="not the pack its name says"):
        read_footer(path, PackId(bytes(32)))
    assert [p for _, p in iter_pack_files(tmp_path / "packs")] == [path]
    assert not (tmp_path / "p.tmp").exists()


def test_truncated_pack_is_a_typed_error(tmp_path: Path) -> None:
    path = write_pack(tmp_path, [b"x" * 1000])
    data = path.read_bytes()
    for cut in (10, len(data) // 2, len(data) - 1):
        path.write_bytes(data[:cut])
        with pytest.raises(PackCorruptError):
            read_footer(path)


def test_damaged_footer_is_detected(tmp_path: Path) -> None:
    path = write_pack(tmp_path, [b"x" * 1000, b"y" * 10])
    data = bytearray(path.read_bytes())
    footer_offset = struct.unpack_from("<Q", data, len(data) - TRAILER.size)[0]
    data[footer_offset + 40] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(PackCorruptError, match="footer checksum"):
        read_footer(path)


def test_foreign_file_and_future_version(tmp_path: Path) -> None:
    foreign = tmp_path / "foreign.pack"
    foreign.write_bytes(b"PK\x03\x04" + b"\0" * 200)
    with pytest.raises(PackCorruptError, match="not a cas pack"):
        read_footer(foreign)
    path = write_pack(tmp_path, [b"z" * 100])
    data = bytearray(path.read_bytes())
    struct.pack_into("<H", data, 8, 99)
    path.write_bytes(bytes(data))
    with pytest.raises(FormatVersionError, match="version 99"):
        read_footer(path)


def test_missing_pack(tmp_path: Path) -> None:
    with pytest.raises(PackCorruptError, match="missing"):
        read_footer(tmp_path / "nope.pack")
