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
| 4 | sparse delta | yes | runs of changed elements and their grouped values (below) |

The base of a codec-3/4 chunk is another chunk with the same raw length (in
practice the same tensor's chunk in the parent snapshot); the pack record's
``base id`` names it (flags bit 0). Both delta codecs are injective in the base:
for one payload, different bases decode to different chunks, so a chain whose
last chunk matches its id has no damaged link.

Grouped payload (codecs 2 and 3; integers little-endian)::

    offset  size  field
    0       1     k: element size, 1, 2, 4 or 8
    1       1     flags: bit 0 = exponent-aligned (k > 1 only)
                         bit 1 = difference (codec 3 only; not with bit 0)
                         bits 2-7 zero
    2       5*k   k plane descriptors: u8 mode (0 = stored, 1 = zstd frame, 2 = zero runs,
                  format version 3) | u32 stored length
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
significant bytes), ``n`` bytes, stored as is (mode 0, stored length ``n``), as
one zstd frame whose content size is ``n`` (mode 1) or as zero runs (mode 2). The
payload length is exactly ``2 + 5k + sum(stored lengths) + t``. Decoding reverses
each step.

Zero-run plane (mode 2, repositories of format version 3; ``m`` nonzero bytes)::

    offset  size  field
    0       4     m (u32)
    4       4     g: gap stream length (u32), m <= g <= m + (n - m) // 255
    8       5     gap stream: u8 mode (0 stored, 1 zstd frame) | u32 stored length
    13      5     value stream: u8 mode (0 stored, 1 zstd frame) | u32 stored length
    18      ...   the gap stream (g bytes decoded), then the values (m bytes)

The values are the nonzero bytes in order; before each, the gap stream holds the
count ``z`` of zero bytes since the previous one as ``z // 255`` bytes of 255 and
one byte ``z % 255`` (see ``cas.planes.zero_runs``).

Sparse delta payload (codec 4; for chunks where few elements changed): the
element size and flags as above, then::

    offset  size  field
    0       1     k
    1       1     flags (as codec 3)
    2       4     r: number of runs (u32)
    6       4     m: elements in all runs (u32)
    10      5     run table descriptor: u8 mode | u32 stored length (table: 8r bytes)
    15      ...   the run table: r u32 gaps, then r u32 lengths (elements); stored
                  (mode 0) or one zstd frame (mode 1). Run i starts gap[i] elements
                  after the end of run i-1 (the first: after element 0); length >= 1
    ...     5*k   k plane descriptors, as codec 2/3, each of m bytes
    ...     ...   the k planes of the m changed elements' transformed values
                  (XOR, or zigzag difference, with the exponent-aligned rotation
                  as codec 3), in run order
    end-t   t     the tail XORed with the base's tail (always present)

Decoding copies the base and rewrites only the elements in runs: it costs time
in proportion to what changed, which lets sparse chains run deeper (see the
saver's chain cost). Runs must lie inside the chunk's ``n`` elements and add up
to ``m``. Short unchanged gaps (up to 16 bytes) are folded into the runs.

Anything else (an unknown k, flag bit or mode, a length that does not add up, a
zstd frame whose content size is not ``n`` or that does not decode, a delta
without a base of the chunk's length, runs that overrun the chunk) is damage: :class:`ChunkCorruptError`. An
unknown codec id is :class:`FormatVersionError`.

Choosing a codec (``encode``)
=============================

``"none"`` stores raw. Otherwise (see ``_candidates``), for chunks of tensors
with ``element_size`` k > 1: byte-grouped, exponent-aligned when ``is_float``;
with a base of the same length also codec 3 (difference variant, and for
``"default"`` the XOR variant), and where at most half the elements changed
codec 4 in the same variants, so a key frame wins where it is smaller (a sparse
delta wins ties within 3 %: it decodes faster). k = 1
(bytes, int8, fp8, non-tensor data) uses plain zstd as before (level 1 / 3 / 19)
plus codec 3 with a base. ``"fast"`` and ``"default"`` pick among their
candidates on a sample (4 slices of 16 KiB, 64 KiB in all) when the chunk is at
least 256 KiB (float tensors: without plain grouping and the XOR delta, which never
won there), else by encoding each, and then encode the winner (planes that
zstd could not shrink at all in the sample, mantissa noise, are stored untried). ``"max"``
encodes every variant (and plain zstd 19) in full, then re-codes each plane of
the winner with zstd 19 where that is smaller. Planes are entropy-coded by zstd
with parameters that make it a fast Huffman coder of literals (strategy fast,
256-entry hash table, min match 7): within 0.5 % of the planes' order-0 entropy
on float data and several times faster than zstd level 1, while still finding
long runs (sparse deltas, repeated rows). With ``zero_runs`` (format version 3) a
plane with at most 30 % nonzero bytes is also coded as zero runs and the smaller
kept (at most 10 %: zero runs, untried against zstd). A plane that this does not
shrink is stored; a payload not smaller than the chunk is replaced by raw.
"""

from __future__ import annotations

import struct
import threading
from enum import IntEnum
from typing import TypeAlias

import numpy as np
import zstandard

from cas import planes
from cas.errors import ChunkCorruptError, FormatVersionError, UsageError

Buffer: TypeAlias = bytes | bytearray | memoryview


class Codec(IntEnum):
    RAW = 0
    ZSTD = 1
    BYTE_GROUPED = 2
    DELTA = 3
    SPARSE_DELTA = 4


KNOWN_CODECS = frozenset(int(c) for c in Codec)
#: codecs that decode only with their base chunk; each is injective in the base (see ``patch``)
DELTA_CODECS = frozenset({Codec.DELTA, Codec.SPARSE_DELTA})
#: codecs whose ``decode(..., out=dest)`` writes into a writable ``dest`` of the raw length
DECODES_IN_PLACE = frozenset({Codec.BYTE_GROUPED, Codec.DELTA, Codec.SPARSE_DELTA})

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
_PLANE_ZERO_RUNS = 2
#: plane mode 2: nonzero bytes m, gap stream length g, then the two streams' descriptors
_ZERO_RUNS_HEAD = struct.Struct("<IIBIBI")
#: a plane is tried as zero runs (mode 2) when at most this share of its bytes are nonzero
ZERO_RUNS_MAX_NONZERO = 0.3
#: at most this share nonzero, zero runs are kept without trying zstd on the whole plane
#: (measured on delta planes of 0.5 % to 10 % nonzero: 0.55-0.6x zstd's size; on planes of a few
#: hundred bytes the 18-byte header can leave zstd a few bytes ahead)
_ZERO_RUNS_SURE = 0.1
_UINT = planes.UINT
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


def codec_name(codec: int) -> str:
    """``"raw"``, ``"zstd"``, ``"byte-grouped"``, ``"delta"``, ``"sparse-delta"`` (or ``"codec N"``)."""
    try:
        return Codec(codec).name.lower().replace("_", "-")
    except ValueError:
        return f"codec {codec}"


def needs_base(codec: int) -> bool:
    """True if chunks stored with ``codec`` decode only with their base chunk."""
    return codec in DELTA_CODECS


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


def _mode(base_arr: np.ndarray | None, flags: int) -> int:
    """The plane transform of a grouped payload: plain, XOR with the base, or zigzag difference."""
    if base_arr is None:
        return planes.PLAIN
    return planes.DIFFERENCE if flags & FLAG_DIFFERENCE else planes.XOR


def _code_stream(stream: np.ndarray, strong: bool) -> tuple[int, Buffer]:
    """A zero-run stream stored, or as one zstd frame where that is smaller."""
    best: tuple[int, Buffer] = (_PLANE_STORED, stream.data)
    if len(stream) < 32:
        return best
    frame = _plane_compressor().compress(stream.data)
    if strong:
        frame = min(frame, _compressor(_STRONG_LEVEL).compress(stream.data), key=len)
    return (_PLANE_ZSTD, frame) if len(frame) < len(stream) else best


def _zero_runs_body(plane: np.ndarray, nonzero: int, strong: bool) -> memoryview:
    """Plane mode 2: the gap stream and the nonzero bytes (``nonzero`` of them), each entropy-coded on its own."""
    gaps, values = planes.zero_runs(plane, nonzero)
    (gap_mode, gap_body), (value_mode, value_body) = _code_stream(gaps, strong), _code_stream(values, strong)
    head = _ZERO_RUNS_HEAD.pack(len(values), len(gaps), gap_mode, len(gap_body), value_mode, len(value_body))
    return _assemble([head, gap_body, value_body])


def _code_plane(plane: np.ndarray, strong: bool, zero_runs: bool = True) -> tuple[int, Buffer]:
    """A plane stored, as one zstd frame or (``zero_runs``, mostly zero bytes) as zero runs: the smallest.

    A Huffman stage spends at least one bit per byte; the high byte of a delta is ~95 %
    zeros, whose order-0 entropy is ~0.3 bits: zero runs get within ~5 % of it.
    """
    n = len(plane)
    best: tuple[int, Buffer] = (_PLANE_STORED, plane.data)
    if n < 32:  # a zstd frame costs more than it can save
        return best
    nonzero = int(np.count_nonzero(plane)) if zero_runs else n
    if nonzero <= ZERO_RUNS_MAX_NONZERO * n:
        body = _zero_runs_body(plane, nonzero, strong)
        if len(body) < n:
            best = (_PLANE_ZERO_RUNS, body)
        if nonzero <= _ZERO_RUNS_SURE * n and not strong:
            return best
    frame = _plane_compressor().compress(plane.data)
    if len(frame) < len(best[1]):
        best = (_PLANE_ZSTD, frame)
    if strong and best[0] != _PLANE_STORED and len(best[1]) > 64:  # stored planes are noise
        frame = _compressor(_STRONG_LEVEL).compress(plane.data)
        if len(frame) < len(best[1]):
            best = (_PLANE_ZSTD, frame)
    return best


def _encode_grouped(
    arr: np.ndarray, base_arr: np.ndarray | None, k: int, flags: int, strong: bool, noise: frozenset[int] = frozenset(),
    zero_runs: bool = True,
) -> memoryview:
    """Codec 2 (``base_arr`` None) or 3 payload for ``arr`` (uint8); planes in ``noise`` are stored untried;
    ``zero_runs``: planes may use mode 2."""
    n = len(arr) // k
    if n > _MAX_PLANE:
        raise UsageError("byte-grouped codecs hold at most 2**32 - 1 elements per chunk")
    split = planes.split(arr, base_arr, k, _mode(base_arr, flags), bool(flags & FLAG_EXPONENT_ALIGNED))
    coded = [(_PLANE_STORED, plane.data) if i in noise else _code_plane(plane, strong, zero_runs)
             for i, plane in enumerate(split)]
    tail = arr[n * k :] if base_arr is None else np.bitwise_xor(arr[n * k :], base_arr[n * k :])
    header = struct.pack("<BB" + "BI" * k, k, flags, *(x for mode, body in coded for x in (mode, len(body))))
    return _assemble([header, *(body for _, body in coded), tail.data])


def _assemble(pieces: list[Buffer]) -> memoryview:
    """One payload from its pieces, copied by numpy, which releases the GIL (bytes.join holds it)."""
    out = np.empty(sum(len(piece) for piece in pieces), np.uint8)
    pos = 0
    for piece in pieces:
        out[pos : pos + len(piece)] = np.frombuffer(piece, np.uint8)
        pos += len(piece)
    return out.data


#: a sparse delta is tried when at most this share of the chunk's elements changed
SPARSE_MAX_CHANGED = 0.5
#: unchanged gaps up to this many bytes are folded into the runs around them (a run costs ~8 bytes)
_SPARSE_MERGE_GAP = 16
_SPARSE_HEAD = struct.Struct("<BBIIBI")  # k, flags, runs, changed elements, run table mode, its stored length


def changed_share(arr: np.ndarray, base_arr: np.ndarray, k: int) -> float:
    """The share of the chunk's ``k``-byte elements that differ from the base (tail ignored)."""
    n = len(arr) // k
    if n == 0:
        return 0.0
    x, b = arr[: n * k].view(_UINT[k]), base_arr[: n * k].view(_UINT[k])
    return int(np.count_nonzero(x != b)) / n


def _change_runs(x: np.ndarray, b: np.ndarray, merge_gap: int) -> tuple[np.ndarray, np.ndarray]:
    """Start and length (elements) of the runs where ``x`` and ``b`` differ; short gaps folded in."""
    edges = np.diff((x != b).view(np.int8), prepend=np.int8(0), append=np.int8(0))
    starts = np.flatnonzero(edges == 1)
    ends = np.flatnonzero(edges == -1)
    if merge_gap > 0 and len(starts) > 1:
        keep = (starts[1:] - ends[:-1]) > merge_gap
        starts = np.concatenate([starts[:1], starts[1:][keep]])
        ends = np.concatenate([ends[:-1][keep], ends[-1:]])
    return starts, ends - starts


def _encode_sparse(
    arr: np.ndarray, base_arr: np.ndarray, k: int, flags: int, strong: bool, zero_runs: bool = True
) -> memoryview:
    """Codec 4 payload: the runs of changed elements and their transformed values, byte-grouped."""
    n = len(arr) // k
    if n > _MAX_PLANE:
        raise UsageError("byte-grouped codecs hold at most 2**32 - 1 elements per chunk")
    x, b = arr[: n * k].view(_UINT[k]), base_arr[: n * k].view(_UINT[k])
    starts, lengths = _change_runs(x, b, max(0, _SPARSE_MERGE_GAP // k))
    idx = planes.run_index(starts, lengths)
    m = len(idx)
    gaps = starts - np.concatenate([[0], (starts + lengths)[:-1]]) if len(starts) else starts
    table = np.concatenate([gaps, lengths]).astype("<u4").view(np.uint8)
    table_mode, table_body = _PLANE_STORED, bytes(table.data)
    if len(table) >= 32:
        frame = _compressor(3).compress(table.data)
        if len(frame) < len(table):
            table_mode, table_body = _PLANE_ZSTD, frame
    if m:
        split = planes.split(x[idx].view(np.uint8), b[idx].view(np.uint8), k,
                             _mode(base_arr, flags), bool(flags & FLAG_EXPONENT_ALIGNED))
        coded = [_code_plane(plane, strong, zero_runs) for plane in split]
    else:
        coded = [(_PLANE_STORED, b"")] * k
    tail = np.bitwise_xor(arr[n * k :], base_arr[n * k :])
    header = _SPARSE_HEAD.pack(k, flags, len(starts), m, table_mode, len(table_body))
    planes_header = struct.pack("<" + "BI" * k, *(v for mode, body in coded for v in (mode, len(body))))
    return _assemble([header, table_body, planes_header, *(body for _, body in coded), tail.data])


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
    zero_runs: bool = True,
) -> Buffer:
    """Encode ``data`` with one given codec and variant; returns the payload, even if larger than raw.

    For benchmarks, tests and callers that want a fixed codec. ``level``: the
    zstd level of codec 1 (default 3); for codecs 2 and 3, a level of 19 or more
    also tries zstd 19 on every plane. ``zero_runs=False``: no plane uses mode 2
    (what repositories of format version 1 and 2 hold).
    """
    view = _bytes_view(data)
    if codec == Codec.RAW:
        return data
    if codec == Codec.ZSTD:
        return _compressor(3 if level is None else level).compress(view)
    if codec not in (Codec.BYTE_GROUPED, Codec.DELTA, Codec.SPARSE_DELTA):
        raise UsageError(f"unknown codec {codec}")
    k = _element_size(element_size)
    flags = (FLAG_EXPONENT_ALIGNED if exponent_aligned else 0) | (FLAG_DIFFERENCE if difference else 0)
    _check_flags(codec, k, flags, UsageError)
    arr = np.frombuffer(view, np.uint8)
    base_arr = None
    strong = level is not None and level >= _STRONG_LEVEL
    if codec in DELTA_CODECS:
        if base is None:
            raise UsageError("the delta codecs need a base chunk")
        base_arr = np.frombuffer(_bytes_view(base), np.uint8)
        if len(base_arr) != len(arr):
            raise UsageError(f"base chunk holds {len(base_arr)} bytes, the chunk {len(arr)}")
        if codec == Codec.SPARSE_DELTA:
            return _encode_sparse(arr, base_arr, k, flags, strong, zero_runs)
    return _encode_grouped(arr, base_arr, k, flags, strong, zero_runs=zero_runs)


def _sample(arr: np.ndarray) -> np.ndarray:
    """Element-aligned slices spread over ``arr``, concatenated (8 divides every offset)."""
    step = (len(arr) - _SAMPLE_SLICE) // (_SAMPLE_SLICES - 1) // 8 * 8
    return np.concatenate([arr[i * step : i * step + _SAMPLE_SLICE] for i in range(_SAMPLE_SLICES)])


# A candidate: (codec, element size, flags)
_Candidate = tuple[Codec, int, int]


def _candidates(compression: str, k: int, is_float: bool, delta: bool, sparse: bool = False) -> list[_Candidate]:
    """What ``encode`` tries, by setting; measured in bench/codec_ratios.py.

    On float data the exponent-aligned variant was never larger than plain
    grouping, and the difference variant of the delta codec was always the
    smallest delta, so "fast" tries only those; "default" adds plain grouping and
    the XOR delta (for other kinds of data); "max" tries everything. ``sparse``
    (few elements changed) adds the sparse delta in the same variants.
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
    variants = [diff] if compression == "fast" else [diff, 0]
    if compression == "max" and is_float and k > 1:
        variants.append(rot)
    codecs = [Codec.SPARSE_DELTA, Codec.DELTA] if sparse else [Codec.DELTA]
    return key + [(codec, k, flags) for codec in codecs for flags in variants]


def _encode_candidate(
    cand: _Candidate, arr: np.ndarray, base_arr: np.ndarray | None, level: int, strong: bool,
    noise: frozenset[int] = frozenset(), zero_runs: bool = True,
) -> Buffer:
    codec, k, flags = cand
    if codec == Codec.ZSTD:
        return _compressor(level).compress(arr.data)
    if codec == Codec.SPARSE_DELTA:
        assert base_arr is not None
        return _encode_sparse(arr, base_arr, k, flags, strong, zero_runs)
    return _encode_grouped(arr, base_arr if codec == Codec.DELTA else None, k, flags, strong, noise, zero_runs)


def _noise_planes(cand: _Candidate, sample_payload: Buffer) -> frozenset[int]:
    """Planes that entropy coding could not shrink at all in the sample (mantissa noise): the full
    encoding stores them without trying."""
    codec, k, _ = cand
    if codec not in (Codec.BYTE_GROUPED, Codec.DELTA):
        return frozenset()
    view = memoryview(sample_payload).cast("B")
    return frozenset(i for i in range(k) if view[2 + 5 * i] == _PLANE_STORED)


def _score(cand: _Candidate, size: int, delta_ceiling: float) -> float:
    """What ``encode`` minimises: the size, deltas weighed against the ceiling; a sparse
    delta (which decodes in time proportional to what changed) wins near-ties."""
    if cand[0] == Codec.SPARSE_DELTA:
        return size * _SPARSE_PREFERENCE / delta_ceiling
    if cand[0] == Codec.DELTA:
        return size / delta_ceiling
    return float(size)


_SPARSE_PREFERENCE = 0.97

#: on float chunks large enough to be sampled these (almost) never won: of 520 such chunks of the
#: dedup series the XOR delta won none and plain grouping 2 (0.1 MiB, bytes unchanged without it);
#: sampling them cost as much as the chosen encoding itself. Smaller chunks still try them all.
_FLOAT_NEVER_SAMPLED = frozenset(
    (codec, k, 0) for codec in (Codec.BYTE_GROUPED, Codec.DELTA) for k in ELEMENT_SIZES if k > 1
)


def encode(
    data: Buffer,
    compression: str,
    *,
    element_size: int = 1,
    is_float: bool = False,
    base: Buffer | None = None,
    delta_ceiling: float = 1.0,
    sparse: bool = True,
    zero_runs: bool = True,
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
    pays off over the next saves). ``sparse=False``: never the sparse delta (the saver
    asks for a dense one when a sparse delta would decode too slowly for its chain).
    ``zero_runs=False``: no plane is coded as zero runs (plane mode 2, format version 3);
    the saver asks for that in repositories of an older version.

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
    sparse = sparse and base_arr is not None and changed_share(arr, base_arr, k) <= SPARSE_MAX_CHANGED
    cands = _candidates(compression, k, is_float, base_arr is not None, sparse)
    strong = compression == "max"

    noise: frozenset[int] = frozenset()
    if not strong and n >= SAMPLE_THRESHOLD:
        if is_float and k > 1:
            cands = [c for c in cands if c not in _FLOAT_NEVER_SAMPLED]
        sample = _sample(arr)
        base_sample = None if base_arr is None else _sample(base_arr)
        sampled = [_encode_candidate(c, sample, base_sample, level, False, zero_runs=zero_runs) for c in cands]
        sizes = [_score(c, len(p), delta_ceiling) for c, p in zip(cands, sampled, strict=True)]
        pick = sizes.index(min(sizes))
        cands = [cands[pick]]
        noise = _noise_planes(cands[0], sampled[pick])

    best: tuple[Codec, Buffer] = (Codec.RAW, data)
    best_size, best_score, best_cand = n, float(n), None
    for cand in cands:
        payload = _encode_candidate(cand, arr, base_arr, level, False, noise, zero_runs)
        score = _score(cand, len(payload), delta_ceiling)
        if score < best_score and len(payload) < n:
            best, best_size, best_score, best_cand = (cand[0], payload), len(payload), score, cand
    if strong and best_cand is not None and best_cand[0] != Codec.ZSTD:
        payload = _encode_candidate(best_cand, arr, base_arr, level, True, zero_runs=zero_runs)
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
    if flags & FLAG_DIFFERENCE and codec not in DELTA_CODECS:
        raise error("the difference variant exists only for the delta codecs")
    if flags & FLAG_DIFFERENCE and flags & FLAG_EXPONENT_ALIGNED:
        raise error("the difference and exponent-aligned variants do not combine")


def _zstd_content_size(frame: Buffer, size: int, what: str) -> None:
    try:
        declared = zstandard.frame_content_size(frame)
    except zstandard.ZstdError as exc:
        raise ChunkCorruptError(f"{what}: not a zstd frame ({exc})") from None
    if declared != size:
        raise ChunkCorruptError(f"{what}: zstd frame declares {declared} bytes, expected {size}")


def _zstd_frame(frame: Buffer, size: int, what: str, checked: bool = False) -> bytes:
    """Decode one zstd frame that must hold exactly ``size`` bytes (``checked``: its header was)."""
    if not checked:
        _zstd_content_size(frame, size, what)
    try:
        out = _decompressor().decompress(frame)
    except zstandard.ZstdError as exc:
        raise ChunkCorruptError(f"{what}: zstd frame does not decode ({exc})") from None
    if len(out) != size:
        raise ChunkCorruptError(f"{what}: zstd frame decodes to {len(out)} bytes, expected {size}")
    return out


def _read_planes(
    name: str, payload: memoryview, pos: int, n: int, k: int, what: str = "plane", zero_runs: bool = True
) -> tuple[list[tuple[int, memoryview]], int]:
    """Parse ``k`` plane descriptors at ``pos`` and check each plane against ``n`` elements.

    Returns the planes (mode, stored bytes) and the offset after them. Sizes are
    checked before anything is allocated: a damaged length or frame header must
    not make us allocate what the payload cannot fill.
    """
    head = pos + 5 * k
    if len(payload) < head:
        raise ChunkCorruptError(f"{name} payload of {len(payload)} bytes is too short for its header")
    fields = struct.unpack_from("<" + "BI" * k, payload, pos)
    pieces = []
    pos = head
    for i, (mode, length) in enumerate(zip(fields[0::2], fields[1::2], strict=True)):
        if pos + length > len(payload):
            raise ChunkCorruptError(f"{name} {what} {i} runs past the end of the payload")
        piece = payload[pos : pos + length]
        pos += length
        if mode == _PLANE_STORED:
            if length != n:
                raise ChunkCorruptError(f"{name} {what} {i} stores {length} bytes, expected {n}")
        elif mode == _PLANE_ZSTD:
            _zstd_content_size(piece, n, f"{name} {what} {i}")
        elif mode == _PLANE_ZERO_RUNS and zero_runs:
            _zero_runs_streams(piece, n, f"{name} {what} {i}")
        else:
            raise ChunkCorruptError(f"{name} {what} {i} has unknown mode {mode}")
        pieces.append((mode, piece))
    return pieces, pos


def _zero_runs_streams(piece: memoryview, n: int, what: str) -> tuple[tuple[int, memoryview, int], ...]:
    """Check a mode-2 plane's header against a plane of ``n`` bytes; its two streams as (mode, bytes, length)."""
    head = _ZERO_RUNS_HEAD.size
    if len(piece) < head:
        raise ChunkCorruptError(f"{what}: zero-run plane of {len(piece)} bytes is too short for its header")
    m, g, gap_mode, gap_len, value_mode, value_len = _ZERO_RUNS_HEAD.unpack_from(piece, 0)
    if m > n or g < m or g > m + (n - m) // 255:
        raise ChunkCorruptError(f"{what}: zero runs declare {m} nonzero bytes in a gap stream of {g}, plane of {n}")
    if head + gap_len + value_len != len(piece):
        raise ChunkCorruptError(f"{what}: zero-run plane holds {len(piece)} bytes, its header accounts for "
                                f"{head + gap_len + value_len}")
    streams = ((gap_mode, piece[head : head + gap_len], g), (value_mode, piece[head + gap_len :], m))
    for label, (mode, body, size) in zip(("gap stream", "values"), streams, strict=True):
        if mode == _PLANE_STORED:
            if len(body) != size:
                raise ChunkCorruptError(f"{what}: zero-run {label} stores {len(body)} bytes, expected {size}")
        elif mode == _PLANE_ZSTD:
            _zstd_content_size(body, size, f"{what} zero-run {label}")
        else:
            raise ChunkCorruptError(f"{what}: zero-run {label} has unknown mode {mode}")
    return streams


def _plane_bytes(mode: int, piece: memoryview, n: int, what: str) -> Buffer:
    """A checked plane's ``n`` bytes: stored, a zstd frame decoded or zero runs expanded."""
    if mode == _PLANE_STORED:
        return piece
    if mode == _PLANE_ZSTD:
        return _zstd_frame(piece, n, what, checked=True)
    gaps, values = (
        np.frombuffer(body if kind == _PLANE_STORED else _zstd_frame(body, size, what, checked=True), np.uint8)
        for kind, body, size in _zero_runs_streams(piece, n, what)
    )
    plane = np.empty(n, np.uint8)
    if not planes.zero_runs_join(gaps, values, plane):
        raise ChunkCorruptError(f"{what}: zero runs do not describe {n} bytes with {len(values)} nonzero ones")
    return plane.data


def _plane_arrays(name: str, pieces: list[tuple[int, memoryview]], n: int) -> list[np.ndarray]:
    """The planes' bytes (zstd frames decoded, zero runs expanded), as uint8 arrays of ``n`` bytes."""
    return [np.frombuffer(_plane_bytes(mode, piece, n, f"{name} plane {i}"), np.uint8)
            for i, (mode, piece) in enumerate(pieces)]


def _check_base(name: str, base: Buffer | None, raw_length: int) -> np.ndarray:
    if base is None:
        raise ChunkCorruptError(f"{name} chunk cannot be decoded without its base chunk (none was given)")
    base_arr = np.frombuffer(_bytes_view(base), np.uint8)
    if len(base_arr) != raw_length:
        raise ChunkCorruptError(f"{name} chunk of {raw_length} bytes was given a base chunk of {len(base_arr)} bytes")
    return base_arr


_GROUPED_NAMES: dict[int, str] = {
    Codec.BYTE_GROUPED: "byte-grouped", Codec.DELTA: "delta", Codec.SPARSE_DELTA: "sparse delta",
}


def _grouped_header(codec: int, payload: memoryview, raw_length: int) -> tuple[str, int, int]:
    name = _GROUPED_NAMES[codec]
    if raw_length < 0:
        raise ChunkCorruptError(f"{name} chunk has a negative length {raw_length}")
    if len(payload) < 2:
        raise ChunkCorruptError(f"{name} payload of {len(payload)} bytes is too short for its header")
    k, flags = payload[0], payload[1]
    if k not in ELEMENT_SIZES:
        raise ChunkCorruptError(f"{name} payload declares element size {k}")
    _check_flags(codec, k, flags, ChunkCorruptError)
    return name, k, flags


def _decode_grouped(
    codec: int, payload: memoryview, raw_length: int, base: Buffer | None, dest: memoryview | None = None
) -> memoryview:
    """Codec 2 or 3 (dense) into ``dest`` or a new buffer."""
    name, k, flags = _grouped_header(codec, payload, raw_length)
    base_arr = _check_base(name, base, raw_length) if codec == Codec.DELTA else None
    n, tail = divmod(raw_length, k)
    pieces, pos = _read_planes(name, payload, 2, n, k)
    if pos + tail != len(payload):
        raise ChunkCorruptError(f"{name} payload holds {len(payload)} bytes, its header accounts for {pos + tail}")
    if dest is not None and len(dest) == raw_length and not dest.readonly:
        out = np.frombuffer(dest, np.uint8)
    else:
        out = np.empty(raw_length, np.uint8)
    rotate = bool(flags & FLAG_EXPONENT_ALIGNED)
    planes.join(_plane_arrays(name, pieces, n), out, base_arr, k, _mode(base_arr, flags), rotate)
    out[n * k :] = np.frombuffer(payload[pos:], np.uint8)
    if base_arr is not None:
        np.bitwise_xor(out[n * k :], base_arr[n * k :], out=out[n * k :])
    return out.data


def _patch_sparse(payload: memoryview, raw_length: int, buf: np.ndarray) -> None:
    """Apply a codec 4 payload to ``buf`` (uint8, holding the base) in place."""
    name, k, flags = _grouped_header(Codec.SPARSE_DELTA, payload, raw_length)
    if len(payload) < _SPARSE_HEAD.size:
        raise ChunkCorruptError(f"{name} payload of {len(payload)} bytes is too short for its header")
    runs, m = _SPARSE_HEAD.unpack_from(payload, 0)[2:4]
    n, tail = divmod(raw_length, k)
    if m > n or runs > m:
        raise ChunkCorruptError(f"{name} payload declares {runs} runs of {m} elements in a chunk of {n}")
    table_pieces, pos = _read_planes(name, payload, _SPARSE_HEAD.size - 5, 8 * runs, 1, "run table", zero_runs=False)
    pieces, pos = _read_planes(name, payload, pos, m, k)
    if pos + tail != len(payload):
        raise ChunkCorruptError(f"{name} payload holds {len(payload)} bytes, its header accounts for {pos + tail}")
    ((mode, body),) = table_pieces
    table_bytes = body if mode == _PLANE_STORED else _zstd_frame(body, 8 * runs, f"{name} run table", checked=True)
    table = np.frombuffer(table_bytes, "<u4")
    rotate = bool(flags & FLAG_EXPONENT_ALIGNED)
    mode = planes.DIFFERENCE if flags & FLAG_DIFFERENCE else planes.XOR
    if not planes.apply_runs(_plane_arrays(name, pieces, m), table[:runs], table[runs:], buf, k, mode, rotate):
        raise ChunkCorruptError(f"{name} run table does not fit a chunk of {n} elements")
    if tail:
        np.bitwise_xor(buf[n * k :], np.frombuffer(payload[pos:], np.uint8), out=buf[n * k :])


def patch(codec: int, payload: Buffer, raw_length: int, buf: memoryview) -> None:
    """Turn ``buf`` (writable, ``raw_length`` bytes, holding the decoded base) into the chunk, in place.

    For delta codecs only. Every delta codec is injective in its base: for a given
    payload, two different bases give two different results, so a chain whose last
    chunk matches its hash has no damaged link (the reader verifies chains that way).
    A sparse delta touches only the changed elements; a dense one reads the whole buffer.
    """
    view = _bytes_view(payload)
    arr = np.frombuffer(buf, np.uint8)
    if len(arr) != raw_length:
        raise ChunkCorruptError(f"delta chunk of {raw_length} bytes was given a base chunk of {len(arr)} bytes")
    if codec == Codec.SPARSE_DELTA:
        _patch_sparse(view, raw_length, arr)
    elif codec == Codec.DELTA:
        name, k, flags = _grouped_header(codec, view, raw_length)
        n, tail = divmod(raw_length, k)
        pieces, pos = _read_planes(name, view, 2, n, k)
        if pos + tail != len(view):
            raise ChunkCorruptError(f"{name} payload holds {len(view)} bytes, its header accounts for {pos + tail}")
        rotate = bool(flags & FLAG_EXPONENT_ALIGNED)
        planes.join(_plane_arrays(name, pieces, n), arr, arr, k, _mode(arr, flags), rotate)  # in place
        np.bitwise_xor(arr[n * k :], np.frombuffer(view[pos:], np.uint8), out=arr[n * k :])
    else:
        raise ChunkCorruptError(f"codec {codec} is not a delta codec")


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
    if codec == Codec.SPARSE_DELTA:
        base_arr = _check_base("sparse delta", base, raw_length)
        if out is not None and len(out) == raw_length and not out.readonly:
            dest = np.frombuffer(out, np.uint8)
            dest[:] = base_arr
        else:
            dest = base_arr.copy()
        _patch_sparse(_bytes_view(payload), raw_length, dest)
        return dest.data
    raise FormatVersionError(
        f"chunk uses codec {codec}, which this version of cas does not know; upgrade cas to read it"
    )


def coded_planes(codec: int, payload: Buffer, raw_length: int) -> list[tuple[str, int, np.ndarray]]:
    """What a payload's entropy stage coded, for measuring it: ``(name, stored bytes, plane bytes)``.

    Planes of codecs 2-4 (and a codec-4 run table) come back as the bytes the zstd
    frame or stored plane holds; a codec-1 payload is one plane of the raw chunk; a
    raw payload is one stored plane. Everything else in the payload (headers, tails)
    is stored verbatim. For benchmarks (entropy floors); damage raises ChunkCorruptError.
    """
    view = _bytes_view(payload)
    if codec == Codec.RAW:
        return [("raw", len(view), np.frombuffer(view, np.uint8))]
    if codec == Codec.ZSTD:
        return [("zstd", len(view), np.frombuffer(_zstd_frame(view, raw_length, "zstd chunk"), np.uint8))]
    if codec not in _GROUPED_NAMES:
        raise FormatVersionError(f"chunk uses codec {codec}, which this version of cas does not know")
    name, k, flags = _grouped_header(codec, view, raw_length)
    n = raw_length // k
    out: list[tuple[str, int, np.ndarray]] = []
    pos = 2
    if codec == Codec.SPARSE_DELTA:
        if len(view) < _SPARSE_HEAD.size:
            raise ChunkCorruptError(f"{name} payload of {len(view)} bytes is too short for its header")
        runs, n = _SPARSE_HEAD.unpack_from(view, 0)[2:4]
        table, pos = _read_planes(name, view, _SPARSE_HEAD.size - 5, 8 * runs, 1, "run table", zero_runs=False)
        for mode, piece in table:
            body = piece if mode == _PLANE_STORED else _zstd_frame(piece, 8 * runs, f"{name} run table")
            out.append((f"{codec}/{flags}/{k}/runs", len(piece), np.frombuffer(body, np.uint8)))
    pieces, pos = _read_planes(name, view, pos, n, k)
    for i, (mode, piece) in enumerate(pieces):
        plane = _plane_bytes(mode, piece, n, f"{name} plane {i}")
        out.append((f"{codec}/{flags}/{k}/{i}", len(piece), np.frombuffer(plane, np.uint8)))
    return out
