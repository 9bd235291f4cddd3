"""Closed-loop replay (`data.replay.ratio: auto`): the recipe's checks, the controller's
decisions on made-up sequences of evaluations, and the plan revisions they become."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

from cpt_cli.config import recipe_from_config
from cpt_cli.data import replay_control as rc
from cpt_cli.data.mixture import PlanSource, make_plan
from cpt_cli.data.replay_control import (
    ControllerState,
    ControlSettings,
    Decision,
    decide,
    decision_schedule,
    initial_state,
    retained_forgetting,
    revise_plan,
    split,
)
from cpt_cli.errors import RecipeError

BUDGET = 0.02


def auto_recipe(**replay: Any) -> dict[str, Any]:
    return {"name": "auto", "model": {"path": "models/base"},
            "data": {"sources": [{"name": "code", "path": "code.jsonl"}],
                     "replay": {"ratio": "auto", "max_forgetting_bpb": BUDGET,
                                "sources": [{"name": "web", "path": "web.jsonl"}], **replay}},
            "train": {"steps": 100, "global_batch_size": 8},
            "eval": {"every_steps": 10}}


def problems_of(config: dict[str, Any]) -> list[str]:
    with pytest.raises(RecipeError) as info:
        recipe_from_config(config)
    return info.value.problems


# --------------------------------------------------------------------------------------------
# The recipe
# --------------------------------------------------------------------------------------------


def test_an_auto_recipe_loads_and_starts_at_its_start_share() -> None:
    replay = recipe_from_config(auto_recipe(start=0.3)).data.replay
    assert replay.is_auto and replay.starting_ratio() == 0.3
    assert (replay.min, replay.max, replay.max_forgetting_bpb) == (0.05, 0.5, BUDGET)
    fixed = recipe_from_config(auto_recipe(ratio=0.25, max_forgetting_bpb=None)).data.replay
    assert not fixed.is_auto and fixed.starting_ratio() == 0.25


@pytest.mark.parametrize("change, key, text", [
    ({"max_forgetting_bpb": None}, "data.replay.max_forgetting_bpb", "required"),
    ({"max_forgetting_bpb": 0}, "data.replay.max_forgetting_bpb", "must be above 0"),
    ({"min": -0.1}, "data.replay.min", "at least 0 and below 1"),
    ({"max": 1.0}, "data.replay.max", "at least 0 and below 1"),
    ({"min": 0.4, "max": 0.2, "start": 0.3}, "data.replay.min", "crossed"),
    ({"start": 0.6}, "data.replay.start", "outside [min, max]"),
    ({"min": 0.0}, "data.replay.min", "allow_drop"),
    ({"sources": [], "inherit": False}, "data.replay.ratio", "needs a retained domain"),
    ({"sources": [{"name": "web", "path": "w.jsonl", "weight": {"0%": 1, "100%": 2}}]},
     "data.replay.sources[0].weight", "the controller sets the split"),
])
def test_each_bad_auto_setting_is_named(change: dict[str, Any], key: str, text: str) -> None:
    problems = problems_of(auto_recipe(**change))
    assert any(p.startswith(f"{key}:") and text in p for p in problems), problems


def test_auto_needs_evaluations_during_the_run() -> None:
    config = auto_recipe()
    del config["eval"]
    assert any(p.startswith("eval.every_steps:") and "required" in p
               for p in problems_of(config))
    config["eval"] = {"every_steps": 100}  # the run's length: never evaluated before the end
    assert any(p.startswith("eval.every_steps:") and "never act" in p
               for p in problems_of(config))


def test_every_auto_problem_at_once() -> None:
    config = auto_recipe(max_forgetting_bpb=None, min=0.6, max=1.2, sources=[], inherit=False)
    del config["eval"]
    problems = problems_of(config)
    for key in ("data.replay.max_forgetting_bpb", "data.replay.max", "data.replay.ratio",
                "eval.every_steps"):
        assert any(p.startswith(f"{key}:") for p in problems), (key, problems)


def test_auto_settings_without_auto_are_refused() -> None:
    problems = problems_of(auto_recipe(ratio=0.25, min=0.1))
    assert any(p.startswith("data.replay.max_forgetting_bpb:") and "eval.max_forgetting_bpb"
               in p for p in problems), problems
    assert any(p.startswith("data.replay.min:") and "only with" in p for p in problems)


def test_a_misspelt_auto_is_a_type_problem() -> None:
    problems = problems_of(auto_recipe(ratio="automatic"))
    assert any(p.startswith("data.replay.ratio:") and "'auto'" in p for p in problems), problems


def test_a_bad_auto_recipe_exits_2_naming_every_problem(cli: Any, write_recipe: Any,
                                                        tiny_recipe: dict[str, Any]) -> None:
    tiny_recipe["data"]["replay"] = {"ratio": "auto", "min": 0.4, "max": 0.2,
                                     "sources": [], "inherit": False}
    result = cli("mix", "inspect", write_recipe(tiny_recipe))
    assert result.exit_code == 2, result.output
    for key in ("data.replay.max_forgetting_bpb", "data.replay.min", "data.replay.ratio",
                "eval.every_steps"):
        assert key in result.output
    assert "Traceback" not in result.output


# --------------------------------------------------------------------------------------------
# The controller
# --------------------------------------------------------------------------------------------


def settings(**kw: Any) -> ControlSettings:
    values: dict[str, Any] = {"budget": BUDGET, "low": 0.05, "high": 0.5, "start": 0.25,
                              "base_weights": {"web": 1.0, "wiki": 1.0}}
    return ControlSettings(**{**values, **kw})


def run(s: ControlSettings, readings: list[dict[str, float]]) -> list[Decision]:
    state, out = initial_state(s), []
    for step, reading in enumerate(readings):
        decision, state = decide(s, state, reading, 10 * (step + 1))
        out.append(decision)
    return out


def test_rising_forgetting_raises_replay() -> None:
    readings = [{"web": BUDGET * x, "wiki": 0.0} for x in np.linspace(0.2, 2.0, 10)]
    shares = [d.share for d in run(settings(), readings)]
    assert shares[-1] > 0.25 + 0.1
    later = shares[3:]  # once forgetting passes the aim the share only rises
    assert all(b >= a for a, b in zip(later, later[1:], strict=False)), shares


def test_forgetting_far_below_the_budget_lowers_replay_to_min() -> None:
    decisions = run(settings(), [{"web": 0.0, "wiki": -0.01}] * 30)
    shares = [d.share for d in decisions]
    assert all(b <= a for a, b in zip(shares, shares[1:], strict=False))
    assert shares[-1] == 0.05 and decisions[-1].limited == "min"


@pytest.mark.parametrize("level", [0.0, 0.5, 0.8, 1.0, 1.5])
def test_a_steady_signal_never_oscillates(level: float) -> None:
    shares = [0.25] + [d.share for d in run(settings(), [{"web": level * BUDGET}] * 25)]
    steps = [b - a for a, b in zip(shares, shares[1:], strict=False) if b != a]
    assert all(a * b > 0 for a, b in zip(steps, steps[1:], strict=False)), shares
    if level == rc.AIM:
        assert set(shares) == {0.25}  # at the aim nothing moves


def test_bounds_and_rate_limits_hold_on_any_sequence() -> None:
    rng = np.random.default_rng(0)
    s = settings(low=0.1, high=0.4, start=0.2)
    readings = [{"web": float(x), "wiki": float(y)}
                for x, y in rng.normal(0, 5 * BUDGET, size=(200, 2))]
    previous = 0.2
    for d in run(s, readings):
        assert 0.1 <= d.share <= 0.4
        assert -rc.STEP_DOWN - 1e-9 <= d.share - previous <= rc.STEP_UP + 1e-9
        assert sum(d.weights.values()) == pytest.approx(1.0, abs=1e-9)
        previous = d.share


def test_the_split_favours_the_domain_that_forgets_more() -> None:
    weights = split(settings(), {"web": 2 * BUDGET, "wiki": 0.0})
    assert weights["web"] > weights["wiki"] > 0
    assert weights["web"] == pytest.approx(3 / 4)
    capped = split(settings(), {"web": 100 * BUDGET, "wiki": -BUDGET})
    assert capped["wiki"] == pytest.approx(1 / (2 + rc.SPLIT_CAP))  # never starved
    assert split(settings(), {}) == {"web": 0.5, "wiki": 0.5}


def test_no_figure_holds_the_share() -> None:
    s = settings()
    state = ControllerState(share=0.3, weights={"web": 0.6, "wiki": 0.4}, last_worst=0.01,
                            evaluations=2)
    decision, after = decide(s, state, {"web": float("nan")}, 30)
    assert (decision.share, decision.weights) == (0.3, {"web": 0.6, "wiki": 0.4})
    assert after.evaluations == 3 and after.last_worst == 0.01


def test_a_resumed_controller_makes_the_same_decisions() -> None:
    """The state survives JSON (a checkpoint) exactly, so decisions after a resume are the
    uninterrupted run's, bit for bit."""
    rng = np.random.default_rng(1)
    readings = [{"web": float(x), "wiki": float(y)} for x, y in rng.uniform(0, 0.05, (12, 2))]
    s = settings()
    straight = run(s, readings)
    state = initial_state(s)
    for i, reading in enumerate(readings[:5]):
        _, state = decide(s, state, reading, 10 * (i + 1))
    state = ControllerState.from_dict(json.loads(json.dumps(state.as_dict())))
    resumed = []
    for i, reading in enumerate(readings[5:], start=5):
        decision, state = decide(s, state, reading, 10 * (i + 1))
        resumed.append(decision)
    assert resumed == straight[5:]
    assert json.loads(json.dumps(straight[-1].as_event()))["share"] == straight[-1].share


@pytest.mark.parametrize("lag", [0.3, 0.6, 1.0])
@pytest.mark.parametrize("gain", [2.0, 5.0, 10.0])
def test_the_closed_loop_settles_within_the_budget(lag: float, gain: float) -> None:
    """A made-up plant: forgetting moves a fraction `lag` of the way to its settled value each
    interval, and the settled value falls by `gain` budgets per unit of share (the aim is held
    at a share of 0.3). The loop ends within the budget and changes direction at most twice."""
    s = settings(base_weights={"web": 1.0})
    state, forgetting, shares = initial_state(s), 0.0, []
    for n in range(25):
        settled = BUDGET * (rc.AIM + gain * (0.3 - state.share))
        forgetting += lag * (settled - forgetting)
        _, state = decide(s, state, {"web": forgetting}, n)
        shares.append(state.share)
    assert forgetting <= BUDGET and abs(shares[-1] - 0.3) < 0.02
    steps = [b - a for a, b in zip(shares, shares[1:], strict=False) if abs(b - a) > 1e-9]
    assert sum(a * b < 0 for a, b in zip(steps, steps[1:], strict=False)) <= 2, shares


def test_retained_forgetting_reads_only_retained_domains() -> None:
    report = {"domains": [{"name": "code", "role": "target", "gain": 0.1},
                          {"name": "web", "role": "retained", "forgetting": 0.03},
                          {"name": "wiki", "role": "retained", "forgetting": None}]}
    assert retained_forgetting(report) == {"web": 0.03}


# --------------------------------------------------------------------------------------------
# The plan side
# --------------------------------------------------------------------------------------------


def plan_of(per_epoch: float = 1e9, epochs: float = 1e9) -> Any:
    rows = [PlanSource("code", "new", 1.0, 100, 10**9, 0),
            PlanSource("web", "replay", 1.0, 100, 10**9, 0),
            PlanSource("wiki", "replay", 1.0, 100, 10**9, 0)]
    return make_plan(rows, [per_epoch] * 3, 100 * 12, 0.25, 64, 0, [epochs] * 3,
                     global_batch=12)


def served(plan: Any) -> dict[int, list[int]]:
    seen: dict[int, list[int]] = {k: [] for k in range(len(plan.sources))}
    for i in range(plan.total_sequences):
        k, j = plan.locate(i)
        seen[k].append(j)
    return seen


def revisions(seed: int) -> Any:
    """A plan revised at every 10th step by the controller, fed made-up evaluations."""
    rng = np.random.default_rng(seed)
    plan = plan_of()
    s = ControlSettings.from_recipe(
        recipe_from_config(auto_recipe()).data.replay, {"web": 1.0, "wiki": 1.0})
    state = initial_state(s)
    for step in range(10, 100, 10):
        reading = {"web": float(rng.uniform(0, 0.06)), "wiki": float(rng.uniform(0, 0.02))}
        decision, state = decide(s, state, reading, step)
        before = plan
        revision = revise_plan(plan, step, decision, [1e9] * 3, [1e9] * 3)
        plan, state = revision.plan, state.applied(revision.decision)
        for i in range(0, step * 12, 7):  # the steps already trained stay as they were
            assert plan.locate(i) == before.locate(i)
    return plan


def test_revisions_serve_every_sequence_once_and_follow_the_decisions() -> None:
    plan = revisions(0)
    assert len(plan.revisions) == 9
    for k, js in served(plan).items():  # each source read in order, none twice, none skipped
        assert js == list(range(len(js)))
        assert len(js) == plan.sources[k].sequences
    assert sum(s.sequences for s in plan.sources) == plan.total_sequences
    # The last interval (steps 90-100) holds the last decision's share to within a sequence
    # per source (the plan's bound).
    order = plan.source_order()[90 * 12:]
    replay = np.isin(order, [1, 2]).sum()
    share = plan.schedule.ratio.value(95)
    assert abs(replay - share * len(order)) <= 2


def test_recorded_decisions_rebuild_the_revised_plan_exactly() -> None:
    """What a resume does: the decisions, read back from their JSON records and applied to the
    starting plan in order, give the same plan as the run that made them."""
    rng = np.random.default_rng(2)
    s = ControlSettings(budget=BUDGET, low=0.05, high=0.5, start=0.25,
                        base_weights={"web": 1.0, "wiki": 1.0})
    plan, state, records = plan_of(), initial_state(s), []
    for step in (20, 40, 60):
        decision, state = decide(s, state, {"web": float(rng.uniform(0, 0.05))}, step)
        revision = revise_plan(plan, step, decision, [1e9] * 3, [1e9] * 3)
        plan = revision.plan
        records.append(json.dumps(revision.decision.as_event()))
    rebuilt = plan_of()
    for record in records:
        decision = Decision.from_event(json.loads(record))
        rebuilt = revise_plan(rebuilt, decision.step, decision, [1e9] * 3, [1e9] * 3).plan
    assert rebuilt.fingerprint() == plan.fingerprint()
    assert np.array_equal(rebuilt.source_order(), plan.source_order())


def test_revisions_are_deterministic() -> None:
    a, b = revisions(5), revisions(5)
    assert a.revisions == b.revisions and a.fingerprint() == b.fingerprint()
    assert np.array_equal(a.source_order(), b.source_order())
    assert revisions(6).fingerprint() != a.fingerprint()


def test_a_share_over_max_epochs_is_lowered_to_fit() -> None:
    """Replay sources of 150 sequences at max_epochs 1: a share of 0.5 from step 10 would need
    (1080 x 0.5) / 2 = 270 of each; the revision plans the largest share that fits instead."""
    plan = make_plan([PlanSource("code", "new", 1.0, 100, 10**9, 0),
                      PlanSource("web", "replay", 1.0, 100, 10**9, 0),
                      PlanSource("wiki", "replay", 1.0, 100, 10**9, 0)],
                     [1e9, 150, 150], 1200, 0.1, 64, 0, [1e9, 1.0, 1.0], global_batch=12)
    decision = Decision(step=10, share=0.5, weights={"web": 0.5, "wiki": 0.5}, budget=BUDGET)
    revision = revise_plan(plan, 10, decision, [1e9, 1.0, 1.0], [1e9, 150, 150])
    assert revision.decision.limited == "max_epochs" and revision.notes
    assert 0.1 < revision.decision.share < 0.5
    assert all(s.epochs <= 1.0 for s in revision.plan.sources[1:])
    looser = Decision(step=10, share=revision.decision.share + 2 * rc.SHARE_QUANTUM,
                      weights=decision.weights, budget=BUDGET)
    with pytest.raises(RecipeError):  # a little more would not fit: the share is the largest
        plan.revise(120, decision_schedule(plan, looser), [1e9, 1.0, 1.0], [1e9, 150, 150])


# --------------------------------------------------------------------------------------------
# cpt mix inspect
# --------------------------------------------------------------------------------------------


def test_mix_inspect_shows_the_start_and_says_later_shares_depend_on_evaluations(
        cli: Any, write_recipe: Any, tiny_recipe: dict[str, Any], tmp_path: Any,
        quickstart_corpus: dict[str, Any]) -> None:
    import shutil

    shutil.copy(quickstart_corpus["code"], tmp_path / "data" / "code.jsonl")
    tiny_recipe["data"]["replay"] = {"ratio": "auto", "max_forgetting_bpb": 0.05,
                                     "start": 0.2, "max": 0.6,
                                     # about 5,600 sequences of code: 0.06 epochs is about
                                     # 28% of the run's 1,200, not the 60% of max
                                     "sources": [{"name": "code", "path": "data/code.jsonl",
                                                  "max_epochs": 0.06}]}
    tiny_recipe["train"] = {"steps": 150, "global_batch_size": 8, "micro_batch_size": 4}
    tiny_recipe["eval"] = {"every_steps": 50}
    path = write_recipe(tiny_recipe)
    result = cli("mix", "inspect", path, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["replay_share"] == pytest.approx(0.2, abs=0.005)  # the plan is the start
    auto = report["replay_control"]
    assert auto["decision_steps"] == [50, 100]
    assert auto["replay_sources"] == ["code"] and "code" in auto["retained_domains"]
    assert 0.2 <= auto["max_share_fitting_epochs"] < 0.35
    text = cli("mix", "inspect", path)
    assert text.exit_code == 0, text.output
    flat = " ".join(text.output.split())
    assert "later shares depend on the evaluations" in flat
    assert "at each of the 2 evaluations" in flat and "beyond its max_epochs" in flat
