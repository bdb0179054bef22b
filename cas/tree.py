"""Walking an encoded state-dict tree (the value of a tree node): pure functions, no torch.

The encoding itself (Python values <-> tagged lists) lives in ``cas.statedict``; these
helpers only read the tagged lists, so verify, GC, diff and the CLI listing run
without importing torch.

A tree node comes from disk, so nothing in it is trusted: every walk checks each value
it passes (tag known, arity right, item types, dtype names from the tables below only,
shapes of non-negative integers, storage indexes in range, views inside their storage)
and :func:`check_tree` also checks that every blob's byte count agrees with its chunk
list, before anything is allocated from a declared size. Anything else is
:class:`ManifestCorruptError` naming the node and the key path.
"""

from __future__ import annotations

import fnmatch
import re
import sys
from dataclasses import dataclass, field
from typing import Any, TypeGuard

import numpy as np

from cas.errors import ManifestCorruptError
from cas.ids import DIGEST_SIZE, ChunkId
from cas.manifest import split_chunk_ids
from cas.store import CHUNK_ALIGN, CHUNK_SIZE_MAX, CHUNK_SIZE_MIN

KeyPath = tuple[Any, ...]


@dataclass(eq=False)
class Blob:
    """A contiguous byte view to be stored as chunks (no copy of the source)."""

    view: memoryview
    path: KeyPath
    chunks: list[ChunkId] = field(default_factory=list)
    #: bytes per scalar (one part of a complex) and whether scalars are floats: for the codecs
    element_size: int = 1
    is_float: bool = False
    #: what must match in the parent snapshot for its chunks to serve as delta bases
    signature: tuple[Any, ...] = ()

    @property
    def nbytes(self) -> int:
        return self.view.nbytes

#: bytes per element of every torch dtype a tree may name (the sub-byte and bits dtypes take one
#: byte per element in memory, as torch stores them); any other name is damage (or a newer torch)
TORCH_ITEMSIZE = {
    "bool": 1, "uint8": 1, "int8": 1, "float8_e4m3fn": 1, "float8_e5m2": 1, "float8_e4m3fnuz": 1,
    "float8_e5m2fnuz": 1, "float8_e8m0fnu": 1, "int16": 2, "uint16": 2, "float16": 2, "bfloat16": 2,
    "complex32": 4, "int32": 4, "uint32": 4, "float32": 4, "int64": 8, "uint64": 8, "float64": 8,
    "complex64": 8, "complex128": 16,
    "float4_e2m1fn_x2": 1, "bits8": 1, "bits1x8": 1, "bits2x4": 1, "bits4x2": 1, "bits16": 2,
    **{f"{sign}int{bits}": 1 for sign in ("", "u") for bits in range(1, 8)},
}


def _array_dtypes() -> dict[str, np.dtype[Any]]:
    """numpy dtype strings (with byte order) of the arrays the encoder stores: bool, int, uint, float, complex."""
    out: dict[str, np.dtype[Any]] = {}
    for code in "?" + np.typecodes["AllInteger"] + np.typecodes["AllFloat"]:
        dt = np.dtype(code)
        for variant in (dt, dt.newbyteorder("<"), dt.newbyteorder(">")):
            out[variant.str] = np.dtype(variant.str)  # as np.dtype reads the string (native order "=")
    return out


#: the only numpy dtype strings ``A`` and ``n`` values may name (never pass another string to np.dtype)
ARRAY_DTYPES = _array_dtypes()
MAX_ARRAY_DIMS = 64  # numpy's limit
#: deepest value nesting a tree may have: msgpack packs at most 1024 levels and every tagged
#: value takes two, so no writer produces more; walks here are iterative whatever the depth
MAX_DEPTH = 512
INT64_MAX = (1 << 63) - 1
#: most bytes one tensor, array or storage may declare (torch and numpy count bytes in int64)
MAX_BLOB_BYTES = INT64_MAX
#: items per tag, the tag included (FORMAT.md §7)
ARITY = {
    "N": 1, "b": 2, "i": 2, "I": 2, "f": 2, "c": 3, "s": 2, "y": 3, "Y": 3, "l": 2, "t": 2, "d": 2, "o": 3,
    "T": 5, "V": 7, "A": 4, "n": 3, "Z": 2, "D": 2, "E": 2, "P": 2,
}
KEY_TAGS = frozenset("NbiIfsyt")  # dict keys: None, bool, int, float, str, bytes, tuples of these
MAX_FLAGS = 3  # 1 = nn.Parameter, 2 = requires_grad
BIG_INT = re.compile(r"-?[0-9]+")
NAME = re.compile(r"[a-z][a-z0-9_]{0,63}")
DEVICE = re.compile(r"[a-z][a-z0-9_]{0,63}(:[0-9]{1,9})?")


def format_path(path: KeyPath) -> str:
    return "/".join(str(k) for k in path) if path else "<root>"


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _fail(name: str, path: KeyPath, problem: str) -> ManifestCorruptError:
    return ManifestCorruptError(f"{name} is malformed at {format_path(path)}: {problem}")


def _is_int(value: Any) -> TypeGuard[int]:
    return type(value) is int


def _tag(enc: Any, name: str, path: KeyPath) -> str:
    """The tag of an encoded value whose arity has been checked."""
    if type(enc) is not list or not enc:
        raise _fail(name, path, f"a value is {_shown(enc)}, not a tagged list")
    tag = enc[0]
    if type(tag) is not str or tag not in ARITY:
        raise _fail(name, path, f"unknown value tag {_shown(tag)}")
    arity = ARITY[tag]
    if len(enc) != arity:
        raise _fail(name, path, f"a {tag!r} value has {len(enc) - 1} items after its tag, not {arity - 1}")
    return tag


def _chunk_count(raw: Any, name: str, path: KeyPath) -> int:
    if type(raw) is not bytes or len(raw) % DIGEST_SIZE:
        raise _fail(name, path, f"the chunk list is {_shown(raw)[:40]}, not a run of {DIGEST_SIZE}-byte ids")
    return len(raw) // DIGEST_SIZE


def _ints(value: Any, what: str, name: str, path: KeyPath, low: int, high: int) -> list[int]:
    if type(value) is not list:
        raise _fail(name, path, f"{what} is {_shown(value)}, not a list of integers")
    for d in value:
        if not _is_int(d) or not low <= d <= high:
            raise _fail(name, path, f"{what} {_shown(value)} holds {_shown(d)}, not an integer from {low} to {high}")
    return value


def _numel(shape: list[int], itemsize: int, name: str, path: KeyPath) -> int:
    """Elements of ``shape``, refused once its bytes could not be counted in int64."""
    if 0 in shape:
        return 0
    limit = MAX_BLOB_BYTES // itemsize
    n = 1
    for d in shape:
        n *= d
        if n > limit:
            raise _fail(name, path, f"shape {_shown(shape)} holds more than {MAX_BLOB_BYTES} bytes")
    return n


def _flags(value: Any, name: str, path: KeyPath) -> None:
    if not _is_int(value) or not 0 <= value <= MAX_FLAGS:
        raise _fail(name, path, f"tensor flags are {_shown(value)}, not an integer from 0 to {MAX_FLAGS}")


def torch_itemsize(dtype: Any, name: str, path: KeyPath) -> int:
    size = TORCH_ITEMSIZE.get(dtype) if type(dtype) is str else None
    if size is None:
        raise _fail(name, path, f"unknown tensor dtype {_shown(dtype)} (written by a newer torch?)")
    return size


def array_dtype(dtype: Any, name: str, path: KeyPath) -> np.dtype[Any]:
    dt = ARRAY_DTYPES.get(dtype) if type(dtype) is str else None
    if dt is None:
        raise _fail(name, path, f"array dtype {_shown(dtype)} is not a numpy bool, int, uint, float or complex dtype")
    return dt


@dataclass(slots=True)
class Sized:
    """A blob whose byte count the tree declares: its chunk list must split exactly that many bytes."""

    path: KeyPath
    kind: str  # "tensor", "array" or "storage"
    detail: Any  # (dtype, shape), or the storage index
    nbytes: int
    chunks: int

    @property
    def what(self) -> str:
        if self.kind == "storage":
            return f"storage {self.detail}"
        return f"{self.kind} {self.detail[0]}{self.detail[1]}"


@dataclass
class Scan:
    """What one walk of a tree found, every value on the way checked."""

    tensors: list[tuple[KeyPath, list[Any]]] = field(default_factory=list)
    blobs: list[tuple[KeyPath, bytes]] = field(default_factory=list)
    sized: list[Sized] = field(default_factory=list)
    #: per storage index, the first view's path
    storage_users: dict[int, KeyPath] = field(default_factory=dict)


def _leaf(enc: list[Any], tag: str, name: str, path: KeyPath, storages: list[int] | None, scan: Scan) -> None:
    """Check a T, V or A leaf; record its blob."""
    if tag == "A":
        dt = array_dtype(enc[1], name, path)
        shape = _ints(enc[2], "the shape", name, path, 0, INT64_MAX)
        if len(shape) > MAX_ARRAY_DIMS:
            raise _fail(name, path, f"an array has {len(shape)} dimensions; numpy allows {MAX_ARRAY_DIMS}")
        nbytes = _numel(shape, dt.itemsize, name, path) * dt.itemsize
        scan.sized.append(Sized(path, "array", (enc[1], shape), nbytes, _chunk_count(enc[3], name, path)))
        scan.blobs.append((path, enc[3]))
        return
    itemsize = torch_itemsize(enc[1], name, path)
    shape = _ints(enc[2], "the shape", name, path, 0, INT64_MAX)
    numel = _numel(shape, itemsize, name, path)
    if tag == "T":
        _flags(enc[4], name, path)
        scan.sized.append(Sized(path, "tensor", (enc[1], shape), numel * itemsize, _chunk_count(enc[3], name, path)))
        scan.blobs.append((path, enc[3]))
        return
    stride = _ints(enc[3], "the stride", name, path, 0, INT64_MAX)
    if len(stride) != len(shape):
        raise _fail(name, path, f"a view has shape {_shown(shape)} but stride {_shown(stride)}")
    offset, index = enc[4], enc[5]
    if not _is_int(offset) or not 0 <= offset <= INT64_MAX:
        raise _fail(name, path, f"a view's storage offset is {_shown(offset)}, not a non-negative integer")
    if not _is_int(index) or index < 0 or (storages is not None and index >= len(storages)):
        count = "?" if storages is None else len(storages)
        raise _fail(name, path, f"a view names storage {_shown(index)}; the tree has {count} storages")
    _flags(enc[6], name, path)
    scan.storage_users.setdefault(index, path)
    if storages is not None:
        end = offset if numel == 0 else offset + 1 + sum((d - 1) * s for d, s in zip(shape, stride, strict=True))
        if end * itemsize > storages[index]:
            raise _fail(
                name, path,
                f"a {enc[1]} view of shape {shape}, stride {stride} at offset {offset} reaches byte "
                f"{end * itemsize}, past the end of its storage {index} ({storages[index]} bytes)",
            )


def _scalar(enc: list[Any], tag: str, name: str, path: KeyPath) -> None:
    """Check a value that holds no blob and no other values."""
    item = enc[1] if len(enc) > 1 else None
    ok = True
    if tag == "b":
        ok = type(item) is bool
    elif tag == "i":
        ok = _is_int(item) and -(1 << 63) <= item < (1 << 64)
    elif tag == "I":
        limit = sys.get_int_max_str_digits() or 1 << 20
        ok = type(item) is str and len(item) <= limit + 1 and BIG_INT.fullmatch(item) is not None
    elif tag == "f":
        ok = type(item) is float
    elif tag == "c":
        ok = type(item) is float and type(enc[2]) is float
    elif tag == "s":
        ok = type(item) is bytes and _utf8(item)
    elif tag == "y":
        ok = type(item) is bytes and type(enc[2]) is bool
    elif tag == "n":
        dt = array_dtype(item, name, path)
        ok = type(enc[2]) is bytes and len(enc[2]) == dt.itemsize
    elif tag == "Z":
        _ints(item, "a torch.Size", name, path, -(1 << 63), INT64_MAX)
    elif tag == "D":
        ok = type(item) is str and NAME.fullmatch(item) is not None
    elif tag == "E":
        ok = type(item) is str and DEVICE.fullmatch(item) is not None
    if not ok:
        raise _fail(name, path, f"a {tag!r} value holds {_shown(enc[1:])}")


def _utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8", "surrogatepass")
    except UnicodeDecodeError:
        return False
    return True


def scan_tree(root: Any, name: str, storages: list[int] | None = None, path: KeyPath = ()) -> Scan:
    """Walk a tree (depth first, in order), checking every value; the tensor leaves and blobs found.

    ``storages``: the byte count of each storage, to check the views; None skips those checks.
    Tensors under an OrderedDict's ``_metadata`` hold blobs (listed, so GC keeps them) but are
    not tensor leaves of the state dict.
    """
    scan = Scan()
    stack: list[tuple[Any, KeyPath, int, bool]] = [(root, path, 0, True)]
    while stack:
        enc, where, depth, listed = stack.pop()
        if depth > MAX_DEPTH:
            raise _fail(name, where, f"values nest more than {MAX_DEPTH} levels deep")
        tag = _tag(enc, name, where)
        if tag in ("l", "t"):
            items = enc[1]
            if type(items) is not list:
                raise _fail(name, where, f"a {tag!r} value holds {_shown(items)}, not a list")
            stack.extend((v, (*where, i), depth + 1, listed) for i, v in reversed(list(enumerate(items))))
        elif tag in ("d", "o"):
            pairs = enc[1]
            if type(pairs) is not list:
                raise _fail(name, where, f"a {tag!r} value holds {_shown(pairs)}, not a list of pairs")
            if tag == "o":
                stack.append((enc[2], (*where, "_metadata"), depth + 1, False))
            children = []
            for pair in pairs:
                if type(pair) is not list or len(pair) != 2:
                    raise _fail(name, where, f"a dict item is {_shown(pair)}, not a [key, value] pair")
                children.append((pair[1], (*where, _checked_key(pair[0], name, where, depth + 1)), depth + 1, listed))
            stack.extend(reversed(children))
        elif tag in ("T", "V", "A"):
            _leaf(enc, tag, name, where, storages, scan)
            if listed:
                scan.tensors.append((where, enc))
        elif tag in ("Y", "P"):
            if _chunk_count(enc[1], name, where) == 0:
                raise _fail(name, where, f"a {tag!r} value lists no chunks")
            if tag == "Y" and type(enc[2]) is not bool:
                raise _fail(name, where, f"a 'Y' value's bytearray flag is {_shown(enc[2])}")
            scan.blobs.append((where, enc[1]))
        else:
            _scalar(enc, tag, name, where)
    return scan


def _key(enc: Any, name: str, path: KeyPath, depth: int) -> Any:
    """A checked dict key: the plain Python value of its encoding."""
    if depth > MAX_DEPTH:
        raise _fail(name, path, f"values nest more than {MAX_DEPTH} levels deep")
    tag = _tag(enc, name, path)
    if tag not in KEY_TAGS:
        raise _fail(name, path, f"a dict key has tag {tag!r}; keys are None, bool, int, float, str, bytes or tuples")
    if tag == "t":
        if type(enc[1]) is not list:
            raise _fail(name, path, f"a tuple key holds {_shown(enc[1])}, not a list")
        return tuple(_key(v, name, path, depth + 1) for v in enc[1])
    _scalar(enc, tag, name, path)
    if tag == "y" and enc[2]:
        raise _fail(name, path, "a dict key is a bytearray (keys must be hashable)")
    return _plain(enc, tag)


def _plain(enc: list[Any], tag: str) -> Any:
    if tag == "s":
        return enc[1].decode("utf-8", "surrogatepass")
    if tag == "I":
        return int(enc[1])
    if tag == "N":
        return None
    return enc[1]  # b, i, f, y


def _checked_key(enc: Any, name: str, path: KeyPath, depth: int) -> Any:
    try:
        return _key(enc, name, path, depth)
    except RecursionError:  # tuple keys within tuple keys, deeper than the stack
        raise _fail(name, path, "a dict key nests too deeply") from None


def plain_key(enc: Any, name: str = "tree") -> Any:
    """The Python value of an encoded dict key (checked: a malformed key is ManifestCorruptError)."""
    return _checked_key(enc, name, (), 0)


def tensor_leaves(tree: Any, path: KeyPath = (), name: str = "tree") -> list[tuple[KeyPath, list[Any]]]:
    """(path, encoding) of every tensor/array leaf of an encoded tree, in order (no data read)."""
    return scan_tree(tree, name, path=path).tensors


def blob_leaves(tree: Any, path: KeyPath = (), name: str = "tree") -> list[tuple[KeyPath, bytes]]:
    """(path, raw chunk-id list) of every chunked leaf (tensors, arrays, big bytes, pickles)."""
    return scan_tree(tree, name, path=path).blobs


def storage_sizes(storages: Any, name: str) -> list[int]:
    """The byte count of each ``[nbytes, chunks]`` entry of a tree node's storages, each checked."""
    if type(storages) is not list:
        raise ManifestCorruptError(f"{name} is malformed: storages are {_shown(storages)}, not a list")
    sizes = []
    for i, entry in enumerate(storages):
        where = (f"<storage {i}>",)
        if type(entry) is not list or len(entry) != 2:
            raise _fail(name, where, f"a storage is {_shown(entry)}, not [nbytes, chunks]")
        nbytes = entry[0]
        if not _is_int(nbytes) or not 0 <= nbytes <= MAX_BLOB_BYTES:
            raise _fail(name, where, f"a storage declares {_shown(nbytes)} bytes")
        _chunk_count(entry[1], name, where)
        sizes.append(nbytes)
    return sizes


def check_tree(
    root: Any, storages: Any, name: str, chunk_size: int | None = None
) -> Scan:
    """Check a whole tree (root value and storages) before anything is allocated from it.

    Beyond the checks of every walk: each view fits in its storage, and every tensor, array
    and storage lists exactly the chunks its byte count splits into: ``ceil(nbytes /
    chunk_size)`` (none when empty). ``chunk_size`` is the snapshot's; None (unknown) asks
    only for one chunk size within the repository bounds that fits every blob of the tree.
    """
    sizes = storage_sizes(storages, name)
    scan = scan_tree(root, name, sizes)
    for i, entry in enumerate(storages):
        user = scan.storage_users.get(i)
        path = user if user is not None else (f"<storage {i}>",)
        scan.sized.append(Sized(path, "storage", i, sizes[i], len(entry[1]) // DIGEST_SIZE))
    check_chunk_counts(scan.sized, name, chunk_size)
    return scan


def check_tree_node(node: dict[str, Any], name: str, chunk_size: int | None = None) -> Scan:
    """Check a decoded tree node (``{"v", "type", "root", "storages"}``) in full; see :func:`check_tree`."""
    if "root" not in node or "storages" not in node:
        missing = "root" if "root" not in node else "storages"
        raise ManifestCorruptError(f"{name} is malformed: it has no {missing!r}")
    return check_tree(node["root"], node["storages"], name, chunk_size)


def _chunks(n: int) -> str:
    return f"{n} chunk" if n == 1 else f"{n} chunks"


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def check_chunk_counts(sized: list[Sized], name: str, chunk_size: int | None) -> None:
    """Every blob of one save was split at one chunk size: its chunk count follows from its byte count."""
    if chunk_size:
        for s in sized:
            expected = _ceil_div(s.nbytes, chunk_size)
            if s.chunks != expected:
                raise _fail(
                    name, s.path,
                    f"{s.what} holds {s.nbytes} bytes but lists {_chunks(s.chunks)}; split at the snapshot's "
                    f"chunk size of {chunk_size} bytes it has {_chunks(expected)}",
                )
        return
    # chunk size unknown: some c in [CHUNK_SIZE_MIN, CHUNK_SIZE_MAX], a multiple of CHUNK_ALIGN, with
    # (k - 1) * c < n <= k * c for every blob of n bytes in k chunks
    low, high = CHUNK_SIZE_MIN, CHUNK_SIZE_MAX
    low_by: Sized | None = None
    high_by: Sized | None = None
    for s in sized:
        if (s.nbytes == 0) != (s.chunks == 0):
            raise _fail(name, s.path, f"{s.what} holds {s.nbytes} bytes but lists {_chunks(s.chunks)}")
        if s.chunks == 0:
            continue
        lo = _ceil_div(s.nbytes, s.chunks)
        hi = (s.nbytes - 1) // (s.chunks - 1) if s.chunks > 1 else CHUNK_SIZE_MAX
        if _aligned_in(max(lo, CHUNK_SIZE_MIN), min(hi, CHUNK_SIZE_MAX)) is None:
            raise _fail(
                name, s.path,
                f"{s.what} holds {s.nbytes} bytes but lists {_chunks(s.chunks)}; no chunk size from "
                f"{CHUNK_SIZE_MIN} to {CHUNK_SIZE_MAX} bytes splits it so",
            )
        if lo > low:
            low, low_by = lo, s
        if hi < high:
            high, high_by = hi, s
        if _aligned_in(low, high) is None:
            other = high_by if s is low_by else low_by
            with_other = f" and {format_path(other.path)} ({other.what})" if other is not None else ""
            raise _fail(
                name, s.path,
                f"the chunk lists of {s.what}{with_other} do not agree on one chunk size",
            )


def _aligned_in(low: int, high: int) -> int | None:
    """The smallest multiple of CHUNK_ALIGN in [low, high], if any."""
    c = _ceil_div(low, CHUNK_ALIGN) * CHUNK_ALIGN
    return c if c <= high else None


def subtree(enc: Any, path: KeyPath, name: str) -> Any:
    """The encoded value at ``path`` (dict keys / list indexes) inside an encoded tree.

    A key that is not there is KeyError; a malformed value on the way is ManifestCorruptError.
    """
    for depth, key in enumerate(path):
        where = path[:depth]
        tag = _tag(enc, name, where)
        if tag in ("d", "o"):
            pairs = enc[1]
            if type(pairs) is not list:
                raise _fail(name, where, f"a {tag!r} value holds {_shown(pairs)}, not a list of pairs")
            for pair in pairs:
                if type(pair) is not list or len(pair) != 2:
                    raise _fail(name, where, f"a dict item is {_shown(pair)}, not a [key, value] pair")
                plain = _checked_key(pair[0], name, where, depth + 1)
                if plain == key or str(plain) == str(key):
                    enc = pair[1]
                    break
            else:
                raise KeyError(f"{name} has no key {format_path(path[: depth + 1])}")
        elif tag in ("l", "t") and type(enc[1]) is list and str(key).isdigit() and int(key) < len(enc[1]):
            enc = enc[1][int(key)]
        else:
            raise KeyError(f"{name} has no key {format_path(path[: depth + 1])}")
    return enc


def base_candidates(root: Any, storages: list[Any], name: str) -> dict[KeyPath, tuple[tuple[Any, ...], list[ChunkId]]]:
    """Per blob path of a (parent) tree: its signature and chunk ids, matched against a new save's blobs."""
    scan = check_tree(root, storages, name)
    out: dict[KeyPath, tuple[tuple[Any, ...], list[ChunkId]]] = {}
    seen_storages: set[int] = set()
    for path, enc in scan.tensors:
        tag = enc[0]
        if tag in ("T", "A"):
            out[path] = ((tag, enc[1], tuple(enc[2])), split_chunk_ids(enc[3], name))
        elif tag == "V" and enc[5] not in seen_storages:  # a storage is keyed by its first view's path
            index = enc[5]
            seen_storages.add(index)
            nbytes, raw = storages[index]
            out[path] = (("S", enc[1], nbytes), split_chunk_ids(raw, name))
    return out


def leaf_nbytes(enc: Any, name: str = "tree") -> int:
    """Bytes of a tensor or array leaf (T, V or A), from its dtype and shape alone."""
    tag = _tag(enc, name, ())
    if tag not in ("T", "V", "A"):
        raise _fail(name, (), f"a {tag!r} value is not a tensor or array")
    itemsize = array_dtype(enc[1], name, ()).itemsize if tag == "A" else torch_itemsize(enc[1], name, ())
    return _numel(_ints(enc[2], "the shape", name, (), 0, INT64_MAX), itemsize, name, ()) * itemsize


#: characters a key prefix may stop before: "model" selects "model/..." and "model.layers..." (flat dicts)
KEY_BOUNDARIES = "./"
GLOB_CHARS = frozenset("*?[")


def key_selects(key: str | KeyPath, path: str | KeyPath) -> bool:
    """Whether ``key`` selects the value at ``path``.

    A string key matches the formatted path: equal, a prefix that ends at a ``.``/``/``
    boundary, or a glob. A tuple key is an exact key path (its subtree is selected).
    """
    if isinstance(key, tuple):
        return isinstance(path, tuple) and path[: len(key)] == key
    if isinstance(path, tuple):
        path = format_path(path) if path else ""
    if GLOB_CHARS & set(key):
        return fnmatch.fnmatchcase(path, key)
    if not key or path == key:
        return True
    if not path.startswith(key):
        return False
    return key[-1] in KEY_BOUNDARIES or path[len(key)] in KEY_BOUNDARIES


def _may_hold(key: str | KeyPath, path: KeyPath, fp: str) -> bool:
    """Whether a value at ``path`` (formatted ``fp``) may hold values that ``key`` selects."""
    if isinstance(key, tuple):
        return key[: len(path)] == path
    if GLOB_CHARS & set(key):
        return True
    return key.startswith(fp + "/") or (not fp and bool(key))


def select_paths(root: Any, keys: list[Any], name: str) -> tuple[Any, list[Any]]:
    """The encoded tree cut down to the values ``keys`` select, and the keys that selected nothing.

    Dicts keep only the selected entries (and the dicts on the way to them); a list or tuple
    that holds a selected value is kept whole (its indexes stay what they were). Returns
    ``(None, keys)`` when nothing is selected.
    """
    matched: set[Any] = set()

    def walk(enc: Any, path: KeyPath, depth: int) -> Any:
        fp = format_path(path) if path else ""
        hits = [k for k in keys if (path or k in ("", ())) and key_selects(k, path if isinstance(k, tuple)
                                                                                 else fp)]
        if hits:
            matched.update(hits)
            return enc
        if depth > MAX_DEPTH or not any(_may_hold(k, path, fp) for k in keys):
            return None
        tag = _tag(enc, name, path)
        if tag in ("d", "o") and type(enc[1]) is list:
            kept = []
            for pair in enc[1]:
                if type(pair) is not list or len(pair) != 2:
                    raise _fail(name, path, f"a dict item is {_shown(pair)}, not a [key, value] pair")
                child = walk(pair[1], (*path, _checked_key(pair[0], name, path, depth + 1)), depth + 1)
                if child is not None:
                    kept.append([pair[0], child])
            if not kept:
                return None
            return [tag, kept, *enc[2:]]
        if tag in ("l", "t") and type(enc[1]) is list:
            found = [walk(v, (*path, i), depth + 1) is not None for i, v in enumerate(enc[1])]
            return enc if any(found) else None
        return None

    pruned = walk(root, (), 0)
    return pruned, [k for k in keys if k not in matched]


def drop_paths(root: Any, drop: set[KeyPath], name: str) -> Any:
    """The encoded tree without the dict entries at ``drop`` (list items there become None)."""

    def walk(enc: Any, path: KeyPath, depth: int) -> Any:
        tag = _tag(enc, name, path)
        if depth > MAX_DEPTH or not any(p[: len(path)] == path for p in drop):
            return enc
        if tag in ("d", "o") and type(enc[1]) is list:
            kept = []
            for pair in enc[1]:
                child_path = (*path, _checked_key(pair[0], name, path, depth + 1))
                if child_path not in drop:
                    kept.append([pair[0], walk(pair[1], child_path, depth + 1)])
            return [tag, kept, *enc[2:]]
        if tag in ("l", "t") and type(enc[1]) is list:
            return [tag, [["N"] if (*path, i) in drop else walk(v, (*path, i), depth + 1)
                          for i, v in enumerate(enc[1])]]
        return enc

    return walk(root, (), 0)


# ------------------------------------------------------------------ byte-exact file backups (FORMAT.md §7a)
FILES_KEY = "cas.files"
FILES_VERSION = 1


def is_files_tree(root: Any) -> bool:
    """Whether an encoded tree root is a files backup (checked on the encoding: no torch, no data)."""
    if type(root) is not list or len(root) < 2 or root[0] != "d" or type(root[1]) is not list:
        return False
    return any(type(pair) is list and len(pair) == 2 and pair[0] == ["s", FILES_KEY.encode()] for pair in root[1][:1])


def check_rel(rel: Any, where: str) -> tuple[str, ...]:
    """The components of a stored relative path; anything that could leave the target is refused."""
    if not isinstance(rel, str) or not rel:
        raise ManifestCorruptError(f"{where}: a file path is {rel!r}, not a relative path")
    parts = tuple(rel.split("/"))
    for part in parts:
        if part in ("", ".", "..") or "\x00" in part:
            raise ManifestCorruptError(f"{where}: refusing the path {rel!r}: it could lead outside the target")
    return parts


def file_entries(root: Any, name: str) -> list[str]:
    """The relative paths of the files a files tree holds (from the encoding: no data read)."""
    files = subtree(root, ("files",), name)
    if type(files) is not list or files[0] != "d" or type(files[1]) is not list:
        raise ManifestCorruptError(f"{name}: its files entry is not a dict")
    return [str(plain_key(pair[0], name)) for pair in files[1]]


def dir_entries(root: Any, name: str) -> list[str]:
    try:
        dirs = subtree(root, ("dirs",), name)
    except KeyError:
        return []
    if type(dirs) is not list or dirs[0] != "d" or type(dirs[1]) is not list:
        return []
    return [str(plain_key(pair[0], name)) for pair in dirs[1]]
