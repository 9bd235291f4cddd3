"""The starting model: loaded from a folder or the Hub, or built from a config."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from cpt_cli.config import Recipe
from cpt_cli.errors import UsageError
from cpt_cli.prepare import model_location


def check_model_path(recipe: Recipe) -> list[str]:
    """Problems with model.path that can be found before anything is loaded."""
    location = model_location(recipe)
    if location is None:
        return []
    looks_local = location.startswith((".", "/", "~")) or location.count("/") > 1 or \
        Path(location).exists()
    if looks_local and not Path(location).exists():
        return [f"model.path: {recipe.model.path!r} does not exist (looked for {location}); give "
                "a model folder, a Hub id, or the final/ of a cpt run"]
    if Path(location).is_dir():
        config = Path(location) / "config.json"
        if not config.is_file():
            return [f"model.path: {location} has no config.json: not a Hugging Face model folder"]
        try:
            architectures = json.loads(config.read_text()).get("architectures") or []
        except (OSError, json.JSONDecodeError) as err:
            return [f"model.path: {config} is not valid JSON ({err})"]
        if architectures and not any(a.endswith(("ForCausalLM", "LMHeadModel"))
                                     for a in architectures):
            return [f"model.path: {location} is a {', '.join(architectures)}, not a causal "
                    "language model; cpt trains *ForCausalLM models"]
    return []


def load_model(recipe: Recipe, tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
    """Master weights in fp32 (autocast handles bf16), attention as the recipe asks."""
    m = recipe.model
    if m.trust_remote_code:
        warnings.warn("model.trust_remote_code is true: code shipped with the model will run",
                      stacklevel=2)
    kwargs: dict[str, Any] = {}
    if m.attn_implementation:
        kwargs["attn_implementation"] = m.attn_implementation
    if m.init is not None:
        config_dict = dict(m.init.config)
        model_type = config_dict.pop("model_type")
        try:
            config = AutoConfig.for_model(model_type, **config_dict)
        except (ValueError, TypeError) as err:
            raise UsageError(f"model.init.config: {err}") from None
        # The tokenizer decides the vocabulary and special tokens of a model built from scratch.
        config.vocab_size = len(tokenizer)
        for attr in ("bos_token_id", "eos_token_id", "pad_token_id"):
            setattr(config, attr, getattr(tokenizer, attr))
        torch.manual_seed(recipe.seed)
        try:
            return AutoModelForCausalLM.from_config(config, dtype=torch.float32, **kwargs)
        except ValueError as err:
            raise UsageError(f"model.init.config: {model_type!r} is not a causal LM: {err}"
                             ) from None
    location = model_location(recipe)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            location, revision=m.revision, trust_remote_code=m.trust_remote_code,
            dtype=torch.float32, use_safetensors=True, **kwargs)
    except (OSError, ValueError) as err:
        raise UsageError(f"model.path: could not load a causal LM from {location!r}: {err}"
                         ) from None
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        raise UsageError(f"the tokenizer has {len(tokenizer)} tokens but the model's embedding "
                         f"has {model.get_input_embeddings().weight.shape[0]}: they do not match")
    return model


def max_context(model: PreTrainedModel) -> int | None:
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(model.config, attr, None)
        if isinstance(value, int):
            return value
    return None
