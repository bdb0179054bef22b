"""Byte-exact file backups (cas/files.py, FORMAT.md §7a): real folders from transformers, Lightning,
torch.save and torch.distributed.checkpoint come back with the same sha256, paths, modes and mtimes;
their tensors dedup with live-model saves; no snapshot writes outside the target."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

import cas
from cas.files import build_state, storage_dtypes
from tests.test_cli import assert_one_line_error, run

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers is imported: nothing may come from the hub
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"


def tree_facts(root: Path) -> dict[str, tuple[Any, ...]]:
    """Per relative path: (sha256, permission bits, mtime_ns) of files, (mode, mtime_ns) of directories."""
    out: dict[str, tuple[Any, ...]] = {}
    for path in sorted(root.rglob("*")):
        st = path.stat()
        rel = path.relative_to(root).as_posix()
        if path.is_dir():
            out[rel + "/"] = (stat.S_IMODE(st.st_mode), st.st_mtime_ns)
        else:
            out[rel] = (hashlib.sha256(path.read_bytes()).hexdigest(), stat.S_IMODE(st.st_mode), st.st_mtime_ns)
    return out


@pytest.fixture
def repo_dir(tmp_path: Path) -> Path:
    path = tmp_path / "repo"
    run("--repo", path, "init", "--chunk-size", "64K")
    return path


def backup_and_restore(repo_dir: Path, src: Path, out: Path, tag: str) -> cas.Snapshot:
    run("save", src, "--tag", tag, repo=repo_dir)
    run("restore", tag, out, repo=repo_dir)
    assert tree_facts(out) == tree_facts(src)
    with cas.Repository.open(repo_dir) as repo:
        return repo.resolve(tag)


def _tiny_gpt2() -> Any:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=512, n_positions=64,
                                     bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config)


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_save_pretrained_folder_comes_back_byte_exact_and_dedups_with_the_live_model(
    repo_dir: Path, tmp_path: Path
) -> None:
    model = _tiny_gpt2()
    src = tmp_path / "hf"
    model.save_pretrained(src, max_shard_size="100KB")  # sharded, with an index and config
    (src / "tokenizer_config.json").write_text('{"model_max_length": 64}')
    os.chmod(src / "config.json", 0o640)
    names = sorted(p.name for p in src.iterdir())
    assert "model.safetensors.index.json" in names and sum(n.endswith(".safetensors") for n in names) > 2
    snap = backup_and_restore(repo_dir, src, tmp_path / "out", "hf")
    with cas.Repository.open(repo_dir) as repo:
        files = {f["path"]: f for f in repo.files("hf") or [] if f["kind"] == "file"}
        assert {f["format"] for n, f in files.items() if n.endswith(".safetensors")} == {"safetensors"}
        assert files["config.json"]["format"] == "raw"
        live = repo.save(model.state_dict(), tag="live")
    # the live model's tensors are the folder's tensors: the second save adds only its manifest
    assert snap.logical_bytes > 400_000 and live.bytes_added < 8_000, (snap.logical_bytes, live.bytes_added)
    # and the other way round: a backup of the folder after a live save adds only metadata too
    other = tmp_path / "hf2"
    model.save_pretrained(other, max_shard_size="100KB")
    run("save", other, "--tag", "hf2", repo=repo_dir)
    with cas.Repository.open(repo_dir) as repo:
        assert repo.resolve("hf2").bytes_added < 64_000  # headers, config and index JSON only


def test_torch_save_with_tied_weights_and_optimizer(repo_dir: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(300, 64), torch.nn.Linear(64, 300, bias=False))
    model[1].weight = model[0].weight  # tied
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randint(0, 300, (4, 8))).sum().backward()
    opt.step()
    src = tmp_path / "run"
    src.mkdir()
    torch.save({"model": model.state_dict(), "optim": opt.state_dict(), "step": 3,
                "half": torch.randn(40).half(), "fp8": torch.randn(32).to(torch.float8_e4m3fn)}, src / "ckpt.pt")
    backup_and_restore(repo_dir, src, tmp_path / "out", "pt")
    with cas.Repository.open(repo_dir) as repo:
        dtypes = {t["path"].rsplit("/", 1)[-1]: t["dtype"] for t in repo.tensors("pt")}
        assert "float32" in dtypes.values() and "float16" in dtypes.values()  # typed from the pickle
        live = repo.save({"model": model.state_dict()}, tag="live")
    assert live.bytes_added < 4_000  # the tied storage and every tensor dedup


def test_storage_dtypes_are_read_without_unpickling(tmp_path: Path) -> None:
    import zipfile

    torch.save({"a": torch.zeros(3), "b": torch.zeros(2, dtype=torch.int64), "c": torch.zeros(1).bfloat16()},
               tmp_path / "x.pt")
    with zipfile.ZipFile(tmp_path / "x.pt") as zf:
        pkl = zf.read(next(n for n in zf.namelist() if n.endswith("data.pkl")))
    assert storage_dtypes(pkl) == {"0": torch.float32, "1": torch.int64, "2": torch.bfloat16}
    assert storage_dtypes(b"garbage") == {}


@pytest.mark.filterwarnings("ignore:.*does not have many workers:UserWarning",
                            "ignore:.*LeafSpec.* is deprecated", "ignore::FutureWarning",
                            "ignore:.*number of training batches .* is smaller than the logging interval")
def test_lightning_ckpt_comes_back_byte_exact(repo_dir: Path, tmp_path: Path) -> None:
    L = pytest.importorskip("lightning")
    from torch.utils.data import DataLoader, TensorDataset

    class Tiny(L.LightningModule):
        def __init__(self, hidden: int = 16) -> None:
            super().__init__()
            self.save_hyperparameters()
            self.net = torch.nn.Linear(4, hidden)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return self.net(batch[0]).pow(2).mean()

        def configure_optimizers(self) -> Any:
            return torch.optim.Adam(self.parameters(), lr=0.01)

    data = DataLoader(TensorDataset(torch.randn(8, 4)), batch_size=4)
    trainer = L.Trainer(max_steps=2, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, default_root_dir=tmp_path)
    trainer.fit(Tiny(), data)
    src = tmp_path / "ckpts"
    src.mkdir()
    trainer.save_checkpoint(src / "last.ckpt")
    backup_and_restore(repo_dir, src, tmp_path / "out", "ckpt")
    # the single file restores at a file name too
    run("restore", "ckpt", tmp_path / "again.ckpt", repo=repo_dir)
    assert (tmp_path / "again.ckpt").read_bytes() == (src / "last.ckpt").read_bytes()


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")
def test_dcp_filesystem_writer_output_comes_back_byte_exact(repo_dir: Path, tmp_path: Path) -> None:
    import torch.distributed.checkpoint as dcp

    torch.manual_seed(0)
    state = {"model": torch.nn.Linear(64, 64).state_dict(), "extra": {"step": 5}}
    src = tmp_path / "dcp"
    dcp.save(state, storage_writer=dcp.FileSystemWriter(str(src)), no_dist=True)
    assert any(p.suffix == ".distcp" for p in src.iterdir()) and (src / ".metadata").exists()
    backup_and_restore(repo_dir, src, tmp_path / "out", "dcp")
    with cas.Repository.open(repo_dir) as repo:
        files = {f["path"]: f for f in repo.files("dcp") or [] if f["kind"] == "file"}
        distcp = [f for name, f in files.items() if name.endswith(".distcp")]
        assert distcp and all(f["format"] == "distcp" and f["tensors"] >= 1 for f in distcp)
        live = repo.save(state["model"], tag="live")
    assert live.bytes_added < 4_000  # DCP's tensors were stored as tensors: the live save dedups
    loaded = {"model": torch.nn.Linear(64, 64).state_dict(), "extra": {"step": 0}}
    dcp.load(loaded, storage_reader=dcp.FileSystemReader(str(tmp_path / "out")), no_dist=True)
    assert torch.equal(loaded["model"]["weight"], state["model"]["weight"])


def test_a_second_backup_stores_only_what_changed(repo_dir: Path, tmp_path: Path) -> None:
    src = tmp_path / "run"
    src.mkdir()
    torch.manual_seed(0)
    tensors = {f"layer{i}": torch.randn(256, 256) for i in range(4)}
    save_file(tensors, str(src / "model.safetensors"))
    first = backup_and_restore(repo_dir, src, tmp_path / "o1", "one")
    tensors["layer2"] = tensors["layer2"] + 1
    save_file(tensors, str(src / "model.safetensors"))
    second = backup_and_restore(repo_dir, src, tmp_path / "o2", "two")
    assert first.bytes_added > 700_000, first.bytes_added
    assert second.bytes_added < first.bytes_added / 3, (first.bytes_added, second.bytes_added)
    diff = run("diff", "one", "two", repo=repo_dir).stdout
    assert "M files/model.safetensors/tensors/layer2" in diff and "1 changed" in diff


def test_include_restores_some_files(repo_dir: Path, tmp_path: Path) -> None:
    src = tmp_path / "run"
    (src / "sub").mkdir(parents=True)
    save_file({"w": torch.ones(3)}, str(src / "sub" / "a.safetensors"))
    (src / "notes.txt").write_text("hello")
    run("save", src, "--tag", "t", repo=repo_dir)
    out = tmp_path / "out"
    text = run("restore", "t", out, "--include", "*.safetensors", repo=repo_dir).stdout
    assert "1 left out" in text
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == ["sub", "sub/a.safetensors"]
    proc = run("restore", "t", tmp_path / "none", "--include", "*.bin", repo=repo_dir, ok=False)
    assert_one_line_error(proc, 2, "holds no file")
    # a non-empty target needs --force
    assert_one_line_error(run("restore", "t", out, repo=repo_dir, ok=False), 2, "not empty; pass --force")
    run("restore", "t", out, "--force", repo=repo_dir)
    assert tree_facts(out) == tree_facts(src)


def test_paths_never_escape_the_target(repo_dir: Path, tmp_path: Path) -> None:
    evil = {"cas.files": 1, "dirs": {}, "files": {"../escaped.txt": {
        "mode": 0o644, "mtime_ns": 0, "size": 2, "sha256": hashlib.sha256(b"hi").digest(), "format": "raw",
        "tensors": {}, "raw": {}, "layout": [b"hi"]}}}
    with cas.Repository.open(repo_dir) as repo:
        repo.save(evil, tag="evil")
    out = tmp_path / "out"
    assert_one_line_error(run("restore", "evil", out, repo=repo_dir, ok=False), 7, "could lead outside the target")
    assert not (tmp_path / "escaped.txt").exists()
    # a symlink inside the target is never written through
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "f.txt").write_text("x")
    run("save", src, "--tag", "s", repo=repo_dir)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    target = tmp_path / "target"
    target.mkdir()
    (target / "sub").symlink_to(elsewhere)
    proc = run("restore", "s", target, "--force", repo=repo_dir, ok=False)
    assert_one_line_error(proc, 2, "symlink")
    assert not list(elsewhere.iterdir())


def test_a_file_that_does_not_match_its_hash_is_not_written(repo_dir: Path, tmp_path: Path) -> None:
    bad = {"cas.files": 1, "dirs": {}, "files": {"a.txt": {
        "mode": 0o644, "mtime_ns": 0, "size": 2, "sha256": b"\0" * 32, "format": "raw",
        "tensors": {}, "raw": {}, "layout": [b"hi"]}}}
    with cas.Repository.open(repo_dir) as repo:
        repo.save(bad, tag="bad")
    out = tmp_path / "out"
    assert_one_line_error(run("restore", "bad", out, repo=repo_dir, ok=False), 7, "another sha256")
    assert list(out.iterdir()) == []


def test_build_state_reads_tensor_files_without_copies(tmp_path: Path) -> None:
    save_file({"w": torch.arange(4096, dtype=torch.float32)}, str(tmp_path / "m.safetensors"))
    files = build_state([tmp_path / "m.safetensors"])
    value = files.state["files"]["m.safetensors"]
    assert value["format"] == "safetensors" and torch.equal(value["tensors"]["w"], torch.arange(4096.0))
    assert isinstance(value["layout"][0], bytes) and value["layout"][1] == ("t", "w")
    files.close()


def test_a_restore_loads_tensors_in_bounded_batches(repo_dir: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import cas.filebytes

    src = tmp_path / "run"
    src.mkdir()
    torch.manual_seed(0)
    save_file({f"t{i}": torch.randn(64, 64) for i in range(6)}, str(src / "m.safetensors"))
    run("save", src, "--tag", "t", repo=repo_dir)
    calls: list[int] = []
    real = cas.filebytes.PartLoader.__call__

    def counting(self: Any, paths: list[Any]) -> list[Any]:
        calls.append(len(paths))
        return real(self, paths)

    monkeypatch.setattr(cas.filebytes, "RESTORE_BATCH_BYTES", 2 * 64 * 64 * 4)  # two tensors a load
    monkeypatch.setattr(cas.filebytes.PartLoader, "__call__", counting)
    run("restore", "t", tmp_path / "out", repo=repo_dir)
    assert tree_facts(tmp_path / "out") == tree_facts(src)
    assert calls == [5, 2, 2, 2]  # the file's fields, then 6 tensors two at a time


def test_sparse_restore_leaves_zero_runs_as_holes_with_the_same_bytes(repo_dir: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    data = bytearray(os.urandom(100_000)) + bytes(8 << 20) + bytearray(os.urandom(5_000)) + bytes(3 << 20)
    (src / "disk.img").write_bytes(data)  # zeros in the middle and at the end
    save_file({"w": torch.zeros(1 << 20), "b": torch.randn(1000)}, str(src / "weights.safetensors"))
    run("save", src, "--tag", "img", repo=repo_dir)
    dense, sparse = tmp_path / "dense", tmp_path / "sparse"
    run("restore", "img", dense, repo=repo_dir)
    run("restore", "img", sparse, "--sparse", repo=repo_dir)
    for name in ("disk.img", "weights.safetensors"):
        assert (sparse / name).read_bytes() == (src / name).read_bytes() == (dense / name).read_bytes()
        assert os.stat(sparse / name).st_size == os.stat(src / name).st_size
    # holes: the 11 MiB of zeros take (almost) no blocks; the dense copy has them all
    assert os.stat(sparse / "disk.img").st_blocks * 512 < 400_000 < os.stat(dense / "disk.img").st_blocks * 512
    assert os.stat(sparse / "weights.safetensors").st_blocks * 512 < (1 << 20)  # the 4 MiB zero tensor
    single = tmp_path / "one.img"
    run("restore", "img", single, "--include", "disk.img", "--sparse", repo=repo_dir)
    assert single.read_bytes() == bytes(data) and os.stat(single).st_blocks * 512 < 400_000


def test_sparse_restore_refuses_what_it_would_re_serialize(repo_dir: Path, tmp_path: Path) -> None:
    with cas.Repository.open(repo_dir) as repo:
        repo.save({"w": torch.zeros(10)}, tag="state")
    assert_one_line_error(run("restore", "state", tmp_path / "x.pt", "--sparse", repo=repo_dir, ok=False), 2,
                          "--sparse restores a file backup's files as they were stored")
    src = tmp_path / "src"
    src.mkdir()
    save_file({"w": torch.zeros(10)}, str(src / "m.safetensors"))
    run("save", src / "m.safetensors", "--tag", "file", repo=repo_dir)
    assert_one_line_error(run("restore", "file", tmp_path / "m.pt", "--sparse", repo=repo_dir, ok=False), 2,
                          "--sparse restores files as they were stored; m.pt re-serializes them as .pt")


def test_hard_links_come_back_as_hard_links(repo_dir: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    save_file({"w": torch.randn(50_000)}, str(src / "sub" / "model.safetensors"))
    os.link(src / "sub" / "model.safetensors", src / "a-link.safetensors")  # sorts before its first name's dir
    (src / "solo.txt").write_text("alone\n")
    run("save", src, "--tag", "links", repo=repo_dir)
    with cas.Repository.open(repo_dir) as repo:
        listing = {f["path"]: f for f in repo.files("links") or [] if f["kind"] == "file"}
    links = {p: f.get("link") for p, f in listing.items()}
    assert sorted(v for v in links.values() if v) == [min("a-link.safetensors", "sub/model.safetensors")]
    out = tmp_path / "out"
    run("restore", "links", out, repo=repo_dir)
    a, b = os.stat(out / "a-link.safetensors"), os.stat(out / "sub" / "model.safetensors")
    assert (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino) and a.st_nlink == 2
    assert (out / "a-link.safetensors").read_bytes() == (src / "a-link.safetensors").read_bytes()
    assert os.stat(out / "solo.txt").st_nlink == 1
    run("restore", "links", out, "--force", repo=repo_dir)  # over an existing tree: still one inode, two names
    assert os.stat(out / "a-link.safetensors").st_ino == os.stat(out / "sub" / "model.safetensors").st_ino
    alone = tmp_path / "alone"  # the other name left out: this one gets the bytes
    linked = next(p for p, v in links.items() if v)
    run("restore", "links", alone, "--include", linked, repo=repo_dir)
    assert (alone / linked).read_bytes() == (src / linked).read_bytes() and os.stat(alone / linked).st_nlink == 1
