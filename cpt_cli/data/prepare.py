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

from cpt_cli.config import (
    BatchGeometry,
    Recipe,
    SourceConfig,
    build,
    model_location,
    resolve_path,
)
from cpt_cli.config.mixschedule import peak
from cpt_cli.data.cache import (
    DEFAULT_POOL_TOKENS,
    TokenizedSource,
    default_cache_dir,
    prepare_source,
)
from cpt_cli.data.mixture import MixturePlan, PlanSource, make_plan
from cpt_cli.data.packing import BestFitStream, ConcatStream, TrainedSpans
from cpt_cli.data.records import ChatRenderer
from cpt_cli.data.schedule import build_schedule
from cpt_cli.data.sources import fingerprint_source, read_documents
from cpt_cli.data.tokenization import (
    SPECIAL_TOKENS,
    load_tokenizer,
    tokenizer_fingerprint,
    train_tokenizer,
)
from cpt_cli.errors import RecipeError, UsageError
from cpt_cli.model import check_model_path, instruct_model_warning
from cpt_cli.runs.lineage import (
    DomainText,
    Lineage,
    LineageSource,
    read_heldout,
    read_lineage,
    scored_text,
)


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
    # The mixture in force from each step ([{"step", "mix"}], see data/replan.py) and the recipe
    # changes a resume applied ([{"step", "changes"}], see config/resume.py): both go into every
    # checkpoint and the manifest.
    plan_history: list[dict[str, Any]] = field(default_factory=list)
    revisions: list[dict[str, Any]] = field(default_factory=list)


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
    replay = recipe.data.replay
    if lineage is not None and replay.inherit and (replay.is_auto or peak(replay.ratio) > 0):
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
            # Round-robin over sources so a character budget samples every domain. A chat
            # source is read through its own chat_template (with the specials the new
            # tokenizer will have); one that relies on a tokenizer's template has none yet.
            iters = [read_documents(s, recipe.base_dir, chat=ChatRenderer(
                s.chat_template, dict(SPECIAL_TOKENS)) if s.chat_template else None)
                for s in recipe.data.sources if s.format != "chat" or s.chat_template]
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
    domain.heldout = [{"text": d["text"], "hash": d["hash"], "tokens": d["tokens"],
                       "record": int(domain.entry.records[d["index"]]),
                       **({"segments": _segment_texts(d["text"], d["segments"])}
                          if "segments" in d else {})}
                      for d in chosen]
    return np.asarray([d["index"] for d in chosen], dtype=np.int64)


def _segment_texts(text: str, lengths: list[list[Any]]) -> list[list[Any]]:
    """A pool entry's segments (`[characters, trained]`) as the held-out set keeps them:
    `[text, trained]`, e.g. the prompt and its completion."""
    out, at = [], 0
    for n, trained in lengths:
        out.append([text[at:at + n], trained])
        at += n
    return out


def _recorded_heldout(entry: TokenizedSource, heldout: list[dict[str, Any]]) -> np.ndarray:
    """Which documents of `entry` are a lineage domain's held-out set: the same text, or the
    same record under another rendering (a redefined template), by the record identity the set
    was recorded with (held-out sets from before it have none: text alone)."""
    texts = np.asarray([h["hash"] for h in heldout], dtype=np.uint64)
    records = np.asarray([h["record"] for h in heldout if "record" in h], dtype=np.uint64)
    return np.isin(entry.hashes, texts) | np.isin(entry.records, records)


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
    """Tokenize every source, carve or reload held-out sets, and drop held-out duplicates.

    The phases, in order: check the model (so that a missing model.path is reported as such, not
    as a tokenizer that failed to load), open the cache, read the parent's lineage, load or train
    the tokenizer, tokenize and split each domain, drop held-out documents that are trained on,
    and gather the texts each domain is scored on."""
    model_problems = check_model_path(recipe)
    if model_problems:
        raise RecipeError("the recipe's model cannot be used:", model_problems)
    cache_dir = _open_cache_dir(recipe)
    if lineage is None and recipe.model.path is not None:
        location = model_location(recipe)
        lineage = read_lineage(location) if location and Path(location).is_dir() else None
    tokenizer = resolve_tokenizer(recipe, cache_dir)
    tok_fp = tokenizer_fingerprint(tokenizer)
    domains = resolve_domains(recipe, lineage)
    recorded = {s.name: s for s in lineage.sources} if lineage else {}
    # Said once, first, by every planning command (cpt train, cpt mix inspect).
    instruct = instruct_model_warning(recipe, tokenizer)
    warnings: list[str] = [instruct] if instruct else []
    _split_domains(recipe, domains, recorded, tokenizer, tok_fp, cache_dir, progress, warnings)
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
    eval_domains = _eval_domains(domains, recorded, trained, warnings)
    return PreparedData(tokenizer=tokenizer, tokenizer_fp=tok_fp, domains=domains,
                        eval_domains=eval_domains, lineage=lineage, cache_dir=cache_dir,
                        warnings=warnings)


def _open_cache_dir(recipe: Recipe) -> Path:
    """The tokenization cache, created; a UsageError naming the setting when it cannot be."""
    cache_dir = cache_dir_for(recipe)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        key = "data.cache_dir" if recipe.data.cache_dir else "$CPT_CACHE"
        reason = "it is a file" if cache_dir.is_file() else err.strerror or str(err)
        raise UsageError(f"{key}: cannot use {cache_dir} as the tokenization cache ({reason}); "
                         f"point {key} at a writable folder") from None
    return cache_dir


def _split_domains(recipe: Recipe, domains: list[Domain], recorded: dict[str, LineageSource],
                   tokenizer: PreTrainedTokenizerBase, tok_fp: str, cache_dir: Path,
                   progress: Progress | None, warnings: list[str]) -> None:
    """Tokenize each domain and split it into held-out and training documents: a domain of the
    lineage keeps its recorded held-out set, a new one has its set carved now. Every domain is
    tried before one RecipeError lists the problems of all of them."""
    budget = int(recipe.data.holdout.tokens)
    problems: list[str] = []
    for d in domains:
        d.entry = _tokenize(d, tokenizer, tok_fp, cache_dir, max(budget, DEFAULT_POOL_TOKENS),
                            progress)
        too_large = False  # reported once: an empty training set follows from it
        if d.name in recorded:
            _reuse_holdout(d, recorded[d.name], tokenizer, warnings)
        else:
            too_large = _new_holdout(d, recipe, budget, problems)
        if len(d.train_docs) == 0 and not too_large:
            problems.append(f"source {d.name!r}: no documents left for training after the "
                            "holdout; lower data.holdout.tokens or add data.")
        buffer = recipe.data.replay.buffer_tokens
        if d.role == "replay" and buffer is not None and len(d.train_docs):
            rng = np.random.default_rng(recipe.seed)
            order = rng.permutation(d.train_docs)
            cum = np.cumsum(d.entry.lengths()[order] + 1)
            d.train_docs = np.sort(order[:int(np.searchsorted(cum, buffer)) + 1])
    if problems:
        raise RecipeError("the data does not fit the recipe:", problems)


def _tokenize(d: Domain, tokenizer: PreTrainedTokenizerBase, tok_fp: str, cache_dir: Path,
              pool_tokens: int, progress: Progress | None) -> TokenizedSource:
    """The domain's cache entry, tokenized now or found in the cache; `progress` hears of every
    batch, then once of the true totals and the records skipped (from a cache hit too)."""
    tokenized = False

    def report(docs: int, tokens: int, stats: Any) -> None:
        nonlocal tokenized
        tokenized = True
        if progress is not None:
            progress(SourceProgress(d.name, docs, tokens, stats.bytes_read, stats.bytes_total))

    entry = prepare_source(d.config, d.base_dir, tokenizer, tok_fp, cache_dir,
                           pool_tokens=pool_tokens, progress=report)
    if progress is not None:
        progress(SourceProgress(d.name, entry.num_documents, entry.num_tokens, done=True,
                                cached=not tokenized, skipped=dict(entry.meta["skipped"]),
                                first_skipped=dict(entry.meta.get("first_skipped", {}))))
    return entry


def _reuse_holdout(d: Domain, source: LineageSource, tokenizer: PreTrainedTokenizerBase,
                   warnings: list[str]) -> None:
    """A domain of the lineage: the held-out set recorded by its first stage, so every stage is
    measured on the same text; the rest of the source trains."""
    assert d.entry is not None
    d.heldout = read_heldout(source.heldout_file)
    _count_tokens(tokenizer, d.heldout)
    d.heldout_recorded = True
    held = _recorded_heldout(d.entry, d.heldout)
    d.train_docs = np.arange(d.entry.num_documents, dtype=np.int64)[~held]
    if not held.any() and d.heldout:
        warnings.append(
            f"source {d.name!r} is named like the lineage's domain but holds none of its "
            f"held-out documents: it is scored on that domain's held-out text. If it is "
            f"other data, give it a name of its own.")


def _new_holdout(d: Domain, recipe: Recipe, budget: int, problems: list[str]) -> bool:
    """A domain new to the lineage: carve `budget` held-out tokens, train on the rest. True when
    the holdout is too large a share of the source (a problem is appended)."""
    assert d.entry is not None
    held_idx = _carve_holdout(d, budget)
    held_tokens = int(d.entry.lengths()[held_idx].sum()) if len(held_idx) else 0
    d.train_docs = np.setdiff1d(np.arange(d.entry.num_documents, dtype=np.int64), held_idx)
    max_fraction = recipe.data.holdout.max_fraction
    if held_tokens > max_fraction * d.entry.num_tokens:
        problems.append(
            f"source {d.name!r}: the holdout ({held_tokens:,} tokens) is more than "
            f"{max_fraction:.0%} of the source ({d.entry.num_tokens:,} "
            f"tokens). Lower data.holdout.tokens (now {budget:,}) or add data.")
        return True
    return False


def _eval_domains(domains: list[Domain], recorded: dict[str, LineageSource],
                  trained: np.ndarray, warnings: list[str]) -> list[DomainText]:
    """The held-out texts each domain is scored on: this stage's domains, then the lineage's
    domains not replayed now (still evaluated), less any document trained on."""
    eval_domains = [DomainText(d.name, d.eval_role, [scored_text(h) for h in d.heldout])
                    for d in domains]
    names = {d.name for d in domains}
    for src in recorded.values():
        if src.name not in names:  # an earlier domain not replayed now: still evaluated
            texts = [scored_text(h) for h in read_heldout(src.heldout_file)
                     if not np.isin(np.uint64(h["hash"]), trained)]
            eval_domains.append(DomainText(src.name, "retained", texts))
    # A domain whose every held-out document is trained on in this stage: scoring it would
    # measure memorization, and an empty set has no figure at all.
    warnings += [f"domain {d.name!r}: every held-out document is also in this stage's training "
                 "data, so it is not scored (no forgetting figure). Remove those documents from "
                 "the new sources to keep measuring it." for d in eval_domains if not d.texts]
    return [d for d in eval_domains if d.texts]


def trainable_documents(entry: TokenizedSource, docs: np.ndarray,
                        trained: TrainedSpans | None, seq_len: int) -> tuple[np.ndarray, int]:
    """The documents of `docs` worth training, and how many were left out: with trained spans,
    a document whose first trained token comes `seq_len` tokens or more after its start would
    fill whole sequences with untrained tokens (padding by another name) and train its answer
    cut off from its prompt; it is counted and left out, never trained unseen."""
    if trained is None or not len(docs):
        return docs, 0
    lead = trained.first_trained(entry.offsets)[docs]
    keep = lead < seq_len
    return docs[keep], int((~keep).sum())


def _trained_tokens(entry: TokenizedSource, docs: np.ndarray,
                    trained: TrainedSpans | None) -> int:
    """Trained tokens of one epoch of `docs`, EOS included: the tokens the loss sees, where
    `tokens_available` counts the tokens the model computes over."""
    if trained is None:
        return int((entry.lengths()[docs] + 1).sum())
    starts, ends = entry.offsets[docs], entry.offsets[docs + 1]
    return int(trained.count(starts, ends).sum() + trained.last_trained[docs].sum())


def batch_geometry(recipe: Recipe, num_processes: int) -> BatchGeometry:
    """`recipe.batch_geometry(num_processes)`, under the name the trainer and tests import."""
    return recipe.batch_geometry(num_processes)


def plan_data(recipe: Recipe, data: PreparedData, num_processes: int = 1) -> PreparedData:
    """Build the packed streams and the mixture plan for the recipe's token budget. The plan's
    `warnings` are the one list every planning command prints (`cpt mix inspect`, `cpt train`):
    those of preparing the data (a source named like a lineage domain, a domain left unscored)
    followed by those of the plan (a source repeated more than 4 times, or given no sequence)."""
    global_batch, _, steps = recipe.batch_geometry(num_processes)
    L = recipe.data.seq_len
    eos = data.tokenizer.eos_token_id
    pad = data.tokenizer.pad_token_id if data.tokenizer.pad_token_id is not None else eos
    streams: list[Any] = []
    rows: list[PlanSource] = []
    for d in data.domains:
        assert d.entry is not None
        trained = TrainedSpans(d.entry.spans, d.entry.offsets) \
            if d.entry.spans is not None else None
        docs, beyond = trainable_documents(d.entry, d.train_docs, trained, L)
        if recipe.data.packing == "best_fit":
            stream: Any = BestFitStream(d.name, d.entry.tokens, d.entry.offsets, docs,
                                        eos, pad, L, recipe.seed, trained)
        else:
            stream = ConcatStream(d.name, d.entry.tokens, d.entry.offsets, docs, eos, L,
                                  recipe.seed, trained)
        streams.append(stream)
        lengths = d.entry.lengths()
        # What this source trains on, exactly: the cache entry and the documents taken from it.
        content = hashlib.sha256(d.entry.key.encode() + docs.tobytes()).hexdigest()[:16]
        available = int((lengths[docs] + 1).sum())
        rows.append(PlanSource(name=d.name, role=d.role, weight=d.config.weight,
                               documents=len(docs), tokens_available=available,
                               holdout_tokens=d.heldout_tokens, inherited=d.inherited,
                               content=content, loss_on=d.config.loss_on,
                               trained_available=_trained_tokens(d.entry, docs, trained),
                               beyond_seq_len=beyond))
        if beyond:
            data.warnings.append(
                f"source {d.name!r}: {beyond:,} document{'s' * (beyond != 1)} begin with "
                f"{L:,} or more untrained tokens (a prompt or conversation longer than "
                f"data.seq_len), so no trained token could be seen with its context: left out "
                "of training. Raise data.seq_len or shorten those records.")
    limits = [d.config.max_epochs if d.config.max_epochs is not None else recipe.data.max_epochs
              for d in data.domains]
    schedule = build_schedule(recipe, [(d.name, d.role, d.config) for d in data.domains], steps,
                              global_batch)
    # Under ratio: auto the plan starts at data.replay.start; the trainer revises it at every
    # evaluation (cpt_cli.data.replay_control).
    ratio = recipe.data.replay.starting_ratio()
    if schedule is not None and schedule.is_constant:  # mappings that never change: numbers
        ratio = schedule.ratio.value(0)
        for row, weight in zip(rows, schedule.weights, strict=True):
            row.weight = weight.value(0)
    if recipe.data.replay.is_auto and not any(d.role == "replay" for d in data.domains):
        raise RecipeError("data.replay.ratio: auto needs a retained domain to replay and measure, "
                          "and this run has none (model.path is not a cpt run, so inherit: true "
                          "adds nothing): list data.replay.sources")
    data.plan = make_plan(rows, [s.sequences_per_epoch for s in streams], steps * global_batch,
                          ratio, L, recipe.seed, limits, packing=recipe.data.packing,
                          global_batch=global_batch, schedule=schedule)
    data.plan.warnings[:0] = data.warnings
    data.streams, data.steps, data.global_batch = streams, steps, global_batch
    return data
