"""The recipe: its typed schema (schema.py), how YAML and overrides become it (load.py), the
semantic checks that report every problem at once (checks.py), and where its relative paths point
(paths.py). Import from here: `from cpt_cli.config import Recipe, load_recipe`."""

from cpt_cli.config.checks import check_semantics
from cpt_cli.config.load import build, load_recipe, recipe_from_config, save_recipe
from cpt_cli.config.paths import model_location, resolve_path
from cpt_cli.config.schema import (
    BatchGeometry,
    CheckpointConfig,
    DataConfig,
    EvalConfig,
    HFSource,
    HoldoutConfig,
    LaunchConfig,
    ModelConfig,
    ModelInit,
    OptimizerConfig,
    Recipe,
    ReplayConfig,
    ScheduleConfig,
    Size,
    SourceConfig,
    TokenizerTrainConfig,
    TrainConfig,
    parse_size,
    to_plain,
)

__all__ = [
    "BatchGeometry", "CheckpointConfig", "DataConfig", "EvalConfig", "HFSource", "HoldoutConfig",
    "LaunchConfig", "ModelConfig", "ModelInit", "OptimizerConfig", "Recipe", "ReplayConfig",
    "ScheduleConfig", "Size", "SourceConfig", "TokenizerTrainConfig", "TrainConfig", "build",
    "check_semantics", "load_recipe", "model_location", "parse_size", "recipe_from_config",
    "resolve_path", "save_recipe", "to_plain",
]
