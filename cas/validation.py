"""Post-restore validation: structure, metrics within a tolerance, determinism.

``validate`` returns a report; it raises only for bad arguments. Checks that need a
model (shapes against it, metrics, determinism) run only when one is given.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from cas.arguments import checked_kwargs
from cas.errors import CorruptionError, FormatVersionError, UsageError
from cas.repository import Repository


@dataclass
class CheckResult:
    name: str
    ok: bool
    detail: str


@dataclass
class ValidationReport:
    snapshot: str
    checks: list[CheckResult] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def summary(self) -> str:
        failed = [c for c in self.checks if not c.ok]
        if not failed:
            return f"snapshot {self.snapshot[:12]}: {len(self.checks)} checks passed"
        return f"snapshot {self.snapshot[:12]}: {len(failed)} of {len(self.checks)} checks failed: " + "; ".join(
            f"{c.name}: {c.detail}" for c in failed
        )

    def to_dict(self) -> dict[str, Any]:
        return {"snapshot": self.snapshot, "ok": self.ok, "summary": self.summary(),
                "checks": [{"name": c.name, "ok": c.ok, "detail": c.detail} for c in self.checks]}


def _model_part(repo: Repository, snapshot: str) -> tuple[str | None, dict[str, dict[str, Any]]]:
    """The model's tensors: under ``model/`` when the snapshot holds a training state, else all of them."""
    tensors = repo.tensors(snapshot)
    under_model = {t["path"][len("model/"):]: t for t in tensors if t["path"].startswith("model/")}
    if under_model:
        return "model", under_model
    return None, {t["path"]: t for t in tensors}


def check_structure(repo: Repository, snapshot: str, model: torch.nn.Module | None) -> CheckResult:
    """Manifest vs stored bytes (sizes add up), and if a model is given, names/shapes/dtypes vs the model."""
    try:
        report = repo.verify(read_data=False, snapshots=[snapshot])
    except (CorruptionError, FormatVersionError) as exc:
        return CheckResult("structure", False, str(exc))
    if not report.ok:
        return CheckResult("structure", False, str(report.problems[0]))
    _key, stored = _model_part(repo, snapshot)
    if model is None:
        return CheckResult("structure", True, f"{len(stored)} tensors, manifest and index agree")
    expected = dict(model.state_dict())
    problems = []
    for name, t in expected.items():
        s = stored.get(name)
        dtype = str(t.dtype).removeprefix("torch.")
        if s is None:
            problems.append(f"{name} missing from the snapshot")
        elif s["shape"] != list(t.shape) or s["dtype"] != dtype:
            problems.append(f"{name}: snapshot {s['dtype']}{s['shape']}, model {dtype}{list(t.shape)}")
    problems += [f"{name} not in the model" for name in stored if name not in expected]
    if problems:
        return CheckResult("structure", False, "; ".join(problems[:5]) + (" ..." if len(problems) > 5 else ""))
    return CheckResult("structure", True, f"{len(expected)} tensors match the model")


def check_metrics(saved: dict[str, Any], measured: dict[str, float], rtol: float, atol: float) -> CheckResult:
    if not saved:
        return CheckResult("metrics", False, "the snapshot has no saved metrics to compare with")
    compared, bad = [], []
    for name, value in measured.items():
        ref = saved.get(name)
        if not isinstance(ref, (int, float)) or isinstance(ref, bool):
            continue
        compared.append(name)
        if not math.isclose(float(value), float(ref), rel_tol=rtol, abs_tol=atol):
            bad.append(f"{name} = {value:g}, saved {ref:g} (rtol {rtol:g})")
    if not compared:
        return CheckResult("metrics", False, f"none of {sorted(measured)} is among the saved metrics {sorted(saved)}")
    if bad:
        return CheckResult("metrics", False, "; ".join(bad))
    return CheckResult("metrics", True, f"{', '.join(compared)} within rtol {rtol:g}")


def _call(model: torch.nn.Module, inputs: Any) -> Any:
    """Run ``model`` on ``inputs``: a tuple is positional arguments, a dict (a Hugging Face batch)
    keyword arguments, anything else the one argument."""
    if isinstance(inputs, tuple):
        return model(*inputs)
    if isinstance(inputs, dict):
        return model(**inputs)
    return model(inputs)


def _detached(out: Any) -> Any:
    """A copy of a model output that later runs cannot change: tensors cloned, containers (a
    ``ModelOutput``, dicts, tuples, lists) walked."""
    if isinstance(out, torch.Tensor):
        return out.detach().clone()
    if isinstance(out, dict):  # transformers' ModelOutput is an OrderedDict
        return {k: _detached(v) for k, v in out.items()}
    if isinstance(out, (list, tuple)):
        return [_detached(v) for v in out]
    return out


def _first_difference(a: Any, b: Any, where: str = "output", depth: int = 0) -> str | None:
    """Where two outputs differ (bit for bit), or None when they are identical."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return where
        return None if a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b) else where
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return f"{where} keys"
        for k in a:
            found = _first_difference(a[k], b[k], f"{where}.{k}", depth + 1)
            if found:
                return found
        return None
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return f"{where} length"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            found = _first_difference(x, y, f"{where}[{i}]", depth + 1)
            if found:
                return found
        return None
    if type(a) is type(b) and hasattr(a, "__dict__") and not isinstance(a, (type, torch.nn.Module)) and depth < 8:
        return _first_difference(vars(a), vars(b), where, depth + 1)  # e.g. a key/value cache object
    try:
        return None if bool(a == b) else where
    except (RuntimeError, ValueError, TypeError):
        return where


def check_determinism(model: torch.nn.Module, inputs: Any, runs: int) -> CheckResult:
    was_training = model.training
    model.eval()
    try:
        outputs = []
        with torch.no_grad():
            for _ in range(runs):
                outputs.append(_detached(_call(model, inputs)))
    finally:
        model.train(was_training)
    first = outputs[0]
    for i, out in enumerate(outputs[1:], 2):
        where = _first_difference(first, out)
        if where is not None:
            return CheckResult("determinism", False, f"run {i} of {runs} gave a different {where} than run 1")
    return CheckResult("determinism", True, f"{runs} runs gave bit-identical outputs")


@checked_kwargs  # a misspelt keyword argument is a typed ArgumentError
def validate(
    repo: Repository,
    snapshot: str = "latest",
    *,
    model: torch.nn.Module | None = None,
    evaluate: Callable[[torch.nn.Module], dict[str, float] | float] | None = None,
    metric: str = "loss",
    rtol: float = 1e-3,
    atol: float = 0.0,
    inputs: Any = None,
    runs: int = 3,
    load: bool = True,
) -> ValidationReport:
    """Validate a snapshot: structure always; metrics with ``model`` + ``evaluate``; determinism with ``inputs``.

    ``inputs``: what the model is called with -- a tensor, a tuple of positional arguments, or a
    dict of keyword arguments (a Hugging Face batch: ``{"input_ids": ..., "attention_mask": ...}``);
    outputs may be tensors or containers of them (a ``ModelOutput``), compared bit for bit.

    With ``load`` (default) the snapshot's weights are loaded into ``model`` first.
    """
    if runs < 2 and inputs is not None:
        raise UsageError("determinism needs at least 2 runs")
    snap = repo.resolve(snapshot)
    report = ValidationReport(snap.id)
    structure = check_structure(repo, snap.id, model)
    report.checks.append(structure)
    if model is not None and load and structure.ok:
        key, _ = _model_part(repo, snap.id)
        try:
            repo.load_into(model, snap.id, key=key)
        except (CorruptionError, FormatVersionError) as exc:
            report.checks.append(CheckResult("load", False, str(exc)))
            return report
    if evaluate is not None:
        if model is None:
            raise UsageError("metrics need a model to evaluate")
        measured = evaluate(model)
        measured_map = {metric: float(measured)} if isinstance(measured, (int, float)) else dict(measured)
        saved = snap.metadata.get("metrics")
        report.checks.append(check_metrics(saved if isinstance(saved, dict) else {}, measured_map, rtol, atol))
    if inputs is not None:
        if model is None:
            raise UsageError("determinism needs a model to run")
        report.checks.append(check_determinism(model, inputs, runs))
    return report

