"""Closed-loop replay in the trainer (`data.replay.ratio: auto`, docs/replay-control.md).

After each evaluation during training the controller (data/replay_control.py) reads the retained
domains' delta_bpb and decides the replay share and split until the next evaluation. Here that
decision becomes a plan revision at the evaluation's step (data/replan.py `apply_decision`: the
steps trained stay, each source continues from its own read position), the loader reads the
revised plan from the next step on, the decision joins `data.plan_history` and the controller
state joins the RunState, both saved by the checkpoint of the same step (which is written after
this), and a `replay` event goes to metrics.jsonl.

Every process runs the same evaluation of the same weights on the same held-out texts, so every
process gets the same report, bit for bit, and makes the same decision: nothing is broadcast
(tests/test_replay_loop.py checks that a 2-process run decides as a 1-process run).
"""

from __future__ import annotations

from typing import Any

from cpt_cli.data.replan import apply_decision
from cpt_cli.data.replay_control import (
    ControlSettings,
    Decision,
    decide,
    initial_state,
    retained_forgetting,
)
from cpt_cli.training.setup import Run


def steer_replay(run: Run, report: dict[str, Any]) -> Decision | None:
    """The decision on this evaluation's `report` (None unless ratio: auto), applied to the
    plan from the run's current step on."""
    replay = run.recipe.data.replay
    if not replay.is_auto:
        return None
    assert run.data.plan is not None
    settings = ControlSettings.from_plan(replay, run.data.plan)
    state = run.state.replay_control or initial_state(settings)
    step = run.state.step
    wanted, after = decide(settings, state, retained_forgetting(report), step)
    data, applied, notes = apply_decision(run.recipe, run.data, wanted)
    run.loader.plan = data.plan  # the loader locates every sequence through its plan
    run.state.replay_control = after.applied(applied)
    event = {**applied.as_event(), "tokens": step * run.tokens_per_step,
             "previous_share": state.share}
    run.emit(event)
    for note in notes:
        run.display.status(note)
    run.display.replay_line(event)
    return applied


def decision_missed(run: Run) -> bool:
    """Whether an auto run resumes at a step whose evaluation (and so its decision) was skipped
    because the run was stopping there: the straight run made that decision before its next
    step, so the resumed one must too."""
    step, every = run.state.step, run.recipe.eval.every_steps
    if not run.recipe.data.replay.is_auto or not every or step % every or \
            not 0 < step < run.steps:
        return False
    return not any(h["step"] == step and "decision" in h for h in run.data.plan_history)
