from __future__ import annotations

import math
import threading
from pathlib import Path
from typing import Any

import pytest
import torch

import cas
from cas.ids import chunk_id_of
from cas.pack import pack_path
from cas.policy import SaveState, daly_interval, young_interval
from tests.helpers import assert_same


def model_state(seed: int) -> dict[str, object]:
    torch.manual_seed(seed)
    m = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 8))
    return {"model": m.state_dict(), "step": seed}


def test_async_save_returns_before_commit_and_does_not_see_later_mutation(tmp_path: Path) -> None:
    repo = cas.Repository.init(tmp_path / "r")
    mgr = cas.CheckpointManager(repo)
    weights = torch.randn(1000)
    expected = weights.clone()
    lock_held, release = threading.Event(), threading.Event()

    def hold_lock() -> None:  # the commit cannot get the repository lock until we let go
        with repo.store.lock(exclusive=True):
            lock_held.set()
            release.wait(30)

    holder = threading.Thread(target=hold_lock)
    holder.start()
    lock_held.wait(10)
    assert mgr.save(10, {"w": weights, "nested": {"t": weights[:10]}}, metrics={"loss": torch.tensor(0.5)})
    weights.add_(1.0)  # the training loop goes on and changes the model
    assert mgr.all_steps() == []  # not committed yet
    release.set()
    holder.join()
    mgr.wait()
    assert mgr.all_steps() == [10] and mgr.latest() == 10
    loaded = repo.load("step-10")
    assert torch.equal(loaded["w"], expected) and torch.equal(loaded["nested"]["t"], expected[:10])
    assert repo.resolve("step-10").metadata == {"step": 10, "metrics": {"loss": 0.5}}
    assert mgr.history[0].blocked_s < mgr.history[0].total_s
    mgr.close()
    repo.close()


def test_state_dict_errors_fail_the_call_that_passed_it(tmp_path: Path) -> None:
    with cas.CheckpointManager(tmp_path / "r") as mgr:
        with pytest.raises(cas.UnsupportedObjectError, match="bad"):
            mgr.save(1, {"bad": {1, 2, 3}})  # a set: refused by this call, not by the next one
        assert mgr.save(1, {"ok": torch.ones(2)})  # the step was not taken: it can be saved now
        mgr.wait()
        assert mgr.all_steps() == [1]


def test_background_error_surfaces_on_next_call(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with cas.CheckpointManager(tmp_path / "r") as mgr:
        assert mgr.save(2, {"ok": torch.ones(2)})
        mgr.wait()
        real = mgr.repo.save

        def failing(*args: Any, **kwargs: Any) -> Any:
            raise cas.StorageError("disk full (simulated)")

        monkeypatch.setattr(mgr.repo, "save", failing)
        mgr.save(3, {"ok": torch.ones(2)})
        mgr._inflight.exception()  # type: ignore[union-attr]  # let it fail
        monkeypatch.setattr(mgr.repo, "save", real)
        with pytest.raises(cas.StorageError):
            mgr.save(4, {"ok": torch.ones(2)})  # raised by the next call, never lost
        assert mgr.all_steps() == [2]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), "low", None, torch.ones(3)])
def test_a_metric_that_is_not_a_finite_number_is_refused_at_save(tmp_path: Path, bad: Any) -> None:
    with cas.CheckpointManager(tmp_path / "r", keep_best=("loss", "min", 1)) as mgr:
        with pytest.raises(cas.UsageError, match="metric 'loss'"):
            mgr.save(1, {"w": torch.ones(2)}, metrics={"loss": bad})
        assert mgr.all_steps() == []


def test_keep_best_alone_keeps_the_newest_too(tmp_path: Path) -> None:
    with cas.CheckpointManager(tmp_path / "r", keep_best=("loss", "min", 1), async_save=False) as mgr:
        for step, loss in enumerate([0.5, 0.1, 0.3, 0.4], 1):
            mgr.save(step, {"w": torch.full((2,), float(step))}, metrics={"loss": loss})
        assert mgr.all_steps() == [2, 4]  # the best (step 2) and the newest (a resume loses nothing)


def test_unknown_keyword_arguments_are_typed_errors(tmp_path: Path) -> None:
    with pytest.raises(cas.ArgumentError, match="max_to_keep"):
        cas.CheckpointManager(tmp_path / "r", max_to_kep=3)
    with cas.CheckpointManager(tmp_path / "r") as mgr, pytest.raises(TypeError, match="metrics"):
        mgr.save(1, {"w": torch.ones(1)}, metric={"loss": 1.0})


def test_restore_latest_fills_model_and_optimizer_in_place(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    sched = torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    sched.step()  # after opt.step: no warning
    with cas.CheckpointManager(tmp_path / "r", async_save=False) as mgr:
        mgr.save(5, {"model": model.state_dict(), "optim": opt.state_dict(), "sched": sched.state_dict(),
                     "step": 5})
        fresh = torch.nn.Linear(4, 3)
        fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=0.01)  # never stepped: its state is empty
        fresh_sched = torch.optim.lr_scheduler.StepLR(fresh_opt, 1, gamma=0.5)
        into = {"model": fresh, "optim": fresh_opt, "sched": fresh_sched, "step": 0}
        result = mgr.restore_latest(into=into)
    assert result is not None and result.step == 5 and into["step"] == 5
    assert torch.equal(fresh.weight, model.weight)
    assert torch.equal(fresh_opt.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    assert fresh_sched.state_dict()["last_epoch"] == 1 and fresh_opt.param_groups[0]["lr"] == opt.param_groups[0]["lr"]


def test_busy_policies(tmp_path: Path) -> None:
    repo = cas.Repository.init(tmp_path / "r")
    with cas.CheckpointManager(repo, busy="skip") as mgr:
        release = threading.Event()
        held = threading.Event()

        def hold() -> None:
            with repo.store.lock(exclusive=True):
                held.set()
                release.wait(30)

        t = threading.Thread(target=hold)
        t.start()
        held.wait(10)
        assert mgr.save(1, {"x": torch.ones(3)})
        assert not mgr.save(2, {"x": torch.ones(3)})  # skipped: the previous save is still in flight
        release.set()
        t.join()
        mgr.wait()
        assert mgr.all_steps() == [1]
    with pytest.raises(cas.UsageError, match="busy"):
        cas.CheckpointManager(repo, busy="queue")
    repo.close()


def test_retention_max_to_keep_and_keep_best(tmp_path: Path) -> None:
    losses = {1: 0.9, 2: 0.3, 3: 0.5, 4: 0.3, 5: 0.8, 6: 0.7}
    with cas.CheckpointManager(tmp_path / "r", max_to_keep=2, keep_best=("loss", "min", 2), gc_every=3) as mgr:
        mgr.repo.save({"other": 1}, tag="pinned")  # not the manager's: never touched
        for step, loss in losses.items():
            mgr.save(step, {"w": torch.full((100,), float(step))}, metrics={"loss": loss})
        mgr.wait()
        # newest two (5, 6) + best two by loss (2 and 4 tie at 0.3)
        assert mgr.all_steps() == [2, 4, 5, 6]
        assert "pinned" in [s.tag for s in mgr.repo.snapshots()]
        assert torch.equal(mgr.repo.load("step-2")["w"], torch.full((100,), 2.0))


def test_keep_every_steps_and_should_save_policy(tmp_path: Path) -> None:
    with cas.CheckpointManager(tmp_path / "r", max_to_keep=1, keep_every_steps=4,
                               policy=cas.EveryNSteps(2)) as mgr:
        for step in range(1, 11):
            mgr.save(step, {"s": step})
        mgr.wait()
        assert mgr.all_steps() == [4, 8, 10]
        assert not mgr.should_save(10) and not mgr.should_save(11) and mgr.should_save(12)


def test_restore_latest_falls_back_past_a_damaged_snapshot(tmp_path: Path) -> None:
    with cas.CheckpointManager(tmp_path / "r") as mgr:
        assert mgr.restore_latest() is None
        for step in (1, 2, 3):
            mgr.save(step, {"w": torch.full((5000,), float(step)), "step": step})
        mgr.wait()
        repo = mgr.repo
        loc = repo.index.get(chunk_id_of(torch.full((5000,), 3.0).numpy().tobytes()))
        path = pack_path(repo.path / "packs", loc.pack_id)
        data = bytearray(path.read_bytes())
        data[loc.offset + 7] ^= 1
        path.write_bytes(bytes(data))
        with pytest.warns(RuntimeWarning, match="step-3 does not restore"):
            result = mgr.restore_latest()
        assert result is not None and result.step == 2 and result.fell_back
        assert result.skipped[0][0] == "step-3"
        assert_same(result.state_dict, {"w": torch.full((5000,), 2.0), "step": 2})
        target = {"w": torch.zeros(5000), "step": 0}
        with pytest.warns(RuntimeWarning):
            into = mgr.restore_latest(into=target)
        assert into is not None and into.step == 2 and target["step"] == 2
        assert torch.equal(target["w"], torch.full((5000,), 2.0))


def test_restore_into_module_uses_model_entry(tmp_path: Path) -> None:
    sd = model_state(3)
    with cas.CheckpointManager(tmp_path / "r") as mgr:
        mgr.save(7, sd)
        fresh = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 8))
        result = mgr.restore_latest(into=fresh)
        assert result is not None and result.step == 7
        assert_same(dict(fresh.state_dict()), dict(sd["model"]))  # type: ignore[call-overload]


def test_resave_same_step_replaces(tmp_path: Path) -> None:
    with cas.CheckpointManager(tmp_path / "r") as mgr:
        mgr.save(5, {"v": 1})
        mgr.wait()
    with cas.CheckpointManager(tmp_path / "r") as mgr:  # a resumed run saves step 5 again
        mgr.save(5, {"v": 2}, force=True)
        mgr.wait()
        assert mgr.all_steps() == [5] and mgr.repo.load("step-5") == {"v": 2}


def test_tied_weights_stay_tied_through_staging(tmp_path: Path) -> None:
    emb = torch.nn.Embedding(50, 8)
    head = torch.nn.Linear(8, 50, bias=False)
    head.weight = emb.weight
    sd = {"emb.weight": emb.weight.detach(), "head.weight": head.weight.detach()}
    with cas.CheckpointManager(tmp_path / "r") as mgr:
        mgr.save(1, sd)
        mgr.wait()
        out = mgr.repo.load("step-1")
    assert out["emb.weight"].untyped_storage().data_ptr() == out["head.weight"].untyped_storage().data_ptr()
    assert torch.equal(out["head.weight"], emb.weight.detach())


# ---------------------------------------------------------------- interval policies


def state(step: int, now: float, last_time: float | None, cost: float | None = None, full: float | None = None,
          model_bytes: int = 0) -> SaveState:
    return SaveState(step, now, None if last_time is None else 0, last_time, full, cost, model_bytes)


def test_young_daly_worked_examples() -> None:
    # C = 60 s save, MTBF = 24 h: Young sqrt(2 * 60 * 86400) = 3219.9 s
    assert young_interval(60, 86400) == pytest.approx(3219.94, abs=0.01)
    # Daly: 3219.94 * (1 + sqrt(60/172800)/3 + (60/172800)/9) - 60 = 3180.1 s
    r = 60 / 172800
    assert daly_interval(60, 86400) == pytest.approx(math.sqrt(2 * 60 * 86400) * (1 + math.sqrt(r) / 3 + r / 9) - 60)
    assert daly_interval(60, 86400) == pytest.approx(3180.07, abs=0.05)
    assert daly_interval(300, 100) == 100  # C >= 2M: save every M
    policy = cas.YoungDaly(mtbf_s=86400)
    assert policy.interval_s(60) == pytest.approx(3219.94, abs=0.01)
    assert cas.YoungDaly(mtbf_s=86400, stage="middle").interval_s(60) == pytest.approx(3 * 3219.94, abs=0.05)
    assert policy.interval_s(60, model_bytes=200 * 10**9) == pytest.approx(1.5 * 3219.94, abs=0.05)
    assert cas.YoungDaly(mtbf_s=86400, save_cost_s=15).interval_s(60) == pytest.approx(1609.97, abs=0.01)
    assert policy.due(state(1, 100.0, None))
    assert not policy.due(state(2, 3000.0, 0.0, cost=60))
    assert policy.due(state(3, 3300.0, 0.0, cost=60))
    with pytest.raises(cas.UsageError):
        cas.YoungDaly(mtbf_s=0)


def test_stage_table_policy() -> None:
    h = 3600.0
    p = cas.StagePolicy("initial")
    assert p.due(state(1, 0.0, None)) and p.full_due(state(1, 0.0, None))
    assert not p.due(state(2, 3.9 * h, 0.0, full=0.0))
    assert p.due(state(2, 4.0 * h, 0.0, full=0.0)) and not p.full_due(state(2, 4.0 * h, 0.0, full=0.0))
    assert p.full_due(state(3, 24.0 * h, 20 * h, full=0.0))
    assert p.retention_seconds(state(1, 0, None)) == 7 * 86400
    mid, fin = cas.StagePolicy("middle"), cas.StagePolicy("final")
    assert not mid.due(state(2, 11.9 * h, 0.0, full=0.0)) and mid.due(state(2, 12 * h, 0.0, full=0.0))
    assert fin.full_due(state(2, 72 * h, 48 * h, full=0.0)) and not fin.full_due(state(2, 71 * h, 48 * h, full=0.0))
    big = 150 * 10**9  # over 100 GB: intervals stretch 1.5x
    assert not p.due(state(2, 5.9 * h, 0.0, full=0.0, model_bytes=big))
    assert p.due(state(2, 6.0 * h, 0.0, full=0.0, model_bytes=big))
    with pytest.raises(cas.UsageError, match="unknown stage"):
        cas.StagePolicy("warmup")


def test_stage_policy_full_save_verifies_and_retention(tmp_path: Path) -> None:
    clock = [0.0]
    with cas.CheckpointManager(tmp_path / "r", policy=cas.StagePolicy("initial"), clock=lambda: clock[0]) as mgr:
        for hour in range(0, 30):
            clock[0] = hour * 3600.0
            if mgr.should_save(hour):
                mgr.save(hour, {"w": torch.full((10,), float(hour))})
        mgr.wait()
        assert mgr.all_steps() == [0, 4, 8, 12, 16, 20, 24, 28]
        assert [r.step for r in mgr.history if r.full] == [0, 24]
        assert mgr.repo.resolve("step-24").metadata.get("full") is True


def test_every_seconds(tmp_path: Path) -> None:
    p = cas.EverySeconds(10)
    assert p.due(state(1, 0, None)) and not p.due(state(2, 9.9, 0.0)) and p.due(state(3, 10.0, 0.0))


def test_parent_is_the_runs_own_previous_snapshot(tmp_path: Path) -> None:
    w = torch.randn(50_000) * 0.02
    with cas.CheckpointManager(tmp_path / "r", max_to_keep=2) as mgr:
        mgr.save(1, {"w": w})
        mgr.wait()
        mgr.repo.save({"someone-else": torch.ones(10)}, tag="other-writer")  # newest snapshot now
        mgr.save(2, {"w": w + 1e-4})
        mgr.wait()
        step1, step2 = mgr.repo.resolve("step-1"), mgr.repo.resolve("step-2")
        assert step2.parent == step1.id
        assert any(loc.base_id is not None for _c, loc in mgr.repo.index.iter_chunks())  # deltas against step 1
        mgr.save(3, {"w": w + 2e-4})
        mgr.save(4, {"w": w + 3e-4})
        mgr.wait()
        assert mgr.all_steps() == [3, 4] and mgr.repo.resolve("step-4").parent == mgr.repo.resolve("step-3").id


def test_a_failed_background_save_does_not_count_as_saved(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The commit fails (a storage error injected into the repository's save): the error surfaces on
    the next call, and the step is due again, so the checkpoint is retried rather than skipped for a
    whole interval."""
    mgr = cas.CheckpointManager(tmp_path / "r", policy=cas.EveryNSteps(10))
    real = mgr.repo.save
    failing = [True]

    def save(*args: Any, **kwargs: Any) -> Any:
        if failing[0]:
            raise cas.StorageError("disk full (injected)")
        return real(*args, **kwargs)

    monkeypatch.setattr(mgr.repo, "save", save)
    assert mgr.save(10, {"w": torch.ones(4)})
    with pytest.raises(cas.StorageError, match="injected"):
        mgr.wait()
    failing[0] = False
    assert mgr.should_save(10)  # before the fix: False until step 20
    assert mgr.save(10, {"w": torch.ones(4)})
    mgr.wait()
    assert mgr.all_steps() == [10]
    assert not mgr.should_save(10) and mgr.should_save(20)
    mgr.close()
