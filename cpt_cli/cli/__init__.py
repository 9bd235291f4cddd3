"""The `cpt` command line: thin commands that parse, call the library, and render.

Every user mistake surfaces as a `UsageError`: printed as one message, exit status 2, no
traceback.
"""

from __future__ import annotations

from cpt_cli.cli import data, eval, mix, train  # noqa: F401  (registers the commands)
from cpt_cli.cli.application import app, data_app, mix_app, print_json, run_guarded

__all__ = ["app", "data_app", "main", "mix_app", "print_json", "run_guarded"]


def main() -> None:
    app()
