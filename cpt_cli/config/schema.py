"""The recipe's schema: frozen, keyword-only dataclasses, one per recipe section, and `Size`.

    cpt train recipes/quickstart/cpt.yaml train.optimizer.lr=1e-4 data.seq_len=256

Defaults live here and only here: `load.py` turns YAML plus overrides into these classes and
`checks.py` checks what types alone cannot say. Every field carries a one-line docstring under
it; `docs/recipe.md` is generated from them (`python -m cpt_cli.docgen` reads this file with
`ast`), and a test fails when that file is stale. Values derived from the settings live beside
them as methods (`Recipe.batch_geometry`), as litgpt's `TrainArgs` keeps
`gradient_accumulation_iters`.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

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
    format: Literal["text", "prompt_completion", "chat"] = "text"
    """How a record becomes a document: `text` (text_field or template), `prompt_completion` (a prompt, then its completion), `chat` (a list of {role, content} messages rendered with a chat template)."""
    prompt_field: str = "prompt"
    """Record field holding the prompt (format: prompt_completion, without template)."""
    completion_field: str = "completion"
    """Record field holding the completion (format: prompt_completion); with a template, the text from its `{completion_field}` placeholder on is the completion."""
    messages_field: str = "messages"
    """Record field holding the list of {role, content} messages (format: chat)."""
    chat_template: str | None = None
    """Jinja chat template for chat records (default: the tokenizer's own), e.g. `{% for m in messages %}<|{{ m.role }}|>{{ m.content }}<|end|>{% endfor %}`."""
    loss_on: Literal["all", "completion", "assistant"] = "all"
    """Tokens trained and scored: `all` (pre-training), `completion` (prompt_completion: the completion only, scored on it given the prompt), `assistant` (chat: the assistant turns, end-of-turn tokens included)."""
    weight: float | dict[str, Any] = 1.0
    """Relative weight within its group (new sources, or replay sources): a number, or a schedule over the run, e.g. `{0%: 0.7, 80%: 0.7, 100%: 0.2}` (positions: `10%`, `0.8`, tokens `400M`, or wsd phases `warmup`/`stable`/`decay`; `interpolate: linear` or `step`; see docs/data.md)."""
    min_weight: float = 0.0
    """Floor under a scheduled weight: the source never falls below it."""
    allow_drop: bool = False
    """Allow a replay source's scheduled weight to reach 0 for the rest of the run (refused by default: dropping a learned domain is how forgetting starts)."""
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

    ratio: float | dict[str, Any] | Literal["auto"] = 0.0
    """Share of the training tokens drawn from replay sources (0 <= ratio < 1): a number, a schedule like a source's weight, or `auto`: set at every evaluation to keep forgetting within max_forgetting_bpb (see docs/replay-control.md)."""
    max_forgetting_bpb: float | None = None
    """ratio: auto only: the forgetting budget, the largest rise in bits per byte over the start model that any retained domain may show (judged on the point estimate of delta_bpb, as eval.max_forgetting_bpb is); e.g. 0.02."""
    min: float = 0.05
    """ratio: auto only: the lowest replay share the controller may choose (0.05: Ibrahim et al. 2024's ratio for a weak shift; 0 needs allow_drop: true)."""
    max: float = 0.5
    """ratio: auto only: the highest replay share the controller may choose (below 1: a stage needs some new data)."""
    start: float = 0.25
    """ratio: auto only: the share before the first evaluation (0.25: Ibrahim et al. 2024's ratio for a strong shift); within [min, max]."""
    allow_drop: bool = False
    """Allow a ratio schedule that reaches 0 for the rest of the run."""
    inherit: bool = True
    """When model.path is a cpt run: replay every source of its lineage too (weight 1 each)."""
    sources: list[SourceConfig] = field(default_factory=list)
    """Replay sources named here; one named like an inherited source replaces it."""
    buffer_tokens: Size | None = None
    """Draw a fixed, deterministic pool of this many tokens per replay source and cycle it."""

    @property
    def is_auto(self) -> bool:
        """Whether the replay share is steered by the forgetting budget (`ratio: auto`)."""
        return isinstance(self.ratio, str)

    def starting_ratio(self) -> float | dict[str, Any]:
        """The ratio the plan starts from: `start` under auto, else the ratio as written."""
        return self.start if self.is_auto else self.ratio  # type: ignore[return-value]


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

    def warmup_steps(self, total_steps: int) -> int:
        """Warmup in steps: a fraction of the run below 1, else a number of steps."""
        return int(round(self.warmup * total_steps)) if self.warmup < 1 else int(self.warmup)

    def decay_start(self, total_steps: int) -> int:
        """First step of the wsd cooldown (total_steps when there is none); mixture schedules
        tied to `stable`/`decay` use the same boundary."""
        if self.name != "wsd":
            return total_steps
        decay = int(round(self.decay * total_steps)) if self.decay < 1 else int(self.decay)
        return max(self.warmup_steps(total_steps), total_steps - decay)


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

    def batch_geometry(self, num_processes: int) -> BatchGeometry:
        """The global batch in sequences, the gradient accumulation and the steps of this recipe
        on `num_processes` processes; a RecipeError when the batch does not divide evenly."""
        t, seq_len = self.train, self.data.seq_len
        # Sizes are decimal (1M = 1,000,000), so a token batch is rarely a multiple of seq_len:
        # it is rounded to whole sequences, and `cpt mix inspect` shows the exact figure.
        global_batch = t.global_batch_size if t.global_batch_size is not None else \
            max(1, round(int(t.global_batch_tokens or 0) / seq_len))
        per_step = t.micro_batch_size * num_processes
        if global_batch % per_step:
            raise RecipeError(
                f"train: the global batch of {global_batch} sequences is not a multiple of "
                f"micro_batch_size ({t.micro_batch_size}) x processes ({num_processes}). Pick a "
                f"global batch that is a multiple of {per_step}, or change micro_batch_size.")
        steps = t.steps if t.steps is not None else \
            max(1, int(t.tokens or 0) // (global_batch * seq_len))
        return BatchGeometry(global_batch, global_batch // per_step, steps)


class BatchGeometry(NamedTuple):
    """How a recipe's batch is laid out over the processes (`Recipe.batch_geometry`)."""

    global_batch: int
    """Sequences per optimizer step, all processes together."""
    accumulation: int
    """Micro-batches each process accumulates per optimizer step."""
    steps: int
    """Optimizer steps of the run."""


def to_plain(obj: Any) -> Any:
    """A dataclass tree as plain dicts and lists (for YAML/JSON). It lives beside the schema,
    not in load.py, because `Recipe.to_dict` uses it and load.py imports this module."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, list):
        return [to_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    if isinstance(obj, Size):
        return int(obj)
    return obj

