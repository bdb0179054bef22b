"""Host staging: a point-in-time copy of a state dict's tensors into reused host buffers.

An async save must not see the model change under it, so the tensors are copied
once (a memcpy, or a device-to-host copy into pinned memory on CUDA) before the
save runs in the background. Buffers are kept between saves and reused when the
shapes match, so steady-state staging allocates nothing. Tensors that share a
storage are staged as one storage with views into it, so ties survive.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from typing import Any

import torch

Key = tuple[Any, ...]


class HostStager:
    def __init__(self, pin_memory: bool | None = None) -> None:
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self._buffers: dict[Key, torch.Tensor] = {}
        self.staged_bytes = 0

    def _buffer(self, key: Key, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        buf = self._buffers.get(key)
        if buf is None or tuple(buf.shape) != shape or buf.dtype != dtype:
            buf = torch.empty(shape, dtype=dtype, pin_memory=self.pin_memory)
            self._buffers[key] = buf
        return buf

    def stage(self, state: Any) -> Any:
        """A copy of ``state`` whose tensors live in this stager's host buffers."""
        tensors: list[tuple[Key, torch.Tensor]] = []
        _collect(state, (), tensors)
        groups: dict[tuple[str, int], list[int]] = {}
        for i, (_key, t) in enumerate(tensors):
            if t.layout == torch.strided and t.device.type != "meta" and not (t.is_conj() or t.is_neg()):
                st = t.untyped_storage()
                if st.nbytes() > 0:
                    groups.setdefault((str(t.device), st.data_ptr()), []).append(i)
        staged: dict[Key, torch.Tensor] = {}
        self.staged_bytes = 0
        copied_device = False
        with torch.no_grad():
            for members in groups.values():
                if len(members) < 2:
                    continue
                first_key, first = tensors[members[0]]
                storage = first.untyped_storage()
                buf = self._buffer(("storage", *first_key), (storage.nbytes(),), torch.uint8)
                src = torch.empty(0, dtype=torch.uint8, device=first.device)
                src.set_(storage, 0, (storage.nbytes(),), (1,))
                buf.copy_(src, non_blocking=first.device.type == "cuda")
                copied_device |= first.device.type == "cuda"
                self.staged_bytes += storage.nbytes()
                for i in members:
                    key, t = tensors[i]
                    view = torch.empty(0, dtype=t.dtype)
                    view.set_(buf.untyped_storage(), t.storage_offset(), t.shape, t.stride())
                    staged[key] = _like(t, view)
            for key, t in tensors:
                if key in staged:
                    continue
                if t.layout != torch.strided or t.device.type == "meta" or t.is_quantized:
                    staged[key] = t  # the encoder reports these with a clear error
                    continue
                src = t.detach().resolve_conj().resolve_neg()
                buf = self._buffer(key, tuple(src.shape), src.dtype)
                buf.copy_(src, non_blocking=src.device.type == "cuda")
                copied_device |= src.device.type == "cuda"
                self.staged_bytes += buf.numel() * buf.element_size()
                staged[key] = _like(t, buf)
        if copied_device:
            torch.cuda.synchronize()
        return _rebuild(state, (), staged)


def _like(original: torch.Tensor, data: torch.Tensor) -> torch.Tensor:
    if isinstance(original, torch.nn.Parameter):
        return torch.nn.Parameter(data, requires_grad=original.requires_grad)
    return data


def _collect(obj: Any, key: Key, out: list[tuple[Key, torch.Tensor]]) -> None:
    if isinstance(obj, torch.Tensor):
        out.append((key, obj))
    elif isinstance(obj, dict):
        for k, v in obj.items():
            _collect(v, (*key, k), out)
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _collect(v, (*key, i), out)


def _rebuild(obj: Any, key: Key, staged: dict[Key, torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        return staged[key]
    if type(obj) in (dict, OrderedDict):
        out = type(obj)((k, _rebuild(v, (*key, k), staged)) for k, v in obj.items())
        if hasattr(obj, "_metadata"):
            out._metadata = copy.deepcopy(obj._metadata)
        return out
    if type(obj) is list:
        return [_rebuild(v, (*key, i), staged) for i, v in enumerate(obj)]
    if type(obj) is tuple:
        return tuple(_rebuild(v, (*key, i), staged) for i, v in enumerate(obj))
    return copy.deepcopy(obj)
