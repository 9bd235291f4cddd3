"""The recipe: its typed schema (schema.py), how YAML and overrides become it (load.py), and the
semantic checks that report every problem at once (checks.py)."""

from cpt_cli.config.schema import (
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
    build,
    check_semantics,
    load_recipe,
    model_location,
    parse_size,
    recipe_from_config,
    resolve_path,
    save_recipe,
    to_plain,
)

__all__ = [
    "CheckpointConfig", "DataConfig", "EvalConfig", "HFSource", "HoldoutConfig", "LaunchConfig",
    "ModelConfig", "ModelInit", "OptimizerConfig", "Recipe", "ReplayConfig", "ScheduleConfig",
    "Size", "SourceConfig", "TokenizerTrainConfig", "TrainConfig", "build", "check_semantics",
    "load_recipe", "model_location", "parse_size", "recipe_from_config", "resolve_path",
    "save_recipe", "to_plain",
]
