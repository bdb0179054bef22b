"""Typed identifiers: a chunk, a pack and a snapshot are each named by a BLAKE3-256 digest."""

from __future__ import annotations

from typing import Self

import blake3

from cas.errors import UsageError

DIGEST_SIZE = 32
SHORT_HEX = 12


class _Digest(bytes):
    """32 raw bytes; ``.hex()`` is the full name, ``.short()`` the form used in messages."""

    __slots__ = ()

    def __new__(cls, raw: bytes) -> Self:
        if len(raw) != DIGEST_SIZE:
            raise ValueError(f"{cls.__name__} needs {DIGEST_SIZE} bytes, got {len(raw)}")
        return super().__new__(cls, raw)

    @classmethod
    def from_hex(cls, text: str) -> Self:
        try:
            raw = bytes.fromhex(text)
        except ValueError:
            raise UsageError(f"{text!r} is not a hexadecimal {cls.__name__}") from None
        if len(raw) != DIGEST_SIZE:
            raise UsageError(f"{text!r} is not a {DIGEST_SIZE * 2}-digit {cls.__name__}")
        return cls(raw)

    def short(self) -> str:
        return self.hex()[:SHORT_HEX]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.short()})"


class ChunkId(_Digest):
    __slots__ = ()


class PackId(_Digest):
    __slots__ = ()


class SnapshotId(ChunkId):
    """A snapshot is a root manifest node, so its id is also a chunk id."""

    __slots__ = ()


def hash_bytes(data: bytes | bytearray | memoryview) -> bytes:
    """BLAKE3-256 of ``data`` (the GIL is released for large buffers)."""
    return blake3.blake3(data).digest()


def chunk_id_of(data: bytes | bytearray | memoryview) -> ChunkId:
    return ChunkId(hash_bytes(data))


ZERO_DIGEST = bytes(DIGEST_SIZE)
