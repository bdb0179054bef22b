"""Chunk codecs: how a chunk's bytes are stored in a pack. Pure functions, no I/O.

A codec never changes a chunk's id: the id is the BLAKE3 of the decoded bytes.
Codec ids are part of the on-disk format (see FORMAT.md); ids not listed in
``KNOWN_CODECS`` are reserved for later versions and fail with a clear error.
"""

from __future__ import annotations

import threading
from enum import IntEnum

import zstandard

from cas.errors import ChunkCorruptError, FormatVersionError, UsageError


class Codec(IntEnum):
    RAW = 0
    ZSTD = 1
    # Reserved for the float-aware codecs: 2 = byte-grouped + zstd,
    # 3 = XOR-delta against a base chunk + byte-grouped + zstd.


KNOWN_CODECS = frozenset(int(c) for c in Codec)

#: compression setting name -> (codec, zstd level)
COMPRESSION_LEVELS: dict[str, tuple[Codec, int]] = {
    "none": (Codec.RAW, 0),
    "fast": (Codec.ZSTD, 1),
    "default": (Codec.ZSTD, 3),
    "max": (Codec.ZSTD, 19),
}

_local = threading.local()


def _compressor(level: int) -> zstandard.ZstdCompressor:
    cache: dict[int, zstandard.ZstdCompressor] | None = getattr(_local, "compressors", None)
    if cache is None:
        cache = _local.compressors = {}
    comp = cache.get(level)
    if comp is None:
        comp = cache[level] = zstandard.ZstdCompressor(level=level, write_content_size=True)
    return comp


def _decompressor() -> zstandard.ZstdDecompressor:
    dec: zstandard.ZstdDecompressor | None = getattr(_local, "decompressor", None)
    if dec is None:
        dec = _local.decompressor = zstandard.ZstdDecompressor()
    return dec


def check_compression(name: str) -> tuple[Codec, int]:
    try:
        return COMPRESSION_LEVELS[name]
    except KeyError:
        choices = ", ".join(COMPRESSION_LEVELS)
        raise UsageError(f"unknown compression {name!r}; choose one of: {choices}") from None


def encode(data: bytes | memoryview, compression: str) -> tuple[Codec, bytes | memoryview]:
    """Encode ``data``; returns the codec used and the payload.

    Never stores more than raw: when compression does not shrink the chunk the
    raw bytes are kept (and returned as the same buffer, no copy).
    """
    codec, level = check_compression(compression)
    if codec is Codec.RAW or len(data) == 0:
        return Codec.RAW, data
    payload = _compressor(level).compress(data)
    if len(payload) >= len(data):
        return Codec.RAW, data
    return Codec.ZSTD, payload


def decode(codec: int, payload: bytes | memoryview, raw_length: int) -> bytes | memoryview:
    """Decode a payload; any damage raises :class:`ChunkCorruptError`, never wrong bytes."""
    if codec == Codec.RAW:
        if len(payload) != raw_length:
            raise ChunkCorruptError(f"raw chunk holds {len(payload)} bytes, expected {raw_length}")
        return payload
    if codec == Codec.ZSTD:
        try:
            out = _decompressor().decompress(payload, max_output_size=raw_length)
        except zstandard.ZstdError as exc:
            raise ChunkCorruptError(f"zstd payload does not decode: {exc}") from None
        if len(out) != raw_length:
            raise ChunkCorruptError(f"zstd payload decodes to {len(out)} bytes, expected {raw_length}")
        return out
    raise FormatVersionError(
        f"chunk uses codec {codec}, which this version of cas does not know; upgrade cas to read it"
    )
