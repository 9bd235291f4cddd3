"""A run's plan as a history of mixtures: the mixture in force from step 0, then each revision.

A revision keeps every sequence before its step exactly as planned and plans the rest on the
new mixture, each source continuing from its own read position (`MixturePlan.revise`): nothing
is trained twice, nothing skipped. A resume with `--replan` adds one revision at the
checkpoint's step; closed-loop replay adds one at each decision. The history is saved in every
checkpoint, so a later resume rebuilds the very same plan from it, whatever the recipe says
now about the past.

An entry is {"step", "mix"} or {"step", "decision"}:
- a mixture is what `--replan` may change: each source's `weight` and `min_weight` and
  `data.replay.ratio`, as plain values (numbers or schedule mappings);
- a decision is closed-loop replay's record (`Decision.as_event()`, the share the plan applied),
  re-applied with `replay_control.revise_plan`, its max_epochs fitting included, exactly as the
  run applied it (tests/test_replay_loop.py resumes an auto run bit for bit).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from cpt_cli.config import Recipe, to_plain
from cpt_cli.data.prepare import PreparedData, plan_data
from cpt_cli.data.replay_control import Decision, revise_plan
from cpt_cli.data.schedule import build_schedule

Mix = dict[str, Any]


def mix_of(recipe: Recipe) -> Mix:
    """The recipe's mixture: {"ratio": ..., "weights": {source: [weight, min_weight]}}."""
    sources = [*recipe.data.sources, *recipe.data.replay.sources]
    return {"ratio": to_plain(recipe.data.replay.ratio),
            "weights": {s.name: [to_plain(s.weight), s.min_weight] for s in sources}}


def _with_mix(recipe: Recipe, data: PreparedData, mix: Mix) -> Recipe:
    """`recipe` with the mixture's ratio; the prepared domains take its weights (in place: after
    the last revision they hold the mixture in force, which the manifest records)."""
    for d in data.domains:
        if d.name in mix["weights"]:
            weight, floor = mix["weights"][d.name]
            d.config = dataclasses.replace(d.config, weight=weight, min_weight=floor)
    replay = dataclasses.replace(recipe.data.replay, ratio=mix["ratio"])
    return dataclasses.replace(recipe, data=dataclasses.replace(recipe.data, replay=replay))


def plan_history(recipe: Recipe, data: PreparedData, num_processes: int,
                 history: list[dict[str, Any]]) -> PreparedData:
    """The plan of a run whose mixture changed at the steps of `history` ([{"step", "mix"}]
    or [{"step", "decision"}], the first a mixture at step 0): planned on the first mixture,
    then revised at each later step."""
    data = plan_data(_with_mix(recipe, data, history[0]["mix"]), data, num_processes)
    for revision in history[1:]:
        if "decision" in revision:
            data = apply_decision(recipe, data, Decision.from_event(revision["decision"]))[0]
        else:
            data = revise(recipe, data, revision["step"], revision["mix"])
    data.plan_history = [dict(h) for h in history]
    return data


def _max_epochs(recipe: Recipe, data: PreparedData) -> list[float]:
    return [d.config.max_epochs if d.config.max_epochs is not None else recipe.data.max_epochs
            for d in data.domains]


def apply_decision(recipe: Recipe, data: PreparedData, decision: Decision
                   ) -> tuple[PreparedData, Decision, list[str]]:
    """`data` with its plan revised at `decision.step` to the decision's replay share and split
    (the history grows by one entry). Returns the decision as applied (its share moved where a
    source's max_epochs would not allow it) and the notes saying so."""
    assert data.plan is not None
    warnings = list(data.plan.warnings)
    revision = revise_plan(data.plan, decision.step, decision, _max_epochs(recipe, data),
                           [s.sequences_per_epoch for s in data.streams])
    data.plan = revision.plan
    data.plan.warnings[:0] = [w for w in warnings if w not in data.plan.warnings]
    data.plan_history = [*data.plan_history, {"step": decision.step,
                                              "decision": revision.decision.as_event()}]
    return data, revision.decision, revision.notes


def revise(recipe: Recipe, data: PreparedData, step: int, mix: Mix) -> PreparedData:
    """`data` with its plan revised at `step` to `mix` (the history grows by one entry)."""
    assert data.plan is not None
    revised = _with_mix(recipe, data, mix)
    schedule = build_schedule(revised, [(d.name, d.role, d.config) for d in data.domains],
                              data.steps, data.global_batch, always=True)
    assert schedule is not None
    limits = _max_epochs(recipe, data)
    warnings = list(data.plan.warnings)
    data.plan = data.plan.revise(step * data.global_batch, schedule, limits,
                                 [s.sequences_per_epoch for s in data.streams])
    data.plan.warnings[:0] = [w for w in warnings if w not in data.plan.warnings]
    data.plan_history = [*data.plan_history, {"step": step, "mix": mix}]
    return data
