"""One flow against stages, at equal compute (issue #13; docs/experiments/one-flow.md).

    make experiment                       # or, from the repository root:
    python experiments/one_flow.py        # every arm, the table and runs/one-flow-curves.png

Trains the base (recipes/experiments/one-flow/base.yaml: the quickstart's tiny Llama on general
prose only) unless runs/one-flow-base/final already holds it, then every arm from that base at
the same number of tokens:

  staged-ft       code, then qa, no replay (two runs, each half the tokens)
  staged-replay   code with 25% replay, then qa with 25% replay (two runs)
  flow-constant   one run: code, qa and 25% replay of the base's prose, fixed weights
  flow-scheduled  one run: the same, shifting linearly from code-heavy to qa-heavy
  flow-anneal     one run: the same, qa brought forward only in the wsd decay (--arms to add it)

Every arm's final model is scored against the same start, the base
(`cpt eval FINAL --base BASE --json`), and the two one-flow runs against each other (a paired
interval on their difference). It prints one table (each domain's delta bits per byte with its
95% interval, per arm) and draws every arm's held-out curves. It runs `cpt` as a user would
(`python -m cpt_cli`), so it shows what the command line can do and nothing more.

`--root DIR` runs against a copy of the repository layout (recipes/, data/quickstart, runs/),
`--tokens N` changes every arm's budget (stages get half each), `--seed N` the arms' seed (the
base stays the same): a smoke test runs it on a tiny budget that way.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
RECIPES = Path("recipes/experiments/one-flow")
BASE = "one-flow-base"
# arm -> its stages' recipes, trained in order, each from the previous one's final model.
ARMS: dict[str, list[str]] = {
    "staged-ft": ["staged-ft-code", "staged-ft-qa"],
    "staged-replay": ["staged-replay-code", "staged-replay-qa"],
    "flow-constant": ["flow-constant"],
    "flow-scheduled": ["flow-scheduled"],
    "flow-anneal": ["flow-anneal"],
}
DEFAULT_ARMS = ["staged-ft", "staged-replay", "flow-constant", "flow-scheduled"]
DOMAINS = ["prose", "code", "qa"]
# The arm each one-flow schedule is compared with on the same documents (a paired interval).
PAIRED = {"flow-scheduled": "flow-constant", "flow-anneal": "flow-constant"}


def parse_size(text: Any) -> int:
    """`600k` -> 600000 (the recipe's size suffixes)."""
    s = str(text).strip()
    scale = {"k": 10**3, "K": 10**3, "M": 10**6, "B": 10**9}.get(s[-1:], 1)
    return int(float(s[:-1] if scale > 1 else s) * scale)


def cpt(args: list[str], root: Path, log: Path) -> str:
    """Run `python -m cpt_cli ARGS` in `root`; stdout back, stderr to `log`; exit on failure."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.setdefault("CPT_CACHE", str(root / ".cpt_cache"))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    with log.open("a") as err:
        err.write(f"$ cpt {' '.join(args)}\n")
        err.flush()
        done = subprocess.run([sys.executable, "-m", "cpt_cli", *args], cwd=root, env=env,
                              stdout=subprocess.PIPE, stderr=err, text=True)
    if done.returncode:
        raise SystemExit(f"error: `cpt {' '.join(args)}` failed (exit {done.returncode}); "
                         f"its messages are in {log}")
    return done.stdout


def equal_budget(root: Path, tokens: int) -> int:
    """`tokens` rounded down to whole steps for every arm: a multiple of two stages' batches (a
    stage's train.tokens becomes whole steps, so 300k would give a one-run arm 73 steps of 4,096
    tokens and a two-stage arm 2 x 36)."""
    recipe = yaml.safe_load((root / RECIPES / "flow-constant.yaml").read_text())
    unit = max(len(stages) for stages in ARMS.values()) * \
        parse_size(recipe["train"]["global_batch_tokens"])
    if tokens < unit:
        raise SystemExit(f"error: --tokens {tokens} is below one step of every stage ({unit})")
    return tokens // unit * unit


def stage_recipes(root: Path, arm: str, tokens: int | None) -> list[tuple[str, int]]:
    """Each stage's (run name, train.tokens): as the recipes say, or `tokens` split evenly."""
    recipes = [yaml.safe_load((root / RECIPES / f"{s}.yaml").read_text()) for s in ARMS[arm]]
    return [(r["name"], tokens // len(recipes) if tokens is not None
             else parse_size(r["train"]["tokens"])) for r in recipes]


def finished(run: Path, overrides: list[str]) -> bool:
    """Whether `run` finished (its report is written last) with these overrides' values."""
    if not (run / "final" / "eval" / "report.json").is_file():
        return False
    recipe = yaml.safe_load((run / "recipe.yaml").read_text())
    for override in overrides:
        key, value = override.split("=", 1)
        node: Any = recipe
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if str(node) != value:
            return False
    return True


def train_arm(root: Path, runs: Path, arm: str, tokens: int | None, seed: int | None,
              log: Path, reuse: bool = False) -> tuple[Path, list[tuple[Path, int]]]:
    """Train an arm's stages (or, with `reuse`, keep those that finished with the same model,
    tokens and seed); (final model, [(run directory, tokens before it)])."""
    model, offset, trained = runs / BASE / "final", 0, []
    for stage, (name, budget) in zip(ARMS[arm], stage_recipes(root, arm, tokens), strict=True):
        out = runs / (f"{name}-s{seed}" if seed is not None else name)
        overrides = [f"model.path={model}", f"train.tokens={budget}"]
        overrides += [f"seed={seed}"] if seed is not None else []
        if not (reuse and finished(out, overrides)):
            cpt(["train", str(RECIPES / f"{stage}.yaml"), "--output-dir", str(out),
                 "--overwrite", *overrides], root, log)
        trained.append((out, offset))
        model, offset = out / "final", offset + trained_tokens(out)
    return model, trained


def score(root: Path, final: Path, base: Path, log: Path) -> dict[str, dict[str, float]]:
    """delta bpb and its 95% interval per domain of `final` against `base`, same documents."""
    report = json.loads(cpt(["eval", str(final), "--base", str(base), "--json"], root, log))
    return {d["name"]: {"delta": d["delta_bpb"], "low": d["ci_low"], "high": d["ci_high"],
                        "bpb": d["bpb"], "start": d["start_bpb"]}
            for d in report["domains"] if d.get("delta_bpb") is not None}


def mean_row(row: dict[str, dict[str, float]]) -> dict[str, float | None]:
    """The mean delta over DOMAINS; its interval treats the domains' as independent normals
    (half-width sqrt(sum h^2) / n), an approximation: their documents are disjoint. No interval
    when a domain has none (a held-out set of one document)."""
    cells = [row[d] for d in DOMAINS if d in row]
    mean = sum(c["delta"] for c in cells) / len(cells)
    if any(c["low"] is None or c["high"] is None for c in cells):
        return {"delta": mean, "low": None, "high": None}
    half = math.sqrt(sum(((c["high"] - c["low"]) / 2) ** 2 for c in cells)) / len(cells)
    return {"delta": mean, "low": mean - half, "high": mean + half}


def table(rows: dict[str, dict[str, dict[str, float]]], title: str) -> str:
    def cell(c: dict[str, float | None] | None) -> str:
        if not c:
            return "-"
        if c["low"] is None or c["high"] is None:
            return f"{c['delta']:+.3f} [no interval]"
        return f"{c['delta']:+.3f} [{c['low']:+.3f}, {c['high']:+.3f}]"

    width, first = 26, max(len(arm) for arm in ["arm", *rows]) + 1
    lines = [title, f"{'arm':<{first}}" + "".join(f"{d:>{width}}" for d in [*DOMAINS, "mean"])]
    for arm, row in rows.items():
        lines.append(f"{arm:<{first}}" + "".join(f"{cell(row.get(d)):>{width}}" for d in DOMAINS)
                     + f"{cell(mean_row(row)):>{width}}")
    return "\n".join(lines)


def trained_tokens(run: Path) -> int:
    """Tokens a finished run trained: its last event's (whole steps, so at most train.tokens)."""
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return max(e.get("tokens", 0) for e in events)


def curves(trained: list[tuple[Path, int]]) -> dict[str, list[tuple[int, float]]]:
    """bpb per domain over tokens trained since the base, from each stage's eval events."""
    out: dict[str, list[tuple[int, float]]] = {}
    for run, offset in trained:
        for line in (run / "metrics.jsonl").read_text().splitlines():
            event = json.loads(line)
            if event.get("event") != "eval":
                continue
            for name, d in event["domains"].items():
                out.setdefault(name, []).append((offset + event["tokens"], d["bpb"]))
    return out


def plot(all_curves: dict[str, dict[str, list[tuple[int, float]]]],
         base: dict[str, float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(DOMAINS), figsize=(5 * len(DOMAINS), 4), sharex=True)
    for ax, domain in zip(axes, DOMAINS, strict=True):
        for arm, by_domain in all_curves.items():
            points = sorted(dict(by_domain.get(domain, [])).items())
            ax.plot([p[0] / 1e3 for p in points], [p[1] for p in points], marker="o",
                    markersize=2, label=arm)
        if domain in base:
            ax.axhline(base[domain], color="grey", linestyle=":", linewidth=1)
        ax.set_title(f"{domain} (dotted: the base)")
        ax.set_xlabel("thousand tokens after the base")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("bits per byte (held out)")
    axes[-1].legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(str(path), dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=ROOT,
                        help="folder holding recipes/, data/quickstart and runs/ (default: repo)")
    parser.add_argument("--arms", default=",".join(DEFAULT_ARMS),
                        help=f"comma-separated, of {', '.join(ARMS)}")
    parser.add_argument("--tokens", type=parse_size, default=None,
                        help="tokens per arm (default: the recipes', 600k)")
    parser.add_argument("--seed", type=int, default=None, help="the arms' seed (default 1234)")
    parser.add_argument("--reuse", action="store_true",
                        help="keep arms' runs that finished with the same tokens and seed (to "
                             "re-score, or to train arms in parallel and then tabulate them)")
    parser.add_argument("--plot", type=Path, default=None,
                        help="curves PNG (default: runs/one-flow-curves[-sSEED].png)")
    args = parser.parse_args(argv)
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        parser.error(f"--arms: unknown {', '.join(unknown)}; choose from {', '.join(ARMS)}")
    root = args.root.resolve()
    if args.tokens is not None:
        args.tokens = equal_budget(root, args.tokens)
    runs = root / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    suffix = f"-s{args.seed}" if args.seed is not None else ""
    log = runs / f"one-flow{suffix}.log"
    began = time.monotonic()

    def say(message: str) -> None:
        print(f"[{time.monotonic() - began:6.0f} s] {message}", flush=True)

    if not (root / "data" / "quickstart" / "corpus.json").is_file():
        say("data: building data/quickstart from the Python installation")
        cpt(["data", "quickstart", "data/quickstart"], root, log)
    base = runs / BASE / "final"
    if (base / "eval" / "report.json").is_file():  # written last: the base run finished
        say(f"base: reusing {base}")
    else:
        say("base: training (general prose only)")
        cpt(["train", str(RECIPES / "base.yaml"), "--output-dir", str(runs / BASE),
             "--overwrite"], root, log)
    rows: dict[str, dict[str, dict[str, float]]] = {}
    all_curves: dict[str, dict[str, list[tuple[int, float]]]] = {}
    finals: dict[str, Path] = {}
    for arm in arms:
        say(f"{arm}: training {' then '.join(ARMS[arm])}")
        finals[arm], trained = train_arm(root, runs, arm, args.tokens, args.seed, log,
                                           args.reuse)
        rows[arm] = score(root, finals[arm], base, log)
        all_curves[arm] = curves(trained)
    paired = {f"{arm} - {other}": score(root, finals[arm], finals[other], log)
              for arm, other in PAIRED.items() if arm in finals and other in finals}
    say("done")
    print(table(rows, "delta bits per byte against the base (95% interval); lower is better"))
    if paired:
        print(table(paired, "paired: the schedule minus the constant mix, same documents"))
    start = next(iter(rows.values()))
    plot_path = args.plot or runs / f"one-flow-curves{suffix}.png"
    plot(all_curves, {d: c["start"] for d, c in start.items()}, plot_path)
    results = {"arms": rows, "paired": paired, "seconds": round(time.monotonic() - began, 1),
               "tokens_per_arm": args.tokens, "seed": args.seed}
    (runs / f"one-flow-results{suffix}.json").write_text(json.dumps(results, indent=1))
    print(f"curves: {plot_path}; figures: {runs / f'one-flow-results{suffix}.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
