"""The Typer application every command registers on, and what each command shares: user errors
become one message and exit status 2; `--json` output goes to stdout alone."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.text import Text

from cpt_cli.cli.options import Flag, Help
from cpt_cli.errors import TrainingStopped, UsageError

# Help text is Markdown: a docstring's first paragraph is the command's summary in `cpt --help`,
# its hard line breaks are reflowed to the terminal's width, and blank lines keep the paragraphs
# (typer's "rich" mode passes every line break of the source through to the layout).
_SETTINGS: dict[str, Any] = {"no_args_is_help": True, "rich_markup_mode": "markdown",
                             "context_settings": {"help_option_names": []}}

app = typer.Typer(name="cpt", add_completion=False, pretty_exceptions_enable=False, **_SETTINGS)
mix_app = typer.Typer(**_SETTINGS)
data_app = typer.Typer(**_SETTINGS)
app.add_typer(mix_app, name="mix")
app.add_typer(data_app, name="data")

err_console = Console(stderr=True)


def _show_version(value: bool) -> None:
    if value:
        from cpt_cli import __version__

        typer.echo(f"cpt {__version__}")
        raise typer.Exit()


@app.callback()
def cpt(help_: Help = False,
        version: Annotated[bool, typer.Option("--version", is_eager=True, metavar=Flag,
                                              callback=_show_version,
                                              help="Print cpt's version and exit.")] = False,
        ) -> None:
    """Continued pre-training of causal LMs with replay, and forgetting measured per domain."""


@mix_app.callback()
def mix(help_: Help = False) -> None:
    """The data mixture."""


@data_app.callback()
def data(help_: Help = False) -> None:
    """The tokenization cache."""


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
