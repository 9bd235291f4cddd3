"""Mixture schedules: every accepted and refused form, exact counts per phase, the prefix and
window bounds, epochs over a schedule, lazy planning of a huge run, and plan revisions."""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import pytest

from cpt_cli.config import recipe_from_config
from cpt_cli.config.mixschedule import parse_position
from cpt_cli.config.schema import ScheduleConfig
from cpt_cli.data.mixture import PlanSource, make_plan, phase_at, phase_span
from cpt_cli.data.schedule import MAX_SEGMENT, MixSchedule, ValueSchedule, build_schedule
from cpt_cli.errors import RecipeError
from cpt_cli.training import schedule as lr


def recipe(weights: list[Any], replay: list[Any] | None = None, ratio: Any = 0.0,
           lr_name: str = "wsd", **extra: Any) -> dict[str, Any]:
    sources = [{"name": f"s{i}", "path": "d.jsonl", "weight": w} | extra.get(f"s{i}", {})
               for i, w in enumerate(weights)]
    replays = [{"name": f"r{i}", "path": "d.jsonl", "weight": w} | extra.get(f"r{i}", {})
               for i, w in enumerate(replay or [])]
    return {"name": "sched", "model": {"path": "m"},
            "data": {"seq_len": 100, "sources": sources,
                     "replay": {"ratio": ratio, "sources": replays}
                     | extra.get("replay_extra", {})},
            "train": {"steps": 100, "global_batch_size": 10,
                      "schedule": {"name": lr_name, "warmup": 0.1, "decay": 0.2}}}


def problems_of(config: dict[str, Any]) -> list[str]:
    with pytest.raises(RecipeError) as info:
        recipe_from_config(config)
    return info.value.problems


@pytest.mark.parametrize(("raw", "kind", "value"), [
    ("10%", "fraction", 0.1), (0.8, "fraction", 0.8), (0, "fraction", 0.0), (1, "fraction", 1.0),
    ("400M", "tokens", 400_000_000), ("2B", "tokens", 2 * 10**9), (50_000, "tokens", 50_000),
    ("decay", "phase", "decay"), ("stable", "phase", "stable"), ("0.5", "fraction", 0.5),
])
def test_positions(raw: Any, kind: str, value: Any) -> None:
    position = parse_position(raw)
    assert (position.kind, position.value) == (kind, value)


@pytest.mark.parametrize("raw", ["cooldown", "-5%", "ten", True, 1.5, "1e3x"])
def test_bad_positions(raw: Any) -> None:
    with pytest.raises(ValueError, match="percentage"):
        parse_position(raw)


def test_accepted_schedules_resolve_on_steps() -> None:
    config = recipe([{"0%": 0.7, "80%": 0.7, "100%": 0.2},
                     {"stable": 0.3, "decay": 0.8, "interpolate": "step"},
                     {0.5: 1.0, "90k": 2.0}, 1.0],
                    replay=[1.0], ratio={"0%": 0.1, "decay": 0.3})
    r = recipe_from_config(config)
    sources = [(s.name, "new", s) for s in r.data.sources] + \
        [(s.name, "replay", s) for s in r.data.replay.sources]
    schedule = build_schedule(r, sources, 100, 10)
    assert schedule is not None and not schedule.is_constant
    assert schedule.weights[0].points == ((0, 0.7), (80, 0.7), (100, 0.2))
    assert schedule.weights[0].value(90) == pytest.approx(0.45)  # halfway down the ramp
    assert schedule.weights[1].points == ((10, 0.3), (80, 0.8))  # warmup 10%, decay at 80
    assert schedule.weights[1].value(79.9) == 0.3 and schedule.weights[1].value(80) == 0.8
    assert schedule.weights[2].points == ((50, 1.0), (90, 2.0))  # 90k tokens = step 90
    assert schedule.ratio.value(40) == pytest.approx(0.1 + 0.2 * 40 / 80)
    assert schedule.weights[3].is_constant


def test_numbers_only_keep_no_schedule() -> None:
    r = recipe_from_config(recipe([0.7, 0.3]))
    assert build_schedule(r, [(s.name, "new", s) for s in r.data.sources], 100, 10) is None


def test_every_bad_form_at_once_names_key_value_and_fix() -> None:
    config = recipe([{"50%": 0.5, "20%": 0.7},                 # unordered
                     {"decay": 0.5, "80%": 0.2},               # same step as decay (80)
                     {"0%": 1, "110%": 2},                     # past the end
                     {"0%": 1, "200k": 2},                     # tokens past 100k
                     {"decy": 1.0},                            # unknown phase
                     {"0%": -1.0},                             # negative
                     {"0%": 1, "interpolate": "cubic"}],
                    replay=[{"0%": 1.0, "50%": 0.0}], ratio={"0%": 0.2, "100%": 0.0})
    problems = problems_of(config)
    text = "\n".join(problems)
    assert "data.sources[0].weight: point '20%' (step 20) falls before '50%'" in text
    assert "data.sources[1].weight: point '80%' (step 80) falls at the same step as 'decay'" \
        in text
    assert "data.sources[2].weight: position '110%' is past the end" in text
    assert "data.sources[3].weight: position '200k' is past the end of the run (100,000" in text
    assert "data.sources[4].weight: position 'decy' is not accepted (did you mean 'decay'?)" \
        in text
    assert "data.sources[5].weight: the value at '0%' is -1.0" in text
    assert "data.sources[6].weight.interpolate: 'cubic' is not accepted" in text
    assert any(p.startswith("data.replay.sources[0].weight: 'r0' is a replay source and its "
                            "weight is 0 from step 50") and "min_weight" in p
               and "allow_drop: true" in p for p in problems)
    assert any(p.startswith("data.replay.ratio: replay stops at step 100") for p in problems)


def test_phase_names_need_wsd() -> None:
    problems = problems_of(recipe([{"warmup": 1.0, "decay": 2.0}], lr_name="cosine"))
    assert len(problems) == 2
    assert all("names a wsd phase but train.schedule.name is 'cosine'" in p for p in problems)


def test_weights_summing_to_zero_are_refused() -> None:
    problems = problems_of(recipe([{"0%": 1.0, "50%": 0.0, "60%": 1.0},
                                   {"0%": 1.0, "50%": 0.0, "60%": 1.0}]))
    assert problems == ["data.sources: the weights sum to 0 at step 50 of 100, so that group has "
                        "no share to split; give one source a weight above 0 there (or a "
                        "min_weight)"]
    # A floor keeps the group alive, and a plain number never sums to 0 with it.
    recipe_from_config(recipe([{"0%": 1.0, "50%": 0.0, "60%": 1.0}, 0.5]))
    recipe_from_config(recipe([{"0%": 1.0, "50%": 0.0, "60%": 1.0},
                               {"0%": 1.0, "50%": 0.0, "60%": 1.0}], s0={"min_weight": 0.1}))


def test_a_dropped_replay_source_is_kept_by_min_weight_or_allowed() -> None:
    dropped = {"0%": 1.0, "50%": 0.0}
    recipe_from_config(recipe([1.0], replay=[dropped, 1.0], ratio=0.2,
                              r0={"min_weight": 0.05}))
    recipe_from_config(recipe([1.0], replay=[dropped, 1.0], ratio=0.2, r0={"allow_drop": True}))
    recipe_from_config(recipe([1.0], replay=[1.0], ratio={"0%": 0.3, "100%": 0.0},
                              replay_extra={"allow_drop": True}))
    # A new source of this stage may be dropped: it is not yet a learned domain.
    recipe_from_config(recipe([dropped, 1.0]))


def test_lr_phase_boundaries_match_the_trainer() -> None:
    for name, warmup, decay, steps in [("wsd", 0.1, 0.2, 100), ("wsd", 5, 30, 77),
                                       ("wsd", 0.01, 0.5, 1000), ("cosine", 0.05, 0.1, 40)]:
        config = ScheduleConfig(name=name, warmup=warmup, decay=decay)
        # One definition (ScheduleConfig's), read by the trainer's schedule and the mixture's.
        assert config.warmup_steps(steps) == lr.warmup_steps(config, steps)
        assert config.decay_start(steps) == lr.decay_start(config, steps)


# ------------------------------------------------------------------------------------------
# The plan
# ------------------------------------------------------------------------------------------


def rows(roles: list[str]) -> list[PlanSource]:
    return [PlanSource(f"s{i}", role, 1.0, 100, 10**12, 0) for i, role in enumerate(roles)]


def schedule(weights: list[ValueSchedule], roles: list[str], steps: int, batch: int,
             ratio: ValueSchedule | None = None) -> MixSchedule:
    return MixSchedule(weights=weights, roles=roles, ratio=ratio or ValueSchedule.constant(0.0),
                       steps=steps, global_batch=batch, names=[f"s{i}" for i in range(len(roles))])


def plan_for(mix: MixSchedule, epochs: float = 1e9, per_epoch: float = 1e9) -> Any:
    k = len(mix.roles)
    return make_plan(rows(mix.roles), [per_epoch] * k, mix.total, 0.0, 64, 0, [epochs] * k,
                     global_batch=mix.global_batch, schedule=mix)


def scheduled_prefix(mix: MixSchedule) -> np.ndarray:
    """(S + 1, K) the exact scheduled count of each source before every position: the share
    integrated sequence by sequence (midpoint rule on each sequence, exact for a linear share)."""
    x = np.arange(mix.total) + 0.5
    return np.vstack([np.zeros(len(mix.roles)), np.cumsum(mix.shares(x), axis=0)])


def test_step_phases_get_exact_counts() -> None:
    # 0.7/0.3 for 60 steps, then 0.2/0.8: a switch, as at the start of a wsd decay.
    mix = schedule([ValueSchedule(((0, 0.7), (60, 0.2)), "step"),
                    ValueSchedule(((0, 0.3), (60, 0.8)), "step")], ["new", "new"], 100, 16)
    plan = plan_for(mix)
    order = plan.source_order()
    first, second = np.bincount(order[:960], minlength=2), np.bincount(order[960:], minlength=2)
    assert first.tolist() == [672, 288] and second.tolist() == [128, 512]  # exact per phase
    assert [s.sequences for s in plan.sources] == [800, 800]
    assert plan.sources[0].share_requested == pytest.approx(0.5)


def random_schedule(rng: np.random.Generator) -> MixSchedule:
    steps, batch = int(rng.integers(20, 80)), int(rng.integers(1, 40))
    k = int(rng.integers(2, 6))
    weights = []
    for _ in range(k):
        n = int(rng.integers(1, 5))
        at = sorted(set(rng.integers(0, steps + 1, n).tolist()))
        weights.append(ValueSchedule(tuple((int(a), float(rng.uniform(0.05, 2))) for a in at),
                                     "step" if rng.random() < 0.3 else "linear"))
    roles = ["new"] * (k - 1) + ["replay"]
    ratio = ValueSchedule(((0, float(rng.uniform(0.05, 0.5))), (steps, float(rng.uniform(0.05,
                                                                                        0.5)))))
    return schedule(weights, roles, steps, batch, ratio)


def test_every_prefix_and_window_follows_the_schedule() -> None:
    rng = np.random.default_rng(3)
    for _ in range(25):
        mix = random_schedule(rng)
        plan = plan_for(mix)
        order = plan.source_order()
        served = np.vstack([np.zeros(len(mix.roles)),
                            np.cumsum(np.eye(len(mix.roles))[order], axis=0)])
        deviation = served - scheduled_prefix(mix)
        # The bound of docs/data.md: under 1 + B + 1/8 sequences at every prefix, so every
        # window of consecutive sequences holds its scheduled count to within twice that.
        k = len(mix.roles)
        bound = 1 + (1 - 1 / (2 * k - 2)) + 1 / 8
        assert np.abs(deviation).max() < bound
        assert (deviation.max(axis=0) - deviation.min(axis=0)).max() < 2 * bound
        # At segment boundaries the running counts are within one sequence of the schedule.
        bounds = plan.parts[0].bounds
        assert np.abs(deviation[bounds]).max() < 1 + 1e-9
        assert [s.sequences for s in plan.sources] == np.bincount(order, minlength=k).tolist()


def test_each_source_reads_its_stream_in_order() -> None:
    mix = random_schedule(np.random.default_rng(7))
    plan = plan_for(mix)
    seen: dict[int, list[int]] = {k: [] for k in range(len(mix.roles))}
    for i in range(plan.total_sequences):
        k, j = plan.locate(i)
        seen[k].append(j)
    for k, js in seen.items():
        assert js == list(range(plan.sources[k].sequences))


def test_epochs_are_counted_over_the_whole_schedule() -> None:
    # s0 ramps 1 -> 0 while s1 ramps 0 -> 1: each gets half of 4,000 sequences overall.
    mix = schedule([ValueSchedule(((0, 1.0), (100, 0.0))), ValueSchedule(((0, 0.0), (100, 1.0)))],
                   ["new", "new"], 100, 40)
    plan = plan_for(mix, epochs=16, per_epoch=400)
    assert [s.sequences for s in plan.sources] == [2000, 2000]
    assert [s.epochs for s in plan.sources] == [5.0, 5.0]
    assert sum("repeated 5.0 times" in w for w in plan.warnings) == 2
    with pytest.raises(RecipeError, match="repeats it 5.00 times, above its max_epochs 4"):
        plan_for(mix, epochs=4, per_epoch=400)


def test_a_constant_schedule_is_the_constant_plan() -> None:
    numbers = make_plan(rows(["new", "new"]), [1e9] * 2, 1000, 0.0, 64, 0, [1e9] * 2,
                        global_batch=10)
    constant = schedule([ValueSchedule.constant(1.0), ValueSchedule.constant(1.0)],
                        ["new", "new"], 100, 10)
    same = make_plan(rows(["new", "new"]), [1e9] * 2, 1000, 0.0, 64, 0, [1e9] * 2,
                     global_batch=10, schedule=constant)
    assert same.fingerprint() == numbers.fingerprint() and not same.parts
    assert np.array_equal(same.source_order(), numbers.source_order())


def test_the_fingerprints_follow_the_schedule() -> None:
    def ramp(end: float) -> MixSchedule:
        return schedule([ValueSchedule(((0, 1.0), (100, end))), ValueSchedule.constant(1.0)],
                        ["new", "new"], 100, 10)
    a, b, again = plan_for(ramp(0.2)), plan_for(ramp(0.3)), plan_for(ramp(0.2))
    assert a.fingerprint() == again.fingerprint() != b.fingerprint()
    assert a.schedule_fingerprint() == again.schedule_fingerprint() != b.schedule_fingerprint()


def test_a_huge_run_is_planned_lazily() -> None:
    # 100B tokens at seq_len 2048: 48,828 steps of 1,000 sequences; five sources ramping.
    steps, batch = 48_828, 1000
    mix = schedule([ValueSchedule(((0, 1.0 + k), (int(steps * 0.8), 1.0), (steps, 5.0 - k)))
                    for k in range(4)] + [ValueSchedule.constant(1.0)],
                   ["new"] * 4 + ["replay"], steps, batch,
                   ValueSchedule(((0, 0.1), (steps, 0.3))))
    plan = plan_for(mix)
    part = plan.parts[0]
    assert plan.total_sequences == steps * batch == int(part.counts.sum())
    assert len(part.counts) < 20_000  # counts per segment, not one entry per sequence
    assert np.diff(part.bounds).max() <= MAX_SEGMENT
    assert not part._cache  # nothing ordered until the loader asks
    last = plan.total_sequences - 1
    k, j = plan.locate(last)
    assert j == plan.sources[k].sequences - 1  # the last sequence is its source's last one
    plan.locate(0)
    plan.locate(last // 2)
    assert len(part._cache) <= part.CACHED


def served_documents(plan: Any) -> dict[int, list[int]]:
    seen: dict[int, list[int]] = {k: [] for k in range(len(plan.sources))}
    for i in range(plan.total_sequences):
        k, j = plan.locate(i)
        seen[k].append(j)
    return seen


@pytest.mark.parametrize("constant_first", [False, True])
def test_a_revision_neither_repeats_nor_skips(constant_first: bool) -> None:
    first = schedule([ValueSchedule(((0, 1.0), (100, 0.2))), ValueSchedule.constant(1.0),
                      ValueSchedule.constant(1.0)], ["new", "new", "replay"], 100, 12,
                     ValueSchedule.constant(0.25))
    if constant_first:
        first = schedule([ValueSchedule.constant(1.0)] * 3, first.roles, 100, 12,
                         ValueSchedule.constant(0.25))
    second = schedule([ValueSchedule(((0, 1.0), (50, 0.1), (100, 0.1))),
                       ValueSchedule(((40, 1.0), (100, 3.0))), ValueSchedule.constant(1.0)],
                      first.roles, 100, 12, ValueSchedule(((0, 0.25), (100, 0.4))))
    plan = make_plan(rows(first.roles), [1e9] * 3, first.total, 0.25, 64, 0, [1e9] * 3,
                     global_batch=12, schedule=first)
    at = 37 * 12
    revised = plan.revise(at, second, [1e9] * 3, [1e9] * 3)
    for i in range(at):  # the steps already trained stay as they were
        assert revised.locate(i) == plan.locate(i)
    served = served_documents(revised)
    for k, js in served.items():  # each source read in order, none twice, none skipped
        assert js == list(range(len(js)))
        assert len(js) == revised.sources[k].sequences
    assert revised.revisions == [{"sequence": at, "step": 37, "old": plan.schedule_fingerprint(),
                                  "new": second.fingerprint()}]
    assert revised.fingerprint() != plan.fingerprint()
    # After the revision the new schedule holds: source 1 gains share as its weight ramps up.
    order = revised.source_order()
    late = np.bincount(order[-240:], minlength=3) / 240
    assert late[1] > np.bincount(plan.source_order()[-240:], minlength=3)[1] / 240


def test_a_revision_off_a_step_or_of_another_run_is_refused() -> None:
    mix = schedule([ValueSchedule(((0, 1.0), (10, 2.0))), ValueSchedule.constant(1.0)],
                   ["new", "new"], 10, 8)
    plan = plan_for(mix)
    with pytest.raises(ValueError, match="step boundary"):
        plan.revise(5, mix, [1e9] * 2, [1e9] * 2)
    longer = schedule(mix.weights, mix.roles, 20, 8)
    with pytest.raises(RecipeError, match="keep the run's length"):
        plan.revise(8, longer, [1e9] * 2, [1e9] * 2)


def test_phase_at_names_the_phase_an_evaluation_saw() -> None:
    # A switch at step 60 of 100 and a ramp from step 80: three phases.
    mix = schedule([ValueSchedule(((0, 0.7), (60, 0.2)), "step"),
                    ValueSchedule(((0, 0.3), (80, 0.8), (100, 0.4)))], ["new", "new"], 100, 16)
    plan = plan_for(mix)
    names = {step: phase_at(plan, step) for step in (0, 1, 59, 60, 61, 80, 81, 100)}
    assert names == {0: "steps 0-60", 1: "steps 0-60", 59: "steps 0-60",
                     60: "steps 0-60",  # after step 60 no sequence of the new mix is trained
                     61: "steps 60-80", 80: "steps 60-80", 81: "steps 80-100",
                     100: "steps 80-100"}
    for step, name in names.items():  # the name holds the step that trained what was seen
        start, end = phase_span(name)
        assert start <= max(step - 1, 0) < end
    # The phases tile the run, each step in exactly one.
    spans = sorted({phase_span(phase_at(plan, s)) for s in range(101)})
    assert spans == [(0, 60), (60, 80), (80, 100)]


def test_phase_at_is_none_for_a_constant_mix_and_cut_at_a_revision() -> None:
    constant = make_plan(rows(["new", "new"]), [1e9] * 2, 1000, 0.0, 64, 0, [1e9] * 2,
                         global_batch=10)
    assert phase_at(constant, 0) is None and phase_at(constant, 50) is None
    ramp = schedule([ValueSchedule(((0, 1.0), (100, 0.2))), ValueSchedule.constant(1.0)],
                    ["new", "new"], 100, 10)
    plan = plan_for(ramp)
    assert {phase_at(plan, s) for s in (0, 50, 100)} == {"steps 0-100"}  # a ramp is one phase
    revised = plan.revise(40 * 10, ramp, [1e9] * 2, [1e9] * 2)
    assert [phase_at(revised, s) for s in (40, 41, 100)] == \
        ["steps 0-40", "steps 40-100", "steps 40-100"]
    assert phase_span("steps 40-100") == (40, 100)
    assert phase_span("decay") is None and phase_span("steps 4-x") is None


# ------------------------------------------------------------------------------------------
# cpt mix inspect
# ------------------------------------------------------------------------------------------


def test_mix_inspect_shows_the_schedule(cli: Any, write_recipe: Any, tiny_recipe: dict[str, Any],
                                        tiny_tokenizer: Any, tmp_path: Any) -> None:
    import json

    tiny_recipe["model"] = {"init": tiny_recipe["model"]["init"], "tokenizer": str(tiny_tokenizer)}
    tiny_recipe["data"]["sources"][0]["weight"] = {"0%": 0.8, "50%": 0.8, "100%": 0.2}
    tiny_recipe["data"]["sources"][1]["weight"] = {"0%": 0.2, "50%": 0.2, "100%": 0.8}
    tiny_recipe["train"] = {"steps": 100, "global_batch_size": 8, "micro_batch_size": 4,
                            "schedule": {"name": "wsd", "warmup": 0.05, "decay": 0.5}}
    path = write_recipe(tiny_recipe)
    result = cli("mix", "inspect", path, "--json", "--plot", "mix.png")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    rows = {s["name"]: s for s in report["sources"]}
    assert rows["prose"]["share_planned"] == pytest.approx(0.65, abs=1 / 800)  # 0.8 then 0.5
    assert rows["prose"]["weight"] == {"0%": 0.8, "50%": 0.8, "100%": 0.2}
    phases = report["phases"]
    # One constant phase to step 50, then the ramp per 10% of the run.
    assert [(p["start_step"], p["end_step"]) for p in phases] == \
        [(0, 50), (50, 60), (60, 70), (70, 80), (80, 90), (90, 100)]
    assert sum(p["sequences"] for p in phases) == report["sequences"] == 800
    for name in rows:  # per-phase tokens add up to the source's total exactly
        assert sum(s["tokens_planned"] for p in phases for s in p["sources"]
                   if s["name"] == name) == rows[name]["tokens_planned"]
    prose = [next(s for s in p["sources"] if s["name"] == "prose") for p in phases]
    assert prose[0]["share_planned"] == pytest.approx(0.8)
    assert prose[-1]["share_planned"] == pytest.approx(prose[-1]["share_scheduled"], abs=1 / 80)
    assert prose[-1]["share_planned"] < prose[1]["share_planned"]  # ramping down
    assert phases[0]["lr_start"] < 1 and phases[-1]["lr_end"] == pytest.approx(0.1)
    assert (tmp_path / "mix.png").stat().st_size > 10_000
    table = cli("mix", "inspect", path)
    assert table.exit_code == 0, table.output
    assert "mixture schedule by phase" in table.output and "0%: 0.8 ->" in table.output
    # Last tenth, one row per phase and source: qa's planned and scheduled shares.
    assert re.search(r"^\s*qa\s+73\.8%\s+74\.0%\s", table.output, re.M), table.output


def test_a_bad_schedule_exits_2_with_every_problem(cli: Any, write_recipe: Any,
                                                  tiny_recipe: dict[str, Any]) -> None:
    tiny_recipe["data"]["sources"][0]["weight"] = {"60%": 1.0, "20%": 0.5}
    tiny_recipe["data"]["sources"][1]["weight"] = {"decay": 1.0}
    result = cli("mix", "inspect", write_recipe(tiny_recipe))
    assert result.exit_code == 2
    assert "falls before '60%'" in result.output and "names a wsd phase" in result.output
    assert "Traceback" not in result.output


def test_a_scheduled_training_run_writes_the_phase_of_each_evaluation(tmp_path: Any) -> None:
    """The trainer puts phase_at's answer into every eval event of a scheduled run; a constant
    run's events have no phase (tests/test_trainer.py's runs)."""
    import json

    from test_trainer import tiny_recipe, write_sources

    from cpt_cli.training.loop import train

    paths = write_sources(tmp_path / "data")
    sources = [{"name": "prose", "path": paths["prose"], "weight": {"0%": 1.0, "50%": 0.2}},
               {"name": "code", "path": paths["code"], "weight": 0.5}]
    recipe = tiny_recipe(tmp_path, "phased", sources, train={"steps": 6},
                         eval={"every_steps": 2})
    result = train(recipe, output_dir=str(tmp_path / "run"))
    events = [json.loads(line) for line in
              (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    phases = {e["step"]: e.get("phase") for e in events if e["event"] == "eval"}
    assert set(phases) == {0, 2, 4, 6}
    assert phases[0] == phases[2] == "steps 0-3" and phases[4] == phases[6] == "steps 3-6"
