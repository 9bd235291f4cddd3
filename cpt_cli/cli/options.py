"""Options shared by several commands, declared once."""

from __future__ import annotations

from typing import Annotated

import typer

Json = Annotated[bool, typer.Option("--json", help="Machine-readable JSON on stdout, nothing "
                                                    "else there.")]
Overrides = Annotated[list[str] | None, typer.Argument(
    help="Recipe overrides as dotted KEY=VALUE, e.g. train.optimizer.lr=1e-4", show_default=False)]
RecipePath = Annotated[str, typer.Argument(help="The recipe YAML file.", show_default=False)]
