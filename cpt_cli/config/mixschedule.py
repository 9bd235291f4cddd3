"""Mixture schedules: a source's `weight` (or `data.replay.ratio`) that changes over one run.

    weight: 0.7                                           # constant, as before
    weight: {0%: 0.7, 80%: 0.7, 100%: 0.2}                # hold 0.7, then ramp down to 0.2
    weight: {stable: 0.7, decay: 0.2, interpolate: step}  # switch when the wsd decay starts

A schedule is a mapping of points, position -> value. A position is a fraction of the run (`10%`,
or a plain number from 0 to 1: `0.8`), a number of tokens into the run (`400M`, `2B`, or a whole
number above 1), or the name of a wsd learning-rate phase (`warmup`, `stable`, `decay`: where that
phase starts). Every position is rounded to the nearest optimizer step, because the plan changes
only between steps. Between two points the value follows a straight line (`interpolate: linear`,
the default) or holds until the next point (`interpolate: step`); before the first point and after
the last it holds. This module only reads and checks the form; `cpt_cli.data.schedule` turns it
into per-sequence shares and counts.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

PHASES = ("warmup", "stable", "decay")
INTERPOLATIONS = ("linear", "step")
_FORMS = ("a percentage (10%), a fraction from 0 to 1 (0.8), tokens (400M, 2B) or a wsd phase "
          "(warmup, stable, decay)")
_PERCENT_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*%\s*$")
_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([kKmMbBgGtT]?)\s*$")
_SUFFIXES = {"": 1, "k": 10**3, "K": 10**3, "m": 10**6, "M": 10**6, "b": 10**9, "B": 10**9,
             "g": 10**9, "G": 10**9, "t": 10**12, "T": 10**12}


@dataclass(frozen=True)
class Position:
    kind: str        # "fraction", "tokens" or "phase"
    value: Any       # float in [0, 1], int tokens, or a phase name
    text: str        # as the user wrote it, for messages


@dataclass(frozen=True)
class WeightSchedule:
    """A parsed schedule: points in the order written, and how to join them."""

    points: tuple[tuple[Position, float], ...]
    interpolate: str = "linear"


@dataclass(frozen=True)
class RunGeometry:
    """What positions resolve against: the run's steps and the learning-rate phases."""

    steps: int
    global_batch: int        # sequences per step
    seq_len: int
    lr_schedule: str         # train.schedule.name
    warmup_steps: int
    decay_start: int         # first step of the wsd cooldown (steps when there is none)

    @staticmethod
    def of(recipe: Any, steps: int, global_batch: int) -> RunGeometry:
        """A run of `steps` steps of `global_batch` sequences under the recipe's LR schedule."""
        s = recipe.train.schedule
        return RunGeometry(steps=steps, global_batch=global_batch, seq_len=recipe.data.seq_len,
                           lr_schedule=s.name, warmup_steps=s.warmup_steps(steps),
                           decay_start=s.decay_start(steps))

    @property
    def tokens(self) -> int:
        return self.steps * self.global_batch * self.seq_len


def parse_position(raw: Any) -> Position:
    """`10%`, `0.8`, `400M`, `decay` -> Position; ValueError naming the accepted forms."""
    text = str(raw)
    if isinstance(raw, bool):
        raise ValueError(_FORMS)
    if isinstance(raw, (int, float)):
        if not math.isfinite(raw) or raw < 0:
            raise ValueError(_FORMS)
        if raw <= 1:
            return Position("fraction", float(raw), text)
        if float(raw).is_integer():
            return Position("tokens", int(raw), text)
        raise ValueError(_FORMS)
    if isinstance(raw, str):
        name = raw.strip()
        if name in PHASES:
            return Position("phase", name, text)
        percent = _PERCENT_RE.match(name)
        if percent:
            return Position("fraction", float(percent.group(1)) / 100, text)
        size = _SIZE_RE.match(name.replace("_", ""))
        if size:
            number = float(size.group(1)) * _SUFFIXES[size.group(2)]
            if size.group(2) == "" and number <= 1:
                return Position("fraction", number, text)
            if number.is_integer():
                return Position("tokens", int(number), text)
    raise ValueError(_FORMS)


def parse_schedule(value: Any, key: str, problems: list[str]) -> WeightSchedule | None:
    """A mapping -> WeightSchedule; a number -> None (a constant). Problems are appended."""
    if not isinstance(value, dict):
        return None
    interpolate = value.get("interpolate", "linear")
    if interpolate not in INTERPOLATIONS:
        problems.append(f"{key}.interpolate: {interpolate!r} is not accepted; use linear (a "
                        "straight line between points) or step (hold until the next point)")
    points: list[tuple[Position, float]] = []
    for raw, weight in value.items():
        if raw == "interpolate":
            continue
        try:
            position = parse_position(raw)
        except ValueError as err:
            close = [p for p in PHASES if str(raw).strip().lower().startswith(p[:3])]
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            problems.append(f"{key}: position {raw!r} is not accepted{hint}; use {err}")
            continue
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) \
                or not math.isfinite(weight) or weight < 0:
            problems.append(f"{key}: the value at {raw!r} is {weight!r}; give a number of 0 or "
                            "more")
            continue
        if position.kind == "fraction" and position.value > 1:
            problems.append(f"{key}: position {raw!r} is past the end of the run; positions "
                            "go from 0% to 100%")
            continue
        points.append((position, float(weight)))
    if not points and not any(p.startswith(f"{key}:") for p in problems):
        problems.append(f"{key}: a schedule needs at least one point, e.g. "
                        "{0%: 0.7, 100%: 0.2}")
    return WeightSchedule(tuple(points), interpolate if interpolate in INTERPOLATIONS
                          else "linear")


def resolve_step(position: Position, geometry: RunGeometry) -> int:
    """The optimizer step a position falls on (rounded to the nearest step boundary)."""
    if position.kind == "fraction":
        return int(round(position.value * geometry.steps))
    if position.kind == "tokens":
        return int(round(position.value / (geometry.global_batch * geometry.seq_len)))
    return {"warmup": 0, "stable": geometry.warmup_steps,
            "decay": geometry.decay_start}[position.value]


def resolve_points(schedule: WeightSchedule, geometry: RunGeometry, key: str,
                   problems: list[str]) -> list[tuple[int, float]]:
    """[(step, value)] in order; unordered, overlapping, out-of-range points are problems."""
    resolved: list[tuple[int, float]] = []
    previous: Position | None = None
    for position, weight in schedule.points:
        if position.kind == "phase" and geometry.lr_schedule != "wsd":
            problems.append(f"{key}: position {position.text!r} names a wsd phase but "
                            f"train.schedule.name is {geometry.lr_schedule!r}; use a percentage "
                            "or tokens, or train.schedule.name: wsd")
            continue
        if position.kind == "tokens" and position.value > geometry.tokens:
            problems.append(f"{key}: position {position.text!r} is past the end of the run "
                            f"({geometry.tokens:,} tokens); use at most that, or 100%")
            continue
        step = resolve_step(position, geometry)
        if resolved and step <= resolved[-1][0]:
            assert previous is not None
            what = "at the same step as" if step == resolved[-1][0] else "before"
            problems.append(f"{key}: point {position.text!r} (step {step}) falls {what} "
                            f"{previous.text!r} (step {resolved[-1][0]}); write points in "
                            "increasing order, each on a different step (for a switch, use "
                            "interpolate: step)")
            continue
        resolved.append((step, weight))
        previous = position
    return resolved


def run_geometry(recipe: Any) -> RunGeometry | None:
    """Steps and batch as the plan will see them; None when the train section is invalid
    (its own checks report that). Mirrors data/prepare.py's batch_geometry, without processes."""
    t, L = recipe.train, recipe.data.seq_len
    if L < 1 or (t.global_batch_size is None) == (t.global_batch_tokens is None):
        return None
    batch = t.global_batch_size if t.global_batch_size is not None else \
        max(1, round(int(t.global_batch_tokens) / L))
    if batch < 1:
        return None
    if t.steps is not None:
        steps = t.steps
    elif t.tokens is not None:
        steps = max(1, int(t.tokens) // (batch * L))
    else:
        return None
    if steps < 1:
        return None
    return RunGeometry.of(recipe, steps, batch)


def value_at(points: list[tuple[int, float]], interpolate: str, step: float) -> float:
    """The scheduled value at a (fractional) step."""
    if not points:
        return 0.0
    if step <= points[0][0]:
        return points[0][1]
    for (a, wa), (b, wb) in zip(points, points[1:], strict=False):
        if step < b:
            return wa if interpolate == "step" else wa + (wb - wa) * (step - a) / (b - a)
    return points[-1][1]


def _stays_zero(points: list[tuple[int, float]], floor: float) -> int | None:
    """The step from which the value is 0 for the rest of the run, or None."""
    if floor > 0 or not points or points[-1][1] > 0:
        return None
    start = points[-1][0]
    for step, weight in reversed(points):
        if weight > 0:
            break
        start = step
    return start


def check_mix_schedules(recipe: Any, problems: list[str]) -> None:
    """Every problem of the recipe's weight and ratio schedules (forms, order, the end of the
    run, sums that reach 0, lineage sources dropped), appended to `problems`."""
    d = recipe.data
    geometry = run_geometry(recipe)
    groups = [("data.sources", d.sources), ("data.replay.sources", d.replay.sources)]
    breakpoints: set[int] = {0}
    resolved: dict[str, tuple[list[tuple[int, float]], str, float]] = {}
    for group, sources in groups:
        for i, src in enumerate(sources):
            key = f"{group}[{i}]"
            if not (0 <= src.min_weight < math.inf):
                problems.append(f"{key}.min_weight: {src.min_weight} must be 0 or more")
            schedule = parse_schedule(src.weight, f"{key}.weight", problems)
            if schedule is None:
                continue
            if geometry is None:
                continue
            before = len(problems)
            points = resolve_points(schedule, geometry, f"{key}.weight", problems)
            if len(problems) > before or not points:
                continue  # reported; a sum over a half-read schedule would only repeat it
            resolved[key] = (points, schedule.interpolate, src.min_weight)
            breakpoints.update(step for step, _ in points)
            end = _stays_zero(points, src.min_weight)
            lineage = group == "data.replay.sources"
            if end is not None and lineage and not src.allow_drop:
                problems.append(
                    f"{key}.weight: {src.name!r} is a replay source and its weight is 0 from "
                    f"step {end} to the end of the run: dropping a domain the model already "
                    "learned is how forgetting starts. Keep it with min_weight (e.g. 0.05) or a "
                    "last point above 0, or set allow_drop: true on that source")
    ratio = parse_schedule(d.replay.ratio, "data.replay.ratio", problems)
    ratio_points: list[tuple[int, float]] = []
    if ratio is not None and geometry is not None:
        ratio_points = resolve_points(ratio, geometry, "data.replay.ratio", problems)
        breakpoints.update(step for step, _ in ratio_points)
        for step, value in ratio_points:
            if value >= 1:
                problems.append(f"data.replay.ratio: {value} at step {step} must be below 1 (a "
                                "stage needs some new data); e.g. 0.25")
        end = _stays_zero(ratio_points, 0.0)
        if end is not None and not d.replay.allow_drop:
            problems.append(f"data.replay.ratio: replay stops at step {end} for the rest of the "
                            "run: that drops every replayed domain, which is how forgetting "
                            "starts. End on a ratio above 0 (e.g. 0.05), or set "
                            "data.replay.allow_drop: true")
    if geometry is None or not resolved:
        return
    for group, sources in groups:
        if any(isinstance(src.weight, dict) and f"{group}[{i}]" not in resolved
               for i, src in enumerate(sources)):
            continue  # a schedule of this group was refused: its sum means nothing yet
        for step in sorted(breakpoints):
            if group == "data.replay.sources" and (not sources or (
                    ratio_points and value_at(ratio_points, ratio.interpolate, step) == 0)):
                continue
            total = 0.0
            for i, src in enumerate(sources):
                key = f"{group}[{i}]"
                if key in resolved:
                    points, how, floor = resolved[key]
                    total += max(value_at(points, how, step), floor)
                elif isinstance(src.weight, (int, float)):
                    total += max(float(src.weight), src.min_weight)
            if total <= 0:
                problems.append(f"{group}: the weights sum to 0 at step {step} of "
                                f"{geometry.steps}, so that group has no share to split; give "
                                "one source a weight above 0 there (or a min_weight)")
                break


def peak(value: float | dict[str, Any]) -> float:
    """The largest value a number or schedule takes (for checks such as `ratio > 0`)."""
    if isinstance(value, dict):
        numbers = [v for k, v in value.items() if k != "interpolate"
                   and isinstance(v, (int, float)) and not isinstance(v, bool)]
        return float(max(numbers, default=0.0))
    return float(value)
