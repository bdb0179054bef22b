"""Chunk codecs: how a chunk's bytes are stored in a pack. Pure functions, no I/O.

A codec never changes a chunk's id: the id is the BLAKE3 of the decoded bytes.
Codec ids are part of the on-disk format (see FORMAT.md); ids not listed in
``KNOWN_CODECS`` are reserved for later versions and fail with a clear error.

Codecs
======

| id | name | needs base | payload |
| --- | --- | --- | --- |
| 0 | raw | no | the chunk's bytes |
| 1 | zstd | no | one zstd frame with the content size set |
| 2 | byte-grouped | no | plane header + planes + tail (below) |
| 3 | XOR-delta | yes | as 2, over ``chunk XOR base`` (base: a chunk of the same raw length) |

Payload of codecs 2 and 3 (integers little-endian)::

    offset  size  field
    0       1     k: element size, 1, 2, 4 or 8
    1       1     flags: bit 0 = exponent-aligned (only with k > 1); bits 1-7 zero
    2       5*k   k plane descriptors: u8 mode (0 = stored, 1 = zstd frame) | u32 stored length
    2+5k    ...   the k plane payloads, in plane order, each exactly its stored length
    end-t   t     the tail: the last t = raw_length mod k bytes of the chunk (codec 3: XORed
                  with the base's last t bytes), stored as they are

With ``n = raw_length // k`` elements, the first ``n*k`` bytes are read as ``n``
little-endian unsigned integers of ``k`` bytes (codec 3 first XORs them with the
base's first ``n*k`` bytes). If the exponent-aligned flag is set, each integer is
rotated left by one bit (the sign bit moves to bit 0, so for IEEE floats and
bfloat16 the top byte holds the exponent bits alone). Plane ``i`` is then byte
``i`` of every integer (plane ``k-1``: the most significant byte), ``n`` bytes.
A plane is stored as those ``n`` bytes (mode 0, stored length ``n``) or as one
zstd frame with the content size set to ``n`` (mode 1). The payload length is
exactly ``2 + 5k + sum(stored lengths) + t``. Decoding reverses the steps:
planes -> integers -> rotate right by one bit (if flagged) -> XOR with the base
(codec 3) -> tail.

Anything else (an unknown k, flag bit or mode, a length that does not add up, a
zstd frame whose content size is not ``n`` or that does not decode) is damage:
:class:`ChunkCorruptError`. An unknown codec id is :class:`FormatVersionError`.

Choosing a codec (``encode``)
=============================

``compression``: ``"none"`` stores raw. Otherwise the candidates are plain zstd,
byte-grouped (k > 1) and, for floats, byte-grouped exponent-aligned; with a base
of the same length also the XOR-delta variants (so a key frame wins where it is
smaller). ``"fast"`` tries one non-delta and one delta candidate, ``"default"``
all of them; both pick on a sample of the chunk (4 slices, 64 KiB in all) when
the chunk is 256 KiB or more, else by encoding every candidate; the winner is
then encoded in full. ``"max"`` encodes every candidate in full and re-codes each
plane of the winner with zstd level 19, keeping whichever is smaller. The planes
are entropy-coded with zstd parameters that make it a fast Huffman coder of the
literals (strategy fast, tiny hash table, min match 7): on float planes this is
within 0.5 % of the order-0 entropy, and 2-5x faster than zstd level 1. A plane
that zstd does not shrink is stored; a payload not smaller than the chunk is
replaced by raw.
"""

from __future__ import annotations

import struct
import threading
from enum import IntEnum
from typing import TypeAlias

import numpy as np
import zstandard

from cas.errors import ChunkCorruptError, FormatVersionError, UsageError

Buffer: TypeAlias = bytes | bytearray | memoryview


class Codec(IntEnum):
    RAW = 0
    ZSTD = 1
    BYTE_GROUPED = 2
    XOR_DELTA = 3


KNOWN_CODECS = frozenset(int(c) for c in Codec)

#: compression setting name -> (codec, zstd level of the plain-zstd candidate)
COMPRESSION_LEVELS: dict[str, tuple[Codec, int]] = {
    "none": (Codec.RAW, 0),
    "fast": (Codec.ZSTD, 1),
    "default": (Codec.ZSTD, 3),
    "max": (Codec.ZSTD, 19),
}

#: element sizes a byte-grouped payload may declare
ELEMENT_SIZES = (1, 2, 4, 8)
FLAG_EXPONENT_ALIGNED = 0x01

_PLANE_STORED = 0
_PLANE_ZSTD = 1
_UINT = {2: np.dtype("<u2"), 4: np.dtype("<u4"), 8: np.dtype("<u8")}
_MAX_PLANE = 0xFFFFFFFF  # stored lengths are u32

# Chunks at least this large choose their codec on a sample: _SAMPLE_SLICES
# element-aligned slices of _SAMPLE_SLICE bytes spread over the chunk.
SAMPLE_THRESHOLD = 256 * 1024
_SAMPLE_SLICES = 4
_SAMPLE_SLICE = 16 * 1024
_STRONG_LEVEL = 19

_local = threading.local()

# zstd as a fast Huffman coder of literals: the fast strategy with a 256-entry
# hash table finds the long runs (zeros of a sparse delta, repeated rows) but
# spends little time hunting short matches in float bytes, which have none.
_HUF_PARAMS = {
    "strategy": 1,
    "window_log": 17,
    "hash_log": 8,
    "chain_log": 6,
    "search_log": 1,
    "min_match": 7,
    "target_length": 0,
    "write_content_size": True,
}


def _compressor(level: int) -> zstandard.ZstdCompressor:
    cache: dict[int, zstandard.ZstdCompressor] | None = getattr(_local, "compressors", None)
    if cache is None:
        cache = _local.compressors = {}
    comp = cache.get(level)
    if comp is None:
        comp = cache[level] = zstandard.ZstdCompressor(level=level, write_content_size=True)
    return comp


def _plane_compressor() -> zstandard.ZstdCompressor:
    comp: zstandard.ZstdCompressor | None = getattr(_local, "plane_compressor", None)
    if comp is None:
        params = zstandard.ZstdCompressionParameters(**_HUF_PARAMS)
        comp = _local.plane_compressor = zstandard.ZstdCompressor(compression_params=params)
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


def needs_base(codec: int) -> bool:
    """True if chunks stored with ``codec`` decode only with their base chunk."""
    return codec == Codec.XOR_DELTA


def _bytes_view(data: Buffer) -> memoryview:
    view = memoryview(data)
    if view.format != "B" or view.ndim != 1:
        try:
            view = view.cast("B")
        except TypeError:
            raise UsageError("chunk data must be a contiguous buffer") from None
    return view


# ---------------------------------------------------------------------------
# encoding


def _planes(arr: np.ndarray, k: int, rotate: bool) -> np.ndarray:
    """Split the first ``n*k`` bytes of ``arr`` (uint8) into ``k`` contiguous byte planes."""
    n = len(arr) // k
    body = arr[: n * k]
    if k == 1:
        return body.reshape(1, n)
    if rotate:
        ints = body.view(_UINT[k])
        bits = ints.dtype.type(8 * k - 1)
        rotated = np.left_shift(ints, ints.dtype.type(1))
        rotated |= ints >> bits
        body = rotated.view(np.uint8)
    cols = body.reshape(n, k)
    planes = np.empty((k, n), np.uint8)
    for i in range(k):  # one strided copy per plane: numpy's long inner loops
        planes[i] = cols[:, i]
    return planes


def _code_plane(plane: np.ndarray, strong: bool) -> tuple[int, Buffer]:
    n = len(plane)
    best: tuple[int, Buffer] = (_PLANE_STORED, plane.data)
    if n < 32:  # a zstd frame costs more than it can save
        return best
    frame = _plane_compressor().compress(plane)
    if len(frame) < n:
        best = (_PLANE_ZSTD, frame)
    if strong and len(best[1]) > 64:
        frame = _compressor(_STRONG_LEVEL).compress(plane)
        if len(frame) < len(best[1]):
            best = (_PLANE_ZSTD, frame)
    return best


def _encode_grouped(arr: np.ndarray, k: int, rotate: bool, strong: bool = False) -> bytes:
    """Codec 2/3 payload for ``arr`` (uint8; for codec 3 already XORed with the base)."""
    n = len(arr) // k
    if n > _MAX_PLANE:
        raise UsageError("byte-grouped codecs hold chunks of at most 4 GiB per plane")
    coded = [_code_plane(plane, strong) for plane in _planes(arr, k, rotate)]
    header = struct.pack(
        "<BB" + "BI" * k,
        k,
        FLAG_EXPONENT_ALIGNED if rotate else 0,
        *(x for mode, body in coded for x in (mode, len(body))),
    )
    return b"".join([header, *(body for _, body in coded), arr[n * k :].data])


def _xor(arr: np.ndarray, base: np.ndarray) -> np.ndarray:
    return np.bitwise_xor(arr, base)


def encode_as(
    data: Buffer,
    codec: int,
    *,
    element_size: int = 1,
    exponent_aligned: bool = False,
    base: Buffer | None = None,
    level: int | None = None,
) -> Buffer:
    """Encode ``data`` with one given codec and variant; returns the payload, even if larger than raw.

    For benchmarks, tests and callers that want a fixed codec. ``level`` is the
    zstd level of codec 1 (default 3); for codecs 2 and 3 any level >= 19
    additionally tries zstd 19 on every plane.
    """
    view = _bytes_view(data)
    if codec == Codec.RAW:
        return data
    if codec == Codec.ZSTD:
        return _compressor(3 if level is None else level).compress(view)
    if codec not in (Codec.BYTE_GROUPED, Codec.XOR_DELTA):
        raise UsageError(f"unknown codec {codec}")
    k = _element_size(element_size)
    if exponent_aligned and k == 1:
        raise UsageError("the exponent-aligned variant needs an element size of 2, 4 or 8")
    arr = np.frombuffer(view, np.uint8)
    if codec == Codec.XOR_DELTA:
        if base is None:
            raise UsageError("the XOR-delta codec needs a base chunk")
        base_arr = np.frombuffer(_bytes_view(base), np.uint8)
        if len(base_arr) != len(arr):
            raise UsageError(f"base chunk holds {len(base_arr)} bytes, the chunk {len(arr)}")
        arr = _xor(arr, base_arr)
    return _encode_grouped(arr, k, exponent_aligned, strong=level is not None and level >= _STRONG_LEVEL)


def _element_size(element_size: int) -> int:
    if element_size == 16:  # complex128: two float64 parts
        return 8
    if element_size not in ELEMENT_SIZES:
        raise UsageError(f"element size must be one of 1, 2, 4, 8 (or 16), not {element_size}")
    return element_size


def _sample(arr: np.ndarray) -> np.ndarray:
    """Element-aligned slices spread over ``arr``, concatenated (any k divides the offsets)."""
    step = (len(arr) - _SAMPLE_SLICE) // (_SAMPLE_SLICES - 1) // 8 * 8
    return np.concatenate([arr[i * step : i * step + _SAMPLE_SLICE] for i in range(_SAMPLE_SLICES)])


# A candidate: (codec, element size, exponent-aligned)
_Candidate = tuple[Codec, int, bool]


def _candidates(compression: str, k: int, is_float: bool, delta: bool) -> list[_Candidate]:
    rotate = is_float and k > 1
    if compression == "fast":
        key: list[_Candidate] = [(Codec.BYTE_GROUPED, k, rotate)] if k > 1 else [(Codec.ZSTD, 1, False)]
        return key + ([(Codec.XOR_DELTA, k, rotate)] if delta else [])
    found: list[_Candidate] = [(Codec.ZSTD, 1, False)]
    variants = [False, True] if rotate else [False]
    if k > 1:
        found += [(Codec.BYTE_GROUPED, k, r) for r in variants]
    if delta:
        found += [(Codec.XOR_DELTA, k, r) for r in variants]
    return found


def _encode_candidate(
    cand: _Candidate, arr: np.ndarray, xored: np.ndarray | None, level: int, strong: bool
) -> Buffer:
    codec, k, rotate = cand
    if codec == Codec.ZSTD:
        return _compressor(level).compress(arr)
    src = xored if codec == Codec.XOR_DELTA else arr
    assert src is not None
    return _encode_grouped(src, k, rotate, strong)


def encode(
    data: Buffer,
    compression: str,
    *,
    element_size: int = 1,
    is_float: bool = False,
    base: Buffer | None = None,
) -> tuple[Codec, Buffer]:
    """Encode ``data``; returns the codec used and the payload.

    ``element_size``: bytes per scalar of the tensor the chunk comes from (1, 2,
    4, 8; complex dtypes: the size of one part, or 16 for complex128); 1 for
    anything that is not a tensor. ``is_float``: the scalars are IEEE floats or
    bfloat16 (enables the exponent-aligned variant). ``base``: the chunk this
    one most likely resembles (the same tensor's chunk in the parent snapshot);
    used only if it has the same length. With the defaults this is plain zstd.

    Never stores more than raw: when compression does not shrink the chunk the
    raw bytes are kept (and returned as the same buffer, no copy).
    """
    _, level = check_compression(compression)
    view = _bytes_view(data)
    n = len(view)
    if compression == "none" or n == 0:
        return Codec.RAW, data
    k = _element_size(element_size)
    arr = np.frombuffer(view, np.uint8)
    base_arr: np.ndarray | None = None
    if base is not None:
        base_arr = np.frombuffer(_bytes_view(base), np.uint8)
        if len(base_arr) != n:
            base_arr = None
    cands = _candidates(compression, k, is_float, base_arr is not None)
    xored = None if base_arr is None else _xor(arr, base_arr)
    strong = compression == "max"

    if len(cands) > 1 and not strong and n >= SAMPLE_THRESHOLD:
        sample = _sample(arr)
        xsample = None if xored is None else _sample(xored)
        sizes = [len(_encode_candidate(c, sample, xsample, level, False)) for c in cands]
        cands = [cands[sizes.index(min(sizes))]]

    best: tuple[Codec, Buffer] = (Codec.RAW, data)
    best_size = n
    for cand in cands:
        payload = _encode_candidate(cand, arr, xored, level, strong)
        if len(payload) < best_size:
            best, best_size = (cand[0], payload), len(payload)
    return best


# ---------------------------------------------------------------------------
# decoding


def _zstd_frame(frame: Buffer, size: int, what: str) -> bytes:
    """Decode one zstd frame that must hold exactly ``size`` bytes."""
    try:
        declared = zstandard.frame_content_size(frame)
    except zstandard.ZstdError as exc:
        raise ChunkCorruptError(f"{what}: not a zstd frame ({exc})") from None
    if declared != size:
        raise ChunkCorruptError(f"{what}: zstd frame declares {declared} bytes, expected {size}")
    try:
        out = _decompressor().decompress(frame)
    except zstandard.ZstdError as exc:
        raise ChunkCorruptError(f"{what}: zstd frame does not decode ({exc})") from None
    if len(out) != size:
        raise ChunkCorruptError(f"{what}: zstd frame decodes to {len(out)} bytes, expected {size}")
    return out


def _decode_grouped(codec: int, payload: memoryview, raw_length: int, base: Buffer | None) -> memoryview:
    name = "byte-grouped" if codec == Codec.BYTE_GROUPED else "XOR-delta"
    base_arr = None
    if codec == Codec.XOR_DELTA:
        if base is None:
            raise ChunkCorruptError("XOR-delta chunk cannot be decoded without its base chunk (none was given)")
        base_arr = np.frombuffer(_bytes_view(base), np.uint8)
        if len(base_arr) != raw_length:
            raise ChunkCorruptError(
                f"XOR-delta chunk of {raw_length} bytes was given a base chunk of {len(base_arr)} bytes"
            )
    if len(payload) < 2:
        raise ChunkCorruptError(f"{name} payload of {len(payload)} bytes is too short for its header")
    k, flags = payload[0], payload[1]
    if k not in ELEMENT_SIZES:
        raise ChunkCorruptError(f"{name} payload declares element size {k}")
    rotate = bool(flags & FLAG_EXPONENT_ALIGNED)
    if flags & ~FLAG_EXPONENT_ALIGNED or (rotate and k == 1):
        raise ChunkCorruptError(f"{name} payload has invalid flags {flags:#04x}")
    head = 2 + 5 * k
    if len(payload) < head:
        raise ChunkCorruptError(f"{name} payload of {len(payload)} bytes is too short for its header")
    fields = struct.unpack_from("<" + "BI" * k, payload, 2)
    modes, lengths = fields[0::2], fields[1::2]
    n, tail = divmod(raw_length, k)
    if head + sum(lengths) + tail != len(payload):
        raise ChunkCorruptError(
            f"{name} payload holds {len(payload)} bytes, its header accounts for {head + sum(lengths) + tail}"
        )
    out = np.empty(raw_length, np.uint8)
    cols = out[: n * k].reshape(n, k)
    pos = head
    for i, (mode, length) in enumerate(zip(modes, lengths, strict=True)):
        chunk = payload[pos : pos + length]
        pos += length
        if mode == _PLANE_STORED:
            if length != n:
                raise ChunkCorruptError(f"{name} plane {i} stores {length} bytes, expected {n}")
            plane = np.frombuffer(chunk, np.uint8)
        elif mode == _PLANE_ZSTD:
            plane = np.frombuffer(_zstd_frame(chunk, n, f"{name} plane {i}"), np.uint8)
        else:
            raise ChunkCorruptError(f"{name} plane {i} has unknown mode {mode}")
        cols[:, i] = plane
    if tail:
        out[n * k :] = np.frombuffer(payload[pos:], np.uint8)
    if rotate:
        ints = out[: n * k].view(_UINT[k])
        low = ints >> ints.dtype.type(1)
        ints <<= ints.dtype.type(8 * k - 1)
        ints |= low
    if base_arr is not None:
        np.bitwise_xor(out, base_arr, out=out)
    return memoryview(out)


def decode(codec: int, payload: Buffer, raw_length: int, base: Buffer | None = None) -> Buffer:
    """Decode a payload; any damage raises :class:`ChunkCorruptError`, never wrong-length bytes.

    ``base``: the decoded bytes of the chunk's base (only for codecs where
    :func:`needs_base` is true). An unknown codec raises :class:`FormatVersionError`.
    """
    if codec == Codec.RAW:
        if len(_bytes_view(payload)) != raw_length:
            raise ChunkCorruptError(f"raw chunk holds {len(payload)} bytes, expected {raw_length}")
        return payload
    if codec == Codec.ZSTD:
        return _zstd_frame(payload, raw_length, "zstd chunk")
    if codec in (Codec.BYTE_GROUPED, Codec.XOR_DELTA):
        return _decode_grouped(codec, _bytes_view(payload), raw_length, base)
    raise FormatVersionError(
        f"chunk uses codec {codec}, which this version of cas does not know; upgrade cas to read it"
    )
