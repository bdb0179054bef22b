"""CheckpointManager: what a training loop calls to save, keep and resume checkpoints.

``save`` stages the tensors to host memory (the only part the loop waits for) and
commits in a background thread; at most one save is in flight. Errors of the
background save are raised by the next call. Snapshots are tagged ``step-<step>``.
"""

from __future__ import annotations

import math
import numbers
import os
import threading
import time
import warnings
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cas import planes
from cas.arguments import check_public_kwargs
from cas.errors import CorruptionError, FormatVersionError, NotARepositoryError, UsageError
from cas.manifest import check_metadata
from cas.policy import IntervalPolicy, SaveState
from cas.reports import Snapshot
from cas.repository import Repository
from cas.retention import RetentionPolicy, apply_policy
from cas.staging import HostStager
from cas.statedict import encode_state

TAG_PREFIX = "step-"


@dataclass
class RestoreResult:
    step: int
    state_dict: Any
    metadata: dict[str, Any]
    snapshot: Snapshot
    fell_back: bool = False
    #: (tag, error) of newer snapshots that did not restore
    skipped: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class SaveRecord:
    step: int
    blocked_s: float  # time the caller waited in save()
    total_s: float  # until the commit (and its verify, for a full save)
    full: bool
    snapshot_id: str


def step_of_tag(tag: str | None) -> int | None:
    if tag and tag.startswith(TAG_PREFIX) and tag[len(TAG_PREFIX):].isdigit():
        return int(tag[len(TAG_PREFIX):])
    return None


class CheckpointManager:
    """Save every so often without stalling the loop; keep the right snapshots; resume.

    ``busy`` says what ``save`` does while the previous save is still committing:
    ``"wait"`` (default) blocks until it is done, ``"skip"`` returns False at once.
    Retention after each commit: ``max_to_keep`` (newest N), ``keep_every_steps``,
    ``keep_best=(metric, mode, n)``; other snapshots in the repository are never touched.
    """

    def __init__(
        self,
        repo_or_path: Repository | str | os.PathLike[str],
        *,
        policy: IntervalPolicy | None = None,
        max_to_keep: int | None = None,
        keep_every_steps: int | None = None,
        keep_best: tuple[str, str, int] | None = None,
        async_save: bool = True,
        busy: str = "wait",
        gc_every: int = 10,
        allow_pickle: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not isinstance(busy, str) or busy not in ("wait", "skip"):
            raise UsageError(f"CheckpointManager: busy must be 'wait' or 'skip', got {busy!r}")
        if policy is not None and not all(callable(getattr(policy, m, None))
                                          for m in ("due", "full_due", "retention_seconds")):
            raise UsageError(f"CheckpointManager: policy must be None or an interval policy such as "
                             f"cas.EveryNSteps(100), cas.EverySeconds(600), cas.YoungDaly(mtbf_s=...) or "
                             f"cas.StagePolicy('middle'), got {policy!r} ({type(policy).__name__})")
        if isinstance(gc_every, bool) or not isinstance(gc_every, int) or gc_every < 0:
            raise UsageError(f"CheckpointManager: gc_every must be a non-negative int (0: never gc), "
                             f"got {gc_every!r} ({type(gc_every).__name__})")
        # retention arguments are checked before a repository is opened or created
        rules = _retention_rules(max_to_keep, keep_every_steps, keep_best)
        if isinstance(repo_or_path, Repository):
            self.repo, self._owns_repo = repo_or_path, False
        else:
            location = os.fspath(repo_or_path)
            remote = "://" in location and not location.startswith("file://")
            try:
                self.repo = Repository.open(location)
            except NotARepositoryError:
                if not remote:
                    path = Path(location.removeprefix("file://"))
                    if path.exists() and any(path.iterdir()):
                        raise
                # an empty directory or prefix becomes a repository; init refuses anything else
                self.repo = Repository.init(location)
            self._owns_repo = True
        self.policy = policy
        self.retention = RetentionPolicy(**rules) if rules else None
        self.async_save = async_save
        self.busy = busy
        self.gc_every = gc_every
        self.allow_pickle = allow_pickle
        self.clock = clock
        self.history: list[SaveRecord] = []
        self._stager = HostStager()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="cas-save") if async_save else None
        if self._executor is not None:  # load the codec kernels off the training loop, before the first save
            self._executor.submit(planes.warm_up)
        self._inflight: Future[SaveRecord] | None = None
        self._error: BaseException | None = None
        self._lock = threading.Lock()
        self._last_step: int | None = None
        self._last_time: float | None = None
        self._last_full_time: float | None = None
        #: (last step, time, full-save time) before the save in flight, restored if it fails
        self._rollback: tuple[int | None, float | None, float | None] | None = None
        self._model_bytes = 0
        self._commits = 0
        self._parent_id: str | None = None
        self._closed = False

    # errors from the background ------------------------------------------------
    def _raise_pending(self) -> None:
        if self._inflight is not None and self._inflight.done():
            self._collect()
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def _collect(self) -> None:
        fut, self._inflight = self._inflight, None
        if fut is None:
            return
        rollback, self._rollback = self._rollback, None
        try:
            self.history.append(fut.result())
        except BaseException as exc:  # noqa: BLE001 - kept and re-raised by the next call
            self._error = exc
            if rollback is not None:  # the step did not commit: the interval counts from the last one that did
                self._last_step, self._last_time, self._last_full_time = rollback

    def wait(self) -> None:
        """Block until the save in flight is committed; raise its error if it failed."""
        if self._inflight is not None:
            futures_wait([self._inflight])
            self._collect()
        self._raise_pending()

    # policy -----------------------------------------------------------------------
    def _state(self, step: int) -> SaveState:
        cost = None
        if self.history:
            recent = self.history[-5:]
            cost = sum(r.blocked_s for r in recent) / len(recent)
        return SaveState(step, self.clock(), self._last_step, self._last_time, self._last_full_time, cost,
                         self._model_bytes)

    def should_save(self, step: int) -> bool:
        """Whether the interval policy says a save is due at ``step`` (True without a policy)."""
        _check_step(step)
        self._raise_pending()
        if self._last_step is not None and step <= self._last_step:
            return False
        return True if self.policy is None else self.policy.due(self._state(step))

    # save -------------------------------------------------------------------------
    def save(self, step: int, state_dict: Any, metrics: dict[str, Any] | None = None, force: bool = False,
             metadata: dict[str, Any] | None = None) -> bool:
        """Save ``state_dict`` as ``step-<step>`` if due (or ``force``); returns whether a save started.

        Returns once the tensors are copied to host memory; the commit runs in the
        background. Mutating the model after this call does not affect the snapshot.
        """
        if self._closed:
            raise UsageError("this CheckpointManager is closed")
        _check_step(step)
        self._raise_pending()
        if not force and not self.should_save(step):
            return False
        started = time.perf_counter()
        if self._inflight is not None:
            if self.busy == "skip" and not self._inflight.done():
                return False
            self.wait()
        full = bool(self.policy and self.policy.full_due(self._state(step)))
        meta = {**(metadata or {}), "step": step}
        if metrics is not None:
            meta["metrics"] = _plain_metrics(metrics)
        if full:
            meta["full"] = True
        check_metadata(meta)
        staged = self._stager.stage(state_dict) if self.async_save else state_dict
        if self._executor is not None:
            # what depends only on the state dict (an object cas cannot store) fails this call, not the next
            encode_state(staged, allow_pickle=self.allow_pickle)
        self._model_bytes = self._stager.staged_bytes
        blocked = time.perf_counter() - started
        now = self.clock()
        rollback = (self._last_step, self._last_time, self._last_full_time)
        self._last_step, self._last_time = step, now
        if full:
            self._last_full_time = now
        if self._executor is None:
            try:
                self.history.append(self._commit(step, staged, meta, full, started, blocked))
            except BaseException:
                self._last_step, self._last_time, self._last_full_time = rollback
                raise
        else:
            self._rollback = rollback
            self._inflight = self._executor.submit(self._commit, step, staged, meta, full, started, blocked)
        return True

    def _commit(self, step: int, state: Any, meta: dict[str, Any], full: bool, started: float,
                blocked: float) -> SaveRecord:
        tag = f"{TAG_PREFIX}{step}"
        with self._lock:
            # replace: a resumed run saving the same step again moves the tag atomically
            # the parent (delta bases) is this run's previous snapshot, not whatever another writer saved last
            if self._parent_id is not None and not any(s.id == self._parent_id for s in self._managed()):
                self._parent_id = None  # removed by retention: fall back to the newest kept one
            if self._parent_id is None:
                managed = self._managed()
                self._parent_id = managed[-1].id if managed else None
            snap = self.repo.save(state, tag=tag, metadata=meta, allow_pickle=self.allow_pickle,
                                  keyframe=full, replace=True, parent=self._parent_id)
            self._parent_id = snap.id
            if full:
                report = self.repo.verify(read_data=True, snapshots=[snap.id])
                if not report.ok:
                    raise CorruptionError(f"full save of step {step} did not verify: {report.problems[0]}")
            self._apply_retention()
            self._commits += 1
            if self.gc_every and self._commits % self.gc_every == 0:
                self.repo.gc()
        return SaveRecord(step, blocked, time.perf_counter() - started, full, snap.id)

    def _managed(self) -> list[Snapshot]:
        return [s for s in self.repo.snapshots() if step_of_tag(s.tag) is not None]

    def _apply_retention(self) -> None:
        rules = self.retention
        policy_keep = self.policy.retention_seconds(self._state(self._last_step or 0)) if self.policy else None
        if rules is None and policy_keep is None:
            return
        base = rules.to_dict() if rules else {}
        if policy_keep is not None:
            base["keep_within"] = f"{policy_keep:.0f}s"
        # the newest snapshot is always kept: a resume must not lose the steps since the best one
        base["keep_last"] = max(1, int(base.get("keep_last") or 0))
        rules = RetentionPolicy(**base)
        _reasons, removed = apply_policy(self._managed(), rules)
        for snap in removed:
            self.repo.delete(snap.ref)

    # restore ------------------------------------------------------------------------
    def all_steps(self) -> list[int]:
        self._raise_pending()
        return sorted(s for s in (step_of_tag(x.tag) for x in self._managed()) if s is not None)

    def latest(self) -> int | None:
        steps = self.all_steps()
        return steps[-1] if steps else None

    def restore_latest(self, into: Any = None) -> RestoreResult | None:
        """The newest snapshot that restores intact (every chunk verified); None if there is none.

        A damaged newer snapshot is skipped with a warning and recorded in ``skipped``.
        With ``into`` its tensors are filled in place:

        * a module: the snapshot's ``"model"`` entry when it has one, else the whole snapshot;
        * a dict of live objects, as it was saved -- ``{"model": model, "optim": optimizer,
          "sched": scheduler}`` for a snapshot of ``{"model": model.state_dict(), "optim":
          optimizer.state_dict(), ...}``: each module is filled in place from its entry, each
          optimizer / scheduler gets its entry through ``load_state_dict``; other values in
          the dict (a step counter, say) are replaced by the snapshot's;
        * a plain state dict of tensors: filled in place (``Repository.load_into``).

        ``state_dict`` of the result is ``into`` (or the loaded state without ``into``).
        """
        self.wait()
        snaps = sorted(self._managed(), key=lambda s: (step_of_tag(s.tag) or 0, s.time), reverse=True)
        skipped: list[tuple[str, str]] = []
        for snap in snaps:
            try:
                if into is None:
                    state = self.repo.load(snap.id, allow_pickle=self.allow_pickle)
                elif isinstance(into, dict) and any(_is_live(v) for v in into.values()):
                    state = self._restore_parts(into, snap)
                else:
                    key = "model" if isinstance(into, torch.nn.Module) and "model" in {
                        t["path"].split("/")[0] for t in self.repo.tensors(snap.id)} else None
                    state = self.repo.load_into(into, snap.id, key=key, allow_pickle=self.allow_pickle)
            except (CorruptionError, FormatVersionError) as exc:
                skipped.append((snap.ref, str(exc)))
                warnings.warn(f"cas: snapshot {snap.ref} does not restore ({exc}); trying the previous one",
                              RuntimeWarning, stacklevel=2)
                continue
            return RestoreResult(step_of_tag(snap.tag) or 0, state, snap.metadata, snap, bool(skipped), skipped)
        if skipped:
            raise CorruptionError(f"no snapshot restores: {len(skipped)} damaged ({skipped[0][1]})")
        return None

    def _restore_parts(self, into: dict[Any, Any], snap: Snapshot) -> dict[Any, Any]:
        """Fill each live object of ``into`` from the snapshot entry of the same name."""
        rest = [k for k, v in into.items() if not _is_live(v)]
        values = self.repo.load(snap.id, keys=[str(k) for k in rest], allow_pickle=self.allow_pickle) if rest else {}
        for name, value in into.items():
            if _is_live(value):
                self.repo.load_into(value, snap.id, key=str(name), allow_pickle=self.allow_pickle)
            elif isinstance(values, dict) and name in values:
                into[name] = values[name]
        return into

    # lifecycle -------------------------------------------------------------------------
    def close(self) -> None:
        """Wait for the save in flight, then release the repository (if this manager opened it)."""
        if self._closed:
            return
        try:
            self.wait()
        finally:
            self._closed = True
            if self._executor is not None:
                self._executor.shutdown(wait=True)
            if self._owns_repo:
                self.repo.close()

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


check_public_kwargs(CheckpointManager)  # a misspelt keyword argument is a typed ArgumentError


KEEP_BEST_FORM = "keep_best=(metric, mode, n), e.g. keep_best=('loss', 'min', 2): the 2 snapshots of lowest loss"


def _count(name: str, value: object) -> int:
    """``max_to_keep`` / ``keep_every_steps``: None or 0 (no rule), or a positive int."""
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise UsageError(f"CheckpointManager: {name} must be None (no limit) or a positive int, "
                         f"got {value!r} ({type(value).__name__})")
    return int(value)


def _retention_rules(max_to_keep: object, keep_every_steps: object, keep_best: object) -> dict[str, Any]:
    """The RetentionPolicy arguments of the manager's keep_* arguments; a bad one is a UsageError naming it."""
    rules: dict[str, Any] = {}
    if keep_last := _count("max_to_keep", max_to_keep):
        rules["keep_last"] = keep_last
    if every := _count("keep_every_steps", keep_every_steps):
        rules["keep_every_steps"] = every
    if keep_best is None:
        return rules
    if not isinstance(keep_best, (tuple, list)) or len(keep_best) != 3:
        raise UsageError(f"CheckpointManager: keep_best must be a (metric, mode, n) tuple, got {keep_best!r}; "
                         f"write {KEEP_BEST_FORM}")
    metric, mode, n = keep_best
    if not isinstance(metric, str) or not metric:
        raise UsageError(f"CheckpointManager: keep_best's metric must be a metric name (a non-empty str, a key "
                         f"of save(metrics=...)), got {metric!r}; write {KEEP_BEST_FORM}")
    if not isinstance(mode, str) or mode not in ("min", "max"):
        raise UsageError(f"CheckpointManager: keep_best's mode must be 'min' (lower is better) or 'max', "
                         f"got {mode!r}; write {KEEP_BEST_FORM}")
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
        raise UsageError(f"CheckpointManager: keep_best's n (how many best snapshots to keep) must be a positive "
                         f"int, got {n!r} ({type(n).__name__}); write {KEEP_BEST_FORM}")
    rules.update(keep_best=int(n), metric=metric, mode=mode)
    return rules


def _is_live(value: Any) -> bool:
    """A module, optimizer, scheduler... : something restored in place rather than replaced."""
    return isinstance(value, torch.nn.Module) or (
        not isinstance(value, (dict, torch.Tensor)) and callable(getattr(value, "load_state_dict", None)))


def _plain_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """Metrics as plain numbers; a metric that is not a finite number is a UsageError here, at save."""
    if not isinstance(metrics, dict):
        raise UsageError(f"metrics must be a dict of name -> number, not a {type(metrics).__name__}")
    out: dict[str, Any] = {}
    for k, given in metrics.items():
        if not isinstance(k, str):
            raise UsageError(f"metric names must be strings, got {k!r}")
        value = given
        if isinstance(value, torch.Tensor):
            if value.numel() != 1:
                raise UsageError(f"metric {k!r} is a tensor of {value.numel()} elements, not one number")
            value = value.item()
        elif not isinstance(value, (int, float)) and hasattr(value, "item") and callable(value.item):
            value = value.item()  # numpy scalars
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UsageError(f"metric {k!r} is {value!r}, not a number")
        if not math.isfinite(value):
            raise UsageError(f"metric {k!r} is {value}; metrics must be finite numbers (keep_best ranks by them)")
        out[k] = value
    return out


def _check_step(step: object) -> None:
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise UsageError(f"step must be a non-negative int, got {step!r}")
