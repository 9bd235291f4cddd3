"""Packing on synthetic token files: concat (EOS-joined, cut at seq_len, epochs continue the same
stream), best_fit (whole documents, long ones chunked, padding labelled -100), position_ids that
restart per document, and random access equal to sequential generation."""

from __future__ import annotations

import numpy as np
import pytest

from cpt_cli.data.packing import PAD_LABEL, BestFitStream, ConcatStream

EOS, PAD, L = 1, 0, 32


def token_file(lengths: list[int], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Documents of the given lengths with ids >= 10 (never EOS or PAD): document d's tokens
    start with 10 + d, so every piece can be traced back to its document."""
    rng = np.random.default_rng(seed)
    docs = [np.concatenate([[10 + d], rng.integers(10, 500, n - 1)]) for d, n in
            enumerate(lengths)]
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    return np.concatenate(docs).astype(np.uint16), offsets


LENGTHS = [5, 17, 40, 3, 29, 64, 8, 11, 90, 1, 23, 31, 7, 14, 50, 2]


def concat_stream(ids: np.ndarray | None = None, seed: int = 3) -> ConcatStream:
    tokens, offsets = token_file(LENGTHS)
    doc_ids = np.arange(len(LENGTHS)) if ids is None else ids
    return ConcatStream("src", tokens, offsets, doc_ids, EOS, L, seed)


def epoch_text(stream: ConcatStream, epoch: int) -> np.ndarray:
    order, _ = stream._epoch(epoch)
    return np.concatenate([np.append(stream.tokens[stream.offsets[d]:stream.offsets[d + 1]], EOS)
                           for d in order])


def test_concat_joins_documents_with_eos_and_cuts_at_seq_len() -> None:
    stream = concat_stream()
    assert stream.epoch_tokens == sum(LENGTHS) + len(LENGTHS)
    assert stream.sequences_per_epoch == stream.epoch_tokens / L
    n = 3 * stream.epoch_tokens // L  # three epochs, minus the last partial sequence
    flat = np.concatenate([stream.sequence(i).input_ids for i in range(n)])
    expected = np.concatenate([epoch_text(stream, e) for e in range(3)])
    # Epochs follow one another in one stream: no sequence is dropped at an epoch boundary,
    # only the tokens after the last whole sequence of the run.
    assert np.array_equal(flat, expected[:n * L])
    assert len(expected) - n * L < L
    for i in range(n):
        seq = stream.sequence(i)
        assert len(seq.input_ids) == L and np.array_equal(seq.labels, seq.input_ids)


def test_concat_epochs_reshuffle_every_document_once() -> None:
    stream = concat_stream()
    orders = [stream._epoch(e)[0] for e in range(4)]
    for order in orders:
        assert sorted(order.tolist()) == list(range(len(LENGTHS)))
    assert len({tuple(o.tolist()) for o in orders}) == 4
    # The shuffle depends on the seed and the source's name, and on nothing else.
    assert np.array_equal(concat_stream(seed=3)._epoch(2)[0], orders[2])
    assert not np.array_equal(concat_stream(seed=4)._epoch(2)[0], orders[2])


def test_concat_only_uses_the_training_documents() -> None:
    train = np.array([0, 2, 4, 5, 8, 11])
    stream = concat_stream(train)
    n = int(2 * stream.sequences_per_epoch)
    firsts = set()
    for i in range(n):
        seq = stream.sequence(i)
        firsts |= {int(seq.input_ids[s]) for s in seq.doc_starts}
    assert firsts == {10 + d for d in train.tolist()}


def check_positions(seq: object) -> None:
    pos, starts = seq.position_ids, seq.doc_starts  # type: ignore[attr-defined]
    assert pos[0] == 0
    for t in range(1, len(pos)):
        if t in starts:
            assert pos[t] == 0
        else:
            padding_starts = pos[t] == 0 and seq.labels[t] == PAD_LABEL  # type: ignore[attr-defined]
            assert pos[t] == pos[t - 1] + 1 or padding_starts


def test_concat_position_ids_restart_at_each_document() -> None:
    stream = concat_stream()
    for i in range(int(2 * stream.sequences_per_epoch)):
        seq = stream.sequence(i)
        check_positions(seq)
        # A document starts right after each EOS; the first piece may continue one.
        after_eos = [t + 1 for t in range(L - 1) if seq.input_ids[t] == EOS]
        assert [s for s in seq.doc_starts if s > 0] == after_eos
        assert all(int(seq.input_ids[s]) - 10 in range(len(LENGTHS)) for s in seq.doc_starts)


def best_fit_stream(lengths: list[int] = LENGTHS, seed: int = 3) -> BestFitStream:
    tokens, offsets = token_file(lengths)
    return BestFitStream("src", tokens, offsets, np.arange(len(lengths)), EOS, PAD, L, seed)


def pieces(seq: object) -> list[np.ndarray]:
    """The documents (or chunks) of a best_fit sequence, padding removed."""
    ids, labels, starts = seq.input_ids, seq.labels, seq.doc_starts  # type: ignore[attr-defined]
    used = int((labels != PAD_LABEL).sum())
    bounds = list(starts) + [used]
    return [ids[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]


def test_best_fit_packs_whole_documents_and_chunks_long_ones() -> None:
    stream = best_fit_stream()
    tokens, offsets = stream.tokens, stream.offsets
    n = int(stream.sequences_per_epoch)
    found: list[np.ndarray] = []
    for i in range(n):
        seq = stream.sequence(i)
        used = int((seq.labels != PAD_LABEL).sum())
        # Documents first, then padding: pad ids, -100 labels.
        assert np.all(seq.labels[:used] == seq.input_ids[:used])
        assert np.all(seq.input_ids[used:] == PAD) and np.all(seq.labels[used:] == PAD_LABEL)
        check_positions(seq)
        found.extend(pieces(seq))
    # Every document + EOS appears exactly once per epoch: whole when it fits in seq_len,
    # otherwise cut into seq_len chunks.
    expected = []
    for d in range(len(LENGTHS)):
        doc = np.append(tokens[offsets[d]:offsets[d + 1]], EOS)
        expected.extend(doc[a:a + L] for a in range(0, len(doc), L))
    assert sorted(map(tuple, found)) == sorted(map(tuple, expected))


def test_best_fit_bins_are_tight_and_padding_is_reported() -> None:
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 30, 300).tolist()
    stream = best_fit_stream(lengths)
    n = int(stream.sequences_per_epoch)
    fill = [int((stream.sequence(i).labels != PAD_LABEL).sum()) for i in range(n)]
    # Best fit opens a bin only when a chunk fits in none: at most one bin is half empty.
    assert sum(f <= L // 2 for f in fill) <= 1
    assert stream.padding_fraction() == pytest.approx(1 - sum(fill) / (n * L))
    assert sum(fill) == sum(lengths) + len(lengths)
    assert stream.padding_fraction() < 0.05  # many small documents pack almost perfectly


@pytest.mark.parametrize("kind", ["concat", "best_fit"])
def test_random_access_equals_sequential_generation(kind: str) -> None:
    make = concat_stream if kind == "concat" else best_fit_stream
    sequential = make()
    n = int(3.5 * sequential.sequences_per_epoch)
    expected = [sequential.sequence(i) for i in range(n)]
    fresh = make()
    order = np.random.default_rng(1).permutation(n).tolist() + list(range(n - 1, -1, -1))
    for i in order:
        got = fresh.sequence(i)
        assert np.array_equal(got.input_ids, expected[i].input_ids)
        assert np.array_equal(got.labels, expected[i].labels)
        assert np.array_equal(got.position_ids, expected[i].position_ids)
        assert got.doc_starts == expected[i].doc_starts


def test_best_fit_epochs_reshuffle() -> None:
    stream = best_fit_stream()
    n = int(stream.sequences_per_epoch)
    first = [stream.sequence(i).input_ids.tolist() for i in range(n)]
    second = [stream.sequence(n + i).input_ids.tolist() for i in range(n)]
    assert first != second
    # The same documents, differently arranged (padding aside: its amount may differ).
    assert sorted(x for s in first for x in s if x != PAD) == \
        sorted(x for s in second for x in s if x != PAD)


def test_concat_marks_continued_pieces_and_counts_dropped_tokens() -> None:
    stream = concat_stream()
    n = int(2 * stream.sequences_per_epoch) + 3
    seqs = [stream.sequence(i) for i in range(n)]
    assert seqs[0].continued == []
    for prev, seq in zip(seqs, seqs[1:], strict=False):
        assert seq.continued == ([] if prev.input_ids[-1] == EOS else [0])
        assert (0 in seq.doc_starts) != (seq.continued == [0])
    for c in range(1, n - 4):
        # Tokens after the run's last sequence up to the next document start: never trained.
        dropped, i = 0, c
        while True:
            if seqs[i].doc_starts:
                dropped += seqs[i].doc_starts[0]
                break
            dropped += L
            i += 1
        assert stream.dropped_tokens(c) == dropped, c
    assert stream.dropped_tokens(0) == 0


def test_best_fit_marks_chunks_of_long_documents_as_continued() -> None:
    stream = best_fit_stream()
    n = int(stream.sequences_per_epoch)
    continued = sum(len(stream.sequence(i).continued) for i in range(n))
    # A document of n tokens plus EOS makes ceil((n + 1) / L) chunks: n // L after the first.
    chunks_after_first = sum(length // L for length in LENGTHS)
    assert continued == chunks_after_first > 0
    assert all(stream.dropped_tokens(c) == 0 for c in range(3 * n))


@pytest.mark.parametrize("kind", ["concat", "best_fit"])
def test_label_tokens_without_building_the_sequence(kind: str) -> None:
    stream = concat_stream() if kind == "concat" else best_fit_stream()
    for i in range(int(2.5 * stream.sequences_per_epoch)):
        # The model shifts labels by one: position 0 is never a target, padding never is.
        assert stream.label_tokens(i) == int((stream.sequence(i).labels[1:] != PAD_LABEL).sum())
