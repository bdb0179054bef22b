"""Many threads of one process opening and closing the same repository at once: LMDB allows one
environment per file per process, so a release racing an open must never leave a closed-but-known
or a forgotten-but-open environment behind; and the topology cache is written by each opener."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

import cas


def test_threads_open_and_close_one_repository_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CAS_CACHE_DIR", str(tmp_path / "cache"))
    with cas.Repository.init(tmp_path / "repo") as repo:
        repo.save({"w": torch.arange(10.0)}, tag="a")
    errors: list[BaseException] = []

    def churn() -> None:
        try:
            for _ in range(25):
                with cas.Repository.open(tmp_path / "repo") as r:
                    assert r.resolve("a").tag == "a"
        except BaseException as exc:  # noqa: BLE001 - asserted below
            errors.append(exc)

    threads = [threading.Thread(target=churn) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    with cas.Repository.open(tmp_path / "repo") as r:
        assert torch.equal(r.load("a")["w"], torch.arange(10.0))
