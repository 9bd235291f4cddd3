"""Closed-loop replay against fixed replay ratios on the quickstart corpus (issue #15's measurement,
written up in docs/experiments/auto-replay.md).

    make experiment-replay                       # the same as:
    python experiments/auto_replay.py            # [--budget 0.03] [--reuse] [--out DIR]

Builds the quickstart corpus (no download), trains the quickstart base model once
(recipes/quickstart/base.yaml), then the cpt stage (recipes/quickstart/cpt.yaml: code is new,
prose and qa are retained) five times from that same base, on the same 500k tokens, with the same
seed and the same evaluations (every EVAL_EVERY steps): replay fixed at 0%, 5%, 25% and 50%, and
`ratio: auto` with the budget given. Prints, and writes to DIR/results.json and
DIR/results.md, each arm's final forgetting per retained domain with its 95% bootstrap interval,
the peak forgetting the evaluations during training saw, the gain on code with its interval, and
the wall time; draws the auto arm's curves with its replay share (DIR/auto.png); and scores the
auto arm against the fixed ratio with the largest gain that also kept the budget, on the same
documents (a paired interval on their difference, narrower than two intervals against the base).

`--reuse` keeps the base model and the arms already trained in DIR (to redo only the table).
`--seed N` trains the arms with another seed (their data order; the base and the held-out
documents, chosen by content hash, stay the same), into DIR/ARM-sN, writing results-sN.json,
results-sN.md and auto-sN.png.
`--quick` runs the same comparison smaller (QUICK): what fits a 2-core machine that others share.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")

EVAL_EVERY = 8
"""Evaluations every 8 steps of the cpt stage's 61: 7 decisions for the auto arm. Every arm is
evaluated as often (evaluations change no weight), so the peaks are seen on the same steps."""
FIXED = (0.0, 0.05, 0.25, 0.5)
QUICK = {
    "base": ["train.tokens=240k", "data.holdout.tokens=8k"],
    "cpt": ["train.tokens=120k", "train.global_batch_tokens=4096", "eval.every_steps=4",
            "data.holdout.tokens=8k"],
}
"""The reduced run: the base on 240k tokens, each cpt arm on 120k tokens in 29 steps of 4,096
(half the recipe's batch, for as many decisions per token), evaluated every 4 steps: 7 decisions.
Held-out sets of 8k tokens per domain: every evaluation scores the three, 24k tokens, about the
cost of 8k trained. About 2.3x fewer tokens than the recipes as written (the base on 800k, each
arm on 500k), which fit well within 15 minutes on an idle 2-core machine but take 5 to 15 times
that when the cores are shared."""
AUTO = {"min": 0.05, "max": 0.5, "start": 0.25}
"""The controller's bounds: Ibrahim et al. (2024)'s 5% (weak shift) to twice their 25% (strong
shift), starting at 25%, the quickstart's fixed ratio."""


def _compile() -> str:
    """train.compile as `make demo` sets it: compiled layers need a C++ compiler on CPU."""
    import shutil

    return "true" if any(shutil.which(c) for c in ("g++", "clang++", "c++")) else "false"


def train_arm(recipe: Path, out: Path, overrides: list[str], reuse: bool) -> tuple[Path, float]:
    """One `cpt train` run in this process (the imports are paid once); its run directory and
    wall seconds (0 when reused)."""
    from cpt_cli.config import load_recipe
    from cpt_cli.training.loop import train

    if reuse and (out / "final" / "eval" / "report.json").is_file():
        return out, 0.0
    started = time.monotonic()
    train(load_recipe(recipe, [*overrides, f"train.compile={_compile()}"]),
          output_dir=str(out), overwrite=True)
    return out, time.monotonic() - started


def summarize(run_dir: Path, seconds: float) -> dict[str, Any]:
    """Final forgetting and gain with their intervals, and each retained domain's peak over
    the evaluations during training (point estimates: those evaluations compute no interval)."""
    from cpt_cli.runs.events import read_events

    report = json.loads((run_dir / "final" / "eval" / "report.json").read_text())
    peaks: dict[str, float] = {}
    shares: list[tuple[int, float]] = []
    for event in read_events(run_dir / "metrics.jsonl"):
        if event.get("event") == "eval":
            for name, d in event["domains"].items():
                if d["role"] == "retained" and d.get("delta_bpb") is not None:
                    peaks[name] = max(peaks.get(name, d["delta_bpb"]), d["delta_bpb"])
        elif event.get("event") == "replay":
            shares.append((event["step"], event["share"]))
    stage = json.loads((run_dir / "manifest.json").read_text())["stages"][-1]
    replayed = sum(s["tokens_trained"] for s in stage["sources"] if s["role"] == "replay")
    domains = {}
    for d in report["domains"]:
        domains[d["name"]] = {"role": d["role"], "delta_bpb": d["delta_bpb"],
                              "ci": [d["ci_low"], d["ci_high"]], "peak": peaks.get(d["name"])}
    return {"run_dir": str(run_dir), "seconds": round(seconds, 1), "domains": domains,
            "replay_share_trained": replayed / stage["tokens"], "shares": shares,
            "summary": report["summary"]}


def table(results: dict[str, dict[str, Any]], budget: float) -> str:
    """The markdown table: one row per arm."""
    first = next(iter(results.values()))["domains"]
    retained = [n for n, d in first.items() if d["role"] == "retained"]
    target = [n for n, d in first.items() if d["role"] == "target"]
    head = ["arm", "replay trained"] + [f"{n} final (95% CI)" for n in retained] + \
        [f"{n} peak" for n in retained] + [f"{n} gain (95% CI)" for n in target] + \
        [f"within {budget}", "wall s"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for arm, r in results.items():
        d = r["domains"]
        cells = [arm, f"{r['replay_share_trained']:.1%}"]
        cells += [f"{d[n]['delta_bpb']:+.4f} ({d[n]['ci'][0]:+.4f}, {d[n]['ci'][1]:+.4f})"
                  for n in retained]
        cells += [f"{d[n]['peak']:+.4f}" if d[n]["peak"] is not None else "-" for n in retained]
        cells += [f"{-d[n]['delta_bpb']:+.4f} ({-d[n]['ci'][1]:+.4f}, {-d[n]['ci'][0]:+.4f})"
                  for n in target]
        cells += ["yes" if within_budget(r, budget) else "no", f"{r['seconds']:.0f}"]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", type=float, default=0.03,
                        help="the auto arm's data.replay.max_forgetting_bpb")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "experiment-replay")
    parser.add_argument("--quick", action="store_true", help="the reduced run (QUICK)")
    parser.add_argument("--reuse", action="store_true",
                        help="keep the base and the arms already trained in --out")
    parser.add_argument("--seed", type=int, default=None,
                        help="the arms' seed (default: the recipe's; the base keeps its own)")
    args = parser.parse_args()
    from cpt_cli.data.corpus import build_quickstart_corpus

    started = time.monotonic()
    data = ROOT / "data" / "quickstart"
    build_quickstart_corpus(data)
    out: Path = args.out.resolve()
    base, base_s = train_arm(ROOT / "recipes" / "quickstart" / "base.yaml", out / "base",
                             QUICK["base"] if args.quick else [], args.reuse)
    common = [f"model.path={base / 'final'}", f"eval.every_steps={EVAL_EVERY}",
              "train.checkpoint.every_steps=null", *(QUICK["cpt"] if args.quick else []),
              *([f"seed={args.seed}"] if args.seed is not None else [])]
    suffix = f"-s{args.seed}" if args.seed is not None else ""
    arms: dict[str, list[str]] = {f"fixed {r:.0%}": [f"data.replay.ratio={r}"] for r in FIXED}
    arms[f"auto (budget {args.budget})"] = [
        "data.replay.ratio=auto", f"data.replay.max_forgetting_bpb={args.budget}",
        *(f"data.replay.{k}={v}" for k, v in AUTO.items())]
    results = {}
    for arm, overrides in arms.items():
        slug = arm.split(" (")[0].replace(" ", "-").replace("%", "") + suffix
        run_dir, seconds = train_arm(ROOT / "recipes" / "quickstart" / "cpt.yaml", out / slug,
                                     [*common, *overrides], args.reuse)
        results[arm] = summarize(run_dir, seconds)
    auto_arm = results[list(arms)[-1]]
    _plot(Path(auto_arm["run_dir"]), out / f"auto{suffix}.png")
    text = table(results, args.budget)
    paired = _paired(results, args.budget)
    if paired:
        text += "\n\n" + paired["text"]
    machine = (f"{platform.node()}: {os.cpu_count()} CPUs ({_cpu_model()}), "
               f"{platform.python_version()}, torch {_torch_version()}")
    summary = {"budget": args.budget, "quick": args.quick, "overrides": common, "auto": AUTO,
               "paired": paired,
               "machine": machine, "date": time.strftime("%Y-%m-%d %H:%M"),
               "base_seconds": round(base_s, 1),
               "total_seconds": round(time.monotonic() - started, 1), "arms": results}
    (out / f"results{suffix}.json").write_text(json.dumps(summary, indent=2))
    (out / f"results{suffix}.md").write_text(text + "\n")
    print(text)
    print(f"auto shares (step, share): {auto_arm['shares']}")
    print(f"{machine}; total {summary['total_seconds']:.0f} s (base {base_s:.0f} s)")


def within_budget(result: dict[str, Any], budget: float) -> bool:
    """Whether every retained domain of an arm ends at most `budget` (its final point estimate,
    the rule `replay_budget_held` applies)."""
    return all(d["delta_bpb"] <= budget for d in result["domains"].values()
               if d["role"] == "retained")


def best_within_budget(results: dict[str, dict[str, Any]], budget: float) -> str | None:
    """The fixed arm (every arm but the last, which is auto) with the largest gain on the target
    domains among those within `budget`; None when none is."""
    def gain(arm: str) -> float:
        return -sum(d["delta_bpb"] for d in results[arm]["domains"].values()
                    if d["role"] == "target")

    kept = [arm for arm in list(results)[:-1] if within_budget(results[arm], budget)]
    return max(kept, key=gain) if kept else None


def _paired(results: dict[str, dict[str, Any]], budget: float) -> dict[str, Any] | None:
    """The auto arm minus the fixed arm with the largest gain among those within the budget,
    per domain on the same held-out documents (`cpt eval AUTO --base FIXED`); None when no fixed
    arm kept the budget."""
    from cpt_cli import evaluate

    auto = list(results)[-1]
    best = best_within_budget(results, budget)
    if best is None:
        return None
    report = evaluate(Path(results[auto]["run_dir"]) / "final",
                      base=str(Path(results[best]["run_dir"]) / "final"))
    domains = {d["name"]: {"delta_bpb": d["delta_bpb"], "ci": [d["ci_low"], d["ci_high"]]}
               for d in report["domains"]}
    cells = [f"{n}: {d['delta_bpb']:+.4f} ({d['ci'][0]:+.4f}, {d['ci'][1]:+.4f})"
             for n, d in domains.items()]
    text = (f"paired, {auto} minus {best} (the fixed ratio with the largest gain within the "
            f"budget), same documents; lower is better: " + "; ".join(cells))
    return {"against": best, "domains": domains, "text": text}


def _plot(run_dir: Path, png: Path) -> None:
    from cpt_cli.evaluation.plotting import plot_run

    report = json.loads((run_dir / "final" / "eval" / "report.json").read_text())
    plot_run(run_dir, report, png)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _torch_version() -> str:
    import torch

    return torch.__version__


if __name__ == "__main__":
    main()
