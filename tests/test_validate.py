from __future__ import annotations

from pathlib import Path

import pytest
import torch

import cas
from tests.test_cli import run


class Net(torch.nn.Module):
    def __init__(self, width: int = 16, noisy: bool = False) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(8, width)
        self.out = torch.nn.Linear(width, 1)
        self.noisy = noisy

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.out(torch.relu(self.fc(x)))
        return y + torch.randn_like(y) if self.noisy else y


def mse(model: torch.nn.Module) -> float:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 8, generator=g), torch.randn(64, 1, generator=g)
    with torch.no_grad():
        return float(torch.nn.functional.mse_loss(model(x), y))


@pytest.fixture
def saved(tmp_path: Path) -> tuple[cas.Repository, Net]:
    torch.manual_seed(0)
    net = Net()
    repo = cas.Repository.init(tmp_path / "r")
    repo.save({"model": net.state_dict(), "step": 3}, tag="s", metadata={"step": 3, "metrics": {"loss": mse(net)}})
    yield repo, net
    repo.close()


def test_all_checks_pass(saved: tuple[cas.Repository, Net]) -> None:
    repo, _net = saved
    fresh = Net()
    report = cas.validate(repo, "s", model=fresh, evaluate=mse, inputs=torch.randn(4, 8))
    assert report.ok, report.summary()
    assert [c.name for c in report.checks] == ["structure", "metrics", "determinism"]
    assert report.summary().endswith("3 checks passed")


def test_wrong_shape_is_caught(saved: tuple[cas.Repository, Net]) -> None:
    repo, _ = saved
    report = cas.validate(repo, "s", model=Net(width=32))
    assert not report.ok
    assert "fc.weight: snapshot float32[16, 8], model float32[32, 8]" in report.checks[0].detail
    assert "structure" in report.summary()


def test_metric_outside_tolerance(saved: tuple[cas.Repository, Net]) -> None:
    repo, _ = saved
    report = cas.validate(repo, "s", model=Net(), evaluate=lambda m: mse(m) * 1.01, rtol=1e-3)
    assert [c.ok for c in report.checks] == [True, False]
    assert "loss" in report.checks[1].detail and "rtol 0.001" in report.checks[1].detail
    ok = cas.validate(repo, "s", model=Net(), evaluate=lambda m: mse(m) * 1.0001, rtol=1e-3)
    assert ok.ok
    missing = cas.validate(repo, "s", model=Net(), evaluate=lambda m: {"accuracy": 1.0})
    assert not missing.ok and "none of ['accuracy']" in missing.checks[1].detail


def test_nondeterministic_model_is_caught(saved: tuple[cas.Repository, Net]) -> None:
    repo, _ = saved
    report = cas.validate(repo, "s", model=Net(noisy=True), inputs=torch.randn(4, 8), runs=3)
    assert not report.ok and report.checks[-1].name == "determinism"
    assert "different output" in report.checks[-1].detail


def test_cli_validate(saved: tuple[cas.Repository, Net]) -> None:
    repo, _ = saved
    out = run("validate", "s", repo=repo.path)
    assert "ok   data" in out.stdout and "checks passed" in out.stdout
