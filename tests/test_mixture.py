"""The mixture plan: token-accurate shares with replay, smooth order, epochs and their limits,
the replay buffer, and replay inherited from a parent run's lineage."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cpt_cli.config import recipe_from_config
from cpt_cli.data.mixture import PlanSource, just_in_time_order, make_plan
from cpt_cli.data.prepare import plan_data, prepare_data
from cpt_cli.errors import RecipeError

TINY_LLAMA = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64,
              "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2,
              "max_position_embeddings": 128}
WORDS = ["amber", "basin", "cedar", "delta", "ember", "fjord", "grove", "heath", "inlet", "juniper",
         "knoll", "lagoon", "marsh", "nectar", "oasis", "prairie", "quarry", "ridge", "summit"]


def write_docs(path: Path, n: int, seed: int, words: tuple[int, int] = (20, 80)) -> Path:
    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(n):
            text = f"{path.stem} {i}: " + " ".join(rng.choice(WORDS)
                                                    for _ in range(rng.randint(*words)))
            fh.write(json.dumps({"text": text}) + "\n")
    return path


def recipe(tmp: Path, tokenizer: Path, data: dict[str, Any], **train: Any) -> Any:
    config = {"name": "mix", "seed": 5,
              "model": {"init": {"config": TINY_LLAMA}, "tokenizer": str(tokenizer)},
              "data": {"seq_len": 32, "cache_dir": str(tmp / "cache"),
                       "holdout": {"tokens": 200}} | data,
              "train": {"global_batch_size": 8, "micro_batch_size": 4} | train}
    return recipe_from_config(config, base_dir=tmp)


def rows(weights_new: list[float], weights_replay: list[float]) -> list[PlanSource]:
    return ([PlanSource(f"new{i}", "new", w, 100, 10**9, 0) for i, w in enumerate(weights_new)] +
            [PlanSource(f"replay{i}", "replay", w, 100, 10**9, 0)
             for i, w in enumerate(weights_replay)])


def deviations(order: np.ndarray, counts: list[int]) -> tuple[float, float]:
    """(largest |prefix count - n share|, largest window count - w share spread) over sources."""
    S = len(order)
    prefix = window = 0.0
    for k, c in enumerate(counts):
        d = np.concatenate([[0], np.cumsum(order == k)]) - np.arange(S + 1) * c / S
        prefix = max(prefix, float(np.abs(d).max()))
        # count in window (a, b] minus its share is d[b] - d[a]: bounded by the spread of d.
        window = max(window, float(d.max() - d.min()))
    return prefix, window


@pytest.mark.parametrize(("new", "replay", "ratio", "total"), [
    ([0.7, 0.3], [2.0, 1.0], 0.25, 3000),
    ([1.0], [1.0], 0.1, 2048),
    ([0.5, 0.25, 0.15, 0.1], [], 0.0, 4001),
    ([3.0, 1.0], [1.0, 1.0, 1.0], 0.4, 5000),
])
def test_planned_shares_match_the_request(new: list[float], replay: list[float], ratio: float,
                                          total: int) -> None:
    sources = rows(new, replay)
    plan = make_plan(sources, [1e6] * len(sources), total, ratio, 64, 0, [16.0] * len(sources))
    assert plan.total_sequences == sum(s.sequences for s in plan.sources) == total
    for s in plan.sources:
        group, share = (new, 1 - ratio) if s.role == "new" else (replay, ratio)
        requested = share * s.weight / sum(group)
        assert s.share_requested == pytest.approx(requested)
        assert abs(s.sequences / total - requested) <= 0.005
        assert abs(s.sequences - requested * total) < 1  # largest remainder: under one sequence
    assert plan.replay_share == pytest.approx(ratio, abs=0.5 / total + 1e-12)
    order = plan.source_order()
    assert np.bincount(order, minlength=len(sources)).tolist() == [s.sequences for s in sources]
    first = np.bincount(order[:1000], minlength=len(sources)) / 1000
    for s, achieved in zip(sources, first, strict=True):
        assert abs(achieved - s.share_requested) < 0.002  # the first 1,000 already in balance


def test_order_is_smooth_for_every_prefix_and_window() -> None:
    cases = [[2100, 900, 500, 250, 250], [700, 300], [1, 999], [5, 5, 5], [3000]]
    rng = np.random.default_rng(0)
    cases += [list(rng.integers(0, 400, rng.integers(2, 11))) for _ in range(40)]
    for counts in cases:
        counts = [int(c) for c in counts]
        order = just_in_time_order(counts)
        assert np.bincount(order, minlength=len(counts)).tolist() == counts
        K = sum(1 for c in counts if c)
        bound = 1 - 1 / (2 * K - 2) if K > 1 else 0.0
        prefix, window = deviations(order, counts)
        # Every prefix holds each source's share to within one sequence (Tijdeman's bound);
        # every window to within 2B: exactly one sequence for two sources, under two for more.
        assert prefix <= bound + 1e-9, (counts, prefix)
        assert window <= 2 * bound + 1e-9, (counts, window)
        if K == 2:
            assert window <= 1 + 1e-9


def test_two_sources_every_window_within_one_sequence() -> None:
    plan = make_plan(rows([1.0], [1.0]), [1e6, 1e6], 3000, 0.25, 64, 0, [16.0, 16.0])
    order = plan.source_order()
    for w in (1, 4, 7, 8, 33, 100, 1000):
        counts = np.convolve(order == 1, np.ones(w, dtype=int), mode="valid")
        assert np.all(np.abs(counts - 0.25 * w) <= 1), w


def test_locate_maps_each_source_to_its_own_sequence_numbers() -> None:
    plan = make_plan(rows([0.6, 0.4], [1.0]), [1e6] * 3, 777, 0.2, 64, 0, [16.0] * 3)
    seen: dict[int, list[int]] = {0: [], 1: [], 2: []}
    for i in range(plan.total_sequences):
        k, j = plan.locate(i)
        seen[k].append(j)
    for k, js in seen.items():
        assert js == list(range(plan.sources[k].sequences))  # each source's stream in order


def test_plan_from_real_sources(tmp_path: Path, tiny_tokenizer: Path) -> None:
    for name, n in (("code", 150), ("qa", 150), ("web", 150), ("books", 6)):
        write_docs(tmp_path / f"{name}.jsonl", n, len(name))
    r = recipe(tmp_path, tiny_tokenizer, {
        "sources": [{"name": "code", "path": "code.jsonl", "weight": 0.7},
                    {"name": "qa", "path": "qa.jsonl", "weight": 0.3}],
        "replay": {"ratio": 0.25, "sources": [{"name": "web", "path": "web.jsonl", "weight": 2},
                                              {"name": "books", "path": "books.jsonl"}]},
        "max_epochs": 100}, steps=375)
    data = plan_data(r, prepare_data(r))
    plan = data.plan
    assert plan.total_sequences == 3000
    expected = {"code": 0.525, "qa": 0.225, "web": 0.25 * 2 / 3, "books": 0.25 / 3}
    for s, stream, d in zip(plan.sources, data.streams, data.domains, strict=True):
        assert abs(s.sequences / 3000 - expected[s.name]) <= 0.005
        # Epochs: planned tokens over the training tokens of one epoch (EOS included).
        assert s.tokens_available == int((d.entry.lengths()[d.train_docs] + 1).sum())
        assert s.tokens_available == stream.epoch_tokens
        assert s.epochs == pytest.approx(s.sequences * 32 / s.tokens_available)
    assert plan.replay_share == pytest.approx(0.25, abs=1e-3)
    # Sources repeated more than 4 times draw a warning naming them (and only them).
    warned = {s.name for s in plan.sources if s.epochs > 4}
    assert warned == {"books"} and all(any(f"source {n!r} is repeated" in w for w in plan.warnings)
                          for n in warned)
    assert len([w for w in plan.warnings if "is repeated" in w]) == len(warned)


def test_more_epochs_than_allowed_is_an_error_naming_the_source(tmp_path: Path,
                                                                tiny_tokenizer: Path) -> None:
    write_docs(tmp_path / "big.jsonl", 200, 1)
    write_docs(tmp_path / "small.jsonl", 8, 2)
    data = {"sources": [{"name": "big", "path": "big.jsonl"},
                        {"name": "small", "path": "small.jsonl", "max_epochs": 2}]}
    r = recipe(tmp_path, tiny_tokenizer, data, steps=80)
    with pytest.raises(RecipeError) as err:
        plan_data(r, prepare_data(r))
    message = str(err.value)
    assert "source 'small': the plan repeats it" in message and "max_epochs 2" in message
    assert "'big'" not in message
    # The default limit is data.max_epochs.
    r = recipe(tmp_path, tiny_tokenizer, data | {"max_epochs": 1.5,
                                                 "sources": [data["sources"][0]]}, steps=400)
    with pytest.raises(RecipeError, match=r"source 'big': the plan repeats it .* max_epochs 1\.5"):
        plan_data(r, prepare_data(r))


def test_replay_buffer_is_a_fixed_deterministic_pool(tmp_path: Path, tiny_tokenizer: Path
                                                     ) -> None:
    write_docs(tmp_path / "new.jsonl", 100, 1)
    write_docs(tmp_path / "old.jsonl", 400, 2)
    data = {"sources": [{"name": "new", "path": "new.jsonl"}],
            "replay": {"ratio": 0.5, "sources": [{"name": "old", "path": "old.jsonl"}],
                       "buffer_tokens": 2000}, "max_epochs": 100}
    r = recipe(tmp_path, tiny_tokenizer, data, steps=60)
    first = plan_data(r, prepare_data(r))
    again = plan_data(r, prepare_data(r))
    unbuffered = prepare_data(recipe(tmp_path, tiny_tokenizer, data | {
        "replay": data["replay"] | {"buffer_tokens": None}}, steps=60))
    new, old = first.domains
    assert np.array_equal(old.train_docs, again.domains[1].train_docs)
    assert np.array_equal(new.train_docs, unbuffered.domains[0].train_docs)  # new: untouched
    pool_tokens = int((old.entry.lengths()[old.train_docs] + 1).sum())
    longest = int(old.entry.lengths().max()) + 1
    assert 2000 <= pool_tokens < 2000 + longest
    assert set(old.train_docs) < set(unbuffered.domains[1].train_docs)
    row = first.plan.sources[1]
    assert row.tokens_available == pool_tokens and row.epochs > 1  # the pool is cycled
    # Every replayed sequence comes from the pool: trace documents by their first tokens.
    stream = first.streams[1]
    allowed = {tuple(old.entry.tokens[old.entry.offsets[d]:old.entry.offsets[d] + 4])
               for d in old.train_docs}
    for j in range(row.sequences):
        seq = stream.sequence(j)
        for s in seq.doc_starts:
            if s + 4 <= 32:
                assert tuple(seq.input_ids[s:s + 4]) in allowed
    # The held-out set is carved before the pool: evaluation does not shrink with the buffer.
    assert [h["text"] for h in old.heldout] == [h["text"] for h in unbuffered.domains[1].heldout]
    assert row.holdout_tokens == unbuffered.domains[1].heldout_tokens


def test_replay_without_replay_sources_is_refused(tmp_path: Path, tiny_tokenizer: Path) -> None:
    write_docs(tmp_path / "new.jsonl", 50, 1)
    r = recipe(tmp_path, tiny_tokenizer, {"sources": [{"name": "new", "path": "new.jsonl"}],
                                          "replay": {"ratio": 0.3, "inherit": True}}, steps=4)
    with pytest.raises(RecipeError, match="no replay source"):
        plan_data(r, prepare_data(r))


def test_inherited_replay_from_a_parent_run(tmp_path: Path, tiny_tokenizer: Path) -> None:
    from cpt_cli.training.loop import train

    write_docs(tmp_path / "prose.jsonl", 120, 1)
    write_docs(tmp_path / "notes.jsonl", 120, 2)
    write_docs(tmp_path / "code.jsonl", 120, 3)
    parent = recipe(tmp_path, tiny_tokenizer, {
        "sources": [{"name": "prose", "path": "prose.jsonl", "weight": 2},
                    {"name": "notes", "path": "notes.jsonl"}]}, steps=2)
    parent = recipe_from_config(parent.to_dict() | {"output_dir": str(tmp_path / "runs/p")},
                                base_dir=tmp_path)
    train(parent)
    final = tmp_path / "runs" / "p" / "final"
    child = recipe_from_config({
        "name": "child", "seed": 5, "model": {"path": str(final)},
        "data": {"seq_len": 32, "cache_dir": str(tmp_path / "cache"), "holdout": {"tokens": 200},
                 "sources": [{"name": "code", "path": "code.jsonl"}],
                 "replay": {"ratio": 0.3, "inherit": True}, "max_epochs": 100},
        "train": {"steps": 250, "global_batch_size": 8, "micro_batch_size": 4}},
        base_dir=tmp_path)
    data = plan_data(child, prepare_data(child))
    by_name = {d.name: d for d in data.domains}
    assert set(by_name) == {"code", "prose", "notes"}
    for name in ("prose", "notes"):
        d = by_name[name]
        assert d.role == "replay" and d.inherited and d.heldout_recorded
        recorded = [json.loads(line) for line in
                    (final / "heldout" / f"{name}.jsonl").read_text().splitlines()]
        # The very held-out text of the parent, still never trained on.
        assert [h["text"] for h in d.heldout] == [h["text"] for h in recorded]
        held = {h["hash"] for h in recorded}
        assert not held & {int(x) for x in d.entry.hashes[d.train_docs]}
    # Inherited sources weigh 1 each, whatever their weight in the parent.
    shares = {s.name: s.sequences / data.plan.total_sequences for s in data.plan.sources}
    assert shares["code"] == pytest.approx(0.7, abs=0.005)
    assert shares["prose"] == pytest.approx(0.15, abs=0.005)
    assert shares["notes"] == pytest.approx(0.15, abs=0.005)
    assert all(s.inherited == (s.name != "code") for s in data.plan.sources)


def test_a_plan_with_no_new_data_is_refused_and_a_source_with_none_is_warned() -> None:
    from cpt_cli.data.mixture import PlanSource, make_plan
    from cpt_cli.errors import RecipeError

    def sources() -> list[PlanSource]:
        return [PlanSource(name="code", role="new", weight=1.0, documents=10,
                           tokens_available=10_000, holdout_tokens=100),
                PlanSource(name="rare", role="new", weight=0.001, documents=10,
                           tokens_available=10_000, holdout_tokens=100),
                PlanSource(name="web", role="replay", weight=1.0, documents=10,
                           tokens_available=10_000, holdout_tokens=100)]

    plan = make_plan(sources(), [100.0] * 3, 100, 0.25, 64, 0, [16.0] * 3)
    assert any("source 'rare' gets no sequence" in w for w in plan.warnings), plan.warnings
    with pytest.raises(RecipeError, match="no sequence of new data in 100"):
        make_plan(sources(), [100.0] * 3, 100, 0.999, 64, 0, [16.0] * 3)
