"""Files that tensors map, read without touching their mapping.

A file backup's tensors are zero-copy views of the files' mappings. Reading a mapped page that
another process has cut off its file (``truncate``, a rewrite in place) raises SIGBUS, which no
Python code can catch: the process dies. So the bytes that get stored are never read through the
mapping: :func:`register` records which file (and which inode) each mapping shows, and
:func:`read_copy` reads a piece that lies in one with ``pread`` instead. A file cut short, replaced
or gone is then a :class:`SourceChangedError`, and nothing is committed.

Bookkeeping and system calls; no repository code or torch.
"""

from __future__ import annotations

import bisect
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cas.errors import SourceChangedError


@dataclass(frozen=True)
class MappedFile:
    """``length`` bytes of ``path`` (inode ``dev``/``ino``) mapped at ``address``, while ``live()``
    (the mapping not closed: after that its addresses may hold other memory)."""

    address: int
    length: int
    path: Path
    dev: int
    ino: int
    live: Callable[[], bool]


_lock = threading.Lock()
_starts: list[int] = []  # sorted addresses of the mappings in _mapped
_mapped: dict[int, MappedFile] = {}


def address_of(buffer: memoryview) -> int:
    """The address of a (contiguous) buffer's first byte; the buffer is not kept."""
    if buffer.nbytes == 0:
        return 0
    return int(np.frombuffer(buffer, np.uint8).ctypes.data)


def register(mapping: MappedFile) -> None:
    """Record a mapping (until :func:`unregister`)."""
    if mapping.length == 0:
        return
    with _lock:
        if mapping.address not in _mapped:
            bisect.insort(_starts, mapping.address)
        _mapped[mapping.address] = mapping


def unregister(address: int) -> None:
    with _lock:
        if _mapped.pop(address, None) is not None:
            del _starts[bisect.bisect_left(_starts, address)]


def _mapping_of(address: int, length: int) -> MappedFile | None:
    """The live registered mapping holding ``address`` .. ``address + length``; entries of closed
    mappings on the way are dropped (one may start below a live mapping that holds the piece)."""
    with _lock:
        i = bisect.bisect_right(_starts, address) - 1
        while i >= 0:
            mapped = _mapped[_starts[i]]
            if mapped.live():
                return mapped if address + length <= mapped.address + mapped.length else None
            del _mapped[_starts[i]], _starts[i]
            i -= 1
    return None


def read_copy(piece: memoryview) -> bytes:
    """A private copy of ``piece``: read from its file when it lies in a registered mapping (a file
    cut short, replaced or gone raises :class:`SourceChangedError`), else copied from memory."""
    length = piece.nbytes
    address = address_of(piece)
    mapped = _mapping_of(address, length) if length else None
    if mapped is None:
        return bytes(piece)
    offset = address - mapped.address
    try:
        fd = os.open(mapped.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise SourceChangedError(f"{mapped.path} went away while it was saved ({exc.strerror}); nothing was "
                                 "committed") from None
    try:
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) != (mapped.dev, mapped.ino):
            raise replaced(mapped.path)
        return pread_exact(fd, length, offset, mapped.path, mapped.length, "saved")
    finally:
        os.close(fd)


def replaced(path: Path) -> SourceChangedError:
    """The error for a file whose name now holds another inode than the one read."""
    return SourceChangedError(f"{path} was replaced while it was saved; nothing was committed. Save it again once "
                              "nothing writes it (or save a copy)")


def cut_short(fd: int, path: Path, had: int, doing: str) -> SourceChangedError:
    """The error for a file found shorter than the ``had`` bytes it held when it was opened."""
    return SourceChangedError(
        f"{path} was cut short while it was {doing} (to {os.fstat(fd).st_size} bytes, it had {had}); nothing was "
        "committed. Save it again once nothing writes it (or save a copy)"
    )


def pread_exact(fd: int, length: int, offset: int, path: Path, had: int, doing: str) -> bytes:
    """``length`` bytes of ``fd`` at ``offset``; a file that ends before them is :func:`cut_short`."""
    data = os.pread(fd, length, offset)
    while len(data) < length:  # pread may return less than asked before the end of the file
        more = os.pread(fd, length - len(data), offset + len(data))
        if not more:
            raise cut_short(fd, path, had, doing)
        data += more
    return data
