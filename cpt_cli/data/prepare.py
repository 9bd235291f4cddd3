"""Preparing a stage's data: tokenizer, sources (new, replay, inherited), held-out sets, plan.

    source -> tokenize (cache) -> hold out -> mixture plan -> pack -> loader

`prepare_data(recipe)` runs the first four steps and returns everything the trainer, `cpt mix
inspect` and `cpt data prepare` need. Held-out documents are the ones with the smallest document
hashes, so adding documents to a source does not reshuffle its holdout; a source already in the
lineage keeps its recorded held-out set so every stage is measured on the same text.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from transformers import PreTrainedTokenizerBase

from cpt_cli.config import Recipe, SourceConfig, build, model_location, resolve_path
from cpt_cli.data.cache import (
    DEFAULT_POOL_TOKENS,
    TokenizedSource,
    default_cache_dir,
    prepare_source,
)
from cpt_cli.data.mixture import MixturePlan, PlanSource, make_plan
from cpt_cli.data.packing import BestFitStream, ConcatStream
from cpt_cli.data.sources import fingerprint_source, read_documents
from cpt_cli.data.tokenization import load_tokenizer, tokenizer_fingerprint, train_tokenizer
from cpt_cli.errors import RecipeError, UsageError
from cpt_cli.runs.lineage import DomainText, Lineage, read_heldout, read_lineage


@dataclass(frozen=True)
class SourceProgress:
    """Where tokenizing one source stands: sent per batch, then once with `done` and the
    source's true totals (a cache hit sends only that one, with `cached`)."""

    source: str
    documents: int
    tokens: int
    bytes_read: int = 0
    bytes_total: int = 0
    """Size of the source's local files; 0 where unknown (a Hub dataset)."""
    done: bool = False
    cached: bool = False
    skipped: dict[str, int] = field(default_factory=dict)
    """Records skipped (`on_error: skip`, empty, shorter than min_chars) by reason."""
    first_skipped: dict[str, str] = field(default_factory=dict)
    """Where each reason first skipped a record (`file:line`)."""

    def skipped_line(self) -> str | None:
        """One line naming what was skipped and where it started, or None."""
        if not self.skipped:
            return None
        parts = [f"{n:,} {reason}" + (f" (first at {self.first_skipped[reason]})"
                                      if reason in self.first_skipped else "")
                 for reason, n in sorted(self.skipped.items(), key=lambda kv: -kv[1])]
        total = sum(self.skipped.values())
        return (f"source {self.source!r} skipped {total:,} record{'s' * (total != 1)}: "
                + "; ".join(parts))


Progress = Callable[[SourceProgress], None]


@dataclass
class Domain:
    """A source of this stage, as trained on (maybe) and evaluated (always)."""

    name: str
    role: str                        # "new" or "replay"
    config: SourceConfig
    base_dir: str
    inherited: bool = False
    entry: TokenizedSource | None = None
    train_docs: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    heldout: list[dict[str, Any]] = field(default_factory=list)  # {"text", "hash"}
    heldout_recorded: bool = False   # taken from the lineage rather than carved now
    heldout_tokens: int = 0          # tokens of the held-out documents kept (after dedup)
    dropped_duplicates: int = 0

    @property
    def eval_role(self) -> str:
        return "target" if self.role == "new" else "retained"

    def heldout_summary(self) -> dict[str, Any]:
        return {"file": f"heldout/{self.name}.jsonl", "documents": len(self.heldout),
                "bytes": int(sum(len(d["text"].encode("utf-8")) for d in self.heldout)),
                "tokens": self.heldout_tokens, "dropped_duplicates": self.dropped_duplicates,
                "recorded": self.heldout_recorded}


@dataclass
class PreparedData:
    tokenizer: PreTrainedTokenizerBase
    tokenizer_fp: str
    domains: list[Domain]
    eval_domains: list[DomainText]
    lineage: Lineage | None
    cache_dir: Path
    warnings: list[str] = field(default_factory=list)
    plan: MixturePlan | None = None
    streams: list[Any] = field(default_factory=list)
    steps: int = 0
    global_batch: int = 0


def cache_dir_for(recipe: Recipe) -> Path:
    return resolve_path(recipe, recipe.data.cache_dir) if recipe.data.cache_dir else \
        default_cache_dir()


def _lineage_source_config(raw: dict[str, Any], name: str) -> SourceConfig:
    problems: list[str] = []
    cfg = build(SourceConfig, raw, f"lineage source {name}", problems)
    if problems:
        raise UsageError(f"the lineage's source {name!r} cannot be read again:", problems)
    return cfg


def resolve_domains(recipe: Recipe, lineage: Lineage | None) -> list[Domain]:
    base = recipe.base_dir
    domains = [Domain(s.name, "new", s, base) for s in recipe.data.sources]
    domains += [Domain(s.name, "replay", s, base) for s in recipe.data.replay.sources]
    if lineage is not None and recipe.data.replay.inherit and recipe.data.replay.ratio > 0:
        named = {d.name for d in domains}
        for src in lineage.sources:
            if src.name not in named:
                cfg = _lineage_source_config(src.config, src.name)
                domains.append(Domain(src.name, "replay", dataclasses.replace(cfg, weight=1.0),
                                      src.base_dir, inherited=True))
    return domains


def resolve_tokenizer(recipe: Recipe, cache_dir: Path) -> PreTrainedTokenizerBase:
    m = recipe.model
    if m.tokenizer is not None:
        local = resolve_path(recipe, m.tokenizer)
        return load_tokenizer(str(local) if local.exists() else m.tokenizer, revision=m.revision,
                              trust_remote_code=m.trust_remote_code)
    if m.train_tokenizer is not None:
        fps = [fingerprint_source(s, recipe.base_dir, cache_dir) for s in recipe.data.sources]

        def texts() -> Any:
            # Round-robin over sources so a character budget samples every domain.
            iters = [read_documents(s, recipe.base_dir) for s in recipe.data.sources]
            while iters:
                for it in list(iters):
                    text = next(it, None)
                    if text is None:
                        iters.remove(it)
                    else:
                        yield text

        return train_tokenizer(texts(), m.train_tokenizer, cache_dir,
                               hashlib.sha256("|".join(fps).encode()).hexdigest())
    location = model_location(recipe)
    assert location is not None
    return load_tokenizer(location, revision=m.revision, trust_remote_code=m.trust_remote_code,
                          key="model.path")


def _carve_holdout(domain: Domain, budget: int) -> np.ndarray:
    """Indices of held-out documents: smallest hashes first, until `budget` tokens."""
    assert domain.entry is not None
    chosen: list[dict[str, Any]] = []
    total = 0
    for doc in domain.entry.pool():
        if total >= budget:
            break
        chosen.append(doc)
        total += doc["tokens"]
    domain.heldout = [{"text": d["text"], "hash": d["hash"], "tokens": d["tokens"]}
                      for d in chosen]
    return np.asarray([d["index"] for d in chosen], dtype=np.int64)


def _count_tokens(tokenizer: PreTrainedTokenizerBase, docs: list[dict[str, Any]]) -> None:
    """Fill in "tokens" of held-out documents recorded by an earlier stage (maybe with another
    tokenizer, maybe before cpt recorded counts): the cache's own encoding, so counts agree."""
    missing = [d for d in docs if "tokens" not in d]
    if missing:
        encodings = tokenizer.backend_tokenizer.encode_batch_fast(
            [d["text"] for d in missing], add_special_tokens=False)
        for d, e in zip(missing, encodings, strict=True):
            d["tokens"] = len(e.ids)


def _lineage_trained_hashes(lineage: Lineage, skip: set[str], tokenizer: PreTrainedTokenizerBase,
                            tok_fp: str, cache_dir: Path, warnings: list[str]) -> np.ndarray:
    """Document hashes of lineage sources not trained in this stage (no inherit, or ratio 0), and
    of definitions a later stage replaced under the same name: a new held-out document that an
    earlier stage trained on must not be scored either. Reads the cache (usually filled by the
    earlier stage); a source that cannot be read any more is reported, not fatal, since this
    stage does not train on it."""
    found: list[np.ndarray] = []
    for src in [s for s in lineage.sources if s.name not in skip] + lineage.earlier_definitions:
        try:
            cfg = _lineage_source_config(src.config, src.name)
            entry = prepare_source(cfg, src.base_dir, tokenizer, tok_fp, cache_dir)
        except UsageError as err:
            warnings.append(f"lineage source {src.name!r} could not be read to check held-out "
                            f"documents against it ({str(err).splitlines()[0]})")
            continue
        recorded = np.asarray([h["hash"] for h in read_heldout(src.heldout_file)],
                              dtype=np.uint64)
        found.append(entry.hashes[~np.isin(entry.hashes, recorded)])
    return np.concatenate(found) if found else np.zeros(0, dtype=np.uint64)


def prepare_data(recipe: Recipe, *, progress: Progress | None = None,
                 lineage: Lineage | None = None) -> PreparedData:
    """Tokenize every source, carve or reload held-out sets, and drop held-out duplicates."""
    # Imported here: modeling imports this module. The model is checked first so that a missing
    # or wrong model.path is reported as such, not as a tokenizer that failed to load.
    from cpt_cli.model import check_model_path

    model_problems = check_model_path(recipe)
    if model_problems:
        raise RecipeError("the recipe's model cannot be used:", model_problems)
    cache_dir = cache_dir_for(recipe)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        key = "data.cache_dir" if recipe.data.cache_dir else "$CPT_CACHE"
        reason = "it is a file" if cache_dir.is_file() else err.strerror or str(err)
        raise UsageError(f"{key}: cannot use {cache_dir} as the tokenization cache ({reason}); "
                         f"point {key} at a writable folder") from None
    if lineage is None and recipe.model.path is not None:
        location = model_location(recipe)
        lineage = read_lineage(location) if location and Path(location).is_dir() else None
    tokenizer = resolve_tokenizer(recipe, cache_dir)
    tok_fp = tokenizer_fingerprint(tokenizer)
    domains = resolve_domains(recipe, lineage)
    recorded = {s.name: s for s in lineage.sources} if lineage else {}
    budget = int(recipe.data.holdout.tokens)

    problems: list[str] = []
    warnings: list[str] = []
    for d in domains:
        tokenized = False

        def report(docs: int, tokens: int, stats: Any, name: str = d.name) -> None:
            nonlocal tokenized
            tokenized = True
            if progress is not None:
                progress(SourceProgress(name, docs, tokens, stats.bytes_read, stats.bytes_total))

        d.entry = prepare_source(d.config, d.base_dir, tokenizer, tok_fp, cache_dir,
                                 pool_tokens=max(budget, DEFAULT_POOL_TOKENS), progress=report)
        entry = d.entry
        if progress is not None:
            progress(SourceProgress(d.name, entry.num_documents, entry.num_tokens, done=True,
                                    cached=not tokenized, skipped=dict(entry.meta["skipped"]),
                                    first_skipped=dict(entry.meta.get("first_skipped", {}))))
        all_docs = np.arange(entry.num_documents, dtype=np.int64)
        too_large = False  # reported once: an empty training set follows from it
        if d.name in recorded:
            d.heldout = read_heldout(recorded[d.name].heldout_file)
            _count_tokens(tokenizer, d.heldout)
            d.heldout_recorded = True
            held = np.isin(entry.hashes, np.asarray([h["hash"] for h in d.heldout],
                                                    dtype=np.uint64))
            d.train_docs = all_docs[~held]
            if not held.any() and d.heldout:
                warnings.append(
                    f"source {d.name!r} is named like the lineage's domain but holds none of its "
                    f"held-out documents: it is scored on that domain's held-out text. If it is "
                    f"other data, give it a name of its own.")
        else:
            held_idx = _carve_holdout(d, budget)
            held_tokens = int(entry.lengths()[held_idx].sum()) if len(held_idx) else 0
            if held_tokens > recipe.data.holdout.max_fraction * entry.num_tokens:
                too_large = True
                problems.append(
                    f"source {d.name!r}: the holdout ({held_tokens:,} tokens) is more than "
                    f"{recipe.data.holdout.max_fraction:.0%} of the source ({entry.num_tokens:,} "
                    f"tokens). Lower data.holdout.tokens (now {budget:,}) or add data.")
            d.train_docs = np.setdiff1d(all_docs, held_idx)
        if len(d.train_docs) == 0 and not too_large:
            problems.append(f"source {d.name!r}: no documents left for training after the "
                            "holdout; lower data.holdout.tokens or add data.")
        buffer = recipe.data.replay.buffer_tokens
        if d.role == "replay" and buffer is not None and len(d.train_docs):
            rng = np.random.default_rng(recipe.seed)
            order = rng.permutation(d.train_docs)
            cum = np.cumsum(entry.lengths()[order] + 1)
            d.train_docs = np.sort(order[:int(np.searchsorted(cum, buffer)) + 1])
    if problems:
        raise RecipeError("the data does not fit the recipe:", problems)

    # A held-out document that is also trained on (in any source) would measure memorization.
    trained = np.concatenate([d.entry.hashes[d.train_docs] for d in domains if d.entry is not None]
                             or [np.zeros(0, dtype=np.uint64)])
    if lineage is not None:
        trained = np.concatenate([trained, _lineage_trained_hashes(
            lineage, {d.name for d in domains}, tokenizer, tok_fp, cache_dir, warnings)])
    for d in domains:
        held = np.asarray([h["hash"] for h in d.heldout], dtype=np.uint64)
        duplicate = np.isin(held, trained)
        d.heldout = [h for h, dup in zip(d.heldout, duplicate, strict=True) if not dup]
        d.dropped_duplicates = int(duplicate.sum())
        d.heldout_tokens = int(sum(h["tokens"] for h in d.heldout))

    eval_domains = [DomainText(d.name, d.eval_role, [h["text"] for h in d.heldout])
                    for d in domains]
    names = {d.name for d in domains}
    for src in recorded.values():
        if src.name not in names:  # an earlier domain not replayed now: still evaluated
            texts = [h["text"] for h in read_heldout(src.heldout_file)
                     if not np.isin(np.uint64(h["hash"]), trained)]
            eval_domains.append(DomainText(src.name, "retained", texts))
    # A domain whose every held-out document is trained on in this stage: scoring it would
    # measure memorization, and an empty set has no figure at all.
    warnings += [f"domain {d.name!r}: every held-out document is also in this stage's training "
                 "data, so it is not scored (no forgetting figure). Remove those documents from "
                 "the new sources to keep measuring it." for d in eval_domains if not d.texts]
    eval_domains = [d for d in eval_domains if d.texts]
    return PreparedData(tokenizer=tokenizer, tokenizer_fp=tok_fp, domains=domains,
                        eval_domains=eval_domains, lineage=lineage, cache_dir=cache_dir,
                        warnings=warnings)


def batch_geometry(recipe: Recipe, num_processes: int) -> tuple[int, int, int]:
    """(global batch in sequences, gradient accumulation, steps) for this recipe."""
    t, L = recipe.train, recipe.data.seq_len
    # Sizes are decimal (1M = 1,000,000), so a token batch is rarely a multiple of seq_len: it is
    # rounded to whole sequences, and `cpt mix inspect` shows the exact figure.
    global_batch = t.global_batch_size if t.global_batch_size is not None else \
        max(1, round(int(t.global_batch_tokens or 0) / L))
    per_step = t.micro_batch_size * num_processes
    if global_batch % per_step:
        raise RecipeError(
            f"train: the global batch of {global_batch} sequences is not a multiple of "
            f"micro_batch_size ({t.micro_batch_size}) x processes ({num_processes}). Pick a "
            f"global batch that is a multiple of {per_step}, or change micro_batch_size.")
    steps = t.steps if t.steps is not None else max(1, int(t.tokens or 0) // (global_batch * L))
    return global_batch, global_batch // per_step, steps


def plan_data(recipe: Recipe, data: PreparedData, num_processes: int = 1) -> PreparedData:
    """Build the packed streams and the mixture plan for the recipe's token budget."""
    global_batch, _, steps = batch_geometry(recipe, num_processes)
    L = recipe.data.seq_len
    eos = data.tokenizer.eos_token_id
    pad = data.tokenizer.pad_token_id if data.tokenizer.pad_token_id is not None else eos
    streams: list[Any] = []
    rows: list[PlanSource] = []
    for d in data.domains:
        assert d.entry is not None
        if recipe.data.packing == "best_fit":
            stream: Any = BestFitStream(d.name, d.entry.tokens, d.entry.offsets, d.train_docs,
                                        eos, pad, L, recipe.seed)
        else:
            stream = ConcatStream(d.name, d.entry.tokens, d.entry.offsets, d.train_docs, eos, L,
                                  recipe.seed)
        streams.append(stream)
        lengths = d.entry.lengths()
        # What this source trains on, exactly: the cache entry and the documents taken from it.
        content = hashlib.sha256(d.entry.key.encode() + d.train_docs.tobytes()).hexdigest()[:16]
        rows.append(PlanSource(name=d.name, role=d.role, weight=d.config.weight,
                               documents=len(d.train_docs),
                               tokens_available=int((lengths[d.train_docs] + 1).sum()),
                               holdout_tokens=d.heldout_tokens, inherited=d.inherited,
                               content=content))
    limits = [d.config.max_epochs if d.config.max_epochs is not None else recipe.data.max_epochs
              for d in data.domains]
    data.plan = make_plan(rows, [s.sequences_per_epoch for s in streams], steps * global_batch,
                          recipe.data.replay.ratio, L, recipe.seed, limits,
                          packing=recipe.data.packing, global_batch=global_batch)
    data.plan.warnings[:0] = data.warnings
    data.streams, data.steps, data.global_batch = streams, steps, global_batch
    return data
