"""cpt: continued pre-training of causal language models, with replay and per-domain forgetting.

Everything the CLI does is callable from Python:

    from cpt_cli import load_recipe, train, evaluate, inspect_mix
    result = train(load_recipe("recipes/quickstart/cpt.yaml"))
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


def load_recipe(path: Any, overrides: Any = ()) -> Any:
    from cpt_cli.config import load_recipe as _load

    return _load(path, list(overrides))


def train(recipe: Any, **kwargs: Any) -> Any:
    from cpt_cli.training.loop import train as _train

    return _train(recipe, **kwargs)


def evaluate(path: Any, **kwargs: Any) -> Any:
    from cpt_cli.evaluation.evaluate import evaluate as _evaluate

    return _evaluate(path, **kwargs)


def inspect_mix(recipe: Any, **kwargs: Any) -> Any:
    from cpt_cli.inspection import inspect_mix as _inspect

    return _inspect(recipe, **kwargs)


__all__ = ["__version__", "evaluate", "inspect_mix", "load_recipe", "train"]
