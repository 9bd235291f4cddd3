"""The recipe: a YAML file read by OmegaConf, checked once, and turned into frozen dataclasses.

    cpt train recipes/quickstart/cpt.yaml train.optimizer.lr=1e-4 data.seq_len=256

OmegaConf reads the YAML, merges the dotted overrides and resolves interpolations; `build` then
walks the schema below and collects *every* problem (unknown key with a did-you-mean, wrong type,
bad value) before raising one `RecipeError`. Nothing after loading sees a `DictConfig`: defaults
live here and only here. Every field carries a one-line docstring under it; `docs/recipe.md` is
generated from them (`python -m cpt_cli.docgen`), and a test fails when that file is stale.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from cpt_cli.errors import RecipeError


class Size(int):
    """A count written with an optional suffix: 100k, 50M, 2B, 1T (powers of 1000)."""


_SUFFIXES = {"": 1, "k": 10**3, "K": 10**3, "m": 10**6, "M": 10**6, "b": 10**9, "B": 10**9,
             "G": 10**9, "g": 10**9, "t": 10**12, "T": 10**12}
_SIZE_FORMS = "expected a whole number with an optional suffix k, M, B or T (100k, 50M, 2B)"
_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?(?:[eE][0-9]+)?)\s*([kKmMbBgGtT]?)\s*$")


def parse_size(value: Any) -> int:
    """`2B` -> 2_000_000_000. Raises ValueError naming the accepted forms."""
    if isinstance(value, bool):
        raise ValueError(_SIZE_FORMS)
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        match = _SIZE_RE.match(value.replace("_", ""))
        if match:
            number = float(match.group(1)) * _SUFFIXES[match.group(2)]
            if number.is_integer():
                return int(number)
    raise ValueError(_SIZE_FORMS)


# --------------------------------------------------------------------------------------------
# The schema. Field docstrings are the documentation (docs/recipe.md is generated from them).
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class HFSource:
    """A dataset read through Hugging Face `datasets.load_dataset` (Hub id or local folder)."""

    path: str
    """Dataset id on the Hub (`HuggingFaceFW/fineweb-edu`) or a local dataset folder."""
    name: str | None = None
    """Configuration name (`sample-10BT`)."""
    split: str = "train"
    """Split to read."""
    revision: str | None = None
    """Git revision of the dataset on the Hub (pin it for reproducibility)."""
    data_files: str | list[str] | None = None
    """Restrict to these data files (globs relative to the dataset)."""
    streaming: bool = False
    """Stream instead of downloading everything: for corpora larger than the disk."""
    max_documents: int | None = None
    """Read at most this many documents (needed to bound a streaming source)."""


@dataclass(frozen=True, kw_only=True)
class SourceConfig:
    """One domain of text: files on disk or a Hugging Face dataset."""

    name: str
    """Domain name, unique in the run and its lineage; used in every report."""
    path: str | list[str] | None = None
    """Glob(s) of .jsonl/.json/.parquet/.csv/.arrow files, or of plain files read one document each (.txt, .md, source code). Relative to the recipe's folder."""
    hf: HFSource | None = None
    """A Hugging Face dataset instead of `path`."""
    text_field: str = "text"
    """Record field holding the document text (ignored for plain files and with `template`)."""
    template: str | None = None
    """Python format string over the record's fields, e.g. `Question: {question}\\nAnswer: {answer}`."""
    weight: float = 1.0
    """Relative weight within its group (new sources, or replay sources)."""
    min_chars: int = 1
    """Drop documents shorter than this many characters."""
    max_chars: Size = Size(10_000_000)
    """Longer documents are bad records (runaway lines): raise, or skip with on_error: skip."""
    max_epochs: float | None = None
    """Refuse a plan that repeats this source more often (default: data.max_epochs)."""
    on_error: Literal["raise", "skip"] = "raise"
    """Bad records (invalid JSON, not UTF-8, missing field): stop with an error, or skip and count them."""


@dataclass(frozen=True, kw_only=True)
class ReplayConfig:
    """Earlier data mixed into every stage, so the model keeps what it knew."""

    ratio: float = 0.0
    """Share of the training tokens drawn from replay sources (0 <= ratio < 1)."""
    inherit: bool = True
    """When model.path is a cpt run: replay every source of its lineage too (weight 1 each)."""
    sources: list[SourceConfig] = field(default_factory=list)
    """Replay sources named here; one named like an inherited source replaces it."""
    buffer_tokens: Size | None = None
    """Draw a fixed, deterministic pool of this many tokens per replay source and cycle it."""


@dataclass(frozen=True, kw_only=True)
class HoldoutConfig:
    """Held-out documents per source: carved once, never trained on, evaluated every stage."""

    tokens: Size = Size(100_000)
    """Tokens of whole documents held out per source (chosen by document hash)."""
    max_fraction: float = 0.5
    """Refuse a holdout larger than this fraction of its source."""


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """What is trained on: sources, replay, packing."""

    sources: list[SourceConfig]
    """The new data of this stage (target domains)."""
    seq_len: int = 2048
    """Tokens per packed training sequence."""
    packing: Literal["concat", "best_fit"] = "concat"
    """concat: documents joined with EOS and cut into seq_len; best_fit: whole documents packed into bins, padded."""
    cross_document_attention: bool = False
    """false: attention stays within each document of a packed sequence (position_ids restart per document)."""
    replay: ReplayConfig = field(default_factory=ReplayConfig)
    """Replay of earlier data."""
    holdout: HoldoutConfig = field(default_factory=HoldoutConfig)
    """Held-out sets for evaluation."""
    max_epochs: float = 16.0
    """Default limit on how often one source may be repeated (a warning is printed above 4)."""
    cache_dir: str | None = None
    """Where tokenized sources are cached (default: $CPT_CACHE or ~/.cache/cpt)."""


@dataclass(frozen=True, kw_only=True)
class TokenizerTrainConfig:
    """Train a byte-level BPE tokenizer on this stage's sources (for models built from scratch)."""

    vocab_size: int = 1024
    """Vocabulary size, special tokens included."""
    min_frequency: int = 2
    """Ignore pairs seen fewer times than this."""
    max_chars: Size = Size(20_000_000)
    """Train on at most this many characters (a deterministic sample of the sources)."""


@dataclass(frozen=True, kw_only=True)
class ModelInit:
    """Build a model from a configuration instead of loading weights."""

    config: dict[str, Any]
    """Any transformers causal-LM config as a mapping; must include model_type (e.g. llama)."""


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """The starting model and its tokenizer."""

    path: str | None = None
    """Local directory, Hub id, or the final/ of an earlier cpt run (its lineage is inherited)."""
    init: ModelInit | None = None
    """Start from scratch from a config instead of `path`."""
    tokenizer: str | None = None
    """Tokenizer directory or Hub id (default: the model's own)."""
    train_tokenizer: TokenizerTrainConfig | None = None
    """Train a tokenizer on the sources instead (only with `init`)."""
    revision: str | None = None
    """Git revision of a Hub model."""
    trust_remote_code: bool = False
    """Run model code shipped with the checkpoint. Off unless you trust its source."""
    attn_implementation: str | None = None
    """transformers attention backend (sdpa, eager, flash_attention_2, flex_attention); default: the model's."""


@dataclass(frozen=True, kw_only=True)
class OptimizerConfig:
    """AdamW; no weight decay on norms, biases and embeddings."""

    lr: float = 3.0e-4
    """Peak learning rate."""
    weight_decay: float = 0.1
    """Decoupled weight decay for matrices."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    """Adam betas."""
    eps: float = 1.0e-8
    """Adam epsilon."""
    embedding_lr_scale: float = 1.0
    """Multiply the learning rate of embeddings by this."""
    load_from_parent: bool = False
    """Continue the parent run's optimizer state instead of a fresh one (parameters must match)."""


@dataclass(frozen=True, kw_only=True)
class ScheduleConfig:
    """Learning-rate schedule; a new stage re-warms from zero by default."""

    name: Literal["cosine", "wsd", "linear", "constant"] = "cosine"
    """cosine | wsd (warmup-stable-decay) | linear | constant."""
    warmup: float = 0.01
    """Warmup: a fraction of the steps when below 1, else a number of steps."""
    decay: float = 0.1
    """wsd only: the final fraction of steps spent decaying (or steps when >= 1)."""
    decay_shape: Literal["linear", "1-sqrt"] = "linear"
    """wsd only: shape of the cooldown."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of the peak."""


@dataclass(frozen=True, kw_only=True)
class CheckpointConfig:
    """Periodic, atomic checkpoints that resume exactly."""

    every_steps: int | None = 1000
    """Save every this many steps (null: only the final model)."""
    keep: int = 3
    """Keep the newest this many checkpoints (wsd also keeps its last pre-decay one)."""


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """How long and how the model trains."""

    tokens: Size | None = None
    """Training tokens (exactly one of tokens and steps)."""
    steps: int | None = None
    """Optimizer steps (exactly one of tokens and steps)."""
    global_batch_tokens: Size | None = None
    """Tokens per optimizer step across all processes; rounded to whole sequences (1M at seq_len 2048 is 488 sequences)."""
    global_batch_size: int | None = None
    """Sequences per optimizer step, instead of global_batch_tokens."""
    micro_batch_size: int = 8
    """Sequences per forward pass per process; gradient accumulation makes up the rest."""
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    """The optimizer."""
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    """The learning-rate schedule."""
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    """auto: bf16 autocast on a GPU that supports it, fp32 on CPU. Master weights stay fp32."""
    grad_clip: float | None = 1.0
    """Clip the gradient norm to this (null: no clipping)."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpointing."""
    compile: bool = False
    """torch.compile each decoder layer (all layers share one graph): the first step takes the
    compile (about 10 s on CPU for the quickstart model), later steps run faster (1.2x there);
    on CPU it needs a C++ compiler."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory."""
    freeze: list[str] = field(default_factory=list)
    """Regular expressions of parameter names to keep frozen (e.g. `embed_tokens`)."""
    trackers: list[str] = field(default_factory=list)
    """accelerate trackers to log to when installed (tensorboard, wandb)."""
    log_every_steps: int = 10
    """Write a training line to metrics.jsonl every this many steps."""
    max_bad_steps: int = 0
    """Skip up to this many steps with a NaN or infinite loss before stopping."""


@dataclass(frozen=True, kw_only=True)
class EvalConfig:
    """Per-domain evaluation on the held-out sets."""

    every_steps: int | None = None
    """Evaluate every this many steps during training (null: at start and end only)."""
    max_forgetting_bpb: float | None = None
    """Stop (after a checkpoint) when a retained domain forgets more bits per byte than this."""
    max_length: int | None = None
    """Longest scoring window in tokens, context included (null: data.seq_len, the trained context)."""
    batch_tokens: int = 4096
    """Tokens per evaluation batch (4096 is near the fastest on CPU and caps 128k-vocab logits)."""
    bootstrap_samples: int = 1000
    """Resamples for the 95% interval of each delta_bpb."""


@dataclass(frozen=True, kw_only=True)
class LaunchConfig:
    """How `cpt train` launches itself."""

    num_processes: int = 1
    """Processes on this machine; above 1 cpt re-launches itself under `accelerate launch`."""
    accelerate_config: str | None = None
    """An accelerate config file (multi-GPU, multi-node, FSDP, DeepSpeed) to launch with."""


@dataclass(frozen=True, kw_only=True)
class Recipe:
    """A continued pre-training stage."""

    name: str
    """Run name; output goes to runs/<name> unless output_dir is set."""
    data: DataConfig
    """The data."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The starting model."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Training."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Evaluation."""
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    """Launching."""
    seed: int = 1234
    """Seed for initialization, data order and holdout-independent shuffles."""
    output_dir: str | None = None
    """Run directory (default: runs/<name> under the current directory)."""
    base_dir: str = "."
    """Folder that relative paths resolve against: set to the recipe's folder when loaded."""

    def to_dict(self) -> dict[str, Any]:
        return to_plain(self)


# --------------------------------------------------------------------------------------------
# Loading and validation
# --------------------------------------------------------------------------------------------


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read a recipe file, apply `KEY=VALUE` overrides, validate everything, return a Recipe."""
    path = Path(path)
    if path.is_dir():
        raise RecipeError(f"{path} is a folder, not a recipe: pass the path of a YAML recipe "
                          "file (see recipes/ for examples).")
    if not path.is_file():
        raise RecipeError(f"Recipe file not found: {path}. Pass the path of a YAML recipe "
                          "(see recipes/ for examples).")
    try:
        # OmegaConf parses with a safe YAML loader: no Python objects are ever constructed.
        base = OmegaConf.load(path)
    except (OmegaConfBaseException, Exception) as err:  # yaml.YAMLError and friends
        raise RecipeError(f"{path} is not valid YAML: {err}".rstrip()) from None
    if not OmegaConf.is_dict(base):
        raise RecipeError(f"{path}: a recipe is a YAML mapping (name:, model:, data:, train:, ...)")
    return recipe_from_config(base, overrides, base_dir=path.resolve().parent, origin=str(path))


def recipe_from_config(config: Any, overrides: list[str] | tuple[str, ...] = (), *,
                       base_dir: str | Path = ".", origin: str = "recipe") -> Recipe:
    """Validate a mapping (dict or DictConfig) plus overrides into a Recipe."""
    problems: list[str] = []
    cfg = OmegaConf.create(config) if not OmegaConf.is_config(config) else config
    for item in overrides:
        if "=" not in item or not item.partition("=")[0].strip():
            problems.append(f"override {item!r}: write overrides as KEY=VALUE, e.g. "
                            "train.optimizer.lr=1e-4")
            continue
        key, _, text = item.partition("=")
        try:
            # The value is parsed as YAML, as OmegaConf's dotlist does; `update` (not a merge of
            # a dotlist) also reaches into lists: data.sources.0.weight=0.5.
            value = OmegaConf.to_container(OmegaConf.from_dotlist([f"value={text}"]),
                                           resolve=False)["value"]
            OmegaConf.update(cfg, key.strip(), value, merge=True, force_add=True)
        except (OmegaConfBaseException, yaml.YAMLError, ValueError, TypeError, KeyError,
                IndexError) as err:
            reason = " ".join(str(err).splitlines()[0].split()) or type(err).__name__
            problems.append(f"override {item!r}: {reason}; write KEY=VALUE with a dotted key "
                            "(list items by index: data.sources.0.weight=0.5)")
    try:
        plain = OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as err:
        raise RecipeError(f"{origin}: could not resolve an interpolation: {err}\n"
                          "An interpolation such as ${data.seq_len} refers to a key written in "
                          "the recipe or an override; schema defaults are not visible to it."
                          ) from None
    if not isinstance(plain, dict):
        raise RecipeError(f"{origin}: a recipe is a mapping")
    plain.setdefault("base_dir", str(base_dir))
    failed: list[str] = []
    recipe = build(Recipe, plain, "", problems, failed)
    if recipe is not _FAILED:
        semantic: list[str] = []
        check_semantics(recipe, semantic)
        # A field that failed its type check was replaced by its default: skip the cross-field
        # problems that mention it (or a parent of it), which would only repeat the first report.
        for problem in semantic:
            key = problem.split(":", 1)[0]
            if not any(f.startswith(key) or key.startswith(f) for f in failed if f):
                problems.append(problem)
    if problems:
        raise RecipeError(f"{origin} has {len(problems)} problem{'s' * (len(problems) > 1)}:",
                          problems)
    return recipe


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if tp is Size:
        return "a size (100k, 50M, 2B)"
    if tp is type(None):
        return "null"
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin is list:
        item = typing.get_args(tp)[0]
        return "a list of mappings" if dataclasses.is_dataclass(item) else \
            f"a list of {_type_name(item)}"
    if origin is dict:
        return "a mapping"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(
        tp, getattr(tp, "__name__", str(tp)))


def _key(path: str, name: str | int) -> str:
    if isinstance(name, int):
        return f"{path}[{name}]"
    return f"{path}.{name}" if path else name



def build(tp: Any, value: Any, path: str, problems: list[str],
          failed: list[str] | None = None) -> Any:
    """Convert `value` to type `tp`, appending a message per problem; `_FAILED` on failure.

    A dataclass with a bad field is still built, with the field's default (or a placeholder), so
    that the checks across fields can run too and every problem is reported at once; the keys that
    failed are collected in `failed` so those checks do not repeat them.
    """
    failed = [] if failed is None else failed
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            problems.append(f"{path or 'recipe'}: expected {_type_name(tp)}, got {value!r}")
            failed.append(path)
            return _FAILED
        hints = typing.get_type_hints(tp)
        fields = {f.name: f for f in dataclasses.fields(tp)}
        kwargs: dict[str, Any] = {}
        for key in value:
            if key not in fields:
                close = difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.6)
                hint = f"; did you mean {close[0]!r}?" if close else \
                    f"; accepted keys: {', '.join(f for f in fields if f != 'base_dir')}"
                problems.append(f"{_key(path, key)}: unknown key{hint}")
        for name, f in fields.items():
            key = _key(path, name)
            if name in value:
                built = build(hints[name], value[name], key, problems, failed)
                if built is _FAILED:
                    failed.append(key)
                    if _required(f):
                        kwargs[name] = _placeholder(hints[name])
                    continue
                kwargs[name] = built
            elif _required(f):
                problems.append(f"{key}: required ({_type_name(hints[name])})")
                failed.append(key)
                kwargs[name] = _placeholder(hints[name])
        return tp(**kwargs)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        candidates = [a for a in args if a is not type(None)]
        # Try each member silently; report once with every accepted form.
        for cand in candidates:
            trial: list[str] = []
            built = build(cand, value, path, trial, [])
            if not trial and built is not _FAILED:
                return built
        if len(candidates) == 1:
            return build(candidates[0], value, path, problems, failed)
        problems.append(f"{path}: expected {_type_name(tp)}, got {value!r}")
        return _FAILED
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value in allowed:
            return value
        close = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        problems.append(f"{path}: {value!r} is not accepted; use one of "
                        f"{', '.join(repr(a) for a in allowed)}{hint}")
        return _FAILED
    if origin is list:
        if not isinstance(value, list):
            problems.append(f"{path}: expected {_type_name(tp)}, got {value!r}")
            return _FAILED
        (item_tp,) = typing.get_args(tp)
        items = [build(item_tp, v, _key(path, i), problems, failed) for i, v in enumerate(value)]
        return _FAILED if any(i is _FAILED for i in items) else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            problems.append(f"{path}: expected a mapping, got {value!r}")
            return _FAILED
        return dict(value)
    if tp is Size:
        try:
            return Size(parse_size(value))
        except ValueError as err:
            problems.append(f"{path}: {value!r} is not a size: {err}")
            return _FAILED
    if tp is bool:
        if isinstance(value, bool):
            return value
        problems.append(f"{path}: expected true or false, got {value!r}")
        return _FAILED
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return parse_size(value)
            except ValueError:
                pass
        problems.append(f"{path}: expected an integer, got {value!r}")
        return _FAILED
    if tp is float:
        number: float | None = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                pass
        if number is not None and math.isfinite(number):
            return number
        # No setting means anything when infinite or not a number: nan would slip past every
        # comparison (a limit that never trips), inf would ruin the weights at the first step.
        problems.append(f"{path}: expected a finite number, got {value!r}")
        return _FAILED
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        problems.append(f"{path}: expected a string, got {value!r}")
        return _FAILED
    if tp is Any:
        return value
    raise TypeError(f"schema type {tp!r} at {path} is not supported")  # a bug in the schema


_FAILED = object()


def _required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def _placeholder(tp: Any) -> Any:
    """A stand-in for a required field that failed, so the cross-field checks can still run."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return build(tp, {}, "", [], [])
    if origin is list:
        return []
    if origin is dict or tp is dict:
        return {}
    return {str: "", int: 0, float: 0.0, bool: False}.get(tp)


def check_semantics(recipe: Recipe, problems: list[str]) -> None:
    """Checks across fields that types alone cannot express."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", recipe.name):
        problems.append(f"name: {recipe.name!r} must be letters, digits, '.', '_' or '-' "
                        "(it becomes a folder name)")
    m = recipe.model
    if (m.path is None) == (m.init is None):
        problems.append("model: set exactly one of model.path (a model to continue from) and "
                        "model.init (a config to start from scratch)")
    if m.init is not None and "model_type" not in m.init.config:
        problems.append("model.init.config.model_type: required (e.g. llama, qwen2, gpt2)")
    if m.train_tokenizer is not None and m.init is None:
        problems.append("model.train_tokenizer: only for models built from scratch with "
                        "model.init; a loaded model keeps its tokenizer")
    if m.init is not None and m.tokenizer is None and m.train_tokenizer is None:
        problems.append("model: a model built from model.init needs model.tokenizer (a path) or "
                        "model.train_tokenizer ({vocab_size: 1024})")
    if m.train_tokenizer is not None and m.train_tokenizer.vocab_size < 260:
        problems.append(f"model.train_tokenizer.vocab_size: {m.train_tokenizer.vocab_size} is "
                        "too small; a byte-level BPE needs at least 260 (256 bytes + specials)")

    d = recipe.data
    if d.seq_len < 2:
        problems.append(f"data.seq_len: {d.seq_len} must be at least 2")
    if not d.sources:
        problems.append("data.sources: list at least one source (the new data of this stage)")
    seen: dict[str, str] = {}
    groups = [("data.sources", d.sources), ("data.replay.sources", d.replay.sources)]
    for group, sources in groups:
        for i, src in enumerate(sources):
            key = f"{group}[{i}]"
            if src.name in seen:
                problems.append(f"{key}.name: {src.name!r} is used twice (also at "
                                f"{seen[src.name]}); source names must be unique")
            else:
                seen[src.name] = key
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", src.name):
                problems.append(f"{key}.name: {src.name!r} must be letters, digits, '.', '_' "
                                "or '-'")
            if (src.path is None) == (src.hf is None):
                problems.append(f"{key}: set exactly one of path (local files) and hf (a "
                                "Hugging Face dataset)")
            elif isinstance(src.path, list) and not src.path:
                problems.append(f"{key}.path: an empty list; give at least one file or glob")
            if not (src.weight > 0) or src.weight != src.weight or src.weight == float("inf"):
                problems.append(f"{key}.weight: {src.weight} must be a positive number")
            if src.max_epochs is not None and src.max_epochs <= 0:
                problems.append(f"{key}.max_epochs: {src.max_epochs} must be positive")
            if src.min_chars < 0:
                problems.append(f"{key}.min_chars: {src.min_chars} must be 0 or more")
            if src.max_chars < max(src.min_chars, 1):
                problems.append(f"{key}.max_chars: {src.max_chars} must be at least min_chars "
                                f"({src.min_chars}) and 1; e.g. 10M")
            if src.template is not None:
                try:
                    fields = [f for _, f, _, _ in __import__("string").Formatter().parse(
                        src.template) if f is not None]
                except ValueError as err:
                    problems.append(f"{key}.template: {src.template!r} is not a valid format "
                                    f"string ({err}); use {{field}} placeholders")
                else:
                    if not fields:
                        problems.append(f"{key}.template: {src.template!r} has no {{field}} "
                                        "placeholder")
                    elif any(f == "" or f.isdigit() for f in fields):
                        problems.append(f"{key}.template: use named placeholders like "
                                        "{question}, not {} or {0}")
                    elif any("." in f or "[" in f for f in fields):
                        # {a.__class__} would reach into Python objects: only plain names.
                        bad = next(f for f in fields if "." in f or "[" in f)
                        problems.append(f"{key}.template: {{{bad}}} is not a plain field name; "
                                        "attribute and index access are not supported, use "
                                        "{field}")
            if src.hf is not None and src.hf.streaming and src.hf.max_documents is None:
                problems.append(f"{key}.hf.max_documents: required with streaming: true, so the "
                                "cache stays bounded (e.g. 200000)")
    r = d.replay
    if not (0.0 <= r.ratio < 1.0):  # also catches NaN
        problems.append(f"data.replay.ratio: {r.ratio} must be at least 0 and below 1 (a stage "
                        "needs some new data); e.g. 0.25")
    if r.sources and r.ratio == 0.0:
        problems.append("data.replay.ratio: replay sources are listed but ratio is 0; set e.g. "
                        "data.replay.ratio=0.25 or remove data.replay.sources")
    if r.ratio > 0 and not r.sources and not r.inherit:
        problems.append("data.replay: ratio > 0 needs replay sources: list data.replay.sources "
                        "or set inherit: true with a cpt run as model.path")
    if r.buffer_tokens is not None and r.buffer_tokens <= 0:
        problems.append(f"data.replay.buffer_tokens: {r.buffer_tokens} must be positive")
    if d.holdout.tokens <= 0:
        # Without held-out text every bits-per-byte figure would be 0/0: nothing measured.
        problems.append(f"data.holdout.tokens: {d.holdout.tokens} must be positive; the "
                        "held-out set is how forgetting is measured (e.g. 100k)")
    if not (0 < d.holdout.max_fraction < 1):
        problems.append(f"data.holdout.max_fraction: {d.holdout.max_fraction} must be between "
                        "0 and 1")
    if d.max_epochs <= 0:
        problems.append(f"data.max_epochs: {d.max_epochs} must be positive")

    if not 0 <= recipe.seed < 2**32:  # numpy's seeds are 32-bit
        problems.append(f"seed: {recipe.seed} must be between 0 and {2**32 - 1}")

    t = recipe.train
    if (t.tokens is None) == (t.steps is None):
        problems.append("train: set exactly one of train.tokens (e.g. 2B) and train.steps")
    if t.tokens is not None and t.tokens <= 0:
        problems.append(f"train.tokens: {t.tokens} must be positive")
    if t.steps is not None and t.steps <= 0:
        problems.append(f"train.steps: {t.steps} must be positive")
    if (t.global_batch_tokens is None) == (t.global_batch_size is None):
        problems.append("train: set exactly one of train.global_batch_tokens (e.g. 1M) and "
                        "train.global_batch_size (sequences)")
    if t.global_batch_tokens is not None and d.seq_len >= 2 and \
            t.global_batch_tokens < d.seq_len:
        problems.append(f"train.global_batch_tokens: {t.global_batch_tokens} is less than one "
                        f"sequence of data.seq_len ({d.seq_len}) tokens; use at least "
                        f"{d.seq_len}")
    if t.global_batch_size is not None and t.global_batch_size <= 0:
        problems.append(f"train.global_batch_size: {t.global_batch_size} must be positive")
    if t.micro_batch_size <= 0:
        problems.append(f"train.micro_batch_size: {t.micro_batch_size} must be positive")
    o = t.optimizer
    if not (o.lr > 0):
        problems.append(f"train.optimizer.lr: {o.lr} must be positive (e.g. 3e-5)")
    if o.weight_decay < 0:
        problems.append(f"train.optimizer.weight_decay: {o.weight_decay} must be 0 or more")
    if len(o.betas) != 2 or not all(0 <= b < 1 for b in o.betas):
        problems.append(f"train.optimizer.betas: {o.betas} must be two numbers in [0, 1), "
                        "e.g. [0.9, 0.95]")
    if o.embedding_lr_scale <= 0:
        problems.append(f"train.optimizer.embedding_lr_scale: {o.embedding_lr_scale} must be "
                        "positive")
    s = t.schedule
    if s.warmup < 0:
        problems.append(f"train.schedule.warmup: {s.warmup} must be 0 or more (a fraction "
                        "below 1, or steps)")
    if s.decay < 0:
        problems.append(f"train.schedule.decay: {s.decay} must be 0 or more")
    if not (0 <= s.min_lr_ratio <= 1):
        problems.append(f"train.schedule.min_lr_ratio: {s.min_lr_ratio} must be in [0, 1]")
    if s.warmup < 1 and s.name == "wsd" and s.decay < 1 and s.warmup + s.decay > 1:
        problems.append(f"train.schedule: warmup {s.warmup} + decay {s.decay} exceed the run")
    c = t.checkpoint
    if c.every_steps is not None and c.every_steps <= 0:
        problems.append(f"train.checkpoint.every_steps: {c.every_steps} must be positive or null")
    if c.keep < 1:
        problems.append(f"train.checkpoint.keep: {c.keep} must be at least 1")
    if t.grad_clip is not None and t.grad_clip <= 0:
        problems.append(f"train.grad_clip: {t.grad_clip} must be positive or null")
    if t.log_every_steps <= 0:
        problems.append(f"train.log_every_steps: {t.log_every_steps} must be positive")
    if t.max_bad_steps < 0:
        problems.append(f"train.max_bad_steps: {t.max_bad_steps} must be 0 or more")
    for i, pattern in enumerate(t.freeze):
        try:
            re.compile(pattern)
        except re.error as err:
            problems.append(f"train.freeze[{i}]: {pattern!r} is not a regular expression ({err})")
    e = recipe.eval
    if e.every_steps is not None and e.every_steps <= 0:
        problems.append(f"eval.every_steps: {e.every_steps} must be positive or null")
    if e.max_forgetting_bpb is not None and e.max_forgetting_bpb < 0:
        problems.append(f"eval.max_forgetting_bpb: {e.max_forgetting_bpb} must be 0 or more")
    if e.batch_tokens < 1:
        problems.append(f"eval.batch_tokens: {e.batch_tokens} must be positive")
    if e.bootstrap_samples < 0:
        problems.append(f"eval.bootstrap_samples: {e.bootstrap_samples} must be 0 or more")
    if recipe.launch.num_processes < 1:
        problems.append(f"launch.num_processes: {recipe.launch.num_processes} must be at least 1")
    accelerate_config = recipe.launch.accelerate_config
    if accelerate_config is not None and not resolve_path(recipe, accelerate_config).is_file():
        problems.append(f"launch.accelerate_config: {accelerate_config!r} is not a file (looked "
                        f"for {resolve_path(recipe, accelerate_config)}); give an accelerate "
                        "config file (`accelerate config` writes one), relative to the recipe")


def to_plain(obj: Any) -> Any:
    """A dataclass tree as plain dicts and lists (for YAML/JSON)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, list):
        return [to_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    if isinstance(obj, Size):
        return int(obj)
    return obj


def save_recipe(recipe: Recipe, path: Path) -> None:
    """Write the resolved recipe as YAML, exactly as trained."""
    path.write_text(OmegaConf.to_yaml(OmegaConf.create(to_plain(recipe))))


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
