"""`cpt eval PATH`"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from cpt_cli.cli.application import app, print_json, run_guarded
from cpt_cli.cli.options import Help, Json
from cpt_cli.cli.progress import ScoringProgress
from cpt_cli.errors import UsageError


@app.command("eval")
def eval_command(
    path: Annotated[str, typer.Argument(help="A final/ folder, a checkpoint, or a run directory "
                                             "(then every checkpoint, as curves).")],
    data: Annotated[list[str] | None, typer.Option(
        "--data", help="NAME=FILE: evaluate FILE (a file, glob or folder in any format a recipe "
                       "source reads; records by their text field) as domain NAME instead of the "
                       "lineage's held-out sets. Repeatable.")] = None,
    base: Annotated[str | None, typer.Option(
        "--base", help="Start model to compare against (default: the start model of the run's "
                       "lineage, whose figures training cached; with --data, none).")] = None,
    max_forgetting: Annotated[float | None, typer.Option(
        "--max-forgetting", help="Exit with status 1 when a retained domain's delta bpb exceeds "
                                 "this.")] = None,
    plot: Annotated[str | None, typer.Option(
        "--plot", help="Draw per-domain bits per byte over steps to this PNG (run directory).")]
    = None,
    batch_tokens: Annotated[int, typer.Option("--batch-tokens", help="Tokens per batch.")] = 4096,
    max_length: Annotated[int | None, typer.Option(
        "--max-length", help="Longest scoring window in tokens, context included (default: the "
                             "window training evaluated with, else the context the model was "
                             "trained on, data.seq_len, else its context up to 2048).")] = None,
    stride: Annotated[str | None, typer.Option(
        "--stride", help="Tokens each window predicts after the first: a number up to the "
                         "window, or 'disjoint' for whole windows as lm-evaluation-harness's "
                         "rolling log-likelihood scores them (default: half the window).")
    ] = None,
    bootstrap: Annotated[int, typer.Option(
        "--bootstrap", help="Bootstrap resamples for the 95% intervals (0: none).")] = 1000,
    lm_eval: Annotated[str | None, typer.Option(
        "--lm-eval", help="Comma-separated lm-evaluation-harness tasks to run beside the "
                          "per-domain figures, start vs now (needs the lm-eval extra).")] = None,
    lm_eval_include: Annotated[str | None, typer.Option(
        "--lm-eval-include", help="Folder of local lm-eval task YAMLs.")] = None,
    lm_eval_limit: Annotated[int | None, typer.Option(
        "--lm-eval-limit", help="At most this many examples per task.")] = None,
    json_out: Json = False,
    help_: Help = False,
) -> None:
    """Per-domain loss, perplexity and bits per byte against the start model: the forgetting
    table."""
    from cpt_cli.cli import render
    from cpt_cli.evaluation.evaluate import evaluate

    def body() -> int:
        files: dict[str, str] = {}
        for item in data or []:
            name, sep, file = item.partition("=")
            if not sep or not name or not file:
                raise UsageError(f"--data {item!r}: write it as NAME=FILE, e.g. "
                                 "--data code=held_out_code.jsonl")
            if name in files:
                raise UsageError(f"--data {name}: named twice ({files[name]} and {file}); give "
                                 "each file its own name, or one glob for both")
            files[name] = file
        _check_options(max_forgetting, batch_tokens, bootstrap, lm_eval_limit, plot)
        window_stride = _stride(stride)
        if max_length is not None and max_length < 1:
            raise UsageError(f"--max-length {max_length}: must be positive (e.g. 2048)")
        if plot is not None:
            from cpt_cli.evaluation.plotting import check_available
            check_available()
        tasks = [t.strip() for t in lm_eval.split(",") if t.strip()] if lm_eval else None
        if tasks:
            from cpt_cli.evaluation.downstream import check_available as lm_eval_available
            lm_eval_available()
        progress = ScoringProgress(Console(stderr=True))
        report = evaluate(path, data=files or None, base=base, batch_tokens=batch_tokens,
                          bootstrap_samples=bootstrap, lm_eval_tasks=tasks,
                          lm_eval_include=lm_eval_include, lm_eval_limit=lm_eval_limit,
                          max_length=max_length, stride=window_stride,
                          progress=progress)
        progress.finish()
        if json_out:
            print_json(report)
        else:
            # 100 columns at least, even in a pipe (80 there): the tables fit 100 without
            # wrapping a row (tests/test_render.py).
            console = Console(width=max(100, Console().width))
            render.forgetting(report, console)
            render.answer_scoring(report, console)
        if plot is not None:  # after the table: a write that still fails loses no figure
            from cpt_cli.evaluation.plotting import plot_run
            plot_run(path, report, plot)
        worst = report["summary"]["max_forgetting_bpb"]
        if max_forgetting is not None and worst is None:
            # A gate with nothing to compare would pass whatever the model forgot.
            raise UsageError("--max-forgetting: there is no forgetting figure to check (no start "
                             "model to compare against, or no retained domain); pass --base "
                             "MODEL with the start model")
        if max_forgetting is not None and worst > max_forgetting:
            Console(stderr=True).print(
                f"forgetting budget exceeded: {report['summary']['worst_forgetting_domain']} "
                f"forgot {worst:.4f} bits per byte > {max_forgetting}", highlight=False)
            return 1
        return 0

    code = run_guarded(body)
    if code:
        raise typer.Exit(code)


def _stride(value: str | None) -> int | str | None:
    from cpt_cli.evaluation.scoring import DISJOINT

    if value is None or value == DISJOINT:
        return value
    try:
        stride = int(value)
    except ValueError:
        stride = 0
    if stride < 1:
        raise UsageError(f"--stride {value}: must be a positive number of tokens or "
                         f"'{DISJOINT}'")
    return stride


def _check_options(max_forgetting: float | None, batch_tokens: int, bootstrap: int,
                   lm_eval_limit: int | None, plot: str | None) -> None:
    """Refuse, before any model loads, the option values that could only fail later or mean
    nothing (a nan budget would never trip)."""
    import math

    if max_forgetting is not None and not (math.isfinite(max_forgetting) and max_forgetting >= 0):
        raise UsageError(f"--max-forgetting {max_forgetting}: must be a finite number of bits "
                         "per byte, 0 or more (e.g. 0.05)")
    if batch_tokens < 1:
        raise UsageError(f"--batch-tokens {batch_tokens}: must be positive (e.g. 4096)")
    if bootstrap < 0:
        raise UsageError(f"--bootstrap {bootstrap}: must be 0 (no intervals) or more")
    if lm_eval_limit is not None and lm_eval_limit < 1:
        raise UsageError(f"--lm-eval-limit {lm_eval_limit}: must be positive")
    if plot is not None:
        target = Path(plot)
        if target.is_dir():
            raise UsageError(f"--plot {plot}: is a folder; name the PNG file to write, e.g. "
                             f"{target / 'curves.png'}")
        if not target.parent.is_dir():
            raise UsageError(f"--plot {plot}: the folder {target.parent} does not exist; create "
                             "it first")
        _check_writable(plot, target)


def _check_writable(plot: str, target: Path) -> None:
    """Write a probe file beside the plot (and remove it): the one test that holds for every
    reason a write fails (permissions, a read-only mount, root on /sys), so that the evaluation,
    minutes on a large model, is not run for a plot that cannot be saved."""
    import os
    import tempfile

    try:
        with tempfile.NamedTemporaryFile(dir=target.parent, prefix=".cpt-plot-", suffix=".png"):
            pass
        if target.exists() and not os.access(target, os.W_OK):
            raise PermissionError(13, "the file is read-only")
    except OSError as err:
        raise UsageError(f"--plot {plot}: cannot write there ({err.strerror or err}); name a PNG "
                         "file in a folder you can write to") from None
