"""Round trips through a real repository must give back bit-identical state dicts.

Every comparison here is exact: tensors by dtype, shape and raw bytes; floats by their
IEEE-754 bit pattern (so NaN payloads and -0.0 count); containers by type, order and keys.
"""

from __future__ import annotations

import enum
import struct
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import cas
from cas import Repository
from tests.helpers import assert_same, float_bits, tensor_bytes

CHUNK = 4096  # the smallest chunk size: multi-chunk tensors stay cheap


# --------------------------------------------------------------------------- helpers


def random_tensor(dtype: torch.dtype, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """A tensor of ``dtype`` whose bytes are random (NaN payloads, subnormals, every bit pattern)."""
    itemsize = torch.empty(0, dtype=dtype).element_size()
    numel = 1
    for d in shape:
        numel *= d
    if numel == 0:
        return torch.empty(shape, dtype=dtype)
    raw = np.frombuffer(np.random.default_rng(seed).bytes(numel * itemsize), dtype=np.uint8).copy()
    if dtype == torch.bool:
        raw &= 1  # a bool byte other than 0/1 is undefined behaviour in torch kernels
    return torch.from_numpy(raw).view(dtype).reshape(shape)


def packs_listing(repo: Repository) -> list[tuple[str, int]]:
    return sorted((str(p.relative_to(repo.path)), p.stat().st_size) for p in (repo.path / "packs").rglob("*"))


def repo_state(repo: Repository) -> tuple[Any, ...]:
    refs = sorted(p.name for p in (repo.path / "refs").rglob("*") if p.is_file())
    return [(s.id, s.ref) for s in repo.snapshots()], packs_listing(repo), refs


def _maybe(name: str) -> list[torch.dtype]:
    dtype = getattr(torch, name, None)
    return [dtype] if isinstance(dtype, torch.dtype) else []


FLOAT8 = [
    d
    for name in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e8m0fnu")
    for d in _maybe(name)
]
TENSOR_DTYPES = [
    torch.float32, torch.float16, torch.bfloat16, torch.float64, *FLOAT8, *_maybe("float4_e2m1fn_x2"),
    torch.complex64, torch.complex128, torch.complex32, torch.bool,
    torch.int8, torch.int16, torch.int32, torch.int64,
    torch.uint8, torch.uint16, torch.uint32, torch.uint64,
]


@pytest.fixture
def repo(tmp_path: Path) -> Any:
    r = Repository.init(tmp_path / "repo", chunk_size=CHUNK)
    yield r
    r.close()


def roundtrip(repo: Repository, obj: Any, **kwargs: Any) -> Any:
    snap = repo.save(obj, **kwargs)
    return repo.load(snap.id, **kwargs)


# --------------------------------------------------------------------------- plain values

SNAN = struct.unpack("<d", bytes.fromhex("0100000000000f7f"))[0]  # signalling NaN with a payload
NEG_QNAN = struct.unpack("<d", bytes.fromhex("efbeadde0000f8ff"))[0]  # negative quiet NaN with a payload


def test_plain_values_roundtrip(repo: Repository) -> None:
    sd = {
        "none": None,
        "true": True,
        "false": False,
        "ints": [0, 1, -1, 2**63 - 1, -(2**63), 2**63, 2**64 - 1, 2**64, -(2**63) - 1, 2**200 + 7, -(2**300)],
        "floats": [
            0.0, -0.0, 1.5, float("inf"), float("-inf"), float("nan"), SNAN, NEG_QNAN, 5e-324, 1.7976931348623157e308
        ],
        "complex": [1 + 2j, complex(-0.0, float("nan")), complex(float("inf"), -0.0)],
        "str": ["", "ascii", "héllo wörld", "日本語", "emoji 🎉", "nul \x00 byte", "lone \ud800 surrogate"],
        "bytes": [b"", b"\x00\xff", bytes(range(256))],
        "bytearray": bytearray(b"mutable"),
        "tuple": (1, "a", (2.5, None), []),
        "empty": [{}, [], (), OrderedDict()],
        "nested": {"a": {"b": {"c": [1, {"d": (None,)}]}}},
        0: "int key",
        -5: "negative int key",
        2**70: "huge int key",
        1.25: "float key",
        None: "None key",
        True: "bool key",
        ("tuple", 1, None, (2.5, False)): "tuple key",
        b"raw": "bytes key",
    }
    out = roundtrip(repo, sd)
    assert_same(sd, out)
    assert float_bits(out["floats"][1]) == float_bits(-0.0)
    assert float_bits(out["floats"][6]) == float_bits(SNAN)


def test_bytes_small_and_large(repo: Repository) -> None:
    rng = np.random.default_rng(1)
    sd = {
        "inline_max": rng.bytes(4096),
        "just_over": rng.bytes(4097),
        "multi_chunk": rng.bytes(5 * CHUNK + 123),
        "zeros_big": bytes(3 * CHUNK),
        "ba_small": bytearray(rng.bytes(10)),
        "ba_big": bytearray(rng.bytes(2 * CHUNK + 1)),
        "big_in_list": [rng.bytes(9000), b"x"],
    }
    out = roundtrip(repo, sd)
    assert_same(sd, out)


def test_reopened_repository_loads_identically(tmp_path: Path) -> None:
    path = tmp_path / "repo"
    sd = {"w": random_tensor(torch.float32, (64, 33), 3), "b": random_tensor(torch.bfloat16, (7,), 4), "n": 5}
    with Repository.init(path, chunk_size=CHUNK) as repo:
        snap = repo.save(sd, tag="first")
    with Repository.open(path) as repo:
        assert_same(sd, repo.load("first"))
        assert_same(sd, repo.load(snap.id))
        assert_same(sd, repo.load("latest"))


# --------------------------------------------------------------------------- tensors


@pytest.mark.parametrize("dtype", TENSOR_DTYPES, ids=str)
def test_tensor_dtypes_roundtrip(repo: Repository, dtype: torch.dtype) -> None:
    itemsize = torch.empty(0, dtype=dtype).element_size()
    sd = {
        "matrix": random_tensor(dtype, (37, 5), 10),
        "scalar": random_tensor(dtype, (), 11),
        "empty": random_tensor(dtype, (0,), 12),
        "empty_2d": random_tensor(dtype, (3, 0), 13),
        "multi_chunk": random_tensor(dtype, ((3 * CHUNK) // itemsize + 7,), 14),
        "exact_chunk": random_tensor(dtype, (CHUNK // itemsize,), 15),
    }
    out = roundtrip(repo, sd)
    assert_same(sd, out)
    assert out["scalar"].dim() == 0


def test_float_specials_in_tensors(repo: Repository) -> None:
    bits = np.array(
        [0x7FC00000, 0xFFC00000, 0x7F800001, 0x7FBFFFFF, 0x80000000, 0x7F800000, 0xFF800000, 0x00000001],
        dtype=np.uint32,
    )
    f32 = torch.from_numpy(bits).view(torch.float32)
    f64 = torch.tensor([float("nan"), SNAN, NEG_QNAN, -0.0], dtype=torch.float64)
    sd = {"f32": f32, "f64": f64, "neg_zero_0d": torch.tensor(-0.0)}
    out = roundtrip(repo, sd)
    assert_same(sd, out)


def test_non_contiguous_tensors(repo: Repository) -> None:
    # each from its own base, so none of them shares a storage with another entry
    sd = {
        "transposed": random_tensor(torch.float32, (40, 50), 1).t(),
        "strided": random_tensor(torch.float64, (30, 40), 2)[::3, 1::4],
        "permuted": random_tensor(torch.int16, (4, 5, 6), 3).permute(2, 0, 1),
        "expanded": random_tensor(torch.bfloat16, (1, 7), 4).expand(9, 7),
        "narrow_big": random_tensor(torch.float32, (64, 64), 5)[:, 3:60],
        "complex_t": random_tensor(torch.complex64, (20, 30), 6).t(),
        "conj_single": torch.randn(5, dtype=torch.complex64).conj(),
    }
    assert not any(sd[k].is_contiguous() for k in ("transposed", "strided", "permuted", "expanded", "narrow_big"))
    out = roundtrip(repo, sd)
    assert_same(sd, out)


SINGLE_ELEMENT_STRIDED = {
    # is_contiguous() is True (size-1 dims ignore their stride), yet the stride is not 1
    "column_of_a_row": lambda: torch.randn(1, 8)[:, 0],  # shape (1,), stride (8,)
    "stepped_slice": lambda: torch.randn(10)[::5][:1],  # shape (1,), stride (5,)
    "one_by_one": lambda: torch.randn(4, 6)[:1, ::3][:, :1],  # shape (1, 1), stride (6, 3)
}


@pytest.mark.parametrize("name", list(SINGLE_ELEMENT_STRIDED))
def test_single_element_tensor_with_odd_stride(repo: Repository, name: str) -> None:
    t = SINGLE_ELEMENT_STRIDED[name]()
    assert t.is_contiguous()
    assert t.stride()[-1] != 1
    sd = {"x": t}
    out = roundtrip(repo, sd)
    assert_same(sd, out)


def test_load_into_single_element_target_with_odd_stride(repo: Repository) -> None:
    repo.save({"x": torch.ones(1)})
    holder = torch.zeros(1, 8)
    target = {"x": holder[:, 0]}  # shape (1,), stride (8,): contiguous by torch's rules
    repo.load_into(target)
    assert target["x"].item() == 1.0
    assert holder[0, 0].item() == 1.0


def test_tied_weights_in_a_dict_share_storage(repo: Repository) -> None:
    a = torch.randn(10, 4)
    sd = {"emb": a, "head": a, "other": torch.randn(3)}
    out = roundtrip(repo, sd)
    assert_same(sd, out)
    x, y = out["emb"], out["head"]
    assert x.untyped_storage().data_ptr() == y.untyped_storage().data_ptr()
    assert out["other"].untyped_storage().data_ptr() != x.untyped_storage().data_ptr()
    x.add_(1.0)  # still one storage: a write through one name shows through the other
    assert torch.equal(x, y)


class TiedLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.block = nn.Linear(16, 16)
        self.norm = nn.LayerNorm(16)
        self.lm_head = nn.Linear(16, 50, bias=False)
        self.lm_head.weight = self.emb.weight


def test_tied_module_weights_share_storage(repo: Repository) -> None:
    torch.manual_seed(0)
    model = TiedLM()
    sd = model.state_dict()
    out = roundtrip(repo, sd)
    assert_same(sd, out)
    x, y = out["emb.weight"], out["lm_head.weight"]
    assert x.untyped_storage().data_ptr() == y.untyped_storage().data_ptr()
    fresh = TiedLM()
    fresh.load_state_dict(out)
    for k, v in model.state_dict().items():
        assert torch.equal(v, fresh.state_dict()[k]), k


def test_views_share_storage_with_base(repo: Repository) -> None:
    base = torch.randn(64)
    sd = {
        "base": base,
        "slice": base[8:24],
        "reshaped_view": base[8:24].view(4, 4),
        "transposed_view": base.view(8, 8).t(),
        "strided_view": base[1::5],
        "as_bytes": base.view(torch.uint8),  # a view of another dtype into the same storage
    }
    out = roundtrip(repo, sd)
    assert_same(sd, out)
    ptr = out["base"].untyped_storage().data_ptr()
    for name, original in sd.items():
        t = out[name]
        assert t.untyped_storage().data_ptr() == ptr, name
        assert t.storage_offset() == original.storage_offset(), name
        assert t.stride() == original.stride(), name
    out["base"][8] = 1234.5
    assert out["slice"][0].item() == 1234.5


def test_complex_real_view_shares_storage(repo: Repository) -> None:
    z = torch.randn(6, dtype=torch.complex64)
    sd = {"z": z, "as_real": torch.view_as_real(z)}
    out = roundtrip(repo, sd)
    assert_same(sd, out)
    assert out["z"].untyped_storage().data_ptr() == out["as_real"].untyped_storage().data_ptr()


LAZY_VIEWS = {
    # lazy views into z's storage: the values they read are not the bytes they point at
    "conj": lambda z: z.conj(),  # conj bit
    "neg_imag_of_conj": lambda z: z.conj().imag,  # neg bit
}


@pytest.mark.parametrize("name", list(LAZY_VIEWS))
def test_lazy_view_sharing_storage_keeps_its_values(repo: Repository, name: str) -> None:
    z = torch.randn(6, dtype=torch.complex64)
    view = LAZY_VIEWS[name](z)
    assert view.is_conj() or view.is_neg()
    sd = {"z": z, "view": view}
    out = roundtrip(repo, sd)
    assert torch.equal(out["z"], z)
    assert torch.equal(out["view"], view), f"{name} view came back with the bytes of its base, not its values"


def test_parameters_and_requires_grad(repo: Repository) -> None:
    sd = {
        "param": nn.Parameter(torch.randn(4, 3)),
        "frozen_param": nn.Parameter(torch.randn(2), requires_grad=False),
        "grad_tensor": torch.randn(3).requires_grad_(True),
        "plain": torch.randn(3),
    }
    out = roundtrip(repo, sd)
    assert_same(sd, out)
    assert isinstance(out["param"], nn.Parameter)
    assert out["param"].requires_grad
    assert isinstance(out["frozen_param"], nn.Parameter)
    assert not out["frozen_param"].requires_grad
    assert type(out["grad_tensor"]) is torch.Tensor
    assert out["grad_tensor"].requires_grad
    assert not out["plain"].requires_grad


# --------------------------------------------------------------------------- numpy, torch objects


@pytest.mark.parametrize(
    "dtype", ["<f4", "<f2", "<f8", "|i1", "<i2", "<i8", "|u1", "<u2", "<u8", "|b1", "<c8", "<c16", ">f4", ">i8", ">c16"]
)
def test_numpy_arrays(repo: Repository, dtype: str) -> None:
    dt = np.dtype(dtype)
    rng = np.random.default_rng(7)

    def arr(shape: tuple[int, ...]) -> np.ndarray:
        n = int(np.prod(shape, dtype=np.int64))
        raw = np.frombuffer(rng.bytes(n * dt.itemsize), dtype=np.uint8).copy()
        if dt.kind == "b":
            raw &= 1
        return raw.view(dt).reshape(shape)

    sd = {
        "matrix": arr((6, 7)),
        "fortran": np.asfortranarray(arr((5, 9))),
        "zero_d": arr(()),
        "empty": arr((0, 4)),
        "multi_chunk": arr((3 * CHUNK // dt.itemsize + 5,)),
        "strided": arr((20, 10))[::3, ::2],
    }
    assert sd["fortran"].flags.f_contiguous
    assert not sd["fortran"].flags.c_contiguous
    out = roundtrip(repo, sd)
    assert_same(sd, out)
    assert out["zero_d"].shape == ()
    assert out["matrix"].dtype.byteorder == sd["matrix"].dtype.byteorder


def test_numpy_scalars(repo: Repository) -> None:
    sd = {
        "f32": np.float32(1.5),
        "f16": np.float16(-0.0),
        "f64_nan": np.float64("nan"),
        "i8": np.int8(-7),
        "i64": np.int64(-(2**63)),
        "u64": np.uint64(2**64 - 1),
        "bool": np.bool_(True),
        "c64": np.complex64(1 - 2j),
        "c128": np.complex128(complex(float("inf"), -0.0)),
    }
    out = roundtrip(repo, sd)
    assert_same(sd, out)


def test_torch_size_dtype_device(repo: Repository) -> None:
    sd = {
        "size": torch.Size([2, 3, 4]),
        "empty_size": torch.Size([]),
        "dtypes": [*TENSOR_DTYPES, torch.int32],
        "devices": [torch.device("cpu"), torch.device("cuda", 1), torch.device("meta")],
    }
    out = roundtrip(repo, sd)
    assert_same(sd, out)
    assert type(out["size"]) is torch.Size


def test_module_state_dict_keeps_metadata(repo: Repository) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))
    model.train()
    model(torch.randn(5, 4))  # moves the BatchNorm running stats and num_batches_tracked
    sd = model.state_dict()
    assert hasattr(sd, "_metadata")
    out = roundtrip(repo, sd)
    assert type(out) is OrderedDict
    assert hasattr(out, "_metadata")
    assert out._metadata == sd._metadata
    assert_same(sd, out)
    fresh = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))
    fresh.load_state_dict(out)
    assert_same(model.state_dict(), fresh.state_dict())


def test_nested_checkpoint_with_state_dicts(repo: Repository) -> None:
    model = nn.Linear(3, 3)
    sd = {"model": model.state_dict(), "epoch": 3, "cfg": {"lr": 1e-3, "betas": (0.9, 0.95)}, "tag": None}
    out = roundtrip(repo, sd)
    assert_same(sd, out)
    assert out["model"]._metadata == sd["model"]._metadata


# --------------------------------------------------------------------------- optimizers and resume


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Dropout(0.2), nn.Linear(32, 2))


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(16, 8, generator=g), torch.randn(16, 2, generator=g)


def _train(model: nn.Module, opt: torch.optim.Optimizer, start: int, steps: int) -> None:
    model.train()
    for step in range(start, start + steps):
        x, y = _batch(step)
        loss = F.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()


@pytest.mark.parametrize(
    "make_opt",
    [
        lambda p: torch.optim.AdamW(p, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1),
        lambda p: torch.optim.SGD(p, lr=1e-2, momentum=0.9, nesterov=True),
    ],
    ids=["adamw", "sgd_momentum"],
)
def test_optimizer_state_dict_roundtrip(repo: Repository, make_opt: Any) -> None:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = _mlp()
        opt = make_opt(model.parameters())
        _train(model, opt, 0, 3)
    sd = opt.state_dict()
    assert sd["state"], "the optimizer should hold per-parameter state after steps"
    out = roundtrip(repo, sd)
    assert_same(sd, out)
    opt2 = make_opt(_mlp().parameters())
    opt2.load_state_dict(out)
    assert_same(opt.state_dict(), opt2.state_dict())


def test_resume_is_bit_identical(repo: Repository) -> None:
    def fresh() -> tuple[nn.Module, torch.optim.Optimizer]:
        torch.manual_seed(0)
        model = _mlp()
        return model, torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.05)

    with torch.random.fork_rng(devices=[]):
        model, opt = fresh()
        torch.manual_seed(1234)  # dropout draws from the global generator
        _train(model, opt, 0, 5)
        repo.save({"model": model.state_dict(), "optim": opt.state_dict(), "rng": torch.get_rng_state(), "step": 5})
        _train(model, opt, 5, 5)
        w1 = {k: v.clone() for k, v in model.state_dict().items()}
        o1 = opt.state_dict()

        model2, opt2 = fresh()
        torch.manual_seed(999)  # scramble the generator: the snapshot must restore it
        ckpt = repo.load()
        model2.load_state_dict(ckpt["model"])
        opt2.load_state_dict(ckpt["optim"])
        torch.set_rng_state(ckpt["rng"])
        _train(model2, opt2, ckpt["step"], 5)
        w2 = model2.state_dict()

    assert w1.keys() == w2.keys()
    for k, before in w1.items():
        assert torch.equal(before, w2[k]), f"{k} differs after resume"
        assert tensor_bytes(before) == tensor_bytes(w2[k]), k
    o2 = opt2.state_dict()
    for pid, state in o1["state"].items():
        for name, value in state.items():
            assert torch.equal(value, o2["state"][pid][name]), f"optimizer state {pid}/{name} differs"


# --------------------------------------------------------------------------- load_into


def test_load_into_fills_parameters_in_place(repo: Repository) -> None:
    torch.manual_seed(0)
    source = nn.Sequential(nn.Linear(16, 300), nn.LayerNorm(300), nn.Linear(300, 4))  # 300x16 fp32 is multi-chunk
    repo.save(source.state_dict(), tag="src")
    torch.manual_seed(1)
    target = nn.Sequential(nn.Linear(16, 300), nn.LayerNorm(300), nn.Linear(300, 4))
    before = {k: (v, v.data_ptr()) for k, v in target.state_dict(keep_vars=True).items()}
    returned = repo.load_into(target, "src")
    assert returned is target
    after = target.state_dict(keep_vars=True)
    for k, (obj, ptr) in before.items():
        assert after[k] is obj, f"{k} was replaced, not filled"
        assert after[k].data_ptr() == ptr, f"{k} moved"
        assert tensor_bytes(after[k]) == tensor_bytes(source.state_dict()[k]), k
    assert all(isinstance(p, nn.Parameter) and p.requires_grad for p in target.parameters())


def test_load_into_tied_module(repo: Repository) -> None:
    torch.manual_seed(0)
    source = TiedLM()
    repo.save(source.state_dict())
    target = TiedLM()
    ptrs = {k: v.data_ptr() for k, v in target.state_dict().items()}
    repo.load_into(target)
    assert target.lm_head.weight is target.emb.weight
    for k, v in target.state_dict().items():
        assert v.data_ptr() == ptrs[k], k
        assert torch.equal(v, source.state_dict()[k]), k


def test_load_into_dict_target(repo: Repository) -> None:
    sd = {"w": torch.randn(5, 5), "nested": {"b": torch.arange(4)}, "step": 7}
    repo.save(sd)
    target = {"w": torch.zeros(5, 5), "nested": {"b": torch.zeros(4, dtype=torch.int64)}, "step": 0}
    w, b = target["w"], target["nested"]["b"]
    repo.load_into(target)
    assert target["w"] is w
    assert target["nested"]["b"] is b
    assert torch.equal(w, sd["w"])
    assert torch.equal(b, sd["nested"]["b"])
    assert target["step"] == 7


def test_load_into_non_contiguous_target(repo: Repository) -> None:
    sd = {"w": torch.randn(6, 4)}
    repo.save(sd)
    holder = torch.zeros(4, 6)
    target = {"w": holder.t()}
    repo.load_into(target)
    assert torch.equal(target["w"], sd["w"])
    assert torch.equal(holder, sd["w"].t())


def test_load_into_shape_mismatch_leaves_model_unchanged(repo: Repository) -> None:
    repo.save(nn.Linear(4, 5).state_dict(), tag="wide")
    model = nn.Linear(4, 3)
    before = {k: tensor_bytes(v) for k, v in model.state_dict().items()}
    with pytest.raises(cas.ShapeMismatchError) as info:
        repo.load_into(model, "wide")
    assert "weight" in str(info.value)
    assert "bias" in str(info.value)
    assert {k: tensor_bytes(v) for k, v in model.state_dict().items()} == before


def test_load_into_partial_mismatch_writes_nothing(repo: Repository) -> None:
    # first tensor fits, second does not: the fitting one must not be written either
    repo.save({"a": torch.ones(3), "b": torch.ones(2, 2)})
    target = {"a": torch.zeros(3), "b": torch.zeros(2, 3)}
    with pytest.raises(cas.ShapeMismatchError, match="b"):
        repo.load_into(target)
    assert torch.equal(target["a"], torch.zeros(3))
    assert torch.equal(target["b"], torch.zeros(2, 3))


def test_load_into_dtype_mismatch(repo: Repository) -> None:
    repo.save({"w": torch.ones(3, dtype=torch.float16)})
    target = {"w": torch.zeros(3)}
    with pytest.raises(cas.ShapeMismatchError, match="w"):
        repo.load_into(target)
    assert torch.equal(target["w"], torch.zeros(3))


def test_load_into_with_large_bytes_key(repo: Repository) -> None:
    # a bytes key longer than the inline limit must still name its tensor for load_into
    key = b"k" * 5000
    repo.save({key: torch.ones(3)})
    assert_same({key: torch.ones(3)}, repo.load())
    target = {key: torch.zeros(3)}
    try:
        repo.load_into(target)
    except cas.ShapeMismatchError as exc:  # the message quotes the 5000-byte key: keep the report short
        pytest.fail(f"load_into could not match a tensor under a {len(key)}-byte key: {str(exc)[:160]}...")
    assert torch.equal(target[key], torch.ones(3))


# --------------------------------------------------------------------------- unsupported objects and pickle


class Custom:
    def __init__(self, x: int) -> None:
        self.x = x

    def __eq__(self, other: object) -> bool:
        return type(other) is Custom and other.x == self.x

    def __hash__(self) -> int:
        return hash(self.x)


def _checkpoint_with(value: Any) -> dict[str, Any]:
    return {
        "model": {"w": torch.randn(2000)},  # multi-chunk: would be written before the tree if saving went ahead
        "optim": {"state": {0: {"exp_avg": torch.randn(3), "foo": value}}, "param_groups": [{"lr": 0.1}]},
    }


UNSUPPORTED = {
    "custom_instance": lambda: Custom(3),
    "set": lambda: {1, 2, 3},
    "frozenset": lambda: frozenset({"a"}),
    "lambda": lambda: lambda x: x,
    "object": object,
    "dict_subclass": lambda: type("MyDict", (dict,), {})(a=1),
    "object_array": lambda: np.array([object()], dtype=object),
    "sparse_tensor": lambda: torch.eye(3).to_sparse(),
    "meta_tensor": lambda: torch.empty(3, device="meta"),
    "enum_member": lambda: enum.Enum("E", "A").A,
}


@pytest.mark.parametrize("name", list(UNSUPPORTED))
def test_unsupported_object_raises_with_path_and_changes_nothing(repo: Repository, name: str) -> None:
    repo.save({"model": {"w": torch.randn(100)}}, tag="before")
    state = repo_state(repo)
    with pytest.raises(cas.UnsupportedObjectError) as info:
        repo.save(_checkpoint_with(UNSUPPORTED[name]()))
    assert not isinstance(info.value, cas.PickleRequiredError)
    assert "optim/state/0/foo" in str(info.value)
    assert repo_state(repo) == state
    tmp = repo.path / "tmp"
    assert not tmp.exists() or not any(tmp.iterdir())


def test_unsupported_dict_key(repo: Repository) -> None:
    with pytest.raises(cas.UnsupportedObjectError, match="optim/state"):
        repo.save({"optim": {"state": {torch.tensor(1): 1}}})
    with pytest.raises(cas.UnsupportedObjectError, match="a/b"):
        repo.save({"a": {"b": {frozenset({1}): 2}}})
    assert repo.snapshots() == []


@pytest.mark.parametrize("name", ["custom_instance", "set", "frozenset", "object_array"])
def test_allow_pickle_saves_and_requires_opt_in_to_load(repo: Repository, name: str) -> None:
    value = UNSUPPORTED[name]()
    sd = _checkpoint_with(value)
    snap = repo.save(sd, allow_pickle=True, tag="pickled")
    with pytest.raises(cas.PickleRequiredError) as info:
        repo.load("pickled")
    assert "optim/state/0/foo" in str(info.value)
    out = repo.load(snap.id, allow_pickle=True)
    assert_same(sd["model"], out["model"])
    assert_same(sd["optim"]["state"][0]["exp_avg"], out["optim"]["state"][0]["exp_avg"])
    got = out["optim"]["state"][0]["foo"]
    assert type(got) is type(value)
    if name == "object_array":
        assert got.dtype == object
        assert got.shape == value.shape
    else:
        assert got == value


def test_allow_pickle_with_unpicklable_value_changes_nothing(repo: Repository) -> None:
    repo.save({"x": 1}, tag="before")
    state = repo_state(repo)
    with pytest.raises(cas.UnsupportedObjectError) as info:
        repo.save(_checkpoint_with(lambda x: x), allow_pickle=True)
    assert "optim/state/0/foo" in str(info.value)
    assert repo_state(repo) == state


def test_plain_snapshot_loads_without_allow_pickle(repo: Repository) -> None:
    sd = {"a": torch.ones(2), "b": [1, 2]}
    repo.save(sd)
    assert_same(sd, repo.load())
    assert_same(sd, repo.load(allow_pickle=True))
