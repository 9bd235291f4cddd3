"""A mixture schedule, resolved against one run: each source's share at every sequence, the
segments the plan is cut into, and the integer counts per source and segment.

The recipe's form (points, positions, interpolation) is read and checked in
`cpt_cli.config.mixschedule`; here the points are on steps, and `shares(x)` gives each source's
share of the sequences at position x (in sequences): its group's share (1 - ratio for new data,
ratio for replay) times its weight over the sum of its group's weights.

Segments. The plan changes only at step boundaries. Every point of every schedule is a boundary;
a stretch where some value ramps is cut into blocks of whole steps, at least sqrt(length) of them
(a 50M-sequence ramp: about 7,000 blocks), so that the scheduled count of a source inside one
block departs from a straight line by at most n * (share change across the block) / 8 sequences
for a block of n sequences, below 1/8 sequence for a linear share. A constant stretch is cut
every MAX_SEGMENT sequences so that one segment's order stays small (4 MB of int32).

Counts. T_k(b) = the integral of source k's share up to boundary b (exact for constant shares,
Simpson's rule inside a block). Each segment's counts are the deficits d_k = T_k(end) - C_k(start)
rounded by largest remainder (negative deficits get 0), so the running counts C_k(b) stay within
one sequence of T_k(b) at every boundary: see docs/data.md for the proof and its one exception.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cpt_cli.config import Recipe, SourceConfig
from cpt_cli.config.mixschedule import (
    RunGeometry,
    parse_schedule,
    resolve_points,
    value_at,
)
from cpt_cli.errors import RecipeError

MAX_SEGMENT = 1 << 20  # sequences: one segment's order is 4 MB and builds in about 1 s


@dataclass(frozen=True)
class ValueSchedule:
    """One scheduled value: points on steps, how they join, and a floor."""

    points: tuple[tuple[int, float], ...]
    interpolate: str = "linear"
    floor: float = 0.0

    @staticmethod
    def constant(value: float) -> ValueSchedule:
        return ValueSchedule(((0, float(value)),))

    @property
    def is_constant(self) -> bool:
        return len({w for _, w in self.points}) <= 1

    def at_steps(self, steps: np.ndarray) -> np.ndarray:
        xs = [p for p, _ in self.points]
        ys = [w for _, w in self.points]
        if self.interpolate == "step" and len(xs) > 1:
            idx = np.searchsorted(np.asarray(xs), steps, side="right") - 1
            values = np.asarray(ys)[np.clip(idx, 0, len(ys) - 1)]
        else:
            values = np.interp(steps, xs, ys)
        return np.maximum(values, self.floor)

    def ramps(self) -> list[tuple[int, int]]:
        """Step ranges where the value changes continuously (linear, unequal ends)."""
        if self.interpolate == "step":
            return []
        return [(a, b) for (a, wa), (b, wb) in zip(self.points, self.points[1:], strict=False)
                if wa != wb]

    def value(self, step: float) -> float:
        return max(value_at(list(self.points), self.interpolate, step), self.floor)


@dataclass
class MixSchedule:
    """Every source's weight schedule and the replay ratio's, resolved on `steps` steps."""

    weights: list[ValueSchedule]
    roles: list[str]                 # "new" or "replay", per source
    ratio: ValueSchedule
    steps: int
    global_batch: int
    names: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return self.steps * self.global_batch

    @property
    def is_constant(self) -> bool:
        return self.ratio.is_constant and all(w.is_constant for w in self.weights)

    def fingerprint(self) -> str:
        """Changes with any point, value, interpolation or floor, and with the run's length."""
        payload = json.dumps({"steps": self.steps, "batch": self.global_batch,
                              "names": self.names, "roles": self.roles,
                              "ratio": [self.ratio.points, self.ratio.interpolate],
                              "weights": [[w.points, w.interpolate, w.floor]
                                          for w in self.weights]}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    def shares(self, x: np.ndarray) -> np.ndarray:
        """(len(x), K) shares at sequence positions x; each row sums to 1."""
        steps = np.asarray(x, dtype=np.float64) / self.global_batch
        has_replay = "replay" in self.roles
        ratio = self.ratio.at_steps(steps) if has_replay else np.zeros_like(steps)
        w = np.stack([s.at_steps(steps) for s in self.weights], axis=1)
        out = np.zeros_like(w)
        for role, group in (("new", 1.0 - ratio), ("replay", ratio)):
            cols = [k for k, r in enumerate(self.roles) if r == role]
            if not cols:
                continue
            sub = w[:, cols]
            total = sub.sum(axis=1, keepdims=True)
            # A group with weights summing to 0 has no share here (the recipe check refuses it
            # where the group is meant to have one); avoid 0/0.
            out[:, cols] = np.where(total > 0, sub / np.where(total > 0, total, 1.0), 0.0) \
                * group[:, None]
        return out

    def boundaries(self, start: int = 0) -> np.ndarray:
        """Segment boundaries (sequence positions, whole steps) from `start` to the end."""
        g, T = self.global_batch, self.steps
        first = -(-start // g)  # the first whole step at or after start
        steps = {first, T}
        ramps: list[tuple[int, int]] = []
        for s in [*self.weights, self.ratio]:
            steps.update(p for p, _ in s.points if first < p < T)
            ramps += s.ramps()
        for a, b in ramps:
            a, b = max(a, first), min(b, T)
            if b <= a:
                continue
            blocks = min(b - a, max(1, math.ceil(math.sqrt((b - a) * g))))
            steps.update(np.linspace(a, b, blocks + 1).round().astype(np.int64).tolist())
        cuts = sorted(s for s in steps if first <= s <= T)
        bounds = [start] if start < first * g else []
        bounds += [s * g for s in cuts]
        out = [bounds[0]]
        for b in bounds[1:]:
            while b - out[-1] > MAX_SEGMENT:
                out.append(out[-1] + MAX_SEGMENT)
            if b > out[-1]:
                out.append(b)
        return np.asarray(out, dtype=np.int64)

    def targets(self, bounds: np.ndarray) -> np.ndarray:
        """(m, K) scheduled sequences per source in each segment: the integral of its share."""
        a, b = bounds[:-1].astype(np.float64), bounds[1:].astype(np.float64)
        # Simpson's rule, exact for the piecewise-linear weights' constant stretches; a ramp's
        # share (a ratio of linear functions) is smooth inside a block.
        s = (self.shares(a) + 4 * self.shares((a + b) / 2) + self.shares(b - 1e-9)) / 6
        s /= s.sum(axis=1, keepdims=True)
        return s * (b - a)[:, None]


def segment_counts(targets: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """(m, K) integer counts: each row sums to its length, and the running count of each source
    stays within one sequence of its running target (cumulative rounding, see the module)."""
    m, K = targets.shape
    counts = np.zeros((m, K), dtype=np.int64)
    error = np.zeros(K)  # running count - running target
    for i in range(m):
        d = targets[i] - error          # deficits; sum(d) == lengths[i]
        c = np.floor(np.maximum(d, 0.0)).astype(np.int64)
        left = int(lengths[i] - c.sum())
        remainder = d - c
        if left > 0:
            order = np.argsort(-remainder, kind="stable")
            c[order[:left]] += 1
        elif left < 0:
            # Only when sources already ahead lose their share inside one segment: take the
            # surplus back from the smallest remainders (docs/data.md, the exception).
            order = [k for k in np.argsort(remainder, kind="stable") if c[k] > 0]
            for k in order[:-left]:
                c[k] -= 1
        counts[i] = c
        error += c - targets[i]
    return counts


def build_schedule(recipe: Recipe, sources: list[tuple[str, str, SourceConfig]], steps: int,
                   global_batch: int, *, always: bool = False) -> MixSchedule | None:
    """The recipe's schedules resolved on this run; None when every weight and the replay ratio
    are plain numbers (the constant plan, unchanged). `sources` are (name, role, config) in plan
    order. The recipe was checked when it loaded, so resolving here reports nothing new. With
    `always`, a constant mixture is a (constant) schedule too: what a plan revision needs."""
    ratio = recipe.data.replay.starting_ratio()
    if not always and not isinstance(ratio, dict) and \
            not any(isinstance(c.weight, dict) for _, _, c in sources):
        return None
    geometry = RunGeometry.of(recipe, steps, global_batch)
    return MixSchedule(weights=[_resolve(c.weight, geometry, c.min_weight) for _, _, c in sources],
                       roles=[role for _, role, _ in sources],
                       ratio=_resolve(ratio, geometry, 0.0), steps=steps,
                       global_batch=global_batch, names=[name for name, _, _ in sources])


def _resolve(value: float | dict[str, Any], geometry: RunGeometry, floor: float) -> ValueSchedule:
    if not isinstance(value, dict):
        return ValueSchedule.constant(max(float(value), floor))
    problems: list[str] = []
    schedule = parse_schedule(value, "schedule", problems)
    assert schedule is not None
    points = resolve_points(schedule, geometry, "schedule", problems)
    if problems:  # the recipe check ran on the same geometry; reaching this is a bug in cpt
        raise RecipeError("the mixture schedule cannot be resolved on this run:", problems)
    return ValueSchedule(tuple(points), schedule.interpolate, floor)
