"""Property tests: random structures and tensors round-trip exactly; identical data is stored once."""

from __future__ import annotations

import itertools
import random
import struct
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cas import Repository
from tests.helpers import assert_same

CHUNK = 4096
SETTINGS = settings(
    max_examples=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


# --------------------------------------------------------------------------- helpers


def _maybe(name: str) -> list[torch.dtype]:
    dtype = getattr(torch, name, None)
    return [dtype] if isinstance(dtype, torch.dtype) else []


DTYPES = [
    torch.float32, torch.float16, torch.bfloat16, torch.float64,
    *[d for n in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e8m0fnu")
      for d in _maybe(n)],
    torch.complex64, torch.complex128, torch.complex32, torch.bool,
    torch.int8, torch.int16, torch.int32, torch.int64,
    torch.uint8, torch.uint16, torch.uint32, torch.uint64,
]


def itemsize(dtype: torch.dtype) -> int:
    return torch.empty(0, dtype=dtype).element_size()


def random_tensor(dtype: torch.dtype, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Random bytes viewed as ``dtype``: every bit pattern, NaN payloads included."""
    numel = int(np.prod(shape, dtype=np.int64))
    if numel == 0:
        return torch.empty(shape, dtype=dtype)
    raw = np.frombuffer(np.random.default_rng(seed).bytes(numel * itemsize(dtype)), dtype=np.uint8).copy()
    if dtype == torch.bool:
        raw &= 1  # bool bytes other than 0/1 are undefined behaviour in torch kernels
    return torch.from_numpy(raw).view(dtype).reshape(shape)


def _repo(tmp_path_factory: pytest.TempPathFactory, name: str) -> Any:
    repo = Repository.init(Path(tmp_path_factory.mktemp(name)) / "repo", chunk_size=CHUNK)
    yield repo
    repo.close()


@pytest.fixture(scope="module")
def plain_repo(tmp_path_factory: pytest.TempPathFactory) -> Any:
    yield from _repo(tmp_path_factory, "plain")


@pytest.fixture(scope="module")
def tensor_repo(tmp_path_factory: pytest.TempPathFactory) -> Any:
    yield from _repo(tmp_path_factory, "tensors")


@pytest.fixture(scope="module")
def dedup_repo(tmp_path_factory: pytest.TempPathFactory) -> Any:
    yield from _repo(tmp_path_factory, "dedup")


# --------------------------------------------------------------------------- (a) plain structures

texts = st.text(alphabet=st.characters() | st.characters(codec=None, categories=["Cs"]), max_size=12)
keys = st.one_of(
    texts,
    st.integers(),
    st.integers(min_value=-(2**100), max_value=2**100),
    st.booleans(),
    st.none(),
    st.floats(allow_nan=False),
    st.binary(max_size=12),
    st.tuples(st.integers(-5, 5), st.text(max_size=3), st.none() | st.booleans()),
)
big_bytes = st.builds(
    lambda n, seed, as_array: (bytearray if as_array else bytes)(random.Random(seed).randbytes(n)),
    st.integers(4090, 3 * CHUNK + 100),
    st.integers(0, 2**32),
    st.booleans(),
)
leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(2**200), max_value=2**200),
    st.sampled_from([2**63 - 1, 2**63, 2**64 - 1, 2**64, -(2**63), -(2**63) - 1]),
    st.floats(),
    st.floats(width=32),
    st.sampled_from([-0.0, float("nan"), struct.unpack("<d", bytes.fromhex("0100000000000f7f"))[0]]),
    st.builds(lambda bits: struct.unpack("<d", struct.pack("<Q", bits))[0], st.integers(0, 2**64 - 1)),
    st.complex_numbers(),
    texts,
    st.binary(max_size=64),
    st.builds(bytearray, st.binary(max_size=16)),
    big_bytes,
)


def _ordered(pairs: list[tuple[Any, Any]], meta: dict[str, Any] | None) -> OrderedDict[Any, Any]:
    out: OrderedDict[Any, Any] = OrderedDict(pairs)
    if meta is not None:
        out._metadata = meta  # type: ignore[attr-defined]
    return out


structures = st.recursive(
    leaves,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.lists(children, max_size=4).map(tuple),
        st.dictionaries(keys, children, max_size=4),
        st.builds(
            _ordered,
            st.dictionaries(keys, children, max_size=4).map(lambda d: list(d.items())),
            st.none() | st.dictionaries(st.text(max_size=4), st.dictionaries(st.just("version"), st.integers(0, 3))),
        ),
    ),
    max_leaves=24,
)


@SETTINGS
@given(value=structures)
def test_plain_structures_roundtrip(plain_repo: Repository, value: Any) -> None:
    sd = {"value": value}
    snap = plain_repo.save(sd)
    assert_same(sd, plain_repo.load(snap.id))


# --------------------------------------------------------------------------- (b) tensors

shapes = st.lists(st.integers(0, 70), min_size=0, max_size=3).map(tuple)
layouts = st.sampled_from(["contiguous", "transpose", "stride"])


@st.composite
def tensors(draw: st.DrawFn) -> torch.Tensor:
    dtype = draw(st.sampled_from(DTYPES))
    shape = draw(shapes)
    layout = draw(layouts)
    seed = draw(st.integers(0, 2**32 - 1))
    if layout == "transpose" and len(shape) >= 2:
        return random_tensor(dtype, shape[::-1], seed).transpose(0, len(shape) - 1)
    if layout == "stride" and len(shape) >= 1:
        return random_tensor(dtype, (shape[0] * 2, *shape[1:]), seed)[::2]
    return random_tensor(dtype, shape, seed)


@SETTINGS
@given(tensor_list=st.lists(tensors(), min_size=1, max_size=3))
def test_random_tensors_roundtrip(tensor_repo: Repository, tensor_list: list[torch.Tensor]) -> None:
    sd = {f"t{i}": t for i, t in enumerate(tensor_list)}
    snap = tensor_repo.save(sd)
    out = tensor_repo.load(snap.id)
    assert_same(sd, out)
    for name, t in sd.items():
        assert out[name].shape == t.shape
        assert out[name].dtype == t.dtype


@st.composite
def shared_views(draw: st.DrawFn) -> dict[str, torch.Tensor]:
    """Several strided views of one random storage (the base itself only sometimes in the dict)."""
    dtype = draw(st.sampled_from([d for d in DTYPES if not d.is_complex]))
    n = draw(st.integers(1, 3 * CHUNK // itemsize(dtype)))
    base = random_tensor(dtype, (n,), draw(st.integers(0, 2**32 - 1)))
    out: dict[str, torch.Tensor] = {"base": base} if draw(st.booleans()) else {}
    for i in range(draw(st.integers(2 - len(out), 4))):
        start = draw(st.integers(0, n - 1))
        step = draw(st.integers(1, 5))
        view = base[start::step]
        if view.numel() >= 4 and view.numel() % 2 == 0 and draw(st.booleans()):
            view = view.view(2, -1).t()
        out[f"v{i}"] = view
    return out


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sd=shared_views())
def test_shared_storage_views_roundtrip(tensor_repo: Repository, sd: dict[str, torch.Tensor]) -> None:
    snap = tensor_repo.save(sd)
    out = tensor_repo.load(snap.id)
    assert_same(sd, out)
    ptrs = {out[name].untyped_storage().data_ptr() for name in sd}
    assert len(ptrs) == 1, "views of one storage must come back sharing one storage"
    for name, t in sd.items():
        assert out[name].storage_offset() == t.storage_offset(), name
        assert out[name].stride() == t.stride(), name


# --------------------------------------------------------------------------- (c) dedup

DEDUP_DTYPES = [d for d in DTYPES if d != torch.bool]  # masked bools compress; everything else is random
OVERHEAD = 2048  # snapshot node + tree node + pack header/footer
_fresh_seeds = itertools.count(10**12)  # never-seen data for the changed tensor, whatever hypothesis replays


@st.composite
def dedup_tensors(draw: st.DrawFn) -> torch.Tensor:
    dtype = draw(st.sampled_from(DEDUP_DTYPES))
    size = itemsize(dtype)
    numel = draw(st.integers(256 // size, 4 * CHUNK // size))
    seed = draw(st.integers(0, 2**32 - 1))
    if numel % 4 == 0 and draw(st.booleans()):
        return random_tensor(dtype, (4, numel // 4), seed)
    return random_tensor(dtype, (numel,), seed)


@settings(SETTINGS, max_examples=30)
@given(tensor_list=st.lists(dedup_tensors(), min_size=1, max_size=4), data=st.data())
def test_dedup_identical_and_one_changed(dedup_repo: Repository, tensor_list: list[torch.Tensor], data: Any) -> None:
    repo = dedup_repo
    sd: dict[str, Any] = {f"layer{i}.weight": t for i, t in enumerate(tensor_list)}
    sd["step"] = 1

    repo.save(sd)
    stored_1 = repo.stats().stored_bytes
    second = repo.save(sd)
    stored_2 = repo.stats().stored_bytes
    assert second.bytes_added == 0
    assert 0 <= stored_2 - stored_1 < OVERHEAD, f"identical save grew the repository by {stored_2 - stored_1} bytes"
    assert_same(sd, repo.load(second.id))

    victim = data.draw(st.sampled_from([k for k in sd if k != "step"]), label="changed tensor")
    old = sd[victim]
    changed = dict(sd)
    changed[victim] = random_tensor(old.dtype, tuple(old.shape), next(_fresh_seeds))
    raw = old.numel() * old.element_size()
    third = repo.save(changed)
    stored_3 = repo.stats().stored_bytes
    growth = stored_3 - stored_2
    assert 0.5 * raw <= growth <= 1.5 * raw + OVERHEAD, f"changing {raw} random bytes grew the repository by {growth}"
    assert 0.5 * raw <= third.bytes_added <= 1.5 * raw + OVERHEAD
    assert_same(changed, repo.load(third.id))
    assert_same(sd, repo.load(second.id))
