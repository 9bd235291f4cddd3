"""Rich renderings of cpt's reports: the forgetting table, the mixture plan, a comparison."""

from __future__ import annotations

from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from cpt_cli.evaluation.report import replay_budget_line, verdict


def _num(x: Any, fmt: str = ".4f") -> str:
    return "-" if x is None else format(x, fmt)


def _count(n: int) -> str:
    """Exact below a million ("999,999": 7 characters), 3 significant digits above ("1.26M",
    "2.05B"), so a 2B-token run's columns stay as narrow as a laptop run's."""
    if n < 1_000_000:
        return f"{n:,}"
    for unit, scale in (("T", 10**12), ("B", 10**9)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n / 10**6:.3g}M"


def _ppl(x: float | None) -> str:
    """Three significant digits ("5.57", "38.1", "291"), whole numbers from 1,000 ("32,011")."""
    if x is None:
        return "-"
    for limit, fmt in ((9.995, ".2f"), (99.95, ".1f"), (999.5, ".0f")):
        if x < limit:
            return format(x, fmt)
    return _count(round(x))


def _table(title: str) -> Table:
    """A table without vertical rules: two spaces between columns instead of a border and two
    spaces of padding, which is what fits the 9-column forgetting table in 100 columns (boxed,
    it needed 120 and still wrapped its intervals). Cells fold rather than end in "…": at a
    width too narrow for the table a row grows a line, but no figure is cut."""
    return Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, show_edge=False,
                 pad_edge=False, collapse_padding=True)


def _columns(table: Table, names: tuple[str, ...], left: tuple[str, ...]) -> None:
    for name in names:
        table.add_column(name, justify="left" if name in left else "right", overflow="fold")


def _change(d: dict[str, Any]) -> tuple[Text, str]:
    """A domain's change against its start, worded by what it means for its role, as a positive
    amount ("gain", "worse" for a target; "forgot", "improved" for a retained domain), and its
    95% interval oriented the same way: a retained domain that got better reads "improved
    0.0333 / 0.021 to 0.046", never "forgot -0.0333"."""
    delta = d.get("delta_bpb")
    if delta is None:
        return Text("-"), "-"
    better = delta < 0
    if delta == 0:
        change = Text("unchanged 0.0000")
    elif d["role"] == "target":
        change = Text(f"{'gain' if better else 'worse'} {abs(delta):.4f}",
                      style="green" if better else "red")
    else:
        change = Text(f"{'improved' if better else 'forgot'} {abs(delta):.4f}",
                      style="green" if better else "red")
    if d.get("significant") is False:
        change.stylize("dim")
        change.append(" n.s.")
    low, high = d.get("ci_low"), d.get("ci_high")
    if low is None or high is None:
        return change, "-"
    if better:  # the amount shown is -delta: its interval is the delta's, negated and swapped
        low, high = -high, -low
    return change, f"{low:.3f} to {high:.3f}"


def forgetting(report: dict[str, Any], console: Console, title: str | None = None) -> None:
    table = _table(title or f"forgetting table: {report.get('model', '')}")
    # "start" is the start model's bpb: "start bpb" cost the 3 columns that let a 14-character
    # domain with "improved 0.0030 n.s." fit 100 columns.
    _columns(table, ("domain", "role", "tokens", "loss", "ppl", "bpb", "start",
                     "change in bpb", "95% CI"), left=("domain", "role", "change in bpb"))
    for d in report["domains"]:
        change, interval = _change(d)
        table.add_row(d["name"], d["role"], _count(d["tokens"]), _num(d["loss"], ".3f"),
                      _ppl(d.get("ppl")), _num(d["bpb"]), _num(d.get("start_bpb")), change,
                      interval)
    console.print(table)
    if report.get("downstream"):
        tasks = _table("downstream tasks (lm-evaluation-harness)")
        _columns(tasks, ("task", "metric", "start", "now", "delta"), left=("task", "metric"))
        for row in report["downstream"]:
            tasks.add_row(row["task"], row["metric"], _num(row["start"]), _num(row["now"]),
                          _num(row["delta"], "+.4f"))
        console.print(tasks)
    console.print(verdict(report), highlight=False)
    budget = replay_budget_line(report)
    if budget is not None:
        console.print(budget, style="green" if report["summary"]["replay_budget_held"]
                      else "red", highlight=False)


def plan(result: dict[str, Any], console: Console, name: str) -> None:
    """Two tables, the data per source and the shares per source: as one they were 12 columns,
    which cut cells ("replay (inherite…") even at 140 columns."""
    table = _table(f"mixture plan: {name}")
    _columns(table, ("source", "role", "documents", "tokens avail.", "held out",
                     "planned tokens", "epochs"), left=("source", "role"))
    for s in result["sources"]:
        epochs = Text(f"{s['epochs']:.2f}", style="yellow" if s["epochs"] > 4 else "")
        table.add_row(s["name"], s["role"] + ("*" if s.get("inherited") else ""),
                      _count(s["documents"]), _count(s["tokens_available"]),
                      _count(s["holdout_tokens"]), _count(s["tokens_planned"]), epochs)
    console.print(table)
    if any(s.get("inherited") for s in result["sources"]):
        console.print("* inherited: data of an earlier stage of model.path's lineage, replayed "
                      "(data.replay.inherit)", highlight=False)
    shares = _table("shares of the run's tokens")
    _columns(shares, ("source", "weight", "share req.", "share planned", "first 1000",
                      "achieved"), left=("source", "weight"))
    for s in result["sources"]:
        shares.add_row(s["name"], _weight(s["weight"]), f"{s['share_requested']:.2%}",
                       f"{s['share_planned']:.2%}", f"{s['share_achieved_first_1000']:.2%}",
                       f"{s['share_achieved']:.2%}")
    console.print(shares)
    p = result["packing"]
    console.print(f"total {result['total_tokens']:,} tokens in {result['sequences']:,} sequences "
                  f"of {result['seq_len']} ({result['steps']:,} steps of "
                  f"{result['global_batch_sequences']} sequences); replay share "
                  f"{result['replay_share']:.2%}", highlight=False)
    console.print(f"packing {p['mode']}: padding {p['padding_fraction']:.2%}, dropped tokens "
                  f"{p['dropped_tokens']:,}", highlight=False)
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
    """The scheduled mix per phase (per 10% of the run inside a ramp): one row per phase and
    source, so the table's width does not grow with the number of sources (a column per
    source, two lines per cell, passed 100 columns at five sources)."""
    rows = result.get("phases") or []
    if len(rows) <= 1:
        return  # a constant mix: the plan table above says it all
    table = _table("mixture schedule by phase")
    _columns(table, ("steps", "lr", "source", "planned", "scheduled", "tokens"),
             left=("source",))
    for ph in rows:
        for i, s in enumerate(ph["sources"]):
            first, last = i == 0, i == len(ph["sources"]) - 1
            table.add_row(f"{ph['start_step']:,}-{ph['end_step']:,}" if first else "",
                          f"{ph['lr_start']:.2f}-{ph['lr_end']:.2f}" if first else "",
                          s["name"], f"{s['share_planned']:.1%}", f"{s['share_scheduled']:.1%}",
                          _count(s["tokens_planned"]), end_section=last)
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


def answer_scoring(report: dict[str, Any], console: Console) -> None:
    """Below a forgetting table: which domains are scored on their answers, not their text."""
    names = [d["name"] for d in report.get("domains", []) if d.get("scored_on") == "answers"]
    if names:
        console.print(f"scored on answers: {', '.join(names)} (bits per byte of the "
                      "completions or assistant turns, each given what precedes it; "
                      "docs/evaluation.md)", highlight=False)


def trained_shares(result: dict[str, Any], console: Console) -> None:
    """Below a mixture plan: where the loss differs from the compute. A source trained on its
    answers takes its share of the sequences, but a smaller share of the trained tokens."""
    for row in result.get("sources", []):
        if row.get("loss_on", "all") == "all" and not row.get("beyond_seq_len"):
            continue
        planned = row["tokens_planned"] / max(1, result.get("total_tokens") or 1)
        line = (f"{row['name']}: loss_on {row['loss_on']}: {planned:.1%} of the sequence "
                f"tokens, {row.get('share_trained', 0.0):.1%} of the trained tokens "
                f"({row['tokens_trained_planned']:,} trained)")
        if row.get("beyond_seq_len"):
            line += (f"; {row['beyond_seq_len']:,} documents left out (no trained token within "
                     "data.seq_len)")
        console.print(line, highlight=False)
