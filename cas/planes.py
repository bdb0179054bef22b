"""Byte-plane kernels: split ``k``-byte integers into ``k`` byte planes, with the codec
transforms fused in, and join them back. Pure functions on numpy arrays, no I/O.

Each element of a chunk is a little-endian unsigned ``k``-byte integer ``x`` (base:
``b``). Splitting writes byte ``i`` of ``t(x)`` to plane ``i``, where ``t`` is one of

* plain: ``t(x) = x``; with ``rotate``, ``x`` rotated left by one bit;
* XOR: ``t(x) = x XOR b``, then rotated when ``rotate``;
* difference: ``t(x) = zigzag(x - b mod 2^(8k))`` (never rotated).

Joining inverts it. These are the transforms of codecs 2-4 (see ``cas/codec.py`` and
FORMAT.md). The loops are compiled by numba (one pass over memory, no temporaries,
the GIL released), about ten times faster than the numpy fallback, which is kept
for platforms without numba (``CAS_NO_NUMBA=1`` forces it) and gives the same bytes.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

PLAIN, XOR, DIFFERENCE = 0, 1, 2

#: little-endian unsigned integer dtype of each element size
UINT: dict[int, np.dtype[Any]] = {1: np.dtype("u1"), 2: np.dtype("<u2"), 4: np.dtype("<u4"), 8: np.dtype("<u8")}
_UINT = UINT
_INT: dict[int, np.dtype[Any]] = {1: np.dtype("i1"), 2: np.dtype("<i2"), 4: np.dtype("<i4"), 8: np.dtype("<i8")}


# ---------------------------------------------------------------------------
# numpy reference implementation (also the fallback)


def _np_rotate_left(ints: np.ndarray, k: int) -> np.ndarray:
    rotated: np.ndarray = np.left_shift(ints, ints.dtype.type(1))
    rotated |= ints >> ints.dtype.type(8 * k - 1)
    return rotated


def _np_split(data: np.ndarray, base: np.ndarray | None, k: int, mode: int, rotate: bool) -> np.ndarray:
    n = len(data) // k
    x = data[: n * k].view(_UINT[k])
    if mode == DIFFERENCE:
        assert base is not None
        t = np.subtract(x, base[: n * k].view(_UINT[k]))
        sign = t.view(_INT[k]) >> (8 * k - 1)
        t <<= t.dtype.type(1)
        t ^= sign.view(_UINT[k])
    else:
        t = x if mode == PLAIN else np.bitwise_xor(x, base[: n * k].view(_UINT[k]))  # type: ignore[index]
        if rotate:
            t = _np_rotate_left(t, k)
    cols = t.view(np.uint8).reshape(n, k)
    planes = np.empty((k, n), np.uint8)
    for i in range(k):  # one strided copy per plane
        planes[i] = cols[:, i]
    return planes


def _np_join(planes: Sequence[np.ndarray], out: np.ndarray, base: np.ndarray | None, k: int, mode: int,
             rotate: bool) -> None:
    n = len(planes[0]) if planes else 0
    cols = out[: n * k].reshape(n, k)
    for i, plane in enumerate(planes):
        cols[:, i] = plane
    ints = out[: n * k].view(_UINT[k])
    if mode == DIFFERENCE:
        assert base is not None
        sign = (ints & ints.dtype.type(1)).view(_INT[k])
        np.negative(sign, out=sign)
        ints >>= ints.dtype.type(1)
        ints ^= sign.view(_UINT[k])
        ints += base[: n * k].view(_UINT[k])
        return
    if rotate and n:
        low = ints >> ints.dtype.type(1)
        ints <<= ints.dtype.type(8 * k - 1)
        ints |= low
    if mode == XOR:
        assert base is not None
        np.bitwise_xor(ints, base[: n * k].view(_UINT[k]), out=ints)


# ---------------------------------------------------------------------------
# numba kernels: all arithmetic in uint64, truncated to k bytes on store


def _load_kernels() -> Any:
    if os.environ.get("CAS_NO_NUMBA"):
        return None
    try:
        from cas import _plane_kernels  # noqa: PLC0415 - numba is heavy: loaded when a codec first needs it
    except ImportError:
        return None
    return _plane_kernels


_kernels: Any = False


def _get_kernels() -> Any:
    global _kernels  # noqa: PLW0603 - loaded once per process
    if _kernels is False:
        _kernels = _load_kernels()
    return _kernels


def accelerated() -> bool:
    """True when the compiled kernels are in use (numba installed and ``CAS_NO_NUMBA`` unset)."""
    return _get_kernels() is not None


_EMPTY = np.zeros(0, np.uint8)


_local = threading.local()


def _scratch(size: int) -> np.ndarray:
    """A per-thread buffer of ``size`` bytes, reused: fresh megabytes cost a page fault per 4 KiB."""
    buf: np.ndarray | None = getattr(_local, "scratch", None)
    if buf is None or len(buf) < size:
        buf = _local.scratch = np.empty(max(size, 1 << 20), np.uint8)
    return buf[:size]


def split(data: np.ndarray, base: np.ndarray | None, k: int, mode: int, rotate: bool) -> np.ndarray:
    """Planes ``(k, n)`` of the first ``n*k`` bytes of ``data`` (uint8), transformed; ``n = len // k``.

    The planes live in a per-thread buffer that the next ``split`` on the thread overwrites.
    """
    kernels = _get_kernels()
    if kernels is None or k == 1:
        return _np_split(data, base, k, mode, rotate)
    n = len(data) // k
    planes = _scratch(k * n).reshape(k, n)  # consumed by the caller before its next split
    x = data[: n * k].view(_UINT[k])
    b = x if base is None else base[: n * k].view(_UINT[k])
    getattr(kernels, f"split{k}")(x, b, planes, mode, rotate)
    return planes


def join(planes: Sequence[np.ndarray], out: np.ndarray, base: np.ndarray | None, k: int, mode: int,
         rotate: bool) -> None:
    """Write the elements whose planes are ``planes`` (k arrays of n bytes) into ``out[:n*k]``, inverting ``split``.

    ``base`` may be ``out`` itself (a delta applied in place): each base element is read before it is overwritten.
    """
    kernels = _get_kernels()
    if kernels is None or k == 1:
        if base is not None and np.may_share_memory(base, out):
            base = base.copy()  # the numpy path writes the planes into ``out`` before reading the base
        _np_join(planes, out, base, k, mode, rotate)
        return
    n = len(planes[0]) if len(planes) else 0
    o = out[: n * k].view(_UINT[k])
    if base is None:
        getattr(kernels, f"join{k}")(*planes, o, o, mode, rotate)
    elif base.ctypes.data == out.ctypes.data:  # in place
        getattr(kernels, f"join{k}_inplace")(*planes, o, mode, rotate)
    else:
        if np.may_share_memory(base, out):
            base = base.copy()
        getattr(kernels, f"join{k}")(*planes, o, base[: n * k].view(_UINT[k]), mode, rotate)


def run_index(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Positions covered by the runs, in order: the concatenation of ``arange(s, s + l)``."""
    total = int(lengths.sum())
    before = np.cumsum(lengths) - lengths  # elements in the runs before each run
    idx: np.ndarray = np.arange(total, dtype=np.int64)
    idx += np.repeat(starts.astype(np.int64) - before, lengths)
    return idx


_SPARSE_KERNELS: dict[int, Any] = {
    2: lambda kernels: kernels.sparse2_inplace,
    4: lambda kernels: kernels.sparse4_inplace,
    8: lambda kernels: kernels.sparse8_inplace,
}


def apply_runs(planes: Sequence[np.ndarray], gaps: np.ndarray, lengths: np.ndarray, buf: np.ndarray, k: int,
               mode: int, rotate: bool) -> bool:
    """Apply a sparse delta in place: ``buf`` (uint8, the base) gets the runs' elements rewritten.

    ``gaps``/``lengths``: the run table (elements, u32); ``planes``: the runs' elements'
    transformed bytes. Returns False, writing nothing, if the runs do not fit ``buf`` or do
    not add up to the planes' length.
    """
    n = len(buf) // k
    m = len(planes[0]) if len(planes) else 0
    kernels = _get_kernels()
    if kernels is not None and k > 1:
        io = buf[: n * k].view(_UINT[k])
        status: int = _SPARSE_KERNELS[k](kernels)(*planes, gaps, lengths, io, m, mode, rotate)
        return status == 0
    g = gaps.astype(np.int64)
    lens = lengths.astype(np.int64)
    ends = np.cumsum(g + lens)
    if int(lens.sum()) != m or (len(lens) and (int(lens.min()) < 1 or int(ends[-1]) > n)):
        return False
    idx = run_index(ends - lens, lens)
    ints = buf[: n * k].view(_UINT[k])
    values = ints[idx]  # the base's elements in the runs
    raw = values.view(np.uint8)
    join(planes, raw, raw, k, mode, rotate)
    ints[idx] = values
    return True


def zero_runs(plane: np.ndarray, nonzero: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The gap stream and the nonzero bytes of ``plane`` (uint8): plane mode 2 (FORMAT.md §3).

    Before each nonzero byte the gap stream holds the count ``g`` of zero bytes since the
    previous one, as ``g // 255`` bytes of 255 then ``g % 255``; zeros after the last
    nonzero byte are implied by the plane's length. ``nonzero``: the plane's count of
    nonzero bytes, when the caller has it already.
    """
    kernels = _get_kernels()
    if kernels is not None:
        count = int(np.count_nonzero(plane)) if nonzero is None else nonzero
        gaps, values = kernels.zero_runs(plane, count)
        return gaps, values
    return _np_zero_runs(plane)


def _np_zero_runs(plane: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    where = np.flatnonzero(plane)
    gap = np.diff(where, prepend=-1) - 1
    escapes = gap // 255
    gaps = np.full(len(where) + int(escapes.sum()), 255, np.uint8)
    gaps[np.cumsum(escapes + 1) - 1] = gap % 255
    return gaps, plane[where]


def zero_runs_join(gaps: np.ndarray, values: np.ndarray, out: np.ndarray) -> bool:
    """Write the plane that ``zero_runs`` gave ``gaps``/``values`` into ``out`` (uint8, every
    byte). Returns False, writing nothing, if the streams do not describe ``len(out)`` bytes
    with exactly ``len(values)`` nonzero ones (each value nonzero, no trailing 255)."""
    kernels = _get_kernels()
    if kernels is not None:
        return bool(kernels.zero_run_expand(gaps, values, out) == 0)
    return _np_zero_runs_join(gaps, values, out)


def _np_zero_runs_join(gaps: np.ndarray, values: np.ndarray, out: np.ndarray) -> bool:
    ends = gaps != 255
    if int(np.count_nonzero(ends)) != len(values) or (len(gaps) and not ends[-1]):
        return False
    where = np.cumsum(gaps.astype(np.int64) + ends)[ends] - 1
    if len(where) and (int(where[-1]) >= len(out) or not values.all()):
        return False
    out[:] = 0
    out[where] = values
    return True


def warm_up() -> bool:
    """Load (or compile, the first time on a machine) the kernels now rather than in the first save.

    About a second per process with numba's on-disk cache; a trainer calls it at start-up
    (``CheckpointManager`` does, in the background). Returns ``accelerated()``.
    """
    if not accelerated():
        return False
    for k in (2, 4, 8):
        data = np.arange(4 * k, dtype=np.uint8)
        for mode in (PLAIN, XOR, DIFFERENCE):
            for rotate in (False, True) if mode != DIFFERENCE else (False,):
                split_planes = split(data, None if mode == PLAIN else data, k, mode, rotate)
                stored = [np.frombuffer(bytes(p), np.uint8) for p in split_planes]
                out = data.copy()
                join(stored, out, None if mode == PLAIN else data, k, mode, rotate)
                if mode != PLAIN:
                    join(stored, out, out, k, mode, rotate)
                    apply_runs(stored, np.zeros(1, "<u4"), np.full(1, 4, "<u4"), out, k, mode, rotate)
    gaps, values = zero_runs(np.array([0, 3, 0, 0, 7], np.uint8))
    zero_runs_join(gaps, values, np.empty(5, np.uint8))
    return True
