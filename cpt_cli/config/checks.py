"""The checks across fields that types alone cannot express, one function per recipe section.

`load.py` builds the typed Recipe first (every type problem collected), then calls
`check_semantics`; each check appends a message naming the key, the value and what is accepted,
so the user sees every problem of the recipe in one error.
"""

from __future__ import annotations

import re
import string

from cpt_cli.config.mixschedule import check_mix_schedules, peak, run_geometry
from cpt_cli.config.paths import resolve_path
from cpt_cli.config.schema import (
    DataConfig,
    EvalConfig,
    LaunchConfig,
    ModelConfig,
    OptimizerConfig,
    Recipe,
    ReplayConfig,
    ScheduleConfig,
    SourceConfig,
    TrainConfig,
)

# Run and source names become folder and file names (runs/<name>, heldout/<name>.jsonl).
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def check_semantics(recipe: Recipe, problems: list[str]) -> None:
    """Checks across fields that types alone cannot express."""
    if not _NAME.fullmatch(recipe.name):
        problems.append(f"name: {recipe.name!r} must be letters, digits, '.', '_' or '-' "
                        "(it becomes a folder name)")
    check_model(recipe.model, problems)
    check_data(recipe.data, problems)
    if not 0 <= recipe.seed < 2**32:  # numpy's seeds are 32-bit
        problems.append(f"seed: {recipe.seed} must be between 0 and {2**32 - 1}")
    check_train(recipe.train, recipe.data.seq_len, problems)
    check_eval(recipe.eval, problems)
    check_launch(recipe, recipe.launch, problems)
    check_mix_schedules(recipe, problems)
    check_replay_control(recipe, problems)


def check_model(m: ModelConfig, problems: list[str]) -> None:
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


def check_data(d: DataConfig, problems: list[str]) -> None:
    if d.seq_len < 2:
        problems.append(f"data.seq_len: {d.seq_len} must be at least 2")
    if not d.sources:
        problems.append("data.sources: list at least one source (the new data of this stage)")
    seen: dict[str, str] = {}  # a source name -> the key that first used it
    for group, sources in [("data.sources", d.sources), ("data.replay.sources",
                                                          d.replay.sources)]:
        for i, src in enumerate(sources):
            key = f"{group}[{i}]"
            if src.name in seen:
                problems.append(f"{key}.name: {src.name!r} is used twice (also at "
                                f"{seen[src.name]}); source names must be unique")
            else:
                seen[src.name] = key
            check_source(key, src, problems)
    check_replay(d.replay, problems)
    if d.holdout.tokens <= 0:
        # Without held-out text every bits-per-byte figure would be 0/0: nothing measured.
        problems.append(f"data.holdout.tokens: {d.holdout.tokens} must be positive; the "
                        "held-out set is how forgetting is measured (e.g. 100k)")
    if not (0 < d.holdout.max_fraction < 1):
        problems.append(f"data.holdout.max_fraction: {d.holdout.max_fraction} must be between "
                        "0 and 1")
    if d.max_epochs <= 0:
        problems.append(f"data.max_epochs: {d.max_epochs} must be positive")


def check_source(key: str, src: SourceConfig, problems: list[str]) -> None:
    """One entry of data.sources or data.replay.sources, `key` naming it (`data.sources[0]`)."""
    if not _NAME.fullmatch(src.name):
        problems.append(f"{key}.name: {src.name!r} must be letters, digits, '.', '_' or '-'")
    if (src.path is None) == (src.hf is None):
        problems.append(f"{key}: set exactly one of path (local files) and hf (a "
                        "Hugging Face dataset)")
    elif isinstance(src.path, list) and not src.path:
        problems.append(f"{key}.path: an empty list; give at least one file or glob")
    if not isinstance(src.weight, dict) and not (0 < src.weight < float("inf")):
        problems.append(f"{key}.weight: {src.weight} must be a positive number")
    if src.max_epochs is not None and src.max_epochs <= 0:
        problems.append(f"{key}.max_epochs: {src.max_epochs} must be positive")
    if src.min_chars < 0:
        problems.append(f"{key}.min_chars: {src.min_chars} must be 0 or more")
    if src.max_chars < max(src.min_chars, 1):
        problems.append(f"{key}.max_chars: {src.max_chars} must be at least min_chars "
                        f"({src.min_chars}) and 1; e.g. 10M")
    if src.template is not None:
        check_template(f"{key}.template", src.template, problems)
    check_record_format(key, src, problems)
    if src.hf is not None and src.hf.streaming and src.hf.max_documents is None:
        problems.append(f"{key}.hf.max_documents: required with streaming: true, so the "
                        "cache stays bounded (e.g. 200000)")


# Which loss_on each format can train, and the format each loss_on needs.
_LOSS_ON_FORMAT = {"completion": "prompt_completion", "assistant": "chat"}


def check_record_format(key: str, src: SourceConfig, problems: list[str]) -> None:
    """format, loss_on, the field names and chat_template of one source, together: every
    combination that cannot work is named (each with its fix), all at once."""
    needed = _LOSS_ON_FORMAT.get(src.loss_on)
    if needed is not None and src.format != needed:
        other = {"prompt_completion": "completion", "chat": "assistant"}.get(src.format)
        fix = f"use loss_on: {other} (or all)" if other else "or loss_on: all"
        problems.append(f"{key}.loss_on: {src.loss_on!r} trains the "
                        f"{'completions' if needed == 'prompt_completion' else 'assistant turns'}"
                        f" of {needed} records, but this source's format is {src.format!r}; set "
                        f"format: {needed}, {fix}")
    if src.format == "chat" and src.template is not None:
        problems.append(f"{key}.template: chat records are rendered by a chat template, not a "
                        "format string; move it to chat_template (Jinja), or use format: text")
    if src.format != "chat" and src.chat_template is not None:
        problems.append(f"{key}.chat_template: only chat records use a chat template, and this "
                        f"source's format is {src.format!r}; set format: chat or remove it")
    if src.format == "chat" and src.chat_template is not None:
        check_chat_template(f"{key}.chat_template", src.chat_template, problems)
    if src.format == "prompt_completion" and src.template is not None:
        fields = template_fields(src.template)
        placeholder = "{" + src.completion_field + "}"
        if fields is not None and fields.count(src.completion_field) != 1:
            problems.append(f"{key}.template: a prompt_completion template holds the completion "
                            f"field {placeholder} exactly once, at the start of the completion "
                            f"(it has it {fields.count(src.completion_field)} times); e.g. "
                            f"'Question: {{question}}\\nAnswer: {placeholder}', or set "
                            "completion_field")
    for name in ("prompt_field", "completion_field", "messages_field"):
        if not getattr(src, name).strip():
            problems.append(f"{key}.{name}: an empty field name; name the record's field")


def check_chat_template(key: str, template: str, problems: list[str]) -> None:
    """A chat template that Jinja cannot parse is a recipe problem, found before any data."""
    import jinja2

    # transformers renders with the loop-control extension and a {% generation %} block tag
    # of its own (assistant masks): both are accepted here, as they are when rendering.
    plain = re.sub(r"\{%-?\s*(end)?generation\s*-?%\}", "", template)
    try:
        jinja2.Environment(extensions=["jinja2.ext.loopcontrols"]).parse(plain)
    except jinja2.TemplateSyntaxError as err:
        problems.append(f"{key}: not a valid Jinja template ({err.message}, line {err.lineno})")


def template_fields(template: str) -> list[str] | None:
    """The placeholders of a format string in order, or None when it does not parse."""
    try:
        return [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError:
        return None


def check_template(key: str, template: str, problems: list[str]) -> None:
    """A source's template: a format string with named placeholders only."""
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as err:
        problems.append(f"{key}: {template!r} is not a valid format string ({err}); use "
                        "{field} placeholders")
        return
    if not fields:
        problems.append(f"{key}: {template!r} has no {{field}} placeholder")
    elif any(f == "" or f.isdigit() for f in fields):
        problems.append(f"{key}: use named placeholders like {{question}}, not {{}} or {{0}}")
    elif any("." in f or "[" in f for f in fields):
        # {a.__class__} would reach into Python objects: only plain names.
        bad = next(f for f in fields if "." in f or "[" in f)
        problems.append(f"{key}: {{{bad}}} is not a plain field name; attribute and index "
                        "access are not supported, use {field}")


def check_replay(r: ReplayConfig, problems: list[str]) -> None:
    # Under auto the share reaches at most `max` (its bounds are checked by check_replay_control).
    ratio = r.max if r.is_auto else peak(r.ratio)  # a schedule's values: check_mix_schedules
    if not r.is_auto and not isinstance(r.ratio, dict) and not (0.0 <= ratio < 1.0):  # NaN too
        problems.append(f"data.replay.ratio: {r.ratio} must be at least 0 and below 1 (a stage "
                        "needs some new data); e.g. 0.25")
    if r.sources and ratio == 0.0:
        problems.append("data.replay.ratio: replay sources are listed but ratio is 0; set e.g. "
                        "data.replay.ratio=0.25 or remove data.replay.sources")
    if ratio > 0 and not r.sources and not r.inherit and not r.is_auto:  # auto: its own message
        problems.append("data.replay: ratio > 0 needs replay sources: list data.replay.sources "
                        "or set inherit: true with a cpt run as model.path")
    if r.buffer_tokens is not None and r.buffer_tokens <= 0:
        problems.append(f"data.replay.buffer_tokens: {r.buffer_tokens} must be positive")


def check_train(t: TrainConfig, seq_len: int, problems: list[str]) -> None:
    """train.*, with data.seq_len because a global batch is at least one sequence."""
    if (t.tokens is None) == (t.steps is None):
        problems.append("train: set exactly one of train.tokens (e.g. 2B) and train.steps")
    if t.tokens is not None and t.tokens <= 0:
        problems.append(f"train.tokens: {t.tokens} must be positive")
    if t.steps is not None and t.steps <= 0:
        problems.append(f"train.steps: {t.steps} must be positive")
    if (t.global_batch_tokens is None) == (t.global_batch_size is None):
        problems.append("train: set exactly one of train.global_batch_tokens (e.g. 1M) and "
                        "train.global_batch_size (sequences)")
    # A seq_len below 2 is reported under data.seq_len: comparing against it would only repeat.
    if t.global_batch_tokens is not None and seq_len >= 2 and t.global_batch_tokens < seq_len:
        problems.append(f"train.global_batch_tokens: {t.global_batch_tokens} is less than one "
                        f"sequence of data.seq_len ({seq_len}) tokens; use at least {seq_len}")
    if t.global_batch_size is not None and t.global_batch_size <= 0:
        problems.append(f"train.global_batch_size: {t.global_batch_size} must be positive")
    if t.micro_batch_size <= 0:
        problems.append(f"train.micro_batch_size: {t.micro_batch_size} must be positive")
    check_optimizer(t.optimizer, problems)
    check_schedule(t.schedule, problems)
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


def check_optimizer(o: OptimizerConfig, problems: list[str]) -> None:
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


def check_schedule(s: ScheduleConfig, problems: list[str]) -> None:
    if s.warmup < 0:
        problems.append(f"train.schedule.warmup: {s.warmup} must be 0 or more (a fraction "
                        "below 1, or steps)")
    if s.decay < 0:
        problems.append(f"train.schedule.decay: {s.decay} must be 0 or more")
    if not (0 <= s.min_lr_ratio <= 1):
        problems.append(f"train.schedule.min_lr_ratio: {s.min_lr_ratio} must be in [0, 1]")
    if s.warmup < 1 and s.name == "wsd" and s.decay < 1 and s.warmup + s.decay > 1:
        problems.append(f"train.schedule: warmup {s.warmup} + decay {s.decay} exceed the run")


def check_eval(e: EvalConfig, problems: list[str]) -> None:
    if e.every_steps is not None and e.every_steps <= 0:
        problems.append(f"eval.every_steps: {e.every_steps} must be positive or null")
    if e.max_forgetting_bpb is not None and e.max_forgetting_bpb < 0:
        problems.append(f"eval.max_forgetting_bpb: {e.max_forgetting_bpb} must be 0 or more")
    if e.batch_tokens < 1:
        problems.append(f"eval.batch_tokens: {e.batch_tokens} must be positive")
    if e.bootstrap_samples < 0:
        problems.append(f"eval.bootstrap_samples: {e.bootstrap_samples} must be 0 or more")


def check_launch(recipe: Recipe, launch: LaunchConfig, problems: list[str]) -> None:
    """launch.*, with the recipe because accelerate_config is relative to its folder."""
    if launch.num_processes < 1:
        problems.append(f"launch.num_processes: {launch.num_processes} must be at least 1")
    config = launch.accelerate_config
    if config is not None and not resolve_path(recipe, config).is_file():
        problems.append(f"launch.accelerate_config: {config!r} is not a file (looked for "
                        f"{resolve_path(recipe, config)}); give an accelerate config file "
                        "(`accelerate config` writes one), relative to the recipe")


# The keys read only under `ratio: auto`; set without it they would do nothing, silently.
_AUTO_ONLY = ("max_forgetting_bpb", "min", "max", "start")


def check_replay_control(recipe: Recipe, problems: list[str]) -> None:
    """`data.replay.ratio: auto` and its settings: a budget, bounds within [0, 1) in order, a
    start between them, a retained domain to replay, and evaluations during the run to steer by
    (every problem named at once, as the rest of the recipe's)."""
    r = recipe.data.replay
    if not r.is_auto:
        defaults = ReplayConfig()
        for key in _AUTO_ONLY:
            if getattr(r, key) != getattr(defaults, key):
                problems.append(f"data.replay.{key}: {getattr(r, key)} is read only with "
                                "data.replay.ratio: auto; remove it, or set ratio: auto"
                                + (" (to stop a run whose forgetting exceeds a limit, use "
                                   "eval.max_forgetting_bpb)" if key == "max_forgetting_bpb"
                                   else ""))
        return
    budget = r.max_forgetting_bpb
    if budget is None:
        problems.append("data.replay.max_forgetting_bpb: required with data.replay.ratio: auto "
                        "(the budget the controller holds: the largest rise in bits per byte "
                        "a retained domain may show); e.g. 0.02")
    elif not budget > 0:
        problems.append(f"data.replay.max_forgetting_bpb: {budget} must be above 0 (bits per "
                        "byte); e.g. 0.02")
    bounds_ok = True
    for key in ("min", "max"):
        value = getattr(r, key)
        if not 0.0 <= value < 1.0:
            bounds_ok = False
            problems.append(f"data.replay.{key}: {value} must be at least 0 and below 1 (a "
                            "share of the training tokens; a stage needs some new data)")
    if bounds_ok and r.min > r.max:
        bounds_ok = False
        problems.append(f"data.replay.min: {r.min} is above data.replay.max ({r.max}); the "
                        "bounds are crossed, swap them")
    if bounds_ok and not r.min <= r.start <= r.max:
        problems.append(f"data.replay.start: {r.start} is outside [min, max] = [{r.min}, "
                        f"{r.max}]; start between the bounds, e.g. {(r.min + r.max) / 2:g}")
    if bounds_ok and r.min == 0 and not r.allow_drop:
        problems.append("data.replay.min: 0 lets the controller stop replay, which drops every "
                        "retained domain (how forgetting starts); set min above 0 (e.g. 0.05) "
                        "or data.replay.allow_drop: true")
    if not r.sources and not r.inherit:
        problems.append("data.replay.ratio: auto needs a retained domain to replay and measure: "
                        "list data.replay.sources, or set data.replay.inherit: true with a cpt "
                        "run as model.path")
    for i, src in enumerate(r.sources):
        if isinstance(src.weight, dict):
            problems.append(f"data.replay.sources[{i}].weight: a schedule, but under "
                            "data.replay.ratio: auto the controller sets the split of replay "
                            "among retained domains; give a number (its share before the first "
                            "evaluation)")
    every = recipe.eval.every_steps
    if every is None:
        problems.append("eval.every_steps: required with data.replay.ratio: auto (the "
                        "controller sets the replay share at each evaluation); e.g. 50")
    else:
        geometry = run_geometry(recipe)
        if geometry is not None and every > 0 and every >= geometry.steps:
            problems.append(f"eval.every_steps: {every} is not below the run's "
                            f"{geometry.steps} steps, so data.replay.ratio: auto would never "
                            f"act; evaluate more often, e.g. {max(1, geometry.steps // 10)}")
