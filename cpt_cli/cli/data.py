"""`cpt data prepare RECIPE` and `cpt data quickstart DIR`"""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console

from cpt_cli.cli.application import data_app, print_json, run_guarded
from cpt_cli.cli.options import Flag, Help, Json, Overrides, RecipePath
from cpt_cli.errors import UsageError


@data_app.command("prepare")
def prepare_command(recipe: RecipePath, overrides: Overrides = None, json_out: Json = False,
                    help_: Help = False) -> None:
    """Tokenize every source into the cache ahead of training (once per cluster)."""
    from cpt_cli.config import load_recipe
    from cpt_cli.data.prepare import prepare_data

    def body() -> None:
        from cpt_cli.training.display import TrainDisplay

        loaded = load_recipe(recipe, overrides or [])
        console = Console(stderr=True)
        display = TrainDisplay(console=console)
        try:
            data = prepare_data(loaded, progress=display.data_progress)
        finally:
            display.stop()
        rows = [{"name": d.name, "role": d.role, "documents": d.entry.num_documents,
                 "tokens": d.entry.num_tokens, "cache": str(d.entry.path),
                 "skipped": d.entry.meta["skipped"]} for d in data.domains if d.entry]
        if json_out:
            print_json({"cache_dir": str(data.cache_dir), "sources": rows})
        else:
            for r in rows:
                console.print(f"{r['name']} ({r['role']}): {r['documents']:,} documents, "
                              f"{r['tokens']:,} tokens -> {r['cache']}", highlight=False)

    run_guarded(body)


@data_app.command("quickstart")
def quickstart_command(
    out_dir: Annotated[str, typer.Argument(help="Folder for code.jsonl, prose.jsonl, qa.jsonl")]
    = "data/quickstart",
    force: Annotated[bool, typer.Option("--force", metavar=Flag,
                                        help="Rebuild even if present.")] = False,
    help_: Help = False,
) -> None:
    """Build the quickstart corpus from the Python installation (no download)."""
    from cpt_cli.data.corpus import build_quickstart_corpus

    def body() -> None:
        try:
            paths = build_quickstart_corpus(out_dir, force=force)
        except OSError as err:  # a file where the folder should be, a read-only place, ...
            raise UsageError(f"cannot write the corpus to {out_dir} ({err.strerror or err}); "
                             "name a folder that is new or writable") from None
        for domain, path in paths.items():
            Console(stderr=True).print(f"{domain}: {path}", highlight=False)

    run_guarded(body)
