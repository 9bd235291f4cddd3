"""Held-out sets: chosen by document hash (deterministic, stable when documents are added), never
trained on (proved on the tokens of every packed training sequence of a run), and dropped when a
training source holds the same text."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cpt_cli.config import recipe_from_config
from cpt_cli.data.cache import document_hash
from cpt_cli.data.loader import PackedLoader
from cpt_cli.data.prepare import batch_geometry, plan_data, prepare_data

TINY_LLAMA = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64,
              "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2,
              "max_position_embeddings": 128}
NGRAM = 12


def random_docs(n: int, seed: int, prefix: str) -> list[str]:
    """Documents of random hex words: any 12-token run identifies its document."""
    rng = random.Random(seed)
    return [f"{prefix} " + " ".join(f"{rng.getrandbits(24):06x}" for _ in range(rng.randint(8, 30)))
            for _ in range(n)]


def write_jsonl(path: Path, texts: list[str]) -> None:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))


def recipe(tmp: Path, tokenizer: Path, sources: list[dict[str, Any]], holdout: int = 400,
           steps: int = 30, **data: Any) -> Any:
    return recipe_from_config({
        "name": "holdout", "seed": 11,
        "model": {"init": {"config": TINY_LLAMA}, "tokenizer": str(tokenizer)},
        "data": {"seq_len": 48, "cache_dir": str(tmp / "cache"), "sources": sources,
                 "holdout": {"tokens": holdout}, "max_epochs": 100} | data,
        "train": {"steps": steps, "global_batch_size": 8, "micro_batch_size": 2}}, base_dir=tmp)


def smallest_hashes_up_to(texts: list[str], tokens: list[int], budget: int) -> list[str]:
    order = sorted(range(len(texts)), key=lambda i: (document_hash(texts[i]), i))
    chosen, total = [], 0
    for i in order:
        if total >= budget:
            break
        chosen.append(texts[i])
        total += tokens[i]
    return chosen


def test_holdout_is_the_smallest_hashes_and_deterministic(tmp_path: Path, tiny_tokenizer: Path
                                                          ) -> None:
    texts = random_docs(200, 1, "alpha")
    write_jsonl(tmp_path / "a.jsonl", texts)
    r = recipe(tmp_path, tiny_tokenizer, [{"name": "a", "path": "a.jsonl"}])
    data = prepare_data(r)
    (d,) = data.domains
    lengths = d.entry.lengths().tolist()
    expected = smallest_hashes_up_to(texts, lengths, 400)
    assert sorted(h["text"] for h in d.heldout) == sorted(expected)
    assert d.heldout_tokens >= 400 > d.heldout_tokens - max(lengths)
    assert d.heldout_tokens == sum(lengths[texts.index(t)] for t in expected)
    assert [h["text"] for h in prepare_data(r).domains[0].heldout] == \
        [h["text"] for h in d.heldout]
    held = {texts.index(h["text"]) for h in d.heldout}
    assert set(d.train_docs.tolist()) == set(range(200)) - held


def test_adding_documents_keeps_the_holdout(tmp_path: Path, tiny_tokenizer: Path) -> None:
    texts = random_docs(200, 2, "beta")
    write_jsonl(tmp_path / "a.jsonl", texts)
    r = recipe(tmp_path, tiny_tokenizer, [{"name": "a", "path": "a.jsonl"}])
    before = [h["text"] for h in prepare_data(r).domains[0].heldout]
    cutoff = max(document_hash(t) for t in before)

    # New documents that all hash above the cutoff: the held-out set is exactly the same.
    later = [t for t in random_docs(400, 3, "beta") if document_hash(t) > cutoff][:100]
    write_jsonl(tmp_path / "a.jsonl", later[:50] + texts + later[50:])  # and in a new order
    assert sorted(h["text"] for h in prepare_data(r).domains[0].heldout) == sorted(before)

    # Many more documents, some hashing below: old ones leave only to make room within the
    # budget, largest hash first, and no document that was trained on joins the holdout.
    more = random_docs(300, 4, "beta")
    write_jsonl(tmp_path / "a.jsonl", texts + later + more)
    after = [h["text"] for h in prepare_data(r).domains[0].heldout]
    assert set(after) - set(before) <= set(more)
    kept = [t for t in before if t in after]
    left = [t for t in before if t not in after]
    assert kept and all(document_hash(t) > max(document_hash(k) for k in kept) for t in left)


def stream_ngrams(loader: PackedLoader) -> set[tuple[int, ...]]:
    """Every NGRAM-token run inside every packed training sequence of the whole plan, read
    through the loader exactly as training reads it (all micro batches of all steps)."""
    grams: set[tuple[int, ...]] = set()
    for _, micro_batches in loader.iter_steps(0):
        for mb in micro_batches:
            for row, labels in zip(mb.input_ids.tolist(), mb.labels.tolist(), strict=True):
                ids = [t for t, lab in zip(row, labels, strict=True) if lab != -100]
                grams.update(tuple(ids[i:i + NGRAM]) for i in range(len(ids) - NGRAM + 1))
    return grams


def doc_ngrams(ids: list[int]) -> set[tuple[int, ...]]:
    return {tuple(ids[i:i + NGRAM]) for i in range(len(ids) - NGRAM + 1)}


@pytest.mark.parametrize("packing", ["concat", "best_fit"])
def test_heldout_documents_never_reach_a_training_sequence(tmp_path: Path, tiny_tokenizer: Path,
                                                           packing: str) -> None:
    write_jsonl(tmp_path / "a.jsonl", random_docs(120, 5, "gamma"))
    write_jsonl(tmp_path / "b.jsonl", random_docs(80, 6, "delta"))
    r = recipe(tmp_path, tiny_tokenizer, [{"name": "a", "path": "a.jsonl"},
                                          {"name": "b", "path": "b.jsonl", "weight": 0.5}],
               holdout=600, steps=100, packing=packing)
    data = plan_data(r, prepare_data(r))
    _, accum, _ = batch_geometry(r, 1)
    loader = PackedLoader(data.plan, data.streams, micro_batch_size=2, grad_accum=accum)
    trained = stream_ngrams(loader)
    assert all(s.epochs > 1.2 for s in data.plan.sources)  # every training document is seen
    tok = data.tokenizer
    for d in data.domains:
        assert len(d.heldout) >= 3
        for h in d.heldout:
            ids = tok(h["text"], add_special_tokens=False)["input_ids"]
            assert len(ids) > 2 * NGRAM
            assert not doc_ngrams(ids) & trained, f"held-out text of {d.name} was trained on"
        # The control: the same check finds every training document.
        for doc in d.train_docs.tolist():
            ids = d.entry.tokens[d.entry.offsets[doc]:d.entry.offsets[doc + 1]].tolist()
            assert doc_ngrams(ids) & trained


def test_heldout_duplicate_in_a_training_source_is_dropped_and_counted(
        tmp_path: Path, tiny_tokenizer: Path) -> None:
    texts = random_docs(150, 7, "eps")
    write_jsonl(tmp_path / "a.jsonl", texts)
    write_jsonl(tmp_path / "b.jsonl", random_docs(100, 8, "zeta"))
    sources = [{"name": "a", "path": "a.jsonl"}, {"name": "b", "path": "b.jsonl"}]
    clean = prepare_data(recipe(tmp_path, tiny_tokenizer, sources))
    a_held = [h["text"] for h in clean.domains[0].heldout]
    assert clean.domains[0].dropped_duplicates == 0 and len(a_held) >= 3
    # Source b also holds a's two held-out documents with the largest hashes, reformatted (the
    # same text after whitespace normalization), and enough documents of smaller hash to fill its
    # own holdout first: so b trains on the copies.
    copies = ["  " + a_held[-1].replace(" ", "\n"), a_held[-2] + "\n\n"]
    below = min(document_hash(c) for c in copies)
    smaller = [t for t in random_docs(4000, 8, "zeta") if document_hash(t) < below][:30]
    assert len(smaller) == 30
    write_jsonl(tmp_path / "b.jsonl", smaller + random_docs(70, 9, "zeta") + copies)
    data = prepare_data(recipe(tmp_path, tiny_tokenizer, sources))
    a, b = data.domains
    assert a.dropped_duplicates == 2
    assert [h["text"] for h in a.heldout] == a_held[:-2]
    assert a.heldout_summary()["dropped_duplicates"] == 2
    assert a.heldout_summary()["documents"] == len(a_held) - 2
    assert a.heldout_tokens == sum(h["tokens"] for h in a.heldout)
    trained_b = {int(x) for x in b.entry.hashes[b.train_docs]}
    assert {document_hash(c) for c in copies} <= trained_b
    evaluated = next(e for e in data.eval_domains if e.name == "a").texts
    assert a_held[-1] not in evaluated and a_held[-2] not in evaluated


def test_duplicate_within_a_source_is_not_held_out(tmp_path: Path, tiny_tokenizer: Path) -> None:
    texts = random_docs(150, 9, "eta")
    write_jsonl(tmp_path / "a.jsonl", texts)
    r = recipe(tmp_path, tiny_tokenizer, [{"name": "a", "path": "a.jsonl"}])
    first = prepare_data(r).domains[0].heldout[0]["text"]
    # Two copies of the first held-out document: both share the smallest hash, so both are held
    # out, and neither is trained on; a copy left in training would drop it.
    write_jsonl(tmp_path / "a.jsonl", texts + [first])
    d = prepare_data(r).domains[0]
    copies = np.flatnonzero(d.entry.hashes == np.uint64(document_hash(first)))
    assert len(copies) == 2
    assert not set(copies.tolist()) & set(d.train_docs.tolist())
    assert [h["text"] for h in d.heldout].count(first) == 2 and d.dropped_duplicates == 0


def test_a_redefined_template_does_not_train_on_held_out_records(tmp_path: Path,
                                                                 tiny_tokenizer: Path) -> None:
    """A later stage renders `qa` with another template: the records whose earlier rendering is
    the held-out set are known by their fields, not by their text, and are not trained on."""
    from cpt_cli.runs.lineage import FORMAT, Lineage, write_heldout

    rng = random.Random(5)
    records = [{"question": f"q{i} {rng.getrandbits(40):x}?", "answer": f"{rng.getrandbits(40):x}"}
               for i in range(150)]
    (tmp_path / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    before, after = "Question: {question}\nAnswer: {answer}", "Q: {question}\nA: {answer}"
    first = prepare_data(recipe(tmp_path, tiny_tokenizer, [
        {"name": "qa", "path": "qa.jsonl", "template": before}])).domains[0]
    assert 0 < len(first.heldout) < len(records)
    final = tmp_path / "final"
    write_heldout(final / "heldout" / "qa.jsonl", first.heldout)
    lineage = Lineage(root=final, manifest={"format": FORMAT, "stages": [], "sources": {"qa": {
        "config": {"name": "qa", "path": "qa.jsonl", "template": before},
        "base_dir": str(tmp_path), "heldout": {"file": "heldout/qa.jsonl"}, "stage": 1}}})

    second = prepare_data(recipe(tmp_path, tiny_tokenizer, [
        {"name": "qa", "path": "qa.jsonl", "template": after}]), lineage=lineage)
    (qa,) = second.domains
    held_questions = {h["text"].split("\n")[0].removeprefix("Question: ") for h in first.heldout}
    trained_questions = {records[i]["question"] for i in qa.train_docs.tolist()}
    assert not held_questions & trained_questions
    assert len(qa.train_docs) == len(records) - len(first.heldout)
    # The earlier rendering is still what the domain is scored on, the same text as before.
    scored = next(e for e in second.eval_domains if e.name == "qa").texts
    assert sorted(scored) == sorted(h["text"] for h in first.heldout)
    assert not any("named like the lineage's domain" in w for w in second.warnings)
