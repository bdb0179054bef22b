"""Checkpoint files in and out: .pt/.pth (torch, weights_only) and .safetensors."""

from __future__ import annotations

import contextlib
import os
import re
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from cas.errors import NotACheckpointError, OutputExistsError, UnsupportedObjectError, UsageError
from cas.store import fsync_dir

TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
SAFETENSORS_SUFFIX = ".safetensors"
CHECKPOINT_SUFFIXES = (*TORCH_SUFFIXES, SAFETENSORS_SUFFIX)
#: what a weights_only load may rebuild besides tensors: numpy arrays and dtypes (no code runs)
NUMPY_SAFE_GLOBALS: list[Any] = [
    np._core.multiarray._reconstruct,  # type: ignore[attr-defined]
    np.ndarray, np.dtype, type(np.dtype(np.uint32)),
    *{type(np.dtype(c)) for c in "?bBhHiIlLqQefdgFDG"},
]


def _first_line(exc: BaseException) -> str:
    """The line of a torch.load error a person needs: for a weights_only refusal, the class it refused."""
    text = str(exc).strip()
    found = re.search(r"(?:Unsupported global: GLOBAL |Unsupported operand \S+ |global )([A-Za-z_][\w.]*)", text)
    first = text.splitlines()[0] if text else type(exc).__name__
    if found and found.group(1) not in first:
        return f"{first.rstrip('.')}: it needs the class {found.group(1)}"
    return first


def read_checkpoint(path: Path, allow_pickle: bool = False) -> tuple[Any, dict[str, Any]]:
    """Load one checkpoint file; returns its state and a description for snapshot metadata.

    ``allow_pickle``: torch files load with ``weights_only=False`` (their pickle runs: trusted files only).
    """
    if not path.exists():
        raise NotACheckpointError(f"{path} does not exist")
    if path.is_dir():
        raise NotACheckpointError(f"{path} is a directory")
    suffix = path.suffix.lower()
    if suffix == SAFETENSORS_SUFFIX:
        try:
            with safe_open(str(path), framework="pt") as f:
                header_meta = f.metadata() or {}
                state = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise NotACheckpointError(f"{path} is not a readable .safetensors file: {exc}") from None
        return state, {"file": path.name, "format": "safetensors", "safetensors_metadata": header_meta}
    if suffix in TORCH_SUFFIXES:
        try:
            with torch.serialization.safe_globals(NUMPY_SAFE_GLOBALS):  # numpy arrays (e.g. RNG states)
                state = torch.load(path, map_location="cpu", weights_only=not allow_pickle, mmap=False)
        except Exception as exc:  # noqa: BLE001 - torch.load raises anything on a malformed pickle
            if allow_pickle:
                raise NotACheckpointError(f"{path} does not load with torch.load: {_first_line(exc)}") from None
            raise NotACheckpointError(
                f"{path} is not a PyTorch checkpoint that loads with weights_only=True: {_first_line(exc)}; "
                "`cas save` without --state keeps its bytes, --allow-pickle loads it (trusted files only)"
            ) from None
        return state, {"file": path.name, "format": "torch"}
    raise NotACheckpointError(
        f"{path}: unknown checkpoint type {suffix or '(no extension)'}; "
        f"expected one of {', '.join(CHECKPOINT_SUFFIXES)}"
    )


def import_paths(paths: list[Path], allow_pickle: bool = False) -> tuple[Any, dict[str, Any]]:
    """One file -> its state; several files or a directory -> {relative path: state}."""
    files: list[tuple[str, Path]] = []
    for path in paths:
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in CHECKPOINT_SUFFIXES)
            if not found:
                raise NotACheckpointError(f"{path} holds no checkpoint files ({', '.join(CHECKPOINT_SUFFIXES)})")
            files.extend((str(p.relative_to(path)), p) for p in found)
        else:
            files.append((path.name, path))
    if len(files) == 1 and not paths[0].is_dir():
        return read_checkpoint(files[0][1], allow_pickle)
    names = [name for name, _ in files]
    if len(set(names)) != len(names):
        raise UsageError("two inputs have the same name; save them as separate snapshots or from one directory")
    state: dict[str, Any] = {}
    sources = []
    for name, path in files:
        state[name], source = read_checkpoint(path, allow_pickle)
        sources.append(source)
    return state, {"files": sources}


def export_file(
    state: Any, out: Path, *, force: bool, metadata: dict[str, Any] | None = None, fmt: str | None = None
) -> None:
    """Write ``state`` as .pt or .safetensors (``fmt``, else by extension): temp file in the same
    directory, fsync, rename. A file that cannot be written is one UsageError naming it."""
    suffix = f".{fmt}" if fmt is not None else out.suffix.lower()
    if fmt == "pt":
        suffix = ".pt"
    if out.is_dir():
        raise UsageError(f"{out} is a directory; name the file to write (e.g. {out / 'restored.pt'})")
    if suffix not in CHECKPOINT_SUFFIXES:
        raise UsageError(f"cannot tell the output format of {out}: use a .pt or .safetensors name, or --format")
    if os.path.lexists(out) and not force:
        raise OutputExistsError(f"{out} exists; pass --force to overwrite it")
    if not out.parent.is_dir():
        raise UsageError(f"directory {out.parent} does not exist")
    temp = out.parent / f".{out.name}.{uuid.uuid4().hex}.tmp"
    try:
        if suffix == SAFETENSORS_SUFFIX:
            _write_safetensors(state, temp, metadata or {})
        else:
            torch.save(state, temp)
        with open(temp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(temp, out)
        fsync_dir(out.parent)
    except (OSError, RuntimeError) as exc:  # torch.save reports an unwritable path as RuntimeError
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else _first_line(exc)
        raise UsageError(f"cannot write {out}: {reason}") from None
    finally:
        with contextlib.suppress(OSError):
            temp.unlink(missing_ok=True)


def _write_safetensors(state: Any, path: Path, metadata: dict[str, Any]) -> None:
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise UnsupportedObjectError(
            "this snapshot is not a flat dict of named tensors, which is all .safetensors can hold; restore to .pt"
        )
    source = metadata.get("source")
    header = source.get("safetensors_metadata") if isinstance(source, dict) else None
    # safetensors cannot express shared storage: shared tensors are written as copies.
    seen: set[int] = set()
    tensors: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        ptr = tensor.untyped_storage().data_ptr()
        tensors[key] = (tensor.clone() if ptr in seen and tensor.numel() else tensor).contiguous()
        seen.add(ptr)
    save_file(tensors, str(path), metadata=header if isinstance(header, dict) and header else None)
