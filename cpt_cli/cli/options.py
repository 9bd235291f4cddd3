"""Options shared by several commands, declared once."""

from __future__ import annotations

from typing import Annotated

import typer


def _show_help(ctx: typer.Context, value: bool) -> None:
    if value and not ctx.resilient_parsing:
        typer.echo(ctx.get_help(), color=ctx.color)
        raise typer.Exit()


# Flags take no value, so their type column stays empty (`metavar=""`): typer shows `<bool>`
# there otherwise, as if `--json true` were the way to write it.
Flag = ""
# `--help` declared here rather than typer's own, whose help panel row reads `--help <bool>`
# (the app turns typer's off with `help_option_names: []`); every command and group takes it.
Help = Annotated[bool, typer.Option("--help", is_eager=True, expose_value=False,
                                    callback=_show_help, metavar=Flag,
                                    help="Show this message and exit.")]
Json = Annotated[bool, typer.Option("--json", metavar=Flag,
                                    help="Machine-readable JSON on stdout, nothing else there.")]
Overrides = Annotated[list[str] | None, typer.Argument(
    help="Recipe overrides as dotted KEY=VALUE, e.g. train.optimizer.lr=1e-4", show_default=False)]
RecipePath = Annotated[str, typer.Argument(help="The recipe YAML file.", show_default=False)]
