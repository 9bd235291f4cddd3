"""The quickstart's last step: continued pre-training with replay vs staged fine-tuning.

    python -m cpt_cli.quickstart compare runs/quickstart-cpt runs/quickstart-finetune

Reads each run's final forgetting report (written by `cpt train` into final/eval/report.json) and
prints one table, domain by domain, plus the two figures the quickstart is about: mean forgetting
of the retained domains, and gain on the target domain.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from rich.console import Console

from cpt_cli.cli import render


def load_report(run_dir: str | Path) -> dict:
    path = Path(run_dir) / "final" / "eval" / "report.json"
    if not path.is_file():
        raise SystemExit(f"error: {path} not found; train {run_dir} first (make demo)")
    return json.loads(path.read_text())


def compare(run_dirs: list[str]) -> dict[str, dict]:
    reports = {Path(r).name: load_report(r) for r in run_dirs}
    console = Console(width=max(100, Console().width))
    render.comparison(reports, console)
    names = list(reports)
    if len(names) == 2:
        a, b = (reports[n]["summary"] for n in names)
        if a["mean_forgetting_bpb"] is not None and b["mean_forgetting_bpb"] is not None:
            console.print(f"mean forgetting: {names[0]} {a['mean_forgetting_bpb']:+.4f} vs "
                          f"{names[1]} {b['mean_forgetting_bpb']:+.4f} bits per byte; gain on "
                          f"target: {a['mean_gain_bpb']:+.4f} vs {b['mean_gain_bpb']:+.4f} "
                          f"({a['mean_gain_bpb'] / b['mean_gain_bpb']:.0%} of it)",
                          highlight=False)
    return reports


if __name__ == "__main__":
    if len(sys.argv) < 3 or sys.argv[1] != "compare":
        raise SystemExit("usage: python -m cpt_cli.quickstart compare RUN_DIR RUN_DIR ...")
    compare(sys.argv[2:])
