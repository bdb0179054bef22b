"""tools/make_series.py: deterministic bytes, and each series has the property it promises."""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from tools.make_series import SERIES, checkpoints, finetune_frozen_prefixes, generate
from tools.make_series import Config as SeriesConfig

SCALE = 0.02  # the smallest GPT (width 32) and a 1024-row embedding table
COUNT = 3


def _tensors(obj: Any, path: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    if isinstance(obj, torch.Tensor):
        yield path, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _tensors(v, f"{path}/{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _tensors(v, f"{path}/{i}")


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Path]]:
    """Every series written once at the tiny scale."""
    root = tmp_path_factory.mktemp("series")
    return {name: generate(name, root / name, scale=SCALE, count=COUNT) for name in SERIES}


def _load(path: Path) -> Any:
    if path.suffix == ".safetensors":
        return load_file(str(path))
    return torch.load(path, weights_only=True)


@pytest.fixture(scope="module")
def series(files: dict[str, list[Path]]) -> dict[str, list[dict[str, torch.Tensor]]]:
    """Each checkpoint read back from its file and flattened to {key path: tensor}."""
    return {name: [dict(_tensors(_load(p))) for p in paths] for name, paths in files.items()}


def _digests(paths: list[Path]) -> list[tuple[str, str]]:
    return [(p.name, hashlib.sha256(p.read_bytes()).hexdigest()) for p in paths]


def test_generate_is_deterministic_and_leaves_global_state_alone(
    files: dict[str, list[Path]], tmp_path: Path
) -> None:
    torch.manual_seed(123)
    before = torch.get_rng_state()
    threads = torch.get_num_threads()
    for name, first in files.items():
        assert len(first) == COUNT
        assert all(p.suffix == f".{SERIES[name].fmt}" for p in first)
        # a second run (shorter: count only ends the loop) writes the same bytes
        again = generate(name, tmp_path / name, scale=SCALE, count=2)
        assert _digests(again) == _digests(first[:2]), name
        assert _digests(first)[0][1] != _digests(first)[1][1], name
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.get_num_threads() == threads
    assert not torch.are_deterministic_algorithms_enabled()


def test_checkpoints_yields_what_generate_writes(files: dict[str, list[Path]]) -> None:
    (fname, obj), = list(checkpoints("embedding", scale=SCALE, count=1))
    assert fname == files["embedding"][0].name
    assert torch.equal(obj["model"]["emb.weight"], _load(files["embedding"][0])["model"]["emb.weight"])


def test_seed_changes_the_bytes(tmp_path: Path) -> None:
    a = generate("embedding", tmp_path / "a", scale=SCALE, count=1, seed=1)
    b = generate("embedding", tmp_path / "b", scale=SCALE, count=1, seed=2)
    assert _digests(a) != _digests(b)


def _changed(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> set[str]:
    assert a.keys() == b.keys()
    return {k for k in a if not torch.equal(a[k], b[k])}


def test_pretrain_every_weight_and_moment_changes(series: dict[str, list[dict[str, torch.Tensor]]]) -> None:
    ckpts = series["pretrain"]
    for prev, cur in itertools.pairwise(ckpts):
        float_keys = {k for k, t in cur.items() if t.is_floating_point() and (k.startswith("/model/")
                      or k.endswith(("exp_avg", "exp_avg_sq")))}
        assert any(k.endswith("exp_avg_sq") for k in float_keys)
        assert float_keys <= _changed(prev, cur)


def test_finetune_frozen_tensors_unchanged(series: dict[str, list[dict[str, torch.Tensor]]]) -> None:
    ckpts = series["finetune"]
    frozen = tuple(f"/model/{p}" for p in finetune_frozen_prefixes(SeriesConfig(scale=SCALE)))
    model_keys = [k for k in ckpts[0] if k.startswith("/model/")]
    frozen_keys = {k for k in model_keys if k.startswith(frozen)}
    trained_keys = {k for k in model_keys if not k.startswith(frozen) and k.endswith(".weight")}
    assert frozen_keys and trained_keys
    for prev, cur in itertools.pairwise(ckpts):
        changed = _changed(prev, cur)
        assert not frozen_keys & changed
        assert trained_keys <= changed
    # no optimizer state for frozen parameters: one exp_avg per trainable parameter
    n_trainable = sum(1 for k in model_keys if not k.startswith(frozen))
    assert sum(1 for k in ckpts[-1] if k.endswith("/exp_avg")) == n_trainable


def test_bf16_revisions_are_small_bf16_updates(series: dict[str, list[dict[str, torch.Tensor]]]) -> None:
    a, b = series["bf16-revisions"][:2]
    assert a.keys() == b.keys()
    assert all(t.dtype == torch.bfloat16 for t in a.values())
    total = sum(t.numel() for t in a.values())
    changed = sum(int((a[k] != b[k]).sum()) for k in a)
    assert 0.05 * total < changed < total
    max_step = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    assert max_step < 0.05


def test_embedding_only_some_rows_change(series: dict[str, list[dict[str, torch.Tensor]]]) -> None:
    ckpts = series["embedding"]
    key = "/model/emb.weight"
    rows = ckpts[0][key].shape[0]
    for prev, cur in itertools.pairwise(ckpts):
        rows_changed = (prev[key] != cur[key]).any(dim=1)
        assert 0 < int(rows_changed.sum()) < rows // 2
        for moment in ("exp_avg", "exp_avg_sq"):  # SparseAdam touches the same rows only
            m = f"/optim/sparse/state/0/{moment}"
            assert torch.equal((prev[m] != cur[m]).any(dim=1) & ~rows_changed, torch.zeros_like(rows_changed))
        assert _changed(prev, cur) >= {"/model/tower.0.weight", "/model/tower.2.weight"}


def test_lora_base_unchanged_adapters_trained(series: dict[str, list[dict[str, torch.Tensor]]]) -> None:
    ckpts = series["lora"]
    model_keys = [k for k in ckpts[0] if k.startswith("/model/")]
    adapters = {k for k in model_keys if ".lora_" in k}
    base = set(model_keys) - adapters
    assert adapters and any(".base.weight" in k for k in base)
    for prev, cur in itertools.pairwise(ckpts):
        changed = _changed(prev, cur)
        assert not base & changed
        assert {k for k in adapters if k.endswith("lora_B")} <= changed
    # optimizer state only for the adapters
    assert sum(1 for k in ckpts[-1] if k.endswith("/exp_avg")) == len(adapters)


def test_unknown_series_and_bad_size() -> None:
    with pytest.raises(ValueError, match="unknown series"):
        checkpoints("nope")
    with pytest.raises(ValueError, match="scale"):
        checkpoints("lora", scale=0)


def test_large_series_have_realistic_sizes() -> None:
    """At scale 1 the ``*-large`` series are 100-300 MB checkpoints whose weight matrices fill 1 MiB chunks."""
    from tools.make_series import GPT, LARGE_LAYERS

    cfg = SeriesConfig(scale=1.0, large=True)
    with torch.device("meta"):
        model = GPT(cfg)
    weights = {k: v for k, v in model.state_dict().items() if k != "head.weight"}
    size = sum(t.numel() * 2 for t in weights.values())  # bfloat16
    assert 100e6 < size < 300e6
    assert cfg.layers == LARGE_LAYERS
    assert {"blocks.0.q.weight", "blocks.0.k.weight", "blocks.0.v.weight"} <= set(weights)
    assert max(t.numel() * 2 for t in weights.values()) >= 8 << 20  # planes of whole chunks, not 16 KiB


def test_bf16_revisions_large_move_most_weights_a_few_ulps(series: dict[str, list[dict[str, torch.Tensor]]]) -> None:
    a, b = series["bf16-revisions-large"][:2]
    assert a.keys() == b.keys() and all(t.dtype == torch.bfloat16 for t in a.values())
    assert not any(k.endswith("head.weight") for k in a)  # tied: stored once
    ulps = torch.cat([(a[k].view(torch.int16).int() - b[k].view(torch.int16).int()).abs().flatten() for k in a])
    assert 0.5 < float((ulps != 0).float().mean()) < 1.0  # most weights move
    assert 1 <= float(ulps.float().median()) <= 16  # by a few ulps (the small series: one or two)


def test_lora_large_adapters_on_attention_over_a_bf16_base(series: dict[str, list[dict[str, torch.Tensor]]]) -> None:
    ckpts = series["lora-large"]
    model_keys = [k for k in ckpts[0] if k.startswith("/model/")]
    adapters = {k for k in model_keys if ".lora_" in k}
    targets = {k.split("/")[-1].split(".")[2] for k in adapters}
    assert targets == {"q", "k", "v", "proj"}
    assert all(ckpts[0][k].dtype == torch.float32 for k in adapters)
    assert all(ckpts[0][k].dtype == torch.bfloat16 for k in set(model_keys) - adapters)
    assert all(ckpts[0][k].shape[0] == 8 or ckpts[0][k].shape[1] == 8 for k in adapters)  # rank 8
    for prev, cur in itertools.pairwise(ckpts):
        changed = _changed(prev, cur)
        assert not (set(model_keys) - adapters) & changed
        assert {k for k in adapters if k.endswith("lora_B")} <= changed
    assert sum(1 for k in ckpts[-1] if k.endswith("/exp_avg")) == len(adapters)


def test_lora_large_keeps_the_tied_head_shared(files: dict[str, list[Path]]) -> None:
    state = _load(files["lora-large"][0])["model"]
    assert state["head.weight"].data_ptr() == state["tok_emb.weight"].data_ptr()
