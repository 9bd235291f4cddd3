"""Where a recipe's paths point: relative to the recipe's folder, not the working directory.

A module of its own, below load.py and checks.py: checks.py resolves `launch.accelerate_config`
and load.py runs the checks, so the two functions here cannot live in load.py without a cycle.
"""

from __future__ import annotations

from pathlib import Path

from cpt_cli.config.schema import Recipe


def resolve_path(recipe: Recipe, value: str) -> Path:
    """A path from the recipe, relative to the recipe's folder; `~` expands."""
    p = Path(value).expanduser()
    return p if p.is_absolute() else Path(recipe.base_dir) / p


def model_location(recipe: Recipe) -> str | None:
    """model.path as a local folder when it exists next to the recipe, else as given (Hub id)."""
    if recipe.model.path is None:
        return None
    local = resolve_path(recipe, recipe.model.path)
    return str(local) if local.exists() else recipe.model.path
