"""`cpt mix inspect`: the mixture plan before any compute is spent.

Per source: role, documents, tokens available, held-out tokens, weight, planned tokens and share,
the share actually achieved in the first 1,000 sequences and overall, epochs; totals, replay
share, packing efficiency and warnings; optionally N packed sequences rendered with their document
boundaries.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from cpt_cli.config import Recipe, ScheduleConfig
from cpt_cli.data.mixture import MixturePlan
from cpt_cli.data.prepare import PreparedData, plan_data, prepare_data
from cpt_cli.data.replay_control import ControlSettings, Decision, revise_plan, split
from cpt_cli.training.schedule import lr_multiplier

WINDOW = 1000
RAMP_SLICE = 0.1  # a ramp is reported per 10% of the run


def phase_steps(plan: MixturePlan, steps: int) -> list[tuple[int, int]]:
    """(first step, end step) of each reported phase: between the schedules' points, and per
    10% of the run inside a ramp; the whole run for a constant mix."""
    if plan.schedule is None:
        return [(0, steps)]
    mix = plan.schedule
    cuts = {0, steps}
    for value in [*mix.weights, mix.ratio]:
        cuts.update(p for p, _ in value.points if 0 < p < steps)
    ramps = [r for value in [*mix.weights, mix.ratio] for r in value.ramps()]
    tenth = [round(i * RAMP_SLICE * steps) for i in range(1, round(1 / RAMP_SLICE))]
    cuts.update(t for t in tenth if any(a < t < b for a, b in ramps))
    ordered = sorted(c for c in cuts if 0 <= c <= steps)
    return list(zip(ordered, ordered[1:], strict=False))


def mix_phases(plan: MixturePlan, lr: ScheduleConfig) -> list[dict[str, Any]]:
    """Per phase: its steps, the learning-rate multiplier at its start and end, and per source
    the scheduled and planned share and the planned tokens."""
    g = max(1, plan.global_batch)
    steps = plan.total_sequences // g
    phases = []
    for a, b in phase_steps(plan, steps):
        served = plan.read_positions(b * g) - plan.read_positions(a * g)
        n = (b - a) * g
        if plan.schedule is not None:
            x = a * g + (np.arange(64) + 0.5) * n / 64
            scheduled = plan.schedule.shares(x).mean(axis=0)
        else:
            scheduled = np.asarray([s.share_requested for s in plan.sources])
        phases.append({
            "start_step": a, "end_step": b, "sequences": n,
            "lr_start": lr_multiplier(lr, a, steps), "lr_end": lr_multiplier(lr, b - 1, steps),
            "sources": [{"name": s.name, "share_scheduled": float(share),
                         "share_planned": float(c) / n if n else 0.0,
                         "tokens_planned": int(c) * plan.seq_len}
                        for s, share, c in zip(plan.sources, scheduled, served, strict=True)]})
    return phases


def inspect_mix(recipe: Recipe, *, samples: int = 0, num_processes: int | None = None,
                data: PreparedData | None = None, plot: Path | None = None) -> dict[str, Any]:
    P = num_processes or recipe.launch.num_processes
    data = data or prepare_data(recipe)
    data = plan_data(recipe, data, P)
    plan = data.plan
    assert plan is not None
    k = len(plan.sources)
    # A scheduled plan orders its segments lazily: read the first 1,000 sequences only, and
    # take the overall shares from the counts (the same figures as counting the whole order).
    order = plan.parts[0].order_slice(0, WINDOW) if plan.parts else plan.source_order()
    first = np.bincount(order[:WINDOW], minlength=k) / max(1, min(WINDOW, len(order)))
    overall = np.asarray([s.sequences for s in plan.sources]) / max(1, plan.total_sequences)
    result = plan.as_dict()
    result["phases"] = mix_phases(plan, recipe.train.schedule)
    result["schedule_fingerprint"] = plan.schedule_fingerprint()
    trained_total = sum(row["tokens_trained_planned"] for row in result["sources"])
    result["tokens_trained_planned"] = trained_total
    for i, row in enumerate(result["sources"]):
        # The share of the loss: a 30% Q&A share trained on its answers alone may be 12%.
        row["share_trained"] = row["tokens_trained_planned"] / trained_total if trained_total \
            else 0.0
        row["share_achieved_first_1000"] = float(first[i])
        row["share_achieved"] = float(overall[i])
        row["dropped_duplicates"] = data.domains[i].dropped_duplicates
        row["heldout_documents"] = len(data.domains[i].heldout)
        row["skipped"] = data.domains[i].entry.meta["skipped"] if data.domains[i].entry else {}
    padding = 0.0
    if recipe.data.packing == "best_fit":
        fractions = [s.padding_fraction() for s in data.streams]
        weights = [s.sequences for s in plan.sources]
        padding = float(np.average(fractions, weights=weights)) if sum(weights) else 0.0
    result["sequences"] = plan.total_sequences
    result["steps"] = data.steps
    result["global_batch_sequences"] = data.global_batch
    result["packing"] = {"mode": recipe.data.packing, "padding_fraction": padding,
                         "padding_tokens": int(round(padding * plan.total_tokens)),
                         "dropped_tokens": sum(s.dropped_tokens(r.sequences)
                                               for s, r in zip(data.streams, plan.sources,
                                                               strict=True))}
    result["retained_only_domains"] = [d.name for d in data.eval_domains
                                       if d.name not in {x.name for x in data.domains}]
    result["samples"] = [_render(data, i) for i in range(min(samples, plan.total_sequences))]
    result["replay_control"] = replay_control(recipe, data)
    if plot is not None:
        plot_mix(plan, recipe, plot)
    return result


def replay_control(recipe: Recipe, data: PreparedData) -> dict[str, Any] | None:
    """Under `data.replay.ratio: auto`: the controller's settings, the steps where it may revise
    the plan, and the highest share the sources' max_epochs allow over the whole run (the plan
    shown is only the start: later shares depend on the evaluations). None otherwise."""
    replay = recipe.data.replay
    if not replay.is_auto:
        return None
    assert data.plan is not None and recipe.eval.every_steps is not None
    plan, every = data.plan, recipe.eval.every_steps
    settings = ControlSettings.from_plan(replay, plan)
    limits = [d.config.max_epochs if d.config.max_epochs is not None else recipe.data.max_epochs
              for d in data.domains]
    # The highest share, planned from step 0 with the recipe's split: a plan at that share from
    # the first evaluation on can only take fewer replay sequences.
    highest = Decision(step=0, share=settings.high, weights=split(settings, {}),
                       budget=settings.budget)
    fitted = revise_plan(plan, 0, highest, limits,
                         [s.sequences_per_epoch for s in data.streams]).decision
    return {"ratio": "auto", "budget_bpb": settings.budget, "min": settings.low,
            "max": settings.high, "start": settings.start, "every_steps": every,
            "decision_steps": list(range(every, data.steps, every)),
            "replay_sources": list(settings.base_weights),
            "retained_domains": [d.name for d in data.eval_domains if d.role == "retained"],
            "max_share_fitting_epochs": fitted.share,
            "note": "the plan shows the starting share; later shares depend on the evaluations"}


def _render(data: PreparedData, index: int) -> dict[str, Any]:
    """One packed sequence: its source and its documents' text, split at boundaries."""
    assert data.plan is not None
    k, j = data.plan.locate(index)
    seq = data.streams[k].sequence(j)
    bounds = sorted(set(seq.doc_starts) | set(seq.continued) | {0})
    used = len(seq.input_ids) - seq.padding
    pieces = []
    for a, b in zip(bounds, bounds[1:] + [used], strict=True):
        if a >= used:
            break
        ids = [int(t) for t in seq.input_ids[a:b]]
        pieces.append({"start": a, "tokens": len(ids), "continued": a in seq.continued,
                       "trained": int((seq.labels[a:b] != -100).sum()),
                       "text": data.tokenizer.decode(ids)})
    return {"index": index, "source": data.plan.sources[k].name, "documents": pieces,
            "padding": seq.padding}


def plot_mix(plan: MixturePlan, recipe: Recipe, path: Path) -> None:
    """Stacked scheduled shares per source over the run, the learning rate on a second axis."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed: the figure goes to a file
    import matplotlib.pyplot as plt

    g = max(1, plan.global_batch)
    steps = max(1, plan.total_sequences // g)
    x = np.linspace(0, steps, 400, endpoint=False)  # 400 columns: smooth at any run length
    if plan.schedule is not None:
        shares = plan.schedule.shares(x * g)
    else:
        shares = np.tile([s.share_requested for s in plan.sources], (len(x), 1))
    fig, ax = plt.subplots(figsize=(9, 4.5))
    ax.stackplot(x, shares.T, labels=[s.name for s in plan.sources], alpha=0.85)
    ax.set(xlim=(0, steps), ylim=(0, 1), xlabel="step", ylabel="share of sequences",
           title=f"mixture schedule: {recipe.name}")
    lr_axis = ax.twinx()
    peak = recipe.train.optimizer.lr
    lr_axis.plot(x, [peak * lr_multiplier(recipe.train.schedule, int(s), steps) for s in x],
                 color="black", linewidth=1.5, label="learning rate")
    lr_axis.set_ylabel("learning rate")
    lr_axis.set_ylim(bottom=0)
    handles, labels = ax.get_legend_handles_labels()
    extra, extra_labels = lr_axis.get_legend_handles_labels()
    ax.legend(handles + extra, labels + extra_labels, loc="upper left", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
