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


def test_an_impossible_location_of_the_snapshot_node_is_rebuilt_by_verify_too(tmp_path: Path) -> None:
    """The snapshot node's own index entry is the damaged one: a load reads the node from the
    snapshot cache and never meets it, so verify is the first to; it must rebuild the index and
    verify again, not report the snapshot as damaged."""
    path = tmp_path / "r"
    with cas.Repository.init(path, chunk_size=64 * 1024) as repo:
        snap = repo.save(make_state(1), tag="a")
    env = lmdb.open(str(path / "index"), max_dbs=8, subdir=True)
    chunks = env.open_db(b"chunks")
    with env.begin(write=True, db=chunks) as txn:
        key = bytes.fromhex(snap.id)
        fields = list(LOCATION.unpack(bytes(txn.get(key))[:LOCATION.size]))
        fields[3] = 1 << 50
        txn.put(key, _seal(key, LOCATION.pack(*fields)))
    env.close()
    with cas.Repository.open(path) as repo:
        assert repo.verify(read_data=True).ok
        assert_same(repo.load("a"), make_state(1))
