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
| 2 | byte-grouped | no | grouped payload (below) of the chunk |
| 3 | delta | yes | grouped payload (below) of the chunk against its base chunk: XOR or integer difference |

The base of a codec-3 chunk is another chunk with the same raw length (in
practice the same tensor's chunk in the parent snapshot); the pack record's
``base id`` names it (flags bit 0).

Grouped payload (codecs 2 and 3; integers little-endian)::

    offset  size  field
    0       1     k: element size, 1, 2, 4 or 8
    1       1     flags: bit 0 = exponent-aligned (k > 1 only)
                         bit 1 = difference (codec 3 only; not with bit 0)
                         bits 2-7 zero
    2       5*k   k plane descriptors: u8 mode (0 = stored, 1 = zstd frame) | u32 stored length
    2+5k    ...   the k plane payloads, in plane order, each exactly its stored length
    end-t   t     the tail, t = raw_length mod k bytes: the chunk's last t bytes
                  (codec 3: XORed with the base's last t bytes)

Encoding, with ``n = raw_length // k``: the first ``n*k`` bytes of the chunk are
``n`` little-endian unsigned ``k``-byte integers ``x`` (base: ``b``). Codec 3
replaces each by ``x XOR b`` or, with the difference flag, by
``zigzag(x - b mod 2^(8k))`` (``zigzag(d) = (d << 1) XOR (d >> (8k-1))`` on
``d`` read as signed: small changes of either sign become small numbers). With
the exponent-aligned flag each integer is rotated left by one bit: the sign
moves to bit 0, so for float32/float64/bfloat16 the top byte holds only exponent
bits. Plane ``i`` is byte ``i`` of every integer (plane ``k-1``: the most
significant bytes), ``n`` bytes, stored as is (mode 0, stored length ``n``) or
as one zstd frame whose content size is ``n`` (mode 1). The payload length is
exactly ``2 + 5k + sum(stored lengths) + t``. Decoding reverses each step.

Anything else (an unknown k, flag bit or mode, a length that does not add up, a
zstd frame whose content size is not ``n`` or that does not decode, codec 3
without a base of the chunk's length) is damage: :class:`ChunkCorruptError`. An
unknown codec id is :class:`FormatVersionError`.

Choosing a codec (``encode``)
=============================

``"none"`` stores raw. Otherwise (see ``_candidates``), for chunks of tensors
with ``element_size`` k > 1: byte-grouped, exponent-aligned when ``is_float``;
with a base of the same length also codec 3 (difference variant, and for
``"default"`` the XOR variant), so a key frame wins where it is smaller. k = 1
(bytes, int8, fp8, non-tensor data) uses plain zstd as before (level 1 / 3 / 19)
plus codec 3 with a base. ``"fast"`` and ``"default"`` pick among their
candidates on a sample (4 slices of 16 KiB, 64 KiB in all) when the chunk is at
least 256 KiB, else by encoding each, and then encode the winner. ``"max"``
encodes every variant (and plain zstd 19) in full, then re-codes each plane of
the winner with zstd 19 where that is smaller. Planes are entropy-coded by zstd
with parameters that make it a fast Huffman coder of literals (strategy fast,
256-entry hash table, min match 7): within 0.5 % of the planes' order-0 entropy
on float data and several times faster than zstd level 1, while still finding
long runs (sparse deltas, repeated rows). A plane that this does not shrink is
stored; a payload not smaller than the chunk is replaced by raw.
"""

from __future__ import annotations

import struct
import threading
from enum import IntEnum
from typing import Any, TypeAlias

import numpy as np
import zstandard

from cas.errors import ChunkCorruptError, FormatVersionError, UsageError

Buffer: TypeAlias = bytes | bytearray | memoryview


class Codec(IntEnum):
    RAW = 0
    ZSTD = 1
    BYTE_GROUPED = 2
    DELTA = 3


KNOWN_CODECS = frozenset(int(c) for c in Codec)
#: codecs whose ``decode(..., out=dest)`` writes into a writable ``dest`` of the raw length
DECODES_IN_PLACE = frozenset({Codec.BYTE_GROUPED, Codec.DELTA})

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
FLAG_DIFFERENCE = 0x02

_PLANE_STORED = 0
_PLANE_ZSTD = 1
_UINT: dict[int, np.dtype[Any]] = {1: np.dtype("u1"), 2: np.dtype("<u2"), 4: np.dtype("<u4"), 8: np.dtype("<u8")}
_INT: dict[int, np.dtype[Any]] = {1: np.dtype("i1"), 2: np.dtype("<i2"), 4: np.dtype("<i4"), 8: np.dtype("<i8")}
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
    return codec == Codec.DELTA


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


def _rotate_left(body: np.ndarray, k: int) -> np.ndarray:
    ints = body.view(_UINT[k])
    rotated = np.left_shift(ints, ints.dtype.type(1))
    rotated |= ints >> ints.dtype.type(8 * k - 1)
    out: np.ndarray = rotated.view(np.uint8)
    return out


def _zigzag_difference(body: np.ndarray, base_body: np.ndarray, k: int) -> np.ndarray:
    """``zigzag(body - base_body)`` per little-endian k-byte integer, wrapping."""
    diff = np.subtract(body.view(_UINT[k]), base_body.view(_UINT[k]))
    sign = diff.view(_INT[k]) >> (8 * k - 1)  # 0 or -1
    diff <<= diff.dtype.type(1)
    diff ^= sign.view(_UINT[k])
    out: np.ndarray = diff.view(np.uint8)
    return out


def _transform(arr: np.ndarray, base_arr: np.ndarray | None, k: int, flags: int) -> np.ndarray:
    """The bytes a codec 2/3 payload groups: body transformed, tail (XORed with the base) kept."""
    n = len(arr) // k * k
    if flags & FLAG_DIFFERENCE:
        assert base_arr is not None
        body = _zigzag_difference(arr[:n], base_arr[:n], k)
        tail = np.bitwise_xor(arr[n:], base_arr[n:])
        return np.concatenate([body, tail]) if len(tail) else body
    if base_arr is not None:
        arr = np.bitwise_xor(arr, base_arr)
    if flags & FLAG_EXPONENT_ALIGNED:
        body = _rotate_left(arr[:n], k)
        return np.concatenate([body, arr[n:]]) if n < len(arr) else body
    return arr


def _planes(body: np.ndarray, k: int) -> np.ndarray:
    """Split ``body`` (uint8, a multiple of k bytes) into ``k`` contiguous byte planes."""
    n = len(body) // k
    if k == 1:
        return body.reshape(1, n)
    cols = body.reshape(n, k)
    planes = np.empty((k, n), np.uint8)
    for i in range(k):  # one strided copy per plane: long inner loops, ~2.5 GB/s
        planes[i] = cols[:, i]
    return planes


def _code_plane(plane: np.ndarray, strong: bool) -> tuple[int, Buffer]:
    n = len(plane)
    best: tuple[int, Buffer] = (_PLANE_STORED, plane.data)
    if n < 32:  # a zstd frame costs more than it can save
        return best
    frame = _plane_compressor().compress(plane.data)
    if len(frame) < n:
        best = (_PLANE_ZSTD, frame)
    if strong and best[0] == _PLANE_ZSTD and len(best[1]) > 64:  # stored planes are noise
        frame = _compressor(_STRONG_LEVEL).compress(plane.data)
        if len(frame) < len(best[1]):
            best = (_PLANE_ZSTD, frame)
    return best


def _encode_grouped(arr: np.ndarray, base_arr: np.ndarray | None, k: int, flags: int, strong: bool) -> memoryview:
    """Codec 2 (``base_arr`` None) or 3 payload for ``arr`` (uint8)."""
    n = len(arr) // k
    if n > _MAX_PLANE:
        raise UsageError("byte-grouped codecs hold at most 2**32 - 1 elements per chunk")
    data = _transform(arr, base_arr, k, flags)
    coded = [_code_plane(plane, strong) for plane in _planes(data[: n * k], k)]
    header = struct.pack("<BB" + "BI" * k, k, flags, *(x for mode, body in coded for x in (mode, len(body))))
    pieces = [header, *(body for _, body in coded), data[n * k :].data]
    # assembled with numpy copies, which release the GIL (bytes.join holds it)
    out = np.empty(sum(len(piece) for piece in pieces), np.uint8)
    pos = 0
    for piece in pieces:
        out[pos : pos + len(piece)] = np.frombuffer(piece, np.uint8)
        pos += len(piece)
    return out.data


def _element_size(element_size: int) -> int:
    if element_size == 16:  # complex128: two float64 parts
        return 8
    if element_size not in ELEMENT_SIZES:
        raise UsageError(f"element size must be one of 1, 2, 4, 8 (or 16), not {element_size}")
    return element_size


def encode_as(
    data: Buffer,
    codec: int,
    *,
    element_size: int = 1,
    exponent_aligned: bool = False,
    difference: bool = False,
    base: Buffer | None = None,
    level: int | None = None,
) -> Buffer:
    """Encode ``data`` with one given codec and variant; returns the payload, even if larger than raw.

    For benchmarks, tests and callers that want a fixed codec. ``level``: the
    zstd level of codec 1 (default 3); for codecs 2 and 3, a level of 19 or more
    also tries zstd 19 on every plane.
    """
    view = _bytes_view(data)
    if codec == Codec.RAW:
        return data
    if codec == Codec.ZSTD:
        return _compressor(3 if level is None else level).compress(view)
    if codec not in (Codec.BYTE_GROUPED, Codec.DELTA):
        raise UsageError(f"unknown codec {codec}")
    k = _element_size(element_size)
    flags = (FLAG_EXPONENT_ALIGNED if exponent_aligned else 0) | (FLAG_DIFFERENCE if difference else 0)
    _check_flags(codec, k, flags, UsageError)
    arr = np.frombuffer(view, np.uint8)
    base_arr = None
    if codec == Codec.DELTA:
        if base is None:
            raise UsageError("the delta codec needs a base chunk")
        base_arr = np.frombuffer(_bytes_view(base), np.uint8)
        if len(base_arr) != len(arr):
            raise UsageError(f"base chunk holds {len(base_arr)} bytes, the chunk {len(arr)}")
    return _encode_grouped(arr, base_arr, k, flags, strong=level is not None and level >= _STRONG_LEVEL)


def _sample(arr: np.ndarray) -> np.ndarray:
    """Element-aligned slices spread over ``arr``, concatenated (8 divides every offset)."""
    step = (len(arr) - _SAMPLE_SLICE) // (_SAMPLE_SLICES - 1) // 8 * 8
    return np.concatenate([arr[i * step : i * step + _SAMPLE_SLICE] for i in range(_SAMPLE_SLICES)])


# A candidate: (codec, element size, flags)
_Candidate = tuple[Codec, int, int]


def _candidates(compression: str, k: int, is_float: bool, delta: bool) -> list[_Candidate]:
    """What ``encode`` tries, by setting; measured in bench/codec_ratios.py.

    On float data the exponent-aligned variant was never larger than plain
    grouping, and the difference variant of the delta codec was always the
    smallest delta, so "fast" tries only those; "default" adds plain grouping and
    the XOR delta (for other kinds of data); "max" tries everything.
    """
    rot, diff = FLAG_EXPONENT_ALIGNED, FLAG_DIFFERENCE
    key: list[_Candidate]
    if k == 1:
        key = [(Codec.ZSTD, 1, 0)]
    elif compression == "fast":
        key = [(Codec.BYTE_GROUPED, k, rot if is_float else 0)]
    else:
        key = [(Codec.BYTE_GROUPED, k, rot)] if is_float else []
        key.append((Codec.BYTE_GROUPED, k, 0))
        if compression == "max":
            key.append((Codec.ZSTD, 1, 0))
    if not delta:
        return key
    if compression == "fast":
        return [*key, (Codec.DELTA, k, diff)]
    deltas = [(Codec.DELTA, k, diff), (Codec.DELTA, k, 0)]
    if compression == "max" and is_float and k > 1:
        deltas.append((Codec.DELTA, k, rot))
    return key + deltas


def _encode_candidate(
    cand: _Candidate, arr: np.ndarray, base_arr: np.ndarray | None, level: int, strong: bool
) -> Buffer:
    codec, k, flags = cand
    if codec == Codec.ZSTD:
        return _compressor(level).compress(arr.data)
    return _encode_grouped(arr, base_arr if codec == Codec.DELTA else None, k, flags, strong)


def encode(
    data: Buffer,
    compression: str,
    *,
    element_size: int = 1,
    is_float: bool = False,
    base: Buffer | None = None,
    delta_ceiling: float = 1.0,
) -> tuple[Codec, Buffer]:
    """Encode ``data``; returns the codec used and the payload.

    ``element_size``: bytes per scalar of the tensor the chunk comes from (1, 2,
    4, 8; complex dtypes: the size of one part, or 16 for complex128); 1 for
    anything that is not a tensor. ``is_float``: the scalars are IEEE floats or
    bfloat16 (enables the exponent-aligned variant). ``base``: the chunk this
    one most likely resembles (the same tensor's chunk in the parent snapshot);
    used only if it has the same length. With the defaults this is plain zstd.
    ``delta_ceiling``: a delta is kept only when it is smaller than this fraction of
    the best keyframe encoding (the saver lowers it where restarting a delta chain
    pays off over the next saves).

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
    strong = compression == "max"

    if len(cands) > 1 and not strong and n >= SAMPLE_THRESHOLD:
        sample = _sample(arr)
        base_sample = None if base_arr is None else _sample(base_arr)
        sizes = [
            len(_encode_candidate(c, sample, base_sample, level, False)) / (delta_ceiling if c[0] == Codec.DELTA else 1)
            for c in cands
        ]
        cands = [cands[sizes.index(min(sizes))]]

    best: tuple[Codec, Buffer] = (Codec.RAW, data)
    best_size, best_score, best_cand = n, float(n), None
    for cand in cands:
        payload = _encode_candidate(cand, arr, base_arr, level, False)
        score = len(payload) / (delta_ceiling if cand[0] == Codec.DELTA else 1)
        if score < best_score and len(payload) < n:
            best, best_size, best_score, best_cand = (cand[0], payload), len(payload), score, cand
    if strong and best_cand is not None and best_cand[0] != Codec.ZSTD:
        payload = _encode_candidate(best_cand, arr, base_arr, level, True)
        if len(payload) < best_size:
            best = (best_cand[0], payload)
    return best


# ---------------------------------------------------------------------------
# decoding


def _check_flags(codec: int, k: int, flags: int, error: type[Exception]) -> None:
    if flags & ~(FLAG_EXPONENT_ALIGNED | FLAG_DIFFERENCE):
        raise error(f"unknown flags {flags:#04x}")
    if flags & FLAG_EXPONENT_ALIGNED and k == 1:
        raise error("the exponent-aligned variant needs an element size of 2, 4 or 8")
    if flags & FLAG_DIFFERENCE and codec != Codec.DELTA:
        raise error("the difference variant exists only for the delta codec")
    if flags & FLAG_DIFFERENCE and flags & FLAG_EXPONENT_ALIGNED:
        raise error("the difference and exponent-aligned variants do not combine")


def _zstd_content_size(frame: Buffer, size: int, what: str) -> None:
    try:
        declared = zstandard.frame_content_size(frame)
    except zstandard.ZstdError as exc:
        raise ChunkCorruptError(f"{what}: not a zstd frame ({exc})") from None
    if declared != size:
        raise ChunkCorruptError(f"{what}: zstd frame declares {declared} bytes, expected {size}")


def _zstd_frame(frame: Buffer, size: int, what: str) -> bytes:
    """Decode one zstd frame that must hold exactly ``size`` bytes."""
    _zstd_content_size(frame, size, what)
    try:
        out = _decompressor().decompress(frame)
    except zstandard.ZstdError as exc:
        raise ChunkCorruptError(f"{what}: zstd frame does not decode ({exc})") from None
    if len(out) != size:
        raise ChunkCorruptError(f"{what}: zstd frame decodes to {len(out)} bytes, expected {size}")
    return out


def _decode_grouped(
    codec: int, payload: memoryview, raw_length: int, base: Buffer | None, dest: memoryview | None = None
) -> memoryview:
    name = "byte-grouped" if codec == Codec.BYTE_GROUPED else "delta"
    base_arr = None
    if codec == Codec.DELTA:
        if base is None:
            raise ChunkCorruptError("delta-encoded chunk cannot be decoded without its base chunk (none was given)")
        base_arr = np.frombuffer(_bytes_view(base), np.uint8)
        if len(base_arr) != raw_length:
            raise ChunkCorruptError(
                f"delta-encoded chunk of {raw_length} bytes was given a base chunk of {len(base_arr)} bytes"
            )
    if raw_length < 0:
        raise ChunkCorruptError(f"{name} chunk has a negative length {raw_length}")
    if len(payload) < 2:
        raise ChunkCorruptError(f"{name} payload of {len(payload)} bytes is too short for its header")
    k, flags = payload[0], payload[1]
    if k not in ELEMENT_SIZES:
        raise ChunkCorruptError(f"{name} payload declares element size {k}")
    _check_flags(codec, k, flags, ChunkCorruptError)
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
    # check every plane's size before allocating the output: a damaged raw length
    # or frame header must not make us allocate what the payload cannot fill
    pieces = []
    pos = head
    for i, (mode, length) in enumerate(zip(modes, lengths, strict=True)):
        piece = payload[pos : pos + length]
        pos += length
        if mode == _PLANE_STORED:
            if length != n:
                raise ChunkCorruptError(f"{name} plane {i} stores {length} bytes, expected {n}")
        elif mode == _PLANE_ZSTD:
            _zstd_content_size(piece, n, f"{name} plane {i}")
        else:
            raise ChunkCorruptError(f"{name} plane {i} has unknown mode {mode}")
        pieces.append((mode, piece))
    if dest is not None and len(dest) == raw_length and not dest.readonly:
        out = np.frombuffer(dest, np.uint8)
    else:
        out = np.empty(raw_length, np.uint8)
    cols = out[: n * k].reshape(n, k)
    for i, (mode, piece) in enumerate(pieces):
        plane = piece if mode == _PLANE_STORED else _zstd_frame(piece, n, f"{name} plane {i}")
        cols[:, i] = np.frombuffer(plane, np.uint8)
    out[n * k :] = np.frombuffer(payload[pos:], np.uint8)
    if n and flags & FLAG_EXPONENT_ALIGNED:  # rotate right by one bit
        ints = out[: n * k].view(_UINT[k])
        low = ints >> ints.dtype.type(1)
        ints <<= ints.dtype.type(8 * k - 1)
        ints |= low
    if base_arr is not None and flags & FLAG_DIFFERENCE:
        ints = out[: n * k].view(_UINT[k])
        sign = (ints & ints.dtype.type(1)).view(_INT[k])
        np.negative(sign, out=sign)  # 0 or -1
        ints >>= ints.dtype.type(1)
        ints ^= sign.view(_UINT[k])
        ints += base_arr[: n * k].view(_UINT[k])
        np.bitwise_xor(out[n * k :], base_arr[n * k :], out=out[n * k :])
    elif base_arr is not None:
        np.bitwise_xor(out, base_arr, out=out)
    return out.data


def decode(
    codec: int, payload: Buffer, raw_length: int, base: Buffer | None = None, out: memoryview | None = None
) -> Buffer:
    """Decode a payload; any damage raises :class:`ChunkCorruptError`, never wrong-length bytes.

    ``base``: the decoded bytes of the chunk's base chunk, for codecs where
    :func:`needs_base` is true. ``out``: a writable buffer of ``raw_length`` bytes
    (not overlapping ``base``) that byte-grouped and delta codecs decode straight into,
    saving a copy; the return value is then a view of it. An unknown codec raises
    :class:`FormatVersionError`.
    """
    if codec == Codec.RAW:
        if len(_bytes_view(payload)) != raw_length:
            raise ChunkCorruptError(f"raw chunk holds {len(_bytes_view(payload))} bytes, expected {raw_length}")
        return payload
    if codec == Codec.ZSTD:
        return _zstd_frame(payload, raw_length, "zstd chunk")
    if codec in (Codec.BYTE_GROUPED, Codec.DELTA):
        return _decode_grouped(codec, _bytes_view(payload), raw_length, base, out)
    raise FormatVersionError(
        f"chunk uses codec {codec}, which this version of cas does not know; upgrade cas to read it"
    )
