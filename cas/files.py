"""Byte-exact backups of checkpoint files and directories (FORMAT.md §7a).

``cas save FILE_OR_DIR`` stores every file; ``cas restore SNAP DIR`` writes them back with the
same bytes (sha256 checked), relative paths, permission bits and mtimes.

A tensor file is split into what it is made of: the tensors' bytes, stored as tensors (so they
are chunked at tensor boundaries and dedup with every other save of the same weights: another
file, another checkpoint, a live ``model.state_dict()``, and get the float-aware codecs and
deltas), and the exact remaining bytes (a safetensors header, the zip records and pickle of a
``torch.save`` file) stored as bytes. Other files are stored as bytes. Reading a file never runs
its pickle: ``.pt``/``.pth``/``.bin``/``.ckpt`` (``torch.save`` zip archives, Lightning
checkpoints, ``pytorch_model.bin``) are read as zip archives, and each storage's dtype is read
off the pickle's opcodes without executing them.

The snapshot's state is an ordinary typed tree (no new node kinds), so every older tool lists,
verifies and GCs it:

    {"cas.files": 1,
     "files": {REL_PATH: {"mode", "mtime_ns", "size", "sha256", "format",
                          "tensors": {NAME: tensor}, "raw": {INDEX: uint8 tensor},
                          "layout": [bytes | ("t", NAME) | ("r", INDEX), ...]}},
     "dirs": {REL_PATH: {"mode", "mtime_ns"}}}

A file's bytes are the concatenation of its layout. Paths are '/'-separated, relative, and
never contain an empty, ``.`` or ``..`` component; a restore refuses any other (and never
writes through a symlink), so no snapshot can write outside the target directory.
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import functools
import hashlib
import io
import json
import logging
import mmap
import os
import pickletools
import re
import stat
import struct
import uuid
import weakref
import zipfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from cas import sources
from cas.errors import (
    CasError,
    CorruptionError,
    NotACheckpointError,
    OutputExistsError,
    SourceChangedError,
    UsageError,
)
from cas.filebytes import PartLoader, file_parts, part_bytes, stored_file
from cas.store import fsync_dir
from cas.tree import FILES_KEY, FILES_VERSION, check_rel

if TYPE_CHECKING:
    pass

log = logging.getLogger("cas")

INLINE_MAX = 4096  # byte runs up to this size are inline bytes; longer ones uint8 tensors (zero-copy)
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
SAFETENSORS_SUFFIX = ".safetensors"
#: safetensors dtype names -> torch dtypes
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "C64": torch.complex64,
}
_STORAGE_RECORD = re.compile(r"[^/]+/data/([0-9]+)")


# --------------------------------------------------------------------------- reading files

@dataclass
class Segment:
    offset: int
    length: int
    name: str | None = None  # a tensor: its name in "tensors"
    dtype: torch.dtype = torch.uint8
    shape: tuple[int, ...] = ()


def _safetensors_segments(mm: FileBytes, size: int) -> list[Segment] | None:
    """The tensors of a safetensors file, by offset; None if it is not one."""
    if size < 8:
        return None
    (n,) = struct.unpack("<Q", mm[0:8])
    if n > size - 8 or n > 100 << 20:
        return None
    try:
        header = json.loads(bytes(mm[8:8 + n]))
    except (UnicodeDecodeError, ValueError):
        return None
    if not isinstance(header, dict):
        return None
    base = 8 + n
    out = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict):
            return None
        offsets, shape, dtype_name = info.get("data_offsets"), info.get("shape"), info.get("dtype")
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets)
                or not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape)):
            return None
        begin, end = offsets
        if not 0 <= begin <= end or base + end > size:
            return None
        dtype = SAFETENSORS_DTYPES.get(dtype_name) if isinstance(dtype_name, str) else None
        numel = 1
        for d in shape:
            numel *= d
        if dtype is None or numel * dtype.itemsize != end - begin:
            dtype, shape = torch.uint8, [end - begin]
        out.append(Segment(base + begin, end - begin, str(name), dtype, tuple(shape)))
    return out


def storage_dtypes(pickle_bytes: bytes) -> dict[str, torch.dtype]:
    """Storage key -> dtype, read off a ``torch.save`` pickle's opcodes (nothing is unpickled).

    A storage is pickled as the persistent id ``("storage", torch.<X>Storage, key, location,
    numel)``: the string ``storage``, then the storage class (a global), then the key.
    """
    memo: dict[int, Any] = {}
    recent: list[Any] = []
    out: dict[str, torch.dtype] = {}
    strings: list[str] = []
    try:
        for op, arg, _pos in pickletools.genops(pickle_bytes):
            value: Any = None
            if op.name in ("BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING",
                           "BINSTRING", "STRING"):
                value = str(arg)
                strings.append(value)
            elif op.name == "GLOBAL":
                value = ("global", str(arg).replace("\n", " ").strip())
            elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                value = ("global", f"{strings[-2]} {strings[-1]}")
            elif op.name in ("BINGET", "LONG_BINGET", "GET"):
                value = memo.get(int(str(arg)))
            elif op.name in ("BINPUT", "LONG_BINPUT", "PUT"):
                memo[int(str(arg))] = recent[-1] if recent else None
                continue
            elif op.name == "MEMOIZE":
                memo[len(memo)] = recent[-1] if recent else None
                continue
            if value is None:
                recent.append(None)
            else:
                recent.append(value)
            if len(recent) >= 3 and recent[-3] == "storage" and isinstance(recent[-2], tuple) \
                    and isinstance(recent[-1], str):
                module, _, cls = recent[-2][1].partition(" ")
                dtype = _storage_dtype(module, cls)
                if dtype is not None:
                    out[recent[-1]] = dtype
            del recent[:-3]
    except (ValueError, TypeError, IndexError, KeyError):
        return out
    return out


#: storage classes torch.save pickles, and their element types (newer dtypes pickle an
#: UntypedStorage: their bytes are stored as uint8, which dedups the same)
STORAGE_DTYPES: dict[str, torch.dtype] = {
    "DoubleStorage": torch.float64, "FloatStorage": torch.float32, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
    "ComplexFloatStorage": torch.complex64, "ComplexDoubleStorage": torch.complex128,
}


def _storage_dtype(module: str, cls: str) -> torch.dtype | None:
    return STORAGE_DTYPES.get(cls) if module == "torch" else None


def _torch_zip_segments(path: Path, mm: FileBytes, size: int) -> list[Segment] | None:
    """The storages of a ``torch.save`` zip archive, by offset; None if it is not one."""
    if size < 4 or bytes(mm[:4]) != b"PK\x03\x04":
        return None
    try:
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
            pickles = [i for i in infos if i.filename.endswith("/data.pkl") and i.filename.count("/") == 1]
            dtypes = storage_dtypes(zf.read(pickles[0])) if pickles else {}
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError):
        return None
    out = []
    for info in infos:
        match = _STORAGE_RECORD.fullmatch(info.filename)
        if match is None or info.file_size == 0:
            continue
        if info.compress_type != zipfile.ZIP_STORED or info.compress_size != info.file_size:
            return None
        start = info.header_offset
        if start + 30 > size or bytes(mm[start:start + 4]) != b"PK\x03\x04":
            return None
        name_len, extra_len = struct.unpack("<HH", mm[start + 26:start + 30])
        data = start + 30 + name_len + extra_len
        if data + info.file_size > size:
            return None
        key = match.group(1)
        dtype = dtypes.get(key, torch.uint8)
        if info.file_size % dtype.itemsize:
            dtype = torch.uint8
        out.append(Segment(data, info.file_size, f"data/{key}", dtype, (info.file_size // dtype.itemsize,)))
    return out


class _Window(io.RawIOBase):
    """A read-only file over ``mm[start:end]`` (zipfile reads the central directory and a pickle from
    it; tensor bytes are never copied)."""

    def __init__(self, mm: FileBytes, start: int, end: int) -> None:
        self.mm, self.start, self.end, self.pos = mm, start, end, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self.pos, 2: self.end - self.start}[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def tell(self) -> int:
        return self.pos

    def read(self, n: int = -1) -> bytes:
        at = self.start + self.pos
        stop = self.end if n is None or n < 0 else min(self.end, at + n)
        out = bytes(self.mm[at:stop]) if stop > at else b""
        self.pos += len(out)
        return out


def _embedded_zip_segments(mm: FileBytes, size: int) -> list[Segment] | None:
    """The storages of the ``torch.save`` archives laid one after another in a file (what DCP's
    ``FileSystemWriter`` writes into each ``.distcp``).

    Each archive ends with its end-of-central-directory record; an archive is taken from the end
    of the previous one to the next such record that ``zipfile`` reads as a whole archive (a false
    match inside tensor bytes does not read, and the scan goes on). Bytes that belong to no
    archive, and a file with none, are left as bytes (None).
    """
    out: list[Segment] = []
    start, pos, archive = 0, 0, 0
    while pos < size:
        found = bytes(mm[pos:min(size, pos + (64 << 20))]).find(b"PK\x05\x06")
        if found < 0:
            pos = min(size, pos + (64 << 20) - 3)
            continue
        eocd = pos + found
        pos = eocd + 4
        if eocd + 22 > size:
            break
        (comment,) = struct.unpack("<H", mm[eocd + 20:eocd + 22])
        end = eocd + 22 + comment
        if end > size:
            continue
        try:
            with zipfile.ZipFile(_Window(mm, start, end)) as zf:
                segments = _archive_storages(zf, mm, start, end, archive)
        except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError, struct.error):
            continue
        if segments is None:
            continue
        out.extend(segments)
        archive += 1
        start = pos = end
    return out if out else None


def _archive_storages(zf: zipfile.ZipFile, mm: FileBytes, start: int, end: int,
                      archive: int) -> list[Segment] | None:
    infos = zf.infolist()
    pickles = [i for i in infos if i.filename.endswith("/data.pkl") and i.filename.count("/") == 1]
    dtypes = storage_dtypes(zf.read(pickles[0])) if pickles else {}
    out = []
    for info in infos:
        match = _STORAGE_RECORD.fullmatch(info.filename)
        if match is None or info.file_size == 0:
            continue
        if info.compress_type != zipfile.ZIP_STORED or info.compress_size != info.file_size:
            return None
        local = start + info.header_offset
        if local + 30 > end or bytes(mm[local:local + 4]) != b"PK\x03\x04":
            return None
        name_len, extra_len = struct.unpack("<HH", mm[local + 26:local + 30])
        data = local + 30 + name_len + extra_len
        if data + info.file_size > end:
            return None
        key = match.group(1)
        dtype = dtypes.get(key, torch.uint8)
        if info.file_size % dtype.itemsize:
            dtype = torch.uint8
        out.append(Segment(data, info.file_size, f"{archive}/data/{key}", dtype, (info.file_size // dtype.itemsize,)))
    return out


def _layout(segments: list[Segment], size: int) -> list[Segment] | None:
    """Segments sorted and the gaps between them filled with byte runs (no overlaps)."""
    segments = sorted(segments, key=lambda s: s.offset)
    out: list[Segment] = []
    at = 0
    for seg in segments:
        if seg.length == 0:
            out.append(seg)
            continue
        if seg.offset < at:
            return None
        if seg.offset > at:
            out.append(Segment(at, seg.offset - at))
        out.append(seg)
        at = seg.offset + seg.length
    if at < size:
        out.append(Segment(at, size - at))
    return out


class FileBytes:
    """A file's bytes, read with ``pread`` (never through its mapping, see ``cas.sources``): a read
    that finds the file shorter than when it was opened is a :class:`SourceChangedError`."""

    def __init__(self, fd: int, path: Path, size: int) -> None:
        self.fd, self.path, self.size = fd, path, size

    def __len__(self) -> int:
        return self.size

    def read(self, offset: int, length: int) -> bytes:
        return sources.pread_exact(self.fd, length, offset, self.path, self.size, "read")

    def __getitem__(self, where: slice) -> bytes:
        start, stop, _ = where.indices(self.size)
        return self.read(start, stop - start) if stop > start else b""

    def sha256(self, block: int = 8 << 20) -> bytes:
        digest = hashlib.sha256()
        buf = bytearray(min(block, self.size))
        view = memoryview(buf)
        at = 0
        while at < self.size:
            n = os.preadv(self.fd, [view[:min(block, self.size - at)]], at)
            if n == 0:
                raise sources.cut_short(self.fd, self.path, self.size, "read")
            digest.update(view[:n])
            at += n
        return digest.digest()


@dataclass
class ReadFile:
    """One file as stored: its value in the files tree, and the mapping its tensors view."""

    value: dict[str, Any]
    format: str
    size: int
    maps: list[mmap.mmap] = field(default_factory=list)
    #: addresses of the mappings registered with ``cas.sources`` (unregistered on close)
    registered: list[int] = field(default_factory=list)
    #: (st_dev, st_ino) of the file read, and its count of hard links
    inode: tuple[int, int] = (0, 0)
    links: int = 1


def _tensor_of(mm: mmap.mmap, data: FileBytes, seg: Segment) -> torch.Tensor:
    """A tensor over ``seg`` of the mapping (zero-copy when aligned; when not, a copy read from the file)."""
    if seg.length == 0:
        return torch.empty(seg.shape, dtype=seg.dtype)
    flat = torch.frombuffer(mm, dtype=torch.uint8, count=seg.length, offset=seg.offset)
    if seg.dtype == torch.uint8:
        return flat.reshape(seg.shape)
    try:
        return flat.view(seg.dtype).reshape(seg.shape)
    except RuntimeError:  # not aligned to the element size: copy
        copy = torch.frombuffer(bytearray(data.read(seg.offset, seg.length)), dtype=torch.uint8)
        return copy.view(seg.dtype).reshape(seg.shape)


def _mapping_live(ref: weakref.ref[mmap.mmap]) -> bool:
    mm = ref()
    return mm is not None and not mm.closed


def read_file(path: Path, *, strict: bool = False) -> ReadFile:
    """Read one file for storing. ``strict``: a tensor file (by suffix) that does not parse is an error.

    Its bytes are read with ``pread`` (hashed, parsed) and its tensors view a private mapping that
    no code reads: the saver reads the pieces it stores from the file (``cas.sources``), so a file
    cut short meanwhile is a ``SourceChangedError``, never a SIGBUS."""
    with open(path, "rb") as f:
        st = os.fstat(f.fileno())
        size = st.st_size
        value: dict[str, Any] = {"mode": stat.S_IMODE(st.st_mode), "mtime_ns": st.st_mtime_ns, "size": size}
        if size == 0:
            value.update(sha256=hashlib.sha256().digest(), format="raw", tensors={}, raw={}, layout=[])
            return ReadFile(value, "raw", 0, inode=(st.st_dev, st.st_ino), links=st.st_nlink)
        data = FileBytes(f.fileno(), path, size)
        try:
            mm = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY)  # writable copy-on-write: torch views it
        except OSError as exc:
            if exc.errno != errno.ENOMEM:
                raise
            raise UsageError(
                f"cannot map {path} ({size} bytes): {exc.strerror}. A save keeps every file it reads mapped until "
                "it commits; save the directory in parts (or raise vm.max_map_count / the address-space limit)"
            ) from None
        mapped = sources.MappedFile(sources.address_of(memoryview(mm)), size, path, st.st_dev, st.st_ino,
                                    functools.partial(_mapping_live, weakref.ref(mm)))
        sources.register(mapped)
        try:
            digest = data.sha256()
            suffix = path.suffix.lower()
            fmt, segments = "raw", None
            if suffix == SAFETENSORS_SUFFIX:
                segments, fmt = _safetensors_segments(data, size), "safetensors"
            elif suffix == ".distcp":
                segments, fmt = _embedded_zip_segments(data, size), "distcp"
            elif suffix in TORCH_SUFFIXES or data[:4] == b"PK\x03\x04":
                segments, fmt = _torch_zip_segments(path, data, size), "torch"
            laid = _layout(segments, size) if segments is not None else None
            if laid is None:
                if strict and suffix in (*TORCH_SUFFIXES, SAFETENSORS_SUFFIX):
                    what = "safetensors file" if suffix == SAFETENSORS_SUFFIX else "torch.save archive (zip)"
                    raise NotACheckpointError(f"{path} is not a readable {what}; save its directory to keep it "
                                              "as bytes")
                fmt, laid = "raw", [Segment(0, size)]
            tensors: dict[str, torch.Tensor] = {}
            raw: dict[int, torch.Tensor] = {}
            layout: list[Any] = []
            for seg in laid:
                if seg.name is not None:
                    tensors[seg.name] = _tensor_of(mm, data, seg)
                    layout.append(("t", seg.name))
                elif seg.length <= INLINE_MAX:
                    layout.append(data.read(seg.offset, seg.length))
                else:
                    raw[len(raw)] = _tensor_of(mm, data, Segment(seg.offset, seg.length, shape=(seg.length,)))
                    layout.append(("r", len(raw) - 1))
        except BaseException:
            sources.unregister(mapped.address)
            raise
    value.update(sha256=digest, format=fmt, tensors=tensors, raw=raw, layout=layout)
    return ReadFile(value, fmt, size, [mm], [mapped.address], (st.st_dev, st.st_ino), st.st_nlink)


# --------------------------------------------------------------------------- what to store

def _walk_error(exc: OSError) -> None:
    raise exc  # a directory that cannot be listed is an error, never left out in silence


def _walk(root: Path, exclude: frozenset[Path] = frozenset()) -> Iterator[tuple[str, Path, bool]]:
    """(relative path, path, is a directory) under ``root``, sorted; symlinked files are read through,
    symlinked directories are not entered (with a warning), nor the directories in ``exclude``
    (the repository itself)."""
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False, onerror=_walk_error):
        dirnames.sort()
        here = Path(dirpath)
        for d in list(dirnames):
            p = here / d
            if p.is_symlink():
                log.warning("cas: %s is a symlinked directory; not entered (save its target to keep it)", p)
            elif exclude and p.resolve() in exclude:
                log.warning("cas: %s is the repository being saved into; left out", p)
                dirnames.remove(d)
            else:
                yield p.relative_to(root).as_posix(), p, True
        for name in sorted(filenames):
            p = here / name
            if p.is_file():  # follows a symlink to a file; sockets, fifos and dangling links are skipped
                yield p.relative_to(root).as_posix(), p, False
            else:
                log.warning("cas: %s is not a regular file; not stored", p)


@dataclass
class FilesState:
    state: dict[str, Any]
    source: dict[str, Any]
    maps: list[mmap.mmap]
    #: every file read: (size, mtime_ns, st_dev, st_ino) as read
    seen: dict[Path, tuple[int, int, int, int]] = field(default_factory=dict)
    #: the mappings registered with ``cas.sources``
    registered: list[int] = field(default_factory=list)

    def check_unchanged(self) -> None:
        """Raise ``SourceChangedError`` if a file read is no longer as it was read (written, cut,
        grown or replaced): what was stored may mix its old and new bytes. Called before commit."""
        for path, (size, mtime_ns, dev, ino) in self.seen.items():
            try:
                st = os.stat(path)
            except OSError as exc:
                raise SourceChangedError(f"{path} went away while it was saved ({exc.strerror}); nothing was "
                                         "committed") from None
            if (st.st_size, st.st_mtime_ns) != (size, mtime_ns):
                raise SourceChangedError(
                    f"{path} changed while it was saved ({size} -> {st.st_size} bytes, mtime moved); nothing was "
                    "committed. Save it again once nothing writes it (or save a copy)"
                )
            if (st.st_dev, st.st_ino) != (dev, ino):
                raise sources.replaced(path)

    def close(self) -> None:
        """Drop the tensors and unmap the files (a mapping still viewed stays until collected)."""
        self.state.clear()
        for address in self.registered:
            sources.unregister(address)
        self.registered.clear()
        for mm in self.maps:
            with contextlib.suppress(BufferError):
                mm.close()


def build_state(paths: list[Path], exclude: list[Path] | None = None) -> FilesState:
    """The files tree of ``paths``: one directory -> its contents; files and directories -> by name.
    Directories in ``exclude`` (the repository saved into) are left out."""
    skip = frozenset(p.resolve() for p in exclude or [])
    if not paths:
        raise UsageError("nothing to save: give files or directories")
    entries: list[tuple[str, Path, bool, bool]] = []  # rel, path, is_dir, named on the command line
    single_dir = len(paths) == 1 and paths[0].is_dir()
    for path in paths:
        if not path.exists():
            raise NotACheckpointError(f"{path} does not exist")
        if path.is_dir():
            prefix = "" if single_dir else path.resolve().name + "/"
            if not single_dir:
                entries.append((prefix.rstrip("/"), path, True, True))
            entries.extend((prefix + rel, p, is_dir, False) for rel, p, is_dir in _walk(path, skip))
        elif path.is_file():
            entries.append((path.name, path, False, True))
        else:
            raise NotACheckpointError(f"{path} is not a regular file or a directory")
    rels = [e[0] for e in entries]
    if len(set(rels)) != len(rels):
        dup = next(r for r in rels if rels.count(r) > 1)
        raise UsageError(f"two inputs would be stored as {dup!r}; save them as separate snapshots or from one "
                         "directory")
    files: dict[str, Any] = {}
    dirs: dict[str, Any] = {}
    maps: list[mmap.mmap] = []
    registered: list[int] = []
    seen: dict[Path, tuple[int, int, int, int]] = {}  # size, mtime and inode when read
    linked: dict[tuple[int, int], str] = {}  # inode -> the first path that names it
    formats: dict[str, int] = {}
    total = 0
    if single_dir:
        st = paths[0].stat()
        dirs[""] = {"mode": stat.S_IMODE(st.st_mode), "mtime_ns": st.st_mtime_ns}
    try:  # whatever stops the walk, no mapping stays registered
        for rel, path, is_dir, named in entries:
            if rel:
                check_rel(rel, "input")
            if is_dir:
                st = path.stat()
                dirs[rel] = {"mode": stat.S_IMODE(st.st_mode), "mtime_ns": st.st_mtime_ns}
                continue
            read = read_file(path, strict=named)
            registered.extend(read.registered)
            maps.extend(read.maps)
            if read.links > 1 and not path.is_symlink():  # hard links: the first name of the inode is the group's
                first = linked.setdefault(read.inode, rel)
                if first != rel:
                    read.value["link"] = first
            files[rel] = read.value
            seen[path] = (read.value["size"], read.value["mtime_ns"], *read.inode)
            formats[read.format] = formats.get(read.format, 0) + 1
            if read.format == "raw" and path.suffix.lower() in (*TORCH_SUFFIXES, SAFETENSORS_SUFFIX):
                log.warning("cas: %s is not a readable tensor file; stored as bytes (it comes back the same, "
                            "its tensors do not dedup)", rel)
            total += read.size
    except BaseException:
        for address in registered:
            sources.unregister(address)
        raise
    if not files and not dirs:
        raise NotACheckpointError(f"{paths[0]} holds no files")
    name = paths[0].resolve().name if len(paths) == 1 else f"{len(paths)} inputs"
    source = {"kind": "files", "name": name, "files": len(files), "bytes": total, "formats": formats}
    return FilesState({FILES_KEY: FILES_VERSION, "files": files, "dirs": dirs}, source, maps, seen, registered)


# --------------------------------------------------------------------------- restoring

@dataclass
class RestoreReport:
    files: int = 0
    bytes: int = 0
    skipped: int = 0
    written: list[str] = field(default_factory=list)


def selects(rel: str, patterns: list[str] | None) -> bool:
    """``--include``: a glob on the relative path (or its file name), or a directory prefix."""
    if not patterns:
        return True
    name = rel.rsplit("/", 1)[-1]
    return any(fnmatch.fnmatchcase(rel, p) or fnmatch.fnmatchcase(name, p) or rel == p.rstrip("/")
               or rel.startswith(p.rstrip("/") + "/") for p in patterns)


#: mode of the directories a restore makes, until it completes and gives each its stored mode: a
#: private directory is never open to others while (or because) a restore runs
RESTORE_DIR_MODE = 0o700


def _dest(out: Path, parts: tuple[str, ...], create: bool) -> Path:
    """``out``/``parts``: every directory on the way is a real directory inside ``out`` (created when
    ``create``, private: ``RESTORE_DIR_MODE``); a symlink on the way is refused, so nothing is
    written outside ``out``."""
    here = out
    for part in parts[:-1]:
        here = here / part
        try:
            st = os.lstat(here)
        except FileNotFoundError:
            if not create:
                raise
            os.mkdir(here, RESTORE_DIR_MODE)
            continue
        if not stat.S_ISDIR(st.st_mode):
            raise UsageError(f"refusing to write through {here}: it is a symlink or not a directory")
    dest = here / parts[-1]
    if os.path.lexists(dest) and os.path.isdir(dest) and not os.path.islink(dest):
        raise OutputExistsError(f"{dest} is a directory; the snapshot holds a file there")
    return dest


#: with ``sparse``, runs of zero bytes this long (aligned to it in the file) become holes
HOLE_BLOCK = 64 * 1024


def _write_sparse(f: io.BufferedWriter, data: memoryview, at: int) -> None:
    """Write ``data`` at file offset ``at`` (where ``f`` stands), leaving aligned all-zero blocks as holes."""
    raw = np.frombuffer(data, np.uint8)
    pos = 0
    while pos < len(raw):
        end = min(len(raw), (at + pos) // HOLE_BLOCK * HOLE_BLOCK + HOLE_BLOCK - at)
        if end - pos == HOLE_BLOCK and not raw[pos:end].any():
            f.seek(HOLE_BLOCK, os.SEEK_CUR)
        else:
            f.write(data[pos:end])
        pos = end


def _write_parts(dest: Path, temp: Path, parts: Iterable[Any], size: int, digest: bytes, mode: int, mtime_ns: int,
                 where: str, sparse: bool = False) -> int:
    h = hashlib.sha256()
    written = 0
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(fd, "wb", closefd=True) as f:
            for part in parts:
                data = part_bytes(part)
                h.update(data)
                if sparse:
                    _write_sparse(f, data.cast("B") if data.format != "B" else data, written)
                else:
                    f.write(data)
                written += data.nbytes
            if sparse:
                f.truncate(written)  # a hole at the end still counts in the file's length
            f.flush()
            if written != size or h.digest() != digest:
                raise CorruptionError(
                    f"{where}: the rebuilt file is {written} bytes with another sha256 than the {size} bytes stored; "
                    "nothing was written there"
                )
            os.fchmod(f.fileno(), mode & 0o7777)
            os.fsync(f.fileno())
        os.utime(temp, ns=(mtime_ns, mtime_ns))
        os.replace(temp, dest)
    finally:
        if os.path.lexists(temp):
            os.unlink(temp)
    return written


def prepare_target(out: Path, force: bool) -> bool:
    """A restore goes into a new or empty directory (or any with ``force``). True if it made ``out``
    (private, ``RESTORE_DIR_MODE``, until ``restore_files(made_target=True)`` completes)."""
    if os.path.lexists(out):
        if not out.is_dir() or out.is_symlink():
            raise OutputExistsError(f"{out} exists and is not a directory; name a new directory")
        if any(out.iterdir()) and not force:
            raise OutputExistsError(f"{out} is not empty; pass --force to write into it")
        return False
    if not out.parent.is_dir():
        raise UsageError(f"directory {out.parent} does not exist")
    os.mkdir(out, RESTORE_DIR_MODE)
    return True


def _default_dir_mode() -> int:
    umask = os.umask(0o022)  # read by setting; put back at once
    os.umask(umask)
    return 0o777 & ~umask



def restore_file(load: PartLoader, rel: str, dest: Path, where: str, *, sparse: bool = False) -> int:
    """Rebuild one stored file at ``dest``: its small fields first, then its tensors in batches of
    about ``RESTORE_BATCH_BYTES``, written in layout order as they come (sha256 checked).
    ``sparse``: aligned runs of ``HOLE_BLOCK`` zero bytes are left as holes (the bytes read back are
    the same; where the filesystem has no holes they are written out)."""
    stored = stored_file(load, rel, where)
    temp = dest.parent / f".cas-{uuid.uuid4().hex[:16]}.tmp"  # short: any name that fits NAME_MAX restores
    try:
        return _write_parts(dest, temp, file_parts(load, stored, where), stored.size, stored.sha256, stored.mode,
                            stored.mtime_ns, where, sparse)
    except OSError as exc:  # the target refused it: name the file asked for, not the temp file
        raise UsageError(f"cannot write {dest}: {exc.strerror or exc}") from None


def _link_file(first: Path, dest: Path) -> int:
    """``dest`` made another name of ``first`` (a hard link, as the backed-up files were), through a
    temp name so an existing ``dest`` is replaced whole. Returns the bytes it holds."""
    temp = dest.parent / f".cas-{uuid.uuid4().hex[:16]}.tmp"
    try:
        os.link(first, temp, follow_symlinks=False)
        os.replace(temp, dest)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise UsageError(f"cannot link {dest} to {first}: {exc.strerror or exc}") from None
    return os.stat(dest, follow_symlinks=False).st_size


def _fsync_tree(out: Path, filled: set[Path]) -> None:
    """fsync every directory from ``out`` down to those that got files, deepest first: the files'
    renames, then the entries of the directories made on the way."""
    dirs = {out}
    for parent in filled:
        here = parent
        while here != out and here not in dirs and out in here.parents:
            dirs.add(here)
            here = here.parent
    for d in sorted(dirs, key=lambda p: -len(p.parts)):
        try:
            fsync_dir(d)
        except PermissionError:  # --force into a tree with a directory this user cannot open: it got nothing
            continue


def restore_files(
    load: PartLoader,
    listing: list[dict[str, Any]],
    name: str,
    out: Path,
    *,
    include: list[str] | None = None,
    progress: Callable[[int, int], None] | None = None,
    sparse: bool = False,
    made_target: bool = False,
) -> RestoreReport:
    """Write the files of a file backup under ``out`` (which exists). ``listing`` is
    ``Repository.files``; each file is rebuilt by :func:`restore_file`, so memory holds about
    ``RESTORE_BATCH_BYTES`` of tensors at a time (or the largest tensor)."""
    report = RestoreReport()
    files = [f for f in listing if f["kind"] == "file"]
    chosen = [f for f in files if selects(f["path"], include)]
    report.skipped = len(files) - len(chosen)
    total = sum(int(f["size"]) for f in chosen)
    dirs = [d for d in listing if d["kind"] == "dir"]
    filled: set[Path] = set()  # directories that got files: their entries are fsynced at the end
    try:
        for d in sorted(dirs, key=lambda d: d["path"].count("/")):  # empty directories too, when not filtered
            if d["path"] and (not include or any(f["path"].startswith(d["path"] + "/") for f in chosen)):
                filled.add(_dest(out, (*check_rel(d["path"], name), "-"), create=True).parent)
        restored: dict[str, tuple[Path, int]] = {}  # path -> where it went, its size
        for f in sorted(chosen, key=lambda f: bool(f.get("link"))):  # the names hard links point to first
            rel = f["path"]
            dest = _dest(out, check_rel(rel, name), create=True)
            first = restored.get(f.get("link") or "")
            if first is not None and first[1] == f["size"]:
                report.bytes += _link_file(first[0], dest)
            else:  # a group's first file left out (--include): this name gets the bytes
                report.bytes += restore_file(load, rel, dest, f"{name}, file {rel}", sparse=sparse)
            restored[rel] = (dest, int(f["size"]))
            filled.add(dest.parent)
            report.files += 1
            report.written.append(rel)
            if progress is not None:
                progress(report.bytes, total)
    except (CasError, OSError) as exc:  # say what the target holds now, in the error the caller gets
        with contextlib.suppress(OSError):
            _fsync_tree(out, filled)
        stopped = (
            f"the restore stopped after {report.files} of {len(chosen)} files: those are whole (sha256 "
            "checked) and nothing else was left in their place; the directories it made stay private (mode 0700, "
            "not their stored modes and mtimes) until a restore completes. Fix the cause and run it again with --force"
        )
        if isinstance(exc, OSError):  # a directory on the way: made, or found, unusable
            where = f" ({exc.filename})" if exc.filename else ""
            raise UsageError(f"cannot restore into {out}: {exc.strerror or exc}{where}; {stopped}") from None
        exc.args = (f"{exc}; {stopped}", *exc.args[1:])
        raise
    _fsync_tree(out, filled)  # before the modes: a directory's stored mode may not let it be opened
    # directories last, deepest first: writing files into them moved their mtimes
    for d in sorted(dirs, key=lambda d: -d["path"].count("/") - (1 if d["path"] else 0)):
        rel = d["path"]
        target = out.joinpath(*check_rel(rel, name)) if rel else out
        if not target.is_dir() or target.is_symlink():
            continue
        os.chmod(target, int(d["mode"]) & 0o7777)
        os.utime(target, ns=(int(d["mtime_ns"]), int(d["mtime_ns"])))
    if made_target and not any(d["path"] == "" for d in dirs):  # a backup of several inputs: no stored mode
        os.chmod(out, _default_dir_mode())
    return report


def flat_tensors(value: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[str, Any]]:
    """(formatted key path, tensor or array) of every tensor/array in a loaded value."""
    from cas.tree import format_path  # noqa: PLC0415

    if isinstance(value, torch.Tensor) or (type(value).__module__ == "numpy" and hasattr(value, "dtype")):
        yield format_path(path), value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from flat_tensors(v, (*path, k))
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            yield from flat_tensors(v, (*path, i))


def raw_bytes(value: Any) -> bytes:
    """A tensor's or array's elements, row-major, as stored."""
    if isinstance(value, torch.Tensor):
        from cas.statedict import byte_view  # noqa: PLC0415

        return bytes(byte_view(value.detach().contiguous()))
    return bytes(value.tobytes())


def summary(key: str, value: Any) -> list[str]:
    """What `cas cat` prints about one tensor: dtype, shape, and statistics of its values."""
    if not isinstance(value, torch.Tensor):
        t = torch.from_numpy(value) if value.dtype.kind in "biufc" else None
        if t is None:
            return [f"{key}: numpy {value.dtype} {list(value.shape)}"]
    else:
        t = value.detach()
    dtype = str(t.dtype).removeprefix("torch.")
    lines = [f"{key}: {dtype} {list(t.shape)} ({t.numel()} elements, {t.numel() * t.element_size()} bytes)"]
    if t.numel() == 0:
        return lines
    if t.is_floating_point() or t.is_complex():
        f = t.to(torch.complex128 if t.is_complex() else torch.float64)
        finite = torch.isfinite(f)
        bad = int((~finite).sum())
        good = f[finite] if bad else f.reshape(-1)
        if good.numel() and not t.is_complex():
            lines.append(f"min {good.min().item():.6g}  max {good.max().item():.6g}  mean {good.mean().item():.6g}  "
                         f"std {good.std(unbiased=False).item():.6g}" + (f"  non-finite {bad}" if bad else ""))
        elif bad:
            lines.append(f"non-finite {bad}")
    elif t.dtype == torch.bool:
        lines.append(f"true {int(t.sum())}  false {t.numel() - int(t.sum())}")
    else:
        i = t.to(torch.int64) if t.dtype != torch.uint64 else t
        lines.append(f"min {int(i.min())}  max {int(i.max())}")
    head = t.reshape(-1)[:8].tolist()
    lines.append("first " + ", ".join(f"{v:.6g}" if isinstance(v, float) else str(v) for v in head)
                 + (" ..." if t.numel() > 8 else ""))
    return lines


def reread_states(directory: Path) -> Any:
    """What ``--format`` writes: the tensor files of a restored directory loaded as state dicts
    (one file: its state; several: ``{relative path: state}``)."""
    from cas.importers import CHECKPOINT_SUFFIXES, read_checkpoint  # noqa: PLC0415

    found = sorted(p for p in directory.rglob("*") if p.is_file() and p.suffix.lower() in CHECKPOINT_SUFFIXES)
    if not found:
        raise NotACheckpointError("the snapshot holds no tensor files to re-serialize")
    if len(found) == 1:
        return read_checkpoint(found[0])[0]
    return {p.relative_to(directory).as_posix(): read_checkpoint(p)[0] for p in found}


