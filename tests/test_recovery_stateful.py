"""Stateful tests of the recovery paths: any sequence of saves, deletes, gc, repack, rebuild, repair,
index loss, stale-index restores, damage and reopens keeps every intact snapshot bit-identical.

The model is a plain dict, tag -> the tensors the snapshot holds (numpy copies), plus the set of
snapshots whose bytes *may* have been destroyed: when a rule flips a bit in a pack file, every
snapshot that reaches any chunk of that pack (its nodes, its tensors' chunks and their delta bases,
read from the pack footers before the damage) is marked "may be lost", and so is every later
snapshot that reaches one of those chunks. Invariants, after every rule, on a freshly opened
handle:

* every snapshot not marked loads bit-identically (same keys, dtype, shape, bytes);
* a marked snapshot either loads bit-identically or raises a ``cas.CasError``: never wrong bytes;
* a snapshot that loaded after one rule still loads after the next, unless that rule was damage,
  or an index loss or stale-index swap and the snapshot is marked (its only intact copy of a node
  may have been the index's cached one): nothing that verified before a recovery command fails
  after it;
* ``verify(read_data=True)`` names only marked snapshots (and reports pack problems only once
  damage was done);
* ``snapshots()`` lists every snapshot not marked, and none that was deleted.

Rules that must always work: save (a damaged snapshot does not block saves), delete (even of a
damaged snapshot), listing, opening (or, when opening refuses, ``cas index rebuild`` and then
opening). gc, rebuild_index and check(repair=True) may refuse with a ``cas.CasError``; no other
exception may escape any rule.

``test_recovery_state_machine`` is the Hypothesis machine (``CAS_STATEFUL_EXAMPLES``,
``CAS_STATEFUL_STEPS`` and ``CAS_STATEFUL_SHRINK=1`` tune it; shrinking is off by default to keep
a failing run short, the seed to reproduce is printed). ``test_fixed_long_sequence`` runs one
seeded sequence of 40 rules.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

import cas
from cas.pack import HEADER, TRAILER, PackEntry, read_footer
from tests.recovery_worker import ROOT, pack_files, reached_chunks, scanned_chunk_ids

CHUNK = 16 << 10
PACK = 32 << 10
CAS = Path(sys.executable).parent / "cas"
EXAMPLES = int(os.environ.get("CAS_STATEFUL_EXAMPLES", "25"))
STEPS = int(os.environ.get("CAS_STATEFUL_STEPS", "30"))
REGIONS = ("anywhere", "payload", "record_header", "footer", "trailer", "header")

State = dict[str, np.ndarray]


def cli(repo: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("CAS_REPO", "CAS_CRASH_AT")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    return subprocess.run([str(CAS), "--repo", str(repo), *args], capture_output=True, text=True, env=env,
                          timeout=180, check=False)


def to_torch(state: State) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v.copy()) for k, v in state.items()}


class RecoveryModel:
    """A repository on disk and what it must hold; every rule is a method, ``check`` the invariants."""

    def __init__(self, root: Path, seed: int = 0) -> None:
        self.root = root
        self.path = root / "repo"
        self.repo = cas.Repository.init(self.path, chunk_size=CHUNK, pack_size=PACK, threads=2)
        rng = np.random.default_rng(seed)
        self.current: State = {
            "emb": rng.standard_normal((256, 64), dtype=np.float32),  # sparse row updates: sparse deltas
            "w": rng.standard_normal(8192, dtype=np.float32),  # dense updates: dense deltas
        }
        self.expected: dict[str, State] = {}
        self.ids: dict[str, bytes] = {}
        self.maybe_lost: set[str] = set()
        self.tainted: set[bytes] = set()  # chunk ids that were in a pack when it was damaged
        self.damaged = False
        self.footer_cache: dict[str, list[PackEntry]] = {}
        self.pack_order: list[str] = []  # every pack name seen, in a replayable order
        self.stash: Path | None = None
        self.loadable: set[str] = set()  # what loaded at the last check
        self.last_rule = "init"
        self.saves = 0
        self.extras = 0
        self.log: list[str] = []
        self.save("identical", 0)

    # plumbing ----------------------------------------------------------------------------------------
    def note(self, text: str) -> None:
        self.refresh_footers()  # what the previous rule wrote, before this one changes anything
        self.last_rule = text.split("(", 1)[0]
        self.log.append(text)

    def where(self) -> str:
        return "after " + " -> ".join(self.log[-12:])

    def open(self) -> cas.Repository:
        try:
            return cas.Repository.open(self.path, threads=2)
        except cas.CasError as exc:  # refused (a damaged or stale index): the documented way out
            refused = exc
        proc = cli(self.path, "index", "rebuild")
        assert proc.returncode in (0, 1) and "Traceback" not in proc.stderr, (
            f"open refused ({refused}) and `cas index rebuild` failed: {proc.stderr[-2000:]} ({self.where()})"
        )
        return cas.Repository.open(self.path, threads=2)

    def close(self) -> None:
        self.repo.close()

    def reopen(self) -> None:
        self.note("reopen")
        self.close()
        self.repo = self.open()

    def refresh_footers(self) -> dict[str, list[PackEntry]]:
        """Footers of every pack on disk; a pack whose footer no longer parses keeps its cached one."""
        files = pack_files(self.path)
        seen = set(self.pack_order)
        # first seen first; packs that appeared together by size: pack names hash snapshot times, so
        # ordering by name would make a replayed example damage another pack
        self.pack_order += sorted((n for n in files if n not in seen), key=lambda n: (files[n].stat().st_size, n))
        for name, path in files.items():
            if name not in self.footer_cache:
                try:
                    self.footer_cache[name] = read_footer(path)
                except cas.CasError:
                    continue
        return {n: e for n, e in self.footer_cache.items() if n in files}

    def mark_tainted(self, tags: list[str]) -> None:
        if not self.tainted:
            return
        fts = self.refresh_footers()
        for tag in tags:
            if tag not in self.maybe_lost:
                torch_state = to_torch(self.expected[tag])
                if reached_chunks(self.path, self.ids[tag], torch_state, CHUNK, fts) & self.tainted:
                    self.maybe_lost.add(tag)

    # rules ----------------------------------------------------------------------------------------
    def save(self, kind: str, seed: int) -> None:
        rng = np.random.default_rng(seed)
        state = {k: v.copy() for k, v in self.current.items()}
        if kind == "sparse":
            rows = rng.choice(state["emb"].shape[0], size=3, replace=False)
            state["emb"][rows] += rng.standard_normal((3, state["emb"].shape[1]), dtype=np.float32) * 1e-3
        elif kind == "dense":
            state["w"] += rng.standard_normal(state["w"].shape, dtype=np.float32) * 1e-4
        elif kind == "new":
            self.extras += 1
            state[f"x{self.extras}"] = rng.standard_normal(int(rng.integers(1000, 6000)), dtype=np.float32)
            extra = sorted((k for k in state if k.startswith("x")), key=lambda k: int(k[1:]))
            for old in extra[:-2]:  # at most two extra tensors
                del state[old]
        tag = f"t{self.saves}"
        self.saves += 1
        self.note(f"save({kind}, {tag})")
        snap = self.repo.save(to_torch(state), tag)  # must work: damage elsewhere never blocks a save
        self.current = state
        self.expected[tag] = state
        self.ids[tag] = bytes.fromhex(snap.id)
        self.mark_tainted([tag])

    def delete(self, pick: int) -> None:
        tag = sorted(self.expected)[pick % len(self.expected)]
        self.note(f"delete({tag})")
        self.repo.delete(tag)  # must work, also for a damaged snapshot
        del self.expected[tag]
        self.maybe_lost.discard(tag)
        self.loadable.discard(tag)

    def recovery(self, name: str, call: Callable[[], Any]) -> None:
        self.note(name)
        try:
            call()
        except cas.CasError as exc:  # refusing is allowed; the invariants say what must hold anyway
            self.log[-1] += f" refused: {type(exc).__name__}"

    def gc(self, repack_below: float) -> None:
        self.recovery(f"gc({repack_below})", lambda: self.repo.gc(repack_below=repack_below))

    def rebuild_index(self) -> None:
        self.recovery("rebuild_index", self.repo.rebuild_index)

    def repair(self) -> None:
        self.recovery("check_repair", lambda: self.repo.check(repair=True))

    def lose_index(self) -> None:
        self.note("lose_index")
        self.close()
        shutil.rmtree(self.path / "index")
        self.repo = self.open()

    def stash_index(self) -> None:
        self.note("stash_index")
        self.close()
        stash = self.root / "stash"
        if stash.exists():
            shutil.rmtree(stash)
        shutil.copytree(self.path / "index", stash)
        self.stash = stash
        self.repo = self.open()

    def restore_stale_index(self) -> None:
        assert self.stash is not None
        self.note("restore_stale_index")
        self.close()
        shutil.rmtree(self.path / "index")
        shutil.copytree(self.stash, self.path / "index")
        self.repo = self.open()

    def damage(self, pick: int, region: str, pos: int, mask: int) -> None:
        files = pack_files(self.path)
        if not files:
            return
        fts = self.refresh_footers()
        order = [n for n in self.pack_order if n in files]
        name = order[pick % len(order)]
        path = files[name]
        size = path.stat().st_size
        entries = fts.get(name)
        try:
            footer_at = int(TRAILER.unpack_from(path.read_bytes(), size - TRAILER.size)[0])
        except Exception:  # noqa: BLE001 - an already damaged trailer: fall back to "anywhere"
            footer_at = -1
        lo, hi = 0, size
        if region == "header":
            lo, hi = 0, HEADER.size
        elif region == "trailer":
            lo = size - TRAILER.size
        elif region == "footer" and 0 < footer_at < size - TRAILER.size:
            lo, hi = footer_at, size - TRAILER.size
        elif region in ("payload", "record_header") and entries:
            e = entries[pos % len(entries)]
            lo, hi = (e.offset, e.offset + e.stored_length) if region == "payload" else (e.offset - 88, e.offset)
        offset = lo + pos % max(1, hi - lo)
        self.note(f"damage({name[:8]} {region} @{offset} ^{mask:#x})")
        with open(path, "r+b") as f:
            f.seek(offset)
            byte = f.read(1)
            f.seek(offset)
            f.write(bytes([byte[0] ^ mask]))
        self.damaged = True
        self.tainted |= {bytes(e.chunk_id) for e in entries or []} | scanned_chunk_ids(path)
        self.mark_tainted(sorted(self.expected))

    # invariants ------------------------------------------------------------------------------------
    def check(self) -> None:
        repo = self.open()  # a fresh handle: nothing the rules' handle cached
        try:
            self._check(repo)
        finally:
            repo.close()

    def _check(self, repo: cas.Repository) -> None:
        loaded: set[str] = set()
        for tag, want in sorted(self.expected.items()):
            failed: cas.CasError | None = None
            try:
                got = repo.load(tag)
            except cas.CasError as exc:
                failed = exc
            if failed is not None:
                assert tag in self.maybe_lost, f"intact snapshot {tag} does not load: {failed!r} ({self.where()})"
                # A damaged snapshot's only intact copy of a node may have lived in the index (its
                # cache of snapshot nodes): losing or swapping the index may take it. A recovery
                # command may not (nothing that verified before one fails after it).
                index_event = self.last_rule in ("lose_index", "restore_stale_index")
                assert tag not in self.loadable or self.last_rule == "damage" or index_event, (
                    f"{tag} loaded before {self.last_rule}, not after: {failed!r} ({self.where()})"
                )
                continue
            assert isinstance(got, dict) and list(got) == list(want), f"{tag}: keys {list(got)} ({self.where()})"
            for key, arr in want.items():
                t = got[key]
                ref = torch.from_numpy(arr)
                assert t.dtype == ref.dtype and t.shape == ref.shape, f"{tag}/{key}: {t.dtype}{tuple(t.shape)}"
                assert torch.equal(t, ref), f"{tag}/{key}: wrong values loaded ({self.where()})"
            loaded.add(tag)
        self.loadable = loaded

        report = repo.verify(read_data=True)
        for problem in report.problems:
            if problem.snapshot is None:
                assert self.damaged, f"verify: {problem} with no damage done ({self.where()})"
                continue
            label = problem.snapshot.split(" (")[0]
            tags = {t for t in self.expected if label in (t, self.ids[t].hex()[:12])}
            assert tags and tags <= self.maybe_lost, f"verify: {problem} names an intact snapshot ({self.where()})"

        listed = {s.tag for s in repo.snapshots()}
        intact = set(self.expected) - self.maybe_lost
        assert intact <= listed, f"snapshots() misses {sorted(intact - listed)} ({self.where()})"
        assert listed <= set(self.expected), f"snapshots() lists deleted {sorted(listed - set(self.expected))}"


# the Hypothesis machine ---------------------------------------------------------------------------


class RecoveryMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.root = Path(tempfile.mkdtemp(prefix="cas-stateful-"))
        self.model = RecoveryModel(self.root, seed=0)

    def teardown(self) -> None:
        try:
            self.model.close()
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    @rule(kind=st.sampled_from(["sparse", "dense", "new", "identical"]), seed=st.integers(0, 2**16))
    def save(self, kind: str, seed: int) -> None:
        self.model.save(kind, seed)

    @rule(pick=st.integers(0, 2**16))
    def delete(self, pick: int) -> None:
        if len(self.model.expected) > 1:  # (a rule, not a precondition: no invalid examples)
            self.model.delete(pick)

    @rule(repack_below=st.sampled_from([0.0, 0.5, 0.9, 1.0]))
    def gc(self, repack_below: float) -> None:
        self.model.gc(repack_below)

    @rule()
    def rebuild_index(self) -> None:
        self.model.rebuild_index()

    @rule()
    def repair(self) -> None:
        self.model.repair()

    @rule()
    def lose_index(self) -> None:
        self.model.lose_index()

    @rule()
    def stash_index(self) -> None:
        self.model.stash_index()

    @rule()
    def restore_stale_index(self) -> None:
        if self.model.stash is not None:
            self.model.restore_stale_index()

    @rule(pick=st.integers(0, 2**16), region=st.sampled_from(REGIONS), pos=st.integers(0, 2**31),
          mask=st.sampled_from([1 << b for b in range(8)]))
    def damage(self, pick: int, region: str, pos: int, mask: int) -> None:
        self.model.damage(pick, region, pos, mask)

    @rule()
    def reopen(self) -> None:
        self.model.reopen()

    @invariant()
    def holds(self) -> None:
        self.model.check()


_phases = [Phase.explicit, Phase.reuse, Phase.generate]
if os.environ.get("CAS_STATEFUL_SHRINK") == "1":
    _phases.append(Phase.shrink)

RecoveryMachine.TestCase.settings = settings(
    max_examples=EXAMPLES, stateful_step_count=STEPS, deadline=None, phases=_phases, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
test_recovery_state_machine = RecoveryMachine.TestCase


# one fixed long sequence ------------------------------------------------------------------------------

RULE_WEIGHTS = {
    "save": 8, "delete": 3, "gc": 3, "rebuild_index": 2, "repair": 2, "lose_index": 1, "stash_index": 1,
    "restore_stale_index": 2, "damage": 2, "reopen": 1,
}


def test_fixed_long_sequence(tmp_path: Path) -> None:
    rng = random.Random(20250101)
    model = RecoveryModel(tmp_path, seed=1)
    try:
        model.check()
        names = list(RULE_WEIGHTS)
        weights = [RULE_WEIGHTS[n] for n in names]
        for _ in range(40):
            name = rng.choices(names, weights)[0]
            if name == "save":
                model.save(rng.choice(["sparse", "dense", "new", "identical"]), rng.randrange(2**16))
            elif name == "delete":
                if len(model.expected) <= 1:
                    continue
                model.delete(rng.randrange(2**16))
            elif name == "gc":
                model.gc(rng.choice([0.0, 0.5, 0.9, 1.0]))
            elif name == "restore_stale_index":
                if model.stash is None:
                    continue
                model.restore_stale_index()
            elif name == "damage":
                model.damage(rng.randrange(2**16), rng.choice(REGIONS), rng.randrange(2**31), 1 << rng.randrange(8))
            else:
                getattr(model, name)()
            model.check()
    finally:
        model.close()
