"""`cpt mix inspect RECIPE`"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from cpt_cli.cli.application import mix_app, print_json, run_guarded
from cpt_cli.cli.options import Help, Json, Overrides, RecipePath
from cpt_cli.errors import UsageError


@mix_app.command("inspect")
def inspect_command(
    recipe: RecipePath,
    overrides: Overrides = None,
    samples: Annotated[int, typer.Option(
        "--samples", help="Render this many packed sequences with document boundaries.")] = 0,
    num_processes: Annotated[int | None, typer.Option(
        "--num-processes", min=1,
        help="Plan for this many processes (default: launch.num_processes)."
    )] = None,
    plot: Annotated[Path | None, typer.Option(
        "--plot", help="Draw the shares over the run, with the learning rate, to this PNG."
    )] = None,
    json_out: Json = False,
    help_: Help = False,
) -> None:
    """The mixture plan before any training: tokens, shares, epochs, replay, packing."""
    from cpt_cli.cli import render
    from cpt_cli.config import load_recipe
    from cpt_cli.inspection import inspect_mix

    def body() -> None:
        if plot is not None:
            from cpt_cli.evaluation.plotting import check_available
            check_available()
            if plot.suffix.lower() != ".png":
                raise UsageError(f"--plot {plot}: give a .png file name, e.g. --plot mix.png")
        from cpt_cli.data.prepare import prepare_data
        from cpt_cli.training.display import TrainDisplay

        loaded = load_recipe(recipe, overrides or [])
        display = TrainDisplay(console=Console(stderr=True))
        try:
            data = prepare_data(loaded, progress=display.data_progress)
        finally:
            display.stop()
        result = inspect_mix(loaded, samples=samples, num_processes=num_processes, data=data,
                             plot=plot)
        if json_out:
            print_json(result)
        else:
            # 100 columns at least, even in a pipe (80 there): the tables fit 100 without
            # wrapping a row (tests/test_render.py).
            console = Console(width=max(100, Console().width))
            render.plan(result, console, loaded.name)
            render.trained_shares(result, console)
            render.phases(result, console)
            render.replay_control(result, console)
            if plot is not None:
                console.print(f"wrote {plot}", highlight=False)

    run_guarded(body)
