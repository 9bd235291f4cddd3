"""`cpt train RECIPE [KEY=VALUE ...]`

Exit status: 0 finished; 2 a problem to fix (recipe, data, paths, a failed write: the message
says which); 1 stopped on purpose or by a numerical fault (forgetting budget, NaN loss);
128 + N stopped by signal N after writing a checkpoint (143 SIGTERM, 130 SIGINT): run the same
command with `--resume auto` to continue.
"""

from __future__ import annotations

import shlex
import sys
from typing import Annotated

import typer
from rich.console import Console

from cpt_cli.cli.application import app, print_json, run_guarded
from cpt_cli.cli.options import Flag, Help, Json, Overrides, RecipePath


@app.command()
def train(
    recipe: RecipePath,
    overrides: Overrides = None,
    output_dir: Annotated[str | None, typer.Option(
        "--output-dir", help="Run directory (default: runs/NAME, NAME being the recipe's "
                             "name).")] = None,
    resume: Annotated[str | None, typer.Option(
        "--resume", help="auto: continue from the newest complete checkpoint; never; or a "
                         "checkpoint folder.")] = None,
    overwrite: Annotated[bool, typer.Option(
        "--overwrite", metavar=Flag, help="Replace an existing run directory.")] = False,
    replan: Annotated[bool, typer.Option(
        "--replan", metavar=Flag, help="With --resume: apply a changed mixture (weights, "
                                       "replay ratio) from the checkpoint's step on.")] = False,
    num_processes: Annotated[int | None, typer.Option(
        "--num-processes", min=1, help="Processes to launch through accelerate (default: "
                                "launch.num_processes).")] = None,
    json_out: Json = False,
    help_: Help = False,
) -> None:
    """Prepare the data, evaluate the start model, train, checkpoint, and print the forgetting
    table.

    Exit status 143 (SIGTERM) or 130 (SIGINT) after a preemption checkpoint: rerun the same
    command with `--resume auto` to continue.
    """
    from cpt_cli.cli import render
    from cpt_cli.config import load_recipe, resolve_path
    from cpt_cli.errors import TrainingStopped, UsageError
    from cpt_cli.launch import check_before_launch, relaunch
    from cpt_cli.process import already_launched, end_worker, finish_worker, register_worker
    from cpt_cli.training.loop import train as train_stage

    def body() -> int:
        loaded = load_recipe(recipe, overrides or [])
        procs = num_processes or loaded.launch.num_processes
        if not already_launched() and (procs > 1 or loaded.launch.accelerate_config):
            config_file = loaded.launch.accelerate_config
            config_path = resolve_path(loaded, config_file) if config_file else None
            check_before_launch(loaded, config_path, procs, output_dir, resume, overwrite,
                                replan=replan)
            return relaunch(procs, str(config_path) if config_path else None, sys.argv[1:])
        try:
            result = train_stage(loaded, output_dir=output_dir, resume=resume,
                                 overwrite=overwrite, replan=replan)
        except TrainingStopped as stop:
            if "--resume auto" in str(stop):
                raise TrainingStopped(f"{stop}\n  resume: {resume_command(sys.argv[1:])}",
                                      exit_code=stop.exit_code) from None
            raise
        if not _main_process():
            return 0
        if json_out:
            print_json({"run_dir": str(result.run_dir), "final": str(result.final_dir),
                        **result.report})
        else:
            # 100 columns at least, even in a pipe (80 there): the tables fit 100 without
            # wrapping a row (tests/test_render.py).
            console = Console(width=max(100, Console().width))
            render.forgetting(result.report, console,
                              title=f"forgetting table: {loaded.name} ({result.steps} steps)")
            render.answer_scoring(result.report, console)
            console.print(f"model saved to {result.final_dir}", highlight=False)
        return 0

    register_worker()
    if _main_process():
        try:
            code = run_guarded(body) or 0
        except typer.Exit as done:
            code = done.exit_code
    else:
        # The other processes of a multi-process run exit with the same status, silently: the
        # main process prints the one message.
        try:
            code = body()
        except UsageError:
            code = 2
        except TrainingStopped as stop:
            code = stop.exit_code
    code = finish_worker(code)
    end_worker(code)
    if code:
        raise typer.Exit(code)


def _main_process() -> bool:
    from cpt_cli.process import worker_rank

    return worker_rank() == "0"


def resume_command(argv: list[str]) -> str:
    """The command line that continues this run: the same arguments with `--resume auto` and
    without `--overwrite` (which would start over)."""
    args: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg == "--overwrite":
            continue
        if arg == "--resume":
            skip = True
            continue
        if arg.startswith("--resume="):
            continue
        args.append(arg)
    return shlex.join(["cpt", *args, "--resume", "auto"])
