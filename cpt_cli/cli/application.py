"""The Typer application every command registers on, and what each command shares: user errors
become one message and exit status 2; `--json` output goes to stdout alone."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any

import typer
from rich.console import Console
from rich.text import Text

from cpt_cli.errors import TrainingStopped, UsageError

app = typer.Typer(name="cpt", no_args_is_help=True, add_completion=False,
                  pretty_exceptions_enable=False,
                  help="Continued pre-training of causal LMs with replay, and forgetting "
                       "measured per domain.")
mix_app = typer.Typer(no_args_is_help=True, help="The data mixture.")
data_app = typer.Typer(no_args_is_help=True, help="The tokenization cache.")
app.add_typer(mix_app, name="mix")
app.add_typer(data_app, name="data")

err_console = Console(stderr=True)


def run_guarded(fn: Callable[[], Any]) -> Any:
    """Run a command body: user errors become a message and exit status 2."""
    try:
        return fn()
    except UsageError as err:
        err_console.print(Text.assemble(("error: ", "bold red"), str(err)), soft_wrap=True)
        raise typer.Exit(2) from None
    except TrainingStopped as stop:
        err_console.print(Text.assemble(("stopped: ", "bold yellow"), str(stop)),
                          soft_wrap=True)
        raise typer.Exit(stop.exit_code) from None


def print_json(payload: Any) -> None:
    from cpt_cli.runs.lineage import json_safe

    sys.stdout.write(json.dumps(json_safe(payload), indent=2, default=str) + "\n")
