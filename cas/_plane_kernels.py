"""Byte-plane kernels compiled by numba; ``cas.planes`` imports this module only when numba is installed.

Arithmetic is done in uint64 and truncated to k bytes on store; ``mask`` is
``2^(8k) - 1`` and ``top`` is ``8k - 1``. Mode 0 plain, 1 XOR, 2 zigzag difference
(see ``cas.planes``). One function per element size so every load and store is a
whole k-byte word; numba specialises each on its argument types.
"""

from __future__ import annotations

from typing import Any

import numba
import numpy as np

_jit = numba.njit(cache=True, nogil=True)
_inline = numba.njit(cache=True, nogil=True, inline="always")

_U8 = np.uint64(8)
_U16 = np.uint64(16)
_U24 = np.uint64(24)
_U32 = np.uint64(32)
_U40 = np.uint64(40)
_U48 = np.uint64(48)
_U56 = np.uint64(56)
_ONE = np.uint64(1)
_BYTE = np.uint64(0xFF)


@_inline
def _forward(x: Any, b: Any, mode: int, rotate: bool, mask: Any, top: Any) -> Any:
    if mode == 2:
        d = (x - b) & mask
        return ((d << _ONE) & mask) ^ (mask * (d >> top))
    if mode == 1:
        x = x ^ b
    if rotate:
        x = ((x << _ONE) & mask) | (x >> top)
    return x


@_inline
def _backward(t: Any, b: Any, mode: int, rotate: bool, mask: Any, top: Any) -> Any:
    if mode == 2:
        d = (t >> _ONE) ^ (mask * (t & _ONE))
        return (b + d) & mask
    if rotate:
        t = (t >> _ONE) | ((t & _ONE) << top)
    if mode == 1:
        t = t ^ b
    return t


@_jit
def split2(x16: Any, b16: Any, planes: Any, mode: int, rotate: bool) -> None:
    mask = np.uint64(0xFFFF)
    top = np.uint64(15)
    for j in range(x16.shape[0]):
        b = np.uint64(b16[j]) if mode != 0 else np.uint64(0)
        t = _forward(np.uint64(x16[j]), b, mode, rotate, mask, top)
        planes[0, j] = t & _BYTE
        planes[1, j] = (t >> _U8) & _BYTE


@_jit
def split4(x32: Any, b32: Any, planes: Any, mode: int, rotate: bool) -> None:
    mask = np.uint64(0xFFFFFFFF)
    top = np.uint64(31)
    for j in range(x32.shape[0]):
        b = np.uint64(b32[j]) if mode != 0 else np.uint64(0)
        t = _forward(np.uint64(x32[j]), b, mode, rotate, mask, top)
        planes[0, j] = t & _BYTE
        planes[1, j] = (t >> _U8) & _BYTE
        planes[2, j] = (t >> _U16) & _BYTE
        planes[3, j] = (t >> _U24) & _BYTE


@_jit
def split8(x64: Any, b64: Any, planes: Any, mode: int, rotate: bool) -> None:
    mask = np.uint64(0xFFFFFFFFFFFFFFFF)
    top = np.uint64(63)
    for j in range(x64.shape[0]):
        b = b64[j] if mode != 0 else np.uint64(0)
        t = _forward(x64[j], b, mode, rotate, mask, top)
        planes[0, j] = t & _BYTE
        planes[1, j] = (t >> _U8) & _BYTE
        planes[2, j] = (t >> _U16) & _BYTE
        planes[3, j] = (t >> _U24) & _BYTE
        planes[4, j] = (t >> _U32) & _BYTE
        planes[5, j] = (t >> _U40) & _BYTE
        planes[6, j] = (t >> _U48) & _BYTE
        planes[7, j] = (t >> _U56) & _BYTE


@_jit
def join2(p0: Any, p1: Any, out16: Any, b16: Any, mode: int, rotate: bool) -> None:
    mask = np.uint64(0xFFFF)
    top = np.uint64(15)
    for j in range(out16.shape[0]):
        t = np.uint64(p0[j]) | (np.uint64(p1[j]) << _U8)
        b = np.uint64(b16[j]) if mode != 0 else np.uint64(0)
        out16[j] = _backward(t, b, mode, rotate, mask, top)


@_jit
def join4(p0: Any, p1: Any, p2: Any, p3: Any, out32: Any, b32: Any, mode: int, rotate: bool) -> None:
    mask = np.uint64(0xFFFFFFFF)
    top = np.uint64(31)
    for j in range(out32.shape[0]):
        t = np.uint64(p0[j]) | (np.uint64(p1[j]) << _U8) | (np.uint64(p2[j]) << _U16) | (np.uint64(p3[j]) << _U24)
        b = np.uint64(b32[j]) if mode != 0 else np.uint64(0)
        out32[j] = _backward(t, b, mode, rotate, mask, top)


@_jit
def join8(p0: Any, p1: Any, p2: Any, p3: Any, p4: Any, p5: Any, p6: Any, p7: Any, out64: Any, b64: Any,
           mode: int, rotate: bool) -> None:
    mask = np.uint64(0xFFFFFFFFFFFFFFFF)
    top = np.uint64(63)
    for j in range(out64.shape[0]):
        t = (np.uint64(p0[j]) | (np.uint64(p1[j]) << _U8) | (np.uint64(p2[j]) << _U16) | (np.uint64(p3[j]) << _U24)
             | (np.uint64(p4[j]) << _U32) | (np.uint64(p5[j]) << _U40) | (np.uint64(p6[j]) << _U48)
             | (np.uint64(p7[j]) << _U56))
        b = b64[j] if mode != 0 else np.uint64(0)
        out64[j] = _backward(t, b, mode, rotate, mask, top)


# In place (the base is the output, a delta applied to a decoded base): one array, so
# the compiler need not guard against aliasing and the loops vectorise.


@_jit
def join2_inplace(p0: Any, p1: Any, io16: Any, mode: int, rotate: bool) -> None:
    mask = np.uint64(0xFFFF)
    top = np.uint64(15)
    for j in range(io16.shape[0]):
        t = np.uint64(p0[j]) | (np.uint64(p1[j]) << _U8)
        io16[j] = _backward(t, np.uint64(io16[j]), mode, rotate, mask, top)


@_jit
def join4_inplace(p0: Any, p1: Any, p2: Any, p3: Any, io32: Any, mode: int, rotate: bool) -> None:
    mask = np.uint64(0xFFFFFFFF)
    top = np.uint64(31)
    for j in range(io32.shape[0]):
        t = np.uint64(p0[j]) | (np.uint64(p1[j]) << _U8) | (np.uint64(p2[j]) << _U16) | (np.uint64(p3[j]) << _U24)
        io32[j] = _backward(t, np.uint64(io32[j]), mode, rotate, mask, top)


@_jit
def join8_inplace(p0: Any, p1: Any, p2: Any, p3: Any, p4: Any, p5: Any, p6: Any, p7: Any, io64: Any,
                  mode: int, rotate: bool) -> None:
    mask = np.uint64(0xFFFFFFFFFFFFFFFF)
    top = np.uint64(63)
    for j in range(io64.shape[0]):
        t = (np.uint64(p0[j]) | (np.uint64(p1[j]) << _U8) | (np.uint64(p2[j]) << _U16) | (np.uint64(p3[j]) << _U24)
             | (np.uint64(p4[j]) << _U32) | (np.uint64(p5[j]) << _U40) | (np.uint64(p6[j]) << _U48)
             | (np.uint64(p7[j]) << _U56))
        io64[j] = _backward(t, io64[j], mode, rotate, mask, top)


# Sparse deltas applied in place: runs of (gap, length) elements; the planes hold the
# runs' elements in order. Returns 0, or -1 if the run table does not fit ``n``
# elements / add up to ``m`` (damage: nothing is written past the buffer).


@_jit
def _check_runs(gaps: Any, lengths: Any, n: int, m: int) -> bool:
    pos = 0
    total = 0
    for r in range(gaps.shape[0]):
        length = int(lengths[r])
        pos += int(gaps[r])
        if length < 1 or pos + length > n:
            return False
        pos += length
        total += length
    return total == m


@_inline
def _run_delta(t: Any, mode: int, rotate: bool, mask: Any, top: Any) -> Any:
    """What one stored element adds to (mode 2) or XORs into (mode 1) its base element."""
    if mode == 2:
        return (t >> _ONE) ^ (mask * (t & _ONE))
    if rotate:
        t = (t >> _ONE) | ((t & _ONE) << top)
    return t


@_inline
def _apply_runs(d: Any, gaps: Any, lengths: Any, io: Any, mode: int, mask: Any) -> None:
    """Second pass of the sparse kernels: each run's deltas into its contiguous base elements.
    Two passes (the plane join over the stored elements, then the runs) vectorise where one
    fused loop did not: 2-4x faster on many short runs and on long ones."""
    pos = 0
    c = 0
    if mode == 2:
        for r in range(gaps.shape[0]):
            pos += int(gaps[r])
            length = int(lengths[r])
            for j in range(length):
                io[pos + j] = (np.uint64(io[pos + j]) + np.uint64(d[c + j])) & mask
            pos += length
            c += length
    else:
        for r in range(gaps.shape[0]):
            pos += int(gaps[r])
            length = int(lengths[r])
            for j in range(length):
                io[pos + j] ^= d[c + j]
            pos += length
            c += length


@_jit
def sparse2_inplace(p0: Any, p1: Any, gaps: Any, lengths: Any, io16: Any, m: int, mode: int, rotate: bool) -> int:
    if not _check_runs(gaps, lengths, io16.shape[0], m):
        return -1
    mask = np.uint64(0xFFFF)
    top = np.uint64(15)
    d = np.empty_like(io16[:m])
    for c in range(m):
        t = np.uint64(p0[c]) | (np.uint64(p1[c]) << _U8)
        d[c] = _run_delta(t, mode, rotate, mask, top)
    _apply_runs(d, gaps, lengths, io16, mode, mask)
    return 0


@_jit
def sparse4_inplace(p0: Any, p1: Any, p2: Any, p3: Any, gaps: Any, lengths: Any, io32: Any, m: int, mode: int,
                    rotate: bool) -> int:
    if not _check_runs(gaps, lengths, io32.shape[0], m):
        return -1
    mask = np.uint64(0xFFFFFFFF)
    top = np.uint64(31)
    d = np.empty_like(io32[:m])
    for c in range(m):
        t = (np.uint64(p0[c]) | (np.uint64(p1[c]) << _U8) | (np.uint64(p2[c]) << _U16)
             | (np.uint64(p3[c]) << _U24))
        d[c] = _run_delta(t, mode, rotate, mask, top)
    _apply_runs(d, gaps, lengths, io32, mode, mask)
    return 0


@_jit
def sparse8_inplace(p0: Any, p1: Any, p2: Any, p3: Any, p4: Any, p5: Any, p6: Any, p7: Any, gaps: Any,
                    lengths: Any, io64: Any, m: int, mode: int, rotate: bool) -> int:
    if not _check_runs(gaps, lengths, io64.shape[0], m):
        return -1
    mask = np.uint64(0xFFFFFFFFFFFFFFFF)
    top = np.uint64(63)
    d = np.empty_like(io64[:m])
    for c in range(m):
        t = (np.uint64(p0[c]) | (np.uint64(p1[c]) << _U8) | (np.uint64(p2[c]) << _U16) | (np.uint64(p3[c]) << _U24)
             | (np.uint64(p4[c]) << _U32) | (np.uint64(p5[c]) << _U40) | (np.uint64(p6[c]) << _U48)
             | (np.uint64(p7[c]) << _U56))
        d[c] = _run_delta(t, mode, rotate, mask, top)
    _apply_runs(d, gaps, lengths, io64, mode, mask)
    return 0


# Zero-run planes (plane mode 2, FORMAT.md §3): a plane that is mostly zero bytes is stored
# as a gap stream and its nonzero bytes. Each nonzero byte is preceded in the gap stream by
# the count g of zero bytes before it (since the previous nonzero byte), written as g // 255
# bytes of 255 and then g % 255.


@_jit
def zero_runs(plane: Any, nonzero: int) -> Any:
    """(gap stream, nonzero bytes) of ``plane``, which has ``nonzero`` nonzero bytes. Positions
    are gathered branch-free, skipping all-zero 8-byte words (a per-byte branch mispredicts on
    scattered nonzero bytes)."""
    n = plane.shape[0]
    where = np.empty(nonzero + 1, np.int64)  # one spare: the branch-free store runs one ahead
    m = 0
    i = 0
    while i + 8 <= n:
        if plane[i] | plane[i + 1] | plane[i + 2] | plane[i + 3] | plane[i + 4] | plane[i + 5] | plane[i + 6] \
                | plane[i + 7]:
            for j in range(i, i + 8):
                where[m] = j
                m += plane[j] != 0
        i += 8
    for j in range(i, n):
        where[m] = j
        m += plane[j] != 0
    length = m
    prev = -1
    for c in range(m):
        length += (where[c] - prev - 1) // 255
        prev = where[c]
    gaps = np.empty(length, np.uint8)
    values = np.empty(m, np.uint8)
    g = 0
    prev = -1
    for c in range(m):
        gap = where[c] - prev - 1
        prev = where[c]
        while gap >= 255:
            gaps[g] = 255
            g += 1
            gap -= 255
        gaps[g] = gap
        g += 1
        values[c] = plane[where[c]]
    return gaps, values


@_jit
def zero_run_expand(gaps: Any, values: Any, out: Any) -> int:
    """Write the plane of ``gaps``/``values`` into ``out`` (every byte). Returns 0, or -1 if the
    streams do not describe ``len(out)`` bytes with exactly ``len(values)`` nonzero ones."""
    n = out.shape[0]
    m = values.shape[0]
    pos = 0
    c = 0
    for g in range(gaps.shape[0]):
        step = int(gaps[g])
        if step == 255:
            pos += 255
            continue
        pos += step
        if pos >= n or c >= m or values[c] == 0:
            return -1
        c += 1
        pos += 1
    if c != m or (gaps.shape[0] and gaps[gaps.shape[0] - 1] == 255):
        return -1
    out[:] = 0
    pos = 0
    c = 0
    for g in range(gaps.shape[0]):
        step = int(gaps[g])
        pos += step
        if step == 255:
            continue
        out[pos] = values[c]
        c += 1
        pos += 1
    return 0
