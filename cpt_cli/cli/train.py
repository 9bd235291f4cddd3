"""`cpt train RECIPE [KEY=VALUE ...]`"""

from __future__ import annotations

import sys
from typing import Annotated

import typer
from rich.console import Console

from cpt_cli.cli import app, print_json, run_guarded
from cpt_cli.cli.options import Json, Overrides, RecipePath


@app.command()
def train(
    recipe: RecipePath,
    overrides: Overrides = None,
    output_dir: Annotated[str | None, typer.Option(
        "--output-dir", help="Run directory (default: runs/<name>).")] = None,
    resume: Annotated[str | None, typer.Option(
        "--resume", help="auto: continue from the newest complete checkpoint; never; or a "
                         "checkpoint folder.")] = None,
    overwrite: Annotated[bool, typer.Option(
        "--overwrite", help="Replace an existing run directory.")] = False,
    num_processes: Annotated[int | None, typer.Option(
        "--num-processes", help="Processes to launch through accelerate (default: "
                                "launch.num_processes).")] = None,
    json_out: Json = False,
) -> None:
    """Prepare the data, evaluate the start model, train, checkpoint, and print the forgetting
    table."""
    from cpt_cli import render
    from cpt_cli.config import load_recipe, resolve_path
    from cpt_cli.launch import already_launched, relaunch
    from cpt_cli.trainer import train as train_stage

    def body() -> int:
        loaded = load_recipe(recipe, overrides or [])
        procs = num_processes or loaded.launch.num_processes
        if not already_launched() and (procs > 1 or loaded.launch.accelerate_config):
            config_file = loaded.launch.accelerate_config
            return relaunch(procs, str(resolve_path(loaded, config_file)) if config_file else None,
                            sys.argv[1:])
        if resume == "never" and overwrite is False:
            pass
        result = train_stage(loaded, output_dir=output_dir, resume=resume, overwrite=overwrite)
        from accelerate.state import PartialState

        if not PartialState().is_main_process:
            return 0
        if json_out:
            print_json({"run_dir": str(result.run_dir), "final": str(result.final_dir),
                        **result.report})
        else:
            console = Console(width=max(120, Console().width))
            render.forgetting(result.report, console,
                              title=f"forgetting table: {loaded.name} ({result.steps} steps)")
            console.print(f"model saved to {result.final_dir}", highlight=False)
        return 0

    code = run_guarded(body)
    if code:
        raise typer.Exit(code)
