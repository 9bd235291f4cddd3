"""Packing: one source's training documents turned into an endless stream of fixed-length
sequences, addressable by index in O(log n) without materializing anything.

`concat` joins documents with EOS and cuts every `seq_len` tokens; epochs follow one another in
the same stream, so only the very last partial sequence of a run is ever dropped. `best_fit` packs
whole documents into bins with best-fit-decreasing (documents longer than `seq_len` are cut into
chunks first) and pads each bin. Every epoch reshuffles the documents with a seed derived from the
run seed, the source name and the epoch number.

Each sequence comes with `position_ids` that restart at every document start: with attention mask
None, transformers turns restarted positions into a block-diagonal causal mask (document masking).
"""

from __future__ import annotations

import bisect
import hashlib
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


class ConcatStream:
    """Documents (plus EOS) of one source, epoch after epoch, cut into `seq_len` pieces."""

    def __init__(self, name: str, tokens: np.ndarray, offsets: np.ndarray, doc_ids: np.ndarray,
                 eos_id: int, seq_len: int, seed: int) -> None:
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

    def sequence(self, index: int) -> PackedSequence:
        L = self.seq_len
        out = np.empty(L, dtype=np.int64)
        pos = np.empty(L, dtype=np.int64)
        starts: list[int] = []
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
            if offset == 0:
                starts.append(filled)
            piece = np.empty(piece_len, dtype=np.int64)
            n_text = max(0, min(piece_len, b - a - offset))
            piece[:n_text] = self.tokens[a + offset:a + offset + n_text]
            if n_text < piece_len:
                piece[n_text:] = self.eos_id  # only ever one: the EOS ending the document
            out[filled:filled + piece_len] = piece
            # Every piece starts a document, or continues one cut by the previous sequence: in
            # both cases positions restart at 0, so none exceeds seq_len.
            pos[filled:filled + piece_len] = np.arange(piece_len)
            filled += piece_len
            stream_pos += piece_len
        return PackedSequence(out, out.copy(), pos, starts, [] if starts[:1] == [0] else [0])


class BestFitStream:
    """Whole documents packed into `seq_len` bins by best-fit-decreasing, padded; one epoch's bins
    are built when first needed and visited in a seeded random order."""

    def __init__(self, name: str, tokens: np.ndarray, offsets: np.ndarray, doc_ids: np.ndarray,
                 eos_id: int, pad_id: int, seq_len: int, seed: int) -> None:
        self.name, self.tokens, self.offsets = name, tokens, offsets
        self.doc_ids = np.asarray(doc_ids, dtype=np.int64)
        self.eos_id, self.pad_id, self.seq_len, self.seed = eos_id, pad_id, seq_len, seed
        self.lengths = offsets[1:] - offsets[:-1]
        self._epochs: dict[int, list[list[tuple[int, int, int]]]] = {}
        self._counts: list[int] = []  # bins per epoch, for epochs built so far

    def _bins(self, epoch: int) -> list[list[tuple[int, int, int]]]:
        if epoch not in self._epochs:
            if len(self._epochs) > 2:
                self._epochs.pop(min(self._epochs))
            rng = np.random.default_rng(epoch_seed(self.seed, self.name, epoch))
            L = self.seq_len
            chunks: list[tuple[int, int, int]] = []  # (doc, start, length incl. EOS if last)
            for doc in rng.permutation(self.doc_ids):
                n = int(self.lengths[doc]) + 1
                for start in range(0, n, L):
                    chunks.append((int(doc), start, min(L, n - start)))
            chunks.sort(key=lambda c: -c[2])  # stable: ties keep the shuffled order
            free: list[tuple[int, int]] = []  # (space left, bin index), sorted
            bins: list[list[tuple[int, int, int]]] = []
            for chunk in chunks:
                i = bisect.bisect_left(free, (chunk[2], -1))
                if i < len(free):
                    space, b = free.pop(i)
                else:
                    space, b = L, len(bins)
                    bins.append([])
                bins[b].append(chunk)
                if space - chunk[2] > 0:
                    bisect.insort(free, (space - chunk[2], b))
            order = rng.permutation(len(bins))
            self._epochs[epoch] = [bins[i] for i in order]
            while len(self._counts) <= epoch:
                self._counts.append(-1)
            self._counts[epoch] = len(bins)
        return self._epochs[epoch]

    @property
    def sequences_per_epoch(self) -> float:
        return float(len(self._bins(0)))

    def dropped_tokens(self, sequences: int) -> int:
        """Whole documents in every bin: nothing is cut, nothing dropped."""
        return 0

    def padding_fraction(self) -> float:
        """Padding over the bins of one epoch (the next epochs pack about as tightly)."""
        bins = self._bins(0)
        used = sum(c[2] for b in bins for c in b)
        return 1.0 - used / (len(bins) * self.seq_len) if bins else 0.0

    def sequence(self, index: int) -> PackedSequence:
        epoch = 0
        while True:
            n = len(self._bins(epoch)) if (epoch >= len(self._counts) or self._counts[epoch] < 0) \
                else self._counts[epoch]
            if index < n:
                break
            index -= n
            epoch += 1
        L = self.seq_len
        out = np.full(L, self.pad_id, dtype=np.int64)
        labels = np.full(L, PAD_LABEL, dtype=np.int64)
        pos = np.zeros(L, dtype=np.int64)
        starts: list[int] = []
        continued: list[int] = []
        filled = 0
        for doc, start, length in self._bins(epoch)[index]:
            a, b = int(self.offsets[doc]), int(self.offsets[doc + 1])
            n_text = max(0, min(length, b - a - start))
            out[filled:filled + n_text] = self.tokens[a + start:a + start + n_text]
            out[filled + n_text:filled + length] = self.eos_id
            labels[filled:filled + length] = out[filled:filled + length]
            pos[filled:filled + length] = np.arange(length)
            starts.append(filled)
            if start:
                continued.append(filled)
            filled += length
        if filled < L:
            pos[filled:] = np.arange(L - filled)  # padding is its own "document"
        return PackedSequence(out, labels, pos, starts, continued)
