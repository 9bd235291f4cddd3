"""What a resume does with each recipe key that changed since the checkpoint.

A resumed run's record must be the truth: `recipe.yaml` and the manifest say what was trained.
Each key of the schema therefore has one rule, and `tests/test_config.py` fails when a key has
none (a new key cannot be forgotten):

- `continue`: the change does not alter what is trained (where checkpoints go, how often the
  run evaluates, compiling); it takes effect and is recorded like any setting.
- `apply`: the change alters training from the checkpoint's step on (learning rate, schedule,
  clipping, precision); it is applied from that step and recorded as a revision
  (step, key, old, new) in the manifest and `metrics.jsonl`.
- `replan`: the mixture's future (a source's `weight` or `min_weight`, `data.replay.ratio`):
  refused unless `cpt train --resume ... --replan`, which keeps the steps already trained as they
  were, continues each source from its own read position and plans the rest on the new mixture
  (a plan revision, recorded in the manifest and `metrics.jsonl`).
- `refuse`: the change would make the steps already trained a different run (the data plan,
  the model, the seed); the resume stops, naming the key, both values and the way out.

docs/reliability.md's table is generated from RULES (`python -m cpt_cli.docgen`).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import typing
from typing import Any, Literal

from cpt_cli.config.schema import Recipe

Action = Literal["continue", "apply", "replan", "refuse"]

# The way out for a refused change, by the first matching pattern.
NEW_STAGE = ("start a new stage from the checkpoint instead (model.path: <run>/checkpoints/step-N "
             "or <run>/final, with train.optimizer.load_from_parent: true to keep the optimizer)")
_PLAN = "the data plan: sequence i of the steps already trained would be other text"
_MIX = "the mixture from the checkpoint's step on, with --replan (the past stays as trained)"

# key pattern -> (action, why). `*` in `sources.*` stands for one source, named in messages.
RULES: dict[str, tuple[Action, str]] = {
    "name": ("continue", "a label in reports; the run directory is chosen by output_dir"),
    "output_dir": ("continue", "where the run lives; the resume reads the checkpoint given"),
    "seed": ("refuse", "the data order and every process's random state"),
    "data.seq_len": ("refuse", _PLAN),
    "data.packing": ("refuse", _PLAN),
    "data.cross_document_attention": ("refuse", "what every trained sequence attended to"),
    "data.sources.*.name": ("refuse", _PLAN),
    "data.sources.*.path": ("refuse", _PLAN),
    "data.sources.*.hf.*": ("refuse", _PLAN),
    "data.sources.*.text_field": ("refuse", _PLAN),
    "data.sources.*.template": ("refuse", _PLAN),
    "data.sources.*.format": ("refuse", _PLAN),
    "data.sources.*.prompt_field": ("refuse", _PLAN),
    "data.sources.*.completion_field": ("refuse", _PLAN),
    "data.sources.*.messages_field": ("refuse", _PLAN),
    "data.sources.*.chat_template": ("refuse", _PLAN),
    "data.sources.*.loss_on": ("refuse", _PLAN),
    "data.sources.*.weight": ("replan", _MIX),
    "data.sources.*.min_weight": ("replan", _MIX),
    "data.sources.*.allow_drop": ("continue", "a permission the schedule is checked against"),
    "data.sources.*.min_chars": ("refuse", _PLAN),
    "data.sources.*.max_chars": ("refuse", _PLAN),
    "data.sources.*.max_epochs": ("continue", "a limit the plan is checked against, not the plan"),
    "data.sources.*.on_error": ("refuse", "which records are trained"),
    "data.sources": ("refuse", "the list of sources: " + _PLAN),
    "data.replay.ratio": ("replan", _MIX),
    "data.replay.inherit": ("refuse", _PLAN),
    "data.replay.allow_drop": ("continue", "a permission the schedule is checked against"),
    "data.replay.max_forgetting_bpb": ("apply", "the replay budget from the checkpoint's step on; "
                                                "decisions already made stay in the plan"),
    "data.replay.min": ("apply", "a bound of auto replay, from the checkpoint's step on"),
    "data.replay.max": ("apply", "a bound of auto replay, from the checkpoint's step on"),
    "data.replay.start": ("refuse", "the replay share before the first evaluation: " + _PLAN),
    "data.replay.sources.*.name": ("refuse", _PLAN),
    "data.replay.sources.*.path": ("refuse", _PLAN),
    "data.replay.sources.*.hf.*": ("refuse", _PLAN),
    "data.replay.sources.*.text_field": ("refuse", _PLAN),
    "data.replay.sources.*.template": ("refuse", _PLAN),
    "data.replay.sources.*.format": ("refuse", _PLAN),
    "data.replay.sources.*.prompt_field": ("refuse", _PLAN),
    "data.replay.sources.*.completion_field": ("refuse", _PLAN),
    "data.replay.sources.*.messages_field": ("refuse", _PLAN),
    "data.replay.sources.*.chat_template": ("refuse", _PLAN),
    "data.replay.sources.*.loss_on": ("refuse", _PLAN),
    "data.replay.sources.*.weight": ("replan", _MIX),
    "data.replay.sources.*.min_weight": ("replan", _MIX),
    "data.replay.sources.*.allow_drop": ("continue",
                                         "a permission the schedule is checked against"),
    "data.replay.sources.*.min_chars": ("refuse", _PLAN),
    "data.replay.sources.*.max_chars": ("refuse", _PLAN),
    "data.replay.sources.*.max_epochs": ("continue",
                                         "a limit the plan is checked against, not the plan"),
    "data.replay.sources.*.on_error": ("refuse", "which records are trained"),
    "data.replay.sources": ("refuse", "the list of replay sources: " + _PLAN),
    "data.replay.buffer_tokens": ("refuse", _PLAN),
    "data.holdout.tokens": ("refuse", "which documents are held out, so which are trained"),
    "data.holdout.max_fraction": ("refuse", "which documents are held out, so which are trained"),
    "data.max_epochs": ("continue", "a limit the plan is checked against, not the plan"),
    "data.cache_dir": ("continue", "where tokens are cached; the plan's fingerprint checks that "
                                   "they are the same tokens"),
    "model.path": ("refuse", "the weights the run started from, named in its lineage"),
    "model.init.config": ("refuse", "the architecture the checkpoint's weights belong to"),
    "model.tokenizer": ("refuse", "the token ids of every trained sequence"),
    "model.train_tokenizer.*": ("refuse", "the token ids of every trained sequence"),
    "model.revision": ("refuse", "the weights the run started from, named in its lineage"),
    "model.trust_remote_code": ("continue", "permission to run the model's code, not the model"),
    "model.attn_implementation": ("continue", "the same attention, computed another way"),
    "train.tokens": ("refuse", "the run's length: " + _PLAN),
    "train.steps": ("refuse", "the run's length: " + _PLAN),
    "train.global_batch_tokens": ("refuse", "the batch: " + _PLAN),
    "train.global_batch_size": ("refuse", "the batch: " + _PLAN),
    "train.micro_batch_size": ("apply", "memory per forward pass; the global batch stays, the "
                                        "accumulation changes"),
    "train.optimizer.lr": ("apply", "the peak learning rate, from the checkpoint's step on"),
    "train.optimizer.weight_decay": ("apply", "from the checkpoint's step on"),
    "train.optimizer.betas": ("apply", "from the checkpoint's step on"),
    "train.optimizer.eps": ("apply", "from the checkpoint's step on"),
    "train.optimizer.embedding_lr_scale": ("apply", "from the checkpoint's step on"),
    "train.optimizer.load_from_parent": ("continue", "read only when a run starts"),
    "train.schedule.*": ("apply", "the learning rate from the checkpoint's step on (the steps "
                                  "already trained keep theirs)"),
    "train.precision": ("apply", "numerics from the checkpoint's step on"),
    "train.grad_clip": ("apply", "from the checkpoint's step on"),
    "train.checkpoint.*": ("continue", "when and how many checkpoints are kept"),
    "train.compile": ("continue", "the same model, compiled or not"),
    "train.gradient_checkpointing": ("continue", "the same gradients, less memory"),
    "train.freeze": ("refuse", "which parameters the optimizer state belongs to"),
    "train.trackers": ("continue", "where metrics are also sent"),
    "train.log_every_steps": ("continue", "how often a line is printed"),
    "train.max_bad_steps": ("continue", "when a run with non-finite losses stops"),
    "eval.*": ("continue", "when and how the run is measured, not what it trains"),
    "launch.num_processes": ("refuse", "each process's random state is in the checkpoint"),
    "launch.accelerate_config": ("continue", "how processes are launched (their number is "
                                             "checked on its own)"),
}

# Internal fields, not recipe keys: the recipe's folder.
_NOT_KEYS = {"base_dir"}


def rule_for(key: str) -> tuple[Action, str]:
    """The rule of a dotted key (`data.sources.code.weight`: the source name stands for `*`)."""
    for pattern, rule in RULES.items():
        if fnmatch.fnmatchcase(key, pattern):
            return rule
    raise KeyError(key)


def schema_keys(cls: type = Recipe, prefix: str = "") -> list[str]:
    """Every leaf key of the schema, a list of sources written `sources.*`: what RULES must
    cover."""
    hints = typing.get_type_hints(cls)
    keys = []
    for f in dataclasses.fields(cls):
        if f.name in _NOT_KEYS:
            continue
        key = prefix + f.name
        inner = _dataclass_in(hints[f.name])
        if inner is None:
            keys.append(key)
        else:
            is_list = _is_list(hints[f.name])
            keys += schema_keys(inner, key + (".*." if is_list else "."))
    return keys


def _dataclass_in(hint: Any) -> type | None:
    for t in (hint, *typing.get_args(hint)):
        if dataclasses.is_dataclass(t):
            return t  # type: ignore[return-value]
        for inner in typing.get_args(t):
            if dataclasses.is_dataclass(inner):
                return inner  # type: ignore[return-value]
    return None


def _is_list(hint: Any) -> bool:
    return any(typing.get_origin(t) in (list, tuple) for t in (hint, *typing.get_args(hint)))


@dataclasses.dataclass(frozen=True)
class Change:
    key: str
    old: Any
    new: Any
    action: Action
    why: str

    def as_dict(self) -> dict[str, Any]:
        return {"key": self.key, "old": self.old, "new": self.new, "action": self.action}


def changes(old: dict[str, Any], new: dict[str, Any]) -> list[Change]:
    """Every key whose value differs between two plain recipes (`to_plain`), with its rule.
    Sources are compared by name: a source added, removed or reordered is a change of the list."""
    found: list[Change] = []
    for key, a, b in _diff(old, new, ""):
        action, why = rule_for(key)
        found.append(Change(key, a, b, action, why))
    return found


def _diff(a: Any, b: Any, key: str) -> list[tuple[str, Any, Any]]:
    if key.split(".")[-1] in _NOT_KEYS:
        return []
    if isinstance(a, dict) and isinstance(b, dict) and not _is_free_form(key):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _diff(a.get(k), b.get(k), f"{key}.{k}" if key else k)
        return out
    if key.endswith("sources") and isinstance(a, list) and isinstance(b, list):
        names_a = [s.get("name") for s in a if isinstance(s, dict)]
        names_b = [s.get("name") for s in b if isinstance(s, dict)]
        if names_a != names_b:
            return [(key, names_a, names_b)]
        out = []
        for sa, sb in zip(a, b, strict=True):
            out += _diff(sa, sb, f"{key}.{sa['name']}")
        return out
    return [] if a == b else [(key, a, b)]


def _is_free_form(key: str) -> bool:
    """A dict-valued key compared as one value (a model config)."""
    return key == "model.init.config"


def refusal(changed: list[Change], checkpoint: str, *, replan: bool = False,
            step: int | None = None) -> str | None:
    """One message naming every change the resume cannot follow (a mixture change counts
    unless `replan`), or None when the resume may go on."""
    refused = [c for c in changed if c.action == "refuse"]
    mixture = [c for c in changed if c.action == "replan"] if not replan else []
    if not refused and not mixture:
        return None
    lines = [f"cannot resume from {checkpoint}: the recipe changed since it was written:"]
    lines += [f"  {c.key}: {_shown(c.old)} -> {_shown(c.new)} ({c.why})"
              for c in refused + mixture]
    if refused:
        lines.append(f"Restore {'these keys' if len(refused) > 1 else 'this key'} to resume, or "
                     + NEW_STAGE + ".")
    if mixture:
        at = f" from step {step}" if step is not None else ""
        lines.append(f"The mixture changed: pass --replan to apply it{at} (the steps already "
                     "trained stay as they were; each source continues where it stopped "
                     "reading), or restore it.")
    return "\n".join(lines)


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def rules_table() -> str:
    """docs/reliability.md's table: every schema key and what a resume does with a change."""
    rows = ["| key | a changed value on resume | why |", "| --- | --- | --- |"]
    for key in schema_keys():
        action, why = rule_for(key)
        rows.append(f"| `{key}` | {action} | {why} |")
    return "\n".join(rows)
