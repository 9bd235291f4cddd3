"""`cpt eval RUN --plot FILE.png`: per-domain bits per byte over training steps, and under
`data.replay.ratio: auto` the replay share the controller chose, on the same steps below."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cpt_cli.data.mixture import phase_span
from cpt_cli.errors import UsageError
from cpt_cli.runs.events import read_events


def check_available() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UsageError("--plot needs matplotlib: pip install 'cpt[plot]' (or matplotlib)"
                         ) from None


def read_curves(path: Path, report: dict[str, Any]) -> dict[str, list[tuple[int, float]]]:
    """bpb per domain per step: training-time evaluations (metrics.jsonl), else checkpoints."""
    run_dir = path if (path / "metrics.jsonl").is_file() else path.parent
    curves: dict[str, list[tuple[int, float]]] = {}
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file():
        for event in read_events(metrics):
            if event.get("event") == "eval":
                for name, d in event["domains"].items():
                    curves.setdefault(name, []).append((event["step"], d["bpb"]))
    if not curves:
        for point in report.get("curve", []):
            if point["step"] is not None:
                for name, d in point["domains"].items():
                    curves.setdefault(name, []).append((point["step"], d["bpb"]))
    return curves


def phase_boundaries(path: Path) -> list[int]:
    """Steps where a scheduled run's mix entered a new phase, from the `phase` of its eval events
    (metrics.jsonl): the start of each phase after the first that an evaluation saw."""
    run_dir = path if (path / "metrics.jsonl").is_file() else path.parent
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        return []
    phases = [e.get("phase") for e in read_events(metrics) if e.get("event") == "eval"]
    spans = [phase_span(p) for p in dict.fromkeys(p for p in phases if p)]
    return sorted({span[0] for span in spans if span is not None and span[0] > 0})


def read_replay(path: Path) -> list[tuple[int, float]]:
    """The replay share over the run, from its `replay` events: (step, share) from each
    decision on, the first point the share the run started with. Empty for a fixed ratio."""
    run_dir = path if (path / "metrics.jsonl").is_file() else path.parent
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        return []
    events = [e for e in read_events(metrics) if e.get("event") == "replay"]
    if not events:
        return []
    points = [(0, float(events[0].get("previous_share", events[0]["share"])))]
    points += [(int(e["step"]), float(e["share"])) for e in events]
    return points


def draw_curves(curves: dict[str, list[tuple[int, float]]], roles: dict[str, str],
                replay: list[tuple[int, float]] | None = None,
                budget: float | None = None, boundaries: list[int] | tuple[int, ...] = ()) -> Any:
    """The figure: one line per domain, target solid, retained dashed; under ratio: auto a
    second panel below with the replay share, a step line (a share holds until the next
    decision), on the same steps. The legend stands to the right of the axes, outside them:
    inside, wherever "best" put it, it covered some curve (the target's, falling from the upper
    left, in the quickstart's runs)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if replay:
        fig, (ax, share_ax) = plt.subplots(
            2, 1, figsize=(9, 6), sharex=True, height_ratios=(3, 1), layout="constrained")
        last = max(p[0] for points in curves.values() for p in points)
        steps = [p[0] for p in replay] + [max(last, replay[-1][0])]
        shares = [p[1] for p in replay] + [replay[-1][1]]
        share_ax.step(steps, shares, where="post", color="black", label="replay share")
        share_ax.set_ylabel("replay share")
        share_ax.set_ylim(0, max(shares) * 1.15 + 0.01)
        share_ax.grid(alpha=0.3)
        share_ax.set_xlabel("step")
        title = "replay share set by ratio: auto"
        share_ax.set_title(title + (f" (budget {budget:.4f} bpb)" if budget else ""),
                           fontsize="medium")
    else:
        fig, ax = plt.subplots(figsize=(9, 4.5), layout="constrained")
    for name, points in curves.items():
        points = sorted(dict(points).items())
        style = "-" if roles.get(name) == "target" else "--"
        ax.plot([p[0] for p in points], [p[1] for p in points], style, marker="o", markersize=3,
                label=f"{name} ({roles.get(name, '?')})")
    for step in boundaries:  # a mixture schedule's phases (docs/evaluation.md)
        ax.axvline(step, color="grey", linestyle=":", linewidth=1)
    if not replay:
        ax.set_xlabel("step")
    ax.set_ylabel("bits per byte (held out)")
    ax.set_title("per-domain bits per byte: target (solid) vs retained (dashed)")
    ax.grid(alpha=0.3)
    fig.legend(loc="outside right upper")
    return fig


def plot_run(path: str | Path, report: dict[str, Any], out: str | Path) -> None:
    curves = read_curves(Path(path), report)
    if not curves:
        raise UsageError(f"--plot: {path} has no evaluations over steps (pass a run directory "
                         "trained with eval.every_steps or with checkpoints)")
    fig = draw_curves(curves, {d["name"]: d["role"] for d in report["domains"]},
                      read_replay(Path(path)), report.get("summary", {}).get("replay_budget_bpb"),
                      phase_boundaries(Path(path)))
    import matplotlib.pyplot as plt  # after draw_curves chose the Agg backend

    try:
        fig.savefig(str(out), dpi=120)
    except OSError as err:  # checked before the evaluation, but a disk can fill meanwhile
        Path(out).unlink(missing_ok=True)  # a PNG cut short is no plot
        raise UsageError(f"--plot {out}: could not write it ({err.strerror or err}); the table "
                         "above holds the figures. Free space or pick another file.") from None
    finally:
        plt.close(fig)
