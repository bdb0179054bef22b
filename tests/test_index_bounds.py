"""Index values a decision rests on are checked: a crafted location with a checksum that matches but a
raw length no chunk can have (2^50 bytes) is damage, found before anything is allocated, and the
index is rebuilt from the packs."""

from __future__ import annotations

from pathlib import Path

import lmdb

import cas
from cas.index import LOCATION, _seal
from tests.helpers import assert_same, make_state


def test_impossible_raw_length_in_the_index_is_damage_not_an_allocation(tmp_path: Path) -> None:
    path = tmp_path / "r"
    with cas.Repository.init(path, chunk_size=64 * 1024) as repo:
        repo.save(make_state(1), tag="a")
    env = lmdb.open(str(path / "index"), max_dbs=8, subdir=True)
    chunks = env.open_db(b"chunks")
    with env.begin(write=True, db=chunks) as txn:
        key, value = next(iter(txn.cursor()))
        key = bytes(key)
        fields = list(LOCATION.unpack(bytes(value)[:LOCATION.size]))
        fields[3] = 1 << 50  # raw length
        txn.put(key, _seal(key, LOCATION.pack(*fields)))
    env.close()
    with cas.Repository.open(path) as repo:
        assert_same(repo.load("a"), make_state(1))  # rebuilt from the packs, not a MemoryError
        assert repo.verify(read_data=True).ok
