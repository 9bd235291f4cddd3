"""Learning-rate schedules: warmup (fraction or steps), cosine, linear, constant, wsd with a linear
or 1-sqrt cooldown, min_lr_ratio, and the LambdaLR that applies them per parameter group."""

from __future__ import annotations

import math

import pytest
import torch

from cpt_cli.config import ScheduleConfig
from cpt_cli.training.optim import make_scheduler
from cpt_cli.training.schedule import decay_start, lr_multiplier, warmup_steps

TOTAL = 100


def curve(**kwargs: object) -> list[float]:
    config = ScheduleConfig(**kwargs)  # type: ignore[arg-type]
    return [lr_multiplier(config, s, TOTAL) for s in range(TOTAL)]


def test_warmup_as_fraction_or_steps() -> None:
    assert warmup_steps(ScheduleConfig(warmup=0.1), TOTAL) == 10
    assert warmup_steps(ScheduleConfig(warmup=0.0), TOTAL) == 0
    assert warmup_steps(ScheduleConfig(warmup=7), TOTAL) == 7
    # A fraction scales with the run, a step count does not.
    assert warmup_steps(ScheduleConfig(warmup=0.1), 1000) == 100
    assert warmup_steps(ScheduleConfig(warmup=7), 1000) == 7


@pytest.mark.parametrize("name", ["cosine", "linear", "constant", "wsd"])
def test_warmup_rises_linearly_from_near_zero(name: str) -> None:
    lrs = curve(name=name, warmup=10)
    # The first update of a stage uses 1/11 of the peak: a re-warm starts from (almost) zero
    # without wasting a step on a zero learning rate.
    assert lrs[0] == pytest.approx(1 / 11)
    steps = [lrs[s + 1] - lrs[s] for s in range(9)]
    assert all(d == pytest.approx(1 / 11) for d in steps)
    assert lrs[9] == pytest.approx(10 / 11)
    # After warmup: the peak (constant, wsd) or the first step of the decay from it.
    assert lrs[9] < lrs[10] <= 1.0
    if name in ("constant", "wsd"):
        assert lrs[10] == 1.0


def test_cosine_decays_to_min_lr_ratio() -> None:
    lrs = curve(name="cosine", warmup=10, min_lr_ratio=0.1)
    after = lrs[10:]
    assert all(a >= b for a, b in zip(after[:-1], after[1:], strict=True))
    assert lrs[-1] == pytest.approx(0.1)
    # Halfway through the decay the cosine is halfway between peak and floor.
    mid = 10 + 45 - 1  # progress = (step - warm + 1) / 90 = 0.5
    assert lrs[mid] == pytest.approx(0.1 + 0.9 * 0.5)


def test_linear_decays_in_equal_steps() -> None:
    lrs = curve(name="linear", warmup=0, min_lr_ratio=0.0)
    assert lrs[0] == pytest.approx(1 - 1 / TOTAL)
    assert lrs[-1] == pytest.approx(0.0)
    diffs = {round(lrs[s] - lrs[s + 1], 9) for s in range(TOTAL - 1)}
    assert diffs == {round(1 / TOTAL, 9)}


def test_constant_holds_the_peak() -> None:
    lrs = curve(name="constant", warmup=5, min_lr_ratio=0.1)
    assert lrs[5:] == [1.0] * (TOTAL - 5)


def test_wsd_stable_then_linear_cooldown() -> None:
    config = ScheduleConfig(name="wsd", warmup=0.05, decay=0.2, min_lr_ratio=0.1)
    assert decay_start(config, TOTAL) == 80
    lrs = [lr_multiplier(config, s, TOTAL) for s in range(TOTAL)]
    assert lrs[5:80] == [1.0] * 75
    assert lrs[80] < 1.0
    assert lrs[-1] == pytest.approx(0.1)
    diffs = {round(lrs[s] - lrs[s + 1], 9) for s in range(80, TOTAL - 1)}
    assert diffs == {round(0.9 / 20, 9)}


def test_wsd_one_minus_sqrt_cooldown() -> None:
    """Hagele et al. 2024: lr = peak * (1 - sqrt(progress)) over the cooldown, which drops faster
    than linear at first and flattens at the end."""
    sqrt = curve(name="wsd", warmup=0, decay=0.2, decay_shape="1-sqrt", min_lr_ratio=0.0)
    linear = curve(name="wsd", warmup=0, decay=0.2, decay_shape="linear", min_lr_ratio=0.0)
    for s in range(80, TOTAL):
        progress = (s - 80 + 1) / 20
        assert sqrt[s] == pytest.approx(1 - math.sqrt(progress))
    assert sqrt[84] < linear[84]
    assert sqrt[-1] == pytest.approx(0.0)
    floored = curve(name="wsd", warmup=0, decay=0.2, decay_shape="1-sqrt", min_lr_ratio=0.2)
    assert floored[89] == pytest.approx(0.2 + 0.8 * (1 - math.sqrt(0.5)))
    assert floored[-1] == pytest.approx(0.2)


def test_wsd_decay_in_steps_and_other_schedules_have_no_decay_start() -> None:
    assert decay_start(ScheduleConfig(name="wsd", decay=15), TOTAL) == 85
    assert decay_start(ScheduleConfig(name="cosine"), TOTAL) == TOTAL
    # The cooldown never starts inside the warmup.
    assert decay_start(ScheduleConfig(name="wsd", warmup=30, decay=90), TOTAL) == 30


@pytest.mark.parametrize("name", ["cosine", "linear", "wsd"])
def test_min_lr_ratio_is_the_last_update(name: str) -> None:
    for floor in (0.0, 0.25):
        assert curve(name=name, warmup=3, min_lr_ratio=floor)[-1] == pytest.approx(floor)


def test_scheduler_applies_embedding_scale_exactly_once() -> None:
    """LambdaLR multiplies each group's base lr by its lambda: the group's lr_scale must enter
    once (in the lambda), not again in the base lr."""
    a, b = torch.nn.Parameter(torch.zeros(2, 2)), torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.AdamW([{"params": [a], "lr_scale": 1.0},
                             {"params": [b], "lr_scale": 0.1}], lr=1e-3)
    schedule = ScheduleConfig(name="cosine", warmup=2, min_lr_ratio=0.1)
    sched = make_scheduler(opt, schedule, 10)
    for step in range(10):
        mult = lr_multiplier(schedule, step, 10)
        assert opt.param_groups[0]["lr"] == pytest.approx(1e-3 * mult)
        assert opt.param_groups[1]["lr"] == pytest.approx(1e-4 * mult)
        opt.step()
        sched.step()
