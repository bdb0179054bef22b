"""The typed encoding of a state dict: Python values <-> tree-node values + byte blobs.

torch is imported here and nowhere else in the engine. A value is encoded as a
list whose first item is a one-letter type tag (FORMAT.md lists them all); bulk
bytes (tensors, arrays, large bytes, pickles) become :class:`Blob` objects whose
chunk ids the repository fills in after hashing.
"""

from __future__ import annotations

import pickle
import sys
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch

from cas.errors import ManifestCorruptError, PickleRequiredError, UnsupportedObjectError, UsageError
from cas.ids import ChunkId
from cas.manifest import split_chunk_ids
from cas.tree import ARRAY_DTYPES, Blob, KeyPath, check_tree, format_path

INLINE_BYTES_MAX = 4096
INT64_MIN, UINT64_MAX = -(1 << 63), (1 << 64) - 1
FLAG_PARAMETER = 1
FLAG_REQUIRES_GRAD = 2



def scalar_info(dtype: torch.dtype) -> tuple[int, bool]:
    """(bytes per scalar, is a float) of a dtype; complex counts one part; odd sizes count as bytes."""
    size = dtype.itemsize // 2 if dtype.is_complex else dtype.itemsize
    if size not in (1, 2, 4, 8):
        return 1, False
    return size, (dtype.is_floating_point or dtype.is_complex) and size > 1


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype_from_name(name: object, where: str) -> torch.dtype:
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    if not isinstance(dtype, torch.dtype):
        raise ManifestCorruptError(f"{where}: unknown dtype {name!r} (written by a newer torch?)")
    return dtype


def byte_view(t: torch.Tensor) -> memoryview:
    """A zero-copy uint8 view of a contiguous CPU tensor's elements."""
    if t.numel() == 0:
        return memoryview(b"")
    # as_strided, not reshape: a contiguous tensor may still carry an odd stride on a size-1 dim
    flat = t.as_strided((t.numel(),), (1,))
    return memoryview(flat.view(torch.uint8).numpy()).cast("B")  # type: ignore[arg-type]  # numpy arrays are buffers


def _storage_bytes(storage: torch.UntypedStorage) -> torch.Tensor:
    buf = torch.empty(0, dtype=torch.uint8)
    buf.set_(storage, 0, (storage.nbytes(),), (1,))
    return buf


@dataclass
class Encoded:
    tree: list[Any]
    storages: list[Blob]
    blobs: list[Blob]
    tensor_count: int
    logical_bytes: int
    pickled: bool


class _Encoder:
    def __init__(self, allow_pickle: bool) -> None:
        self.allow_pickle = allow_pickle
        self.blobs: list[Blob] = []
        self.tensors: list[tuple[torch.Tensor, KeyPath, list[Any]]] = []
        self.pickled = False

    def blob(self, view: memoryview, path: KeyPath) -> Blob:
        b = Blob(view, path)
        self.blobs.append(b)
        return b

    def key(self, key: Any, path: KeyPath) -> list[Any]:
        if isinstance(key, (torch.Tensor, np.ndarray)) or not _is_hashable_plain(key):
            raise UnsupportedObjectError(
                f"dict key {key!r} of type {type(key).__name__} at {format_path(path)} is not supported; "
                "keys may be str, int, float, bool, None, bytes or tuples of those"
            )
        if type(key) is bytes:
            return ["y", key, False]  # keys stay inline whatever their size
        if type(key) is tuple:
            return ["t", [self.key(k, path) for k in key]]
        return self.value(key, path)

    def value(self, obj: Any, path: KeyPath) -> list[Any]:
        if obj is None:
            return ["N"]
        if obj is True or obj is False:
            return ["b", obj]
        if type(obj) is int:
            if INT64_MIN <= obj <= UINT64_MAX:
                return ["i", obj]
            try:
                return ["I", str(obj)]
            except ValueError:  # beyond sys.get_int_max_str_digits(): no reader could parse it back either
                raise UnsupportedObjectError(
                    f"int at {format_path(path)} has more than {sys.get_int_max_str_digits()} digits; "
                    "store it as bytes (int.to_bytes) or raise sys.set_int_max_str_digits"
                ) from None
        if type(obj) is float:
            return ["f", obj]
        if type(obj) is complex:
            return ["c", obj.real, obj.imag]
        if type(obj) is str:
            return ["s", obj.encode("utf-8", "surrogatepass")]
        if type(obj) in (bytes, bytearray):
            if len(obj) <= INLINE_BYTES_MAX:
                return ["y", bytes(obj), type(obj) is bytearray]
            return ["Y", self.blob(memoryview(bytes(obj)), path), type(obj) is bytearray]
        if isinstance(obj, torch.Tensor) and type(obj) in (torch.Tensor, torch.nn.Parameter):
            slot: list[Any] = []
            self.tensors.append((obj, path, slot))
            return slot
        if type(obj) is np.ndarray:
            return self.array(obj, path)
        if isinstance(obj, np.generic) and obj.dtype.kind in "biufc":
            return ["n", obj.dtype.str, obj.tobytes()]
        if type(obj) is torch.Size:
            return ["Z", list(obj)]
        if type(obj) is torch.dtype:
            return ["D", _dtype_name(obj)]
        if type(obj) is torch.device:
            return ["E", str(obj)]
        if type(obj) in (dict, OrderedDict):
            pairs = [[self.key(k, (*path, k)), self.value(v, (*path, k))] for k, v in obj.items()]
            if type(obj) is dict:
                return ["d", pairs]
            meta = getattr(obj, "_metadata", None)
            return ["o", pairs, self.value(meta, (*path, "_metadata"))]
        if type(obj) is list:
            return ["l", [self.value(v, (*path, i)) for i, v in enumerate(obj)]]
        if type(obj) is tuple:
            return ["t", [self.value(v, (*path, i)) for i, v in enumerate(obj)]]
        return self.fallback(obj, path)

    def array(self, arr: np.ndarray, path: KeyPath) -> list[Any]:
        if arr.dtype.kind not in "biufc":
            return self.fallback(arr, path)
        contiguous = np.ascontiguousarray(arr)
        view = memoryview(contiguous.reshape(-1).view(np.uint8)) if contiguous.size else memoryview(b"")  # type: ignore[arg-type]  # numpy arrays are buffers
        blob = self.blob(view, path)
        part = arr.dtype.itemsize // 2 if arr.dtype.kind == "c" else arr.dtype.itemsize
        blob.element_size = part if part in (1, 2, 4, 8) else 1
        blob.is_float = arr.dtype.kind in "fc"
        blob.signature = ("A", arr.dtype.str, tuple(arr.shape))
        return ["A", arr.dtype.str, list(arr.shape), blob]

    def fallback(self, obj: Any, path: KeyPath) -> list[Any]:
        what = f"{type(obj).__module__}.{type(obj).__qualname__}"
        if not self.allow_pickle and isinstance(obj, np.ndarray):
            raise UnsupportedObjectError(
                f"value at {format_path(path)} is a numpy array of dtype {obj.dtype}; cas stores numpy arrays of "
                "bool, int, uint, float and complex natively: convert it (strings: arr.tolist()) or pass "
                "allow_pickle=True"
            )
        if not self.allow_pickle:
            raise UnsupportedObjectError(
                f"value at {format_path(path)} is a {what}, which cas does not store without pickle; "
                "convert it to tensors/plain types or pass allow_pickle=True"
            )
        try:
            data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as exc:  # noqa: BLE001 - pickle raises anything the object raises
            raise UnsupportedObjectError(f"value at {format_path(path)} ({what}) cannot be pickled: {exc}") from None
        self.pickled = True
        return ["P", self.blob(memoryview(data), path)]


def _is_hashable_plain(key: Any) -> bool:
    if key is None or type(key) in (str, int, float, bool, bytes):
        return True
    if type(key) is tuple:
        return all(_is_hashable_plain(k) for k in key)
    return False


def _host_tensor(t: torch.Tensor, path: KeyPath) -> torch.Tensor:
    if t.layout != torch.strided:
        raise UnsupportedObjectError(
            f"tensor at {format_path(path)} has layout {t.layout}; only dense tensors are stored"
        )
    if t.is_quantized:
        raise UnsupportedObjectError(f"tensor at {format_path(path)} is quantized; dequantize it before saving")
    if t.device.type == "meta":
        raise UnsupportedObjectError(f"tensor at {format_path(path)} is on the meta device and holds no data")
    t = t.detach()
    if t.device.type != "cpu":
        t = t.to("cpu")
    return t.resolve_conj().resolve_neg()


def _flags(t: torch.Tensor) -> int:
    return (FLAG_PARAMETER if isinstance(t, torch.nn.Parameter) else 0) | (FLAG_REQUIRES_GRAD if t.requires_grad else 0)


def encode_state(obj: Any, allow_pickle: bool = False) -> Encoded:
    """Encode ``obj`` into a tree value and the blobs that hold its bulk bytes."""
    enc = _Encoder(allow_pickle)
    try:
        tree = enc.value(obj, ())
    except RecursionError:
        raise UnsupportedObjectError("the state dict is nested too deeply to encode") from None
    # Tensors that share a storage with another tensor of this state dict keep sharing:
    # the storage is stored once and each tensor becomes a view into it.
    groups: dict[tuple[str, int], list[int]] = {}
    for i, (t, _path, _slot) in enumerate(enc.tensors):
        lazy = t.is_conj() or t.is_neg()  # conj/neg views are resolved to plain tensors, not shared
        if t.layout == torch.strided and not t.is_quantized and t.device.type != "meta" and not lazy:
            st = t.untyped_storage()
            if st.nbytes() > 0:
                groups.setdefault((str(t.device), st.data_ptr()), []).append(i)
    shared = {i: members[0] for members in groups.values() if len(members) > 1 for i in members}
    storage_index: dict[int, int] = {}
    storages: list[Blob] = []
    for i, (t, path, slot) in enumerate(enc.tensors):
        dtype = _dtype_name(t.dtype)
        if i in shared:
            leader = shared[i]
            if leader not in storage_index:
                st = t.detach().untyped_storage()
                if st.device.type != "cpu":
                    st = st.cpu()  # type: ignore[no-untyped-call]
                storage_index[leader] = len(storages)
                blob = Blob(byte_view(_storage_bytes(st)), path, signature=("S", dtype, st.nbytes()))
                blob.element_size, blob.is_float = scalar_info(t.dtype)
                storages.append(blob)
            slot.extend(
                ["V", dtype, list(t.shape), list(t.stride()), t.storage_offset(), storage_index[leader], _flags(t)]
            )
            continue
        host = _host_tensor(t, path)
        if not host.is_contiguous():
            host = host.contiguous()
        try:
            view = byte_view(host)
        except (RuntimeError, TypeError) as exc:
            raise UnsupportedObjectError(
                f"tensor at {format_path(path)} has dtype {dtype}, which cas cannot store: {exc}"
            ) from None
        blob = enc.blob(view, path)
        blob.element_size, blob.is_float = scalar_info(t.dtype)
        blob.signature = ("T", dtype, tuple(t.shape))
        slot.extend(["T", dtype, list(t.shape), blob, _flags(t)])
    logical = sum(b.nbytes for b in storages) + sum(b.nbytes for b in enc.blobs)
    return Encoded(tree, storages, enc.blobs, len(enc.tensors), logical, enc.pickled)


# --------------------------------------------------------------------------- decoding


@dataclass
class FillJob:
    """Bytes of ``chunks``, in order, go into ``dest`` (a uint8 view of a freshly allocated or target buffer)."""

    dest: memoryview
    chunks: list[ChunkId]
    path: KeyPath


@dataclass
class Decoded:
    value: Any
    fills: list[FillJob]
    #: (target, source): after the fills, ``target.copy_(source)`` (targets that could not be filled directly)
    copies: list[tuple[torch.Tensor, torch.Tensor]]


class _Decoder:
    def __init__(
        self,
        storages: list[Any],
        allow_pickle: bool,
        read_blob: Callable[[list[ChunkId], KeyPath], bytes],
        targets: dict[KeyPath, torch.Tensor] | None,
        name: str,
    ) -> None:
        self.allow_pickle = allow_pickle
        self.read_blob = read_blob
        self.targets = targets
        self.name = name
        self.fills: list[FillJob] = []
        self.copies: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.storage_specs = storages
        self.storage_buffers: dict[int, torch.Tensor] = {}

    def chunks(self, raw: object) -> list[ChunkId]:
        return split_chunk_ids(raw, self.name)

    def storage(self, index: int, path: KeyPath) -> torch.Tensor:
        buf = self.storage_buffers.get(index)
        if buf is None:
            nbytes, raw_chunks = self.storage_specs[index]
            buf = torch.empty(int(nbytes), dtype=torch.uint8)
            self.fills.append(FillJob(byte_view(buf), self.chunks(raw_chunks), path))
            self.storage_buffers[index] = buf
        return buf

    def tensor(self, enc: Sequence[Any], path: KeyPath) -> torch.Tensor:
        tag = enc[0]
        dtype = _dtype_from_name(enc[1], f"{self.name} at {format_path(path)}")
        shape = tuple(int(d) for d in enc[2])
        target = self.targets.get(path) if self.targets is not None else None
        if tag == "T":
            chunks = self.chunks(enc[3])
            flags = int(enc[4])
            if (target is not None and target.device.type == "cpu" and target.is_contiguous()
                    and target.dtype == dtype and tuple(target.shape) == shape):
                self.fills.append(FillJob(byte_view(target.detach()), chunks, path))
                return target
            t = torch.empty(shape, dtype=dtype)
            self.fills.append(FillJob(byte_view(t), chunks, path))
        else:  # "V": a view into a shared storage
            stride = tuple(int(s) for s in enc[3])
            offset, index, flags = int(enc[4]), int(enc[5]), int(enc[6])
            buf = self.storage(index, path)
            t = torch.empty(0, dtype=dtype)
            t.set_(buf.untyped_storage(), offset, shape, stride)
        if target is not None:
            self.copies.append((target, t))
            return target
        if flags & FLAG_PARAMETER:
            return torch.nn.Parameter(t, requires_grad=bool(flags & FLAG_REQUIRES_GRAD))
        if flags & FLAG_REQUIRES_GRAD:
            t.requires_grad_(True)
        return t

    def unpickle(self, data: bytes, path: KeyPath) -> Any:
        try:
            return pickle.loads(data)  # noqa: S301 - explicit opt-in
        except (ImportError, AttributeError) as exc:
            raise UnsupportedObjectError(
                f"value at {format_path(path)} in {self.name} was pickled from a class this process cannot "
                f"import: {type(exc).__name__}: {exc}"
            ) from None
        except Exception as exc:  # noqa: BLE001 - unpickling runs the stored object's code
            raise ManifestCorruptError(
                f"{self.name}: the pickled value at {format_path(path)} does not unpickle: {type(exc).__name__}: {exc}"
            ) from None

    def value(self, enc: Any, path: KeyPath) -> Any:
        tag = enc[0]
        if tag == "N":
            return None
        if tag == "b":
            return bool(enc[1])
        if tag == "i":
            return int(enc[1])
        if tag == "I":
            return int(enc[1])
        if tag == "f":
            return float(enc[1])
        if tag == "c":
            return complex(enc[1], enc[2])
        if tag == "s":
            return bytes(enc[1]).decode("utf-8", "surrogatepass")
        if tag == "y":
            return bytearray(enc[1]) if enc[2] else bytes(enc[1])
        if tag == "Y":
            data = self.read_blob(self.chunks(enc[1]), path)
            return bytearray(data) if enc[2] else bytes(data)
        if tag in ("T", "V"):
            return self.tensor(enc, path)
        if tag == "A":
            arr = np.empty(tuple(int(d) for d in enc[2]), dtype=ARRAY_DTYPES[enc[1]])
            if arr.size:
                self.fills.append(FillJob(memoryview(arr.reshape(-1).view(np.uint8)), self.chunks(enc[3]), path))  # type: ignore[arg-type]  # numpy arrays are buffers
            return arr
        if tag == "n":
            return np.frombuffer(enc[2], dtype=ARRAY_DTYPES[enc[1]])[0]
        if tag == "Z":
            return torch.Size(int(d) for d in enc[1])
        if tag == "D":
            return _dtype_from_name(enc[1], f"{self.name} at {format_path(path)}")
        if tag == "E":
            return torch.device(enc[1])
        if tag in ("d", "o"):
            out: dict[Any, Any] = {} if tag == "d" else OrderedDict()
            for key_enc, val_enc in enc[1]:
                key = self.value(key_enc, path)
                out[key] = self.value(val_enc, (*path, key))
            if tag == "o":
                meta = self.value(enc[2], (*path, "_metadata"))
                if meta is not None:
                    out._metadata = meta  # type: ignore[attr-defined]
            return out
        if tag == "l":
            return [self.value(v, (*path, i)) for i, v in enumerate(enc[1])]
        if tag == "t":
            return tuple(self.value(v, (*path, i)) for i, v in enumerate(enc[1]))
        if tag == "P":
            if not self.allow_pickle:
                raise PickleRequiredError(
                    f"value at {format_path(path)} in {self.name} was stored with pickle; "
                    "pass allow_pickle=True to load it (only for snapshots you trust)"
                )
            return self.unpickle(self.read_blob(self.chunks(enc[1]), path), path)
        raise ManifestCorruptError(f"{self.name}: unknown value tag {tag!r} at {format_path(path)}")


def decode_state(
    tree: Any,
    storages: list[Any],
    *,
    allow_pickle: bool,
    read_blob: Callable[[list[ChunkId], KeyPath], bytes],
    name: str,
    targets: dict[KeyPath, torch.Tensor] | None = None,
    chunk_size: int | None = None,
) -> Decoded:
    """Rebuild the value; tensor bytes are not read here but returned as fill jobs.

    The tree is checked in full first (``cas.tree.check_tree``, at the snapshot's ``chunk_size``
    when given), so nothing is allocated from a size its chunk list does not bear out.
    """
    check_tree(tree, storages, name, chunk_size)
    dec = _Decoder(storages, allow_pickle, read_blob, targets, name)
    try:
        value = dec.value(tree, ())
    except (PickleRequiredError, ManifestCorruptError, UnsupportedObjectError):
        raise
    except (KeyError, IndexError, TypeError, ValueError, AttributeError, RuntimeError, RecursionError,
            OverflowError) as exc:
        raise ManifestCorruptError(f"{name} is malformed: {type(exc).__name__}: {exc}") from None
    return Decoded(value, dec.fills, dec.copies)


class LoadResult(NamedTuple):
    """What ``load_into(..., strict=False)`` could not match, as ``load_state_dict`` reports it."""

    missing_keys: list[str]
    unexpected_keys: list[str]


def cast_floats(obj: Any, dtype: torch.dtype, _memo: dict[tuple[Any, ...], Any] | None = None) -> Any:
    """``obj`` with every floating-point tensor converted to ``dtype`` (nn.Parameters stay parameters).

    Tensors that are the same view of one storage (tied weights) stay one tensor after the cast."""
    if not isinstance(dtype, torch.dtype):
        raise UsageError(f"dtype must be a torch.dtype such as torch.bfloat16, not {dtype!r}")
    if not dtype.is_floating_point:
        raise UsageError(f"dtype casts floating-point tensors: it must be a floating-point dtype, not {dtype}")
    memo: dict[tuple[Any, ...], Any] = {} if _memo is None else _memo
    if isinstance(obj, torch.Tensor):
        if not obj.is_floating_point() or obj.dtype == dtype:
            return obj
        key = (obj.untyped_storage().data_ptr(), obj.storage_offset(), tuple(obj.shape), obj.stride(), obj.dtype,
               isinstance(obj, torch.nn.Parameter))
        if obj.numel() and key in memo:
            return memo[key]
        cast = obj.detach().to(dtype)
        out = torch.nn.Parameter(cast, requires_grad=obj.requires_grad) if isinstance(obj, torch.nn.Parameter) else cast
        memo[key] = out
        return out
    if isinstance(obj, dict):
        out_dict = type(obj)() if type(obj) in (dict, OrderedDict) else {}
        for k, v in obj.items():
            out_dict[k] = cast_floats(v, dtype, memo)
        meta = getattr(obj, "_metadata", None)
        if meta is not None:
            out_dict._metadata = meta  # type: ignore[attr-defined]
        return out_dict
    if type(obj) in (list, tuple):
        return type(obj)(cast_floats(v, dtype, memo) for v in obj)
    return obj


def collect_targets(obj: Any, path: KeyPath = ()) -> dict[KeyPath, torch.Tensor]:
    """Every tensor in a module's state dict or a nested state dict, by key path (for load_into)."""
    if isinstance(obj, torch.nn.Module):
        obj = obj.state_dict(keep_vars=True)
    found: dict[KeyPath, torch.Tensor] = {}
    if isinstance(obj, torch.Tensor):
        found[path] = obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            found.update(collect_targets(v, (*path, k)))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            found.update(collect_targets(v, (*path, i)))
    return found
