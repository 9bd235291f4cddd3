"""Rich renderings of cpt's reports: the forgetting table, the mixture plan, a comparison."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from cpt_cli.evaluation.report import verdict


def _num(x: Any, fmt: str = ".4f") -> str:
    return "-" if x is None else format(x, fmt)


def forgetting(report: dict[str, Any], console: Console, title: str | None = None) -> None:
    table = Table(title=title or f"forgetting table: {report.get('model', '')}",
                  title_justify="left")
    for col in ("domain", "role", "tokens", "loss", "ppl", "bpb", "start bpb", "delta bpb",
                "95% CI", "gain / forgetting"):
        table.add_column(col, justify="left" if col in ("domain", "role") else "right")
    for d in report["domains"]:
        delta = d.get("delta_bpb")
        significant = d.get("significant")
        if delta is None:
            change = Text("-")
        elif d["role"] == "target":
            change = Text(f"gain {-delta:+.4f}", style="green" if delta < 0 else "red")
        else:
            change = Text(f"forgot {delta:+.4f}", style="red" if delta > 0 else "green")
        if significant is False:
            change.stylize("dim")
            change.append(" (n.s.)")
        ci = "-" if d.get("ci_low") is None else f"[{d['ci_low']:+.4f}, {d['ci_high']:+.4f}]"
        table.add_row(d["name"], d["role"], f"{d['tokens']:,}", _num(d["loss"]),
                      _num(d.get("ppl"), ".2f"), _num(d["bpb"]), _num(d.get("start_bpb")),
                      _num(delta, "+.4f"), ci, change)
    console.print(table)
    if report.get("downstream"):
        tasks = Table(title="downstream tasks (lm-evaluation-harness)", title_justify="left")
        for col in ("task", "metric", "start", "now", "delta"):
            tasks.add_column(col, justify="left" if col in ("task", "metric") else "right")
        for row in report["downstream"]:
            tasks.add_row(row["task"], row["metric"], _num(row["start"]), _num(row["now"]),
                          _num(row["delta"], "+.4f"))
        console.print(tasks)
    console.print(verdict(report), highlight=False)


def plan(result: dict[str, Any], console: Console, name: str) -> None:
    table = Table(title=f"mixture plan: {name}", title_justify="left")
    for col in ("source", "role", "documents", "tokens avail.", "held out", "weight",
                "planned tokens", "share req.", "share planned", "first 1000", "achieved",
                "epochs"):
        table.add_column(col, justify="left" if col in ("source", "role") else "right")
    for s in result["sources"]:
        role = s["role"] + (" (inherited)" if s.get("inherited") else "")
        epochs = Text(f"{s['epochs']:.2f}", style="yellow" if s["epochs"] > 4 else "")
        table.add_row(s["name"], role, f"{s['documents']:,}", f"{s['tokens_available']:,}",
                      f"{s['holdout_tokens']:,}", _weight(s['weight']), f"{s['tokens_planned']:,}",
                      f"{s['share_requested']:.2%}", f"{s['share_planned']:.2%}",
                      f"{s['share_achieved_first_1000']:.2%}", f"{s['share_achieved']:.2%}",
                      epochs)
    console.print(table)
    p = result["packing"]
    console.print(f"total {result['total_tokens']:,} tokens in {result['sequences']:,} sequences "
                  f"of {result['seq_len']} ({result['steps']:,} steps of "
                  f"{result['global_batch_sequences']} sequences); replay share "
                  f"{result['replay_share']:.2%}; packing {p['mode']}: padding "
                  f"{p['padding_fraction']:.2%}, dropped tokens {p['dropped_tokens']:,}",
                  highlight=False)
    if result.get("retained_only_domains"):
        console.print("evaluated but not trained (lineage): " +
                      ", ".join(result["retained_only_domains"]), highlight=False)
    for w in result.get("warnings", []):
        console.print(f"[yellow]warning:[/yellow] {w}", highlight=False)
    for sample in result.get("samples", []):
        console.rule(f"sequence {sample['index']} from {sample['source']}")
        for doc in sample["documents"]:
            mark = "continued document" if doc["continued"] else "document"
            console.print(f"[bold cyan]<{mark} at {doc['start']}, {doc['tokens']} tokens>"
                          "[/bold cyan]")
            console.print(Text(doc["text"]))
        if sample.get("padding"):
            console.print(f"[dim]<{sample['padding']} padding tokens>[/dim]")


def replay_control(result: dict[str, Any], console: Console) -> None:
    """Under `data.replay.ratio: auto`: the plan above is only the start; when and within what
    the controller will set the replay share."""
    auto = result.get("replay_control")
    if not auto:
        return
    steps = auto["decision_steps"]
    when = (f"at each of the {len(steps)} evaluations (every {auto['every_steps']} steps, from "
            f"step {steps[0]})") if steps else "never (no evaluation before the end)"
    retained = ", ".join(auto["retained_domains"]) or "none"
    console.print(
        f"replay share: auto. The plan above is the start ({auto['start']:.2%}); later shares "
        f"depend on the evaluations: {when} the controller sets the share between "
        f"{auto['min']:.2%} and {auto['max']:.2%}, and its split among "
        f"{', '.join(auto['replay_sources'])}, to keep every retained domain ({retained}) "
        f"within {auto['budget_bpb']:+.4f} bits per byte of the start.", highlight=False)
    if auto["max_share_fitting_epochs"] < auto["max"]:
        console.print(f"[yellow]warning:[/yellow] above {auto['max_share_fitting_epochs']:.2%} "
                      "replay a replay source would be repeated beyond its max_epochs; the "
                      "controller will plan at most that share (add replay data or raise "
                      "max_epochs to allow data.replay.max)", highlight=False)


def _weight(value: Any) -> str:
    """A number, or a schedule as its points (`0%: 0.7 -> 100%: 0.2`)."""
    if not isinstance(value, dict):
        return f"{value:g}"
    points = " -> ".join(f"{k}: {v:g}" for k, v in value.items() if k != "interpolate")
    return points + (" (step)" if value.get("interpolate") == "step" else "")


def phases(result: dict[str, Any], console: Console) -> None:
    """The scheduled mix per phase (per 10% of the run inside a ramp): shares and tokens."""
    rows = result.get("phases") or []
    if len(rows) <= 1:
        return  # a constant mix: the plan table above says it all
    names = [s["name"] for s in rows[0]["sources"]]
    table = Table(title="mixture schedule by phase (planned share / scheduled share, tokens)",
                  title_justify="left")
    for col in ("steps", "lr", *names):
        table.add_column(col, justify="right")
    for ph in rows:
        cells = [f"{s['share_planned']:.1%} / {s['share_scheduled']:.1%}\n"
                 f"{s['tokens_planned']:,}" for s in ph["sources"]]
        table.add_row(f"{ph['start_step']:,}-{ph['end_step']:,}",
                      f"{ph['lr_start']:.2f}-{ph['lr_end']:.2f}", *cells)
    console.print(table)


def comparison(reports: dict[str, dict[str, Any]], console: Console) -> None:
    """Domain by domain, several runs' delta bpb against their start (the quickstart ending)."""
    names: list[str] = []
    for report in reports.values():
        for d in report["domains"]:
            if d["name"] not in names:
                names.append(d["name"])
    table = Table(title="delta bits per byte vs the start model (lower is better)",
                  title_justify="left")
    table.add_column("domain")
    table.add_column("role")
    for run in reports:
        table.add_column(run, justify="right")
    for name in names:
        role = next(d["role"] for r in reports.values() for d in r["domains"] if d["name"] == name)
        cells = []
        for report in reports.values():
            d = next((d for d in report["domains"] if d["name"] == name), None)
            cells.append("-" if d is None or d.get("delta_bpb") is None
                         else f"{d['delta_bpb']:+.4f}")
        table.add_row(name, role, *cells)
    for key, label in (("mean_gain_bpb", "mean gain"), ("mean_forgetting_bpb", "mean forgetting")):
        table.add_row(label, "", *[_num(r["summary"][key], "+.4f") for r in reports.values()])
    console.print(table)
