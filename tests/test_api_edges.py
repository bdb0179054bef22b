"""Edges of the public API: bad save-policy and retention arguments are typed UsageErrors that name
the argument, the value and what is accepted; the load layout of non-contiguous tensors is what the
README says; the README's key-prefix example selects what it says in a nested state dict."""

from __future__ import annotations

import math
import re
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import cas
from cas.policy import StageRow
from tests.helpers import tensor_bytes

README = Path(__file__).resolve().parent.parent / "README.md"
NAN, INF = math.nan, math.inf


# --------------------------------------------------------------------------- save policies

BAD_POLICY_ARGS: list[tuple[Any, dict[str, Any], list[str]]] = [
    # (policy class, keyword arguments, fragments the message must hold)
    (cas.EveryNSteps, {"steps": "10"}, ["EveryNSteps", "steps", "'10'", "str", "positive integer"]),
    (cas.EveryNSteps, {"steps": 0}, ["EveryNSteps", "steps", "got 0", "positive integer"]),
    (cas.EveryNSteps, {"steps": -1}, ["EveryNSteps", "steps", "got -1", "positive integer"]),
    (cas.EveryNSteps, {"steps": True}, ["EveryNSteps", "steps", "True", "bool", "positive integer"]),
    (cas.EveryNSteps, {"steps": 2.5}, ["EveryNSteps", "steps", "2.5", "float", "positive integer"]),
    (cas.EveryNSteps, {"steps": 10.0}, ["EveryNSteps", "steps", "10.0", "float", "positive integer"]),
    (cas.EveryNSteps, {"steps": None}, ["EveryNSteps", "steps", "None", "positive integer"]),
    (cas.EverySeconds, {"seconds": NAN}, ["EverySeconds", "seconds", "nan", "finite and > 0"]),
    (cas.EverySeconds, {"seconds": INF}, ["EverySeconds", "seconds", "inf", "finite and > 0"]),
    (cas.EverySeconds, {"seconds": -INF}, ["EverySeconds", "seconds", "-inf", "finite and > 0"]),
    (cas.EverySeconds, {"seconds": 0}, ["EverySeconds", "seconds", "got 0", "finite and > 0"]),
    (cas.EverySeconds, {"seconds": -5.0}, ["EverySeconds", "seconds", "-5.0", "finite and > 0"]),
    (cas.EverySeconds, {"seconds": "5"}, ["EverySeconds", "seconds", "'5'", "str", "number of seconds"]),
    (cas.EverySeconds, {"seconds": True}, ["EverySeconds", "seconds", "True", "bool", "number of seconds"]),
    (cas.EverySeconds, {"seconds": None}, ["EverySeconds", "seconds", "None", "number of seconds"]),
    (cas.YoungDaly, {"mtbf_s": NAN}, ["YoungDaly", "mtbf_s", "nan", "finite and > 0"]),
    (cas.YoungDaly, {"mtbf_s": INF}, ["YoungDaly", "mtbf_s", "inf", "finite and > 0"]),
    (cas.YoungDaly, {"mtbf_s": 0}, ["YoungDaly", "mtbf_s", "got 0", "finite and > 0"]),
    (cas.YoungDaly, {"mtbf_s": "6h"}, ["YoungDaly", "mtbf_s", "'6h'", "number of seconds"]),
    (cas.YoungDaly, {"mtbf_s": 3600, "formula": "Young"}, ["YoungDaly", "formula", "'Young'", "'young' or 'daly'"]),
    (cas.YoungDaly, {"mtbf_s": 3600, "save_cost_s": NAN}, ["YoungDaly", "save_cost_s", "nan", "finite and >= 0"]),
    (cas.YoungDaly, {"mtbf_s": 3600, "save_cost_s": -1}, ["YoungDaly", "save_cost_s", "-1", "finite and >= 0"]),
    (cas.YoungDaly, {"mtbf_s": 3600, "save_cost_s": "60"}, ["YoungDaly", "save_cost_s", "'60'", "seconds"]),
    (cas.YoungDaly, {"mtbf_s": 3600, "default_cost_s": 0}, ["YoungDaly", "default_cost_s", "got 0", "> 0"]),
    (cas.YoungDaly, {"mtbf_s": 3600, "stage": ["middle"]}, ["YoungDaly", "stage", "['middle']", "'initial'"]),
    (cas.YoungDaly, {"mtbf_s": 3600, "stage": "warmup"}, ["YoungDaly", "unknown stage", "'warmup'", "'final'"]),
    (cas.YoungDaly, {"mtbf_s": 3600, "stage_factors": {"initial": NAN}},
     ["YoungDaly", "stage_factors['initial']", "nan", "finite number > 0"]),
    (cas.YoungDaly, {"mtbf_s": 3600, "stage_factors": {"initial": 0}},
     ["YoungDaly", "stage_factors['initial']", "got 0", "finite number > 0"]),
    (cas.YoungDaly, {"mtbf_s": 3600, "stage_factors": [1.0]}, ["YoungDaly", "stage_factors", "[1.0]", "dict"]),
    (cas.StagePolicy, {"stage": ["middle"]}, ["StagePolicy", "stage", "['middle']", "'initial'"]),
    (cas.StagePolicy, {"stage": 2}, ["StagePolicy", "stage", "2", "'middle'"]),
    (cas.StagePolicy, {"stage": "warmup"}, ["StagePolicy", "unknown stage", "'warmup'", "'final'"]),
    (cas.StagePolicy, {"table": {}}, ["StagePolicy", "table", "{}", "StageRow"]),
    (cas.StagePolicy, {"table": {"initial": 3600}}, ["StagePolicy", "table", "3600", "StageRow"]),
    (StageRow, {"full_interval_s": NAN, "incremental_interval_s": 1.0, "retention_s": 1.0},
     ["StageRow", "full_interval_s", "nan", "finite and > 0"]),
    (StageRow, {"full_interval_s": 1.0, "incremental_interval_s": 0, "retention_s": 1.0},
     ["StageRow", "incremental_interval_s", "got 0", "finite and > 0"]),
]


@pytest.mark.parametrize(("cls", "kwargs", "fragments"), BAD_POLICY_ARGS,
                         ids=[f"{c.__name__}-{k}" for c, k, _ in BAD_POLICY_ARGS])
def test_bad_policy_argument_is_a_usage_error_naming_it(cls: Any, kwargs: dict[str, Any],
                                                        fragments: list[str]) -> None:
    with pytest.raises(cas.UsageError) as info:
        cls(**kwargs)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, (fragment, message)


def test_bad_positional_policy_argument_is_a_usage_error() -> None:
    with pytest.raises(cas.UsageError, match=r"EveryNSteps: steps must be a positive integer .*got '10' \(str\)"):
        cas.EveryNSteps("10")  # type: ignore[arg-type]
    with pytest.raises(cas.UsageError, match=r"EverySeconds: seconds must be .*got nan \(float\)"):
        cas.EverySeconds(NAN)


def test_misspelt_policy_keyword_is_an_argument_error() -> None:
    with pytest.raises(cas.ArgumentError, match=r"EveryNSteps.__init__\(\) .* 'step'; did you mean 'steps'\?"):
        cas.EveryNSteps(step=10)  # type: ignore[call-arg]
    with pytest.raises(cas.ArgumentError, match=r"did you mean 'mtbf_s'\?"):
        cas.YoungDaly(mtbf=3600)  # type: ignore[call-arg]


def _state(step: int, now: float, last_step: int | None, last_time: float | None) -> cas.policy.SaveState:
    return cas.policy.SaveState(step, now, last_step, last_time, None, None)


def test_valid_policy_values_work_as_before() -> None:
    assert cas.EveryNSteps(1).steps == 1
    every10 = cas.EveryNSteps(10)
    assert every10.due(_state(20, 0, None, None)) and not every10.due(_state(25, 0, 20, 0))
    assert every10.due(_state(30, 0, 20, 0))
    numpy_steps = cas.EveryNSteps(np.int64(5))  # type: ignore[arg-type]
    assert numpy_steps.due(_state(10, 0, 5, 0)) and not numpy_steps.due(_state(9, 0, 5, 0))
    for seconds in (10, 0.5, np.float64(2.0), Fraction(1, 2)):
        p = cas.EverySeconds(seconds)  # type: ignore[arg-type]
        assert p.seconds == seconds
        assert p.due(_state(1, 0, None, None)) and p.due(_state(2, float(seconds), 1, 0.0))
        assert not p.due(_state(2, float(seconds) * 0.99, 1, 0.0))
    assert cas.YoungDaly(mtbf_s=86400, save_cost_s=0).interval_s(None) == pytest.approx(math.sqrt(2e-3 * 86400))
    assert cas.YoungDaly(86400, "daly", 15, "middle").interval_s(None) == pytest.approx(
        3 * cas.policy.daly_interval(15, 86400))
    custom = cas.YoungDaly(mtbf_s=3600, stage="warm", stage_factors={"warm": 2})
    assert custom.interval_s(50) == pytest.approx(2 * math.sqrt(2 * 50 * 3600))
    assert cas.StagePolicy("final").retention_seconds(_state(0, 0, None, None)) == 30 * 86400
    row = StageRow(10.0, 5.0, 100.0)
    assert cas.StagePolicy("x", {"x": row}).due(_state(1, 5.0, 0, 0.0))


# --------------------------------------------------------------------------- CheckpointManager retention

BAD_MANAGER_ARGS: list[tuple[dict[str, Any], list[str]]] = [
    ({"keep_best": ("loss", "min")}, ["keep_best", "(metric, mode, n)", "('loss', 'min')",
                                      "keep_best=('loss', 'min', 2)"]),
    ({"keep_best": ("loss",)}, ["keep_best", "(metric, mode, n)", "('loss',)"]),
    ({"keep_best": "loss"}, ["keep_best", "(metric, mode, n)", "'loss'"]),
    ({"keep_best": "abc"}, ["keep_best", "(metric, mode, n)", "'abc'"]),  # unpacked to 'a', 'b', 'c' before
    ({"keep_best": ()}, ["keep_best", "(metric, mode, n)", "()"]),
    ({"keep_best": ("loss", "min", 2, 3)}, ["keep_best", "(metric, mode, n)", "('loss', 'min', 2, 3)"]),
    ({"keep_best": {"loss": "min"}}, ["keep_best", "(metric, mode, n)", "{'loss': 'min'}"]),
    ({"keep_best": ("loss", "mean", 2)}, ["keep_best", "mode", "'mean'", "'min'", "'max'"]),
    ({"keep_best": ("loss", "MIN", 2)}, ["keep_best", "mode", "'MIN'", "'min'"]),
    ({"keep_best": ("min", 2, "loss")}, ["keep_best", "mode", "2", "(metric, mode, n)"]),
    ({"keep_best": ("", "min", 2)}, ["keep_best", "metric", "''", "metric name"]),
    ({"keep_best": (None, "min", 2)}, ["keep_best", "metric", "None", "metric name"]),
    ({"keep_best": ("loss", "min", 0)}, ["keep_best", "n", "got 0", "positive int"]),
    ({"keep_best": ("loss", "min", -1)}, ["keep_best", "n", "got -1", "positive int"]),
    ({"keep_best": ("loss", "min", "2")}, ["keep_best", "n", "'2'", "str", "positive int"]),
    ({"keep_best": ("loss", "min", 2.0)}, ["keep_best", "n", "2.0", "float", "positive int"]),
    ({"keep_best": ("loss", "min", True)}, ["keep_best", "n", "True", "bool", "positive int"]),
    ({"max_to_keep": -1}, ["max_to_keep", "got -1", "positive int"]),
    ({"max_to_keep": "3"}, ["max_to_keep", "'3'", "str", "positive int"]),
    ({"max_to_keep": 2.5}, ["max_to_keep", "2.5", "float", "positive int"]),
    ({"max_to_keep": True}, ["max_to_keep", "True", "bool", "positive int"]),
    ({"keep_every_steps": -10}, ["keep_every_steps", "got -10", "positive int"]),
    ({"keep_every_steps": "1000"}, ["keep_every_steps", "'1000'", "str", "positive int"]),
    ({"gc_every": -1}, ["gc_every", "got -1", "non-negative int"]),
    ({"gc_every": "10"}, ["gc_every", "'10'", "non-negative int"]),
    ({"policy": 100}, ["policy", "100", "int", "cas.EveryNSteps(100)"]),
    ({"policy": "every 10 steps"}, ["policy", "'every 10 steps'", "cas.EverySeconds(600)"]),
    ({"busy": "block"}, ["busy", "'block'", "'wait' or 'skip'"]),
]


@pytest.mark.parametrize(("kwargs", "fragments"), BAD_MANAGER_ARGS, ids=[repr(k) for k, _ in BAD_MANAGER_ARGS])
def test_bad_manager_argument_is_a_usage_error_naming_it(tmp_path: Path, kwargs: dict[str, Any],
                                                         fragments: list[str]) -> None:
    with pytest.raises(cas.UsageError) as info:
        cas.CheckpointManager(tmp_path / "r", async_save=False, **kwargs)
    message = str(info.value)
    assert "CheckpointManager" in message, message
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    assert not (tmp_path / "r").exists()  # checked before a repository is created


def _run(tmp_path: Path, losses: list[float], **kwargs: Any) -> list[int]:
    with cas.CheckpointManager(tmp_path / "r", async_save=False, **kwargs) as mgr:
        for step, loss in enumerate(losses):
            mgr.save(step, {"w": torch.full((4,), float(step))}, metrics={"loss": loss})
        return mgr.all_steps()


LOSSES = [5.0, 1.0, 4.0, 0.5, 3.0, 2.0]


def test_documented_keep_best_form_works(tmp_path: Path) -> None:
    # README: keep_best=("loss", "min", 2): the two lowest losses (steps 3, 1) and the newest (step 5)
    assert _run(tmp_path / "a", LOSSES, keep_best=("loss", "min", 2)) == [1, 3, 5]
    assert _run(tmp_path / "b", LOSSES, keep_best=["loss", "max", 1]) == [0, 5]
    assert _run(tmp_path / "c", LOSSES, max_to_keep=3, keep_best=("loss", "min", 2)) == [1, 3, 4, 5]
    assert _run(tmp_path / "d", LOSSES, keep_best=("loss", "min", np.int64(1))) == [3, 5]


def test_zero_or_none_counts_keep_everything_as_before(tmp_path: Path) -> None:
    every = list(range(len(LOSSES)))
    assert _run(tmp_path / "a", LOSSES, max_to_keep=0) == every
    assert _run(tmp_path / "b", LOSSES, max_to_keep=None, keep_every_steps=0) == every
    assert _run(tmp_path / "c", LOSSES, max_to_keep=1, keep_every_steps=2) == [0, 2, 4, 5]


def test_save_step_must_not_be_a_bool(tmp_path: Path) -> None:
    with cas.CheckpointManager(tmp_path / "r", async_save=False) as mgr:
        with pytest.raises(cas.UsageError, match=r"step must be a non-negative int, got True"):
            mgr.save(True, {"w": torch.zeros(2)})
        assert mgr.all_steps() == []


# --------------------------------------------------------------------------- non-contiguous tensors


def _standalone_non_contiguous() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return {
        "transposed": torch.randn(8, 6, generator=g).t(),
        "stepped": torch.randn(10, generator=g)[::2],
        "permuted": torch.randint(-1000, 1000, (3, 4, 5), generator=g, dtype=torch.int16).permute(2, 0, 1),
        "expanded": torch.randn(3, 1, generator=g).to(torch.bfloat16).expand(3, 4),
        "column": torch.randn(5, 7, generator=g, dtype=torch.float64)[:, 2],
    }


def test_standalone_non_contiguous_tensor_loads_bit_identical_and_contiguous(tmp_path: Path) -> None:
    """cas stores a tensor that shares no storage as its own elements (FORMAT.md §7, `T`): the values
    come back bit for bit, the layout row-major (torch.load would keep the strides), as README says."""
    sd = _standalone_non_contiguous()
    assert not any(t.is_contiguous() for t in sd.values())
    with cas.Repository.init(tmp_path / "r") as repo:
        repo.save(sd, tag="s")
    with cas.Repository.open(tmp_path / "r") as repo:
        out = repo.load("s")
    assert list(out) == list(sd)
    for name, t in sd.items():
        got = out[name]
        assert type(got) is torch.Tensor and got.dtype == t.dtype and got.shape == t.shape, name
        assert tensor_bytes(got) == tensor_bytes(t), name
        assert got.is_contiguous(), name
        assert got.storage_offset() == 0 and got.untyped_storage().nbytes() == t.numel() * t.element_size(), name
        if name != "expanded":  # the README's recipe for a layout without overlapping elements
            restored = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype).copy_(got)
            assert restored.stride() == t.stride() and tensor_bytes(restored) == tensor_bytes(t), name
    text = " ".join(README.read_text().split())
    assert "keeps its values bit for bit but loads contiguous" in text


def test_views_of_a_shared_storage_keep_their_strides(tmp_path: Path) -> None:
    base = torch.randn(8, 8)
    sd = {"base": base, "t": base.t(), "stepped": base.view(-1)[3::5]}
    with cas.Repository.init(tmp_path / "r") as repo:
        repo.save(sd, tag="s")
        out = repo.load("s")
    for name, t in sd.items():
        assert out[name].stride() == t.stride() and out[name].storage_offset() == t.storage_offset(), name
        assert tensor_bytes(out[name]) == tensor_bytes(t), name
    assert out["t"].untyped_storage().data_ptr() == out["base"].untyped_storage().data_ptr()


# --------------------------------------------------------------------------- README key prefixes


class _Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(3, 3) for _ in range(11))


def _readme_load_line() -> str:
    text = README.read_text()
    start = text.index('part = repo.load("step-100", keys=["model"])')
    return text[start: text.index("\nhalf = ", start)]


def test_readme_prefix_example_selects_in_a_nested_state_dict(tmp_path: Path) -> None:
    """The README's save is {"model": model.state_dict(), ...}: its prefix example must select there."""
    line = _readme_load_line()
    prefix = re.search(r'prefixes \("([^"]+)"', line)
    glob = re.search(r'globs \("([^"]+)"', line)
    assert prefix is not None and glob is not None, line
    net = _Net()
    model = net.state_dict()
    sd = {"model": model, "optim": {"lr": 0.1}, "step": 100}
    with cas.Repository.init(tmp_path / "r") as repo:
        repo.save(sd, tag="step-100")
        part = repo.load("step-100", keys=[prefix.group(1)])
        assert list(part) == ["model"]
        assert list(part["model"]) == ["layers.0.weight", "layers.0.bias"]  # not layers.10.*
        for k, v in part["model"].items():
            assert tensor_bytes(v) == tensor_bytes(model[k]), k
        biases = repo.load("step-100", keys=[glob.group(1)])
        assert sorted(biases["model"]) == sorted(k for k in model if k.endswith(".bias"))
        # '.' is not a separator between nested dicts: the flat spelling selects nothing here
        with pytest.raises(cas.KeyNotFoundError, match=r"no key 'model\.layers\.0'.*model"):
            repo.load("step-100", keys=["model.layers.0"])
        # ... and is the prefix of a flat state dict's keys
        repo.save(model, tag="flat")
        flat = repo.load("flat", keys=["layers.1"])
        assert list(flat) == ["layers.1.weight", "layers.1.bias"]


def test_a_closed_repository_says_it_is_closed(tmp_path: Path) -> None:
    repo = cas.Repository.init(tmp_path / "repo")
    repo.save({"a": torch.zeros(3)}, "s")
    repo.close()
    for call in (lambda: repo.load("s"), lambda: repo.save({"a": torch.ones(3)}, "t"), repo.snapshots, repo.gc,
                 repo.check):
        with pytest.raises(cas.UsageError, match=r"this repository is closed .* open it again with cas.Repo"):
            call()
    with cas.Repository.open(tmp_path / "repo") as again:  # nothing was changed by the refused calls
        assert [s.tag for s in again.snapshots()] == ["s"]


@pytest.mark.parametrize("step", ["10", 1.5, -1, True, None])
def test_should_save_refuses_a_bad_step_as_save_does(tmp_path: Path, step: Any) -> None:
    manager = cas.CheckpointManager(tmp_path / "repo")
    try:
        with pytest.raises(cas.UsageError, match="step must be a non-negative int"):
            manager.should_save(step)
        assert manager.should_save(3)
    finally:
        manager.close()
