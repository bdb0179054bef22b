from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from cas.cli import main
from cas.pack import ChunkKind, pack_path
from cas.repository import Repository
from tests.helpers import assert_same, repo_files

CAS = Path(sys.executable).parent / "cas"


def run(
    *args: str | Path, repo: Path | None = None, ok: bool = True, subprocess_: bool = False
) -> subprocess.CompletedProcess[str]:
    """Run the CLI: in this process through ``cas.cli.main`` (fast), or as the real console script."""
    argv = [str(a) for a in args]
    if subprocess_:
        env = dict(os.environ)
        env.pop("CAS_REPO", None)
        if repo is not None:
            env["CAS_REPO"] = str(repo)
        proc = subprocess.run([str(CAS), *argv], capture_output=True, text=True, env=env, timeout=300, check=False)
    else:
        out, err = io.StringIO(), io.StringIO()
        old = os.environ.pop("CAS_REPO", None)
        if repo is not None:
            os.environ["CAS_REPO"] = str(repo)
        code = 0
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                try:
                    main(argv)
                except SystemExit as exc:
                    code = exc.code if isinstance(exc.code, int) else 1
        finally:
            os.environ.pop("CAS_REPO", None)
            if old is not None:
                os.environ["CAS_REPO"] = old
        proc = subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())
    if ok:
        assert proc.returncode == 0, proc.stderr
    return proc


def assert_one_line_error(proc: subprocess.CompletedProcess[str], code: int, text: str) -> None:
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cas: error: ") and text in lines[0], proc.stderr


@pytest.fixture
def repo_dir(tmp_path: Path) -> Path:
    path = tmp_path / "repo"
    run("--repo", path, "init", "--chunk-size", "64K")
    return path


def model_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(100, 200), torch.nn.LayerNorm(200), torch.nn.Linear(200, 10))
    return m.state_dict()


def test_pt_round_trip(repo_dir: Path, tmp_path: Path) -> None:
    sd = {"model": model_state(), "step": 7, "rng": torch.get_rng_state(), "bf": torch.randn(33).bfloat16()}
    torch.save(sd, tmp_path / "ckpt.pt")
    out = run("save", tmp_path / "ckpt.pt", "--tag", "s7", "--meta", "step=7", repo=repo_dir, subprocess_=True)
    assert "saved snapshot" in out.stdout
    run("restore", "s7", tmp_path / "back.pt", repo=repo_dir, subprocess_=True)
    assert (tmp_path / "back.pt").read_bytes() == (tmp_path / "ckpt.pt").read_bytes()  # byte for byte
    assert_same(torch.load(tmp_path / "back.pt", weights_only=True), sd)
    snaps = json.loads(run("ls", "--json", repo=repo_dir).stdout)
    assert [s["tag"] for s in snaps] == ["s7"] and snaps[0]["metadata"]["step"] == 7
    assert snaps[0]["metadata"]["source"]["kind"] == "files" and snaps[0]["metadata"]["source"]["files"] == 1
    shown = json.loads(run("show", "s7", "--json", repo=repo_dir).stdout)
    assert shown["files"][0]["path"] == "ckpt.pt" and shown["files"][0]["format"] == "torch"
    dtypes = {t["dtype"] for t in shown["tensors"]}
    assert {"float32", "bfloat16", "uint8"} <= dtypes  # storages typed from the pickle's opcodes
    # restore refuses to overwrite without --force
    proc = run("restore", "s7", tmp_path / "back.pt", repo=repo_dir, ok=False, subprocess_=True)
    assert_one_line_error(proc, 2, "exists; pass --force")
    run("restore", "s7", tmp_path / "back.pt", "--force", repo=repo_dir)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    # --format pt re-serializes (the old behaviour): same state, not the same bytes
    run("restore", "s7", tmp_path / "again.pt", "--format", "pt", repo=repo_dir)
    assert_same(torch.load(tmp_path / "again.pt", weights_only=True), sd)


def test_state_import_keeps_the_checkpoint_contents(repo_dir: Path, tmp_path: Path) -> None:
    sd = {"model": model_state(), "step": 7, "bf": torch.randn(33).bfloat16()}
    torch.save(sd, tmp_path / "ckpt.pt")
    run("save", tmp_path / "ckpt.pt", "--state", "--tag", "s7", repo=repo_dir)
    snaps = json.loads(run("ls", "--json", repo=repo_dir).stdout)
    assert snaps[0]["metadata"]["source"] == {"file": "ckpt.pt", "format": "torch"}
    shown = json.loads(run("show", "s7", "--json", repo=repo_dir).stdout)
    paths = {t["path"]: t for t in shown["tensors"]}
    assert paths["model/0.weight"]["shape"] == [200, 100] and paths["bf"]["dtype"] == "bfloat16"
    with Repository.open(repo_dir) as repo:
        assert_same(repo.load("s7"), sd)
    run("restore", "s7", tmp_path / "back.pt", repo=repo_dir)
    assert_same(torch.load(tmp_path / "back.pt", weights_only=True), sd)


def test_safetensors_round_trip(repo_dir: Path, tmp_path: Path) -> None:
    tensors = {"emb": torch.randn(300, 64), "norm": torch.ones(64, dtype=torch.float16), "ids": torch.arange(10)}
    src = tmp_path / "model.safetensors"
    save_file(tensors, str(src), metadata={"format": "pt", "note": "hello"})
    run("--repo", repo_dir, "save", src, "-t", "st")
    out = tmp_path / "out.safetensors"
    run("--repo", repo_dir, "restore", "st", out)
    assert out.read_bytes() == src.read_bytes()  # header and key order included
    # a .pt name converts (re-serializes), as --format pt does
    run("--repo", repo_dir, "restore", "st", tmp_path / "out.pt")
    back, want = torch.load(tmp_path / "out.pt", weights_only=True), load_file(str(src))
    assert_same(dict(sorted(back.items())), dict(sorted(want.items())))


def test_directory_import_and_diff(repo_dir: Path, tmp_path: Path) -> None:
    d = tmp_path / "run"
    d.mkdir()
    torch.save({"w": torch.zeros(10)}, d / "a.pt")
    save_file({"v": torch.ones(5)}, str(d / "b.safetensors"))
    run("save", d, "--tag", "one", repo=repo_dir)
    torch.save({"w": torch.ones(10)}, d / "a.pt")
    run("save", d, "--tag", "two", repo=repo_dir)
    diff = json.loads(run("diff", "one", "two", "--json", repo=repo_dir).stdout)
    assert diff["changed"] == ["files/a.pt/tensors/data/0"] and diff["unchanged"] == ["files/b.safetensors/tensors/v"]
    text = run("diff", "one", "two", repo=repo_dir).stdout
    assert "M files/a.pt/tensors/data/0" in text and "1 changed" in text
    stats = json.loads(run("stats", "--json", repo=repo_dir).stdout)
    assert stats["snapshot_count"] == 2 and stats["stored_bytes"] > 0 and stats["ratio"] > 0
    assert "overall ratio" in run("stats", repo=repo_dir).stdout
    run("rm", "one", repo=repo_dir)
    assert [s["tag"] for s in json.loads(run("ls", "--json", repo=repo_dir).stdout)] == ["two"]


def test_errors_are_one_line_and_change_nothing(repo_dir: Path, tmp_path: Path) -> None:
    torch.save({"w": torch.zeros(4)}, tmp_path / "ok.pt")
    run("save", tmp_path / "ok.pt", "--tag", "base", repo=repo_dir)
    before = repo_files(repo_dir)
    (tmp_path / "notes.pt").write_text("this is not a checkpoint")
    assert_one_line_error(run("save", tmp_path / "notes.pt", repo=repo_dir, ok=False), 6,
                          "not a readable torch.save archive")
    assert_one_line_error(run("save", tmp_path / "notes.pt", "--state", repo=repo_dir, ok=False), 6,
                          "not a PyTorch checkpoint")
    (tmp_path / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage")
    assert_one_line_error(run("save", tmp_path / "bad.safetensors", repo=repo_dir, ok=False), 6, "safetensors")
    (tmp_path / "x.txt").write_text("x")
    assert_one_line_error(run("save", tmp_path / "x.txt", "--state", repo=repo_dir, ok=False), 6,
                          "unknown checkpoint type")
    assert_one_line_error(run("save", tmp_path / "nope.pt", repo=repo_dir, ok=False), 6, "does not exist")
    assert_one_line_error(run("restore", "nope", tmp_path / "o.pt", repo=repo_dir, ok=False), 4, "no snapshot named")
    assert_one_line_error(run("save", tmp_path / "ok.pt", "--tag", "base", repo=repo_dir, ok=False), 2,
                          "already names")
    assert_one_line_error(run("ls", repo=tmp_path, ok=False), 3, "not a cas repository")
    assert_one_line_error(run("ls", ok=False), 2, "no repository given")
    assert repo_files(repo_dir) == before


def test_verify_exit_codes(repo_dir: Path, tmp_path: Path) -> None:
    torch.save({"w": torch.randn(50_000)}, tmp_path / "c.pt")
    run("save", tmp_path / "c.pt", "--tag", "c", repo=repo_dir)
    report = json.loads(run("verify", "--read-data", "--json", repo=repo_dir).stdout)
    assert report["ok"] is True and report["problems"] == []
    with Repository.open(repo_dir) as repo:
        loc = next(loc for _c, loc in repo.index.iter_chunks() if loc.kind == ChunkKind.DATA)
    path = pack_path(repo_dir / "packs", loc.pack_id)
    data = bytearray(path.read_bytes())
    data[loc.offset + 10] ^= 0xFF
    path.write_bytes(bytes(data))
    assert run("verify", repo=repo_dir).returncode == 0  # no data read: bit rot is invisible
    proc = run("verify", "--read-data", repo=repo_dir, ok=False)
    assert proc.returncode == 1
    assert "corrupt-chunk" in proc.stdout and "tensor files/c.pt/tensors/data/0" in proc.stdout
    report = json.loads(run("verify", "--read-data", "--json", repo=repo_dir, ok=False).stdout)
    assert report["ok"] is False and any(p["tensor"] == "files/c.pt/tensors/data/0" for p in report["problems"])
    proc = run("restore", "c", tmp_path / "o.pt", repo=repo_dir, ok=False)
    assert_one_line_error(proc, 7, "tensor files/c.pt/tensors/data/0")
    assert not (tmp_path / "o.pt").exists()


def test_restore_nested_to_safetensors_is_refused(repo_dir: Path, tmp_path: Path) -> None:
    torch.save({"model": {"w": torch.zeros(2)}}, tmp_path / "n.pt")
    run("save", tmp_path / "n.pt", "--tag", "n", repo=repo_dir)
    proc = run("restore", "n", tmp_path / "n.safetensors", repo=repo_dir, ok=False)
    assert_one_line_error(proc, 5, "restore to .pt")
    assert not (tmp_path / "n.safetensors").exists()


def test_read_only_commands_do_not_import_torch(repo_dir: Path) -> None:
    code = "import sys, cas.cli; sys.exit(1 if 'torch' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_init_sets_the_delta_chain_bounds_and_refuses_bad_ones(tmp_path: Path) -> None:
    run("init", "--max-delta-depth", "3", "--max-chain-cost", "1.5", repo=tmp_path / "r")
    config = json.loads((tmp_path / "r" / "config.json").read_text())
    assert config["max_delta_depth"] == 3 and config["max_chain_cost"] == 1.5
    with Repository.open(tmp_path / "r") as repo:
        assert repo.max_delta_depth == 3 and repo.max_chain_cost == 1.5
    bad = run("init", "--max-chain-cost", "0.5", repo=tmp_path / "r2", ok=False)
    assert_one_line_error(bad, 2, "max_chain_cost must be a finite number of at least 1.0")
    assert not (tmp_path / "r2" / "config.json").exists()
    for cost in ("inf", "nan"):
        assert_one_line_error(run("init", "--max-chain-cost", cost, repo=tmp_path / "r3", ok=False), 2, "finite")
