"""cas.integrations against the real Lightning and transformers (no mocks, nothing downloaded)."""

from __future__ import annotations

import enum
import os
from pathlib import Path
from typing import Any

import pytest
import torch

import cas

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers is imported: nothing may come from the hub
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"

# Lightning's advice for real runs, and a torch pytree deprecation inside Lightning
LIGHTNING_WARNINGS = (
    "ignore:.*does not have many workers:UserWarning",
    "ignore:.*Checkpoint directory .* exists and is not empty:UserWarning",
    "ignore:.*LeafSpec.* is deprecated",
    "ignore:.*number of training batches .* is smaller than the logging interval",
)


def quiet_lightning(fn: Any) -> Any:
    for spec in LIGHTNING_WARNINGS:
        fn = pytest.mark.filterwarnings(spec)(fn)
    return fn


def _tensors_equal(a: Any, b: Any) -> bool:
    """Bit-identical nested state (tensors compared with torch.equal, dtypes included)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_tensors_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(map(_tensors_equal, a, b))
    return bool(a == b)


# ---------------------------------------------------------------------------------------
# Lightning
# ---------------------------------------------------------------------------------------

def _lightning_parts() -> tuple[Any, Any]:
    L = pytest.importorskip("lightning")
    from torch.utils.data import DataLoader, TensorDataset

    class Tiny(L.LightningModule):
        def __init__(self, lr: float = 0.05, hidden: int = 8) -> None:
            super().__init__()
            self.save_hyperparameters()  # hparams are an AttributeDict: stored as a plain dict
            self.net = torch.nn.Sequential(torch.nn.Linear(4, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 1))

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            loss = torch.nn.functional.mse_loss(self.net(x), y)
            self.log("train_loss", loss, on_step=False, on_epoch=True)
            return loss

        def configure_optimizers(self) -> Any:
            opt = torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
            return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)}

    def make() -> tuple[Any, Any]:
        torch.manual_seed(0)
        model = Tiny()
        g = torch.Generator().manual_seed(1)
        data = TensorDataset(torch.randn(32, 4, generator=g), torch.randn(32, 1, generator=g))
        return model, DataLoader(data, batch_size=8, shuffle=False)

    return L, make


def _trainer(L: Any, root: Path, epochs: int, **kwargs: Any) -> Any:
    return L.Trainer(
        max_epochs=epochs, accelerator="cpu", devices=1, enable_progress_bar=False, logger=False,
        enable_model_summary=False, default_root_dir=str(root), **kwargs,
    )


@pytest.mark.parametrize("resume_with", ["path", "last"])
@quiet_lightning
def test_lightning_fit_and_resume_bit_identical(tmp_path: Path, resume_with: str) -> None:
    """Fit 2 epochs saving through the plugin, resume in a new Trainer to 4 epochs: the weights and
    the optimizer state equal those of an uninterrupted 4-epoch run, bit for bit.

    Checkpoints are at epoch ends and the data is not shuffled: Lightning restores model,
    optimizer, scheduler and loop counters but not a plain DataLoader's position nor the
    global RNG, so a mid-epoch or shuffled resume is not bit-identical with any
    CheckpointIO (TorchCheckpointIO included); the model has no randomness of its own.
    """
    L, make = _lightning_parts()
    from lightning.pytorch.callbacks import ModelCheckpoint

    from cas.integrations.lightning import CasCheckpointIO, lightning_tag

    ref_model, loader = make()
    ref = _trainer(L, tmp_path / "ref", 4, enable_checkpointing=False)
    ref.fit(ref_model, loader)

    ckdir = tmp_path / "run" / "ckpts"
    repo_path = tmp_path / "repo"

    def checkpointing() -> Any:
        return ModelCheckpoint(dirpath=str(ckdir), monitor="train_loss", save_top_k=1, save_last=True)

    model_a, loader = make()
    # gc_every=1: the top-1 removal of epoch 0's checkpoint also runs a gc mid-training
    first = _trainer(L, tmp_path / "run", 2, plugins=[CasCheckpointIO(repo_path, gc_every=1)],
                     callbacks=[checkpointing()])
    first.fit(model_a, loader)

    with cas.Repository.open(repo_path) as repo:
        snaps = repo.snapshots()
        by_path = {s.metadata["lightning_path"]: s for s in snaps}
        last = str(ckdir / "last.ckpt")
        # last.ckpt was written twice (epochs 0 and 1): one snapshot, the second; top-1 removed epoch 0's
        assert set(by_path) == {last, str(ckdir / "epoch=1-step=8.ckpt")}
        assert len(snaps) == 2
        assert by_path[last].tag == lightning_tag(last)
        assert by_path[last].metadata["step"] == 8 and by_path[last].metadata["epoch"] == 1
        stored = repo.load(by_path[last].id)
        assert stored["hyper_parameters"] == {"lr": 0.05, "hidden": 8}
        assert type(stored["hyper_parameters"]) is dict
    # pointer files stand where Lightning expects checkpoint files
    assert sorted(p.name for p in ckdir.iterdir()) == ["epoch=1-step=8.ckpt", "last.ckpt"]
    assert b"cas-lightning-pointer" in (ckdir / "last.ckpt").read_bytes()

    class CountSteps(L.Callback):
        steps = 0

        def on_train_batch_end(self, *args: Any, **kwargs: Any) -> None:
            self.steps += 1

    counter = CountSteps()
    model_b, loader = make()
    second = _trainer(L, tmp_path / "run", 4, plugins=[CasCheckpointIO(repo_path)],
                      callbacks=[checkpointing(), counter])
    second.fit(model_b, loader, ckpt_path=last if resume_with == "path" else "last")

    assert counter.steps == 8  # it resumed at step 8 (a run from scratch would end equal too)
    assert second.global_step == ref.global_step == 16
    assert _tensors_equal(model_b.state_dict(), ref_model.state_dict())
    assert _tensors_equal(second.optimizers[0].state_dict(), ref.optimizers[0].state_dict())
    assert second.lr_scheduler_configs[0].scheduler.state_dict() == ref.lr_scheduler_configs[0].scheduler.state_dict()
    with cas.Repository.open(repo_path) as repo:
        paths = sorted(s.metadata["lightning_path"] for s in repo.snapshots())
    assert paths == [str(ckdir / "epoch=3-step=16.ckpt"), last]


class Color(enum.Enum):
    RED = 1


def test_lightning_plugin_paths_pickle_and_fallbacks(tmp_path: Path) -> None:
    pytest.importorskip("lightning")
    from lightning.fabric.utilities.data import AttributeDict

    from cas.integrations.lightning import CasCheckpointIO, lightning_tag

    weights = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3)}
    ckpt = {"epoch": 0, "global_step": 3, "state_dict": weights,
            "hyper_parameters": AttributeDict(lr=0.1, nested=AttributeDict(a=[1, 2]))}
    path = tmp_path / "ck" / "a.ckpt"
    io = CasCheckpointIO(tmp_path / "repo")
    io.save_checkpoint(ckpt, path)
    loaded = io.load_checkpoint(path)
    assert _tensors_equal(loaded["state_dict"], weights)
    assert loaded["hyper_parameters"] == {"lr": 0.1, "nested": {"a": [1, 2]}}

    # without the pointer file the snapshot is found by its lightning_path metadata
    path.unlink()
    assert _tensors_equal(CasCheckpointIO(io.repo, pointer_files=False).load_checkpoint(path)["state_dict"], weights)
    # ... and by its tag, given as the "path"
    assert io.load_checkpoint(lightning_tag(path))["global_step"] == 3
    # saving the same path again replaces its snapshot
    io.save_checkpoint({**ckpt, "global_step": 4}, path)
    assert [s.metadata["step"] for s in io.snapshots_of(path)] == [4]
    assert len(io.repo.snapshots()) == 1

    # values cas stores only with pickle: auto mode pickles them once warned; False refuses
    odd = {**ckpt, "hyper_parameters": {"color": Color.RED}}
    with pytest.warns(UserWarning, match="pickle"):
        io.save_checkpoint(odd, tmp_path / "ck" / "odd.ckpt")
    assert io.load_checkpoint(tmp_path / "ck" / "odd.ckpt")["hyper_parameters"]["color"] is Color.RED
    with pytest.raises(cas.PickleRequiredError):
        io.load_checkpoint(tmp_path / "ck" / "odd.ckpt", weights_only=True)
    strict = CasCheckpointIO(io.repo, allow_pickle=False)
    with pytest.raises(cas.UnsupportedObjectError, match="color"):
        strict.save_checkpoint(odd, tmp_path / "ck" / "strict.ckpt")
    assert not (tmp_path / "ck" / "strict.ckpt").exists()
    # a failed save over an existing path leaves that path's previous snapshot in place
    with pytest.raises(cas.UnsupportedObjectError):
        strict.save_checkpoint(odd, path)
    assert io.load_checkpoint(path)["global_step"] == 4
    assert io.repo.resolve(lightning_tag(path)).metadata["step"] == 4

    # remove_checkpoint drops the snapshots and the pointer file
    io.remove_checkpoint(tmp_path / "ck" / "odd.ckpt")
    assert not (tmp_path / "ck" / "odd.ckpt").exists()
    with pytest.raises(FileNotFoundError):
        io.load_checkpoint(tmp_path / "ck" / "odd.ckpt")

    # a plain torch checkpoint file (written before cas) still loads
    plain = tmp_path / "plain.ckpt"
    torch.save({"state_dict": weights, "global_step": 1}, plain)
    assert _tensors_equal(io.load_checkpoint(plain)["state_dict"], weights)
    # the buffer helper gives what load_from_checkpoint-style readers expect
    assert torch.load(io.checkpoint_buffer(path), weights_only=True)["global_step"] == 4
    io.teardown()


# ---------------------------------------------------------------------------------------
# transformers
# ---------------------------------------------------------------------------------------

def _hf_parts(tmp_path: Path) -> tuple[Any, Any, Any]:
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")

    class Tokens(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
        def __init__(self) -> None:
            self.ids = torch.randint(0, 64, (24, 8), generator=torch.Generator().manual_seed(1))

        def __len__(self) -> int:
            return len(self.ids)

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            return {"input_ids": self.ids[i], "labels": self.ids[i]}

    def model() -> Any:
        torch.manual_seed(0)  # random init from a config: nothing is downloaded
        config = transformers.GPT2Config(vocab_size=64, n_positions=8, n_embd=16, n_layer=1, n_head=2,
                                         bos_token_id=0, eos_token_id=0)
        return transformers.GPT2LMHeadModel(config)

    def args(out: str, **kw: Any) -> Any:
        return transformers.TrainingArguments(
            output_dir=str(tmp_path / out), max_steps=9, per_device_train_batch_size=4, save_steps=3,
            logging_steps=1, learning_rate=1e-2, seed=7, report_to="none", use_cpu=True, disable_tqdm=True, **kw,
        )

    return transformers, model, (args, Tokens)


def test_hf_trainer_checkpoints_through_cas_and_resumes_bit_identical(tmp_path: Path) -> None:
    """9 steps uninterrupted vs. 6 steps (stopped by a callback after the step-6 save, with the
    same max_steps so the LR schedule is the same), checkpoint directories stored in cas and
    deleted from disk, restored into a fresh directory, resumed to step 9. The model (dropout
    on) ends bit-identical: the Trainer restores optimizer, scheduler, RNG state and the data
    position, all from the files cas wrote back."""
    transformers, make_model, (args, Tokens) = _hf_parts(tmp_path)
    from cas.integrations.hf import CasCallback, compare_restored, resume_from_cas

    ref_model = make_model()
    transformers.Trainer(model=ref_model, args=args("ref", save_strategy="no"), train_dataset=Tokens()).train()

    class StopAt6(transformers.TrainerCallback):  # an interruption after the step-6 checkpoint
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.global_step == 6:
                control.should_training_stop = True

    class CountSteps(transformers.TrainerCallback):
        steps = 0

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.steps += 1

    repo_path = tmp_path / "repo"
    assert resume_from_cas(repo_path, tmp_path / "restored") is None  # first run: nothing to resume
    callback = CasCallback(repo_path, delete_after_save=True)
    first = transformers.Trainer(model=make_model(), args=args("run"), train_dataset=Tokens(),
                                 callbacks=[callback, StopAt6()])
    first.train()
    assert first.state.global_step == 6
    assert not list((tmp_path / "run").glob("checkpoint-*"))  # cas holds the only copy

    with cas.Repository.open(repo_path) as repo:
        snaps = repo.snapshots()
        assert [s.tag for s in snaps] == ["checkpoint-3", "checkpoint-6"]
        meta = snaps[-1].metadata
        assert meta["step"] == 6 and meta["hf_checkpoint"] == "checkpoint-6"
        assert isinstance(meta["metrics"]["loss"], float) and "learning_rate" in meta["metrics"]
        kinds = {name: info["kind"] for name, info in meta["files"].items()}
        assert kinds["model.safetensors"] == "safetensors"
        assert kinds["optimizer.pt"] == kinds["scheduler.pt"] == kinds["rng_state.pth"] == "torch"
        assert kinds["training_args.bin"] == "torch"  # a torch.save zip too (of a pickle, kept as bytes)
        assert kinds["trainer_state.json"] == kinds["config.json"] == "raw"

    restored = resume_from_cas(repo_path, tmp_path / "restored")
    assert restored == str(tmp_path / "restored" / "checkpoint-6")
    same = compare_restored(repo_path, 6, restored)
    assert set(same) == set(kinds)
    assert all(same.values()), same  # every file comes back byte for byte

    resumed_model = make_model()
    counter = CountSteps()
    second = transformers.Trainer(model=resumed_model, args=args("run2"), train_dataset=Tokens(),
                                  callbacks=[CasCallback(repo_path), counter])
    second.train(resume_from_checkpoint=restored)
    assert counter.steps == 3  # it resumed at step 6 (a run from scratch would end equal too)
    assert second.state.global_step == 9
    assert _tensors_equal(resumed_model.state_dict(), ref_model.state_dict())
    with cas.Repository.open(repo_path) as repo:
        assert [s.tag for s in repo.snapshots()] == ["checkpoint-3", "checkpoint-6", "checkpoint-9"]


def test_hf_restore_checkpoint_refuses_and_overwrites(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    from cas.integrations.hf import restore_checkpoint, save_checkpoint_dir

    src = tmp_path / "checkpoint-2"
    (src / "sub").mkdir(parents=True)
    from safetensors.torch import save_file

    tensors = {"a": torch.randn(3, 5), "b": torch.arange(4)}
    save_file(tensors, str(src / "model.safetensors"), metadata={"format": "pt"})
    torch.save({"state": {0: {"exp_avg": torch.ones(3)}}, "param_groups": [{"lr": 0.1, "params": [0]}]},
               src / "optimizer.pt")
    (src / "training_args.bin").write_bytes(b"\x80\x04not a torch zip")
    (src / "sub" / "notes.txt").write_text("hello")
    with cas.Repository.init(tmp_path / "repo") as repo:
        save_checkpoint_dir(repo, src, tag="checkpoint-2", metadata={"step": 2})
        save_checkpoint_dir(repo, src, tag="checkpoint-2", metadata={"step": 2})  # replaced, not refused
        assert len(repo.snapshots()) == 1
        out = tmp_path / "out"
        out.mkdir()
        (out / "stale").write_text("x")
        with pytest.raises(cas.OutputExistsError):
            restore_checkpoint(repo, 2, out)
        restore_checkpoint(repo, "checkpoint-2", out, overwrite=True)
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == [
        "model.safetensors", "optimizer.pt", "sub/notes.txt", "training_args.bin"]
    for name in ("model.safetensors", "training_args.bin", "sub/notes.txt"):
        assert (out / name).read_bytes() == (src / name).read_bytes()
    assert _tensors_equal(torch.load(out / "optimizer.pt", weights_only=True),
                          torch.load(src / "optimizer.pt", weights_only=True))


def test_hf_callback_mirrors_save_total_limit(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    from cas.integrations.hf import CasCallback, save_checkpoint_dir

    with cas.Repository.init(tmp_path / "repo") as repo:
        for step in (1, 2, 3, 4):
            d = tmp_path / f"checkpoint-{step}"
            d.mkdir()
            torch.save({"w": torch.full((4,), float(step))}, d / "optimizer.pt")
            save_checkpoint_dir(repo, d, tag=f"checkpoint-{step}", metadata={"step": step})
        repo.save({"other": torch.ones(1)}, tag="not-a-checkpoint")
        callback = CasCallback(repo)
        removed = callback.rotate(2, best_checkpoint=str(tmp_path / "checkpoint-1"))
        assert [s.tag for s in removed] == ["checkpoint-2"]
        assert [s.tag for s in repo.snapshots()] == ["checkpoint-1", "checkpoint-3", "checkpoint-4",
                                                     "not-a-checkpoint"]
        callback.rotate(1)
        assert [s.tag for s in repo.snapshots()] == ["checkpoint-4", "not-a-checkpoint"]
