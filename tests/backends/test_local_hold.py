"""The local backend's held pack descriptors: one open per pack inside a hold, none after it."""

from __future__ import annotations

import os
import threading
from pathlib import Path

from cas.backends.local import LocalBackend


def open_fds_under(root: Path) -> list[str]:
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(str(root)):
            out.append(target)
    return out


def test_hold_keeps_one_descriptor_per_pack_and_releases_all(tmp_path: Path) -> None:
    b = LocalBackend(tmp_path)
    b.write("packs/aa/one.pack", b"0123456789")
    b.write("refs/x", b"ref")
    with b.hold_open():
        for i in range(5):
            assert b.read_range("packs/aa/one.pack", i, 2) == b"0123456789"[i : i + 2]
        dest = bytearray(4)
        b.read_into("packs/aa/one.pack", 3, memoryview(dest))
        assert bytes(dest) == b"3456"
        assert b.read("refs/x") == b"ref"  # not a pack: never held
        held = open_fds_under(tmp_path)
        assert len(held) == 1 and held[0].endswith("one.pack"), held
        with b.hold_open():  # nested holds share the descriptors
            assert b.read_suffix("packs/aa/one.pack", 3) == b"789"
        assert len(open_fds_under(tmp_path)) == 1
    assert open_fds_under(tmp_path) == []


def test_delete_inside_a_hold_closes_the_descriptor(tmp_path: Path) -> None:
    b = LocalBackend(tmp_path)
    b.write("packs/aa/one.pack", b"abcdef")
    with b.hold_open():
        assert b.read_range("packs/aa/one.pack", 0, 3) == b"abc"
        b.delete("packs/aa/one.pack")
        assert not any("(deleted)" in t for t in open_fds_under(tmp_path))
        b.write("packs/aa/one.pack", b"uvwxyz")  # a new object under the key is read, not the old file
        assert b.read_range("packs/aa/one.pack", 0, 3) == b"uvw"
    assert open_fds_under(tmp_path) == []


def test_threads_reading_while_the_hold_ends(tmp_path: Path) -> None:
    b = LocalBackend(tmp_path)
    data = os.urandom(1 << 16)
    for i in range(4):
        b.write(f"packs/aa/p{i}.pack", data)
    errors: list[BaseException] = []

    def reader() -> None:
        try:
            for j in range(300):
                got = b.read_range(f"packs/aa/p{j % 4}.pack", j, 64)
                assert got == data[j : j + 64]
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    for _ in range(5):
        threads = [threading.Thread(target=reader) for _ in range(3)]
        with b.hold_open():
            for t in threads:
                t.start()
        for t in threads:
            t.join()
    assert not errors, errors
    assert open_fds_under(tmp_path) == []
