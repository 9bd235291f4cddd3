"""Closed-loop replay (`data.replay.ratio: auto`): the replay share, and its split among retained
domains, set at every evaluation so that forgetting stays within a budget.

    data:
      replay: {ratio: auto, max_forgetting_bpb: 0.02, min: 0.05, max: 0.5, start: 0.25}
    eval: {every_steps: 50}

The controller is pure (no torch, no I/O): `decide(settings, state, forgetting, step)` reads each
retained domain's delta_bpb from the evaluation every process has, and returns a `Decision` for
the steps until the next evaluation plus its next `ControllerState` (plain floats, JSON exact: a
resumed run continues with the same state, so it makes the same decisions). `revise_plan` turns a
decision into a plan revision: sequences already trained stay, each source continues from its own
read position (`MixturePlan.revise`).

The rule, an incremental (velocity-form) proportional-integral step on the worst retained
domain's forgetting F (point estimate of delta_bpb, bits per byte), measured in budgets B:

    e_n   = (F_n - AIM * B) / B                        error against the aim, in budgets
    dr    = GAIN_P * (e_n - e_{n-1}) + GAIN_I * e_n    (the first evaluation: GAIN_I * e_n only)
    r_n   = clamp(r_{n-1} + clamp(dr, -STEP_DOWN, STEP_UP), min, max)

Anti-windup: the state is the applied share itself, not a sum of errors, so time spent at a
bound accumulates nothing, and the share leaves the bound at the first evaluation the error
changes sign. A steady signal gives a constant dr: the share moves one way only, no oscillation.
Why the point estimate: see docs/replay-control.md (in short: the interval's width comes from the
held-out sample, which replay cannot change; steering on its upper end would only add a fixed
margin, and evaluations during training compute no interval to save time).

The split: replay source k gets weight w_k (1 + min(max(F_k, 0) / B, SPLIT_CAP)), w_k its weight
in the recipe, normalised; a domain that forgets more is replayed more, and none is starved.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from cpt_cli.config import ReplayConfig
from cpt_cli.data.mixture import MixturePlan, SegmentTable
from cpt_cli.data.schedule import MixSchedule, ValueSchedule
from cpt_cli.errors import RecipeError

AIM = 0.8
"""Aim at 80% of the budget: a share holds until the next evaluation, so forgetting can rise past
the last reading for one interval; the 20% margin keeps the final figure within the budget."""
GAIN_P = 0.05
"""Share added per budget of rise in the worst forgetting since the last evaluation: reacts to a
trend before the level reaches the aim (a rise of 0.02 bpb under a 0.02 budget: +0.05)."""
GAIN_I = 0.03
"""Share added per evaluation per budget of error: one budget over the aim for seven evaluations
moves the share by 0.2, the span between Ibrahim et al. (2024)'s 5% (weak shift) and 25%
(strong shift). Both gains were chosen on simulated plants (tests/test_replay_control.py): the
loop settles without sustained oscillation wherever 0.1 of share moves the settled forgetting by
up to one budget, however fast forgetting follows the share, and by up to two budgets when it
takes more than one interval to follow; larger gains alternate on the fast plants (the delay of
one interval: loop gain above 1)."""
STEP_UP = 0.10
"""Largest rise of the share per evaluation: from 0.05 to 0.5 in five evaluations."""
STEP_DOWN = 0.05
"""Largest fall per evaluation, half the rise: going over the budget is the failure the budget
names, staying under it only costs some gain on the new data."""
SPLIT_CAP = 3.0
"""A domain's replay weight grows to at most 4 times its recipe weight (3 budgets of forgetting),
so that one domain forgetting a lot never starves the others of replay."""
SHARE_QUANTUM = 1e-4
"""Shares and split weights are rounded to 0.0001: decisions read (and compare) as written in
metrics.jsonl, and a last-bit difference in an evaluation rarely changes the plan."""


@dataclass(frozen=True)
class ControlSettings:
    """The recipe's side of the controller (`data.replay` under `ratio: auto`)."""

    budget: float                      # max_forgetting_bpb, bits per byte
    low: float                         # min
    high: float                        # max
    start: float
    base_weights: dict[str, float]     # replay source -> its recipe weight, in plan order

    @classmethod
    def from_recipe(cls, replay: ReplayConfig, base_weights: Mapping[str, float]
                    ) -> ControlSettings:
        if not replay.is_auto or replay.max_forgetting_bpb is None:
            raise ValueError("the replay controller runs only under data.replay.ratio: auto")
        return cls(budget=replay.max_forgetting_bpb, low=replay.min, high=replay.max,
                   start=replay.start, base_weights=dict(base_weights))

    @classmethod
    def from_plan(cls, replay: ReplayConfig, plan: MixturePlan) -> ControlSettings:
        """Settings whose split starts from the plan's replay sources and their weights."""
        return cls.from_recipe(replay, {s.name: float(s.weight) for s in plan.sources
                                        if s.role == "replay"})


@dataclass(frozen=True)
class ControllerState:
    """What the controller carries from one evaluation to the next (saved in checkpoints)."""

    share: float
    weights: dict[str, float]
    last_worst: float | None = None    # the worst forgetting at the last evaluation (bpb)
    evaluations: int = 0

    def applied(self, decision: Decision) -> ControllerState:
        """This state with the share the plan applied (`revise_plan` may have moved it to fit
        max_epochs): the next step starts from what was trained, so nothing winds up."""
        return dataclasses.replace(self, share=decision.share)

    def as_dict(self) -> dict[str, Any]:
        return {"share": self.share, "weights": dict(self.weights),
                "last_worst": self.last_worst, "evaluations": self.evaluations}

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> ControllerState:
        return cls(share=float(raw["share"]), weights={str(k): float(v) for k, v in
                                                       raw["weights"].items()},
                   last_worst=None if raw["last_worst"] is None else float(raw["last_worst"]),
                   evaluations=int(raw["evaluations"]))


@dataclass(frozen=True)
class Decision:
    """The replay share and its split for the steps from `step` to the next evaluation."""

    step: int
    share: float
    weights: dict[str, float]          # replay source -> share of replay; sums to 1
    worst_domain: str | None = None
    worst_forgetting: float | None = None
    budget: float = 0.0
    limited: str | None = None         # "min", "max", "rate" or "max_epochs": what held it
    change: float = 0.0                # the share's change at this decision

    @classmethod
    def from_event(cls, event: Mapping[str, Any]) -> Decision:
        """The decision back from its `as_event` record (a resume re-applies the recorded
        decisions to rebuild the plan exactly)."""
        return cls(step=int(event["step"]), share=float(event["share"]),
                   weights={str(k): float(v) for k, v in event["weights"].items()},
                   worst_domain=event["worst_domain"],
                   worst_forgetting=event["worst_forgetting_bpb"],
                   budget=float(event["budget_bpb"]), limited=event["limited"],
                   change=float(event["change"]))

    def as_event(self) -> dict[str, Any]:
        """The `metrics.jsonl` line of this decision (also a manifest entry)."""
        return {"event": "replay", "step": self.step, "share": self.share,
                "weights": dict(self.weights), "worst_domain": self.worst_domain,
                "worst_forgetting_bpb": self.worst_forgetting, "budget_bpb": self.budget,
                "within_budget": None if self.worst_forgetting is None
                else self.worst_forgetting <= self.budget,
                "limited": self.limited, "change": self.change}


def _quantize(x: float) -> float:
    return round(round(x / SHARE_QUANTUM) * SHARE_QUANTUM, 10)


def split(settings: ControlSettings, forgetting: Mapping[str, float]) -> dict[str, float]:
    """Replay weights per replay source (sum 1): the recipe weight, raised with the domain's
    forgetting in budgets (capped at SPLIT_CAP); a domain without a figure keeps its weight."""
    raw = {name: w * (1.0 + min(max(forgetting.get(name, 0.0), 0.0) / settings.budget,
                                SPLIT_CAP))
           for name, w in settings.base_weights.items()}
    total = sum(raw.values())
    if not total > 0:
        return {name: 0.0 for name in raw}
    weights = {name: _quantize(v / total) for name, v in raw.items()}
    # Rounding may leave the sum a few quanta off 1: the largest weight absorbs it.
    if weights:
        top = max(weights, key=lambda n: (weights[n], n))
        weights[top] = _quantize(1.0 - sum(v for n, v in weights.items() if n != top))
    return weights


def initial_state(settings: ControlSettings) -> ControllerState:
    """Before the first evaluation: the starting share, the recipe's split."""
    return ControllerState(share=_quantize(settings.start), weights=split(settings, {}))


def decide(settings: ControlSettings, state: ControllerState, forgetting: Mapping[str, float],
           step: int) -> tuple[Decision, ControllerState]:
    """One evaluation's decision: `forgetting` maps each retained domain to its delta_bpb (point
    estimate) against the start model. Domains without a finite figure are left out; with none
    at all the share and split hold."""
    figures = {n: float(v) for n, v in forgetting.items() if v is not None and math.isfinite(v)}
    if not figures:
        decision = Decision(step=step, share=state.share, weights=dict(state.weights),
                            budget=settings.budget)
        return decision, dataclasses.replace(state, evaluations=state.evaluations + 1)
    worst_domain = max(sorted(figures), key=lambda n: figures[n])
    worst = figures[worst_domain]
    B = settings.budget
    error = (worst - AIM * B) / B
    change = GAIN_I * error
    if state.last_worst is not None:
        change += GAIN_P * (worst - state.last_worst) / B
    limited = None
    if change > STEP_UP or change < -STEP_DOWN:
        change, limited = min(max(change, -STEP_DOWN), STEP_UP), "rate"
    share = state.share + change
    if share >= settings.high:
        share, limited = settings.high, "max" if share > settings.high else limited
    elif share <= settings.low:
        share, limited = settings.low, "min" if share < settings.low else limited
    share = _quantize(share)
    weights = split(settings, figures)
    decision = Decision(step=step, share=share, weights=weights, worst_domain=worst_domain,
                        worst_forgetting=worst, budget=B, limited=limited,
                        change=_quantize(share - state.share))
    return decision, ControllerState(share=share, weights=weights, last_worst=worst,
                                     evaluations=state.evaluations + 1)


def retained_forgetting(report: Mapping[str, Any]) -> dict[str, float]:
    """Each retained domain's forgetting (delta_bpb) from a forgetting report
    (`cpt_cli.evaluation.report.forgetting_table`)."""
    return {d["name"]: d["forgetting"] for d in report["domains"]
            if d.get("forgetting") is not None}


# --------------------------------------------------------------------------------------------
# The plan side: a decision becomes a revision of the mixture plan.
# --------------------------------------------------------------------------------------------


def decision_schedule(plan: MixturePlan, decision: Decision) -> MixSchedule:
    """The plan's schedule with the replay ratio and the replay sources' weights replaced by the
    decision's, constant to the end of the run; the new sources keep theirs (a number or the
    recipe's schedule). Values before the revision's step are never read by `revise`."""
    g = max(1, plan.global_batch)
    steps = plan.total_sequences // g
    old = plan.schedule
    weights: list[ValueSchedule] = []
    for k, s in enumerate(plan.sources):
        if s.role == "replay":
            weights.append(ValueSchedule.constant(decision.weights.get(s.name, 0.0)))
        elif old is not None:
            weights.append(old.weights[k])
        else:
            weights.append(ValueSchedule.constant(float(s.weight)))
    return MixSchedule(weights=weights, roles=[s.role for s in plan.sources],
                       ratio=ValueSchedule.constant(decision.share), steps=steps,
                       global_batch=g, names=[s.name for s in plan.sources])


@dataclass
class Revision:
    """A revised plan and the decision it applies (its share lowered or raised where a source's
    max_epochs would not allow the controller's choice)."""

    plan: MixturePlan
    decision: Decision
    notes: list[str] = field(default_factory=list)


def revise_plan(plan: MixturePlan, step: int, decision: Decision, max_epochs: list[float],
                sequences_per_epoch: list[float]) -> Revision:
    """`plan.revise(step * global_batch, ...)` with the decision's schedule. When the decision's
    share would repeat a replay source beyond its max_epochs (or starve the new sources under
    theirs), the share is moved to the nearest one that fits, found by bisection on the exact
    counts, and the decision says `limited: max_epochs`: a run never stops for a share it chose."""
    at = step * max(1, plan.global_batch)
    notes = []
    if _direction(plan, at, decision, max_epochs, sequences_per_epoch):
        fitted = _fit_share(plan, at, decision, max_epochs, sequences_per_epoch)
        notes.append(f"replay share {decision.share} at step {step} would repeat a source "
                     f"beyond its max_epochs; planned {fitted.share} instead")
        decision = fitted
    try:
        revised = plan.revise(at, decision_schedule(plan, decision), max_epochs,
                              sequences_per_epoch)
    except RecipeError as err:  # no share fits: the sources are too small for the rest
        raise RecipeError(f"data.replay.ratio: auto cannot continue at step {step}: no replay "
                          "share fits every source's max_epochs for the rest of the run. Add "
                          "data, raise max_epochs, or shorten train.tokens.",
                          err.problems) from None
    return Revision(revised, decision, notes)


def _direction(plan: MixturePlan, at: int, decision: Decision, max_epochs: list[float],
               sequences_per_epoch: list[float]) -> int:
    """+1 when a new source overruns (more replay needed), -1 when a replay source does, 0
    when the decision fits (both: 0, and `revise` reports the impossible plan)."""
    schedule = decision_schedule(plan, decision)
    base = plan.read_positions(at)
    totals = base + SegmentTable.build(schedule, at, base).counts.sum(axis=0)
    over = [s.role for s, n, per, limit in zip(plan.sources, totals, sequences_per_epoch,
                                               max_epochs, strict=True)
            if per and n / per > limit]
    if "replay" in over and "new" in over:
        return 0
    return -1 if "replay" in over else (1 if "new" in over else 0)


def _fit_share(plan: MixturePlan, at: int, decision: Decision, max_epochs: list[float],
               sequences_per_epoch: list[float]) -> Decision:
    """The share nearest `wanted` that fits every source's max_epochs (bisection to
    SHARE_QUANTUM: about 13 steps over [0, 1))."""
    direction = _direction(plan, at, decision, max_epochs, sequences_per_epoch)
    if direction == 0:
        return decision
    # Feasible shares form an interval (a replay source's count rises with the share, a new
    # one's falls): bisect between the wanted share and the far end on the feasible side.
    bad, good = decision.share, (0.0 if direction < 0 else 1.0 - SHARE_QUANTUM)
    while abs(good - bad) > SHARE_QUANTUM:
        mid = _quantize((bad + good) / 2)
        if mid in (bad, good):
            break
        trial = dataclasses.replace(decision, share=mid)
        if _direction(plan, at, trial, max_epochs, sequences_per_epoch) == 0:
            good = mid
        else:
            bad = mid
    return dataclasses.replace(decision, share=_quantize(good), limited="max_epochs")

