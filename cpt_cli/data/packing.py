"""Packing: one source's training documents turned into an endless stream of fixed-length
sequences, addressable by index in O(log n) without materializing anything.

`concat` joins documents with EOS and cuts every `seq_len` tokens; epochs follow one another in
the same stream, so only the very last partial sequence of a run is ever dropped. `best_fit` packs
whole documents into bins with best-fit-decreasing (documents longer than `seq_len` are cut into
chunks first) and pads each bin. Every epoch reshuffles the documents with a seed derived from the
run seed, the source name and the epoch number.

Each sequence comes with `position_ids` that restart at every document start: with attention mask
None, transformers turns restarted positions into a block-diagonal causal mask (document masking).

A source with trained spans (`loss_on: completion|assistant`, see cpt_cli/data/cache.py) has
`labels = -100` at every token outside them, wherever the token lands: in a sequence of its own,
after another document, or in the next sequence when concat cuts the document; the EOS that ends
a document is trained when the document's last token is (the end of an answer), not after a
prompt. `label_tokens(i)` counts what the loss sees without building the sequence.
"""

from __future__ import annotations

import hashlib
import heapq
from dataclasses import dataclass, field

import numpy as np

PAD_LABEL = -100


def epoch_seed(seed: int, name: str, epoch: int) -> int:
    digest = hashlib.sha256(f"{seed}|{name}|{epoch}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


@dataclass
class PackedSequence:
    """One training sequence; `doc_starts` are the positions where a document (or a chunk of a
    long one, in best_fit) begins; `continued` the positions of pieces whose document began in
    another sequence (rendering marks them; training treats every piece alike)."""

    input_ids: np.ndarray       # int64 [seq_len]
    labels: np.ndarray          # int64 [seq_len], PAD_LABEL on padding
    position_ids: np.ndarray    # int64 [seq_len], restarting at each document
    doc_starts: list[int]
    continued: list[int] = field(default_factory=list)
    padding: int = 0            # padding tokens at the end (best_fit)


class TrainedSpans:
    """The trained tokens of a cache entry: sorted, disjoint [start, end) ranges of positions
    in its token array. Counting the trained tokens of any range is two binary searches and a
    difference of prefix sums, so a sequence's loss targets are known without building it."""

    def __init__(self, spans: np.ndarray, offsets: np.ndarray) -> None:
        spans = np.asarray(spans, dtype=np.int64).reshape(-1, 2)
        self.starts, self.ends = spans[:, 0], spans[:, 1]
        self.cumulative = np.concatenate([[0], np.cumsum(self.ends - self.starts)])
        doc_ends = np.asarray(offsets[1:], dtype=np.int64)
        # A document's last token is trained when a span ends where the document ends.
        k = np.searchsorted(self.ends, doc_ends)
        self.last_trained = (k < len(self.ends)) & (self.ends[np.minimum(k, len(self.ends) - 1)]
                                                    == doc_ends) if len(self.ends) else \
            np.zeros(len(doc_ends), dtype=bool)

    def count(self, a: np.ndarray | int, b: np.ndarray | int) -> np.ndarray:
        """Trained tokens in [a, b) (element-wise for arrays)."""
        a, b = np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64)
        first = np.searchsorted(self.ends, a, side="right")   # first span ending after a
        last = np.searchsorted(self.starts, b, side="left")   # spans starting before b
        if not len(self.starts):
            return np.zeros_like(a)
        total = self.cumulative[last] - self.cumulative[first]
        lo = np.minimum(first, len(self.starts) - 1)
        hi = np.maximum(last - 1, 0)
        total = total - np.where(last > first, np.maximum(0, a - self.starts[lo]), 0)
        total = total - np.where(last > first, np.maximum(0, self.ends[hi] - b), 0)
        return np.where(last > first, total, 0)

    def first_trained(self, offsets: np.ndarray) -> np.ndarray:
        """Per document, how many tokens come before its first trained one (its length when it
        has none)."""
        a, b = np.asarray(offsets[:-1], dtype=np.int64), np.asarray(offsets[1:], dtype=np.int64)
        k = np.searchsorted(self.ends, a, side="right")
        if not len(self.starts):
            return b - a
        start = self.starts[np.minimum(k, len(self.starts) - 1)]
        has = (k < len(self.starts)) & (start < b)
        return np.where(has, np.maximum(start, a) - a, b - a)

    def mask(self, a: int, b: int) -> np.ndarray:
        """Which tokens of [a, b) are trained."""
        out = np.zeros(b - a, dtype=bool)
        first = int(np.searchsorted(self.ends, a, side="right"))
        last = int(np.searchsorted(self.starts, b, side="left"))
        for s, e in zip(self.starts[first:last].tolist(), self.ends[first:last].tolist(),
                        strict=True):
            out[max(s, a) - a:min(e, b) - a] = True
        return out


def _labels(piece: np.ndarray, n_text: int, a: int, doc: int,
            trained: TrainedSpans | None) -> np.ndarray:
    """The labels of a piece: its first `n_text` tokens are document tokens a..a+n_text, the
    rest the document's EOS; -100 where not trained."""
    if trained is None:
        return piece
    labels = np.full(len(piece), PAD_LABEL, dtype=np.int64)
    keep = np.zeros(len(piece), dtype=bool)
    keep[:n_text] = trained.mask(a, a + n_text)
    keep[n_text:] = bool(trained.last_trained[doc])
    labels[keep] = piece[keep]
    return labels


def _piece_label_count(n_text: int, piece_len: int, a: int, doc: int,
                       trained: TrainedSpans) -> int:
    eos = piece_len - n_text  # 0 or 1
    return int(trained.count(a, a + n_text)) + eos * int(trained.last_trained[doc])


class ConcatStream:
    """Documents (plus EOS) of one source, epoch after epoch, cut into `seq_len` pieces."""

    def __init__(self, name: str, tokens: np.ndarray, offsets: np.ndarray, doc_ids: np.ndarray,
                 eos_id: int, seq_len: int, seed: int,
                 trained: TrainedSpans | None = None) -> None:
        self.trained = trained
        self.name, self.tokens, self.offsets = name, tokens, offsets
        self.doc_ids = np.asarray(doc_ids, dtype=np.int64)
        self.eos_id, self.seq_len, self.seed = eos_id, seq_len, seed
        self.lengths = offsets[1:] - offsets[:-1]
        self.epoch_tokens = int((self.lengths[self.doc_ids] + 1).sum())
        self._epochs: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    @property
    def sequences_per_epoch(self) -> float:
        return self.epoch_tokens / self.seq_len

    def _epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        if epoch not in self._epochs:
            if len(self._epochs) > 2:  # a loader moves forward: two epochs in memory suffice
                self._epochs.pop(min(self._epochs))
            order = np.random.default_rng(epoch_seed(self.seed, self.name, epoch)).permutation(
                self.doc_ids)
            ends = np.cumsum(self.lengths[order] + 1)
            self._epochs[epoch] = (order, ends)
        return self._epochs[epoch]

    def label_tokens(self, index: int) -> int:
        """Loss targets of sequence `index`: all tokens but the first (labels shift by one);
        with trained spans, those of its trained tokens, counted piece by piece."""
        if self.trained is None:
            return self.seq_len - 1
        total = 0
        for filled, doc, offset, piece_len, n_text in self._pieces(index):
            a = int(self.offsets[doc]) + offset
            total += _piece_label_count(n_text, piece_len, a, doc, self.trained)
            if filled == 0:  # the first position is never a target
                total -= int(self.trained.count(a, a + 1)) if n_text else \
                    int(self.trained.last_trained[doc])
        return total

    def dropped_tokens(self, sequences: int) -> int:
        """Tokens never trained when the run takes `sequences` sequences: the rest of the
        document (with its EOS) that the end of the last sequence cuts."""
        if sequences == 0:
            return 0
        epoch, within = divmod(sequences * self.seq_len, self.epoch_tokens)
        if within == 0:
            return 0
        _, ends = self._epoch(epoch)
        k = int(np.searchsorted(ends, within, side="left"))
        return int(ends[k] - within)

    def _pieces(self, index: int) -> list[tuple[int, int, int, int, int]]:
        """The pieces of sequence `index`: (where it lands, document, where in the document
        it starts, its length with the EOS when it holds it, document tokens in it)."""
        L = self.seq_len
        pieces = []
        stream_pos = index * L
        filled = 0
        while filled < L:
            epoch, within = divmod(stream_pos, self.epoch_tokens)
            order, ends = self._epoch(epoch)
            k = int(np.searchsorted(ends, within, side="right"))
            doc_begin = int(ends[k - 1]) if k else 0
            offset = within - doc_begin              # where in "doc + EOS" we are
            doc = int(order[k])
            a, b = int(self.offsets[doc]), int(self.offsets[doc + 1])
            piece_len = min(b - a + 1 - offset, L - filled)
            n_text = max(0, min(piece_len, b - a - offset))
            pieces.append((filled, doc, offset, piece_len, n_text))
            filled += piece_len
            stream_pos += piece_len
        return pieces

    def sequence(self, index: int) -> PackedSequence:
        L = self.seq_len
        out = np.empty(L, dtype=np.int64)
        labels = out if self.trained is None else np.empty(L, dtype=np.int64)
        pos = np.empty(L, dtype=np.int64)
        starts: list[int] = []
        for filled, doc, offset, piece_len, n_text in self._pieces(index):
            a = int(self.offsets[doc]) + offset
            if offset == 0:
                starts.append(filled)
            piece = np.empty(piece_len, dtype=np.int64)
            piece[:n_text] = self.tokens[a:a + n_text]
            if n_text < piece_len:
                piece[n_text:] = self.eos_id  # only ever one: the EOS ending the document
            out[filled:filled + piece_len] = piece
            if self.trained is not None:
                labels[filled:filled + piece_len] = _labels(piece, n_text, a, doc, self.trained)
            # Every piece starts a document, or continues one cut by the previous sequence: in
            # both cases positions restart at 0, so none exceeds seq_len.
            pos[filled:filled + piece_len] = np.arange(piece_len)
        labels = out.copy() if self.trained is None else labels
        return PackedSequence(out, labels, pos, starts, [] if starts[:1] == [0] else [0])


def best_fit_decreasing(sizes: np.ndarray, capacity: int) -> tuple[np.ndarray, int]:
    """Bin of each item (sizes in decreasing order, each <= capacity) under best fit: the open bin
    with the least room that still fits, the lowest-numbered on ties, else a new bin.

    Bins are kept by their room left (a Fenwick tree of counts over 1..capacity finds the
    smallest room >= size in O(log capacity)), so packing a million chunks takes seconds, not
    the hours a sorted list of bins would take. The result depends on the sizes only.
    """
    tree = [0] * (capacity + 1)  # Fenwick tree: open bins per room left
    by_room: dict[int, list[int]] = {}
    top = 1 << capacity.bit_length()
    out = np.empty(len(sizes), dtype=np.int64)
    n_bins = 0
    for p, size in enumerate(sizes.tolist()):
        # Open bins with room < size: the prefix count up to size - 1.
        below, i = 0, size - 1
        while i > 0:
            below += tree[i]
            i -= i & -i
        # The smallest room whose prefix count exceeds `below` (binary lifting), if any.
        room, seen, step = 0, 0, top
        while step:
            nxt = room + step
            if nxt <= capacity and seen + tree[nxt] <= below:
                room, seen = nxt, seen + tree[nxt]
            step >>= 1
        room += 1
        if room <= capacity:
            b = heapq.heappop(by_room[room])
            i = room
            while i <= capacity:
                tree[i] -= 1
                i += i & -i
        else:
            b, room = n_bins, capacity
            n_bins += 1
        out[p] = b
        left = room - size
        if left > 0:
            heapq.heappush(by_room.setdefault(left, []), b)
            i = left
            while i <= capacity:
                tree[i] += 1
                i += i & -i
    return out, n_bins


@dataclass
class _Epoch:
    """One epoch of best_fit bins as flat arrays: bin `order[i]` is the i-th sequence, and holds
    chunks ptr[bin]:ptr[bin + 1] of (doc, start, length)."""

    doc: np.ndarray
    start: np.ndarray
    length: np.ndarray
    ptr: np.ndarray
    order: np.ndarray


class BestFitStream:
    """Whole documents packed into `seq_len` bins by best-fit-decreasing, padded.

    Documents longer than `seq_len` (EOS included) are cut into `seq_len` chunks first. Best fit
    sees sizes only, so the bins are computed once: every epoch has the same number of bins,
    filled alike; an epoch only draws which documents of each size take which places (from its
    shuffle) and the order the bins are visited in. Any sequence of any epoch is then one
    divmod away, and resuming at epoch 900 builds epoch 900 alone.
    """

    def __init__(self, name: str, tokens: np.ndarray, offsets: np.ndarray, doc_ids: np.ndarray,
                 eos_id: int, pad_id: int, seq_len: int, seed: int,
                 trained: TrainedSpans | None = None) -> None:
        self.trained = trained
        self.name, self.tokens, self.offsets = name, tokens, offsets
        self.doc_ids = np.asarray(doc_ids, dtype=np.int64)
        self.eos_id, self.pad_id, self.seq_len, self.seed = eos_id, pad_id, seq_len, seed
        self.lengths = offsets[1:] - offsets[:-1]
        _, _, sizes = self._chunks(self.doc_ids)
        self._sizes = np.sort(sizes)[::-1]
        self._bin_of_slot, self.n_bins = best_fit_decreasing(self._sizes, seq_len)
        self._epochs: dict[int, _Epoch] = {}

    def _chunks(self, docs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(doc, start, length) of every chunk, documents in the given order, each document's
        chunks in text order; the last chunk of a document carries its EOS."""
        L = self.seq_len
        n = self.lengths[docs] + 1
        per_doc = (n + L - 1) // L
        doc = np.repeat(docs, per_doc)
        first = np.repeat(np.cumsum(per_doc) - per_doc, per_doc)
        start = (np.arange(len(doc), dtype=np.int64) - first) * L
        length = np.minimum(L, np.repeat(n, per_doc) - start)
        return doc, start, length

    def _epoch(self, epoch: int) -> _Epoch:
        if epoch not in self._epochs:
            if len(self._epochs) > 2:  # a loader moves forward: two epochs in memory suffice
                self._epochs.pop(min(self._epochs))
            rng = np.random.default_rng(epoch_seed(self.seed, self.name, epoch))
            doc, start, length = self._chunks(rng.permutation(self.doc_ids))
            # Best fit takes chunks longest first; ties keep the shuffled order (stable sort).
            slot = np.empty(len(doc), dtype=np.int64)
            slot[np.argsort(-length, kind="stable")] = np.arange(len(doc))
            bins = self._bin_of_slot[slot]
            grouped = np.lexsort((slot, bins))  # by bin, then in the order best fit placed them
            ptr = np.concatenate([[0], np.cumsum(np.bincount(bins, minlength=self.n_bins))])
            self._epochs[epoch] = _Epoch(doc[grouped], start[grouped], length[grouped], ptr,
                                         rng.permutation(self.n_bins))
        return self._epochs[epoch]

    @property
    def sequences_per_epoch(self) -> float:
        return float(self.n_bins)

    def dropped_tokens(self, sequences: int) -> int:
        """Whole documents in every bin: nothing is cut, nothing dropped."""
        return 0

    def padding_fraction(self) -> float:
        """Padding over the bins (the same in every epoch)."""
        return 1.0 - int(self._sizes.sum()) / (self.n_bins * self.seq_len) if self.n_bins else 0.0

    def _bin(self, index: int) -> tuple[_Epoch, int, int]:
        epoch, i = divmod(index, self.n_bins)
        e = self._epoch(epoch)
        b = int(e.order[i])
        return e, int(e.ptr[b]), int(e.ptr[b + 1])

    def label_tokens(self, index: int) -> int:
        """Loss targets of sequence `index` without building it: its tokens minus the first
        (the model shifts labels by one); padding has none; with trained spans, its trained
        tokens less the first position's."""
        e, a, b = self._bin(index)
        if self.trained is None:
            return int(e.length[a:b].sum()) - 1
        docs, starts, lengths = e.doc[a:b], e.start[a:b], e.length[a:b]
        first = self.offsets[docs] + starts
        n_text = np.maximum(0, np.minimum(lengths, self.lengths[docs] - starts))
        total = int(self.trained.count(first, first + n_text).sum())
        total += int(self.trained.last_trained[docs][lengths > n_text].sum())
        first_label = self.trained.count(first[0], first[0] + 1) if n_text[0] else \
            self.trained.last_trained[docs[0]]
        return total - int(first_label)

    def sequence(self, index: int) -> PackedSequence:
        e, first, last = self._bin(index)
        L = self.seq_len
        out = np.full(L, self.pad_id, dtype=np.int64)
        labels = np.full(L, PAD_LABEL, dtype=np.int64)
        pos = np.zeros(L, dtype=np.int64)
        starts: list[int] = []
        continued: list[int] = []
        filled = 0
        for doc, start, length in zip(e.doc[first:last].tolist(), e.start[first:last].tolist(),
                                      e.length[first:last].tolist(), strict=True):
            a, b = int(self.offsets[doc]), int(self.offsets[doc + 1])
            n_text = max(0, min(length, b - a - start))
            out[filled:filled + n_text] = self.tokens[a + start:a + start + n_text]
            out[filled + n_text:filled + length] = self.eos_id
            labels[filled:filled + length] = _labels(out[filled:filled + length], n_text,
                                                     a + start, doc, self.trained)
            pos[filled:filled + length] = np.arange(length)
            starts.append(filled)
            if start:
                continued.append(filled)
            filled += length
        if filled < L:
            pos[filled:] = np.arange(L - filled)  # padding is its own "document"
        return PackedSequence(out, labels, pos, starts, continued, L - filled)
