"""When to save: every N steps, every T seconds, the Young/Daly optimum, or the stage table.

Policies are pure: they are given the step, the clock and the measured save cost,
and answer whether a save is due now. ``CheckpointManager.should_save`` asks them.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Any

from cas.arguments import check_public_kwargs
from cas.errors import UsageError

HOUR = 3600.0
DAY = 24 * HOUR
BIG_MODEL_BYTES = 100 * 10**9
BIG_MODEL_STRETCH = 1.5


def _got(value: object) -> str:
    return f"got {value!r} ({type(value).__name__})"


def check_positive_int(owner: str, name: str, value: object) -> None:
    """A UsageError unless ``value`` is an integer >= 1 (a bool or a float such as 10.0 is not)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise UsageError(f"{owner}: {name} must be a positive integer (1, 2, ...), {_got(value)}")


def check_seconds(owner: str, name: str, value: object, *, zero_ok: bool = False) -> None:
    """A UsageError unless ``value`` is a finite number of seconds, > 0 (>= 0 with ``zero_ok``)."""
    ok = not isinstance(value, bool) and isinstance(value, numbers.Real) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not zero_ok):  # type: ignore[operator]  # a Real when ok
        bound = "finite and >= 0" if zero_ok else "finite and > 0"
        raise UsageError(f"{owner}: {name} must be a number of seconds ({bound}), {_got(value)}")


def check_stage(owner: str, stage: object, stages: dict[str, Any]) -> None:
    if not isinstance(stage, str) or stage not in stages:
        raise UsageError(f"{owner}: unknown stage {stage!r}; stages: {', '.join(map(repr, stages))}")


@dataclass
class SaveState:
    """What a policy sees: the last save's step and time, and what saves cost so far."""

    step: int
    now: float
    last_step: int | None
    last_time: float | None
    last_full_time: float | None
    save_cost_s: float | None
    model_bytes: int = 0


class IntervalPolicy:
    """Base class: ``due(state)`` says whether to save; ``full_due(state)`` whether that save is a full one."""

    def due(self, state: SaveState) -> bool:
        raise NotImplementedError

    def full_due(self, state: SaveState) -> bool:
        return False

    def retention_seconds(self, state: SaveState) -> float | None:
        return None


@dataclass
class EveryNSteps(IntervalPolicy):
    steps: int

    def __post_init__(self) -> None:
        check_positive_int("EveryNSteps", "steps", self.steps)

    def due(self, state: SaveState) -> bool:
        return state.step % self.steps == 0 if state.last_step is None else state.step - state.last_step >= self.steps


@dataclass
class EverySeconds(IntervalPolicy):
    seconds: float

    def __post_init__(self) -> None:
        check_seconds("EverySeconds", "seconds", self.seconds)

    def due(self, state: SaveState) -> bool:
        return state.last_time is None or state.now - state.last_time >= self.seconds


def young_interval(save_cost_s: float, mtbf_s: float) -> float:
    """Young (1974): the interval that minimises lost work, sqrt(2 C M)."""
    return math.sqrt(2.0 * save_cost_s * mtbf_s)


def daly_interval(save_cost_s: float, mtbf_s: float) -> float:
    """Daly (2006), higher order: sqrt(2CM)·[1 + ⅓·sqrt(C/2M) + C/18M] - C for C < 2M, else M."""
    c, m = save_cost_s, mtbf_s
    if c >= 2 * m:
        return m
    r = c / (2 * m)
    return math.sqrt(2 * c * m) * (1 + math.sqrt(r) / 3 + r / 9) - c


STAGES = ("initial", "middle", "final")


@dataclass
class YoungDaly(IntervalPolicy):
    """Save at the optimal interval from the measured save cost and the cluster's MTBF.

    ``save_cost_s`` overrides the measurement (the time the training loop is blocked
    by a save). The interval is multiplied by the stage's factor and stretched 1.5x
    for models over 100 GB, as in the stage table.
    """

    mtbf_s: float
    formula: str = "young"
    save_cost_s: float | None = None
    stage: str = "initial"
    stage_factors: dict[str, float] = field(default_factory=lambda: {"initial": 1.0, "middle": 3.0, "final": 6.0})
    default_cost_s: float = 60.0

    def __post_init__(self) -> None:
        check_seconds("YoungDaly", "mtbf_s", self.mtbf_s)
        if not isinstance(self.formula, str) or self.formula not in ("young", "daly"):
            raise UsageError(f"YoungDaly: formula must be 'young' or 'daly', {_got(self.formula)}")
        if self.save_cost_s is not None:
            check_seconds("YoungDaly", "save_cost_s", self.save_cost_s, zero_ok=True)
        check_seconds("YoungDaly", "default_cost_s", self.default_cost_s)
        if not isinstance(self.stage_factors, dict) or not self.stage_factors:
            raise UsageError(f"YoungDaly: stage_factors must be a non-empty dict of stage name -> factor, "
                             f"{_got(self.stage_factors)}")
        for name, factor in self.stage_factors.items():
            if not isinstance(name, str):
                raise UsageError(f"YoungDaly: stage_factors keys must be stage names (str), {_got(name)}")
            ok = not isinstance(factor, bool) and isinstance(factor, numbers.Real) and math.isfinite(factor)
            if not ok or factor <= 0:
                raise UsageError(f"YoungDaly: stage_factors[{name!r}] must be a finite number > 0, {_got(factor)}")
        check_stage("YoungDaly", self.stage, self.stage_factors)

    def interval_s(self, measured_cost_s: float | None, model_bytes: int = 0) -> float:
        cost = self.save_cost_s if self.save_cost_s is not None else measured_cost_s
        cost = self.default_cost_s if cost is None else max(cost, 1e-3)
        base = young_interval(cost, self.mtbf_s) if self.formula == "young" else daly_interval(cost, self.mtbf_s)
        stretch = BIG_MODEL_STRETCH if model_bytes > BIG_MODEL_BYTES else 1.0
        return base * self.stage_factors[self.stage] * stretch

    def due(self, state: SaveState) -> bool:
        if state.last_time is None:
            return True
        return state.now - state.last_time >= self.interval_s(state.save_cost_s, state.model_bytes)


@dataclass(frozen=True)
class StageRow:
    full_interval_s: float
    incremental_interval_s: float
    retention_s: float

    def __post_init__(self) -> None:
        for name in ("full_interval_s", "incremental_interval_s", "retention_s"):
            check_seconds("StageRow", name, getattr(self, name))


#: The backup plan this project grew from: per stage, full / incremental interval and retention.
STAGE_TABLE: dict[str, StageRow] = {
    "initial": StageRow(24 * HOUR, 4 * HOUR, 7 * DAY),
    "middle": StageRow(48 * HOUR, 12 * HOUR, 14 * DAY),
    "final": StageRow(72 * HOUR, 24 * HOUR, 30 * DAY),
}


@dataclass
class StagePolicy(IntervalPolicy):
    """The stage table: incremental saves at one interval, "full" saves at a longer one.

    In cas every save is incremental by construction; a *full* save here is a
    keyframe (delta chains restart) followed by a ``verify --read-data`` of that
    snapshot. Intervals stretch 1.5x for models over 100 GB; the retention is the
    stage's ``keep_within``.
    """

    stage: str = "initial"
    table: dict[str, StageRow] = field(default_factory=lambda: dict(STAGE_TABLE))

    def __post_init__(self) -> None:
        if not isinstance(self.table, dict) or not self.table:
            raise UsageError(f"StagePolicy: table must be a non-empty dict of stage name -> StageRow, "
                             f"{_got(self.table)}")
        for name, row in self.table.items():
            if not isinstance(name, str) or not isinstance(row, StageRow):
                raise UsageError(f"StagePolicy: table must map stage names (str) to StageRow(full_interval_s, "
                                 f"incremental_interval_s, retention_s), got {name!r}: {row!r}")
        check_stage("StagePolicy", self.stage, self.table)

    def _stretch(self, state: SaveState) -> float:
        return BIG_MODEL_STRETCH if state.model_bytes > BIG_MODEL_BYTES else 1.0

    def due(self, state: SaveState) -> bool:
        row = self.table[self.stage]
        if state.last_time is None:
            return True
        return state.now - state.last_time >= row.incremental_interval_s * self._stretch(state) or self.full_due(state)

    def full_due(self, state: SaveState) -> bool:
        row = self.table[self.stage]
        return state.last_full_time is None or state.now - state.last_full_time >= row.full_interval_s * self._stretch(
            state
        )

    def retention_seconds(self, state: SaveState) -> float | None:
        return self.table[self.stage].retention_s


for _cls in (EveryNSteps, EverySeconds, YoungDaly, StageRow, StagePolicy):
    check_public_kwargs(_cls)  # a misspelt keyword argument is a typed ArgumentError
