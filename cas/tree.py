"""Walking an encoded state-dict tree (the value of a tree node): pure functions, no torch.

The encoding itself (Python values <-> tagged lists) lives in ``cas.statedict``; these
helpers only read the tagged lists, so verify, GC, diff and the CLI listing run
without importing torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cas.ids import ChunkId
from cas.manifest import split_chunk_ids

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

#: bytes per element of the torch dtypes a tree may name (numpy names for arrays go through numpy)
TORCH_ITEMSIZE = {
    "bool": 1, "uint8": 1, "int8": 1, "float8_e4m3fn": 1, "float8_e5m2": 1, "float8_e4m3fnuz": 1,
    "float8_e5m2fnuz": 1, "float8_e8m0fnu": 1, "int16": 2, "uint16": 2, "float16": 2, "bfloat16": 2,
    "complex32": 4, "int32": 4, "uint32": 4, "float32": 4, "int64": 8, "uint64": 8, "float64": 8,
    "complex64": 8, "complex128": 16,
}


def format_path(path: KeyPath) -> str:
    return "/".join(str(k) for k in path) if path else "<root>"


def tensor_leaves(tree: Any, path: KeyPath = ()) -> list[tuple[KeyPath, list[Any]]]:
    """(path, encoding) of every tensor/array leaf of an encoded tree, in order (no data read)."""
    out: list[tuple[KeyPath, list[Any]]] = []
    _walk(tree, path, out)
    return out


def _walk(enc: Any, path: KeyPath, out: list[tuple[KeyPath, list[Any]]]) -> None:
    tag = enc[0]
    if tag in ("T", "V", "A"):
        out.append((path, enc))
    elif tag in ("d", "o"):
        for key_enc, val_enc in enc[1]:
            _walk(val_enc, (*path, plain_key(key_enc)), out)
    elif tag in ("l", "t"):
        for i, v in enumerate(enc[1]):
            _walk(v, (*path, i), out)


def plain_key(enc: Any) -> Any:
    tag = enc[0]
    if tag == "s":
        return bytes(enc[1]).decode("utf-8", "surrogatepass")
    if tag in ("i", "f", "b"):
        return enc[1]
    if tag == "N":
        return None
    if tag == "t":
        return tuple(plain_key(v) for v in enc[1])
    if tag == "I":
        return int(enc[1])
    return bytes(enc[1]) if tag == "y" else repr(enc)


def blob_leaves(tree: Any, path: KeyPath = ()) -> list[tuple[KeyPath, bytes]]:
    """(path, raw chunk-id list) of every chunked leaf (tensors, arrays, big bytes, pickles)."""
    out: list[tuple[KeyPath, bytes]] = []
    _walk_blobs(tree, path, out)
    return out


def _walk_blobs(enc: Any, path: KeyPath, out: list[tuple[KeyPath, bytes]]) -> None:
    tag = enc[0]
    if tag in ("T", "A"):
        out.append((path, enc[3]))
    elif tag in ("Y", "P"):
        out.append((path, enc[1]))
    elif tag in ("d", "o"):
        for key_enc, val_enc in enc[1]:
            _walk_blobs(val_enc, (*path, plain_key(key_enc)), out)
    elif tag in ("l", "t"):
        for i, v in enumerate(enc[1]):
            _walk_blobs(v, (*path, i), out)


def subtree(enc: Any, path: KeyPath, name: str) -> Any:
    """The encoded value at ``path`` (dict keys / list indexes) inside an encoded tree."""
    for depth, key in enumerate(path):
        tag = enc[0]
        if tag in ("d", "o"):
            for key_enc, val_enc in enc[1]:
                if plain_key(key_enc) == key or str(plain_key(key_enc)) == str(key):
                    enc = val_enc
                    break
            else:
                raise KeyError(f"{name} has no key {format_path(path[: depth + 1])}")
        elif tag in ("l", "t") and str(key).isdigit() and int(key) < len(enc[1]):
            enc = enc[1][int(key)]
        else:
            raise KeyError(f"{name} has no key {format_path(path[: depth + 1])}")
    return enc


def base_candidates(root: Any, storages: list[Any], name: str) -> dict[KeyPath, tuple[tuple[Any, ...], list[ChunkId]]]:
    """Per blob path of a (parent) tree: its signature and chunk ids, matched against a new save's blobs."""
    out: dict[KeyPath, tuple[tuple[Any, ...], list[ChunkId]]] = {}
    seen_storages: set[int] = set()
    for path, enc in tensor_leaves(root):
        tag = enc[0]
        if tag in ("T", "A"):
            out[path] = ((tag, enc[1], tuple(int(d) for d in enc[2])), split_chunk_ids(enc[3], name))
        elif tag == "V" and int(enc[5]) not in seen_storages:  # a storage is keyed by its first view's path
            index = int(enc[5])
            seen_storages.add(index)
            nbytes, raw = storages[index]
            out[path] = (("S", enc[1], int(nbytes)), split_chunk_ids(raw, name))
    return out


def leaf_nbytes(enc: list[Any]) -> int:
    """Bytes of a tensor or array leaf, from its dtype and shape alone."""
    n = 1
    for d in enc[2]:
        n *= int(d)
    if enc[0] == "A":
        return n * np.dtype(enc[1]).itemsize
    size = TORCH_ITEMSIZE.get(str(enc[1]))
    if size is None:
        import torch  # noqa: PLC0415 - only for a dtype newer than this table

        size = torch.empty(0, dtype=getattr(torch, enc[1])).element_size()
    return n * size
