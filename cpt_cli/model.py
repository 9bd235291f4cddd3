"""The starting model: loaded from a folder or the Hub, or built from a config; and the checks and
settings that depend on it (compiler, attention backend, activation checkpointing, compiling
layer by layer), which training/setup.py applies."""

from __future__ import annotations

import contextlib
import difflib
import json
import re
import shutil
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from cpt_cli.config import Recipe, model_location, resolve_path
from cpt_cli.errors import UsageError, offline_note


def check_model_path(recipe: Recipe) -> list[str]:
    """Problems with the model that show before any weights load: a model.path or
    model.tokenizer that does not exist, a folder that is not a causal LM, a model.init config
    transformers cannot build, a data.seq_len above the model's context, and a parent without
    the optimizer state that train.optimizer.load_from_parent asks for."""
    m = recipe.model
    problems: list[str] = []
    if m.tokenizer is not None and _looks_local(m.tokenizer) and \
            not resolve_path(recipe, m.tokenizer).exists():
        problems.append(f"model.tokenizer: {m.tokenizer!r} does not exist (looked for "
                        f"{resolve_path(recipe, m.tokenizer)}); give a folder with tokenizer "
                        "files or a Hub id")
    attn = m.attn_implementation
    # Registered backends, plus "eager" and Hub kernels ("org/repo"), as transformers accepts.
    known = ["eager", *ALL_ATTENTION_FUNCTIONS.valid_keys()]
    if attn is not None and attn not in known and "/" not in attn:
        close = difflib.get_close_matches(attn, known, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        problems.append(f"model.attn_implementation: {attn!r} is not an attention backend; use "
                        f"one of {', '.join(known)}{hint}, or leave it unset")
    config: dict[str, Any] | None = None
    where = "model.path"
    if m.init is not None:
        where = "model.init.config"
        config = _init_config(m.init.config, problems)
    location = model_location(recipe)
    if location is not None:
        if _looks_local(location) and not Path(location).exists():
            return problems + [
                f"model.path: {m.path!r} does not exist (looked for "
                f"{resolve_path(recipe, m.path or '')}); give a model folder, a Hub id, or the "
                "final/ of a cpt run"]
        if Path(location).is_file():
            return problems + [f"model.path: {location} is a file; give the folder that holds "
                               f"it ({Path(location).parent}), with config.json and the weights"]
        if Path(location).is_dir():
            config_file = Path(location) / "config.json"
            if not config_file.is_file():
                # A cpt run directory instead of its final/: say which folder was meant.
                hint = f"; did you mean {Path(m.path or '') / 'final'}?" if \
                    (Path(location) / "final" / "config.json").is_file() else \
                    "; give the folder that holds config.json and the weights"
                return problems + [f"model.path: {location} has no config.json: not a Hugging "
                                   f"Face model folder{hint}"]
            try:
                config = json.loads(config_file.read_text())
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
                return problems + [f"model.path: {config_file} is not valid JSON ({err})"]
            if not isinstance(config, dict):
                return problems + [f"model.path: {config_file} is not a JSON object"]
            listed = config.get("architectures") or []
            architectures = [str(a) for a in (listed if isinstance(listed, list) else [listed])]
            causal = [a for a in architectures if a.endswith(("ForCausalLM", "LMHeadModel"))]
            model_type = config.get("model_type")
            remote = "AutoModelForCausalLM" in (config.get("auto_map") or {})
            # transformers runs shipped code only for a model_type it does not know itself.
            if config.get("auto_map") and model_type not in CONFIG_MAPPING_NAMES and \
                    not m.trust_remote_code:
                return problems + [
                    f"model.path: {location} ships its own Python code (auto_map in "
                    "config.json), which cpt does not run by default; set "
                    "model.trust_remote_code: true only if you trust its source, or use a "
                    "model that transformers supports natively"]
            if (architectures and not causal) or (not architectures and not remote and
                                                  model_type not in
                                                  (None, *MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)):
                kind = ", ".join(architectures) if architectures else f"{model_type!r} model"
                return problems + [f"model.path: {location} is a {kind}, not a causal "
                                   "language model; cpt trains *ForCausalLM models (give a "
                                   "decoder such as Llama, Qwen2 or GPT-2)"]
    if recipe.train.optimizer.load_from_parent and location is not None and \
            not (Path(location) / "optimizer.pt").is_file():
        problems.append(f"train.optimizer.load_from_parent: {Path(location) / 'optimizer.pt'} "
                        "not found; the parent must be a cpt run's final/ (which keeps its "
                        "optimizer state)")
    context = _context_of(config) if config is not None else None
    if context is not None and recipe.data.seq_len > context:
        problems.append(f"data.seq_len: {recipe.data.seq_len} is above the model's context of "
                        f"{context} tokens ({where}); lower data.seq_len to at most {context}")
    return problems


def _looks_local(location: str) -> bool:
    """A filesystem path rather than a Hub id (`org/name`): starts with . / ~, has more than one
    slash, or exists."""
    return location.startswith((".", "/", "~")) or location.count("/") > 1 or \
        Path(location).exists()


def _init_config(raw: dict[str, Any], problems: list[str]) -> dict[str, Any] | None:
    """model.init.config as transformers would build it (defaults filled in), or None with the
    problem recorded. Building a config is cheap: no weights."""
    model_type = raw.get("model_type")
    if not isinstance(model_type, str):
        return None  # reported by the recipe's own checks
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        close = difflib.get_close_matches(model_type, list(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else \
            " (e.g. llama, qwen2, gpt2, mistral)"
        what = "not a causal-LM model type" if model_type in CONFIG_MAPPING_NAMES else \
            "not a transformers model type"
        problems.append(f"model.init.config.model_type: {model_type!r} is {what}{hint}")
        return None
    fields = {k: v for k, v in raw.items() if k != "model_type"}
    try:
        return AutoConfig.for_model(model_type, **fields).to_dict()
    except Exception as err:  # noqa: BLE001 - transformers raises several kinds for bad fields
        message = " ".join(str(err).split())
        problems.append(f"model.init.config: transformers rejects this {model_type} config: "
                        f"{message}")
        return None


def _context_of(config: dict[str, Any]) -> int | None:
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = config.get(attr)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


# "Qwen2.5-0.5B-Instruct", "Llama-2-7b-chat-hf", "gemma-2-2b-it": how model names say that
# instruction or chat tuning followed pre-training.
_INSTRUCT_NAME = re.compile(r"instruct|chat|(?:^|[-_])it(?:$|[-_])", re.IGNORECASE)


def instruct_model_warning(recipe: Recipe, tokenizer: PreTrainedTokenizerBase) -> str | None:
    """The warning for a start model that is instruction-tuned: its tokenizer has a chat
    template and its name (the last part of model.path, or of the `_name_or_path` its
    config.json recorded) says instruct or chat. None for any other model."""
    if recipe.model.path is None or not getattr(tokenizer, "chat_template", None):
        return None
    location = model_location(recipe) or recipe.model.path
    # The last part only: the folders above a local model say nothing about it (a path under
    # "chat-experiments/" is not a chat model).
    names = [Path(location).name]
    config_file = Path(location) / "config.json"
    if config_file.is_file():
        with contextlib.suppress(OSError, UnicodeDecodeError, json.JSONDecodeError):
            recorded = json.loads(config_file.read_text())
            if isinstance(recorded, dict) and isinstance(recorded.get("_name_or_path"), str):
                names.append(Path(recorded["_name_or_path"]).name)
    marked = next((n for n in names if _INSTRUCT_NAME.search(n)), None)
    if marked is None:
        return None
    return (f"model.path {recipe.model.path!r} looks instruction-tuned ({marked!r} names it so and "
            "its tokenizer has a chat template): continued pre-training erodes instruction "
            "following (Jindal et al. 2024, arXiv:2410.10739). Start from its base model where "
            "one exists, or keep chat data trained on the answers in the mix (loss_on: "
            "assistant); see docs/concepts.md.")


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
        except ImportError as err:  # an attention backend whose package is missing
            raise UsageError(f"model.attn_implementation: {err}") from None
        except RuntimeError as err:  # a size torch cannot build (negative, say)
            raise UsageError(f"model.init.config: the model cannot be built ({err})") from None
    location = model_location(recipe)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            location, revision=m.revision, trust_remote_code=m.trust_remote_code,
            dtype=torch.float32, use_safetensors=True, **kwargs)
    except (OSError, ValueError, SafetensorError) as err:
        raise UsageError(f"model.path: could not load a causal LM from {location!r}"
                         f"{offline_note(location)}: {err}") from None
    except ImportError as err:  # an attention backend whose package is missing
        raise UsageError(f"model.attn_implementation: {err}") from None
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


def check_compiler(recipe: Recipe, cuda: bool, environ: Mapping[str, str]) -> None:
    """train.compile on CPU builds C++ kernels at the first step: refuse up front, with the fix,
    where no compiler would be found (an inductor traceback otherwise)."""
    if recipe.train.compile and not cuda and cpu_compiler(environ) is None:
        raise UsageError("train.compile: true on CPU needs a C++ compiler (torch.compile builds "
                         "its CPU kernels with one) and none was found (CXX, g++, clang++, c++); "
                         "install one (e.g. apt install g++) or set train.compile: false")


def cpu_compiler(environ: Mapping[str, str]) -> str | None:
    """The C++ compiler torch.compile's CPU backend would use: $CXX, else the first of g++,
    clang++ or c++ on PATH."""
    if environ.get("CXX"):
        return shutil.which(environ["CXX"], path=environ.get("PATH"))
    for name in ("g++", "clang++", "c++"):
        found = shutil.which(name, path=environ.get("PATH"))
        if found:
            return found
    return None


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's repeated decoder layers (the first ModuleList of `*DecoderLayer`/`*Block`)."""
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) and \
                type(module[0]).__name__.endswith(("DecoderLayer", "Block")):
            return list(module)
    return []


def compile_layers(model: torch.nn.Module) -> None:
    """train.compile: layer by layer (as torchtitan does): each decoder layer compiles once and
    is reused, so compile time does not grow with depth, and a graph break stays inside one
    layer."""
    for layer in decoder_layers(model):
        layer.compile()


def enable_activation_checkpointing(model: Any) -> None:
    # Non-reentrant checkpointing: the reentrant kind computes no gradients for a layer whose
    # inputs need none (frozen embeddings, say). transformers 5 renamed the method.
    enable = getattr(model, "activation_checkpointing_enable", None) or \
        model.gradient_checkpointing_enable
    enable({"use_reentrant": False})


def check_document_masking(recipe: Recipe, model: Any, cuda: bool) -> None:
    """The attention backend can train here, and keeps attention within documents when
    data.cross_document_attention is false."""
    impl = getattr(model.config, "_attn_implementation", None) or "sdpa"
    if impl == "flex_attention" and not cuda:
        raise UsageError("model.attn_implementation: flex_attention has no backward pass on a "
                         "CPU in torch; train with sdpa (or eager) here")
    if recipe.data.cross_document_attention:
        return
    # transformers builds a block-diagonal mask from restarted position_ids for these backends.
    if impl not in ("sdpa", "eager", "flex_attention", "flash_attention_2", "flash_attention_3"):
        raise UsageError(
            f"data.cross_document_attention is false, but the attention backend {impl!r} cannot "
            "keep attention within documents of a packed sequence. Set model.attn_implementation "
            "to sdpa, eager, flex_attention or flash_attention_2, or set "
            "data.cross_document_attention=true.")
